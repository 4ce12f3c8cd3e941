"""Exit distribution, priors over exit steps and the Stage-I loop objective (docs/concepts/method.md).

Plain functions over tensors; the LightningModules call them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ouro_lab.data.base import IGNORE_INDEX

PRIORS = ("uniform", "geometric", "none")


def exit_distribution(gate_logits: torch.Tensor) -> torch.Tensor:
    """p(t|x) from per-step gate logits (..., T) -> (..., T), computed in fp32.

    lambda_t = sigmoid(gate_t); S_t = prod_{j<=t} (1 - lambda_j), S_0 = 1;
    p_t = lambda_t * S_{t-1} for t < T, p_T = S_{T-1} (the last step takes the remaining
    mass, lambda_T unused), as in the released Ouro inference code. Sums to 1 exactly.
    NOTE: fp32 on purpose; in bf16 the CDF can round to 1 early (docs/concepts/method.md "Exit distribution").
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
    loss_exit: torch.Tensor  # sum_t p_t L_t (plain mean over steps for prior 'none')
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
    return _objective(lambda w: (w * step_losses).sum(), step_losses.shape[0], gate_logits, mask,
                      prior, entropy_weight, prior_p, detach_exit_probs)


def loop_objective_from_hidden(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    targets: torch.Tensor,
    gate_logits: torch.Tensor | None,
    prior: str = "uniform",
    entropy_weight: float = 0.1,
    prior_p: float = 0.5,
    detach_exit_probs: bool = False,
    chunk_tokens: int | None = None,
) -> tuple[LoopLoss, torch.Tensor]:
    """`loop_objective` on the per-step hidden states (T, B, S, D) and the LM head's weight
    (V, D), with the head and cross-entropy fused (`linear_cross_entropy`): the (T, B, S, V)
    logits are never held at once. Returns the objective and the detached per-step token
    losses (T, B, S) for logging. Same value and gradients as the unfused path (tested)."""
    losses = []

    def weighted(w: torch.Tensor) -> torch.Tensor:
        total, step_losses = linear_cross_entropy(hidden, head_weight, targets, w, chunk_tokens)
        losses.append(step_losses)
        return total

    result = _objective(weighted, hidden.shape[0], gate_logits, targets != IGNORE_INDEX, prior, entropy_weight,
                        prior_p, detach_exit_probs)
    return result, losses[0]


def _objective(weighted_loss: Callable[[torch.Tensor], torch.Tensor], loops: int, gate_logits: torch.Tensor | None,
               mask: torch.Tensor, prior: str, entropy_weight: float, prior_p: float,
               detach_exit_probs: bool) -> LoopLoss:
    """The Stage-I objective given `weighted_loss(w) = sum_{t,b,s} w_tbs L_tbs` for token
    weights w (T, B, S): the exit probabilities (or 1/T) over the counted tokens."""
    weights = mask.float()
    n_tokens = weights.sum().clamp_min(1.0)
    zero = weights.new_zeros(())
    if prior == "none" or gate_logits is None:
        expected = weighted_loss((weights / (n_tokens * loops)).expand(loops, *weights.shape))
        return LoopLoss(loss=expected, loss_exit=expected, kl=zero, entropy=zero)
    exit_probs = exit_distribution(gate_logits)  # (B, S, T)
    weighting = exit_probs.detach() if detach_exit_probs else exit_probs
    expected = weighted_loss(weighting.permute(2, 0, 1) * (weights / n_tokens))
    kl = (kl_to_prior(exit_probs, exit_prior(prior, loops, prior_p, exit_probs.device)) * weights).sum() / n_tokens
    ent = (entropy(exit_probs) * weights).sum() / n_tokens
    return LoopLoss(loss=expected + entropy_weight * kl, loss_exit=expected, kl=kl, entropy=ent)


def gate_labels(step_losses: torch.Tensor, k: float = 50.0, gamma: float = 0.005) -> torch.Tensor:
    """Stage II labels (docs/concepts/method.md "Stage II"): per-token detached losses (T, B, S) ->
    w_t for t = 2..T, (T-1, B, S): improvement I_t = max(0, L_{t-1} - L_t), w_t = sigmoid(k (I_t - gamma));
    w near 1 = the step still helps (continue), near 0 = exit."""
    step_losses = step_losses.detach().float()
    improvement = (step_losses[:-1] - step_losses[1:]).clamp_min(0)
    return torch.sigmoid(k * (improvement - gamma))


STAGE2_IMPROVEMENT = ("into", "after")


def stage2_gate_loss(gate_logits: torch.Tensor, step_losses: torch.Tensor, mask: torch.Tensor, k: float = 50.0,
                     gamma: float = 0.005, improvement: str = "into") -> tuple[torch.Tensor, torch.Tensor]:
    """Ouro Stage II, focused adaptive gate training (docs/concepts/method.md "Stage II"): with
    lambda_t = sigmoid(gate_t), loss_t = -mean_i [w_t log(1 - lambda_t) + (1 - w_t) log lambda_t] over counted tokens i,
    total (1/T) sum_t loss_t. gate_logits (B, S, T); step_losses (T, B, S), detached; mask (B, S).
    Returns (loss, labels (T-1, B, S)).
    improvement="into": lambda_t (t = 2..T) learns from the improvement *into* step t,
    I_t = L_{t-1} - L_t, as the paper writes it. "after": lambda_t (t = 1..T-1) learns from the
    improvement of the step after it, I_{t+1} (does continuing past t help?), our variant."""
    T = step_losses.shape[0]
    labels = gate_labels(step_losses, k, gamma)  # (T-1, B, S): w for I_2..I_T
    steps = slice(1, T) if improvement == "into" else slice(0, T - 1)
    logits = gate_logits.float().permute(2, 0, 1)[steps]  # the lambdas they label, as logits (T-1, B, S)
    # -[w log(1 - sigmoid(x)) + (1 - w) log sigmoid(x)] is BCE(x, target = 1 - w)
    bce = F.binary_cross_entropy_with_logits(logits, 1.0 - labels, reduction="none")
    m = mask.float()
    per_step = (bce * m).sum((1, 2)) / m.sum().clamp_min(1)  # loss_t, (T-1,)
    return per_step.sum() / T, labels


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         token_weights: torch.Tensor, chunk_tokens: int | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """sum_{t,b,s} token_weights * CE(hidden @ weight.T, targets), fused and chunked.

    hidden (T, B, S, D); weight (V, D); targets (B, S) (IGNORE_INDEX: no loss); token_weights
    (T, B, S), may carry gradient (the exit probabilities). Returns (weighted sum, detached
    per-token CE (T, B, S) in fp32). NOTE: the logits of only `chunk_tokens` tokens exist at a
    time, and the gradients for hidden and weight are computed in the forward pass, chunk by
    chunk (softmax - onehot is known there), so backward only scales them: no recomputation.
    Default chunk: about 256 MiB of fp32 logits.
    """
    T, B, S, D = hidden.shape
    chunk = chunk_tokens or max(64, 2**26 // weight.shape[0])
    total, losses = _LinearCrossEntropy.apply(hidden.reshape(T * B * S, D), weight,
                                              targets.expand(T, B, S).reshape(-1), token_weights.reshape(-1), chunk,
                                              torch.is_grad_enabled())
    return total, losses.view(T, B, S)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, token_weights, chunk, grad_enabled):
        n = hidden.shape[0]
        device = hidden.device.type
        # the logits' matmul dtype: autocast's (bf16 under bf16-mixed) or the inputs' own
        dtype = (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device)
                 else torch.promote_types(hidden.dtype, weight.dtype))
        # NOTE: the gradients are made here, before a 16-mixed GradScaler scales the loss: with
        # per-token weights ~ p_t / n_tokens, fp16 would underflow them. fp32 then; bf16 has the range.
        grad_dtype = torch.float32 if dtype == torch.float16 else dtype
        w_mat, w_grad = weight.to(dtype), weight.to(grad_dtype)
        losses = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        need_grad = grad_enabled and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        grad_hidden = torch.empty_like(hidden) if need_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_grad else None
        w = token_weights.detach().float()
        for i in range(0, n, chunk):
            h, y = hidden[i:i + chunk], targets[i:i + chunk]
            logits = (h.to(dtype) @ w_mat.T).float()  # (c, V), softmax statistics in fp32
            valid = y != IGNORE_INDEX
            y_safe = torch.where(valid, y, 0)
            lse = torch.logsumexp(logits, dim=-1)
            losses[i:i + chunk] = torch.where(valid, lse - logits.gather(1, y_safe[:, None]).squeeze(1), 0.0)
            if need_grad:
                grad_logits = torch.softmax(logits, dim=-1)  # d CE / d logits = softmax - onehot
                grad_logits[torch.arange(len(y), device=y.device), y_safe] -= 1.0
                grad_logits = (grad_logits * torch.where(valid, w[i:i + chunk], 0.0)[:, None]).to(grad_dtype)
                with torch.autocast(device, enabled=False):  # the dtypes above, not autocast's
                    grad_hidden[i:i + chunk] = grad_logits @ w_grad
                    grad_weight += (grad_logits.T @ h.to(grad_dtype)).float()
        ctx.save_for_backward(grad_hidden, grad_weight, losses)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(losses)
        return (losses * w).sum(), losses

    @staticmethod
    @once_differentiable  # the CE's own second derivative is not computed: refuse create_graph
    def backward(ctx, grad_total, _grad_losses):
        grad_hidden, grad_weight, losses = ctx.saved_tensors
        needs = ctx.needs_input_grad
        return (grad_hidden * grad_total.to(grad_hidden.dtype) if needs[0] else None,
                (grad_weight * grad_total).to(ctx.weight_dtype) if needs[1] else None,
                None,
                losses * grad_total if needs[3] else None,
                None, None)


# --- the loop count in training (docs/guides/recipes.md) ------------------------------------
LOOP_SAMPLING = ("fixed", "lognormal_poisson", "poisson", "uniform")
LOGNORMAL_SIGMA = 0.5  # Huginn's sigma (seal-rg/recurrent-pretraining, model_dynamic.randomized_iteration_sampler)


def sample_loops(sampling: str, loops: int, generator: torch.Generator, low: int = 1, high: int = 0) -> int:
    """One training batch's loop count (the whole batch runs it).

    fixed: `loops`. lognormal_poisson (Huginn, Geiping et al. 2025): tau ~ N(log T - sigma^2/2,
    sigma), r = Poisson(e^tau) + 1, so E[r] = T + 1 and Var[r] = T + T^2 (e^{sigma^2} - 1).
    poisson (Parcae, Prairie et al. 2026): r = max(Poisson(T), 1). NOTE: Parcae draws one depth
    per sequence; here the batch shares one (Huginn's way), which keeps the batch dense.
    uniform: r uniform in [low, high]. `high` > 0 caps the other draws."""
    if sampling == "fixed":
        return loops
    if sampling == "uniform":
        return int(torch.randint(low, high + 1, (1,), generator=generator))
    if sampling == "lognormal_poisson":
        tau = torch.empty(1).normal_(math.log(loops) - LOGNORMAL_SIGMA ** 2 / 2, LOGNORMAL_SIGMA, generator=generator)
        r = int(torch.poisson(tau.exp(), generator=generator)) + 1
    elif sampling == "poisson":
        r = max(int(torch.poisson(torch.tensor([float(loops)]), generator=generator)), 1)
    else:
        raise ValueError(f"loop sampling must be one of {LOOP_SAMPLING}, got {sampling!r}")
    return min(r, high) if high > 0 else r
