"""Smoke tests: both benchmark scripts run end to end on tiny sizes, and the
saved-for-backward measurement tells the implementations apart."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "benchmarks"))
import bench_lora  # noqa: E402
from test_mnist_demo import synthetic_mnist  # noqa: E402


def test_no_out_by_in_tensor_is_saved_for_backward():
    d, r = 64, 4
    x = torch.randn(16, d, requires_grad=True)
    ours, _ = bench_lora.make_lora_min(d, r, "cpu", torch.float32)
    classic, _ = bench_lora.make_parametrize(d, r, "cpu", torch.float32)
    ours_bytes, ours_largest = bench_lora.saved_bytes(ours, x)
    classic_bytes, classic_largest = bench_lora.saved_bytes(classic, x)
    assert ours_largest == (16, r) and ours_bytes <= 2 * 16 * r * 4  # only the thin (tokens, r) activation
    assert classic_largest == (d, d) and classic_bytes >= d * d * 4  # W + B A is formed and kept


@pytest.mark.slow
def test_bench_lora_runs_on_tiny_sizes(capsys):
    bench_lora.main(["--dim", "64", "--tokens", "16", "--ranks", "2", "--reps", "2", "--warmup", "1", "--compile"])
    out = capsys.readouterr().out
    for row in ("frozen nn.Linear (floor)", "lora_min.LoRALinear", "parametrize LoRA", "full fine-tuning"):
        assert f"| {row} |" in out
    assert "inference (eval forward" in out and "torch.compile(fullgraph=True)" in out


@pytest.mark.slow
def test_bench_demo_runs_on_tiny_data(tmp_path):
    data = synthetic_mnist(tmp_path / "data", n_train=200, n_test=100)
    done = subprocess.run([sys.executable, str(HERE / "benchmarks" / "bench_demo.py"), "--data-dir", str(data),
                           "--lora-steps", "3"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "| classic (DataLoader + transforms + parametrize) |" in done.stdout
    assert "| mnist_demo.py |" in done.stdout and "proofs: all ok" in done.stdout
    assert done.stdout.count("| LoRA disabled |") == 2
