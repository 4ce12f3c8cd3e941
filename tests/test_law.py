"""The saturating law m(t) = m_inf + a exp(-k t) (ouro_lab/saturation.py) on synthetic curves."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ouro_lab.analysis.law import fit_law, fit_law_seeds, law


@pytest.mark.parametrize("m_inf,a,k,direction", [(0.9, -0.5, 0.7, "maximize"), (1.5, 2.0, 0.4, "minimize")])
def test_fit_recovers_known_parameters_from_noisy_curves(m_inf, a, k, direction):
    rng = np.random.default_rng(0)
    t = np.arange(1, 13)
    y = law(t, m_inf, a, k) + rng.normal(0, 0.005, len(t))
    fit = fit_law(t, y, direction)
    assert fit.ok, fit.reason
    assert fit.m_inf == pytest.approx(m_inf, abs=0.02)
    assert fit.a == pytest.approx(a, rel=0.15) and fit.k == pytest.approx(k, rel=0.15)
    assert fit.loops_to_within(0.01) == pytest.approx(math.log(abs(a) / 0.01) / k, abs=1.0)
    assert fit.r2 > 0.99


def test_a_curve_that_rises_then_falls_has_no_fit():
    t = np.arange(1, 13)
    y = 0.5 + 0.4 * (1 - np.exp(-1.2 * t)) - 0.04 * np.clip(t - 4, 0, None)  # Ouro's decay past the trained T
    fit = fit_law(t, y, "maximize")
    assert not fit.ok and "turns back" in fit.reason and "best at 4" in fit.reason
    assert math.isnan(fit.loops_to_within(0.01)) and str(fit).startswith("no fit")
    # a rise over most of the curve, then a fall (Parcae's recipe at T=4 in sweeps/recipes.yaml):
    # the law fits the whole curve badly, so its residual must not be taken as the noise
    parcae = [0.550, 0.664, 0.769, 0.879, 0.920, 0.894, 0.841, 0.801]
    late = fit_law(range(1, 9), parcae, "maximize")
    assert not late.ok and "turns back: best at 5" in late.reason
    # a plateau that wobbles by less than epsilon does not turn back (Huginn's recipe at T=2)
    flat = [0.5567, 0.55809, 0.55815, 0.55817, 0.55801, 0.55798]
    assert "turns back" in fit_law(range(1, 7), flat, "maximize").reason
    assert fit_law(range(1, 7), flat, "maximize", min_drop=0.01).ok
    noise = fit_law(t, np.random.default_rng(1).normal(0, 1, len(t)), "maximize")
    assert not noise.ok  # no structure at all


def test_seed_bootstrap_interval_covers_the_true_saturation_loops():
    rng = np.random.default_rng(2)
    steps = range(1, 11)
    truth = math.log(0.4 / 0.01) / 0.6
    curves = {s: list(law(s, 0.8, -0.4, 0.6) + rng.normal(0, 0.01, 5)) for s in steps}  # 5 seeds
    boot = fit_law_seeds(curves, 0.01, "maximize", n_boot=200)
    assert boot.fit.ok and boot.n_seeds == 5 and boot.p_fit > 0.9
    assert boot.low <= truth <= boot.high and boot.low < boot.loops_eps < boot.high


def test_an_accuracy_asymptote_stays_within_its_range():
    """An accuracy curve still rising at its last step: the unbounded fit puts m_inf past 1, the
    report's (M_INF_RANGE['acc']) keeps it at or below 1 and still fits."""
    from ouro_lab.analysis.law import M_INF_RANGE

    t = np.arange(1, 9)
    y = np.minimum(law(t, 1.08, -0.8, 0.25), 1.0)
    assert fit_law(t, y, "maximize").m_inf > 1.02
    bounded = fit_law(t, y, "maximize", m_range=M_INF_RANGE["acc"])
    assert bounded.ok and 0.95 <= bounded.m_inf <= 1.0 and bounded.r2 > 0.99


def test_a_turn_back_is_judged_against_the_seed_noise():
    """A rise to step 3, then a fall of 0.085 (Parcae's recipe at T=2): the law's residual on the
    whole curve is too large to call it, the seeds' standard error (0.01 / sqrt 2) is not."""
    mean = np.array([0.570, 0.653, 0.658, 0.632, 0.599, 0.573])
    assert "turns back" not in fit_law(range(1, 7), mean, "maximize").reason
    curves = {t + 1: [m - 0.01, m + 0.01] for t, m in enumerate(mean)}
    boot = fit_law_seeds(curves, 0.01, "maximize", n_boot=50)
    assert not boot.fit.ok and "turns back: best at 3" in boot.fit.reason
    # the same fall inside the seed noise is no turn back
    noisy = {t + 1: [m - 0.2, m + 0.2] for t, m in enumerate(mean)}
    assert "turns back" not in fit_law_seeds(noisy, 0.01, "maximize", n_boot=50).fit.reason
