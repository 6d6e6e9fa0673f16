"""The sequence table (virtual_contrast.sequences): every other part of the study derives its names from it."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from virtual_contrast import layout, sequences
from virtual_contrast.dicom.rules import ROLE_LABELS, ROLES
from virtual_contrast.io import InputError
from virtual_contrast.subjects import (
    BIDS_PATTERNS,
    SEQUENCES,
    brats_subject_id,
    discover_bids,
    discover_brats,
    read_subjects_table,
    select_exams,
)

REPO = Path(__file__).resolve().parents[1]


def test_every_name_of_a_sequence_comes_from_the_table():
    assert SEQUENCES == sequences.COLUMNS
    assert set(BIDS_PATTERNS) == set(sequences.COLUMNS)
    assert ROLES == sequences.KEYS
    assert ROLE_LABELS["t2"] == "T2w"
    assert set(layout.BIDS_SEQUENCES) == set(sequences.exam_files(sequences.KEYS))
    assert sequences.INPUT_CHANNELS == ("T1w", "T2w", "FLAIR", "ADC", "lowT1c")
    assert sequences.TARGET == "refT1c"
    # Each sequence's alignment feature is one that preprocess.register knows (its default included).
    assert {s.align_feature for s in sequences.SEQUENCES} <= set(sequences.ALIGN_FEATURES)


def test_a_study_needs_its_channels_the_t1_the_low_dose_and_the_target():
    channels = sequences.study_channels(["FLAIR", "T2w"])
    assert channels == ("T1w", "T2w", "FLAIR", "lowT1c", "refT1c")
    assert sequences.raw_columns(channels) == ("t1", "t2", "flair", "low", "ref")
    assert sequences.raw_columns(channels, simulated_low_dose=True) == ("t1", "t2", "flair", "ref")
    paper = sequences.study_channels(["ADC", "FLAIR", "T1w", "lowT1c"])
    assert sequences.raw_columns(paper) == ("t1", "flair", "dwi", "bval", "low", "ref")


def _exam(folder: Path, names: list[str]) -> None:
    (folder / "anat").mkdir(parents=True)
    for name in names:
        (folder / "anat" / name).write_bytes(b"")


def test_bids_discovery_tells_the_pre_contrast_t1_from_the_contrast_enhanced_ones(tmp_path):
    # Sorted by name, "sub-1_ce-full_T1w" would come before a pre-contrast T1 named "sub-1_acq-3d_T1w".
    _exam(
        tmp_path / "sub-1",
        ["sub-1_ce-full_T1w.nii.gz", "sub-1_ce-low_T1w.nii.gz", "sub-1_acq-3d_T1w.nii.gz"],
    )
    _exam(tmp_path / "sub-2", ["sub-2_ce-full_T1w.nii.gz", "sub-2_T2w.nii.gz"])
    exams = discover_bids(tmp_path).set_index("subject")
    assert Path(exams.at["1", "t1"]).name == "sub-1_acq-3d_T1w.nii.gz"
    assert Path(exams.at["1", "low"]).name == "sub-1_ce-low_T1w.nii.gz"
    assert Path(exams.at["1", "ref"]).name == "sub-1_ce-full_T1w.nii.gz"
    assert exams.at["2", "t1"] == ""  # a full-dose T1c is not a pre-contrast T1
    assert Path(exams.at["2", "t2"]).name == "sub-2_T2w.nii.gz"


def test_exclusions_follow_the_configured_channels(tmp_path):
    _exam(tmp_path / "sub-1", ["sub-1_T1w.nii.gz", "sub-1_T2w.nii.gz", "sub-1_ce-full_T1w.nii.gz"])
    _exam(tmp_path / "sub-2", ["sub-2_T1w.nii.gz", "sub-2_ce-full_T1w.nii.gz"])
    exams = discover_bids(tmp_path)
    # The paper's inputs: both lack FLAIR, DWI and the low dose.
    assert select_exams(exams).included.empty
    # T2w as an input with a simulated low dose: sub-1 has all it needs, sub-2 lacks its T2w.
    needed = sequences.raw_columns(
        sequences.study_channels(["T2w", "T1w", "lowT1c"]), simulated_low_dose=True
    )
    selection = select_exams(exams, required=needed)
    assert list(selection.included["subject"]) == ["1"]
    assert selection.excluded.set_index("subject").at["2", "reason"] == "missing T2w"


def test_a_table_without_the_columns_the_study_does_not_need(tmp_path):
    for name in ("t1.nii.gz", "t2.nii.gz", "t1c.nii.gz"):
        (tmp_path / name).write_bytes(b"")
    table = tmp_path / "subjects.tsv"
    table.write_text("subject\tsplit\tt1\tt2\tref\np1\ttrain\tt1.nii.gz\tt2.nii.gz\tt1c.nii.gz\n")
    needed = ("t1", "t2", "ref")
    exams = read_subjects_table(table, required=needed)
    assert exams.at[2, "low"] == "" and exams.at[2, "dwi"] == ""
    assert list(select_exams(exams, required=needed).included["subject"]) == ["p1"]
    with pytest.raises(InputError, match="lacks column.*flair.*the study needs"):
        read_subjects_table(table, required=("t1", "flair", "ref"))


def test_brats_case_ids_become_subject_ids():
    assert brats_subject_id("BraTS-MET-00110-000") == ("BraTSMET00110", "000")
    assert brats_subject_id("BraTS-GLI-00001-001") == ("BraTSGLI00001", "001")
    assert brats_subject_id("BraTS2021_00495") == ("BraTS202100495", "")


def test_brats_folders_are_discovered(tmp_path):
    case = tmp_path / "BraTS-GLI-00007-000"
    case.mkdir()
    for suffix in ("t1n", "t1c", "t2w", "t2f"):
        (case / f"{case.name}-{suffix}.nii.gz").write_bytes(b"")
    old = tmp_path / "BraTS2021_00495"
    old.mkdir()
    for suffix in ("t1", "t1ce", "t2", "flair", "seg"):
        (old / f"{old.name}_{suffix}.nii.gz").write_bytes(b"")
    exams = discover_brats(tmp_path).set_index("subject")
    new = exams.loc["BraTSGLI00007"]
    assert new["source_id"] == "BraTS-GLI-00007-000" and new["session"] == "000"
    assert Path(new["t1"]).name.endswith("-t1n.nii.gz")
    assert Path(new["ref"]).name.endswith("-t1c.nii.gz")
    assert Path(new["t2"]).name.endswith("-t2w.nii.gz")
    assert Path(new["flair"]).name.endswith("-t2f.nii.gz")
    assert new["low"] == "" and new["dwi"] == ""
    legacy = exams.loc["BraTS202100495"]
    assert Path(legacy["t1"]).name == "BraTS2021_00495_t1.nii.gz"  # not _t1ce
    assert Path(legacy["ref"]).name == "BraTS2021_00495_t1ce.nii.gz"
    # Two case folders that map to one subject id are refused, naming both.
    (tmp_path / "BraTS2021-00495").mkdir()
    with pytest.raises(InputError, match="BraTS2021_00495.*BraTS2021-00495"):
        discover_brats(tmp_path)


def test_the_real_brats_cases_are_discovered(shared_data, tmp_path):
    for case in ("brats_met_00110/BraTS-MET-00110-000", "brats_gli_00001/BraTS-GLI-00001-000"):
        folder, name = case.split("/")
        (tmp_path / name).symlink_to(shared_data / folder)
    exams = discover_brats(tmp_path).set_index("subject")
    assert list(exams.index) == ["BraTSGLI00001", "BraTSMET00110"]
    for column in ("t1", "t2", "flair", "ref"):
        assert all(Path(p).exists() for p in exams[column])
    assert all(exams["low"] == "")


def test_a_fictitious_sequence_added_in_one_place_reaches_every_reader(tmp_path):
    """One row in virtual_contrast/sequences.py, nothing else: the subjects table reads its column, the BIDS
    discovery finds its files and an exam without it is excluded when a model takes it."""
    package = tmp_path / "virtual_contrast"
    shutil.copytree(REPO / "virtual_contrast", package, ignore=shutil.ignore_patterns("vendor"))
    source = package / "sequences.py"
    row = '    Sequence("swi", "SWI", "SWI", "anat", "swi", brats=("swi",)),\n'
    text = source.read_text()
    anchor = '    Sequence("flair",'
    assert anchor in text
    source.write_text(text.replace(anchor, row + anchor, 1))
    script = textwrap.dedent(
        """
        import sys
        from pathlib import Path
        root = Path(sys.argv[1])
        import virtual_contrast
        assert Path(virtual_contrast.__file__).parent == root / "virtual_contrast"
        from virtual_contrast import sequences
        from virtual_contrast.dicom.rules import ROLES
        from virtual_contrast.subjects import (
            BIDS_PATTERNS, discover_bids, read_subjects_table, select_exams
        )
        assert "swi" in ROLES and "SWI" in sequences.INPUT_CHANNELS
        assert BIDS_PATTERNS["swi"] == "anat/*_swi.nii*", BIDS_PATTERNS
        data = root / "data"
        for s in ("1", "2"):
            anat = data / f"sub-{s}" / "anat"
            anat.mkdir(parents=True)
            for name in ("T1w", "ce-low_T1w", "ce-full_T1w") + (("swi",) if s == "1" else ()):
                (anat / f"sub-{s}_{name}.nii.gz").write_bytes(b"")
        needed = sequences.raw_columns(sequences.study_channels(["SWI", "T1w", "lowT1c"]))
        assert needed == ("t1", "swi", "low", "ref"), needed
        selection = select_exams(discover_bids(data), required=needed)
        assert list(selection.included["subject"]) == ["1"]
        assert selection.excluded["reason"].tolist() == ["missing SWI"]
        table = root / "subjects.tsv"
        anat = data / "sub-1" / "anat"
        table.write_text(
            "subject\\tt1\\tswi\\tlow\\tref\\n1\\t"
            + "\\t".join(str(anat / f"sub-1_{n}.nii.gz") for n in ("T1w", "swi", "ce-low_T1w", "ce-full_T1w"))
            + "\\n"
        )
        exams = read_subjects_table(table, required=needed)
        assert exams.at[2, "swi"].endswith("sub-1_swi.nii.gz")
        print("ok")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "ok"


def test_exams_table_maps_source_ids(tmp_path):
    from virtual_contrast.config import validate_config
    from virtual_contrast.workflow import plan_study

    case = tmp_path / "BraTS-MET-00001-000"
    case.mkdir()
    for suffix in ("t1n", "t1c", "t2w", "t2f"):
        (case / f"{case.name}-{suffix}.nii.gz").write_bytes(b"")
    config = validate_config(
        {
            "brats_dir": str(tmp_path),
            "low_dose": {"simulate": True},
            "model": {"channels": ["T2w", "FLAIR", "T1w", "lowT1c"]},
        }
    )
    study = plan_study(config)
    assert study.subjects == ["BraTSMET00001"]
    assert study.raw_inputs("BraTSMET00001")["low"] == layout.simulated_low_dose("BraTSMET00001")
    table = study.source_ids()
    assert table.to_dict("records") == [
        {
            "subject": "BraTSMET00001",
            "session": "000",
            "source_id": "BraTS-MET-00001-000",
            "included": True,
        }
    ]
    # Without the simulated low dose the exam lacks one, and the reason says how to get it.
    study = plan_study(validate_config({**config, "low_dose": {"simulate": False}}))
    reason = study.selection.excluded["reason"].iloc[0]
    assert reason.startswith("missing low-dose T1c") and "low_dose.simulate" in reason
