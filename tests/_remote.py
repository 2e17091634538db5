"""Remote sources for the tests: a loopback HTTP file server with faults, and an S3 server.

:class:`FaultyHTTPServer` serves a local folder on ``http://127.0.0.1:<port>/`` as a static web
server does (an HTML index page per folder, ``Range`` requests, ``Last-Modified``), and can
be told to misbehave per file: answer 500 (always or the first N times), 404, drop the
connection half-way through the body, or send the body slowly. :func:`s3_server` starts moto's
S3 server on 127.0.0.1 and points the standard AWS variables at it (no network, no account).
"""

from __future__ import annotations

import email.utils
import functools
import os
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


@dataclass
class Fault:
    """How the server answers GETs of one file: ``kind`` is ``"status"`` (answer ``status``),
    ``"drop"`` (send the headers and half the body, then close) or ``"slow"`` (send the body in
    ``chunk``-byte pieces, ``delay`` seconds apart). ``times``: for the first N GETs only
    (None: always)."""

    kind: str
    status: int = 500
    times: int | None = None
    delay: float = 0.0
    chunk: int = 1024


class _Handler(SimpleHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        """Quiet."""

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _answer(self, *, body: bool) -> None:
        rel = self.path.split("?", 1)[0].lstrip("/")
        local = Path(self.translate_path(self.path))
        if local.is_dir():
            if not self.path.split("?", 1)[0].endswith("/"):
                self.send_response(301)
                self.send_header("Location", self.path + "/")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            page = self.list_directory(str(local))  # writes the headers itself
            if page is not None:
                if body:
                    self.copyfile(page, self.wfile)
                page.close()
            return
        fault = self.server.fault_for(rel, count=body)
        if fault is not None and fault.kind == "status":
            self.send_error(fault.status)
            return
        if not local.is_file():
            self.send_error(404)
            return
        data = local.read_bytes()
        start, end, status = 0, len(data), 200
        ranged = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if ranged:
            start = int(ranged.group(1))
            end = min(len(data), int(ranged.group(2)) + 1) if ranged.group(2) else len(data)
            status = 206
        part = data[start:end]
        self.send_response(status)
        self.send_header("Content-Type", self.guess_type(str(local)))
        self.send_header("Content-Length", str(len(part)))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Last-Modified", email.utils.formatdate(local.stat().st_mtime, usegmt=True))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        self.end_headers()
        if not body:
            return
        if fault is not None and fault.kind == "drop":
            self.wfile.write(part[: len(part) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)
            return
        if fault is not None and fault.kind == "slow":
            for at in range(0, len(part), fault.chunk):
                self.wfile.write(part[at : at + fault.chunk])
                self.wfile.flush()
                time.sleep(fault.delay)
            return
        self.wfile.write(part)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    faults: dict[str, Fault]

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hung up (a timeout on a slow body, a test that ended) is no error of
        the server's; never print a traceback into the output a test is reading."""
    gets: dict[str, int]
    lock: threading.Lock

    def fault_for(self, rel: str, *, count: bool) -> Fault | None:
        with self.lock:
            if count:
                self.gets[rel] = self.gets.get(rel, 0) + 1
            fault = self.faults.get(rel)
            if fault is None or fault.times is None:
                return fault
            if not count:
                return None
            if fault.times <= 0:
                return None
            fault.times -= 1
            return fault


class FaultyHTTPServer:
    """Serve ``root`` over HTTP on 127.0.0.1; ``faults[rel_path]`` makes one file misbehave;
    ``gets[rel_path]`` counts the GETs of each file."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._server = _Server(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
        self._server.faults = {}
        self._server.gets = {}
        self._server.lock = threading.Lock()
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def faults(self) -> dict[str, Fault]:
        return self._server.faults

    @property
    def gets(self) -> dict[str, int]:
        return self._server.gets

    def url(self, rel: str = "") -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/{rel.lstrip('/')}"

    def __enter__(self) -> FaultyHTTPServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


@contextmanager
def s3_server(monkeypatch: Any) -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 for the test's duration; yields its endpoint URL and sets
    the AWS variables (fake keys, the endpoint) that s3fs and boto read."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        for name, value in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ENDPOINT_URL_S3": endpoint,
        }.items():
            monkeypatch.setenv(name, value)
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
            monkeypatch.delenv(name, raising=False)
        yield endpoint
    finally:
        server.stop()


def upload_tree(endpoint: str, bucket: str, root: Path) -> None:
    """Create ``bucket`` and put every file under ``root`` into it, keyed by relative path."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket=bucket)
    for path in sorted(root.rglob("*")):
        if path.is_file():
            s3.put_object(Bucket=bucket, Key=path.relative_to(root).as_posix(), Body=path.read_bytes())


def env_without_proxy() -> dict[str, str]:
    """The environment for a child process that talks to 127.0.0.1 (no proxy in the way)."""
    env = dict(os.environ)
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        env.pop(name, None)
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env
