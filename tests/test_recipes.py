"""Loop recipes (docs/guides/recipes.md): prelude/coda, input injection, initial state,
random-depth training and truncated backprop, against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from ouro_lab.config import ConfigError, load_config
from ouro_lab.models import LoopedLM, ModelSpec
from ouro_lab.models.transformer import StableInjection
from ouro_lab.objectives import sample_loops

V, S, D = 13, 8, 16


def spec(**kw) -> ModelSpec:
    return ModelSpec(**({"vocab_size": V, "max_seq_len": S, "d_model": D, "n_heads": 2, "n_layers": 2, "loops": 3,
                         "d_ff": 32} | kw))


def tokens(B=2, seed=0):
    return torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("loop_state", ["normed", "residual"])
def test_ouro_defaults_are_todays_model_bit_for_bit(loop_state):
    """0/0 prelude/coda, no injection, the input as the initial state: the same parameters
    (names, shapes, values for the same seed) and the same outputs as the loop written out."""
    torch.manual_seed(0)
    model = LoopedLM(spec(loop_state=loop_state))
    torch.manual_seed(0)
    explicit = LoopedLM(spec(loop_state=loop_state, prelude_layers=0, coda_layers=0, injection="none", init_state="input"))
    assert model.state_dict().keys() == explicit.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), explicit.state_dict().values()))
    idx = tokens()
    with torch.no_grad():
        out = model(idx)
        h, steps = model.tok_emb(idx), []  # Ouro's loop, by hand (docs/concepts/method.md "Loop state")
        for _ in range(3):
            for block in model.blocks:
                h = block(h)
            normed = model.final_norm(h)
            h = normed if loop_state == "normed" else h
            steps.append(normed)
    assert torch.equal(out.hidden, torch.stack(steps))
    assert not any(k.startswith(("prelude", "coda", "adapter", "injector")) for k in model.state_dict())


def test_injections_by_hand():
    torch.manual_seed(0)
    h, e = torch.randn(2, 3, D), torch.randn(2, 3, D)
    additive = LoopedLM(spec(injection="additive"))
    additive.embed = lambda idx, start=0: e  # e = the embedding (no prelude)
    _, h0, inject = additive.loop_input(None)
    assert torch.equal(h0, e) and torch.equal(inject(h), h + e)
    concat = LoopedLM(spec(injection="concat", init_state="zeros"))
    concat.embed = lambda idx, start=0: e
    _, h0, inject = concat.loop_input(None)
    W = concat.adapter.weight  # (D, 2D): Huginn's adapter(cat([h, e]))
    assert torch.equal(h0, torch.zeros_like(e))
    assert torch.allclose(inject(h), torch.cat([h, e], -1) @ W.T, atol=1e-6)
    stable = StableInjection(D)
    assert torch.allclose(stable.decay(), torch.full((D,), math.sqrt(1 / 5)))  # Parcae's init
    with torch.no_grad():
        stable.A_log.normal_()
        stable.dt_bias.normal_()
        stable.B.normal_()
    dt = torch.log1p(torch.exp(stable.dt_bias))  # softplus, written out
    hand = torch.exp(-dt * torch.exp(stable.A_log)) * h + dt * (e @ stable.B.T)
    assert torch.allclose(stable(h, stable.input_term(e)), hand, atol=1e-5)
    assert bool((stable.decay() < 1).all() and (stable.decay() > 0).all())


def test_stable_injection_keeps_the_state_bounded_where_others_grow():
    """Raw residual state (loop_state=residual), 96 loops of the real stack: the state's RMS
    norm after 12 and after 96 loops. Parcae's injection decays the old state (spectral norm
    < 1), so it settles; additive injection and Huginn's adapter with a norm above 1 pile up."""
    idx = tokens()
    norms = {}
    for injection in ("stable", "additive", "concat"):
        torch.manual_seed(0)
        model = LoopedLM(spec(loop_state="residual", injection=injection))
        if injection == "concat":  # an adapter of spectral norm 1.5 on the state, as training may reach
            with torch.no_grad():
                model.adapter.weight[:, :D] = 1.5 * torch.eye(D)
        with torch.no_grad():
            _, h, inject = model.loop_input(idx)
            rms = []
            for _ in range(96):
                h = model.run_stack(inject(h))
                rms.append(float(h.pow(2).mean().sqrt()))
        norms[injection] = (rms[11], rms[95])
    assert norms["stable"][1] < 1.5 * norms["stable"][0], norms
    assert norms["additive"][1] > 4 * norms["additive"][0], norms
    assert norms["concat"][1] > 1e3 * norms["concat"][0] or not math.isfinite(norms["concat"][1]), norms


@pytest.mark.parametrize("sampling,mean,var", [
    ("poisson", lambda T: T + math.exp(-T), lambda T: T),  # max(Poisson(T), 1): mean + P(0) (var ~ T for T = 4)
    ("lognormal_poisson", lambda T: T + 1, lambda T: T + T * T * (math.exp(0.25) - 1)),
    ("uniform", lambda T: 4.0, lambda T: (7 ** 2 - 1) / 12),  # uniform over 1..7
])
def test_loop_sampling_draws_the_configured_distribution(sampling, mean, var):
    T, n = 4, 20000
    g = torch.Generator().manual_seed(0)
    draws = torch.tensor([sample_loops(sampling, T, g, low=1, high=7 if sampling == "uniform" else 0) for _ in range(n)],
                         dtype=torch.float64)
    assert draws.min() >= 1
    assert abs(draws.mean() - mean(T)) < 4 * math.sqrt(var(T) / n)
    assert abs(draws.var() / var(T) - 1) < 0.1 if sampling != "poisson" else abs(draws.var() / var(T) - 1) < 0.15
    assert sample_loops("fixed", T, g) == T
    capped = [sample_loops("lognormal_poisson", T, g, high=5) for _ in range(200)]
    assert max(capped) == 5


@pytest.mark.parametrize("injection", ["none", "additive"])
def test_truncated_backprop_has_no_gradient_through_earlier_loops(injection):
    """Gradients with grad_loops=2 of 4 equal those of running the first 2 steps on detached
    tensors by hand; with no injection the embedding (which enters at step 1 only) gets none."""
    idx = tokens()
    torch.manual_seed(0)
    model = LoopedLM(spec(loops=4, injection=injection))
    model(idx, grad_loops=2).hidden[-1].pow(2).sum().backward()
    truncated = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    _, h, inject = model.loop_input(idx)
    with torch.no_grad():
        for _ in range(2):
            h = model.final_norm(model.run_stack(inject(h)))
    for _ in range(2):
        h = model.final_norm(model.run_stack(inject(h)))
    h.pow(2).sum().backward()
    for name, p in model.named_parameters():
        ref = p.grad if p.grad is not None else torch.zeros_like(p)
        assert torch.allclose(truncated[name], ref, atol=1e-6), name
    emb = truncated["tok_emb.weight"].abs().sum()
    assert (emb == 0) if injection == "none" else (emb > 0)
    model.zero_grad(set_to_none=True)
    model(idx).hidden[-1].pow(2).sum().backward()  # without truncation the embedding learns
    assert model.tok_emb.weight.grad.abs().sum() > 0


def test_baselines_and_counts_by_structure(tiny_config):
    from ouro_lab.builders import build_module

    recipe = ["model.prelude_layers=1", "model.coda_layers=2", "model.injection=concat", "model.loops=3"]
    looped = build_module(tiny_config(*recipe))
    param = build_module(tiny_config(*recipe, "model.arch=param_matched"))
    depth = build_module(tiny_config(*recipe, "model.arch=depth_matched"))
    N = 1  # tiny_config's model.n_layers
    assert (len(looped.model.prelude), len(looped.model.blocks), len(looped.model.coda)) == (1, N, 2)
    assert len(param.model.blocks) == 1 + N + 2 and len(depth.model.blocks) == 1 + 3 * N + 2
    d = 32
    block = sum(p.numel() for p in looped.model.blocks[0].parameters())
    assert looped.model.num_params() - param.model.num_params() == 2 * d * d + d + 1  # the adapter; the exit gate
    assert param.model.num_params() == looped.model.num_params() - 2 * d * d - d - 1 and block > 0
    seq = looped.task.seq_len
    b, head = looped.model.block_flops_per_token(seq), looped.model.head_flops_per_token()
    per_step = (N + 2) * b + head + 2 * d + 2 * d * d  # stack + coda readout + head + gate + W_h h
    assert looped.model.flops_per_token(seq) == 1 * b + 2 * d * d + 3 * per_step  # prelude and W_e e once
    assert looped.model.flops_per_loop(seq) == per_step
    assert looped.cfg.model.effective_depth == 1 + 3 * N + 2 and looped.cfg.model.distinct_layers == 1 + N + 2
    # training FLOPs: 3x forward at T; truncated backprop through k loops: forward(T) + 2 forward(k)
    f = lambda loops: looped.model.flops_per_token(seq, loops)  # noqa: E731
    assert looped.train_flops_per_token() == 3 * f(3)
    assert build_module(tiny_config(*recipe, "train.backprop_loops=1")).train_flops_per_token() == f(3) + 2 * f(1)
    # random depth: the mean over the run's own draws (the ones training_step will use)
    sampled = build_module(tiny_config(*recipe, "train.loops_sampling=uniform", "train.loops_min=1",
                                       "train.loops_max=5", "train.max_steps=40"))
    draws = [sampled.training_loops(step) for step in range(40)]
    assert len(set(draws)) > 2 and sampled.training_loops(7) == draws[7]
    assert sampled.train_flops_per_token() == pytest.approx(sum(3 * f(r) for r in draws) / 40)


@pytest.mark.parametrize("overrides,message", [
    (["model.init_state=zeros"], "model.init_state: 'zeros' with model.injection=none: the input would never reach"),
    (["model.injection=gated"], "model.injection: 'gated' is not one of: none, additive, concat, stable"),
    (["train.loops_sampling=uniform", "train.loops_min=5", "train.loops_max=3"], "train.loops_max: the uniform range"),
    (["train.loops_sampling=geometric"], "train.loops_sampling: 'geometric' is not one of"),
    (["model.prelude_layers=-1"], "model.prelude_layers: must be >= 0"),
    (["model.injection=additive", "infer.exit_rule=conf"], "infer.exit_rule: skip semantics and cached decoding support"),
])
def test_impossible_recipes_are_refused_naming_the_keys(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(None, overrides)


def test_a_huginn_recipe_trains_and_reports_every_step(tiny_config):
    """Prelude, coda, Huginn's adapter, a random initial state, log-normal Poisson depth and
    truncated backprop: trains for real, evaluates T + extra steps, and logs the frontier."""
    from ouro_lab.train import train

    cfg = tiny_config("model.prelude_layers=1", "model.coda_layers=1", "model.injection=concat",
                      "model.init_state=random", "train.loops_sampling=lognormal_poisson", "train.backprop_loops=2",
                      "train.max_steps=30", "train.lr=1e-2")
    result = train(cfg, verbose=False)
    assert math.isfinite(result.val["val/loss_step2"]) and "val/acc_step4" in result.val  # T=2 + 2 extra
    assert "val/gate_efficiency" in result.val and "val/exit_q0.5_acc" in result.val
    assert result.val["val/loss_step2"] < math.log(6)  # below chance on S3's 6 elements: it learned something
