"""`ouro-lab` command line: a run is one config plus key=value overrides.

    ouro-lab train conf/state.yaml model.loops=4 model.arch=depth_matched
    ouro-lab eval outputs/ouro-lab/<run_id>/checkpoints/last.ckpt eval.extra_loops=4
    ouro-lab eval CKPT infer.exit_rule=q infer.exit_threshold=0.5   # + skip semantics vs selection
    ouro-lab generate CKPT infer.prompt='def main(' infer.cache=last infer.exit_rule=q
    ouro-lab decode CKPT infer.exit_rule=q infer.exit_threshold=0.5 # cache strategies: bpb, bytes, tokens/s
    ouro-lab import-hf path/to/Ouro-1.4B out.ckpt data.task=text     # a released checkpoint as an ouro-lab one
    ouro-lab tokenizer '~/corpus/*.jsonl' tok/tokenizer.json --vocab-size 8192   # BPE for data.task=lm
    ouro-lab bench CKPT tasks/piqa.jsonl infer.exit_rule=q   # multiple-choice accuracy at every loop step
    ouro-lab sweep sweeps/loops.yaml seeds=1 train.max_steps=500
    ouro-lab sweep sweeps/gate.yaml --dry-run        # validate, list the trials, train nothing
    ouro-lab report loops --epsilon 0.01
    ouro-lab studies                                 # the studies in ./mlflow.db with their trial counts
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ouro_lab.config import ConfigError, load_config
from ouro_lab.errors import StoreError
from ouro_lab.models.hf import HFImportError


def build_parser() -> argparse.ArgumentParser:
    """The `ouro-lab` parser with every subcommand (the docs' CLI reference prints its help)."""
    parser = argparse.ArgumentParser(prog="ouro-lab", description="Looped-LM ablations: train, evaluate.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train one model from a YAML config (+ key=value overrides)")
    p_train.add_argument("config", help="experiment YAML, e.g. conf/state.yaml")
    p_train.add_argument("overrides", nargs="*", help="key=value, e.g. model.loops=4 model.arch=depth_matched")
    p_eval = sub.add_parser("eval", help="re-evaluate a checkpoint at every loop step (incl. extra loops)")
    p_eval.add_argument("checkpoint", help="a .ckpt written by `ouro-lab train`")
    p_eval.add_argument("overrides", nargs="*", help="eval.* or data.* overrides, e.g. eval.extra_loops=6")
    p_eval.add_argument("--split", choices=("val", "test"), default="test")
    p_eval.add_argument("--no-log", action="store_true",
                        help="do not log the evaluation to MLflow (default: a run of its own, linked to the trained run)")
    p_gen = sub.add_parser("generate", help="generate from a checkpoint with a KV cache and per-token early exit (infer.*)")
    p_gen.add_argument("checkpoint", help="a .ckpt written by `ouro-lab train` (or `ouro-lab import-hf`)")
    p_gen.add_argument("overrides", nargs="*", help="infer.* keys, e.g. infer.prompt='def f(' infer.cache=last "
                                                   "infer.exit_rule=q infer.exit_threshold=0.5")
    p_dec = sub.add_parser("decode", help="teacher-forced cached decoding of test text per cache strategy: "
                                          "bits per byte, cache bytes, tokens/s, mean loops")
    p_dec.add_argument("checkpoint", help="a .ckpt of a byte-level (text) model")
    p_dec.add_argument("overrides", nargs="*", help="infer.* keys, e.g. infer.exit_rule=q infer.windows=64")
    p_bench = sub.add_parser("bench", help="multiple-choice benchmarks (jsonl) scored at every loop step: acc, acc_norm")
    p_bench.add_argument("checkpoint", help="a .ckpt of `ouro-lab train` or `ouro-lab import-hf`")
    p_bench.add_argument("items", nargs="+", metavar="FILE.jsonl | key=value",
                         help="task files ({context, choices, gold} per line), then eval/infer overrides, e.g. "
                              "infer.exit_rule=q infer.exit_threshold=0.5")
    p_bench.add_argument("--no-log", action="store_true", help="do not log the scores to MLflow")
    p_imp = sub.add_parser("import-hf", help="a released Ouro checkpoint (Hugging Face folder) as an ouro-lab .ckpt")
    p_imp.add_argument("folder", help="folder with config.json and model.safetensors")
    p_imp.add_argument("out", help="the .ckpt to write")
    p_imp.add_argument("overrides", nargs="*", help="data.*, eval.*, infer.* keys, e.g. data.task=text "
                                                   "data.text.paths='~/corpus/*.txt'")
    p_tok = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer on a corpus's train split "
                                             "(for data.lm.tokenizer)")
    p_tok.add_argument("source", help="the corpus, as data.lm.source: a glob of .txt / .jsonl / .parquet files")
    p_tok.add_argument("out", help="the tokenizer.json to write")
    p_tok.add_argument("--vocab-size", type=int, default=8192, help="tokens, the end-of-document token included "
                                                                    "(default 8192)")
    p_tok.add_argument("--text-field", default="text", help="jsonl / parquet: the column holding the text")
    p_tok.add_argument("--decode-errors", default="strict", choices=("strict", "replace", "skip"),
                       help=".txt files that are not UTF-8, as data.lm.decode_errors (default strict)")
    p_sweep = sub.add_parser("sweep", help="run or resume an Optuna study declared in sweeps/*.yaml")
    p_sweep.add_argument("sweep", help="sweep YAML, e.g. sweeps/loops.yaml")
    p_sweep.add_argument("overrides", nargs="*",
                         help="sweep keys (trials=4 seeds=1 sampler.seed=3 ...) or experiment keys (train.max_steps=500)")
    p_sweep.add_argument("--workers", type=int, default=1,
                         help="worker processes on this study (one per GPU when there are that many; "
                              "else CPU workers sharing the cores)")
    p_sweep.add_argument("--gpus", default="", help="comma-separated GPU ids, one worker pinned to each, e.g. 0,1,3")
    p_sweep.add_argument("--as-worker", type=int, default=None, help=argparse.SUPPRESS)
    p_sweep.add_argument("--dry-run", action="store_true",
                         help="validate the sweep and print the trials it would run; train nothing")
    p_studies = sub.add_parser("studies", help="list the studies (sweeps) in an MLflow store with their trial counts")
    p_studies.add_argument("--store", default=None,
                           help="MLflow tracking URI or sqlite file (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    p_report = sub.add_parser("report", help="saturation report of a study: Markdown + plots, logged on its MLflow parent run")
    p_report.add_argument("study", help="study name (= its MLflow experiment) or an MLflow experiment name / id")
    p_report.add_argument("--store", default=None,
                          help="MLflow tracking URI or sqlite file (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    p_report.add_argument("--out", default=None, help="report folder (default: reports/<study>)")
    p_report.add_argument("--epsilon", type=float, default=0.01,
                          help="saturation threshold: the smallest gain from more loops that counts (default 0.01)")
    p_report.add_argument("--metric", default=None, help="metric kind: acc, loss ... (default: the sweep objective's)")
    p_report.add_argument("--split", choices=("val", "test"), default=None, help="default: test when logged, else val")
    p_report.add_argument("--level", type=float, default=0.95, help="confidence level of intervals (default 0.95)")
    p_report.add_argument("--no-log", action="store_true", help="do not log the report as MLflow artifacts")
    p_report.add_argument("--runs", choices=("auto", "train", "eval"), default="auto",
                          help="the runs analysed: training runs, or `ouro-lab eval` runs (the latest per checkpoint: "
                               "e.g. an imported checkpoint); default auto = train, else eval when there are only evals")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may also follow an option (`eval CKPT --split test infer.exit_rule=q`):
    # argparse ends a nargs="*" positional at the first option and cannot intermix with subcommands
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "train":
            cfg = load_config(args.config, args.overrides)
            from ouro_lab.train import train  # heavy imports after the config is known to be valid

            train(cfg)
        elif args.command == "sweep" and args.dry_run:
            from ouro_lab.sweep.dry_run import describe

            print(describe(args.sweep, args.overrides))
        elif args.command == "studies":
            return _studies(args)
        elif args.command == "tokenizer":
            from ouro_lab.data.lm import CorpusError, train_tokenizer

            try:
                out = train_tokenizer(args.source, args.out, args.vocab_size, args.text_field,
                                      decode_errors=args.decode_errors)
            except CorpusError as err:
                print(f"ouro-lab: {err}", file=sys.stderr)
                return 2
            print(f"[tokenizer] {out}: byte-level BPE, {args.vocab_size} tokens, trained on the train split of "
                  f"{args.source}\n  use it: data.task=lm data.lm.source='{args.source}' data.lm.tokenizer={out}")
        elif args.command == "import-hf":
            from ouro_lab.checkpoints import import_hf

            cfg, out = import_hf(Path(args.folder), Path(args.out), args.overrides)
            m = cfg.model
            print(f"[import-hf] {args.folder}: looped {m.n_layers} layers x {m.loops} loops, d={m.d_model}, "
                  f"RoPE {m.rope_layout} base {m.rope_base:g} -> {out}\n"
                  f"  evaluate it: ouro-lab eval {out}   generate: ouro-lab generate {out}")
        elif args.command == "bench":
            from ouro_lab.choice import run_bench

            files = [item for item in args.items if "=" not in item]
            if not files:
                raise ConfigError("bench: name at least one task file (a .jsonl of {context, choices, gold} lines)")
            overrides = [item for item in args.items if "=" in item]
            print(run_bench(Path(args.checkpoint), files, overrides, log=not args.no_log))
        elif args.command in ("generate", "decode"):
            from ouro_lab.inference import run_decode, run_generate

            run = run_generate if args.command == "generate" else run_decode
            print(run(Path(args.checkpoint), args.overrides))
        elif args.command == "sweep":
            from ouro_lab.sweep import run_sweep, run_worker

            if args.as_worker is not None:
                run_worker(args.sweep, args.overrides, args.as_worker)
                return 0
            if args.workers < 1:
                print("ouro-lab: --workers must be >= 1", file=sys.stderr)
                return 2
            gpus = [g.strip() for g in args.gpus.split(",") if g.strip()]
            summary = run_sweep(args.sweep, args.overrides, workers=args.workers, gpus=gpus)
            if not summary.counts.get("COMPLETE") and not summary.counts.get("PRUNED"):
                print(f"ouro-lab: every trial of study {summary.name!r} failed ({summary.counts}); "
                      "see the `error` tag of its runs in MLflow", file=sys.stderr)
                return 1
        elif args.command == "report":
            return _report(args)
        else:
            from ouro_lab.evaluate import evaluate_checkpoint

            result = evaluate_checkpoint(Path(args.checkpoint), args.overrides, args.split, log=not args.no_log)
            print(result.table)
            if result.where:
                print(f"[ouro-lab] evaluation logged as run {result.run_id} in {result.store} (experiment "
                      f"{result.experiment!r}; tracking.uri=... to log elsewhere, "
                      f"--no-log for nowhere)\n[ouro-lab] view: {result.where}")
    except StoreError as err:
        print(f"ouro-lab: {err}", file=sys.stderr)
        return 2
    except ConfigError as err:
        print(f"ouro-lab: config error: {err}", file=sys.stderr)
        return 2
    except HFImportError as err:
        print(f"ouro-lab: cannot import: {err}", file=sys.stderr)
        return 2
    except FileNotFoundError as err:
        print(f"ouro-lab: {err}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, SystemExit):
        return 130
    except FloatingPointError as err:
        print(f"ouro-lab: training diverged: {err}", file=sys.stderr)
        return 1
    return 0


def _studies(args: argparse.Namespace) -> int:
    from ouro_lab import analysis

    try:
        table = analysis.list_studies(args.store)
    except analysis.AnalysisError as err:
        print(f"ouro-lab: {err}", file=sys.stderr)
        return 2
    print(table.to_string(index=False) if len(table) else "no studies in this store (sweeps create them)")
    return 0


def _report(args: argparse.Namespace) -> int:
    from ouro_lab import analysis

    if not 0 < args.level < 1 or args.epsilon < 0:
        print("ouro-lab: --level must be in (0, 1) and --epsilon >= 0", file=sys.stderr)
        return 2
    try:
        try:
            data = analysis.load_study(args.study, args.store, args.runs)
        except analysis.AnalysisError:
            bench = analysis.load_bench(args.study, args.store) if args.runs == "auto" else []
            if not len(bench):
                raise
            return _bench_report(args, bench)
        out = Path(args.out or Path("reports") / data.name)
        what = "`ouro-lab eval` runs" if data.source == "eval" else "runs"
        print(f"[report] study {data.name!r}: {len(data.runs)} complete {what} analysed (unit runs by state: "
              f"{', '.join(f'{k} {v}' for k, v in sorted(data.counts.items()))}) from {data.tracking_uri}", flush=True)
        report = analysis.write_report(data, out, epsilon=args.epsilon, kind=args.metric, split=args.split,
                                       level=args.level, log=not args.no_log)
    except analysis.AnalysisError as err:
        print(f"ouro-lab: {err}", file=sys.stderr)
        return 2
    print(report.table)
    print(f"\nreport: {report.folder / 'report.md'} ({len(report.files)} files)")
    if data.parent_run_id and not args.no_log:
        from ouro_lab.tracking import where_to_look

        look = where_to_look(data.tracking_uri, data.experiment_id, data.parent_run_id)
        print(f"logged as artifacts report/ of the study run: {look}")
    return 0


def _bench_report(args: argparse.Namespace, bench) -> int:
    """An experiment of `ouro-lab bench` runs only (e.g. an imported model): their accuracy table."""
    from ouro_lab import analysis

    out = Path(args.out or Path("reports") / args.study)
    print(f"[report] experiment {args.study!r}: benchmark runs only ({bench['run_id'].nunique()}); "
          "accuracy vs loop step", flush=True)
    report = analysis.write_bench_report(args.study, bench, out)
    print(report.table)
    print(f"\nreport: {report.folder / 'report.md'} ({len(report.files)} files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
