"""`text`: byte-level language modelling over local text files.

Each example is a window of `context` bytes from one split's files, labelled with the next
byte at every position (vocabulary = the 256 byte values), so the loss in nats per label is
bits-per-byte times ln 2 (metrics `bpb_step{t}`). Difficulty = position in the window,
bucketed: bucket 1 predicts from the shortest context, the last bucket from the longest, so
per-step gains can be broken down by how much context the model had.

Corpus: `paths` is a glob (`**` recursive, `~` expanded) of text files, or `stdlib` (the
default): the Python standard library's `*.py` sources found through `sysconfig`, present on
every machine with no download (tests and site-packages left out). NOTE: the stdlib differs
between Python versions; every run logs the corpus's file count, bytes and fingerprint.
Train/val/test are split by file (never by window): files are ranked by a hash of their path
relative to the corpus root; the first 5% (at least one) are val, the next 5% test.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ouro_lab.data.base import SPLITS, Batch, PositionBucketTask, register_task

STDLIB = "stdlib"
STDLIB_EXCLUDED = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
HELD_OUT_SHARE = 0.05  # of the files, for each of val and test
SNIFF_BYTES = 8192  # a file with a NUL byte or invalid UTF-8 in its first bytes is not text


@dataclass
class TextConfig:
    paths: str = STDLIB  # glob of text files, e.g. '~/notes/**/*.md', or 'stdlib' (Python's own sources)
    context: int = 128  # bytes per window = the model's sequence length
    buckets: int = 4  # context-position buckets the metrics are broken down by (1 = shortest context)


class CorpusError(ValueError):
    """The corpus named by data.text.paths cannot be used."""


@dataclass(frozen=True)
class Corpus:
    root: Path  # paths are split by their name relative to this folder
    files: tuple[Path, ...]  # sorted
    splits: tuple[tuple[Path, ...], ...]  # files of train, val, test
    split_bytes: tuple[int, int, int]  # bytes in train, val, test when the corpus was found
    fingerprint: str  # hash of the names (relative to root) and sizes per split: same = same corpus and split


@functools.lru_cache(maxsize=8)
def find_corpus(paths: str) -> Corpus:
    """The files `paths` names, checked to be text, split by file. Raises CorpusError."""
    if paths == STDLIB:
        root = Path(sysconfig.get_paths()["stdlib"])
        files = []
        for folder, subfolders, names in os.walk(root):
            subfolders[:] = sorted(d for d in subfolders if d not in STDLIB_EXCLUDED)  # prune, don't walk
            files += [Path(folder, name) for name in names if name.endswith(".py")]
    else:
        pattern = os.path.expanduser(paths)
        if os.path.isdir(pattern):
            raise CorpusError(f"{paths!r} is a folder; give a glob of its text files, e.g. "
                              f"'{pattern.rstrip('/')}/**/*.md'")
        files = [Path(p) for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
        root = Path(_glob_root(pattern))
    if not files:
        raise CorpusError(f"{paths!r} matches no files")
    # NOTE: names stay as found (absolute, symlinks not resolved: a link may point outside the
    # root, e.g. Debian's stdlib sitecustomize.py -> /etc); a file reached twice counts once.
    root, unique = root.absolute(), {}
    for f in sorted(f.absolute() for f in files):
        unique.setdefault(f.resolve(), f)
    files = sorted(unique.values())
    if len(files) < 3:
        raise CorpusError(f"{paths!r} matches {len(files)} file(s); the train/val/test split is by file "
                          "and needs at least 3")
    for f in files:
        problem = _not_text(f)
        if problem:
            raise CorpusError(f"{f} is not a text file ({problem}); narrow the glob {paths!r} to text files")
    ranked = sorted(files, key=lambda f: hashlib.sha1(str(f.relative_to(root)).encode()).hexdigest())
    n_held = max(1, round(HELD_OUT_SHARE * len(files)))
    val, test, train = ranked[:n_held], ranked[n_held:2 * n_held], ranked[2 * n_held:]
    splits = tuple(tuple(sorted(s)) for s in (train, val, test))
    h = hashlib.sha1()
    for name, split in zip(SPLITS, splits):
        for f in split:
            h.update(f"{name}:{f.relative_to(root)}:{f.stat().st_size}\n".encode())
    sizes = tuple(sum(f.stat().st_size for f in split) for split in splits)
    return Corpus(root, tuple(files), splits, sizes, h.hexdigest()[:12])


def _glob_root(pattern: str) -> str:
    """The folder part of a glob before its first wildcard."""
    parts = []
    for part in Path(pattern).parts[:-1]:
        if glob.has_magic(part):
            break
        parts.append(part)
    return os.path.join(*parts) if parts else "."


def _not_text(path: Path) -> str | None:
    head = path.open("rb").read(SNIFF_BYTES)
    if b"\0" in head:
        return "NUL bytes"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.start < len(head) - 3:  # not just a character cut at the sniffed boundary
            return f"not UTF-8 at byte {err.start}"
    return None


@register_task
class TextTask(PositionBucketTask):
    name = "text"
    Config = TextConfig
    difficulty_name = "context bucket"
    byte_level = True

    def __init__(self, cfg: TextConfig):
        super().__init__(cfg)
        self._bytes: dict[str, np.ndarray] = {}

    @classmethod
    def check_config(cls, cfg: TextConfig) -> list[tuple[str, str]]:
        problems = []
        if cfg.context < 2:
            problems.append(("context", f"must be >= 2, got {cfg.context}"))
        problems += cls.bucket_problems(cfg.buckets, cfg.context, "context")
        try:
            corpus = find_corpus(cfg.paths)
        except CorpusError as err:
            return problems + [("paths", str(err))]
        for name, files, size in zip(SPLITS, corpus.splits, corpus.split_bytes):
            if size < cfg.context + 1:
                problems.append(("paths", f"the {name} split ({len(files)} file(s), {size} bytes) is shorter "
                                          f"than one window of data.text.context + 1 = {cfg.context + 1} bytes"))
        return problems

    @property
    def corpus(self) -> Corpus:
        return find_corpus(self.cfg.paths)

    def describe(self) -> dict[str, object]:
        c = self.corpus
        return {"corpus_files": len(c.files), "corpus_bytes": sum(c.split_bytes), "corpus_fingerprint": c.fingerprint,
                **{f"corpus_{name}_files": len(files) for name, files in zip(SPLITS, c.splits)}}

    @property
    def vocab_size(self) -> int:
        return 256

    @property
    def seq_len(self) -> int:
        return self.cfg.context

    def render(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def split_bytes(self, split: str) -> np.ndarray:
        """The split's files, concatenated (read once per process)."""
        if split not in self._bytes:
            files = self.corpus.splits[SPLITS.index(split)]
            self._bytes[split] = np.frombuffer(b"".join(f.read_bytes() for f in files), dtype=np.uint8)
        return self._bytes[split]

    def __getstate__(self):  # DataLoader workers re-read the files rather than receive copies
        return {**self.__dict__, "_bytes": {}}

    def sample(self, rng: np.random.Generator, n: int, split: str, step: int = 0) -> Batch:
        data = self.split_bytes(split)
        S = self.cfg.context
        start = rng.integers(0, len(data) - S, size=n)
        windows = data[start[:, None] + np.arange(S + 1)].astype(np.int64)  # (n, S+1)
        return Batch(windows[:, :-1], windows[:, 1:], self.position_difficulty(n))
