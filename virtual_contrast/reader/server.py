"""The reading tool's web server: one reader's session on 127.0.0.1, for a browser running the NiiVue page.

Everything is under ``/s/<token>/``, with a random token made when the server starts (only the person given the
URL reaches the session). A blinded session's page, URLs and responses carry case ids only: images are served as
``image/<case_id>/{post,t1,flair}.nii``, re-encoded in memory with a fresh NIfTI header (data and affine,
float32), so neither a file name, a header field nor the data type tells which image it is; they are sent
gzip-compressed (``Content-Encoding``), and the next case's images are encoded while the reader reads. Any case id that is
not one of the session's cases is refused (403), and so is a wrong token.

Routes (relative to ``/s/<token>/``)::

    GET  ""                           the page (static/index.html)
    GET  app.js, app.css, niivue.js   the page's script, style, the NiiVue viewer
    GET  api/session                  progress: case ids, read or not, closed, where the CSVs are
    GET  api/case/<case_id>           the saved read of a case (for review), or null
    GET  image/<case_id>/<series>.nii
    POST api/case/<case_id>           {"lesions": [{"long": line, "short": line}], "quality": 1-5, "elapsed_s": s}
    POST api/close                    close the session
"""

from __future__ import annotations

import gzip
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

import nibabel as nib
import numpy as np

from virtual_contrast.io import InputError, load_image
from virtual_contrast.reader.session import ReadingSession
from virtual_contrast.reader.viewer import STATIC_DIR, viewer_path

log = logging.getLogger(__name__)

SERIES = {"post": "post", "t1": "T1", "flair": "FLAIR"}  # URL name -> the session's image key
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
_IMAGE_PATH = re.compile(r"^image/(?P<case>[A-Za-z0-9_.-]+)/(?P<series>[a-z0-9]+)\.nii$")
_CASE_PATH = re.compile(r"^api/case/(?P<case>[A-Za-z0-9_.-]+)$")


class ImageCache:
    """Each case's images as fresh gzip-compressed NIfTI bytes, encoded in worker threads: a requested case and
    the case after it in the list (prefetched while the reader reads), the last three cases kept."""

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
        case = self.session.case(case_id)
        img = load_image(case.images[SERIES[series]])
        fresh = nib.Nifti1Image(np.asarray(img.dataobj, dtype=np.float32), img.affine)
        fresh.set_qform(img.affine, code=1)
        fresh.set_sform(img.affine, code=1)
        return gzip.compress(fresh.to_bytes(), compresslevel=1, mtime=0)


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
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj: Any, status: int = HTTPStatus.OK) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _error(self, status: int, message: str) -> None:
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
            self._error(HTTPStatus.FORBIDDEN, "not this session")
            return None
        return path[len(prefix) + 1 :]

    def _case_or_refuse(self, case_id: str) -> bool:
        if self.server.session.case(case_id) is None:
            self._error(HTTPStatus.FORBIDDEN, "not a case of this session")
            return False
        return True

    # ---------------------------------------------------------------------------------------------- GET
    def do_GET(self) -> None:
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
            if series not in SERIES or SERIES[series] not in case.images:
                self._error(HTTPStatus.NOT_FOUND, "no such image for this case")
                return
            # gzip as the transfer encoding: the browser inflates it natively, NiiVue gets the .nii
            self._send(
                HTTPStatus.OK,
                self.server.images.get(case_id, series),
                "application/octet-stream",
                {"Content-Encoding": "gzip"},
            )
        else:
            self._error(HTTPStatus.NOT_FOUND, "not found")

    do_HEAD = do_GET

    # --------------------------------------------------------------------------------------------- POST
    def do_POST(self) -> None:
        route = self._route()
        if route is None:
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "request too large")
            return
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError):
            self._error(HTTPStatus.BAD_REQUEST, "the request is not JSON")
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
                    summary["lesions_csv"],
                    summary["reads_csv"],
                )
                self._json(summary)
            else:
                self._error(HTTPStatus.NOT_FOUND, "not found")
        except InputError as exc:
            self._error(HTTPStatus.CONFLICT if session.closed else HTTPStatus.BAD_REQUEST, str(exc))


def serve(session: ReadingSession, host: str = "127.0.0.1", port: int = 8765) -> ReadingServer:
    """A server for ``session`` bound to ``host:port`` (port 0: any free port); call ``serve_forever``."""
    return ReadingServer(session, host, port)


def static_files() -> list[Path]:
    """The page's own files (the viewer aside), e.g. to check them for blinding."""
    return [STATIC_DIR / name for name, _ in STATIC_FILES.values()]
