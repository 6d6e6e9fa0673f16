"""Image I/O with validation and atomic writes.

Every reader names the subject and the file in its error, so that a bad input in a cohort of hundreds is found
at once; every writer writes to a temporary file in the destination folder and renames it, so that an
interrupted job never leaves a half-written output that looks complete; the file is flushed to the disk (fsync)
before the rename and the rename after it, so that a power cut leaves the old file or the new one, never an
empty file under the final name (what the page cache alone can leave). Outputs get the mode the user's umask
gives any new file (0644 under the usual umask 022). A command with several outputs writes them in a
:func:`staged_folder` and moves them into place at the end; :func:`path_inside` keeps names built from data
(subject ids, reader names) inside the output folder.

A writer killed with ``kill -9`` (or by a power cut) cannot remove its temporary file: each temporary name
carries the host and process id of its writer (``.<name>.<host>-<pid>.<random><suffix>``), and the next
writer of the same output removes those of this machine whose process is gone
(:func:`remove_stale_temporaries`), so running the same command again leaves none behind.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import json
import os
import re
import secrets
import shutil
import socket
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np


class InputError(ValueError):
    """A problem with a user-provided input, naming the subject and the file."""

    def __init__(self, message: str, *, subject: str | None = None, path: Path | str | None = None):
        self.reason = message  # what is wrong, without the subject and file
        self.subject = subject
        self.path = None if path is None else Path(path)
        where = []
        if subject is not None:
            where.append(f"subject {subject!r}")
        if path is not None:
            where.append(f"file {str(path)!r}")
        prefix = ", ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message)


def load_image(
    path: Path | str,
    *,
    subject: str | None = None,
    ndim: int | None = 3,
    allow_nan: bool = False,
) -> nib.Nifti1Image:
    """Load a NIfTI (or MINC) image, fully decoding its data, and check it.

    Raises :class:`InputError` for a missing file, a file that cannot be decoded (truncated gzip or header),
    the wrong number of dimensions, or non-finite voxels. The data are read eagerly so that truncation is
    detected here and not in the middle of a computation.
    """
    path = Path(path)
    if not path.exists():
        raise InputError("file not found", subject=subject, path=path)
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except (
        OSError,
        EOFError,
        ValueError,
        zlib.error,
        gzip.BadGzipFile,
        nib.filebasedimages.ImageFileError,
    ) as exc:
        raise InputError(
            f"cannot be read as an image (truncated or corrupt?): {exc}", subject=subject, path=path
        ) from exc
    # Drop trailing singleton dimensions (some converters write X×Y×Z×1).
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if ndim is not None and data.ndim != ndim:
        raise InputError(
            f"expected a {ndim}D image, got {data.ndim}D with shape {tuple(data.shape)}",
            subject=subject,
            path=path,
        )
    data = np.asarray(data, dtype=np.float32)
    if not allow_nan:
        bad = ~np.isfinite(data)
        if bad.any():
            raise InputError(
                f"{int(bad.sum())} voxels are NaN or infinite", subject=subject, path=path
            )
    affine = img.affine
    if (
        affine is None
        or not np.all(np.isfinite(affine))
        or abs(np.linalg.det(affine[:3, :3])) < 1e-9
    ):
        raise InputError("has no valid voxel-to-world affine", subject=subject, path=path)
    return nib.Nifti1Image(data, affine)


def load_array(path: Path | str, **kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
    """Load an image as (float32 data, 4×4 affine); see :func:`load_image`."""
    img = load_image(path, **kwargs)
    return np.asanyarray(img.dataobj, dtype=np.float32), img.affine


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The temporary file is created with mode 0666 filtered by the process umask (as ``open()`` would), not
    ``tempfile.mkstemp``'s 0600, so that the renamed output is as readable as any other file the user writes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Keep the full suffix (.nii.gz) so that writers that dispatch on it still work.
    suffix = "".join(path.suffixes)
    tmp_path = scratch_name(path.parent, f".{path.name.split('.')[0]}", suffix)
    try:
        yield tmp_path
        _fsync(tmp_path)
        os.replace(tmp_path, path)
        _fsync(path.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:24] or "host"


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (a process of another user counts; a zombie, which has
    ended but has not been collected by its parent, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
        return state != "Z"
    except OSError:
        if Path("/proc/self/stat").exists():
            return False  # Linux, and no such process
    except IndexError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(folder: Path | str, base: str, suffix: str = "") -> list[Path]:
    """Remove the temporary files and folders named ``<base>.<host>-<pid>.<random><suffix>`` in ``folder``
    that a writer on this machine left when it was killed (its process is gone); return them."""
    folder = Path(folder)
    pattern = re.compile(
        rf"{re.escape(base)}\.(?P<host>[A-Za-z0-9]+)-(?P<pid>\d+)\.[0-9a-f]{{8}}{re.escape(suffix)}"
    )
    removed = []
    for candidate in folder.glob(f"{glob.escape(base)}.*{glob.escape(suffix)}"):
        match = pattern.fullmatch(candidate.name)
        if not match or match["host"] != _host_tag() or process_alive(int(match["pid"])):
            continue
        if candidate.is_dir() and not candidate.is_symlink():
            shutil.rmtree(candidate, ignore_errors=True)
        else:
            candidate.unlink(missing_ok=True)
        removed.append(candidate)
    return removed


def scratch_name(folder: Path, base: str, suffix: str = "", *, directory: bool = False) -> Path:
    """A new empty file (or folder) ``<base>.<host>-<pid>.<random><suffix>`` in ``folder``, after removing
    those that killed writers left there (:func:`remove_stale_temporaries`)."""
    remove_stale_temporaries(folder, base, suffix)
    return _create_unique(
        folder, f"{base}.{_host_tag()}-{os.getpid()}.", suffix, directory=directory
    )


@contextlib.contextmanager
def scratch_folder(folder: Path | str, base: str) -> Iterator[Path]:
    """A new hidden folder in ``folder`` (see :func:`scratch_name`), removed with its content at the end."""
    path = scratch_name(Path(folder), base, directory=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _fsync(path: Path) -> None:
    """Flush a file's (or a folder's: its entries) data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _create_unique(folder: Path, prefix: str, suffix: str, *, directory: bool = False) -> Path:
    """Create an empty file (or folder) with a new random name in ``folder``; the umask applies to its mode."""
    for _ in range(100):
        candidate = folder / f"{prefix}{secrets.token_hex(4)}{suffix}"  # 8 hex digits
        try:
            if directory:
                candidate.mkdir(mode=0o777)
            else:
                os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"no free temporary name in {folder}")


@contextlib.contextmanager
def staged_folder(out_dir: Path | str) -> Iterator[Path]:
    """Yield an empty hidden folder inside ``out_dir`` to write a command's outputs into.

    When the block succeeds, every file and folder written there is moved into ``out_dir`` (replacing files
    of the same name); when it fails, or is interrupted, the staging folder is deleted, and so is ``out_dir``
    if this call created it and it is still empty. Partial results of a failed command therefore never sit
    beside complete ones. The moves are renames on one file system: the set of outputs appears almost at
    once, each file atomically.
    """
    out_dir = Path(out_dir)
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    stage = scratch_name(out_dir, ".staging", directory=True)
    try:
        yield stage
        _merge_folder(stage, out_dir)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if created and out_dir.exists() and not any(out_dir.iterdir()):
            out_dir.rmdir()


def _merge_folder(src: Path, dst: Path) -> None:
    for item in sorted(src.iterdir()):
        target = dst / item.name
        if item.is_dir() and target.is_dir():
            _merge_folder(item, target)
        else:
            os.replace(item, target)


def path_inside(folder: Path | str, *names: str) -> Path:
    """``folder / name / ...``, where each name must be one plain file or folder name.

    For output names built from data (subject ids, reader names, patient ids): a name with a path separator,
    ``..``, ``.``, or nothing in it could put a file somewhere else than in ``folder``, so it is refused with
    an :class:`InputError`. The check is on the text (no symlink is followed), so an output folder that is a
    symlink is fine.
    """
    for name in map(str, names):
        if name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name:
            raise InputError(
                f"output name {name!r} would be written outside the output folder (it must be one "
                "file or folder name, without '/' or '..')",
                path=folder,
            )
    return Path(folder).joinpath(*names)


def save_image(
    data: np.ndarray, affine: np.ndarray, path: Path | str, *, dtype: Any = np.float32
) -> Path:
    """Write ``data`` with ``affine`` as NIfTI, atomically. Returns ``path``."""
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return Path(path)


def write_text(text: str, path: Path | str) -> Path:
    """Write text atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(obj: Any, path: Path | str) -> Path:
    """Write JSON (indented, sorted keys) atomically."""
    return write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n", path)


def write_table(df: Any, path: Path | str) -> Path:
    """Write a pandas DataFrame as TSV atomically (no index)."""
    with atomic_path(path) as tmp:
        df.to_csv(tmp, sep="\t", index=False)
    return Path(path)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
