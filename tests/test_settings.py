"""Housekeeping settings and decisions as pure functions: parsing, precedence, the config
file, when a clean is due, and the run record read back from untrusted JSON."""

import json
import os

import pytest

from dtool_cache_manager import cachefs
from dtool_cache_manager.housekeeping import records as hk_records, run as hk_run, \
    trigger as hk_trigger
from dtool_cache_manager.housekeeping import settings as st

GB = 1000 ** 3
HOUR = 3600.0
DAY = 86400.0


@pytest.fixture
def config(tmp_path):
    """A dtool config file (not yet created) and a writer for it."""
    path = tmp_path / "dtool.json"

    def write(data):
        path.write_text(json.dumps(data))
        return str(path)

    write.path = str(path)
    return write


def test_nothing_set_means_no_limits_and_the_default_interval(config):
    settings = st.load(environ={}, path=config.path)
    assert (settings.max_size_bytes, settings.max_age_seconds) == (None, None)
    assert settings.interval_seconds == HOUR and not settings.limits_set
    assert [e.source for e in settings.entries] == [st.UNSET, st.UNSET, st.DEFAULT]


def test_environment_beats_config_file_beats_default(config):
    path = config({st.MAX_SIZE: "50GB", st.MAX_AGE: "30d", st.INTERVAL: "10m"})
    settings = st.load(environ={st.MAX_SIZE: "2GB", st.MAX_AGE: "  "}, path=path)
    assert settings.max_size_bytes == 2 * GB
    assert settings.max_age_seconds == 30 * DAY  # a blank variable counts as unset
    assert settings.interval_seconds == 600.0 and settings.limits_set
    assert [(e.text, e.source) for e in settings.entries] == [
        ("2GB", st.ENV), ("30d", st.CONFIG), ("10m", st.CONFIG)]


def test_numbers_in_the_config_file_read_as_typed(config):
    path = config({st.MAX_SIZE: 5000, st.MAX_AGE: 7})
    settings = st.load(environ={}, path=path)
    assert settings.max_size_bytes == 5000 and settings.max_age_seconds == 7 * DAY


@pytest.mark.parametrize("environ, stored, where", [
    ({st.MAX_SIZE: "lots"}, {}, "the environment"),
    ({}, {st.MAX_AGE: "-3d"}, "dtool.json"),
    ({}, {st.INTERVAL: True}, "dtool.json"),
    ({}, {st.MAX_SIZE: ["50GB"]}, "dtool.json"),
])
def test_a_malformed_value_is_one_line_naming_key_and_source(config, environ, stored, where):
    path = config(stored)
    with pytest.raises(st.SettingsError) as err:
        st.load(environ=environ, path=path)
    message = str(err.value)
    key = next(iter({**environ, **stored}))
    assert key in message and where in message and "\n" not in message


def test_a_config_file_that_is_not_json_is_reported(tmp_path):
    path = tmp_path / "dtool.json"
    path.write_text("{not json")
    with pytest.raises(st.SettingsError, match="cannot read dtool config file"):
        st.load(environ={}, path=str(path))


def test_survey_reports_instead_of_raising(config):
    path = config({st.MAX_SIZE: "lots"})
    size, age, interval = st.survey(environ={}, path=path)
    assert (size.text, size.source, size.value) == ("lots", st.CONFIG, None)
    assert "invalid size" in size.error and age.error is None and interval.value == HOUR


def test_write_checks_first_and_keeps_other_keys(config):
    path = config({"DTOOL_CACHE_DIRECTORY": "/scratch/cache"})
    before = open(path).read()
    with pytest.raises(st.SettingsError):
        st.write(st.MAX_SIZE, "lots", path)
    with pytest.raises(st.SettingsError, match="unknown setting"):
        st.write("DTOOL_CACHE_MAX_SIZES", "5GB", path)
    assert open(path).read() == before
    assert st.write(st.MAX_SIZE, " 50GB ", path) == "50GB"
    assert json.load(open(path)) == {"DTOOL_CACHE_DIRECTORY": "/scratch/cache",
                                     st.MAX_SIZE: "50GB"}


def test_unset_removes_only_that_key_and_keeps_the_mode(config):
    path = config({"DTOOL_CACHE_DIRECTORY": "/scratch", st.MAX_AGE: "30d"})
    os.chmod(path, 0o600)
    assert st.unset(st.MAX_AGE, path) is True
    assert st.unset(st.MAX_AGE, path) is False
    assert json.load(open(path)) == {"DTOOL_CACHE_DIRECTORY": "/scratch"}
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert st.unset(st.MAX_AGE, config.path + ".missing") is False


# -- when a clean is due ---------------------------------------------------------------


def _settings(size=None, age=None, interval=HOUR):
    env = {st.INTERVAL: f"{interval}s"}
    if size is not None:
        env[st.MAX_SIZE] = str(size)
    if age is not None:
        env[st.MAX_AGE] = f"{age}s"
    return st.load(environ=env, path="/nonexistent/dtool.json")


def _run(start, size_after):
    return hk_records.RunRecord(start=start, end=start + 1, pid=1, user="u@h", trigger=hk_records.SIZE,
                        triggered_by=None, max_size_bytes=100, max_age_seconds=None,
                        target_size_bytes=90, size_before_bytes=size_after,
                        size_after_bytes=size_after, removed=0, freed_bytes=0,
                        skipped_in_use=0, error=None)


def test_due_decisions():
    now = 1_000_000.0
    limit = _settings(size=100)
    assert hk_trigger.due(_settings(), None, 10 ** 9, now) is None  # no limit: never
    assert hk_trigger.due(limit, None, 0, now) == hk_records.UNMEASURED
    assert hk_trigger.due(limit, _run(now - 10, None), 0, now - 10 + HOUR) == hk_records.UNMEASURED
    assert hk_trigger.due(limit, _run(now - 10, 500), 0, now) is None  # within the interval
    assert hk_trigger.due(limit, _run(now - HOUR, 60), 40, now) is None  # 100: not over
    assert hk_trigger.due(limit, _run(now - HOUR, 60), 41, now) == hk_records.SIZE
    assert hk_trigger.due(_settings(age=DAY), _run(now - HOUR, 0), 0, now) == hk_records.AGE
    assert hk_trigger.due(limit, _run(now + DAY, 500), 0, now) == hk_records.SIZE  # a start in the future
    assert hk_trigger.due(limit, _run(now - DAY + 1, 0), 0, now) is None
    assert hk_trigger.due(limit, _run(now - DAY, 0), 0, now) == hk_records.STALE  # others' fetches add up
    assert hk_trigger.due(_settings(size=100, interval=2 * DAY), _run(now - DAY, 0), 0, now) is None
    assert hk_run.target_size(100) == 90


def test_a_process_counts_only_its_fetches_since_the_last_run(tmp_path):
    tally = hk_trigger._Tally()
    tally.add(100.2, 10)
    tally.add(100.7, 5)
    tally.add(102.0, 7)
    tally.add(103.5, 1)
    with cachefs.open_cache(str(tmp_path)) as cache:
        hk_records._append_log(cache, (json.dumps(_run(102.4, 0).to_json()) + "\n").encode())
        assert tally.observe(cache).start == 102.4
    assert tally.fetched_bytes == 8  # 102.0 is in the second the run started: kept


def test_run_record_round_trip_and_rejection():
    record = _run(1.5, 40)
    assert hk_records.RunRecord.from_json(json.loads(json.dumps(record.to_json()))) == record
    for field, bad in [("removed", True), ("start", "soon"), ("size_after_bytes", 1.5),
                       ("user", 7), ("start", float("nan"))]:
        data = dict(record.to_json(), **{field: bad})
        assert hk_records.RunRecord.from_json(data) is None, field
    assert hk_records.RunRecord.from_json({k: v for k, v in record.to_json().items()
                                   if k != "pid"}) is None
    assert hk_records.RunRecord.from_json([1, 2]) is None


def test_a_long_log_keeps_its_newer_half_whole_and_leaves_nothing_behind(tmp_path):
    meta = os.path.join(str(tmp_path), ".dtool-cache-manager")
    log = os.path.join(meta, "autoclean.log")
    with cachefs.open_cache(str(tmp_path)) as cache:
        sizes = [0]
        n = 0
        while sizes[-1] <= hk_records.LOG_MAX_BYTES:  # until an append shortens it
            n += 1
            hk_records._append_log(cache, (json.dumps(_run(float(n), 0).to_json())
                                           + "\n").encode())
            sizes.append(os.path.getsize(log))
            if sizes[-1] < sizes[-2]:
                break
        assert sizes[-1] < sizes[-2] and sizes[-2] > hk_records.LOG_MAX_BYTES // 2
        with open(log, "rb") as fh:
            kept = fh.read()
        assert 0 < len(kept) <= hk_records.LOG_MAX_BYTES // 2  # the newer half, whole lines
        assert all(hk_records.RunRecord.from_json(json.loads(raw))
                   for raw in kept.splitlines())
        assert hk_records.read_last_run(cache).start == float(n)
        assert os.stat(log).st_mode & 0o777 == cache.infra_mode
        assert not [name for name in os.listdir(meta) if ".new-" in name]
