"""Decoder-only blocks, the looped LM (Ouro) and the standard LM baselines.

Pure `nn.Module`s: token ids in, per-loop-step logits (and exit-gate logits) out.
Nothing here knows about losses, optimizers or logging (see STYLE.md).

Block layout follows the released Ouro code (docs/concepts/method.md "Block"):
sandwich RMSNorm around each sub-layer, RoPE, SwiGLU, no biases, MHA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

CHECKPOINTING = ("none", "block", "loop")  # activation checkpointing: off | per block | per loop step
ROPE_LAYOUTS = ("interleaved", "rotate_half")  # which dimensions RoPE rotates together (RotaryEmbedding)
INJECTIONS = ("none", "additive", "concat", "stable")  # how the input enters every loop step (LoopedLM)
INIT_STATES = ("input", "zeros", "random")  # the state before loop step 1 (LoopedLM)
# (prelude_layers, coda_layers, injection, init_state) of Ouro's whole-stack loop; anything else is a recipe
OURO_LOOP = (0, 0, "none", "input")


def is_recipe(looped: bool, prelude_layers: int, coda_layers: int, injection: str, init_state: str) -> bool:
    """A looped model other than Ouro's whole-stack loop (a prelude, coda, injection or initial
    state of another recipe): the one definition (the config and `decoding.decoding_refusal` ask)."""
    return looped and (prelude_layers, coda_layers, injection, init_state) != OURO_LOOP


@dataclass
class ModelSpec:
    """Resolved shape of one network (derived from the experiment config by `modules.model_spec`)."""

    vocab_size: int
    max_seq_len: int
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 2  # distinct blocks in the stack
    loops: int = 1  # times this network applies its stack: ModelConfig.trained_loops (T looped, 1 standard)
    d_ff: int = 256  # SwiGLU hidden width
    tie_embeddings: bool = True
    positions: str = "rope"  # rope | learned
    loop_state: str = "normed"  # normed (Ouro) | residual
    prelude_layers: int = 0  # looped: distinct blocks before the loop (Huginn, Parcae)
    coda_layers: int = 0  # looped: distinct blocks after the loop, on every step's readout
    injection: str = "none"  # looped: none | additive | concat | stable (INJECTIONS)
    init_state: str = "input"  # looped: input | zeros | random (INIT_STATES)
    embed_init_std: float = 0.02  # token/position embedding init std (untied); 1.0 = PyTorch default
    rope_base: float = 10000.0
    rope_layout: str = "interleaved"  # interleaved (2i, 2i+1) | rotate_half (i, i + Dh/2; the released Ouro weights)
    norm_eps: float = 1e-6


class RotaryEmbedding(nn.Module):
    """Precomputed RoPE tables; `forward` rotates (B, H, S, Dh) queries/keys.

    NOTE: two layouts of the same rotation (docs/concepts/method.md "RoPE layouts"): `interleaved` pairs
    dimensions (2i, 2i+1), ouro-lab's default; `rotate_half` pairs (i, i + Dh/2), the released
    Ouro/Llama code (`cat(freqs, freqs)`). They differ by a permutation of each head's q/k
    rows, so weights trained in one layout are wrong in the other.
    """

    def __init__(self, head_dim: int, max_seq_len: int, base: float, layout: str = "interleaved"):
        super().__init__()
        if layout not in ROPE_LAYOUTS:
            raise ValueError(f"rope_layout must be one of {ROPE_LAYOUTS}, got {layout!r}")
        self.layout = layout
        inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)  # (S, Dh/2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """x (..., S, Dh) at positions 0..S-1; or, with `positions` (n,), x (n, H, Dh) packed rows,
        row i at position positions[i] (cached decoding, models/decoding.py)."""
        if positions is None:
            cos, sin = self.cos[: x.shape[-2]], self.sin[: x.shape[-2]]
        else:
            cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]  # (n, 1, Dh/2)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        if self.layout == "rotate_half":
            x1, x2 = x.chunk(2, dim=-1)
            return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
        return rotated.flatten(-2)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain causal self-attention: q, k, v (B, H, S, Dh) -> (B, S, H, Dh)."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, rope: RotaryEmbedding | None):
        super().__init__()
        self.n_heads = spec.n_heads
        self.qkv = nn.Linear(spec.d_model, 3 * spec.d_model, bias=False)  # rows: [q; k; v], each head-major
        self.out = nn.Linear(spec.d_model, spec.d_model, bias=False)
        self.rope = rope  # shared table, not a parameter

    def forward(self, x: torch.Tensor, kv=None) -> torch.Tensor:
        """Causal self-attention over x (B, S, D). `kv` (skip semantics and cached decoding,
        models/decoding.py) decides what the queries meet: `kv.attend(q, k, v)` in place of
        plain causal attention, returning (..., H, Dh) in x's layout; with `kv.positions` (n,)
        set, x is packed token rows (n, D), row i at position kv.positions[i]."""
        positions = None if kv is None else kv.positions
        D = x.shape[-1]
        if positions is None:
            B, S, _ = x.shape
            q, k, v = self.qkv(x).view(B, S, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)  # (B, H, S, Dh)
        else:
            q, k, v = self.qkv(x).view(x.shape[0], 3, self.n_heads, D // self.n_heads).unbind(1)  # (n, H, Dh)
        if self.rope is not None:
            q, k = self.rope(q, positions), self.rope(k, positions)
        y = causal_attention(q, k, v) if kv is None else kv.attend(q, k, v)
        return self.out(y.flatten(-2))

    def keys_values(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values `forward` would attend with for packed rows x (n, D) at
        `positions` (n,), without the queries: (n, H, Dh) each (what an exited token offers
        later tokens under infer.exited_kv=propagate, models/decoding.py)."""
        D = x.shape[-1]
        k, v = F.linear(x, self.qkv.weight[D:]).view(x.shape[0], 2, self.n_heads, D // self.n_heads).unbind(1)
        return (self.rope(k, positions) if self.rope is not None else k), v


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.gate_up = nn.Linear(d_model, 2 * d_ff, bias=False)
        self.down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    """Sandwich-norm block: h' = h + norm2(attn(norm1(h))); h'' = h' + norm4(mlp(norm3(h')))."""

    def __init__(self, spec: ModelSpec, rope: RotaryEmbedding | None):
        super().__init__()
        self.norm1 = nn.RMSNorm(spec.d_model, eps=spec.norm_eps)
        self.attn = Attention(spec, rope)
        self.norm2 = nn.RMSNorm(spec.d_model, eps=spec.norm_eps)
        self.norm3 = nn.RMSNorm(spec.d_model, eps=spec.norm_eps)
        self.mlp = SwiGLU(spec.d_model, spec.d_ff)
        self.norm4 = nn.RMSNorm(spec.d_model, eps=spec.norm_eps)

    def forward(self, h: torch.Tensor, kv=None) -> torch.Tensor:
        """h (B, S, D); or packed token rows (n, D) with `kv` (`Attention.forward`)."""
        h = h + self.norm2(self.attn(self.norm1(h), kv))
        return h + self.norm4(self.mlp(self.norm3(h)))


@dataclass
class LMOutput:
    """What every model returns.

    hidden: (T, B, S, D) final-normed states, one slice per loop step (T=1 for standard
    models); the LM head reads them: `logits` = head(hidden), (T, B, S, V). NOTE: training
    fuses head and cross-entropy on `hidden` (objectives.linear_cross_entropy) so the full
    logits of all T steps never exist at once; `logits` is for evaluation and tests.
    gate_logits: (B, S, T) pre-sigmoid exit-gate outputs, or None without a gate.
    """

    hidden: torch.Tensor
    gate_logits: torch.Tensor | None
    head: nn.Linear

    @property
    def logits(self) -> torch.Tensor:
        return self.head(self.hidden)


class _DecoderLM(nn.Module):
    """Embedding, a stack of blocks, final norm and LM head; subclasses decide how the stack runs."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        if spec.d_model % spec.n_heads:
            raise ValueError(f"d_model={spec.d_model} is not divisible by n_heads={spec.n_heads}")
        head_dim = spec.d_model // spec.n_heads
        if spec.positions == "rope":
            if head_dim % 2:
                raise ValueError(f"RoPE needs an even head dim, got d_model/n_heads={head_dim}")
            rope = RotaryEmbedding(head_dim, spec.max_seq_len, spec.rope_base, spec.rope_layout)
            self.pos_emb = None
        elif spec.positions == "learned":
            rope = None
            self.pos_emb = nn.Embedding(spec.max_seq_len, spec.d_model)
        else:
            raise ValueError(f"positions must be 'rope' or 'learned', got {spec.positions!r}")
        self.checkpointing = "none"  # see CHECKPOINTING; set by the training module (an execution choice)
        self.tok_emb = nn.Embedding(spec.vocab_size, spec.d_model)
        self.blocks = nn.ModuleList(Block(spec, rope) for _ in range(spec.n_layers))
        self.final_norm = nn.RMSNorm(spec.d_model, eps=spec.norm_eps)
        self.lm_head = nn.Linear(spec.d_model, spec.vocab_size, bias=False)
        if spec.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.apply(self._init_weights)
        if not spec.tie_embeddings:
            nn.init.normal_(self.tok_emb.weight, std=spec.embed_init_std)
            if self.pos_emb is not None:
                nn.init.normal_(self.pos_emb.weight, std=spec.embed_init_std)
        # GPT-2 style: scale residual-branch output projections by depth actually executed.
        self._scale_residual_outputs(self, spec.n_layers * spec.loops)

    @staticmethod
    def _scale_residual_outputs(module: nn.Module, depth: int) -> None:
        """Re-draw the blocks' residual-branch output projections with std 0.02 / sqrt(2 depth)."""
        for name, p in module.named_parameters():
            if name.endswith(("attn.out.weight", "mlp.down.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * depth))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def embed(self, idx: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Token (+ learned position) embeddings of idx (B, S) at positions start..start+S-1."""
        h = self.tok_emb(idx)  # (B, S, D)
        if self.pos_emb is not None:
            h = h + self.pos_emb(torch.arange(start, start + idx.shape[1], device=idx.device))
        return h

    def run_stack(self, h: torch.Tensor, context=None) -> torch.Tensor:
        """One pass through the blocks; with activation checkpointing (training only) the
        activations inside each block ('block') or the whole pass ('loop') are recomputed in
        backward instead of kept. `context` (exit-aware training, models/exit_aware.py): block
        i attends through `context.layer(i)`, eagerly (`.forward`: a compiled block's graph
        has no such argument)."""
        recompute = self.checkpointing != "none" and torch.is_grad_enabled()
        if recompute and self.checkpointing == "loop":
            return checkpoint(self._blocks, h, context, use_reentrant=False)
        for i, block in enumerate(self.blocks):
            run = block if context is None else lambda x, block=block, kv=context.layer(i): block.forward(x, kv)
            h = checkpoint(run, h, use_reentrant=False) if recompute else run(h)
        return h

    def _blocks(self, h: torch.Tensor, context=None) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            h = block(h) if context is None else block.forward(h, context.layer(i))
        return h

    def num_params(self) -> int:
        """Distinct trainable parameters (a shared block counts once, tied weights once)."""
        return sum(p.numel() for p in self.parameters())

    def block_flops_per_token(self, seq_len: int) -> int:
        """Forward FLOPs per token of one block, counted by structure (STYLE.md).

        Matmuls cost 2*m*n per token; attention scores and values 2*2*S*d (full S, not
        causal-halved, the usual convention); norms, RoPE and softmax are ignored.
        """
        d, f = self.spec.d_model, self.spec.d_ff
        return 2 * (3 * d * d + d * d) + 2 * (2 * d * f + f * d) + 4 * seq_len * d

    def head_flops_per_token(self) -> int:
        return 2 * self.spec.d_model * self.spec.vocab_size


class StandardLM(_DecoderLM):
    """N' distinct blocks, one pass: the param-matched (N'=N) and depth-matched (N'=N*T) baselines."""

    def forward(self, idx: torch.Tensor) -> LMOutput:
        h = self.final_norm(self.run_stack(self.embed(idx)))
        return LMOutput(hidden=h.unsqueeze(0), gate_logits=None, head=self.lm_head)

    def flops_per_token(self, seq_len: int) -> int:
        """Forward FLOPs per token (training costs ~3x)."""
        return self.spec.n_layers * self.block_flops_per_token(seq_len) + self.head_flops_per_token()


class StableInjection(nn.Module):
    """Parcae's injection (Prairie et al. 2026; sandyresearch/parcae, parcae_lm/modules/injection.py
    `DiagonalInjection`): u = exp(-dt * A) * h + dt * (B e), dt = softplus(dt_bias), A = exp(A_log),
    per dimension. A discretised negative-diagonal system: every decay exp(-dt A) lies in (0, 1),
    so the injection's spectral norm stays below 1 however long it loops. Init as theirs: A = 1,
    decay sqrt(1/5), B = I; no weight decay on any of the three (`no_weight_decay`)."""

    def __init__(self, d: int, decay: float = math.sqrt(1 / 5)):
        super().__init__()
        dt = -math.log(decay)
        self.A_log = nn.Parameter(torch.zeros(d))
        self.dt_bias = nn.Parameter(torch.full((d,), dt + math.log(-math.expm1(-dt))))  # softplus^-1(dt)
        self.B = nn.Parameter(torch.eye(d))
        for p in self.parameters():
            p.no_weight_decay = True

    def decay(self) -> torch.Tensor:
        return torch.exp(-F.softplus(self.dt_bias) * self.A_log.exp())  # (d,) in (0, 1)

    def input_term(self, e: torch.Tensor) -> torch.Tensor:
        """dt * (B e): the same at every loop step, computed once."""
        return F.softplus(self.dt_bias) * F.linear(e, self.B)

    def forward(self, h: torch.Tensor, e_term: torch.Tensor) -> torch.Tensor:
        return self.decay() * h + e_term


class LoopedLM(_DecoderLM):
    """N shared blocks applied T times; an LM head and an exit gate read every step.

    Between loops (docs/concepts/method.md "Loop state"): with loop_state='normed' the normalised h_t is the next
    loop's input (Ouro); with 'residual' the raw residual stream goes on and only the
    head and gate read final_norm(h_t). Both equal a standard model when T=1.

    Loop recipes (docs/guides/recipes.md; all off = Ouro, the same operations as before):
    - prelude (P blocks) runs once: e = prelude(embed(x)); with the stable injection e is
      RMS-normalised (Parcae's `ln_prelude`);
    - the state before step 1 is e (`input`), zeros, or Huginn's random truncated normal
      (std sqrt(2/5), cut at 3 std: `raven_modeling_minimal.initialize_state`);
    - before every step the input is injected: u = h + e (additive), u = W [h; e] with W a
      bias-free Linear(2d, d) (concat, Huginn's adapter), or Parcae's StableInjection;
    - coda (C blocks): every step's readout is final_norm(coda(h_t)) (Huginn applies its final
      norm after the loop and again after the coda, as here with loop_state='normed'); without a
      coda the readout is final_norm(h_t), as in Ouro. The head and gate read the readout.
    """

    def __init__(self, spec: ModelSpec):
        if spec.loop_state not in ("normed", "residual"):
            raise ValueError(f"loop_state must be 'normed' or 'residual', got {spec.loop_state!r}")
        if spec.injection not in INJECTIONS or spec.init_state not in INIT_STATES:
            raise ValueError(f"injection must be one of {INJECTIONS} and init_state one of {INIT_STATES}, "
                             f"got {spec.injection!r}, {spec.init_state!r}")
        super().__init__(spec)
        self.exit_gate = nn.Linear(spec.d_model, 1, bias=True)  # lambda_t = sigmoid(w . h_t + b)
        # NOTE: built only when asked for, so Ouro's model draws the same initial weights as before
        rope = self.blocks[0].attn.rope if len(self.blocks) else None
        depth = spec.prelude_layers + spec.n_layers * spec.loops + spec.coda_layers
        self.prelude = self._extra_blocks(spec, spec.prelude_layers, rope, depth)
        self.coda = self._extra_blocks(spec, spec.coda_layers, rope, depth)
        d = spec.d_model
        self.adapter = self.injector = self.prelude_norm = None
        if spec.injection == "concat":  # Huginn's adapter: init trunc normal, std sqrt(2 / (5 d)) as theirs
            self.adapter = nn.Linear(2 * d, d, bias=False)
            std = math.sqrt(2 / (5 * d))
            nn.init.trunc_normal_(self.adapter.weight, std=std, a=-3 * std, b=3 * std)
        elif spec.injection == "stable":
            self.injector = StableInjection(d)
            self.prelude_norm = nn.RMSNorm(d, eps=spec.norm_eps)

    def _extra_blocks(self, spec: ModelSpec, n: int, rope, depth: int) -> nn.ModuleList:
        blocks = nn.ModuleList(Block(spec, rope) for _ in range(n))
        blocks.apply(self._init_weights)
        self._scale_residual_outputs(blocks, depth)
        return blocks

    def loop_input(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        """e (the prelude's output), the state before loop step 1, and `inject(h) -> u`, the
        input of the stack at every step (its e part computed once here)."""
        e = self.embed(idx)
        for block in self.prelude:
            e = block(e)
        if self.prelude_norm is not None:
            e = self.prelude_norm(e)
        init = self.spec.init_state
        if init == "input":
            h = e
        elif init == "zeros":
            h = torch.zeros_like(e)
        else:  # Huginn: truncated normal, std sqrt(2/5), whatever the width
            std = math.sqrt(2 / 5)
            h = nn.init.trunc_normal_(torch.empty_like(e), std=std, a=-3 * std, b=3 * std)
        kind = self.spec.injection
        if kind == "none":
            return e, h, lambda h: h
        if kind == "additive":
            return e, h, lambda h: h + e
        if kind == "concat":  # W [h; e] = W_h h + W_e e, the second term once
            d = self.spec.d_model
            e_term = F.linear(e, self.adapter.weight[:, d:])
            return e, h, lambda h: F.linear(h, self.adapter.weight[:, :d]) + e_term
        e_term = self.injector.input_term(e)
        return e, h, lambda h: self.injector(h, e_term)

    def readout(self, h_state: torch.Tensor, h_normed: torch.Tensor) -> torch.Tensor:
        """What the head and gate read at a step: final_norm(coda(state)), or final_norm(h_t) without a coda."""
        if not len(self.coda):
            return h_normed
        for block in self.coda:
            h_state = block(h_state)
        return self.final_norm(h_state)

    def forward(self, idx: torch.Tensor, loops: int | None = None, grad_loops: int | None = None,
                train_exits=None) -> LMOutput:
        """Run `loops` steps (default: the trained T; more extrapolates). `grad_loops` = k:
        truncated backprop, the first loops - k steps run without a graph (Huginn's
        `iterate_forward`); None or >= loops = every step. `train_exits` (exit-aware training,
        `exit_aware.TrainExits`): tokens exit along the way and later tokens read what they
        leave behind (Ouro's whole-stack loop only)."""
        loops = self.spec.loops if loops is None else loops
        _, h, inject = self.loop_input(idx)
        no_graph = 0 if grad_loops is None else max(0, loops - grad_loops)
        step_hidden = []
        for t in range(loops):  # NOTE: a Python loop around the (compiled) blocks: T can change freely
            with torch.set_grad_enabled(torch.is_grad_enabled() and t >= no_graph):
                context = None if train_exits is None else train_exits.step_context(h, len(self.blocks))
                h = self.run_stack(inject(h), context)
                h_normed = self.final_norm(h)
                if self.spec.loop_state == "normed":
                    h = h_normed
                step_hidden.append(self.readout(h, h_normed))
                if train_exits is not None:
                    train_exits.after_step(t + 1, loops, h, step_hidden[-1], self)
        hidden = torch.stack(step_hidden)  # (T, B, S, D)
        gate_logits = self.exit_gate(hidden).squeeze(-1).permute(1, 2, 0)  # (B, S, T), one matmul for all steps
        return LMOutput(hidden=hidden, gate_logits=gate_logits, head=self.lm_head)

    def flops_per_token(self, seq_len: int, loops: int | None = None) -> int:
        """Forward FLOPs per token for `loops` steps, by structure: the prelude and the
        injection's input term once; per step the shared stack, the coda, the head, the gate
        and the injection's state term (concat: W_h h; training costs ~3x)."""
        loops = self.spec.loops if loops is None else loops
        block, d = self.block_flops_per_token(seq_len), self.spec.d_model
        once = self.spec.prelude_layers * block + (2 * d * d if self.spec.injection in ("concat", "stable") else 0)
        step = ((self.spec.n_layers + self.spec.coda_layers) * block + self.head_flops_per_token() + 2 * d
                + (2 * d * d if self.spec.injection == "concat" else 0))
        return once + loops * step

    def flops_per_loop(self, seq_len: int) -> int:
        """What one more loop step costs (the frontier's FLOPs per loop)."""
        return self.flops_per_token(seq_len, loops=2) - self.flops_per_token(seq_len, loops=1)
