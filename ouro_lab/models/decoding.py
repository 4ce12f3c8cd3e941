"""Skip-semantics forward passes and KV-cached decoding of looped and standard LMs.

Skip semantics (docs/concepts/method.md "Inference"; docs/guides/evaluate.md):
a token that exits at loop step e is no longer computed. Its hidden state stays frozen at
step e, and at every later step t > e the other tokens' attention reads its keys/values as
computed at step e (at the same layer): the rule the paper decodes with (`EXITED_KV` lists
the other rules `ExitRule.exited_kv` can choose). Selection semantics
(`ouro_lab.exits.select`, the released code) computes all T steps and only reads each token
at its exit step; the two differ because in skip semantics later tokens see frozen context.

One function, `forward_chunk`, runs a chunk of new tokens against a `KVCache` of the tokens
before it; everything else is a way of calling it:

    the whole sequence, no cache        skip-semantics evaluation (`ouro-lab eval`, infer.exit_rule)
    a prompt into an empty cache        prefill: every loop step's keys/values, full depth
    one token at a time                 decoding (`generate`, `ouro-lab generate` / `decode`)

Only executed work is done: after a token exits, its rows leave the matmuls (tokens still
running are packed; attention pads them per sequence), and the counts of rows that went
through the stack, the gate and the head are returned so FLOPs are counted from what ran.
The blocks are training's own (`Block.forward`); only what attention reads differs, given
as its `kv` (`_Kept`: the chunk alone, its keys/values kept; `_Packed`: running rows + cache).

Cache strategies (docs/concepts/method.md "KV cache"; paper: decode-time reuse of the last step's cache
cuts cache memory T-fold at almost no loss, the first step's collapses):
    full    one cache per (loop step, layer); step t reads step t's keys/values
    last    one cache per layer, written by a decoded token from its last executed step
    first   ... from its first step
    mean    ... the mean over its executed steps
Within a chunk the tokens read each other's per-step keys/values (prefill needs all caches);
what a chunk leaves in a shared cache is reduced by the strategy when it is written.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ouro_lab import exits
from ouro_lab.models.transformer import LoopedLM, _DecoderLM, causal_attention, is_recipe

RULES = ("none", "q", "conf", "change")
STRATEGIES = ("full", "last", "first", "mean")
# what later tokens read from an exited token at each later (loop step, layer) (infer.exited_kv):
#   frozen     its keys/values of its exit step (Huginn's "latest"; the paper decodes so)
#   propagate  that layer's own key/value projections of its exit state (CALM, Schuster et al.
#              2022, sec. 3.3.1): exact at the first layer of the step after the exit, where the
#              exit state is the layer's input; charged as executed FLOPs
#   first      its keys/values of loop step 1 (Mixture-of-Recursions' recursive KV sharing,
#              Bae et al. 2025): no extra compute
EXITED_KV = ("frozen", "propagate", "first")


@dataclass(frozen=True)
class ExitRule:
    """An online exit rule (`ouro_lab.exits`), decided at each step from what that step computed.

    none: full depth. q: the gate's CDF reaches `threshold` (Q-exit; >= 1 = full depth).
    conf: the step's max softmax probability reaches `threshold` (CALM).
    change: KL(p_t || p_{t-1}) below `threshold`, from step 2 (Huginn).
    NOTE: the oracles of the frontier need later steps, so no online rule can be one.
    """

    name: str = "none"
    threshold: float = 1.0
    exited_kv: str = "frozen"  # what later tokens read from an exited token (EXITED_KV)

    def __post_init__(self):
        if self.name not in RULES:
            raise ValueError(f"exit rule must be one of {RULES}, got {self.name!r}")
        if self.exited_kv not in EXITED_KV:
            raise ValueError(f"exited_kv must be one of {EXITED_KV}, got {self.exited_kv!r}")

    @property
    def needs_logits(self) -> bool:
        """The rule reads each step's predictive distribution: the head runs at every step."""
        return self.name in ("conf", "change")

    def __str__(self) -> str:
        kv = "" if self.exited_kv == "frozen" else f" ({self.exited_kv})"
        return "full depth" if self.name == "none" else f"{self.name}={self.threshold:g}{kv}"


class KVCache:
    """Keys and values of the tokens processed so far, for every layer (docs/concepts/method.md "KV cache").

    Prefilled positions (the prompt) keep one slot per loop step whatever the strategy: prefill
    needs all caches. Decoded positions are written by the strategy: one slot per loop step
    (`full`), or one shared slot per layer (`last`, `first`, `mean`) that every step reads.
    `nbytes` counts what is filled: layers x 2 (k, v) x B x heads x head_dim x element size x
    (T x length for `full`; T x prefilled + decoded for the shared strategies).
    """

    def __init__(self, model: _DecoderLM, batch_size: int, strategy: str = "full", max_len: int | None = None,
                 dtype: torch.dtype | None = None):
        if strategy not in STRATEGIES:
            raise ValueError(f"cache strategy must be one of {STRATEGIES}, got {strategy!r}")
        spec = model.spec
        self.strategy, self.loops = strategy, _loops(model)
        self.max_len = max_len if max_len is not None else spec.max_seq_len
        slots = self.loops if strategy == "full" else 1
        param = model.tok_emb.weight
        shape = (slots, len(model.blocks), batch_size, spec.n_heads, self.max_len, spec.d_model // spec.n_heads)
        self.k = torch.zeros(shape, dtype=dtype or param.dtype, device=param.device)  # decoded (all, for full)
        self.v = torch.zeros_like(self.k)
        self.prefix_k = self.prefix_v = None  # shared strategies: (T, L, B, H, prefilled, Dh) of the prompt
        self.length = self.prefilled = 0

    def keys_values(self, step: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """What loop step `step` (1-based) at `layer` reads of the cached tokens: (B, H, length, Dh) each."""
        if self.strategy == "full":
            return self.k[step - 1, layer, :, :, : self.length], self.v[step - 1, layer, :, :, : self.length]
        decoded = slice(self.prefilled, self.length)
        k, v = self.k[0, layer, :, :, decoded], self.v[0, layer, :, :, decoded]
        if self.prefix_k is None:
            return k, v
        return (torch.cat([self.prefix_k[step - 1, layer], k], dim=2),
                torch.cat([self.prefix_v[step - 1, layer], v], dim=2))

    def append(self, step_k: torch.Tensor, step_v: torch.Tensor, exit_steps: torch.Tensor, prefill: bool = False) -> None:
        """Write a chunk: step_k, step_v (T, L, B, H, C, Dh) per loop step, frozen after each
        token's exit; exit_steps (B, C) in 1..T. `prefill`: kept per step, whatever the strategy."""
        C = step_k.shape[-2]
        if self.length + C > self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} positions; {self.length} used, {C} more asked")
        if prefill and self.length != self.prefilled:
            raise ValueError("prefill comes before decoding: this cache already holds decoded tokens")
        new = slice(self.length, self.length + C)
        if self.strategy == "full":
            self.k[..., new, :], self.v[..., new, :] = step_k, step_v
        elif prefill:
            cat = lambda old, x: x if old is None else torch.cat([old, x], dim=-2)  # noqa: E731
            self.prefix_k, self.prefix_v = cat(self.prefix_k, step_k), cat(self.prefix_v, step_v)
        else:
            self.k[..., new, :], self.v[..., new, :] = self._reduce(step_k, exit_steps), self._reduce(step_v, exit_steps)
        self.length += C
        self.prefilled += C if prefill else 0

    def _reduce(self, per_step: torch.Tensor, exit_steps: torch.Tensor) -> torch.Tensor:
        """A decoded chunk's one row per layer: (T, L, B, H, C, Dh) -> (1, L, B, H, C, Dh)."""
        if self.strategy == "last":  # the frozen rows after a token's exit hold its last executed step's
            return per_step[-1:]
        if self.strategy == "first":
            return per_step[:1]
        T = per_step.shape[0]  # mean over each token's executed steps 1..exit
        ran = torch.arange(1, T + 1, device=exit_steps.device)[:, None, None] <= exit_steps  # (T, B, C)
        w = (ran / exit_steps).to(per_step.dtype)[:, None, :, None, :, None]  # (T, 1, B, 1, C, 1)
        return (per_step * w).sum(0, keepdim=True)

    @property
    def nbytes(self) -> int:
        if self.strategy == "full":
            elements = self.k[..., : self.length, :].numel()
        else:
            elements = self.k[..., self.prefilled: self.length, :].numel()
            elements += self.prefix_k.numel() if self.prefix_k is not None else 0
        return 2 * elements * self.k.element_size()


@dataclass
class ChunkOutput:
    """hidden: (T, B, C, D) final-normed state per loop step, frozen after each token's exit
    (the head reads it: per-step logits = head(hidden)); exit_steps: (B, C) in 1..T;
    exit_logits: (B, C, V) at each token's exit step; gate_logits: (B, C, T) frozen after the
    exit, None for standard models. *_rows: token rows that went through the stack (one per
    token and executed loop step), the exit gate and the LM head; kv_rows: exited tokens' rows
    whose keys/values a layer projected again (exited_kv=propagate: one per exited token and
    layer)."""

    hidden: torch.Tensor
    exit_steps: torch.Tensor
    exit_logits: torch.Tensor
    gate_logits: torch.Tensor | None
    stack_rows: int
    gate_rows: int
    head_rows: int
    kv_rows: int = 0


def row_flops(model: _DecoderLM, seq_len: int, stack_rows: int, gate_rows: int, head_rows: int,
              kv_rows: int = 0) -> int:
    """Forward FLOPs of token rows through the stack (one per token and loop step), the exit
    gate, the LM head and the key/value projections of one layer (`kv_rows`: 2 x D x 2D each),
    counted by structure (the platform's convention, `_DecoderLM.block_flops_per_token`:
    attention over the full `seq_len`, norms and softmax ignored)."""
    stack = len(model.blocks) * model.block_flops_per_token(seq_len)
    d = model.spec.d_model
    return (stack_rows * stack + gate_rows * 2 * d + head_rows * model.head_flops_per_token()
            + kv_rows * 2 * d * 2 * d)


def executed_flops(model: _DecoderLM, out: ChunkOutput, seq_len: int) -> int:
    """Forward FLOPs a chunk actually executed (`row_flops` of the rows that ran)."""
    return row_flops(model, seq_len, out.stack_rows, out.gate_rows, out.head_rows, out.kv_rows)


def decoding_refusal(looped: bool, prelude_layers: int, coda_layers: int, injection: str,
                     init_state: str) -> str | None:
    """Why skip semantics and cached decoding refuse a model, or None where they run it: a loop
    recipe (`transformer.is_recipe`) is refused. The one refusal: the config's validation,
    inference and `forward_chunk` ask it."""
    if is_recipe(looped, prelude_layers, coda_layers, injection, init_state):
        return ("skip semantics and cached decoding support Ouro's whole-stack loop only (model.prelude_layers, "
                "coda_layers, injection, init_state at their defaults)")
    return None


def _loops(model: _DecoderLM) -> int:
    return model.spec.loops if isinstance(model, LoopedLM) else 1


@torch.no_grad()
def forward_chunk(model: _DecoderLM, idx: torch.Tensor, cache: KVCache | None = None, rule: ExitRule = ExitRule(),
                  exit_from: int = 0, prefill: bool = False, exit_at: torch.Tensor | None = None) -> ChunkOutput:
    """Run tokens idx (B, C) at positions cache.length.. (0 without a cache) in skip semantics
    under `rule`, reading the cached tokens' keys/values, and append the chunk to `cache`
    (`prefill`: kept per loop step whatever the strategy). Tokens before position `exit_from`
    run to full depth. `exit_at` (B, C): exit steps given instead of the rule's (an oracle's,
    a test's; T or more = full depth). What later tokens read from an exited one: `rule.exited_kv`.

    With rule none and no cache, every operation is the ordinary forward's (same results)."""
    spec = model.spec
    refusal = decoding_refusal(isinstance(model, LoopedLM), spec.prelude_layers, spec.coda_layers, spec.injection,
                               spec.init_state)
    if refusal:
        raise ValueError(refusal)
    B, C = idx.shape
    start = cache.length if cache is not None else 0
    blocks = model.blocks
    if start + C > spec.max_seq_len:
        raise ValueError(f"positions up to {start + C} asked; the model's context is {spec.max_seq_len} tokens")
    T, L, H, D = _loops(model), len(blocks), spec.n_heads, spec.d_model
    gate = model.exit_gate if isinstance(model, LoopedLM) else None
    if rule.name == "q" and gate is None:
        raise ValueError("the q exit rule reads the exit gate; this model has none")
    device = idx.device
    positions = torch.arange(start, start + C, device=device)
    h = model.embed(idx, start)  # (B, C, D)
    k_now = h.new_zeros(L, B, H, C, D // H)  # each token's latest keys/values per layer (frozen after exit)
    v_now = torch.zeros_like(k_now)
    step_k, step_v, step_hidden, step_gate = [], [], [], []
    hidden_now = torch.zeros_like(h)
    gate_now = h.new_zeros(B, C)
    active = torch.ones(B, C, dtype=torch.bool, device=device)
    exit_steps = torch.full((B, C), T, dtype=torch.long, device=device)
    may_exit = (positions >= exit_from)[None].expand(B, C)
    survival = torch.ones(B, C, dtype=torch.float64, device=device)  # prod_{j<=t} (1 - lambda_j): exits.cdf_step
    exit_logits = prev_log_probs = None
    if rule.needs_logits:
        exit_logits = h.new_zeros(B, C, spec.vocab_size)
    if rule.name == "change":
        prev_log_probs = torch.zeros(B, C, spec.vocab_size, device=device)
    stack_rows = gate_rows = head_rows = kv_rows = 0
    handed_over = torch.zeros_like(active)  # exited tokens whose keys/values exited_kv has replaced
    first_kv = None  # (exited_kv=first) every token's step-1 keys/values
    for t in range(1, T + 1):
        if rule.exited_kv != "frozen" and bool((newly := ~active & ~handed_over).any()):
            kv_rows += _exited_keys_values(blocks, rule.exited_kv, newly, h, positions, k_now, v_now, first_kv)
            handed_over |= newly
        if active.any():
            rows = active.nonzero(as_tuple=True)  # (b, c) of the tokens still running
            if start == 0 and bool(active.all()):  # nothing cached, nothing exited: the ordinary blocks
                for layer, block in enumerate(blocks):
                    h = block(h, _Kept(k_now[layer], v_now[layer]))
                x = h.reshape(B * C, D)
            else:  # the running rows only, through the same blocks
                packed, x = _Packed(cache, t, rows, active, positions, k_now, v_now), h[rows]
                for layer, block in enumerate(blocks):
                    # NOTE: .forward, not the call: eager even where training compiled the blocks
                    # (fullgraph), since the packed shapes change with every exit
                    x = block.forward(x, packed.layer(layer))
            if t == 1 and rule.exited_kv == "first":  # (every token runs step 1: all its keys/values)
                first_kv = (k_now.clone(), v_now.clone())
            stack_rows += x.shape[0]
            x_normed = model.final_norm(x)
            if spec.loop_state == "normed":  # Ouro: the normed state is the next loop's input
                x = x_normed
            h = h.index_put(rows, x.reshape(-1, D))
            hidden_now = hidden_now.index_put(rows, x_normed.reshape(-1, D))
            x_normed = x_normed.reshape(-1, D)
            fires = torch.zeros(x_normed.shape[0], dtype=torch.bool, device=device)
            if gate is not None:
                g = gate(x_normed).squeeze(-1)  # (n,)
                gate_rows += g.shape[0]
                gate_now = gate_now.index_put(rows, g)
                survival[rows], cdf = exits.cdf_step(survival[rows], g)
                if rule.name == "q" and rule.threshold < 1.0:
                    fires = exits.q_reached(cdf, rule.threshold)
            if rule.needs_logits:
                logits = model.lm_head(x_normed)  # (n, V)
                head_rows += logits.shape[0]
                exit_logits[rows] = logits
                prev = prev_log_probs[rows] if prev_log_probs is not None and t > 1 else None
                log_probs, confidence, change = exits.rule_inputs(logits, prev)
                if rule.name == "conf":
                    fires = exits.confident(confidence, rule.threshold)
                else:
                    fires = exits.settled(change, rule.threshold)  # never at step 1 (change = inf)
                    prev_log_probs[rows] = log_probs
            if exit_at is not None:
                fires = exit_at[rows] == t
            if t < T:
                fires = fires & may_exit[rows]
                stop = (rows[0][fires], rows[1][fires])
                exit_steps[stop] = t
                active[stop] = False
        if cache is not None:  # what the chunk leaves in the cache, per step
            step_k.append(k_now.clone())
            step_v.append(v_now.clone())
        step_hidden.append(hidden_now.clone())
        step_gate.append(gate_now.clone())
    hidden = torch.stack(step_hidden)  # (T, B, C, D)
    if exit_logits is None:  # the head runs once per token, on its exit step's state
        exit_logits = model.lm_head(hidden[-1])
        head_rows += B * C
    if cache is not None:
        cache.append(torch.stack(step_k), torch.stack(step_v), exit_steps, prefill)
    return ChunkOutput(hidden=hidden, exit_steps=exit_steps, exit_logits=exit_logits,
                       gate_logits=torch.stack(step_gate, -1) if gate is not None else None,
                       stack_rows=stack_rows, gate_rows=gate_rows, head_rows=head_rows, kv_rows=kv_rows)


def _exited_keys_values(blocks, how: str, exited: torch.Tensor, h: torch.Tensor, positions: torch.Tensor,
                        k_now: torch.Tensor, v_now: torch.Tensor, first_kv) -> int:
    """Write what later tokens read from the chunk's newly exited tokens (`exited` (B, C)) at
    every later loop step into k_now, v_now (L, B, H, C, Dh): each layer's projections of their
    exit state h (`propagate`; the same at every later step, as the layers' weights are shared
    across loop steps), or their step-1 keys/values (`first`). Returns the rows projected."""
    b, c = exited.nonzero(as_tuple=True)
    if how == "first":
        k_now[:, b, :, c], v_now[:, b, :, c] = first_kv[0][:, b, :, c], first_kv[1][:, b, :, c]
        return 0
    x = h[b, c]  # (n, D): each exited token's state at its exit, the next loop step's input
    for layer, block in enumerate(blocks):
        k_now[layer][b, :, c], v_now[layer][b, :, c] = block.attn.keys_values(block.norm1(x), positions[c])
    return x.shape[0] * len(blocks)


class _Kept:
    """Attention as in training over the whole chunk (nothing cached, nothing exited), its keys
    and values copied into k_out, v_out (B, H, C, Dh): the `kv` of `Block.forward`."""

    positions = None

    def __init__(self, k_out: torch.Tensor, v_out: torch.Tensor):
        self.k_out, self.v_out = k_out, v_out

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.k_out.copy_(k)
        self.v_out.copy_(v)
        return causal_attention(q, k, v)


class _Packed:
    """The running tokens' attention at one loop step, for `Block.forward` over packed rows
    (n, D) (b, c): each sequence's running queries go into A slots (A = the most running in one
    sequence) and read the cached tokens, then the chunk's keys (running tokens' new ones,
    exited tokens' frozen ones), causally within the chunk. `layer(i)` points it at block i."""

    def __init__(self, cache: KVCache | None, step: int, rows: tuple, active: torch.Tensor, positions: torch.Tensor,
                 k_now: torch.Tensor, v_now: torch.Tensor):
        B, C = active.shape
        self.cache, self.step, self.rows, self.k_now, self.v_now = cache, step, rows, k_now, v_now
        b, c = rows
        self.slot = (active.long().cumsum(1) - 1)[rows]  # each running token's slot in its sequence's queries
        A = int(active.sum(1).max())
        query_c = torch.full((B, A), C - 1, dtype=torch.long, device=active.device)  # padding slots see all: finite, unused
        query_c[b, self.slot] = c
        self.cached = cache.length if cache is not None else 0
        sees = torch.arange(C, device=active.device)[None, None, :] <= query_c[:, :, None]  # (B, A, C)
        self.mask = torch.cat([sees.new_ones(B, A, self.cached), sees], dim=-1)[:, None]  # (B, 1, A, cached + C)
        self.positions = positions[c]
        self.index = 0

    def layer(self, index: int) -> _Packed:
        self.index = index
        return self

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v (n, H, Dh) of the running rows -> (n, H, Dh)."""
        (b, c), slot = self.rows, self.slot
        keys, values = self.k_now[self.index], self.v_now[self.index]  # (B, H, C, Dh)
        keys[b, :, c] = k
        values[b, :, c] = v
        if self.cached:
            cached_k, cached_v = self.cache.keys_values(self.step, self.index)
            keys, values = torch.cat([cached_k, keys], dim=2), torch.cat([cached_v, values], dim=2)
        queries = q.new_zeros(self.mask.shape[0], q.shape[1], self.mask.shape[2], q.shape[2])  # (B, H, A, Dh)
        queries[b, :, slot] = q
        y = F.scaled_dot_product_attention(queries, keys, values, attn_mask=self.mask)  # (B, H, A, Dh)
        return y[b, :, slot]


def clock(device: torch.device) -> float:
    """Wall time once the device's queued work is done (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@dataclass
class Decoded:
    """What decoding returns. tokens: (B, P + new) prompt and generated ids (`generate`);
    logits: (B, new, V) each decoded position's prediction (`teacher_forced`); exit_steps:
    (B, new) the loop step each decoded position's prediction came from; seconds and flops:
    wall time and executed forward FLOPs of the decode steps (prefill excluded); cache: the
    cache at the end."""

    exit_steps: torch.Tensor
    seconds: float
    flops: int
    cache: KVCache
    tokens: torch.Tensor | None = None
    logits: torch.Tensor | None = None


def _prefill(model: _DecoderLM, prompt: torch.Tensor, strategy: str, max_len: int) -> KVCache:
    """A cache holding `prompt` (B, P), run at full depth and kept per loop step."""
    cache = KVCache(model, prompt.shape[0], strategy, max_len=max_len)
    if prompt.shape[1]:
        forward_chunk(model, prompt, cache, prefill=True)
    return cache


@torch.no_grad()
def generate(model: _DecoderLM, prompt: torch.Tensor, max_new_tokens: int, rule: ExitRule = ExitRule(),
             strategy: str = "full", temperature: float = 0.0, generator: torch.Generator | None = None) -> Decoded:
    """Autoregressive generation with a KV cache and per-token early exit under `rule`.

    The prompt (B, P) but its last token is prefilled at full depth into every loop step's
    cache; then each step decodes one token (the prompt's last first), exiting under `rule`,
    and appends it to the cache by `strategy`. temperature 0 = greedy; `generator` must live
    on the model's device."""
    B, P = prompt.shape
    if P < 1 or max_new_tokens < 1:
        raise ValueError(f"generation needs a prompt and max_new_tokens >= 1, got {P} tokens and {max_new_tokens}")
    total = P + max_new_tokens - 1  # the last generated token is never fed back
    if total > model.spec.max_seq_len:
        raise ValueError(f"prompt ({P}) + max_new_tokens ({max_new_tokens}) needs {total} positions; "
                         f"the model's context is {model.spec.max_seq_len}")
    cache = _prefill(model, prompt[:, :-1], strategy, total)
    seq_len, flops = model.spec.max_seq_len, 0
    began = clock(prompt.device)
    tokens, steps, nxt = [prompt], [], prompt[:, -1:]
    for _ in range(max_new_tokens):
        out = forward_chunk(model, nxt, cache, rule)
        flops += executed_flops(model, out, seq_len)
        logits = out.exit_logits[:, -1].float()
        if temperature > 0:
            nxt = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator)
        else:
            nxt = logits.argmax(-1, keepdim=True)
        tokens.append(nxt)
        steps.append(out.exit_steps[:, -1])
    return Decoded(exit_steps=torch.stack(steps, 1), seconds=clock(prompt.device) - began, flops=flops, cache=cache,
                   tokens=torch.cat(tokens, 1))


@torch.no_grad()
def teacher_forced(model: _DecoderLM, tokens: torch.Tensor, prefill: int, rule: ExitRule = ExitRule(),
                   strategy: str = "full") -> Decoded:
    """Decode `tokens` (B, S) one at a time after prefilling the first `prefill` at full depth,
    feeding the true tokens; `logits` (B, S - prefill, V) are each decoded position's prediction."""
    B, S = tokens.shape
    if not 0 <= prefill < S:
        raise ValueError(f"prefill must be in [0, {S}), got {prefill}")
    cache = _prefill(model, tokens[:, :prefill], strategy, S)
    seq_len, flops = model.spec.max_seq_len, 0
    began = clock(tokens.device)
    logits, steps = [], []
    for j in range(prefill, S):
        out = forward_chunk(model, tokens[:, j:j + 1], cache, rule)
        flops += executed_flops(model, out, seq_len)
        logits.append(out.exit_logits[:, 0])
        steps.append(out.exit_steps[:, 0])
    return Decoded(exit_steps=torch.stack(steps, 1), seconds=clock(tokens.device) - began, flops=flops, cache=cache,
                   logits=torch.stack(logits, 1))


__all__ = ["ChunkOutput", "Decoded", "ExitRule", "KVCache", "RULES", "STRATEGIES", "clock", "decoding_refusal",
           "executed_flops", "row_flops",
           "forward_chunk", "generate", "teacher_forced"]
