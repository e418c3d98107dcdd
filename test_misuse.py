"""Misuse fails loudly, and a refusal changes nothing.

The specification of lora_min's promises to a user who gets something wrong:
LoRA is never silently bypassed, every refused call leaves the model exactly as
it was (modules, parameters, requires_grad, modes, hooks, enabled / merged
states), every bad field of a file is named, and the layer behaves as the layer
it replaces (modes, devices, dtypes, autocast).

Sections: every refusal, one table (REFUSALS) and one oracle (conftest.snapshot);
1. LoRA that the model never runs; 2. files that are not adapters; 3. every field
of a PEFT file is validated and named; 4. states: modes, and checkpoints saved
merged or unmerged; 5. devices and dtypes; 6. PEFT files say exactly what they hold.
"""

import copy
import pickle
import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lora_min as L
from conftest import (Attention, Block, Payload, assert_unchanged, lora_names, mlp, randomize_B, snapshot, tied,
                      write_peft_config)

# --- models and files for the refusals ------------------------------------------------------------------


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
    write_peft_config(folder, **{"target_modules": model_names, **fields})
    tensors = {}
    for name in model_names:
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(r, 4)
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(4, r)
    torch.save({**tensors, **(shapes or {})}, folder / "adapter_model.bin")


HOOK_KINDS = ("forward pre", "forward", "forward with kwargs", "backward pre", "backward", "state_dict pre",
              "load_state_dict post")


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


class ScaledLinear(nn.Linear):
    """An nn.Linear subclass that computes something else (as quantized linears do)."""

    def forward(self, x):
        return 2 * super().forward(x)


def with_value(model, key, value):
    state = {k: v.detach().clone() for k, v in L.lora_state_dict(model).items()}
    state[key] = value
    return state


def without_key(model, key):
    return {k: v for k, v in L.lora_state_dict(model).items() if k != key}


def load_adapter_file(model, folder, key, value):
    """Save the model's adapter with one tensor replaced, then load it back."""
    L.save_adapter(model, folder / "adapter.pt")
    saved = torch.load(folder / "adapter.pt", weights_only=True)
    saved["state_dict"][key] = value
    torch.save(saved, folder / "adapter.pt")
    L.load_adapter(model, folder / "adapter.pt")


def load_adapter_of(model, folder, source, **fields):
    """Save the adapter of another model (`source`), with these top-level fields changed, and load it into `model`."""
    L.save_adapter(source, folder / "adapter.pt")
    saved = torch.load(folder / "adapter.pt", weights_only=True)
    torch.save({**saved, **fields}, folder / "adapter.pt")
    L.load_adapter(model, folder / "adapter.pt")


def load_plain_state_dict_file(model, folder):
    """torch.save(lora_state_dict(model)): the tensors without save_adapter's format."""
    torch.save(L.lora_state_dict(model), folder / "plain.pt")
    L.load_adapter(model, folder / "plain.pt")


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


def merged_all():
    model = lora_two_blocks()
    L.merge_lora(model)
    return model


def aliased():
    model, block = nn.Module(), Block()
    model.a = model.b = block
    return model


def lora_layer(merged=False, enabled=True, train_A=True, shared_with=()):
    """A LoRALinear(3 -> 3, r=1) with random B, in training mode, in the state asked for."""
    layer = randomize_B(L.LoRALinear(nn.Linear(3, 3), r=1))
    layer.shared_with = shared_with
    if merged:
        layer.merge()
    layer.enabled = enabled
    layer.lora_A.requires_grad_(train_A)
    return layer


def enter_lora_disabled(model, tmp=None):
    with L.lora_disabled(model):
        pass


# Invalid settings of a new layer: (settings, words the message must hold).
INVALID_SETTINGS = [
    (dict(r=0), "positive int"), (dict(r=-2), "positive int"), (dict(r=1.5), "positive int"), (dict(r=True), "positive int"),
    (dict(alpha=0), "alpha must be a positive number"), (dict(alpha=-1.0), "alpha must be a positive number"),
    (dict(dropout=1.0), r"dropout must be a number in \[0, 1\)"), (dict(dropout=-0.1), r"dropout must be a number in \[0, 1\)"),
    (dict(init_std=0.0), "init_std"),
]

# Every way a call can be refused: (model factory, the refused call, the error, words the message must hold).
REFUSALS = {
    # --- a new layer ---
    **{f"LoRALinear({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})": (
        lambda: nn.Sequential(nn.Linear(3, 3)), lambda m, tmp, kwargs=kwargs: L.LoRALinear(m[0], **kwargs), ValueError, words)
       for kwargs, words in INVALID_SETTINGS},
    "LoRALinear of a Conv1d": (
        lambda: nn.Sequential(nn.Conv1d(3, 3, 1)), lambda m, tmp: L.LoRALinear(m[0]), TypeError,
        "LoRALinear adapts nn.Linear, got Conv1d"),
    # --- a layer's states ---
    "unmerge() on a layer not merged": (lora_layer, lambda m, tmp: m.unmerge(), RuntimeError, "not merged"),
    "merge() on a merged layer": (lambda: lora_layer(merged=True), lambda m, tmp: m.merge(), RuntimeError, "already merged"),
    "merge() on a disabled layer": (lambda: lora_layer(enabled=False), lambda m, tmp: m.merge(), RuntimeError, "disabled"),
    "disabling a merged layer": (
        lambda: lora_layer(merged=True), lambda m, tmp: setattr(m, "enabled", False), RuntimeError, "cannot disable a merged"),
    "training forward on a merged layer": (
        lambda: lora_layer(merged=True), lambda m, tmp: m(torch.randn(2, 3)), RuntimeError, "would get no gradient"),
    "training forward on a merged layer that trains only B (as LoRA-FA)": (
        lambda: lora_layer(merged=True, train_A=False), lambda m, tmp: m(torch.randn(2, 3)), RuntimeError,
        "would get no gradient"),
    "reset_lora_parameters() on a merged layer": (  # ΔW would change while W holds the old one
        lambda: lora_layer(merged=True), lambda m, tmp: m.reset_lora_parameters(), RuntimeError,
        "reset_lora_parameters.*merged"),
    # --- add_lora ---
    "bad rank": (two_blocks, lambda m, tmp: L.add_lora(m, r=0), ValueError, "r"),
    "bad alpha": (two_blocks, lambda m, tmp: L.add_lora(m, alpha="8"), ValueError, "alpha"),
    "unknown target": (two_blocks, lambda m, tmp: L.add_lora(m, target_modules=["fc", "nope"]), ValueError, "nope"),
    "unknown target, naming the modules LoRA can adapt": (
        mlp, lambda m, tmp: L.add_lora(m, target_modules=["0", "fc9"]), ValueError,
        r"\['fc9'\] match no module.*the modules LoRA can adapt: \['0', '2.0', '3'\]"),
    **{f"target {t!r}, a substring but no dotted end of a name": (
        lambda: nn.Sequential(Attention()), lambda m, tmp, t=t: L.add_lora(m, target_modules=[t]), ValueError,
        rf"\['{t}'\] match no module") for t in ("proj", "_proj")},
    "target list of non-names": (two_blocks, lambda m, tmp: L.add_lora(m, target_modules=[5]), ValueError, "target_modules"),
    "a target that is not a linear": (
        lambda: nn.Sequential(Attention()), lambda m, tmp: L.add_lora(m, target_modules=["q_proj", "act"]), ValueError,
        r"'0.act': it is a ReLU, not an nn.Linear"),
    "second target cannot be adapted": (
        lambda: nn.Sequential(nn.Linear(4, 4), nn.Conv2d(4, 4, 3, groups=2)),
        lambda m, tmp: L.add_lora(m, target_modules=["0", "1"]), ValueError, "groups=2"),
    "a Linear subclass with its own forward": (
        lambda: nn.Sequential(Attention(out_cls=ScaledLinear)), lambda m, tmp: L.add_lora(m, r=2), ValueError,
        r"'0.out_proj': it is a ScaledLinear, a subclass with its own forward\(\)"),
    "a parametrized linear": (
        lambda: nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(4, 4))), lambda m, tmp: L.add_lora(m, r=2),
        ValueError, r"'0': it is parametrized"),
    "an old-style weight_norm linear": (
        lambda: nn.Sequential(nn.utils.weight_norm(nn.Linear(4, 4))), lambda m, tmp: L.add_lora(m, r=2), ValueError,
        r"'0': it has a weight that is not an nn.Parameter"),
    **{f"{kind} hook": (lambda kind=kind: hooked(kind), lambda m, tmp: L.add_lora(m), ValueError, r"'0.fc': it has hooks")
       for kind in HOOK_KINDS},
    "a parent reads the weight and never calls it": (
        lambda: nn.Sequential(nn.MultiheadAttention(4, 2), nn.Linear(4, 4)),
        lambda m, tmp: L.add_lora(m, target_modules=["1", "0.out_proj"]), ValueError, "MultiheadAttention"),
    "MultiheadAttention's own out_proj": (
        lambda: nn.MultiheadAttention(8, 2), lambda m, tmp: L.add_lora(m, target_modules=["out_proj"]), ValueError, "out_proj"),
    "a lone linear": (lambda: nn.Linear(3, 3), lambda m, tmp: L.add_lora(m), TypeError, "LoRALinear"),
    "a model without linears": (lambda: nn.Sequential(nn.ReLU()), lambda m, tmp: L.add_lora(m), ValueError, "no nn.Linear"),
    "already adapted": (lora_two_blocks, lambda m, tmp: L.add_lora(m), ValueError, "already has LoRA"),
    # --- adapter tensors ---
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
    "state dict: one key missing, named": (
        lambda: randomize_B(L.add_lora(mlp(), r=2)), lambda m, tmp: L.load_lora_state_dict(m, without_key(m, "0.lora_A")),
        ValueError, r"missing \['0.lora_A'\]"),
    "state dict: an unexpected key, named": (
        lambda: randomize_B(L.add_lora(mlp(), r=2)),
        lambda m, tmp: L.load_lora_state_dict(m, with_value(m, "9.lora_A", torch.zeros(2, 6))), ValueError, "unexpected.*9.lora_A"),
    "state dict: another rank": (
        lambda: L.add_lora(mlp(), r=4), lambda m, tmp: L.load_lora_state_dict(m, L.lora_state_dict(L.add_lora(mlp(), r=2))),
        ValueError, r"0.lora_A has shape \(2, 6\), the model.s is \(4, 6\)"),
    "state dict: a model without LoRA layers": (
        mlp, lambda m, tmp: L.load_lora_state_dict(m, L.lora_state_dict(L.add_lora(mlp(), r=2))), ValueError, "no LoRA layers"),
    "state dict: merged layers": (
        merged_first, lambda m, tmp: L.load_lora_state_dict(m, L.lora_state_dict(m)), RuntimeError, "merged layers"),
    # --- adapter files ---
    "load_adapter: a tensor of the wrong dtype": (
        lora_two_blocks, lambda m, tmp: load_adapter_file(m, tmp, "1.out.lora_B", torch.zeros(4, 2, dtype=torch.bool)),
        ValueError, "1.out.lora_B has dtype torch.bool"),
    "load_adapter: a tensor of the wrong shape": (
        lora_two_blocks, lambda m, tmp: load_adapter_file(m, tmp, "1.out.lora_B", torch.zeros(2, 4)),
        ValueError, r"1.out.lora_B has shape \(2, 4\)"),
    "load_adapter: another alpha": (
        lambda: L.add_lora(mlp(), r=2, alpha=8), lambda m, tmp: load_adapter_of(m, tmp, L.add_lora(mlp(), r=2)),
        ValueError, "alpha"),
    "load_adapter: another use_rslora": (
        lambda: L.add_lora(mlp(), r=2, use_rslora=True), lambda m, tmp: load_adapter_of(m, tmp, L.add_lora(mlp(), r=2)),
        ValueError, "use_rslora"),
    "load_adapter: a layer the model does not adapt": (
        lambda: L.add_lora(mlp(), r=2, target_modules=["2.0", "3"]), lambda m, tmp: load_adapter_of(m, tmp, L.add_lora(mlp(), r=2)),
        ValueError, "'0': in the file, not a LoRA layer"),
    "load_adapter: a layer the file does not hold": (
        lambda: L.add_lora(mlp(), r=2),
        lambda m, tmp: load_adapter_of(m, tmp, L.add_lora(mlp(), r=2, target_modules=["2.0", "3"])),
        ValueError, "'0': a LoRA layer of the model, not in the file"),
    "load_adapter: a newer format version": (
        lambda: L.add_lora(mlp(), r=2), lambda m, tmp: load_adapter_of(m, tmp, L.add_lora(mlp(), r=2), version=2),
        ValueError, "format version 2; this file reads version 1"),
    "load_adapter: a plain state dict file": (
        lambda: L.add_lora(mlp(), r=2), load_plain_state_dict_file, ValueError, "not a lora_min adapter file"),
    # --- enable / disable, merge / unmerge of a model ---
    "set_lora_enabled(False) with a merged layer": (
        lambda: merged_first(), lambda m, tmp: L.set_lora_enabled(m, False), RuntimeError, "unmerge_lora"),
    "lora_disabled() with a merged layer": (merged_first, enter_lora_disabled, RuntimeError, "unmerge_lora"),
    "merge_lora: float16 overflow in the second layer": (
        lambda: overflowing(), lambda m, tmp: L.merge_lora(m), RuntimeError, "'1': W \\+ ΔW has inf"),
    "merge_lora: a disabled layer": (
        lambda: disabled_second(), lambda m, tmp: L.merge_lora(m), RuntimeError, r"disabled \(enable first\): \['1.out'\]"),
    "merge_lora: layers already merged": (merged_all, lambda m, tmp: L.merge_lora(m), RuntimeError, "already merged"),
    "unmerge_lora: a layer not merged": (
        lambda: merged_first(), lambda m, tmp: L.unmerge_lora(m), RuntimeError,
        r"unmerge_lora: layers not merged: \['0.out', '1.fc', '1.out'\]"),
    "unmerge_lora: no layer merged": (lora_two_blocks, lambda m, tmp: L.unmerge_lora(m), RuntimeError, "not merged"),
    "merge_lora: tied weights": (
        tied, lambda m, tmp: L.merge_lora(m), RuntimeError, r"shared with \['0.weight'\].*merge_and_unload"),
    "merge() on a layer whose weight is tied": (tied, lambda m, tmp: m[2].merge(), RuntimeError, "shared with"),
    "merge() on a layer built by hand that says what its weight is shared with": (
        lambda: lora_layer(shared_with=("embedding.weight",)), lambda m, tmp: m.merge(), RuntimeError, "embedding.weight"),
    # --- PEFT adapters ---
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


@pytest.mark.parametrize("parent", [ReadsWeight, ReadsWeightInAHelper])
def test_a_child_whose_parent_reads_its_weight_and_never_calls_it_is_refused_by_name(parent):
    model = nn.Sequential(parent())
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"proj'.*\({parent.__name__}\) reads its weight directly and never calls it"):
        L.add_lora(model, target_modules=["proj"])
    assert_unchanged(model, before)


def test_a_grandchild_called_by_its_own_parent_but_read_by_the_grandparent_is_checked_at_run_time():
    """block calls proj (so it is adapted), but the grandparent reads proj.weight instead of calling block."""
    model = nn.Sequential(ReadsAGrandchildsWeight())
    with pytest.warns(UserWarning, match=r"ReadsAGrandchildsWeight's forward reads the weight of \['block.proj'\]"):
        L.add_lora(model, target_modules=["proj"])
    with pytest.raises(RuntimeError, match=r"LoRA on \['block.proj'\] did not run"):
        model(torch.randn(2, 4))


@pytest.mark.parametrize("parent", [ReadsWeight, ReadsWeightInAHelper])
def test_by_default_such_a_child_is_skipped_with_a_warning(parent):
    model = nn.Sequential(parent(), nn.Linear(4, 4))
    with pytest.warns(UserWarning, match=rf"skipping '0.proj': its parent {parent.__name__} reads its weight directly"):
        L.add_lora(model)
    assert [n for n, _ in L.lora_layers(model)] == ["1"]


def test_by_default_a_multihead_attentions_out_proj_is_skipped_with_a_warning():
    model = nn.Sequential(nn.MultiheadAttention(8, 2), nn.Linear(8, 8))
    with pytest.warns(UserWarning, match="skipping '0.out_proj'"):
        L.add_lora(model)  # the default (every nn.Linear) skips the bypassed out_proj, and says so
    assert lora_names(model) == ["1"]


def test_the_skip_warning_points_at_the_callers_line():
    with pytest.warns(UserWarning, match="skipping '0.out_proj'") as warned:
        L.add_lora(nn.Sequential(nn.MultiheadAttention(8, 2), nn.Linear(8, 8)))
    assert warned[0].filename == __file__


class ReadsOnlyTheBias(ReadsOnlyTheDtype):
    """Reads the bias (as Mamba's dt_proj): LoRA leaves the bias alone, so nothing is bypassed."""

    def forward(self, x):
        return self.proj(x) - self.proj.bias


class ComparesWithTheWeight(ReadsOnlyTheDtype):
    """Compares inputs with the weight (a reverse lookup, as Gemma's): a comparison, not a product."""

    def forward(self, x):
        return self.proj(x) + (x == self.proj.weight[0]).float()


@pytest.mark.parametrize("parent", [ReadsOnlyTheDtype, ReadsOnlyTheBias, ComparesWithTheWeight])
def test_questions_about_a_weight_are_not_a_bypass(parent):
    model = nn.Sequential(parent())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        L.add_lora(model, target_modules=["proj"])
    assert isinstance(model[0].proj, L.LoRALinear)


class ReadsAnIndexedChild(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, 4)])

    def forward(self, x):
        return F.linear(x, self.layers[0].weight)


def test_a_weight_read_through_an_index_is_found():
    with pytest.raises(ValueError, match=r"'0.layers.0'.*ReadsAnIndexedChild\) reads its weight directly"):
        L.add_lora(nn.Sequential(ReadsAnIndexedChild()), target_modules=["layers.0"])


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


# --- 2. adapter files that are not adapters are refused, never unpickled ------------------------------


def write_pickled(path, tmp):
    torch.save({"format": "lora_min.adapter", "payload": Payload(str(tmp / "canary"))}, path)


def write_truncated(path, tmp):
    L.save_adapter(L.add_lora(mlp(), r=2), tmp / "good.pt")
    path.write_bytes((tmp / "good.pt").read_bytes()[:300])


NOT_ADAPTERS = {
    "pickled.pt": write_pickled,  # unpickling it would run code
    "text.pt": lambda path, tmp: path.write_text("root:x:0:0:root:/root:/bin/bash\n"),
    "truncated.pt": write_truncated,
    "pickle.pkl": lambda path, tmp: path.write_bytes(pickle.dumps({"format": "lora_min.adapter"})),
    "odd.pt": lambda path, tmp: torch.save({"format": "lora_min.adapter", "config": {},
                                            "state_dict": {"0.lora_A": "not a tensor"}}, path),
}


@pytest.mark.parametrize("name", sorted(NOT_ADAPTERS))
def test_load_adapter_refuses_a_file_that_is_not_an_adapter_naming_it(name, tmp_path):
    """A ValueError naming the file, in lora_min's words (not torch.load's weights_only advice); the model unchanged."""
    NOT_ADAPTERS[name](tmp_path / name, tmp_path)
    model = L.add_lora(mlp(), r=2)
    before = snapshot(model)
    with pytest.raises(ValueError, match=f"{name} is not a lora_min adapter file") as error:
        L.load_adapter(model, tmp_path / name)
    assert "weights_only" not in str(error.value)
    assert_unchanged(model, before)


def test_load_adapter_never_unpickles_a_file_and_says_so(tmp_path):
    write_pickled(tmp_path / "pickled.pt", tmp_path)
    with pytest.raises(ValueError, match="never unpickled"):
        L.load_adapter(L.add_lora(mlp(), r=2), tmp_path / "pickled.pt")
    assert not (tmp_path / "canary").exists()  # the pickled payload never ran


def test_load_adapter_of_a_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        L.load_adapter(L.add_lora(mlp(), r=2), tmp_path / "missing.pt")


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
    with pytest.raises(ValueError, match=rf"adapter_config.json: {field} = {re.escape(repr(value))}"):
        L.load_peft_adapter(model, tmp_path)
    assert_unchanged(model, before)


def test_a_peft_file_with_null_optional_fields_loads(tmp_path):
    write_peft(tmp_path, ["0.fc"], lora_dropout=None, rank_pattern=None, alpha_pattern=None, exclude_modules=None,
               use_rslora=None)
    model = L.load_peft_adapter(two_blocks(), tmp_path)
    assert [n for n, _ in L.lora_layers(model)] == ["0.fc"]


# --- 4. states: modes, and checkpoints saved merged or unmerged --------------------------------------


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


@pytest.mark.parametrize("saved_merged, strict, words", [
    (True, True, "saved merged.*call merge"),
    (True, False, "saved merged.*call merge"),
    (False, True, "saved unmerged.*call unmerge"),
], ids=["merged into unmerged", "merged into unmerged, strict=False", "unmerged into merged"])
def test_a_checkpoint_never_loads_into_a_model_in_the_other_merge_state(saved_merged, strict, words):
    """Else ΔW would count twice (or not at all); the error says which call fixes it."""
    model = randomize_B(L.add_lora(mlp(), r=2))
    if saved_merged:
        L.merge_lora(model)
    state = copy.deepcopy(model.state_dict())
    (L.unmerge_lora if saved_merged else L.merge_lora)(model)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match=words):
        model.load_state_dict(state, strict=strict)
    assert_unchanged(model, before)


def test_a_bare_layer_names_itself_in_the_merged_checkpoint_error():
    layer = L.LoRALinear(nn.Linear(4, 4), r=2)
    layer.merge()
    merged_state = layer.state_dict()
    layer.unmerge()
    with pytest.raises(RuntimeError, match="LoRALinear: the checkpoint was saved merged"):
        layer.load_state_dict(merged_state)


def test_the_merged_flag_survives_torch_save(tmp_path):
    model = randomize_B(L.add_lora(mlp(), r=2))
    L.merge_lora(model)
    torch.save(model.state_dict(), tmp_path / "full.pt")
    fresh = randomize_B(L.add_lora(mlp(), r=2))
    with pytest.raises(RuntimeError, match="saved merged"):
        fresh.load_state_dict(torch.load(tmp_path / "full.pt", weights_only=True))


def test_a_merged_layer_accepts_a_partial_checkpoint_of_a_parameter_outside_any_layer():
    """Only keys of the layer itself count: a root parameter's key ("scale") is none of them."""
    model = lora_two_blocks()
    model.scale = nn.Parameter(torch.ones(()))
    model[0].fc.merge()
    model.load_state_dict({"scale": torch.full((), 3.0)}, strict=False)
    assert model.scale.item() == 3.0


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
        except RuntimeError:  # mixed float64 and bfloat16: torch refuses, so must we
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


# --- found by an adversarial probe: each of these once failed silently or half-changed the model -----


def test_a_module_registered_twice_but_named_once_is_adapted_under_both_names():
    model = nn.Module()
    model.a = nn.Linear(4, 4)
    model.b = model.a  # one module, two names; only "a" is targeted
    L.add_lora(model, r=2, target_modules=["a"])
    assert model.a is model.b and isinstance(model.b, L.LoRALinear)


def test_weights_sharing_memory_are_tied_even_as_two_parameter_objects():
    model = nn.Module()
    model.enc, model.dec = nn.Linear(4, 4), nn.Linear(4, 4)
    model.dec.weight = nn.Parameter(model.enc.weight.data)  # the same memory, another Parameter
    L.add_lora(model, r=2, target_modules=["enc"])
    assert model.enc.shared_with == ("dec.weight",)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match=r"shared with \['dec.weight'\]"):
        L.merge_lora(model)
    assert_unchanged(model, before)


class StandardisedConv(nn.Conv2d):
    """Overrides _conv_forward, not forward (weight standardisation): LoRAConv would not compute it."""

    def _conv_forward(self, x, weight, bias):
        return super()._conv_forward(x, (weight - weight.mean()) / weight.std(), bias)


class CallsSuperForward(nn.MultiheadAttention):
    def forward(self, *args, **kwargs):
        return super().forward(*args, **kwargs)


class GateThroughAComparison(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(4, 4)

    def forward(self, x):
        return torch.where(F.linear(x, self.gate.weight) > 0, x, -x)


def quantized():
    linear = nn.Linear(4, 4)
    linear.weight = nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False)
    return linear


@pytest.mark.parametrize("make, targets, words", [
    (lambda: nn.Sequential(StandardisedConv(2, 2, 3)), ["0"], r"its own _conv_forward\(\)"),
    (lambda: nn.Sequential(CallsSuperForward(4, 2)), ["0.out_proj"], r"\(CallsSuperForward\) reads its weight directly"),
    (lambda: nn.Sequential(GateThroughAComparison()), ["gate"], r"\(GateThroughAComparison\) reads its weight directly"),
    (lambda: nn.Sequential(nn.Linear(4, 4), quantized()), ["0", "1"], "needs a float16 / bfloat16 / float32 / float64"),
])
def test_modules_no_lora_layer_computes_exactly_are_refused_and_nothing_changes(make, targets, words):
    model = make()
    before = snapshot(model)
    with pytest.raises(ValueError, match=words):
        L.add_lora(model, r=2, target_modules=targets)
    assert_unchanged(model, before)


def test_with_warnings_as_errors_add_lora_warns_before_it_changes_anything():
    model = nn.Sequential(nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True))
    before = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning):
            L.add_lora(model)
    assert_unchanged(model, before)


@pytest.mark.parametrize("value, words", [
    (torch.zeros(4, 2).to_sparse(), "sparse_coo tensor"),
    (torch.full((4, 2), float("nan")), "inf or NaN"),
    (torch.full((4, 2), 1e6), "inf or NaN values \\(in the model's torch.float16\\)"),
])
def test_adapter_values_that_are_not_dense_and_finite_in_the_models_dtype_are_refused(value, words):
    model = L.add_lora(two_blocks().half(), r=2)
    before = snapshot(model)
    with pytest.raises(ValueError, match=f"1.out.lora_B .*{words}" if "sparse" not in words else words):
        L.load_lora_state_dict(model, with_value(model, "1.out.lora_B", value))
    assert_unchanged(model, before)


def test_an_adapter_is_not_loaded_into_meta_parameters_where_it_would_vanish():
    with torch.device("meta"):
        model = L.add_lora(two_blocks(), r=2)
    state = {k: torch.zeros(v.shape) for k, v in L.lora_state_dict(model).items()}
    with pytest.raises(ValueError, match="meta device, with no memory to load into"):
        L.load_lora_state_dict(model, state)


def test_our_adapter_files_settings_are_checked(tmp_path):
    model = lora_two_blocks()
    L.save_adapter(model, tmp_path / "a.pt")
    saved = torch.load(tmp_path / "a.pt", weights_only=True)
    saved["config"]["0.fc"]["r"] = torch.tensor(2)
    torch.save(saved, tmp_path / "a.pt")
    with pytest.raises(ValueError, match=r"a.pt: the settings of layer '0.fc' are not"):
        L.load_adapter(model, tmp_path / "a.pt")


@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern"])
def test_a_pattern_key_that_peft_cannot_compile_is_named(tmp_path, field):
    write_peft(tmp_path, ["0.fc"], **{field: {"(?i)0": 2}})
    with pytest.raises(ValueError, match=f"{field} = "):
        L.load_peft_adapter(two_blocks(), tmp_path)


def test_save_peft_adapter_checks_before_it_writes(tmp_path):
    model = lora_two_blocks()
    L.save_peft_adapter(model, tmp_path)
    good = (tmp_path / "adapter_config.json").read_text()
    with pytest.raises(ValueError, match="base_model_name_or_path must be a str"):
        L.save_peft_adapter(model, tmp_path, base_model_name_or_path=tmp_path)
    assert (tmp_path / "adapter_config.json").read_text() == good


@pytest.mark.parametrize("conv", [dict(padding=1, padding_mode="circular"), dict(dilation=2)])
def test_save_peft_adapter_refuses_convs_peft_would_compute_differently(tmp_path, conv):
    model = L.add_lora(nn.Sequential(nn.Conv2d(2, 2, 3, **conv)), r=2, target_modules=["0"])
    with pytest.raises(ValueError, match="PEFT's conv LoRA ignores padding_mode and dilation"):
        L.save_peft_adapter(model, tmp_path)
    assert not list(tmp_path.iterdir())


def test_nested_tensor_inputs_compute_what_the_plain_math_computes():
    layer = L.LoRALinear(nn.Linear(4, 3), r=2)
    nn.init.normal_(layer.lora_B)
    parts = [torch.randn(2, 4), torch.randn(5, 4)]
    out = layer(torch.nested.nested_tensor(parts))
    for got, x in zip(out.unbind(), parts):
        torch.testing.assert_close(got, layer(x))


@pytest.mark.parametrize("make, x", [
    (lambda: nn.Linear(4, 3), torch.randn(2, 4)),
    (lambda: nn.Conv2d(2, 3, 3), torch.randn(1, 2, 6, 6)),
    (lambda: nn.Embedding(10, 3), torch.tensor([[1, 2, 3]])),
])
def test_a_float32_adapter_on_a_bfloat16_base_computes_in_float32_and_returns_the_bases_dtype(make, x):
    base = make().to(torch.bfloat16)
    layer = L.lora_class_for(base)(base, r=2)
    layer.lora_A.data, layer.lora_B.data = layer.lora_A.data.float(), torch.randn(layer.lora_B.shape)
    x = x if not x.is_floating_point() else x.to(torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    merged = L.merge_and_unload(nn.Sequential(layer))[0]
    torch.testing.assert_close(y, merged(x), rtol=2e-2, atol=2e-2)
