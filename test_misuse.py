"""Misuse fails loudly, and a refusal changes nothing.

The specification of lora_min's promises to a user who gets something wrong:
LoRA is never silently bypassed, every refused call leaves the model exactly as
it was (modules, parameters, requires_grad, modes, hooks), every bad field of a
file is named, and the layer behaves as the layer it replaces (modes, devices,
dtypes, autocast).
"""

import copy
import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lora_min as L

# --- the refusal oracle: a snapshot of everything a call could change ---------------------------------


def snapshot(model):
    """Everything about a model that a refused call must leave as it was."""
    modules = {n: (id(m), type(m), m.training, len(m._forward_hooks), len(m._forward_pre_hooks))
               for n, m in model.named_modules(remove_duplicate=False)}
    params = {n: (id(p), p.requires_grad, p.detach().clone()) for n, p in model.named_parameters(remove_duplicate=False)}
    return modules, params


def assert_unchanged(model, before):
    modules, params = snapshot(model)
    assert modules == before[0]
    assert params.keys() == before[1].keys()
    for name, (pid, requires_grad, value) in params.items():
        assert (pid, requires_grad) == before[1][name][:2], name
        assert torch.equal(value, before[1][name][2]), name


class Block(nn.Module):
    def __init__(self, d=4):
        super().__init__()
        self.fc, self.out = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        return self.out(torch.tanh(self.fc(x)))


def two_blocks():
    return nn.Sequential(Block(), Block())


def lora_two_blocks(**kwargs):
    model = L.add_lora(two_blocks(), r=2, **kwargs)
    for _, layer in L.lora_layers(model):
        nn.init.normal_(layer.lora_B)
    return model


def write_peft(folder, model_names, shapes=None, **fields):
    """A PEFT adapter folder for linears of size 4: config fields and rank-2 A, B tensors (shapes: others)."""
    r = 2
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 2, "target_modules": model_names, "bias": "none", **fields}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    tensors = {}
    for name in model_names:
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(r, 4)
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(4, r)
    torch.save({**tensors, **(shapes or {})}, folder / "adapter_model.bin")


def hooked(kind):
    """A model whose first linear holds one hook of this kind."""
    model = two_blocks()
    fc = model[0].fc
    register = {
        "forward pre": lambda: fc.register_forward_pre_hook(lambda m, a: None),
        "forward": lambda: fc.register_forward_hook(lambda m, a, o: None),
        "forward with kwargs": lambda: fc.register_forward_hook(lambda m, a, k, o: None, with_kwargs=True),
        "backward pre": lambda: fc.register_full_backward_pre_hook(lambda m, g: None),
        "backward": lambda: fc.register_full_backward_hook(lambda m, gi, go: None),
        "state_dict pre": lambda: fc.register_state_dict_pre_hook(lambda m, p, k: None),
        "load_state_dict post": lambda: fc.register_load_state_dict_post_hook(lambda m, k: None),
    }
    register[kind]()
    return model


def with_value(model, key, value):
    state = {k: v.detach().clone() for k, v in L.lora_state_dict(model).items()}
    state[key] = value
    return state


# Every way a call can be refused: (model factory, the refused call, the error, words the message must hold).
REFUSALS = {
    "bad rank": (two_blocks, lambda m, tmp: L.add_lora(m, r=0), ValueError, "r"),
    "bad alpha": (two_blocks, lambda m, tmp: L.add_lora(m, alpha="8"), ValueError, "alpha"),
    "unknown target": (two_blocks, lambda m, tmp: L.add_lora(m, target_modules=["fc", "nope"]), ValueError, "nope"),
    "target list of non-names": (two_blocks, lambda m, tmp: L.add_lora(m, target_modules=[5]), ValueError, "target_modules"),
    "second target cannot be adapted": (
        lambda: nn.Sequential(nn.Linear(4, 4), nn.Conv2d(4, 4, 3, groups=2)),
        lambda m, tmp: L.add_lora(m, target_modules=["0", "1"]), ValueError, "groups=2"),
    **{f"{kind} hook": (lambda kind=kind: hooked(kind), lambda m, tmp: L.add_lora(m), ValueError, "hooks")
       for kind in ("forward pre", "forward", "forward with kwargs", "backward pre", "backward", "state_dict pre",
                    "load_state_dict post")},
    "a parent reads the weight and never calls it": (
        lambda: nn.Sequential(nn.MultiheadAttention(4, 2), nn.Linear(4, 4)),
        lambda m, tmp: L.add_lora(m, target_modules=["1", "0.out_proj"]), ValueError, "MultiheadAttention"),
    "already adapted": (lora_two_blocks, lambda m, tmp: L.add_lora(m), ValueError, "already has LoRA"),
    "state dict: a NumPy array": (
        lora_two_blocks, lambda m, tmp: L.load_lora_state_dict(m, with_value(m, "1.out.lora_B", np.zeros((4, 2)))),
        ValueError, "1.out.lora_B is a ndarray"),
    "state dict: a meta tensor": (
        lora_two_blocks, lambda m, tmp: L.load_lora_state_dict(m, with_value(m, "1.out.lora_B", torch.empty(4, 2, device="meta"))),
        ValueError, "meta"),
    "state dict: integers": (
        lora_two_blocks, lambda m, tmp: L.load_lora_state_dict(m, with_value(m, "1.out.lora_B", torch.zeros(4, 2, dtype=torch.long))),
        ValueError, "int64"),
    "state dict: a wrong shape": (
        lora_two_blocks, lambda m, tmp: L.load_lora_state_dict(m, with_value(m, "1.out.lora_B", torch.zeros(4, 3))),
        ValueError, r"1.out.lora_B has shape \(4, 3\)"),
    "state dict: a missing key": (
        lora_two_blocks, lambda m, tmp: L.load_lora_state_dict(m, {"0.fc.lora_A": torch.zeros(2, 4)}), ValueError, "missing"),
    "load_adapter: a tensor of the wrong dtype": (
        lora_two_blocks, lambda m, tmp: load_adapter_file(m, tmp, "1.out.lora_B", torch.zeros(4, 2, dtype=torch.bool)),
        ValueError, "1.out.lora_B has dtype torch.bool"),
    "load_adapter: a tensor of the wrong shape": (
        lora_two_blocks, lambda m, tmp: load_adapter_file(m, tmp, "1.out.lora_B", torch.zeros(2, 4)),
        ValueError, r"1.out.lora_B has shape \(2, 4\)"),
    "set_lora_enabled(False) with a merged layer": (
        lambda: merged_first(), lambda m, tmp: L.set_lora_enabled(m, False), RuntimeError, "unmerge_lora"),
    "merge_lora: float16 overflow in the second layer": (
        lambda: overflowing(), lambda m, tmp: L.merge_lora(m), RuntimeError, "'1': W \\+ ΔW has inf"),
    "merge_lora: a disabled layer": (
        lambda: disabled_second(), lambda m, tmp: L.merge_lora(m), RuntimeError, "disabled"),
    "unmerge_lora: a layer not merged": (
        lambda: merged_first(), lambda m, tmp: L.unmerge_lora(m), RuntimeError, "not merged"),
    "PEFT: alpha_pattern makes the second layer invalid": (
        two_blocks, lambda m, tmp: (write_peft(tmp, ["0.fc", "1.fc"], alpha_pattern={"1.fc": 0}), L.load_peft_adapter(m, tmp)),
        ValueError, "alpha_pattern"),
    "PEFT: rank_pattern gives a module registered twice two ranks": (
        lambda: aliased(), lambda m, tmp: (write_peft(tmp, ["a.fc", "b.fc"], rank_pattern={"b.fc": 3}, shapes=rank_3("b.fc")),
                                           L.load_peft_adapter(m, tmp)), ValueError, "same module"),
    "PEFT: the second tensor has the wrong shape": (
        two_blocks, lambda m, tmp: (write_peft(tmp, ["0.fc", "1.fc"], shapes={"base_model.model.1.fc.lora_B.weight":
                                                                              torch.zeros(4, 3)}),
                                    L.load_peft_adapter(m, tmp)), ValueError, "has shape"),
    "PEFT: a target its parent never calls": (
        lambda: nn.Sequential(nn.MultiheadAttention(4, 2)),
        lambda m, tmp: (write_peft(tmp, ["0.out_proj"]), L.load_peft_adapter(m, tmp)), ValueError, "never calls"),
}


def load_adapter_file(model, folder, key, value):
    """Save the model's adapter with one tensor replaced, then load it back."""
    L.save_adapter(model, folder / "adapter.pt")
    saved = torch.load(folder / "adapter.pt", weights_only=True)
    saved["state_dict"][key] = value
    torch.save(saved, folder / "adapter.pt")
    L.load_adapter(model, folder / "adapter.pt")


def rank_3(name):
    return {f"base_model.model.{name}.lora_A.weight": torch.zeros(3, 4), f"base_model.model.{name}.lora_B.weight": torch.zeros(4, 3)}


def overflowing():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)).half()
    L.add_lora(model, r=2)
    with torch.no_grad():
        model[1].lora_B.fill_(3e4)
        model[1].lora_A.fill_(3e4)
    return model


def disabled_second():
    model = lora_two_blocks()
    model[1].out.enabled = False
    return model


def merged_first():
    model = lora_two_blocks()
    model[0].fc.merge()
    return model


def aliased():
    model, block = nn.Module(), Block()
    model.a = model.b = block
    return model


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_a_refused_call_raises_naming_the_problem_and_changes_nothing(case, tmp_path):
    make, call, error, words = REFUSALS[case]
    model = make()
    before = snapshot(model)
    with pytest.raises(error, match=words):
        call(model, tmp_path)
    assert_unchanged(model, before)


# --- 1. LoRA that the model never runs ---------------------------------------------------------------


class ReadsWeight(nn.Module):
    """A parent that never calls its child: it reads the child's weight itself."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        return F.linear(x, self.proj.weight, self.proj.bias)


class ReadsWeightInAHelper(ReadsWeight):
    def forward(self, x):
        return self.project(x)

    def project(self, x):
        return x @ self.proj.weight.T


class ReadsOnlyTheDtype(nn.Module):
    """Asks the weight for its dtype (as T5 does) and calls the child: no bypass."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        if isinstance(self.proj.weight, torch.Tensor) and self.proj.bias is not None:
            x = x.to(self.proj.weight.dtype)
        return self.proj(x)


class SometimesReads(nn.Module):
    """Calls its child, except on a fast path that reads the weight directly."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.fast = False

    def forward(self, x):
        if self.fast:
            return F.linear(x, self.proj.weight, self.proj.bias)
        return self.proj(x)


class ReadsAGrandchildsWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = ReadsOnlyTheDtype()

    def forward(self, x):
        return F.linear(x, self.block.proj.weight)


@pytest.mark.parametrize("parent", [ReadsWeight, ReadsWeightInAHelper, ReadsAGrandchildsWeight])
def test_a_child_whose_parent_reads_its_weight_and_never_calls_it_is_refused_by_name(parent):
    model = nn.Sequential(parent())
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"proj'.*\({parent.__name__}\) reads its weight directly and never calls it"):
        L.add_lora(model, target_modules=["proj"])
    assert_unchanged(model, before)


@pytest.mark.parametrize("parent", [ReadsWeight, ReadsWeightInAHelper])
def test_by_default_such_a_child_is_skipped_with_a_warning(parent):
    model = nn.Sequential(parent(), nn.Linear(4, 4))
    with pytest.warns(UserWarning, match=rf"skipping '0.proj': its parent {parent.__name__} reads its weight directly"):
        L.add_lora(model)
    assert [n for n, _ in L.lora_layers(model)] == ["1"]


def test_reading_only_a_weights_dtype_or_identity_is_not_a_bypass():
    model = nn.Sequential(ReadsOnlyTheDtype())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        L.add_lora(model, target_modules=["proj"])
    assert isinstance(model[0].proj, L.LoRALinear)


def test_a_parent_that_sometimes_reads_the_weight_raises_when_it_skips_lora():
    model = nn.Sequential(SometimesReads())
    with pytest.warns(UserWarning, match=r"SometimesReads's forward reads the weight of \['proj'\] directly on some code paths"):
        L.add_lora(model)
    nn.init.normal_(model[0].proj.lora_B)
    x = torch.randn(2, 4)
    model(x)  # calls the child: fine
    model[0].fast = True
    with pytest.raises(RuntimeError, match=r"LoRA on \['proj'\] did not run: this SometimesReads's forward read"):
        model(x)
    with L.lora_disabled(model):
        model(x)  # LoRA off: reading W directly is exactly right
    L.merge_lora(model)
    with torch.no_grad():
        model.eval()(x)  # merged: the weight it reads holds W + ΔW


class TiedOutput(nn.Module):
    """Calls its embedding for the input, and reads its weight for the output projection."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)

    def forward(self, tokens):
        return self.embed(tokens) @ self.embed.weight.T


def test_a_parent_that_calls_a_child_and_also_reads_its_weight_is_warned_about():
    with pytest.warns(UserWarning, match=r"TiedOutput's forward reads the weight of \['embed'\].*sees W there, not W \+ ΔW"):
        L.add_lora(TiedOutput(), target_modules=["embed"])


def test_merge_and_unload_refuses_lora_layers_with_hooks_it_would_drop():
    model = lora_two_blocks()
    model[1].out.register_forward_hook(lambda m, a, o: None)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"merge_and_unload: '1.out' has hooks.*forward hook"):
        L.merge_and_unload(model, inplace=True)
    assert_unchanged(model, before)


@pytest.mark.parametrize("state, words", [
    ([torch.zeros(2, 4)], "expected a dict of tensors keyed by name, got a list"),
    ({0: torch.zeros(2, 4), "0.fc.lora_A": torch.zeros(2, 4)}, "unexpected \\[0\\]"),
])
def test_load_lora_state_dict_names_a_container_that_is_not_an_adapter(state, words):
    model = lora_two_blocks()
    before = snapshot(model)
    with pytest.raises(ValueError, match=words):
        L.load_lora_state_dict(model, state)
    assert_unchanged(model, before)


def test_the_run_time_check_is_gone_from_the_merged_export():
    model = nn.Sequential(SometimesReads())
    with pytest.warns(UserWarning):
        L.add_lora(model)
    plain = L.merge_and_unload(model)
    assert not plain[0]._forward_hooks and not plain[0]._forward_pre_hooks
    assert model[0]._forward_hooks  # the input model keeps its check


def test_a_module_registered_twice_is_looked_up_before_anything_changes():
    model = aliased()
    L.add_lora(model)  # "a.fc" replaced first must not make "b.fc" resolve to the new layer
    assert model.a.fc is model.b.fc and isinstance(model.a.fc, L.LoRALinear)


def test_multihead_attention_registered_under_two_names_is_skipped_under_both():
    def shared_attention():
        model, attention = nn.Module(), nn.MultiheadAttention(8, 2)
        model.first, model.second, model.head = nn.Sequential(attention), nn.Sequential(attention), nn.Linear(8, 8)
        return model

    model = shared_attention()
    with pytest.warns(UserWarning, match="skipping 'first.0.out_proj'"):
        L.add_lora(model)
    assert [n for n, _ in L.lora_layers(model, remove_duplicate=False)] == ["head"]
    model = shared_attention()
    with pytest.raises(ValueError, match="'second.0.out_proj'.*MultiheadAttention"):
        L.add_lora(model, target_modules=["second.0.out_proj"])


def test_transformer_encoder_layer_computes_lora_in_eval_mode_too():
    torch.manual_seed(0)
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True), 2,
                                  enable_nested_tensor=False)
    with pytest.warns(UserWarning):
        L.add_lora(model)
    assert {n for n, _ in L.lora_layers(model)} == {f"layers.{i}.linear{j}" for i in (0, 1) for j in (1, 2)}
    for _, layer in L.lora_layers(model):
        nn.init.normal_(layer.lora_B)
    x = torch.randn(2, 3, 8)
    expected = model.train()(x)
    with torch.no_grad():  # eval + no_grad is where torch's fast path reads linear1.weight directly
        torch.testing.assert_close(model.eval()(x), expected)
        with L.lora_disabled(model):
            assert not torch.allclose(model(x), expected)


def test_timm_beit_qkv_read_through_f_linear_raises_instead_of_training_nothing():
    timm = pytest.importorskip("timm")
    model = timm.create_model("beit_base_patch16_224", pretrained=False, img_size=32, patch_size=16, depth=1,
                              embed_dim=32, num_heads=2, num_classes=3)
    with pytest.warns(UserWarning, match="Attention's forward reads the weight of"):
        L.add_lora(model, target_modules=["qkv"])
    with pytest.raises(RuntimeError, match=r"LoRA on \['qkv'\] did not run: this Attention's forward"):
        model(torch.randn(1, 3, 32, 32))


# --- 3. every field of a PEFT file is validated and named ------------------------------------------


@pytest.mark.parametrize("field, value", [
    ("lora_alpha", "8"), ("lora_alpha", 0), ("lora_alpha", True), ("target_modules", 5), ("target_modules", [1]),
    ("target_modules", "fc["), ("lora_dropout", "0.1"), ("lora_dropout", 1.5), ("rank_pattern", [1]),
    ("rank_pattern", {"fc": 0}), ("rank_pattern", {"fc": 2.5}), ("alpha_pattern", {"fc": "2"}), ("exclude_modules", 3),
    ("r", -4), ("r", 2.0), ("r", True), ("use_rslora", "yes"), ("init_lora_weights", 1),
    ("layers_to_transform", 0), ("layers_to_transform", [0]), ("modules_to_save", ["fc"]),
])
def test_a_bad_peft_field_is_a_value_error_naming_file_field_and_value(tmp_path, field, value):
    write_peft(tmp_path, ["0.fc"], **{field: value})
    model = two_blocks()
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"adapter_config.json: {field} = {__import__('re').escape(repr(value))}"):
        L.load_peft_adapter(model, tmp_path)
    assert_unchanged(model, before)


def test_a_peft_file_with_null_optional_fields_loads(tmp_path):
    write_peft(tmp_path, ["0.fc"], lora_dropout=None, rank_pattern=None, alpha_pattern=None, exclude_modules=None,
               use_rslora=None)
    model = L.load_peft_adapter(two_blocks(), tmp_path)
    assert [n for n, _ in L.lora_layers(model)] == ["0.fc"]


# --- 4. states: modes, and merged layers in partial checkpoints -----------------------------------


@pytest.mark.parametrize("training", [True, False])
def test_new_lora_layers_take_the_mode_of_the_module_they_replace(training, tmp_path):
    model = L.add_lora(two_blocks().train(training), dropout=0.5)
    assert all(layer.training == training for _, layer in L.lora_layers(model))
    write_peft(tmp_path, ["0.fc"], lora_dropout=0.5)
    model = L.load_peft_adapter(two_blocks().train(training), tmp_path)
    assert model[0].fc.training == training
    x = torch.randn(8, 4)
    if not training:  # as PeftModel.from_pretrained: eval, so no dropout and repeatable outputs
        assert torch.equal(model(x), model(x))


def test_a_merged_layer_accepts_a_partial_checkpoint_without_its_keys():
    model = lora_two_blocks()
    model[0].fc.merge()
    other = {"1.out.bias": torch.full((4,), 7.0)}
    result = model.load_state_dict(other, strict=False)
    assert torch.equal(model[1].out.bias, other["1.out.bias"]) and "0.fc.weight" in result.missing_keys
    with pytest.raises(RuntimeError, match="0.fc: the checkpoint was saved unmerged"):
        model.load_state_dict({"0.fc.lora_A": torch.zeros(2, 4)}, strict=False)


# --- 5. devices and dtypes ----------------------------------------------------------------------------


@pytest.mark.parametrize("make, x", [
    (lambda: nn.Linear(4, 3, device="meta"), torch.empty(2, 4, device="meta")),
    (lambda: nn.Embedding(10, 3, device="meta"), torch.zeros(2, 5, dtype=torch.long, device="meta")),
    (lambda: nn.Conv2d(4, 3, 3, device="meta"), torch.empty(2, 4, 8, 8, device="meta")),
])
def test_forward_on_the_meta_device_gives_the_base_layers_shape(make, x):
    base = make()
    layer = L.lora_class_for(base)(base, r=2)
    assert layer(x).shape == base(x).shape and layer(x).device.type == "meta"


@pytest.mark.parametrize("weight_dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("input_dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_under_cpu_autocast_the_layer_casts_what_nn_linear_casts(weight_dtype, input_dtype):
    torch.manual_seed(0)
    linear = nn.Linear(4, 3).to(weight_dtype)
    layer = L.LoRALinear(copy.deepcopy(linear), r=2)
    x = torch.randn(5, 4).to(input_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        try:
            expected = linear(x)
        except RuntimeError as e:  # mixed float64 and bfloat16: torch refuses, so must we
            with pytest.raises(RuntimeError):
                layer(x)
            return
        got = layer(x)
    assert got.dtype == expected.dtype
    torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-2)  # B = 0: the same product


def test_a_float64_model_runs_under_autocast_after_add_lora():
    model = L.add_lora(two_blocks().double(), r=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(torch.randn(3, 4, dtype=torch.float64)).dtype == torch.float64


def test_merge_that_would_overflow_refuses_and_leaves_the_weight():
    layer = L.LoRALinear(nn.Linear(4, 4).half(), r=2)
    with torch.no_grad():
        layer.lora_A.fill_(300.0)
        layer.lora_B.fill_(300.0)
    W = layer.weight.clone()
    with pytest.raises(RuntimeError, match="inf or NaN"):
        layer.merge()
    assert torch.equal(layer.weight, W) and not layer.merged


# --- 6. PEFT files say exactly what they hold --------------------------------------------------------


def nested():
    """Sequential(Linear, Sequential(Linear)): the target "0" is also the dotted end of "1.0"."""
    return nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4)))


def numbered():
    return nn.Sequential(*[nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)) for _ in range(11)])


def aliased_leaf():
    model = nn.Module()
    model.a = nn.Linear(4, 4)
    model.b = nn.Sequential(nn.Linear(4, 4))
    model.c = model.b  # the same Sequential under a second name
    return model


@pytest.mark.parametrize("make, targets", [
    (nested, ["0"]), (nested, ["1.0"]), (numbered, ["1.0", "10.1"]), (numbered, ["1.1"]),
    (aliased_leaf, ["a"]), (aliased_leaf, ["b.0"]),
])
def test_save_peft_adapter_targets_select_exactly_the_saved_layers_under_peft(make, targets, tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = make()
    model, layers = copy.deepcopy(base), {}
    for name in targets:  # exactly these layers (add_lora's suffix rule would take "1.0" for "0")
        linear = model.get_submodule(name)
        layer = layers.setdefault(id(linear), L.LoRALinear(linear, r=2))
        nn.init.normal_(layer.lora_B)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    L.save_peft_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).base_model.model
    adapted = {n for n, m in theirs.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}
    assert adapted == {n for n, _ in L.lora_layers(model)}
    ours = L.load_peft_adapter(copy.deepcopy(base), tmp_path)
    assert {n for n, _ in L.lora_layers(ours)} == {n for n, _ in L.lora_layers(model)}
    x = torch.randn(3, 4)
    outputs = lambda m: torch.cat([m.get_submodule(n)(x) for n, _ in L.lora_layers(model)])  # noqa: E731
    torch.testing.assert_close(outputs(ours.eval()), outputs(theirs.eval()))
    torch.testing.assert_close(outputs(ours), outputs(model.eval()))
