"""Misuse fails loudly, and a refusal changes nothing.

The specification of lora_min's promises to a user who gets something wrong: LoRA is never
silently bypassed, every refused call leaves the model exactly as it was (modules, parameters,
requires_grad, modes, hooks, enabled / merged states), and every bad field of a file is named.

Sections: every refusal, one table (REFUSALS: each case the rule it checks, read as the test's
id, and a pattern that only its own message matches) and one oracle (conftest.snapshot); LoRA
that the model never runs (a parent that reads a child's weight); files and tensors that are not
adapters; every field of a PEFT config is validated and named; checkpoints saved merged or
unmerged. How the layers behave (modes, devices, dtypes, autocast): test_layers.py; what PEFT's
files hold: test_peft.py.
"""

import copy
import pickle
import re
import warnings
from typing import Callable, NamedTuple

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lora_min as L
from conftest import (Attention, Payload, assert_unchanged, lora_names, lora_two_blocks, mlp, randomize_B,
                      snapshot, tied, two_blocks, write_peft, write_peft_config)

# --- models and files for the refusals ------------------------------------------------------------------


HOOKS = {  # the hook kinds a replaced module would lose (forward hooks move to its LoRA layer): how to
    # register one, and its name in the message
    "backward pre": (lambda m: m.register_full_backward_pre_hook(lambda m, g: None), "backward_pre"),
    "backward": (lambda m: m.register_full_backward_hook(lambda m, gi, go: None), "backward"),
    "state_dict pre": (lambda m: m.register_state_dict_pre_hook(lambda m, p, k: None), "state_dict_pre"),
    "load_state_dict post": (lambda m: m.register_load_state_dict_post_hook(lambda m, k: None), "load_state_dict_post"),
}


def hooked(kind):
    """two_blocks() whose first linear holds one hook of this kind."""
    model = two_blocks()
    HOOKS[kind][0](model[0].fc)
    return model


class ScaledLinear(nn.Linear):
    """An nn.Linear subclass that computes something else (as quantized linears do)."""

    def forward(self, x):
        return 2 * super().forward(x)


class DoubledConv(nn.Conv2d):
    """An nn.Conv2d subclass that computes something else."""

    def forward(self, x):
        return 2 * super().forward(x)


class StandardisedConv(nn.Conv2d):
    """Overrides _conv_forward, not forward (weight standardisation): LoRAConv would not compute it."""

    def _conv_forward(self, x, weight, bias):
        return super()._conv_forward(x, (weight - weight.mean()) / weight.std(), bias)


def quantized():
    linear = nn.Linear(4, 4)
    linear.weight = nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False)
    return linear


def with_value(model, key, value):
    state = {k: v.detach().clone() for k, v in L.lora_state_dict(model).items()}
    state[key] = value
    return state


def without_key(model, key):
    return {k: v for k, v in L.lora_state_dict(model).items() if k != key}


def change_saved_adapter(path, change):
    """Rewrite the file save_adapter wrote at path with change(its dict) applied."""
    saved = torch.load(path, weights_only=True)
    change(saved)
    torch.save(saved, path)


def load_changed_adapter(model, folder, change, source=None):
    """Save the adapter of `source` (the model itself by default), change(the saved dict), and load it into `model`."""
    L.save_adapter(source or model, folder / "adapter.pt")
    change_saved_adapter(folder / "adapter.pt", change)
    L.load_adapter(model, folder / "adapter.pt")


def load_adapter_file(model, folder, key, value):
    """The model's adapter with one tensor replaced, loaded back."""
    load_changed_adapter(model, folder, lambda saved: saved["state_dict"].update({key: value}))


def load_adapter_of(model, folder, source, **fields):
    """The adapter of another model (`source`), with these top-level fields changed, loaded into `model`."""
    load_changed_adapter(model, folder, lambda saved: saved.update(fields), source)


def load_adapter_with_settings(model, folder, name, **settings):
    """The model's adapter with layer `name`'s settings changed, loaded back."""
    load_changed_adapter(model, folder, lambda saved: saved["config"][name].update(settings))


def load_plain_state_dict_file(model, folder):
    """torch.save(lora_state_dict(model)): the tensors without save_adapter's format."""
    torch.save(L.lora_state_dict(model), folder / "plain.pt")
    L.load_adapter(model, folder / "plain.pt")


def load_peft(model, folder, names, **fields):
    write_peft(folder, names, **fields)
    L.load_peft_adapter(model, folder)


def load_peft_ranks_for_a_module_registered_twice(model, folder):
    """A PEFT adapter that asks for rank 2 under the name "0" and rank 3 under "2", one module."""
    write_peft_config(folder, target_modules=["0", "2"], rank_pattern={"2": 3})
    torch.save({f"base_model.model.{name}.lora_{AB}.weight": torch.zeros(shape) for name, r in (("0", 2), ("2", 3))
                for AB, shape in (("A", (r, 4)), ("B", (4, r)))}, folder / "adapter_model.bin")
    L.load_peft_adapter(model, folder)


def shared_twice_plain():
    shared = nn.Linear(4, 4)
    return nn.Sequential(shared, nn.Tanh(), shared)


PLAIN = {"linear": lambda: nn.Linear(4, 4), "embedding": lambda: nn.Embedding(6, 4), "conv": lambda: nn.Conv2d(2, 4, 3)}


def overflowing(kind):
    """A float16 LoRA layer of this kind whose W + ΔW overflows float16 (ΔW entries about 2 * 300 * 300)."""
    base = PLAIN[kind]().half()
    layer = L.lora_class_for(base)(base, r=2)
    with torch.no_grad():
        layer.lora_A.fill_(300.0)
        layer.lora_B.fill_(300.0)
    return layer


def overflowing_second():
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


def memory_tied():
    """enc and dec whose weights are two Parameter objects over the same memory, LoRA on enc."""
    model = nn.Module()
    model.enc, model.dec = nn.Linear(4, 4), nn.Linear(4, 4)
    model.dec.weight = nn.Parameter(model.enc.weight.data)
    return L.add_lora(model, r=2, target_modules=["enc"])


def hooked_lora():
    model = lora_two_blocks()
    model[1].out.register_full_backward_hook(lambda m, gi, go: None)
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


def lora_half_two_blocks():
    return L.add_lora(two_blocks().half(), r=2)


def one(module):
    """Sequential(module): the model a layer constructor is given the first module of."""
    return lambda: nn.Sequential(module())


# --- every refusal: the rule, the call, and a pattern only its own message matches ----------------------


class Refusal(NamedTuple):
    rule: str  # what is refused, as a sentence: the test's id
    make: Callable  # () -> the model (or layer) the refused call is given
    call: Callable  # (model, tmp_path) -> the refused call
    error: type
    match: str  # a regex (re.search) that this refusal's message matches, and no other refusal's


def new_layer(cls, **kwargs):
    return lambda m, tmp: cls(m[0], **kwargs)


REFUSALS = [
    # --- the settings of a new layer ---
    Refusal("a rank of zero is refused", one(lambda: nn.Linear(3, 3)), new_layer(L.LoRALinear, r=0), ValueError,
            r"^r \(the LoRA rank\) must be a positive int, got 0$"),
    Refusal("a negative rank is refused", one(lambda: nn.Linear(3, 3)), new_layer(L.LoRALinear, r=-2), ValueError,
            r"^r \(the LoRA rank\) must be a positive int, got -2$"),
    Refusal("a fractional rank is refused", one(lambda: nn.Linear(3, 3)), new_layer(L.LoRALinear, r=1.5), ValueError,
            r"^r \(the LoRA rank\) must be a positive int, got 1\.5$"),
    Refusal("a bool is no rank", one(lambda: nn.Linear(3, 3)), new_layer(L.LoRALinear, r=True), ValueError,
            r"^r \(the LoRA rank\) must be a positive int, got True$"),
    Refusal("an alpha of zero is refused", one(lambda: nn.Linear(3, 3)), new_layer(L.LoRALinear, alpha=0), ValueError,
            r"^alpha must be a positive number or None, got 0$"),
    Refusal("a negative alpha is refused", one(lambda: nn.Linear(3, 3)), new_layer(L.LoRALinear, alpha=-1.0), ValueError,
            r"^alpha must be a positive number or None, got -1\.0$"),
    Refusal("a dropout of 1 (all dropped) is refused", one(lambda: nn.Linear(3, 3)), new_layer(L.LoRALinear, dropout=1.0),
            ValueError, r"^dropout must be a number in \[0, 1\), got 1\.0$"),
    Refusal("a negative dropout is refused", one(lambda: nn.Linear(3, 3)), new_layer(L.LoRALinear, dropout=-0.1),
            ValueError, r"^dropout must be a number in \[0, 1\), got -0\.1$"),
    Refusal("an init_std of zero is refused", one(lambda: nn.Linear(3, 3)), new_layer(L.LoRALinear, init_std=0.0),
            ValueError, r"^init_std must be a positive number or None, got 0\.0$"),
    Refusal("LoRALinear adapts only linears", one(lambda: nn.Conv1d(3, 3, 1)), new_layer(L.LoRALinear), TypeError,
            r"^LoRALinear adapts nn\.Linear, got Conv1d$"),
    Refusal("LoRAConv adapts no transposed conv", one(lambda: nn.ConvTranspose2d(3, 4, 3)), new_layer(L.LoRAConv),
            TypeError, r"^LoRAConv adapts nn\.Conv1d / nn\.Conv2d / nn\.Conv3d, got ConvTranspose2d$"),
    Refusal("LoRAEmbedding takes no dropout", one(lambda: nn.Embedding(10, 4)), new_layer(L.LoRAEmbedding, dropout=0.1),
            ValueError, r"^LoRAEmbedding cannot adapt this Embedding: dropout does not apply to an embedding's indices"),
    Refusal("LoRAEmbedding refuses an embedding that renormalises its rows (max_norm)",
            one(lambda: nn.Embedding(10, 4, max_norm=1.0)), new_layer(L.LoRAEmbedding, r=2), ValueError,
            r"^LoRAEmbedding cannot adapt this Embedding: max_norm=1\.0 renormalises the stored table"),
    Refusal("LoRAEmbedding refuses scale_grad_by_freq", one(lambda: nn.Embedding(10, 4, scale_grad_by_freq=True)),
            new_layer(L.LoRAEmbedding, r=2), ValueError,
            r"^LoRAEmbedding cannot adapt this Embedding: scale_grad_by_freq=True has no exact factored form$"),
    Refusal("LoRAConv refuses a grouped conv whose rank is no multiple of its groups",
            one(lambda: nn.Conv2d(4, 4, 3, groups=4)), new_layer(L.LoRAConv, r=2), ValueError,
            r"^LoRAConv cannot adapt this Conv2d: groups=4: a grouped convolution's r must be a multiple of groups "
            r"\(PEFT's rule\), r=2$"),
    Refusal("LoRAConv refuses a grouped conv with dilation (its dense A, PEFT's, runs with stride and padding only)",
            one(lambda: nn.Conv2d(4, 4, 3, groups=2, dilation=2)), new_layer(L.LoRAConv, r=2), ValueError,
            r"^LoRAConv cannot adapt this Conv2d: groups=2 with padding_mode='zeros', dilation=\(2, 2\)$"),
    # --- a layer's states ---
    Refusal("unmerge() needs a merged layer", lora_layer, lambda m, tmp: m.unmerge(), RuntimeError,
            r"^unmerge\(\) on a LoRA layer that is not merged$"),
    Refusal("a layer merges once", lambda: lora_layer(merged=True), lambda m, tmp: m.merge(), RuntimeError,
            r"^merge\(\) on a LoRA layer that is already merged$"),
    Refusal("a disabled layer does not merge", lambda: lora_layer(enabled=False), lambda m, tmp: m.merge(), RuntimeError,
            r"^merge\(\) on a LoRA layer that is disabled$"),
    Refusal("a merged layer cannot be disabled", lambda: lora_layer(merged=True),
            lambda m, tmp: setattr(m, "enabled", False), RuntimeError,
            r"^cannot disable a merged LoRA layer: its weight holds W \+ ΔW; call unmerge\(\) first$"),
    Refusal("a merged layer refuses a training forward (its adapter would get no gradient)",
            lambda: lora_layer(merged=True), lambda m, tmp: m(torch.randn(2, 3)), RuntimeError,
            r"^forward in training mode on a merged LoRA layer: lora_A and lora_B would get no gradient"),
    Refusal("a merged layer refuses a training forward also when only B trains (LoRA-FA)",
            lambda: lora_layer(merged=True, train_A=False), lambda m, tmp: m(torch.randn(2, 3)), RuntimeError,
            r"^forward in training mode on a merged LoRA layer: lora_A and lora_B would get no gradient"),
    Refusal("a merged layer does not reset its adapter (W would keep the old dW)",
            lambda: lora_layer(merged=True), lambda m, tmp: m.reset_lora_parameters(), RuntimeError,
            r"^reset_lora_parameters\(\) on a merged layer; call unmerge\(\) first$"),
    *[Refusal(f"merge() of a float16 {kind} layer whose W + dW overflows is refused, the weight unchanged",
              lambda kind=kind: overflowing(kind), lambda m, tmp: m.merge(), RuntimeError,
              r"^W \+ ΔW has inf or NaN entries in torch\.float16 \(overflow\?\); the weight was left unchanged$")
      for kind in PLAIN],
    # --- add_lora: its settings and targets ---
    Refusal("add_lora refuses a rank of zero, naming the first target", two_blocks, lambda m, tmp: L.add_lora(m, r=0),
            ValueError, r"^cannot add LoRA to '0\.fc': r \(the LoRA rank\) must be a positive int, got 0$"),
    Refusal("add_lora refuses an alpha that is a str", two_blocks, lambda m, tmp: L.add_lora(m, alpha="8"), ValueError,
            r"^cannot add LoRA to '0\.fc': alpha must be a positive number or None, got '8'$"),
    Refusal("a target that names no module is refused, naming it", two_blocks,
            lambda m, tmp: L.add_lora(m, target_modules=["fc", "nope"]), ValueError,
            r"^target_modules \['nope'\] match no module in the model"),
    Refusal("a target that names no module is refused, naming the modules LoRA can adapt", mlp,
            lambda m, tmp: L.add_lora(m, target_modules=["0", "fc9"]), ValueError,
            r"\['fc9'\] match no module in the model; the modules LoRA can adapt are named \(at their end\): \['0', '3'\]$"),
    *[Refusal(f"a target {t!r} that is a substring but no dotted end of a name matches nothing",
              lambda: nn.Sequential(Attention()), lambda m, tmp, t=t: L.add_lora(m, target_modules=[t]), ValueError,
              rf"^target_modules \['{t}'\] match no module") for t in ("proj", "_proj")],
    Refusal("target_modules must be names", two_blocks, lambda m, tmp: L.add_lora(m, target_modules=[5]), ValueError,
            r"^target_modules must be None, a module name or a list of names, got \[5\]$"),
    Refusal("a target that is no linear, embedding or conv is refused", lambda: nn.Sequential(Attention()),
            lambda m, tmp: L.add_lora(m, target_modules=["q_proj", "act"]), ValueError,
            r"^cannot add LoRA to '0\.act': it is a ReLU, not an nn\.Linear, nn\.Embedding, nn\.Conv1d/2d/3d or transformers' Conv1D$"),
    Refusal("every target is checked before any is changed: a grouped conv second is refused",
            lambda: nn.Sequential(nn.Linear(4, 4), nn.Conv2d(4, 4, 3, groups=2)),
            lambda m, tmp: L.add_lora(m, r=3, target_modules=["0", "1"]), ValueError,
            r"^cannot add LoRA to '1': LoRAConv cannot adapt this Conv2d: groups=2: .*, r=3$"),
    Refusal("add_lora refuses a depthwise conv whose rank is no multiple of its groups",
            one(lambda: nn.Conv2d(4, 4, 3, groups=4)), lambda m, tmp: L.add_lora(m, r=2, target_modules=["0"]), ValueError,
            r"^cannot add LoRA to '0': LoRAConv cannot adapt this Conv2d: groups=4: .*, r=2$"),
    Refusal("add_lora refuses a grouped Conv1d whose rank is no multiple of its groups",
            one(lambda: nn.Conv1d(4, 6, 3, groups=2)), lambda m, tmp: L.add_lora(m, r=3, target_modules=["0"]), ValueError,
            r"^cannot add LoRA to '0': LoRAConv cannot adapt this Conv1d: groups=2: .*, r=3$"),
    Refusal("add_lora refuses a grouped conv whose padding_mode is not zeros (its dense A would pad with zeros)",
            one(lambda: nn.Conv1d(4, 4, 3, padding=1, groups=2, padding_mode="reflect")),
            lambda m, tmp: L.add_lora(m, r=2, target_modules=["0"]), ValueError,
            r"^cannot add LoRA to '0': LoRAConv cannot adapt this Conv1d: groups=2 with padding_mode='reflect', "
            r"dilation=\(1,\)$"),
    Refusal("add_lora refuses an embedding with max_norm", one(lambda: nn.Embedding(10, 4, max_norm=1.0)),
            lambda m, tmp: L.add_lora(m, r=2, target_modules=["0"]), ValueError,
            r"^cannot add LoRA to '0': LoRAEmbedding cannot adapt this Embedding: max_norm=1\.0"),
    Refusal("add_lora refuses an embedding with scale_grad_by_freq", one(lambda: nn.Embedding(10, 4, scale_grad_by_freq=True)),
            lambda m, tmp: L.add_lora(m, r=2, target_modules=["0"]), ValueError,
            r"^cannot add LoRA to '0': LoRAEmbedding cannot adapt this Embedding: scale_grad_by_freq=True"),
    Refusal("add_lora refuses a transposed conv", one(lambda: nn.ConvTranspose2d(3, 4, 3)),
            lambda m, tmp: L.add_lora(m, r=2, target_modules=["0"]), ValueError,
            r"^cannot add LoRA to '0': it is a ConvTranspose2d, not an nn\.Linear, nn\.Embedding, nn\.Conv1d/2d/3d"),
    Refusal("a Linear subclass with its own forward is refused", lambda: nn.Sequential(Attention(out_cls=ScaledLinear)),
            lambda m, tmp: L.add_lora(m, r=2), ValueError,
            r"^cannot add LoRA to '0\.out_proj': it is a ScaledLinear, a subclass with its own forward\(\)"),
    Refusal("a Conv2d subclass with its own forward is refused", one(lambda: DoubledConv(3, 4, 3)),
            lambda m, tmp: L.add_lora(m, r=2, target_modules=["0"]), ValueError,
            r"^cannot add LoRA to '0': it is a DoubledConv, a subclass with its own forward\(\)"),
    Refusal("a conv subclass with its own _conv_forward is refused", one(lambda: StandardisedConv(2, 2, 3)),
            lambda m, tmp: L.add_lora(m, r=2, target_modules=["0"]), ValueError,
            r"^cannot add LoRA to '0': it is a StandardisedConv, a subclass with its own _conv_forward\(\)"),
    Refusal("a quantized (int8) weight is refused", lambda: nn.Sequential(nn.Linear(4, 4), quantized()),
            lambda m, tmp: L.add_lora(m, r=2, target_modules=["0", "1"]), ValueError,
            r"^cannot add LoRA to '1': LoRALinear needs a float16 / bfloat16 / float32 / float64 weight, got torch\.int8"),
    Refusal("a parametrized linear is refused", lambda: nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(4, 4))),
            lambda m, tmp: L.add_lora(m, r=2), ValueError, r"^cannot add LoRA to '0': it is parametrized"),
    Refusal("an old-style weight_norm linear is refused", lambda: nn.Sequential(nn.utils.weight_norm(nn.Linear(4, 4))),
            lambda m, tmp: L.add_lora(m, r=2), ValueError,
            r"^cannot add LoRA to '0': it has a weight that is not an nn\.Parameter"),
    *[Refusal(f"a module with a {kind} hook is refused (replacing it would drop the hook)", lambda kind=kind: hooked(kind),
              lambda m, tmp: L.add_lora(m), ValueError,
              rf"^cannot add LoRA to '0\.fc': it has hooks that replacing the module would drop: {name} hook ")
      for kind, (_, name) in HOOKS.items()],
    Refusal("a target whose parent reads its weight and never calls it is refused",
            lambda: nn.Sequential(nn.MultiheadAttention(4, 2), nn.Linear(4, 4)),
            lambda m, tmp: L.add_lora(m, target_modules=["1", "0.out_proj"]), ValueError,
            r"^cannot add LoRA to '0\.out_proj': its parent '0' \(MultiheadAttention\) reads its weight directly"),
    Refusal("MultiheadAttention's own out_proj is refused", lambda: nn.MultiheadAttention(8, 2),
            lambda m, tmp: L.add_lora(m, target_modules=["out_proj"]), ValueError,
            r"^cannot add LoRA to 'out_proj': its parent '' \(MultiheadAttention\) reads its weight directly"),
    Refusal("add_lora adapts layers inside a model, not a lone layer", lambda: nn.Linear(3, 3),
            lambda m, tmp: L.add_lora(m), TypeError, r"^add_lora adapts the layers inside a model; wrap a lone layer"),
    Refusal("a model without a linear to adapt is refused", lambda: nn.Sequential(nn.ReLU()),
            lambda m, tmp: L.add_lora(m), ValueError, r"^the model has no nn\.Linear that LoRA can adapt$"),
    Refusal("adapters do not stack", lora_two_blocks, lambda m, tmp: L.add_lora(m), ValueError,
            r"^model already has LoRA layers; lora_min does not stack adapters"),
    # --- adapter tensors (load_lora_state_dict) ---
    Refusal("an adapter holds torch tensors, not NumPy arrays", lora_two_blocks,
            lambda m, tmp: L.load_lora_state_dict(m, with_value(m, "1.out.lora_B", np.zeros((4, 2)))), ValueError,
            r"^the adapter: 1\.out\.lora_B is a ndarray, not a torch\.Tensor$"),
    Refusal("an adapter tensor on the meta device holds no values", lora_two_blocks,
            lambda m, tmp: L.load_lora_state_dict(m, with_value(m, "1.out.lora_B", torch.empty(4, 2, device="meta"))),
            ValueError, r"^the adapter: 1\.out\.lora_B is a meta tensor: it holds no values$"),
    Refusal("an adapter tensor of integers is refused", lora_two_blocks,
            lambda m, tmp: L.load_lora_state_dict(m, with_value(m, "1.out.lora_B", torch.zeros(4, 2, dtype=torch.long))),
            ValueError, r"^the adapter: 1\.out\.lora_B has dtype torch\.int64, not a floating-point dtype$"),
    Refusal("a sparse adapter tensor is refused", lora_half_two_blocks,
            lambda m, tmp: L.load_lora_state_dict(m, with_value(m, "1.out.lora_B", torch.zeros(4, 2).to_sparse())),
            ValueError, r"^the adapter: 1\.out\.lora_B is a torch\.sparse_coo tensor; adapters hold dense tensors$"),
    # (the adapter of a float16 model is float32: the dtype its values must be finite in)
    Refusal("an adapter tensor holding NaN is refused", lora_half_two_blocks,
            lambda m, tmp: L.load_lora_state_dict(m, with_value(m, "1.out.lora_B", torch.full((4, 2), float("nan")))),
            ValueError, r"^the adapter: 1\.out\.lora_B has inf or NaN values \(in the model's torch\.float32\)$"),
    Refusal("an adapter tensor that overflows the adapter's float32 is refused", lora_half_two_blocks,
            lambda m, tmp: L.load_lora_state_dict(m, with_value(m, "1.out.lora_B",
                                                                torch.full((4, 2), 1e39, dtype=torch.float64))),
            ValueError, r"^the adapter: 1\.out\.lora_B has inf or NaN values \(in the model's torch\.float32\)$"),
    Refusal("an adapter tensor of the wrong shape is refused", lora_two_blocks,
            lambda m, tmp: L.load_lora_state_dict(m, with_value(m, "1.out.lora_B", torch.zeros(4, 3))), ValueError,
            r"^the adapter: 1\.out\.lora_B has shape \(4, 3\), the model's is \(4, 2\)"),
    Refusal("an adapter missing tensors is refused, naming them", lora_two_blocks,
            lambda m, tmp: L.load_lora_state_dict(m, {"0.fc.lora_A": torch.zeros(2, 4)}), ValueError,
            r"^the adapter: keys do not match the model: missing \['0\.fc\.lora_B', '0\.out\.lora_A', .*'1\.out\.lora_B'\], "
            r"unexpected \[\]$"),
    Refusal("an adapter missing one tensor is refused, naming it", lambda: randomize_B(L.add_lora(mlp(), r=2)),
            lambda m, tmp: L.load_lora_state_dict(m, without_key(m, "0.lora_A")), ValueError,
            r"^the adapter: keys do not match the model: missing \['0\.lora_A'\], unexpected \[\]$"),
    Refusal("an adapter with a tensor the model lacks is refused, naming it", lambda: randomize_B(L.add_lora(mlp(), r=2)),
            lambda m, tmp: L.load_lora_state_dict(m, with_value(m, "9.lora_A", torch.zeros(2, 6))), ValueError,
            r"^the adapter: keys do not match the model: missing \[\], unexpected \['9\.lora_A'\]$"),
    Refusal("an adapter key that is not a str is refused, naming it", lora_two_blocks,
            lambda m, tmp: L.load_lora_state_dict(m, {0: torch.zeros(2, 4), "0.fc.lora_A": torch.zeros(2, 4)}),
            ValueError, r"missing \['0\.fc\.lora_B', .*\], unexpected \[0\]$"),
    Refusal("an adapter is a dict of tensors, not a list", lora_two_blocks,
            lambda m, tmp: L.load_lora_state_dict(m, [torch.zeros(2, 4)]), ValueError,
            r"^the adapter: expected a dict of tensors keyed by name, got a list$"),
    Refusal("an adapter of another rank is refused", lambda: L.add_lora(mlp(), r=4),
            lambda m, tmp: L.load_lora_state_dict(m, L.lora_state_dict(L.add_lora(mlp(), r=2))), ValueError,
            r"^the adapter: 0\.lora_A has shape \(2, 6\), the model's is \(4, 6\) \(a different r or layer size\?\)$"),
    Refusal("an adapter needs a model with LoRA layers", mlp,
            lambda m, tmp: L.load_lora_state_dict(m, L.lora_state_dict(L.add_lora(mlp(), r=2))), ValueError,
            r"^the model has no LoRA layers; call add_lora\(model, \.\.\.\) first$"),
    Refusal("an adapter does not load into merged layers", merged_first,
            lambda m, tmp: L.load_lora_state_dict(m, L.lora_state_dict(m)), RuntimeError,
            r"^cannot load an adapter into merged layers \['0\.fc'\]; call unmerge_lora\(model\) first$"),
    # --- adapter files (load_adapter) ---
    Refusal("an adapter file's tensor of the wrong dtype is refused", lora_two_blocks,
            lambda m, tmp: load_adapter_file(m, tmp, "1.out.lora_B", torch.zeros(4, 2, dtype=torch.bool)), ValueError,
            r"adapter\.pt: 1\.out\.lora_B has dtype torch\.bool, not a floating-point dtype$"),
    Refusal("an adapter file's tensor of the wrong shape is refused", lora_two_blocks,
            lambda m, tmp: load_adapter_file(m, tmp, "1.out.lora_B", torch.zeros(2, 4)), ValueError,
            r"adapter\.pt: 1\.out\.lora_B has shape \(2, 4\), the model's is \(4, 2\)"),
    Refusal("an adapter file of another alpha is refused", lambda: L.add_lora(mlp(), r=2, alpha=8),
            lambda m, tmp: load_adapter_of(m, tmp, L.add_lora(mlp(), r=2)), ValueError,
            r"do not match the model's LoRA layers: '0': file \{'r': 2, 'alpha': 2\.0, 'use_rslora': False\} "
            r"vs model \{'r': 2, 'alpha': 8\.0, 'use_rslora': False\}"),
    Refusal("an adapter file of another scaling rule (use_rslora) is refused", lambda: L.add_lora(mlp(), r=2, use_rslora=True),
            lambda m, tmp: load_adapter_of(m, tmp, L.add_lora(mlp(), r=2)), ValueError,
            r"do not match the model's LoRA layers: '0': file \{'r': 2, 'alpha': 2\.0, 'use_rslora': False\} "
            r"vs model \{'r': 2, 'alpha': 2\.0, 'use_rslora': True\}"),
    Refusal("an adapter file for a layer the model does not adapt is refused",
            lambda: L.add_lora(mlp(), r=2, target_modules=["2.0", "3"]),
            lambda m, tmp: load_adapter_of(m, tmp, L.add_lora(mlp(), r=2)), ValueError,
            r"do not match the model's LoRA layers: '0': in the file, not a LoRA layer of the model$"),
    Refusal("an adapter file that lacks a layer of the model is refused", lambda: L.add_lora(mlp(), r=2),
            lambda m, tmp: load_adapter_of(m, tmp, L.add_lora(mlp(), r=2, target_modules=["2.0", "3"])), ValueError,
            r"do not match the model's LoRA layers: '0': a LoRA layer of the model, not in the file$"),
    Refusal("an adapter file of a newer format version is refused", lambda: L.add_lora(mlp(), r=2),
            lambda m, tmp: load_adapter_of(m, tmp, L.add_lora(mlp(), r=2), version=2), ValueError,
            r"adapter\.pt is a lora_min adapter of format version 2; this file reads version 1$"),
    Refusal("an adapter file's settings must be plain values", lora_two_blocks,
            lambda m, tmp: load_adapter_with_settings(m, tmp, "0.fc", r=torch.tensor(2)), ValueError,
            r"adapter\.pt: the settings of layer '0\.fc' are not \{'r': int, 'alpha': number, 'use_rslora': bool\}"),
    Refusal("a plain state dict file is not an adapter file", lambda: L.add_lora(mlp(), r=2), load_plain_state_dict_file,
            ValueError, r"plain\.pt is not a lora_min adapter file \(written by save_adapter\)$"),
    # --- enable / disable, merge / unmerge of a model ---
    Refusal("set_lora_enabled(False) refuses while a layer is merged", merged_first,
            lambda m, tmp: L.set_lora_enabled(m, False), RuntimeError,
            r"^cannot disable LoRA while layers are merged; call unmerge_lora\(model\) first$"),
    Refusal("lora_disabled() refuses while a layer is merged", merged_first, enter_lora_disabled, RuntimeError,
            r"^cannot disable LoRA while layers are merged; call unmerge_lora\(model\) first$"),
    Refusal("merge_lora checks every layer for overflow before it merges any", overflowing_second,
            lambda m, tmp: L.merge_lora(m), RuntimeError,
            r"^'1': W \+ ΔW has inf or NaN entries in torch\.float16 \(overflow\?\)"),
    Refusal("merge_lora refuses a disabled layer, naming it", disabled_second, lambda m, tmp: L.merge_lora(m),
            RuntimeError, r"^merge_lora: layers already merged: \[\]; disabled \(enable first\): \['1\.out'\]$"),
    Refusal("merge_lora refuses layers already merged, naming them", merged_all, lambda m, tmp: L.merge_lora(m),
            RuntimeError, r"^merge_lora: layers already merged: \['0\.fc', '0\.out', '1\.fc', '1\.out'\]; disabled"),
    Refusal("unmerge_lora refuses layers not merged, naming them", merged_first, lambda m, tmp: L.unmerge_lora(m),
            RuntimeError, r"^unmerge_lora: layers not merged: \['0\.out', '1\.fc', '1\.out'\]$"),
    Refusal("unmerge_lora refuses a model with no layer merged", lora_two_blocks, lambda m, tmp: L.unmerge_lora(m),
            RuntimeError, r"^unmerge_lora: layers not merged: \['0\.fc', '0\.out', '1\.fc', '1\.out'\]$"),
    Refusal("merge_lora refuses to write into a tied weight", tied, lambda m, tmp: L.merge_lora(m), RuntimeError,
            r"^merge_lora\(\) would write W \+ ΔW into a weight that is shared with \['0\.weight'\].*merge_and_unload"),
    Refusal("merge_lora refuses a weight that shares memory with another Parameter", memory_tied,
            lambda m, tmp: L.merge_lora(m), RuntimeError,
            r"^merge_lora\(\) would write W \+ ΔW into a weight that is shared with \['dec\.weight'\]"),
    Refusal("merge() refuses to write into a tied weight", tied, lambda m, tmp: m[2].merge(), RuntimeError,
            r"^merge\(\) would write W \+ ΔW into a weight that is shared with \['0\.weight'\]"),
    Refusal("merge() refuses a weight its layer says is shared", lambda: lora_layer(shared_with=("embedding.weight",)),
            lambda m, tmp: m.merge(), RuntimeError,
            r"^merge\(\) would write W \+ ΔW into a weight that is shared with \['embedding\.weight'\]"),
    Refusal("merge_and_unload refuses LoRA layers whose hooks it would drop", hooked_lora,
            lambda m, tmp: L.merge_and_unload(m, inplace=True), ValueError,
            r"^merge_and_unload: '1\.out' has hooks that replacing it with a plain layer would drop: backward hook"),
    # --- PEFT adapters (load_peft_adapter) ---
    Refusal("a PEFT alpha_pattern of zero is refused", two_blocks,
            lambda m, tmp: load_peft(m, tmp, ["0.fc", "1.fc"], alpha_pattern={"1.fc": 0}), ValueError,
            r"adapter_config\.json: alpha_pattern = \{'1\.fc': 0\}: lora_min reads"),
    Refusal("a PEFT adapter asking two ranks of one module registered twice is refused", shared_twice_plain,
            load_peft_ranks_for_a_module_registered_twice, ValueError,
            r"^'2' and '0' are the same module but are asked for different LoRA settings"),
    Refusal("a PEFT adapter's tensor of the wrong shape is refused", two_blocks,
            lambda m, tmp: load_peft(m, tmp, ["0.fc", "1.fc"],
                                     shapes={"base_model.model.1.fc.lora_B.weight": torch.zeros(4, 3)}), ValueError,
            r"adapter_model\.bin: base_model\.model\.1\.fc\.lora_B\.weight has shape \(4, 3\), the model's is \(4, 2\)"),
    Refusal("a PEFT target whose parent never calls it is refused",
            lambda: nn.Sequential(nn.Linear(4, 4), nn.MultiheadAttention(4, 2)),
            lambda m, tmp: load_peft(m, tmp, ["1.out_proj"]), ValueError,
            r"^cannot add LoRA to '1\.out_proj': its parent '1' \(MultiheadAttention\) reads its weight directly"),
]


@pytest.mark.parametrize("refusal", REFUSALS, ids=[refusal.rule for refusal in REFUSALS])
def test_a_refused_call_raises_naming_the_problem_and_changes_nothing(refusal, tmp_path):
    model = refusal.make()
    before = snapshot(model)
    with pytest.raises(refusal.error, match=refusal.match):
        refusal.call(model, tmp_path)
    assert_unchanged(model, before)


def test_each_refusal_pattern_matches_only_its_own_message(tmp_path):
    """A pattern as loose as "r" would accept almost any message: each pattern must match its own
    message and no other refusal's (cases of one rule may share a message)."""
    messages = []
    for i, refusal in enumerate(REFUSALS):
        folder = tmp_path / str(i)
        folder.mkdir()
        with pytest.raises(refusal.error) as raised:
            refusal.call(refusal.make(), folder)
        messages.append(str(raised.value))
    assert len({refusal.rule for refusal in REFUSALS}) == len(REFUSALS)  # one rule, one id
    for refusal, own in zip(REFUSALS, messages):
        others = [m for m in messages if m != own and re.search(refusal.match, m)]
        assert not others, (refusal.rule, others)


# --- LoRA that the model never runs: a parent that reads a child's weight instead of calling it ---------


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


class CallsSuperForward(nn.MultiheadAttention):
    """Its forward is MultiheadAttention's, reached through super(): out_proj's weight is read there."""

    def forward(self, *args, **kwargs):
        return super().forward(*args, **kwargs)


class GateThroughAComparison(nn.Module):
    """Reads the child's weight inside a comparison: still a product with x, so a bypass."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(4, 4)

    def forward(self, x):
        return torch.where(F.linear(x, self.gate.weight) > 0, x, -x)


@pytest.mark.parametrize("parent, target", [
    (ReadsWeight, "proj"), (ReadsWeightInAHelper, "proj"), (lambda: CallsSuperForward(4, 2), "0.out_proj"),
    (GateThroughAComparison, "gate"),
], ids=["F.linear in forward", "a read in a helper method", "a read in the forward reached by super()",
        "a read inside a comparison"])
def test_a_child_whose_parent_reads_its_weight_and_never_calls_it_is_refused_by_name(parent, target):
    model = nn.Sequential(parent())
    before = snapshot(model)
    name = type(model[0]).__name__
    with pytest.raises(ValueError, match=rf"{target}': its parent '0' \({name}\) reads its weight directly and never calls it"):
        L.add_lora(model, target_modules=[target])
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


def test_with_warnings_as_errors_add_lora_warns_before_it_changes_anything():
    model = nn.Sequential(nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True))
    before = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match="^add_lora: skipping '0.self_attn.out_proj'"):
            L.add_lora(model)
    assert_unchanged(model, before)


def test_the_run_time_check_is_gone_from_the_merged_export():
    model = nn.Sequential(SometimesReads())
    with pytest.warns(UserWarning):
        L.add_lora(model)
    plain = L.merge_and_unload(model)
    assert not plain[0]._forward_hooks and not plain[0]._forward_pre_hooks
    assert model[0]._forward_hooks  # the input model keeps its check


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


# --- files and tensors that are not adapters: refused, naming the file, never unpickled ---------------------


def write_pickled(path, tmp):
    torch.save({"format": "lora_min.adapter", "payload": Payload(str(tmp / "canary"))}, path)


def write_truncated(path, tmp):
    L.save_adapter(L.add_lora(mlp(), r=2), tmp / "good.pt")
    path.write_bytes((tmp / "good.pt").read_bytes()[:300])


def write_with_format_marker(marker):
    """An adapter save_adapter wrote for the model, with its "format" marker deleted (None) or replaced."""
    def write(path, tmp):
        L.save_adapter(L.add_lora(mlp(), r=2), path)
        change_saved_adapter(path, lambda saved: saved.pop("format") if marker is None else saved.update(format=marker))
    return write


NOT_ADAPTERS = {
    "pickled.pt": write_pickled,  # unpickling it would run code
    "text.pt": lambda path, tmp: path.write_text("root:x:0:0:root:/root:/bin/bash\n"),
    "truncated.pt": write_truncated,
    "pickle.pkl": lambda path, tmp: path.write_bytes(pickle.dumps({"format": "lora_min.adapter"})),
    "odd.pt": lambda path, tmp: torch.save({"format": "lora_min.adapter", "config": {},
                                            "state_dict": {"0.lora_A": "not a tensor"}}, path),
    # everything an adapter file holds, but not its format marker: it may be some other program's file
    "no-format-marker.pt": write_with_format_marker(None),
    "another-format-marker.pt": write_with_format_marker("peft.adapter"),
}


@pytest.mark.parametrize("name", sorted(NOT_ADAPTERS))
def test_load_adapter_refuses_a_file_that_is_not_an_adapter_naming_it(name, tmp_path):
    """A ValueError naming the file, in lora_min's words (not torch.load's weights_only advice); the model unchanged."""
    NOT_ADAPTERS[name](tmp_path / name, tmp_path)
    model = L.add_lora(mlp(), r=2)
    before = snapshot(model)
    with pytest.raises(ValueError, match=f"{re.escape(str(tmp_path / name))} is not a lora_min adapter file") as error:
        L.load_adapter(model, tmp_path / name)
    assert "weights_only" not in str(error.value)
    assert_unchanged(model, before)


def test_load_adapter_never_unpickles_a_file_and_says_so(tmp_path):
    write_pickled(tmp_path / "pickled.pt", tmp_path)
    with pytest.raises(ValueError, match="files that hold other Python objects are refused, never unpickled"):
        L.load_adapter(L.add_lora(mlp(), r=2), tmp_path / "pickled.pt")
    assert not (tmp_path / "canary").exists()  # the pickled payload never ran


def test_load_adapter_of_a_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        L.load_adapter(L.add_lora(mlp(), r=2), tmp_path / "missing.pt")


def test_an_adapter_is_not_loaded_into_meta_parameters_where_it_would_vanish():
    """(Outside the table: meta tensors cannot be compared, so the snapshot oracle cannot run.)"""
    with torch.device("meta"):
        model = L.add_lora(two_blocks(), r=2)
    state = {k: torch.zeros(v.shape) for k, v in L.lora_state_dict(model).items()}
    with pytest.raises(ValueError, match="^the model's LoRA parameters are on the meta device, with no memory to load into"):
        L.load_lora_state_dict(model, state)
    assert all(p.is_meta for p in model.parameters())


# --- every field of a PEFT config is validated and named ------------------------------------------------


@pytest.mark.parametrize("field, value", [
    ("lora_alpha", "8"), ("lora_alpha", 0), ("lora_alpha", True), ("target_modules", 5), ("target_modules", [1]),
    ("target_modules", "fc["), ("lora_dropout", "0.1"), ("lora_dropout", 1.5), ("rank_pattern", [1]),
    ("rank_pattern", {"fc": 0}), ("rank_pattern", {"fc": 2.5}), ("alpha_pattern", {"fc": "2"}), ("exclude_modules", 3),
    ("r", -4), ("r", 2.0), ("r", True), ("use_rslora", "yes"), ("init_lora_weights", 1),
    ("layers_to_transform", 0), ("layers_to_transform", [0]),
    # keys PEFT cannot compile inside its rule re.match(rf"(.*\.)?({key})$", name): a global flag mid-pattern
    ("rank_pattern", {"(?i)0": 2}), ("alpha_pattern", {"(?i)0": 2}),
])
def test_a_bad_peft_field_is_a_value_error_naming_file_field_and_value(tmp_path, field, value):
    write_peft(tmp_path, ["0.fc"], **{field: value})
    model = two_blocks()
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"adapter_config.json: {field} = {re.escape(repr(value))}"):
        L.load_peft_adapter(model, tmp_path)
    assert_unchanged(model, before)


# --- checkpoints saved merged never load as unmerged, nor the other way ------------------------------------


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


# --- reads the scan follows: negative indices, dict keys, callbacks -------------------------------------


class ReadsTheLastLayer(nn.Module):
    """Three layers, so self.layers[-1] ("layers.2") and self.layers[1] (called) are different ones."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)])

    def forward(self, x):
        return F.linear(self.layers[1](self.layers[0](x)), self.layers[-1].weight)


class ReadsADictEntry(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.heads = nn.Linear(4, 4), nn.ModuleDict({"q": nn.Linear(4, 4)})

    def forward(self, x):
        return F.linear(self.fc(x), self.heads["q"].weight)


class ReadsANumberedDictEntry(ReadsADictEntry):
    """A ModuleDict whose key is a number: self.heads["0"] is an entry by name, not a list index."""

    def __init__(self):
        super().__init__()
        self.heads = nn.ModuleDict({"0": nn.Linear(4, 4)})

    def forward(self, x):
        return F.linear(self.fc(x), self.heads["0"].weight)


class ReadsInACheckpointedMethod(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(4, 4), nn.Linear(4, 4)

    def _read(self, x):
        return F.linear(x, self.fc.weight)

    def forward(self, x):
        return self.out(torch.utils.checkpoint.checkpoint(self._read, x, use_reentrant=False))


@pytest.mark.parametrize("make, child", [
    (ReadsTheLastLayer, "layers.2"), (ReadsADictEntry, "heads.q"), (ReadsANumberedDictEntry, "heads.0"),
    (ReadsInACheckpointedMethod, "fc")], ids=["self.layers[-1]", 'self.heads["q"]', 'self.heads["0"]',
                                              "checkpoint(self._read, x)"])
def test_a_read_through_a_negative_index_a_dict_key_or_a_callback_is_found(make, child):
    with pytest.warns(UserWarning, match=rf"skipping '{re.escape(child)}': its parent {make.__name__} reads its weight"):
        model = L.add_lora(make(), r=2)
    assert child not in lora_names(model)


def test_a_module_handed_to_checkpoint_counts_as_called():
    class CheckpointsItsChild(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return torch.utils.checkpoint.checkpoint(self.fc, x, use_reentrant=False) + x @ self.fc.weight.T * 0

    with pytest.warns(UserWarning, match=r"reads the weight of \['fc'\] directly on some code paths"):
        model = L.add_lora(CheckpointsItsChild(), r=2, target_modules=["fc"])
    model(torch.randn(2, 4)).sum().backward()
    assert model.fc.lora_B.grad is not None
