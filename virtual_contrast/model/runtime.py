"""Device, precision and seeding choices shared by training, prediction and the benchmarks."""

from __future__ import annotations

import contextlib
import logging
import os
import random
from collections.abc import Iterator

import numpy as np
import torch

from virtual_contrast.io import InputError

log = logging.getLogger(__name__)

AMP_CHOICES = ("auto", "bf16", "fp16", "off")


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto`` → the first CUDA GPU when there is one, else the CPU; ``cuda`` without a GPU is an error."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    elif name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(
                f"device {name!r} requested but no CUDA GPU is available (use 'auto' or 'cpu')"
            )
        device = torch.device(name)
    elif name == "cpu":
        device = torch.device("cpu")
    else:
        raise InputError(f"unknown device {name!r}: use 'auto', 'cpu' or 'cuda'")
    if device.type == "cuda":
        log.info("device: %s (%s)", device, torch.cuda.get_device_name(device))
    else:
        log.info("device: cpu (%d threads)", torch.get_num_threads())
    return device


def cpu_has_native_bf16() -> bool:
    """Whether the CPU computes bf16 in hardware (AVX512-BF16 or AMX: recent Xeon and EPYC, Zen 4 and later)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def resolve_amp(amp: str | bool, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: bf16 on GPUs that support it, fp16 on older GPUs; on the CPU bf16 where the
    processor computes it natively, else none (fp32).

    ``True`` means ``auto`` and ``False`` means ``off``. On a CPU with AVX512-BF16, a training step of the
    demo's network (40×48×40, width 8, 2 threads) took 0.11 s in bf16 against 0.58 s in fp32; without
    native bf16 the conversions make it slower than fp32, so ``auto`` keeps fp32 there. fp16 is for GPUs only.
    """
    amp = {True: "auto", False: "off"}.get(amp, amp)
    if amp not in AMP_CHOICES:
        raise InputError(f"unknown mixed-precision mode {amp!r}: use one of {AMP_CHOICES}")
    if amp == "off":
        return None
    if device.type != "cuda":
        if amp == "fp16":
            raise InputError(
                "fp16 mixed precision needs a CUDA GPU; use 'bf16' or 'off' on the CPU"
            )
        return torch.bfloat16 if amp == "bf16" or cpu_has_native_bf16() else None
    if amp == "fp16":
        return torch.float16
    if amp == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast context for ``dtype``, or a no-op for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_states() -> dict:
    """Every global RNG state, in types that ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states = {
        "python": random.getstate(),
        "numpy": (kind, keys.tolist(), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    """Restore what :func:`rng_states` saved (CUDA states only when a GPU is present)."""
    random.setstate(_tuplify(states["python"]))
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"].cpu())
    if "cuda" in states and torch.cuda.is_available():
        cuda_states = [s.cpu() for s in states["cuda"]]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def _tuplify(obj):
    if isinstance(obj, list | tuple):
        return tuple(_tuplify(o) for o in obj)
    return obj


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool, device: torch.device) -> Iterator[None]:
    """Use deterministic kernels inside the block (restoring the previous setting afterwards).

    On the CPU this makes a run bitwise reproducible, which the resume test relies on. On CUDA, determinism
    costs speed (no cuDNN autotuning, slower deterministic backward kernels), so it is off by default there and
    cuDNN picks the fastest algorithm for the fixed training shape instead.
    """
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_bench = torch.backends.cudnn.benchmark
    prev_det = torch.backends.cudnn.deterministic
    try:
        torch.use_deterministic_algorithms(enabled, warn_only=device.type == "cuda")
        if device.type == "cuda":
            torch.backends.cudnn.deterministic = enabled
            torch.backends.cudnn.benchmark = not enabled
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)
        torch.backends.cudnn.benchmark = prev_bench
        torch.backends.cudnn.deterministic = prev_det


def use_channels_last(setting: str | bool, device: torch.device) -> bool:
    """NDHWC layout: faster cuDNN 3D convolutions with tensor cores on GPUs; no gain on the CPU."""
    if setting == "auto":
        return device.type == "cuda"
    return bool(setting)


def available_bytes(device: torch.device) -> int:
    """Free memory of a GPU, or the available RAM for the CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
