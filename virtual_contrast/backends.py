"""The tools of a run's pre-processing, decided once when the workflow is planned.

Resolved per job, ``auto`` could register one subject with FSL and the next with SimpleITK when the machines
that run the jobs differ (a cluster's nodes with and without FSL): one study, two pipelines, unnoticed. The
workflow resolves it once, while it parses (``rules/common.smk``), and hands every job the resolved name, so a
job on a machine without that tool fails, saying what to install, instead of quietly using another one.

Only the workflow's planning imports this module (no rule script does): it looks for FSL on the machine that
plans the run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def resolve_backends(config: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """The pre-processing backends of a run, ``auto`` resolved once for all its jobs (see the module docstring).

    Returns ``{"registration": {...}, "brain_extraction": {...}}``, each with ``configured``, ``backend`` and
    ``reason``: registration ``auto`` is ``fsl`` when a ``flirt`` executable is found (on PATH or in
    ``$FSLDIR/bin``) on the machine that plans the run, else ``simpleitk``; brain extraction ``auto`` is
    ``hdbet2`` when ``preprocess.hdbet2_weights`` is set, else ``deepbet``, whatever is installed
    (``virtual_contrast.preprocess.skull_strip.resolve_backend``).
    """
    pre = config["preprocess"]
    register, strip = pre["register_backend"], pre["skull_strip_backend"]
    if register == "auto":
        from virtual_contrast.preprocess.registration import resolve_backend

        registration = resolve_backend(register)
    else:
        registration = (register, "configured")
    if strip == "auto":
        from virtual_contrast.preprocess.skull_strip import resolve_backend

        extraction = resolve_backend(strip, pre["hdbet2_weights"])
    else:
        extraction = (strip, "configured")
    return {
        step: {"configured": configured, "backend": backend, "reason": reason}
        for step, configured, (backend, reason) in (
            ("registration", register, registration),
            ("brain_extraction", strip, extraction),
        )
    }


def with_backends(config: Mapping[str, Any], backends: Mapping[str, Mapping[str, str]]) -> dict:
    """A copy of ``config`` whose backends are those of :func:`resolve_backends`."""
    pre = {
        **config["preprocess"],
        "register_backend": backends["registration"]["backend"],
        "skull_strip_backend": backends["brain_extraction"]["backend"],
    }
    return {**config, "preprocess": pre}
