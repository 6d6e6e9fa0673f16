"""The NiiVue viewer (``@niivue/niivue`` from the npm registry) that the reading tool serves to the browser.

The built file (``dist/niivue.umd.js``, 2.3 MB, BSD-2-Clause) is too large to keep in the repository, so it is
installed into the package's ``static/vendor/`` folder by ``make viewer`` (``python -m
virtual_contrast.reader.viewer``), which runs ``npm pack`` for the pinned version and checks the file's SHA-256.
The reading server then serves it from disk: the browser needs no network.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from virtual_contrast.io import InputError, atomic_path

log = logging.getLogger(__name__)

NIIVUE_VERSION = "0.69.0"
NIIVUE_FILE = "package/dist/niivue.umd.js"
NIIVUE_SHA256 = "47b896b77ec4a5be3ef1949c33ad393b6f45629921f326c279000bcf51bdb4af"
STATIC_DIR = Path(__file__).resolve().parent / "static"
VIEWER_PATH = STATIC_DIR / "vendor" / "niivue.umd.js"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def viewer_path() -> Path:
    """The installed NiiVue file; :class:`InputError` says how to install it when it is missing or altered."""
    if not VIEWER_PATH.exists():
        raise InputError(
            f"the NiiVue viewer is not installed: run `make viewer` (needs npm; fetches @niivue/niivue@"
            f"{NIIVUE_VERSION} from the npm registry once)",
            path=VIEWER_PATH,
        )
    if sha256(VIEWER_PATH) != NIIVUE_SHA256:
        raise InputError(
            f"is not @niivue/niivue@{NIIVUE_VERSION}'s niivue.umd.js (SHA-256 differs): delete it and run "
            "`make viewer`",
            path=VIEWER_PATH,
        )
    return VIEWER_PATH


def install_viewer(dest: Path = VIEWER_PATH) -> Path:
    """Fetch ``@niivue/niivue`` with ``npm pack``, check the viewer file's SHA-256, write it to ``dest``."""
    npm = shutil.which("npm")
    if npm is None:
        raise InputError(
            "npm is not on the PATH: install Node.js (20 or later) to fetch the viewer"
        )
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(
            [npm, "pack", "--silent", f"@niivue/niivue@{NIIVUE_VERSION}"],
            cwd=tmp,
            capture_output=True,
            text=True,
        )
        tarballs = list(Path(tmp).glob("niivue-niivue-*.tgz"))
        if proc.returncode != 0 or len(tarballs) != 1:
            raise InputError(
                f"npm pack @niivue/niivue@{NIIVUE_VERSION} failed: {proc.stderr.strip()[-500:]}"
            )
        with tarfile.open(tarballs[0]) as archive:
            member = archive.extractfile(NIIVUE_FILE)
            if member is None:
                raise InputError(f"{NIIVUE_FILE} is not in the package", path=tarballs[0])
            data = member.read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != NIIVUE_SHA256:
        raise InputError(
            f"{NIIVUE_FILE} of @niivue/niivue@{NIIVUE_VERSION} has SHA-256 {digest}, expected {NIIVUE_SHA256}"
        )
    with atomic_path(dest) as tmp_path:
        tmp_path.write_bytes(data)
        tmp_path.chmod(0o644)  # a static file for whoever runs the server
    log.info("installed NiiVue %s (%d bytes) at %s", NIIVUE_VERSION, len(data), dest)
    return dest


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        print(install_viewer())
    except InputError as exc:
        print(f"viewer: error: {exc}", file=sys.stderr)
        sys.exit(2)
