"""Steps of the toy workflow in tests/data/slurm_toy (standard library only, deterministic).

Each step appends one line to its log: the SLURM job id (empty in a local run), the GPUs the
scheduler granted (CUDA_VISIBLE_DEVICES) and the interpreter, so tests can tell where a job ran.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path

N_VALUES = 8
EX_TEMPFAIL = 75  # what a preempted job looks like to Snakemake: a non-zero exit


def record_environment(log: str) -> None:
    fields = {
        "SLURM_JOB_ID": os.environ.get("SLURM_JOB_ID", ""),
        "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
        "python": sys.executable,
    }
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write("\t".join(f"{k}={v}" for k, v in fields.items()) + "\n")


def read_values(path: str) -> list[float]:
    return [float(line.split("\t")[1]) for line in Path(path).read_text().splitlines()[1:]]


def write_values(path: str, values: list[float]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    rows = [f"{i}\t{v:.6f}" for i, v in enumerate(values)]
    Path(path).write_text("index\tvalue\n" + "\n".join(rows) + "\n")


def prepare(args: argparse.Namespace) -> int:
    digest = hashlib.sha256(args.subject.encode()).digest()
    write_values(args.output, [b / 255 for b in digest[:N_VALUES]])
    return 0


def train(args: argparse.Namespace) -> int:
    """Two 'epochs'; the checkpoint after the first lets a preempted attempt resume."""
    inputs = [read_values(p) for p in args.inputs]
    ckpt = Path(args.checkpoint)
    if ckpt.exists():
        weights = read_values(str(ckpt))
        print(f"resuming from {ckpt}", file=sys.stderr)
    else:
        weights = [sum(col) / len(col) for col in zip(*inputs, strict=True)]
        write_values(str(ckpt), weights)
        if args.preempt_once:
            print("simulated preemption after epoch 1", file=sys.stderr)
            return EX_TEMPFAIL
    weights = [w * 0.5 + 0.25 for w in weights]
    write_values(args.output, weights)
    ckpt.unlink()
    return 0


def predict(args: argparse.Namespace) -> int:
    data, weights = read_values(args.data), read_values(args.model)
    write_values(args.output, [d * w for d, w in zip(data, weights, strict=True)])
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("subject")
    p.add_argument("output")
    p.add_argument("log")
    p.set_defaults(func=prepare)
    p = sub.add_parser("train")
    p.add_argument("output")
    p.add_argument("log")
    p.add_argument("inputs", nargs="+")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--preempt-once", action="store_true")
    p.set_defaults(func=train)
    p = sub.add_parser("predict")
    p.add_argument("data")
    p.add_argument("model")
    p.add_argument("output")
    p.add_argument("log")
    p.set_defaults(func=predict)
    args = parser.parse_args()
    record_environment(args.log)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
