"""The test-time saturation law (`ouro_lab.saturation`: m(t) = m_inf + a * exp(-k t)) on a
study: fitted to each trained T's metric vs loop step and to each arch's final metric vs
trained T, with a seed bootstrap, as a table and a plot."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ouro_lab.analysis.stats import final_values  # noqa: E402
from ouro_lab.analysis.tidy import ALL, StudyData  # noqa: E402
from ouro_lab.saturation import (M_INF_RANGE, LawBootstrap, LawFit, fit_law, fit_law_seeds,  # noqa: E402,F401
                                 law)  # (re-exported: `analysis.fit_law` ...)


# --- on a study (docs/guides/report.md): per trained T over loop steps, per arch over trained T ---
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
