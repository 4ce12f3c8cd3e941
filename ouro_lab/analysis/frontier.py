"""Early exit in a study: the accuracy-compute frontier of every exit rule against fixed depth
and the oracles, the gate's efficiency, and where tokens stop gaining (docs/guides/early-exit.md).
Reads `StudyData.frontier` / `.gate` (looped runs) and `.steps` (fixed depth); the skip frontier
of `ouro-lab eval` runs (infer.frontier) from `StudyData.skip_frontier`."""

from __future__ import annotations

import textwrap

import numpy as np
import pandas as pd

from ouro_lab.analysis.tidy import ALL, StudyData, difficulty_order
from ouro_lab.analysis.stats import _in_group_order, mean_ci
from ouro_lab.views import plt, skip_gap

RULE_STYLE = {"q": dict(color="tab:blue", marker="o", label="q-exit (gate)"),
              "conf": dict(color="tab:orange", marker="s", label="confidence"),
              "change": dict(color="tab:green", marker="^", label="step-change"),
              "fixed": dict(color="black", marker=".", linestyle="--", label="fixed depth")}
ORACLE_STYLE = {"oracle_stable": dict(color="tab:red", marker="*", s=120, label="answer-stable oracle"),
                "oracle_right": dict(color="tab:purple", marker="P", s=80,
                                     label="first-right oracle (lucky guesses count)")}


def frontier_table(data: StudyData, split: str | None = None, kind: str = "acc") -> pd.DataFrame:
    """Seed means per group x T x rule x threshold x difficulty of mean loops and `kind`, with
    fixed depth (t = 1..T) as rule 'fixed' (threshold = t)."""
    split = split or data.split
    f = data.frontier[data.frontier["split"] == split] if len(data.frontier) else data.frontier
    if f.empty or kind not in f:
        return pd.DataFrame(columns=["group", "loops", "rule", "threshold", "difficulty", "loops_used", kind, "n"])
    rows = f.groupby(["group", "loops", "rule", "threshold", "difficulty"], dropna=False).agg(
        loops_used=("loops_used", "mean"), value=(kind, "mean"), n=("run_id", "nunique")).reset_index()
    s = data.steps[(data.steps["split"] == split) & (data.steps["arch"] == "looped")
                   & (data.steps["step"] <= data.steps["trained_loops"])]
    fixed = s.groupby(["group", "loops", "step", "difficulty"]).agg(value=(kind, "mean"), n=("run_id", "nunique")).reset_index()
    fixed = fixed.assign(rule="fixed", threshold=fixed["step"].astype(float), loops_used=fixed["step"].astype(float))
    table = pd.concat([rows, fixed.drop(columns="step")], ignore_index=True).rename(columns={"value": kind})
    table = table[table["loops"].isin(set(rows["loops"]))]
    return _in_group_order(data, table, ["loops", "rule", "threshold"])


def gate_table(data: StudyData, split: str | None = None, level: float = 0.95) -> pd.DataFrame:
    """Per group x T: the gate's efficiency (mean ± CI over seeds), loops saved within epsilon of
    full depth, the q that does it, and the answer-stable oracle's loops."""
    split = split or data.split
    g = data.gate[data.gate["split"] == split] if len(data.gate) else data.gate
    if g.empty:
        return pd.DataFrame(columns=["group", "T", "gate efficiency", "loops saved", "q at eps", "oracle loops", "seeds"])
    oracle = frontier_table(data, split)
    oracle = oracle[(oracle["rule"] == "oracle_stable") & (oracle["difficulty"] == ALL)].set_index(["group", "loops"])
    rows = []
    for (group, t), c in g.groupby(["group", "loops"]):
        mean, low, high = mean_ci(c["gate_efficiency"].tolist(), level)
        ci = f" ± {(high - low) / 2:.2f}" if np.isfinite(low) else ""
        rows.append({"group": group, "T": t, "gate efficiency": f"{mean:.2f}{ci}",
                     "loops saved": c["gate_saved_loops"].mean(), "q at eps": c["gate_q_at_eps"].median(),
                     "oracle loops": oracle["loops_used"].get((group, t), np.nan), "seeds": c["run_id"].nunique()})
    return _in_group_order(data, pd.DataFrame(rows), ["T"])


def plot_frontier(data: StudyData, split: str | None = None, kind: str = "acc"):
    """Accuracy (or `kind`) vs mean loops used: every exit rule over its thresholds, fixed
    depth, and both oracles. One row per group x trained T, one column per difficulty."""
    split = split or data.split
    table = frontier_table(data, split, kind)
    if table.empty:
        return None
    cells = [(g, t) for g in data.groups for t in sorted(table[table["group"] == g]["loops"].unique())]
    diffs = difficulty_order(table["difficulty"])
    fig, axes = plt.subplots(len(cells), len(diffs), figsize=(3.4 * len(diffs), 2.8 * len(cells) + 0.9),
                             squeeze=False, constrained_layout=True)
    for i, (group, t) in enumerate(cells):
        for j, diff in enumerate(diffs):
            ax = axes[i, j]
            c = table[(table["group"] == group) & (table["loops"] == t) & (table["difficulty"] == diff)]
            for rule, style in RULE_STYLE.items():
                r = c[c["rule"] == rule].sort_values("loops_used")
                if len(r):
                    ax.plot(r["loops_used"], r[kind], markersize=4, **style)
            for rule, style in ORACLE_STYLE.items():
                r = c[c["rule"] == rule]
                if len(r):
                    ax.scatter(r["loops_used"], r[kind], zorder=5, **style)
            where = "all positions" if diff == ALL else f"{data.difficulty_name} {diff[1:]}"
            ax.set_title((textwrap.fill(f"{group}, T={t}", 48) + "\n" if j == 0 else "") + where, fontsize=8)
            ax.set_xlabel("mean loop steps used")
            ax.set_ylabel(f"{split} {kind}")
            ax.grid(alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 3), fontsize=8)
    fig.suptitle(f"{data.name}: early-exit frontier ({split}, seed means; selection semantics)")
    return fig


def plot_oracle(data: StudyData, split: str | None = None):
    """Where tokens stop gaining: the share of tokens whose answer-stable exit is step t, by
    difficulty (left), and the gate's expected exit step over those tokens (right: on the
    diagonal = the gate stops where the token does). One row per group x trained T."""
    split = split or data.split
    g = data.gate[data.gate["split"] == split] if len(data.gate) else data.gate
    if g.empty:
        return None
    cells = [(grp, t) for grp in data.groups for t in sorted(g[g["group"] == grp]["loops"].unique())]
    fig, axes = plt.subplots(len(cells), 2, figsize=(9.5, 2.9 * len(cells) + 0.6), squeeze=False, constrained_layout=True)
    for i, (group, t) in enumerate(cells):
        c = g[(g["group"] == group) & (g["loops"] == t)]
        steps = np.arange(1, t + 1)
        levels = sorted({int(col.rsplit("_d", 1)[1]) for col in c.columns
                         if col.startswith("oracle_stable_share_step1_d")})
        ax = axes[i, 0]
        colors = plt.get_cmap("plasma")(np.linspace(0, 0.85, max(1, len(levels))))
        for color, k in zip(colors, levels):
            ax.plot(steps, [c.get(f"oracle_stable_share_step{s}_d{k}", pd.Series(np.nan)).mean() for s in steps],
                    marker="o", color=color, label=f"{data.difficulty_name} {k}")
        ax.plot(steps, [c.get(f"oracle_stable_share_step{s}", pd.Series(np.nan)).mean() for s in steps], "k--",
                marker="s", label="all")
        ax.set(title=textwrap.fill(f"{group}, T={t}: share of tokens whose answer is final from step t", 60),
               xlabel="loop step t", ylabel="share of tokens", xticks=steps)
        ax.legend(fontsize=7)
        ax = axes[i, 1]
        ax.plot(steps, [c.get(f"exit_expected_step_at_oracle{s}", pd.Series(np.nan)).mean() for s in steps],
                marker="o", color="tab:blue", label="gate E[t]")
        ax.plot(steps, steps, ":", color="grey", label="= oracle exit step")
        ax.set(title="the gate's expected exit step vs the oracle's", xlabel="answer-stable exit step",
               ylabel="gate's expected exit step", xticks=steps)
        ax.legend(fontsize=7)
    fig.suptitle(f"{data.name}: when does each token stop gaining? ({split}, seed means)")
    return fig


def frontier_summary(data: StudyData, split: str | None = None) -> list[str]:
    """Sentences from `gate_table`: the gate's efficiency and the loops it saves at iso-accuracy."""
    table = gate_table(data, split)
    lines = []
    for _, r in table.iterrows():
        where = f" ({r['group']})" if r["group"] != "all runs" else ""
        lines.append(f"Early exit at T={r['T']}{where}: within epsilon of full-depth accuracy the gate saves "
                     f"{r['loops saved']:.2f} of {r['T']} loops (q={r['q at eps']:g}), {r['gate efficiency']} of "
                     f"what the answer-stable oracle saves ({r['T'] - r['oracle loops']:.2f} loops; gate efficiency).")
    return lines


KV_STYLE = {"frozen": dict(color="tab:red", marker="v"), "propagate": dict(color="tab:green", marker="^"),
            "first": dict(color="tab:purple", marker="D")}


def plot_skip_frontier(data: StudyData, kind: str = "acc"):
    """Each evaluation's skip frontier: `kind` vs executed MFLOPs per token, selection semantics
    (which computes every step: its FLOPs are full depth's, so it is drawn at the loops it reads,
    scaled to FLOPs) and skip semantics per exited_kv, full depth as a point. One panel each,
    four to a row."""
    f = data.skip_frontier
    if f.empty or kind not in f:
        return None
    evals = list(dict.fromkeys(zip(f["run_id"], f["evaluated"], f["split"])))
    cols = min(4, len(evals))
    rows = -(-len(evals) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.0 * rows + 0.8), squeeze=False, constrained_layout=True)
    for ax in axes.flat[len(evals):]:
        ax.set_visible(False)
    for ax, (run_id, evaluated, split) in zip(axes.flat, evals):
        e = f[(f["run_id"] == run_id) & (f["difficulty"] == ALL)]
        full = e[e["semantics"] == "full"].iloc[0]
        sel = e[e["semantics"] == "select"].sort_values("loops")
        per_loop = full["flops"] / full["loops"]
        ax.plot(sel["loops"] * per_loop / 1e6, sel[kind], "k--", marker=".",
                label="selection (at the loops it reads; executes full depth)")
        for kv, style in KV_STYLE.items():
            s = e[(e["semantics"] == "skip") & (e["exited_kv"] == kv)].sort_values("flops")
            if len(s):
                ax.plot(s["flops"] / 1e6, s[kind], label=f"skip, exited_kv={kv}", markersize=4, **style)
        ax.scatter([full["flops"] / 1e6], [full[kind]], color="black", marker="*", s=140, zorder=5, label="full depth")
        ax.set(xlabel="executed forward MFLOPs per token", ylabel=f"{split} {kind}",
               title=textwrap.fill(f"{evaluated}, eval {run_id[:8]} ({full['rule']} rule)", 50))
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=2, fontsize=8)
    fig.suptitle(f"{data.name}: early exit that skips compute (skip frontier)")
    return fig


def skip_frontier_tables(data: StudyData, epsilon: float, kind: str = "acc") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per evaluation, at the threshold where selection stays within epsilon of full depth with
    the fewest loops: per exited_kv, skip semantics' value, its gap to selection, whether it is
    within epsilon of full depth, the FLOPs it saves, and its cheapest point within epsilon (left);
    the gap per difficulty level (right)."""
    rows, by_level = [], []
    f = data.skip_frontier
    for (run_id, evaluated, split), e in (f.groupby(["run_id", "evaluated", "split"], sort=False) if len(f) else []):
        gap = skip_gap(e, epsilon, kind)
        base = {"checkpoint": evaluated, "eval run": run_id[:8], "split": split, "full": gap["full"],
                "threshold": gap.get("threshold"),
                "select": gap.get("select"), "select loops": gap.get("select_loops")}
        for kv in KV_STYLE:
            v, best = gap["variants"].get(kv, {}), gap["cheapest"].get(kv, {})
            rows.append(base | {"exited kv": kv, "skip": v.get(kind), "skip - select": v.get("gap"),
                                "within eps": v.get("within"), "FLOPs saved %": _percent(v.get("saved")),
                                "cheapest within eps": best.get("threshold"),
                                "its FLOPs saved %": _percent(best.get("saved"))})
        for level, gaps in gap["by_difficulty"].items():
            by_level.append({"checkpoint": evaluated, "eval run": run_id[:8], "split": split, "difficulty": level,
                             **{f"{kv} skip - select": g for kv, g in gaps.items()}})
    return pd.DataFrame(rows), pd.DataFrame(by_level)


def _percent(share: float | None) -> float | None:
    return None if share is None else 100 * share
