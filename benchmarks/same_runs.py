"""Do two MLflow stores hold the same runs? For checking that a change which must not alter
behaviour (a restructuring) does not: run the same commands with the code before and after,
each into its own store, then

    python benchmarks/same_runs.py before/mlflow.db after/mlflow.db [--reports before/reports after/reports]

Runs are matched by experiment and run name. Compared: every metric's whole history (step and
value), every param, every tag; left out are what differs between any two runs of the same
command (run ids and the paths holding them, times, the commit, wall-clock and throughput
metrics). With --reports, every file under the two report folders is compared byte for byte
(PNGs included; run ids masked in text files). Prints each difference; exits 1 if there is any.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

# differ between two runs of one command on one machine
VOLATILE_TAG = re.compile(r"^(mlflow\.|ouro\.(git|checkpoint$|host|pid|worker|evaluated_run_id|stage1_run_id|source)|"
                          r"optuna\.(heartbeat|datetime|worker))")
VOLATILE_PARAM = re.compile(r"(^|\.)(init_from|output_dir|study_dir|storage|tracking_uri|uri|checkpoint)$")
VOLATILE_METRIC = re.compile(r"(seconds|tokens_per_s|_s$|time|elapsed|wall)")
RUN_ID = re.compile(r"[0-9a-f]{32}")


def runs(uri: str) -> dict[tuple[str, str], object]:
    client = MlflowClient(uri)
    out = {}
    for experiment in client.search_experiments():
        for run in client.search_runs([experiment.experiment_id], max_results=10_000):
            key = (experiment.name, run.info.run_name)
            n = 1
            while key in out:  # several runs of one name (seeds of a reused name): in start order
                n += 1
                key = (experiment.name, f"{run.info.run_name}#{n}")
            out[key] = run
    return out


def histories(client: MlflowClient, run) -> dict[str, list[tuple[int, float]]]:
    return {k: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, k)]
            for k in sorted(run.data.metrics) if not VOLATILE_METRIC.search(k)}


def clean(value: str) -> str:
    return RUN_ID.sub("<run id>", value)


def compare_stores(a: str, b: str) -> list[str]:
    ua, ub = (x if "://" in x else f"sqlite:///{Path(x).resolve()}" for x in (a, b))
    ra, rb = runs(ua), runs(ub)
    diffs = [f"only in {a}: {k}" for k in sorted(set(ra) - set(rb))]
    diffs += [f"only in {b}: {k}" for k in sorted(set(rb) - set(ra))]
    ca, cb = MlflowClient(ua), MlflowClient(ub)
    for key in sorted(set(ra) & set(rb)):
        x, y = ra[key], rb[key]
        for what, da, db in (
                ("param", {k: clean(v) for k, v in x.data.params.items() if not VOLATILE_PARAM.search(k)},
                 {k: clean(v) for k, v in y.data.params.items() if not VOLATILE_PARAM.search(k)}),
                ("tag", {k: clean(v) for k, v in x.data.tags.items() if not VOLATILE_TAG.search(k)},
                 {k: clean(v) for k, v in y.data.tags.items() if not VOLATILE_TAG.search(k)}),
                ("metric", histories(ca, x), histories(cb, y))):
            for k in sorted(set(da) | set(db)):
                if da.get(k) != db.get(k):
                    diffs.append(f"{key} {what} {k}: {str(da.get(k))[:120]} != {str(db.get(k))[:120]}")
    return diffs


def compare_folders(a: Path, b: Path) -> list[str]:
    fa = {p.relative_to(a) for p in a.rglob("*") if p.is_file()}
    fb = {p.relative_to(b) for p in b.rglob("*") if p.is_file()}
    diffs = [f"only in {a}: {p}" for p in sorted(fa - fb)] + [f"only in {b}: {p}" for p in sorted(fb - fa)]
    diffs += [f"differs: {p}" for p in sorted(fa & fb) if _content(a / p) != _content(b / p)]
    return diffs


def _content(path: Path) -> bytes:
    """The file's bytes; in text files, run ids (random per run) masked."""
    data = path.read_bytes()
    return RUN_ID.sub("<run id>", data.decode()).encode() if path.suffix in (".md", ".csv", ".txt", ".json") else data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--reports", nargs=2, metavar=("BEFORE", "AFTER"), help="report folders to compare byte for byte")
    args = parser.parse_args(argv)
    diffs = compare_stores(args.before, args.after)
    n_runs = len(runs(args.before if "://" in args.before else f"sqlite:///{Path(args.before).resolve()}"))
    if args.reports:
        diffs += compare_folders(Path(args.reports[0]), Path(args.reports[1]))
    for d in diffs:
        print(d)
    print(f"{n_runs} runs compared{' and the report folders' if args.reports else ''}: "
          + ("identical" if not diffs else f"{len(diffs)} difference(s)"))
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
