"""Early-exit rules: at which loop step each token stops (docs/concepts/method.md "Inference").

Plain functions over per-token, per-step tensors; every rule returns exit steps in 1..T
(T = the trained loop count), and a token no rule fires for exits at T (full depth).

    q_exit            the gate's CDF reaches q (Ouro's Q-exit; q = 1 is full depth)
    confidence_exit   the step's max softmax probability reaches tau (CALM, Schuster et al. 2022)
    step_change_exit  KL(p_t || p_{t-1}) between successive steps' predictive distributions
                      falls below delta (Huginn's KL exit, Geiping et al. 2025); from step 2 on
    stable_oracle     the first step from which the token's answer no longer changes up to T
                      (loss-scored tasks: from which its loss stays within `tolerance` of step
                      T's): full-depth quality at the fewest loops a per-token rule can know of
    first_right_oracle  the first step whose prediction is right (none right: step 1): the best
                      accuracy any rule could reach. NOTE: inflated on unsolved tokens by lucky
                      guesses at some step (chance 1/|answers| per step)

Selection semantics (the released Ouro code): all T steps are computed and each token is
read at its exit step (`select`); nothing is skipped. What the rules read is computed here
too, once for every caller: `exit_cdf` (all steps) or `cdf_step` (one step at a time, as
cached decoding needs) from the gate, `rule_inputs` from a step's logits; `q_reached`,
`confident` and `settled` are the rules' tests at one step, shared by the online rules
(models/decoding.py) and the offline ones above.
"""

from __future__ import annotations

import math

import torch


def exit_cdf(gate_logits: torch.Tensor) -> torch.Tensor:
    """CDF(n) = 1 - prod_{j<=n} (1 - lambda_j) for n < T, CDF(T) = 1: (..., T) -> (..., T), float64.
    NOTE: float64 so the CDF does not round to 1 before the gate says so."""
    lam = torch.sigmoid(gate_logits.double())
    cdf = 1.0 - torch.cumprod(1.0 - lam, dim=-1)
    cdf[..., -1] = 1.0
    return cdf


def cdf_step(survival: torch.Tensor, gate_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`exit_cdf` one step at a time: survival prod_{j<t} (1 - lambda_j) (float64, ones before
    step 1) and step t's gate logits -> (prod_{j<=t} (1 - lambda_j), CDF(t) before the CDF(T) = 1 cap)."""
    survival = survival * (1.0 - torch.sigmoid(gate_logits.double()))
    return survival, 1.0 - survival


def rule_inputs(logits: torch.Tensor, prev_log_probs: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the rules that read predictions take from one step's logits (..., V): its
    log-probabilities (float32; the next step's `prev_log_probs`), confidence (max softmax
    probability) and step change KL(p_t || p_{t-1}) against `prev_log_probs` (inf without
    them: step 1 has nothing to compare with)."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    confidence = log_probs.max(-1).values.exp()
    change = (step_change(log_probs, prev_log_probs) if prev_log_probs is not None
              else torch.full_like(confidence, math.inf))
    return log_probs, confidence, change


def q_reached(cdf: torch.Tensor, q) -> torch.Tensor:
    """Q-exit's test at a step: CDF >= q (the rule exits at the first step where it holds)."""
    return cdf >= q


def confident(confidence: torch.Tensor, tau) -> torch.Tensor:
    """The confidence rule's test at a step: max softmax probability >= tau."""
    return confidence >= tau


def settled(change: torch.Tensor, delta) -> torch.Tensor:
    """The step-change rule's test at a step: KL(p_t || p_{t-1}) < delta."""
    return change < delta


def q_exit(gate_logits: torch.Tensor, qs: torch.Tensor | list[float]) -> torch.Tensor:
    """Exit step of each token for each q: gate_logits (N, T), qs (R,) -> (R, N) in 1..T.
    The first n with CDF(n) >= q; q >= 1 is full depth (T) by definition."""
    cdf = exit_cdf(gate_logits)  # (N, T)
    T = cdf.shape[-1]
    q = torch.as_tensor(qs, dtype=torch.float64, device=cdf.device)[:, None, None]  # (R, 1, 1)
    steps = (cdf[None] < q).sum(-1) + 1  # CDF is non-decreasing: steps below q (not `q_reached`), plus one
    return torch.where(q[..., 0] >= 1.0, T, steps.clamp(max=T))


def first_hit(hit: torch.Tensor) -> torch.Tensor:
    """(..., T, N) booleans -> (..., N) the first step (1-based) where it holds, T if never."""
    hit = hit.clone()
    hit[..., -1, :] = True
    return hit.int().argmax(-2) + 1  # argmax returns the first maximal index


def confidence_exit(confidence: torch.Tensor, taus: torch.Tensor | list[float]) -> torch.Tensor:
    """confidence (T, N) = max softmax probability of each step; taus (R,) -> (R, N)."""
    tau = torch.as_tensor(taus, dtype=confidence.dtype, device=confidence.device)[:, None, None]
    return first_hit(confident(confidence[None], tau))


def step_change_exit(change: torch.Tensor, deltas: torch.Tensor | list[float]) -> torch.Tensor:
    """change (T, N) = KL(p_t || p_{t-1}) (row 0 unused: step 1 has nothing to compare with);
    deltas (R,) -> (R, N)."""
    delta = torch.as_tensor(deltas, dtype=change.dtype, device=change.device)[:, None, None]
    hit = settled(change[None], delta)
    hit[:, 0] = False
    return first_hit(hit)


def stable_oracle(preds: torch.Tensor | None = None, losses: torch.Tensor | None = None,
                  tolerance: float = 0.01) -> torch.Tensor:
    """(T, N) -> (N,): the first step from which every later step (up to T) gives step T's
    answer (`preds`), or a loss within `tolerance` nats of step T's (`losses`, for loss-scored
    tasks). Ties: a token equal at every step exits at step 1."""
    if preds is not None:
        same = preds == preds[-1:]
    else:
        same = losses <= losses[-1:] + tolerance
    trailing = torch.cumprod(same.flip(0).int(), dim=0).sum(0)  # steps T, T-1, ... that agree
    return same.shape[0] - trailing + 1


def first_right_oracle(correct: torch.Tensor) -> torch.Tensor:
    """correct (T, N) -> (N,): the first step whose prediction is right; step 1 if none is."""
    return correct.int().argmax(0) + 1


def select(per_step: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """Each token's value at its exit step: per_step (T, N), steps (R, N) in 1..T -> (R, N)."""
    return per_step.gather(0, steps - 1)


def step_change(log_probs: torch.Tensor, prev_log_probs: torch.Tensor) -> torch.Tensor:
    """KL(p_t || p_{t-1}) per token from two steps' log-probabilities (..., V) -> (...), float32."""
    log_probs, prev_log_probs = log_probs.float(), prev_log_probs.float()
    return (log_probs.exp() * (log_probs - prev_log_probs)).sum(-1)
