"""What one run shows a person: the per-loop-step figure (logged as `plots/loop_steps.png`)
and the terminal table of metrics by loop step and difficulty (`ouro-lab train` / `eval`)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless: plots are files and MLflow artifacts
import matplotlib.pyplot as plt  # noqa: E402

from ouro_lab import metric_names as names  # noqa: E402


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
