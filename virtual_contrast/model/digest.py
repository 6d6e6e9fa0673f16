"""The identity of a trained model: a SHA-256 of what determines its output, read without torch.

A ``model.pt`` is a zip archive (``torch.save``) whose entries sit in a folder named after the file it was
written to; ``save_checkpoint`` writes to a temporary file with a random name, so the same weights saved twice
give two files with different bytes. :func:`model_digest` hashes instead what the archive *holds*: every
tensor of the weights (name, dtype, shape, strides, offset and bytes) and the recorded options
(:data:`OPTION_KEYS`: architecture, channels, grid, training configuration, pre-processing). Training figures
(epoch, losses, subject lists) and the torch version are left out: they describe how the weights were reached,
not what they compute. The pickle is read by an unpickler that knows only the few classes a checkpoint holds,
so that this module needs no torch (the DICOM export runs in an environment without it) and runs no code
from the file.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from virtual_contrast.io import InputError

#: Checkpoint entries that, with the weights, determine what the model computes.
OPTION_KEYS = (
    "format",
    "spec",
    "channels",
    "grid",
    "affine",
    "loss_region",
    "config",
    "preprocess",
)
_REBUILDERS = {("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor")}


@dataclass(frozen=True)
class _Storage:
    kind: str  # e.g. FloatStorage
    key: str  # entry data/<key> of the archive


@dataclass(frozen=True)
class _Tensor:
    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild(storage: _Storage, offset: int, size, stride, *_: Any) -> _Tensor:
    return _Tensor(storage, int(offset), tuple(size), tuple(stride))


class _StorageKind:
    def __init__(self, name: str) -> None:
        self.name = name


class _CheckpointUnpickler(pickle.Unpickler):
    """Unpickles a checkpoint's ``data.pkl`` into plain values, tensors as :class:`_Tensor` references."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) in _REBUILDERS:
            return _rebuild
        if module == "torch" and name.endswith("Storage"):
            return _StorageKind(name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a model checkpoint")

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        kind = pid[1].name if isinstance(pid[1], _StorageKind) else str(pid[1])
        return _Storage(kind, str(pid[2]))


def _read_checkpoint(path: Path) -> tuple[dict, dict[str, bytes]]:
    """(the unpickled checkpoint, the archive's storages by key)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            pickled = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pickled) != 1:
                raise InputError("not a torch checkpoint (no data.pkl in the archive)", path=path)
            folder = pickled[0].split("/")[0]
            storages = {
                n.split("/", 2)[2]: archive.read(n)
                for n in names
                if n.startswith(f"{folder}/data/") and n.count("/") == 2
            }
            checkpoint = _CheckpointUnpickler(io.BytesIO(archive.read(pickled[0]))).load()
    except (OSError, zipfile.BadZipFile, pickle.UnpicklingError, EOFError) as exc:
        raise InputError(f"cannot be read as a model checkpoint: {exc}", path=path) from exc
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise InputError("not a model checkpoint (no state_dict)", path=path)
    return checkpoint, storages


def model_digest(path: Path | str) -> str:
    """SHA-256 (hex) of the weights and :data:`OPTION_KEYS` of a ``model.pt`` (see the module docstring)."""
    path = Path(path)
    if not path.exists():
        raise InputError("model checkpoint not found", path=path)
    checkpoint, storages = _read_checkpoint(path)
    weights = []
    for name, tensor in checkpoint["state_dict"].items():
        if not isinstance(tensor, _Tensor) or tensor.storage.key not in storages:
            raise InputError(f"weight {name!r} is not a stored tensor", path=path)
        data = hashlib.sha256(storages[tensor.storage.key]).hexdigest()
        weights.append([name, tensor.storage.kind, tensor.size, tensor.stride, tensor.offset, data])
    options = {key: checkpoint[key] for key in OPTION_KEYS if key in checkpoint}
    text = json.dumps({"weights": weights, "options": options}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()
