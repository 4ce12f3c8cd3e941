"""Training throughput of the looped model and both baselines, on the project's Lightning path
and on a minimal raw PyTorch loop over the same model objects and data. One JSON object per
line on stdout (and in --out), then a `summary` line with the ratios the targets are about.

    python benchmarks/throughput.py                       # --preset cpu: 3 archs x 2 paths
    python benchmarks/throughput.py --preset state        # the default `state` config (conf/state.yaml)
    python benchmarks/throughput.py --preset gpu          # d=1024, 16 heads, 4x4, seq 1024, vocab 32768, bf16
    python benchmarks/throughput.py --preset lm           # conf/lm.yaml's model (6x4, d=768, seq 1024) on random
                                                          # tokens of a 32k vocabulary; a real corpus instead:
                                                          # --set data.task=lm data.lm.source=... data.lm.tokenizer=...
    python benchmarks/throughput.py --checkpointing       # looped at T=8: activation checkpointing none|block|loop
    python benchmarks/throughput.py --set train.compile=true --arch looped

Every measurement runs in a fresh subprocess (clean peak memory, compile caches and threads).
Timing: `--warmup` steps, then `--steps` steps between two device synchronisations; data
generation is included, as in real training. FLOPs are counted by structure (a shared block
run T times costs T times, the LM head once per loop step; training = 3x forward); MFU uses
the device's dense bf16 peak (H100/H200 989, A100 312 TFLOP/s); on CPU it is null and
`gflops_per_s` is the achieved rate. Memory: `step_peak_bytes` = peak bytes allocated during
one training step (forward + backward) above what was allocated before it (parameters,
optimizer state), from the CUDA allocator or, on CPU, torch's profiler; `peak_mem_bytes` =
the CUDA allocator's peak over the whole run (parameters and optimizer state included), or
on CPU `step_peak_bytes`; `peak_rss_bytes` = the process's peak RSS (mostly the Python /
torch / Lightning baseline for small models).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from ouro_lab.config import ARCHS  # noqa: E402

PATHS = ("lightning", "raw")
DEFAULT_STEPS = {"cpu": (150, 10), "state": (300, 30), "gpu": (30, 10), "lm": (30, 10)}  # (timed, warmup): ~20 s timed on 2 cores
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
PRESETS = {
    # (config file, overrides): the same model shape for every arch; baselines derive their depth
    "cpu": ("conf/text.yaml", ["model.d_model=128", "model.n_heads=4", "model.n_layers=2", "model.loops=4",
                               "data.text.context=128", "data.batch_size=8"]),
    "state": ("conf/state.yaml", []),
    # the GPU-sized LM config; the loader is measured apart (docs/concepts/tasks.md: 2e8 tokens/s)
    "lm": ("conf/lm.yaml", ["data.task=random", "data.random.vocab=32768", "data.random.length=1024"]),
    "gpu": (None, ["data.task=random", "data.random.vocab=32768", "data.random.length=1024", "data.batch_size=16",
                   "model.d_model=1024", "model.n_heads=16", "model.n_layers=4", "model.loops=4",
                   "model.tie_embeddings=false", "train.compile=true"]),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--arch", default=",".join(ARCHS), help="comma-separated subset of " + ", ".join(ARCHS))
    p.add_argument("--path", default=",".join(PATHS), help="comma-separated subset of lightning, raw")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: cpu 150, state 300, gpu 30)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: cpu 10, state 30, gpu 10)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for every run")
    p.add_argument("--checkpointing", action="store_true",
                   help="instead: looped at model.loops=8, train.activation_checkpointing none|block|loop, lightning path")
    p.add_argument("--out", help="also append the JSON lines to this file")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one measurement (JSON spec) and print it
    args = p.parse_args(argv)
    if (args.warmup is not None and args.warmup < 1) or (args.steps is not None and args.steps < 1):
        p.error("--warmup and --steps must be >= 1 (the clock starts after the first warmup step)")
    if args.one:
        print(json.dumps(measure(**json.loads(args.one))), flush=True)
        return 0
    steps = args.steps or DEFAULT_STEPS[args.preset][0]
    warmup = args.warmup if args.warmup is not None else DEFAULT_STEPS[args.preset][1]
    runs = []
    if args.checkpointing:
        for mode in ("none", "block", "loop"):
            runs.append(dict(arch="looped", path="lightning",
                             overrides=[*args.set, "model.loops=8", f"train.activation_checkpointing={mode}"]))
    else:
        for arch in args.arch.split(","):
            for path in args.path.split(","):
                runs.append(dict(arch=arch, path=path, overrides=list(args.set)))
    results = []
    for run in runs:
        spec = dict(preset=args.preset, steps=steps, warmup=warmup, **run)
        proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode or not lines:
            print(f"[throughput] {run['arch']}/{run['path']} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}",
                  file=sys.stderr)
            return 1
        results.append(json.loads(lines[-1]))
        emit(results[-1], args.out)
    emit({"summary": summarize(results, args.checkpointing), "preset": args.preset}, args.out)
    return 0


def emit(obj: dict, out: str | None) -> None:
    line = json.dumps(obj)
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


def summarize(results: list[dict], checkpointing: bool) -> dict:
    """The ratios the targets are stated in."""
    by = {(r["arch"], r["path"], r.get("activation_checkpointing")): r for r in results}
    out: dict[str, float] = {}
    if checkpointing:
        base = by.get(("looped", "lightning", "none"))
        for mode in ("block", "loop"):
            r = by.get(("looped", "lightning", mode))
            if base and r:
                out[f"{mode}_peak_mem_cut"] = base["peak_mem_bytes"] / r["peak_mem_bytes"]
                out[f"{mode}_step_peak_cut"] = base["step_peak_bytes"] / max(1, r["step_peak_bytes"])
                out[f"{mode}_slowdown"] = r["step_ms"] / base["step_ms"]
        return {k: round(v, 3) for k, v in out.items()}
    for arch in ARCHS:
        lit, raw = by.get((arch, "lightning", "none")), by.get((arch, "raw", "none"))
        if lit and raw:
            out[f"{arch}_lightning_over_raw_tokens_per_s"] = lit["tokens_per_s"] / raw["tokens_per_s"]
    for path in PATHS:
        looped, depth = by.get(("looped", path, "none")), by.get(("depth_matched", path, "none"))
        if looped and depth:
            out[f"looped_over_depth_matched_step_time_{path}"] = looped["step_ms"] / depth["step_ms"]
    return {k: round(v, 3) for k, v in out.items()}


# --- one measurement (in its own process) -----------------------------------------------------
def measure(preset: str, arch: str, path: str, steps: int, warmup: int, overrides: list[str]) -> dict:
    from ouro_lab.config import load_config
    from ouro_lab.builders import build_module
    from ouro_lab.builders import make_datamodule, make_trainer, resolve_precision

    conf, preset_overrides = PRESETS[preset]
    tmp = tempfile.mkdtemp(prefix="ouro-throughput-")
    cfg = load_config(ROOT / conf if conf else None, [
        *preset_overrides, f"model.arch={arch}", f"train.max_steps={warmup + steps}", "train.warmup_steps=1",
        "train.progress_bar=false", f"tracking.uri=sqlite:///{tmp}/mlflow.db", f"tracking.output_dir={tmp}",
        *(["train.compile=false"] if not torch.cuda.is_available() and preset not in ("gpu", "lm") else []),
        *overrides])
    torch.manual_seed(cfg.train.seed)
    module = build_module(cfg)
    datamodule = make_datamodule(cfg, module.task)
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.train.accelerator in ("auto", "gpu", "cuda") else "cpu")
    precision = resolve_precision(cfg)
    if precision not in ("32-true", "bf16-mixed"):  # what the raw loop mirrors (no GradScaler, no cast weights)
        raise SystemExit(f"throughput: train.precision={precision} is not benchmarked; use 32-true or bf16-mixed")
    tokens_per_step = cfg.data.batch_size * module.task.seq_len
    timer = _Timer(warmup, device)
    if path == "lightning":
        from lightning.pytorch.loggers import MLFlowLogger

        logger = MLFlowLogger(experiment_name="throughput", tracking_uri=cfg.tracking.uri)
        trainer = make_trainer(cfg, logger, [_LightningTimer(timer)], verbose=False, limit_val_batches=0,
                               enable_checkpointing=False)
        trainer.fit(module, datamodule=datamodule)
    else:
        raw_loop(module, datamodule, cfg, device, precision, warmup + steps, timer)
    seconds = timer.elapsed()
    run_peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None  # before step_peak resets it
    step_peak = step_peak_bytes(module, datamodule, device, precision)
    flops_per_step = module.summary()["train_flops_per_token"] * tokens_per_step
    peak_flops = next((v for k, v in PEAK_BF16_FLOPS.items() if k in torch.cuda.get_device_name()), None) \
        if device.type == "cuda" else None
    result = {
        "arch": arch, "path": path, "preset": preset,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "tokens_per_s": round(steps * tokens_per_step / seconds, 1),
        "step_ms": round(1000 * seconds / steps, 3),
        "mfu": round(steps * flops_per_step / seconds / peak_flops, 4) if peak_flops else None,
        "gflops_per_s": round(steps * flops_per_step / seconds / 1e9, 2),
        "peak_mem_bytes": run_peak if device.type == "cuda" else step_peak,
        "step_peak_bytes": step_peak,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "loops": cfg.model.trained_loops, "n_layers": cfg.model.distinct_layers, "d_model": cfg.model.d_model,
        "seq_len": module.task.seq_len, "batch_size": cfg.data.batch_size, "vocab": module.task.vocab_size,
        "precision": precision, "compile": cfg.train.compile,
        "activation_checkpointing": cfg.train.activation_checkpointing,
        "steps": steps, "warmup": warmup, "train_flops_per_step": flops_per_step, "torch": torch.__version__,
    }
    return result


class _Timer:
    """Wall time of the steps after `warmup`, between two device synchronisations (none per step)."""

    def __init__(self, warmup: int, device: torch.device):
        self.warmup, self.device, self.start, self.end = warmup, device, None, None

    def step_done(self, step: int) -> None:  # `step` optimizer steps have finished
        if step == self.warmup:
            self._sync()
            self.start = time.perf_counter()

    def finish(self) -> None:
        self._sync()
        self.end = time.perf_counter()

    def elapsed(self) -> float:
        return self.end - self.start

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


class _LightningTimer:
    def __new__(cls, timer: _Timer):
        import lightning as L

        class Hook(L.Callback):
            def on_train_batch_end(self, trainer, *args):
                timer.step_done(trainer.global_step)

            def on_train_end(self, trainer, *args):
                timer.finish()

        return Hook()


def raw_loop(module, datamodule, cfg, device, precision: str, max_steps: int, timer: _Timer) -> None:
    """The minimal hand-written loop: same model object, data stream, objective, optimizer,
    schedule and gradient clipping as the Lightning path; nothing else."""
    module.configure_model()  # torch.compile per block when train.compile
    model = module.to(device).model.train()
    opt_conf = module.configure_optimizers()
    optimizer, scheduler = opt_conf["optimizer"], opt_conf["lr_scheduler"]["scheduler"]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision.startswith("bf16"))
    loader = iter(datamodule.train_dataloader())
    for step in range(1, max_steps + 1):
        tokens, targets, _ = (x.to(device, non_blocking=True) for x in next(loader))
        with autocast:
            result, _ = module.objective(tokens, targets)
        result.loss.backward()
        if cfg.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        timer.step_done(step)
    timer.finish()


def step_peak_bytes(module, datamodule, device, precision: str) -> int:
    """Peak bytes allocated during one training step (forward + backward) above what was
    allocated before it (parameters, optimizer state): the activations and temporaries that
    activation checkpointing trades for recomputation. CUDA: the allocator's peak counter; CPU:
    the running sum of the allocations and frees torch's profiler records, in order."""
    tokens, targets, _ = (x.to(device) for x in next(iter(datamodule.train_dataloader())))
    module.to(device).train()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision.startswith("bf16"))
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with autocast:
            result, _ = module.objective(tokens, targets)
        result.loss.backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            with autocast:
                result, _ = module.objective(tokens, targets)
            result.loss.backward()
        total = peak = 0
        for event in sorted(prof.events(), key=lambda e: e.time_range.start):
            total += event.self_cpu_memory_usage
            peak = max(peak, total)
    module.zero_grad(set_to_none=True)
    return int(peak)


if __name__ == "__main__":
    sys.exit(main())
