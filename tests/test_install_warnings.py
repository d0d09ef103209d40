"""dtool-cli 0.7.1's pkg_resources ``UserWarning``: gone from ``dtool``, and only from there.

One fresh venv per module, made from the system interpreter: this package is installed
from the working tree the way a user gets it (a built wheel, not editable), with the newest
setuptools our pin allows (``--upgrade-strategy eager``), dtool-http and dtool-info
(``dtool item fetch``).  The real ``dtool`` then runs in it (issue 14, item 6; README,
"The pkg_resources warning")."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

import dtool_cache_manager as dcm

ROOT = Path(__file__).resolve().parents[1]
BASE_PYTHON = "/usr/bin/python3"
PTH_NAME = "dtool_cache_manager-pkg_resources_warning.pth"
MESSAGE = "pkg_resources is deprecated as an API"
# pip's words when it cannot reach a package index: the only install failure that skips
OFFLINE = ("No matching distribution found", "Could not find a version",
           "NewConnectionError", "Temporary failure in name resolution", "ProxyError")
COPY_IGNORE = shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", "build", "dist",
                                     ".*cache", ".venv", ".tox", "tests", "docs", "benchmarks")

# Named `dtool`, so that the .pth's filter is installed: the real import of dtool_cli.cli,
# then three warnings the filter must let through (another message from dtool_cli.cli, our
# message from another module, our message in another category).
EXACTNESS_SCRIPT = """
import warnings
import dtool_cli.cli as cli

def warn(message, category, module):
    warnings.warn_explicit(message, category, cli.__file__, 6, module=module)

warn("another warning from dtool_cli", UserWarning, "dtool_cli.cli")
warn("pkg_resources is deprecated as an API, says someone else", UserWarning, "elsewhere")
warn("pkg_resources is deprecated as an API, as a RuntimeWarning", RuntimeWarning,
     "dtool_cli.cli")
"""

COUNT_FILTERS = """
import warnings
print(sum(1 for f in warnings.filters
          if f[1] is not None and f[1].pattern.startswith("pkg_resources")))
"""


class FreshVenv:
    def __init__(self, path, env):
        self.path = path
        self.bin = path / "bin"
        self.python = str(self.bin / "python")
        self.env = env

    def run(self, args, cache_dir, timeout=120):
        env = dict(self.env, DTOOL_CACHE_DIRECTORY=str(cache_dir))
        return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)

    def dtool(self, *args, cache_dir):
        return self.run([str(self.bin / "dtool"), *args], cache_dir)


def _last_line(text):
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(no output)"


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    if not os.access(BASE_PYTHON, os.X_OK):
        pytest.skip(f"no {BASE_PYTHON} to build a fresh venv from")
    base = tmp_path_factory.mktemp("fresh-venv")
    source = base / "source"
    shutil.copytree(ROOT, source, ignore=COPY_IGNORE)  # so the build leaves no trace in ROOT
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONWARNINGS", "PYTHONDEVMODE", "PYTHONHOME")}
    env["PATH"] = str(base / "venv" / "bin") + os.pathsep + env.get("PATH", "")
    made = subprocess.run([BASE_PYTHON, "-m", "venv", str(base / "venv")], env=env,
                          capture_output=True, text=True, timeout=300)
    if made.returncode:
        pytest.skip(f"{BASE_PYTHON} -m venv failed: {_last_line(made.stderr + made.stdout)}")
    fresh = FreshVenv(base / "venv", env)
    installed = subprocess.run(
        [fresh.python, "-m", "pip", "install", "--quiet", "--upgrade",
         "--upgrade-strategy", "eager", str(source), "dtool-http", "dtool-info"],
        env=env, capture_output=True, text=True, timeout=900)
    output = installed.stderr + installed.stdout
    if installed.returncode and any(word in output for word in OFFLINE):
        pytest.skip(f"no package index for the fresh venv: {_last_line(output)}")
    assert installed.returncode == 0, output
    return fresh


def _no_pkg_resources_warning(result):
    assert result.returncode == 0, result.stderr
    assert "UserWarning" not in result.stderr and "pkg_resources" not in result.stderr, \
        result.stderr


def test_this_setuptools_warns_outside_dtool(venv, tmp_path):
    """The control: this setuptools does warn, and a program other than `dtool` still
    sees it; and the install put our .pth file in site-packages."""
    result = venv.run([venv.python, "-c", "import pkg_resources, setuptools; "
                       "print(setuptools.__version__)"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"UserWarning: {MESSAGE}" in result.stderr, \
        f"setuptools {result.stdout.strip()} no longer warns: this test proves nothing"
    purelib = venv.run([venv.python, "-c", "import sysconfig; "
                        "print(sysconfig.get_paths()['purelib'])"], tmp_path).stdout.strip()
    assert (Path(purelib) / PTH_NAME).is_file()


def test_dtool_cache_summary_has_no_warning(venv, tmp_path):
    _no_pkg_resources_warning(venv.dtool("cache", "summary", cache_dir=tmp_path))


def test_dtool_item_fetch_has_no_warning(venv, http_dataset, cache_dir):
    ds = http_dataset({"data/a.bin": b"\x01" * 4096})
    ident = ds.identifiers["data/a.bin"]
    result = venv.dtool("item", "fetch", ds.uri, ident, cache_dir=cache_dir)
    _no_pkg_resources_warning(result)
    assert result.stdout.strip() == str(ds.cache_path(cache_dir, "data/a.bin"))
    assert dcm.num_times_accessed(ds.uri, ident, cache_dir=str(cache_dir)) == 1  # tracked


def test_the_filter_is_exact(venv, tmp_path):
    script = tmp_path / "dtool"
    script.write_text(EXACTNESS_SCRIPT)
    result = venv.run([venv.python, str(script)], tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"{MESSAGE}. See" not in result.stderr, result.stderr  # setuptools' own: hidden
    for shown in ("UserWarning: another warning from dtool_cli",
                  f"UserWarning: {MESSAGE}, says someone else",
                  f"RuntimeWarning: {MESSAGE}, as a RuntimeWarning"):
        assert shown in result.stderr, result.stderr


def test_the_users_own_warning_options_win(venv, tmp_path):
    dtool = str(venv.bin / "dtool")
    result = venv.run([venv.python, "-W", "default::UserWarning", dtool, "--version"],
                      tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"UserWarning: {MESSAGE}" in result.stderr, result.stderr


def test_only_dtool_gets_the_filter(venv, tmp_path):
    elsewhere = venv.run([venv.python, "-c", COUNT_FILTERS], tmp_path)
    assert elsewhere.stdout.strip() == "0", elsewhere.stderr
    script = tmp_path / "dtool"
    script.write_text(COUNT_FILTERS)
    in_dtool = venv.run([venv.python, str(script)], tmp_path)
    assert in_dtool.stdout.strip() == "1", in_dtool.stderr
