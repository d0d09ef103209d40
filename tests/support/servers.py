"""Loopback servers for real dtool datasets: a counting HTTP server and moto S3."""

import collections
import functools
import json
import os
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import dtoolcore

from . import VENV_BIN

HOST = "127.0.0.1"


class _DtoolHandler(SimpleHTTPRequestHandler):
    """Serve datasets like ``dtool_http.server`` but without chdir, and count GETs."""

    def log_message(self, format, *args):
        """Keep test output clean."""

    def do_GET(self):
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        self.server.record_get(path)
        if path.endswith("/http_manifest.json"):
            self._send_bytes(self._http_manifest(path[:-len("/http_manifest.json")]))
        elif self._is_dataset_dir(path):
            # dtool_http's broker GETs the dataset URL and keeps ``r.url``;
            # answering 200 (not 301 to ".../") keeps the URI, hence the cache
            # directory, exactly as given.
            self._send_bytes(b"dtool dataset\n", "text/plain")
        else:
            super().do_GET()

    def _is_dataset_dir(self, path):
        local = self.translate_path(path)
        return os.path.isfile(os.path.join(local, ".dtool", "dtool"))

    def _send_bytes(self, body, content_type="application/json"):
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _http_manifest(self, dataset_path):
        """Return the manifest that makes a directory an HTTP-enabled dataset."""
        ds = dtoolcore.DataSet.from_uri(self.translate_path(dataset_path))
        url = functools.partial(self._url, dataset_path.rstrip("/"))
        with open(os.path.join(self.translate_path(dataset_path), ".dtool", "dtool")) as fh:
            admin_metadata = json.load(fh)
        return json.dumps({
            "admin_metadata": admin_metadata,
            "manifest_url": url(".dtool/manifest.json"),
            "readme_url": url("README.yml"),
            "overlays": {o: url(f".dtool/overlays/{o}.json") for o in ds.list_overlay_names()},
            "annotations": {
                a: url(f".dtool/annotations/{a}.json") for a in ds.list_annotation_names()
            },
            "tags": ds.list_tags(),
            "item_urls": {
                i: url("data/" + urllib.parse.quote(props["relpath"]))
                for i, props in ((i, ds.item_properties(i)) for i in ds.identifiers)
            },
        }).encode("utf-8")

    def _url(self, dataset_path, suffix):
        return f"{self.server.base_url}{dataset_path}/{suffix}"

    def copyfile(self, source, outputfile):
        """Optionally throttle file bodies so concurrent fetches really overlap."""
        rate = self.server.slow_item_bytes_per_s
        if not rate:
            return super().copyfile(source, outputfile)
        chunk = max(1, rate // 20)  # ~20 writes per second
        while True:
            buf = source.read(chunk)
            if not buf:
                return
            outputfile.write(buf)
            time.sleep(len(buf) / rate)  # rate limiting, not synchronisation


class CountingDtoolHTTPServer(ThreadingHTTPServer):
    """HTTP server on ``host`` (127.0.0.1 unless given) serving a directory of dtool datasets.

    Counts GET requests per (unquoted) URL path so tests can prove an item was
    downloaded exactly once.  Set ``slow_item_bytes_per_s`` to throttle bodies.
    Simulated hosts cannot reach the root namespace's 127.0.0.1: serve them on the
    bridge address (``support.hosts.Network.server_address``).
    """

    daemon_threads = True

    def __init__(self, directory, host=HOST):
        handler = functools.partial(_DtoolHandler, directory=str(directory))
        super().__init__((host, 0), handler)
        self.directory = str(directory)
        self.base_url = f"http://{host}:{self.server_address[1]}"
        self.slow_item_bytes_per_s = None
        self._counts = collections.Counter()
        self._lock = threading.Lock()
        self._thread = None

    def record_get(self, path):
        with self._lock:
            self._counts[path] += 1

    def get_count(self, path):
        """Return how many GETs ``path`` (e.g. "/name/data/a.txt") received."""
        with self._lock:
            return self._counts[path]

    def item_get_count(self, dataset_name, relpath):
        return self.get_count(f"/{dataset_name}/data/{relpath}")

    def counts(self):
        """Snapshot of all counts (path -> GETs), handy in assertion messages."""
        with self._lock:
            return dict(self._counts)

    def reset_counts(self):
        with self._lock:
            self._counts.clear()

    def start(self):
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self):
        self.shutdown()
        self.server_close()
        self._thread.join(timeout=10)


def _free_port():
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class MotoS3Server:
    """The real ``moto_server`` executable on 127.0.0.1, as a subprocess.

    A separate process (not in-process moto) so that test subprocesses reach
    the very same S3 state through the endpoint URL.
    """

    ACCESS_KEY = "testing"
    SECRET_KEY = "testing"

    def __init__(self, log_path=None):
        self.log_path = log_path
        self.port = None
        self.endpoint = None
        self._proc = None

    def start(self, timeout=30):
        self.port = _free_port()
        self.endpoint = f"http://{HOST}:{self.port}"
        log = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL
        try:
            self._proc = subprocess.Popen(
                [os.path.join(VENV_BIN, "moto_server"), "-H", HOST, "-p", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT,
            )
        finally:
            if self.log_path:
                log.close()
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self._proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with {self._proc.returncode}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"moto_server did not answer on {self.endpoint}")
            time.sleep(0.05)
        return self

    def _answers(self):
        try:
            urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=1).close()
            return True
        except urllib.error.HTTPError:
            return True  # any HTTP answer means it is serving
        except OSError:
            return False

    def stop(self):
        if self._proc is None or self._proc.poll() is not None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()

    def client(self):
        import boto3
        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1",
            aws_access_key_id=self.ACCESS_KEY, aws_secret_access_key=self.SECRET_KEY,
        )

    def create_bucket(self, name):
        """Create bucket ``name``; avoid hyphens, they can't appear in env var names."""
        self.client().create_bucket(Bucket=name)
        return name

    def s3_env(self, bucket):
        """Env vars dtool-s3 reads (``DTOOL_S3_*_<bucket>``) plus dummy AWS settings."""
        return {
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ACCESS_KEY_ID": self.ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": self.SECRET_KEY,
            f"DTOOL_S3_ENDPOINT_{bucket}": self.endpoint,
            f"DTOOL_S3_ACCESS_KEY_ID_{bucket}": self.ACCESS_KEY,
            f"DTOOL_S3_SECRET_ACCESS_KEY_{bucket}": self.SECRET_KEY,
        }
