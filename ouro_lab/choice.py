"""Multiple-choice benchmarks scored at every loop step (`ouro-lab bench CKPT FILE.jsonl ...`).

Each line of a task file is one question: {"context": "...", "choices": ["...", ...],
"gold": i} ("label" or "answer" for gold are read too). As in the standard log-likelihood
protocol (lm-evaluation-harness), every choice is scored by the summed log-probability of its
tokens after the context:
- `acc`: the choice with the highest log-likelihood is right;
- `acc_norm`: the same after dividing each log-likelihood by the choice's length in
  characters (the harness's acc_norm; characters, not bytes or tokens, so numbers compare
  with published ones).
The continuation's tokens are those of context + choice after the context's own tokens (the
harness's split; a choice usually starts with a space). A looped model is scored at every
loop step t = 1..T + eval.extra_loops, and with `infer.exit_rule` set also under that rule
in selection semantics (each continuation token read at its own exit step): the paper's
accuracy-by-loop-step table for any model ouro-lab trains or imports.

NOTE: our own scorer, not lm-eval's `LM` subclass: lm-eval adds ~360 MB of dependencies
(datasets, scikit-learn, its task files) for a loop we need per step anyway (its API returns
one log-likelihood per request, so T+extra forward passes, or a cache keyed by step, would be
needed to get per-step numbers through it); its task YAMLs' local-file datasets come to this
same jsonl shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ouro_lab.config import ConfigError
from ouro_lab.data.base import json_lines
from ouro_lab.metric_names import bench, step, under_rule
from ouro_lab.run_record import ARCH, BENCH_FILES, BENCH_RUN, EVAL_OVERRIDES, LOOPS, evaluation_tags, run_name

GOLD_KEYS = ("gold", "label", "answer")


@dataclass
class Question:
    context: str
    choices: list[str]
    gold: int


def read_task(path: Path) -> list[Question]:
    """The questions of a jsonl task file; ConfigError naming the line of a malformed one."""
    if not path.is_file():
        raise ConfigError(f"benchmark file not found: {path}")
    out = []
    for n, row in json_lines(path, ConfigError):
        if not isinstance(row, dict):
            raise ConfigError(f"{path}:{n}: a question is a JSON object with \"context\", \"choices\" and \"gold\"")
        gold = next((row[k] for k in GOLD_KEYS if k in row), None)
        choices = row.get("choices")
        if not isinstance(row.get("context"), str) or not isinstance(choices, list) or len(choices) < 2 \
                or not all(isinstance(c, str) and c for c in choices):
            raise ConfigError(f"{path}:{n}: a question needs \"context\" (text) and \"choices\" (2 or more "
                              "non-empty texts)")
        if not isinstance(gold, int) or not 0 <= gold < len(choices):
            raise ConfigError(f"{path}:{n}: \"gold\" must be the index of the right choice (0..{len(choices) - 1}), "
                              f"got {gold!r}")
        out.append(Question(row["context"], choices, gold))
    if not out:
        raise ConfigError(f"{path}: no questions")
    return out


def continuation(encode, context: str, choice: str) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens): context + choice encoded whole, split after the
    context's own tokens (the choice alone when the whole does not start with them)."""
    ctx = encode(context)
    whole = encode(context + choice)
    if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
        return ctx, whole[len(ctx):]
    return ctx, encode(choice)


@torch.no_grad()
def choice_loglikelihoods(module, questions: list[Question], rule=None, batch_size: int = 32) -> dict[str, torch.Tensor]:
    """Per choice of every question: the continuation's log-likelihood at every evaluation
    loop step, (n_choices_total, eval_loops), and under `rule` (selection semantics) with the
    mean loops it used; plus the index of each choice's question and its character length."""
    from ouro_lab.inference import _selection_steps

    task, model = module.task, module.model
    device = next(model.parameters()).device
    encode = task.encode if hasattr(task, "encode") else (lambda text: list(text.encode("utf-8")))
    pad = getattr(getattr(task, "tokenizer", None), "eod", 0)
    rows = []  # (question index, tokens, first scored position, n continuation tokens, chars)
    for q_index, q in enumerate(questions):
        for choice in q.choices:
            ctx, cont = continuation(encode, q.context, choice)
            seq = (ctx + cont)[-(task.seq_len + 1):]  # the model's context: the oldest tokens go first
            n_cont = min(len(cont), len(seq) - 1)
            rows.append((q_index, seq, len(seq) - 1 - n_cont, n_cont, len(choice)))
    per_step, rule_lls, loops = [], [], []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        width = max(len(r[1]) for r in batch) - 1
        tokens = torch.full((len(batch), width), pad, dtype=torch.long, device=device)
        targets = torch.full((len(batch), width), -100, dtype=torch.long, device=device)
        for i, (_, seq, first, n, _) in enumerate(batch):
            tokens[i, : len(seq) - 1] = torch.tensor(seq[:-1])
            targets[i, first : first + n] = torch.tensor(seq[first + 1 : first + 1 + n])
        out = module.run(tokens, loops=module.eval_loops)
        logits = [out.head(h).float() for h in out.hidden]  # (B, W, V) per step
        scored = targets != -100
        safe = targets.clamp_min(0)
        token_ll = torch.stack([torch.log_softmax(x, -1).gather(-1, safe[..., None])[..., 0] for x in logits])  # (T', B, W)
        per_step.append((token_ll * scored).sum(-1).T)  # (B, T')
        if rule is not None and rule.name != "none":
            trained = logits[: module.trained_loops]
            steps = _selection_steps(rule, out.gate_logits[..., : module.trained_loops] if out.gate_logits is not None
                                     else None, trained)  # (B, W)
            picked = token_ll[: module.trained_loops].gather(0, (steps - 1)[None])[0]
            rule_lls.append((picked * scored).sum(-1))
            loops.append((steps * scored).sum(-1) / scored.sum(-1).clamp_min(1))
    result = {"loglik": torch.cat(per_step).cpu(), "question": torch.tensor([r[0] for r in rows]),
              "chars": torch.tensor([r[4] for r in rows], dtype=torch.float64)}
    if rule_lls:
        result |= {"loglik_rule": torch.cat(rule_lls).cpu(), "loops_rule": torch.cat(loops).cpu()}
    return result


def accuracy(loglik: torch.Tensor, question: torch.Tensor, chars: torch.Tensor, gold: list[int]) -> tuple[float, float]:
    """(acc, acc_norm) of per-choice log-likelihoods (n_choices_total,)."""
    right = right_norm = 0
    for q, g in enumerate(gold):
        mine = (question == q).nonzero()[:, 0]
        ll = loglik[mine].double()
        right += int(ll.argmax()) == g
        right_norm += int((ll / chars[mine]).argmax()) == g
    return right / len(gold), right_norm / len(gold)


def score_task(module, questions: list[Question], rule=None, batch_size: int = 32) -> dict[str, float]:
    """Metrics of one task: acc_step{t}, acc_norm_step{t} for every evaluation step; with a
    rule, acc_rule, acc_norm_rule and loops_rule (mean loops per continuation token)."""
    lls = choice_loglikelihoods(module, questions, rule, batch_size)
    gold = [q.gold for q in questions]
    out: dict[str, float] = {}
    for t in range(lls["loglik"].shape[1]):
        out[step("acc", t + 1)], out[step("acc_norm", t + 1)] = accuracy(lls["loglik"][:, t], lls["question"],
                                                                         lls["chars"], gold)
    if "loglik_rule" in lls:
        out[under_rule("acc")], out[under_rule("acc_norm")] = accuracy(lls["loglik_rule"], lls["question"],
                                                                       lls["chars"], gold)
        out[under_rule("loops")] = float(lls["loops_rule"].mean())
    out["questions"] = float(len(questions))
    out["chance"] = sum(1 / len(q.choices) for q in questions) / len(questions)
    return out


def bench_table(name: str, values: dict[str, float], trained_loops: int, rule: str | None) -> str:
    """A task's per-step accuracies as a terminal table (steps past T marked)."""
    steps = sorted(int(k[len("acc_step"):]) for k in values if k.startswith("acc_step"))
    lines = [f"{name}: {int(values['questions'])} questions, chance {values['chance']:.3f}",
             "step      acc  acc_norm"]
    for t in steps:
        mark = "  (past T)" if t > trained_loops else ""
        lines.append(f"{t:4d}  {values[f'acc_step{t}']:7.3f}  {values[f'acc_norm_step{t}']:8.3f}{mark}")
    if "acc_rule" in values:
        lines.append(f"{rule}: acc {values['acc_rule']:.3f}, acc_norm {values['acc_norm_rule']:.3f}, "
                     f"mean loops {values['loops_rule']:.2f}")
    return "\n".join(lines)


def run_bench(path: Path, files: list[str], overrides: list[str] = (), log: bool = True) -> str:
    """`ouro-lab bench CKPT FILE.jsonl ...`: every task file scored per loop step; logged as an
    MLflow run (tag ouro.role=bench) in the working folder's store unless `log` is False."""
    from ouro_lab import tracking
    from ouro_lab.checkpoints import load_checkpoint
    from ouro_lab.inference import device_for, exit_rule

    tasks = {Path(f).stem: read_task(Path(f).expanduser()) for f in files}  # every file checked before any work
    cfg, module = load_checkpoint(path, overrides)
    module.to(device_for(cfg))
    rule = exit_rule(cfg)
    results = {name: score_task(module, qs, rule, cfg.data.eval_batch_size) for name, qs in tasks.items()}
    text = "\n\n".join(bench_table(name, v, module.trained_loops, str(rule) if rule.name != "none" else None)
                       for name, v in results.items())
    if log:
        experiment = tracking.Experiment.open(tracking.resolve_tracking_uri(cfg.tracking.uri), cfg.tracking.experiment)
        tags = tracking.reproducibility_tags() | evaluation_tags(BENCH_RUN, str(Path(path).resolve()), module.ouro_run_id)
        with experiment.create_run(f"bench-{run_name(cfg)}", tags) as run:
            # NOTE: no model.* params: `ouro-lab report` counts runs with a model config as unit runs
            run.set_tags({ARCH: cfg.model.arch, LOOPS: str(cfg.model.loops)})
            run.log_params({BENCH_FILES: " ".join(str(Path(f).resolve()) for f in files),
                            EVAL_OVERRIDES: " ".join(overrides) or "none"})
            run.log_metrics({bench(name, k): v for name, vals in results.items() for k, v in vals.items()
                             if math.isfinite(v)})
            run.log_figure(bench_figure(results, module.trained_loops), "plots/bench.png")
        text += f"\n\n[ouro-lab] logged as run {run.id} in {experiment.tracking_uri}: {experiment.where_to_look(run.id)}"
    return text


def bench_figure(results: dict[str, dict[str, float]], trained_loops: int):
    """Accuracy on each task vs loop step (acc solid, acc_norm dashed, chance dotted)."""
    from ouro_lab.views import plt

    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    for name, v in results.items():
        steps = sorted(int(k[len("acc_step"):]) for k in v if k.startswith("acc_step"))
        line, = ax.plot(steps, [v[f"acc_step{t}"] for t in steps], marker="o", label=f"{name} acc")
        ax.plot(steps, [v[f"acc_norm_step{t}"] for t in steps], ls="--", marker=".", color=line.get_color(),
                label=f"{name} acc_norm")
        ax.axhline(v["chance"], ls=":", color=line.get_color(), lw=1)
    ax.axvline(trained_loops + 0.5, color="grey", lw=1)
    ax.set_xlabel("loop step t (right of the grey line: past the trained T)")
    ax.set_ylabel("accuracy")
    ax.set_title("accuracy vs loop step")
    ax.legend(fontsize=7)
    return fig
