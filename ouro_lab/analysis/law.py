"""The test-time saturation law: m(t) = m_inf + a * exp(-k t) (Parcae, Prairie et al. 2026:
test-time loss vs loops "follows a predictable, saturating exponential decay"), fitted to a
metric vs loop step (or vs trained T), with a seed bootstrap.

A curve the law does not describe is reported as such, not forced: the fit is refused when
it explains too little of the variance, or when the data turn back (a metric that improves,
then gets worse past some step: the decay past the trained T that Ouro reports) by more than
the fit's own noise. `loops_to_within(epsilon)` is where the fitted curve comes within
epsilon of its asymptote, the parametric counterpart of `stats.saturation_point`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from scipy.optimize import OptimizeWarning, curve_fit  # noqa: E402

from ouro_lab.analysis.tidy import ALL, StudyData  # noqa: E402
from ouro_lab.analysis.stats import final_values  # noqa: E402

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


# --- on a study (README "Reports"): per trained T over loop steps, per arch over trained T ------
def _seed_curves(frame: pd.DataFrame, x: str) -> dict[int, list[float]]:
    """{x: [value per seed]} with the seeds that have every x (a seed x x pivot, complete rows)."""
    wide = frame.pivot_table(index="seed", columns=x, values="value", aggfunc="mean").dropna()
    return {int(c): wide[c].tolist() for c in wide.columns}


def law_table(data: StudyData, epsilon: float = 0.01, kind: str | None = None, split: str | None = None,
              level: float = 0.95, n_boot: int = 200) -> pd.DataFrame:
    """The law fitted (all positions) to each looped group x trained T's metric vs evaluation loop
    step (steps past T included: `over` = step), and to each arch's final metric vs trained T
    (`over` = T); loops to within epsilon of m_inf with a seed bootstrap interval, or the reason
    there is no fit."""
    kind, split = kind or data.kind, split or data.split
    direction = data.direction_of(kind)
    rows = []
    s = data.steps[(data.steps["split"] == split) & (data.steps["difficulty"] == ALL) & (data.steps["arch"] == "looped")]
    if kind in s:
        for (group, loops), g in s.rename(columns={kind: "value"}).groupby(["group", "loops"]):
            rows.append(_law_row(group, "looped", "step", loops, _seed_curves(g, "step"), epsilon, direction, level,
                                 n_boot, kind))
    finals = final_values(data, kind, split)
    finals = finals[(finals["difficulty"] == ALL) & (finals["arch"] != "param_matched")]
    for (group, arch), g in finals.groupby(["group", "arch"]):
        if g["loops"].nunique() >= 4:
            rows.append(_law_row(group, arch, "T", None, _seed_curves(g, "loops"), epsilon, direction, level, n_boot,
                                 kind))
    columns = ["group", "arch", "over", "loops", "m_inf", "a", "k", "r2", "loops_eps", "low", "high", "p_fit",
               "n_seeds", "fit"]
    return pd.DataFrame(rows, columns=columns)


def _law_row(group, arch, over, loops, curves, epsilon, direction, level, n_boot, kind) -> dict:
    if len(curves) < 4:
        fit = LawBootstrap(LawFit(reason=f"{len(curves)} points with every seed"), math.nan, math.nan, math.nan, math.nan, 0)
    else:
        fit = fit_law_seeds(curves, epsilon, direction, level, n_boot,
                            m_range=M_INF_RANGE.get(kind, (-math.inf, math.inf)))
    f = fit.fit
    where = (f"{fit.loops_eps:.1f}" + (f" [{fit.low:.1f}, {fit.high:.1f}]" if np.isfinite(fit.low) else "")
             if f.ok else "")
    return dict(group=group, arch=arch, over=over, loops=loops, m_inf=f.m_inf, a=f.a, k=f.k, r2=f.r2,
                loops_eps=fit.loops_eps, low=fit.low, high=fit.high, p_fit=fit.p_fit, n_seeds=fit.n_seeds,
                fit=(f"{str(f)}; within ε by {where}" if f.ok else str(f)))


def plot_law(data: StudyData, laws: pd.DataFrame, kind: str | None = None, split: str | None = None):
    """Per group: the looped model's seed-mean metric vs loop step for each trained T (dots) with
    the fitted law (lines; none drawn where the law does not fit), and the final metric vs T."""
    kind, split = kind or data.kind, split or data.split
    if laws.empty:
        return None
    s = data.steps[(data.steps["split"] == split) & (data.steps["difficulty"] == ALL) & (data.steps["arch"] == "looped")]
    groups = [g for g in data.groups if g in set(laws["group"])]
    fig, axes = plt.subplots(len(groups), 2, figsize=(9, 3.2 * len(groups)), squeeze=False, layout="constrained")
    loops_all = sorted(s["loops"].unique())
    colors = dict(zip(loops_all, plt.cm.viridis(np.linspace(0, 0.9, max(1, len(loops_all))))))
    for i, group in enumerate(groups):
        ax = axes[i, 0]
        for t in loops_all:
            c = s[(s["group"] == group) & (s["loops"] == t)].groupby("step")[kind].mean()
            ax.plot(c.index, c.values, "o", color=colors[t], ms=4, label=f"T={t}")
            row = laws[(laws["group"] == group) & (laws["over"] == "step") & (laws["loops"] == t)]
            if len(row) and np.isfinite(row["k"].iloc[0]) and row["fit"].iloc[0] and not row["fit"].iloc[0].startswith("no fit"):
                x = np.linspace(c.index.min(), c.index.max(), 100)
                ax.plot(x, law(x, row["m_inf"].iloc[0], row["a"].iloc[0], row["k"].iloc[0]), color=colors[t], lw=1)
        ax.set(title=f"{group}: looped, vs loop step (lines: fit)", xlabel="evaluation loop step t", ylabel=f"{split} {kind}")
        ax.legend(fontsize=7)
        ax = axes[i, 1]
        finals = final_values(data, kind, split)
        for arch, style in (("looped", "o-"), ("depth_matched", "s--")):
            f = finals[(finals["group"] == group) & (finals["arch"] == arch) & (finals["difficulty"] == ALL)]
            if f.empty:
                continue
            m = f.groupby("loops")["value"].mean()
            ax.plot(m.index, m.values, style[0], label=arch)
            row = laws[(laws["group"] == group) & (laws["over"] == "T") & (laws["arch"] == arch)]
            if len(row) and not row["fit"].iloc[0].startswith("no fit"):
                x = np.linspace(m.index.min(), m.index.max(), 100)
                ax.plot(x, law(x, row["m_inf"].iloc[0], row["a"].iloc[0], row["k"].iloc[0]), style[1:], lw=1)
        ax.set(title=f"{group}: final metric vs trained T", xlabel="trained loop count T", ylabel=f"{split} {kind}")
        ax.legend(fontsize=7)
    fig.suptitle(f"{data.name}: the saturating law m(t) = m_inf + a exp(-k t)")  # (constrained layout makes room)
    return fig
