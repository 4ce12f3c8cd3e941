import pytest
import torch

from ouro_lab.models import LoopedLM, ModelSpec, StandardLM
from ouro_lab.objectives import loop_objective, per_step_token_losses


def spec(**kw) -> ModelSpec:
    base = dict(vocab_size=11, max_seq_len=16, d_model=32, n_heads=4, n_layers=2, loops=3, d_ff=64)
    return ModelSpec(**(base | kw))


def tokens(B=3, S=16, V=11, seed=0):
    return torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(seed))


def test_shapes():
    looped = LoopedLM(spec())
    out = looped(tokens())
    assert out.logits.shape == (3, 3, 16, 11)  # (T, B, S, V)
    assert out.gate_logits.shape == (3, 16, 3)  # (B, S, T)
    std = StandardLM(spec(loops=1, n_layers=6))
    out = std(tokens())
    assert out.logits.shape == (1, 3, 16, 11)
    assert out.gate_logits is None


@pytest.mark.parametrize("loop_state", ["normed", "residual"])
@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_looped_with_one_loop_equals_standard_model_with_same_weights(loop_state, positions):
    torch.manual_seed(0)
    looped = LoopedLM(spec(loops=1, loop_state=loop_state, positions=positions))
    std = StandardLM(spec(loops=1, positions=positions))
    missing, unexpected = std.load_state_dict(looped.state_dict(), strict=False)
    assert missing == [] and all(k.startswith("exit_gate") for k in unexpected)
    x = tokens()
    torch.testing.assert_close(looped(x).logits, std(x).logits)


def test_loop_steps_are_a_recurrence_and_extra_loops_extrapolate():
    torch.manual_seed(0)
    model = LoopedLM(spec(loops=3))
    x = tokens()
    out3, out5 = model(x), model(x, loops=5)
    assert out5.logits.shape[0] == 5
    torch.testing.assert_close(out5.logits[:3], out3.logits)
    assert not torch.allclose(out3.logits[0], out3.logits[1])  # each step changes the prediction


def test_looped_step_two_equals_stack_run_twice():
    torch.manual_seed(0)
    model = LoopedLM(spec(loops=2, loop_state="normed"))
    x = tokens()
    h = model.final_norm(model.run_stack(model.embed(x)))
    h = model.final_norm(model.run_stack(h))  # normed state feeds the next loop
    torch.testing.assert_close(model(x).logits[1], model.lm_head(h))


def test_causal():
    torch.manual_seed(0)
    model = LoopedLM(spec())
    x = tokens()
    y = x.clone()
    y[:, 10:] = (y[:, 10:] + 1) % 11
    torch.testing.assert_close(model(x).logits[:, :, :10], model(y).logits[:, :, :10])


def test_gradients_reach_the_gate_and_shared_blocks():
    torch.manual_seed(0)
    model = LoopedLM(spec())
    x = tokens()
    out = model(x)
    losses = per_step_token_losses(out.logits, x)
    loop_objective(losses, out.gate_logits, torch.ones_like(x, dtype=torch.bool), prior="uniform",
                   entropy_weight=0.1).loss.backward()
    assert model.exit_gate.weight.grad.abs().sum() > 0
    assert model.exit_gate.bias.grad.abs().sum() > 0
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_tied_and_untied_embeddings():
    tied, untied = LoopedLM(spec(tie_embeddings=True)), LoopedLM(spec(tie_embeddings=False))
    assert tied.lm_head.weight is tied.tok_emb.weight
    assert untied.num_params() - tied.num_params() == 11 * 32


def test_param_counts_and_flops_by_structure():
    s = spec(loops=4)
    looped = LoopedLM(s)
    param_matched = StandardLM(spec(loops=1))
    depth_matched = StandardLM(spec(loops=1, n_layers=8))
    gate = 32 + 1
    assert looped.num_params() == param_matched.num_params() + gate  # shared blocks counted once
    block = sum(p.numel() for p in param_matched.blocks[0].parameters())
    assert depth_matched.num_params() == param_matched.num_params() + 6 * block
    S = 16
    # a shared block executed T times costs T times; the looped model adds T-1 extra heads and T gates
    head = 2 * 32 * 11
    assert looped.flops_per_token(S) == depth_matched.flops_per_token(S) + 3 * head + 4 * 2 * 32
    assert looped.flops_per_token(S, loops=6) == looped.flops_per_token(S) // 4 * 6
    assert param_matched.flops_per_token(S) * 4 < looped.flops_per_token(S)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="divisible"):
        LoopedLM(spec(d_model=30, n_heads=4))
    with pytest.raises(ValueError, match="loop_state"):
        LoopedLM(spec(loop_state="sideways"))


def _grads(model, x, **kwargs):
    model.zero_grad()
    out = model(x, **kwargs) if isinstance(model, LoopedLM) else model(x)
    losses = per_step_token_losses(out.logits, x)
    gates = out.gate_logits
    loop_objective(losses, gates, torch.ones_like(x, dtype=torch.bool),
                   prior="uniform" if gates is not None else "none").loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["block", "loop"])
@pytest.mark.parametrize("cls", [LoopedLM, StandardLM])
def test_activation_checkpointing_gives_the_same_gradients(mode, cls):
    torch.manual_seed(0)
    model = cls(spec())
    x = tokens()
    reference = _grads(model, x)
    model.checkpointing = mode
    checkpointed = _grads(model, x)
    assert reference.keys() == checkpointed.keys()
    for name in reference:
        torch.testing.assert_close(checkpointed[name], reference[name], msg=name)
    with torch.no_grad():  # evaluation is unchanged (nothing to recompute without a backward)
        checkpointed_logits = model(x).logits
        model.checkpointing = "none"
        torch.testing.assert_close(checkpointed_logits, model(x).logits)


def test_compiled_blocks_match_eager_and_loops_change_without_recompiling():
    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = LoopedLM(spec())
    compiled = LoopedLM(spec())
    compiled.load_state_dict(eager.state_dict())
    for block in compiled.blocks:
        block.compile(fullgraph=True)
    x = tokens()
    torch.testing.assert_close(compiled(x).logits, eager(x).logits, rtol=1e-4, atol=1e-4)
    reference, got = _grads(eager, x), _grads(compiled, x)
    for name in reference:
        torch.testing.assert_close(got[name], reference[name], rtol=1e-3, atol=1e-5, msg=name)
    with torch.no_grad():  # grad mode is part of the graph's guards: one graph for evaluation
        compiled(x)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for loops in (5, 1):  # a new T reuses the block's graphs
        with torch.no_grad():
            torch.testing.assert_close(compiled(x, loops=loops).logits, eager(x, loops=loops).logits, rtol=1e-4, atol=1e-4)
        _grads(compiled, x, loops=loops)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


def test_rope_layouts_are_one_function_under_a_permutation_of_qk_rows():
    """docs/concepts/method.md "RoPE layouts": rotate_half (i, i + Dh/2) and interleaved (2i, 2i+1) RoPE differ by a
    permutation of each head's q/k rows; weights moved across layouts unpermuted are wrong."""
    spec = dict(vocab_size=11, max_seq_len=9, d_model=16, n_heads=2, n_layers=2, loops=2, rope_base=500.0)
    torch.manual_seed(0)
    half = LoopedLM(ModelSpec(**spec, rope_layout="rotate_half")).eval()
    inter = LoopedLM(ModelSpec(**spec, rope_layout="interleaved")).eval()
    inter.load_state_dict(half.state_dict())
    idx = torch.randint(0, 11, (2, 9))
    with torch.no_grad():
        assert not torch.allclose(inter(idx).logits, half(idx).logits, atol=1e-4)
        Dh, D = 8, 16
        perm = torch.tensor([j // 2 + (Dh // 2 if j % 2 else 0) for j in range(Dh)])  # interleaved row j <- rotate_half row
        rows = torch.cat([h * Dh + perm for h in range(2)])  # within each head
        for block in inter.blocks:
            w = block.attn.qkv.weight  # [q; k; v]
            w[:D] = w[:D][rows]
            w[D:2 * D] = w[D:2 * D][rows]
        assert torch.allclose(inter(idx).logits, half(idx).logits, atol=1e-5)
