"""Which series of an exam is the T1, T2, FLAIR, DWI, low-dose T1c and full-dose T1c.

A site's **series map** (YAML) is applied first; series it does not match go through the **built-in rules**:

1. ignored: not an MR image (modality, SOP class), derived images (``DERIVED`` in ImageType, or ADC, TRACEW,
   FA, MPR, projection, phase), localizers and calibration scans (series description);
2. DWI: ImageType ``DIFFUSION``, two or more b-values in the headers, or a diffusion description;
3. FLAIR: a FLAIR / dark-fluid / TIRM description (a "T1 FLAIR" is a T1);
4. T2: a T2 description that is not a FLAIR, a T2* or susceptibility series, or a proton density;
5. T1: a T1 description (t1, MPRAGE, SPGR, BRAVO, TFL, TFE, VIBE, FL2D/FL3D); post-contrast when the header
   names a contrast agent or the description says so (post, gd, gado, contrast, ce, +c), pre-contrast
   otherwise;
6. anything else: ignored ("no rule matched").

Post-contrast T1 series become the low-dose or the full-dose T1c by, in this order: a dose word in the
description (low, quarter, reduced, 0.025 / full, standard); being the only candidate left for the only role
left; a smaller contrast volume or dose in the headers; acquisition order, **only** when both series are the
same protocol (same description, protocol and sequence name): in the paper's protocol the quarter dose is
injected and imaged first and the rest of the full dose is added before the same sequence is repeated, so the
later of two identical acquisitions always carries the larger dose. A map may set
``post_contrast_order: always`` for a site whose protocol guarantees that order for any two post-contrast
series. Between two candidates that no rule separates the import refuses, naming both series.

Series map (every key optional; ``criteria`` as in dcm2bids: header keywords of :data:`scan.FIELDS`, glob
patterns compared without case, ``re:`` for a regular expression, numbers compared exactly; a list value such
as ImageType matches when any of its items, or all of them joined with ``\\``, match)::

    series:
      - role: low            # t1 | t2 | flair | dwi | low | ref | ignore
        criteria: {SeriesDescription: "*T1*quarter*"}
      - role: ignore
        criteria: {SeriesNumber: 14}
    post_contrast_order: same_protocol   # same_protocol (default) | always | never
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from virtual_contrast.dicom.scan import FIELDS, IMAGE_SOP_CLASSES, Series
from virtual_contrast.io import InputError
from virtual_contrast.sequences import SEQUENCES as SEQUENCE_TABLE

#: The roles an exam's series can take: the raw keys of virtual_contrast.sequences (the subjects table's
#: sequence columns; the b-values come with the DWI).
ROLES = tuple(s.key for s in SEQUENCE_TABLE)
ROLE_LABELS = {s.key: s.label for s in SEQUENCE_TABLE}
ORDER_MODES = ("same_protocol", "always", "never")

_DERIVED_TYPES = {
    "DERIVED",
    "ADC",
    "EADC",
    "TRACEW",
    "TRACE",
    "FA",
    "MPR",
    "PROJECTION IMAGE",
    "MIP",
}
_PHASE_TYPES = {"P", "PHASE"}
_LOCALIZER = re.compile(
    r"localizer|localiser|scout|survey|aa ?head|\bloc\b|3 ?plane|tri ?pilot|calibration|\bcal\b|"
    r"asset|ref ?scan|sense ?ref|coil ?sens|smart ?brain"
)
_DWI = re.compile(r"\bdwi|\bdiff|\bdti\b|tensor|\bdw\b|resolve\b")
_FLAIR = re.compile(r"flair|dark ?fluid|\btirm\b")
_T1 = re.compile(r"\bt1|mprage|mp ?rage|spgr|bravo|\btfl|\btfe\b|vibe|\bfl[23]d")
_T2 = re.compile(r"\bt2|\bpd\b|\bswi\b")
#: Not a T2-weighted image although the description says T2: T2* and susceptibility, proton density.
_NOT_T2W = re.compile(r"t2 ?star|\bswi\b|\bswan\b|\bgre\b|hemo|\bpd\b|\bde\b")
_POST = re.compile(
    r"\bpost|\bgd\b|gado|contrast|\bce\b|\+ ?c\b|\bc ?\+|\+ ?gd|\benh|\bmdc\b|kontrast|\bkm\b"
)
_PRE = re.compile(r"\bpre\b|precontrast|\bnative?\b|\bsans\b")
_LOW = re.compile(r"\blow|quarter|reduced|\bld\b|0\.025|1/4|\b25 ?%")
_FULL = re.compile(r"\bfull|standard|\bfd\b|\b0\.1\b|100 ?%")


@dataclass(frozen=True)
class MapRule:
    role: str  # one of ROLES or "ignore"
    criteria: dict[str, Any]

    def matches(self, series: Series) -> bool:
        return all(_field_matches(series.fields.get(k), v) for k, v in self.criteria.items())


@dataclass(frozen=True)
class SeriesMap:
    rules: tuple[MapRule, ...] = ()
    post_contrast_order: str = "same_protocol"
    source: str = "built-in rules only"


@dataclass
class Decision:
    """What became of one series."""

    series: Series
    status: str  # used | ignored | ambiguous
    role: str = ""
    reason: str = ""


@dataclass
class Classification:
    decisions: list[Decision]
    problems: list[str] = field(default_factory=list)  # one line per role that no rule could settle

    @property
    def roles(self) -> dict[str, Series]:
        """The series used for each role found."""
        return {d.role: d.series for d in self.decisions if d.status == "used"}

    def raise_if_ambiguous(
        self, *, subject: str | None = None, path: Path | str | None = None
    ) -> None:
        if self.problems:
            raise InputError("; ".join(self.problems), subject=subject, path=path)


def _field_matches(value: Any, pattern: Any) -> bool:
    if value is None:
        return False
    if isinstance(pattern, list):
        return all(_field_matches(value, p) for p in pattern)
    if isinstance(value, list):
        joined = "\\".join(str(v) for v in value)
        return any(_field_matches(v, pattern) for v in [*value, joined])
    if isinstance(pattern, bool) or not isinstance(pattern, int | float):
        text, pat = str(value).lower(), str(pattern).lower()
        if pat.startswith("re:"):
            return re.search(pat[3:], text) is not None
        return fnmatch.fnmatchcase(text, pat)
    try:
        return float(value) == float(pattern)
    except (TypeError, ValueError):
        return False


def load_series_map(path: Path | str | None) -> SeriesMap:
    """Read and check a series map; ``None`` or ``""`` gives the built-in rules only."""
    if not path:
        return SeriesMap()
    path = Path(path)
    if not path.exists():
        raise InputError("series map not found", path=path)
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise InputError(f"series map is not valid YAML: {exc}", path=path) from exc
    if not isinstance(spec, dict) or set(spec) - {"series", "post_contrast_order"}:
        extra = (
            sorted(set(spec) - {"series", "post_contrast_order"})
            if isinstance(spec, dict)
            else spec
        )
        raise InputError(
            f"series map: unknown key(s) {extra}; expected series, post_contrast_order", path=path
        )
    order = spec.get("post_contrast_order", "same_protocol")
    if order not in ORDER_MODES:
        raise InputError(
            f"series map: post_contrast_order must be one of {ORDER_MODES}, got {order!r}",
            path=path,
        )
    rules = []
    for i, item in enumerate(spec.get("series") or [], start=1):
        if not isinstance(item, dict) or set(item) != {"role", "criteria"}:
            raise InputError(
                f"series map: rule {i} must have exactly 'role' and 'criteria'", path=path
            )
        role, criteria = item["role"], item["criteria"]
        if role not in (*ROLES, "ignore"):
            raise InputError(
                f"series map: rule {i} has role {role!r}; expected one of {[*ROLES, 'ignore']}",
                path=path,
            )
        if not isinstance(criteria, dict) or not criteria:
            raise InputError(f"series map: rule {i} needs a non-empty criteria mapping", path=path)
        unknown = sorted(set(criteria) - set(FIELDS))
        if unknown:
            raise InputError(
                f"series map: rule {i} uses unknown field(s) {unknown}; known: {', '.join(FIELDS)}",
                path=path,
            )
        rules.append(MapRule(role, dict(criteria)))
    return SeriesMap(tuple(rules), order, str(path))


_TEXT_FIELDS = ("SeriesDescription", "ProtocolName", "SequenceName")


def _text(series: Series) -> str:
    """Description, protocol and sequence name, lower case, punctuation (but '+') turned into spaces."""
    f = series.fields
    raw = " ".join(str(f.get(k, "")) for k in _TEXT_FIELDS)
    return re.sub(r"[^a-z0-9+./%]+", " ", raw.lower().replace("_", " "))


def _image_type(series: Series) -> set[str]:
    value = series.fields.get("ImageType") or []
    return {str(v).upper() for v in (value if isinstance(value, list) else [value])}


def builtin_kind(series: Series) -> tuple[str, str]:
    """(kind, reason) by the built-in rules: kind is a role, ``t1c`` (post-contrast T1) or ``ignore``."""
    f, text, image_type = series.fields, _text(series), _image_type(series)
    sop = str(f.get("SOPClassUID", ""))
    if f.get("Modality", "MR") != "MR" or (sop and sop not in IMAGE_SOP_CLASSES):
        return (
            "ignore",
            f"not an MR image (modality {f.get('Modality', '?')}, SOP class {sop or '?'})",
        )
    if image_type & _DERIVED_TYPES or image_type & _PHASE_TYPES:
        return "ignore", "derived or phase image (ImageType " + "\\".join(
            f.get("ImageType", [])
        ) + ")"
    if _LOCALIZER.search(text):
        return "ignore", "localizer or calibration scan"
    if "DIFFUSION" in image_type or len(series.bvalues) >= 2 or _DWI.search(text):
        return "dwi", "diffusion series"
    is_t1 = bool(_T1.search(text))
    if _FLAIR.search(text) and not (is_t1 and not _T2.search(text)):
        return "flair", "FLAIR description"
    if is_t1 and not _T2.search(text):
        agent = str(f.get("ContrastBolusAgent", "")).strip().lower()
        if agent and agent not in ("none", "no", "0"):
            return "t1c", f"T1 with contrast agent {f['ContrastBolusAgent']!r} in the header"
        if _POST.search(text) and not _PRE.search(text):
            return "t1c", "T1 with a post-contrast description"
        return "t1", "T1 without contrast"
    star = re.search(r"t2\s*\*", " ".join(str(f.get(k, "")) for k in _TEXT_FIELDS).lower())
    if _T2.search(text) and not (_NOT_T2W.search(text) or star):
        return "t2", "T2 description"
    return "ignore", "no rule matched (not one of T1, T2, FLAIR, DWI)"


def _same_protocol(a: Series, b: Series) -> bool:
    keys = ("SeriesDescription", "ProtocolName", "SequenceName")
    return all(a.fields.get(k) == b.fields.get(k) for k in keys)


def _dose(series: Series) -> float | None:
    for key in ("ContrastBolusTotalDose", "ContrastBolusVolume"):
        value = series.fields.get(key)
        if isinstance(value, int | float) and value > 0:
            return float(value)
    return None


def _split_post_contrast(
    candidates: list[Series], open_roles: list[str], order_mode: str
) -> tuple[dict[str, tuple[Series, str]], list[Series], str]:
    """Assign post-contrast T1 candidates to the open roles among low/ref.

    Returns ({role: (series, reason)}, series left ambiguous, why they are ambiguous).
    """
    assigned: dict[str, tuple[Series, str]] = {}
    left = []
    for s in candidates:
        text = _text(s)
        low, full = bool(_LOW.search(text)), bool(_FULL.search(text))
        role = "low" if low and not full else "ref" if full and not low else ""
        if role and role in open_roles and role not in assigned:
            assigned[role] = (s, f"dose in the description ({ROLE_LABELS[role]})")
        else:
            left.append(s)
    roles = [r for r in open_roles if r not in assigned]
    if not left:
        return assigned, [], ""
    if len(left) == 1 and len(roles) == 1:
        assigned[roles[0]] = (left[0], "the only post-contrast T1 left")
        return assigned, [], ""
    if len(left) == 2 and roles == ["low", "ref"]:
        a, b = left
        da, db = _dose(a), _dose(b)
        if da is not None and db is not None and da != db:
            lo, hi = (a, b) if da < db else (b, a)
            assigned.update(
                low=(lo, "smaller contrast dose in the header"), ref=(hi, "larger contrast dose")
            )
            return assigned, [], ""
        ordered = a.acquired and b.acquired and a.acquired != b.acquired
        if ordered and (
            order_mode == "always" or (order_mode == "same_protocol" and _same_protocol(a, b))
        ):
            first, second = sorted(left, key=lambda s: s.acquired)
            assigned.update(
                low=(first, "first of two post-contrast acquisitions"),
                ref=(second, "second of two post-contrast acquisitions (cumulative dose)"),
            )
            return assigned, [], ""
        why = (
            "different protocols, so acquisition order does not tell the dose"
            if ordered
            else "no acquisition times"
        )
        return assigned, left, why
    if not roles:
        return assigned, [], ""
    return assigned, left, "no rule separates them"


def classify(series: list[Series], series_map: SeriesMap | None = None) -> Classification:
    """Decide the role of every series; ambiguities are listed in ``problems`` (see the module docstring)."""
    series_map = series_map or SeriesMap()
    decisions = {s.uid: Decision(s, "ignored") for s in series}
    mapped: dict[str, list[Series]] = {}  # role -> series the map gives it
    found: dict[str, list[Series]] = {}  # kind -> series the built-in rules give it
    for s in series:
        rule = next((r for r in series_map.rules if r.matches(s)), None)
        if rule is not None:
            decisions[s.uid].reason = f"series map ({series_map.source}): {rule.criteria}"
            mapped.setdefault(rule.role, []).append(s)
        else:
            kind, decisions[s.uid].reason = builtin_kind(s)
            found.setdefault(kind, []).append(s)
    problems: list[str] = []

    def use(role: str, s: Series, why: str = "") -> None:
        d = decisions[s.uid]
        d.status, d.role = "used", role
        d.reason = f"{d.reason}; {why}" if why else d.reason

    def ambiguous(roles: list[str], candidates: list[Series], why: str) -> None:
        for s in candidates:
            decisions[s.uid].status, decisions[s.uid].role = "ambiguous", "/".join(roles)
        names = ", ".join(s.label() for s in candidates)
        problems.append(
            f"{len(candidates)} candidates for {' or '.join(ROLE_LABELS[r] for r in roles)} ({why}): {names}; "
            "add a rule to a series map (--series-map, or dicom.series_map in the config) to choose"
        )

    def settle(role: str, candidates: list[Series], why: str, how: str = "") -> None:
        if len(candidates) == 1:
            use(role, candidates[0], how)
        elif candidates:
            ambiguous([role], candidates, why)

    for role in ROLES:
        if mapped.get(role):
            settle(role, mapped[role], "the series map gives this role to each")
            chosen = mapped[role][0].label()
            for s in found.get(role, []) + (found.get("t1c", []) if role in ("low", "ref") else []):
                decisions[
                    s.uid
                ].reason += f"; the series map chose {chosen} for {ROLE_LABELS[role]}"
    for role in ("dwi", "flair", "t2"):
        if not mapped.get(role):
            settle(role, found.get(role, []), "no rule separates them")
    open_post = [r for r in ("low", "ref") if not mapped.get(r)]
    post = found.get("t1c", [])
    if post and open_post:
        assigned, left, why = _split_post_contrast(post, open_post, series_map.post_contrast_order)
        for role, (s, reason) in assigned.items():
            use(role, s, reason)
        if left:
            ambiguous([r for r in open_post if r not in assigned] or ["ref"], left, why)
    for s in post:
        if decisions[s.uid].status == "ignored":
            decisions[s.uid].reason += "; not needed (low- and full-dose T1c already chosen)"
    if not mapped.get("t1"):
        pre = found.get("t1", [])
        low = next(
            (d.series for d in decisions.values() if d.status == "used" and d.role == "low"), None
        )
        if len(pre) > 1 and low is not None:
            # The paper's pre-contrast T1 is the same sequence as the post-contrast ones.
            same = [s for s in pre if _same_sequence(s, low)]
            if len(same) == 1:
                for s in pre:
                    if s is not same[0]:
                        decisions[s.uid].reason += "; another sequence than the low-dose T1c"
                use("t1", same[0], "same sequence as the low-dose T1c")
                pre = []
        settle("t1", pre, "no rule separates them")
    return Classification([decisions[s.uid] for s in series], problems)


def _same_sequence(a: Series, b: Series) -> bool:
    keys = ("SequenceName", "MRAcquisitionType", "ScanningSequence")
    return all(a.fields.get(k) == b.fields.get(k) for k in keys)
