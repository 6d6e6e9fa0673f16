"""The simulated low-dose T1c against the embedded cohort's acquired one, where the truth exists.

    python benchmarks/simulate_low_dose.py [--subjects vc002 vc009 ...] [--workdir DIR] [--figure vc002]

Each cohort exam (the demo's settings: seed 2021, 2 mm native voxel, with its truth maps) has a pre-contrast T1,
an acquired quarter-dose T1c and the full dose, each an acquisition of its own. From the pre-contrast T1 and
the full dose, the simulator (:mod:`virtual_contrast.preprocess.low_dose`: one rigid alignment per exam, then
each dose model) makes a low dose, and two baselines come from the same aligned, matched pre-contrast T1:

* ``plain subtraction``: ref − 0.75 (ref − pre), the usual simulation;
* ``denoised subtraction``: ref − (1 − d) Δ̃ with the simulator's own weighted, dose-scaled enhancement Δ̃:
  the recipe's subtraction without fresh noise.

Measured (tests/low_dose_checks.py): lesion enhancement relative to white matter, simulated / acquired, on the
true lesions of ≥ 10 mm (goal 0.85-1.15); the noise level in the air inside the field of view relative to the
full dose's (goal 0.8-1.2) and its correlation with the full dose's noise there (goal |r| < 0.2); the same
level and correlations in white matter (high-pass residuals: independent acquisitions show a few hundredths of
shared anatomy there, and about 0.2-0.25). Training and test patients of the demo's split are reported apart:
the simulator's settings were chosen on training patients only. Writes ``benchmarks/out/simulate_low_dose.json``
and a figure of one exam (``--figure``) to ``benchmarks/out/simulate_low_dose.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO / "tests", REPO):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from low_dose_checks import ExamTruth, enhancement_ratios, noise_measures  # noqa: E402

from virtual_contrast.atlas import build_atlas  # noqa: E402
from virtual_contrast.cohort.anatomy import head_model  # noqa: E402
from virtual_contrast.cohort.exam import make_exam  # noqa: E402
from virtual_contrast.io import load_image  # noqa: E402
from virtual_contrast.preprocess import low_dose  # noqa: E402
from virtual_contrast.preprocess.enhancement import (  # noqa: E402
    enhancement_probability,
    match_intensities,
    scale_enhancement,
    smooth_within,
)
from virtual_contrast.preprocess.noise import robust_std  # noqa: E402
from virtual_contrast.preprocess.registration import select_backend  # noqa: E402
from virtual_contrast.preprocess.transforms import voxel_sizes  # noqa: E402
from virtual_contrast.subjects import assign_split  # noqa: E402

SEED, VOXEL_MM, N_SUBJECTS = 2021, 2.0, 20  # config.yaml: the demo's cohort
GOALS = {"enhancement": (0.85, 1.15), "noise_ratio": (0.8, 1.2), "air_r_ref": 0.2}
METHODS = (
    "acquired",
    "simulated, spgr",
    "simulated, linear",
    "plain subtraction",
    "denoised subtraction",
)


def make_exams(subjects: list[str], folder: Path) -> dict[str, dict[str, Path]]:
    """The T1 series, lesion table and truth maps of each exam, as the demo's cohort rule makes them."""
    model = head_model(build_atlas(VOXEL_MM)[0])
    out = {}
    for subject in subjects:
        d = folder / subject
        paths = {k: d / f"{subject}_{k}.nii.gz" for k in ("t1", "low", "ref")}
        if not all(p.exists() for p in paths.values()):
            make_exam(
                paths,
                d / "lesions.tsv",
                subject=subject,
                session="",
                seed=SEED,
                model=model,
                native_voxel_mm=VOXEL_MM,
                truth_dir=d / "truth",
            )
        out[subject] = {**paths, "lesions": d / "lesions.tsv", "truth": d / "truth"}
    return out


def simulate_all(paths: dict[str, Path], subject: str) -> tuple[dict[str, np.ndarray], dict]:
    """Every method's low dose of one exam on the full dose's grid, and the simulator's record (spgr)."""
    pre_img, ref_img = load_image(paths["t1"]), load_image(paths["ref"])
    ref = np.asanyarray(ref_img.dataobj, np.float32)
    voxel = voxel_sizes(ref_img.affine)
    pre, covered, _ = low_dose.align_pre_contrast(
        pre_img, ref_img, select_backend("simpleitk", threads=1)
    )
    base_options = low_dose.default_low_dose_options()
    images, records = {}, {}
    for model in ("spgr", "linear"):
        options = low_dose.LowDoseOptions(
            dose_fraction=base_options.dose_fraction,
            model=model,
            t10_s=base_options.t10_s,
            seed=base_options.seed,
        ).resolved(paths["ref"])
        rng = low_dose.subject_rng(options.seed, subject)
        sim, records[model] = low_dose.simulate_arrays(pre, ref, covered, voxel, options, rng)
        images[f"simulated, {model}"] = np.round(sim)
    # The baselines, from the same aligned pre-contrast T1 and the simulator's own steps.
    d = base_options.dose_fraction
    support = low_dose.noise_support(ref)
    head, air = low_dose.head_and_air(ref, support, voxel)
    tissue = head & covered
    match = match_intensities(pre, ref, low_dose.fit_region(tissue & (ref > 0), air, voxel))
    delta = np.where(covered & support, ref - match.apply(pre), 0.0)
    images["plain subtraction"] = ref - (1 - d) * delta
    smoothed = smooth_within(delta, tissue, low_dose.ENHANCEMENT_SMOOTHING_VOX)
    probability = enhancement_probability(
        smoothed, robust_std(smoothed[tissue]), low_dose.ENHANCEMENT_Z
    )
    weighted = probability * tissue * np.maximum(delta, 0.0)
    spgr = low_dose.LowDoseOptions(d, "spgr", base_options.t10_s, 0).resolved(paths["ref"])
    base = match.apply(pre)
    low_part = scale_enhancement(
        base, weighted, d, model="spgr", tr_ms=spgr.tr_ms, flip_deg=spgr.flip_deg, t10_s=spgr.t10_s
    )
    images["denoised subtraction"] = ref - (weighted - low_part)
    return images, records["spgr"]


def summarise(rows: list[dict]) -> list[str]:
    """One line per method and split: lesion ratio, air noise ratio and r, white-matter ratio and r."""
    lines = [
        f"{'method':<22} {'patients':<6} {'lesions':>7} {'enh. ratio mean (range)':>24} "
        f"{'air noise':>10} {'air r(ref)':>10} {'WM noise':>9} {'WM r(ref)':>9} {'WM r(pre)':>9}"
    ]
    for split in ("train", "test"):
        for method in METHODS:
            sel = [r for r in rows if r["split"] == split and r["method"] == method]
            if not sel:
                continue
            ratios = [x["ratio"] for r in sel for x in r["lesions"]]
            enh = f"{np.mean(ratios):.3f} ({min(ratios):.2f}-{max(ratios):.2f})" if ratios else "-"
            mean = {k: np.mean([r["noise"][k] for r in sel]) for k in sel[0]["noise"]}
            worst_r = max(abs(r["noise"]["air_r_ref"]) for r in sel)
            lines.append(
                f"{method:<22} {split:<6} {len(ratios):>7} {enh:>24} {mean['noise_ratio']:>10.3f} "
                f"{mean['air_r_ref']:>6.3f} ({worst_r:.3f}) {mean['wm_noise_ratio']:>5.3f} "
                f"{mean['wm_r_ref']:>9.3f} {mean['wm_r_pre']:>9.3f}"
            )
    return lines


def verdict(rows: list[dict], method: str) -> dict:
    sel = [r for r in rows if r["method"] == method]
    ratios = [x["ratio"] for r in sel for x in r["lesions"]]
    low, high = GOALS["enhancement"]
    nlow, nhigh = GOALS["noise_ratio"]
    return {
        "enhancement_mean": float(np.mean(ratios)) if ratios else None,
        "enhancement": bool(ratios) and low <= float(np.mean(ratios)) <= high,
        "noise_level": all(nlow <= r["noise"]["noise_ratio"] <= nhigh for r in sel),
        "independent": all(abs(r["noise"]["air_r_ref"]) < GOALS["air_r_ref"] for r in sel),
    }


def figure(images: dict[str, np.ndarray], pre: np.ndarray, truth: ExamTruth, path: Path) -> None:
    """An axial slice through the largest lesion of each image, its neighbourhood enlarged, and a corner of air
    at a noise window."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    masks = truth.lesion_masks()
    if masks:  # through the centre of the largest lesion (a ring's cap would show a disc of wall)
        lesion_id = max(masks, key=lambda i: masks[i].sum())
        k = int(round(np.argwhere(truth.lesions == lesion_id)[:, 2].mean()))
    else:
        k = truth.dseg.shape[2] // 2
    panels = {"pre-contrast T1": pre, **images}
    fig, axes = plt.subplots(3, len(panels), figsize=(3 * len(panels), 9.6))
    centre = (
        np.round(np.argwhere(truth.lesions == lesion_id).mean(0)).astype(int)
        if masks
        else np.asarray(truth.dseg.shape) // 2
    )
    zoom = tuple(slice(max(c - 20, 0), c + 20) for c in centre[:2])
    ref = images["full dose"]
    vmax = float(np.percentile(ref[truth.dseg > 0], 99.5))
    noise_max = float(np.percentile(ref[truth.air()], 99))
    for col, (name, img) in enumerate(panels.items()):
        axes[0, col].imshow(img[:, :, k].T, cmap="gray", origin="lower", vmin=0, vmax=vmax)
        axes[0, col].set_title(name, fontsize=9)
        axes[1, col].imshow(
            img[zoom[0], zoom[1], k].T, cmap="gray", origin="lower", vmin=0, vmax=vmax
        )
        axes[1, col].set_title("lesion, enlarged", fontsize=8)
        corner = img[:40, :40, k]  # the field of view's corner: air around the rotated head
        axes[2, col].imshow(corner.T, cmap="gray", origin="lower", vmin=0, vmax=noise_max)
        axes[2, col].set_title("air (noise window)", fontsize=8)
    for ax in axes.ravel():
        ax.set_axis_off()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--subjects", nargs="+", help="cohort ids (default: the demo's 20 patients)"
    )
    parser.add_argument(
        "--workdir", type=Path, help="where the exams are written (default: temporary)"
    )
    parser.add_argument("--figure", default="vc002", help="exam drawn (default: %(default)s)")
    args = parser.parse_args(argv)
    everyone = [f"vc{i:03d}" for i in range(1, N_SUBJECTS + 1)]
    split = assign_split(everyone, test_fraction=0.25, seed=SEED)  # the demo's split
    subjects = args.subjects or everyone
    with tempfile.TemporaryDirectory(prefix="vc-simlow-") as tmp:
        workdir = args.workdir or Path(tmp)
        start = time.perf_counter()
        exams = make_exams(subjects, workdir)
        rows = []
        for subject, paths in exams.items():
            images, record = simulate_all(paths, subject)
            truth = ExamTruth.load(paths["truth"] / f"sub-{subject}" / "anat", paths["lesions"])
            acquired = np.asanyarray(load_image(paths["low"]).dataobj, np.float32)
            ref = np.asanyarray(load_image(paths["ref"]).dataobj, np.float32)
            pre = np.asanyarray(load_image(paths["t1"]).dataobj, np.float32)
            for method, image in {"acquired": acquired, **images}.items():
                rows.append(
                    {
                        "subject": subject,
                        "split": split.get(subject, "train"),
                        "method": method,
                        "noise": noise_measures(image, ref, pre, truth),
                        "lesions": enhancement_ratios(
                            image,
                            acquired,
                            pre,
                            truth,
                            image_pose="low" if method == "acquired" else "ref",
                        ),
                    }
                )
            print(
                f"{subject} ({split.get(subject)}): noise sigma {record['noise']['sigma']:.1f} from "
                f"{record['noise']['source']}, intensity scale {record['intensity_match']['scale']:.3f}, "
                f"{len(rows[-1]['lesions'])} lesion(s) >= 10 mm",
                flush=True,
            )
            if subject == args.figure:
                figure(
                    {"full dose": ref, "acquired low": acquired, **images},
                    pre,
                    truth,
                    REPO / "benchmarks" / "out" / "simulate_low_dose.png",
                )
        seconds = time.perf_counter() - start
    print()
    print("\n".join(summarise(rows)))
    print()
    verdicts = {method: verdict(rows, method) for method in METHODS}
    for method, v in verdicts.items():
        print(
            f"{method:<22} enhancement {'PASS' if v['enhancement'] else 'FAIL'}, noise level "
            f"{'PASS' if v['noise_level'] else 'FAIL'}, independent noise "
            f"{'PASS' if v['independent'] else 'FAIL'}"
        )
    print(f"\n{len(exams)} exams in {seconds / 60:.1f} min")
    out = REPO / "benchmarks" / "out" / "simulate_low_dose.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "verdicts": verdicts}, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
