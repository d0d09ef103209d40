"""The ``dtool cache`` command group (also installed as ``dtool-cache``).

A thin click layer: it parses options, calls the library and hands results to
:mod:`formatting`.  Bad input is a one-line error with exit status 2, never a traceback.
"""

from __future__ import annotations

import click

from . import __version__, report
from .formatting import render_summary
from .layout import resolve_cache_dir

_CONTEXT = dict(help_option_names=["-h", "--help"])

cache_dir_option = click.option(
    "--cache-dir", type=click.Path(file_okay=False), default=None,
    help="Cache directory (default: DTOOL_CACHE_DIRECTORY, then dtool.json, then "
         "~/.cache/dtool).")
json_option = click.option("--json", "as_json", is_flag=True,
                           help="Print machine-readable JSON.")


@click.group(context_settings=_CONTEXT)
@click.version_option(__version__, prog_name="dtool-cache-manager")
def cache():
    """Inspect and clean the dtool item cache."""


@cache.command()
@cache_dir_option
@json_option
def summary(cache_dir, as_json):
    """How much space the cache uses, and what is in it."""
    result = report.summarize(resolve_cache_dir(cache_dir))
    click.echo(render_summary(result, as_json))
