"""3D Slicer line markups (``.mrk.json``) to and from the reader study's lesions table.

A reader marks each enhancing lesion with two Slicer line markups: its long axis and the perpendicular short
axis (RANO). This module reads the markups of one read, pairs the lines lesion by lesion and returns rows of the
lesions table (world RAS mm):

- pairing: lines named ``<lesion>-long`` / ``<lesion>-short`` (any of ``-``, ``_``, space before ``long`` /
  ``short``, case-insensitive; the files :func:`lesions_to_markups` writes) pair by name. Otherwise (Slicer's
  default names ``L``, ``L_1`` ...) lines pair by geometry: repeatedly the two lines whose midpoints are closest,
  provided that distance is below half the longer line (the short axis crosses the long one);
- long axis: the longer line's length; short axis: the shorter's;
- centre: the mean of the two lines' midpoints (the crossing point for a RANO cross).

Slicer writes control points in LPS by default (``coordinateSystem``); they are converted to RAS (x and y
negated). Units ``mm`` or ``um``. Markups of other types than ``Line`` are refused with a clear error.

For the blinded study, the readers save markups of case ``<case_id>`` into ``ANNOTATIONS/<case_id>/``;
:func:`import_annotations` un-blinds them with the key written by :mod:`virtual_contrast.reader.protocol`.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from virtual_contrast.io import InputError, path_inside, write_text

log = logging.getLogger(__name__)

SCHEMA = (
    "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/Schema/"
    "markups-schema-v1.0.3.json#"
)
_AXIS_NAME = re.compile(r"^(?P<lesion>.*?)[-_ ]*(?P<axis>long|short)$", re.IGNORECASE)
LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class LineMarkup:
    """One Slicer line: its name, two end points in RAS mm, and the file it came from."""

    name: str
    start: np.ndarray
    end: np.ndarray
    source: str = ""

    @property
    def length(self) -> float:
        return float(np.linalg.norm(self.end - self.start))

    @property
    def midpoint(self) -> np.ndarray:
        return (self.start + self.end) / 2


def read_markups(path: Path | str) -> list[LineMarkup]:
    """The line markups of one ``.mrk.json`` file, in RAS mm."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise InputError("markups file not found", path=path) from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"not a valid JSON markups file: {exc}", path=path) from exc
    markups = doc.get("markups") if isinstance(doc, dict) else None
    if not isinstance(markups, list):
        raise InputError("no 'markups' list: not a 3D Slicer .mrk.json file", path=path)
    lines = []
    for i, markup in enumerate(markups):
        kind = markup.get("type")
        name = str(
            markup.get("name")
            or f"{path.name.split('.')[0]}" + (f"-{i}" if len(markups) > 1 else "")
        )
        if kind != "Line":
            raise InputError(
                f"markup {name!r} is a {kind!r}, not a 'Line'; mark each lesion's long and short axes with lines",
                path=path,
            )
        system = markup.get("coordinateSystem", "LPS")
        if system not in ("LPS", "RAS"):
            raise InputError(f"markup {name!r}: unknown coordinateSystem {system!r}", path=path)
        units = markup.get("coordinateUnits", "mm")
        if isinstance(units, list):
            units = units[0] if units else "mm"
        scale = {"mm": 1.0, "um": 1e-3}.get(units)
        if scale is None:
            raise InputError(f"markup {name!r}: unsupported coordinateUnits {units!r}", path=path)
        points = [
            p
            for p in markup.get("controlPoints", [])
            if p.get("positionStatus", "defined") == "defined" and "position" in p
        ]
        if len(points) != 2:
            raise InputError(
                f"line {name!r} has {len(points)} placed control points, expected 2", path=path
            )
        try:
            ends = [np.asarray(p["position"], dtype=float) * scale for p in points]
        except (TypeError, ValueError) as exc:
            raise InputError(
                f"line {name!r}: control point position is not 3 numbers", path=path
            ) from exc
        if any(e.shape != (3,) or not np.all(np.isfinite(e)) for e in ends):
            raise InputError(
                f"line {name!r}: control point position is not 3 finite numbers", path=path
            )
        if system == "LPS":
            ends = [e * LPS_TO_RAS for e in ends]
        lines.append(LineMarkup(name=name, start=ends[0], end=ends[1], source=str(path)))
    return lines


def _pair_by_name(lines: list[LineMarkup]) -> list[tuple[LineMarkup, LineMarkup]] | None:
    groups: dict[str, dict[str, LineMarkup]] = {}
    for line in lines:
        m = _AXIS_NAME.match(line.name)
        if m is None:
            return None
        slot = groups.setdefault(m["lesion"].lower(), {})
        axis = m["axis"].lower()
        if axis in slot:
            raise InputError(
                f"two {axis}-axis lines named for lesion {m['lesion']!r}", path=line.source or None
            )
        slot[axis] = line
    pairs = []
    for lesion, slot in sorted(groups.items()):
        if set(slot) != {"long", "short"}:
            have = next(iter(slot.values()))
            raise InputError(
                f"lesion {lesion!r} has a {next(iter(slot))} axis but no {({'long', 'short'} - set(slot)).pop()} "
                "axis line",
                path=have.source or None,
            )
        pairs.append((slot["long"], slot["short"]))
    return pairs


def _pair_by_geometry(lines: list[LineMarkup]) -> list[tuple[LineMarkup, LineMarkup]]:
    remaining = list(lines)
    pairs = []
    while len(remaining) > 1:
        mids = np.array([line.midpoint for line in remaining])
        dist = np.linalg.norm(mids[:, None] - mids[None], axis=2)
        np.fill_diagonal(dist, np.inf)
        i, j = np.unravel_index(int(np.argmin(dist)), dist.shape)
        a, b = remaining[i], remaining[j]
        if dist[i, j] >= max(a.length, b.length) / 2:
            break
        pairs.append((a, b))
        remaining = [line for k, line in enumerate(remaining) if k not in (i, j)]
    if remaining:
        names = ", ".join(f"{line.name!r} ({Path(line.source).name})" for line in remaining)
        raise InputError(
            f"line(s) {names} cross no other line: each lesion needs a long and a short axis line crossing it"
        )
    return pairs


def lines_to_lesions(lines: Iterable[LineMarkup]) -> pd.DataFrame:
    """Pair the lines of one read into lesions: ``x_mm, y_mm, z_mm, long_axis_mm, short_axis_mm``."""
    lines = list(lines)
    pairs = _pair_by_name(lines) if lines else []
    if pairs is None:
        pairs = _pair_by_geometry(lines)
    rows = []
    for a, b in pairs:
        long_, short = (a, b) if a.length >= b.length else (b, a)
        cos = abs(np.dot(long_.end - long_.start, short.end - short.start)) / max(
            long_.length * short.length, 1e-12
        )
        if cos > 0.5:
            log.warning(
                "lines %r and %r are not perpendicular (%.0f deg)",
                long_.name,
                short.name,
                np.degrees(np.arccos(cos)),
            )
        centre = (long_.midpoint + short.midpoint) / 2
        rows.append(
            {
                "x_mm": centre[0],
                "y_mm": centre[1],
                "z_mm": centre[2],
                "long_axis_mm": long_.length,
                "short_axis_mm": short.length,
            }
        )
    return pd.DataFrame(rows, columns=["x_mm", "y_mm", "z_mm", "long_axis_mm", "short_axis_mm"])


def markups_to_lesions(
    paths: Iterable[Path | str] | Path | str, *, patient: str, reader: str, modality: str
) -> pd.DataFrame:
    """Lesions table rows of one read from its markup files (or a folder of ``*.mrk.json``)."""
    if isinstance(paths, (str, Path)) and Path(paths).is_dir():
        paths = sorted(Path(paths).glob("*.mrk.json"))
    elif isinstance(paths, (str, Path)):
        paths = [paths]
    lines = [line for p in paths for line in read_markups(p)]
    lesions = lines_to_lesions(lines)
    for col, value in (("modality", modality), ("reader", reader), ("patient", patient)):
        lesions.insert(0, col, value)
    return lesions


def write_line_markup(path: Path | str, name: str, start: np.ndarray, end: np.ndarray) -> Path:
    """One Slicer line markup file (LPS, as Slicer writes them)."""
    points = [np.asarray(start, float) * LPS_TO_RAS, np.asarray(end, float) * LPS_TO_RAS]
    doc = {
        "@schema": SCHEMA,
        "markups": [
            {
                "type": "Line",
                "name": name,
                "coordinateSystem": "LPS",
                "coordinateUnits": "mm",
                "controlPoints": [
                    {
                        "id": str(i + 1),
                        "label": f"{name}-{i + 1}",
                        "position": p.tolist(),
                        "positionStatus": "defined",
                    }
                    for i, p in enumerate(points)
                ],
                "measurements": [
                    {
                        "name": "length",
                        "enabled": True,
                        "value": float(np.linalg.norm(points[1] - points[0])),
                        "units": "mm",
                    }
                ],
            }
        ],
    }
    return write_text(json.dumps(doc, indent=2) + "\n", path)


def lesions_to_markups(lesions: pd.DataFrame, out_dir: Path | str) -> list[Path]:
    """Write each lesion as two line markups, ``OUT/<reader>/<patient>/<modality>/lesion-NNN-{long,short}``.

    The long axis is drawn left-right and the short axis anterior-posterior through the centre, in the axial
    plane (the table has no direction); :func:`markups_to_lesions` reads the same rows back.
    """
    out_dir = Path(out_dir)
    written = []
    for (patient, reader, modality), group in lesions.groupby(
        ["patient", "reader", "modality"], sort=True
    ):
        # Reader and patient come from the table: they must not climb out of the output folder.
        folder = path_inside(out_dir, str(reader), str(patient), str(modality))
        for k, row in enumerate(group.itertuples(index=False), start=1):
            centre = np.array([row.x_mm, row.y_mm, row.z_mm], float)
            for axis, length, direction in (
                ("long", row.long_axis_mm, np.array([1.0, 0.0, 0.0])),
                ("short", row.short_axis_mm, np.array([0.0, 1.0, 0.0])),
            ):
                half = direction * float(length) / 2
                name = f"lesion-{k:03d}-{axis}"
                written.append(
                    write_line_markup(
                        folder / f"{name}.mrk.json", name, centre - half, centre + half
                    )
                )
    return written


def import_annotations(
    annotation_dir: Path | str, key: pd.DataFrame, *, forms: Iterable[Path | str] | None = None
) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Un-blind a study's markups: ``ANNOTATIONS/<case_id>/*.mrk.json`` and the key -> the lesions table.

    A case of the key without a folder has no lesion. A folder that is no case of the key is an error (a typo
    would otherwise drop a read). ``forms``: the readers' filled-in reading forms (TSV with ``case_id, quality,
    reading_time_s``), un-blinded into the reads table; without them the reads table is ``None``.
    """
    annotation_dir = Path(annotation_dir)
    if not annotation_dir.is_dir():
        raise InputError("annotations folder not found", path=annotation_dir)
    cases = key.set_index("case_id")
    unknown = sorted(
        p.name for p in annotation_dir.iterdir() if p.is_dir() and p.name not in cases.index
    )
    if unknown:
        raise InputError(
            f"folder(s) {', '.join(unknown)} are not case ids of the key", path=annotation_dir
        )
    frames = []
    for case_id, case in cases.iterrows():
        folder = annotation_dir / str(case_id)
        files = sorted(folder.glob("*.mrk.json")) if folder.is_dir() else []
        frames.append(
            markups_to_lesions(
                files,
                patient=str(case["patient"]),
                reader=str(case["reader"]),
                modality=str(case["modality"]),
            )
        )
    lesions = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    reads = None
    if forms:
        filled = []
        for form in forms:
            form = Path(form)
            if not form.exists():
                raise InputError("reading form not found", path=form)
            df = pd.read_csv(form, sep="\t", dtype={"case_id": str})
            missing = [c for c in ("case_id", "quality", "reading_time_s") if c not in df.columns]
            if missing:
                raise InputError(f"reading form lacks column(s) {', '.join(missing)}", path=form)
            bad = sorted(set(df["case_id"]) - set(cases.index))
            if bad:
                raise InputError(f"case id(s) {', '.join(bad[:5])} are not in the key", path=form)
            filled.append(df[["case_id", "quality", "reading_time_s"]])
        joined = pd.concat(filled, ignore_index=True).merge(
            key[["case_id", "patient", "reader", "modality"]], on="case_id", how="left"
        )
        reads = joined[["patient", "reader", "modality", "quality", "reading_time_s"]]
    return lesions, reads
