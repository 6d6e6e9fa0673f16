"""Training speed: steps per second, achieved TFLOP/s, and the projected time of one fold.

Part 1 times the library's training step (``virtual_contrast.model.train.train_step``) on a batch already on
the device, in the library's mixed-precision configuration (bf16 autocast, NDHWC, fused Adam on GPUs) and in a
naive fp32 configuration (NCDHW, fp32, default Adam), and the tuning forward pass. From these it projects one
fold of the paper: 300 epochs × 85 training subjects + 22 tuning subjects evaluated per epoch.

Part 2 runs ``train_fold`` end to end on synthetic subjects (NIfTI → cache → resident batches → flips on the
device → checkpoints and logs) and compares its epoch time with the step time of part 1, so that a loader that
starves the GPU shows up as overhead.

On a CUDA GPU the grid is 160×192×160; without one the same code runs on a reduced grid (32×48×32) and says
so. Goal: one fold ≤ 1 hour on one H100 (the paper: 14.5 h on a V100).

    .venv/bin/python benchmarks/train.py [--shape 160 192 160] [--batch-size 2] [--width 16] [--compile]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from _common import (
    CPU_GRID,
    FULL_GRID,
    device_report,
    peak_memory_gb,
    reset_peak_memory,
    sync,
    write_results,
)
from toy_subjects import make_toy_subjects

from virtual_contrast.model import runtime
from virtual_contrast.model.config import TrainConfig
from virtual_contrast.model.train import split_batch, train_fold, train_step
from virtual_contrast.model.unet import UNet3D, UNetSpec, count_flops, count_parameters

EPOCHS, N_TRAIN, N_TUNE = 300, 85, 22  # the paper's fold: 107 training patients, 5 folds


def time_steps(spec, batch, device, *, amp, channels_last, fused, compile_, steps, warmup):
    torch.manual_seed(0)
    model = UNet3D(spec).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused)
    amp_dtype = runtime.resolve_amp(amp, device)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    step_model = torch.compile(model) if compile_ else model
    kw = dict(
        n_inputs=spec.in_channels,
        amp_dtype=amp_dtype,
        brain_loss=False,
        channels_last=channels_last,
    )
    reset_peak_memory(device)
    for _ in range(warmup):
        train_step(step_model, opt, scaler, batch, **kw)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        train_step(step_model, opt, scaler, batch, **kw)
    sync(device)
    step_s = (time.perf_counter() - t0) / steps
    mem = peak_memory_gb(device)
    # Tuning pass: forward only, per sample.
    step_model.eval()
    with torch.inference_mode():
        x, _, _ = split_batch(batch, spec.in_channels, channels_last)
        for _ in range(max(1, warmup)):
            with runtime.autocast(device, amp_dtype):
                step_model(x)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            with runtime.autocast(device, amp_dtype):
                step_model(x)
        sync(device)
    eval_s = (time.perf_counter() - t0) / steps / len(batch)
    return step_s, eval_s, mem


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--shape", type=int, nargs=3)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--depth", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--steps", type=int, help="timed steps (default 20 on GPU, 3 on CPU)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--compile", action="store_true", help="also time torch.compile")
    ap.add_argument("--no-naive", action="store_true")
    ap.add_argument("--no-end-to-end", action="store_true", help="skip part 2 (train_fold)")
    args = ap.parse_args()

    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    desc, peak = device_report(device)
    cuda = device.type == "cuda"
    shape = tuple(args.shape) if args.shape else (FULL_GRID if cuda else CPU_GRID)
    steps = args.steps or (20 if cuda else 3)
    warmup = 3 if cuda else 1
    print(f"device: {desc}")
    if not cuda and shape != FULL_GRID:
        print(
            f"NOTE: no CUDA GPU: reduced grid {'×'.join(map(str, shape))} instead of "
            f"{'×'.join(map(str, FULL_GRID))}; same code path. Projected fold times are for this grid."
        )
    if cuda:
        torch.backends.cudnn.benchmark = True
    spec = UNetSpec(in_channels=4, width=args.width, depth=args.depth)
    b = args.batch_size
    flops_step = count_flops(spec, shape, batch=b, backward=True)
    print(
        f"UNet width {args.width} depth {args.depth}: {count_parameters(UNet3D(spec)) / 1e6:.2f} M "
        f"parameters; batch {b} at {'×'.join(map(str, shape))}: {flops_step / 1e12:.3f} TFLOP per step"
    )
    torch.manual_seed(0)
    batch = torch.rand(b, spec.in_channels + 2, *shape, device=device).half()

    # On the CPU the library uses bf16 only where the processor has it natively (runtime.resolve_amp).
    amp_name = (
        str(runtime.resolve_amp("auto", device)).removeprefix("torch.").replace("None", "fp32")
    )
    library = "bf16/fp16 autocast, NDHWC, fused Adam" if cuda else f"{amp_name} autocast"
    variants = [
        ("library: " + library, dict(amp="auto", channels_last=cuda, fused=cuda, compile_=False))
    ]
    if args.compile:
        variants.append((variants[0][0] + " + compile", dict(variants[0][1], compile_=True)))
    compare = cuda or amp_name != "fp32"
    if compare and not args.no_naive:
        variants.append(
            (
                "naive: fp32, NCDHW, default Adam",
                dict(amp="off", channels_last=False, fused=False, compile_=False),
            )
        )
    results = {"device": desc, "shape": shape, "batch_size": b, "width": args.width, "variants": {}}
    print(
        f"\n{'step':48s} {'steps/s':>8s} {'TFLOP/s':>8s} {'%peak':>6s} {'GB':>6s} {'eval s':>7s} "
        f"{'fold h':>7s}"
    )
    first = None
    for name, kw in variants:
        step_s, eval_s, mem = time_steps(spec, batch, device, steps=steps, warmup=warmup, **kw)
        tflops = flops_step / step_s / 1e12
        fold_h = EPOCHS * (N_TRAIN / (b / step_s) + N_TUNE * eval_s) / 3600
        pct = f"{100 * tflops / peak:5.1f}" if peak else "  n/a"
        mem_s = f"{mem:6.1f}" if mem is not None else "   n/a"
        print(
            f"{name:48s} {1 / step_s:8.2f} {tflops:8.2f} {pct:>6s} {mem_s} {eval_s:7.3f} {fold_h:7.2f}"
        )
        results["variants"][name] = {"step_s": step_s, "steps_per_s": 1 / step_s, "tflops": tflops,
                                     "eval_s_per_sample": eval_s, "projected_fold_hours": fold_h,
                                     "peak_gb": mem}  # fmt: skip
        first = first or (step_s, eval_s, fold_h)
    if len(variants) > 1 and compare and not args.no_naive:
        naive = results["variants"][variants[-1][0]]
        print(f"library step vs naive: {naive['step_s'] / first[0]:.1f}× faster")
    print(
        f"projection: {EPOCHS} epochs × ({N_TRAIN} training steps-samples + {N_TUNE} tuning forwards) "
        f"= {first[2]:.2f} h per fold; goal ≤ 1 h on one H100"
        + (f" → {'MET' if first[2] <= 1 else 'NOT MET'}" if cuda and shape == FULL_GRID else "")
    )

    if not args.no_end_to_end:
        n_train, n_tune, epochs = 4 * b, 2, 3
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            t0 = time.perf_counter()
            subjects = make_toy_subjects(tmp / "data", n_train + n_tune, shape, compress=False)
            make_s = time.perf_counter() - t0
            cfg = TrainConfig(
                width=args.width, depth=args.depth, epochs=epochs, batch_size=b, checkpoint_every=epochs,
                device=device.type, progress=False, deterministic=False,
            )  # fmt: skip
            t0 = time.perf_counter()
            train_fold(subjects[:n_train], subjects[n_train:], tmp / "fold", cfg)
            total_s = time.perf_counter() - t0
            log = pd.read_csv(tmp / "fold" / "train_log.tsv", sep="\t")
        epoch_s = float(log["seconds"].iloc[1:].median())  # first epoch includes autotuning
        ideal_s = n_train / b * first[0] + n_tune * first[1]
        print(
            f"\nend to end (train_fold, {n_train} train + {n_tune} tune subjects, {epochs} epochs): "
            f"{total_s:.1f} s incl. caching (toy data written in {make_s:.1f} s); epoch {epoch_s:.3f} s vs "
            f"{ideal_s:.3f} s of pure steps + tuning → overhead {100 * (epoch_s / ideal_s - 1):+.0f} %"
        )
        results["end_to_end"] = {"epoch_s": epoch_s, "ideal_epoch_s": ideal_s, "total_s": total_s}
    print(f"results: {write_results('train', results)}")


if __name__ == "__main__":
    main()
