"""Output: human tables (sizes and times via humanfriendly) and JSON with stable keys."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import shutil
import sys
import time
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import humanfriendly
from humanfriendly.tables import format_pretty_table, format_robust_table

from .audit import AuditRow
from .executor import CleanPlan, CleanResult
from .housekeeping import AutocleanStatus, RunRecord
from .planning import Naming
from .report import ItemView, Summary
from .sharing import HOW_TO_DECLARE, SINGLE_HOST, Sharing
from .housekeeping.settings import MAX_SIZE, Setting

if TYPE_CHECKING:
    from .verify import VerifyResult


def iso_utc(timestamp: Optional[float]) -> Optional[str]:
    if timestamp is None:
        return None
    return _dt.datetime.fromtimestamp(timestamp, tz=_dt.timezone.utc).isoformat(
        timespec="seconds")


def ago(timestamp: Optional[float]) -> str:
    if timestamp is None:
        return "never"
    return humanfriendly.format_timespan(max(0.0, time.time() - timestamp), max_units=1) + " ago"


def size(n: int) -> str:
    return humanfriendly.format_size(n, binary=True)


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def show(path: str) -> str:
    """A path fit for a terminal: bytes that are not UTF-8 as \\xNN, control characters
    escaped."""
    text = path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    # A newline in a file name must not fake a table row: escape control characters.
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def fit_table(rows: List[List[str]], headers: List[str], shrink: Sequence[int] = (0,)) -> str:
    """A table that fits the terminal it is printed on: the widest of the ``shrink``
    columns (paths, URIs) lose their middle to an ellipsis until it fits, and a table that
    still does not fit is printed a row at a time, one ``Column: value`` line per cell.
    Piped output keeps every character, for scripts (which should use ``-f json``)."""
    if sys.stdout.isatty():
        width = shutil.get_terminal_size().columns
        widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
        excess = sum(widths) + 3 * len(widths) + 1 - width
        fitted = list(rows)
        while excess > 0:
            column = max(shrink, key=lambda i: widths[i])
            narrower = max(len(headers[column]), 10, widths[column] - excess)
            if narrower >= widths[column]:  # as narrow as is still readable: a row at a time
                return format_robust_table(
                    [[_middle_cut(cell, width - len(headers[i]) - 2) for i, cell in enumerate(r)]
                     for r in rows], headers)
            excess -= widths[column] - narrower
            widths[column] = narrower
            fitted = [r[:column] + [_middle_cut(r[column], narrower)] + r[column + 1:]
                      for r in fitted]
        rows = fitted
    return format_pretty_table(rows, headers)


def _middle_cut(text: str, width: int) -> str:
    if len(text) <= width:
        return text
    head = (width - 1) // 2
    return text[:head] + "…" + text[len(text) - (width - 1 - head):]


def dataset_rows(label: str, uris: Sequence[str], cells: List[str]) -> List[List[str]]:
    """A dataset as every table shows it: its first URI (else its UUID or directory) with
    the figures, then one row per further URI it was read through."""
    first = [show(uris[0] if uris else label)] + cells
    return [first] + [[f"  + {show(uri)}"] + [""] * len(cells) for uri in uris[1:]]


DATASET_RULE = ("Datasets are grouped by UUID, with every URI their files were read through;\n"
                "untracked files go with the dataset of the files beside them.")


def _listed(label: str, parts: Sequence[str], width: int = 80) -> str:
    """``label`` and ``parts`` joined by commas, wrapped between parts to ``width``."""
    lines = [label]
    for i, part in enumerate(parts):
        part += "," if i < len(parts) - 1 else ""
        if len(lines[-1]) > len(label) and len(lines[-1]) + 1 + len(part) > width:
            lines.append(" " * len(label))
        lines[-1] += ("" if lines[-1].isspace() or lines[-1] == label else " ") + part
    return "\n".join(lines)


def _dumps(data) -> str:
    return json.dumps(data, indent=2, sort_keys=False)


def _holder_list(holders) -> list:
    return [{"user": h.user_at_host, "pid": h.pid} for h in holders]


def _holders_text(holders) -> str:
    return ", ".join(f"{h.user_at_host} (pid {_pid(h.pid)})" for h in holders)


def _pid(pid) -> str:
    return "?" if pid is None else str(pid)


# -- summary ---------------------------------------------------------------------------


def render_summary(summary: Summary, as_json: bool,
                   housekeeping: Optional[AutocleanStatus] = None,
                   sharing: Optional[Sharing] = None) -> str:
    if as_json:
        data = dataclasses.asdict(summary)
        for ds in data["datasets"]:
            ds["last_access"] = iso_utc(ds["last_access"])
        if housekeeping is not None:
            data["housekeeping"] = housekeeping_json(housekeeping)
        if sharing is not None:
            data["sharing"] = sharing.to_json()
        return _dumps(data)
    lines = [
        f"Cache directory: {show(summary.cache_directory)}",
        f"Total size:      {size(summary.total_size_bytes)}",
        f"Items:           {plural(summary.num_items, 'item')} in "
        f"{plural(summary.num_datasets, 'dataset')}",
        f"In use now:      {plural(summary.num_in_use, 'item')}",
    ]
    for holder in summary.in_use_by:
        lines.append(f"                 held by {holder.user} (pid {_pid(holder.pid)}): "
                     f"{plural(holder.num_items, 'item')}, {size(holder.size_bytes)}")
    lines += [
        f"Untracked:       {plural(summary.num_untracked, 'file')}, "
        f"{size(summary.untracked_size_bytes)} (on disk, never seen by a hook)",
        f"Partial:         {plural(summary.num_partial, 'leftover download')} ('*.tmp'), "
        f"{size(summary.partial_size_bytes)}",
        _listed("Last used:       ", [f"{k}: {v}" for k, v in
                                      summary.age_distribution.items()]),
    ]
    if summary.lost_records:
        lines.append(f"Not recorded:    {plural(summary.lost_records, 'access')} "
                     "(the disk was full)")
    if summary.trash_files:
        lines.append(f"Trash:           {plural(summary.trash_files, 'file')}, "
                     f"{size(summary.trash_size_bytes)} (cleaned; purged by a clean after "
                     "the grace period)")
    if sharing is not None:
        lines += sharing_lines(sharing)
    if housekeeping is not None:
        lines += housekeeping_lines(housekeeping)
    if summary.datasets:
        rows = [row for d in summary.datasets for row in dataset_rows(
            d.key, d.uris, [str(d.num_items), size(d.size_bytes), ago(d.last_access)])]
        lines += ["", fit_table(rows, ["Dataset", "Items", "Size", "Last access"]), DATASET_RULE]
    return "\n".join(lines)


# -- sharing ---------------------------------------------------------------------------


def sharing_lines(sharing: Sharing) -> List[str]:
    """Who may use the cache: the ``Hosts:`` lines of ``summary`` and ``init``."""
    if sharing.mode == "local":
        return [f"Hosts:           this host only (a local filesystem, {sharing.filesystem})"]
    if sharing.mode == SINGLE_HOST:
        when = f" on {iso_utc(sharing.declared_at)}" if sharing.declared_at else ""
        return [f"Hosts:           this host only, as {sharing.declared_by} declared{when}"]
    if sharing.registration is not None:
        found = sharing.registration
        return [f"Hosts:           several, coordinated through {show(found.database)}",
                f"                 (a silent host's holds end within {found.session_timeout} "
                f"s; cleaned files wait {found.grace_seconds} s in the trash)"]
    return [f"Hosts:           possibly several: the cache is on {sharing.filesystem_text}",
            "                 other hosts' use of it is invisible here, and nothing is "
            "removed from it"]


def render_sharing(cache_dir: str, sharing: Sharing, as_json: bool) -> str:
    """``dtool cache init``: the cache's mode."""
    if as_json:
        data = sharing.to_json()
        data["declared_at"] = iso_utc(sharing.declared_at)
        return _dumps({"cache_directory": cache_dir, **data})
    kind = "local" if sharing.local else "possibly shared"
    lines = [f"Cache directory: {show(cache_dir)}",
             f"Filesystem:      {sharing.filesystem or 'unknown'} ({kind})",
             *sharing_lines(sharing)]
    if sharing.possibly_shared:
        lines.append(f"                 {HOW_TO_DECLARE}")
    return "\n".join(lines)


# -- housekeeping ----------------------------------------------------------------------


def housekeeping_json(status: AutocleanStatus) -> dict:
    settings = status.settings
    last = status.last_run
    return {
        "max_size_bytes": settings.max_size_bytes if settings else None,
        "max_age_seconds": settings.max_age_seconds if settings else None,
        "interval_seconds": settings.interval_seconds if settings else None,
        "settings": [setting_json(e) for e in settings.entries] if settings else [],
        "settings_error": status.settings_error,
        "running": status.running,
        "running_by": None if status.holder is None else {
            "user": status.holder[0], "pid": status.holder[1]},
        "last_run": None if last is None else {
            "start": iso_utc(last.start), "end": iso_utc(last.end), "trigger": last.trigger,
            "user": last.user, "pid": last.pid, "size_before_bytes": last.size_before_bytes,
            "size_after_bytes": last.size_after_bytes, "removed": last.removed,
            "freed_bytes": last.freed_bytes, "skipped_in_use": last.skipped_in_use,
            "error": last.error},
    }


def housekeeping_lines(status: AutocleanStatus) -> list:
    settings = status.settings
    if settings is None:
        lines = [f"Limits:          not in effect: {show(status.settings_error or '')}"]
    elif not settings.limits_set:
        lines = ["Limits:          none (automatic cleaning is off; see 'dtool cache config')"]
    else:
        shown = [f"{label} {show(e.text)} ({e.source})" for label, e in
                 zip(("max size", "max age"), settings.entries) if e.text is not None]
        interval = settings.entries[2]
        assert interval.text is not None  # the interval has a default, so it is always found
        lines = [f"Limits:          {', '.join(shown)}; "
                 f"checked at most every {show(interval.text)} ({interval.source})"]
    last = status.last_run
    running = ""
    if status.holder is not None:
        user, pid = status.holder
        running = f" (one is running now: {show(user)}, pid {_pid(pid)})"
    if last is not None or running or (settings is not None and settings.limits_set):
        lines.append(f"Last autoclean:  {describe_run(last)}{running}")
    return lines


# Why an automatic clean ran, in words (the log's ``trigger``, see docs/housekeeping.rst).
TRIGGER_TEXT = {"size": "over the size limit", "age": "a maximum age is set",
                "unmeasured": "the size was not known yet",
                "stale": "the size was last measured over a day ago", "manual": "run by hand"}


def describe_run(last: Optional[RunRecord]) -> str:
    if last is None:
        return "never"
    when = f"{ago(last.end)} ({TRIGGER_TEXT.get(last.trigger) or show(last.trigger)})"
    if last.error:
        return f"{when}: failed: {show(last.error)}"
    after = "" if last.size_after_bytes is None else f"; {size(last.size_after_bytes)} after"
    return (f"{when}: removed {plural(last.removed, 'file')}, freed {size(last.freed_bytes)}"
            f"{after}")


def setting_json(setting: Setting) -> dict:
    return {"key": setting.key, "value": setting.text, "parsed": setting.value,
            "unit": "bytes" if setting.key == MAX_SIZE else "seconds",
            "source": setting.source, "error": setting.error}


def _meaning(setting: Setting) -> str:
    if setting.error:
        return "INVALID (below)"
    if setting.value is None:
        return "-"
    if setting.key == MAX_SIZE:
        return size(int(setting.value))
    return humanfriendly.format_timespan(setting.value)


def render_settings(settings: Sequence[Setting], config_path: str, as_json: bool) -> str:
    """``dtool cache config``: every setting with its value, meaning and source."""
    if as_json:
        return _dumps({"config_path": config_path,
                       "settings": [setting_json(s) for s in settings]})
    rows = [[s.key, show(s.text) if s.text is not None else "-", _meaning(s), s.source]
            for s in settings]
    lines = [format_pretty_table(rows, ["Setting", "Value", "Meaning", "Source"]),
             f"Config file: {show(config_path)} (the environment takes precedence)"]
    lines += [f"Invalid: {show(s.error)}" for s in settings if s.error]
    return "\n".join(lines)


def render_setting(setting: Setting, as_json: bool) -> str:
    """``dtool cache config KEY``: the value as found (empty when unset)."""
    if as_json:
        return _dumps(setting_json(setting))
    return setting.text or ""


def render_config_change(key: str, text: Optional[str], removed: Optional[bool],
                         config_path: str, as_json: bool) -> str:
    """``dtool cache config KEY VALUE`` (``text``) or ``--unset`` (``removed``)."""
    if as_json:
        data: Dict[str, object] = {"key": key, "config_path": config_path}
        data.update({"value": text} if removed is None else {"removed": removed})
        return _dumps(data)
    if removed is None:
        return f"{key} = {text} (in {show(config_path)})"
    return (f"Removed {key} from {show(config_path)}." if removed
            else f"{key} is not in {show(config_path)}.")


def render_autoclean(record: RunRecord, as_json: bool) -> str:
    """``dtool cache autoclean``: what the run did."""
    if as_json:
        return _dumps(record.to_json())
    if record.error:
        lines = [f"Automatic clean failed: {show(record.error)}"]
    else:
        before = record.size_before_bytes or 0
        lines = [f"Cache size before: {size(before)}"]
        if record.removed or record.freed_bytes:
            lines.append(f"Removed {plural(record.removed, 'file')}, freed "
                         f"{size(record.freed_bytes)}; size now "
                         f"{size(record.size_after_bytes or 0)}.")
        else:
            lines.append("Nothing to remove.")
        if record.target_size_bytes is not None and record.max_size_bytes is not None:
            lines.append(f"Size limit {size(record.max_size_bytes)}: an over-size cache is "
                         f"cleaned down to {size(record.target_size_bytes)}.")
        if record.skipped_in_use:
            lines.append(f"Kept {plural(record.skipped_in_use, 'file')} in use.")
    lines += [f"Warning: {w}" for w in record.warnings]
    return "\n".join(lines)


# -- ls --------------------------------------------------------------------------------


def item_json(item: ItemView) -> dict:
    row = item.row
    return {
        "uri": item.uris[0] if item.uris else None,
        "uris": list(item.uris),
        "uuid": item.uuid,
        "identifier": item.identifier,
        "item_relpath": item.item_relpath,
        "dataset": item.dataset_key,
        "path": item.relpath,
        "size_bytes": item.size_bytes,
        "access_count": item.access_count,
        "hits": row.hits if row else 0,
        "misses": row.misses if row else 0,
        "last_access": iso_utc(item.last_access),
        "first_cached": iso_utc(row.first_cached if row else None),
        "in_use": len(item.holders),
        "holders": _holder_list(item.holders),
        "tracked": row is not None,
    }


def render_items(items: Sequence[ItemView], as_json: bool) -> str:
    if as_json:
        return _dumps([item_json(i) for i in items])
    if not items:
        return "No cached items."
    rows = [[show(i.item_relpath) if i.item_relpath else "-", show(i.relpath),
             size(i.size_bytes), str(i.access_count), ago(i.last_access) if i.row
             else "untracked", _holders_text(i.holders) or "-"] for i in items]
    return fit_table(rows, ["Item", "Cached file", "Size", "Uses", "Last access", "In use by"],
                 shrink=(0, 1, 5))


# -- clean -----------------------------------------------------------------------------


LISTED_AT_MOST = 20  # files a plan lists one by one without --list; beyond, per dataset


def _files_json(files: Sequence[Tuple[str, int]], naming: Optional[Naming]) -> list:
    """(path, bytes) pairs with the item's name and dataset beside each path."""
    known = naming.files if naming else {}
    return [{"path": relpath, "item_relpath": known.get(relpath, (None, None))[1],
             "dataset": known.get(relpath, (None, None))[0], "size_bytes": nbytes}
            for relpath, nbytes in files]


def render_clean_plan(plan: CleanPlan, note: Optional[str], as_json: bool,
                      naming: Optional[Naming] = None, list_all: bool = False) -> str:
    """The plan, its totals last: right above the prompt of an interactive clean."""
    planned = plan.removals + plan.stale_partials
    if as_json:
        return _dumps({
            "removed": [p.relpath for p in planned],
            "items": _files_json([(p.relpath, p.size_bytes) for p in planned], naming),
            "freed_bytes": plan.expected_freed_bytes,
            "skipped_in_use": [{"path": r, "holders": _holder_list(h)}
                               for r, h in plan.skipped_in_use],
            "skipped": [{"path": r, "reason": why} for r, why in plan.skipped_entries],
            "dry_run": True,
        })
    lines = [note] if note else []
    if planned:
        lines += _planned_lines(plan, naming, list_all)
    kept = [f"Keeping {show(r)} (in use by {_holders_text(h)})"
            for r, h in plan.skipped_in_use]
    skipped = [f"Skipping {show(r)}: {why}" for r, why in plan.skipped_entries]
    for more in (kept, skipped):
        if len(more) > LISTED_AT_MOST and not list_all:
            more[LISTED_AT_MOST:] = [f"... and {len(more) - LISTED_AT_MOST} more "
                                     "(--list shows them all)"]
        lines += more
    if not planned:
        lines.append("Nothing to remove.")
    else:
        lines.append(f"Would remove {plural(len(planned), 'file')}, freeing "
                     f"{size(plan.expected_freed_bytes)}.")
    return "\n".join(lines)


def _planned_lines(plan: CleanPlan, naming: Optional[Naming], list_all: bool) -> List[str]:
    """Each file to remove (its item's name beside its cache path), under its dataset; a
    line per dataset when there are more than :data:`LISTED_AT_MOST` files."""
    files = naming.files if naming else {}
    uris = naming.uris if naming else {}
    groups: Dict[str, List[Tuple[str, int]]] = {}
    for p in plan.removals:
        groups.setdefault(files.get(p.relpath, (p.relpath, None))[0], []).append(
            (p.relpath, p.size_bytes))
    planned = len(plan.removals) + len(plan.stale_partials)
    one_by_one = list_all or planned <= LISTED_AT_MOST
    lines = [] if one_by_one else ["Planned, by dataset (--list shows every file):"]
    for key, members in sorted(groups.items(), key=lambda kv: -sum(n for _, n in kv[1])):
        label = " + ".join(show(u) for u in uris.get(key, ())) or show(key)
        total = f"{plural(len(members), 'file')}, {size(sum(n for _, n in members))}"
        lines.append(f"{label}: {total}" if one_by_one else f"  {label}: {total}")
        if one_by_one:
            for relpath, nbytes in members:
                name = files.get(relpath, (None, None))[1]
                lines.append(f"  {show(name) + '  ' if name else ''}{show(relpath)}  "
                             f"({size(nbytes)})")
    if plan.stale_partials:
        total = (f"{plural(len(plan.stale_partials), 'file')}, "
                 f"{size(sum(p.size_bytes for p in plan.stale_partials))}")
        lines.append(f"Leftover partial downloads: {total}" if one_by_one
                     else f"  leftover partial downloads: {total}")
        if one_by_one:
            lines += [f"  {show(p.relpath)}  ({size(p.size_bytes)})"
                      for p in plan.stale_partials]
    return lines


def render_clean_result(plan: CleanPlan, result: CleanResult, note: Optional[str],
                        as_json: bool) -> str:
    in_use = [o for o in result.skipped if o.holders]
    other = [(o.relpath, o.reason) for o in result.skipped if not o.holders]
    other += list(plan.skipped_entries)
    if as_json:
        return _dumps({
            "removed": [o.relpath for o in result.removed],
            "freed_bytes": result.freed_bytes,
            "skipped_in_use": [{"path": o.relpath, "holders": _holder_list(o.holders)}
                               for o in in_use],
            "skipped": [{"path": r, "reason": why} for r, why in other],
            "dry_run": False,
        })
    lines = [note] if note else []
    lines.append(f"Removed {plural(len(result.removed), 'file')}, freed "
                 f"{size(result.freed_bytes)}.")
    lines += [f"Kept {show(o.relpath)}: in use by {_holders_text(o.holders)}" for o in in_use]
    lines += [f"Skipped {show(r)}: {why}" for r, why in other]
    return "\n".join(lines)


# -- audit -----------------------------------------------------------------------------


def render_audit(rows: Sequence[AuditRow], total: AuditRow, by: str, as_json: bool) -> str:
    if as_json:
        return _dumps({"by": by, "rows": [dataclasses.asdict(r) for r in rows],
                       "total": dataclasses.asdict(total)})
    if not rows:
        return "No recorded accesses."

    def figures(r: AuditRow) -> List[str]:
        saved = humanfriendly.format_timespan(r.estimated_seconds_saved)
        return [str(r.accesses), str(r.hits), str(r.misses), f"{r.hit_rate:.0%}",
                size(r.bytes_served_from_cache), ("~" if r.estimated else "") + saved]

    headers = ["Accesses", "Hits", "Misses", "Hit rate", "Served from cache", "Time saved"]
    if by == "dataset":
        lines = [line for r in rows for line in dataset_rows(r.key, r.uris, figures(r))]
        lines.append(["TOTAL"] + figures(total))
        text = fit_table(lines, ["Dataset"] + headers) + "\n" + DATASET_RULE
    elif by == "item":
        lines = [[show(r.item_relpath) if r.item_relpath else "-", show(r.key)] + figures(r)
                 for r in rows]
        lines.append(["TOTAL", ""] + figures(total))
        text = fit_table(lines, ["Item", "Cached file"] + headers, shrink=(0, 1))
        text += "\nItem: its name in its dataset ('-' once removed; its accesses stay)."
    else:
        lines = [[show(r.key)] + figures(r) for r in rows] + [["TOTAL"] + figures(total)]
        text = fit_table(lines, [by.capitalize()] + headers)
    if any(r.estimated for r in rows):
        text += ("\n~ estimated from the broker's observed throughput\n"
                 "  (no fetch of that item was timed)")
    return text


# -- verify ----------------------------------------------------------------------------


def render_verify(results: Sequence["VerifyResult"], as_json: bool) -> str:
    if as_json:
        rows = []
        for r in results:
            row = dataclasses.asdict(r)
            row["path"] = row.pop("relpath")
            row["holders"] = _holder_list(r.holders)
            rows.append(row)
        return _dumps(rows)
    from .verify import OK  # verify loads dtoolcore's hashers: only when verifying

    bad = [r for r in results if r.status != OK]
    lines = [f"Checked {plural(len(results), 'tracked file')}: {len(results) - len(bad)} ok."]
    for r in bad:
        fixed = " (fixed)" if r.fixed else ""
        held = f" (in use by {_holders_text(r.holders)})" if r.holders else ""
        detail = f": {r.detail}" if r.detail else ""
        lines.append(f"  {r.status}: {show(r.relpath)}{detail}{fixed}{held}")
    return "\n".join(lines)
