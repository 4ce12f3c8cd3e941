"""What the benchmark scripts share when they write a results page: the provenance block of a
measured table (command, commit, date, machine, torch threads, seeds) and the rewrite of the
table between its markers (`<!-- NAME: begin -->` ... `<!-- NAME: end -->`) in a docs page,
so running a script rewrites its table."""

from __future__ import annotations

import datetime
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ouro_lab.tracking import machine  # noqa: E402  (a run's tag ouro.machine says the same)


def commit() -> str:
    """The short commit of the code, marked when the code (not the docs being written) has changes."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip() or "not recorded"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!docs"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    return f"{head} (with uncommitted changes)" if dirty else head


def provenance(command: str, seeds: str, commits: set[str] | None = None, machines: set[str] | None = None) -> list[str]:
    """The block every measured table of a results page carries (tests/test_docs.py checks it).
    `commits`, `machines`: what the runs were trained at and on (their MLflow tags), when they
    were read back rather than trained now; else this checkout's and this machine."""
    at = ", ".join(sorted(c[:7] if len(c) == 40 else c for c in commits)) if commits else commit()
    on = "; ".join(sorted(machines)) if machines else machine()
    return ['!!! info "Provenance"', f"    - command: `{command}`", f"    - commit: {at}",
            f"    - date: {datetime.date.today().isoformat()}", f"    - machine: {on}",
            f"    - torch threads: {torch.get_num_threads()}", f"    - seeds: {seeds}"]


def run_study(sweep: Path, out: Path, sets: list[str]) -> tuple[str, float]:
    """Run (or resume, or find finished) a sweep in `out` (its MLflow store and Optuna journal
    there); its name and wall seconds, as measured by the call that ran it to its end (kept in
    out/wall.json: a rerun of a finished study takes seconds and keeps the first)."""
    import json
    import time

    from ouro_lab.sweep import run_sweep

    out.mkdir(parents=True, exist_ok=True)
    wall_file = out / "wall.json"
    here = os.getcwd()
    os.chdir(out)  # (the sweep's default store and journal: the working directory)
    try:
        start = time.perf_counter()
        summary = run_sweep(sweep, sets, verbose=True)
        seconds = time.perf_counter() - start
    finally:
        os.chdir(here)
    walls = json.loads(wall_file.read_text()) if wall_file.exists() else {}
    if summary.name not in walls or seconds > 60:
        walls[summary.name] = seconds
        wall_file.write_text(json.dumps(walls, indent=1))
    return summary.name, walls[summary.name]


def trained_at(data) -> tuple[set[str], set[str]]:
    """The commits (marked when the tree had changes) and machines a study's runs were trained
    at and on: their MLflow tags, for `provenance`."""
    from mlflow.tracking import MlflowClient

    from ouro_lab import run_record as rr

    client = MlflowClient(data.tracking_uri)
    tags = [client.get_run(run_id).data.tags for run_id in data.runs["run_id"]]
    commits = {t[rr.GIT_COMMIT][:7] + (" (with uncommitted changes)" if t.get(rr.GIT_DIRTY) == "True" else "")
               for t in tags if t.get(rr.GIT_COMMIT)}
    return commits, {t[rr.MACHINE] for t in tags if t.get(rr.MACHINE)}


def study_main(doc: str, sweep: str, page: str, blocks) -> None:
    """The command line of a study's results script (`benchmarks/loops_study.py` ...): run the
    sweep `sweeps/<sweep>` in `--out` (default runs/<script name>), read it back, and print the
    blocks `blocks(data, summary, provenance block)` returns ({marker: lines}), rewriting each
    between its markers in `page` (or `--page`). `--set KEY=VALUE` passes sweep overrides (a
    smaller study, to try the script); the page is then left alone unless `--page` is given."""
    import argparse

    from ouro_lab.analysis import load_study

    script = Path(sys.argv[0]).stem
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / script)
    parser.add_argument("--page", type=Path, default=None,
                        help=f"the page to rewrite (default: {page}, unless --set is given)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a sweep override")
    args = parser.parse_args()
    target = args.page or (None if args.set else ROOT / page)
    name, wall = run_study(ROOT / "sweeps" / sweep, args.out, args.set)
    data = load_study(name, f"sqlite:///{(args.out / 'mlflow.db').resolve()}")
    commits, machines = trained_at(data)
    seeds = ", ".join(str(s) for s in sorted(data.runs["seed"].unique()))
    summary = (f"{len(data.trials)} trials, {len(data.runs)} runs, **{wall:.0f} s wall ({wall / 60:.0f} min)** "
               f"on {'; '.join(sorted(machines)) or 'this machine'}.")
    command = f"python benchmarks/{script}.py" + "".join(f" --set {s}" for s in args.set)
    written = blocks(data, summary, provenance(command, seeds, commits, machines))
    for lines in written.values():
        print("\n".join(lines) + "\n")
    if target is None:
        return
    for marker, lines in written.items():
        rewrite(target, marker, lines)
    print(f"rewrote {target}")


def rewrite(page: Path, name: str, block: list[str]) -> None:
    """Replace what stands between the page's markers for `name` with `block`."""
    begin, end = f"<!-- {name}: begin -->", f"<!-- {name}: end -->"
    text = page.read_text()
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{page}: no {begin} ... {end} markers to write the table between")
    page.write_text(pattern.sub(lambda _: "\n".join([begin, "", *block, "", end]), text))
