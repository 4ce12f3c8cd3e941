"""The saturation answer's math, on plain numbers (the analysis and the adaptive sweep design
both use it): seed means with t-intervals, the saturation point of a metric-vs-T curve with a
seed bootstrap, and the saturating law m(t) = m_inf + a * exp(-k t) (Parcae, Prairie et al.
2026: test-time loss vs loops "follows a predictable, saturating exponential decay") with its
own seed bootstrap.

A curve the law does not describe is reported as such, not forced: the fit is refused when
it explains too little of the variance, or when the data turn back (a metric that improves,
then gets worse past some step: the decay past the trained T that Ouro reports) by more than
the fit's own noise. `LawFit.loops_to_within(epsilon)` is where the fitted curve comes within
epsilon of its asymptote, the parametric counterpart of `saturation_point`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
from scipy import stats
from scipy.optimize import OptimizeWarning, curve_fit

from ouro_lab.errors import AnalysisError

def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and a Student-t confidence interval over seeds (nan bounds with one seed)."""
    x = np.asarray([v for v in values if np.isfinite(v)], dtype=float)
    if len(x) == 0:
        return math.nan, math.nan, math.nan
    mean = float(x.mean())
    if len(x) < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return mean, mean - half, mean + half


def saturation_point(means: Mapping[int, float], epsilon: float, direction: str = "maximize") -> int | None:
    """The smallest trained T from which no larger T in the study improves the metric by epsilon
    or more; None when the largest T still improves on the one before it by epsilon or more
    ("not saturated within the range"). A plateau followed by a later gain is not saturation."""
    sign = 1.0 if direction == "maximize" else -1.0
    ts = sorted(means)
    for i, t in enumerate(ts):
        later = [sign * (means[u] - means[t]) for u in ts[i + 1:]]
        if i == len(ts) - 1:
            return t if len(ts) == 1 else None
        if max(later) < epsilon:
            return t
    return None


@dataclass
class Saturation:
    point: int | None  # saturation point of the seed means; None = not saturated within the range
    low: float  # bootstrap percentile interval of the point; math.inf = beyond the largest T
    high: float
    p_saturated: float  # share of bootstrap resamples that saturate within the range
    n_seeds: int  # the fewest seeds behind any T
    t_max: int  # the largest trained T in the study

    def __str__(self) -> str:
        point = f"T={self.point}" if self.point is not None else f"not saturated by T={self.t_max}"
        if self.n_seeds < 2:
            return f"{point} (1 seed: no interval)"

        def bound(v: float) -> str:
            return f">{self.t_max}" if math.isinf(v) else f"{v:g}"

        return f"{point} [{bound(self.low)}, {bound(self.high)}]"


def saturation(values: Mapping[int, Sequence[float]], epsilon: float = 0.01, direction: str = "maximize",
               level: float = 0.95, n_boot: int = 2000, seed: int = 0, paired: bool = False) -> Saturation:
    """Saturation point of a metric-vs-T curve with per-T seed values, and its uncertainty: the
    point is recomputed on `n_boot` resamples (seeds drawn with replacement) and the central
    `level` percentile interval reported; a resample that does not saturate counts as beyond the
    largest T (interval bound '>T_max'). `paired`: the i-th value of every T comes from the same
    seed, so seeds are resampled jointly across T; else independently at each T."""
    raw = {int(t): np.asarray(vs, dtype=float) for t, vs in values.items()}
    paired = paired and len({len(v) for v in raw.values()}) == 1 and all(np.isfinite(v).all() for v in raw.values())
    values = {t: v[np.isfinite(v)] for t, v in raw.items()}
    values = {t: v for t, v in values.items() if len(v)}
    if not values:
        raise AnalysisError("no finite values to find a saturation point in")
    point = saturation_point({t: float(v.mean()) for t, v in values.items()}, epsilon, direction)
    n_seeds = min(len(v) for v in values.values())
    t_max = max(values)
    if n_seeds < 2:
        return Saturation(point, math.nan, math.nan, math.nan, n_seeds, t_max)
    rng = np.random.default_rng(seed)
    boot = np.empty(n_boot)
    for b in range(n_boot):
        if paired:
            idx = rng.integers(0, n_seeds, n_seeds)
            means = {t: float(v[idx].mean()) for t, v in values.items()}
        else:
            means = {t: float(rng.choice(v, size=len(v)).mean()) for t, v in values.items()}
        found = saturation_point(means, epsilon, direction)
        boot[b] = math.inf if found is None else found
    alpha = (1 - level) / 2
    low, high = np.quantile(boot, [alpha, 1 - alpha], method="inverted_cdf")
    return Saturation(point, float(low), float(high), float(np.isfinite(boot).mean()), n_seeds, t_max)


MIN_R2 = 0.9  # below this the law explains too little of the curve: no fit
# where each metric kind's asymptote can lie (an accuracy curve still rising at its last step
# would otherwise extrapolate past 1)
M_INF_RANGE = {"acc": (0.0, 1.0), "loss": (0.0, math.inf), "bpb": (0.0, math.inf)}


def law(t, m_inf: float, a: float, k: float):
    return m_inf + a * np.exp(-k * np.asarray(t, dtype=float))


@dataclass
class LawFit:
    m_inf: float = math.nan
    a: float = math.nan
    k: float = math.nan
    r2: float = math.nan
    rmse: float = math.nan
    reason: str = ""  # why there is no fit ("" when there is one)

    @property
    def ok(self) -> bool:
        return not self.reason

    def loops_to_within(self, epsilon: float) -> float:
        """The first t >= 1 with |a| exp(-k t) <= epsilon (continuous; 1 when already within)."""
        if not self.ok:
            return math.nan
        if abs(self.a) * math.exp(-self.k) <= epsilon:
            return 1.0
        return math.log(abs(self.a) / epsilon) / self.k

    def __str__(self) -> str:
        if not self.ok:
            return f"no fit ({self.reason})"
        return f"{self.m_inf:.4g} {'+' if self.a >= 0 else '-'} {abs(self.a):.3g}·exp(-{self.k:.3g} t) (R² {self.r2:.3f})"


def fit_law(steps: Sequence[float], values: Sequence[float], direction: str = "maximize",
            start: tuple[float, float, float] | None = None,
            m_range: tuple[float, float] = (-math.inf, math.inf), min_drop: float = 0.0,
            noise: float | None = None) -> LawFit:
    """Least-squares fit of `law` (k > 0, m_inf within `m_range`) to a curve; `direction` says
    which way is better (a curve that gets better, then worse by more than its noise and more
    than `min_drop`, has no fit; `noise`: the values' standard error when known, e.g. over seeds,
    else estimated from the fit). `start`: try these parameters first (a bootstrap resample
    starts from the full fit: one solve, not three)."""
    t = np.asarray(steps, dtype=float)
    y = np.asarray(values, dtype=float)
    keep = np.isfinite(y)
    t, y = t[keep], y[keep]
    if len(t) < 4:
        return LawFit(reason=f"{len(t)} points: the law has 3 parameters, 4 points needed")
    order = np.argsort(t)
    t, y = t[order], y[order]
    span = float(y.max() - y.min())
    if span == 0:
        return LawFit(m_inf=float(y[0]), a=0.0, k=1.0, r2=1.0, rmse=0.0)  # flat: at its asymptote from the start
    sign = 1.0 if direction == "maximize" else -1.0
    lo, hi = m_range
    guesses = [(float(np.clip(y[-1], lo, hi)), y[0] - y[-1], k0) for k0 in (0.3, 1.0, 3.0)]
    best = None
    for p0 in ([start] if start is not None else []) + guesses:
        if best is not None and start is not None:
            break  # the warm start converged
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", OptimizeWarning)
                params, _ = curve_fit(law, t, y, p0=p0, bounds=([lo, -np.inf, 1e-4], [hi, np.inf, 50.0]),
                                      maxfev=20000)
        except (RuntimeError, ValueError):
            continue
        sse = float(((law(t, *params) - y) ** 2).sum())
        if best is None or sse < best[1]:
            best = (params, sse)
    if best is None:
        return LawFit(reason="least squares did not converge")
    (m_inf, a, k), sse = best
    rmse = math.sqrt(sse / len(t))
    r2 = 1 - sse / float(((y - y.mean()) ** 2).sum())
    fit = LawFit(float(m_inf), float(a), float(k), r2, rmse)
    # turns back: the best point is better than the last by more than the noise. Without a given
    # noise: what the law leaves on the curve up to its best point (4+ points there), else on the
    # whole curve (NOTE: a curve that turns back fits the law badly, so its whole-curve residual
    # would hide the very drop it measures)
    peak = int(np.argmax(sign * y))
    drop = float(sign * (y[peak] - y[-1]))
    if noise is None:
        noise = rmse
        if 4 <= peak + 1 < len(t):
            rise = fit_law(t[:peak + 1], y[:peak + 1], direction, m_range=m_range, min_drop=min_drop)
            noise = rise.rmse if np.isfinite(rise.rmse) else rmse
    if peak < len(t) - 1 and drop > max(3 * noise, 0.05 * span, min_drop) and drop > 0.1 * span:
        fit.reason = f"the curve turns back: best at {t[peak]:g}, {drop:.3g} worse by {t[-1]:g}"
    elif r2 < MIN_R2:
        fit.reason = f"R² {r2:.2f} < {MIN_R2}"
    return fit


@dataclass
class LawBootstrap:
    fit: LawFit  # on the seed means
    loops_eps: float  # fitted loops to within epsilon of m_inf (seed means)
    low: float  # bootstrap percentile interval of loops_eps (over resamples that fit)
    high: float
    p_fit: float  # share of resamples the law fits
    n_seeds: int


def fit_law_seeds(curves: Mapping[int, Sequence[float]], epsilon: float, direction: str = "maximize",
                  level: float = 0.95, n_boot: int = 200, seed: int = 0,
                  m_range: tuple[float, float] = (-math.inf, math.inf)) -> LawBootstrap:
    """Fit the law to the seed-mean curve {step: [value per seed]} (the i-th value of every step
    from the same seed) and bootstrap `loops_to_within(epsilon)` over seeds drawn with replacement.
    A fall past the best point smaller than epsilon is a plateau, not a turn back; one larger
    than epsilon and 3 standard errors of the seed mean (and a tenth of the curve's span) is a
    turn back, however well the law fits."""
    steps = sorted(curves)
    matrix = np.asarray([list(curves[s]) for s in steps], dtype=float).T  # (seeds, steps)
    n_seeds = matrix.shape[0]
    # the seed mean's standard error, averaged over steps (None with one seed: from the fit)
    noise = float(np.nanmean(np.nanstd(matrix, 0, ddof=1))) / math.sqrt(n_seeds) if n_seeds > 1 else None
    fit = fit_law(steps, np.nanmean(matrix, 0), direction, m_range=m_range, min_drop=epsilon, noise=noise)
    if n_seeds < 2 or not fit.ok:
        return LawBootstrap(fit, fit.loops_to_within(epsilon), math.nan, math.nan, math.nan, n_seeds)
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(n_boot):
        resample = fit_law(steps, np.nanmean(matrix[rng.integers(0, n_seeds, n_seeds)], 0), direction,
                           start=(fit.m_inf, fit.a, fit.k), m_range=m_range, min_drop=epsilon, noise=noise)
        boot.append(resample.loops_to_within(epsilon) if resample.ok else math.nan)
    boot = np.asarray(boot)
    fitted = boot[np.isfinite(boot)]
    alpha = (1 - level) / 2
    low, high = (np.quantile(fitted, [alpha, 1 - alpha]) if len(fitted) else (math.nan, math.nan))
    return LawBootstrap(fit, fit.loops_to_within(epsilon), float(low), float(high), len(fitted) / n_boot, n_seeds)


def saturation_points(means: np.ndarray, loops: Sequence[int], epsilon: float,
                      direction: str = "maximize") -> np.ndarray:
    """`saturation_point` for many curves at once: means (n, len(loops)) over the sorted loop
    counts -> (n,) saturation points, math.inf where a curve is not saturated within the range."""
    sign = 1.0 if direction == "maximize" else -1.0
    v = sign * np.asarray(means, dtype=float)
    n, k = v.shape
    ts = np.asarray(loops, dtype=float)
    if k == 1:
        return np.full(n, ts[0])
    # best of every later T, for each T but the last: (n, k - 1)
    later = np.maximum.accumulate(v[:, ::-1], axis=1)[:, ::-1][:, 1:]
    done = later - v[:, :-1] < epsilon
    first = np.where(done.any(1), done.argmax(1), k - 1)
    return np.where(first < k - 1, ts[np.minimum(first, k - 2)], math.inf)
