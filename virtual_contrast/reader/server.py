"""The reading tool's web server: one reader's session on 127.0.0.1, for a browser running the NiiVue page.

Everything is under ``/s/<token>/``, with a random token made when the server starts (only the person given the
URL reaches the session). A blinded session's page, URLs and responses carry case ids only: images are served as
``image/<case_id>/{post,t1,flair}.nii``, each re-encoded in memory as a reading copy
(:func:`virtual_contrast.reading_copy.reading_copy`, the gate of everything a reader receives: the same scale,
data type, header and window for every image, the companions re-encoded for each case), so neither a file
name, a header field, the data type nor a window tells which image it is. They are sent uncompressed: the size
of a compressed image tells how noisy it is, and vir-T1c is smoother than the low dose. The next case's images
are encoded while the reader reads. Any case id that is not one of the session's cases is refused (403), and so
is a wrong token. Nothing the server sends names a file or folder of the machine it runs on.

Every request gets an answer: a malformed one (a Content-Length that is not a number or is negative, a body
over :data:`MAX_BODY_BYTES`, JSON that is not an object or nests deeper than :data:`MAX_JSON_DEPTH`, a method
other than GET, HEAD and POST) a 4xx with a JSON error; a read that cannot be saved (a full disk) a 507, any
other failure a 500, each with its reason (never a path: the server's terminal names the file).

Routes (relative to ``/s/<token>/``)::

    GET  ""                           the page (static/index.html)
    GET  app.js, app.css, niivue.js   the page's script, style, the NiiVue viewer
    GET  api/session                  progress: case ids, read or not, closed
    GET  api/case/<case_id>           the saved read of a case (for review), or null
    GET  image/<case_id>/<series>.nii      post, t1, flair; in a review session (a closed phase) also
                                          uncertainty (vir-T1c cases only), never in a blinded reading
    POST api/case/<case_id>           {"lesions": [{"long": line, "short": line}], "quality": 1-5, "elapsed_s": s}
    POST api/close                    close the session
"""

from __future__ import annotations

import errno
import json
import logging
import re
import secrets
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from virtual_contrast.io import InputError
from virtual_contrast.reader.session import REVIEW_IMAGE, ReadingSession
from virtual_contrast.reader.viewer import STATIC_DIR, viewer_path
from virtual_contrast.reading_copy import load_reading_copy, reading_nifti_bytes

log = logging.getLogger(__name__)

SERIES = {"post": "post", "t1": "T1", "flair": "FLAIR"}  # URL name -> the session's image key
#: Served in a review session only (ReadingSession.review: a closed phase, vir-T1c cases), never while a
#: phase is read blinded.
REVIEW_SERIES = {"uncertainty": REVIEW_IMAGE}
STATIC_FILES = {
    "": ("index.html", "text/html; charset=utf-8"),
    "app.js": ("app.js", "text/javascript; charset=utf-8"),
    "app.css": ("app.css", "text/css; charset=utf-8"),
}
# Nothing leaves for another origin; NiiVue compiles no code from strings and needs no inline script.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; "
    "style-src 'self' 'unsafe-inline'; worker-src 'self' blob:; object-src 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
MAX_BODY_BYTES = 1_000_000
#: Deepest nesting of a request's JSON (a read is 5 levels deep); deeper is refused before it is parsed.
MAX_JSON_DEPTH = 32
_IMAGE_PATH = re.compile(r"^image/(?P<case>[A-Za-z0-9_.-]+)/(?P<series>[a-z0-9]+)\.nii$")
_CASE_PATH = re.compile(r"^api/case/(?P<case>[A-Za-z0-9_.-]+)$")


class ImageCache:
    """Each case's images as reading-copy NIfTI bytes, encoded in worker threads: a requested case and the case
    after it in the list (prefetched while the reader reads), the last three cases kept."""

    def __init__(self, session: ReadingSession, keep_cases: int = 3):
        self.session = session
        self.keep = keep_cases * len(SERIES)
        self._pool = ThreadPoolExecutor(max_workers=len(SERIES), thread_name_prefix="encode")
        self._jobs: OrderedDict[tuple[str, str], Future[bytes]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, case_id: str, series: str) -> bytes:
        job = self._submit(case_id, series)
        if series == "post":
            self.prefetch_after(case_id)
        return job.result()

    def prefetch(self, case_id: str) -> None:
        for series, name in SERIES.items():
            if name in self.session.case(case_id).images:
                self._submit(case_id, series)

    def prefetch_after(self, case_id: str) -> None:
        ids = [c.case_id for c in self.session.cases]
        following = ids[ids.index(case_id) + 1 :]
        if following:
            self.prefetch(following[0])

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _submit(self, case_id: str, series: str) -> Future[bytes]:
        with self._lock:
            job = self._jobs.get((case_id, series))
            if job is None:
                job = self._pool.submit(self._encode, case_id, series)
                self._jobs[(case_id, series)] = job
            self._jobs.move_to_end((case_id, series))
            while len(self._jobs) > self.keep:
                self._jobs.popitem(last=False)
        return job

    def _encode(self, case_id: str, series: str) -> bytes:
        key = {**SERIES, **REVIEW_SERIES}[series]
        path = self.session.case(case_id).images[key]
        return reading_nifti_bytes(load_reading_copy(path, seed=f"{case_id}/{key}"))


class ReadingServer(ThreadingHTTPServer):
    """An HTTP server for one :class:`ReadingSession`; ``url`` is the address to open in the browser."""

    daemon_threads = True

    def __init__(self, session: ReadingSession, host: str = "127.0.0.1", port: int = 8765):
        self.session = session
        self.token = secrets.token_urlsafe(18)
        self.viewer = viewer_path()
        self.lock = threading.Lock()  # one change of the session at a time
        self.images = ImageCache(session)
        super().__init__((host, port), ReadingHandler)
        unread = [c.case_id for c in session.cases if c.case_id not in session.read_case_ids()]
        if unread and not session.closed:
            self.images.prefetch(unread[0])

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/s/{self.token}/"

    def server_close(self) -> None:
        self.images.close()
        super().server_close()


class ReadingHandler(BaseHTTPRequestHandler):
    server: ReadingServer
    protocol_version = "HTTP/1.1"

    # ------------------------------------------------------------------------------------------ plumbing
    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def _send(
        self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (SECURITY_HEADERS | (headers or {})).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj: Any, status: int = HTTPStatus.OK) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _error(self, status: int, message: str, *, close: bool = False) -> None:
        """A JSON error answer; ``close``: the request's body was not read, so the connection cannot carry
        another request."""
        if close:
            self.close_connection = True
        self._json({"error": message}, status)

    def _route(self) -> str | None:
        """The path inside the session, or None (and a 403/404 sent) for anything else."""
        path = urlsplit(self.path).path
        prefix = f"/s/{self.server.token}"
        if path == prefix:
            self.send_response(HTTPStatus.MOVED_PERMANENTLY)
            self.send_header("Location", prefix + "/")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        if not path.startswith(prefix + "/"):
            self._error(HTTPStatus.FORBIDDEN, "not this session", close=self.command == "POST")
            return None
        return path[len(prefix) + 1 :]

    def _case_or_refuse(self, case_id: str) -> bool:
        if self.server.session.case(case_id) is None:
            self._error(HTTPStatus.FORBIDDEN, "not a case of this session")
            return False
        return True

    def _answer(self, method) -> None:
        """Run ``method``; a failure it did not answer itself becomes a 5xx with the reason (never a dropped
        connection), logged."""
        try:
            method()
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                log.error("cannot save: %s", exc)
                self._error(
                    HTTPStatus.INSUFFICIENT_STORAGE,
                    f"not saved: the disk is full ({exc.strerror}); free space and press Done again",
                    close=True,
                )
            elif isinstance(exc, (BrokenPipeError, ConnectionResetError)):
                log.debug("the browser closed the connection: %s", exc)
            else:
                log.exception("request %s %s failed", self.command, self.path)
                self._error(
                    HTTPStatus.INTERNAL_SERVER_ERROR,
                    f"not done: {exc.strerror or type(exc).__name__} (the server's terminal says more)",
                    close=True,
                )
        except (
            InputError
        ) as exc:  # a file of the lists that cannot be read: named in the log, not here
            log.error("request %s %s failed: %s", self.command, self.path, exc)
            self._error(
                HTTPStatus.INTERNAL_SERVER_ERROR,
                "not done: a file of the reading lists cannot be read (the server's terminal names it "
                "and says why)",
                close=True,
            )
        except Exception as exc:  # noqa: BLE001 - every request gets an answer, the log the traceback
            log.exception("request %s %s failed", self.command, self.path)
            self._error(
                HTTPStatus.INTERNAL_SERVER_ERROR,
                f"not done: {type(exc).__name__} (the server's terminal says more)",
                close=True,
            )

    # ---------------------------------------------------------------------------------------------- GET
    def do_GET(self) -> None:
        self._answer(self._get)

    def do_HEAD(self) -> None:
        self._answer(self._get)

    def _get(self) -> None:
        route = self._route()
        if route is None:
            return
        session = self.server.session
        if route in STATIC_FILES:
            name, content_type = STATIC_FILES[route]
            self._send(HTTPStatus.OK, (STATIC_DIR / name).read_bytes(), content_type)
        elif route == "niivue.js":
            self._send(HTTPStatus.OK, self.server.viewer.read_bytes(), "text/javascript")
        elif route == "api/session":
            self._json(session.summary())
        elif m := _CASE_PATH.match(route):
            if self._case_or_refuse(m["case"]):
                self._json({"case_id": m["case"], "record": session.record(m["case"])})
        elif m := _IMAGE_PATH.match(route):
            case_id, series = m["case"], m["series"]
            if not self._case_or_refuse(case_id):
                return
            case = session.case(case_id)
            served = {**SERIES, **REVIEW_SERIES} if session.review else SERIES
            if series not in served or served[series] not in case.images:
                self._error(HTTPStatus.NOT_FOUND, "no such image for this case")
                return
            self._send(
                HTTPStatus.OK, self.server.images.get(case_id, series), "application/octet-stream"
            )
        else:
            self._error(HTTPStatus.NOT_FOUND, "not found")

    # --------------------------------------------------------------------------------------------- POST
    def do_POST(self) -> None:
        self._answer(self._post)

    def _refuse_method(self) -> None:
        self.close_connection = True  # a body, if any, was not read
        self.send_response(HTTPStatus.METHOD_NOT_ALLOWED)
        self.send_header("Allow", "GET, HEAD, POST")
        body = json.dumps({"error": f"method {self.command} not allowed"}).encode()
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = _refuse_method

    def _body(self) -> Any:
        """The request's JSON body, or None with a 4xx sent."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self._error(HTTPStatus.LENGTH_REQUIRED, "send a Content-Length, not chunks", close=True)
            return None
        declared = self.headers.get("Content-Length")
        if declared is None or not declared.strip().isdigit():
            # A negative length once read the whole stream (and bypassed the cap); text, no answer at all.
            self._error(
                HTTPStatus.LENGTH_REQUIRED if declared is None else HTTPStatus.BAD_REQUEST,
                f"Content-Length must be a number of bytes, got {declared!r}",
                close=True,
            )
            return None
        length = int(declared)
        if length > MAX_BODY_BYTES:
            self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "request too large", close=True)
            return None
        raw = self.rfile.read(length)
        if len(raw) < length:
            self._error(
                HTTPStatus.BAD_REQUEST, "the request body is shorter than its length", close=True
            )
            return None
        if _nesting(raw) > MAX_JSON_DEPTH:
            self._error(HTTPStatus.BAD_REQUEST, f"the request nests deeper than {MAX_JSON_DEPTH}")
            return None
        try:
            return json.loads(raw or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            self._error(HTTPStatus.BAD_REQUEST, "the request is not JSON")
            return None

    def _post(self) -> None:
        route = self._route()
        if route is None:
            return
        body = self._body()
        if body is None:
            return
        session = self.server.session
        try:
            if m := _CASE_PATH.match(route):
                if not self._case_or_refuse(m["case"]):
                    return
                if not isinstance(body, dict):
                    raise InputError("the request must be a JSON object")
                with self.server.lock:
                    session.save_read(
                        m["case"],
                        body.get("lesions", []),
                        body.get("quality"),
                        body.get("elapsed_s"),
                    )
                self._json(session.summary())
            elif route == "api/close":
                with self.server.lock:
                    summary = session.close()
                log.info(
                    "session closed: %d of %d cases read; %s, %s",
                    summary["n_read"],
                    len(summary["cases"]),
                    session.lesions_path,
                    session.reads_path,
                )
                self._json(summary)
            else:
                self._error(HTTPStatus.NOT_FOUND, "not found")
        except InputError as exc:
            status = HTTPStatus.CONFLICT if session.closed else HTTPStatus.BAD_REQUEST
            self._error(status, exc.reason)


def _nesting(raw: bytes) -> int:
    """Deepest nesting of brackets in a JSON text, strings skipped (the parser recurses once per level)."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):  # ] }
            depth -= 1
    return deepest


def serve(session: ReadingSession, host: str = "127.0.0.1", port: int = 8765) -> ReadingServer:
    """A server for ``session`` bound to ``host:port`` (port 0: any free port); call ``serve_forever``."""
    return ReadingServer(session, host, port)


def static_files() -> list[Path]:
    """The page's own files (the viewer aside), e.g. to check them for blinding."""
    return [STATIC_DIR / name for name, _ in STATIC_FILES.values()]
