"""Early-exit rules and the frontier metric against hand-computed values; the frontier of a
real tiny looped model against the oracles' bounds."""

import math

import pytest
import torch

from ouro_lab import exits
from ouro_lab.metrics import ExitFrontierMetrics


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_q_exit_is_the_first_step_whose_cdf_reaches_q():
    # lambda = 0.5 at every step: CDF = 0.5, 0.75, 0.875, 1 (the last step takes the rest)
    gate = torch.tensor([[0.0, 0.0, 0.0, 0.0]])
    steps = exits.q_exit(gate, [0.3, 0.5, 0.6, 0.8, 0.875, 0.9, 1.0])
    assert steps[:, 0].tolist() == [1, 1, 2, 3, 3, 4, 4]
    # a gate that saturates at step 1 exits there for any q < 1; q = 1 is full depth by definition
    saturated = torch.tensor([[50.0, -5.0, -5.0, -5.0]])
    assert exits.q_exit(saturated, [0.99, 0.999999, 1.0])[:, 0].tolist() == [1, 1, 4]
    # lambda = 0.2 then 0.5: CDF = 0.2, 0.6, ...
    gate = torch.tensor([[logit(0.2), logit(0.5), logit(0.5)]])
    assert exits.exit_cdf(gate)[0].tolist() == pytest.approx([0.2, 0.6, 1.0])
    assert exits.q_exit(gate, [0.1, 0.19, 0.5, 0.7])[:, 0].tolist() == [1, 1, 2, 3]


def test_selection_reads_each_token_at_its_exit_step():
    per_step = torch.tensor([[10.0, 20.0], [11.0, 21.0], [12.0, 22.0]])  # (T=3, N=2)
    steps = torch.tensor([[1, 3], [2, 2]])  # (R=2, N)
    assert exits.select(per_step, steps).tolist() == [[10.0, 22.0], [11.0, 21.0]]


def test_confidence_and_step_change_exits():
    confidence = torch.tensor([[0.4, 0.95], [0.8, 0.97], [0.85, 0.99]])  # (T=3, N=2)
    assert exits.confidence_exit(confidence, [0.5, 0.9, 0.999]).tolist() == [[2, 1], [3, 1], [3, 3]]
    change = torch.tensor([[math.inf, math.inf], [0.5, 0.01], [0.02, 0.3]])  # step 1 has no predecessor
    assert exits.step_change_exit(change, [0.05, 0.001]).tolist() == [[3, 2], [3, 3]]
    # KL of a step with itself is 0; with a different distribution positive
    p = torch.log_softmax(torch.tensor([[2.0, 0.0, -1.0]]), -1)
    q = torch.log_softmax(torch.tensor([[0.0, 2.0, -1.0]]), -1)
    assert exits.step_change(p, p).item() == pytest.approx(0.0, abs=1e-7)
    assert exits.step_change(p, q).item() > 0.5


def test_the_online_rules_one_step_at_a_time_are_the_offline_rules():
    """cdf_step / rule_inputs and the per-step tests, run step by step as cached decoding does,
    exit every token where q_exit / confidence_exit / step_change_exit put it."""
    torch.manual_seed(0)
    T, N = 4, 50
    gate, logits = torch.randn(N, T) * 2, torch.randn(T, N, 7) * 2
    rules = {"q": [0.3, 0.6, 0.9], "conf": [0.4, 0.6, 0.8], "change": [0.1, 0.3, 1.0]}
    survival, prev, cdf, confidence, change = torch.ones(N, dtype=torch.float64), None, [], [], []
    for t in range(T):
        survival, step_cdf = exits.cdf_step(survival, gate[:, t])
        prev, step_confidence, step_change = exits.rule_inputs(logits[t], prev)
        cdf.append(step_cdf)
        confidence.append(step_confidence)
        change.append(step_change)
    cdf, confidence, change = torch.stack(cdf), torch.stack(confidence), torch.stack(change)  # (T, N)
    assert torch.equal(cdf[:-1], exits.exit_cdf(gate).T[:-1])  # the last step is capped at 1 offline
    assert torch.isinf(change[0]).all()
    online = {"q": lambda x: exits.q_reached(cdf, x), "conf": lambda x: exits.confident(confidence, x),
              "change": lambda x: exits.settled(change, x)}
    offline = {"q": exits.q_exit(gate, rules["q"]), "conf": exits.confidence_exit(confidence, rules["conf"]),
               "change": exits.step_change_exit(change, rules["change"])}
    for name, thresholds in rules.items():
        for r, threshold in enumerate(thresholds):
            assert torch.equal(exits.first_hit(online[name](threshold)), offline[name][r])
        assert 1 < offline[name].float().mean() < T  # the exits really varied


def test_oracles_on_crafted_predictions():
    # tokens (columns): a right from step 1; b right from 2; c flips away and back; d never right
    preds = torch.tensor([[1, 0, 1, 0], [1, 1, 0, 0], [1, 1, 1, 2]])  # (T=3, N=4), target 1 everywhere
    correct = preds == 1
    assert exits.stable_oracle(preds=preds).tolist() == [1, 2, 3, 3]
    assert exits.first_right_oracle(correct).tolist() == [1, 2, 1, 1]
    losses = torch.tensor([[0.5, 2.0, 0.1], [0.3, 1.0, 0.5], [0.3, 0.995, 0.1]])  # (T=3, N=3)
    # token 0: 0.5 > 0.3+0.01 at step 1 -> 2; token 1: 1.0 within 0.01 of 0.995 from step 2 -> 2;
    # token 2: step 2 (0.5) is far from 0.1, so stable only from step 3 even though step 1 equals it
    assert exits.stable_oracle(losses=losses, tolerance=0.01).tolist() == [2, 2, 3]


def test_frontier_metric_is_exact_on_crafted_tokens():
    T = 3
    preds = torch.tensor([[1, 0, 1, 0], [1, 1, 0, 0], [1, 1, 1, 2]])[:, None, :]  # (T, B=1, S=4)
    targets = torch.ones(1, 4, dtype=torch.long)
    correct = preds == targets
    losses = torch.tensor([[0.1, 2.0, 0.2, 3.0], [0.1, 0.2, 2.0, 3.0], [0.1, 0.1, 0.2, 3.0]])[:, None, :]
    confidence = torch.tensor([[0.99, 0.3, 0.9, 0.2], [0.99, 0.95, 0.4, 0.2], [0.99, 0.99, 0.9, 0.5]])[:, None, :]
    change = torch.full((T, 1, 4), 1.0)
    gate = torch.tensor([[[10.0, 0.0, 0.0], [-10.0, 10.0, 0.0], [-10.0, -10.0, 0.0], [-10.0, -10.0, 0.0]]])  # (B, S, T)
    difficulty = torch.tensor([[1, 1, 2, 2]])
    m = ExitFrontierMetrics(T, n_levels=2, rules={"q": [0.5, 1.0], "conf": [0.9], "change": [0.5]}, epsilon=0.0,
                            flops_per_loop=100)
    m.update(losses, correct, preds, confidence, change, gate, difficulty)
    out = {k: float(v) for k, v in m.compute().items()}
    # full depth: a, b, c right, d wrong; oracles as in the hand computation above
    assert out["oracle_stable_acc"] == pytest.approx(0.75) and out["oracle_stable_loops"] == pytest.approx(9 / 4)
    assert out["oracle_right_acc"] == pytest.approx(0.75) and out["oracle_right_loops"] == pytest.approx(5 / 4)
    assert out["oracle_stable_loops_d1"] == pytest.approx(1.5) and out["oracle_stable_loops_d2"] == pytest.approx(3.0)
    # q=0.5: a exits at 1 (right), b at 2 (right), c and d at 3 (CDF reaches 1 only there)
    assert out["exit_q0.5_loops"] == pytest.approx(9 / 4) and out["exit_q0.5_acc"] == pytest.approx(0.75)
    assert out["exit_q1_loops"] == pytest.approx(3.0)
    # conf 0.9: a at 1 (right), b at 2 (right), c at 1 (right), d at 3 (wrong)
    assert out["exit_conf0.9_loops"] == pytest.approx(7 / 4) and out["exit_conf0.9_acc"] == pytest.approx(0.75)
    assert out["exit_conf0.9_loss"] == pytest.approx((0.1 + 0.2 + 0.2 + 3.0) / 4)
    # the cheapest q within epsilon=0 of full depth is q=0.5 at 2.25 loops: the oracle's saving, all of it
    assert out["gate_q_at_eps"] == pytest.approx(0.5) and out["gate_loops_at_eps"] == pytest.approx(2.25)
    assert out["gate_efficiency"] == pytest.approx(1.0) and out["gate_flops_at_eps"] == pytest.approx(225.0)
    # share of tokens whose answer-stable exit is step t, and the gate's E[t] there
    assert [out[f"oracle_stable_share_step{t}"] for t in (1, 2, 3)] == pytest.approx([0.25, 0.25, 0.5])
    assert out["exit_expected_step_at_oracle1"] == pytest.approx(1.0, abs=1e-3)


def test_a_trained_looped_model_logs_its_frontier_within_the_oracle_bounds(tiny_config, tracking_uri):
    from mlflow.tracking import MlflowClient

    from ouro_lab.metric_names import metric_names
    from ouro_lab.train import train

    cfg = tiny_config("model.loops=3", "train.max_steps=60", "train.val_every=60", "train.lr=1e-2")
    result = train(cfg, verbose=False)
    m = result.val
    levels = [1, 2, 3, 4]
    rules = {"q": cfg.eval.exit_q, "conf": cfg.eval.exit_confidence, "change": cfg.eval.exit_step_change}
    expected = metric_names(cfg.eval_loops, 3, levels, True, ("val",), exit_rules=rules)
    logged = {k for k in m if not k.startswith("val/exit_expected_step_at_oracle")}
    assert logged == expected
    full = m["val/acc_final"]
    assert m["val/oracle_stable_acc"] == pytest.approx(full, abs=1e-6)  # keeps full-depth accuracy exactly
    assert m["val/exit_q1_acc"] == pytest.approx(full, abs=1e-6) and m["val/exit_q1_loops"] == pytest.approx(3.0)
    assert 1.0 <= m["val/oracle_stable_loops"] <= 3.0
    for name, value in m.items():
        if name.startswith("val/exit_") and name.endswith("_acc"):
            assert value <= m["val/oracle_right_acc"] + 1e-6, name  # no rule beats the first-right oracle
            if value >= full - 1e-9:  # a rule that keeps full-depth accuracy spends at least the oracle's loops
                assert m[name.replace("_acc", "_loops")] >= m["val/oracle_stable_loops"] - 1e-6, name
    assert 0.0 <= m["val/gate_saved_loops"] <= 3.0 - 1.0 and m["val/gate_loops_at_eps"] <= 3.0
    # the curves as MLflow series: x = loop step, and x = 1000 x mean loops for every rule
    client = MlflowClient(tracking_uri)
    by_step = client.get_metric_history(result.run_id, "val/series/acc_vs_loop_step")
    assert [p.step for p in by_step] == [1, 2, 3, 4, 5]
    assert by_step[2].value == pytest.approx(full, abs=1e-6)
    q = client.get_metric_history(result.run_id, "val/series/exit_q_acc_vs_milliloops")
    assert max(p.step for p in q) == 3000 and {p.value for p in q} <= {m[f"val/exit_q{x:g}_acc"] for x in cfg.eval.exit_q}
    by_index = client.get_metric_history(result.run_id, "val/series/exit_q_loops_vs_threshold_index")
    assert [p.step for p in by_index] == list(range(len(cfg.eval.exit_q)))  # (identical points MLflow stores once)
