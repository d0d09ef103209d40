"""The ``dtool cache`` command group (also installed as ``dtool-cache``).

A thin click layer: it parses options, calls the library and hands results to
:mod:`formatting`.  Bad input is a one-line error with exit status 2, never a traceback,
and nothing is deleted.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from contextlib import contextmanager
from typing import Optional

import click

from . import __version__, api, audit as audit_mod, facilities, formatting, housekeeping
from . import planning, report, sharing
from .housekeeping import settings as settings_mod
from .store.ledger import open_ledger
from .errors import CacheManagerError, InvalidInput
from .layout import resolve_cache_dir
from .params import AGE, SIZE, BadInput
from .policies import POLICIES, Rules
from .privileges import work_as_cache_owner

_CONTEXT = dict(help_option_names=["-h", "--help"])
DEFAULT_AGE = "30d"
PROGRESS_THRESHOLD = 200  # removals before a progress bar is worth showing
FORMATS = ("table", "json")

cache_dir_option = click.option(
    "--cache-dir", default=None, metavar="DIR",
    help="Cache directory (default: DTOOL_CACHE_DIRECTORY, then dtool.json, then "
         "~/.cache/dtool).")


def json_option(command):
    """``-f/--format table|json``, as dtool's own commands take it, and ``--json`` (the
    same as ``--format json``); the command gets ``as_json``."""
    @functools.wraps(command)
    def with_format(*args, output_format=None, as_json=False, **kwargs):
        if as_json and output_format == "table":
            raise BadInput("--json and --format table contradict each other")
        return command(*args, as_json=as_json or output_format == "json", **kwargs)

    with_json = click.option("--json", "as_json", is_flag=True,
                             help="Print machine-readable JSON (stable keys); the same as "
                                  "--format json.")(with_format)
    return click.option("-f", "--format", "output_format", type=click.Choice(FORMATS),
                        help="Output format (default: table).")(with_json)


dataset_option = click.option("--dataset", metavar="URI-OR-UUID",
                              help="Only this dataset's items.")


DEBUG_ENV = "DTOOL_CACHE_MANAGER_DEBUG"
INTERNAL_ERROR = 70  # EX_SOFTWARE: a bug of ours, or shared state we failed to foresee


class _InternalError(click.ClickException):
    exit_code = INTERNAL_ERROR


class _OneLineErrors(click.Group):
    """Turn click's own usage errors in our subcommands (a bad --limit, an unknown option)
    into one-line errors, like ours; this works under ``dtool cache`` as well.  Anything
    unforeseen (a bug, or something in the shared cache we did not expect) is one line too,
    with its own exit status; ``DTOOL_CACHE_MANAGER_DEBUG=1`` shows the traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
            raise BadInput(exc.format_message() + hint) from None
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as exc:  # noqa: BLE001 - the last resort: never a traceback
            if os.environ.get(DEBUG_ENV, "").strip() not in ("", "0"):
                raise
            raise _InternalError(f"internal error: {exc!r} (set {DEBUG_ENV}=1 to see where; "
                                 "please report it)") from None


@click.group(cls=_OneLineErrors, context_settings=_CONTEXT)
@click.version_option(__version__, prog_name="dtool-cache-manager")
def cache():
    """Inspect and clean the dtool item cache.

    Every access to a cached item is recorded (hits, misses, users, fetch time) and items
    a live process uses are never removed.
    """
    why = facilities.unavailable()
    if why is not None:
        raise click.ClickException(f"dtool cache cannot work on this platform: {why}")


@cache.command(short_help="How much space the cache uses and what is in it.")
@cache_dir_option
@json_option
@click.option("--rescan", is_flag=True,
              help="Stat every file again instead of only directories that changed (for "
                   "files rewritten in place, which a directory's mtime does not show).")
def summary(cache_dir, as_json, rescan):
    """How much space the cache uses, what is in it, and what is in use."""
    limits = _settings_or_none()  # read as ourselves, before working as the cache's owner
    directory = _cache_directory(cache_dir)
    result = _guarded(report.summarize, directory, None, rescan)
    status = _guarded(housekeeping.status, directory, *limits)
    click.echo(formatting.render_summary(result, as_json, housekeeping=status,
                                         sharing=_sharing(directory)))


@cache.command(name="ls")
@cache_dir_option
@json_option
@dataset_option
@click.option("--sort", default="accessed", show_default=True,
              metavar="size|accessed|count|name[:asc|desc]", help="Sort order.")
@click.option("--limit", type=click.IntRange(min=0, max=sys.maxsize), default=None,
              help="Show at most N items.")
@click.option("--in-use", is_flag=True, help="Only items a live process holds.")
@click.option("--untracked", is_flag=True, help="Only files no hook has seen.")
def ls(cache_dir, as_json, dataset, sort, limit, in_use, untracked):
    """List cached items with their usage."""
    _guarded(report.parse_sort, sort)  # bad input fails before any work
    _check_dataset(dataset)
    directory = _cache_directory(cache_dir)
    items = _guarded(report.list_cached, directory, sort, limit, in_use, untracked, dataset)
    click.echo(formatting.render_items(items, as_json))
    _note_other_hosts(directory)


@cache.command(short_help="Remove items by age, size or use; never those in use.")
@cache_dir_option
@json_option
@dataset_option
@click.option("--all", "remove_all", is_flag=True, help="Remove everything not in use.")
@click.option("--older-than", type=AGE, metavar="AGE",
              help="Remove items not used within AGE (30d, 2w, 12h; a bare number is days).")
@click.option("--retain-size", type=SIZE, metavar="SIZE",
              help="Remove least recently used items until the cache holds at most SIZE "
                   "(1TB, 500MiB, 0).")
@click.option("--exclude-frequently-accessed", type=click.IntRange(min=1, max=2 ** 62),
              metavar="N",
              help="Never remove items accessed N or more times.")
@click.option("--policy", type=click.Choice(POLICIES), default="lru", show_default=True,
              help="Which items --retain-size removes first: least recently used, least "
                   "frequently used, or cheapest to fetch again per byte (cost).")
@click.option("--dry-run", is_flag=True, help="Show what would be removed; remove nothing.")
@click.option("--list", "list_all", is_flag=True,
              help=f"Show every file of the plan (beyond {formatting.LISTED_AT_MOST} files it "
                   "is shown per dataset).")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
def clean(cache_dir, as_json, dataset, remove_all, older_than, retain_size,
          exclude_frequently_accessed, policy, dry_run, list_all, yes):
    """Remove cached items by age, size and frequency; never what is in use.

    With no rule, removes items not used in the past month (--older-than 30d).  Filters
    (--older-than, --exclude-frequently-accessed) narrow the candidates; --retain-size then
    removes the fewest least recently used of them needed to reach SIZE.  Leftover partial
    downloads ('*.tmp' untouched for an hour) are removed too.
    """
    if remove_all and (older_than is not None or retain_size is not None
                       or exclude_frequently_accessed is not None):
        raise BadInput("--all removes everything not in use; it cannot be combined with "
                       "--older-than, --retain-size or --exclude-frequently-accessed")
    _check_dataset(dataset)
    directory = _cache_directory(cache_dir, must_exist=True)
    if not (dry_run or os.access(directory, os.W_OK)):
        raise BadInput(f"cannot clean {directory}: you may not write to it")
    if not dry_run:
        _require_single_host(directory)
    rules = Rules(remove_all=remove_all, older_than_seconds=older_than,
                  exclude_frequently_accessed=exclude_frequently_accessed,
                  retain_size_bytes=retain_size, policy=policy)
    note = None
    if rules.empty:
        rules = Rules(older_than_seconds=AGE.convert(DEFAULT_AGE, None, None))
        note = f"No rule given: removing items not used in the past month " \
               f"(--older-than {DEFAULT_AGE})."
    if not (dry_run or yes or sys.stdin.isatty()):
        raise BadInput("refusing to remove files without confirmation: pass --yes "
                       "(or --dry-run to see the plan)")
    with _ledger(directory) as ledger:  # opened, and the journals folded, once
        plan = _guarded(planning.plan_in, ledger, rules, dataset, time.time())
        # Names for a plan someone reads; a scripted clean (--yes) goes straight on.
        naming = _guarded(planning.naming, ledger, [p.relpath for p in plan.removals]) \
            if plan.removals and (dry_run or not yes) else None
        if dry_run:
            click.echo(formatting.render_clean_plan(plan, note, as_json, naming, list_all))
            _note_other_hosts(directory)
            return
        if not yes:
            click.echo(formatting.render_clean_plan(plan, note, False, naming, list_all))
            if not (plan.removals or plan.stale_partials):
                return
            click.confirm("Proceed?", default=False, abort=True)
        result = _guarded(_execute, plan, ledger, not as_json)
    click.echo(formatting.render_clean_result(plan, result, note if yes else None, as_json))


def _execute(plan, ledger, show_progress: bool):
    todo = plan.removals + plan.stale_partials
    if show_progress and sys.stdout.isatty() and len(todo) >= PROGRESS_THRESHOLD:
        with click.progressbar(length=len(todo), label="Removing") as bar:
            return plan.execute(ledger, progress=lambda _: bar.update(1))
    return plan.execute(ledger)


@contextmanager
def _ledger(directory):
    """:func:`open_ledger`, with its errors as one line, as :func:`_guarded` gives them."""
    try:
        with open_ledger(directory) as ledger:
            yield ledger
    except CacheManagerError as exc:
        raise _one_line(exc) from None


@cache.command(name="audit")
@cache_dir_option
@json_option
@click.option("--by", type=click.Choice(audit_mod.GROUPINGS), default="user",
              show_default=True, help="Group the figures.")
@click.option("--since", type=AGE, metavar="AGE", help="Only accesses within AGE (30d, 12h).")
def audit_command(cache_dir, as_json, by, since):
    """Who used the cache, how often it hit, and the time it saved."""
    since_time = None if since is None else time.time() - since
    directory = _cache_directory(cache_dir)
    rows = _guarded(_audit_rows, directory, by, since_time)
    click.echo(formatting.render_audit(rows, audit_mod.totals(rows), by, as_json))
    _note_other_hosts(directory)


def _audit_rows(directory, by, since_time):
    with open_ledger(directory) as ledger:
        return audit_mod.audit(ledger, by, since_time)


@cache.command(name="verify", short_help="Check cached files against their manifests.")
@cache_dir_option
@json_option
@click.option("--hash", "check_hash", is_flag=True,
              help="Also compare content hashes (reads every file).")
@click.option("--fix", is_flag=True,
              help="Remove damaged files not in use, so the next access fetches them again.")
def verify_command(cache_dir, as_json, check_hash, fix):
    """Check cached files against their dataset manifests (no network needed).

    Exits with status 1 if any file is missing, truncated or corrupt and was not fixed.
    """
    from . import verify as verify_mod

    directory = _cache_directory(cache_dir)
    if fix:
        _require_single_host(directory)
    results = _guarded(_verify_results, directory, check_hash, fix)
    click.echo(formatting.render_verify(results, as_json))
    if any(r.status not in (verify_mod.OK, verify_mod.UNVERIFIABLE) and not r.fixed
           for r in results):
        sys.exit(1)


def _verify_results(directory, check_hash, fix):
    from . import verify as verify_mod

    with open_ledger(directory) as ledger:
        return verify_mod.verify(ledger, check_hash=check_hash, fix=fix)


@cache.command(name="config")
@json_option
@click.argument("key", required=False, metavar="[KEY")
@click.argument("value", required=False, metavar="[VALUE]]")
@click.option("--unset", is_flag=True, help="Remove KEY from dtool's config file.")
def config_command(as_json, key, value, unset):
    """Show or set the limits of automatic housekeeping.

    \b
    dtool cache config                              every setting, its source
    dtool cache config DTOOL_CACHE_MAX_SIZE         one value
    dtool cache config DTOOL_CACHE_MAX_SIZE 50GB    write it to dtool's config
    dtool cache config DTOOL_CACHE_MAX_SIZE --unset remove it from there

    KEY is DTOOL_CACHE_MAX_SIZE (a size), DTOOL_CACHE_MAX_AGE or
    DTOOL_CACHE_AUTOCLEAN_INTERVAL (ages; the interval defaults to 1h).  An environment
    variable of the same name takes precedence over the file.  The cache's location is
    set by 'dtool config cache' (dtool's own command), not here.
    """
    path = settings_mod.config_path()
    try:
        if key is None:
            if unset:
                raise BadInput("--unset needs a KEY")
            click.echo(formatting.render_settings(settings_mod.survey(path=path), path,
                                                  as_json))
        elif unset:
            if value is not None:
                raise BadInput("--unset takes a KEY and no VALUE")
            _config_unset(key, path, as_json)
        elif value is None:
            _config_show(key, path, as_json)
        else:
            _config_write(key, value, path, as_json)
    except settings_mod.SettingsError as exc:
        raise BadInput(str(exc)) from None


def _config_show(key, path, as_json):
    setting = settings_mod.find(key, path=path)
    if setting.text is None and not as_json:
        click.echo(f"{key} is not set", err=True)
        return
    click.echo(formatting.render_setting(setting, as_json))


def _config_write(key, value, path, as_json):
    text = settings_mod.write(key, value, path)
    click.echo(formatting.render_config_change(key, text, None, path, as_json))
    _note_environment_override(key)


def _config_unset(key, path, as_json):
    removed = settings_mod.unset(key, path)
    click.echo(formatting.render_config_change(key, None, removed, path, as_json))
    _note_environment_override(key)


def _note_environment_override(key):
    if os.environ.get(key, "").strip():
        click.echo(f"Note: {key}={os.environ[key]!r} in the environment takes precedence.",
                   err=True)


@cache.command(name="autoclean")
@cache_dir_option
@json_option
def autoclean_command(cache_dir, as_json):
    """Run one automatic clean now, in the foreground.

    Does what the background clean started by a cache miss does: measures the cache,
    removes items unused for longer than DTOOL_CACHE_MAX_AGE, then, if the cache is over
    DTOOL_CACHE_MAX_SIZE, the least recently used items down to 90% of it.  Items in use
    are kept.  The run is logged like an automatic one.  Exits with status 1 if the run
    failed, or if an automatic clean is running already.
    """
    try:
        limits = settings_mod.load()
    except settings_mod.SettingsError as exc:
        raise BadInput(str(exc)) from None
    if not limits.limits_set:
        raise BadInput(f"no limit set: set {settings_mod.MAX_SIZE} or {settings_mod.MAX_AGE} "
                       "(e.g. 'dtool cache config DTOOL_CACHE_MAX_SIZE 50GB')")
    directory = _cache_directory(cache_dir, must_exist=True)
    if not os.access(directory, os.W_OK):
        raise BadInput(f"cannot clean {directory}: you may not write to it")
    _require_single_host(directory)
    try:
        record = _guarded(housekeeping.run_now, directory, limits)
    except housekeeping.Busy as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(formatting.render_autoclean(record, as_json))
    if record.error:
        sys.exit(1)


@cache.command(name="init", short_help="Show or declare which hosts use the cache.")
@cache_dir_option
@json_option
@click.option("--single-host/--no-single-host", default=None,
              help="Declare that only this host uses the cache (or withdraw that).")
@click.option("--database", metavar="URL",
              help="Register the PostgreSQL server (14 or later) that coordinates every host "
                   "using the cache: postgresql://[USER@]HOST[:PORT]/DB, without a password "
                   "(use ~/.pgpass, PGPASSFILE, peer or GSSAPI).")
@click.option("--no-database", is_flag=True, help="Withdraw the coordinator's registration.")
@click.option("--session-timeout", type=click.IntRange(2, 3600), metavar="SECONDS",
              help="With --database: how long the server waits for a silent host before it "
                   f"drops its sessions, and with them its holds (default "
                   f"{sharing.DEFAULT_SESSION_TIMEOUT}).")
@click.option("--grace", type=click.IntRange(1, 30 * 86400), metavar="SECONDS",
              help="With --database: how long a cleaned file stays in the trash, readable "
                   "by a host that was cut off (more than twice the session timeout; default "
                   f"{sharing.DEFAULT_GRACE_SECONDS}).")
def init_command(cache_dir, as_json, single_host, database, no_database, session_timeout,
                 grace):
    """Show which hosts may use the cache, or declare how they share it.

    Holds are seen by one host's kernel.  A cache on a network or FUSE filesystem (NFS,
    Lustre, GPFS, CIFS, sshfs ...), or on one whose type this platform cannot tell, may be
    used by other hosts too: clean, verify --fix and automatic housekeeping then remove
    nothing, until the cache's owner (or root) either registers a PostgreSQL server with
    --database, through which every host's holds reach every other host, or declares with
    --single-host that only this host uses it.  A cache on a local disk needs neither.
    See docs/multi-host.rst.
    """
    chosen = [flag for flag, given in (("--single-host/--no-single-host", single_host is not None),
                                       ("--database", database is not None),
                                       ("--no-database", no_database)) if given]
    if len(chosen) > 1:
        raise BadInput(f"{' and '.join(chosen)} cannot be used together")
    if database is None and (session_timeout is not None or grace is not None):
        raise BadInput("--session-timeout and --grace go with --database")
    directory = _cache_directory(cache_dir, must_exist=True)
    before = _sharing(directory)
    assert before is not None  # the directory exists: checked above
    if database is not None:
        _guarded(api.register_coordinator, database, directory,
                 session_timeout or sharing.DEFAULT_SESSION_TIMEOUT,
                 grace or sharing.DEFAULT_GRACE_SECONDS)
    elif no_database:
        if before.declared == sharing.SINGLE_HOST:
            raise BadInput(f"{directory} has no coordinator: it is declared single-host "
                           "(withdraw that with --no-single-host)")
        _guarded(sharing.declare_at, directory, False)
    elif single_host is not None:
        if before.declared == sharing.COORDINATED:
            raise BadInput(f"{directory} has a coordinator: withdraw it first with "
                           "--no-database, once no other host uses the cache")
        _guarded(sharing.declare_at, directory, single_host)
    found = _sharing(directory)
    assert found is not None
    click.echo(formatting.render_sharing(directory, found, as_json))


def _sharing(directory: str) -> Optional[sharing.Sharing]:
    return _guarded(sharing.sharing_at, directory)


def _require_single_host(directory: str) -> None:
    """Refuse a removal, before any work, where other hosts may use the cache."""
    found = _sharing(directory)
    if found is not None and found.possibly_shared:
        raise BadInput(found.refusal(directory))


def _note_other_hosts(directory: str) -> None:
    """Say, after a listing, that what other hosts do is not in it."""
    found = _sharing(directory)
    if found is not None and found.possibly_shared:
        click.echo(f"Note: {directory} is on {found.filesystem_text}: other hosts' use of "
                   f"it is not shown, and nothing is removed from it; {sharing.HOW_TO_DECLARE}.",
                   err=True)


def _guarded(fn, *args):
    """Turn our own errors (the ledger, an unsafe cache) into one-line messages; show how
    an indexing scan is getting on, on a terminal."""
    progress = _IndexingProgress(sys.stderr)
    try:
        with report.reporting_progress(progress):
            return fn(*args)
    except CacheManagerError as exc:
        raise _one_line(exc) from None
    finally:
        progress.done()


def _one_line(exc: CacheManagerError) -> click.ClickException:
    """Our error as one ``Error:`` line: exit status 2 for the user's input, else 1."""
    if isinstance(exc, InvalidInput):
        return BadInput(str(exc))
    return click.ClickException(str(exc))


class _IndexingProgress:
    """'Indexing the cache: 412,000 files…' on a terminal, once a command has been at it
    for a second (the first command on a big cache scans every file), updated a few times
    a second and cleared when done."""

    DELAY, EVERY = 1.0, 0.25

    def __init__(self, stream):
        self.stream = stream if stream.isatty() else None
        self.start = time.monotonic()
        self.last = 0.0
        self.width = 0

    def __call__(self, files: int) -> None:
        now = time.monotonic()
        if self.stream is None or now - self.start < self.DELAY or now - self.last < self.EVERY:
            return
        self.last = now
        text = f"Indexing the cache: {files:,} files\u2026"
        self.width = max(self.width, len(text))
        self.stream.write("\r" + text)
        self.stream.flush()

    def done(self) -> None:
        if self.stream is not None and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()


def _cache_directory(option, must_exist: bool = False) -> str:
    """The cache directory to work on, checked; then, as root, the cache's owner's rights
    (see :mod:`privileges`).  A directory named with ``--cache-dir`` must exist; dtool's
    configured one may not exist yet (the brokers make it: so do we)."""
    try:
        directory = resolve_cache_dir(option)
    except (TypeError, ValueError) as exc:
        raise BadInput(str(exc)) from None
    if os.path.lexists(directory) and not os.path.isdir(directory):
        raise BadInput(f"{directory} is not a directory")
    if not os.path.isdir(directory) and (must_exist or option is not None):
        raise BadInput(f"cache directory {directory} does not exist")
    _guarded(work_as_cache_owner, directory)
    return directory


def _check_dataset(dataset) -> None:
    if dataset is not None:
        try:
            report.normalise_dataset(dataset)
        except (TypeError, ValueError) as exc:
            raise BadInput(str(exc)) from None


def _settings_or_none():
    """(settings, None) or (None, the one-line error)."""
    try:
        return settings_mod.load(), None
    except settings_mod.SettingsError as exc:
        return None, str(exc)
