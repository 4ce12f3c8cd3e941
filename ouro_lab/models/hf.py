"""Released Ouro checkpoints in the Hugging Face layout -> `LoopedLM` weights.

A folder with `config.json` (Ouro fields: hidden_size, intermediate_size, num_hidden_layers,
num_attention_heads, num_key_value_heads, total_ut_steps, rope_theta, rms_norm_eps,
vocab_size, tie_word_embeddings) and `model.safetensors` (ByteDance/Ouro-1.4B and -2.6B;
`modeling_ouro.py`). The architecture is ours (docs/concepts/method.md "Looped model"): sandwich RMSNorms,
rotate-half RoPE at `rope_theta`, SwiGLU, no biases, the final norm inside the loop and its
output the next loop's input, a `Linear(d, 1)` exit gate on the normed state. Every tensor is
mapped by name; what the model cannot represent is refused with the reason.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

# ouro-lab name <- Hugging Face name(s); several are concatenated along dim 0 (qkv, gate_up)
GLOBAL_TENSORS = {
    "tok_emb.weight": ["model.embed_tokens.weight"],
    "final_norm.weight": ["model.norm.weight"],
    "exit_gate.weight": ["model.early_exit_gate.weight"],
    "exit_gate.bias": ["model.early_exit_gate.bias"],
    "lm_head.weight": ["lm_head.weight"],
}
LAYER_TENSORS = {  # per layer i: blocks.{i}.<ours> <- model.layers.{i}.<theirs>
    "norm1.weight": ["input_layernorm.weight"],  # before attention
    "norm2.weight": ["input_layernorm_2.weight"],  # on the attention output, before the residual add
    "norm3.weight": ["post_attention_layernorm.weight"],  # before the MLP
    "norm4.weight": ["post_attention_layernorm_2.weight"],  # on the MLP output, before the residual add
    "attn.qkv.weight": ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"],
    "attn.out.weight": ["self_attn.o_proj.weight"],
    "mlp.gate_up.weight": ["mlp.gate_proj.weight", "mlp.up_proj.weight"],
    "mlp.down.weight": ["mlp.down_proj.weight"],
}


class HFImportError(ValueError):
    """A Hugging Face checkpoint ouro-lab cannot load as it is; the message names the file,
    field or tensor."""


def read_hf_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise HFImportError(f"{folder}: no config.json (a Hugging Face model folder has config.json and model.safetensors)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise HFImportError(f"{path}: not valid JSON: {err}") from None


def model_overrides(hf: dict, where: str = "config.json") -> list[str]:
    """The ouro-lab `model.*` overrides that describe the network of an Ouro config.json;
    HFImportError for what LoopedLM cannot represent."""
    need = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [k for k in need if k not in hf]
    if missing:
        raise HFImportError(f"{where}: missing field(s) {', '.join(missing)}; is this an Ouro (or Llama-style) config?")
    if hf.get("model_type", "ouro") != "ouro":
        raise HFImportError(f"{where}: model_type {hf['model_type']!r}; this loader reads Ouro checkpoints (model_type 'ouro')")
    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    kv_heads = hf.get("num_key_value_heads") or heads  # absent or null: multi-head
    problems = []
    if kv_heads != heads:
        problems.append(f"num_key_value_heads={kv_heads} != num_attention_heads={heads}: grouped-query attention "
                        "is not supported (ouro-lab's attention is multi-head; the released Ouro models use MHA)")
    if hf.get("head_dim", d // heads) != d // heads:
        problems.append(f"head_dim={hf['head_dim']} != hidden_size / num_attention_heads = {d // heads}")
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf['hidden_act']!r}: only SwiGLU with silu is supported")
    if hf.get("rope_scaling"):
        problems.append(f"rope_scaling={hf['rope_scaling']}: scaled RoPE is not supported")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        problems.append("attention_bias / mlp_bias: ouro-lab's blocks have no biases")
    if hf.get("use_sliding_window") or "sliding_attention" in (hf.get("layer_types") or []):
        problems.append("sliding-window attention (use_sliding_window / layer_types) is not supported")
    if problems:
        raise HFImportError(f"{where}: cannot be represented: " + "; ".join(problems))
    return [
        "model.arch=looped", f"model.d_model={d}", f"model.n_heads={heads}", f"model.n_layers={hf['num_hidden_layers']}",
        f"model.loops={hf.get('total_ut_steps', 4)}", f"model.d_ff={hf['intermediate_size']}",
        f"model.tie_embeddings={str(bool(hf.get('tie_word_embeddings', False))).lower()}", "model.positions=rope",
        "model.rope_layout=rotate_half", f"model.rope_base={float(hf.get('rope_theta', 10000.0))}",
        f"model.norm_eps={float(hf.get('rms_norm_eps', 1e-6))}", "model.loop_state=normed",
    ]


def map_state_dict(tensors: dict[str, torch.Tensor], model: torch.nn.Module, where: str = "model.safetensors") -> dict:
    """The HF tensors as `model`'s state dict (every tensor mapped by name, shapes checked);
    HFImportError naming a missing, misshapen or unknown tensor."""
    n_layers = len(model.blocks)
    tied = model.lm_head.weight is model.tok_emb.weight
    targets = dict(GLOBAL_TENSORS)
    targets |= {f"blocks.{i}.{ours}": [f"model.layers.{i}.{t}" for t in theirs]
                for i in range(n_layers) for ours, theirs in LAYER_TENSORS.items()}
    if tied:
        targets.pop("lm_head.weight")
    ours_shapes = {k: v.shape for k, v in model.state_dict().items()}
    state, used = {}, set()
    for ours, theirs in targets.items():
        absent = [t for t in theirs if t not in tensors]
        if absent:
            raise HFImportError(f"{where}: tensor {absent[0]!r} is missing (needed for {ours})")
        shape = ours_shapes[ours]
        part = (shape[0] // len(theirs), *shape[1:])  # q, k, v (gate, up) are equal row blocks of ours
        for t in theirs:
            if tuple(tensors[t].shape) != part:
                raise HFImportError(f"{where}: tensor {t!r} has shape {tuple(tensors[t].shape)}; config.json "
                                    f"implies {part} (for {ours})")
        state[ours] = (torch.cat([tensors[t] for t in theirs]) if len(theirs) > 1 else tensors[theirs[0]]).float()
        used.update(theirs)
    if tied:
        state["lm_head.weight"] = state["tok_emb.weight"]
        used.add("lm_head.weight")
    unknown = sorted(set(tensors) - used - {"model.rotary_emb.inv_freq"})
    if unknown:
        raise HFImportError(f"{where}: {len(unknown)} tensor(s) ouro-lab cannot place, e.g. {unknown[:3]} "
                            "(biases, extra layers or another architecture)")
    return state


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = sorted(folder.glob("model*.safetensors"))
    if not files:
        raise HFImportError(f"{folder}: no model.safetensors (or model-0000x-of-0000y.safetensors shards)")
    tensors = {}
    for f in files:
        try:
            tensors |= load_file(f)
        except (SafetensorError, OSError) as err:
            raise HFImportError(f"{f}: not a readable safetensors file: {err}") from None
    return tensors


def source_record(folder: Path, hf: dict) -> dict:
    """Where an imported model came from: the folder, its config and weight files' SHA-256."""
    def digest(path: Path) -> str:
        h = hashlib.sha256()
        with path.open("rb") as f:  # streamed: released weights are gigabytes
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
        return h.hexdigest()

    return {"folder": str(folder.resolve()), "config_sha256": digest(folder / "config.json"),
            "weights_sha256": {f.name: digest(f) for f in sorted(folder.glob("model*.safetensors"))},
            "model_type": hf.get("model_type", "unknown"), "architectures": hf.get("architectures", [])}
