"""Registration backends: :mod:`~virtual_contrast.preprocess.registration.fsl` (FSL FLIRT through nipype, as
in the paper) and :mod:`~virtual_contrast.preprocess.registration.sitk_backend` (the embedded SimpleITK one),
both following :class:`~virtual_contrast.preprocess.registration.base.Backend`, and :func:`select_backend`,
which picks one and says why. What is registered to what is :mod:`virtual_contrast.preprocess.register`'s."""

from __future__ import annotations

import logging

from virtual_contrast.io import InputError
from virtual_contrast.preprocess.options import BackendUnavailableError
from virtual_contrast.preprocess.registration.base import Backend

log = logging.getLogger(__name__)

BACKENDS = ("auto", "fsl", "simpleitk")


def resolve_backend(name: str) -> tuple[str, str]:
    """``(backend, reason)``: ``name`` with ``auto`` resolved as :func:`select_backend` resolves it on this
    machine (``fsl`` when a ``flirt`` executable is found, else ``simpleitk``); checks nothing else."""
    from virtual_contrast.preprocess.registration.fsl import find_flirt

    if name not in BACKENDS:
        raise InputError(
            f"unknown registration backend {name!r}; choose one of {', '.join(BACKENDS)}"
        )
    if name != "auto":
        return name, "requested"
    flirt, why = find_flirt()
    return ("fsl", f"auto: {why}") if flirt else ("simpleitk", f"auto: no FSL ({why})")


def select_backend(
    name: str = "auto", *, threads: int | None = 1, simpleitk_options: dict | None = None
) -> Backend:
    """The backend called ``name`` (``auto``, ``fsl`` or ``simpleitk``); never a silent substitute.

    ``auto`` takes FSL when a ``flirt`` executable is found (on PATH, or in ``$FSLDIR/bin``) and the embedded
    SimpleITK backend otherwise, and logs which one and why. ``fsl`` without FSL raises
    :class:`BackendUnavailableError` at once, naming what to install. ``threads`` (SimpleITK only; FLIRT is
    single-threaded): ITK's threads while the embedded backend works; 1, the default, is bit-reproducible, more
    threads are faster and not reproducible to the bit, ``None`` leaves ITK's default (all cores).
    ``simpleitk_options`` go to :class:`~virtual_contrast.preprocess.registration.sitk_backend.SimpleITKBackend`.
    """
    from virtual_contrast.preprocess.registration import fsl
    from virtual_contrast.preprocess.registration.sitk_backend import SimpleITKBackend

    if name not in BACKENDS:
        raise InputError(
            f"unknown registration backend {name!r}; choose one of {', '.join(BACKENDS)}"
        )
    options = {"threads": threads, **(simpleitk_options or {})}
    if name in ("auto", "fsl"):
        flirt, why = fsl.find_flirt()
        if flirt is not None:
            log.info("registration backend: fsl (%s%s)", "auto: " if name == "auto" else "", why)
            return fsl.FSLBackend(flirt)
        if name == "fsl":
            raise BackendUnavailableError(
                f"registration backend 'fsl' requested but FSL is not available ({why}). Install FSL >= 6 "
                "(https://fsl.fmrib.ox.ac.uk/fsl/docs/install/), set FSLDIR to its folder and put "
                "$FSLDIR/bin (where flirt lives) on PATH; or choose the embedded backend 'simpleitk'."
            )
        log.info("registration backend: simpleitk (auto: FSL not found: %s)", why)
        return SimpleITKBackend(**options)
    log.info("registration backend: simpleitk (requested)")
    return SimpleITKBackend(**options)
