"""`data.task=lm`: a real corpus through a tokenizer trained in the test, the tokenized cache,
document splits, bits per byte by bytes covered, and a tiny model trained on it end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ouro_lab.data import lm

WORDS = "loops exit gate token prior entropy depth cache héllo 日本 naïve".split()


def write_corpus(root: Path, n_files: int = 100, n_lines: int = 300) -> str:
    """Text files (one document each) and a jsonl file (one per line), with non-ASCII words."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        (root / f"d{i}.txt").write_text(" ".join(WORDS[(i * j + j) % len(WORDS)] for j in range(300)))
    with (root / "more.jsonl").open("w") as f:
        for i in range(n_lines):
            f.write(json.dumps({"text": f"doc {i}: " + " ".join(WORDS[(i + 3 * j) % len(WORDS)] for j in range(100))}) + "\n")
    return f"{root}/*"


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus")


@pytest.fixture
def bpe(tmp_path, corpus):
    return str(lm.train_tokenizer(corpus, tmp_path / "tok" / "tokenizer.json", vocab_size=320, progress=False))


def test_a_bpe_tokenizer_trained_on_the_train_split_covers_every_byte(corpus, bpe, tmp_path):
    tok = lm.load_tokenizer(bpe)
    assert tok.vocab_size == 320 and tok.eod == 0 and tok.eod_token == "<|endoftext|>"
    text = "héllo 日本 <|endoftext|> naïve"
    ids = tok.encode_batch([text])[0]
    assert tok.decode(ids) == text and tok.eod not in ids  # a special token written in a text stays text
    # every split's tokens cover exactly its documents' UTF-8 bytes (the end-of-document tokens none)
    cache = lm.prepare(corpus, "text", bpe, str(tmp_path / "cache"), progress=False)
    docs = {s: [] for s in ("train", "val", "test")}
    for d in lm.documents(lm.source_files(corpus), "text"):
        docs[("train", "val", "test")[lm.split_of_document(d)]].append(d)
    for split, texts in docs.items():
        ids = np.asarray(cache.tokens(split))
        assert tok.token_bytes()[ids].sum() == sum(len(t.encode("utf-8")) for t in texts) > 0
        assert (ids == tok.eod).sum() == len(texts) == cache.meta["splits"][split]["documents"]
    assert cache.meta["splits"]["train"]["tokens"] < cache.meta["splits"]["train"]["bytes"] / 2  # BPE merged


def test_the_cache_is_reused_and_rebuilt_after_a_change(corpus, bpe, tmp_path):
    root = tmp_path / "cache"
    first = lm.prepare(corpus, "text", bpe, str(root), progress=False)
    built = (first.folder / "meta.json").stat().st_mtime_ns
    lm.prepare.cache_clear()
    again = lm.prepare(corpus, "text", bpe, str(root), progress=False)
    assert again.folder == first.folder and (again.folder / "meta.json").stat().st_mtime_ns == built  # reused
    (tmp_path / "corpus" / "d0.txt").write_text("a changed document " * 50)
    lm.prepare.cache_clear()
    changed = lm.prepare(corpus, "text", bpe, str(root), progress=False)
    assert changed.folder != first.folder
    lm.prepare.cache_clear()
    other_tokenizer = lm.prepare(corpus, "text", "bytes", str(root), progress=False)
    assert len({first.folder, changed.folder, other_tokenizer.folder}) == 3
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == sorted(
        p.name for p in (first.folder, changed.folder, other_tokenizer.folder))


def test_the_document_split_is_stable_when_a_file_is_added(corpus, tmp_path):
    def split_docs() -> dict[str, int]:
        return {d: lm.split_of_document(d) for d in lm.documents(lm.source_files(corpus), "text")}

    before = split_docs()
    (tmp_path / "corpus" / "new.jsonl").write_text("".join(json.dumps({"text": f"new {i} " * 30}) + "\n" for i in range(50)))
    after = split_docs()
    assert len(after) == len(before) + 50
    assert all(after[d] == s for d, s in before.items())
    assert set(after.values()) == {0, 1, 2}


def test_parquet_and_a_datasets_folder_give_the_same_splits_as_jsonl(tmp_path):
    """The same rows as .jsonl, .parquet (pyarrow) and a `datasets` save_to_disk folder (with a
    non-text column beside) tokenize to identical splits; a missing column is named."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [f"row {i}: " + " ".join(WORDS[(i * j + 1) % len(WORDS)] for j in range(60)) for i in range(200)]
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "rows.jsonl").write_text("".join(json.dumps({"body": r, "n": i}) + "\n" for i, r in enumerate(rows)))
    (tmp_path / "p").mkdir()
    pq.write_table(pa.table({"n": list(range(200)), "body": rows}), tmp_path / "p" / "rows.parquet", row_group_size=64)
    datasets.Dataset.from_dict({"n": list(range(200)), "body": rows}).save_to_disk(str(tmp_path / "ds"))
    caches = [lm.prepare(src, "body", "bytes", str(tmp_path / "cache"), progress=False)
              for src in (f"{tmp_path}/j/*.jsonl", f"{tmp_path}/p/*.parquet", str(tmp_path / "ds"))]
    for split in ("train", "val", "test"):
        first = np.asarray(caches[0].tokens(split))
        assert len(first) > 0 and caches[0].meta["splits"][split]["documents"] > 0
        for other in caches[1:]:
            np.testing.assert_array_equal(np.asarray(other.tokens(split)), first)
    assert sum(c["documents"] for c in caches[2].meta["splits"].values()) == 200
    for src in (f"{tmp_path}/p/*.parquet", str(tmp_path / "ds")):
        with pytest.raises(lm.CorpusError, match=r"no column 'text' \(columns: n, body; data.lm.text_field"):
            list(lm.documents(lm.source_files(src), "text"))


def test_bits_per_byte_divide_by_the_bytes_the_targets_cover(corpus, bpe):
    """LoopStepMetrics on hand-made losses: bpb = summed loss / ln 2 / bytes, per level too."""
    from ouro_lab.metrics import LoopStepMetrics

    tok = lm.load_tokenizer(bpe)
    targets = torch.tensor(tok.encode_batch(["héllo 日本 naïve loops exit"])[0])[None]  # (1, S)
    nbytes = torch.as_tensor(tok.token_bytes())[targets]
    assert int(nbytes.sum()) == len("héllo 日本 naïve loops exit".encode("utf-8"))
    S = targets.shape[1]
    losses = torch.linspace(0.5, 3.0, S)[None, None].repeat(2, 1, 1)  # (eval_loops=2, 1, S)
    losses[1] /= 2
    difficulty = torch.tensor([[1 if i < S // 2 else 2 for i in range(S)]])
    m = LoopStepMetrics(2, 2, 2, has_gate=False, bpb=True)
    m.update(losses, torch.zeros_like(losses, dtype=torch.bool), difficulty, None, nbytes)
    out = m.compute()
    for t in (1, 2):
        hand = float(losses[t - 1].sum()) / math.log(2) / int(nbytes.sum())
        assert float(out[f"bpb_step{t}"]) == pytest.approx(hand, rel=1e-6)
        first = difficulty[0] == 1
        hand_d1 = float(losses[t - 1, 0, first].sum()) / math.log(2) / int(nbytes[0, first].sum())
        assert float(out[f"bpb_step{t}_d1"]) == pytest.approx(hand_d1, rel=1e-6)
    assert float(out["loss_step1"]) == pytest.approx(float(losses[0].mean()), rel=1e-6)  # loss stays per token


def test_frequency_levels_hold_equal_token_mass(corpus, tmp_path):
    from ouro_lab.config import load_config
    from ouro_lab.data import build_task

    cfg = load_config(None, ["data.task=lm", f"data.lm.source={corpus}", "data.lm.context=32",
                             f"data.lm.cache_dir={tmp_path / 'cache'}"])
    task = build_task(cfg.data)
    counts = task.cache.token_counts
    mass = np.bincount(task.frequency_level, weights=counts, minlength=5)[1:] / counts.sum()
    assert mass[0] > 0 and np.all(np.diff(task.frequency_level[np.argsort(-counts, kind="stable")]) >= 0)
    assert task.frequency_level[counts == 0].tolist() == [4] * int((counts == 0).sum())  # unseen: the rarest
    batch = task.sample(np.random.default_rng(0), 8, "val")
    assert np.array_equal(batch.difficulty, task.frequency_level[batch.targets])
    assert np.array_equal(batch.tokens[:, 1:], batch.targets[:, :-1])


@pytest.mark.parametrize("tokenizer", ["bpe", "bytes"])
def test_a_tiny_looped_model_trains_on_the_corpus_and_reports_bits_per_byte(tokenizer, corpus, bpe, tiny_config,
                                                                             tmp_path, capsys, monkeypatch):
    from ouro_lab.cli import main
    from ouro_lab.evaluate import evaluate_checkpoint
    from ouro_lab.train import train

    spec = bpe if tokenizer == "bpe" else "bytes"
    cfg = tiny_config("data.task=lm", f"data.lm.source={corpus}", f"data.lm.tokenizer={spec}", "data.lm.context=32",
                      f"data.lm.cache_dir={tmp_path / 'cache'}", "train.lr=1e-2", "train.max_steps=30")
    result = train(cfg, verbose=False)
    bpb = [result.test[f"test/bpb_step{t}"] for t in (1, 2)]
    assert all(0 < b < 8 for b in bpb), result.test
    vocab = 320 if tokenizer == "bpe" else 256
    assert result.summary["n_params"] > 0 and result.test["test/loss_final"] < math.log(vocab)  # learnt something
    # bits per byte are per byte, not per token: loss per token / ln 2 x tokens per byte
    again = evaluate_checkpoint(Path(result.checkpoint), [], "test").metrics
    assert again["test/bpb_final"] == pytest.approx(result.test["test/bpb_final"], abs=1e-6)
    assert {"test/bpb_step1_d1", "test/bpb_step2_d4", "test/exit_q0.5_bpb"} <= set(again)
    monkeypatch.chdir(tmp_path)
    assert main(["generate", result.checkpoint, "infer.prompt=héllo 日本", "infer.max_new_tokens=4"]) == 0
    assert "héllo 日本\u2588" in capsys.readouterr().out
    # cached decoding's bits per byte count the bytes each decoded token covers, as eval does
    from ouro_lab.checkpoints import load_checkpoint
    from ouro_lab.inference import decode_table
    from ouro_lab.models.decoding import ExitRule
    from ouro_lab.builders import make_datamodule

    cfg, module = load_checkpoint(Path(result.checkpoint))
    tokens, targets, _ = make_datamodule(cfg, module.task).eval_set("test")[:4]
    windows = torch.cat([tokens, targets[:, -1:]], 1)
    row = decode_table(module.model, windows, 16, [ExitRule()], ("full",), progress=lambda *_: None,
                       token_bytes=module.task.token_bytes)[0]
    with torch.no_grad():
        logits = module.model(tokens).logits[-1][:, 16:]  # full depth, positions after the prefill
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets[:, 16:].reshape(-1),
                                            reduction="sum")
    covered = int(torch.as_tensor(module.task.token_bytes)[targets[:, 16:]].sum())
    assert row.bpb == pytest.approx(float(nll) / math.log(2) / covered, rel=1e-4)
    assert main(["decode", result.checkpoint, "infer.windows=2", "infer.prefill=24"]) == 0
    assert "| full | full depth |" in capsys.readouterr().out


def test_cli_trains_a_tokenizer_and_refuses_what_it_cannot_read(corpus, tmp_path, capsys):
    from ouro_lab.cli import main
    from ouro_lab.config import ConfigError, load_config

    out = tmp_path / "t" / "tokenizer.json"
    assert main(["tokenizer", corpus, str(out), "--vocab-size", "300"]) == 0
    assert f"data.lm.tokenizer={out}" in capsys.readouterr().out and lm.load_tokenizer(str(out)).vocab_size == 300
    assert main(["tokenizer", str(tmp_path / "none" / "*.txt"), str(out)]) == 2
    assert "matches no files" in capsys.readouterr().err
    (tmp_path / "corpus" / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 40)
    base = ["data.task=lm", f"data.lm.source={corpus}", "data.lm.context=32", f"data.lm.cache_dir={tmp_path / 'c'}"]
    with pytest.raises(ConfigError, match=r"data.lm.source: .*latin1.txt is not UTF-8 text .*data.lm.decode_errors=replace"):
        load_config(None, base)
    load_config(None, [*base, "data.lm.decode_errors=skip"])  # left out: valid
    with pytest.raises(ConfigError, match="data.lm.tokenizer: tokenizer 'nope.json': no such tokenizer.json"):
        load_config(None, [*base, "data.lm.decode_errors=skip", "data.lm.tokenizer=nope.json"])


# --- multiple-choice benchmarks per loop step (ouro_lab/choice.py) --------------------------

def test_choice_scores_equal_hand_computed_log_likelihoods(tmp_path, capsys):
    """Batched, padded scoring = one unpadded forward per choice by hand, at every loop step;
    acc and acc_norm (per character) from those; the CLI prints and logs them."""
    from ouro_lab import choice
    from ouro_lab.cli import main
    from ouro_lab.config import load_config
    from ouro_lab.builders import build_module

    torch.manual_seed(0)
    cfg = load_config(None, ["data.task=lm", "data.lm.context=48", "model.d_model=32", "model.n_heads=2",
                             "model.n_layers=1", "model.loops=3", "eval.extra_loops=1"])  # no corpus: not needed
    module = build_module(cfg).eval()
    rows = [{"context": "The cat sat on the", "choices": [" mat", " moon rock", " é"], "gold": 0},
            {"context": "Loops exit when", "choices": [" done", " the gate says so"], "label": 1}]
    path = tmp_path / "toy.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    questions = choice.read_task(path)
    got = choice.choice_loglikelihoods(module, questions, batch_size=2)  # pads within each batch
    hand = []
    for q in questions:
        for c in q.choices:
            ctx, cont = list((q.context).encode()), list(c.encode())
            seq = torch.tensor([ctx + cont])
            with torch.no_grad():
                out = module.run(seq[:, :-1], loops=module.eval_loops)
            hand.append([sum(float(torch.log_softmax(out.head(h)[0, len(ctx) - 1 + i], -1)[tok])
                             for i, tok in enumerate(cont)) for h in out.hidden])
    hand = torch.tensor(hand)  # (choices, eval_loops=4)
    assert got["loglik"].shape == (5, 4) and torch.allclose(got["loglik"].float(), hand, atol=1e-4)
    scores = choice.score_task(module, questions, batch_size=2)
    for t in range(1, 5):
        ll = hand[:, t - 1]
        acc = ((int(ll[:3].argmax()) == 0) + (int(ll[3:].argmax()) == 1)) / 2
        chars = torch.tensor([4, 10, 2, 5, 17], dtype=torch.float64)
        norm = ll.double() / chars
        acc_norm = ((int(norm[:3].argmax()) == 0) + (int(norm[3:].argmax()) == 1)) / 2
        assert (scores[f"acc_step{t}"], scores[f"acc_norm_step{t}"]) == (acc, acc_norm)
    assert scores["chance"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    # under an exit rule: each token read at its own step (here conf at 0: every token exits at step 1)
    from ouro_lab.models.decoding import ExitRule

    ruled = choice.score_task(module, questions, ExitRule("conf", 1e-9), batch_size=2)
    assert ruled["loops_rule"] == 1 and (ruled["acc_rule"], ruled["acc_norm_rule"]) == (scores["acc_step1"],
                                                                                        scores["acc_norm_step1"])
    # bad files are named with the line
    (tmp_path / "bad.jsonl").write_text(json.dumps({"context": "x", "choices": ["a", "b"], "gold": 2}) + "\n")
    with pytest.raises(Exception, match="bad.jsonl:1: \"gold\" must be the index"):
        choice.read_task(tmp_path / "bad.jsonl")


def test_bench_cli_on_a_trained_checkpoint(corpus, tiny_config, tmp_path, capsys, monkeypatch):
    from ouro_lab.cli import main
    from ouro_lab.train import train

    result = train(tiny_config("data.task=lm", f"data.lm.source={corpus}", "data.lm.context=32",
                               f"data.lm.cache_dir={tmp_path / 'cache'}", "train.max_steps=10", "train.val_every=10",
                               "eval.test=false"), verbose=False)
    path = tmp_path / "toy.jsonl"
    path.write_text(json.dumps({"context": "loops exit", "choices": [" gate", " zzzz"], "gold": 0}) + "\n")
    monkeypatch.chdir(tmp_path)
    assert main(["bench", result.checkpoint, str(path), "infer.exit_rule=q", "infer.exit_threshold=0.5"]) == 0
    out = capsys.readouterr().out
    assert "toy: 1 questions, chance 0.500" in out and "(past T)" in out and "q=0.5: acc" in out
    assert f"in sqlite:///{tmp_path / 'mlflow.db'}" in out
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    bench = [r for r in client.search_runs([client.get_experiment_by_name("test").experiment_id])
             if r.data.tags.get("ouro.role") == "bench"][0]
    assert "bench/toy/acc_step4" in bench.data.metrics
    # the report of the experiment shows it: accuracy vs loop step
    from ouro_lab import analysis

    data = analysis.load_study("test", str(tmp_path / "mlflow.db"))
    assert len(data.runs) == 1 and sorted(data.bench["step"]) == [0, 1, 2, 3, 4]  # (0 = under the exit rule)
    report = analysis.write_report(data, tmp_path / "report", n_boot=20, log=False)
    assert "**accuracy on toy vs loop step** (chance 0.500)" in report.markdown
    assert (tmp_path / "report" / "bench.png").exists() and (tmp_path / "report" / "bench.csv").exists()
    assert main(["bench", result.checkpoint, str(tmp_path / "none.jsonl"), "--no-log"]) == 2
    assert "benchmark file not found" in capsys.readouterr().err
    # an experiment of bench runs only (as an imported model's is) still gets its report
    assert main(["bench", result.checkpoint, str(path), "tracking.experiment=imported"]) == 0
    capsys.readouterr()
    assert main(["report", "imported", "--out", str(tmp_path / "imported")]) == 0
    out = capsys.readouterr().out
    assert "benchmark runs only (1)" in out and "acc by loop step" in out
    text = (tmp_path / "imported" / "report.md").read_text()
    assert "**accuracy on toy vs loop step** (chance 0.500)" in text and "| 4 |" in text
    assert (tmp_path / "imported" / "bench.png").exists()
    assert main(["report", "nothing-here"]) == 2 and "no study or MLflow experiment" in capsys.readouterr().err


def test_the_gpu_config_trains_on_cpu_with_size_overrides_for_each_arch(corpus, tmp_path):
    """conf/lm.yaml with its model shrunk: the looped model and both baselines train end to end."""
    from ouro_lab.config import load_config
    from ouro_lab.train import train

    root = Path(__file__).resolve().parents[1]
    params = {}
    for arch in ("looped", "param_matched", "depth_matched"):
        cfg = load_config(root / "conf" / "lm.yaml", [
            f"model.arch={arch}", "model.d_model=32", "model.n_heads=2", "model.n_layers=1", "model.d_ff=64",
            f"data.lm.source={corpus}", "data.lm.context=32", f"data.lm.cache_dir={tmp_path / 'cache'}",
            "data.batch_size=8", "data.eval_batch_size=32", "data.n_val=32", "data.n_test=32", "train.compile=false",
            "train.max_steps=6", "train.val_every=6", "train.warmup_steps=2", "train.progress_bar=false",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"tracking.output_dir={tmp_path / 'out'}"])
        result = train(cfg, verbose=False)
        assert math.isfinite(result.test["test/bpb_final"]) and result.test["test/bpb_final"] > 0
        params[arch] = result.summary["n_params"]
    assert params["param_matched"] < params["looped"] < params["depth_matched"]  # (+ the looped model's exit gate)
