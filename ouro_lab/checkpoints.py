"""Checkpoints as inference reads them: an ouro-lab checkpoint with evaluation-time overrides
(`load_checkpoint`, used by `ouro-lab eval / generate / decode`), and a released Ouro
checkpoint in the Hugging Face layout turned into one (`import_hf`, `ouro-lab import-hf`)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from ouro_lab.config import ConfigError, ExperimentConfig, from_dict, load_config, to_dict
from ouro_lab.data.lm import materialize_tokenizer, tokenizer_files
from ouro_lab.models import hf
from ouro_lab.modules import new_module

# Only evaluation and data-size keys may change on reload; anything else is a different model.
EVAL_OVERRIDABLE = ("eval.", "infer.", "data.eval_batch_size", "data.n_val", "data.n_test", "train.accelerator",
                    "train.precision", "tracking.uri", "tracking.experiment",
                    # the text an lm model is evaluated on (its tokenizer and context are the model's)
                    "data.lm.source", "data.lm.text_field", "data.lm.decode_errors", "data.lm.cache_dir",
                    "data.lm.difficulty", "data.lm.buckets")
IMPORT_OVERRIDABLE = ("data.", "eval.", "infer.", "tracking.")  # import-hf: the network is the file's


def read_checkpoint(path: Path, what: str = "checkpoint") -> dict:
    """A checkpoint written by `ouro-lab train`; ConfigError naming the file (and `what` asked
    for it) when it is missing, not a torch file, truncated, or not ouro-lab's."""
    if not path.is_file():
        raise ConfigError(f"{what}: checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # (zip / pickle errors come in several types)
        raise ConfigError(f"{what}: {path} is not a readable checkpoint (a .ckpt from `ouro-lab train`; "
                          f"truncated or another kind of file?): {type(err).__name__}: {err}") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "config" not in ckpt.get("hyper_parameters", {}):
        raise ConfigError(f"{what}: {path} has no ouro-lab config and weights; was it written by `ouro-lab train`?")
    return ckpt


def load_checkpoint(path: str | Path, overrides: list[str] = ()) -> tuple[ExperimentConfig, L.LightningModule]:
    """A checkpoint's config (with evaluation-time overrides) and its module, weights loaded, in eval mode."""
    for item in overrides:
        if not item.startswith(EVAL_OVERRIDABLE):
            raise ConfigError(f"override {item!r}: only {', '.join(EVAL_OVERRIDABLE)} can change when re-evaluating")
    ckpt = read_checkpoint(Path(path))
    saved = ckpt["hyper_parameters"]["config"]
    # NOTE: an evaluation logs into the working folder's store ($MLFLOW_TRACKING_URI, else
    # ./mlflow.db) or tracking.uri=...; not into the store the checkpoint was trained into,
    # which may be anywhere
    saved = saved | {"tracking": saved.get("tracking", {}) | {"uri": None}}
    if ckpt.get("ouro_tokenizer"):  # the checkpoint's own tokenizer, wherever its file was when it was saved
        lm = saved["data"]["lm"]
        cache_dir = dict(item.split("=", 1) for item in overrides).get("data.lm.cache_dir", lm["cache_dir"])
        saved = saved | {"data": saved["data"] | {"lm": lm | {
            "tokenizer": materialize_tokenizer(ckpt["ouro_tokenizer"], cache_dir)}}}
    cfg = from_dict(saved, overrides)  # validated once, here
    _refuse_unused_overrides(cfg, overrides)
    module = new_module(cfg)  # (a Stage II checkpoint holds its own weights: its Stage-I file is not read again)
    module.load_state_dict(ckpt["state_dict"])
    module.ouro_run_id = ckpt.get("ouro_run_id")
    module.ouro_source = ckpt.get("ouro_source")  # an imported checkpoint's origin (import_hf)
    return cfg, module.eval()


def _refuse_unused_overrides(cfg: ExperimentConfig, overrides: list[str]) -> None:
    """Overrides that would silently do nothing: refused with the fix, before anything runs."""
    given = dict(item.split("=", 1) for item in overrides)
    if "infer.prompt" in given and not cfg.infer.prompt:
        raise ConfigError("infer.prompt is empty: write the text to continue, e.g. infer.prompt='The loop', "
                          "or leave infer.prompt out to continue prompts from the test split")
    if cfg.infer.frontier and cfg.infer.exit_rule == "none":
        raise ConfigError("infer.frontier: the frontier of which rule? set infer.exit_rule (q, conf or change); its "
                          "thresholds are eval.exit_q, eval.exit_confidence or eval.exit_step_change")
    if cfg.infer.frontier and {"infer.exit_threshold", "infer.exited_kv"} & set(given):
        raise ConfigError("infer.frontier runs the rule at every threshold of its eval.exit_* list and every exited_kv: "
                          "leave infer.exit_threshold and infer.exited_kv out (or set infer.frontier=false)")
    if "infer.exit_threshold" in given and cfg.infer.exit_rule == "none":
        raise ConfigError(f"infer.exit_threshold={given['infer.exit_threshold']} does nothing with infer.exit_rule=none "
                          "(full depth): name the rule it is the threshold of, e.g. infer.exit_rule=q (gate CDF >= q), "
                          "conf (max probability >= tau) or change (KL between steps < delta)")


def import_hf(folder: Path, out: Path, overrides: list[str] = ()) -> tuple[ExperimentConfig, Path]:
    """A released Ouro checkpoint (Hugging Face layout, models/hf.py) as an ouro-lab checkpoint
    at `out`, which `ouro-lab eval / generate / decode` then read like a trained one. The
    network comes from config.json; `overrides` choose the task and evaluation (data.*,
    eval.*, infer.*, tracking.*). The checkpoint records where it came from (`ouro_source`)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise hf.HFImportError(f"{folder}: not a folder (a Hugging Face model folder: config.json + model.safetensors)")
    for item in overrides:
        if not item.startswith(IMPORT_OVERRIDABLE):
            raise ConfigError(f"override {item!r}: the network comes from {folder / 'config.json'}; "
                              f"only {', '.join(IMPORT_OVERRIDABLE)} can be set")
    hf_config = hf.read_hf_config(folder)
    # a language model: with the folder's tokenizer (the lm task) when it has one, else bytes (text)
    has_tokenizer = (folder / "tokenizer.json").is_file()
    task = ["data.task=lm", f"data.lm.tokenizer={folder.resolve()}"] if has_tokenizer else ["data.task=text"]
    cfg = load_config(None, [*task, *hf.model_overrides(hf_config, str(folder / "config.json")), *overrides])
    module = new_module(cfg)
    if module.task.vocab_size != hf_config["vocab_size"]:
        has = (f"its tokenizer.json has {module.task.vocab_size} tokens" if cfg.data.task == "lm" and has_tokenizer
               else f"data.task={cfg.data.task} has a vocabulary of {module.task.vocab_size} tokens")
        raise hf.HFImportError(
            f"{folder / 'config.json'}: vocab_size {hf_config['vocab_size']}, but {has}. A model is imported with "
            "the tokenizer.json of its folder (data.task=lm); without one, text's 256 byte values")
    module.model.load_state_dict(hf.map_state_dict(hf.read_safetensors(folder), module.model,
                                                   str(folder / "model.safetensors")))
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": {"config": to_dict(cfg)},
                "ouro_source": hf.source_record(folder, hf_config),
                "ouro_tokenizer": tokenizer_files(cfg.data.lm.tokenizer) if cfg.data.task == "lm" else {}}, out)
    return cfg, out
