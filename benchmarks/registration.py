"""Registration speed and accuracy: known affine on the atlas, and a raw clinical T1 with skull.

    python benchmarks/registration.py [--voxel-mm 1] [--seeds 0 1 2] [--threads N] [--out benchmarks/out]

1. Known affine: the atlas T1 is moved by a seeded random 12-DOF affine (rotations <= 10 deg, translations
   <= 15 mm, scales 0.9-1.1) onto an oblique-free LAS grid of 1.2x the atlas voxel, and registered back with
   each available backend (simpleitk; fsl when FSL is installed). Error = displacement between the true and
   the estimated transform over the atlas brain voxels (mean, max).
2. TCGA-FG-6692 (../shared/data): the raw T1 (skull, 0.9 x 0.9 x 5.5 mm oblique slices), its brain extracted
   by deepbet, -> atlas brain to brain, scored by the Dice of that brain mask carried to the atlas vs the
   official atlas brain mask (truth only; the registration uses no official mask); then the whole subject
   (T1 + T1c as low and ref dose + FLAIR + T2 standing in for the ADC: 5 sequences), as the `register` rule
   runs it.
3. A QC figure of the registered T1 with the atlas brain-mask contour (3 orthogonal slices).

Prints one table: wall seconds and CPU seconds of this process (all threads), and the load average, because
wall time on a shared machine says little by itself; then the ratios of the embedded backend as configured
(one thread, the outline match on ~50,000 sampled points) to the baseline run beside it ("before": every
voxel in the outline match, ITK on all cores).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SHARED = Path(os.environ.get("VC_SHARED_DATA", REPO.parent / "shared" / "data"))
MASKS = SHARED / "mni_icbm152_09a_sym_masks_niak"
TCGA = SHARED / "tcga_fg_6692_raw"
BASELINE = "before"


def random_affine(rng: np.random.Generator, centre: np.ndarray) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    lin = Rotation.from_euler("xyz", rng.uniform(-10, 10, 3), degrees=True).as_matrix()
    lin = lin @ np.diag(rng.uniform(0.9, 1.1, 3))
    out = np.eye(4)
    out[:3, :3] = lin
    out[:3, 3] = centre - lin @ centre + rng.uniform(-15, 15, 3)
    return out


def displacement(a: np.ndarray, b: np.ndarray, mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    ijk = np.argwhere(mask > 0.5)
    pts = affine @ np.c_[ijk, np.ones(len(ijk))].T
    return np.linalg.norm(((a - b) @ pts)[:3], axis=0)


def plot_registration_qc(image: np.ndarray, atlas, out: Path, title: str) -> Path:
    """Registered image (grey) with the atlas brain-mask contour (red), sagittal, coronal, axial mid-slices."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    centre = np.round(np.argwhere(atlas.brain_mask > 0.5).mean(0)).astype(int)
    vmax = float(np.percentile(image[atlas.brain_mask > 0.5], 99.5))
    views = [
        ("sagittal", np.s_[centre[0], :, :]),
        ("coronal", np.s_[:, centre[1], :]),
        ("axial", np.s_[:, :, centre[2]]),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.8))
    for ax, (name, sl) in zip(axes, views, strict=True):
        ax.imshow(image[sl].T, origin="lower", cmap="gray", vmin=0, vmax=vmax)
        ax.contour(atlas.brain_mask[sl].T, levels=[0.5], colors="red", linewidths=0.8)
        ax.set_title(name)
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--voxel-mm", type=float, default=1.0, help="atlas grid (default: 1 mm)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--threads", type=int, default=1, help="SimpleITK threads (default: 1, bit-reproducible)"
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "registration")
    args = parser.parse_args()

    import nibabel as nib

    from virtual_contrast.atlas import build_atlas
    from virtual_contrast.io import load_image
    from virtual_contrast.preprocess import register as reg
    from virtual_contrast.preprocess import transforms as tf
    from virtual_contrast.preprocess.quality import dice
    from virtual_contrast.preprocess.registration import fsl
    from virtual_contrast.preprocess.registration.sitk_backend import SimpleITKBackend

    t0 = time.perf_counter()
    atlas, _ = build_atlas(args.voxel_mm)
    official = None
    if MASKS.exists():
        official = tf.resample(
            load_image(MASKS / "mni_icbm152_t1_tal_nlin_sym_09a_mask.mnc.gz"),
            atlas.shape,
            atlas.affine,
            np.eye(4),
            order=0,
        )
    print(f"atlas {atlas.shape} at {args.voxel_mm:g} mm built in {time.perf_counter() - t0:.1f} s")
    backends = {
        "simpleitk": SimpleITKBackend(threads=args.threads),
        # The baseline, in the same run: the outline match on every voxel and ITK on all cores (before).
        BASELINE: SimpleITKBackend(threads=None, outline_samples=None),
    }
    flirt, why = fsl.find_flirt()
    if flirt:
        backends["fsl"] = fsl.FSLBackend(flirt)
    else:
        print(f"fsl: not benchmarked ({why})")

    rows = []
    atlas_img = atlas.image("t1")
    brain_centre = (atlas.affine @ np.r_[np.argwhere(atlas.brain_mask > 0.5).mean(0), 1.0])[:3]
    vox = 1.2 * args.voxel_mm
    shape = tuple(int(s * 1.1 / 1.2) for s in atlas.shape)
    mov_affine = np.diag([-vox, vox, vox, 1.0])
    mov_affine[:3, 3] = brain_centre - mov_affine[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    for seed in args.seeds:
        truth = random_affine(np.random.default_rng(seed), brain_centre)
        moving = nib.Nifti1Image(
            tf.resample(atlas_img, shape, mov_affine, np.linalg.inv(truth)), mov_affine
        )
        before = displacement(np.eye(4), truth, atlas.brain_mask, atlas.affine).mean()
        for name, backend in backends.items():
            t, c = time.perf_counter(), time.process_time()
            result = reg.register_images(
                moving, atlas_img, backend=backend, reference_mask=atlas.brain_mask
            )
            seconds, cpu = time.perf_counter() - t, time.process_time() - c
            err = displacement(result.transform, truth, atlas.brain_mask, atlas.affine)
            rows.append(
                (
                    f"known affine, seed {seed} (start {before:.1f} mm)",
                    name,
                    seconds,
                    cpu,
                    err.mean(),
                    err.max(),
                    "",
                )
            )
            print(rows[-1], flush=True)

    if (TCGA / "t1.nii.gz").exists():
        from virtual_contrast.preprocess.options import default_options
        from virtual_contrast.preprocess.skull_strip import skull_strip

        t1 = load_image(TCGA / "t1.nii.gz")
        args.out.mkdir(parents=True, exist_ok=True)
        mask_path = args.out / "tcga_t1_brain_mask.nii.gz"
        skull_strip(TCGA / "t1.nii.gz", mask_path, default_options().skull_strip)
        brain = load_image(mask_path)
        truth = official if official is not None else atlas.brain_mask
        for name, backend in backends.items():
            t, c = time.perf_counter(), time.process_time()
            result = reg.register_brain_to_atlas(
                t1, np.asanyarray(brain.dataobj) > 0, atlas, backend
            )
            seconds, cpu = time.perf_counter() - t, time.process_time() - c
            on_atlas = tf.carry_mask(brain, atlas.shape, atlas.affine, result.transform)
            score = dice(on_atlas, truth)
            rows.append(
                (
                    "TCGA-FG-6692 T1 -> atlas",
                    name,
                    seconds,
                    cpu,
                    np.nan,
                    np.nan,
                    f"Dice {score:.3f}",
                )
            )
            print(rows[-1], flush=True)
            image = backend.resample(t1, atlas.shape, atlas.affine, result.transform, order=3)
            png = plot_registration_qc(
                image,
                atlas,
                args.out / f"tcga_t1_{name}_{args.voxel_mm:g}mm_qc.png",
                f"TCGA-FG-6692 T1 on the ICBM 2009a atlas ({args.voxel_mm:g} mm, {name}); "
                f"red: atlas brain mask; brain Dice {score:.3f}",
            )
            print(f"QC figure: {png}")
        for name, backend in backends.items():
            channels = {
                "FLAIR": (TCGA / "flair.nii.gz",) * 2,
                "ADC": (TCGA / "t2.nii.gz",) * 2,  # stand-in: no DWI for this case
                "lowT1c": (TCGA / "t1c.nii.gz",) * 2,
                "refT1c": (TCGA / "t1c.nii.gz",) * 2,
            }
            out = args.out / f"subject_{name}"
            t, c = time.perf_counter(), time.process_time()
            prov = reg.register_subject(
                TCGA / "t1.nii.gz",
                mask_path,
                channels,
                atlas,
                {c: out / f"{c}.nii.gz" for c in ["T1", *channels]},
                {c: out / f"{c}_xfm.txt" for c in ["T1", *channels]},
                out / "mask.nii.gz",
                backend,
                subject="TCGA",
            )
            seconds, cpu = time.perf_counter() - t, time.process_time() - c
            rigid = ", ".join(
                f"{c} {v['registration']['seconds']:.1f}s" for c, v in prov["channels"].items()
            )
            rows.append(("TCGA subject, 5 sequences", name, seconds, cpu, np.nan, np.nan, rigid))
            print(rows[-1], flush=True)
    else:
        print(f"TCGA case not found under {TCGA}: skipped")

    print()
    print(f"atlas grid {args.voxel_mm:g} mm {atlas.shape}; load average {os.getloadavg()[0]:.1f}")
    print(
        f"{'case':<40} {'backend':<10} {'wall s':>7} {'cpu s':>7} {'mean mm':>8} {'max mm':>8}  note"
    )
    for case, name, seconds, cpu, mean, worst, note in rows:
        print(f"{case:<40} {name:<10} {seconds:7.1f} {cpu:7.1f} {mean:8.3f} {worst:8.3f}  {note}")
    baseline = {case: (seconds, cpu) for case, name, seconds, cpu, *_ in rows if name == BASELINE}
    print(
        f"\nsimpleitk against {BASELINE} (outline match on every voxel, ITK on all cores), same run:"
    )
    for case, name, seconds, cpu, *_ in rows:
        if name == "simpleitk" and case in baseline:
            wall0, cpu0 = baseline[case]
            print(f"  {case:<40} wall x{seconds / wall0:.2f}, CPU x{cpu / cpu0:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
