"""Parse-time cost of a dicom_dir study: the first plan reads every header, later plans reuse the manifests.

    python benchmarks/dicom_plan.py [--exams 40]

Builds exams from the real Siemens series in ../shared/data/dicom_dcm_qa (tests/dicom_exams.py; 24 files each,
the exams linked to one copy) in a temporary folder and times ``plan_study`` twice; prints the ratio.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from dicom_exams import build_exam  # noqa: E402

from virtual_contrast.workflow import plan_study  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exams", type=int, default=40)
    parser.add_argument("--shared-data", type=Path, default=REPO.parent / "shared" / "data")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        exam = build_exam(args.shared_data / "dicom_dcm_qa", work / "exam")
        n_files = sum(1 for p in exam.rglob("*.dcm"))
        for i in range(args.exams):
            (work / "dicom" / f"b{i:04d}").mkdir(parents=True)
            (work / "dicom" / f"b{i:04d}" / "exam").symlink_to(exam)
        os.chdir(work)
        config = {
            "dicom_dir": str(work / "dicom"),
            "dicom": {"series_map": ""},
            "split": {"test_fraction": 0.25, "seed": 1},
        }
        times = []
        for _ in range(2):
            start = time.perf_counter()
            plan_study(config)
            times.append(time.perf_counter() - start)
    files = args.exams * n_files
    print(f"{args.exams} exams, {files} DICOM files")
    print(
        f"first plan (headers read):    {times[0]:.2f} s, {times[0] / files * 1e3:.2f} ms per file"
    )
    print(
        f"later plan (manifests reused): {times[1]:.2f} s, {times[1] / files * 1e3:.2f} ms per file"
    )
    print(f"ratio: {times[0] / times[1]:.0f}x")


if __name__ == "__main__":
    main()
