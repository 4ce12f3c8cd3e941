"""The study's saved MLflow UI view: what it groups by, shows and charts, and the tag that holds it."""

from ouro_lab import ui_view


def test_view_groups_by_swept_keys_and_bundles_and_round_trips_through_its_tag():
    state = ui_view.study_view("val/bpb_final", ["model.loops"], ["recipe"], "bpb", seeds=3,
                               study_series=["study/series/val_bpb_final_vs_loops"])
    assert state["groupBy"]["groupByKeys"] == [{"mode": "param", "groupByData": "model.loops"},
                                               {"mode": "tag", "groupByData": "ouro.bundle.recipe"}]
    assert state["selectedColumns"] == ["params.`model.loops`", "tags.`ouro.bundle.recipe`", "metrics.`val/bpb_final`",
                                        "metrics.`seeds/val/bpb_final_std`", "metrics.`test/bpb_final`"]
    keys = [c.get("selectedMetricKeys", [c["metricKey"]]) for c in state["compareRunCharts"]]
    assert keys[0] == ["val/series/bpb_vs_loop_step"] and keys[1] == ["study/series/val_bpb_final_vs_loops"]
    assert "val/series/exit_q_bpb_vs_milliloops" in keys[2]
    sections = state["compareRunSections"]
    assert sections[0]["display"] and not any(s["display"] for s in sections[1:])
    key, value = ui_view.view_tag(state)
    assert key == "mlflow.sharedViewState.ouro-lab-study" and value.startswith("deflate;")
    assert ui_view.read_view_tag(value) == state


def test_a_study_without_swept_keys_has_no_groups_and_no_loop_chart():
    state = ui_view.study_view("val/acc_final", [], [], "acc", seeds=1, study_series=())
    assert state["groupBy"] is None
    assert state["selectedColumns"] == ["metrics.`val/acc_final`", "metrics.`test/acc_final`"]
    assert not any("study/series" in c["metricKey"] for c in state["compareRunCharts"])
