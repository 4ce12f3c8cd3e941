"""What the benchmark scripts share when they write a results page: the provenance block of a
measured table (command, commit, date, machine, torch threads, seeds) and the rewrite of the
table between its markers (`<!-- NAME: begin -->` ... `<!-- NAME: end -->`) in a docs page,
so running a script rewrites its table."""

from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def machine() -> str:
    """'Intel(R) Xeon(R) Processor, 2 cores, torch 2.13.0+cpu, CPU capability AVX512' (or the GPU)."""
    cpu = platform.machine()
    if Path("/proc/cpuinfo").exists():
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, CPU capability "
            f"{torch.backends.cpu.get_cpu_capability()}{gpu}")


def commit() -> str:
    """The short commit of the code, marked when the code (not the docs being written) has changes."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip() or "not recorded"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!docs"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    return f"{head} (with uncommitted changes)" if dirty else head


def provenance(command: str, seeds: str, commits: set[str] | None = None) -> list[str]:
    """The block every measured table of a results page carries (tests/test_docs.py checks it).
    `commits`: the commits the runs were trained at (their MLflow git tag), when they were read
    back rather than trained now; else this checkout's."""
    at = ", ".join(sorted(c[:7] for c in commits)) if commits else commit()
    return ['!!! info "Provenance"', f"    - command: `{command}`", f"    - commit: {at}",
            f"    - date: {datetime.date.today().isoformat()}", f"    - machine: {machine()}",
            f"    - torch threads: {torch.get_num_threads()}", f"    - seeds: {seeds}"]


def rewrite(page: Path, name: str, block: list[str]) -> None:
    """Replace what stands between the page's markers for `name` with `block`."""
    begin, end = f"<!-- {name}: begin -->", f"<!-- {name}: end -->"
    text = page.read_text()
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{page}: no {begin} ... {end} markers to write the table between")
    page.write_text(pattern.sub(lambda _: "\n".join([begin, "", *block, "", end]), text))
