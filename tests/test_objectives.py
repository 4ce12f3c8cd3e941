import contextlib
import math

import pytest
import torch

from ouro_lab.objectives import (
    IGNORE_INDEX,
    entropy,
    exit_distribution,
    exit_prior,
    kl_to_prior,
    loop_objective,
    loop_objective_from_hidden,
    per_step_token_losses,
)


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def released_exit_probs(lam: torch.Tensor) -> torch.Tensor:
    """The released Ouro inference recurrence, step by step: p_t = lambda_t * remaining for
    t < T, p_T = remaining."""
    T = lam.shape[-1]
    remaining = torch.ones_like(lam[..., 0])
    probs = []
    for t in range(T - 1):
        probs.append(lam[..., t] * remaining)
        remaining = remaining * (1 - lam[..., t])
    probs.append(remaining)
    return torch.stack(probs, -1)


def test_exit_distribution_hand_computed():
    gates = torch.tensor([logit(0.2), logit(0.5), logit(0.9)])
    p = exit_distribution(gates)
    # p1 = 0.2; p2 = 0.5 * 0.8 = 0.4; p3 = remaining = 0.8 * 0.5 = 0.4 (lambda_3 unused)
    torch.testing.assert_close(p, torch.tensor([0.2, 0.4, 0.4]))


def test_exit_distribution_matches_released_recurrence_on_random_gates():
    torch.manual_seed(0)
    gates = torch.randn(5, 7, 6) * 3
    p = exit_distribution(gates)
    torch.testing.assert_close(p, released_exit_probs(torch.sigmoid(gates)))
    torch.testing.assert_close(p.sum(-1), torch.ones(5, 7))
    assert (p >= 0).all()


def test_exit_distribution_is_fp32_for_bf16_gates():
    gates = torch.randn(4, 8, dtype=torch.bfloat16)
    p = exit_distribution(gates)
    assert p.dtype == torch.float32
    torch.testing.assert_close(p.sum(-1), torch.ones(4))


def test_priors():
    torch.testing.assert_close(exit_prior("uniform", 4), torch.full((4,), 0.25))
    # lambda_p = 0.5, T = 3: weights 1/2, 1/4, 1/8, renormalised by 7/8
    torch.testing.assert_close(exit_prior("geometric", 3, prior_p=0.5), torch.tensor([4 / 7, 2 / 7, 1 / 7]))
    with pytest.raises(ValueError, match="prior_p"):
        exit_prior("geometric", 3, prior_p=1.5)
    with pytest.raises(ValueError, match="uniform, geometric"):
        exit_prior("poisson", 3)


def test_kl_direction_is_p_to_prior():
    p = torch.tensor([0.7, 0.2, 0.1])
    prior = torch.tensor([4 / 7, 2 / 7, 1 / 7])
    expected = sum(pi * math.log(pi / qi) for pi, qi in zip(p.tolist(), prior.tolist()))
    reverse = sum(qi * math.log(qi / pi) for pi, qi in zip(p.tolist(), prior.tolist()))
    assert abs(expected - reverse) > 1e-3  # the two directions differ on this example
    assert kl_to_prior(p, prior).item() == pytest.approx(expected, rel=1e-5)
    # zero-mass steps contribute 0, not nan
    assert kl_to_prior(torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5])).item() == pytest.approx(math.log(2))


def _one_token_case():
    # T = 3 steps, one token; gates give p = (0.2, 0.4, 0.4)
    step_losses = torch.tensor([2.0, 1.0, 0.5]).view(3, 1, 1)
    gates = torch.tensor([logit(0.2), logit(0.5), logit(0.9)]).view(1, 1, 3)
    mask = torch.ones(1, 1, dtype=torch.bool)
    return step_losses, gates, mask


def test_uniform_objective_hand_computed():
    step_losses, gates, mask = _one_token_case()
    out = loop_objective(step_losses, gates, mask, prior="uniform", entropy_weight=0.1)
    expected = 0.2 * 2.0 + 0.4 * 1.0 + 0.4 * 0.5  # 1.0
    h = -(0.2 * math.log(0.2) + 2 * 0.4 * math.log(0.4))
    kl = math.log(3) - h
    assert out.loss_exit.item() == pytest.approx(expected, rel=1e-5)
    assert out.entropy.item() == pytest.approx(h, rel=1e-5)
    assert out.kl.item() == pytest.approx(kl, rel=1e-5)
    assert out.loss.item() == pytest.approx(expected + 0.1 * kl, rel=1e-5)
    # = the paper's sum_t p_t L_t - beta * H(p), up to the constant beta * log T
    assert out.loss.item() == pytest.approx(expected - 0.1 * h + 0.1 * math.log(3), rel=1e-5)


def test_geometric_objective_hand_computed():
    step_losses, gates, mask = _one_token_case()
    out = loop_objective(step_losses, gates, mask, prior="geometric", entropy_weight=0.5, prior_p=0.5)
    prior = [4 / 7, 2 / 7, 1 / 7]
    kl = sum(p * math.log(p / q) for p, q in zip([0.2, 0.4, 0.4], prior))
    assert out.kl.item() == pytest.approx(kl, rel=1e-5)
    assert out.loss.item() == pytest.approx(1.0 + 0.5 * kl, rel=1e-5)


def test_no_prior_objective_is_mean_of_step_losses_and_ignores_gate():
    step_losses, gates, mask = _one_token_case()
    out = loop_objective(step_losses, gates, mask, prior="none", entropy_weight=0.1)
    assert out.loss.item() == pytest.approx((2.0 + 1.0 + 0.5) / 3)
    assert out.kl.item() == 0.0


def test_mask_excludes_tokens():
    step_losses = torch.tensor([[[1.0, 100.0]], [[3.0, 100.0]]])  # (T=2, B=1, S=2)
    mask = torch.tensor([[True, False]])
    out = loop_objective(step_losses, None, mask, prior="none")
    assert out.loss.item() == pytest.approx(2.0)


def test_detach_exit_probs_stops_task_gradient_into_gate():
    step_losses, gates, mask = _one_token_case()
    grads = {}
    for detach in (False, True):
        g = gates.clone().requires_grad_(True)
        loop_objective(step_losses, g, mask, prior="uniform", entropy_weight=0.0, detach_exit_probs=detach).loss.backward()
        grads[detach] = g.grad.abs().sum().item()
    assert grads[False] > 0
    assert grads[True] == 0


def test_per_step_token_losses_ignore_index():
    logits = torch.zeros(2, 1, 3, 4)  # uniform over 4 classes -> CE = log 4
    targets = torch.tensor([[1, -100, 3]])
    losses = per_step_token_losses(logits, targets)
    assert losses.shape == (2, 1, 3)
    torch.testing.assert_close(losses[:, 0, 0], torch.full((2,), math.log(4)))
    assert (losses[:, 0, 1] == 0).all()


def test_entropy_of_uniform():
    assert entropy(torch.full((4,), 0.25)).item() == pytest.approx(math.log(4))


def test_saturated_gates_give_finite_gradients():
    """Exit steps with exactly zero mass (a gate saturated in fp32) must not make NaN gradients."""
    step_losses = torch.tensor([2.0, 1.0, 0.5]).view(3, 1, 1)
    mask = torch.ones(1, 1, dtype=torch.bool)
    for value in (100.0, -100.0):
        gates = torch.full((1, 1, 3), value, requires_grad=True)
        for prior in ("uniform", "geometric"):
            out = loop_objective(step_losses, gates, mask, prior=prior, entropy_weight=0.1)
            (grad,) = torch.autograd.grad(out.loss, gates)
            assert torch.isfinite(out.loss) and torch.isfinite(grad).all(), (value, prior, grad)


def fused_and_naive(hidden, weight, gates, targets, autocast=None, chunk=None, **kwargs):
    """(naive, fused): each (loss, per-token step losses, grad hidden, grad weight, grad gates)
    of the fused, chunked head + CE and of the reference (full logits, per_step_token_losses,
    loop_objective), optionally under an autocast context."""
    results = []
    for fused in (False, True):
        h, w, g = (x.clone().requires_grad_(True) for x in (hidden, weight, gates))
        with autocast or contextlib.nullcontext():
            if fused:
                out, losses = loop_objective_from_hidden(h, w, targets, g, chunk_tokens=chunk, **kwargs)
            else:
                losses = per_step_token_losses(h @ w.T, targets)
                out = loop_objective(losses, g, targets != IGNORE_INDEX, **kwargs)
        out.loss.backward()
        results.append((out.loss, losses.detach(), h.grad, w.grad, g.grad))
    return results


@pytest.mark.parametrize("prior,detach,chunk", [("uniform", False, 7), ("geometric", False, 1), ("none", False, None),
                                                ("uniform", True, 1000)])
def test_fused_chunked_cross_entropy_equals_the_naive_path(prior, detach, chunk):
    """Loss and gradients (hidden states, head weight, exit gate) of the fused, chunked head +
    CE equal the reference, in float64 (chunks of 1, 7 and all tokens; ignored targets)."""
    torch.manual_seed(0)
    T, B, S, D, V = 3, 2, 5, 8, 13
    hidden, weight = torch.randn(T, B, S, D, dtype=torch.float64), torch.randn(V, D, dtype=torch.float64)
    gates, targets = torch.randn(B, S, T, dtype=torch.float64), torch.randint(0, V, (B, S))
    targets[0, :2] = IGNORE_INDEX
    naive, fused = fused_and_naive(hidden, weight, gates, targets, chunk=chunk, prior=prior, entropy_weight=0.1,
                                   prior_p=0.4, detach_exit_probs=detach)
    for reference, got in zip(naive, fused):
        torch.testing.assert_close(got, reference.to(got.dtype) if reference is not None else None)
    assert fused[2].abs().sum() > 0 and fused[3].abs().sum() > 0


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (pytest -m gpu)")])])
def test_fused_cross_entropy_under_bf16_autocast_matches_the_naive_path(device):
    """bf16-mixed (the GPU path; on CPU through CPU autocast): matmuls in bf16, softmax
    statistics in fp32. On CUDA at the GPU preset's vocabulary (32768)."""
    torch.manual_seed(0)
    T, B, S, D, V = (2, 2, 4, 16, 37) if device == "cpu" else (3, 2, 64, 128, 32768)
    hidden, weight = torch.randn(T, B, S, D, device=device), torch.randn(V, D, device=device) * 0.05
    gates, targets = torch.randn(B, S, T, device=device), torch.randint(0, V, (B, S), device=device)
    naive, fused = fused_and_naive(hidden, weight, gates, targets, torch.autocast(device, dtype=torch.bfloat16),
                                   chunk=5 if device == "cpu" else 100)
    for reference, got in zip(naive, fused):
        assert got.dtype == reference.dtype
        torch.testing.assert_close(got, reference, rtol=2e-2, atol=2e-3)


def test_fused_cross_entropy_gradients_survive_fp16_and_refuse_double_backward():
    """16-mixed: the fused CE makes its gradients before the GradScaler scales the loss, so they
    must not be rounded to fp16 (tiny per-token weights p_t / n underflow). And its backward is
    once-differentiable: create_graph must raise, not silently drop the CE's Hessian."""
    torch.manual_seed(0)
    T, B, S, D, V = 4, 4, 128, 32, 4096
    hidden, weight = torch.randn(T, B, S, D), torch.randn(V, D) * 0.1
    gates, targets = torch.randn(B, S, T), torch.randint(0, V, (B, S))
    grads = []
    for fp16 in (False, True):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.float16, enabled=fp16):
            out, _ = loop_objective_from_hidden(h, w, targets, gates)
        (out.loss * 65536.0).backward()  # what a GradScaler does
        grads.append((h.grad / 65536.0, w.grad / 65536.0))
    for reference, got in zip(*grads):
        assert ((got - reference).norm() / reference.norm()).item() < 1e-2
        assert (got == 0).float().mean().item() < 1e-3  # no underflow to exact zeros
    h = hidden.clone().requires_grad_(True)
    out, _ = loop_objective_from_hidden(h, weight, targets, gates)
    (grad,) = torch.autograd.grad(out.loss, h, create_graph=True)
    with pytest.raises(RuntimeError):
        grad.sum().backward()


def test_stage2_labels_and_loss_match_hand_values():
    from ouro_lab.objectives import gate_labels, stage2_gate_loss

    # one token, T=3: losses 2.0 -> 1.0 (improves by 1.0) -> 0.998 (by 0.002, under gamma)
    step_losses = torch.tensor([2.0, 1.0, 0.998]).view(3, 1, 1)
    w = gate_labels(step_losses, k=50.0, gamma=0.005)
    assert w.flatten().tolist() == pytest.approx([1 / (1 + math.exp(-50 * 0.995)), 1 / (1 + math.exp(-50 * -0.003))])
    # a step that got worse counts as no improvement: I = max(0, .) = 0
    assert gate_labels(torch.tensor([1.0, 1.5]).view(2, 1, 1)).item() == pytest.approx(1 / (1 + math.exp(50 * 0.005)))
    gate = torch.tensor([0.3, -1.0, 2.0]).view(1, 1, 3)  # lambda_1 unused, lambda_2, lambda_3
    loss, labels = stage2_gate_loss(gate, step_losses, torch.ones(1, 1, dtype=torch.bool))
    lam = torch.sigmoid(torch.tensor([-1.0, 2.0]))
    by_hand = -(w.flatten() * torch.log(1 - lam) + (1 - w.flatten()) * torch.log(lam)).sum() / 3
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)


def test_stage2_after_labels_lambda_t_with_the_next_steps_improvement():
    from ouro_lab.objectives import gate_labels, stage2_gate_loss

    step_losses = torch.tensor([2.0, 1.0, 0.998]).view(3, 1, 1)
    w = gate_labels(step_losses).flatten()
    gate = torch.tensor([0.3, -1.0, 2.0]).view(1, 1, 3)
    loss, _ = stage2_gate_loss(gate, step_losses, torch.ones(1, 1, dtype=torch.bool), improvement="after")
    lam = torch.sigmoid(torch.tensor([0.3, -1.0]))  # lambda_1 learns I_2, lambda_2 learns I_3; lambda_3 unused
    by_hand = -(w * torch.log(1 - lam) + (1 - w) * torch.log(lam)).sum() / 3
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)
