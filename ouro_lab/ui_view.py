"""A study's saved view in the MLflow UI: the runs table and charts that answer "when do extra
loops stop helping", opened by one link (`tracking.runs_url(..., view=True)`).

MLflow's UI keeps a shared view as an experiment tag `mlflow.sharedViewState.<key>` whose value
is the page's state (columns, expanded runs, chart cards and sections), deflated and base64'd;
the URL parameter `viewStateShareKey=<key>` applies it. This module builds that state from what
a study is (its objective, swept keys, metric kind and nested runs); the sweep writes it after
every summary. Without it the study opens with its trials collapsed under the study run, no
param or metric column, and a chart per metric in alphabetical sections.

The state's field names are MLflow UI 3.x's (`ExperimentPageUIState`, the `RunsCharts*CardConfig`
classes); a UI that does not know a field ignores it.
"""

from __future__ import annotations

import base64
import json
import zlib
from typing import Iterable, Mapping

from ouro_lab import metric_names as names
from ouro_lab import run_record as rr

VIEW_KEY = "ouro-lab-study"  # the share key: one study per experiment, so one view
MAIN_SECTION = "ouro-lab: when do extra loops stop helping"
# metric sections the UI would open, one chart per metric: given here, collapsed
# (a section is a metric name's prefix: seeds/val/acc_final_std is in seeds/val)
COLLAPSED_SECTIONS = ("val", "test", "train", "model", *(rr.seed_std(f"{split}/x").rsplit("/", 1)[0] for split in ("val", "test")),
                      "study", "val/series", "test/series", "study/series", "Model metrics", "System metrics")


def column(kind: str, key: str) -> str:
    """A runs-table column as the UI names it: "params.`model.loops`", "metrics.`val/acc_final`"."""
    return f"{kind}.`{key}`"


def _line(uuid: str, keys: list[str], title: str) -> dict:
    return {"uuid": uuid, "type": "LINE", "metricSectionId": "ouro-main", "deleted": False, "isGenerated": False,
            "displayName": title, "metricKey": keys[0], "selectedMetricKeys": keys, "xAxisKey": "step",
            "selectedXAxisMetricKey": "", "scaleType": "linear", "xAxisScaleType": "linear", "lineSmoothness": 0,
            "runsCountToCompare": 100, "range": {}}


def study_view(objective: str, swept: Iterable[str], bundles: Iterable[str], kind: str, seeds: int,
               study_series: Iterable[str]) -> dict:
    """The page state of a study's view.

    objective: the sweep's objective metric; swept: the config keys it samples; bundles: its
    bundle params (a column of their tag); kind: the runs' metric kind ("acc" or "bpb"); seeds:
    seeds per trial; study_series: the study run's `study/series/...` names (the objective against T)."""
    swept, bundles = list(swept), list(bundles)
    metrics = list(dict.fromkeys([objective, *([rr.seed_std(objective)] if seeds > 1 else []),
                                  f"val/{names.final(kind)}", f"test/{names.final(kind)}"]))
    columns = [*(column("params", k) for k in swept), *(column("tags", f"{rr.BUNDLE}{b}") for b in bundles),
               *(column("metrics", m) for m in metrics)]
    charts = [_line("ouro-steps", [names.series("val", kind, "loop_step")],
                    f"val {kind} vs evaluation loop step t (x = t; past the trained T: extrapolation)")]
    if study_series := sorted(study_series):
        charts.append(_line("ouro-study", study_series, f"{objective} vs trained loops T (x = T; study run)"))
    charts.append(_line("ouro-frontier", [names.series("val", f"fixed_{kind}", "milliloops"),
                                          names.series("val", f"exit_q_{kind}", "milliloops")],
                        f"val early exit: {kind} vs compute (x = 1000 x mean loops; fixed depth and Q-exit)"))
    charts.append({"uuid": "ouro-objective", "type": "BAR", "metricSectionId": "ouro-main", "deleted": False,
                   "isGenerated": False, "metricKey": objective, "runsCountToCompare": 100})
    keys = [{"mode": "param", "groupByData": k} for k in swept] + [{"mode": "tag", "groupByData": f"{rr.BUNDLE}{b}"}
                                                                   for b in bundles]
    group_by = {"aggregateFunction": "average", "groupByKeys": keys} if keys else None
    sections = [{"uuid": "ouro-main", "name": MAIN_SECTION, "display": True, "isReordered": True,
                 "deleted": False, "isGenerated": False}]
    sections += [{"uuid": f"ouro-{name}", "name": name, "display": False, "isReordered": False, "deleted": False,
                  "isGenerated": True} for name in COLLAPSED_SECTIONS]
    # NOTE: the runs are grouped, not expanded: the UI leaves `runsExpanded` out of a shared view
    return {"selectedColumns": columns, "columnOrder": columns,
            "runsHiddenMode": "SHOW_ALL", "runsPinned": [], "runsHidden": [], "runsVisibilityMap": {},
            "compareRunCharts": charts, "compareRunSections": sections, "isAccordionReordered": True,
            "hideEmptyCharts": True, "useGroupedValuesInCharts": True, "groupBy": group_by, "groupsExpanded": {},
            "viewMaximized": False, "runListHidden": False,
            "globalLineChartConfig": {"xAxisKey": "step", "lineSmoothness": 0, "selectedXAxisMetricKey": ""}}


def view_tag(state: Mapping) -> tuple[str, str]:
    """The experiment tag that holds `state`: MLflow's deflate format ('deflate;' + base64 of
    zlib-compressed JSON), which its UI inflates."""
    packed = base64.b64encode(zlib.compress(json.dumps(state, separators=(",", ":")).encode())).decode()
    return f"{rr.SHARED_VIEW}{VIEW_KEY}", f"deflate;{packed}"


def read_view_tag(value: str) -> dict:
    """The state a `view_tag` value holds (for tests and for a reader that wants the columns)."""
    assert value.startswith("deflate;"), value[:20]
    return json.loads(zlib.decompress(base64.b64decode(value.removeprefix("deflate;"))))
