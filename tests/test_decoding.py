"""Skip semantics and KV-cached decoding (ouro_lab/models/decoding.py) against references
written here, independently of the engine: the ordinary forward, and a dense masked
re-implementation of the skip rule."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from ouro_lab.models import LoopedLM, ModelSpec, StandardLM
from ouro_lab.models.decoding import (EXITED_KV, STRATEGIES, ExitRule, KVCache, decoding_refusal, executed_flops,
                                      forward_chunk, generate, row_flops, teacher_forced)

V, S, P = 19, 10, 4  # vocabulary, sequence length, prefilled prompt


def make(kind: str = "looped", loop_state: str = "normed", positions: str = "rope", rope_layout: str = "interleaved",
         seed: int = 0, **recipe):
    torch.manual_seed(seed)
    loops = 3 if kind == "looped" else 1
    spec = ModelSpec(vocab_size=V, max_seq_len=S, d_model=16, n_heads=2, n_layers=2, loops=loops, d_ff=32,
                     loop_state=loop_state, positions=positions, rope_layout=rope_layout, tie_embeddings=False, **recipe)
    model = (LoopedLM if kind == "looped" else StandardLM)(spec).eval()
    with torch.no_grad():  # peaked predictions and a gate that varies across tokens and steps: varied exits
        model.lm_head.weight.normal_(0, 1.0)
        if kind == "looped":
            model.exit_gate.weight.normal_(0, 0.3)
            model.exit_gate.bias.fill_(-1.0)
    return model


def skip_reference(model, idx: torch.Tensor, rule: ExitRule, exit_from: int,
                   exit_at: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Skip semantics by brute force: every step runs every token densely with a causal mask;
    an exited token's state is not updated, and its keys/values are replaced by what
    `rule.exited_kv` says: those of its exit step (frozen), those of step 1 (first), or each
    layer's projections of its exit state (propagate). `exit_at`: exit steps given instead of
    the rule's. Returns the per-step normed states (T, B, S, D) and exit steps (B, S)."""
    T = model.spec.loops if isinstance(model, LoopedLM) else 1
    B, n = idx.shape
    h = model.embed(idx)
    done = torch.zeros(B, n, dtype=torch.bool)
    exit_steps = torch.full((B, n), T)
    frozen_k, frozen_v, first_k, first_v = {}, {}, {}, {}
    survival = torch.ones(B, n, dtype=torch.float64)
    prev = None
    states, normed = [], torch.zeros_like(h)
    for t in range(1, T + 1):
        x = h
        for layer, block in enumerate(model.blocks):
            a = block.attn
            z = block.norm1(x)
            q, k, v = a.qkv(z).view(B, n, 3, a.n_heads, -1).permute(2, 0, 3, 1, 4)
            if a.rope is not None:
                q, k = a.rope(q), a.rope(k)
            if t == 1:
                first_k[layer], first_v[layer] = k, v
            if layer in frozen_k:
                keep = done[:, None, :, None]
                if rule.exited_kv == "frozen":
                    old_k, old_v = frozen_k[layer], frozen_v[layer]
                elif rule.exited_kv == "first":
                    old_k, old_v = first_k[layer], first_v[layer]
                else:  # propagate: this layer's projections of the exit state (h is frozen at it)
                    _, old_k, old_v = a.qkv(block.norm1(h)).view(B, n, 3, a.n_heads, -1).permute(2, 0, 3, 1, 4)
                    old_k = a.rope(old_k) if a.rope is not None else old_k
                k, v = torch.where(keep, old_k, k), torch.where(keep, old_v, v)
            frozen_k[layer], frozen_v[layer] = k, v
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, n, -1)
            x = x + block.norm2(a.out(y))
            x = x + block.norm4(block.mlp(block.norm3(x)))
        x_normed = model.final_norm(x)
        new_h = x_normed if model.spec.loop_state == "normed" else x
        h = torch.where(done[..., None], h, new_h)
        normed = torch.where(done[..., None], normed, x_normed)
        states.append(normed)
        running = ~done
        fires = torch.zeros(B, n, dtype=torch.bool)
        if rule.name == "q":
            survival = survival * (1 - torch.sigmoid(model.exit_gate(x_normed).squeeze(-1).double()))
            fires = 1 - survival >= rule.threshold
        elif rule.name in ("conf", "change"):
            lp = torch.log_softmax(model.lm_head(x_normed).float(), -1)
            if rule.name == "conf":
                fires = lp.max(-1).values.exp() >= rule.threshold
            elif prev is not None:
                fires = (lp.exp() * (lp - prev)).sum(-1) < rule.threshold
            prev = torch.where(done[..., None], prev, lp) if prev is not None else lp
        if exit_at is not None:
            fires = exit_at == t
        fires &= running & (torch.arange(n) >= exit_from)[None]
        if t < T:
            exit_steps[fires] = t
            done |= fires
    return torch.stack(states), exit_steps


# every model decoding runs: looped (either loop state) and standard, under each position scheme
POSITIONS = [("rope", "interleaved"), ("rope", "rotate_half"), ("learned", "interleaved")]
CASES = [("looped", loop_state, *positions) for loop_state in ("normed", "residual") for positions in POSITIONS] + \
        [("standard", "normed", *positions) for positions in POSITIONS]


@pytest.mark.parametrize("kind,loop_state,positions,rope_layout", CASES)
def test_decoding_paths_equal_the_training_forward(kind, loop_state, positions, rope_layout):
    """The one-forward guard: with no exit (rule none, or rules whose thresholds no token meets
    before step T), every way decoding runs the blocks gives the training forward's per-step
    logits: the whole sequence at once (bit for bit: the same operations), prefill + cached
    decoding one token and two tokens at a time (packed rows over the cache), teacher-forced
    decoding, and greedy generation."""
    model = make(kind, loop_state, positions, rope_layout)
    T = model.spec.loops
    idx = torch.randint(0, V, (3, S))
    with torch.no_grad():
        ref = model(idx).logits  # (T, B, S, V) per step, as training computes them
    never = [ExitRule(), ExitRule("conf", 2.0), ExitRule("change", -1.0)] + [ExitRule("q", 0.999)] * (kind == "looped")
    never += [ExitRule("conf", 2.0, exited_kv) for exited_kv in EXITED_KV[1:]]  # no exit: every variant the same
    for rule in never:
        whole = forward_chunk(model, idx, rule=rule)
        assert torch.equal(whole.exit_steps, torch.full((3, S), T)), rule
        assert torch.equal(model.lm_head(whole.hidden), ref), rule
        assert torch.equal(whole.exit_logits, ref[-1]), rule
        for chunk in (1, 2):
            cache = KVCache(model, 3, "full")
            states = [forward_chunk(model, idx[:, :P], cache, prefill=True).hidden]
            for j in range(P, S, chunk):
                out = forward_chunk(model, idx[:, j:j + chunk], cache, rule)
                assert torch.equal(out.exit_steps, torch.full_like(out.exit_steps, T)), rule
                states.append(out.hidden)
            assert torch.allclose(model.lm_head(torch.cat(states, dim=2)), ref, rtol=1e-5, atol=1e-5), (rule, chunk)
        for prefill in (0, P):
            forced = teacher_forced(model, idx, prefill, rule)
            assert torch.allclose(forced.logits, ref[-1][:, prefill:], rtol=1e-5, atol=1e-5), (rule, prefill)
    generated = generate(model, idx[:, :P], S - P + 1, ExitRule("conf", 2.0)).tokens
    with torch.no_grad():
        final = model(generated[:, :S]).logits[-1]
    assert torch.equal(final[:, P - 1:].argmax(-1), generated[:, P:])  # each token the training forward's argmax


RULES = [ExitRule(), ExitRule("q", 0.6), ExitRule("conf", 0.6), ExitRule("change", 0.8)]  # varied exits (tuned)


@pytest.mark.parametrize("kind,loop_state,positions,rope_layout,rule",
                         [(*case, rule) for case in CASES for rule in RULES if case[0] == "looped" or rule.name != "q"])
def test_full_cache_decoding_equals_the_uncached_forward(kind, loop_state, positions, rope_layout, rule):
    """Prefill P tokens, then decode one at a time with the full cache: every loop step's logits
    of every position equal the uncached pass over the whole sequence (the ordinary forward
    without exit; the brute-force skip reference with exit from position P)."""
    model = make(kind, loop_state, positions, rope_layout)
    idx = torch.randint(0, V, (3, S))
    with torch.no_grad():
        ref_states, ref_exits = skip_reference(model, idx, rule, exit_from=P)
        if rule.name == "none":
            assert torch.allclose(ref_states, model(idx).hidden, atol=1e-6)  # the reference itself, checked
    for chunk in (1, 2):  # one token at a time, and chunks of two (cached tokens + packed running ones)
        cache = KVCache(model, 3, "full")
        states, steps = [forward_chunk(model, idx[:, :P], cache, prefill=True).hidden], []
        for j in range(P, S, chunk):
            out = forward_chunk(model, idx[:, j:j + chunk], cache, rule)
            states.append(out.hidden)
            steps.append(out.exit_steps)
        states, steps = torch.cat(states, dim=2), torch.cat(steps, dim=1)
        assert torch.equal(steps, ref_exits[:, P:])
        assert torch.allclose(model.lm_head(states), model.lm_head(ref_states), atol=1e-5)
        if rule.name != "none" and kind == "looped":
            assert 1 < steps.float().mean() < model.spec.loops  # the exits really varied
    # the same rule over the whole sequence at once (skip-semantics evaluation) agrees too
    whole = forward_chunk(model, idx, rule=rule, exit_from=P)
    assert torch.equal(whole.exit_steps, ref_exits)
    assert torch.allclose(whole.hidden, ref_states, atol=1e-5)


@pytest.mark.parametrize("recipe", [{"prelude_layers": 1}, {"coda_layers": 1}, {"injection": "additive"},
                                    {"injection": "concat", "init_state": "zeros"}])
def test_loop_recipes_are_refused_with_the_one_message(recipe):
    assert decoding_refusal(True, 0, 0, "none", "input") is None and decoding_refusal(False, 0, 0, "none", "input") is None
    model = make("looped", **recipe)
    spec = model.spec
    message = decoding_refusal(True, spec.prelude_layers, spec.coda_layers, spec.injection, spec.init_state)
    assert message.startswith("skip semantics and cached decoding support Ouro's whole-stack loop only")
    with pytest.raises(ValueError, match=re.escape(message)):
        forward_chunk(model, torch.zeros(1, 3, dtype=torch.long))


def test_q_rule_on_a_model_without_gate_is_refused():
    with pytest.raises(ValueError, match="gate"):
        forward_chunk(make("standard"), torch.zeros(1, 3, dtype=torch.long), rule=ExitRule("q", 0.5))


def test_executed_flops_match_a_hand_count():
    """A constant gate lambda = 0.5 (weight 0, bias 0): CDF = 0.5, 0.75, 0.875, so q = 0.7 exits
    every token at step 2, except the first `exit_from` positions, which run all 3 steps."""
    model = make("looped")
    with torch.no_grad():
        model.exit_gate.weight.zero_()
        model.exit_gate.bias.zero_()
    B, exit_from = 2, 3
    out = forward_chunk(model, torch.randint(0, V, (B, S)), rule=ExitRule("q", 0.7), exit_from=exit_from)
    assert torch.equal(out.exit_steps[:, :exit_from], torch.full((B, exit_from), 3))
    assert torch.equal(out.exit_steps[:, exit_from:], torch.full((B, S - exit_from), 2))
    d, f, n_layers = 16, 32, 2
    block = 2 * 4 * d * d + 2 * 3 * d * f + 4 * S * d  # qkv + out, SwiGLU, attention over S (the convention)
    steps_run = B * (exit_from * 3 + (S - exit_from) * 2)
    hand = steps_run * (n_layers * block + 2 * d) + B * S * 2 * d * V  # stack + gate per step, head once
    assert executed_flops(model, out, S) == hand
    assert out.stack_rows == out.gate_rows == steps_run and out.head_rows == B * S
    # a rule that reads the predictions runs the head at every executed step
    conf = forward_chunk(model, torch.randint(0, V, (B, S)), rule=ExitRule("conf", 1e-9), exit_from=exit_from)
    assert conf.head_rows == conf.stack_rows == B * (exit_from * 3 + (S - exit_from) * 1)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_cache_bytes_are_the_analytic_count(strategy):
    model = make("looped")
    B, T, L, H, Dh = 3, 3, 2, 2, 8
    cache = KVCache(model, B, strategy)
    forward_chunk(model, torch.randint(0, V, (B, P)), cache, prefill=True)
    for j in range(2):
        forward_chunk(model, torch.randint(0, V, (B, 1)), cache, ExitRule("q", 0.6))
    positions = T * (P + 2) if strategy == "full" else T * P + 2  # the prompt keeps every step's cache
    assert (cache.length, cache.prefilled) == (P + 2, P)
    assert cache.nbytes == positions * L * 2 * B * H * Dh * 4  # k and v, fp32


def test_shared_cache_strategies_write_what_they_say():
    model = make("looped")
    T, L, B, H, C, Dh = 3, 2, 1, 2, 2, 8
    step_k = torch.arange(1, T + 1, dtype=torch.float32)[:, None, None, None, None, None].expand(T, L, B, H, C, Dh)
    exit_steps = torch.tensor([[3, 2]])  # token 2 exited at step 2: its step-3 row is the frozen step-2 one
    step_k = step_k.clone()
    step_k[2, :, :, :, 1] = 2.0
    expected = {"last": [3.0, 2.0], "first": [1.0, 1.0], "mean": [2.0, 1.5]}
    for strategy, values in expected.items():
        cache = KVCache(model, B, strategy)
        cache.append(step_k, step_k, exit_steps)
        k, _ = cache.keys_values(step=3, layer=1)
        assert k[0, 0, :, 0].tolist() == values, strategy
    full = KVCache(model, B, "full")
    full.append(step_k, step_k, exit_steps)
    assert [full.keys_values(step=t, layer=0)[0][0, 0, 1, 0].item() for t in (1, 2, 3)] == [1.0, 2.0, 2.0]


def test_shared_caches_change_decoding_of_looped_models_only():
    """One step, one cache: a standard model decodes identically under every strategy; a looped
    model's shared caches change its predictions."""
    idx = torch.randint(0, V, (2, S))
    for model, differs in ((make("looped"), True), (make("standard"), False)):
        logits = {s: teacher_forced(model, idx, P, strategy=s).logits for s in STRATEGIES}
        for strategy in ("last", "first", "mean"):
            assert torch.allclose(logits["full"], logits[strategy], atol=1e-5) != differs, strategy


@pytest.mark.parametrize("strategy", ["last", "first", "mean"])
def test_shared_cache_reads_are_a_full_cache_with_the_decoded_rows_shared(strategy):
    """Reference: decode with the full cache, then overwrite the decoded token's per-step rows
    with the strategy's one row (last step's, first step's, their mean); the next token then
    predicts exactly as under the shared strategy. The prompt's per-step rows stay."""
    model = make("looped")
    idx = torch.randint(0, V, (2, P + 2))
    shared, full = KVCache(model, 2, strategy), KVCache(model, 2, "full")
    for cache in (shared, full):
        forward_chunk(model, idx[:, :P], cache, prefill=True)
    first = [forward_chunk(model, idx[:, P:P + 1], cache).exit_logits for cache in (shared, full)]
    assert torch.allclose(first[0], first[1], atol=1e-6)  # it read only the prompt's per-step rows and itself
    rows = full.k[:, :, :, :, P], full.v[:, :, :, :, P]  # (T, L, B, H, Dh)
    for per_step in rows:
        one = {"last": per_step[-1], "first": per_step[0], "mean": per_step.mean(0)}[strategy]
        per_step[:] = one
    second = [forward_chunk(model, idx[:, P + 1:P + 2], cache).exit_logits for cache in (shared, full)]
    assert torch.allclose(second[0], second[1], atol=1e-5)
    assert not torch.allclose(second[0], forward_chunk(model, idx, rule=ExitRule()).exit_logits[:, -1:], atol=1e-4)


def test_generation_is_greedy_decoding_of_the_ordinary_model():
    model = make("looped", "residual", "learned")
    prompt = torch.randint(0, V, (2, 3))
    g = generate(model, prompt, S - 3 + 1)
    assert g.tokens.shape == (2, S + 1) and g.exit_steps.shape == (2, S - 2)
    with torch.no_grad():
        logits = model(g.tokens[:, :S]).logits[-1]
    assert torch.equal(logits[:, 2:].argmax(-1), g.tokens[:, 3:])  # each generated token is the argmax there
    with pytest.raises(ValueError, match="context"):
        generate(model, prompt, S)
    with pytest.raises(ValueError, match="max_new_tokens >= 1"):
        generate(model, prompt, 0)


@pytest.mark.gpu
def test_decoding_and_skip_evaluation_run_on_cuda():
    from ouro_lab.inference import skip_evaluate

    model = make("looped").cuda()
    idx = torch.randint(0, V, (2, S), device="cuda")
    g = generate(model, idx[:, :P], 3, ExitRule("q", 0.6), "mean", temperature=1.0,
                 generator=torch.Generator(device="cuda").manual_seed(0))
    assert g.tokens.device.type == "cuda" and g.seconds > 0
    cpu = teacher_forced(make("looped"), idx.cpu(), P, ExitRule("conf", 0.6), "last").logits
    assert torch.allclose(teacher_forced(model, idx, P, ExitRule("conf", 0.6), "last").logits.cpu(), cpu, atol=1e-4)
    batch = [(idx, idx.roll(-1, 1), torch.ones_like(idx))]
    values = skip_evaluate(model, batch, ExitRule("q", 0.6), 1, False, S)
    assert values["skip_loops"] < 3 and values["skip_flops"] < values["full_flops"]


def exit_patterns(B: int, n: int, T: int) -> list[torch.Tensor]:
    """Exit steps (B, n) in 1..T: random, early tokens exiting early, late tokens exiting early."""
    g = torch.Generator().manual_seed(1)
    ramp = torch.arange(n)[None].expand(B, n)
    return [torch.randint(1, T + 1, (B, n), generator=g), (1 + ramp * T // n).clamp(max=T),
            (T - ramp * T // n).clamp(min=1)]


@pytest.mark.parametrize("loop_state", ["normed", "residual"])
@pytest.mark.parametrize("exited_kv", EXITED_KV)
def test_each_exited_kv_variant_equals_its_dense_reference(exited_kv, loop_state):
    """What later tokens read from an exited one (infer.exited_kv), under several exit patterns
    and an online rule: the whole sequence at once and one-token decoding over the full cache
    both give the brute-force reference's states and exits."""
    model = make("looped", loop_state)
    T, idx = model.spec.loops, torch.randint(0, V, (3, S))
    cases = [(ExitRule("none", 1.0, exited_kv), at) for at in exit_patterns(3, S, T)]
    cases.append((ExitRule("conf", 0.6, exited_kv), None))
    states_seen = []
    for rule, at in cases:
        with torch.no_grad():
            ref_states, ref_exits = skip_reference(model, idx, rule, exit_from=0, exit_at=at)
        whole = forward_chunk(model, idx, rule=rule, exit_at=at)
        assert torch.equal(whole.exit_steps, ref_exits)
        assert torch.allclose(whole.hidden, ref_states, atol=1e-5), (rule, at)
        states_seen.append(ref_states)
        # decoding one token at a time after a full-depth prompt reads the same from the cache
        with torch.no_grad():
            ref_states, ref_exits = skip_reference(model, idx, rule, exit_from=P, exit_at=at)
        cache = KVCache(model, 3, "full")
        states = [forward_chunk(model, idx[:, :P], cache, prefill=True).hidden]
        for j in range(P, S):
            out = forward_chunk(model, idx[:, j:j + 1], cache, rule, exit_at=None if at is None else at[:, j:j + 1])
            states.append(out.hidden)
        assert torch.allclose(torch.cat(states, dim=2), ref_states, atol=1e-5), (rule, at)
    # the variants differ from one another once tokens exit (the reference is not a no-op)
    frozen, _ = skip_reference(model, idx, ExitRule("none"), 0, exit_patterns(3, S, T)[0])
    if exited_kv != "frozen":
        assert not torch.allclose(states_seen[0], frozen, atol=1e-4)


def test_propagate_is_exact_at_the_first_layer_of_the_step_after_the_exit():
    """Token j exits at step e, no token before it exits: under propagate, what later tokens read
    from j at (step e + 1, layer 0) is the key/value j would have computed there had it kept
    running (its exit state is that layer's input); deeper layers are an approximation."""
    model = make("looped", "residual")
    T, j, e = model.spec.loops, 6, 1
    idx = torch.randint(0, V, (2, S))
    at = torch.full((2, S), T)
    at[:, j] = e
    exited, full = KVCache(model, 2, "full"), KVCache(model, 2, "full")
    forward_chunk(model, idx, exited, ExitRule("none", 1.0, "propagate"), exit_at=at)
    forward_chunk(model, idx, full)  # full depth: every token runs every step
    k_exited, v_exited = exited.keys_values(e + 1, 0)
    k_full, v_full = full.keys_values(e + 1, 0)
    assert torch.allclose(k_exited[:, :, j], k_full[:, :, j], atol=1e-6)
    assert torch.allclose(v_exited[:, :, j], v_full[:, :, j], atol=1e-6)
    assert not torch.allclose(exited.keys_values(e + 1, 1)[0][:, :, j], full.keys_values(e + 1, 1)[0][:, :, j], atol=1e-4)
    frozen = KVCache(model, 2, "full")
    forward_chunk(model, idx, frozen, ExitRule("none", 1.0, "frozen"), exit_at=at)
    assert not torch.allclose(frozen.keys_values(e + 1, 0)[0][:, :, j], k_full[:, :, j], atol=1e-4)


def test_propagate_charges_the_key_value_projections_it_executes():
    """Exits given (the q rule's constant-gate hand count, above, in another form): every
    exited token costs its executed steps, and under propagate one key/value projection per
    layer (2 x D x 2D FLOPs each); frozen and first cost nothing more."""
    model = make("looped")
    T, B, d, n_layers = model.spec.loops, 2, 16, 2
    at = exit_patterns(B, S, T)[0]
    n_exited = int((at < T).sum())
    for exited_kv in EXITED_KV:
        out = forward_chunk(model, torch.randint(0, V, (B, S)), rule=ExitRule("none", 1.0, exited_kv), exit_at=at)
        assert torch.equal(out.exit_steps, at) and out.stack_rows == int(at.sum())
        assert out.kv_rows == (n_exited * n_layers if exited_kv == "propagate" else 0)
        hand = row_flops(model, S, int(at.sum()), int(at.sum()), B * S) + out.kv_rows * 2 * d * 2 * d
        assert executed_flops(model, out, S) == hand
