"""The numbers of the answer: seed means with t-intervals, saturation points with a seed
bootstrap, and the tables built on them (metric vs T, extrapolation, compute, exit gate)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats

from ouro_lab.analysis.tidy import ALL, AnalysisError, StudyData, difficulty_order
from ouro_lab.config import ARCHS


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


def final_values(data: StudyData, kind: str | None = None, split: str | None = None) -> pd.DataFrame:
    """One row per unit run x difficulty: the metric at the run's trained (final) step."""
    kind, split = kind or data.kind, split or data.split
    s = data.steps[(data.steps["split"] == split) & (data.steps["step"] == data.steps["trained_loops"])]
    if s.empty:
        raise AnalysisError(f"no {split} metrics in study {data.name!r} (splits logged: "
                            f"{', '.join(sorted(set(data.steps['split'])))}; test needs eval.test=true)")
    if kind not in s.columns or s[kind].isna().all():
        raise AnalysisError(f"metric kind {kind!r} not logged in study {data.name!r}; "
                            f"kinds: {', '.join(c for c in ('acc', 'loss', 'bpb') if c in s.columns)}")
    return s.rename(columns={kind: "value"})[["run_id", "group", "arch", "loops", "seed", "difficulty", "value"]]


def curve_table(data: StudyData, kind: str | None = None, split: str | None = None,
                level: float = 0.95) -> pd.DataFrame:
    """Metric at the final step vs trained T: mean, CI and seed count per group x arch x T x difficulty."""
    rows = []
    for (group, arch, loops, diff), g in final_values(data, kind, split).groupby(
            ["group", "arch", "loops", "difficulty"], sort=True):
        mean, lo, hi = mean_ci(g["value"].tolist(), level)
        rows.append(dict(group=group, arch=arch, loops=loops, difficulty=diff, mean=mean, ci_low=lo, ci_high=hi,
                         n=int(g["value"].notna().sum()), std=float(g["value"].std(ddof=1)) if len(g) > 1 else math.nan))
    return pd.DataFrame(rows)


def saturation_table(data: StudyData, epsilon: float = 0.01, kind: str | None = None, split: str | None = None,
                     level: float = 0.95, n_boot: int = 2000) -> pd.DataFrame:
    """Saturation point per group x difficulty for each arch whose compute grows with T
    (looped and depth_matched; param_matched does not depend on T)."""
    kind = kind or data.kind
    direction = data.direction_of(kind)
    rows = []
    finals = final_values(data, kind, split)
    for (group, arch, diff), g in finals[finals["arch"] != "param_matched"].groupby(["group", "arch", "difficulty"]):
        cells = {t: gt.sort_values("seed") for t, gt in g.groupby("loops")}
        if len(cells) < 2:
            continue
        # the same seeds at every T (and one run each): resample them jointly
        seeds = {tuple(c["seed"]) for c in cells.values()}
        paired = len(seeds) == 1 and len(set(next(iter(seeds)))) == len(next(iter(seeds)))
        sat = saturation({t: c["value"].tolist() for t, c in cells.items()}, epsilon, direction, level, n_boot,
                         paired=paired)
        rows.append(dict(group=group, arch=arch, difficulty=diff, point=sat.point, low=sat.low, high=sat.high,
                         p_saturated=sat.p_saturated, n_seeds=sat.n_seeds, t_max=sat.t_max, text=str(sat),
                         paired=paired))
    table = pd.DataFrame(rows, columns=["group", "arch", "difficulty", "point", "low", "high", "p_saturated",
                                        "n_seeds", "t_max", "text", "paired"])
    return _in_group_order(data, table, ["arch", "difficulty"])


def _in_group_order(data: StudyData, table: pd.DataFrame, then: list[str]) -> pd.DataFrame:
    """Sort by group in value order (length 8 before 12), then by `then`."""
    order = {g: i for i, g in enumerate(data.groups)}
    return table.sort_values(["group", *then], key=lambda c: c.map(order) if c.name == "group" else c,
                             kind="stable").reset_index(drop=True)


def compute_table(data: StudyData, kind: str | None = None, split: str | None = None) -> pd.DataFrame:
    """Metric (all positions) vs training FLOPs and inference FLOPs/token, per group x arch x T
    (param_matched, which does not depend on T, once per group)."""
    finals = final_values(data, kind, split)
    finals = finals[finals["difficulty"] == ALL].merge(
        data.runs[["run_id", "train_flops", "forward_flops_per_token", "n_params"]], on="run_id")
    table = (finals.groupby(["group", "arch", "loops"])
             .agg(mean=("value", "mean"), train_flops=("train_flops", "mean"),
                  forward_flops_per_token=("forward_flops_per_token", "mean"), n_params=("n_params", "mean"))
             .reset_index())
    # a reused param_matched run is the same model at every T: one point per group
    reused_only = table["arch"].eq("param_matched") & data.runs["reused"].any()
    table.loc[reused_only, "loops"] = None
    table = table.drop_duplicates(["group", "arch", "loops"])
    return _in_group_order(data, table, ["arch", "loops"]).rename(columns={"loops": "T"})


def exit_table(data: StudyData, split: str | None = None) -> pd.DataFrame:
    """Exit-gate statistics of the looped runs (seed means) per group x T x difficulty."""
    split = split or data.split
    e = data.exits[data.exits["split"] == split]
    if e.empty:
        return pd.DataFrame(columns=["group", "loops", "difficulty", "exit_expected_step", "exit_entropy"])
    return e.groupby(["group", "loops", "difficulty"])[["exit_expected_step", "exit_entropy"]].mean().reset_index()


def exit_wide(data: StudyData, split: str | None = None) -> pd.DataFrame:
    """The exit table one row per group x T: E[t] and entropy per difficulty side by side."""
    table = exit_table(data, split)
    if table.empty:
        return table
    wide = table.pivot_table(index=["group", "loops"], columns="difficulty",
                             values=["exit_expected_step", "exit_entropy"]).reset_index()
    levels = difficulty_order(table["difficulty"])
    cols = [("group", ""), ("loops", "")] + [("exit_expected_step", d) for d in levels] + [("exit_entropy", d) for d in levels]
    wide = wide[cols]
    wide.columns = ["group", "T"] + [f"E[t] {d}" for d in levels] + [f"H {d}" for d in levels]
    return _in_group_order(data, wide, ["T"])


def _fmt(mean: float, low: float, high: float, n: int) -> str:
    if not np.isfinite(mean):
        return "-"
    if n < 2 or not np.isfinite(low):
        return f"{mean:.3f}"
    return f"{mean:.3f} ± {(high - low) / 2:.3f}"


def key_table(data: StudyData, difficulty: str = ALL, kind: str | None = None, split: str | None = None,
              level: float = 0.95) -> pd.DataFrame:
    """The report's main table: per group and T, each arch's final-step metric as 'mean ± CI half-width'."""
    table = curve_table(data, kind, split, level)
    table = table[table["difficulty"] == difficulty]
    table = table.assign(cell=[_fmt(r["mean"], r["ci_low"], r["ci_high"], r["n"]) for _, r in table.iterrows()])
    wide = table.pivot_table(index=["group", "loops"], columns="arch", values="cell", aggfunc="first").reset_index()
    wide.columns.name = None
    wide = wide.fillna("-")  # no finished run in that cell (pruned, failed, not swept)
    wide = _in_group_order(data, wide, ["loops"])
    return wide[["group", "loops", *[a for a in ARCHS if a in wide.columns]]].rename(columns={"loops": "T"})


def extrapolation_table(data: StudyData, kind: str | None = None, split: str | None = None) -> pd.DataFrame:
    """Looped models evaluated past their trained T: the seed-mean metric at t=T and at the last
    evaluated step, per group and T (all positions)."""
    kind, split = kind or data.kind, split or data.split
    s = data.steps[(data.steps["split"] == split) & (data.steps["arch"] == "looped") & (data.steps["difficulty"] == ALL)]
    rows = []
    for (group, t), g in s.groupby(["group", "loops"]):
        m = g.groupby("step")[kind].mean()
        last = int(m.index.max())
        if last > t:
            rows.append(dict(group=group, T=t, at_T=m.loc[t], last_step=last, at_last=m.loc[last],
                             change=m.loc[last] - m.loc[t]))
    return _in_group_order(data, pd.DataFrame(rows, columns=["group", "T", "at_T", "last_step", "at_last", "change"]),
                           ["T"])
