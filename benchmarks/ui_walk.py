"""Screenshots of what a user sees of a study in the MLflow UI and in optuna-dashboard, taken
by headless Chromium, to look at after a change to what runs log.

    python benchmarks/ui_walk.py --store mlflow.db --study smoke [--journal studies/smoke/optuna.journal] [--out runs/ui_walk]

It starts `mlflow ui` on the store (and `optuna-dashboard` on the journal, when it is
installed), opens each page the way the links ouro-lab prints do, and writes one PNG per page
into `--out`: the study's saved view (charts, then its runs table), the plain runs table in model-training mode, the study run and its charts, one trial run, the
study's report.html among the study run's artifacts, and the study in optuna-dashboard.
Chromium: Debian's `chromium` package (/usr/bin/chromium), or --chromium PATH.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mlflow.tracking import MlflowClient  # noqa: E402

from ouro_lab import run_record as rr  # noqa: E402
from ouro_lab.tracking import UI_MODE, runs_url  # noqa: E402
from ouro_lab.ui_view import VIEW_KEY  # noqa: E402

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
                  "--window-size=1500,1000", "--virtual-time-budget=90000",
                  "--run-all-compositor-stages-before-draw"]  # (90 s of virtual time: the charts fetch, then draw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(cmd: list[str], url: str, seconds: float = 90) -> subprocess.Popen:
    """Start a server and wait until `url` answers."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"{cmd[0]} did not answer at {url} within {seconds:.0f} s")


def shot(chromium: str, url: str, path: Path, profile: Path) -> None:
    subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={path}", url],
                   capture_output=True, timeout=180, check=True)
    print(f"[ui] {path.name}: {url}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, required=True, help="the sqlite MLflow store (mlflow.db)")
    parser.add_argument("--study", required=True)
    parser.add_argument("--journal", type=Path, default=None, help="the study's Optuna journal (optuna-dashboard)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "ui_walk")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{args.store.resolve()}"
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(args.study)
    if experiment is None:
        raise SystemExit(f"no study {args.study!r} in {args.store}")
    runs = client.search_runs([experiment.experiment_id])
    study_run = next(r for r in runs if r.data.tags.get(rr.ROLE) == rr.STUDY_RUN)
    trial_run = next(r for r in runs if r.data.tags.get(rr.ROLE) == rr.TRIAL_RUN)
    port = free_port()
    host = f"http://127.0.0.1:{port}"
    servers = [serve([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--port", str(port)], host)]
    try:
        profile = args.out / ".chromium"
        eid, sid = experiment.experiment_id, study_run.info.run_id
        view = runs_url(eid, host=host, view=VIEW_KEY)  # the link the sweep prints: the study's saved view
        shot(args.chromium, view, args.out / "0_study_view_charts.png", profile)
        shot(args.chromium, view.replace("compareRunsMode=CHART", "compareRunsMode=TABLE"),
             args.out / "0b_study_view_table.png", profile)
        shot(args.chromium, runs_url(eid, host=host), args.out / "1_runs_table.png", profile)
        shot(args.chromium, runs_url(eid, sid, host=host), args.out / "2_study_run.png", profile)
        charts = f"{host}/#/experiments/{eid}/runs/{sid}/model-metrics?{UI_MODE}"
        shot(args.chromium, charts, args.out / "2b_study_run_charts.png", profile)
        shot(args.chromium, runs_url(eid, trial_run.info.run_id, host=host), args.out / "3_trial_run.png", profile)
        artifacts = f"{host}/#/experiments/{eid}/runs/{sid}/artifacts/report/report.html?{UI_MODE}"
        shot(args.chromium, artifacts, args.out / "4_report_html.png", profile)
        beside = Path(sys.executable).with_name("optuna-dashboard")  # (this environment's, when not on PATH)
        dashboard = shutil.which("optuna-dashboard") or (str(beside) if beside.exists() else None)
        if args.journal and dashboard:
            dport = free_port()
            servers.append(serve([dashboard, str(args.journal), "--port", str(dport)], f"http://127.0.0.1:{dport}/"))
            shot(args.chromium, f"http://127.0.0.1:{dport}/dashboard/studies/0", args.out / "5_optuna_dashboard.png",
                 profile)
        elif args.journal:
            print("[ui] optuna-dashboard is not installed (pip install optuna-dashboard): no screenshot of it")
    finally:
        for proc in servers:
            proc.terminate()
    shutil.rmtree(args.out / ".chromium", ignore_errors=True)
    print(f"[ui] screenshots in {args.out}")


if __name__ == "__main__":
    main()
