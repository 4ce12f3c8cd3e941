"""What one run shows a person: the per-loop-step figure (logged as `plots/loop_steps.png`)
and the terminal table of metrics by loop step and difficulty (`ouro-lab train` / `eval`)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless: plots are files and MLflow artifacts
import matplotlib.pyplot as plt  # noqa: E402

from ouro_lab import metric_names as names  # noqa: E402
from ouro_lab.models.decoding import EXITED_KV  # noqa: E402


def loop_step_figure(history: dict[str, list[tuple[int, float]]], final: dict[str, float],
                     trained_loops: int, eval_loops: int, levels: list[int], difficulty_name: str,
                     title: str, kind: str = "acc") -> plt.Figure:
    """Left: validation loss of each loop step over training. Right: final validation
    accuracy (or bits per byte, kind="bpb") vs loop step, per difficulty level (steps after the
    trained T extrapolate)."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    cmap = plt.get_cmap("viridis")
    for t in range(1, eval_loops + 1):
        points = history.get(f"val/{names.step('loss', t)}", [])
        if points:
            steps, values = zip(*points)
            style = "-" if t <= trained_loops else ":"
            ax_loss.plot(steps, values, style, marker=".", color=cmap(t / (eval_loops + 1)), label=f"step {t}")
    ax_loss.set(xlabel="training step", ylabel="validation loss (nats/token)", title="val loss per loop step")
    ax_loss.legend(fontsize=8, ncol=2)
    steps = list(range(1, eval_loops + 1))
    for i, k in enumerate(levels):
        values = [final.get(f"val/{names.step(kind, t, k)}", float("nan")) for t in steps]
        ax_acc.plot(steps, values, marker="o", color=plt.get_cmap("plasma")(i / max(1, len(levels))),
                    label=f"{difficulty_name} {k}")
    ax_acc.plot(steps, [final.get(f"val/{names.step(kind, t)}", float("nan")) for t in steps], "k--", marker="s", label="all")
    if eval_loops > trained_loops:
        ax_acc.axvline(trained_loops + 0.5, color="grey", lw=1)
        ax_acc.text(trained_loops + 0.6, 0.02, "extrapolation", color="grey", fontsize=8,
                    transform=ax_acc.get_xaxis_transform())
    if kind == "acc":
        ax_acc.set(ylabel="validation accuracy", ylim=(0, 1.02), title="final val accuracy by loop step")
    else:
        ax_acc.set(ylabel=f"validation {kind}", title=f"final val {kind} by loop step")
    ax_acc.set(xlabel="loop step t", xticks=steps)
    ax_acc.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def metrics_table(metrics: dict[str, float], split: str = "val", kind: str = "acc") -> str:
    """Loss and accuracy (and bits per byte, kind "bpb": byte-level tasks) by loop step, and
    `kind` by difficulty, as a plain-text table."""
    steps, levels = names.steps_and_levels(metrics, split)
    header = ["step", "loss", *(["acc", "bpb"] if kind == "bpb" else ["acc"]), *[f"{kind}_d{k}" for k in levels]]
    rows = [header]
    for t in steps:
        row = [str(t), *(f"{metrics[f'{split}/{names.step(name, t)}']:.3f}" for name in header[1:len(header) - len(levels)])]
        rows.append(row + [f"{metrics[f'{split}/{names.step(kind, t, k)}']:.3f}" for k in levels])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    extra = []
    if f"{split}/exit_expected_step" in metrics:
        acc_exit = metrics[f"{split}/{names.under_exit('acc')}"]
        extra.append(f"exit: expected step {metrics[f'{split}/exit_expected_step']:.2f}, "
                     f"entropy {metrics[f'{split}/exit_entropy']:.3f} nats, acc under exit dist {acc_exit:.3f}")
    return f"{split} metrics by loop step (d = difficulty level):\n" + "\n".join(lines + extra)


def curve_series(metrics: dict[str, float], trained_loops: int, kind: str = "acc") -> dict[str, list[tuple[int, float]]]:
    """A run's final curves as MLflow metric series (logged once, after training), so that
    selecting runs in the MLflow UI overlays them:
      {split}/series/{kind}_vs_loop_step            step = loop step t (extrapolated steps too)
      {split}/series/fixed_{kind}_vs_milliloops      step = 1000 t, t <= T (fixed depth)
      {split}/series/exit_{rule}_{kind}_vs_milliloops  step = 1000 x mean loops of each threshold
      {split}/series/exit_{rule}_loops_vs_threshold_index  step = index into eval.exit_<rule>
    Putting the *_vs_milliloops series in one chart draws the accuracy-compute frontier."""
    out: dict[str, list[tuple[int, float]]] = {}
    for split in sorted({k.split("/", 1)[0] for k in metrics}):
        steps, _ = names.steps_and_levels(metrics, split, kind)
        if not steps:
            continue
        out[names.series(split, kind, "loop_step")] = [(t, metrics[f"{split}/{names.step(kind, t)}"]) for t in steps]
        out[names.series(split, f"fixed_{kind}", "milliloops")] = [
            (1000 * t, metrics[f"{split}/{names.step(kind, t)}"]) for t in steps if t <= trained_loops]
        rules: dict[str, list[tuple[float, float, float]]] = {}
        for rule, threshold, loops, value in _rule_points(metrics, split, kind):
            rules.setdefault(rule, []).append((threshold, loops, value))
        for rule, points in rules.items():
            points.sort()
            out[names.series(split, f"exit_{rule}_{kind}", "milliloops")] = [(round(1000 * lp), v) for _, lp, v in points]
            out[names.series(split, f"exit_{rule}_loops", "threshold_index")] = [(i, lp) for i, (_, lp, _) in enumerate(points)]
    return out


def frontier_table(metrics: dict[str, float], split: str = "val", kind: str = "acc") -> str:
    """The early-exit frontier as a plain-text table: each rule's threshold, mean loops and
    `kind` (accuracy, or bits per byte for byte-level tasks), the oracles and the gate scalars;
    '' for a run without a gate."""
    rows = _rule_points(metrics, split, kind)
    if not rows:
        return ""
    label = {"q": "q-exit", "conf": "confidence", "change": "step-change"}
    lines = [f"{split} early-exit frontier (selection semantics; loops = mean loop steps used):",
             f"  {'rule':<12} {'threshold':>9} {'loops':>6} {kind:>6}"]
    for rule, threshold, loops, value in sorted(rows, key=lambda r: (names.EXIT_RULES.index(r[0]), r[1])):
        lines.append(f"  {label[rule]:<12} {threshold:>9g} {loops:>6.2f} {value:>6.3f}")
    for which, text in (("stable", "oracle: answer-stable (full-depth answers, fewest loops)"),
                        ("right", "oracle: first-right (upper bound; lucky guesses count)")):
        loops, value = metrics[f"{split}/{names.oracle(which, 'loops')}"], metrics[f"{split}/{names.oracle(which, kind)}"]
        lines.append(f"  {text}: loops {loops:.2f}, {kind} {value:.3f}")
    lines.append(f"  gate within epsilon of full depth: q={metrics[f'{split}/gate_q_at_eps']:g}, "
                 f"{metrics[f'{split}/gate_loops_at_eps']:.2f} loops (saves {metrics[f'{split}/gate_saved_loops']:.2f}), "
                 f"efficiency {metrics[f'{split}/gate_efficiency']:.2f} of the oracle's saving")
    return "\n".join(lines)


def _rule_points(metrics: dict[str, float], split: str, kind: str) -> list[tuple[str, float, float, float]]:
    """(rule, threshold, mean loops, `kind`) of every exit rule x threshold logged for `split`
    (all positions)."""
    points = []
    for name, value in metrics.items():
        m = names.EXIT_RULE_METRIC.match(name)
        if m and m["split"] == split and m["level"] is None and m["kind"] == kind:
            loops = metrics[f"{split}/{names.exit_rule(m['rule'], float(m['threshold']), 'loops')}"]
            points.append((m["rule"], float(m["threshold"]), loops, value))
    return points


def run_tables(metrics: dict[str, float], split: str = "val", kind: str = "acc") -> str:
    """What `ouro-lab train` and `eval` print: metrics by loop step, then the exit frontier
    (`kind`: the run's metric kind, run_record.metric_kind)."""
    frontier = frontier_table(metrics, split, kind)
    return metrics_table(metrics, split, kind) + (f"\n{frontier}" if frontier else "")


# --- the skip frontier (`ouro-lab eval` with infer.frontier; the report's "skip frontier") ---------
SKIP_COLUMNS = ["semantics", "rule", "threshold", "exited_kv", "difficulty"]


def skip_frontier_frame(metrics: dict[str, float], split: str):
    """The skip frontier's metrics of `split` as a frame: one row per semantics (select | skip |
    full) x rule x threshold x exited_kv x difficulty ('all' or the level), columns acc, loss,
    (bpb,) loops, flops (executed forward FLOPs per token). Empty without a frontier."""
    import pandas as pd

    rows: dict[tuple, dict[str, float]] = {}
    rule = None
    for name, value in metrics.items():
        if m := names.SKIP_FRONTIER_METRIC.match(name):
            if m["split"] != split:
                continue
            rule = m["rule"]
            key = (m["semantics"], m["rule"], float(m["threshold"]), m["kv"] or "", m["level"] or "all")
            rows.setdefault(key, {})[m["kind"]] = value
    for name, value in metrics.items():  # full depth: one row per difficulty
        if rule and (m := names.INFERENCE_METRIC.match(name)) and m["split"] == split and m["name"].startswith("full_"):
            kind, _, level = m["name"].removeprefix("full_").partition("_d")
            if kind != "seconds":
                rows.setdefault(("full", rule, None, "", level or "all"), {})[kind] = value  # (None: NaN != NaN)
    order = {"full": 0, "select": 1, "skip": 2, "": 0} | {kv: i + 1 for i, kv in enumerate(EXITED_KV)}
    keys = sorted(rows, key=lambda k: (order[k[0]], k[2] or 0, order.get(k[3], 9), -1 if k[4] == "all" else int(k[4])))
    return pd.DataFrame([dict(zip(SKIP_COLUMNS, key)) | rows[key] for key in keys])


def skip_gap(frame, epsilon: float, kind: str = "acc") -> dict:
    """Where selection semantics stays within `epsilon` of full depth (acc: at least full -
    epsilon; bpb: at most full + epsilon) with the fewest loops: its threshold, and there, per
    exited_kv variant, skip semantics' value, its gap to selection, whether it is within epsilon
    of full depth, and the FLOPs it saves against full depth; per difficulty the gap. Also each
    variant's cheapest point within epsilon of full depth. {} without a frontier."""
    if frame.empty:
        return {}
    better = (lambda a, b: a >= b - epsilon) if kind == "acc" else (lambda a, b: a <= b + epsilon)
    overall = frame[frame["difficulty"] == "all"]
    full = overall[overall["semantics"] == "full"].iloc[0]
    select = overall[overall["semantics"] == "select"]
    ok = select[[better(v, full[kind]) for v in select[kind]]]
    skip = frame[frame["semantics"] == "skip"]
    out = {"full": full[kind], "full_flops": full["flops"], "epsilon": epsilon, "kind": kind, "threshold": None,
           "variants": {}, "by_difficulty": {}, "cheapest": {}}
    for kv, rows in skip[skip["difficulty"] == "all"].groupby("exited_kv", sort=False):
        within = rows[[better(v, full[kind]) for v in rows[kind]]]
        if len(within):
            best = within.loc[within["flops"].idxmin()]
            out["cheapest"][kv] = {"threshold": best["threshold"], kind: best[kind],
                                   "saved": 1 - best["flops"] / full["flops"], "loops": best["loops"]}
    if ok.empty:
        return out
    at = ok.loc[ok["loops"].idxmin()]
    out |= {"threshold": at["threshold"], "select": at[kind], "select_loops": at["loops"]}
    here = skip[skip["threshold"] == at["threshold"]]
    sel = frame[(frame["semantics"] == "select") & (frame["threshold"] == at["threshold"])].set_index("difficulty")
    for kv, rows in here.groupby("exited_kv", sort=False):
        row = rows[rows["difficulty"] == "all"].iloc[0]
        out["variants"][kv] = {kind: row[kind], "gap": row[kind] - at[kind], "within": better(row[kind], full[kind]),
                               "saved": 1 - row["flops"] / full["flops"], "loops": row["loops"]}
        for _, r in rows[rows["difficulty"] != "all"].iterrows():
            out["by_difficulty"].setdefault(r["difficulty"], {})[kv] = r[kind] - sel.loc[r["difficulty"], kind]
    return out


def skip_frontier_text(frame, epsilon: float, kind: str = "acc") -> str:
    """The skip frontier as a terminal table (one row per threshold: selection, then each
    variant's skip value, its gap, its executed MFLOPs per token and the share it saves;
    full depth's MFLOPs in the first row), then the answer at the threshold
    where selection stays within epsilon of full depth, with the gap per difficulty."""
    if frame.empty:
        return ""
    overall = frame[frame["difficulty"] == "all"]
    full = overall[overall["semantics"] == "full"].iloc[0]
    variants = list(dict.fromkeys(overall[overall["semantics"] == "skip"]["exited_kv"]))
    rule = full["rule"]
    head = [rule, f"select {kind}", "loops", *(f"{kv}: {kind} (gap) MFLOPs/token (saved)" for kv in variants)]
    rows = [head, ["full", f"{full[kind]:.4f}", f"{full['loops']:.2f}", *[f"{full['flops'] / 1e6:.3f}" for _ in variants]]]
    for x, cell in overall[overall["semantics"] != "full"].groupby("threshold"):
        sel = cell[cell["semantics"] == "select"].iloc[0]
        row = [f"{x:g}", f"{sel[kind]:.4f}", f"{sel['loops']:.2f}"]
        for kv in variants:
            s = cell[(cell["semantics"] == "skip") & (cell["exited_kv"] == kv)].iloc[0]
            row.append(f"{s[kind]:.4f} ({s[kind] - sel[kind]:+.4f}) {s['flops'] / 1e6:.3f} ({1 - s['flops'] / full['flops']:.0%})")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    gap = skip_gap(frame, epsilon, kind)
    if gap.get("threshold") is None:
        lines.append(f"selection is nowhere within {epsilon:g} of full depth's {kind}")
    else:
        lines.append(f"selection within {epsilon:g} of full depth ({full[kind]:.4f}) down to {rule}={gap['threshold']:g} "
                     f"({gap['select_loops']:.2f} loops, {kind} {gap['select']:.4f}); there, skip semantics:")
        for kv, v in gap["variants"].items():
            lines.append(f"  {kv:9s} {kind} {v[kind]:.4f}  gap {v['gap']:+.4f}  FLOPs saved {v['saved']:.0%}  "
                         f"{'within' if v['within'] else 'NOT within'} {epsilon:g} of full depth")
        if gap["by_difficulty"]:
            lines.append("  gap (skip - select) by difficulty: " + "; ".join(
                f"d{d}: " + ", ".join(f"{kv} {g:+.4f}" for kv, g in by.items()) for d, by in gap["by_difficulty"].items()))
    for kv, best in gap["cheapest"].items():
        lines.append(f"cheapest {kv} point within {epsilon:g} of full depth: {rule}={best['threshold']:g}, "
                     f"{kind} {best[kind]:.4f}, FLOPs saved {best['saved']:.0%}")
    return "\n".join(lines)
