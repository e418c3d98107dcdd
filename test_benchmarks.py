"""Smoke tests: both benchmark scripts run end to end on tiny sizes, and the
saved-for-backward measurement tells the implementations apart."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "benchmarks"))
import bench_lora  # noqa: E402
import lora_min  # noqa: E402
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


# Embedding and conv sizes that run in a fraction of a second (the defaults are 32000 x 4096 and 256 channels).
TINY_EMBEDDING_CONV = ["--vocab", "64", "--embed-dim", "32", "--embedding-ranks", "4",
                       "--channels", "8", "--image-size", "6", "--batch", "2", "--conv-ranks", "4"]
EMBEDDING_ROWS = ("frozen nn.Embedding (floor)", "lora_min.LoRAEmbedding", "PEFT lora.Embedding", "parametrize LoRA")
CONV_ROWS = ("frozen nn.Conv2d (floor)", "lora_min.LoRAConv", "PEFT lora.Conv2d", "parametrize LoRA")


def test_embedding_and_conv_saved_for_backward():
    tokens, r = 16, 4
    emb = bench_lora.build(bench_lora.EMBEDDING_IMPLEMENTATIONS, (100, 32), r, "cpu", torch.float32)
    idx, _ = bench_lora.embedding_inputs((100, 32), tokens, "cpu", torch.float32)
    nbytes, largest = bench_lora.saved_bytes(emb["lora_min.LoRAEmbedding"], idx)
    assert largest == (tokens, r) and nbytes <= 2 * tokens * r * 4  # only the thin looked-up columns of A
    conv = bench_lora.build(bench_lora.CONV_IMPLEMENTATIONS, (8, 3), r, "cpu", torch.float32)
    x, _ = bench_lora.conv_inputs((8, 3), 2, 6, "cpu", torch.float32)
    nbytes, largest = bench_lora.saved_bytes(conv["lora_min.LoRAConv"], x)
    assert nbytes <= 2 * 2 * r * 6 * 6 * 4  # the thin r-channel activation, never the (out, in, 3, 3) kernel
    assert bench_lora.saved_bytes(conv["parametrize LoRA"], x)[1] == (8, 8, 3, 3)  # W + B A is formed and kept


@pytest.mark.parametrize("layer", ["embedding", "conv"])
def test_embedding_and_conv_contenders_do_the_same_work(layer):
    """Every contender starts from the same nonzero A and B (not PEFT's A = 0 for embeddings), so all
    compute the same output and the same gradients: the benchmark compares equal work."""
    pytest.importorskip("peft")
    if layer == "embedding":
        impls, size = bench_lora.EMBEDDING_IMPLEMENTATIONS, (50, 16)
        x, grad_out = bench_lora.embedding_inputs(size, 12, "cpu", torch.float64)
    else:
        impls, size = bench_lora.CONV_IMPLEMENTATIONS, (6, 3)
        x, grad_out = bench_lora.conv_inputs(size, 2, 5, "cpu", torch.float64)
    built = [make(size, 4, "cpu", torch.float64) for make in impls.values()]  # (layer, [A, B])
    for _, params in built:
        bench_lora.same_init(params)
    (floor, _), *adapters = built
    ys = [layer(x) for layer, _ in adapters]
    assert not torch.allclose(ys[0], floor(x))  # the update is not zero
    grads = []
    for (_, params), y in zip(adapters, ys):
        torch.testing.assert_close(y, ys[0])
        y.backward(grad_out)
        grads.append([p.grad.flatten() for p in params])  # PEFT's conv B is (out, r, 1, 1), ours (out, r)
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0])


def test_bench_embedding_and_conv_run_on_tiny_sizes(capsys):
    pytest.importorskip("peft")
    bench_lora.main(["--layers", "embedding,conv", "--tokens", "16", "--reps", "2", "--warmup", "1", "--profile",
                     *TINY_EMBEDDING_CONV])
    out = capsys.readouterr().out
    assert "## embedding training step: nn.Embedding(64, 32), 16 tokens, r = 4" in out
    assert "## conv training step: nn.Conv2d(8, 8, 3x3, padding 1), batch 2 x 6 x 6, r = 4" in out
    for row in EMBEDDING_ROWS + CONV_ROWS:
        assert f"| {row} |" in out
    assert "frozen nn.Linear" not in out and "in = out =" not in out  # --layers left linear out
    assert out.count("profile of one training step") == 2


# An experts layer that runs in milliseconds (the default is 64 and 128 experts, 512 -> 2x256 -> 512, 1024 tokens).
EXPERTS_SIZES = ["--experts-hidden", "16", "--experts-intermediate", "8", "--experts-top-k", "2",
                 "--experts-tokens", "12", "--experts-ranks", "2"]
TINY_EXPERTS = ["--num-experts", "4", *EXPERTS_SIZES]
EXPERTS_ROWS = ("frozen MixtralExperts (floor)", "lora_min factored", "lora_min general (W + ΔW)",
                "PEFT target_parameters")


def lora_grads(layer, parameter, spec):
    """The gradients of the LoRA A and B on `parameter` in lora_min's layout, (E, r, in) and (E, out, r)."""
    peft = bench_lora.peft_wrappers(layer)
    if peft:
        return bench_lora.peft_factors(peft[parameter], spec.num_experts, lambda linear: linear.weight.grad)
    lora = {lora.parameter_name: lora for _, lora in lora_min.lora_layers(layer)}[parameter]
    return [lora.lora_A.grad, lora.lora_B.grad]


@pytest.mark.parametrize("implementation", ["grouped_mm", "eager"])
def test_experts_contenders_do_the_same_work(implementation):
    """lora_min (factored and W + ΔW) and PEFT hold the same A and B (PEFT's (r E, in) and (out, r E) as views
    in lora_min's layout), so all compute the same output and the same gradients; only the factored one
    keeps no (E, out, in) tensor for backward. float32: CPU grouped_mm has no float64 kernel."""
    pytest.importorskip("transformers.integrations.moe")  # transformers 5's experts (4 has nn.Linear experts)
    pytest.importorskip("peft")
    spec = bench_lora.ExpertsSpec(32, 16, 4, 2, implementation)
    layers = bench_lora.build(bench_lora.EXPERTS_IMPLEMENTATIONS, spec, 2, "cpu", torch.float32)
    x, index, weights, grad_out = bench_lora.experts_inputs(spec, 24, "cpu", torch.float32)
    bench_lora.route(layers, index, weights)
    assert "outputs agree" in bench_lora.check_same_output(layers, bench_lora.EXPERTS_FLOOR, x)
    grads = {}
    for name, layer in list(layers.items())[1:]:  # the adapters: dx, then d(A, B) of gate_up_proj and down_proj
        layer(x).backward(grad_out)
        grads[name] = [x.grad.clone()] + [g for p in bench_lora.EXPERTS_TARGETS for g in lora_grads(layer, p, spec)]
        x.grad = None
    for name in EXPERTS_ROWS[2:]:
        torch.testing.assert_close(grads[name], grads["lora_min factored"], rtol=1e-4, atol=1e-6)
    saved = {name: bench_lora.saved_bytes(layer, x) for name, layer in layers.items()}
    beyond = {name: nbytes - saved[bench_lora.EXPERTS_FLOOR][0] for name, (nbytes, _) in saved.items()}
    stacks = 4 * (4 * 2 * 16 * 32 + 4 * 32 * 16)  # gate_up_proj (E, 2I, H) and down_proj (E, H, I), float32
    assert beyond["PEFT target_parameters"] >= stacks  # both W + ΔW stacks are formed and kept
    assert beyond["lora_min factored"] < stacks / 2 and len(saved["lora_min factored"][1]) == 2  # never a stack


def test_bench_experts_runs_on_tiny_sizes(capsys):
    pytest.importorskip("transformers.integrations.moe")
    pytest.importorskip("peft")
    bench_lora.main(["--layers", "experts", "--reps", "2", "--warmup", "1", "--profile", *TINY_EXPERTS])
    out = capsys.readouterr().out
    implementations = list(dict.fromkeys([bench_lora.default_experts_implementation(), "eager"]))
    for implementation in implementations:
        assert f"16 -> 2x8 -> 16, 12 tokens, top-2, r = 2, float32, {implementation}" in out
    assert out.count("outputs agree: ") == len(implementations)
    for row in EXPERTS_ROWS:  # one table per implementation, then side by side (the profile's rows name ops)
        assert len(re.findall(rf"^\| {re.escape(row)} \| [0-9.]+ \|", out, re.MULTILINE)) == len(implementations)
        for implementation in implementations:
            assert len(re.findall(rf"^\| 4 \| {implementation} \| {re.escape(row)} \| [0-9.]+ \| [0-9.]+ \| [0-9]+ \|$",
                                  out, re.MULTILINE)) == 1
    assert "## experts side by side: r = 2" in out and "4 experts, eager: factored " in out
    assert out.count("profile of one training step") == len(implementations)
    assert "frozen nn.Linear" not in out and "## embedding" not in out  # --layers left the others out


def test_bench_summary_counts_ops_per_step_and_ends_with_one_table(capsys):
    pytest.importorskip("transformers.integrations.moe")
    pytest.importorskip("peft")
    bench_lora.main(["--layers", "conv,experts", "--reps", "1", "--warmup", "0", "--summary", *TINY_EMBEDDING_CONV,
                     "--experts-implementations", "grouped_mm", "--num-experts", "8", "32", *EXPERTS_SIZES])
    out = capsys.readouterr().out
    summary = out[out.index("## every row: "):]
    rows = re.findall(r"^\| (.+?) \| (.+?) \| [0-9.]+ \| [0-9.]+ \| [0-9.]+ \| ([0-9]+) \| - \|$", summary,
                      re.MULTILINE)
    assert [name for _, name, _ in rows] == list(CONV_ROWS) + list(EXPERTS_ROWS) * 2  # every row, in one table
    ops = {(re.match(r"MoE (\d+) experts", setting).group(1), name): int(n) for setting, name, n in rows[4:]}
    for name in EXPERTS_ROWS:  # the benchmark's own count: the same at 32 experts as at 8
        assert ops["8", name] == ops["32", name] > 0


@pytest.mark.slow
def test_bench_lora_runs_on_tiny_sizes(capsys):
    bench_lora.main(["--dim", "64", "--tokens", "16", "--ranks", "2", "--reps", "2", "--warmup", "1", "--compile",
                     *TINY_EMBEDDING_CONV])
    out = capsys.readouterr().out
    for row in ("frozen nn.Linear (floor)", "lora_min.LoRALinear", "lora_min, the lesson's autograd",
                "parametrize LoRA", "full fine-tuning"):
        assert f"| {row} |" in out
    assert "inference (eval forward" in out and "torch.compile(fullgraph=True)" in out
    for row in EMBEDDING_ROWS + CONV_ROWS:  # the default --layers: linear, then embedding and conv
        assert f"| {row} |" in out
    assert out.index("## training step, r = 2") < out.index("## embedding training step") < out.index("## conv training step")


def test_bench_lora_rejects_unknown_layers():
    with pytest.raises(SystemExit):
        bench_lora.main(["--layers", "linear,lstm"])


@pytest.mark.slow
def test_bench_demo_runs_on_tiny_data(tmp_path):
    data = synthetic_mnist(tmp_path / "data", n_train=200, n_test=100)
    done = subprocess.run([sys.executable, str(HERE / "benchmarks" / "bench_demo.py"), "--data-dir", str(data),
                           "--lora-steps", "3"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "| classic (DataLoader + transforms + parametrize) |" in done.stdout
    assert "| mnist_demo.py |" in done.stdout and "proofs: all ok" in done.stdout
    assert done.stdout.count("| LoRA disabled |") == 2
