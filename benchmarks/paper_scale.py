"""The paper's configuration on this machine's CPU: one training step and one 40-pass TTA prediction.

    python benchmarks/paper_scale.py [--part train|predict|both] [--threads N]

Builds the network of ``config.yaml`` + ``config.paper.yaml`` (5-level residual UNet, width 16, 4 inputs,
direct output) at the paper's grid (160×192×160) and runs, each part in a child process of its own so that its
peak memory is its own:

* ``train``: two optimisation steps of the library's ``train_step`` (batch 1, Adam, the configured gradient
  clipping, bf16 autocast where the CPU has native bf16, else fp32); prints the seconds of the first (which
  allocates) and of the second;
* ``predict``: ``tta_predict`` with ``split.folds`` models (5) × 8 mirror configurations = 40 passes on one exam.

Prints seconds and the peak resident memory (GB) of each part, and the ratio of the training step to one
forward pass of the prediction (about 3 on any hardware: forward + backward), so the figures compare across
machines. The point is that the paper's configuration fits before anyone rents a GPU; the CPU is for checking
it, not for training it. Results also go to ``benchmarks/out/paper_scale.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def paper_config() -> dict:
    from virtual_contrast.config import load_config

    return load_config(REPO / "config.yaml", REPO / "config.paper.yaml")


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB


def run_part(part: str) -> dict:
    import torch

    from virtual_contrast.model import runtime
    from virtual_contrast.model.config import TrainConfig
    from virtual_contrast.model.predict import tta_predict
    from virtual_contrast.model.train import train_step
    from virtual_contrast.model.unet import UNet3D, count_parameters

    config = paper_config()
    shape = tuple(config["grid"]["crop_shape"])
    m = config["model"]
    cfg = TrainConfig(channels=tuple(m["channels"]), width=m["width"], depth=m["depth"],
                      output=m["output"], grad_clip=config["train"].get("grad_clip", 12.0))  # fmt: skip
    device = torch.device("cpu")
    amp_dtype = runtime.resolve_amp("auto", device)
    precision = "fp32" if amp_dtype is None else str(amp_dtype).removeprefix("torch.")
    torch.manual_seed(0)
    n_in = len(cfg.channels)
    result = {
        "part": part,
        "grid": list(shape),
        "width": cfg.width,
        "depth": cfg.depth,
        "precision": precision,
        "threads": torch.get_num_threads(),
    }
    if part == "train":
        model = UNet3D(cfg.spec)
        result["parameters_M"] = count_parameters(model) / 1e6
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)
        batch = torch.rand(
            1, n_in + 2, *shape
        ).half()  # inputs, target, mask as the training cache holds
        seconds = []
        for _ in range(2):
            t0 = time.perf_counter()
            loss = train_step(model, optimizer, None, batch, n_inputs=n_in, amp_dtype=amp_dtype,
                              brain_loss=False, channels_last=False, grad_clip=cfg.grad_clip)  # fmt: skip
            float(loss)
            seconds.append(time.perf_counter() - t0)
        result.update(first_step_s=seconds[0], step_s=seconds[1])
    else:
        folds = int(config["split"]["folds"])
        models = []
        for i in range(folds):
            torch.manual_seed(i)
            models.append(UNet3D(cfg.spec).eval())
        x = torch.rand(n_in, *shape)
        with torch.inference_mode():
            t0 = time.perf_counter()
            with runtime.autocast(device, amp_dtype):
                models[0](x[None, :, :, :, :])
            result["forward_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            out = tta_predict(models, x, flips="all8")
            result["tta_s"] = time.perf_counter() - t0
        result.update(passes=8 * folds, output_shape=list(out.shape))
    result["peak_rss_gb"] = peak_rss_gb()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--part", choices=["train", "predict", "both"], default="both")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(run_part(args.part)))
        return 0

    results = {}
    for part in ("train", "predict") if args.part == "both" else (args.part,):
        cmd = [sys.executable, __file__, "--part", part, "--child"]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        done = subprocess.run(cmd, check=True, capture_output=True, text=True)
        results[part] = r = json.loads(done.stdout.strip().splitlines()[-1])
        grid = "×".join(map(str, r["grid"]))
        head = f"{part:8s} grid {grid}, width {r['width']} depth {r['depth']}, {r['precision']} on the CPU "
        if part == "train":
            print(head + f"({r['threads']} threads, {r['parameters_M']:.2f} M parameters): first step "
                  f"{r['first_step_s']:.1f} s, next step {r['step_s']:.1f} s, peak {r['peak_rss_gb']:.2f} GB",
                  flush=True)  # fmt: skip
        else:
            print(head + f"({r['threads']} threads): one forward pass {r['forward_s']:.1f} s, "
                  f"{r['passes']}-pass TTA {r['tta_s']:.1f} s, peak {r['peak_rss_gb']:.2f} GB",
                  flush=True)  # fmt: skip
    if "train" in results and "predict" in results:
        ratio = results["train"]["step_s"] / results["predict"]["forward_s"]
        print(f"training step / forward pass: {ratio:.1f}×")
        results["step_over_forward"] = ratio
    out = REPO / "benchmarks" / "out" / "paper_scale.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
