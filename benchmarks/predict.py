"""Per-exam prediction time with the paper's 40 passes (5 fold models × 8 mirror configurations).

Compares, in the same run and on the same random weights and input:
- naive: fp32, NCDHW, one model and one mirror configuration per forward pass (the straightforward loop);
- tta_predict (the library's path) in bf16 (fp16 on GPUs without bf16), mirrors batched, NDHWC, and variants.
Prints seconds per exam, the speed-up over naive, achieved TFLOP/s (FLOPs from torch's counter), the fraction
of the GPU's dense bf16 peak and the largest difference to the fp32 result.
Then the cost of the uncertainty map's spreads: tta_ensemble (the same passes plus a sum of squares per model)
and the calibrated map from them (features, trees; a calibration fitted on random numbers: the same cost) against
tta_predict with the default settings, timed alternately, as a ratio (goal: at most 1.10).

On a CUDA GPU the grid is 160×192×160 (the paper's). Without one it runs the same code on a reduced grid
(default 32×48×32) and says so; use --shape to force a size. Goal: ≤ 1 s per exam on one H100 (the paper: 16 s on a V100).

    .venv/bin/python benchmarks/predict.py [--shape 160 192 160] [--width 16] [--models 5] [--compile]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from _common import (
    CPU_GRID,
    FULL_GRID,
    device_report,
    peak_memory_gb,
    reset_peak_memory,
    timed,
    write_results,
)
from torch import nn

from virtual_contrast.model.predict import (
    flip_configs,
    tta_ensemble,
    tta_predict,
    tta_predict_naive,
)
from virtual_contrast.model.runtime import resolve_amp
from virtual_contrast.model.uncertainty import FEATURES, fit_calibration, uncertainty_map
from virtual_contrast.model.unet import UNet3D, UNetSpec, count_flops, count_parameters


def make_models(spec: UNetSpec, n: int, device: torch.device) -> list[nn.Module]:
    models = []
    for i in range(n):
        torch.manual_seed(i)
        m = UNet3D(spec)
        nn.init.normal_(
            m.head.weight, std=1.0
        )  # a non-constant output, so the accuracy check means something
        models.append(m.to(device).eval())
    return models


def brain_sized_mask(shape: tuple[int, ...]) -> np.ndarray:
    """An ellipsoid of about 37 % of the grid's voxels, as a brain fills 40 % of the demo's crop (31,000 of
    76,800 voxels) and about 30 % of the paper's: the map is computed on the brain's voxels only."""
    axes = [np.linspace(-1, 1, n) for n in shape]
    r2 = sum(a**2 for a in np.meshgrid(*axes, indexing="ij"))
    # the unit ball fills pi/6 of its cube; the radius for 40 % (the grid's end points make it 37 %)
    return r2 <= (0.4 / (np.pi / 6)) ** (2 / 3)


def time_spread(models, x, kw: dict, device: torch.device, repeats: int) -> float:
    """Median time of tta_ensemble over that of tta_predict, the two timed alternately (a busy machine's
    drift falls on both)."""
    if device.type == "cuda":
        fmt = torch.channels_last_3d if kw.get("channels_last") else torch.contiguous_format
        for m in models:
            m.to(memory_format=fmt)
    rng = np.random.default_rng(0)
    calibration = fit_calibration(
        [(rng.random((20000, len(FEATURES))), rng.random(20000))], ["random"]
    )
    brain = brain_sized_mask(tuple(x.shape[2:]))

    def with_map():
        ens = tta_ensemble(models, x, **kw)
        mean = ens.mean[0, 0].cpu().numpy()
        channels = x[0].cpu().numpy()
        uncertainty_map(
            calibration,
            vir=mean,
            low=channels[-1],
            pre=channels[-2],
            std_passes=ens.std_passes[0, 0].cpu().numpy(),
            std_mirrors=ens.std_mirrors[0, 0].cpu().numpy(),
            mask=brain,
        )

    plain, spread = [], []
    for _ in range(repeats):
        plain.append(timed(lambda: tta_predict(models, x, **kw), device, 1, warmup=0))
        spread.append(timed(with_map, device, 1, warmup=0))
    ratio = float(np.median(spread) / np.median(plain))
    print(
        f"\nuncertainty map (tta_ensemble + calibrated map vs tta_predict, {repeats} alternate runs): "
        f"{np.median(spread):.3f} s vs {np.median(plain):.3f} s per exam, ratio {ratio:.3f} "
        f"(goal <= 1.10: {'MET' if ratio <= 1.10 else 'NOT MET'})"
    )
    return ratio


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--shape", type=int, nargs=3, help="grid (default 160 192 160 on GPU, 32 48 32 on CPU)"
    )
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--depth", type=int, default=5)
    ap.add_argument("--models", type=int, default=5)
    ap.add_argument(
        "--repeats", type=int, help="timed runs per method (default 3 on GPU, 1 on CPU)"
    )
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--no-naive", action="store_true", help="skip the naive loop")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd models")
    args = ap.parse_args()

    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    desc, peak = device_report(device)
    repeats = args.repeats or (3 if device.type == "cuda" else 1)
    shape = tuple(args.shape) if args.shape else (FULL_GRID if device.type == "cuda" else CPU_GRID)
    print(f"device: {desc}")
    if device.type != "cuda" and shape != FULL_GRID:
        print(
            f"NOTE: no CUDA GPU: reduced grid {'×'.join(map(str, shape))} instead of "
            f"{'×'.join(map(str, FULL_GRID))}; same code path. Per-exam times are not comparable to the goal."
        )
    spec = UNetSpec(in_channels=4, width=args.width, depth=args.depth)
    models = make_models(spec, args.models, device)
    n_pass = args.models * len(flip_configs("all8"))
    flops_pass = count_flops(spec, shape)
    flops_exam = n_pass * flops_pass
    print(
        f"UNet width {args.width} depth {args.depth}: {count_parameters(models[0]) / 1e6:.2f} M parameters, "
        f"{flops_pass / 1e12:.3f} TFLOP per pass at {'×'.join(map(str, shape))}; "
        f"{n_pass} passes = {flops_exam / 1e12:.2f} TFLOP per exam"
    )
    torch.manual_seed(0)
    x = torch.rand(1, 4, *shape, device=device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    variants: list[tuple[str, dict]] = []
    amp_name = "fp32"
    if device.type == "cuda":
        amp_name = str(resolve_amp("auto", device)).removeprefix("torch.")
        variants += [
            (
                f"{amp_name}, 8 mirrors per batch, NDHWC (default)",
                dict(batch=8, channels_last=True),
            ),
            (f"{amp_name}, 8 mirrors per batch, NCDHW", dict(batch=8, channels_last=False)),
            (f"{amp_name}, 4 mirrors per batch, NDHWC", dict(batch=4, channels_last=True)),
            (f"{amp_name}, 1 mirror per batch, NDHWC", dict(batch=1, channels_last=True)),
        ]
    else:
        variants += [("tta_predict: fp32, mirrors batched (auto batch)", dict())]

    results = {"device": desc, "shape": shape, "width": args.width, "depth": args.depth,
               "models": args.models, "passes": n_pass, "tflop_per_exam": flops_exam / 1e12,
               "variants": {}}  # fmt: skip
    reference = None
    naive_s = None
    rows = []
    if not args.no_naive:
        if device.type == "cuda":
            models = [m.to(memory_format=torch.contiguous_format) for m in models]
        reset_peak_memory(device)
        reference = tta_predict_naive(models, x)
        naive_s = timed(lambda: tta_predict_naive(models, x), device, repeats, warmup=0)
        label = "naive: fp32" + (" (TF32 convs, PyTorch default)" if device.type == "cuda" else "")
        rows.append((f"{label}, one pass at a time", naive_s, peak_memory_gb(device), 0.0))

    compiled = None
    if args.compile:
        compiled = [torch.compile(m) for m in models]
        variants.append(
            (f"{variants[0][0]} + torch.compile", dict(variants[0][1], use_compiled=True))
        )

    for name, kw in variants:
        kw = dict(kw)
        use = compiled if kw.pop("use_compiled", False) else models
        if device.type == "cuda":
            fmt = torch.channels_last_3d if kw.get("channels_last") else torch.contiguous_format
            for m in models:
                m.to(memory_format=fmt)
        reset_peak_memory(device)
        out = tta_predict(use, x, **kw)
        err = float((out - reference).abs().max()) if reference is not None else float("nan")
        s = timed(lambda use=use, kw=kw: tta_predict(use, x, **kw), device, repeats, warmup=0)
        rows.append((name, s, peak_memory_gb(device), err))

    print(f"\n{'method':55s} {'s/exam':>8s} {'×naive':>7s} {'TFLOP/s':>8s} {'%peak':>6s} "
          f"{'GB':>6s} {'max|Δ|':>8s}")  # fmt: skip
    for name, s, mem, err in rows:
        speedup = naive_s / s if naive_s else float("nan")
        tflops = flops_exam / s / 1e12
        pct = f"{100 * tflops / peak:5.1f}" if peak else "  n/a"
        mem_s = f"{mem:6.1f}" if mem is not None else "   n/a"
        print(f"{name:55s} {s:8.3f} {speedup:7.1f} {tflops:8.2f} {pct:>6s} {mem_s} {err:8.1e}")
        results["variants"][name] = {"seconds_per_exam": s, "speedup_vs_naive": speedup,
                                     "tflops": tflops, "peak_gb": mem, "max_abs_diff_vs_fp32": err}  # fmt: skip
    spread_ratio = time_spread(models, x, variants[0][1], device, max(repeats, 3))
    results["spread_time_ratio"] = spread_ratio
    if device.type == "cuda" and shape == FULL_GRID:
        best = min(s for _, s, _, _ in rows)
        print(
            f"\ngoal ≤ 1 s per exam on one H100: best {best:.3f} s → {'MET' if best <= 1 else 'NOT MET'}"
        )
    print(f"results: {write_results('predict', results)}")


if __name__ == "__main__":
    main()
