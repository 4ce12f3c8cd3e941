"""The effect the platform exists to show: on `state`, later loop steps of a looped model
solve longer prefixes (higher difficulty buckets) than step 1."""

from pathlib import Path

import pytest

from ouro_lab.config import load_config
from ouro_lab.train import train

STATE = Path(__file__).resolve().parents[1] / "conf" / "state.yaml"


def run(tmp_path, *overrides):
    cfg = load_config(STATE, [
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"tracking.output_dir={tmp_path / 'out'}",
        "train.progress_bar=false", "eval.test=false", *overrides,
    ])
    return train(cfg, verbose=False)


def test_later_loop_steps_solve_longer_prefixes(tmp_path):
    """N=2, T=4, d=64 on S3 with L=8 (quarters of 2 positions) for 500 steps (~40 s on 2 cores)."""
    result = run(tmp_path, "model.loops=4", "data.state.length=8", "train.max_steps=500", "train.val_every=500",
                 "data.n_val=1024")
    acc = result.val
    step1 = [acc[f"val/acc_step1_d{k}"] for k in range(1, 5)]
    step4 = [acc[f"val/acc_step4_d{k}"] for k in range(1, 5)]
    print("step 1 by quarter:", step1, "\nstep 4 by quarter:", step4)
    assert step4[0] > 0.95  # the first quarter is solved
    assert step4[1] > step1[1] + 0.1  # positions 3-4: solved by later loops, not by step 1
    assert step4[2] > step1[2] + 0.3  # positions 5-6 (measured: 0.24 at step 1, 1.00 at step 4)
    assert acc["val/acc_step4"] > acc["val/acc_step1"] + 0.05


@pytest.mark.slow
def test_looped_beats_param_matched_on_the_last_quarters(tmp_path):
    """The default config (L=16, 1500 steps): looped 2x4 at step 4 vs param-matched 2x1."""
    looped = run(tmp_path, "model.arch=looped")
    param = run(tmp_path, "model.arch=param_matched")
    for k in (2, 3):
        assert looped.val[f"val/acc_final_d{k}"] > param.val[f"val/acc_final_d{k}"] + 0.1
    assert looped.val["val/acc_final_d4"] >= param.val["val/acc_final_d4"]
