import math

import pytest
import torch

from ouro_lab.metrics import LoopStepMetrics


def test_per_step_per_level_accuracy_loss_and_exit_stats():
    m = LoopStepMetrics(eval_loops=3, trained_loops=2, n_levels=2, has_gate=True)
    # one sequence, 3 positions: levels 1, 2 and 0 (not scored)
    difficulty = torch.tensor([[1, 2, 0]])
    correct = torch.tensor([[[1, 0, 1]], [[1, 1, 1]], [[0, 1, 1]]], dtype=torch.bool)  # (3 steps, B, S)
    losses = torch.tensor([[[1.0, 3.0, 9.0]], [[0.5, 1.0, 9.0]], [[2.0, 0.0, 9.0]]])
    exit_probs = torch.tensor([[[0.25, 0.75], [0.5, 0.5], [1.0, 0.0]]])  # (B, S, 2)
    m.update(losses, correct, difficulty, exit_probs)
    out = m.compute()
    assert out["acc_step1"] == pytest.approx(0.5) and out["acc_step2"] == pytest.approx(1.0)
    assert out["acc_step1_d1"] == 1.0 and out["acc_step1_d2"] == 0.0
    assert out["loss_step1"] == pytest.approx(2.0) and out["loss_step2_d2"] == pytest.approx(1.0)
    assert out["acc_final"] == out["acc_step2"] and out["acc_final_d2"] == out["acc_step2_d2"]
    assert "acc_step3" in out and "exit_mass_step3" not in out  # step 3 extrapolates; no exit mass there
    assert out["exit_mass_step1"] == pytest.approx((0.25 + 0.5) / 2)
    assert out["exit_expected_step_d1"] == pytest.approx(1.75)
    assert out["exit_expected_step"] == pytest.approx((1.75 + 1.5) / 2)
    # expected loss under p: token 1: .25*1 + .75*.5; token 2: .5*3 + .5*1
    assert out["loss_exit"] == pytest.approx(((0.25 + 0.375) + 2.0) / 2)


def test_levels_without_examples_are_left_out_not_zero():
    m = LoopStepMetrics(eval_loops=1, trained_loops=1, n_levels=3, has_gate=False)
    m.update(torch.ones(1, 1, 2), torch.ones(1, 1, 2, dtype=torch.bool), torch.tensor([[3, 3]]))
    out = m.compute()
    assert out["acc_step1_d3"] == 1.0
    assert "acc_step1_d1" not in out and "acc_step1_d2" not in out


def test_metric_names_match_what_a_run_logs():
    from ouro_lab.metric_names import metric_names

    m = LoopStepMetrics(eval_loops=4, trained_loops=2, n_levels=2, has_gate=True)
    m.update(torch.ones(4, 1, 2), torch.ones(4, 1, 2, dtype=torch.bool), torch.tensor([[1, 2]]),
             torch.full((1, 2, 2), 0.5))
    logged = {f"val/{k}" for k in m.compute()} | {"val/acc"}
    assert logged == metric_names(4, 2, [1, 2], True, ("val",))


def test_bits_per_byte_is_loss_over_ln2_and_named_like_the_rest():
    from ouro_lab.metric_names import metric_names

    m = LoopStepMetrics(eval_loops=3, trained_loops=2, n_levels=2, has_gate=True, bpb=True)
    losses = torch.rand(3, 2, 4)
    m.update(losses, torch.ones(3, 2, 4, dtype=torch.bool), torch.tensor([[1, 1, 2, 2], [1, 1, 2, 2]]),
             torch.full((2, 4, 2), 0.5))
    out = m.compute()
    for name in ("loss_step1", "loss_step3_d2", "loss_final", "loss_final_d1", "loss_exit"):
        assert float(out[name.replace("loss", "bpb")]) == pytest.approx(float(out[name]) / math.log(2), rel=1e-6)
    assert float(out["bpb_step2"]) == pytest.approx(float(losses[1].mean()) / math.log(2), rel=1e-5)
    logged = {f"val/{k}" for k in out} | {"val/acc"}
    assert logged == metric_names(3, 2, [1, 2], True, ("val",), bpb=True)
    assert not any(k.startswith("bpb") for k in LoopStepMetrics(1, 1, 1, False).compute())
