"""Inference that really saves compute, on a trained checkpoint (docs/guides/evaluate.md); the
forward passes are `ouro_lab.models.decoding`.

    skip_evaluate   an exit rule in skip semantics vs the same rule in selection semantics
                    vs full depth: accuracy, loss, mean loops, executed FLOPs, wall time
                    (`ouro-lab eval CKPT infer.exit_rule=q infer.exit_threshold=0.5`)
    decode_table    teacher-forced cached decoding of test windows per cache strategy:
                    bits per byte, cache bytes, tokens/s, mean loops (`ouro-lab decode CKPT`)
    run_generate    generation from prompts (`ouro-lab generate CKPT`)

NOTE: plain `torch.no_grad` loops, not a Lightning Trainer: the point is the wall time of
each forward, which Trainer hooks and callbacks would blur.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ouro_lab import exits
from ouro_lab import metric_names as names
from ouro_lab.builders import make_datamodule
from ouro_lab.checkpoints import load_checkpoint
from ouro_lab.config import ConfigError, ExperimentConfig
from ouro_lab.data import IGNORE_INDEX
from ouro_lab.metrics import LN2, SkipEvalMetrics
from ouro_lab.models.decoding import (EXITED_KV, STRATEGIES, ExitRule, clock, executed_flops, forward_chunk, generate, row_flops,
                                      teacher_forced)
from ouro_lab.models.transformer import LoopedLM
from ouro_lab.objectives import per_step_token_losses


def exit_rule(cfg: ExperimentConfig) -> ExitRule:
    return ExitRule(cfg.infer.exit_rule, cfg.infer.exit_threshold, cfg.infer.exited_kv)


def _decodable(cfg: ExperimentConfig) -> None:
    if cfg.model.decoding_refusal:
        raise ConfigError(f"model: {cfg.model.decoding_refusal}")


def device_for(cfg: ExperimentConfig) -> torch.device:
    """Where inference runs: a GPU when train.accelerator allows one and there is one, else the CPU."""
    gpu = cfg.train.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return torch.device("cuda" if gpu else "cpu")


def _selection_steps(rule: ExitRule, gate_logits: torch.Tensor | None, logits: list[torch.Tensor]) -> torch.Tensor:
    """Exit steps (B, S) of `rule` in selection semantics: every step computed, the rule read off
    them (`ouro_lab.exits`, as in the frontier)."""
    T = len(logits)
    B, S = logits[0].shape[:2]
    if rule.name == "none" or T == 1:
        return torch.full((B, S), T, dtype=torch.long, device=logits[0].device)
    if rule.name == "q":
        return exits.q_exit(gate_logits.reshape(B * S, T), [rule.threshold])[0].reshape(B, S)
    confidence, change, log_probs = [], [], None
    for x in logits:
        log_probs, step_confidence, step_change = exits.rule_inputs(x, log_probs)
        confidence.append(step_confidence)
        change.append(step_change)
    if rule.name == "conf":
        return exits.confidence_exit(torch.stack(confidence).reshape(T, -1), [rule.threshold])[0].reshape(B, S)
    return exits.step_change_exit(torch.stack(change).reshape(T, -1), [rule.threshold])[0].reshape(B, S)


def _token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy (B, S), 0 where the target is ignored (one step of per_step_token_losses)."""
    return per_step_token_losses(logits[None], targets)[0]


@torch.no_grad()
def skip_evaluate(model: torch.nn.Module, loader, rule: ExitRule, n_levels: int, bpb: bool,
                  seq_len: int, token_bytes=None) -> dict[str, float]:
    """`rule` in skip semantics, in selection semantics, and full depth over `loader`'s
    (tokens, targets, difficulty) batches; metric names `names.inference` (skip_acc, select_loops,
    full_flops ...) plus skip_minus_select_acc. Full depth's wall time is the ordinary forward
    with the head at step T. FLOPs: full depth runs the stack and gate T times and the head
    once per token; selection the same, with the head at every step for the rules that read
    predictions (conf, change)."""
    values = _evaluate_rules(model, loader, [rule], n_levels, bpb, seq_len, token_bytes)[rule]
    values["skip_minus_select_acc"] = values[names.inference("skip", "acc")] - values[names.inference("select", "acc")]
    return values


def frontier_rules(rule: str, thresholds, variants=EXITED_KV) -> list[ExitRule]:
    """The skip frontier's rules: `rule` at each threshold x each exited_kv variant."""
    return [ExitRule(rule, float(x), kv) for x in thresholds for kv in variants]


@torch.no_grad()
def skip_frontier(model: torch.nn.Module, loader, rules: list[ExitRule], n_levels: int, bpb: bool, seq_len: int,
                  token_bytes=None) -> dict[str, float]:
    """The skip frontier: each rule (`frontier_rules`) in skip semantics, and each of its
    thresholds in selection semantics, next to full depth, per difficulty level; names
    `names.skip_frontier` (a table, skip_frontier/{split}.csv, once logged) and full_*."""
    out: dict[str, float] = {}
    for rule, values in _evaluate_rules(model, loader, rules, n_levels, bpb, seq_len, token_bytes).items():
        for name, value in values.items():
            semantics, rest = name.split("_", 1)
            if semantics == "full":
                out[name] = value
                continue
            kind, _, level = rest.partition("_d")
            if kind == "seconds":
                continue
            kv = rule.exited_kv if semantics == "skip" else None
            out[names.skip_frontier(semantics, rule.name, rule.threshold, kind, kv, int(level) if level else None)] = value
    return out


def _evaluate_rules(model: torch.nn.Module, loader, rules: list[ExitRule], n_levels: int, bpb: bool, seq_len: int,
                    token_bytes=None) -> dict[ExitRule, dict[str, float]]:
    """`skip_evaluate`'s numbers for each rule, the ordinary forward run once per batch."""
    model.eval()
    device = next(model.parameters()).device
    metrics = {rule: SkipEvalMetrics(n_levels, bpb).to(device) for rule in rules}
    token_bytes = None if token_bytes is None else torch.as_tensor(token_bytes, device=device)  # (V,) bytes per token
    looped = isinstance(model, LoopedLM)
    T = model.spec.loops if looped else 1
    for batch in loader:
        tokens, targets, difficulty = (x.to(device) for x in batch)
        scored = difficulty * (targets != IGNORE_INDEX)
        began = clock(device)
        out = model(tokens)
        final_logits = out.head(out.hidden[-1])
        full_seconds = clock(device) - began
        step_logits = [out.head(h) for h in out.hidden]  # (B, S, V) per step, for selection
        step_losses = torch.stack([_token_losses(x, targets) for x in step_logits])  # (T, B, S)
        step_correct = torch.stack([x.argmax(-1) == targets for x in step_logits])
        n = tokens.numel()
        full_flops = row_flops(model, seq_len, n * T, n * T if looped else 0, n)
        nbytes = None if token_bytes is None else token_bytes[targets.clamp_min(0)]
        for rule, metric in metrics.items():
            began = clock(device)
            chunk = forward_chunk(model, tokens, rule=rule)
            skip_seconds = clock(device) - began
            sel_steps = _selection_steps(rule, out.gate_logits, step_logits)
            losses = torch.stack([_token_losses(chunk.exit_logits, targets), step_losses.gather(0, sel_steps[None] - 1)[0],
                                  _token_losses(final_logits, targets)])
            correct = torch.stack([chunk.exit_logits.argmax(-1) == targets, step_correct.gather(0, sel_steps[None] - 1)[0],
                                   final_logits.argmax(-1) == targets])
            loops = torch.stack([chunk.exit_steps, sel_steps, torch.full_like(sel_steps, T)])
            select_flops = row_flops(model, seq_len, n * T, n * T if looped else 0, n * T if rule.needs_logits else n)
            flops = torch.tensor([executed_flops(model, chunk, seq_len), select_flops, full_flops], dtype=torch.float64,
                                 device=device)
            seconds = torch.tensor([skip_seconds, full_seconds, full_seconds], dtype=torch.float64, device=device)
            metric.update(losses, correct, loops, scored, flops, seconds, n, nbytes)
    return {rule: {k: float(v) for k, v in metric.compute().items()} for rule, metric in metrics.items()}


def skip_table(values: dict[str, float], split: str, bpb: bool) -> str:
    """The skip / selection / full-depth comparison as a plain-text table."""
    kinds = ["acc", "bpb"] if bpb else ["acc"]
    rows = [["semantics", *kinds, "loss", "mean loops", "MFLOPs/token", "forward s"]]
    for semantics in names.SEMANTICS:
        get = lambda k: values[f"{split}/{names.inference(semantics, k)}"]  # noqa: E731
        rows.append([semantics, *(f"{get(k):.4f}" for k in kinds), f"{get('loss'):.4f}", f"{get('loops'):.3f}",
                     f"{get('flops') / 1e6:.3f}", f"{get('seconds'):.2f}"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    diff = values[f"{split}/skip_minus_select_acc"]
    return "\n".join(lines) + f"\naccuracy, skip minus selection: {diff:+.4f} (selection's forward is full depth's)"


@dataclass
class DecodeRow:
    strategy: str
    rule: str
    bpb: float  # teacher-forced, decoded positions only
    loss: float
    mean_loops: float
    cache_bytes: int
    tokens_per_s: float  # all windows decoded side by side (throughput)
    tokens_per_s_b1: float  # one window alone (latency-bound, where skipped loops show most)
    flops_per_token: float  # executed forward FLOPs per decoded token


@torch.no_grad()
def decode_table(model: torch.nn.Module, tokens: torch.Tensor, prefill: int, rules: list[ExitRule],
                 strategies: tuple[str, ...] = STRATEGIES, progress=print, token_bytes=None) -> list[DecodeRow]:
    """Teacher-forced cached decoding of windows `tokens` (B, S+1): prefill the first `prefill`
    positions at full depth, then decode the rest one token at a time with each cache strategy
    and exit rule. Bits per byte, loops, FLOPs and tokens/s are of the decoded positions
    (prefill excluded); tokens/s for all windows side by side and for the first window alone.
    `token_bytes`: (V,) UTF-8 bytes per token id (a subword tokenizer); None: one byte each."""
    model.eval()
    device = next(model.parameters()).device
    tokens = tokens.to(device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    decoded = targets[:, prefill:]
    # tokens per byte of the decoded targets: exactly 1 for byte-level tasks
    per_byte = 1.0 if token_bytes is None else \
        decoded.numel() / float(torch.as_tensor(token_bytes, device=device)[decoded].sum().clamp_min(1))
    # untimed warm-up: the first timed row otherwise pays for one-off allocations (measured: half
    # the batch tokens/s of the same row timed later in the process)
    teacher_forced(model, inputs[:, : prefill + 4], prefill, rules[0], strategies[0])
    rows = []
    for rule in rules:
        for strategy in strategies:
            out = teacher_forced(model, inputs, prefill, rule, strategy)
            single = teacher_forced(model, inputs[:1], prefill, rule, strategy)
            loss = float(_token_losses(out.logits, targets[:, prefill:]).mean())
            steps = out.exit_steps
            rows.append(DecodeRow(strategy, str(rule), loss * per_byte / LN2, loss, float(steps.float().mean()),
                                  out.cache.nbytes, steps.numel() / out.seconds, single.exit_steps.numel() / single.seconds,
                                  out.flops / steps.numel()))
            r = rows[-1]
            progress(f"[decode] {strategy:5s} {str(rule):10s} bpb {r.bpb:.4f}  loops {r.mean_loops:.2f}  "
                     f"{r.tokens_per_s:.0f} tok/s ({r.tokens_per_s_b1:.0f} alone)  cache {r.cache_bytes / 1024:.0f} KiB")
    return rows


def decode_markdown(rows: list[DecodeRow]) -> str:
    lines = ["| cache | exit rule | bits/byte | mean loops | cache KiB | tokens/s, batch | tokens/s, one window | "
             "MFLOPs/token |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r.strategy} | {r.rule} | {r.bpb:.4f} | {r.mean_loops:.2f} | {r.cache_bytes / 1024:.0f} | "
              f"{r.tokens_per_s:.0f} | {r.tokens_per_s_b1:.0f} | {r.flops_per_token / 1e6:.3f} |" for r in rows]
    return "\n".join(lines)


def run_decode(path, overrides: list[str] = ()) -> str:
    """`ouro-lab decode CKPT`: teacher-forced cached decoding of `infer.windows` test windows with
    every cache strategy, at full depth and (when infer.exit_rule is set) with early exit; the
    Markdown table."""
    cfg, module = load_checkpoint(path, overrides)
    _decodable(cfg)
    task = module.task
    if not task.byte_level:
        raise ConfigError(f"`ouro-lab decode` measures bits per byte, on text tasks (text, lm); data.task="
                          f"{cfg.data.task}: use `ouro-lab generate` or `ouro-lab eval` with infer.exit_rule")
    if cfg.infer.prefill >= task.seq_len:
        raise ConfigError(f"infer.prefill: must be below the context ({task.seq_len}), got {cfg.infer.prefill}")
    tokens, targets, _ = make_datamodule(cfg, task).eval_set("test")[: cfg.infer.windows]
    windows = torch.cat([tokens, targets[:, -1:]], 1)  # (B, S + 1): the window and its last target
    rules = [ExitRule()] + ([exit_rule(cfg)] if cfg.infer.exit_rule != "none" else [])
    print(f"[decode] {len(windows)} test windows of {task.seq_len} tokens: {cfg.infer.prefill} prefilled, "
          f"{task.seq_len - cfg.infer.prefill} decoded one at a time and scored", flush=True)
    rows = decode_table(module.model.to(device_for(cfg)), windows, cfg.infer.prefill, rules,
                        token_bytes=getattr(task, "token_bytes", None))
    return decode_markdown(rows)


def run_generate(path, overrides: list[str] = ()) -> str:
    """`ouro-lab generate CKPT`: generation from infer.prompt (byte-level tasks) or from
    infer.samples test prompts (byte-level: the first half of a window; other tasks: up to the
    first scored position, whose generated token is the answer); a readable report."""
    cfg, module = load_checkpoint(path, overrides)
    _decodable(cfg)
    task, i, rule = module.task, cfg.infer, exit_rule(cfg)
    model = module.model.to(device_for(cfg))
    device = next(model.parameters()).device
    head = f"[generate] cache {i.cache}, exit rule: {rule}, {'greedy' if i.temperature == 0 else f'temperature {i.temperature:g}'}"
    if i.prompt is not None:
        if not task.byte_level:
            raise ConfigError(f"infer.prompt is text, for byte-level tasks; data.task={cfg.data.task} takes its "
                              "prompts from the test split (leave infer.prompt unset)")
        prompts = [task.encode(i.prompt) if hasattr(task, "encode") else list(i.prompt.encode())]
        answers = [None]
    else:
        rng = np.random.default_rng([cfg.data.seed, 3, i.seed])
        batch = task.sample(rng, i.samples, "test")
        if task.byte_level:
            prompts, answers = [list(row[: task.seq_len // 2]) for row in batch.tokens], [None] * i.samples
        else:
            first = (batch.targets != IGNORE_INDEX).argmax(1)  # the first scored position of each example
            prompts = [list(row[: f + 1]) for row, f in zip(batch.tokens, first)]
            answers = [int(batch.targets[r, f]) for r, f in enumerate(first)]
    lines = [head]
    for n, (prompt, answer) in enumerate(zip(prompts, answers), 1):
        room = task.seq_len - len(prompt) + 1
        if room < 1:
            raise ConfigError(f"infer.prompt: {len(prompt)} tokens; the model's context is {task.seq_len}")
        new = min(i.max_new_tokens, room) if answer is None else 1
        generator = torch.Generator(device=device).manual_seed(i.seed)
        out = generate(model, torch.tensor([prompt], device=device), new, rule, i.cache, i.temperature, generator)
        generated = out.tokens[0, len(prompt):].tolist()
        steps = out.exit_steps[0].float()
        stats = (f"{len(generated)} tokens, mean loops {float(steps.mean()):.2f}, {len(generated) / out.seconds:.0f} tokens/s, "
                 f"cache {out.cache.nbytes / 1024:.1f} KiB")
        lines.append(f"--- sample {n} ({stats}) ---")
        if answer is None:
            lines.append(f"{task.render(prompt)}\u2588{task.render(generated)}")  # the block marks where generation starts
            if i.show_exits:
                lines.append("exit step per token: " + " ".join(
                    f"{task.render([tok])!r}@{int(step)}" for tok, step in zip(generated, steps.tolist())))
        else:
            verdict = "right" if generated[0] == answer else "wrong"
            lines.append(f"{task.render(prompt)} -> {task.render(generated)} (expected {task.render([answer])}: {verdict}, "
                         f"exit step {int(steps[0])})")
    return "\n".join(lines)


__all__ = ["DecodeRow", "decode_markdown", "decode_table", "exit_rule", "frontier_rules", "run_decode", "run_generate",
           "skip_evaluate", "skip_frontier", "skip_table"]
