"""benchmarks/throughput.py runs end to end and prints the documented JSON keys (the numbers
themselves are measured by running the script, never asserted by a test)."""

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
