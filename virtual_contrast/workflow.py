"""What the Snakemake workflow needs at parse time: the study's exams, exclusions and split.

Kept out of the rule files so that it is typed, tested, and shared by the CLI and the benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import pandas as pd

from virtual_contrast import layout
from virtual_contrast.cohort.plan import CohortExam, participant, plan_cohort
from virtual_contrast.sequences import KEYS, LOW_DOSE, key_of, raw_columns, study_channels
from virtual_contrast.subjects import (
    SEQUENCES,
    Selection,
    assign_split,
    discover_bids,
    discover_brats,
    read_subjects_table,
    select_exams,
)


@dataclass
class Study:
    """The study as the workflow sees it at parse time."""

    exams: pd.DataFrame  # one row per exam, sequence columns hold paths ("" when missing)
    selection: Selection
    split: dict[str, str]
    embedded: bool
    cohort_plan: list[CohortExam] = field(default_factory=list)
    #: Included subject -> manifest of its DICOM exam (empty unless the inputs come from dicom_dir).
    dicom_manifests: dict[str, str] = field(default_factory=dict)
    source: str = ""  # where the exams come from, for messages
    #: The channels pre-processed for every subject (virtual_contrast.sequences.study_channels).
    channels: tuple[str, ...] = ()
    #: The raw columns every included exam has (virtual_contrast.sequences.raw_columns).
    needed_columns: tuple[str, ...] = ()
    #: Whether the low-dose T1c is simulated from the pre-contrast T1 and the full-dose T1c (rule
    #: simulate_low_dose) instead of acquired.
    simulated_low_dose: bool = False

    @property
    def subjects(self) -> list[str]:
        return list(self.selection.included["subject"])

    @property
    def train_subjects(self) -> list[str]:
        return [s for s in self.subjects if self.split[s] == "train"]

    @property
    def test_subjects(self) -> list[str]:
        return [s for s in self.subjects if self.split[s] == "test"]

    def split_table(self) -> pd.DataFrame:
        """subject, split and (when the table has one) stratum of every included subject."""
        inc = self.selection.included
        table = pd.DataFrame(
            {"subject": inc["subject"], "split": [self.split[s] for s in inc["subject"]]}
        )
        if "stratum" in inc.columns:
            table["stratum"] = inc["stratum"].to_numpy()
        return table

    def demographics(self, seed: int) -> pd.DataFrame:
        """Table 1 variables of the included subjects with their split: the cohort's simulated demographics,
        or the subjects table's own columns (age, sex, weight, indication) when it has them."""
        inc = self.selection.included
        if self.embedded:
            table = pd.DataFrame([participant(s, seed) for s in inc["subject"]])
        else:
            table = inc.drop(
                columns=[
                    c for c in (*SEQUENCES, "session", "split", "source_id") if c in inc.columns
                ]
            )
        table = table.assign(
            subject=list(inc["subject"]), split=[self.split[s] for s in inc["subject"]]
        )
        return table.reset_index(drop=True)

    def cohort_lesion_tables(self) -> list[str]:
        """True-lesion tables of the included cohort exams (empty for real data)."""
        if not self.embedded:
            return []
        inc = self.selection.included
        return [
            str(layout.cohort_lesion_table(s, ses))
            for s, ses in zip(inc["subject"], inc["session"], strict=True)
        ]

    @property
    def raw_keys(self) -> tuple[str, ...]:
        """The raw sequences every included exam has (``dwi`` for the ADC; no ``low`` when it is
        simulated)."""
        return tuple(k for k in KEYS if k in self.needed_columns)

    def raw_inputs(self, subject: str) -> dict[str, str]:
        """The raw sequence files of an included subject (KeyError for any other id); the low dose is the
        simulated one (rule simulate_low_dose) when the study simulates it."""
        raw = dict(self._raw_inputs[subject])
        if self.simulated_low_dose:
            raw[key_of(LOW_DOSE)] = layout.simulated_low_dose(subject)
        return raw

    def source_ids(self) -> pd.DataFrame:
        """Every exam with its subject id, session and the id it has in its source (a BraTS case's folder
        name; the subject id itself elsewhere), and whether it is included."""
        exams = self.exams
        source = exams["source_id"] if "source_id" in exams.columns else exams["subject"]
        inc = self.selection.included
        included = set(zip(inc["subject"], inc["session"], strict=True))
        return pd.DataFrame(
            {
                "subject": exams["subject"].astype(str),
                "session": exams["session"].astype(str),
                "source_id": source.astype(str),
                "included": [
                    (s, ses) in included
                    for s, ses in zip(exams["subject"], exams["session"], strict=True)
                ],
            }
        )

    @cached_property
    def _raw_inputs(self) -> dict[str, dict[str, str]]:
        # Built once: Snakemake calls raw_inputs from input functions several times per subject, and a
        # DataFrame lookup per call made the DAG of 1000 subjects quadratic (benchmarks/dag.py).
        inc = self.selection.included
        columns = [inc[key].astype(str).tolist() for key in SEQUENCES]
        return {
            str(subject): dict(zip(SEQUENCES, paths, strict=True))
            for subject, *paths in zip(inc["subject"], *columns, strict=True)
        }


def _cohort_exams(plan: list[CohortExam]) -> pd.DataFrame:
    rows = []
    for exam in plan:
        files = exam.files()
        row = {"subject": exam.subject, "session": exam.session}
        row.update({key: str(files.get(key, "")) for key in SEQUENCES})
        rows.append(row)
    return pd.DataFrame(rows)


def study_requirements(config: dict) -> tuple[tuple[str, ...], tuple[str, ...], dict[str, str]]:
    """(channels pre-processed, raw columns every exam needs, remedy of a missing column) of a validated
    config: the model's inputs plus the pre-contrast T1, the low dose and the target; the low dose's column
    is not needed when it is simulated."""
    channels = study_channels(config["model"]["channels"])
    simulated = bool(config["low_dose"]["simulate"])
    needed = raw_columns(channels, simulated_low_dose=simulated)
    hints = {} if simulated else {key_of(LOW_DOSE): "or set low_dose.simulate: true to simulate it"}
    return channels, needed, hints


def plan_study(config: dict) -> Study:
    """Read the configured inputs (or plan the embedded cohort), apply exclusions, assign the split."""
    channels, needed, hints = study_requirements(config)
    manifests: dict[tuple[str, str], Path] = {}
    if config.get("subjects"):
        exams = read_subjects_table(config["subjects"], required=needed)
        embedded, plan = False, []
        source = f"subjects table {config['subjects']}"
    elif config.get("bids_dir"):
        exams, embedded, plan = discover_bids(config["bids_dir"]), False, []
        source = f"BIDS folder {config['bids_dir']}"
    elif config.get("brats_dir"):
        exams, embedded, plan = discover_brats(config["brats_dir"]), False, []
        source = f"BraTS folder {config['brats_dir']}"
    elif config.get("dicom_dir"):
        from virtual_contrast.dicom.rules import load_series_map
        from virtual_contrast.dicom.study import discover_dicom

        exams, manifests = discover_dicom(
            config["dicom_dir"],
            files_of=lambda subject, session: layout.bids_exam_files(
                layout.DICOM_DIR, subject, session
            ),
            manifest_of=lambda subject, session: layout.dicom_exam_record(
                subject, session, "series.json"
            ),
            series_map=load_series_map(config["dicom"]["series_map"]),
        )
        embedded, plan = False, []
        source = f"DICOM folder {config['dicom_dir']}"
    else:
        c = config["cohort"]
        plan = plan_cohort(
            c["n_subjects"],
            extra_visits=c["extra_visits"],
            missing_sequence=c["missing_sequence"],
        )
        exams, embedded = _cohort_exams(plan), True
        source = f"embedded cohort of cohort.n_subjects = {c['n_subjects']} patients"
    # Listed files were checked to exist by the table reader (BIDS files were found on disk, cohort and DICOM
    # files are made by the workflow: rules cohort, import_dicom): no second round of stat calls.
    selection = select_exams(exams, required=needed, hints=hints, check_files=False)
    subjects = list(selection.included["subject"])
    s = config["split"]
    split = assign_split(subjects, test_fraction=s["test_fraction"], seed=s["seed"])
    if "split" in selection.included.columns:
        # Checked to be train or test by the subjects table's reader: no value is guessed or ignored here.
        split.update(zip(subjects, selection.included["split"], strict=True))
    included = set(zip(selection.included["subject"], selection.included["session"], strict=True))
    dicom = {
        subject: str(m)
        for (subject, session), m in manifests.items()
        if (subject, session) in included
    }
    return Study(
        exams,
        selection,
        split,
        embedded,
        plan,
        dicom_manifests=dicom,
        source=source,
        channels=channels,
        needed_columns=needed,
        simulated_low_dose=bool(config["low_dose"]["simulate"]),
    )
