"""Metric names, one scheme, built and parsed here and nowhere else (docs/design.md "One owner per concern"):

    {split}/{kind}_step{t}[_d{k}]   kind loss | acc | bpb at evaluation loop step t (t > T: extrapolation)
    {split}/{kind}_final[_d{k}]     the same at the trained loop count T (step 1 for the baselines)
    {split}/{kind}_exit             Σ_t p(t|x) · metric_t: under the exit distribution (looped only)
    {split}/exit_expected_step[_d{k}], {split}/exit_entropy[_d{k}], {split}/exit_mass_step{t}
    {split}/acc                     = acc_final (the progress bar's and the pruner's default)
    train/loss, train/loss_step{t}, train/loss_exit, train/exit_entropy, train/exit_kl
    {split}/{skip|select|full}_{kind}[_d{k}]   `ouro-lab eval` with an exit rule (kind acc | loss | bpb |
                                    loops | flops | seconds), skip_minus_select_acc
    {split}/select_{rule}{x}_{kind}[_d{k}], {split}/skip_{rule}{x}_{exited_kv}_{kind}[_d{k}]
                                    the skip frontier (infer.frontier; the table skip_frontier/{split}.csv)

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
# what a sweep objective may look like: a val/ or test/ metric (whether a run logs it is checked apart)
OBJECTIVE_METRIC = re.compile(r"^(val|test)/[a-z][a-z0-9_.+-]*$")


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
                 splits: tuple[str, ...] = ("val", "test"), bpb: bool = False,
                 exit_rules: dict[str, list[float]] | None = None) -> set[str]:
    """Every name a run logs through `LoopStepMetrics` and, given the `exit_rules` (looped
    models), `ExitFrontierMetrics` (for checking a sweep's objective up front). Difficulty
    levels with no examples in a split are left out at run time."""
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
        if exit_rules is not None:
            names.update(frontier_names(trained_loops, levels, kinds, exit_rules))
    return {f"{split}/{name}" for split in splits for name in names} | {f"{split}/acc" for split in splits}


# --- the early-exit frontier (looped models; ouro_lab/exits.py) -----------------------------
EXIT_RULES = ("q", "conf", "change")  # Q-exit on the gate's CDF, confidence exit, step-change (KL) exit
ORACLES = ("stable", "right")  # answer-stable oracle, first-right oracle
# exit_q0.9_acc, exit_conf0.95_loops_d2, exit_change0.01_bpb ...
EXIT_RULE_METRIC = re.compile(r"^(?P<split>val|test)/exit_(?P<rule>q|conf|change)(?P<threshold>[0-9.e+-]+)_"
                              r"(?P<kind>[a-z]+)(?:_d(?P<level>\d+))?$")
ORACLE_METRIC = re.compile(r"^(?P<split>val|test)/oracle_(?P<rule>stable|right)_(?P<kind>[a-z]+)(?:_d(?P<level>\d+))?$")
# per-run gate facts: the gate scalars, the oracle's exit-step shares, the gate's E[t] per oracle exit step
GATE_METRIC = re.compile(r"^(?P<split>val|test)/(?P<name>gate_[a-z_]+|oracle_stable_share_step\d+(?:_d\d+)?|"
                         r"exit_expected_step_at_oracle\d+)$")
# the scalars a sweep can optimise (docs/guides/early-exit.md)
GATE_SCALARS = ("gate_q_at_eps", "gate_loops_at_eps", "gate_flops_at_eps", "gate_saved_loops", "gate_efficiency")


def threshold_label(x: float) -> str:
    """0.9 -> '0.9', 1.0 -> '1', 0.0001 -> '0.0001' (as in the config's list)."""
    return f"{x:g}"


def exit_rule(rule: str, threshold: float, kind: str, level: int | None = None) -> str:
    """'exit_q0.9_acc', 'exit_conf0.95_loops_d2': a rule at one threshold; kind acc | loss | bpb | loops."""
    return f"exit_{rule}{threshold_label(threshold)}_{kind}{_level(level)}"


def oracle(which: str, kind: str, level: int | None = None) -> str:
    """'oracle_stable_loops', 'oracle_right_acc_d3'."""
    return f"oracle_{which}_{kind}{_level(level)}"


def oracle_share(t: int, level: int | None = None) -> str:
    """'oracle_stable_share_step2_d1': share of tokens whose answer-stable exit is step t."""
    return f"oracle_stable_share_step{t}{_level(level)}"


def gate_step_at_oracle(t: int) -> str:
    """'exit_expected_step_at_oracle2': the gate's E[t] over the tokens whose answer-stable exit is t."""
    return f"exit_expected_step_at_oracle{t}"


def series(split: str, what: str, x: str) -> str:
    """A curve logged once after training as a metric series whose MLflow step is `x`:
    'val/series/acc_vs_loop_step', 'val/series/exit_q_acc_vs_milliloops' (step = 1000 x mean loops)."""
    return f"{split}/series/{what}_vs_{x}"


def frontier_names(trained_loops: int, levels: list[int], kinds: tuple[str, ...], rules: dict[str, list[float]]) -> set[str]:
    """Every frontier name (without split) a looped run logs: each rule x threshold, both
    oracles, per level, the oracle histogram and the gate scalars."""
    names: set[str] = set(GATE_SCALARS)
    for level in [None, *levels]:
        for kind in (*kinds, "loops"):
            names.update(exit_rule(rule, x, kind, level) for rule, xs in rules.items() for x in xs)
            names.update(oracle(which, kind, level) for which in ORACLES)
        names.update(oracle_share(t, level) for t in range(1, trained_loops + 1))
    return names  # gate_step_at_oracle{t} is left out: logged only where some token's oracle exit is t


# --- inference that skips compute (ouro_lab/inference.py; `ouro-lab eval` with infer.exit_rule) --
SEMANTICS = ("skip", "select", "full")  # skip semantics | selection semantics, the same rule | full depth
INFERENCE_METRIC = re.compile(r"^(?P<split>val|test)/(?P<name>(?:skip|select|full)_[a-z]+(?:_d\d+)?|skip_minus_select_acc)$")


def inference(semantics: str, kind: str, level: int | None = None) -> str:
    """'skip_acc', 'select_loops_d2', 'full_flops': kind acc | loss | bpb | loops (mean loop steps
    of scored tokens) | flops (forward FLOPs per token executed) | seconds (wall time, forward only)."""
    assert semantics in SEMANTICS, semantics
    return f"{semantics}_{kind}{_level(level)}"


# the skip frontier (`ouro-lab eval` with infer.frontier): a rule at each threshold, in selection
# semantics and in skip semantics per exited_kv (models/decoding.py EXITED_KV), next to full_* above;
# logged as the table skip_frontier/{split}.csv (run_record.metric_tables)
SKIP_FRONTIER_METRIC = re.compile(r"^(?P<split>val|test)/(?P<semantics>skip|select)_(?P<rule>q|conf|change)"
                                  r"(?P<threshold>[0-9.e+-]+)(?:_(?P<kv>frozen|propagate|first))?_(?P<kind>[a-z]+)"
                                  r"(?:_d(?P<level>\d+))?$")


def skip_frontier(semantics: str, rule: str, threshold: float, kind: str, exited_kv: str | None = None,
                  level: int | None = None) -> str:
    """'skip_q0.1_propagate_acc_d2', 'select_q0.1_flops': one point of the skip frontier (kinds as
    `inference`); skip points name what later tokens read from an exited one, selection's do not."""
    assert semantics in ("skip", "select") and (exited_kv is not None) == (semantics == "skip"), (semantics, exited_kv)
    kv = f"_{exited_kv}" if exited_kv else ""
    return f"{semantics}_{rule}{threshold_label(threshold)}{kv}_{kind}{_level(level)}"


# `ouro-lab bench`: bench/{task}/{acc|acc_norm}_step{t}, bench/{task}/{acc|acc_norm|loops}_rule
# (under the exit rule), bench/{task}/questions, bench/{task}/chance
BENCH_METRIC = re.compile(r"^bench/(?P<task>[^/]+)/(?P<kind>acc|acc_norm)_(?:step(?P<step>\d+)|rule)$")


def bench(task: str, name: str) -> str:
    """'bench/arc/acc_step3', 'bench/arc/chance': a benchmark task's metric."""
    return f"bench/{task}/{name}"


def under_rule(kind: str) -> str:
    """'acc_rule': a benchmark metric under the exit rule."""
    return f"{kind}_rule"
