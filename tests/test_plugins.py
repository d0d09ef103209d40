"""Third-party hooks: discovered through the spec's entry-point groups, like ours."""

import json
import subprocess
import sys
import textwrap

import pytest

from dtool_cache_manager.hooks import plugins

PLUGIN = '''
import json, os

def _log(*record):
    with open(os.environ["PROBE_LOG"], "a") as fh:
        fh.write(json.dumps(record) + "\\n")

def pre_item_content_abspath(uri, identifier):
    _log("pre", uri, identifier)

def post_item_content_abspath(uri, identifier, abspath):
    from dtool_cache_manager.hooks.host import current_access
    access = current_access()
    _log("post", uri, identifier, abspath, access.miss, os.path.exists(abspath))

def broken_post(abspath):
    raise RuntimeError("a buggy third-party hook")
'''

ENTRY_POINTS = '''
[dtool.pre_item_content_abspath]
probe_pre = dcm_probe_plugin:pre_item_content_abspath

[dtool.post_item_content_abspath]
probe_post = dcm_probe_plugin:post_item_content_abspath
probe_broken = dcm_probe_plugin:broken_post
'''


@pytest.fixture
def probe_plugin(tmp_path):
    """A tiny distribution, installed the way pip leaves one: module + .dist-info."""
    site = tmp_path / "site"
    dist_info = site / "dcm_probe_plugin-1.0.dist-info"
    dist_info.mkdir(parents=True)
    (site / "dcm_probe_plugin.py").write_text(PLUGIN)
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: dcm-probe-plugin\n"
                                        "Version: 1.0\n")
    (dist_info / "entry_points.txt").write_text(textwrap.dedent(ENTRY_POINTS))
    return site


def test_third_party_hooks_fire_and_a_broken_one_is_contained(
        probe_plugin, http_dataset, cache_dir, make_env, tmp_path):
    ds = http_dataset({"a.txt": b"abc"})
    ident = ds.identifiers["a.txt"]
    log = tmp_path / "probe.log"
    env = make_env(cache_dir, {"PYTHONPATH": probe_plugin, "PROBE_LOG": log})
    code = ("import sys, dtoolcore\nds = dtoolcore.DataSet.from_uri(sys.argv[1])\n"
            "print(ds.item_content_abspath(sys.argv[2]))\n"
            "print(ds.item_content_abspath(sys.argv[2]))\n")
    result = subprocess.run([sys.executable, "-c", code, ds.uri, ident], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    path = result.stdout.split()[0]
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert records == [
        ["pre", ds.uri, ident], ["post", ds.uri, ident, path, True, True],
        ["pre", ds.uri, ident], ["post", ds.uri, ident, path, False, True],
    ]
    assert result.stderr.count("a buggy third-party hook") == 2
    assert "access continues" in result.stderr


def test_registry_lists_our_hooks_through_entry_points():
    pm = plugins.build_manager()
    names = [name for name, _ in pm.list_name_plugin()]
    assert any("dtool.pre_item_content_abspath" in n and n.startswith("dtool-cache-manager:")
               for n in names)
    assert any("dtool.post_item_content_abspath" in n and n.startswith("dtool-cache-manager:")
               for n in names)


def test_wrappers_go_through_pluggy_and_order_is_kept():
    from dtool_cache_manager.hooks.hookspecs import hookimpl

    calls = []

    class First:
        @hookimpl(tryfirst=True)
        def pre_item_content_abspath(self, identifier):
            calls.append(("first", identifier))

    class Last:
        @hookimpl(trylast=True)
        def pre_item_content_abspath(self, uri, identifier):
            calls.append(("last", uri, identifier))

    class Wrapper:
        @hookimpl(wrapper=True)
        def pre_item_content_abspath(self, uri):
            calls.append(("wrap-in", uri))
            result = yield
            calls.append(("wrap-out", uri))
            return result

    pm = plugins.build_manager()
    pm.unregister(name=[n for n, _ in pm.list_name_plugin()
                        if "pre_item" in n and n.startswith("dtool-cache-manager")][0])
    pm.register(Last())
    pm.register(First())
    plugins.Dispatch(pm).pre("u", "i")
    assert calls == [("first", "i"), ("last", "u", "i")]
    calls.clear()
    pm.register(Wrapper())
    plugins.Dispatch(pm).pre("u", "i")
    assert calls == [("wrap-in", "u"), ("first", "i"), ("last", "u", "i"), ("wrap-out", "u")]


def test_a_repeated_hit_skips_the_hooks_only_while_ours_are_alone():
    """Our two implementations offer one shortcut for repeated warm hits; one more
    implementation of either hook turns it off, so that it sees every access."""
    from dtool_cache_manager.hooks import tracking
    from dtool_cache_manager.hooks.hookspecs import hookimpl

    pm = plugins.build_manager()
    assert plugins.Dispatch(pm).warm_hits is tracking.WARM_HITS

    class Observer:
        @hookimpl
        def post_item_content_abspath(self, abspath):
            pass

    pm.register(Observer())
    assert plugins.Dispatch(pm).warm_hits is None


def test_a_plugin_registered_at_run_time_sees_the_next_access(http_dataset, cache_dir,
                                                              make_env):
    """plugins.register() makes the host build its dispatch again (plugins never imports
    the host: it tells it through on_change)."""
    ds = http_dataset({"a.txt": b"abc"})
    code = textwrap.dedent("""
        import sys, dtoolcore
        from dtool_cache_manager.hooks import plugins
        from dtool_cache_manager.hooks.hookspecs import hookimpl
        seen = []

        class Late:
            @hookimpl
            def post_item_content_abspath(self, identifier):
                seen.append(identifier)

        ds = dtoolcore.DataSet.from_uri(sys.argv[1])
        ds.item_content_abspath(sys.argv[2])
        ds.item_content_abspath(sys.argv[2])  # a repeated hit: the shortcut, no hooks
        plugins.register(Late())
        ds.item_content_abspath(sys.argv[2])
        print(seen)
    """)
    ident = ds.identifiers["a.txt"]
    result = subprocess.run([sys.executable, "-c", code, ds.uri, ident],
                            env=make_env(cache_dir), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str([ident])]
