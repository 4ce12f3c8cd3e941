"""Damaged study files: an Optuna journal whose last record a crash cut mid-write, checked (and
where that is safe, repaired with a backup) before Optuna reads it."""

from __future__ import annotations

import datetime
import json
import os
import shutil
from pathlib import Path

from ouro_lab.errors import StoreError

RECORD_START = b'{"op_code"'  # how every record of Optuna's journal begins (json.dumps of its log dict)


def repair_journal(path: Path) -> str | None:
    """Check an Optuna journal file line by line; return what was repaired, or None.

    A crash mid-write leaves the last record cut (no newline). Optuna skips such a line on
    reading but appends the next record onto it, after which the whole study fails to load
    (JSONDecodeError). Repaired: a cut last line is dropped; a line that is a cut fragment
    followed by a whole record keeps the record. The original is kept beside it first
    (`<name>.damaged-<time>`). Any other damage is refused with the line to look at.
    NOTE: called under the journal's own lock, so no writer is mid-append.
    """
    if not path.is_file() or path.stat().st_size == 0:
        return None
    data = path.read_bytes()
    *lines, tail = data.split(b"\n")  # tail: b"" when the file ends with a newline, else a cut record
    kept, mended = [], []
    for number, line in enumerate(lines, start=1):
        if _is_record(line):
            kept.append(line)
            continue
        start = line.rfind(RECORD_START)
        if start > 0 and _is_record(line[start:]):
            kept.append(line[start:])
            mended.append(number)
            continue
        raise StoreError(
            f"study journal {path}: line {number} is not an Optuna record ({line[:60]!r}...) and cannot be "
            f"repaired automatically. The {number - 1} records before it are intact. Keep a copy of the file, "
            f"then delete that line (sed -i '{number}d' {path}) and rerun, or give the sweep a new name= "
            "to start a fresh study")
    if not tail and not mended:
        return None
    if tail and _is_record(tail):  # whole record, only its newline missing
        kept.append(tail)
        tail = b""
    backup = path.with_name(f"{path.name}.damaged-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    shutil.copy2(path, backup)
    fixed = path.with_name(path.name + ".repairing")
    fixed.write_bytes(b"".join(line + b"\n" for line in kept))
    os.replace(fixed, path)
    what = []
    if tail:
        what.append(f"dropped its cut last record ({len(tail)} bytes, a crash mid-write)")
    if mended:
        what.append(f"removed the cut fragment before the record on line(s) {', '.join(map(str, mended))}")
    return f"repaired study journal {path}: {'; '.join(what)}; the original is kept as {backup}"


def _is_record(line: bytes) -> bool:
    if not line.startswith(RECORD_START):
        return False
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False
