"""QLoRA: LoRA on frozen quantized bases (bitsandbytes' Linear4bit nf4 / fp4 with or without double
quantization, Linear8bitLt; an nn.Linear with a torchao weight), against the plain formula
y = base_q(x) + ((dropout(x) A^T) B^T) * scale with autograd, and against PEFT on the same base.

bitsandbytes' CPU kernels compute differently in train and eval mode (8-bit quantizes the input only
in eval; a 4-bit weight is repacked on its first no-grad eval forward on AVX512-BF16 CPUs): every
comparison runs both sides in the same mode."""

import copy
import json
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import lora_min as L
from conftest import assert_unchanged, snapshot

bnb = pytest.importorskip("bitsandbytes")
try:
    import torchao.quantization as torchao
except Exception:  # (torchao 0.18 fails to import on torch 2.4, the oldest torch: only the bitsandbytes cases run)
    torchao = None
warnings.filterwarnings("ignore", message=".*(inputs will be cast|Input type into Linear4bit).*")

TOL = dict(rtol=1e-4, atol=1e-4)
KINDS = ["nf4-dq", "nf4", "fp4-dq", "fp4", "nf4-bf16", "int8", "torchao-int8"]


def quantized(kind, linear):
    """linear's weights quantized as `kind`: a bitsandbytes layer, or linear itself with a torchao weight."""
    if kind.startswith("torchao"):
        if torchao is None:
            pytest.skip("needs torchao (it imports on torch >= 2.5)")
        model = nn.Sequential(copy.deepcopy(linear))
        torchao.quantize_(model, torchao.Int8WeightOnlyConfig())
        return model[0]
    if kind == "int8":
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                    has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  quant_type=kind[:3], compress_statistics=kind.endswith("-dq"),
                                  compute_dtype=torch.bfloat16 if kind.endswith("bf16") else torch.float32)
    layer.load_state_dict(linear.state_dict())
    return layer.to("cpu")  # bitsandbytes quantizes here


def float_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64, bias=False), nn.Tanh(), nn.Linear(64, 8))


def quantized_net(kind, seed=0):
    """float_net with its first two linears quantized (the head stays float), the same each call."""
    net = float_net(seed)
    net[0], net[2] = quantized(kind, net[0]), quantized(kind, net[2])
    return net


def randomize(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in L.lora_layers(model):
            for p in (layer.lora_A, layer.lora_B):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def inputs(seed=2, n=6):
    return torch.randn(n, 64, generator=torch.Generator().manual_seed(seed))


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a, b):
    """Bit for bit the same tensor: dtype and values (a torchao tensor: each of its inner tensors)."""
    if hasattr(a, "__tensor_flatten__"):
        names, _ = a.__tensor_flatten__()
        return type(a) is type(b) and all(same(getattr(a, n), getattr(b, n)) for n in names)
    return a.dtype == b.dtype and torch.equal(a, b)


def same_state(model, before):
    after = model.state_dict()
    return after.keys() == before.keys() and all(same(after[k], v) for k, v in before.items())


def dequantized(module):
    """The float W of a quantized module, computed here from its library's own functions."""
    w = module.weight
    if type(w).__name__ == "Params4bit":
        return bnb.functional.dequantize_4bit(w.data, w.quant_state).float()
    if type(w).__name__ == "Int8Params":
        scb = w.SCB if w.SCB is not None else module.state.SCB
        return w.data * scb[:, None] * 7.874015718698502e-3  # (times 1 / 127, as bitsandbytes writes it)
    return w.dequantize().float()


# --- 1. adapting: every quantized linear by default, or by name -------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_default_targets_adapt_every_quantized_linear_and_names_work(kind):
    model = L.add_lora(quantized_net(kind), r=4)
    layers = dict(L.lora_layers(model))
    assert {n: type(m) for n, m in layers.items()} == {"0": L.QLoRALinear, "2": L.QLoRALinear, "4": L.LoRALinear}
    named = L.add_lora(quantized_net(kind), r=4, target_modules=["2"])
    assert [n for n, _ in L.lora_layers(named)] == ["2"] and isinstance(named[2], L.LoRALinear)
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())


# --- 2. forward: the plain formula with autograd ---------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_outputs_and_gradients_equal_the_formula(kind, mode):
    base = quantized(kind, float_net()[0]).train(mode == "train")
    layer = L.QLoRALinear(copy.deepcopy(base), r=4, alpha=12, dropout=0.25 if mode == "train" else 0.0)
    randomize(nn.Sequential(layer))
    x1, x2 = inputs().requires_grad_(), inputs().requires_grad_()
    torch.manual_seed(0)
    y = layer(x1)
    torch.manual_seed(0)
    x_lora = layer.lora_dropout(x2)  # the same mask
    expected = base(x2) + ((x_lora @ layer.lora_A.T) @ layer.lora_B.T) * layer.scale
    torch.testing.assert_close(y, expected, **TOL)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
    A, B = layer.lora_A, layer.lora_B
    ours = torch.autograd.grad((y * w).sum(), [x1, A, B])
    theirs = torch.autograd.grad((expected * w).sum(), [x2, A, B])
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **TOL)


def test_half_compute_dtype_adapters_are_float32_and_the_sum_is_rounded_once():
    base = quantized("nf4-bf16", float_net()[0])
    layer = randomize(nn.Sequential(L.QLoRALinear(copy.deepcopy(base), r=4)))[0]
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
    assert L.QLoRALinear(copy.deepcopy(base), r=4, lora_dtype=torch.bfloat16).lora_A.dtype == torch.bfloat16
    x = inputs().to(torch.bfloat16)
    y = layer(x)
    branch = (x.float() @ layer.lora_A.T) @ layer.lora_B.T * layer.scale  # in the adapter's float32
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, (base(x) + branch).to(torch.bfloat16))


@pytest.mark.parametrize("kind", ["nf4-dq", "int8", "torchao-int8"])
def test_training_makes_no_float_copy_of_W(kind, monkeypatch):
    """Autograd keeps what the quantized module keeps itself, plus the branch's thin tensors: no (out, in)
    float W; dequantized_weight (export's) is never called."""
    base = quantized(kind, float_net()[0])
    layer = randomize(nn.Sequential(L.QLoRALinear(copy.deepcopy(base), r=4)))[0]
    monkeypatch.setattr(L.QLoRALinear, "dequantized_weight", lambda self: pytest.fail("W was dequantized"))

    def big_saved(module):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            module(inputs().requires_grad_()).sum().backward()
        return [(t.dtype, tuple(t.shape)) for t in saved if t.is_floating_point() and t.numel() >= 64 * 64]
    assert big_saved(layer) == big_saved(base)


# --- 3. the base stays as it was ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_base_keys_stay_and_training_leaves_the_base_bit_for_bit(kind):
    base = quantized_net(kind)
    before = state(base)
    model = L.add_lora(copy.deepcopy(base), r=4).train()
    lora_keys = {f"{n}.lora_{ab}" for n in ("0", "2", "4") for ab in "AB"}
    assert set(model.state_dict()) == set(before) | lora_keys  # fc.weight, fc.weight.absmax, SCB, ... stay
    bytes_ = lambda sd: sum(v.numel() * v.element_size() for v in sd.values())  # noqa: E731
    assert bytes_(model.state_dict()) == bytes_(before) + bytes_(L.lora_state_dict(model))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for step in range(3):
        loss = model(inputs(seed=step)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert model[0].lora_B.abs().sum() > 0  # it trained
    with torch.no_grad():  # as the base's own forward leaves it: a bfloat16 Linear4bit casts its bias once
        base.train()(inputs())
    after, before = model.state_dict(), state(base)
    assert all(same(after[k], v) for k, v in before.items())
    assert type(model[0].weight) is type(base[0].weight) and not model[0].weight.requires_grad


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_disabled_is_the_quantized_base_and_unload_gives_it_back(kind, mode):
    base = quantized_net(kind).train(mode == "train")
    model = randomize(L.add_lora(copy.deepcopy(base), r=4))
    x = inputs()
    with torch.no_grad():
        assert not torch.equal(model(x), base(x))
        with L.lora_disabled(model):
            assert torch.equal(model(x), base(x))
        model[0].eval(), model[0].train()  # (its own train(), with no argument: train mode)
        assert model[0].quantized.training
        model.train(mode == "train")
        plain = L.unload(model)
        assert type(plain[0]) is type(base[0]) and type(plain[0].weight) is type(base[0].weight)
        assert plain[0].training == (mode == "train")
        assert torch.equal(plain(x), base(x))
    assert state(plain).keys() == state(base).keys()


@pytest.mark.parametrize("kind", ["nf4-dq", "int8", "torchao-int8"])
def test_load_state_dict_loads_the_base_as_it_loads_itself_and_the_adapter(kind):
    """A full checkpoint: the quantized module loads its own keys (bitsandbytes' 4-bit layer copies the
    packed weight and reports its statistics as unexpected, with or without LoRA), the layer A and B."""
    other = randomize(L.add_lora(quantized_net(kind, seed=1), r=4), seed=7)
    model, base = L.add_lora(quantized_net(kind), r=4), quantized_net(kind)
    theirs = base.load_state_dict(quantized_net(kind, seed=1).state_dict(), strict=False)
    ours = model.load_state_dict(other.state_dict(), strict=False)
    assert ours.missing_keys == theirs.missing_keys == [] and ours.unexpected_keys == theirs.unexpected_keys
    assert torch.equal(model[2].lora_A, other[2].lora_A) and torch.equal(model[0].lora_B, other[0].lora_B)
    x = inputs()
    with torch.no_grad(), L.lora_disabled(model):
        assert torch.equal(model(x), base(x))
    assert copy.deepcopy(model)[0].quantized.weight is not model[0].weight  # a copy holds its own, shared once:
    assert all(m[0].quantized.weight is m[0].weight for m in (model, copy.deepcopy(model)))


# --- 4. merging: refused in place, exported as a float model ----------------------------------------------


@pytest.mark.parametrize("kind, name", [("nf4-dq", r"bitsandbytes 4-bit \(nf4\)"), ("int8", "bitsandbytes 8-bit"),
                                        ("fp4", r"bitsandbytes 4-bit \(fp4\)"), ("torchao-int8", "torchao Int8Tensor")])
def test_in_place_merge_is_refused_naming_the_quantization_and_changes_nothing(kind, name):
    model = randomize(L.add_lora(quantized_net(kind), r=4))
    before = state(model)
    for call in (L.merge_lora, lambda m: m[0].merge()):
        with pytest.raises(RuntimeError, match=rf"^merge(_lora)?\(\) would write W \+ ΔW into a {name} weight, which "
                                               "cannot hold it; export a float model with merge_and_unload"):
            call(model)
        assert same_state(model, before) and not model[0].merged and model[0].enabled


@pytest.mark.parametrize("kind", KINDS)
def test_merge_and_unload_and_merged_state_dict_export_dequantized_W_plus_delta(kind):
    model = randomize(L.add_lora(quantized_net(kind), r=4, alpha=8))
    x = inputs()
    expected_dtype = torch.float32  # W's before it was quantized (the model's around it), not the compute dtype
    assert L.merged_state_dict(model)["0.bias"].dtype == expected_dtype  # (before a forward casts it in place)
    plain = L.merge_and_unload(model)
    assert all(type(m) in (nn.Linear, nn.Tanh, nn.Sequential) for m in plain.modules())
    assert all(type(p) is nn.Parameter and not p.requires_grad for p in plain.parameters())
    assert {plain[i].weight.dtype for i in (0, 2)} == {plain[0].bias.dtype} == {expected_dtype}
    for i in (0, 2):  # dequantized W + ΔW in float32, rounded once to W's dtype
        layer = model[i]
        delta = (layer.lora_B.float() @ layer.lora_A.float()) * layer.scale
        assert torch.equal(plain[i].weight, (dequantized(layer.quantized) + delta).to(layer.export_dtype))
    tol = 2e-2 if kind.endswith("bf16") else 1e-4  # (a bfloat16 compute dtype rounds the base's product)
    torch.testing.assert_close(copy.deepcopy(plain).float()(x), model(x), rtol=tol, atol=tol)
    merged, plain = L.merged_state_dict(model), L.merge_and_unload(model)  # (both after the forward: bitsandbytes
    assert merged.keys() == plain.state_dict().keys()  # casts a bias to the compute dtype in place in its first one)
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in merged.items())
    with L.lora_disabled(model):  # disabled: dequantized W alone
        assert torch.equal(L.merged_state_dict(model)["0.weight"], dequantized(model[0].quantized).to(
            model[0].export_dtype))
    assert isinstance(model[0], L.QLoRALinear)  # not inplace: the model is as it was
    with torch.no_grad():
        model[0].lora_B.fill_(3e38)  # W + ΔW overflows: named, and nothing is exported
    with pytest.raises(RuntimeError, match=r"^'0': dequantized W \+ ΔW has inf or NaN entries in torch\."):
        L.merge_and_unload(model)


def test_export_after_an_eval_forward_dequantizes_what_the_base_holds():
    """On CPUs with AVX512-BF16 a 4-bit layer's first no-grad eval forward repacks its weight (and rounds
    its block maxima to bfloat16): the export reads W back as bitsandbytes' own state_dict() does."""
    base = quantized_net("nf4")
    model = randomize(L.add_lora(copy.deepcopy(base), r=4))
    with torch.no_grad():
        model.eval()(inputs()), base.eval()(inputs())
    base.state_dict()  # bitsandbytes' way back to its own layout
    layer = model[0]
    delta = (layer.lora_B @ layer.lora_A) * layer.scale
    assert torch.equal(L.merge_and_unload(model)[0].weight, dequantized(base[0]) + delta)  # (before state_dict())
    assert torch.equal(L.merged_state_dict(model)["0.weight"], dequantized(base[0]) + delta)


# --- 5. files: ours onto a freshly quantized model, PEFT's both ways -----------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_save_adapter_loads_onto_a_freshly_quantized_model(kind, tmp_path):
    model = randomize(L.add_lora(quantized_net(kind), r=4, alpha=8))
    L.save_adapter(model, tmp_path / "a.pt")
    fresh = L.add_lora(quantized_net(kind), r=4, alpha=8)
    L.load_adapter(fresh, tmp_path / "a.pt")
    x = inputs()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_an_adapter_for_other_shapes_is_refused_and_changes_nothing(tmp_path):
    other = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 64, bias=False), nn.Tanh(), nn.Linear(64, 8))
    L.save_adapter(L.add_lora(other, r=4, alpha=8), tmp_path / "other.pt")
    model = L.add_lora(quantized_net("nf4-dq"), r=4, alpha=8)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"0\.lora_B has shape \(32, 4\), the model's is \(64, 4\)"):
        L.load_adapter(model, tmp_path / "other.pt")
    assert_unchanged(model, before)


def peft_model(base, kind, **config):
    """PEFT's LoRA on the same quantized base (its QLoRA layers: loaded_in_4bit / 8bit as transformers says)."""
    peft = pytest.importorskip("peft")
    base = copy.deepcopy(base)
    base.is_loaded_in_4bit, base.is_loaded_in_8bit = kind.startswith(("nf4", "fp4")), kind == "int8"
    return peft.get_peft_model(base, peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["0", "2", "4"],
                                                         **config}))


@pytest.mark.parametrize("kind", KINDS)
def test_peft_on_the_same_base_computes_what_lora_min_computes(kind, tmp_path):
    peft = pytest.importorskip("peft")
    base = quantized_net(kind)
    model = randomize(L.add_lora(copy.deepcopy(base), r=4, alpha=8))
    theirs = peft_model(base, kind)
    quantized_layers = {n: type(m).__module__ for n, m in theirs.named_modules() if n.endswith(("0", "2"))
                        and hasattr(m, "lora_A")}
    assert all(".bnb" in m or ".torchao" in m for m in quantized_layers.values()), quantized_layers
    for name, layer in L.lora_layers(model):  # the same A and B
        peft_layer = theirs.base_model.model.get_submodule(name)
        with torch.no_grad():
            peft_layer.lora_A["default"].weight.copy_(layer.lora_A)
            peft_layer.lora_B["default"].weight.copy_(layer.lora_B)
    x1, x2 = inputs().requires_grad_(), inputs().requires_grad_()  # train mode first: an eval forward repacks
    model.train(), theirs.train()
    torch.testing.assert_close(model(x1), theirs(x2), **TOL)
    model(x1).square().sum().backward()
    theirs(x2).square().sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, **TOL)
    for name, layer in L.lora_layers(model):
        peft_layer = theirs.base_model.model.get_submodule(name)
        torch.testing.assert_close(layer.lora_B.grad, peft_layer.lora_B["default"].weight.grad, **TOL)
    x = inputs()
    model.eval(), theirs.eval()
    L.save_peft_adapter(model, tmp_path / "ours")  # our file in PEFT, on a fresh copy of the same base
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    with torch.no_grad():  # (a 4-bit eval forward runs another kernel where no input requires grad)
        torch.testing.assert_close(model(x), theirs(x), **TOL)
        torch.testing.assert_close(loaded(x), model(x), **TOL)


@pytest.mark.parametrize("kind", ["nf4-dq", "int8", "torchao-int8"])
def test_a_peft_qlora_adapter_loads_computing_what_peft_computes(kind, tmp_path):
    base = quantized_net(kind)
    theirs = peft_model(base, kind, lora_dropout=0.1)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    theirs.save_pretrained(str(tmp_path / "peft"))
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["target_modules"]
    model = L.load_peft_adapter(copy.deepcopy(base), tmp_path / "peft")
    assert isinstance(model[0], L.QLoRALinear) and model[0].dropout == 0.1
    x = inputs()
    model.eval(), theirs.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), theirs(x), **TOL)


# --- bad input: named, and nothing changes -------------------------------------------------------------------


def fp16_weights_int8():
    layer = bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=True)
    return layer.to("cpu")


def unquantized_4bit():
    return bnb.nn.Linear4bit(64, 64, quant_type="nf4")  # not moved to a device: bitsandbytes has not quantized it


def dynamic_activation_torchao():
    if torchao is None:
        pytest.skip("needs torchao (it imports on torch >= 2.5)")
    model = nn.Sequential(nn.Linear(64, 64))
    torchao.quantize_(model, torchao.Int8DynamicActivationInt8WeightConfig())
    return model[0]


@pytest.mark.parametrize("make, reason", [
    (fp16_weights_int8, r"has_fp16_weights=True: bitsandbytes trains that float16 weight itself"),
    (unquantized_4bit, r"its weight is not quantized yet \(bitsandbytes quantizes on \.to\(device\)\)"),
    (dynamic_activation_torchao, r"its torchao Int8Tensor quantizes the input too, which then gets no gradient"),
])
def test_a_quantized_base_lora_min_cannot_run_exactly_is_refused_by_name(make, reason):
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), make())
    before, modules = state(model), list(model.modules())
    for targets in (None, ["2"]):
        with pytest.raises(ValueError, match=rf"^cannot add LoRA to '2': QLoRALinear cannot adapt this .*: {reason}"):
            L.add_lora(model, r=4, target_modules=targets)
        assert same_state(model, before) and list(model.modules()) == modules
        assert [p.requires_grad for p in model.parameters()][:2] == [True, True]


class Linear4bit(nn.Linear):
    """Not bitsandbytes' (found by its name and its library, not its name alone)."""

    def forward(self, x):
        return 2 * super().forward(x)


def test_other_quantized_linears_and_subclasses_with_their_own_forward_stay_refused():
    class Scaled4bit(bnb.nn.Linear4bit):
        def forward(self, x):
            return 2 * super().forward(x)
    outlier_aware = bnb.nn.OutlierAwareLinear(64, 64)  # bitsandbytes', but no QLoRA base
    for layer in (Scaled4bit(64, 64, quant_type="nf4").to("cpu"), Linear4bit(64, 64), outlier_aware):
        with pytest.raises(ValueError, match=rf"it is a {type(layer).__name__}, a subclass with its own forward\(\)"):
            L.add_lora(nn.Sequential(layer), r=4)


# --- .to(device): the quantized base goes along ----------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["nf4-dq", "int8"])
def test_to_cuda_takes_the_quantized_base_along(kind):
    base = quantized_net(kind)
    model = randomize(L.add_lora(copy.deepcopy(base), r=4)).eval()
    x = inputs()
    with torch.no_grad():
        expected = model(x)
        model.to("cuda")
        base.to("cuda")
        assert model[0].quantized.weight is model[0].weight and model[0].weight.device.type == "cuda"
        torch.testing.assert_close(model(x.cuda()).cpu(), expected, rtol=2e-2, atol=2e-2)  # other kernels
        with L.lora_disabled(model):
            assert torch.equal(model(x.cuda()), base(x.cuda()))


# --- 6. a real QLoRA run: a tiny Llama loaded in 4 bits ------------------------------------------------------


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=97, max_position_embeddings=64,
                                      attn_implementation="eager")
    folder = tmp_path_factory.mktemp("llama")
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def load_4bit(folder):
    transformers = pytest.importorskip("transformers")
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_use_double_quant=True)
    return transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, device_map="cpu")


def test_qlora_on_a_4bit_llama_trains_with_checkpointing_and_peft_reads_its_adapter(llama_folder, tmp_path):
    peft = pytest.importorskip("peft")
    model = L.add_lora(load_4bit(llama_folder), r=4, alpha=8)
    projections = {n for n, m in load_4bit(llama_folder).named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(projections) == 14  # q, k, v, o, gate, up, down in 2 layers; lm_head stays float
    assert {n for n, m in L.lora_layers(model) if isinstance(m, L.QLoRALinear)} == projections
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    reference = copy.deepcopy(model).train()
    model.train().gradient_checkpointing_enable()
    if not model.get_input_embeddings()._forward_hooks:  # (transformers versions differ)
        model.enable_input_require_grads()
    for m in (model, reference):
        m(input_ids=ids, labels=ids).loss.backward()
    grads = [[p.grad for p in m.parameters() if p.requires_grad] for m in (model, reference)]
    assert all(g is not None for g in grads[0])
    for a, b in zip(*grads):  # checkpointing recomputes, and changes no gradient
        torch.testing.assert_close(a, b, **TOL)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    losses = []
    for _ in range(4):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    model.eval()
    L.save_peft_adapter(model, tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(load_4bit(llama_folder), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        ours = model(input_ids=ids).logits  # transformers 4 loads the float part in float16, where PEFT rounds
        tol = TOL if ours.dtype == torch.float32 else dict(rtol=1e-2, atol=2e-3)  # its branch before the sum
        torch.testing.assert_close(theirs(input_ids=ids).logits, ours, **tol)


# --- 7. the demo: python mnist_demo.py --quantize nf4 ----------------------------------------------------------


def test_mnist_demo_quantize_nf4_trains_lora_on_the_4bit_base_with_its_proofs(tmp_path, capsys):
    from test_mnist_demo import run_demo, synthetic_mnist
    common = ["--data-dir", synthetic_mnist(tmp_path / "mnist"), "--cache-dir", tmp_path / "cache", "--quiet",
              "--lora-steps", 10, "--device", "cpu", "--quantize", "nf4"]
    status, report = run_demo(*common, "--json", tmp_path / "q.json", "--save-adapter", tmp_path / "a.pt")
    out = capsys.readouterr().out
    assert status == 0 and report["proofs"] == {
        "4-bit base bit-for-bit unchanged": True,
        "LoRA-disabled predictions identical to the 4-bit base": True,
        "merged predictions match LoRA-enabled": True,
        "merged model has no LoRA layers": True,
    }
    results = report["results"]
    assert list(results) == ["before fine-tuning", "4-bit base (nf4)", "LoRA enabled", "LoRA disabled",
                             "LoRA merged into W"]
    size = report["model_bytes"]
    assert results["LoRA disabled"] == results["4-bit base (nf4)"] != results["before fine-tuning"]
    assert results["LoRA enabled"] == results["LoRA merged into W"] != results["LoRA disabled"]
    float32 = size["before fine-tuning"]
    assert float32 == 4 * 2_807_010 and size["LoRA merged into W"] == float32
    assert size["4-bit base (nf4)"] < float32 / 7  # 4 bits and the block statistics (the biases stay float)
    assert size["LoRA enabled"] == size["LoRA disabled"] == size["4-bit base (nf4)"] + 4 * 6_794
    assert "| 4-bit base (nf4) |" in out and "MiB (1.00x)" in out and "[ok] 4-bit base bit-for-bit unchanged" in out
    status, loaded = run_demo(*common, "--json", tmp_path / "l.json", "--load-adapter", tmp_path / "a.pt")
    assert status == 0 and loaded["lora_steps_run"] == 0  # the adapter on a freshly quantized base: the same run
    assert loaded["results"] == results and loaded["model_bytes"] == size


# --- 8. the benchmark's rows: python benchmarks/bench_lora.py --layers qlora -------------------------------------


def test_bench_lora_qlora_rows_run_on_tiny_sizes(capsys):
    pytest.importorskip("peft")
    sys.path.insert(0, str(Path(__file__).resolve().parent / "benchmarks"))
    import bench_lora
    bench_lora.main(["--layers", "qlora", "--dim", "64", "--tokens", "16", "--qlora-ranks", "2", "--reps", "2",
                     "--warmup", "1"])
    out = capsys.readouterr().out
    assert "## QLoRA training step: 4-bit nf4 base (bitsandbytes, double quantization), in = out = 64, 16 tokens" in out
    assert "outputs agree: PEFT bnb Linear4bit match lora_min.QLoRALinear" in out
    for row in bench_lora.QLORA_IMPLEMENTATIONS:
        assert f"| {row} |" in out
    assert re.search(r"layer bytes: float32 0\.02 MiB, torch\.float32 0\.02 MiB; nf4 0\.00 MiB \(0\.\d+ x float32\)",
                     out)
    layer, params = bench_lora.make_qlora_min(64, 2, "cpu", torch.float32)
    bench_lora.same_init(params)
    assert bench_lora.saved_bytes(layer, torch.randn(16, 64, requires_grad=True))[1] == (16, 2)  # only the thin h


# --- found by an adversarial review ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["nf4", "int8", "torchao-int8"])
def test_a_quantized_module_named_in_modules_to_save_is_refused_and_changes_nothing(kind):
    """Its weight cannot train in full (bitsandbytes' is integer; torchao's got no gradient): refused up front."""
    model = quantized_net(kind)
    before = [(type(m), m.training, [(p, p.requires_grad) for p in m.parameters()]) for m in model]
    with pytest.raises(ValueError, match=r"modules_to_save '0' holds quantized weights, which cannot train in full"):
        L.add_lora(model, r=4, target_modules=["4"], modules_to_save=["0"])
    assert [(type(m), m.training, [(p, p.requires_grad) for p in m.parameters()]) for m in model] == before


def test_a_torchao_base_loaded_with_assign_is_the_one_the_layer_runs_and_exports():
    """load_state_dict(assign=True) gives the quantized module new Parameters: the layer holds those, so the
    export and the forward use the loaded W (before, the layer kept the old one and its repr wrote it back)."""
    model, other = randomize(L.add_lora(quantized_net("torchao-int8"), r=4)), quantized_net("torchao-int8", seed=5)
    model.load_state_dict(other.state_dict(), strict=False, assign=True)
    x = inputs()
    assert model[0].weight is model[0].quantized.weight
    y = model(x)
    repr(model)
    torch.testing.assert_close(model(x), y)
    torch.testing.assert_close(L.merge_and_unload(model)(x), y, **TOL)
    with L.lora_disabled(model):
        torch.testing.assert_close(model(x), other(x))


def test_torchao_nf4_tensor_weights_are_quantized_bases_that_never_merge_in_place():
    """torchtune's QLoRA weight (torchao's NF4Tensor, no TorchAOBaseTensor): a QLoRALinear, so merge() is refused
    (writing W + ΔW into it would requantize it: W off by a third of its largest entry after merge + unmerge);
    the export is its original weight plus ΔW."""
    if torchao is None:
        pytest.skip("needs torchao (it imports on torch >= 2.5)")
    to_nf4 = torchao.to_nf4
    linear = nn.Linear(64, 256, bias=False).to(torch.bfloat16)
    linear.weight = nn.Parameter(to_nf4(linear.weight.detach()), requires_grad=False)
    model = randomize(L.add_lora(nn.Sequential(linear), r=4))
    assert isinstance(model[0], L.QLoRALinear)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    y = model(x)
    with pytest.raises(RuntimeError, match="torchao NF4Tensor"):
        L.merge_lora(model)
    assert not model[0].merged and torch.equal(model(x), y)
    W = linear.weight.get_original_weight().float() + model[0].delta_weight(torch.float32)
    torch.testing.assert_close(L.merge_and_unload(model)[0].weight, W.to(torch.bfloat16))


def test_a_bfloat16_model_with_float32_compute_exports_a_model_that_runs():
    """transformers' 4-bit default: a bfloat16 model, bnb_4bit_compute_dtype float32. The export is bfloat16, the
    model's dtype around the layer (in the compute dtype, float32, it raised on the bfloat16 activations)."""
    net = float_net().to(torch.bfloat16)
    layer = bnb.nn.Linear4bit(64, 64, quant_type="nf4", compute_dtype=torch.float32)
    layer.load_state_dict(net[0].state_dict())
    net[0] = layer.to(torch.bfloat16).to("cpu")  # bitsandbytes quantizes on the move to a device
    assert layer.weight.quant_state.dtype == torch.bfloat16 and layer.compute_dtype == torch.float32
    model, x = randomize(L.add_lora(net, r=4)), inputs().to(torch.bfloat16)
    plain = L.merge_and_unload(model)
    assert plain[0].weight.dtype == plain[0].bias.dtype == torch.bfloat16
    torch.testing.assert_close(plain(x), model(x), rtol=3e-2, atol=3e-2)
