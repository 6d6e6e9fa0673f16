"""How bright vir-T1c is where the full dose is brightest (issue 25): lesion peak enhancement and plateaus.

Two measurements, each printed as a table with its ratios and written to ``benchmarks/out/dynamic_range.json``:

``--results results`` (after ``make demo``): for every held-out patient (one with a native vir-T1c), on the native
images, the peak enhancement of each true lesion of at least ``--min-lesion-mm`` (10) long axis, relative to
white matter, ``(P95 of the lesion's ball - WM median) / WM median``, on the acquired full dose, the acquired
quarter dose and the native vir-T1c; the lesion's ball has the radius of half its long axis, around its true
centre (the cohort's truth, in the full dose's world; carried to the quarter dose's by the registration's rigid
alignment of the two series); white matter is the atlas's white-matter probability above 0.9 brought onto each
grid by the registration, inside the brain, away from every lesion. The
full dose is also measured "through the grid": its own atlas-space normalised image brought back onto the
quarter dose's native grid exactly as vir-T1c is (:func:`virtual_contrast.preprocess.native.export_native`, with
the full dose's own percentiles), so that the comparison with vir-T1c is at the working grid's resolution (the
demo's 4 mm blurs a 10 mm lesion's peak whatever the network does); since vir-T1c gets the low dose's detail
finer than the grid (:func:`virtual_contrast.preprocess.native.native_detail`), it is compared with the full dose
itself and the ratio through the grid says how much of the peak the grid alone would have kept. ``fine_over_full``
is the lesion ball's fine-scale variation (the image minus its Gaussian of 1 voxel: noise and thin walls) on
vir-T1c over the full dose's (1 = the full dose's texture). It also counts the brain voxels of each native vir-T1c
at its maximum (a clip's plateau).

``--out-of-fold`` adds the training patients: their native vir-T1c made here, from their out-of-fold predictions
(the fold model that did not train on them), exactly as rule ``predict`` makes the held-out patients'. Every row
says its ``set``; design choices of the native detail are made on the training rows (never the test rows).

``--brats FOLDER --models results/models``: BraTS-MET-00110 (``<case>-t1n``, ``-t1c``, ``-t2f``, ``-t2w``), the
quarter dose simulated as T1 + 0.25 (T1c - T1), predicted by ``virtual-contrast predict`` as a raw exam. BraTS
has no DWI: the exam is given a stand-in DWI whose ADC is made up from the T2w image (0.7e-3 mm²/s in the darkest
tissue rising linearly to 3e-3 in CSF: tissue contrast of the right sign and scale, not a measurement), b0 = the
T1. Printed: vir-T1c's maximum against the quarter dose's 99th brain percentile (it must be above), its voxels at
the maximum, and the brain percentiles of the three images.

    .venv/bin/python benchmarks/dynamic_range.py --results results [--out-of-fold]
    .venv/bin/python benchmarks/dynamic_range.py --brats /path/to/brats_met_00110 --models results/models
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from virtual_contrast import layout  # noqa: E402
from virtual_contrast.io import load_image, save_image, write_json  # noqa: E402
from virtual_contrast.preprocess.transforms import load_transform, resample_to_native  # noqa: E402

OUT = REPO / "benchmarks" / "out" / "dynamic_range.json"
WM_PROBABILITY = 0.9
LESION_PERCENTILE = 95


def _world_grid(img: nib.Nifti1Image) -> np.ndarray:
    ijk = np.indices(img.shape).reshape(3, -1)
    return (img.affine[:3, :3] @ ijk + img.affine[:3, 3:4]).T.reshape(*img.shape, 3)


def _under(results: Path, path: str) -> Path:
    """A layout path (``results/...``) under this results folder."""
    return results / path.removeprefix(f"{layout.RESULTS}/")


def _ball(world: np.ndarray, centre: np.ndarray, radius: float) -> np.ndarray:
    return np.linalg.norm(world - centre, axis=-1) <= radius


def peak_enhancement(
    data: np.ndarray,
    world: np.ndarray,
    brain: np.ndarray,
    wm: np.ndarray,
    lesions: list[tuple[np.ndarray, float]],
) -> tuple[list[float], float]:
    """(peak enhancement relative to WM of each lesion, WM median) in one image; ``lesions``: (world centre,
    long axis mm) in this image's world."""
    away = np.ones(brain.shape, bool)
    for centre, long_axis in lesions:
        away &= ~_ball(world, centre, long_axis / 2 + 6.0)
    wm_median = float(np.median(data[wm & brain & away]))
    peaks = []
    for centre, long_axis in lesions:
        inside = _ball(world, centre, max(long_axis / 2, 2.0)) & brain
        peak = float(np.percentile(data[inside], LESION_PERCENTILE))
        peaks.append((peak - wm_median) / wm_median)
    return peaks, wm_median


def _native_exam(results: Path, subject: str, vir: nib.Nifti1Image) -> dict[str, Path]:
    """The exam files of the session whose quarter dose lies on vir-T1c's native grid."""
    for root in (results / "cohort", results / "dicom"):
        for session in sorted((root / f"sub-{subject}").glob("ses-*")):
            files = layout.bids_exam_files(root, subject, session.name.removeprefix("ses-"))
            if files["low"].exists():
                low = nib.load(files["low"])
                if low.shape == vir.shape and np.allclose(low.affine, vir.affine, atol=1e-3):
                    return files | {"session": session.name.removeprefix("ses-")}
    raise SystemExit(f"no quarter dose of sub-{subject} on its native vir-T1c's grid")


def fine_scale(data: np.ndarray) -> np.ndarray:
    """``data`` minus its Gaussian of 1 voxel: noise and thin walls."""
    data = np.asarray(data, np.float32)
    return data - ndimage.gaussian_filter(data, 1.0)


def out_of_fold_native(results: Path, subject: str, out: Path) -> Path | None:
    """A training patient's native vir-T1c from its out-of-fold prediction, made as rule predict makes a
    held-out patient's (None when it has no out-of-fold prediction)."""
    from virtual_contrast.preprocess.native import export_native

    atlas = _under(results, layout.out_of_fold_files(subject)["atlas"])
    if not atlas.exists():
        return None
    ranges = json_load(_under(results, layout.normalize_files(subject, [])["provenance"]))["lowT1c"]
    files = next(
        layout.bids_exam_files(results / "cohort", subject, s.name.removeprefix("ses-"))
        for s in sorted((results / "cohort" / f"sub-{subject}").glob("ses-*"))
    )
    return export_native(
        atlas,
        files["low"],
        _under(results, layout.transform_file(subject, "lowT1c")),
        out,
        t1_mask=_under(results, layout.skull_strip_files(subject)["mask"]),
        t1_transform=_under(results, layout.transform_file(subject, "T1w")),
        intensity_range=(ranges["low_value"], ranges["high_value"]),
        subject=subject,
        t1=files["t1"],
    )


def measure_demo(results: Path, min_lesion_mm: float, out_of_fold: bool = False) -> dict:
    from virtual_contrast.preprocess.native import export_native, native_brain_mask

    truth = pd.read_csv(results / "cohort" / "lesions.tsv", sep="\t", dtype=str)
    truth["session"] = truth["session"].fillna("")
    native_name = layout.predicted_name("X", layout.NATIVE_SPACE).removeprefix("sub-X")
    subjects = sorted(
        p.name.removeprefix("sub-").removesuffix(native_name)
        for p in results.glob(f"sub-*/predict/sub-*{native_name}")
    )
    if not subjects:
        raise SystemExit(f"no native vir-T1c under {results}/sub-*/predict/: run make demo first")
    virs = {s: _under(results, layout.predict_files(s)["native"]) for s in subjects}
    sets = dict.fromkeys(subjects, "test")
    scratch = tempfile.TemporaryDirectory()
    if out_of_fold:
        for folder in sorted(results.glob("sub-*")):
            subject = folder.name.removeprefix("sub-")
            if subject in virs:
                continue
            made = out_of_fold_native(results, subject, Path(scratch.name) / f"{subject}.nii.gz")
            if made is not None:
                virs[subject], sets[subject] = made, "train"
    wm_atlas = load_image(next(results.glob("atlas/res-*mm")) / "atlas_label-WM_probseg.nii.gz")
    rows, plateaus = [], []
    for subject in sorted(virs):
        vir = load_image(virs[subject])
        files = _native_exam(results, subject, vir)
        t1_mask = _under(results, layout.skull_strip_files(subject)["mask"])
        xfm = {
            c: _under(results, layout.transform_file(subject, c))
            for c in ("T1w", "lowT1c", "refT1c")
        }
        inside = np.asanyarray(vir.dataobj)[np.asanyarray(vir.dataobj) != 0]
        plateaus.append(
            {
                "set": sets[subject],
                "subject": subject,
                "brain_voxels": int(inside.size),
                "at_max": int((inside == inside.max()).sum()),
                "fraction_at_max": float(np.mean(inside == inside.max())),
            }
        )
        lesions = truth[(truth["subject"] == subject) & (truth["session"] == files["session"])]
        lesions = lesions[lesions["long_axis_mm"].astype(float) >= min_lesion_mm]
        if lesions.empty:
            continue
        # the full dose through the working grid, back on the quarter dose's grid as vir-T1c is
        ranges = json_load(_under(results, layout.normalize_files(subject, [])["provenance"]))[
            "refT1c"
        ]
        with tempfile.TemporaryDirectory() as tmp:
            through = load_image(
                export_native(
                    _under(results, layout.normalize_files(subject, ["refT1c"])["refT1c"]),
                    files["low"],
                    xfm["lowT1c"],
                    Path(tmp) / "ref_through_grid.nii.gz",
                    t1_mask=t1_mask,
                    t1_transform=xfm["T1w"],
                    intensity_range=(ranges["low_value"], ranges["high_value"]),
                    subject=subject,
                )
            )
        images = {
            "full": (load_image(files["ref"]), files["ref"], "refT1c"),
            "low": (load_image(files["low"]), files["low"], "lowT1c"),
            "vir": (vir, files["low"], "lowT1c"),
            "full_through_grid": (through, files["low"], "lowT1c"),
        }
        # true centres in the full dose's world; on the quarter dose's grid through the registration's rigid
        # full dose -> quarter dose alignment (the series are acquired minutes apart, about 1 mm moved)
        full_centres = lesions[["x_mm", "y_mm", "z_mm"]].to_numpy(float)
        a_ref, a_low = load_transform(xfm["refT1c"]), load_transform(xfm["lowT1c"])
        to_low = a_low @ np.linalg.inv(a_ref)
        axes = lesions["long_axis_mm"].astype(float).to_numpy()
        per_image, fine = {}, {}
        for name, (img, grid_file, channel) in images.items():
            transform = load_transform(xfm[channel])
            brain = native_brain_mask(t1_mask, xfm["T1w"], xfm[channel], grid_file)
            wm = resample_to_native(wm_atlas, img, transform, order=1) > WM_PROBABILITY
            move = np.eye(4) if channel == "refT1c" else to_low
            centres = (move[:3, :3] @ full_centres.T + move[:3, 3:4]).T
            world = _world_grid(img)
            per_image[name], _ = peak_enhancement(
                np.asanyarray(img.dataobj), world, brain, wm, list(zip(centres, axes, strict=True))
            )
            fine_part = fine_scale(np.asanyarray(img.dataobj))
            fine[name] = [
                float(fine_part[_ball(world, c, a / 2) & brain].std())
                for c, a in zip(centres, axes, strict=True)
            ]
        for k, lesion in enumerate(lesions.itertuples()):
            row = {
                "set": sets[subject],
                "subject": subject,
                "lesion": str(lesion.lesion_id),
                "kind": lesion.kind,
                "long_axis_mm": float(lesion.long_axis_mm),
            }
            row |= {f"enh_{name}": values[k] for name, values in per_image.items()}
            row["vir_over_full"] = row["enh_vir"] / row["enh_full"]
            row["vir_over_full_through_grid"] = row["enh_vir"] / row["enh_full_through_grid"]
            row["low_over_full"] = row["enh_low"] / row["enh_full"]
            row["fine_over_full"] = fine["vir"][k] / fine["full"][k]
            rows.append(row)
    scratch.cleanup()
    return {"lesions": rows, "plateaus": plateaus}


def json_load(path: Path) -> dict:
    import json

    return json.loads(Path(path).read_text())


def measure_brats(folder: Path, models: Path, out: Path) -> dict:
    case = sorted(folder.glob("*-t1n.nii.gz"))[0].name.removesuffix("-t1n.nii.gz")
    t1_img = load_image(folder / f"{case}-t1n.nii.gz")
    t1 = np.asanyarray(t1_img.dataobj)
    t1c = np.asanyarray(load_image(folder / f"{case}-t1c.nii.gz").dataobj)
    t2 = np.asanyarray(load_image(folder / f"{case}-t2w.nii.gz").dataobj)
    brain = t1 > 0
    low = t1 + 0.25 * (t1c - t1)
    out.mkdir(parents=True, exist_ok=True)
    exam = out / "exam"
    save_image(low, t1_img.affine, exam / "low.nii.gz")
    # Stand-in DWI (no DWI in BraTS): b0 = T1 (so that it registers onto the T1), ADC from T2w contrast.
    lo, hi = np.percentile(t2[brain], [1, 99.5])
    adc = np.where(brain, 0.7e-3 + 2.3e-3 * np.clip((t2 - lo) / (hi - lo), 0, 1), 0.0)
    b0 = np.where(brain, t1, 0.0)
    dwi = np.stack([b0, b0 * np.exp(-1000.0 * adc)], axis=-1).astype(np.float32)
    nib.save(nib.Nifti1Image(dwi, t1_img.affine), exam / "dwi.nii.gz")
    (exam / "dwi.bval").write_text("0 1000\n")
    predicted = out / "predict"
    cmd = [
        str(REPO / ".venv" / "bin" / "virtual-contrast"),
        "predict",
        "--models",
        str(models),
        "--t1",
        str(folder / f"{case}-t1n.nii.gz"),
        "--flair",
        str(folder / f"{case}-t2f.nii.gz"),
        "--low",
        str(exam / "low.nii.gz"),
        "--dwi",
        str(exam / "dwi.nii.gz"),
        "--bval",
        str(exam / "dwi.bval"),
        "--subject",
        "brats",
        "--out",
        str(predicted),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"predict failed:\n{done.stderr}")
    vir = np.asanyarray(
        load_image(predicted / layout.predicted_name("brats", layout.NATIVE_SPACE)).dataobj
    )
    vir_brain = vir[vir != 0]
    stats = {}
    for name, values in (("full", t1c[brain]), ("low", low[brain]), ("vir", vir_brain)):
        p50, p99, p999 = np.percentile(values, [50, 99, 99.9])
        stats[name] = {"p50": p50, "p99": p99, "p99_9": p999, "max": float(values.max())}
    return {
        "case": case,
        "images": stats,
        "vir_max_over_low_p99": stats["vir"]["max"] / stats["low"]["p99"],
        "vir_at_max": int((vir_brain == vir_brain.max()).sum()),
        "vir_fraction_at_max": float(np.mean(vir_brain == vir_brain.max())),
        "low_voxels_above_vir_max": int((low[brain] > vir_brain.max()).sum()),
        "adc_stand_in": "0.7e-3 + 2.3e-3 * T2w scaled to [0, 1] between its 1st and 99.5th brain percentiles",
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--results", type=Path, help="a results folder of make demo")
    ap.add_argument("--min-lesion-mm", type=float, default=10.0)
    ap.add_argument(
        "--out-of-fold",
        action="store_true",
        help="add the training patients, from their out-of-fold predictions (with --results)",
    )
    ap.add_argument("--brats", type=Path, help="the BraTS-MET-00110 folder")
    ap.add_argument("--models", type=Path, help="fold models (with --brats)")
    ap.add_argument(
        "--work", type=Path, default=REPO / "benchmarks" / "out" / "brats", help="work folder"
    )
    args = ap.parse_args()
    report: dict = {}
    if args.results:
        demo = measure_demo(args.results, args.min_lesion_mm, args.out_of_fold)
        table = pd.DataFrame(demo["lesions"])
        plateaus = pd.DataFrame(demo["plateaus"])
        pd.set_option("display.width", 200)
        print(f"lesions >= {args.min_lesion_mm:g} mm, peak enhancement relative to white matter:")
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        for group, rows in table.groupby("set", sort=False):
            for column in ("vir_over_full", "vir_over_full_through_grid", "low_over_full"):
                values = rows[column]
                within = int(((values >= 0.8) & (values <= 1.2)).sum())
                print(
                    f"{group} {column}: median {values.median():.3f}, range {values.min():.3f}-"
                    f"{values.max():.3f}, within ±20 %: {within} of {len(values)}"
                )
            print(f"{group} fine_over_full: median {rows['fine_over_full'].median():.3f}")
        print("native vir-T1c, brain voxels at the image's maximum:")
        print(plateaus.to_string(index=False))
        print(f"largest fraction at the maximum: {plateaus['fraction_at_max'].max():.2e}")
        report["demo"] = demo
    if args.brats:
        if not args.models:
            raise SystemExit("--brats needs --models")
        brats = measure_brats(args.brats, args.models, args.work)
        print(
            f"{brats['case']}: brain percentiles (quarter dose simulated as T1 + 0.25 (T1c - T1))"
        )
        for name, s in brats["images"].items():
            print(
                f"  {name:5s} p50 {s['p50']:8.1f}  p99 {s['p99']:8.1f}  p99.9 {s['p99_9']:8.1f}  "
                f"max {s['max']:8.1f}"
            )
        print(
            f"vir-T1c max / quarter dose p99 = {brats['vir_max_over_low_p99']:.3f} (must be > 1); "
            f"{brats['vir_at_max']} voxels at vir's maximum ({brats['vir_fraction_at_max']:.2e}); "
            f"quarter-dose brain voxels above vir's maximum: {brats['low_voxels_above_vir_max']}"
        )
        report["brats"] = brats
    if not report:
        ap.error("give --results and/or --brats")
    write_json(report, OUT)
    print(f"written to {OUT}")


if __name__ == "__main__":
    main()
