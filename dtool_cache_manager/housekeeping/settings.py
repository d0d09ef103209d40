"""The settings of automatic housekeeping: where they come from, and what they mean.

They are read the way dtool reads its own (``dtoolcore.utils.get_config_value``): the
environment first, then dtool's config file (``dtoolcore.utils.DEFAULT_CONFIG_PATH``,
normally ``~/.config/dtool/dtool.json``), then the default.  Values stay as the user typed
them (``50GB``, ``30d``), so ``dtool cache config`` shows them back unchanged.

This module imports nothing heavy: the post hook loads it on a cache miss, and parsing (which
needs click and humanfriendly) only happens when a value is actually set.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from dataclasses import dataclass
from typing import Mapping, Optional, Tuple, Union


MAX_SIZE = "DTOOL_CACHE_MAX_SIZE"
MAX_AGE = "DTOOL_CACHE_MAX_AGE"
INTERVAL = "DTOOL_CACHE_AUTOCLEAN_INTERVAL"
KEYS = (MAX_SIZE, MAX_AGE, INTERVAL)
DEFAULTS = {INTERVAL: "1h"}

ENV, CONFIG, DEFAULT, UNSET = "env", "config", "default", "unset"
_WHERE = {ENV: "the environment", DEFAULT: "the default"}


class SettingsError(ValueError):
    """A setting that cannot be used; the message is one line naming the key and its source."""


@dataclass(frozen=True)
class Setting:
    """One key: the text found (as typed), its parsed value and where it came from."""

    key: str
    text: Optional[str]  # None when unset
    value: Optional[Union[int, float]]  # bytes for the size, seconds for the ages
    source: str  # ENV, CONFIG, DEFAULT or UNSET
    error: Optional[str] = None  # set only by survey(): why ``text`` cannot be used


@dataclass(frozen=True)
class HousekeepingSettings:
    """The limits in effect; automatic cleaning is on when at least one limit is set."""

    max_size_bytes: Optional[int]
    max_age_seconds: Optional[float]
    interval_seconds: float
    entries: Tuple[Setting, ...]  # one per key of KEYS, in that order
    config_path: str

    @property
    def limits_set(self) -> bool:
        return self.max_size_bytes is not None or self.max_age_seconds is not None

    def entry(self, key: str) -> Setting:
        return self.entries[KEYS.index(check_key(key))]


def config_path() -> str:
    """dtool's config file, looked up at call time as dtoolcore does (tests may move it)."""
    return _dtool_utils().DEFAULT_CONFIG_PATH


def _dtool_utils():
    """dtoolcore.utils, imported on use: the CLI's start-up does not pay for dtoolcore."""
    import dtoolcore.utils

    return dtoolcore.utils


def check_key(key: str) -> str:
    """``key`` if it is one of ours; else a SettingsError listing the ones there are."""
    if key not in KEYS:
        raise SettingsError(f"unknown setting {key!r}: use one of {', '.join(KEYS)}")
    return key


def parse_value(key: str, text: str) -> Union[int, float]:
    """Bytes for the size, seconds for the ages; SettingsError with the parser's hint."""
    from ..params import AGE, SIZE, BadInput  # click + humanfriendly: only when a value is set

    try:
        return SIZE.convert(text, None, None) if key == MAX_SIZE else AGE.convert(text, None, None)
    except BadInput as exc:
        raise SettingsError(exc.format_message()) from None


def read_config_text(key: str, path: Optional[str] = None) -> Optional[str]:
    """The value of ``key`` in dtool's config file as text, or None if it is not there.

    A number written by hand is read as if typed (``30`` days, ``5000000000`` bytes).
    """
    path = path or config_path()
    try:
        raw = _dtool_utils().get_config_value_from_file(key, config_path=path)
    except (OSError, ValueError) as exc:  # ValueError: not JSON
        raise SettingsError(f"cannot read dtool config file {path}: {exc}") from None
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
        raise SettingsError(f"{key} in {path}: expected a string such as "
                            f"{_example(key)!r}, found {json.dumps(raw)}")
    return str(raw)


def locate(key: str, environ: Optional[Mapping[str, str]] = None,
           path: Optional[str] = None) -> Tuple[Optional[str], str]:
    """(text, source) of ``key``, unparsed: environment, then config file, then default.
    An empty environment variable counts as unset there (``DTOOL_CACHE_MAX_SIZE= cmd``)."""
    environ = os.environ if environ is None else environ
    text: Optional[str] = environ.get(check_key(key), "").strip()
    if text:
        return text, ENV
    text = read_config_text(key, path)
    if text is not None:
        return text, CONFIG
    if key in DEFAULTS:
        return DEFAULTS[key], DEFAULT
    return None, UNSET


def find(key: str, environ: Optional[Mapping[str, str]] = None,
         path: Optional[str] = None) -> Setting:
    """One setting, parsed; SettingsError naming the key and where the bad value came from."""
    path = path or config_path()
    text, source = locate(key, environ, path)
    if text is None:
        return Setting(key, None, None, UNSET)
    try:
        return Setting(key, text, parse_value(key, text), source)
    except SettingsError as exc:
        where = _WHERE.get(source, path)
        raise SettingsError(f"{key} from {where}: {exc}") from None


def survey(environ: Optional[Mapping[str, str]] = None,
           path: Optional[str] = None) -> Tuple[Setting, ...]:
    """Every setting, with a malformed value reported in ``error`` instead of raised (for
    ``dtool cache config``).  A config file that is not JSON still raises."""
    found = []
    for key in KEYS:
        try:
            found.append(find(key, environ, path))
        except SettingsError as exc:
            text, source = locate(key, environ, path)
            found.append(Setting(key, text, None, source, error=str(exc)))
    return tuple(found)


def load(environ: Optional[Mapping[str, str]] = None,
         path: Optional[str] = None) -> HousekeepingSettings:
    """All three settings; SettingsError on the first malformed one."""
    path = path or config_path()
    entries = tuple(find(key, environ, path) for key in KEYS)
    size, age, interval = (e.value for e in entries)
    assert interval is not None  # INTERVAL has a default, so find() always gives a value
    return HousekeepingSettings(
        max_size_bytes=None if size is None else int(size),
        max_age_seconds=None if age is None else float(age),
        interval_seconds=float(interval), entries=entries, config_path=path)


# -- writing dtool's config file -------------------------------------------------------


def write(key: str, text: str, path: Optional[str] = None) -> str:
    """Check ``text`` for ``key``, then store it in dtool's config file; nothing is written
    if it does not parse.  Returns the text stored."""
    text = text.strip()
    check_key(key)
    try:
        parse_value(key, text)
    except SettingsError as exc:
        raise SettingsError(f"{key}: {exc}") from None
    path = path or config_path()
    read_config_text(key, path)  # a damaged file is reported, not overwritten
    _dtool_utils().write_config_value_to_file(key, text, config_path=path)
    return text


def unset(key: str, path: Optional[str] = None) -> bool:
    """Remove ``key`` from dtool's config file; False if it was not there.

    dtoolcore has no helper for this; the file is rewritten atomically, in dtoolcore's
    format (sorted keys, indent 2) and with the file's mode (dtoolcore makes it private).
    """
    check_key(key)
    path = path or config_path()
    read_config_text(key, path)  # reports a damaged file as a SettingsError
    if not os.path.isfile(path):
        return False
    with open(path) as fh:
        config = json.load(fh)
    if key not in config:
        return False
    del config[key]
    fd, tmp = tempfile.mkstemp(prefix=".dtool.json.", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(config, fh, sort_keys=True, indent=2)
        os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return True


def _example(key: str) -> str:
    return {MAX_SIZE: "50GB", MAX_AGE: "30d", INTERVAL: "1h"}[key]
