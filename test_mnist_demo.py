"""Tests of mnist_demo.py: the whole pipeline on a tiny synthetic MNIST, the error
paths, and (when MNIST_DATA_DIR points at the real data) the classic result."""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mnist_demo

HERE = Path(__file__).resolve().parent


def write_idx(path, tensor):
    """Write a uint8 tensor in MNIST's IDX format (magic 2051 images, 2049 labels, big-endian)."""
    magic = 2051 if tensor.ndim == 3 else 2049
    with open(path, "wb") as f:
        f.write(struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in tensor.shape))
        f.write(tensor.to(torch.uint8).numpy().tobytes())


def synthetic_mnist(root, n_train=400, n_test=200, seed=0):
    """A tiny MNIST-shaped data set: one random 28x28 prototype per digit plus noise."""
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.rand(10, 28, 28, generator=g) * 255
    raw = Path(root) / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = torch.arange(n) % 10
        images = (prototypes[labels] + 400 * torch.randn(n, 28, 28, generator=g)).clamp(0, 255)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return root


def run_demo(*argv):
    """Run mnist_demo.main in-process; returns (exit status, report from --json)."""
    status = mnist_demo.main([str(a) for a in argv])
    json_path = argv[argv.index("--json") + 1]
    return status, json.loads(Path(json_path).read_text())


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return synthetic_mnist(tmp_path_factory.mktemp("mnist"))


def test_whole_pipeline_on_synthetic_mnist(tiny_data, tmp_path, capsys):
    common = ["--data-dir", tiny_data, "--cache-dir", tmp_path / "cache", "--quiet", "--lora-steps", 10, "--device", "cpu"]
    status, report = run_demo(*common, "--json", tmp_path / "a.json", "--save-adapter", tmp_path / "adapter.pt")
    out = capsys.readouterr().out
    assert status == 0
    assert report["proofs"] == {
        "base weights bit-for-bit unchanged": True,
        "LoRA-disabled predictions identical to before": True,
        "merged predictions match LoRA-enabled": True,
        "merged model has no LoRA layers": True,
    }
    assert list(report["results"]) == mnist_demo.STATES
    for figures in report["results"].values():
        assert 0.0 <= figures["accuracy"] <= 1.0 and len(figures["errors_per_digit"]) == 10
        assert figures["errors_on_target"] == figures["errors_per_digit"][9]
    results = report["results"]
    assert results["LoRA disabled"] == results["before fine-tuning"]
    assert results["LoRA enabled"] != results["before fine-tuning"]  # 10 steps of LoRA changed something
    assert report["parameters"] == {"base": 2_807_010, "with_lora": 2_813_804, "lora": 6_794,
                                    "increment_percent": pytest.approx(100 * 6_794 / 2_807_010)}
    assert report["lora_steps_run"] == 10 and report["base_from_cache"] is False
    assert set(report["timings_s"]) == {"data loading", "pretraining", "evaluation before", "fine-tuning",
                                        "evaluation after", "total"}
    assert report["max_logit_difference_merged_vs_enabled"] < 1e-3
    assert 0 < report["adapter_file_bytes"] < report["base_model_file_bytes"] / 100
    assert "| LoRA merged into W |" in out and "[ok] base weights bit-for-bit unchanged" in out and "0.242%" in out

    # A second run reuses the cached base and gives the very same numbers.
    status, again = run_demo(*common, "--json", tmp_path / "b.json")
    assert status == 0 and again["base_from_cache"] is True
    assert again["results"] == report["results"]

    # The saved adapter reproduces the fine-tuned model without fine-tuning.
    status, loaded = run_demo(*common, "--json", tmp_path / "c.json", "--load-adapter", tmp_path / "adapter.pt")
    assert status == 0 and loaded["lora_steps_run"] == 0
    assert loaded["results"] == report["results"]

    # An adapter of another rank is refused with a message, not a traceback.
    assert mnist_demo.main([str(a) for a in common] + ["--rank", "2", "--load-adapter", str(tmp_path / "adapter.pt")]) == 2
    assert "do not match" in capsys.readouterr().err


def test_quantize_needs_bitsandbytes_and_the_default_run_does_not(tiny_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed: import raises
    common = ["--data-dir", tiny_data, "--no-cache", "--quiet", "--lora-steps", 2, "--device", "cpu"]
    assert mnist_demo.main([str(a) for a in common] + ["--quantize", "nf4"]) == 2
    assert capsys.readouterr().err == "mnist_demo.py: error: argument --quantize: needs bitsandbytes (pip install " \
                                      "bitsandbytes)\n"
    status, report = run_demo(*common, "--json", tmp_path / "r.json")
    assert status == 0 and list(report["results"]) == mnist_demo.STATES and all(report["proofs"].values())


def test_target_digit_auto_picks_the_weakest_digit(tiny_data, tmp_path):
    status, report = run_demo("--data-dir", tiny_data, "--no-cache", "--quiet", "--lora-steps", 2,
                              "--target-digit", "auto", "--json", tmp_path / "r.json")
    errors = report["results"]["before fine-tuning"]["errors_per_digit"]
    assert status == 0 and errors[report["target_digit"]] == max(errors)


def test_plot(tiny_data, tmp_path):
    png = tmp_path / "errors.png"
    args = ["--data-dir", tiny_data, "--no-cache", "--quiet", "--lora-steps", 2, "--plot", png, "--json", tmp_path / "r.json"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert mnist_demo.main([str(a) for a in args]) == 2  # a clear message, before any work
        return
    status, _ = run_demo(*args)
    assert status == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def run_cli(*argv, env=None):
    return subprocess.run([sys.executable, str(HERE / "mnist_demo.py"), *map(str, argv)], capture_output=True,
                          text=True, env=env, cwd=HERE, timeout=300)


def test_missing_data_without_network_exits_2_with_a_message(tmp_path):
    # A proxy on a closed local port makes every download fail at once, online or not.
    env = {**os.environ, "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
           "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}
    result = run_cli("--data-dir", tmp_path / "nothing-here", "--quiet", env=env)
    assert result.returncode == 2
    assert "could not be downloaded" in result.stderr and "--data-dir" in result.stderr
    assert "../shared" not in result.stderr  # a hint that fits users, not this repository's CI layout
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_device_exits_2_with_a_message(tiny_data, capsys):
    assert mnist_demo.main(["--data-dir", str(tiny_data), "--device", "cuda", "--quiet"]) == 2
    assert "no cuda device is available" in capsys.readouterr().err


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """A real adapter file of rank 2, and a file that is not an adapter."""
    import lora_min

    folder = tmp_path_factory.mktemp("adapters")
    lora_min.save_adapter(lora_min.add_lora(mnist_demo.RichBoyNet(), r=2, alpha=1.0), folder / "rank2.pt")
    (folder / "text.pt").write_text("root:x:0:0:root:/root:/bin/bash\n")
    torch.save({"not": "an adapter"}, folder / "other.pt")
    return folder


BAD_ARGUMENTS = [
    (["--batch-size", "0"], "--batch-size"), (["--batch-size", "ten"], "--batch-size"),
    (["--lora-steps", "-5"], "--lora-steps"), (["--epochs", "0"], "--epochs"), (["--rank", "0"], "--rank"),
    (["--alpha", "0"], "--alpha"), (["--alpha", "nan"], "--alpha"), (["--lr", "-1e-3"], "--lr"), (["--lr", "inf"], "--lr"),
    (["--save-adapter", "/no/such/dir/a.pt"], "--save-adapter"), (["--json", "/no/such/dir/r.json"], "--json"),
    (["--json", "{adapters}"], "--json"), (["--load-adapter", "/no/such/file.pt"], "--load-adapter"),
    (["--load-adapter", "{adapters}/text.pt"], "--load-adapter"), (["--load-adapter", "{adapters}/other.pt"], "--load-adapter"),
    (["--load-adapter", "{adapters}/rank2.pt"], "--load-adapter"),  # rank 2, and --rank is 1
    (["--device", "foo"], "--device"), (["--target-digit", "11"], "--target-digit"), (["--no-such-flag"], "--no-such-flag"),
]


@pytest.mark.parametrize("argv, flag", BAD_ARGUMENTS, ids=[" ".join(a) for a, _ in BAD_ARGUMENTS])
def test_bad_arguments_exit_2_with_one_line_before_any_work(argv, flag, adapters, tmp_path):
    """Through the CLI. MNIST is absent and cannot be downloaded, so an argument checked
    only after data loading would end in the data error instead of naming the argument."""
    env = {**os.environ, "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
           "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}
    env.pop("MNIST_DATA_DIR", None)
    argv = [a.format(adapters=adapters) for a in argv]
    result = run_cli("--data-dir", tmp_path / "no-mnist-here", "--quiet", *argv, env=env)
    assert result.returncode == 2
    assert result.stderr.startswith("mnist_demo.py: error: ") and result.stderr.count("\n") == 1, result.stderr
    assert flag in result.stderr and "MNIST" not in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == ""


def test_a_failing_extra_keeps_the_table_and_the_json(tiny_data, tmp_path, capsys, monkeypatch):
    def disk_full(model, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mnist_demo.lora_min, "save_adapter", disk_full)
    report_path = tmp_path / "r.json"
    status = mnist_demo.main([str(a) for a in ["--data-dir", tiny_data, "--no-cache", "--quiet", "--lora-steps", 2,
                                                 "--json", report_path, "--save-adapter", tmp_path / "a.pt"]])
    captured = capsys.readouterr()
    assert status == 1
    assert "| LoRA merged into W |" in captured.out  # the table was printed
    assert "error: --save-adapter" in captured.err and "No space left" in captured.err
    report = json.loads(report_path.read_text())  # and every figure saved
    assert report["proofs"] and "adapter_file_bytes" not in report


def test_corrupt_data_exits_2_with_a_message(tmp_path):
    root = synthetic_mnist(tmp_path / "data", n_train=50, n_test=20)
    images = root / "MNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:5000])  # truncated
    result = run_cli("--data-dir", root, "--quiet", "--no-cache")
    assert result.returncode == 2
    assert "corrupt or truncated" in result.stderr and "Traceback" not in result.stderr


REAL_MNIST = os.environ.get("MNIST_DATA_DIR")


@pytest.mark.skipif(not REAL_MNIST, reason="set MNIST_DATA_DIR to a folder holding MNIST/raw/ to run the real experiment")
def test_classic_result_on_real_mnist(tmp_path, capsys):
    status, report = run_demo("--data-dir", REAL_MNIST, "--cache-dir", tmp_path / "cache", "--quiet",
                              "--device", "cpu", "--json", tmp_path / "r.json")
    with capsys.disabled():  # show the table in the test log
        print("\n" + mnist_demo.results_table(report) + f"\ntimings: {report['timings_s']}")
    results = report["results"]
    before, lora = results["before fine-tuning"], results["LoRA enabled"]
    assert status == 0 and all(report["proofs"].values())
    assert report["target_digit"] == 9
    assert before["accuracy"] >= 0.94
    assert lora["errors_on_target"] <= 0.4 * before["errors_on_target"]
    assert results["LoRA disabled"] == before
    assert f"{report['parameters']['increment_percent']:.3f}" == "0.242"
