"""What the benchmark scripts share when they write a results page: the provenance block of a
measured table (command, commit, date, machine, torch threads, seeds) and the rewrite of the
table between its markers (`<!-- NAME: begin -->` ... `<!-- NAME: end -->`) in a docs page,
so running a script rewrites its table."""

from __future__ import annotations

import datetime
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


def rewrite(page: Path, name: str, block: list[str]) -> None:
    """Replace what stands between the page's markers for `name` with `block`."""
    begin, end = f"<!-- {name}: begin -->", f"<!-- {name}: end -->"
    text = page.read_text()
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{page}: no {begin} ... {end} markers to write the table between")
    page.write_text(pattern.sub(lambda _: "\n".join([begin, "", *block, "", end]), text))
