"""Gadolinium concentrations over the paper's two-injection exam (virtual_contrast.cohort.kinetics)."""

from __future__ import annotations

import numpy as np
import pytest

from virtual_contrast.cohort.kinetics import (
    LOW_TO_REF_MIN,
    Bolus,
    Timeline,
    draw_timeline,
    plasma_mm,
    tissue_mm,
)


def _single(dose: float = 0.1) -> Timeline:
    return Timeline((Bolus(dose, 0.0),), low_t1c_min=3.0, ref_t1c_min=9.0, plasma_scale=1.0)


def test_plasma_curve_is_weinmanns_biexponential():
    # 0.1 mmol/kg, 3 min: 0.1 (3.99 exp(-0.432) + 4.78 exp(-0.0333)) = 0.721 mM (by hand)
    assert plasma_mm(_single(), 3.0) == pytest.approx(0.7214, abs=1e-3)
    assert plasma_mm(_single(), 0.0) == 0.0  # nothing before the injection
    two = Timeline((Bolus(0.025, 0.0), Bolus(0.075, 5.0)), 3.0, 8.0, 1.0)
    assert plasma_mm(two, 8.0) == pytest.approx(
        plasma_mm(_single(0.025), 8.0) + plasma_mm(_single(0.075), 3.0)
    )


def test_tofts_closed_form_equals_the_numerical_convolution():
    timeline = Timeline((Bolus(0.025, 0.0), Bolus(0.075, 4.0)), 3.0, 9.0, 1.1)
    vp, ktrans, ve = 0.04, 0.2, 0.3
    t = np.linspace(0.0, 9.0, 90001)
    cp = np.array([plasma_mm(timeline, x) for x in t])
    kernel = np.exp(-ktrans / ve * (9.0 - t))
    leaked = ktrans * np.trapezoid(cp * kernel, t)
    expected = vp * plasma_mm(timeline, 9.0) + leaked
    assert tissue_mm(timeline, 9.0, vp=vp, ktrans=ktrans, ve=ve) == pytest.approx(
        expected, rel=1e-3
    )
    # kep equal to a plasma rate: the limit form
    assert np.isfinite(tissue_mm(timeline, 9.0, vp=vp, ktrans=0.144 * ve, ve=ve))


def test_drawn_timelines_follow_the_papers_protocol():
    rng = np.random.default_rng(0)
    timelines = [draw_timeline(rng) for _ in range(2000)]
    delays = np.array([t.ref_t1c_min - t.low_t1c_min for t in timelines])
    median, iqr = LOW_TO_REF_MIN
    assert np.median(delays) == pytest.approx(median, abs=0.2)  # the paper: 6 min 5 s
    q1, q3 = np.percentile(delays, [25, 75])
    assert q3 - q1 == pytest.approx(iqr, abs=0.3)  # the paper: 2 min 10 s
    for t in timelines[:50]:
        first, second = t.boluses
        assert first.t_min == 0.0 and first.dose_mmol_kg == pytest.approx(0.025)
        assert t.low_t1c_min + 1.0 - 1e-9 <= second.t_min < t.ref_t1c_min
        assert second.dose_mmol_kg == pytest.approx(0.075)
