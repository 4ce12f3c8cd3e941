"""`text`: byte-level language modelling over local text files, the bytes case of `lm`.

The `lm` task with the `bytes` tokenizer and position difficulty: documents are files (`.txt`,
`.md`, `.py` ...; `.jsonl` / `.parquet` as in `lm`), split into train/val/test by a hash of
their text (5% val, 5% test), tokenized once into the `lm` cache, packed with byte 0xFF (never
in UTF-8) between documents. The vocabulary is the 256 byte values, so bits per byte are the
loss in bits (metrics `bpb_step{t}`). Difficulty = position in the window, bucketed: bucket 1
predicts from the shortest context, the last bucket from the longest.

Corpus: `paths` is a glob (`**` recursive, `~` expanded) of text files, or `stdlib` (the
default): the Python standard library's `*.py` sources, present on every machine with no
download (tests and site-packages left out). NOTE: the stdlib differs between Python versions;
every run logs the corpus's file, document, token and byte counts and its cache key.
"""

from __future__ import annotations

from dataclasses import dataclass

from ouro_lab.data.base import register_task
from ouro_lab.data.lm import BYTES, STDLIB, LMConfig, LMTask


@dataclass
class TextConfig:
    paths: str = STDLIB  # glob of text files, e.g. '~/notes/**/*.md', or 'stdlib' (Python's own sources)
    context: int = 128  # bytes per window = the model's sequence length
    buckets: int = 4  # context-position buckets the metrics are broken down by (1 = shortest context)
    decode_errors: str = "strict"  # a file not UTF-8: strict (refused, naming it) | replace (U+FFFD) | skip (the file)
    cache_dir: str = LMConfig.cache_dir  # tokenized splits, shared with data.task=lm


def as_lm(cfg: TextConfig) -> LMConfig:
    return LMConfig(source=cfg.paths, tokenizer=BYTES, context=cfg.context, difficulty="position",
                    buckets=cfg.buckets, decode_errors=cfg.decode_errors, cache_dir=cfg.cache_dir)


@register_task
class TextTask(LMTask):
    name = "text"
    Config = TextConfig
    section = "text"
    difficulty_name = "context bucket"

    def __init__(self, cfg: TextConfig):
        super().__init__(as_lm(cfg))

    @classmethod
    def check_config(cls, cfg: TextConfig) -> list[tuple[str, str]]:
        # The lm checks, with their keys and the keys their messages name put in data.text's terms.
        renamed = {"source": "paths"}
        return [(renamed.get(key, key), message.replace("data.lm.source", "data.text.paths")
                 .replace("data.lm.", "data.text."))
                for key, message in super().check_config(as_lm(cfg))]
