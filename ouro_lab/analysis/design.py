"""An adaptive study (sampler.name: adaptive) read back: the design's answer recomputed from the
runs it trained (the same rule the sweep used: `sweep.adaptive.decide`), the points it trained
and skipped, and the compute it spent against the full grid of every T at max_seeds seeds."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ouro_lab import run_record as rr
from ouro_lab.analysis.stats import final_values
from ouro_lab.analysis.tidy import ALL, StudyData
from ouro_lab.metric_names import objective_kind
from ouro_lab.sweep.adaptive import Decision, Point
from ouro_lab.sweep.design import decide_with
from ouro_lab.sweep.schema import DesignSpec


@dataclass
class DesignView:
    decision: Decision | None  # the answer per curve and why the design stopped (None: the objective is no
    # {split}/{kind}_final metric, whose curves the report cannot rebuild: the sweep's summary states it)
    answers: pd.DataFrame  # curve, answer (T* [interval]), law's loops to within epsilon
    points: pd.DataFrame  # T, seeds trained, seeds skipped, training FLOPs (estimated where skipped)
    spent_flops: float  # the trained runs' and the stopped runs' share (the steps they trained)
    grid_flops: float
    stopped: pd.DataFrame  # runs the design's pruner stopped: trial, T, stopped at step, why


def is_adaptive(data: StudyData) -> bool:
    return (data.sweep.get("sampler") or {}).get("name") == "adaptive"


def observations(data: StudyData, base_seed: int) -> dict[Point, dict[str, float]]:
    """A study's design observations from its finished runs: the objective ({split}/{kind}_final)
    at each run's trained T, per curve ('all', 'd1', ...), keyed by (T, seed - `base_seed`)."""
    split = data.objective_metric.split("/", 1)[0]
    out: dict[Point, dict[str, float]] = {}
    for row in final_values(data, objective_kind(data.objective_metric), split).itertuples():
        if math.isfinite(row.value):
            out.setdefault(Point(int(row.loops), int(row.seed) - base_seed), {})[row.difficulty] = row.value
    return out


def design_view(data: StudyData) -> DesignView:
    """The design of an adaptive study, from its finished runs (objective's kind and split)."""
    spec = DesignSpec(**(data.sweep.get("design") or {}))
    key, param = next(iter(data.sweep["params"].items()))
    candidates = [int(c) for c in param["choices"]]
    decision = None
    if re.fullmatch(r"[a-z]+_final", data.objective_metric.split("/", 1)[1]):  # the curves the sweep decided on
        decision = decide_with(spec, candidates, data.objective_metric, data.direction,
                               int((data.sweep.get("sampler") or {}).get("seed", 0)),
                               observations(data, int(data.runs["seed"].min())))  # (the start trains seed index 0)
    def law(v: float) -> str:
        return f"{v:.1f}" if math.isfinite(v) else "beyond twice the largest T" if math.isinf(v) else "no fit"

    answers = pd.DataFrame([{"curve": c, "answer": str(a), "law within ε by": law(a.law_loops)}
                            for c, a in (decision.answers.items() if decision else [])],
                           columns=["curve", "answer", "law within ε by"])
    flops = data.runs.groupby("loops")["train_flops"].mean()
    known = flops[np.isfinite(flops)]
    # (a looped run's training FLOPs grow linearly in T: a skipped T's cost is read off that line)
    line = np.polyfit(known.index, known.values, 1) if len(known) >= 2 else None

    def cost(t: int) -> float:
        if t in known.index:
            return float(known[t])
        return float(np.polyval(line, t)) if line is not None else math.nan

    trained = data.runs.groupby("loops")["run_id"].nunique()
    trials = data.trials
    stopped = trials[trials["state"] == rr.PRUNED_STATE].assign(T=lambda f: f[key].astype(int)) \
        if key in trials else trials.iloc[:0].assign(T=[])
    n_stopped = stopped.groupby("T").size()
    points = pd.DataFrame([{"T": t, "seeds trained": int(trained.get(t, 0)), "seeds stopped": int(n_stopped.get(t, 0)),
                            "seeds skipped": spec.max_seeds - int(trained.get(t, 0)) - int(n_stopped.get(t, 0)),
                            "train FLOPs per run": cost(t)}
                           for t in candidates])
    # a stopped run spent its share of a whole run's FLOPs: the steps it trained
    stopped_flops = [cost(int(r.T)) * r.stopped_at / r.max_steps for r in stopped.itertuples()]
    spent = float(data.runs["train_flops"].sum()) + float(np.nansum(stopped_flops))
    grid = float(sum(spec.max_seeds * cost(t) for t in candidates))
    why = pd.DataFrame({"trial": stopped["number"].astype(int), "T": stopped["T"], "stopped at step": stopped["stopped_at"],
                        "why": stopped["pruned"]}, columns=["trial", "T", "stopped at step", "why"])
    return DesignView(decision, answers, points, spent, grid, why.reset_index(drop=True))


def test_time_view(data: StudyData) -> tuple[pd.DataFrame, float, float]:
    """The study's random-depth run (sweep test_time_run) at every eval step t, beside the seed
    mean of the runs trained at T = t (all positions, the report's kind and split); and the
    training FLOPs of the one run and of the trained runs together."""
    kind, split = data.kind, data.split
    tt = data.test_time_steps
    tt = tt[(tt["split"] == split) & (tt["difficulty"] == ALL)]
    finals = final_values(data, kind, split)
    trained = finals[finals["difficulty"] == ALL].groupby("loops")["value"].agg(["mean", "count"])
    table = pd.DataFrame([{"t": int(t), f"random-depth run at t": float(g[kind].mean()),
                           f"trained at T=t (seed mean)": float(trained["mean"].get(t, math.nan)),
                           "seeds": int(trained["count"].get(t, 0))} for t, g in tt.groupby("step")])
    return table, float(data.test_time_runs["train_flops"].sum()), float(data.runs["train_flops"].sum())
