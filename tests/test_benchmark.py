"""benchmarks/throughput.py runs end to end and prints the documented JSON keys (the numbers
themselves are measured by running the script, never asserted by a test); benchmarks/same_runs.py
tells identical stores from changed ones."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"arch", "path", "preset", "device", "tokens_per_s", "step_ms", "mfu", "gflops_per_s", "peak_mem_bytes"}


def load_benchmark():
    spec = importlib.util.spec_from_file_location("throughput", ROOT / "benchmarks" / "throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_throughput_benchmark_prints_json_lines(tmp_path, capsys):
    bench = load_benchmark()
    out = tmp_path / "bench.jsonl"
    assert bench.main(["--preset", "state", "--arch", "looped", "--steps", "3", "--warmup", "1",
                       "--out", str(out)]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines == [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    runs, summary = lines[:-1], lines[-1]
    assert [(r["arch"], r["path"]) for r in runs] == [("looped", "lightning"), ("looped", "raw")]
    for r in runs:
        assert KEYS <= set(r) and r["mfu"] is None and r["device"].startswith("cpu")
        assert r["tokens_per_s"] > 0 and r["step_ms"] > 0 and r["peak_mem_bytes"] == r["step_peak_bytes"] > 0
        assert r["tokens_per_s"] * r["step_ms"] / 1000 == pytest.approx(64 * 16, rel=1e-3)
    assert runs[0]["train_flops_per_step"] == runs[1]["train_flops_per_step"] > 0
    assert set(summary["summary"]) == {"looped_lightning_over_raw_tokens_per_s"}
    ratio = runs[0]["tokens_per_s"] / runs[1]["tokens_per_s"]
    assert summary["summary"]["looped_lightning_over_raw_tokens_per_s"] == pytest.approx(ratio, abs=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device (run: pytest -m gpu)")
def test_gpu_preset_runs_and_reports_mfu(tmp_path):
    """On a CUDA machine: the GPU preset (bf16, compiled blocks, vocab 32768) runs both paths and
    reports MFU and the allocator's peak memory."""
    bench = load_benchmark()
    out = tmp_path / "gpu.jsonl"
    assert bench.main(["--preset", "gpu", "--arch", "looped", "--steps", "3", "--warmup", "3", "--out", str(out)]) == 0
    runs = [json.loads(line) for line in out.read_text().splitlines()][:-1]
    for r in runs:
        assert r["precision"] == "bf16-mixed" and r["compile"] is True and r["vocab"] == 32768
        assert r["peak_mem_bytes"] >= r["step_peak_bytes"] > 0
        if any(name in r["device"] for name in bench.PEAK_BF16_FLOPS):
            assert 0 < r["mfu"] < 1


def test_same_runs_finds_a_changed_metric_param_or_report_file_and_ignores_run_ids(tmp_path, capsys):
    """benchmarks/same_runs.py: two stores with the same runs (different run ids, times and
    checkpoint paths) are identical; a changed metric value, param or report byte is named."""
    from mlflow.tracking import MlflowClient

    spec = importlib.util.spec_from_file_location("same_runs", ROOT / "benchmarks" / "same_runs.py")
    same = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(same)

    def store(name: str, acc_at_2: float, lr: str) -> str:
        uri = f"sqlite:///{tmp_path / name}.db"
        client = MlflowClient(uri)
        run = client.create_run(client.create_experiment("exp"), run_name="looped-s0").info.run_id
        client.log_param(run, "train.lr", lr)
        client.set_tag(run, "ouro.checkpoint", f"/out/{run}/last.ckpt")
        for step, value in ((1, 0.5), (2, acc_at_2)):
            client.log_metric(run, "val/acc_final", value, step=step)
        client.log_metric(run, "train/seconds", float(len(name)))  # wall time: never compared
        report = tmp_path / f"{name}_report"
        report.mkdir()
        (report / "report.md").write_text(f"study run `{run}`: acc 0.9\n")
        return uri

    a, b, c = store("a", 0.75, "0.003"), store("bb", 0.75, "0.003"), store("c", 0.76, "0.01")
    assert same.main([a, b, "--reports", str(tmp_path / "a_report"), str(tmp_path / "bb_report")]) == 0
    assert "1 runs compared and the report folders: identical" in capsys.readouterr().out
    (tmp_path / "c_report" / "report.md").write_text("study run `x`: acc 0.8\n")
    assert same.main([a, c, "--reports", str(tmp_path / "a_report"), str(tmp_path / "c_report")]) == 1
    out = capsys.readouterr().out
    assert "param train.lr: 0.003 != 0.01" in out and "metric val/acc_final" in out
    assert "differs: report.md" in out and "3 difference(s)" in out
