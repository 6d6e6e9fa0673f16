"""Cross-validation folds of the training subjects: seeded, stratified, balanced, stable.

Each training subject gets a fold in ``0 .. k-1``; fold ``f`` is the tuning set of training run ``f`` and the
other folds are its training set. Test subjects never get a fold, so they can enter no training job.

The assignment is a greedy deal in a fixed order: subjects sorted by stratum, then by a hash of
(seed, subject id); each goes to the fold with the fewest subjects of its stratum, ties broken by the fewest
subjects overall, then by the lowest fold number. Fold sizes therefore differ by at most one, overall and
within each stratum, and the result depends on the seed and the set of subjects only, not on row order.

"Written once, stable when subjects are added": the hash order alone cannot keep a balanced assignment
stable, since one new subject shifts the deal for those after it. So :func:`make_folds` takes the ``previous``
assignment when there is one: kept subjects keep their fold, and only new subjects are dealt, in hash order,
onto the folds that are smallest in their stratum. Adding subjects then changes no existing fold membership
(only the folds that receive new subjects need retraining), and the folds stay balanced. Subjects that left
the training set are dropped. Without ``previous`` the same seed and subjects always give the same folds.
"""

from __future__ import annotations

import hashlib
import logging

import pandas as pd

from virtual_contrast.io import InputError

log = logging.getLogger(__name__)


def _hash_key(seed: int, subject: str) -> str:
    return hashlib.sha256(f"{seed}:{subject}".encode()).hexdigest()


def _strata(subjects: pd.DataFrame) -> pd.Series:
    if "stratum" not in subjects.columns:
        return pd.Series("", index=subjects.index)
    return subjects["stratum"].fillna("").astype(str)


def make_folds(
    subjects: pd.DataFrame,
    k: int = 5,
    seed: int = 0,
    previous: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Assign each ``split == "train"`` subject to one of ``k`` folds.

    ``subjects`` has columns ``subject``, ``split`` (``train``/``test``) and optionally ``stratum``.
    Returns a DataFrame with columns ``subject`` and ``fold`` (int, 0-based), sorted by subject.
    ``previous`` (a former result with the same ``k``) is honoured for the subjects it contains.
    """
    for col in ("subject", "split"):
        if col not in subjects.columns:
            raise InputError(
                f"subjects table has no {col!r} column (columns: {list(subjects.columns)})"
            )
    if k < 2:
        raise InputError(f"need at least 2 folds, got k={k}")
    df = subjects.assign(subject=subjects["subject"].astype(str))
    dup = sorted(df.loc[df["subject"].duplicated(), "subject"].unique())
    if dup:
        raise InputError(f"subject(s) {dup} appear more than once in the subjects table")
    bad = sorted(set(df["split"]) - {"train", "test"})
    if bad:
        raise InputError(f"split must be 'train' or 'test', found {bad}")
    train = df[df["split"] == "train"].assign(stratum=_strata(df))
    if len(train) < k:
        raise InputError(f"{len(train)} training subjects cannot fill {k} folds")

    assigned: dict[str, int] = {}
    if previous is not None and len(previous):
        prev = previous.assign(subject=previous["subject"].astype(str))
        prev_k = int(prev["fold"].max()) + 1
        if prev["fold"].min() < 0 or prev_k > k:
            raise InputError(f"previous folds use folds 0..{prev_k - 1}, incompatible with k={k}")
        train_ids = set(train["subject"])
        gone = sorted(set(prev["subject"]) - train_ids)
        if gone:
            log.warning(
                "subject(s) %s are no longer training subjects; dropped from the folds", gone
            )
        assigned = {
            s: int(f) for s, f in zip(prev["subject"], prev["fold"], strict=True) if s in train_ids
        }

    per_stratum: dict[str, list[int]] = {}
    overall = [0] * k
    stratum_of = dict(zip(train["subject"], train["stratum"], strict=True))
    for s, f in assigned.items():
        per_stratum.setdefault(stratum_of[s], [0] * k)[f] += 1
        overall[f] += 1
    new = train[~train["subject"].isin(assigned)]
    order = sorted(new["subject"], key=lambda s: (stratum_of[s], _hash_key(seed, s)))
    for s in order:
        counts = per_stratum.setdefault(stratum_of[s], [0] * k)
        fold = min(range(k), key=lambda f: (counts[f], overall[f], f))
        assigned[s] = fold
        counts[fold] += 1
        overall[fold] += 1
    if min(overall) == 0:
        raise InputError(f"fold(s) {[f for f in range(k) if overall[f] == 0]} would be empty")
    out = pd.DataFrame({"subject": list(assigned), "fold": list(assigned.values())})
    return out.sort_values("subject", kind="stable").reset_index(drop=True)


def fold_members(folds: pd.DataFrame, fold: int) -> tuple[list[str], list[str]]:
    """(training subjects, tuning subjects) of training run ``fold``."""
    if fold not in set(folds["fold"]):
        raise InputError(f"fold {fold} not in the folds table (folds {sorted(set(folds['fold']))})")
    ids = folds["subject"].astype(str)
    return sorted(ids[folds["fold"] != fold]), sorted(ids[folds["fold"] == fold])


def read_folds(path) -> pd.DataFrame:
    """Read a folds TSV written by the ``split`` step."""
    try:
        df = pd.read_csv(path, sep="\t", dtype={"subject": str})
    except FileNotFoundError:
        raise InputError("folds table not found", path=path) from None
    if not {"subject", "fold"} <= set(df.columns):
        raise InputError(
            f"folds table needs columns subject and fold, has {list(df.columns)}", path=path
        )
    return df
