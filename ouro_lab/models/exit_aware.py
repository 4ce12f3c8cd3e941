"""Exit-aware training: the training forward of a looped LM in which tokens exit at sampled or
gate-chosen steps, and later tokens read what an exited token leaves behind, as they do in
skip semantics (models/decoding.py), so the model learns to work with exited context.

Each token's own trajectory still runs all T steps, so every step's LM-head loss (and the
Stage I objective over the exit distribution) is defined as before; what changes is what the
*other* tokens read from it after its exit e: at every later (step, layer) its keys/values
are replaced by the `exited_kv` rule's (`decoding.EXITED_KV`: frozen at step e, that layer's
projections of its exit state, or its step-1 ones). A token reads its own fresh keys/values,
so its state at a step t > e is exactly its skip-semantics state had it run on to t while the
tokens before it exited where they did (causal attention: nothing after it matters), and its
state at its own exit step is exactly skip semantics' (tests/test_exit_aware.py checks both
against `decoding.forward_chunk`). Gradients flow through the replaced keys/values into the
computation of the exit step, which is how the model learns what exited tokens should leave.

Dense, not packed: every token is computed at every step (training saves no FLOPs; it costs
the bookkeeping and, where tokens have exited, attention over twice the keys).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ouro_lab import exits
from ouro_lab.models.decoding import EXITED_KV

HOW = ("none", "sampled", "q")  # train.exit_aware: how training picks each token's exit step


class TrainExits:
    """One batch's exits, for `LoopedLM.forward(..., train_exits=)`: `how` sampled (exit at step t
    with the gate's hazard lambda_t: a draw from the token's exit distribution), q (where the
    gate's CDF reaches `q`, Q-exit) or given (`steps` (B, S), 1..T; T = never exits: tests,
    oracles). The gate is read detached: choosing exits trains nothing. After the forward,
    `exit_steps` (B, S) holds each token's exit step (T for none)."""

    def __init__(self, how: str, exited_kv: str = "frozen", q: float = 0.5, steps: torch.Tensor | None = None):
        if how not in ("sampled", "q", "given") or exited_kv not in EXITED_KV:
            raise ValueError(f"exits: how must be sampled | q | given and exited_kv one of {EXITED_KV}, "
                             f"got {how!r}, {exited_kv!r}")
        if (how == "given") != (steps is not None):
            raise ValueError("exits: steps are given exactly when how='given'")
        self.how, self.exited_kv, self.q, self.given = how, exited_kv, q, steps
        self.exit_steps = self.active = self.survival = None
        self.k_x = self.v_x = None  # per layer (B, H, S, Dh): what exited tokens offer later steps
        self.first = None  # (exited_kv=first) step 1's keys/values per layer
        self.current: _StepContext | None = None

    def step_context(self, h: torch.Tensor, layers: int) -> _StepContext:
        """The `kv` of the coming loop step's blocks (h (B, S, D) its input)."""
        B, S, _ = h.shape
        if self.active is None:
            self.active = torch.ones(B, S, dtype=torch.bool, device=h.device)
            self.survival = torch.ones(B, S, dtype=torch.float64, device=h.device)
        self.current = _StepContext(~self.active, self.k_x, self.v_x, layers)
        return self.current

    def after_step(self, t: int, loops: int, state: torch.Tensor, readout: torch.Tensor, model) -> None:
        """Loop step t (1-based) of `loops` has run: decide which tokens exit at t and record what
        they leave behind. state (B, S, D): the next step's input (the exit state); readout: what
        the gate reads."""
        step = self.current
        keys, values = step.k, step.v
        step.k, step.v = [None] * len(keys), [None] * len(values)  # (held no longer; a recompute writes anew)
        if t == 1 and self.exited_kv == "first":
            self.first = (keys, values)
        if self.exit_steps is None:
            self.exit_steps = torch.full(state.shape[:2], loops, dtype=torch.long, device=state.device)
        if t >= loops:
            return
        with torch.no_grad():
            if self.how == "given":
                fires = self.given == t
            else:
                g = model.exit_gate(readout.detach()).squeeze(-1)  # (B, S)
                if self.how == "q":
                    self.survival, cdf = exits.cdf_step(self.survival, g)
                    fires = exits.q_reached(cdf, self.q) & (self.q < 1.0)  # (q >= 1: full depth, as in decoding)
                else:
                    fires = torch.bernoulli(torch.sigmoid(g.float())).bool()
            fires &= self.active
        if not bool(fires.any()):
            return
        self.exit_steps[fires] = t
        self.active = self.active & ~fires
        layers = len(keys)
        if self.exited_kv == "frozen":
            k_new, v_new = keys, values
        elif self.exited_kv == "first":
            k_new, v_new = self.first
        else:  # propagate: every layer's projections of the exit state
            B, S, D = state.shape
            positions = torch.arange(S, device=state.device).repeat(B)
            k_new, v_new = [], []
            for block in model.blocks:
                k, v = block.attn.keys_values(block.norm1(state).reshape(B * S, D), positions)  # (B S, H, Dh)
                k_new.append(k.view(B, S, *k.shape[1:]).transpose(1, 2))
                v_new.append(v.view(B, S, *v.shape[1:]).transpose(1, 2))
        where = fires[:, None, :, None]  # (B, 1, S, 1)
        old_k = self.k_x or [None] * layers
        old_v = self.v_x or [None] * layers
        self.k_x = [torch.where(where, k_new[i], old_k[i] if old_k[i] is not None else k_new[i]) for i in range(layers)]
        self.v_x = [torch.where(where, v_new[i], old_v[i] if old_v[i] is not None else v_new[i]) for i in range(layers)]


class _StepContext:
    """One loop step's attention contexts: `layer(i)` is block i's `kv` (a fresh object per
    layer, so recomputation under activation checkpointing reads the right layer)."""

    def __init__(self, exited: torch.Tensor, k_x, v_x, layers: int):
        self.exited, self.k_x, self.v_x = exited, k_x, v_x
        self.k, self.v = [None] * layers, [None] * layers  # this step's keys/values, per layer

    def layer(self, index: int) -> _LayerContext:
        return _LayerContext(self, index)


class _LayerContext:
    """`kv` of `Block.forward` in exit-aware training: plain causal attention until a token has
    exited; then each query reads the exited tokens' replacement keys/values, and its own
    fresh ones (keys [replaced; own], the own block visible on the diagonal only)."""

    positions = None

    def __init__(self, step: _StepContext, index: int):
        self.step, self.index = step, index

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v (B, H, S, Dh) -> (B, S, H, Dh)."""
        step, i = self.step, self.index
        step.k[i], step.v[i] = k, v
        if step.k_x is None:  # nobody has exited yet
            return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
        exited = step.exited  # (B, S): exited before this step
        where = exited[:, None, :, None]
        keys = torch.cat([torch.where(where, step.k_x[i], k), k], dim=2)  # (B, H, 2S, Dh)
        values = torch.cat([torch.where(where, step.v_x[i], v), v], dim=2)
        S = q.shape[2]
        causal = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
        diagonal = torch.eye(S, dtype=torch.bool, device=q.device)
        own_fresh = diagonal & exited[:, :, None]  # (B, S, S): an exited query's own key is its fresh one
        mask = torch.cat([causal & ~own_fresh, own_fresh], dim=-1)[:, None]  # (B, 1, S, 2S)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask).transpose(1, 2)
