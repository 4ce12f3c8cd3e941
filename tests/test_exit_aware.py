"""Exit-aware training's forward (models/exit_aware.py) against skip semantics (decoding.forward_chunk)."""

from __future__ import annotations

import pytest
import torch

from ouro_lab.models import LoopedLM, ModelSpec
from ouro_lab.models.decoding import EXITED_KV, forward_chunk
from ouro_lab.models.exit_aware import TrainExits
from test_decoding import exit_patterns  # random, early tokens exiting early, late tokens exiting early

V, S = 11, 10


def make(loop_state: str = "normed", seed: int = 0) -> LoopedLM:
    torch.manual_seed(seed)
    spec = ModelSpec(vocab_size=V, max_seq_len=S, d_model=16, n_heads=2, n_layers=2, loops=3, d_ff=32,
                     loop_state=loop_state, tie_embeddings=False)
    model = LoopedLM(spec).eval()
    with torch.no_grad():
        model.exit_gate.weight.normal_(0, 0.5)
        model.exit_gate.bias.fill_(-0.5)
    return model


@pytest.mark.parametrize("loop_state", ["normed", "residual"])
@pytest.mark.parametrize("exited_kv", EXITED_KV)
def test_each_token_is_its_skip_semantics_self(exited_kv, loop_state):
    """At its own exit step every token's state is skip semantics' with the same exits; at a later
    step t it is skip semantics' had that token alone run on to t."""
    model = make(loop_state)
    T, idx = model.spec.loops, torch.randint(0, V, (2, S))
    for steps in exit_patterns(2, S, T):
        exits = TrainExits("given", exited_kv, steps=steps)
        with torch.no_grad():
            trained = model(idx, train_exits=exits).hidden  # (T, B, S, D)
        assert torch.equal(exits.exit_steps, steps)
        skip = forward_chunk(model, idx, exit_at=steps, rule=_rule(exited_kv))
        at_exit = trained.gather(0, (steps - 1)[None, ..., None].expand(1, *trained.shape[1:]))[0]
        skip_at_exit = skip.hidden.gather(0, (steps - 1)[None, ..., None].expand(1, *trained.shape[1:]))[0]
        assert torch.allclose(at_exit, skip_at_exit, atol=1e-5), (exited_kv, steps)
        for b, i in [(0, S - 1), (1, S // 2), (0, 1)]:
            alone = steps.clone()
            alone[b, i] = T
            ran_on = forward_chunk(model, idx, exit_at=alone, rule=_rule(exited_kv)).hidden[:, b, i]
            assert torch.allclose(trained[:, b, i], ran_on, atol=1e-5), (exited_kv, b, i)


def _rule(exited_kv: str):
    from ouro_lab.models.decoding import ExitRule
    return ExitRule("none", 1.0, exited_kv)


def test_without_exits_the_forward_is_the_ordinary_one_bit_for_bit():
    model = make()
    idx = torch.randint(0, V, (2, S))
    with torch.no_grad():
        plain = model(idx)
        for kv in EXITED_KV:
            never = model(idx, train_exits=TrainExits("given", kv, steps=torch.full((2, S), 3)))
            assert torch.equal(never.hidden, plain.hidden) and torch.equal(never.gate_logits, plain.gate_logits)
            gate_never = model(idx, train_exits=TrainExits("q", kv, q=1.0))  # q = 1: full depth, as in decoding
            assert torch.equal(gate_never.hidden, plain.hidden)


def test_gradients_reach_the_exit_step_through_what_exited_tokens_leave():
    """With exits, later tokens' losses depend on the exited tokens' exit-step computation; with
    activation checkpointing the gradients are the same."""
    model = make()
    idx = torch.randint(0, V, (2, S))
    steps = torch.full((2, S), 3)
    steps[:, :4] = 1  # the first four tokens exit at step 1
    for kv in EXITED_KV:
        grads = []
        for checkpointing in ("none", "block", "loop"):
            model.zero_grad()
            model.checkpointing = checkpointing
            out = model(idx, train_exits=TrainExits("given", kv, steps=steps))
            out.logits[-1, :, 4:].logsumexp(-1).sum().backward()  # later tokens' final step only
            grads.append([p.grad.clone() for p in model.blocks.parameters()])
        model.checkpointing = "none"
        for other in grads[1:]:
            assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads[0], other)), kv
    grads = [p.grad.clone() for p in model.blocks.parameters()]  # (first's)
    plain = model(idx).logits[-1, :, 4:].logsumexp(-1).sum()
    model.zero_grad()
    plain.backward()
    assert not all(torch.allclose(p.grad, g, atol=1e-6) for p, g in zip(model.blocks.parameters(), grads))


def test_sampled_and_q_exits_follow_the_gate():
    """q: each token exits where the gate's CDF first reaches q (exits.q_exit on the same
    forward's gate); sampled: exit steps vary with the draw and their mean follows the hazard."""
    from ouro_lab import exits as rules
    model = make()
    idx = torch.randint(0, V, (4, S))
    for q in (0.2, 0.5, 0.8):
        chosen = TrainExits("q", "frozen", q=q)
        with torch.no_grad():
            out = model(idx, train_exits=chosen)
        expected = rules.q_exit(out.gate_logits.reshape(-1, 3), [q])[0].reshape(4, S)
        assert torch.equal(chosen.exit_steps, expected), q
    with torch.no_grad():
        model.exit_gate.bias.fill_(-20.0)  # hazard ~0: nobody exits before T
        never = TrainExits("sampled")
        model(idx, train_exits=never)
        model.exit_gate.bias.fill_(20.0)  # hazard ~1: everybody exits at step 1
        always = TrainExits("sampled")
        model(idx, train_exits=always)
    assert bool((never.exit_steps == 3).all()) and bool((always.exit_steps == 1).all())


def test_bad_exits_are_refused():
    with pytest.raises(ValueError, match="how must be"):
        TrainExits("random")
    with pytest.raises(ValueError, match="exited_kv one of"):
        TrainExits("q", "latest")
    with pytest.raises(ValueError, match="given exactly"):
        TrainExits("given")
