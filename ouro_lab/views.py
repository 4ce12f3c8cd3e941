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


def metrics_table(metrics: dict[str, float], split: str = "val") -> str:
    """Loss and accuracy (bits per byte for byte-level tasks) by loop step and difficulty, as a
    plain-text table."""
    steps, levels = names.steps_and_levels(metrics, split)
    kind = "bpb" if f"{split}/{names.step('bpb', 1)}" in metrics else "acc"
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
