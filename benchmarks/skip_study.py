"""Does early exit pay when it really skips compute? The table in docs/results/decoding.md
(marker skip-table): on `state` (sweeps/exit_aware.yaml, 2 seeds), `text`
(sweeps/exit_aware_text.yaml, 1 seed) and real text (`lm`, sweeps/exit_aware_lm.yaml, 2 seeds;
set up as conf/lm_cpu.yaml says), models trained at full depth or with exit-aware training
(one per exited_kv rule) are evaluated on their skip frontier (Q-exit at QS, each exited_kv):

    python benchmarks/skip_study.py [--out runs/skip_study] [--tasks state,text,lm] [--set KEY=VALUE]

For each model and exited_kv: at the q where selection semantics stays within eval.exit_epsilon
of full depth with the fewest loops, skip semantics' value, its gap to selection, whether it
stays within epsilon of full depth and the executed FLOPs it saves; its cheapest point within
epsilon; the tokens/s of one sequence decoded token by token (full KV cache) at that q against
full depth; and the seconds per training step with and without exit-aware training. Seed means
(± std over seeds where there are two). The studies run in `--out` (a finished one is read
back, an interrupted one resumes), every evaluation is logged into its study's experiment
(`ouro-lab report exit_aware` then shows the skip frontier). `--set` passes sweep overrides to
both studies (a miniature: `--set train.max_steps=40`); the page is then left alone unless
`--page` is given.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from results_page import provenance, rewrite, run_study, trained_at  # noqa: E402

QS = [0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9]  # the frontier's thresholds: 8 x 3 skip passes per model
SWEEPS = {"state": "exit_aware.yaml", "text": "exit_aware_text.yaml", "lm": "exit_aware_lm.yaml"}
TRAINING = {"none": "full depth", "sampled": "exit-aware"}


def evaluate(run, store: str, experiment: str, client) -> dict[str, float]:
    """The run's checkpoint's skip frontier, logged into `experiment` (reused when logged before)."""
    from ouro_lab import run_record as rr
    from ouro_lab import tracking
    from ouro_lab.evaluate import evaluate_checkpoint

    ckpt = run.data.tags[rr.CHECKPOINT]
    done = client.search_runs([run.info.experiment_id], f"tags.`{rr.CHECKPOINT}` = '{ckpt}' and "
                              f"tags.`{rr.ROLE}` = '{rr.EVAL_RUN}' and attributes.status = 'FINISHED'")
    for r in done:  # (an evaluation at other thresholds is not this one)
        if r.data.params.get("infer.frontier") == "True" and r.data.params.get("eval.exit_q") == str(QS):
            return tracking.read_metrics(client, r)
    result = evaluate_checkpoint(Path(ckpt), ["infer.exit_rule=q", "infer.frontier=true", f"eval.exit_q={QS}",
                                              f"tracking.uri={store}", f"tracking.experiment={experiment}"], log=True)
    return result.metrics


def lone_tokens_per_s(ckpt: str, q: float, variants: list[str]) -> dict[str, float]:
    """Tokens/s of one test sequence decoded token by token (the first quarter prefilled, full
    KV cache): full depth, and Q-exit at q with each exited_kv. Best of 3 (the least disturbed)."""
    import torch

    from ouro_lab.builders import make_datamodule
    from ouro_lab.checkpoints import load_checkpoint
    from ouro_lab.models.decoding import ExitRule, teacher_forced

    cfg, module = load_checkpoint(Path(ckpt))
    tokens, _, _ = make_datamodule(cfg, module.task).eval_set("test")[:1]
    prefill = tokens.shape[1] // 4
    model = module.model.eval()
    rules = {"full depth": ExitRule(), **{kv: ExitRule("q", q, kv) for kv in variants}}
    out = {}
    with torch.no_grad():
        teacher_forced(model, tokens, prefill, rules["full depth"])  # warm-up
        for name, rule in rules.items():
            best = 0.0
            for _ in range(3):
                result = teacher_forced(model, tokens, prefill, rule)
                best = max(best, result.exit_steps.numel() / result.seconds)
            out[name] = best
    return out


def step_seconds(ckpt: str, kv: str, steps: int = 12) -> tuple[float, float]:
    """Seconds per training step (forward + backward, one training batch) at full depth and with
    exit-aware training (sampled exits, exited_kv `kv`), on the checkpoint's model. Median of `steps`."""
    import torch

    from ouro_lab.builders import make_datamodule
    from ouro_lab.checkpoints import load_checkpoint
    from ouro_lab.data import IGNORE_INDEX
    from ouro_lab.models.exit_aware import TrainExits

    cfg, module = load_checkpoint(Path(ckpt))
    tokens, targets, _ = next(iter(make_datamodule(cfg, module.task).train_dataloader()))
    model = module.model.train()
    times = {}
    for name, make in (("full", lambda: None), ("aware", lambda: TrainExits("sampled", kv))):
        seconds = []
        for i in range(steps + 1):
            model.zero_grad()
            start = time.perf_counter()
            out = model(tokens, train_exits=make())
            torch.nn.functional.cross_entropy(out.logits[-1].flatten(0, 1), targets.flatten(),
                                              ignore_index=IGNORE_INDEX).backward()
            if i:  # (the first is a warm-up)
                seconds.append(time.perf_counter() - start)
        times[name] = statistics.median(seconds)
    return times["full"], times["aware"]


def mean_sd(values: list[float], fmt: str) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.fmean(values), fmt)} ± {format(statistics.stdev(values), fmt.lstrip('+'))}"


def study_rows(task: str, out: Path, sets: list[str]) -> tuple[list[dict], str, float, set, set, list[int]]:
    from mlflow.tracking import MlflowClient

    from ouro_lab import run_record as rr
    from ouro_lab.analysis import load_study
    from ouro_lab.models.decoding import EXITED_KV
    from ouro_lab.views import skip_frontier_frame, skip_gap

    if task == "lm":  # (the sweep runs in `out`: the tokenizer conf/lm_cpu.yaml names, from here)
        sets = [*sets, f"data.lm.tokenizer={ROOT / 'tokenizers' / 'bbc-1024.json'}"]
    name, wall = run_study(ROOT / "sweeps" / SWEEPS[task], out / task, sets)
    store = f"sqlite:///{(out / task / 'mlflow.db').resolve()}"
    data = load_study(name, store)
    client = MlflowClient(store)
    commits, machines = trained_at(data)
    rows = []
    for run_id in data.runs["run_id"]:
        run = client.get_run(run_id)
        p = run.data.params
        training, trained_kv, seed = p["train.exit_aware"], p["train.exited_kv"], int(p["train.seed"])
        metrics = evaluate(run, store, name, client)
        kind = "bpb" if task in ("text", "lm") else "acc"
        epsilon = float(p["eval.exit_epsilon"])
        gap = skip_gap(skip_frontier_frame(metrics, "test"), epsilon, kind)
        ckpt = run.data.tags[rr.CHECKPOINT]
        variants = list(EXITED_KV) if training == "none" else [trained_kv]
        speed = lone_tokens_per_s(ckpt, gap["threshold"], variants) if gap.get("threshold") is not None else {}
        full_s, aware_s = step_seconds(ckpt, trained_kv) if training != "none" else (None, None)
        for kv in variants:
            v, best = gap["variants"].get(kv, {}), gap["cheapest"].get(kv, {})
            rows.append({"task": task, "training": TRAINING[training], "trained_kv": trained_kv if training != "none" else "",
                         "exited_kv": kv, "seed": seed, "kind": kind, "epsilon": epsilon, "full": gap["full"],
                         "q": gap.get("threshold"), "select": gap.get("select"), "skip": v.get(kind), "gap": v.get("gap"),
                         "within": v.get("within"), "saved": v.get("saved"), "cheapest_q": best.get("threshold"),
                         "cheapest_saved": best.get("saved"), "tok_s_full": speed.get("full depth"),
                         "tok_s_skip": speed.get(kv), "step_s_full": full_s, "step_s_aware": aware_s,
                         "by_difficulty": {d: g.get(kv) for d, g in gap["by_difficulty"].items()}})
            print(json.dumps({k: v for k, v in rows[-1].items()}, default=str), flush=True)
    seeds = sorted(data.runs["seed"].unique().tolist())
    return rows, name, wall, commits, machines, seeds


def _grouped(rows: list[dict]) -> dict[tuple, list[dict]]:
    """Rows by (task, training, exited_kv): tasks as run, full depth before exit-aware, exited_kv in EXITED_KV order."""
    from ouro_lab.models.decoding import EXITED_KV

    tasks = list(dict.fromkeys(r["task"] for r in rows))  # (in the order they ran)
    groups: dict[tuple, list[dict]] = {}
    for r in sorted(rows, key=lambda r: (tasks.index(r["task"]), r["training"] != TRAINING["none"],
                                         EXITED_KV.index(r["exited_kv"]), r["seed"])):
        groups.setdefault((r["task"], r["training"], r["exited_kv"]), []).append(r)
    return groups


def table(rows: list[dict]) -> list[str]:
    head = ["task", "training", "exited kv", "full depth", "q within eps (selection)", "selection", "skip",
            "skip - select", "skip within eps", "FLOPs saved", "cheapest skip within eps: q, FLOPs saved",
            "tokens/s, one sequence: skip / full depth"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (task, training, kv), rs in _grouped(rows).items():
        kind = rs[0]["kind"]
        qs = ", ".join(f"{r['q']:g}" if r["q"] is not None else "none" for r in rs)
        within = "/".join("yes" if r["within"] else "no" for r in rs)
        cheapest = ", ".join(f"{r['cheapest_q']:g}: {r['cheapest_saved']:.0%}" if r["cheapest_q"] is not None else "none"
                             for r in rs)
        saved = [100 * r["saved"] if r["saved"] is not None else None for r in rs]
        lines.append("| " + " | ".join([
            task, training, kv, mean_sd([r["full"] for r in rs], ".3f") + f" {kind}", qs,
            mean_sd([r["select"] for r in rs], ".3f"), mean_sd([r["skip"] for r in rs], ".3f"),
            mean_sd([r["gap"] for r in rs], "+.3f"), within, mean_sd(saved, ".0f") + " %", cheapest,
            mean_sd([r["tok_s_skip"] for r in rs], ".0f") + " / " + mean_sd([r["tok_s_full"] for r in rs], ".0f"),
        ]) + " |")
    return lines


def difficulty_table(rows: list[dict]) -> list[str]:
    levels = sorted({d for r in rows for d in r["by_difficulty"]}, key=int)
    lines = ["| task | training | exited kv | " + " | ".join(f"d{d}" for d in levels) + " |", "|" + "---|" * (3 + len(levels))]
    for (task, training, kv), rs in _grouped(rows).items():
        cells = [mean_sd([r["by_difficulty"].get(d) for r in rs], "+.3f") for d in levels]
        lines.append(f"| {task} | {training} | {kv} | " + " | ".join(cells) + " |")
    return lines


def cost_table(rows: list[dict]) -> list[str]:
    lines = ["| task | exited kv | s per training step, full depth | with exit-aware training | ratio |", "|---|---|---|---|---|"]
    for (task, training, kv), rs in _grouped(rows).items():
        if training == TRAINING["none"]:
            continue
        ratio = [r["step_s_aware"] / r["step_s_full"] for r in rs]
        lines.append(f"| {task} | {kv} | {mean_sd([r['step_s_full'] for r in rs], '.3f')} | "
                     f"{mean_sd([r['step_s_aware'] for r in rs], '.3f')} | {mean_sd(ratio, '.2f')} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "skip_study")
    parser.add_argument("--tasks", default="state,text,lm")
    parser.add_argument("--page", type=Path, default=None)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    target = args.page or (None if args.set else ROOT / "docs" / "results" / "decoding.md")
    rows, commits, machines, walls, seeds = [], set(), set(), [], {}
    for task in args.tasks.split(","):
        task_rows, name, wall, c, m, s = study_rows(task, args.out, args.set)
        rows += task_rows
        commits |= c
        machines |= m
        walls.append(f"{name} {wall / 60:.0f} min")
        seeds[task] = s
    (args.out / "rows.json").write_text(json.dumps(rows, indent=1, default=str))
    command = "python benchmarks/skip_study.py" + (f" --tasks {args.tasks}" if args.tasks != "state,text,lm" else "") \
        + "".join(f" --set {s}" for s in args.set)
    block = provenance(command, "; ".join(f"{t}: {', '.join(map(str, s))}" for t, s in seeds.items()), commits, machines)
    blocks = {"skip-table": [f"Training wall time: {', '.join(walls)}.", "", *table(rows)],
              "skip-difficulty": difficulty_table(rows), "skip-cost": [*cost_table(rows), "", *block]}
    for lines in blocks.values():
        print("\n".join(lines) + "\n")
    if target is not None:
        for marker, lines in blocks.items():
            rewrite(target, marker, lines)
        print(f"rewrote {target}")


if __name__ == "__main__":
    main()
