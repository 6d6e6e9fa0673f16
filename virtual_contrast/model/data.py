"""Training data: normalised NIfTI channels → one cached array per subject → batches on the device.

The normalised volumes (one NIfTI per channel, ``sub-{s}_desc-norm_{channel}.nii.gz``) are converted once into
one ``.npy`` per subject holding the input channels, the target and the brain mask stacked as float16
(``(C + 2, X, Y, Z)``). float16 keeps 11 significant bits, i.e. a relative error below 2.5e-4 (5e-4 at the
brightest enhancement, about 2 on the normalised scale), far below
the network's own error and below the bf16 arithmetic it is trained with, and halves the bytes to move.
Decompressing NIfTI for every sample of every epoch would starve a GPU; a memory-mapped ``.npy`` is read at
disk speed, and when the whole training set fits (85 subjects at 160×192×160 is about 4 GB) it is loaded
once onto the device so that a batch is a gather plus a flip, both on the GPU.

The order of samples and the flips of an epoch are drawn from a generator seeded by (seed, epoch), not from a
stream that runs through the whole training, so that an interrupted run resumed at epoch ``e`` sees exactly
the batches an uninterrupted run sees.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from virtual_contrast import layout, sequences
from virtual_contrast.intensity import range_problem
from virtual_contrast.io import InputError, atomic_path, load_image
from virtual_contrast.model import runtime
from virtual_contrast.model.config import DEFAULT_CHANNELS, check_channels

log = logging.getLogger(__name__)

#: The training target, the full-dose T1c (virtual_contrast.sequences).
TARGET = sequences.TARGET
CACHE_DTYPE = np.float16
_CACHE_VERSION = 1


@dataclass(frozen=True)
class SubjectVolumes:
    """The normalised volumes of one subject on the cropped atlas grid.

    ``channels`` maps channel names (see :data:`~virtual_contrast.model.config.INPUT_CHANNELS`) to NIfTI paths; ``target`` (the reference
    T1c) is needed for training and tuning only; ``mask`` (the brain mask) is optional.
    """

    subject: str
    channels: Mapping[str, Path]
    target: Path | None = None
    mask: Path | None = None

    def files(self) -> list[Path]:
        """Every file given: the channels, then the target and the mask when set."""
        return [Path(p) for p in (*self.channels.values(), self.target, self.mask) if p is not None]


def norm_filename(subject: str, channel: str) -> str:
    """File name of a normalised channel, as written by the ``normalize`` rule."""
    return layout.normalized_name(subject, channel)


def mask_filename(subject: str) -> str:
    """File name of the brain mask on the cropped grid."""
    return layout.brain_mask_name(subject)


def volumes_by_subject(
    paths: Sequence[Path | str],
    subjects: Sequence[str],
    keys: Sequence[str],
    channels: Sequence[str] = DEFAULT_CHANNELS,
) -> dict[str, SubjectVolumes]:
    """Each subject's volumes from a flat list of files: for each of ``subjects`` in turn, one file per
    ``keys`` entry (input channels, :data:`TARGET`, ``mask``), as the workflow's ``train`` rule declares its
    inputs. Training then reads exactly the files its job declared."""
    missing = [k for k in (*channels, TARGET, "mask") if k not in keys]
    if missing:
        raise InputError(f"the training inputs lack {', '.join(missing)} for each subject")
    if len(paths) != len(subjects) * len(keys):
        raise InputError(
            f"{len(paths)} training files for {len(subjects)} subjects of {len(keys)} files each"
        )
    out = {}
    for i, subject in enumerate(subjects):
        files = dict(zip(keys, map(Path, paths[i * len(keys) : (i + 1) * len(keys)]), strict=True))
        out[subject] = SubjectVolumes(
            subject, {c: files[c] for c in channels}, target=files[TARGET], mask=files["mask"]
        )
    return out


def find_subject_volumes(
    folder: Path | str,
    subject: str,
    channels: Sequence[str] = DEFAULT_CHANNELS,
    *,
    target: bool = True,
    mask: bool = False,
) -> SubjectVolumes:
    """Find a subject's normalised files anywhere under ``folder`` by their standard names.

    Raises :class:`InputError` when a file is missing or found twice. The mask is used when present (the one
    in the folder of the channels first); with ``mask=True`` it is required.
    """
    folder = Path(folder)

    def find(name: str, required: bool) -> Path | None:
        hits = sorted(folder.rglob(name))
        if len(hits) > 1:
            raise InputError(
                f"{name} found {len(hits)} times: {', '.join(map(str, hits))}", subject=subject
            )
        if not hits:
            if required:
                raise InputError(f"{name} not found under {folder}", subject=subject)
            return None
        return hits[0]

    found = {ch: find(norm_filename(subject, ch), True) for ch in channels}
    # The mask beside the normalised channels wins (earlier steps may keep a mask of the same name).
    beside = next(iter(found.values())).parent / mask_filename(subject) if found else None
    return SubjectVolumes(
        subject=subject,
        channels=found,
        target=find(norm_filename(subject, TARGET), True) if target else None,
        mask=beside
        if beside is not None and beside.exists()
        else find(mask_filename(subject), mask),
    )


def load_subject_arrays(
    sv: SubjectVolumes, channels: Sequence[str], *, with_target: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
    """Load a subject's channels, checking that all files share one grid (shape and affine).

    Returns ``(inputs (C, X, Y, Z), target, mask, affine)``; ``target`` is ``None`` unless ``with_target``,
    ``mask`` is ``None`` when the subject has none.
    """
    missing = [c for c in channels if c not in sv.channels]
    if missing:
        raise InputError(f"missing input channel(s) {missing}", subject=sv.subject)
    paths: list[tuple[str, Path]] = [(c, Path(sv.channels[c])) for c in channels]
    if with_target:
        if sv.target is None:
            raise InputError("no target (reference T1c) given", subject=sv.subject)
        paths.append((TARGET, Path(sv.target)))
    if sv.mask is not None:
        paths.append(("mask", Path(sv.mask)))
    arrays: dict[str, np.ndarray] = {}
    ref_shape = ref_affine = None
    ref_path = None
    for name, path in paths:
        img = load_image(path, subject=sv.subject)
        data = np.asanyarray(img.dataobj, dtype=np.float32)
        if ref_shape is None:
            ref_shape, ref_affine, ref_path = data.shape, img.affine, path
        elif data.shape != ref_shape:
            raise InputError(
                f"grid {data.shape} differs from {ref_shape} of {ref_path}",
                subject=sv.subject,
                path=path,
            )
        elif not np.allclose(img.affine, ref_affine, atol=1e-3):
            raise InputError(
                f"affine differs from that of {ref_path}; all channels must share one grid",
                subject=sv.subject,
                path=path,
            )
        problem = None if name == "mask" else range_problem(data)
        if problem is not None:
            log.warning("sub-%s %s: not normalised? %s", sv.subject, name, problem)
        arrays[name] = data
    inputs = np.stack([arrays[c] for c in channels])
    return inputs, arrays.get(TARGET), arrays.get("mask"), ref_affine


def _cache_key(sv: SubjectVolumes, channels: Sequence[str]) -> str:
    """Hash of what the cached array depends on: channel order and the files' identity (path, size, mtime)."""
    files = [Path(sv.channels[c]) for c in channels] + [Path(sv.target)]
    if sv.mask is not None:
        files.append(Path(sv.mask))
    ident = []
    for f in files:
        try:
            st = f.stat()
        except FileNotFoundError:
            raise InputError("file not found", subject=sv.subject, path=f) from None
        ident.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    payload = json.dumps(
        {"v": _CACHE_VERSION, "channels": list(channels), "files": ident, "dtype": "float16"}
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def cache_subject(sv: SubjectVolumes, cache_dir: Path | str, channels: Sequence[str]) -> Path:
    """Convert one subject's NIfTIs into ``sub-{s}_{key}.npy`` (inputs, target, mask; float16), once.

    The key hashes the channel order and each file's path, size and modification time, so a changed input
    gets a new cache file and an unchanged one is reused across folds and reruns. Without a mask the mask
    channel is all ones. Written atomically, so concurrent fold jobs sharing ``cache_dir`` are safe.
    """
    channels = check_channels(channels)
    cache_dir = Path(cache_dir)
    path = cache_dir / f"sub-{sv.subject}_{_cache_key(sv, channels)}.npy"
    if path.exists():
        return path
    inputs, target, mask, _ = load_subject_arrays(sv, channels, with_target=True)
    if mask is None:
        mask = np.ones_like(target)
    stack = np.concatenate([inputs, target[None], (mask > 0.5)[None].astype(np.float32)])
    with atomic_path(path) as tmp:
        np.save(tmp, stack.astype(CACHE_DTYPE))
    log.info("cached sub-%s as %s %s", sv.subject, path.name, stack.shape)
    return path


class VolumeStore:
    """The cached subjects of one set (training or tuning), served as batches on ``device``.

    Each sample is a ``(C + 2, X, Y, Z)`` tensor: input channels, target, brain mask. When ``resident`` (or
    ``"auto"`` and the set takes less than half the free device memory, a quarter of free RAM on the CPU) the
    whole set is loaded once onto the device; otherwise each batch is read from the memory-mapped files by a
    background thread into pinned memory and copied asynchronously, one batch ahead of the GPU.
    """

    def __init__(
        self, paths: Sequence[Path], device: torch.device, resident: bool | str = "auto"
    ) -> None:
        if not paths:
            raise ValueError("VolumeStore needs at least one subject")
        self.device = device
        self.arrays = [np.load(p, mmap_mode="r") for p in paths]
        shapes = {a.shape for a in self.arrays}
        if len(shapes) != 1:
            raise InputError(
                f"subjects have different grids {sorted(shapes)}; crop them to one grid"
            )
        self.sample_shape = self.arrays[0].shape
        nbytes = sum(a.nbytes for a in self.arrays)
        if resident == "auto":
            share = 0.5 if device.type == "cuda" else 0.25
            resident = nbytes < share * runtime.available_bytes(device)
        self.resident = bool(resident)
        self.store: torch.Tensor | None = None
        if self.resident:
            self.store = torch.empty(
                (len(self.arrays), *self.sample_shape), dtype=torch.float16, device=device
            )
            for i, a in enumerate(self.arrays):
                self.store[i].copy_(torch.from_numpy(np.array(a)))
        log.info(
            "%d subjects, %.2f GB, %s on %s",
            len(self.arrays),
            nbytes / 1e9,
            "resident" if self.resident else "streamed from memory-mapped files",
            device,
        )

    def __len__(self) -> int:
        return len(self.arrays)

    def _gather(self, idx: torch.Tensor) -> torch.Tensor:
        if self.store is not None:
            return self.store[idx.to(self.store.device)]
        host = torch.from_numpy(np.stack([self.arrays[int(i)] for i in idx]))
        if self.device.type == "cuda":
            host = host.pin_memory()
        return host

    def batches(
        self,
        batch_size: int,
        order: torch.Tensor | None = None,
        flips: torch.Tensor | None = None,
    ) -> Iterator[torch.Tensor]:
        """Yield float16 batches ``(B, C + 2, X, Y, Z)`` on the device, in ``order`` (default: stored order).

        ``flips`` (``(len(self), 3)`` booleans, indexed like ``order``) mirrors each sample along the chosen
        spatial axes, on the device.
        """
        order = torch.arange(len(self)) if order is None else order
        chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        flip_chunks = (
            [flips[i : i + batch_size] for i in range(0, len(order), batch_size)]
            if flips is not None
            else [None] * len(chunks)
        )
        source = self._prefetched(chunks) if self.store is None else map(self._gather, chunks)
        for batch, fl in zip(source, flip_chunks, strict=True):
            batch = batch.to(self.device, non_blocking=True)
            yield batch if fl is None else flip_batch(batch, fl)

    def _prefetched(self, chunks: list[torch.Tensor]) -> Iterator[torch.Tensor]:
        """Read batches in a background thread (numpy and file reads release the GIL), two ahead."""
        q: queue.Queue = queue.Queue(maxsize=2)
        stop = threading.Event()

        def work() -> None:
            try:
                for c in chunks:
                    if stop.is_set():
                        return
                    q.put(self._gather(c))
                q.put(None)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
                q.put(exc)

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        try:
            while True:
                item = q.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while thread.is_alive():
                try:
                    q.get_nowait()
                except queue.Empty:
                    thread.join(timeout=0.05)


def flip_batch(batch: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Mirror sample ``i`` of ``(B, C, X, Y, Z)`` along the spatial axes where ``flips[i]`` is true."""
    out = batch.clone() if flips.any() else batch
    for i, row in enumerate(flips.tolist()):
        dims = [1 + a for a, f in enumerate(row) if f]
        if dims:
            out[i] = torch.flip(batch[i], dims)
    return out


def epoch_plan(
    n: int, seed: int, epoch: int, augment: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sample order and per-sample flips of one epoch, a pure function of (seed, epoch).

    Each axis is flipped independently with probability 0.5 (the paper's augmentation).
    """
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    order = torch.randperm(n, generator=g)
    flips = (torch.rand(n, 3, generator=g) < 0.5) if augment else None
    return order, flips
