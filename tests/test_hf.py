"""Released Ouro checkpoints (Hugging Face layout): the test writes small ones itself (no
network here) and checks the loaded LoopedLM against an independent forward pass written
from the published architecture (modeling_ouro.py: sandwich norms, rotate-half RoPE at
rope_theta, final norm inside the loop)."""

from __future__ import annotations

import json
import math
import shutil

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ouro_lab import cli
from ouro_lab.analysis import load_study
from ouro_lab.checkpoints import import_hf, load_checkpoint
from ouro_lab.evaluate import evaluate_checkpoint
from ouro_lab.models.hf import HFImportError

D, HEADS, LAYERS, FF, LOOPS, VOCAB = 16, 2, 2, 24, 3, 256  # vocabulary = the text task's bytes
THETA, EPS = 5e5, 1e-5


def hf_config(**changes) -> dict:
    return {"model_type": "ouro", "architectures": ["OuroForCausalLM"], "hidden_size": D, "intermediate_size": FF,
            "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": HEADS,
            "total_ut_steps": LOOPS, "rope_theta": THETA, "rms_norm_eps": EPS, "vocab_size": VOCAB,
            "max_position_embeddings": 4096, "tie_word_embeddings": False, "hidden_act": "silu",
            "rope_scaling": None, **changes}


def hf_tensors(seed: int = 0, vocab: int = VOCAB) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape, s=0.2: torch.randn(*shape, generator=g) * s  # noqa: E731
    t = {"model.embed_tokens.weight": r(vocab, D, s=1.0), "model.norm.weight": 1 + r(D),
         "model.early_exit_gate.weight": r(1, D, s=1.0), "model.early_exit_gate.bias": r(1), "lm_head.weight": r(vocab, D)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            t[p + f"self_attn.{name}.weight"] = r(D, D)
        t[p + "mlp.gate_proj.weight"], t[p + "mlp.up_proj.weight"], t[p + "mlp.down_proj.weight"] = r(FF, D), r(FF, D), r(D, FF)
        for name in ("input_layernorm", "input_layernorm_2", "post_attention_layernorm", "post_attention_layernorm_2"):
            t[p + f"{name}.weight"] = 1 + r(D)
    return t


def write_hf(folder, tensors=None, **config_changes):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf_config(**config_changes)))
    save_file(tensors if tensors is not None else hf_tensors(), str(folder / "model.safetensors"))
    return folder


def reference_forward(t: dict[str, torch.Tensor], idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ouro's forward from the published code, by hand: per-step logits (T, B, S, V) and gate
    logits (T, B, S)."""
    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS))

    B, S = idx.shape
    hd = D // HEADS
    inv_freq = 1.0 / THETA ** (torch.arange(0, hd, 2).float() / hd)
    freqs = torch.outer(torch.arange(S).float(), inv_freq)
    emb = torch.cat((freqs, freqs), -1)  # HF Llama-style: cat(freqs, freqs), rotate_half pairs (i, i + hd/2)
    cos, sin = emb.cos(), emb.sin()

    def rotate_half(x):
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return torch.cat((-x2, x1), -1)

    h = t["model.embed_tokens.weight"][idx]
    logits, gates = [], []
    for _ in range(LOOPS):
        for i in range(LAYERS):
            p = f"model.layers.{i}."
            x = rms(h, t[p + "input_layernorm.weight"])
            q, k, v = (F.linear(x, t[p + f"self_attn.{n}_proj.weight"]).view(B, S, HEADS, hd).transpose(1, 2) for n in "qkv")
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
            scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
            scores = scores.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
            a = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, S, D)
            h = h + rms(F.linear(a, t[p + "self_attn.o_proj.weight"]), t[p + "input_layernorm_2.weight"])
            x = rms(h, t[p + "post_attention_layernorm.weight"])
            m = F.linear(F.silu(F.linear(x, t[p + "mlp.gate_proj.weight"])) * F.linear(x, t[p + "mlp.up_proj.weight"]),
                         t[p + "mlp.down_proj.weight"])
            h = h + rms(m, t[p + "post_attention_layernorm_2.weight"])
        h = rms(h, t["model.norm.weight"])  # the final norm inside the loop; its output is the next input
        logits.append(F.linear(h, t["lm_head.weight"]))
        gates.append(F.linear(h, t["model.early_exit_gate.weight"], t["model.early_exit_gate.bias"]).squeeze(-1))
    return torch.stack(logits), torch.stack(gates)


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    words = "loops exit gate token prior entropy depth cache".split()
    for i in range(40):  # 1 of them val, 2 test (by a hash of the text)
        (root / f"doc{i}.txt").write_text(f"doc {i}: " + " ".join(words[(i * j) % len(words)] for j in range(400)))
    return f"data.text.paths={root}/*.txt"


def overrides(corpus, tmp_path):
    return [corpus, f"data.text.cache_dir={tmp_path / 'cache'}", "data.text.context=32", "data.n_val=16",
            "data.n_test=16", "data.eval_batch_size=8"]


def test_loaded_checkpoint_reproduces_the_reference_forward(tmp_path, corpus):
    folder = write_hf(tmp_path / "ouro")
    cfg, ckpt = import_hf(folder, tmp_path / "ouro.ckpt", overrides(corpus, tmp_path))
    assert (cfg.model.rope_layout, cfg.model.rope_base, cfg.model.norm_eps, cfg.model.loops) == ("rotate_half", THETA, EPS, LOOPS)
    _, module = load_checkpoint(ckpt)
    idx = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = module.model(idx)
    ref_logits, ref_gates = reference_forward(hf_tensors(), idx)
    assert torch.allclose(out.logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert torch.allclose(out.gate_logits.permute(2, 0, 1), ref_gates, atol=1e-4)
    # the interleaved layout reads the same weights as a different function
    _, wrong = load_checkpoint(ckpt)
    wrong.model.blocks[0].attn.rope.layout = "interleaved"
    with torch.no_grad():
        assert not torch.allclose(wrong.model(idx).logits, ref_logits, atol=1e-2)
    assert torch.load(ckpt, weights_only=False)["ouro_source"]["folder"] == str(folder.resolve())


def test_evaluation_and_generation_run_on_the_imported_model(tmp_path, corpus, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # evaluations log into the working folder's store
    folder = write_hf(tmp_path / "ouro")
    ckpt = tmp_path / "ouro.ckpt"
    assert cli.main(["import-hf", str(folder), str(ckpt), *overrides(corpus, tmp_path)]) == 0
    result = evaluate_checkpoint(ckpt, ["infer.exit_rule=q", "infer.exit_threshold=0.5"], log=True)
    assert {f"test/bpb_step{t}" for t in range(1, LOOPS + 1)} <= set(result.metrics)
    assert "test/skip_bpb" in result.metrics and result.run_id
    assert cli.main(["generate", str(ckpt), "infer.prompt=loops exit", "infer.max_new_tokens=5"]) == 0
    assert "loops exit\u2588" in capsys.readouterr().out


def test_report_works_on_the_imported_model(tmp_path, corpus, capsys, monkeypatch):
    """An imported checkpoint has no training run: `ouro-lab report` reads its `ouro-lab eval` runs
    (the latest per checkpoint for the per-step sections, every one for the skip table)."""
    monkeypatch.chdir(tmp_path)  # evaluations log into the working folder's store
    from mlflow.tracking import MlflowClient

    folder = write_hf(tmp_path / "ouro")
    ckpt = tmp_path / "ouro.ckpt"
    assert cli.main(["import-hf", str(folder), str(ckpt), *overrides(corpus, tmp_path), "eval.extra_loops=2"]) == 0
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = evaluate_checkpoint(ckpt, ["infer.exit_rule=q", "infer.exit_threshold=0.3"], log=True)
    last = evaluate_checkpoint(ckpt, ["infer.exit_rule=q", "infer.exit_threshold=0.7"], log=True)
    experiment = MlflowClient(store).get_run(last.run_id).info.experiment_id
    assert cli.main(["report", experiment, "--store", store, "--runs", "train", "--no-log"]) == 2
    err = capsys.readouterr().err
    assert "has no finished runs yet" in err and "holds 2 `ouro-lab eval` runs: --runs eval reports on them" in err
    out = tmp_path / "report"
    assert cli.main(["report", experiment, "--store", store, "--out", str(out), "--no-log"]) == 0
    assert "1 complete `ouro-lab eval` runs analysed" in capsys.readouterr().out
    report = (out / "report.md").read_text()
    assert "Unit runs: `ouro-lab eval` runs" in report and "## Metric vs evaluation loop step t" in report
    # the per-step curve is the latest evaluation's own numbers, out to T + extra loops
    steps = pd.read_csv(out / "steps.csv")
    curve = steps[steps["difficulty"] == "all"].set_index("step")["bpb"]
    assert list(curve.index) == list(range(1, LOOPS + 3))
    assert curve.to_dict() == pytest.approx({t: last.metrics[f"test/bpb_step{t}"] for t in curve.index})
    # both evaluations in the skip table, with their thresholds and their own numbers
    skip = pd.read_csv(out / "skip.csv").set_index("threshold")
    assert sorted(skip.index) == [0.3, 0.7] and set(skip["evaluated"]) == {"ouro.ckpt"}
    assert skip.loc[0.3, "skip_loops"] == pytest.approx(first.metrics["test/skip_loops"])
    assert skip.loc[0.3, "skip_loops"] <= skip.loc[0.7, "skip_loops"]
    assert "## Early exit that skips compute" in report and (out / "vs_step.png").exists()
    data = load_study(experiment, store)  # the evaluation logged the model's facts, as a training run does
    assert data.source == "eval" and data.runs["n_params"].tolist() == [load_checkpoint(ckpt)[1].model.num_params()]
    assert math.isnan(data.runs["train_flops"].iloc[0])  # (what trained it is not in this experiment)


@pytest.mark.parametrize("change,message", [
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), "'model.layers.1.mlp.up_proj.weight' is missing"),
    (lambda t: t.__setitem__("model.layers.0.self_attn.k_proj.weight", torch.zeros(D, D + 2)),
     "'model.layers.0.self_attn.k_proj.weight' has shape \\(16, 18\\); config.json implies \\(16, 16\\)"),
    (lambda t: t.__setitem__("model.layers.0.self_attn.q_proj.bias", torch.zeros(D)), "cannot place.*q_proj.bias"),
])
def test_bad_tensors_are_named(tmp_path, corpus, change, message):
    tensors = hf_tensors()
    change(tensors)
    folder = write_hf(tmp_path / "ouro", tensors)
    with pytest.raises(HFImportError, match=message):
        import_hf(folder, tmp_path / "x.ckpt", overrides(corpus, tmp_path))


@pytest.mark.parametrize("changes,message", [
    ({"num_key_value_heads": 1}, "grouped-query attention is not supported"),
    ({"vocab_size": 49152}, "vocab_size 49152, but data.task=text has a vocabulary of 256 tokens. A model is "
                            "imported with the tokenizer.json of its folder"),
    ({"model_type": "llama"}, "model_type 'llama'"),
])
def test_unrepresentable_configs_are_refused(tmp_path, corpus, changes, message, capsys):
    folder = write_hf(tmp_path / "ouro", **changes)
    assert cli.main(["import-hf", str(folder), str(tmp_path / "x.ckpt"), *overrides(corpus, tmp_path)]) == 2
    assert message in capsys.readouterr().err


def write_tokenizer(folder, vocab_size: int = 49152) -> None:
    """A byte-level BPE tokenizer.json of the released models' size (49152 tokens: the byte
    alphabet, a few merges, unreachable fillers) and the eos_token in tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    merges = [("l", "o"), ("lo", "o"), ("loo", "p"), ("\u0120", "e"), ("\u0120e", "x")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    while len(vocab) < vocab_size:
        vocab[f"fill{len(vocab)}"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "bos_token": None}))


def test_a_49152_token_model_imports_with_its_tokenizer_evaluates_and_generates(tmp_path, capsys, monkeypatch):
    """The released models' vocabulary: imported with the folder's tokenizer (data.task=lm), from
    bf16 weights; per-step logits equal the reference forward; evaluated on text in bits per
    byte past T; generation prints text and each token's exit step."""
    from ouro_lab.data import lm

    monkeypatch.chdir(tmp_path)
    vocab = 49152
    tensors = {k: v.to(torch.bfloat16) for k, v in hf_tensors(vocab=vocab).items()}
    folder = write_hf(tmp_path / "ouro", tensors, vocab_size=vocab)
    write_tokenizer(folder, vocab)
    ckpt = tmp_path / "ouro.ckpt"
    cache = f"data.lm.cache_dir={tmp_path / 'cache'}"
    assert cli.main(["import-hf", str(folder), str(ckpt), "data.lm.context=32", cache, "data.n_val=16",
                     "data.n_test=16", "data.eval_batch_size=8", "eval.extra_loops=2"]) == 0
    assert "looped 2 layers x 3 loops" in capsys.readouterr().out
    shutil.rmtree(folder)  # the tokenizer travels inside the checkpoint
    cfg, module = load_checkpoint(ckpt)
    assert cfg.data.task == "lm" and module.task.vocab_size == vocab and module.task.tokenizer.eod == 0
    idx = torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = module.model(idx)
    ref_logits, _ = reference_forward({k: v.float() for k, v in tensors.items()}, idx)
    assert torch.allclose(out.logits, ref_logits, atol=1e-4, rtol=1e-4)
    # evaluation on a corpus given at eval time: bits per byte at every step, past T
    root = tmp_path / "corpus"
    root.mkdir()
    words = "loops exit gate token prior entropy depth cache".split()
    for i in range(200):
        (root / f"doc{i}.txt").write_text(f"doc {i}: " + " ".join(words[(i * j + i) % len(words)] for j in range(60)))
    source = f"data.lm.source={root}/*.txt"
    result = evaluate_checkpoint(ckpt, [source, cache, "infer.exit_rule=q", "infer.exit_threshold=0.5"], "test")
    assert {f"test/bpb_step{t}" for t in range(1, LOOPS + 3)} <= set(result.metrics)
    assert "test/skip_bpb" in result.metrics and "test/exit_q0.5_bpb" in result.metrics
    # bits per byte = loss per token x tokens per byte / ln 2 (here ~1 token per byte: few merges)
    split = lm.prepare(f"{root}/*.txt", "text", cfg.data.lm.tokenizer, str(tmp_path / "cache")).meta["splits"]["test"]
    assert split["tokens"] > split["bytes"] * 0.8
    assert cli.main(["eval", str(ckpt), source, cache, "--no-log"]) == 0
    assert "bpb" in capsys.readouterr().out
    assert cli.main(["generate", str(ckpt), "infer.prompt=loops exit", "infer.max_new_tokens=3",
                     "infer.show_exits=true"]) == 0
    printed = capsys.readouterr().out
    assert "loops exit\u2588" in printed and "exit step per token: " in printed
