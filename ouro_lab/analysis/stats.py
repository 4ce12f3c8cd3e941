"""The numbers of the answer: seed means with t-intervals, saturation points with a seed
bootstrap, and the tables built on them (metric vs T, extrapolation, compute, exit gate)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ouro_lab.analysis.tidy import ALL, AnalysisError, StudyData, difficulty_order
from ouro_lab.config import ARCHS
from ouro_lab.saturation import Saturation, mean_ci, saturation, saturation_point  # noqa: F401  (re-exported)


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
