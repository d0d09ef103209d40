"""Parsing sizes and ages typed by users, failing with one line that says what to type instead.

Errors are :class:`BadInput`, a plain :class:`click.ClickException` with exit code 2: click
prints it as a single ``Error: ...`` line, without the usage block a ``UsageError`` adds and
without a traceback.  User text is quoted with ``repr`` so even a pasted newline stays on it.
"""

from __future__ import annotations

import math
import re
from typing import Any, Optional

import click
import humanfriendly

SECONDS_PER_DAY = 86400.0
MAX_SIZE = 2 ** 63 - 1  # bytes: what the ledger can store
MAX_AGE = 1000 * 365.25 * SECONDS_PER_DAY  # a millennium: any older is no age
_SIZE_HINT = "use a number with a unit such as 500MB, 2GiB or 1TB"
_AGE_HINT = "use a number with a unit such as 90m, 12h, 30d or 2w (a bare number means days)"
_BARE_NUMBER = re.compile(r"^(?:\d+(?:\.\d*)?|\.\d+)$")
_NOT_FINITE = re.compile(r"\b(?:nan|inf|infinity)\b", re.IGNORECASE)


class BadInput(click.ClickException):
    """A value the user typed cannot be used; shown as one ``Error:`` line, exit code 2."""

    exit_code = 2


def _check_text(kind: str, text: str, hint: str) -> str:
    """Reject the forms both parsers share; return the stripped text."""
    stripped = text.strip()
    if not stripped:
        raise BadInput(f"missing {kind}: {hint}")
    if stripped.startswith("-"):
        raise BadInput(f"invalid {kind} {text!r}: must not be negative")
    if _NOT_FINITE.search(stripped):
        raise BadInput(f"invalid {kind} {text!r}: must be a finite number; {hint}")
    return stripped


def parse_size(text: str) -> int:
    """Bytes in ``text`` (``1TB``, ``500MiB``, ``1.5 GB``, ``0``); raise :class:`BadInput`.

    A number without a unit counts bytes, as ``du -b`` does, so it must be whole: ``1.5``
    is refused (it would mean one byte, and a clean would remove nearly everything).
    """
    stripped = _check_text("size", text, _SIZE_HINT)
    if _BARE_NUMBER.match(stripped) and not stripped.isdigit():
        raise BadInput(f"invalid size {text!r}: a number without a unit counts bytes and "
                       f"must be whole; did you mean {stripped}GB or {stripped}GiB?")
    try:
        size = humanfriendly.parse_size(stripped)
    except (humanfriendly.InvalidSize, OverflowError, ValueError):
        # OverflowError: a number too long for a float, such as 400 nines then '.0 GB'
        raise BadInput(f"invalid size {text!r}: {_SIZE_HINT}") from None
    if size < 0:
        raise BadInput(f"invalid size {text!r}: must not be negative")
    if size > MAX_SIZE:
        raise BadInput(f"invalid size {text!r}: too large (at most {MAX_SIZE} bytes)")
    return int(size)


def parse_age(text: str) -> float:
    """Seconds in ``text`` (``30d``, ``2w``, ``12h``, ``90m``; ``7`` is 7 days); raise BadInput."""
    stripped = _check_text("age", text, _AGE_HINT)
    try:
        if _BARE_NUMBER.match(stripped):
            seconds = float(stripped) * SECONDS_PER_DAY  # days: nobody means '7' seconds
        else:
            seconds = float(humanfriendly.parse_timespan(stripped))
    except (humanfriendly.InvalidTimespan, OverflowError, ValueError):
        raise BadInput(f"invalid age {text!r}: {_AGE_HINT}") from None
    if not math.isfinite(seconds):
        raise BadInput(f"invalid age {text!r}: must be a finite number; {_AGE_HINT}")
    if seconds < 0:
        raise BadInput(f"invalid age {text!r}: must not be negative")
    if seconds > MAX_AGE:
        raise BadInput(f"invalid age {text!r}: too large (at most 1000 years)")
    return seconds


class SizeType(click.ParamType):
    """A size in bytes; an int already converted (e.g. a default) passes through."""

    name = "SIZE"

    def convert(self, value: Any, param: Optional[click.Parameter],
                ctx: Optional[click.Context]) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            if not 0 <= value <= MAX_SIZE:
                raise BadInput(f"invalid size {value!r}: must be between 0 and {MAX_SIZE}")
            return value
        return parse_size(value if isinstance(value, str) else str(value))


class AgeType(click.ParamType):
    """An age in seconds; a number already converted (e.g. a default) is taken as seconds."""

    name = "AGE"

    def convert(self, value: Any, param: Optional[click.Parameter],
                ctx: Optional[click.Context]) -> float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            seconds = float(value)
            if not math.isfinite(seconds) or not 0 <= seconds <= MAX_AGE:
                raise BadInput(f"invalid age {value!r}: must be a finite, non-negative number "
                               "of seconds, at most 1000 years")
            return seconds
        return parse_age(value if isinstance(value, str) else str(value))


SIZE = SizeType()
AGE = AgeType()
