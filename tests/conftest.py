"""Shared fixtures: real dtool datasets over loopback HTTP and moto S3."""

import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict

import dtoolcore
import pytest

from support import subprocess_env
from support.datasets import item_identifier, make_local_dataset, md5_hex
from support.servers import CountingDtoolHTTPServer, MotoS3Server

S3_BUCKET = "dtoolcmtest"  # no hyphens: the name is part of DTOOL_S3_*_<bucket> env vars

_names = itertools.count()


@dataclass
class RemoteDataset:
    """A frozen dataset reachable at ``uri``; ``md5`` maps identifier -> md5 hex."""

    uri: str
    uuid: str
    name: str
    identifiers: Dict[str, str]
    md5: Dict[str, str]
    local_uri: str = ""
    env: Dict[str, str] = field(default_factory=dict)

    def cache_path(self, cache_dir, relpath):
        """Where dtool-s3 0.14.1 caches an item: ``<cache>/<uuid>/<identifier>``.

        No extension: the broker splits the still-base64-encoded handle.
        """
        return Path(cache_dir) / self.uuid / self.identifiers[relpath]


@dataclass
class HttpDataset(RemoteDataset):
    get_count: Callable[[str], int] = None  # relpath -> GETs the server saw

    def cache_path(self, cache_dir, relpath):
        """Where dtool-http caches an item: ``<cache>/<URL path>/<identifier><ext>``."""
        ext = os.path.splitext(relpath)[1]
        return Path(cache_dir) / self.name / (self.identifiers[relpath] + ext)


def _describe(items):
    identifiers = {relpath: item_identifier(relpath) for relpath in items}
    md5 = {identifiers[relpath]: md5_hex(content) for relpath, content in items.items()}
    return identifiers, md5


def _uuid(uri):
    return dtoolcore.DataSet.from_uri(uri).uuid


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """A fresh, empty dtool cache; DTOOL_CACHE_DIRECTORY points at it for this test."""
    path = tmp_path / "dtool-cache"
    path.mkdir()
    monkeypatch.setenv("DTOOL_CACHE_DIRECTORY", str(path))
    return path


OTHER_USERS = "other_users"


def pytest_configure(config):
    config.addinivalue_line(
        "markers", f"{OTHER_USERS}: runs this venv's python as other unix users (needs root); "
        "skips where they cannot run it (applied to every test using the users fixture)")


@pytest.hookimpl(tryfirst=True)  # before -m selects on markers
def pytest_collection_modifyitems(items):
    for item in items:
        if "users" in getattr(item, "fixturenames", ()):
            item.add_marker(OTHER_USERS)


def pytest_runtest_setup(item):
    """The one place the tests that need other users skip: when those users cannot run
    the venv's python (one check per session, see ``support/users.py``)."""
    if item.get_closest_marker(OTHER_USERS) is None:
        return
    from support.users import other_users_problem

    problem = other_users_problem()
    if problem:
        pytest.skip(problem)


@pytest.fixture(scope="module")
def users():
    """Real unix users: alice, bob, carol in the group ``dcmshare`` and erin outside it
    (see ``support/users.py``); for the tests that need root.  Every test using it is
    marked ``other_users``."""
    from support.users import make_users, remove_tree, shared_tmp

    base = shared_tmp("dcm-users-")
    yield make_users(base)
    remove_tree(base)


@pytest.fixture
def make_env():
    """``make_env(cache_dir, extra=None)`` -> env dict for subprocesses."""
    return subprocess_env


@pytest.fixture(scope="session")
def http_server(tmp_path_factory):
    """One counting HTTP server per session serving a temp dir of datasets."""
    server = CountingDtoolHTTPServer(tmp_path_factory.mktemp("http-datasets")).start()
    yield server
    server.stop()


@pytest.fixture
def http_dataset(http_server):
    """Factory: ``http_dataset(items, name=None) -> HttpDataset`` served over HTTP."""
    http_server.slow_item_bytes_per_s = None  # tests opt in to throttling

    def make(items, name=None):
        name = name or f"ds{next(_names)}"
        local_uri = make_local_dataset(http_server.directory, name, items)
        identifiers, md5 = _describe(items)
        return HttpDataset(
            uri=f"{http_server.base_url}/{name}", uuid=_uuid(local_uri), name=name,
            identifiers=identifiers, md5=md5, local_uri=local_uri,
            get_count=lambda relpath: http_server.item_get_count(name, relpath),
        )

    yield make
    http_server.slow_item_bytes_per_s = None


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One real ``moto_server`` process per session, with bucket ``S3_BUCKET``."""
    log_path = tmp_path_factory.mktemp("moto") / "moto_server.log"
    server = MotoS3Server(log_path=str(log_path)).start()
    try:
        server.create_bucket(S3_BUCKET)
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_dataset(s3_server, tmp_path, monkeypatch):
    """Factory: ``s3_dataset(items, name=None) -> RemoteDataset`` copied into moto S3.

    The S3 env vars are set in os.environ for the test and returned as ``.env``
    so subprocesses can be given them too.
    """
    env = s3_server.s3_env(S3_BUCKET)
    for key, value in env.items():
        monkeypatch.setenv(key, value)

    def make(items, name=None):
        name = name or f"ds{next(_names)}"
        local_base = tmp_path / "s3-src"
        local_base.mkdir(exist_ok=True)
        local_uri = make_local_dataset(local_base, name, items)
        uri = dtoolcore.copy(local_uri, f"s3://{S3_BUCKET}")
        identifiers, md5 = _describe(items)
        return RemoteDataset(
            uri=uri, uuid=_uuid(local_uri), name=name, identifiers=identifiers,
            md5=md5, local_uri=local_uri, env=dict(env),
        )

    return make


# CI must run everything: a test skipped there (say, one needing root, or one needing other
# users to run the venv's python) would pass unseen.
REQUIRE_ALL_ENV = "DCM_REQUIRE_ALL_TESTS"


def pytest_sessionfinish(session, exitstatus):
    from support.users import remove_created

    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    for failure in remove_created():  # the accounts this run made, and only those
        if reporter is not None:
            reporter.write_line(f"could not remove a test account: {failure}", red=True)
        session.exitstatus = 1
    if os.environ.get(REQUIRE_ALL_ENV, "").strip() in ("", "0"):
        return
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if skipped:
        reporter.write_line(f"{REQUIRE_ALL_ENV} is set, yet {len(skipped)} tests were "
                            "skipped:", red=True)
        for report in skipped:
            reporter.write_line(f"  {report.nodeid}")
        session.exitstatus = 1
