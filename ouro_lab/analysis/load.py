"""A study read back from MLflow: the only module of the analysis that talks to MLflow. It
reads an experiment's runs as plain run records and hands them to `tidy.study_data`, which
builds the tidy frames (`StudyData`); `attach_report` writes the report back."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from ouro_lab import run_record as rr
from ouro_lab import tracking
from ouro_lab.analysis.tidy import AnalysisError, StudyData, bench_frame, evaluated_run_ids, study_data, study_run
from ouro_lab.run_record import RunRecord


def resolve_store(store: str | None) -> str:
    """A tracking URI from a URI, a path to an sqlite file, or None (the embedded default)."""
    if store is None or "://" in store:
        uri = tracking.resolve_tracking_uri(store)
        if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
            raise AnalysisError(f"no MLflow store at {uri} (run a sweep here first, or pass the store: "
                                f"a tracking URI or the path of its mlflow.db)")
        return uri
    path = Path(store).expanduser()
    if not path.exists():
        raise AnalysisError(f"MLflow store {store!r} not found (expected an sqlite file such as mlflow.db "
                            f"or a tracking URI)")
    return f"sqlite:///{path.resolve()}"


def load_study(study: str, store: str | None = None, source: str = "auto") -> StudyData:
    """Read a study (its name, which is its MLflow experiment, or an experiment id) back from MLflow.

    Works on sweeps (parent run + trial runs + seed runs) and on experiments of plain
    `ouro-lab train` runs alike. `source`: which runs are the unit runs: "train" (training
    runs), "eval" (`ouro-lab eval` runs, the latest per checkpoint and split: the way to report
    on an imported checkpoint, which has no training run) or "auto" (train, else eval when the
    experiment holds evaluations only).
    """
    uri = resolve_store(store)
    client = MlflowClient(uri)
    experiment = _experiment(client, study, uri)
    runs = _search_all(client, experiment.experiment_id)
    parent = study_run(runs)
    sweep = _sweep_definition(client, parent.run_id) if parent else {}
    return study_data(experiment.name, uri, experiment.experiment_id, runs, sweep, source, _run_names(client, runs))


def _record(client: MlflowClient, run, tables: bool) -> RunRecord:
    """An MLflow run as a plain run record (with what its metric tables hold, when `tables`)."""
    metrics = tracking.read_metrics(client, run) if tables else run.data.metrics
    return RunRecord(run_id=run.info.run_id, name=run.info.run_name or "", status=run.info.status,
                     start_time=run.info.start_time, params=run.data.params, metrics=metrics,
                     tags=run.data.tags)


def _run_names(client: MlflowClient, runs: list[RunRecord]) -> dict[str, str]:
    """Run id -> name of each training run that the evaluations among `runs` scored."""
    names = {}
    for run_id in evaluated_run_ids(runs):
        try:
            names[run_id] = client.get_run(run_id).info.run_name
        except Exception:  # MLflow raises for a run id it does not know (another store, deleted)
            pass
    return names


def _experiment(client: MlflowClient, study: str, uri: str):
    """The MLflow experiment named `study` (or with that id); AnalysisError naming the others."""
    experiment = client.get_experiment_by_name(study)
    if experiment is None and study.isdigit():
        try:
            experiment = client.get_experiment(study)
        except Exception:  # MLflow raises for an unknown id
            experiment = None
    if experiment is None:
        names = sorted(e.name for e in client.search_experiments())
        raise AnalysisError(f"no study or MLflow experiment named {study!r} in {uri}; "
                            f"experiments there: {', '.join(names) or 'none'}")
    return experiment


def load_bench(study: str, store: str | None = None) -> pd.DataFrame:
    """The experiment's finished `ouro-lab bench` runs as load_study's `bench` frame (for an
    experiment that holds nothing else, which load_study refuses)."""
    uri = resolve_store(store)
    client = MlflowClient(uri)
    experiment = _experiment(client, study, uri)
    runs = _search_all(client, experiment.experiment_id, rr.role_filter(rr.BENCH_RUN))
    return bench_frame(runs, _run_names(client, runs))


def list_studies(store: str | None = None) -> pd.DataFrame:
    """The studies (sweeps) in a store: one row per study run, with its trials' run states
    (trial-level runs by `optuna.state`), when it last changed and where it was run from."""
    uri = resolve_store(store)
    client = MlflowClient(uri)
    rows = []
    for experiment in client.search_experiments():
        parents = _search_all(client, experiment.experiment_id, rr.role_filter(rr.STUDY_RUN), tables=False)
        every_trial = _search_all(client, experiment.experiment_id, rr.role_filter(rr.TRIAL_RUN),
                                  tables=False) if parents else []
        for parent in parents:
            trials = [r for r in every_trial if r.parent == parent.run_id]
            states: dict[str, int] = {}
            for r in trials:
                states[r.state] = states.get(r.state, 0) + 1
            rows.append({"study": experiment.name, "trials": sum(states.values()),
                         "states": ", ".join(f"{k} {v}" for k, v in sorted(states.items())) or "none",
                         "objective": parent.params.get(f"{rr.SWEEP}objective", "?"),
                         "last change": pd.Timestamp(max([parent.start_time] + [r.start_time for r in trials]),
                                                     unit="ms").strftime("%Y-%m-%d %H:%M"),
                         "study run": parent.run_id})
    return pd.DataFrame(rows, columns=["study", "trials", "states", "objective", "last change", "study run"])


def _search_all(client: MlflowClient, experiment_id: str, filter_string: str = "",
                tables: bool = True) -> list[RunRecord]:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string, max_results=1000, page_token=token)
        runs.extend(_record(client, r, tables) for r in page)
        token = page.token
        if not token:
            return runs


def _sweep_definition(client: MlflowClient, parent_run_id: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp, tracking.quiet_artifacts():
        try:
            path = client.download_artifacts(parent_run_id, rr.SWEEP_ARTIFACT, tmp)
        except Exception:  # an older study without the artifact: no Optuna view
            return {}
        return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


def attach_report(data: StudyData, files: Sequence[Path]) -> None:
    """Log the report's files as artifacts `report/` of the study's parent run (nothing when the
    experiment has no sweep parent)."""
    if data.parent_run_id:
        tracking.Experiment(data.tracking_uri, data.experiment_id).run(data.parent_run_id).log_artifacts(files, rr.REPORT_ARTIFACTS)
