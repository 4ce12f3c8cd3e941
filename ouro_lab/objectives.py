"""Exit distribution, priors over exit steps and the Stage-I loop objective (DESIGN.md Part 1).

Plain functions over tensors; the LightningModules call them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

PRIORS = ("uniform", "geometric", "none")
IGNORE_INDEX = -100


def exit_distribution(gate_logits: torch.Tensor) -> torch.Tensor:
    """p(t|x) from per-step gate logits (..., T) -> (..., T), computed in fp32.

    lambda_t = sigmoid(gate_t); S_t = prod_{j<=t} (1 - lambda_j), S_0 = 1;
    p_t = lambda_t * S_{t-1} for t < T, p_T = S_{T-1} (the last step takes the remaining
    mass, lambda_T unused), as in the released Ouro inference code. Sums to 1 exactly.
    NOTE: fp32 on purpose; in bf16 the CDF can round to 1 early (DESIGN.md).
    """
    lam = torch.sigmoid(gate_logits.float())
    survival = torch.cumprod(1.0 - lam, dim=-1)  # S_1..S_T
    prev_survival = torch.cat([torch.ones_like(survival[..., :1]), survival[..., :-1]], dim=-1)  # S_0..S_{T-1}
    return torch.cat([lam[..., :-1] * prev_survival[..., :-1], prev_survival[..., -1:]], dim=-1)


def exit_prior(prior: str, loops: int, prior_p: float = 0.5, device=None) -> torch.Tensor:
    """Prior over exit steps 1..T, shape (T,).

    uniform: 1/T (the paper's choice; KL(p||uniform) = log T - H(p)).
    geometric: pi_t ∝ prior_p (1 - prior_p)^(t-1), truncated to T and renormalised (PonderNet).
    """
    if prior == "uniform":
        return torch.full((loops,), 1.0 / loops, device=device)
    if prior == "geometric":
        if not 0.0 < prior_p < 1.0:
            raise ValueError(f"prior_p must be in (0, 1), got {prior_p}")
        t = torch.arange(loops, dtype=torch.float32, device=device)
        weights = prior_p * (1.0 - prior_p) ** t
        return weights / weights.sum()
    raise ValueError(f"prior must be one of {', '.join(PRIORS[:2])}, got {prior!r}")


def kl_to_prior(exit_probs: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """KL(p || prior) per token, (..., T) -> (...).

    NOTE: written out on purpose; torch.nn.KLDivLoss(p.log(), prior) is KL(prior || p).
    Steps with no mass contribute 0 * finite = 0; the clamp keeps the gradient finite there
    (torch.xlogy's backward is 0/0 = NaN at p = 0, reached once a gate saturates in fp32).
    """
    return (exit_probs * (_safe_log(exit_probs) - prior.log())).sum(-1)


def _safe_log(p: torch.Tensor) -> torch.Tensor:
    return torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))


def entropy(exit_probs: torch.Tensor) -> torch.Tensor:
    """H(p) in nats per token, (..., T) -> (...)."""
    return -(exit_probs * _safe_log(exit_probs)).sum(-1)


def per_step_token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each step: logits (T, B, S, V), targets (B, S) -> (T, B, S), fp32.

    Positions whose target is IGNORE_INDEX get 0.
    """
    T, B, S, V = logits.shape
    losses = F.cross_entropy(
        logits.float().reshape(T * B * S, V),
        targets.expand(T, B, S).reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    return losses.view(T, B, S)


@dataclass
class LoopLoss:
    """The scalar to optimise and its parts (means over counted tokens)."""

    loss: torch.Tensor
    expected_loss: torch.Tensor  # sum_t p_t L_t (plain mean over steps for prior 'none')
    kl: torch.Tensor  # KL(p || prior); 0 for prior 'none'
    entropy: torch.Tensor  # H(p); 0 for prior 'none'


def loop_objective(
    step_losses: torch.Tensor,
    gate_logits: torch.Tensor | None,
    mask: torch.Tensor,
    prior: str = "uniform",
    entropy_weight: float = 0.1,
    prior_p: float = 0.5,
    detach_exit_probs: bool = False,
) -> LoopLoss:
    """Stage-I objective, per token then averaged over counted tokens (mask True).

    step_losses: (T, B, S) per-step CE; gate_logits: (B, S, T) or None; mask: (B, S) bool.
    prior 'uniform' | 'geometric': L = sum_t p_t L_t + entropy_weight * KL(p || prior);
    prior 'none': L = (1/T) sum_t L_t, no gate (and the only choice for standard models).
    detach_exit_probs: stop the gradient of sum_t p_t L_t into p (the paper does not say;
    the KL term always trains the gate).
    """
    weights = mask.float()
    n_tokens = weights.sum().clamp_min(1.0)
    token_losses = step_losses.permute(1, 2, 0)  # (B, S, T)
    zero = step_losses.new_zeros(())
    if prior == "none" or gate_logits is None:
        expected = (token_losses.mean(-1) * weights).sum() / n_tokens
        return LoopLoss(loss=expected, expected_loss=expected, kl=zero, entropy=zero)
    exit_probs = exit_distribution(gate_logits)  # (B, S, T)
    loops = exit_probs.shape[-1]
    weighting = exit_probs.detach() if detach_exit_probs else exit_probs
    expected = ((weighting * token_losses).sum(-1) * weights).sum() / n_tokens
    kl = (kl_to_prior(exit_probs, exit_prior(prior, loops, prior_p, exit_probs.device)) * weights).sum() / n_tokens
    ent = (entropy(exit_probs) * weights).sum() / n_tokens
    return LoopLoss(loss=expected + entropy_weight * kl, expected_loss=expected, kl=kl, entropy=ent)
