"""Figures of a study: metric vs trained T with both baselines, vs evaluation loop step,
against FLOPs, and the exit gate. Each takes `StudyData` and returns a matplotlib Figure."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from ouro_lab.analysis.tidy import ALL, StudyData, difficulty_order
from ouro_lab.analysis.stats import compute_table, curve_table, exit_table
from ouro_lab.config import ARCHS
from ouro_lab.views import plt


ARCH_STYLE = {"looped": dict(color="tab:blue", marker="o"),
              "param_matched": dict(color="tab:green", marker="s", linestyle="--"),
              "depth_matched": dict(color="tab:red", marker="^")}


EXIT_KEYS = ("objective.entropy_weight", "objective.prior", "objective.prior_p")


def _grid(n_rows: int, n_cols: int, width: float = 3.4, height: float = 2.8):
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(width * n_cols, height * n_rows + 0.8), squeeze=False,
                             constrained_layout=True)
    return fig, axes


def _panel(ax, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def _figure_legend(fig, axes, title: str | None = None) -> None:
    """One legend for the whole figure, below the panels (per-panel legends hide the curves)."""
    seen: dict[str, Any] = {}
    for ax in np.ravel(axes):
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    if seen:
        # entries per legend row that fit the figure's width (at fontsize 8, ~14 characters an inch)
        entry = max(2.4, max(len(str(label)) for label in seen) / 14 + 0.7)
        fits = max(1, int(fig.get_figwidth() / entry))
        fig.legend(seen.values(), seen.keys(), loc="outside lower center", ncols=min(len(seen), fits), fontsize=8,
                   title=title, title_fontsize=8)


def _difficulty_title(data: StudyData, diff: str) -> str:
    return "all positions" if diff == ALL else f"{data.difficulty_name} {diff[1:]}"


def _bounded(kind: str, values):
    """Accuracy CIs are clipped to [0, 1] for display."""
    return np.clip(values, 0.0, 1.0) if kind == "acc" else values


def plot_vs_loops(data: StudyData, sat: pd.DataFrame | None = None, kind: str | None = None,
                  split: str | None = None, level: float = 0.95):
    """Metric at the final step vs trained loop count T, mean and CI over seeds: the looped model
    with both baselines at each T (param_matched is one model shown at every T). One row per
    group, one column per difficulty; the looped model's saturation point as a dotted line."""
    kind, split = kind or data.kind, split or data.split
    table = curve_table(data, kind, split, level)
    groups, diffs = [g for g in data.groups if g in set(table["group"])], difficulty_order(table["difficulty"])
    fig, axes = _grid(len(groups), len(diffs))
    for i, group in enumerate(groups):
        for j, diff in enumerate(diffs):
            ax, title = axes[i, j], f"{group}\n{_difficulty_title(data, diff)}"
            for arch in ARCHS:
                c = table[(table["group"] == group) & (table["difficulty"] == diff) & (table["arch"] == arch)]
                if c.empty:
                    continue
                style = ARCH_STYLE[arch]
                ax.plot(c["loops"], c["mean"], label=arch.replace("_", "-"), **style)
                ax.fill_between(c["loops"], _bounded(kind, c["ci_low"]), _bounded(kind, c["ci_high"]),
                                color=style["color"], alpha=0.12, linewidth=0)
            hit = sat[(sat["group"] == group) & (sat["difficulty"] == diff) & (sat["arch"] == "looped")] \
                if sat is not None else pd.DataFrame()
            if len(hit):
                title += f"\nlooped: {hit['text'].iloc[0]}"
                if pd.notna(hit["point"].iloc[0]):
                    ax.axvline(hit["point"].iloc[0], color=ARCH_STYLE["looped"]["color"], linestyle=":", linewidth=1.2,
                               label="looped saturation point")
            _panel(ax, title, "trained loop count T", f"{split} {kind}")
            ax.set_xticks(sorted(table["loops"].unique()))
    _figure_legend(fig, axes)
    fig.suptitle(f"{data.name}: {split} {kind} at the final loop step vs trained T "
                 f"(seed mean, band = {level:.0%} t-interval)")
    return fig


def plot_vs_step(data: StudyData, kind: str | None = None, split: str | None = None):
    """Looped models: metric at every evaluation loop step t, one line per trained T (seed mean).
    The dot marks t = T; the dashed part (t > T) is extrapolation, where over-looping shows."""
    kind, split = kind or data.kind, split or data.split
    s = data.steps[(data.steps["split"] == split) & (data.steps["arch"] == "looped")]
    if s.empty or kind not in s:
        return None
    mean = s.groupby(["group", "difficulty", "loops", "step"])[kind].mean().reset_index()
    groups, diffs = [g for g in data.groups if g in set(mean["group"])], difficulty_order(mean["difficulty"])
    loops = sorted(mean["loops"].unique())
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(loops)))
    fig, axes = _grid(len(groups), len(diffs))
    for i, group in enumerate(groups):
        for j, diff in enumerate(diffs):
            ax = axes[i, j]
            for color, t in zip(colors, loops):
                c = mean[(mean["group"] == group) & (mean["difficulty"] == diff) & (mean["loops"] == t)]
                inside, beyond = c[c["step"] <= t], c[c["step"] >= t]
                ax.plot(inside["step"], inside[kind], color=color, label=f"T={t}")
                ax.plot(beyond["step"], beyond[kind], color=color, linestyle="--")
                ax.plot(inside["step"].iloc[-1:], inside[kind].iloc[-1:], "o", color=color)
            _panel(ax, f"{group}\n{_difficulty_title(data, diff)}", "evaluation loop step t", f"{split} {kind}")
    _figure_legend(fig, axes, "trained loop count (dot: t = T; dashed: t > T, extrapolation)")
    fig.suptitle(f"{data.name}: looped model, {split} {kind} at every loop step (seed mean)")
    return fig


def plot_compute(data: StudyData, kind: str | None = None, split: str | None = None):
    """Compute-normalised view: the metric against training FLOPs and inference FLOPs/token
    (counted by structure: a shared block run T times costs T times). Labels give T."""
    kind, split = kind or data.kind, split or data.split
    table = compute_table(data, kind, split)
    groups = [g for g in data.groups if g in set(table["group"])]
    fig, axes = _grid(len(groups), 2, width=4.6)
    for i, group in enumerate(groups):
        for j, (x, label) in enumerate((("train_flops", "training FLOPs (total)"),
                                        ("forward_flops_per_token", "inference FLOPs / token"))):
            ax = axes[i, j]
            for arch in ARCHS:
                c = table[(table["group"] == group) & (table["arch"] == arch)].sort_values(x)
                if c.empty:
                    continue
                ax.plot(c[x], c["mean"], label=arch.replace("_", "-"), **ARCH_STYLE[arch])
                for _, row in c.iterrows():
                    if pd.notna(row["T"]):
                        ax.annotate(f"T={int(row['T'])}", (row[x], row["mean"]), fontsize=6,
                                    textcoords="offset points", xytext=(3, -9))
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(plt.NullFormatter())  # minor labels collide within a decade
            _panel(ax, group, label, f"{split} {kind} (all positions)")
    _figure_legend(fig, axes)
    fig.suptitle(f"{data.name}: compute-normalised, {split} {kind} (seed mean) vs FLOPs")
    return fig


def plot_exit(data: StudyData, split: str | None = None):
    """Does the gate spend more loops on harder inputs? Row 1: expected exit step and exit
    entropy vs difficulty (one line per T, line style per group). One more row per exit-objective
    key the study varies (beta, prior, prior_p): the same two statistics against its value."""
    split = split or data.split
    table = exit_table(data, split)
    if table.empty:
        return None
    levels = [d for d in difficulty_order(table["difficulty"]) if d != ALL] or [ALL]
    varied = [k for k in EXIT_KEYS if k in data.group_keys + data.averaged_keys]
    groups = [g for g in data.groups if g in set(table["group"])]
    loops = [t for t in sorted(table["loops"].unique()) if t > 1] or sorted(table["loops"].unique())
    # colour = group, line style = T (a gate study has many groups at one T; a loops study the reverse)
    palette = plt.cm.tab20 if len(groups) > 10 else plt.cm.tab10
    colors = {g: palette(i % palette.N) for i, g in enumerate(groups)}
    dashes = dict(zip(loops, ("-", "--", ":", "-.") * len(loops)))
    stats_ = (("exit_expected_step", "expected exit step E[t]"), ("exit_entropy", "exit entropy (nats)"))
    fig, axes = _grid(1 + len(varied), 2, width=4.6, height=3.2)
    for j, (col, label) in enumerate(stats_):
        ax = axes[0, j]
        for group in groups:
            for t in loops:
                c = table[(table["group"] == group) & (table["loops"] == t)].set_index("difficulty").reindex(levels)
                ax.plot(range(1, len(levels) + 1), c[col], marker="o", color=colors[group], linestyle=dashes[t])
        ax.set_xticks(range(1, len(levels) + 1), [lv.removeprefix("d") for lv in levels])
        _panel(ax, f"{label} by {data.difficulty_name}", data.difficulty_name, label)
    e = data.exits[(data.exits["split"] == split) & (data.exits["difficulty"] == ALL)]
    for i, key in enumerate(varied, start=1):
        m = e.groupby([key, "loops"])[[c for c, _ in stats_]].mean().reset_index()
        numeric = pd.api.types.is_numeric_dtype(m[key])
        for j, (col, label) in enumerate(stats_):
            ax = axes[i, j]
            for t in loops:
                c = m[m["loops"] == t].sort_values(key)
                ax.plot(c[key] if numeric else c[key].astype(str), c[col], marker="o", color="black",
                        linestyle=dashes[t])
            if numeric and key == "objective.entropy_weight" and (m[key] > 0).all():
                ax.set_xscale("log")
            _panel(ax, f"{label} vs {key}\n(all positions, mean over the other keys)", key, label)
    # legend below the panels: one entry per group (colour) and per T (line style), as proxies
    ax = axes[0, 0]
    for group in groups if len(groups) > 1 else []:
        ax.plot([], [], color=colors[group], marker="o", label=group)
    for t in loops if len(loops) > 1 or len(groups) == 1 else []:
        ax.plot([], [], color="gray", linestyle=dashes[t], label=f"T={t}")
    _figure_legend(fig, axes)
    fig.suptitle(f"{data.name}: exit gate of the looped runs ({split}, seed means)")
    return fig
