"""One reader's reading session: the cases of one reader and phase of the blinded reading lists, what has been
read, and the lesions and reads tables that :mod:`virtual_contrast.reader.stats` consumes.

The session un-blinds each case with the reading key on the server side only; what it hands to the browser is
the case id. Each finished case is saved in three steps, each an atomic rename, so that a crash loses at most the
case in progress:

1. ``OUT/sessions/<reader>_phase-<k>/<case_id>.json``: the lines as drawn (world mm end points and the view they
   were drawn in), the quality grade and the reading time; this is what a review of the case shows again;
2. the case's rows of ``OUT/lesions.csv`` (:data:`~virtual_contrast.annotations.LESION_COLUMNS`) are replaced;
3. its row of ``OUT/reads.csv`` (:data:`~virtual_contrast.annotations.READ_COLUMNS`) is replaced.

A read's rows are those with its (patient, reader, modality), which the protocol makes unique. Opening a session
rewrites the rows of every saved case from step 1, which repairs a crash between the steps. Several sessions
(readers, phases) share the two CSV files; each rewrite holds an exclusive lock on ``OUT/.readings.lock``. Every
file is flushed to the disk before its rename (:func:`virtual_contrast.io.atomic_path`), so a power cut leaves
the previous version or the new one; a record that is damaged all the same (empty, not JSON) is named in a
warning and treated as unread, and the case can be read again.

The first opening of a session records its case ids and the SHA-256 of every image of its cases
(``session.json``); a later opening refuses to go on when they differ (reading lists written again after a
retraining, under the same case ids), unless told to (``allow_changed_images``, ``read --allow-changed-images``),
which records the new images.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from virtual_contrast.annotations import LESION_COLUMNS, READ_COLUMNS
from virtual_contrast.io import InputError, atomic_path, path_inside, write_json
from virtual_contrast.reader.protocol import (
    CASE_IMAGE,
    COMPANION_IMAGES,
    case_folder,
    check_reader_name,
    load_key,
)
from virtual_contrast.reader.slicer import LineMarkup, lines_to_lesions

log = logging.getLogger(__name__)

LESIONS_FILE = "lesions.csv"
READS_FILE = "reads.csv"
SESSIONS_FOLDER = "sessions"
#: The image key of vir-T1c's uncertainty map, which only a review session's vir-T1c cases hold.
REVIEW_IMAGE = "uncertainty"
QUALITY_GRADES = (1, 2, 3, 4, 5)
MAX_READING_TIME_S = 24 * 3600.0
#: The longest line a reader can draw on a head (its diagonal is under 300 mm), and the farthest a line's end may
#: lie from the scanner's origin: beyond them a line is a mistake (a line at 1e308 mm was saved as an infinite
#: long axis that reader-stats then refused).
MAX_LINE_MM = 400.0
MAX_COORDINATE_MM = 2000.0
#: At most this many lesions in one read (the paper excludes exams with clearly more than 20).
MAX_LESIONS = 200


@dataclass(frozen=True)
class Case:
    """One case of the session: its pseudonym, its place in the list and, kept on the server, what it is."""

    case_id: str
    order: int
    patient: str
    modality: str
    images: dict[str, Path]  # "post" (the image read), "T1", "FLAIR" -> file in the reading lists


class ReadingSession:
    """The cases of ``reader`` in ``phase`` of the reading lists ``lists_dir`` (un-blinded with ``key_path``);
    results go to ``out_dir``. ``phase=None`` picks the reader's first phase that is not closed."""

    def __init__(
        self,
        lists_dir: Path | str,
        key_path: Path | str,
        reader: str,
        out_dir: Path | str,
        phase: int | None = None,
        *,
        allow_changed_images: bool = False,
        review_maps: Mapping[str, Path] | None = None,
    ):
        self.lists_dir = Path(lists_dir)
        self.out_dir = Path(out_dir)
        self.reader = check_reader_name(str(reader))
        self._damaged: set[Path] = set()  # damaged records already named in a warning
        if not self.lists_dir.is_dir():
            raise InputError("reading lists folder not found", path=self.lists_dir)
        key = load_key(key_path)
        mine = key[key["reader"] == self.reader]
        if mine.empty:
            readers = ", ".join(sorted(key["reader"].unique()))
            raise InputError(
                f"reader {reader!r} is not in the key (readers: {readers})", path=key_path
            )
        phases = sorted(int(p) for p in mine["phase"].unique())
        if phase is None:
            phase = next((p for p in phases if not self._closed_marker(p).exists()), phases[-1])
        if phase not in phases:
            raise InputError(
                f"reader {reader!r} has no phase {phase} (phases: {', '.join(map(str, phases))})",
                path=key_path,
            )
        self.phase = int(phase)
        self.state_dir = path_inside(
            self.out_dir, SESSIONS_FOLDER, f"{self.reader}_phase-{self.phase}"
        )
        self.cases = _cases(mine[mine["phase"] == self.phase], self.lists_dir)
        self._by_id = {case.case_id: case for case in self.cases}
        # The reference reader's ref-T1c phase is read knowingly; every other phase is blinded.
        self.blinded = any(case.modality != "ref" for case in self.cases)
        self._check_same_cases(allow_changed_images)
        self.repair_tables()
        self.review = review_maps is not None
        if self.review:
            self._open_review(review_maps)

    def _open_review(self, maps: Mapping[str, Path]) -> None:
        """A non-blinded review of a finished phase: each vir-T1c case also shows vir-T1c's uncertainty map
        (``maps``: patient -> atlas-space map, the grid of the reading lists' images). Never in a study phase:
        only once the reader has closed it (a closed phase records no more reads, and what the map reveals,
        which cases are vir-T1c, can no longer change them)."""
        if not self.closed:
            raise InputError(
                f"reader {self.reader!r} has not closed phase {self.phase}: a review (with vir-T1c's "
                "uncertainty map) opens on a closed phase only, never during the blinded reading"
            )
        for index, case in enumerate(self.cases):
            path = maps.get(case.patient)
            if case.modality != "vir" or path is None:
                continue
            if not Path(path).exists():
                raise InputError(f"case {case.case_id}: uncertainty map not found", path=path)
            self.cases[index] = replace(case, images={**case.images, REVIEW_IMAGE: Path(path)})
        self._by_id = {case.case_id: case for case in self.cases}

    # ---------------------------------------------------------------------------------------------- state
    @property
    def lesions_path(self) -> Path:
        return self.out_dir / LESIONS_FILE

    @property
    def reads_path(self) -> Path:
        return self.out_dir / READS_FILE

    def _closed_marker(self, phase: int) -> Path:
        return path_inside(self.out_dir, SESSIONS_FOLDER, f"{self.reader}_phase-{phase}") / (
            "closed.json"
        )

    @property
    def closed(self) -> bool:
        return self._closed_marker(self.phase).exists()

    def case(self, case_id: str) -> Case | None:
        return self._by_id.get(case_id)

    def record(self, case_id: str) -> dict[str, Any] | None:
        """The saved read of a case (lesions as drawn, quality, reading time), or None if unread. A damaged
        record (what a power cut can leave) is named in a warning and counts as unread."""
        path = self.state_dir / f"{case_id}.json"
        if case_id not in self._by_id or not path.exists():
            return None
        try:
            record = json.loads(path.read_text())
            _check_record(record)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, InputError, KeyError) as exc:
            if path in self._damaged:
                return None
            self._damaged.add(path)
            log.warning(
                "%s: the saved read of case %s is damaged (%s) and is skipped: the case counts as "
                "unread, and reading it again replaces the file",
                path,
                case_id,
                exc,
            )
            return None
        return record

    def read_case_ids(self) -> list[str]:
        return [c.case_id for c in self.cases if self.record(c.case_id) is not None]

    def summary(self) -> dict[str, Any]:
        """What the page may know: pseudonyms and progress (no path of this machine: see the server)."""
        done = set(self.read_case_ids())
        return {
            "reader": self.reader,
            "phase": self.phase,
            "blinded": self.blinded,
            # Only the reference reading says what the image is.
            "post_label": "Post-contrast T1"
            if self.blinded
            else "Full-dose post-contrast T1 (reference reading)",
            "closed": self.closed,
            "review": self.review,
            "cases": [
                {"case_id": c.case_id, "order": c.order, "read": c.case_id in done}
                for c in self.cases
            ],
            "n_read": len(done),
        }

    def image_hashes(self) -> dict[str, dict[str, str]]:
        """SHA-256 of every image of every case: case id -> series -> hex digest."""
        return {
            c.case_id: {series: _sha256(path) for series, path in sorted(c.images.items())}
            for c in self.cases
        }

    def _check_same_cases(self, allow_changed_images: bool) -> None:
        """A session folder belongs to one set of case ids and images: new reading lists must not mix with old
        reads (see the module docstring)."""
        path = self.state_dir / "session.json"
        ids = [c.case_id for c in self.cases]
        hashes = self.image_hashes()
        saved = None
        if path.exists():
            try:
                saved = json.loads(path.read_text())
                if not isinstance(saved, dict):
                    raise ValueError("not a JSON object")
            except (OSError, UnicodeDecodeError, ValueError) as exc:
                log.warning(
                    "%s is damaged (%s): written again from the reading lists as they are now",
                    path,
                    exc,
                )
                saved = None
        if saved is not None and saved.get("case_ids") != ids:
            raise InputError(
                f"the reading lists of reader {self.reader!r}, phase {self.phase} have changed since this "
                "session started (other case ids): move the session folder away to start afresh",
                path=self.state_dir,
            )
        if saved is not None and saved.get("image_sha256") != hashes:
            old = saved.get("image_sha256") or {}
            changed = sorted(
                f"{cid} {series}"
                for cid, series_hashes in hashes.items()
                for series, digest in series_hashes.items()
                if old.get(cid, {}).get(series) != digest
            ) or sorted(old)
            what = ", ".join(changed[:5]) + (
                f" and {len(changed) - 5} more" if len(changed) > 5 else ""
            )
            if not allow_changed_images:
                raise InputError(
                    f"the images of reader {self.reader!r}, phase {self.phase} have changed since this "
                    f"session started ({what}): its reads were made on other images (reading lists written "
                    "again?); move the session folder away to start afresh, or pass "
                    "--allow-changed-images to go on with the new images knowingly",
                    path=self.state_dir,
                )
            log.warning(
                "reader %s, phase %d: images changed since the session started (%s); going on as told "
                "(--allow-changed-images), the new images are recorded",
                self.reader,
                self.phase,
                what,
            )
        if saved is None or saved.get("image_sha256") != hashes:
            write_json(
                {
                    "reader": self.reader,
                    "phase": self.phase,
                    "case_ids": ids,
                    "image_sha256": hashes,
                },
                path,
            )

    # -------------------------------------------------------------------------------------------- writing
    def save_read(
        self, case_id: str, lesions: Sequence[dict[str, Any]], quality: int, elapsed_s: float
    ) -> dict[str, Any]:
        """Save one finished (or corrected) case; the reading time adds up over reviews of the case."""
        if self.closed:
            raise InputError(f"session of reader {self.reader!r}, phase {self.phase} is closed")
        if case_id not in self._by_id:
            raise InputError(f"{case_id!r} is not a case of this session")
        if not isinstance(lesions, list) or len(lesions) > MAX_LESIONS:
            raise InputError(f"lesions must be a list of at most {MAX_LESIONS} lesions")
        clean = [_clean_lesion(lesion, k) for k, lesion in enumerate(lesions, start=1)]
        if quality not in QUALITY_GRADES or isinstance(quality, bool):
            raise InputError(f"quality must be a grade 1-5, got {quality!r}")
        if not _finite_number(elapsed_s) or not 0 <= elapsed_s <= MAX_READING_TIME_S:
            raise InputError(
                f"reading time must be 0-{MAX_READING_TIME_S:.0f} s, got {elapsed_s!r}"
            )
        previous = self.record(case_id)
        total = float(elapsed_s) + (previous["reading_time_s"] if previous else 0.0)
        record = {
            "case_id": case_id,
            "lesions": clean,
            "quality": int(quality),
            "reading_time_s": round(total, 1),
            "saved_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        write_json(record, self.state_dir / f"{case_id}.json")
        self._write_rows([self._by_id[case_id]])
        log.info(
            "%s phase %d: %s saved (%d lesions, quality %d, %.1f s)",
            self.reader,
            self.phase,
            case_id,
            len(clean),
            quality,
            total,
        )
        return record

    def close(self) -> dict[str, Any]:
        """Close the session: no further changes; returns the summary."""
        if not self.closed:
            write_json(
                {
                    "closed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "n_read": len(self.read_case_ids()),
                },
                self._closed_marker(self.phase),
            )
        return self.summary()

    def repair_tables(self) -> None:
        """Rewrite the CSV rows of every saved case from the session folder (after a crash between steps)."""
        saved = [self._by_id[cid] for cid in self.read_case_ids()]
        if saved:
            self._write_rows(saved)

    def _write_rows(self, cases: Sequence[Case]) -> None:
        lesion_rows, read_rows = [], []
        for case in cases:
            record = self.record(case.case_id)
            if record is None:  # damaged since it was listed: named by record(), left out
                continue
            ident = {"patient": case.patient, "reader": self.reader, "modality": case.modality}
            for row in lesion_rows_of(record["lesions"]):
                lesion_rows.append(ident | row)
            read_rows.append(
                ident
                | {
                    "quality": str(record["quality"]),
                    "reading_time_s": f"{record['reading_time_s']:.1f}",
                }
            )
        keys = {(c.patient, self.reader, c.modality) for c in cases}
        with _exclusive(self.out_dir / ".readings.lock"):
            replace_rows(self.lesions_path, LESION_COLUMNS, keys, lesion_rows)
            replace_rows(self.reads_path, READ_COLUMNS, keys, read_rows)


# ------------------------------------------------------------------------------------------------ helpers
def _cases(rows: pd.DataFrame, lists_dir: Path) -> list[Case]:
    cases = []
    for row in rows.sort_values("order").itertuples(index=False):
        folder = case_folder(lists_dir, row.reader, row.phase)
        post = folder / CASE_IMAGE.format(case_id=row.case_id)
        if not post.exists():
            raise InputError(f"case {row.case_id}: the image to read is missing", path=post)
        images = {"post": post}
        for series, name in COMPANION_IMAGES.items():
            path = folder / name.format(case_id=row.case_id)
            if path.exists():
                images[series] = path
            else:
                log.warning("case %s: no %s in the reading lists (%s)", row.case_id, series, path)
        cases.append(
            Case(str(row.case_id), int(row.order), str(row.patient), str(row.modality), images)
        )
    return cases


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _point(value: Any, what: str) -> list[float]:
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 3
        or not all(map(_finite_number, value))
    ):
        raise InputError(f"{what} must be 3 finite numbers (world mm), got {value!r}")
    if max(abs(float(v)) for v in value) > MAX_COORDINATE_MM:
        raise InputError(
            f"{what} lies farther than {MAX_COORDINATE_MM:g} mm from the origin: {value!r}"
        )
    return [float(v) for v in value]


def _check_record(record: Any) -> None:
    """A saved read as :meth:`ReadingSession.save_read` writes it, or an :class:`InputError` saying why not."""
    if not isinstance(record, dict) or not {"lesions", "quality", "reading_time_s"} <= set(record):
        raise InputError("not a saved read (lesions, quality, reading_time_s)")
    if not isinstance(record["lesions"], list) or record["quality"] not in QUALITY_GRADES:
        raise InputError("not a saved read (lesions, quality)")
    if not _finite_number(record["reading_time_s"]):
        raise InputError("not a saved read (reading_time_s)")
    for k, lesion in enumerate(record["lesions"], start=1):
        _clean_lesion(lesion, k)


def _clean_lesion(lesion: Any, k: int) -> dict[str, Any]:
    """One lesion as sent by the page: ``{"long": line, "short": line}``, a line ``{"start_mm", "end_mm",
    "view"}`` (``view``: the viewer's own slice description, kept to redraw the line on review)."""
    if not isinstance(lesion, dict) or set(lesion) != {"long", "short"}:
        raise InputError(f"lesion {k} must have exactly a long and a short axis line")
    clean = {}
    for axis in ("long", "short"):
        line = lesion[axis]
        if not isinstance(line, dict):
            raise InputError(f"lesion {k}, {axis} axis: not a line")
        start = _point(line.get("start_mm"), f"lesion {k}, {axis} axis start")
        end = _point(line.get("end_mm"), f"lesion {k}, {axis} axis end")
        length = float(np.linalg.norm(np.subtract(end, start)))
        if length <= 0:
            raise InputError(f"lesion {k}, {axis} axis has zero length")
        if length > MAX_LINE_MM:
            raise InputError(
                f"lesion {k}, {axis} axis is {length:.4g} mm long, longer than any line on a head "
                f"({MAX_LINE_MM:g} mm)"
            )
        view = line.get("view", {})
        if not isinstance(view, dict) or not all(map(_finite_number, view.values())):
            raise InputError(f"lesion {k}, {axis} axis: view must map names to numbers")
        clean[axis] = {"start_mm": start, "end_mm": end, "view": view}
    return clean


def lesion_rows_of(lesions: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """Lesions table columns (centre, long and short axis, world mm) of saved lesions, as CSV strings.

    The centre and axes follow the 3D Slicer path: the longer line is the long axis, the centre is the mean of
    the two lines' midpoints (:func:`virtual_contrast.reader.slicer.lines_to_lesions`).
    """
    lines = [
        LineMarkup(
            name=f"lesion-{k:03d}-{axis}",
            start=np.asarray(lesion[axis]["start_mm"], float),
            end=np.asarray(lesion[axis]["end_mm"], float),
        )
        for k, lesion in enumerate(lesions, start=1)
        for axis in ("long", "short")
    ]
    table = lines_to_lesions(lines)
    return [{col: f"{value:.2f}" for col, value in row.items()} for row in table.to_dict("records")]


def replace_rows(
    path: Path,
    columns: Sequence[str],
    keys: set[tuple[str, str, str]],
    rows: Sequence[dict[str, str]],
) -> None:
    """Rewrite the CSV ``path`` atomically: drop the rows whose (patient, reader, modality) is in ``keys``,
    append ``rows``; other rows are kept as they were, text unchanged."""
    if path.exists():
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
        missing = [c for c in columns if c not in table.columns]
        if missing:
            raise InputError(f"lacks column(s) {', '.join(missing)}", path=path)
        ident = list(zip(table["patient"], table["reader"], table["modality"], strict=True))
        table = table[[k not in keys for k in ident]]
    else:
        table = pd.DataFrame(columns=list(columns))
    table = pd.concat([table, pd.DataFrame(list(rows), columns=list(columns))], ignore_index=True)
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def session_lock(session: ReadingSession) -> Iterator[None]:
    """Hold the session for this process: a second server on the same reader and phase is refused."""
    path = session.state_dir / "server.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise InputError(
                f"the session of reader {session.reader!r}, phase {session.phase} is already open in "
                "another process",
                path=session.state_dir,
            ) from exc
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
