"""What DerivationDescription says of an exported vir-T1c: the software, its version and the fold models.

Kept apart from :mod:`~virtual_contrast.dicom.export` (which the reading copies use too) because it reads the
models: each is named by the short SHA-256 of its weights and recorded options
(:func:`~virtual_contrast.model.digest.model_digest`), which the same model saved again keeps (the bytes of
``model.pt`` change with the temporary file's name that ``torch.save`` records).
"""

from __future__ import annotations

from pathlib import Path

from virtual_contrast import __version__
from virtual_contrast.model.digest import model_digest


def describe_models(models: list[Path | str], *, tta: bool) -> str:
    """Software, version and the fold models behind a prediction (see the module docstring)."""
    digests = [model_digest(path)[:12] for path in models]
    passes = "8 mirror configurations each" if tta else "one pass each"
    return (
        f"virtual-contrast {__version__}: vir-T1c predicted by a 3D UNet from pre-contrast T1, FLAIR, ADC and "
        f"low-dose T1c; mean of {len(digests)} fold models ({passes}), weights and options sha256 "
        f"{', '.join(digests)}"
    )
