"""Metric names, built and parsed here and nowhere else (DESIGN.md's one scheme):

    {split}/{kind}_step{t}[_d{k}]   kind loss | acc | bpb at evaluation loop step t (t > T: extrapolation)
    {split}/{kind}_final[_d{k}]     the same at the trained loop count T (step 1 for the baselines)
    {split}/{kind}_exit             Σ_t p(t|x) · metric_t: under the exit distribution (looped only)
    {split}/exit_expected_step[_d{k}], {split}/exit_entropy[_d{k}], {split}/exit_mass_step{t}
    {split}/acc                     = acc_final (the progress bar's and the pruner's default)
    train/loss, train/loss_step{t}, train/loss_exit, train/exit_entropy, train/exit_kl

split is val or test; k is the difficulty level (op count, hop count, position bucket).
bpb (bits per byte, byte-level tasks) = loss / ln 2.
"""

from __future__ import annotations

import re
from typing import Iterable

KINDS = ("loss", "acc", "bpb")
EXIT_STATS = ("exit_expected_step", "exit_entropy")
# {split}/{kind}_step{t}[_d{k}]
STEP_METRIC = re.compile(r"^(?P<split>val|test)/(?P<kind>[a-z]+)_step(?P<step>\d+)(?:_d(?P<level>\d+))?$")
# {split}/exit_expected_step[_d{k}], {split}/exit_entropy[_d{k}]
EXIT_METRIC = re.compile(r"^(?P<split>val|test)/(?P<kind>exit_expected_step|exit_entropy)(?:_d(?P<level>\d+))?$")
# what a sweep objective may name: any val/ or test/ metric of the scheme
OBJECTIVE_METRIC = re.compile(r"^(val|test)/[a-z_]+(step\d+)?(_d\d+)?$")


def _level(level: int | None) -> str:
    return f"_d{level}" if level is not None else ""


def step(kind: str, t: int, level: int | None = None) -> str:
    """'acc_step3', 'acc_step3_d2'."""
    return f"{kind}_step{t}{_level(level)}"


def final(kind: str, level: int | None = None) -> str:
    """'acc_final', 'acc_final_d2': the metric at the trained loop count."""
    return f"{kind}_final{_level(level)}"


def exit_stat(stat: str, level: int | None = None) -> str:
    """'exit_expected_step', 'exit_entropy_d2'."""
    return f"{stat}{_level(level)}"


def under_exit(kind: str) -> str:
    """'loss_exit': the metric's expectation under the exit distribution, Σ_t p_t · metric_t."""
    return f"{kind}_exit"


def exit_mass(t: int) -> str:
    return f"exit_mass_step{t}"


def as_bpb(name: str) -> str:
    """The bits-per-byte name of a loss name: 'loss_step2_d1' -> 'bpb_step2_d1'."""
    assert name.startswith("loss"), name
    return "bpb" + name[len("loss"):]


def objective_kind(metric: str) -> str:
    """The metric kind a name is about: 'acc' for val/acc_final, 'loss' for val/loss_step3_d2."""
    name = metric.split("/", 1)[-1]
    return re.sub(r"_(final|exit|step\d+)(_d\d+)?$", "", name)


def steps_and_levels(metrics: Iterable[str], split: str, kind: str = "acc") -> tuple[list[int], list[int]]:
    """The evaluation steps and difficulty levels present among `metrics` for one split and kind."""
    steps, levels = set(), set()
    for name in metrics:
        m = STEP_METRIC.match(name)
        if m and m["split"] == split and m["kind"] == kind:
            steps.add(int(m["step"]))
            if m["level"] is not None:
                levels.add(int(m["level"]))
    return sorted(steps), sorted(levels)


def metric_names(eval_loops: int, trained_loops: int, levels: list[int], has_gate: bool,
                 splits: tuple[str, ...] = ("val", "test"), bpb: bool = False) -> set[str]:
    """Every name a run logs through `LoopStepMetrics` (for checking a sweep's objective up
    front). Difficulty levels with no examples in a split are left out at run time."""
    kinds = KINDS if bpb else ("loss", "acc")
    names: set[str] = set()
    for kind in kinds:
        for level in [None, *levels]:
            names.add(final(kind, level))
            names.update(step(kind, t, level) for t in range(1, eval_loops + 1))
    if has_gate:
        names.update(under_exit(kind) for kind in kinds)
        names.update(exit_stat(stat, level) for stat in EXIT_STATS for level in [None, *levels])
        names.update(exit_mass(t) for t in range(1, trained_loops + 1))
    return {f"{split}/{name}" for split in splits for name in names} | {f"{split}/acc" for split in splits}
