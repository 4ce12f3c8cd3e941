"""mkdocs hook: the reference pages, generated from the code at every build so they cannot go
stale: every config key (type, default, the comment beside it in `ouro_lab/config.py` and the
task configs), every metric name and run-record name, and the CLI's help. Nothing is written
into the repository: the pages exist only in the built site."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import textwrap
import tokenize
import typing

from mkdocs.structure.files import File

PAGES = {}  # src_uri -> function returning the page's markdown


def page(uri: str):
    def register(fn):
        PAGES[uri] = fn
        return fn
    return register


def _comments(cls) -> dict[str, str]:
    """{field name: the comment at the end of its line, or the comment lines just above it}."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    by_line = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            by_line[tok.start[0]] = tok.string.lstrip("#").strip()
    out = {}
    for i, line in enumerate(lines, start=1):
        stripped = line.strip()
        if ":" not in stripped or stripped.startswith(("#", "@", "def ", "class ", '"')):
            continue
        name = stripped.split(":", 1)[0].strip()
        if not name.isidentifier():
            continue
        if i in by_line:
            out[name] = by_line[i]
        else:  # a comment block right above the field
            above, j = [], i - 1
            while j >= 1 and lines[j - 1].strip().startswith("#"):
                above.insert(0, by_line.get(j, ""))
                j -= 1
            if above:
                out[name] = " ".join(above)
    return out


def _type_name(tp) -> str:
    if isinstance(tp, str):
        return tp
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " | ".join(_type_name(a) for a in args) + " | None"
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _default(value) -> str:
    return "`None`" if value is None else f"`{value!r}`" if not isinstance(value, str) else f'`"{value}"`'


def _rows(obj, prefix: str) -> list[str]:
    cls = type(obj)
    hints = typing.get_type_hints(cls)
    notes = _comments(cls)
    rows = []
    for f in dataclasses.fields(cls):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            rows.append(("section", key, notes.get(f.name, "")))
            rows.extend(_rows(value, key + "."))
        else:
            rows.append(("key", key, _type_name(hints.get(f.name, f.type)), _default(value), notes.get(f.name, "")))
    return rows


@page("reference/config.md")
def config_page() -> str:
    from ouro_lab.config import ExperimentConfig

    out = ["# Config keys", "",
           "Every key of an experiment config, generated from `ouro_lab/config.py` (and each task's own "
           "config class) at every docs build: its type, its default, and the comment beside it in the "
           "code. Set any key in a YAML file under `conf/` or on the command line as `key=value` "
           "(`ouro-lab train conf/state.yaml model.loops=8`); an unknown key or a wrong type is refused "
           "with the key named. Only the `data.<task>` section of the chosen `data.task` is read.", ""]
    table_open = False
    for row in _rows(ExperimentConfig(), ""):
        if row[0] == "section":
            _, key, note = row
            depth = key.count(".")
            out += ["", f"{'#' * (2 + min(depth, 1))} `{key}`", ""] + ([_cell(note), ""] if note else [])
            out += ["| key | type | default | meaning |", "|---|---|---|---|"]
            table_open = True
            continue
        _, key, tp, default, note = row
        assert table_open, key
        out.append(f"| `{key}` | {_cell(tp)} | {_cell(default)} | {_cell(note)} |")
    return "\n".join(out) + "\n"


@page("reference/metrics.md")
def metrics_page() -> str:
    from ouro_lab import metric_names, run_record
    from ouro_lab.config import load_config

    cfg = load_config()
    m = cfg.model
    e = cfg.eval
    rules = {"q": list(e.exit_q), "conf": list(e.exit_confidence), "change": list(e.exit_step_change)}
    names = sorted(metric_names.metric_names(cfg.eval_loops, m.trained_loops, [1, 2], True, splits=("val",),
                                             exit_rules=rules))
    record = [(k, v) for k, v in vars(run_record).items() if k.isupper() and isinstance(v, str)]
    out = ["# Metric and run-record names", "",
           "Generated from `ouro_lab/metric_names.py` and `ouro_lab/run_record.py` at every docs build: "
           "the metric names every run logs to MLflow, and the tags, params and roles that make up its "
           "run record. These modules are the only places in the code that spell them.", "",
           "## The scheme", "", "```text", textwrap.dedent(metric_names.__doc__ or "").strip(), "```", "",
           "## Every validation metric of the default looped model", "",
           f"The default config (`{m.arch}`, T={m.loops}, {cfg.eval.extra_loops} extra evaluation loop(s)), "
           "with two difficulty levels `_d1`, `_d2`, logs these on `val/` (and the same on `test/`); "
           f"{len(names)} names (the early-exit frontier's `exit_*` and `oracle_*` are most of them: one "
           "per rule, threshold, kind and level; a run logs those as the table artifacts "
           "`frontier/<split>.csv`, not as MLflow metrics, and readers get them back under these names):", "",
           '??? note "The names"', "", "    ```text", *[f"    {n}" for n in names], "    ```", "",
           "## Run record: tags, params and roles", "",
           textwrap.dedent(run_record.__doc__ or "").strip(), "",
           "| constant in `run_record.py` | value |", "|---|---|",
           *[f"| `{k}` | `{_cell(v)}` |" for k, v in sorted(record)]]
    return "\n".join(out) + "\n"


@page("reference/cli.md")
def cli_page() -> str:
    from ouro_lab.cli import build_parser

    parser = build_parser()
    out = ["# Command line", "", "Generated from the `ouro-lab` parser at every docs build: the help of "
           "the command and of each subcommand, as `ouro-lab COMMAND --help` prints it.", "",
           "```text", parser.format_help().strip(), "```"]
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))  # (argparse has no public accessor)
    for name, sub in subs.choices.items():
        out += ["", f"## `ouro-lab {name}`", "", "```text", sub.format_help().strip(), "```"]
    return "\n".join(out) + "\n"


def on_files(files, config):
    for uri, make in PAGES.items():
        files.append(File.generated(config, uri, content=make()))
    return files
