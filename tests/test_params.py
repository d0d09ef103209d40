"""Size and age parsing: accepted forms, rejected forms, and the one-line error click shows."""

import io

import click
import pytest
from click.testing import CliRunner

from dtool_cache_manager.params import AGE, SIZE, BadInput, parse_age, parse_size

DAY = 86400.0


@pytest.mark.parametrize("text, expected", [
    ("1TB", 10 ** 12),
    ("500MiB", 500 * 2 ** 20),
    ("0", 0),
    ("1.5 GB", 1_500_000_000),
    ("2GiB", 2 * 2 ** 30),
    ("10", 10),
    ("  4 KB ", 4000),
    ("1 KiB", 1024),
])
def test_parse_size_valid(text, expected):
    assert parse_size(text) == expected
    assert isinstance(parse_size(text), int)


@pytest.mark.parametrize("text, message", [
    ("", "missing size: use a number with a unit such as 500MB, 2GiB or 1TB"),
    ("   ", "missing size: use a number with a unit such as 500MB, 2GiB or 1TB"),
    ("1XB", "invalid size '1XB': use a number with a unit such as 500MB, 2GiB or 1TB"),
    ("-1GB", "invalid size '-1GB': must not be negative"),
    ("-0", "invalid size '-0': must not be negative"),
    ("banana", "invalid size 'banana': use a number with a unit such as 500MB, 2GiB or 1TB"),
    ("nan", "invalid size 'nan': must be a finite number; use a number with a unit such as "
            "500MB, 2GiB or 1TB"),
    ("inf GB", "invalid size 'inf GB': must be a finite number; use a number with a unit such "
               "as 500MB, 2GiB or 1TB"),
    ("9" * 400 + ".0 GB", "invalid size '" + "9" * 400 + ".0 GB': use a number with a unit "
                                                          "such as 500MB, 2GiB or 1TB"),
])
def test_parse_size_invalid(text, message):
    with pytest.raises(BadInput) as info:
        parse_size(text)
    assert info.value.message == message
    assert info.value.exit_code == 2


@pytest.mark.parametrize("text, expected", [
    ("30d", 30 * DAY),
    ("2w", 14 * DAY),
    ("12h", 12 * 3600.0),
    ("90m", 90 * 60.0),
    ("1.5d", 1.5 * DAY),
    ("7", 7 * DAY),
    ("0", 0.0),
    ("0.5", 0.5 * DAY),
    (" 3 ", 3 * DAY),
    ("10s", 10.0),
    ("5 days", 5 * DAY),
])
def test_parse_age_valid(text, expected):
    assert parse_age(text) == expected
    assert isinstance(parse_age(text), float)


_AGE_HINT = "use a number with a unit such as 90m, 12h, 30d or 2w (a bare number means days)"


@pytest.mark.parametrize("text, message", [
    ("", "missing age: " + _AGE_HINT),
    ("  ", "missing age: " + _AGE_HINT),
    ("-3d", "invalid age '-3d': must not be negative"),
    ("-7", "invalid age '-7': must not be negative"),
    ("banana", "invalid age 'banana': " + _AGE_HINT),
    ("3 fortnights", "invalid age '3 fortnights': " + _AGE_HINT),
    ("inf", "invalid age 'inf': must be a finite number; " + _AGE_HINT),
    ("NaN", "invalid age 'NaN': must be a finite number; " + _AGE_HINT),
    ("9" * 400, "invalid age '" + "9" * 400 + "': must be a finite number; " + _AGE_HINT),
    ("9" * 400 + ".0d", "invalid age '" + "9" * 400 + ".0d': must be a finite number; "
                        + _AGE_HINT),
])
def test_parse_age_invalid(text, message):
    with pytest.raises(BadInput) as info:
        parse_age(text)
    assert info.value.message == message


def test_user_text_with_newline_stays_on_one_line():
    with pytest.raises(BadInput) as info:
        parse_size("1\nXB")
    assert "\n" not in info.value.message


def test_bad_input_shows_exactly_one_line():
    out = io.StringIO()
    BadInput("invalid size '1XB': whatever").show(file=out)
    assert out.getvalue() == "Error: invalid size '1XB': whatever\n"
    assert not isinstance(BadInput("x"), click.UsageError)


def test_param_types_are_named_and_idempotent():
    assert SIZE.name == "SIZE" and AGE.name == "AGE"
    assert isinstance(SIZE, click.ParamType) and isinstance(AGE, click.ParamType)
    assert SIZE.convert("2GiB", None, None) == 2 * 2 ** 30
    assert SIZE.convert(SIZE.convert("2GiB", None, None), None, None) == 2 * 2 ** 30
    assert AGE.convert("7", None, None) == 7 * DAY
    assert AGE.convert(AGE.convert("7", None, None), None, None) == 7 * DAY
    assert AGE.convert(3600, None, None) == 3600.0  # an int is already seconds


@pytest.mark.parametrize("ptype, value", [(SIZE, -1), (AGE, -1.0), (AGE, float("inf")),
                                          (AGE, float("nan"))])
def test_param_types_reject_bad_converted_values(ptype, value):
    with pytest.raises(BadInput):
        ptype.convert(value, None, None)


@click.command()
@click.option("--retain-size", type=SIZE)
@click.option("--older-than", type=AGE)
def _clean(retain_size, older_than):
    click.echo(f"retain={retain_size!r} older={older_than!r}")


def _invoke(*args):
    return CliRunner().invoke(_clean, list(args))


def test_cli_accepts_valid_values():
    result = _invoke("--retain-size", "1TB", "--older-than", "30d")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"retain={10 ** 12!r} older={30 * DAY!r}\n"


@pytest.mark.parametrize("args", [
    ("--retain-size", "1XB"),
    ("--retain-size", "-5GB"),
    ("--retain-size", ""),
    ("--retain-size", "nan"),
    ("--older-than", "banana"),
    ("--older-than", "-3d"),
    ("--older-than", ""),
    ("--older-than", "inf"),
])
def test_cli_bad_value_is_one_error_line(args):
    result = _invoke(*args)
    assert result.exit_code == 2
    assert result.stdout == ""  # nothing on stdout: the error went to stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    assert result.output == result.stderr  # output interleaves both streams
    assert "Traceback" not in result.output and "Usage:" not in result.output
    assert not isinstance(result.exception, click.ClickException)  # handled by click
