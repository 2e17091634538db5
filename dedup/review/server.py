"""The review page's local server: 127.0.0.1 only, a secret token in every URL.

Routes (all under ``/<token>/``; anything else is 403 without the token, 404 with it):

- ``GET  /<token>/``                 the page (:mod:`dedup.review.page`)
- ``GET  /<token>/api/items``        the queue as JSON (pairs not decided yet)
- ``GET  /<token>/img/<n>/<a|b>.jpg`` a thumbnail of item ``n``'s side, read back from the sources
- ``POST /<token>/api/decide``       ``{"item": n, "decision": "same"|"different"|"skip"}``

Nothing else of the disk is reachable: images are addressed by queue position, never by a
path, and read through the run's own sources (:func:`dedup.sources.readback.stream_images`),
with the SHA-256 the run recorded checked, so a changed file is not shown as the sample. The
Host header must name the loopback address (no DNS rebinding), responses carry a strict CSP
with a per-server nonce, and the token is compared in constant time.
"""

from __future__ import annotations

import hmac
import json
import re
import secrets
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from dedup.decisions import DECISIONS_FILE, Verdict, read_decisions, record_decisions
from dedup.report.thumbs import make_thumbnail
from dedup.sources.readback import rediscover, stream_images
from dedup.review.queue import Item, RunView, build_queue

THUMB_SIZE = 384
_MAX_BODY = 4096
_IMG = re.compile(r"img/(\d{1,9})/([ab])\.jpg")


def safe_json(value: Any) -> str:
    """JSON with ``<``, ``>`` and ``&`` escaped (``\\u003c``...): markup-free, so it stays data even
    if a browser ever sniffs it, or it is embedded in a page."""
    text = json.dumps(value, ensure_ascii=True)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


class ReviewServer:
    """Serve the review page of the run in ``out``; ``start()`` in a thread or ``serve_forever()``."""

    def __init__(self, out: str | Path, *, port: int = 0, host: str = "127.0.0.1", token: str | None = None) -> None:
        self.out = Path(out)
        self.view = RunView.open(self.out)
        self.items: list[Item] = build_queue(self.out, self.view)
        self.token = token or secrets.token_urlsafe(24)
        self.nonce = secrets.token_urlsafe(16)
        self._thumbs: dict[tuple[int, str], bytes | None] = {}
        self._thumb_lock = threading.Lock()
        self._shards: list[Any] | None = None
        self.httpd = ThreadingHTTPServer((host, port), _handler(self))
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/{self.token}/"

    def start(self) -> ReviewServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="dedup-review", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def close(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join()
        self.httpd.server_close()

    # -- data --------------------------------------------------------------------------------

    def pending(self) -> tuple[list[dict[str, Any]], int]:
        """The queue's undecided items (as the page shows them) and how many pairs are decided."""
        decided = read_decisions(self.out / DECISIONS_FILE)
        done = set(zip(decided.column("a_id").to_pylist(), decided.column("b_id").to_pylist(), strict=True))
        shown = []
        for n, it in enumerate(self.items):
            if it.key in done:
                continue
            shown.append({"index": n, "why": it.why, "signal": it.signal, "similarity": it.similarity,
                          "cluster_size": it.cluster_size, "a": it.a.public(), "b": it.b.public()})  # fmt: skip
        return shown, decided.num_rows

    def decide(self, n: int, verdict: Verdict) -> int:
        it = self.items[n]
        table = record_decisions(
            self.out / DECISIONS_FILE,
            [{"a_id": it.a.sample_id, "b_id": it.b.sample_id, "a_sha256": it.a.sha256, "b_sha256": it.b.sha256,
              "decision": verdict.value, "signal": it.signal, "similarity": it.similarity, "why": it.why}],
        )  # fmt: skip
        return table.num_rows

    def thumbnail(self, n: int, side: str) -> bytes | None:
        key = (n, side)
        with self._thumb_lock:  # one reader of the sources at a time; the rest wait for the cache
            if key in self._thumbs:
                return self._thumbs[key]
            it = self.items[n]
            if it.signal == "partial":
                self._thumbs.update({(n, k): v for k, v in _partial_thumbnails(self._read(it.a), self._read(it.b)).items()})
            else:
                data = self._read(it.a if side == "a" else it.b)
                self._thumbs[key] = make_thumbnail(data, THUMB_SIZE) if data else None
            return self._thumbs.get(key)

    def _read(self, s: Any) -> bytes | None:
        """The bytes of one sample, read back from the run's sources (None: gone or changed)."""
        if self._shards is None:
            sources = dict.fromkeys(self.view.manifest.column("source").to_pylist())
            self._shards = rediscover(sources)
        if not s.shard:
            return None
        for _, data in stream_images(self._shards, {s.sample_id: s.shard}, sha256={s.sample_id: s.sha256}):
            return data
        return None


def _partial_thumbnails(a: bytes | None, b: bytes | None) -> dict[str, bytes | None]:
    """Thumbnails of a partial copy's two sides, the region of the one that holds the other
    outlined (ORB + RANSAC, as the second look found it; none drawn when no fit is found)."""
    from PIL import Image, ImageDraw

    from dedup.config import FingerprintConfig
    from dedup.errors import SampleError
    from dedup.fingerprint import decode
    from dedup.second_look.geometry import LOCAL_SIDE, local_features, matched_region

    images: dict[str, Image.Image | None] = {}
    for side, data in (("a", a), ("b", b)):
        try:
            images[side] = decode(data, max_pixels=FingerprintConfig().max_pixels).convert("RGB") if data else None
        except SampleError:
            images[side] = None
    outline: tuple[str, Any] | None = None
    ia, ib = images["a"], images["b"]
    if ia is not None and ib is not None:
        fa, fb = local_features(ia), local_features(ib)
        tries = [("b", matched_region(fa, fb, ia.size)), ("a", matched_region(fb, fa, ib.size))]
        found = [(inliers, side, quad) for side, got in tries if got is not None for quad, inliers in [got]]
        if found:
            _, side, quad = max(found, key=lambda t: t[0])
            outline = (side, quad)
    out: dict[str, bytes | None] = {}
    for side, image in images.items():
        if image is None:
            out[side] = None
            continue
        thumb = image.copy()
        thumb.thumbnail((THUMB_SIZE, THUMB_SIZE), Image.Resampling.LANCZOS)
        if outline is not None and outline[0] == side:
            scale = thumb.width / (image.width * LOCAL_SIDE / max(image.size))  # keypoint pixels -> thumbnail
            points = [(float(x) * scale, float(y) * scale) for x, y in outline[1]]
            ImageDraw.Draw(thumb).polygon(points, outline=(230, 0, 60), width=3)
        out[side] = make_thumbnail(thumb, THUMB_SIZE)
    return out


def _handler(server: ReviewServer) -> type[BaseHTTPRequestHandler]:
    csp = (
        "default-src 'none'; img-src 'self'; connect-src 'self'; "
        f"script-src 'nonce-{server.nonce}'; style-src 'nonce-{server.nonce}'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )

    class Handler(BaseHTTPRequestHandler):
        server_version = "dedup-review"
        sys_version = ""

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
            pass  # the token is in every path: keep it out of the terminal's scrollback

        def _send(self, status: HTTPStatus, body: bytes, kind: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Content-Security-Policy", csp)
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Referrer-Policy", "no-referrer")
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, value: Any, status: HTTPStatus = HTTPStatus.OK) -> None:
            self._send(status, safe_json(value).encode("ascii"), "application/json")

        def _refuse(self, status: HTTPStatus) -> None:
            self._send(status, f"{status.value} {status.phrase}\n".encode(), "text/plain; charset=utf-8")

        def _route(self) -> str | None:
            """The path after ``/<token>/``, or None (and the refusal sent)."""
            host = (self.headers.get("Host") or "").rsplit(":", 1)[0].strip("[]").lower()
            if host not in ("127.0.0.1", "localhost", "::1"):
                self._refuse(HTTPStatus.FORBIDDEN)
                return None
            path = urlsplit(self.path).path
            head, _, rest = path.lstrip("/").partition("/")
            if not hmac.compare_digest(head.encode(), server.token.encode()):
                self._refuse(HTTPStatus.FORBIDDEN)
                return None
            return rest

        def do_GET(self) -> None:  # noqa: N802 - the base's name
            rest = self._route()
            if rest is None:
                return
            if rest == "":
                from dedup.review.page import render_page

                page = render_page(title=server.out.name or str(server.out), nonce=server.nonce)
                self._send(HTTPStatus.OK, page.encode("utf-8"), "text/html; charset=utf-8")
            elif rest == "api/items":
                items, decided = server.pending()
                self._json({"items": items, "decided": decided, "decisions_file": str(server.out / DECISIONS_FILE)})
            elif (m := _IMG.fullmatch(rest)) and int(m.group(1)) < len(server.items):
                jpeg = server.thumbnail(int(m.group(1)), m.group(2))
                if jpeg is None:
                    self._refuse(HTTPStatus.NOT_FOUND)
                else:
                    self._send(HTTPStatus.OK, jpeg, "image/jpeg")
            else:
                self._refuse(HTTPStatus.NOT_FOUND)

        do_HEAD = do_GET  # noqa: N815

        def do_POST(self) -> None:  # noqa: N802
            rest = self._route()
            if rest is None:
                return
            if rest != "api/decide":
                self._refuse(HTTPStatus.NOT_FOUND)
                return
            if (self.headers.get("Content-Type") or "").split(";")[0].strip() != "application/json":
                self._refuse(HTTPStatus.UNSUPPORTED_MEDIA_TYPE)  # no cross-site form posts
                return
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if not 0 < length <= _MAX_BODY:
                self._refuse(HTTPStatus.BAD_REQUEST)
                return
            try:
                body = json.loads(self.rfile.read(length))
                n = body["item"]
                verdict = Verdict(body["decision"])
                if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n < len(server.items):
                    raise ValueError(n)
            except (ValueError, KeyError, TypeError):
                self._refuse(HTTPStatus.BAD_REQUEST)
                return
            decided = server.decide(n, verdict)
            self._json({"ok": True, "decided": decided})

        def do_PUT(self) -> None:  # noqa: N802
            self._refuse(HTTPStatus.METHOD_NOT_ALLOWED)

        do_DELETE = do_PATCH = do_PUT  # noqa: N815

    return Handler
