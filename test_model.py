"""The specification of the model-level helpers: LoRA put into, and taken out of, whole models.

Every behaviour that does not depend on the layer type runs on a small model of each kind
(conftest.MODEL_KINDS: LoRA on linears, on embeddings, on convs, and on all three in one model).

Sections: which modules add_lora adapts (targets) and what it never changes; what each new layer
takes from the module it replaces; trainable parameters and training; the state_dict and
checkpoints; enable / disable of a whole model; merge_lora / unmerge_lora; merge_and_unload;
merged_state_dict; the meta device; modules registered twice and tied weights; adapter files
(lora_state_dict, save_adapter / load_adapter); modules_to_save; what trained and an adapter file leaves
out (parameters unfrozen by hand, buffers train mode changed): said when saving.
One layer at a time: test_layers.py; refusals of all of these: test_misuse.py; PEFT's file
format: test_peft.py.
"""

import copy
import re
import warnings

import pytest
import torch
import torch.nn as nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

import lora_min as L
from conftest import (EXACT, WithNorm, trained_with_saved_modules, MIXED_TARGETS, MODEL_KINDS, adapted, assert_unchanged, Attention, Block,
                      expected_lora_shapes, lora_mixed, lora_names, lora_two_blocks, mixed, mlp, randomize,
                      randomize_B, snapshot, tied)

KINDS = list(MODEL_KINDS)


# --- targets: which modules add_lora adapts, and what it never changes ---------------------------------


def lora_mlp():
    """mlp() with rank-2 LoRA (random B) on every linear."""
    return randomize_B(L.add_lora(mlp(), r=2))


def test_add_lora_adapts_every_linear_by_default_with_rank_8():
    model = L.add_lora(mlp())
    assert lora_names(model) == ["0", "2.0", "3"] and all(layer.r == 8 for _, layer in L.lora_layers(model))


def test_add_lora_targets_modules_by_full_name():
    model = L.add_lora(mlp(), r=2, target_modules=["0", "2.0"])
    assert lora_names(model) == ["0", "2.0"]


def test_modules_add_lora_does_not_target_stay_plain_and_frozen():
    model = L.add_lora(mlp(), r=2, target_modules=["0", "2.0"])
    assert type(model[3]) is nn.Linear
    assert not model[3].weight.requires_grad  # everything but LoRA is frozen


def test_add_lora_targets_modules_by_the_end_of_their_name():
    blocks = L.add_lora(nn.ModuleList([Attention(), Attention()]), r=1, target_modules=["q_proj", "v_proj"])
    assert lora_names(blocks) == ["0.q_proj", "0.v_proj", "1.q_proj", "1.v_proj"]


def test_targets_match_whole_dotted_names_never_substrings():
    model = L.add_lora(nn.Sequential(Attention()), r=2, target_modules=["q_proj"])
    assert lora_names(model) == ["0.q_proj"]  # not 0.qq_proj


@pytest.mark.parametrize("kind", KINDS)
def test_add_lora_adapts_the_named_modules_of_each_kind(kind):
    small = adapted(kind)
    assert lora_names(small.model) == small.settings["target_modules"]


def test_linear_subclasses_that_keep_linear_forward_are_adapted():
    model = L.add_lora(nn.Sequential(NonDynamicallyQuantizableLinear(4, 3)), r=2)
    assert isinstance(model[0], L.LoRALinear)


@pytest.mark.parametrize("targets", [["0", "2.0"], ("0", "2.0"), "2.0", None], ids=["a list", "a tuple", "a str", "None"])
def test_add_lora_never_changes_the_arguments_it_is_given(targets):
    given = copy.deepcopy(targets)
    L.add_lora(mlp(), r=2, alpha=4.0, target_modules=targets)
    assert targets == given and type(targets) is type(given)


@pytest.mark.parametrize("make_model, helper", [
    (mlp, L.add_lora),
    (lora_mlp, L.mark_only_lora_as_trainable),
    (lora_mlp, lambda model: L.load_lora_state_dict(model, L.lora_state_dict(model))),
], ids=["add_lora", "mark_only_lora_as_trainable", "load_lora_state_dict"])
def test_helpers_that_change_a_model_return_it(make_model, helper):
    model = make_model()
    assert helper(model) is model


# --- what each new layer takes from the module it replaces ---------------------------------------------


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("kind", KINDS)
def test_new_lora_layers_take_the_train_or_eval_mode_of_the_modules_they_replace(kind, training):
    """A new layer (and its dropout) behaves as the module it replaces: eval stays eval."""
    small = adapted(kind)
    model = L.add_lora(copy.deepcopy(small.base).train(training), dropout=0.1, **small.settings)
    assert len(lora_names(model)) >= 2
    for _, layer in L.lora_layers(model):
        assert layer.training == training and layer.lora_dropout.training == training


def test_add_lora_dropout_reaches_linears_and_convs_but_not_embeddings():
    model = L.add_lora(mixed(), r=2, dropout=0.1, target_modules=MIXED_TARGETS)
    assert isinstance(model.embed.lora_dropout, nn.Identity) and model.embed.dropout == 0.0
    for layer in (model.conv1, model.conv2, model.fc):
        assert isinstance(layer.lora_dropout, nn.Dropout) and layer.lora_dropout.p == 0.1


# --- trainable parameters and training ----------------------------------------------------------------


def test_training_changes_only_lora_parameters():
    model = L.add_lora(mlp(), r=3)
    base = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    lora_before = {k: v.clone() for k, v in L.lora_state_dict(model).items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        x, target = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
        loss = nn.functional.cross_entropy(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for name, p in model.named_parameters():
        if "lora_" not in name:
            assert torch.equal(p, base[name]) and p.grad is None, name
    assert all(not torch.equal(v, lora_before[k]) for k, v in L.lora_state_dict(model).items())


def test_trainable_parameters_are_r_times_in_plus_out_per_layer():
    model = L.add_lora(mlp(), r=3)
    expected = sum(layer.r * (layer.in_features + layer.out_features) for _, layer in L.lora_layers(model))
    assert expected == 3 * ((6 + 8) + (8 + 5) + (5 + 3))
    assert L.count_parameters(model).trainable == expected


def test_count_parameters_mnist_mlp():
    model = nn.Sequential(nn.Linear(784, 1000), nn.ReLU(), nn.Linear(1000, 2000), nn.ReLU(), nn.Linear(2000, 10))
    total_before = L.count_parameters(model).total
    assert total_before == 2_807_010
    L.add_lora(model, r=1, alpha=1)
    trainable, total = L.count_parameters(model)
    assert trainable == (784 + 1000) + (1000 + 2000) + (2000 + 10) == total - total_before
    assert f"{100 * trainable / total_before:.3f}%" == "0.242%"


# --- the state_dict and checkpoints ----------------------------------------------------------------------


def lora_keys(model):
    return {k for k in model.state_dict() if k.endswith(("lora_A", "lora_B"))}


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_keys_are_the_base_keys_plus_lora_A_and_B(kind):
    small = adapted(kind)
    assert lora_keys(small.model) == {f"{n}.{ab}" for n in lora_names(small.model) for ab in ("lora_A", "lora_B")}
    assert set(small.model.state_dict()) == set(small.base.state_dict()) | lora_keys(small.model)


@pytest.mark.parametrize("kind", KINDS)
def test_a_base_checkpoint_loads_non_strictly_missing_only_the_lora_keys(kind):
    small = adapted(kind)
    other = small.architecture(seed=5).state_dict()
    result = small.model.load_state_dict(other, strict=False)
    assert set(result.missing_keys) == lora_keys(small.model) and not result.unexpected_keys
    assert all(torch.equal(small.model.state_dict()[k], v) for k, v in other.items())


def test_a_merged_layer_accepts_a_partial_checkpoint_of_a_parameter_outside_any_layer():
    """Only keys of the layer itself count: a root parameter's key ("scale") is none of them."""
    model = lora_two_blocks()
    model.scale = nn.Parameter(torch.ones(()))
    model[0].fc.merge()
    model.load_state_dict({"scale": torch.full((), 3.0)}, strict=False)
    assert model.scale.item() == 3.0


def test_a_merged_layer_accepts_a_partial_checkpoint_without_its_keys():
    """A checkpoint holding none of a merged layer's keys says nothing about its merge state: it loads;
    one that holds a key of the layer, saved unmerged, is refused."""
    model = lora_two_blocks()
    model[0].fc.merge()
    other = {"1.out.bias": torch.full((4,), 7.0)}
    result = model.load_state_dict(other, strict=False)
    assert torch.equal(model[1].out.bias, other["1.out.bias"]) and "0.fc.weight" in result.missing_keys
    with pytest.raises(RuntimeError, match="0.fc: the checkpoint was saved unmerged"):
        model.load_state_dict({"0.fc.lora_A": torch.zeros(2, 4)}, strict=False)


# --- enable / disable a whole model ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_lora_disabled_computes_the_base_model_exactly(kind):
    small = adapted(kind)
    assert not torch.allclose(small.model(small.x), small.base(small.x))  # the adapter does something
    with L.lora_disabled(small.model):
        assert torch.equal(small.model(small.x), small.base(small.x))


@pytest.mark.parametrize("kind", KINDS)
def test_set_lora_enabled_true_restores_the_adapted_output(kind):
    small = adapted(kind)
    y_lora = small.model(small.x)
    L.set_lora_enabled(small.model, False)
    assert torch.equal(small.model(small.x), small.base(small.x))
    L.set_lora_enabled(small.model, True)
    assert torch.equal(small.model(small.x), y_lora)


@pytest.mark.parametrize("kind", KINDS)
def test_lora_disabled_nests_and_restores_a_mixed_state(kind):
    small = adapted(kind)
    layers = [layer for _, layer in L.lora_layers(small.model)]
    layers[1].enabled = False  # a mixed state must come back as it was
    state = [layer.enabled for layer in layers]
    with L.lora_disabled(small.model):
        with L.lora_disabled(small.model):
            assert not any(layer.enabled for layer in layers)
            assert torch.equal(small.model(small.x), small.base(small.x))
        assert not any(layer.enabled for layer in layers)
    assert [layer.enabled for layer in layers] == state == [i != 1 for i in range(len(layers))]


def test_lora_disabled_restores_the_state_after_an_exception():
    model = lora_mlp()
    layers = [layer for _, layer in L.lora_layers(model)]
    layers[1].enabled = False
    with pytest.raises(ZeroDivisionError):
        with L.lora_disabled(model):
            1 / 0
    assert [layer.enabled for layer in layers] == [True, False, True]


# --- merge_lora / unmerge_lora -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_merge_lora_equals_unmerged_and_unmerge_lora_restores_each_W(kind):
    small = adapted(kind)
    model, x = small.model.eval(), small.x
    y = model(x)
    L.merge_lora(model)
    assert all(layer.merged for _, layer in L.lora_layers(model))
    torch.testing.assert_close(model(x), y, **EXACT)
    L.unmerge_lora(model)
    for name, layer in L.lora_layers(model):
        W = small.base.get_submodule(name).weight
        bound = torch.finfo(W.dtype).eps * (W.abs() + layer.delta_weight().abs())
        assert not layer.merged and ((layer.weight - W).abs() <= bound).all(), name
    torch.testing.assert_close(model(x), y, **EXACT)


def bf16_mixed():
    base, model = lora_mixed(dtype=torch.bfloat16)
    return base, randomize(model, scale=0.5).eval()


def test_merge_unmerge_cycles_drift_in_bfloat16():
    """The contrast that makes merged_state_dict worth having: 100 merge_lora / unmerge_lora cycles
    round W + ΔW and W + ΔW - ΔW to bfloat16 each time, and W moves."""
    base, model = bf16_mixed()
    for _ in range(100):
        L.merge_lora(model)
        L.unmerge_lora(model)
    for name, layer in L.lora_layers(model):
        assert not torch.equal(layer.weight, base.get_submodule(name).weight), name


# --- merge_and_unload: an ordinary model computing what the LoRA model computes ----------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_merge_and_unload_of_a_model_loads_into_the_original_architecture(kind):
    """No LoRA layer left, the base model's state_dict keys, loadable with no LoRA code (into the same
    architecture with other weights), computing the LoRA model's output."""
    small = adapted(kind)
    y = small.model(small.x)
    plain = L.merge_and_unload(small.model)
    assert not list(L.lora_layers(plain))
    assert set(plain.state_dict()) == set(small.base.state_dict())
    fresh = small.architecture(seed=5)
    fresh.load_state_dict(plain.state_dict())  # no LoRA code needed
    torch.testing.assert_close(fresh(small.x), y, **EXACT)


@pytest.mark.parametrize("kind", KINDS)
def test_merge_and_unload_leaves_plain_frozen_layers(kind):
    plain = L.merge_and_unload(adapted(kind).model)
    assert not any(isinstance(m, L.LoRALayer) for m in plain.modules())
    assert not any(p.requires_grad for p in plain.parameters())  # the exported base stays frozen


@pytest.mark.parametrize("kind", KINDS)
def test_merge_and_unload_leaves_its_input_untouched(kind):
    model = adapted(kind).model
    before = snapshot(model)
    L.merge_and_unload(model)
    assert_unchanged(model, before)


@pytest.mark.parametrize("state", ["disabled", "merged"])
@pytest.mark.parametrize("kind", KINDS)
def test_merge_and_unload_exports_what_the_model_computes_now(kind, state):
    """Disabled layers export W, merged ones their weight as it is (W + ΔW)."""
    small = adapted(kind)
    model = small.model.eval()
    if state == "disabled":
        L.set_lora_enabled(model, False)
    else:
        L.merge_lora(model)
    torch.testing.assert_close(L.merge_and_unload(model)(small.x), model(small.x), **EXACT)


@pytest.mark.parametrize("kind", KINDS)
def test_merge_and_unload_inplace_replaces_the_layers_of_the_model_itself(kind):
    small = adapted(kind)
    model = small.model.eval()
    L.merge_lora(model)
    y = model(small.x)
    plain = L.merge_and_unload(model, inplace=True)
    assert plain is model and not list(L.lora_layers(model))
    torch.testing.assert_close(plain(small.x), y, **EXACT)


# --- merged_state_dict: merge_and_unload's state_dict, without a copy of the model ---------------------------


def mixed_with_disabled_and_merged_layers():
    """LoRA on linear, embedding and both convs; fc disabled, conv1 merged; head without LoRA."""
    base, model = lora_mixed()
    model.eval()
    model.fc.enabled = False
    model.conv1.merge()
    return base, model


def assert_same_state(state, expected):
    """The same keys in the same order, and bit-for-bit equal tensors."""
    assert list(state) == list(expected)
    for k in expected:
        assert torch.equal(state[k], expected[k]), k


@pytest.mark.parametrize("kind", KINDS)
def test_merged_state_dict_equals_the_state_dict_of_merge_and_unload(kind):
    model = adapted(kind).model
    assert_same_state(L.merged_state_dict(model), L.merge_and_unload(model).state_dict())


def test_merged_state_dict_of_disabled_and_merged_layers_equals_the_state_dict_of_merge_and_unload():
    _, model = mixed_with_disabled_and_merged_layers()
    assert_same_state(L.merged_state_dict(model), L.merge_and_unload(model).state_dict())


def test_merged_state_dict_holds_W_plus_delta_for_enabled_layers_and_W_for_disabled_ones():
    base, model = mixed_with_disabled_and_merged_layers()
    state = L.merged_state_dict(model)
    for name in ("embed", "conv2"):
        layer = getattr(model, name)
        torch.testing.assert_close(state[f"{name}.weight"], getattr(base, name).weight + layer.delta_weight(), **EXACT)
    torch.testing.assert_close(state["conv1.weight"], base.conv1.weight + model.conv1.delta_weight(), **EXACT)
    assert torch.equal(state["fc.weight"], base.fc.weight)


def test_merged_state_dict_has_no_lora_keys():
    _, model = mixed_with_disabled_and_merged_layers()
    assert "conv1.lora_merged" in model.state_dict()  # the merged layer's flag is in the model's own
    state = L.merged_state_dict(model)
    assert not [k for k in state if k.rsplit(".", 1)[-1] in ("lora_A", "lora_B", "lora_merged")]
    assert set(state) == set(mixed().state_dict())


def test_merged_state_dict_leaves_the_model_bit_for_bit_unchanged_after_1000_calls():
    _, model = mixed_with_disabled_and_merged_layers()
    before = snapshot(model)
    for _ in range(1000):
        L.merged_state_dict(model)
    assert_unchanged(model, before)


def test_merged_state_dict_shares_the_tensors_it_does_not_merge():
    """Layers without LoRA, base biases and (here) the merged layer's weight: the model's own memory, not copies."""
    _, model = mixed_with_disabled_and_merged_layers()
    state = L.merged_state_dict(model)
    shared = {"head.weight": model.head.weight, "head.bias": model.head.bias, "conv1.bias": model.conv1.bias,
              "conv2.bias": model.conv2.bias, "fc.bias": model.fc.bias, "conv1.weight": model.conv1.weight,
              "fc.weight": model.fc.weight}
    for key, param in shared.items():
        assert state[key].data_ptr() == param.data_ptr(), key
    assert state["embed.weight"].data_ptr() != model.embed.weight.data_ptr()  # merged: a new tensor
    assert state["conv2.weight"].data_ptr() != model.conv2.weight.data_ptr()


def test_merged_state_dict_of_a_layer_registered_under_two_names_holds_both_keys():
    """Sequential(linear, Tanh, the same linear): "0.weight" and "2.weight" are both there (as in
    state_dict), both W + ΔW, and the whole equals merge_and_unload's state_dict."""
    model = shared_twice()
    state = L.merged_state_dict(model)
    assert {"0.weight", "0.bias", "2.weight", "2.bias"} <= set(state)
    torch.testing.assert_close(state["2.weight"], model[0].weight + model[0].delta_weight())
    assert torch.equal(state["0.weight"], state["2.weight"])
    assert_same_state(state, L.merge_and_unload(model).state_dict())


def test_merged_state_dict_calls_do_not_drift_in_bfloat16():
    base, model = bf16_mixed()
    first = L.merged_state_dict(model)
    for _ in range(100):
        state = L.merged_state_dict(model)
    for name, _ in L.lora_layers(model):
        assert torch.equal(model.get_submodule(name).weight, base.get_submodule(name).weight), name
    assert all(torch.equal(state[k], first[k]) for k in first)


# --- the meta device: a model built without memory, to be materialised later -----------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_on_the_meta_device_merge_lora_and_merged_state_dict_work_without_values(kind):
    """merge_lora has no values to check for overflow there, and must not try: it flips every layer's
    merged; merged_state_dict (unmerged and merged) gives meta tensors of the base's keys and shapes."""
    small = adapted(kind, device="meta")
    model = small.model.eval()
    shapes = {k: v.shape for k, v in small.base.state_dict().items()}
    for merge in (None, L.merge_lora):
        if merge:
            merge(model)
        state = L.merged_state_dict(model)
        assert {k: v.shape for k, v in state.items()} == shapes and all(v.is_meta for v in state.values())
    assert all(layer.merged for _, layer in L.lora_layers(model))
    L.unmerge_lora(model)
    assert not any(layer.merged for _, layer in L.lora_layers(model))


# --- modules registered twice and tied weights -----------------------------------------------------------


def shared_twice():
    """Sequential(linear, Tanh, the same linear) with LoRA (random B), in eval mode."""
    shared = nn.Linear(4, 4)
    return randomize_B(L.add_lora(nn.Sequential(shared, nn.Tanh(), shared), r=2)).eval()


def test_a_module_registered_twice_gets_one_lora_layer_that_shares_nothing_else():
    model = shared_twice()
    assert model[0] is model[2] and isinstance(model[0], L.LoRALinear) and model[0].shared_with == ()


def test_a_module_registered_twice_but_named_once_is_adapted_under_both_names():
    model = nn.Module()
    model.a = nn.Linear(4, 4)
    model.b = model.a  # one module, two names; only "a" is targeted
    L.add_lora(model, r=2, target_modules=["a"])
    assert model.a is model.b and isinstance(model.b, L.LoRALinear)


def test_a_module_registered_twice_is_looked_up_before_anything_changes():
    model, block = nn.Module(), Block()
    model.a = model.b = block
    L.add_lora(model)  # "a.fc" replaced first must not make "b.fc" resolve to the new layer
    assert model.a.fc is model.b.fc and isinstance(model.a.fc, L.LoRALinear)


def test_merge_and_unload_keeps_a_module_registered_twice_shared():
    model = shared_twice()
    x = torch.randn(3, 4)
    plain = L.merge_and_unload(model)
    assert type(plain[0]) is nn.Linear and plain[0] is plain[2]  # replaced under both names, still shared
    torch.testing.assert_close(plain(x), model(x))


def test_merge_lora_merges_a_module_registered_twice_once():
    model = shared_twice()
    x = torch.randn(3, 4)
    y = model(x)
    L.merge_lora(model)  # one module, merged once: fine
    torch.testing.assert_close(model(x), y)


def memory_tied():
    """enc and dec whose weights are two Parameter objects over the same memory, LoRA on enc."""
    model = nn.Module()
    model.enc, model.dec = nn.Linear(4, 4), nn.Linear(4, 4)
    model.dec.weight = nn.Parameter(model.enc.weight.data)  # the same memory, another Parameter
    return L.add_lora(model, r=2, target_modules=["enc"])


@pytest.mark.parametrize("make, layer, shared_with", [
    (tied, "2", ("0.weight",)),
    (memory_tied, "enc", ("dec.weight",)),
], ids=["one Parameter", "two Parameters over the same memory"])
def test_add_lora_records_a_tied_weight_in_shared_with(make, layer, shared_with):
    assert make().get_submodule(layer).shared_with == shared_with


def test_merge_and_unload_of_tied_weights_is_correct_and_leaves_the_other_owner_W():
    model = tied()
    x = torch.randn(3, 4)
    W = model[0].weight.clone()
    plain = L.merge_and_unload(model)
    torch.testing.assert_close(plain(x), model(x))
    assert torch.equal(plain[0].weight, W)


# --- adapter files: lora_state_dict, save_adapter / load_adapter -------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_lora_state_dict_holds_lora_A_and_B_of_every_layer_only_in_the_layer_types_shapes(kind):
    """(conftest.expected_lora_shapes: e.g. an embedding's A is (r, num_embeddings), a conv's (r, in, *kernel).)"""
    small = adapted(kind)
    state = L.lora_state_dict(small.model)
    assert set(state) == {f"{n}.{ab}" for n in lora_names(small.model) for ab in ("lora_A", "lora_B")}
    for name in lora_names(small.model):
        shapes = expected_lora_shapes(small.base.get_submodule(name), small.settings["r"])
        assert (state[f"{name}.lora_A"].shape, state[f"{name}.lora_B"].shape) == shapes, name


@pytest.mark.parametrize("kind", KINDS)
def test_lora_state_dict_tensors_are_detached_like_state_dict(kind):
    state = L.lora_state_dict(adapted(kind).model)
    assert not any(isinstance(v, nn.Parameter) or v.requires_grad for v in state.values())


@pytest.mark.parametrize("kind", KINDS)
def test_lora_state_dict_round_trip(kind):
    small = adapted(kind)
    fresh = small.fresh()
    assert not torch.equal(fresh(small.x), small.model(small.x))
    state = L.lora_state_dict(small.model)
    given = copy.deepcopy(state)
    L.load_lora_state_dict(fresh, state)
    assert torch.equal(fresh(small.x), small.model(small.x))
    assert list(state) == list(given) and all(torch.equal(state[k], given[k]) for k in given)  # the argument unchanged


def test_save_adapter_records_each_layers_settings(tmp_path):
    L.save_adapter(L.add_lora(mlp(), r=2, alpha=3.0, target_modules=["2.0", "3"]), tmp_path / "adapter.pt")
    settings = {"r": 2, "alpha": 3.0, "use_rslora": False}
    assert torch.load(tmp_path / "adapter.pt", weights_only=True)["config"] == {"2.0": settings, "3": settings}


@pytest.mark.parametrize("kind", KINDS)
def test_save_and_load_adapter_round_trip(kind, tmp_path):
    small = adapted(kind)
    L.save_adapter(small.model, tmp_path / "adapter.pt")
    fresh = small.fresh()
    assert not torch.equal(fresh(small.x), small.model(small.x))
    L.load_adapter(fresh, tmp_path / "adapter.pt")
    assert torch.equal(fresh(small.x), small.model(small.x))


# --- wrapped models: torch.compile, DataParallel, DistributedDataParallel ------------------------------


@pytest.fixture
def one_process_group(tmp_path):
    """A one-process gloo group, so that DistributedDataParallel can wrap a CPU model here."""
    import torch.distributed as dist
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


WRAPPERS = {
    "torch.compile": torch.compile,
    "DataParallel": nn.DataParallel,
    "DistributedDataParallel": lambda model: nn.parallel.DistributedDataParallel(model),
}


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_every_helper_reads_and_writes_the_names_of_the_model_inside_a_wrapper(wrapper, request, tmp_path):
    if wrapper == "DistributedDataParallel":
        request.getfixturevalue("one_process_group")
    inner = mlp(dtype=torch.float64)
    wrapped = WRAPPERS[wrapper](inner)
    L.add_lora(wrapped, r=2)  # adapts the inner model
    randomize_B(inner)
    assert lora_names(wrapped) == lora_names(inner) == ["0", "2.0", "3"]
    assert set(L.lora_state_dict(wrapped)) == set(L.lora_state_dict(inner)) == {
        f"{n}.lora_{ab}" for n in ("0", "2.0", "3") for ab in "AB"}
    assert set(L.merged_state_dict(wrapped)) == set(mlp().state_dict())
    L.save_adapter(wrapped, tmp_path / "a.pt")
    fresh = L.add_lora(mlp(dtype=torch.float64), r=2)
    L.load_adapter(fresh, tmp_path / "a.pt")
    x = torch.randn(3, 6, dtype=torch.float64)
    torch.testing.assert_close(fresh(x), inner(x))
    L.load_lora_state_dict(wrapped, L.lora_state_dict(fresh))
    plain = L.merge_and_unload(wrapped)
    assert not list(L.lora_layers(plain)) and set(plain.state_dict()) == set(mlp().state_dict())
    torch.testing.assert_close(plain(x), inner(x))
    with L.lora_disabled(wrapped):
        torch.testing.assert_close(inner(x), L.unload(inner)(x))


# --- unload: the base model back without merging ---------------------------------------------------------


def test_unload_gives_the_base_model_back_bit_for_bit_with_the_same_parameters():
    base = mlp(dtype=torch.float64)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    params = {n: p for n, p in base.named_parameters()}
    model = randomize_B(L.add_lora(base, r=2))
    plain = L.unload(model, inplace=True)
    assert plain is base and not list(L.lora_layers(plain))
    assert [type(m) for m in plain.modules()] == [type(m) for m in mlp().modules()]
    assert {n: p for n, p in plain.named_parameters()} == params  # the very Parameters
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in before.items())


def test_unload_without_inplace_leaves_the_model_as_it_was_and_allows_new_settings():
    model = randomize_B(L.add_lora(mlp(dtype=torch.float64), r=2))
    before = snapshot(model)
    plain = L.unload(model)
    assert_unchanged(model, before)
    again = L.add_lora(plain, r=4, alpha=2.0, target_modules=["3"])
    assert lora_names(again) == ["3"] and again[3].r == 4


def test_unload_refuses_merged_layers_and_changes_nothing():
    model = randomize_B(L.add_lora(mlp(dtype=torch.float64), r=2)).eval()
    L.merge_lora(model)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match=r"^unload: \['0', '2\.0', '3'\] are merged.*unmerge_lora"):
        L.unload(model)
    assert_unchanged(model, before)


# --- hooks move with the module they were registered on ---------------------------------------------------


def test_forward_hooks_on_a_target_move_to_its_lora_layer_and_on_to_the_merged_export():
    model = mlp(dtype=torch.float64)
    seen = []
    pre = model[0].register_forward_pre_hook(lambda m, args: seen.append(("pre", type(m).__name__)))
    post = model[0].register_forward_hook(lambda m, args, out: out * 2)
    x = torch.randn(3, 6, dtype=torch.float64)
    expected = model(x)
    L.add_lora(model, r=2)
    torch.testing.assert_close(model(x), expected)  # B = 0: the hooked model, as before
    assert seen[-1] == ("pre", "LoRALinear")
    randomize_B(model)
    y = model(x)
    plain = L.merge_and_unload(model)
    torch.testing.assert_close(plain(x), y)
    assert seen[-1] == ("pre", "Linear")
    pre.remove()
    post.remove()  # the handles still reach the hooks
    assert not model[0]._forward_hooks and not model[0]._forward_pre_hooks


# --- adapter files: refusals that say what to do -------------------------------------------------------


def test_save_adapter_refuses_a_model_without_lora_layers(tmp_path):
    with pytest.raises(ValueError, match="save_adapter: the model has no LoRA layers"):
        L.save_adapter(mlp(), tmp_path / "a.pt")
    assert not (tmp_path / "a.pt").exists()


def test_load_adapter_before_add_lora_names_the_exact_add_lora_call_and_that_call_works(tmp_path):
    model = randomize_B(L.add_lora(mlp(dtype=torch.float64), r=3, alpha=6, use_rslora=True, target_modules=["0", "3"]))
    assert lora_names(model) == ["0", "2.0", "3"]
    L.save_adapter(model, tmp_path / "a.pt")
    base = mlp(dtype=torch.float64)
    with pytest.raises(ValueError, match=r"has no LoRA layers") as error:
        L.load_adapter(base, tmp_path / "a.pt")
    call = re.search(r"add_lora\(model, [^)]*\)", str(error.value)).group(0)
    assert call == "add_lora(model, r=3, alpha=6.0, target_modules=['0', '3'], use_rslora=True)"  # "0" is also "2.0"
    eval(call, {"add_lora": L.add_lora, "model": base})
    L.load_adapter(base, tmp_path / "a.pt")
    x = torch.randn(2, 6, dtype=torch.float64)
    torch.testing.assert_close(base(x), model(x))


def test_each_loader_given_the_other_format_names_the_right_one(tmp_path):
    model = L.add_lora(mlp(), r=2)
    L.save_peft_adapter(model, tmp_path / "peft")
    L.save_adapter(model, tmp_path / "a.pt")
    with pytest.raises(ValueError, match=r"peft is a folder.*load_peft_adapter"):
        L.load_adapter(model, tmp_path / "peft")
    with pytest.raises(ValueError, match=r"a\.pt is a file.*load_adapter"):
        L.load_peft_adapter(mlp(), tmp_path / "a.pt")


# --- modules_to_save: modules trained in full beside the adapter ----------------------------------------


def test_modules_to_save_train_in_full_while_lora_disabled_is_exactly_the_base_model():
    base, model = trained_with_saved_modules()
    assert lora_names(model) == ["body"]  # the default targets leave saved modules out
    assert type(model.head) is L.TrainedCopy and not torch.equal(model.head.trained.weight, base.head.weight)
    assert not torch.equal(model.norm.trained.running_mean, base.norm.running_mean)  # train mode moved them
    x = torch.randn(4, 6, dtype=torch.float64)
    with L.lora_disabled(model):
        assert torch.equal(model(x), base.eval()(x))
    assert {k.split(".")[0] for k in L.lora_state_dict(model)} == {"body", "norm", "head"}


def test_modules_to_save_travel_in_adapter_files_and_stay_in_the_merged_export(tmp_path):
    base, model = trained_with_saved_modules()
    x = torch.randn(4, 6, dtype=torch.float64)
    L.save_adapter(model, tmp_path / "a.pt")
    with pytest.raises(ValueError, match=r"modules_to_save=\['norm', 'head'\]"):
        L.load_adapter(L.add_lora(copy.deepcopy(base), r=2), tmp_path / "a.pt")
    fresh = L.add_lora(copy.deepcopy(base), r=2, modules_to_save=["norm", "head"]).eval()
    L.load_adapter(fresh, tmp_path / "a.pt")
    assert torch.equal(fresh(x), model(x))
    plain = L.merge_and_unload(model)
    assert type(plain.head) is nn.Linear and set(plain.state_dict()) == set(base.state_dict())
    torch.testing.assert_close(plain(x), model(x))
    assert set(L.merged_state_dict(model)) == set(base.state_dict())
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in L.merged_state_dict(model).items())
    assert type(L.unload(model).head) is nn.Linear and torch.equal(L.unload(model).head.weight, base.head.weight)


def test_a_module_cannot_be_both_a_lora_target_and_trained_in_full():
    model = WithNorm()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"modules_to_save 'head' is also a LoRA target"):
        L.add_lora(model, r=2, target_modules=["head"], modules_to_save=["head"])
    assert_unchanged(model, before)


def test_the_suggested_add_lora_call_reproduces_an_alpha_that_is_not_round(tmp_path):
    model = L.add_lora(mlp(dtype=torch.float64), r=2, alpha=8 * 2 ** 0.5)
    L.save_adapter(model, tmp_path / "a.pt")
    base = nn.DataParallel(mlp(dtype=torch.float64))  # a wrapper too: the call names the inner model's layers
    with pytest.raises(ValueError, match=r"has no LoRA layers") as error:
        L.load_adapter(base, tmp_path / "a.pt")
    eval(re.search(r"add_lora\(model, [^)]*\)", str(error.value)).group(0), {"add_lora": L.add_lora, "model": base})
    L.load_adapter(base, tmp_path / "a.pt")


def test_add_lora_returns_the_wrapper_it_was_given():
    wrapped = nn.DataParallel(mlp())
    assert L.add_lora(wrapped, r=2) is wrapped and lora_names(wrapped) == ["0", "2.0", "3"]


def test_a_lora_layer_takes_its_input_by_the_keyword_nn_linear_uses():
    layer = randomize_B(nn.Sequential(L.LoRALinear(nn.Linear(4, 3), r=2)))[0]
    x = torch.randn(2, 4)
    assert torch.equal(layer(input=x), layer(x))


# --- modules_to_save: what a trained copy cannot be -------------------------------------------------------


def test_a_disabled_trained_copy_exports_its_original():
    _, model = trained_with_saved_modules()
    x = torch.randn(4, 6, dtype=torch.float64)
    with L.lora_disabled(model):
        y = model(x)
        plain, state = L.merge_and_unload(model), L.merged_state_dict(model)
    torch.testing.assert_close(plain(x), y)
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in state.items()) and set(state) == set(plain.state_dict())


class SharedHead(nn.Module):
    """A head registered under two names, "b" and "c"."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        self.c = self.b

    def forward(self, x):
        return self.c(self.a(x))


def locked_head():
    import threading
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3))
    model[1].lock = threading.Lock()  # cannot be deep-copied
    return model


def hooked_head():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3))
    model[1].register_forward_hook(lambda m, a, o: None)
    return model


@pytest.mark.parametrize("make, saved, words", [
    (SharedHead, "c", r"modules_to_save 'c' is also registered as \['b'\]"),
    (locked_head, "1", r"modules_to_save '1' cannot be copied to train it \(TypeError"),
    (hooked_head, "1", r"modules_to_save '1' has hooks \(_forward_hooks"),
], ids=["registered twice", "not copyable", "hooked"])
def test_a_module_to_save_that_a_trained_copy_would_split_is_refused_and_nothing_changes(make, saved, words):
    model = make()
    before = snapshot(model)
    with pytest.raises(ValueError, match=words):
        L.add_lora(model, r=2, target_modules=["a" if make is SharedHead else "0"], modules_to_save=[saved])
    assert_unchanged(model, before)


def test_a_trained_copy_of_a_module_whose_parent_reads_its_weight_gives_the_running_modules_weight():
    torch.manual_seed(0)
    base = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).double().eval()
    model = L.add_lora(copy.deepcopy(base), r=2, target_modules=["linear1"], modules_to_save=["self_attn.out_proj"])
    with torch.no_grad():
        model.self_attn.out_proj.trained.weight.add_(1.0)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    expected = copy.deepcopy(base)
    expected.self_attn.out_proj.weight.data.add_(1.0)
    torch.testing.assert_close(model(x), expected(x))
    with L.lora_disabled(model):
        torch.testing.assert_close(model(x), base(x))


# --- what trained and an adapter file leaves out is said when saving ----------------------------------------


SAVES = ["save_adapter", "save_peft_adapter"]


def save_in(save, model, folder):
    """save(model) into folder (made here): save_adapter's file a.pt, save_peft_adapter's folder peft."""
    folder.mkdir(exist_ok=True)
    if save == "save_adapter":
        return L.save_adapter(model, folder / "a.pt")
    return L.save_peft_adapter(model, folder / "peft")


def load_from(save, base, folder, **settings):
    """base with the adapter save_in wrote into folder (settings: add_lora's, for save_adapter's file)."""
    if save == "save_adapter":
        return L.load_adapter(L.add_lora(base, r=2, **settings), folder / "a.pt")
    return L.load_peft_adapter(base, folder / "peft")


def saved_quietly(save, model, folder):
    """save_in(save, model, folder) with every warning an error: nothing is left out, nothing is said."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        save_in(save, model, folder)


def leaves_out(save, what):
    """The warning `save` gives when the file leaves out `what` (regex)."""
    return pytest.warns(UserWarning, match=rf"^{save}: {what}")


def trained(model, steps=3):
    """model after a few AdamW steps on what requires grad, in its current mode (train: BatchNorm's statistics move)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g, dtype = torch.Generator().manual_seed(0), next(model.parameters()).dtype
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(16, 6, generator=g, dtype=dtype)).pow(2).mean().backward()
        optimizer.step()
    return model


def with_norm():
    """WithNorm in float64, frozen, in eval mode, its BatchNorm holding statistics of its own (as a pretrained one)."""
    torch.manual_seed(0)
    base = WithNorm().double()
    with torch.no_grad():
        base(torch.randn(32, 6, dtype=torch.float64) * 3 + 1)  # train mode: the statistics leave 0 and 1
    return base.eval().requires_grad_(False)


@pytest.mark.parametrize("save", SAVES)
def test_a_head_unfrozen_by_hand_is_named_with_how_to_keep_it(save, tmp_path):
    base = with_norm()
    model = L.add_lora(copy.deepcopy(base), r=2, target_modules=["body"])
    model.head.weight.requires_grad_(True)  # the usual way to train a new classifier head
    trained(model.eval())  # (eval mode: BatchNorm's statistics stay; only the head is left out)
    with leaves_out(save, r"the trainable parameters \['head\.weight'\] are not in the adapter, so loading it will not "
                          r"restore them: add_lora\(\.\.\., modules_to_save=\['head'\]\) .* requires_grad_\(False\)"):
        save_in(save, model, tmp_path)
    x = torch.randn(4, 6, dtype=torch.float64)
    loaded = load_from(save, copy.deepcopy(base), tmp_path, target_modules=["body"])
    assert not torch.allclose(loaded(x), model(x))  # the warning is true: the file gives back another model
    model.head.weight.requires_grad_(False)  # not meant to train: nothing left out
    saved_quietly(save, model, (tmp_path / "frozen"))


@pytest.mark.parametrize("save", SAVES)
def test_batchnorm_statistics_moved_in_train_mode_are_named_with_modules_to_save(save, tmp_path):
    base = with_norm()
    model = trained(L.add_lora(copy.deepcopy(base), r=2, target_modules=["body"]).train()).eval()
    with leaves_out(save, r"the buffers of \['norm'\] changed since add_lora \(train mode updates BatchNorm's "
                          r"running statistics\), and the adapter does not hold them: "
                          r"add_lora\(\.\.\., modules_to_save=\['norm'\]\)"):
        save_in(save, model, tmp_path)
    x = torch.randn(4, 6, dtype=torch.float64)
    loaded = load_from(save, copy.deepcopy(base), tmp_path, target_modules=["body"])
    assert not torch.allclose(loaded(x), model(x))  # the warning is true: the file gives back another model
    kept = trained(L.add_lora(copy.deepcopy(base), r=2, target_modules=["body"], modules_to_save=["norm"]).train())
    saved_quietly(save, kept.eval(), tmp_path / "kept")
    loaded = load_from(save, copy.deepcopy(base), tmp_path / "kept", target_modules=["body"], modules_to_save=["norm"])
    assert torch.equal(loaded.eval()(x), kept(x))


def test_a_model_run_in_train_mode_only_inside_lora_disabled_is_warned_about_too(tmp_path):
    model = L.add_lora(with_norm(), r=2, target_modules=["body"]).train()
    with L.lora_disabled(model), torch.no_grad():
        model(torch.randn(16, 6, dtype=torch.float64))  # the base's own statistics move: it is no longer the base
    with leaves_out("save_adapter", r"the buffers of \['norm'\] changed since add_lora"):
        L.save_adapter(nn.DataParallel(model), tmp_path / "a.pt")  # (a wrapper: the model inside it is checked)


@pytest.mark.parametrize("save", SAVES)
def test_what_rewrites_buffers_without_training_them_is_no_alarm(save, tmp_path):
    """Eval mode, .to() a dtype (new tensors, rounded: add_lora's copy is compared rounded alike), load_state_dict
    of the same values (DDP's broadcasts too write in place), deepcopy: the statistics are the base's, nothing is
    said. A train-mode step after all that still is."""
    model = L.add_lora(with_norm(), r=2, target_modules=["body"])
    trained(model.eval())
    model.float().load_state_dict(copy.deepcopy(model.state_dict()))
    model = copy.deepcopy(model)
    saved_quietly(save, model, tmp_path)
    with leaves_out(save, r"the buffers of \['norm'\] changed"):
        save_in(save, trained(model.train(), steps=1), tmp_path / "trained")


@pytest.mark.parametrize("save", SAVES)
def test_a_base_loaded_after_add_lora_and_a_nan_buffer_are_no_alarm(save, tmp_path):
    """Build, add_lora, then load the base weights (the keys are the base's): the loaded statistics are the base's.
    A buffer holding NaN that nothing touched is unchanged. unload leaves neither the copy nor its load hook."""
    model = L.add_lora(WithNorm().double().eval(), r=2, target_modules=["body"])
    model.load_state_dict(with_norm().state_dict(), strict=False)
    model.norm.register_buffer("calibration", torch.full((2,), float("nan"), dtype=torch.float64))
    model.load_state_dict(model.state_dict())  # (a load takes the buffers as the base's: the NaN one too)
    saved_quietly(save, trained(model), tmp_path)
    with leaves_out(save, r"the buffers of \['norm'\] changed"):
        save_in(save, trained(model.train(), steps=1), tmp_path / "trained")
    plain = L.unload(model)
    assert not hasattr(plain, "_lora_base_buffers") and not plain._load_state_dict_post_hooks


class Tracked(nn.Module):
    """fc, whose output's mean train mode tracks in a persistent buffer (as BatchNorm does), and a non-persistent
    cache every forward rewrites (as a rotary embedding's): the first is state a checkpoint holds, the second not."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3, dtype=torch.float64)
        self.register_buffer("mean", torch.zeros(3, dtype=torch.float64))
        self.register_buffer("cache", torch.zeros(3, dtype=torch.float64), persistent=False)

    def forward(self, x):
        y = self.fc(x)
        self.cache = y.detach()[0]  # any mode
        if self.training:
            self.mean.lerp_(y.detach().mean(0), 0.1)
        return y


@pytest.mark.parametrize("save", SAVES)
def test_any_buffer_that_train_mode_updates_is_named_and_a_non_persistent_one_never(save, tmp_path):
    torch.manual_seed(0)
    model = L.add_lora(nn.Sequential(Tracked()), r=2)
    saved_quietly(save, trained(model.eval()), tmp_path / "eval")
    with leaves_out(save, r"the buffers of \['0'\] changed since add_lora"):
        save_in(save, trained(model.train()), tmp_path)


@pytest.mark.parametrize("kind, save", [(kind, save) for kind in KINDS for save in SAVES  # (PEFT refuses a reflect conv)
                                        if not (kind == "all three" and save == "save_peft_adapter")])
def test_a_complete_adapter_saves_quietly_after_training_in_train_mode(kind, save, tmp_path):
    small = adapted(kind)
    model = small.model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(small.x).pow(2).mean().backward()
    optimizer.step()
    saved_quietly(save, model, tmp_path)


@pytest.mark.parametrize("save", SAVES)
def test_modules_trained_in_full_batchnorm_too_save_quietly(save, tmp_path):
    _, model = trained_with_saved_modules()  # norm and head in modules_to_save, trained in train mode
    with L.lora_disabled(model.train()), torch.no_grad():
        model(torch.randn(16, 6, dtype=torch.float64))  # the original norm moves: it is in modules_to_save
    saved_quietly(save, model, tmp_path)


@pytest.mark.parametrize("save", SAVES)
def test_with_warnings_as_errors_saving_warns_before_it_writes_anything(save, tmp_path):
    model = trained(L.add_lora(with_norm(), r=2, target_modules=["body"]).train())
    model.head.bias.requires_grad_(True)
    before = snapshot(model)
    with warnings.catch_warnings(), pytest.raises(UserWarning, match=r"\['head\.bias'\]"):
        warnings.simplefilter("error")
        save_in(save, model, tmp_path)
    assert not list(tmp_path.iterdir())
    assert_unchanged(model, before)
