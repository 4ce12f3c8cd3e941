"""`ouro-lab` command line: a run is one config plus key=value overrides.

    ouro-lab train conf/state.yaml model.loops=4 model.arch=depth_matched
    ouro-lab eval outputs/ouro-lab/<run_id>/checkpoints/last.ckpt eval.extra_loops=4
    ouro-lab sweep sweeps/loops.yaml seeds=1 train.max_steps=500
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ouro_lab.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ouro-lab", description="Looped-LM ablations: train, evaluate.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train one model from a YAML config (+ key=value overrides)")
    p_train.add_argument("config", help="experiment YAML, e.g. conf/state.yaml")
    p_train.add_argument("overrides", nargs="*", help="key=value, e.g. model.loops=4 model.arch=depth_matched")
    p_eval = sub.add_parser("eval", help="re-evaluate a checkpoint at every loop step (incl. extra loops)")
    p_eval.add_argument("checkpoint", help="a .ckpt written by `ouro-lab train`")
    p_eval.add_argument("overrides", nargs="*", help="eval.* or data.* overrides, e.g. eval.extra_loops=6")
    p_eval.add_argument("--split", choices=("val", "test"), default="test")
    p_sweep = sub.add_parser("sweep", help="run or resume an Optuna study declared in sweeps/*.yaml")
    p_sweep.add_argument("sweep", help="sweep YAML, e.g. sweeps/loops.yaml")
    p_sweep.add_argument("overrides", nargs="*",
                         help="sweep keys (trials=4 seeds=1 sampler.seed=3 ...) or experiment keys (train.max_steps=500)")
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            cfg = load_config(args.config, args.overrides)
            from ouro_lab.train import train  # heavy imports after the config is known to be valid

            train(cfg)
        elif args.command == "sweep":
            from ouro_lab.sweep import run_sweep

            summary = run_sweep(args.sweep, args.overrides)
            if not summary.counts.get("COMPLETE") and not summary.counts.get("PRUNED"):
                print(f"ouro-lab: every trial of study {summary.name!r} failed ({summary.counts}); "
                      "see the `error` tag of its runs in MLflow", file=sys.stderr)
                return 1
        else:
            from ouro_lab.evaluate import evaluate_checkpoint

            print(evaluate_checkpoint(Path(args.checkpoint), args.overrides, args.split).table)
    except ConfigError as err:
        print(f"ouro-lab: config error: {err}", file=sys.stderr)
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


if __name__ == "__main__":
    sys.exit(main())
