"""The specification of the model-level helpers: LoRA put into, and taken out of, whole models.

Sections: which modules add_lora adapts (targets); trainable parameters and training;
the state_dict; enable / disable of a whole model; merge_and_unload; modules registered
twice and tied weights; adapter files (lora_state_dict, save_adapter / load_adapter).
Refusals of all of these: test_misuse.py; PEFT's file format: test_peft.py.
"""

import copy

import pytest
import torch
import torch.nn as nn
from hypothesis import given
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

import lora_min as L
from conftest import TOL, Attention, assert_unchanged, cases, lora_names, make, mlp, randomize_B, snapshot, tied

# --- targets: which modules add_lora adapts -------------------------------------------------------------


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


def test_linear_subclasses_that_keep_linear_forward_are_adapted():
    model = L.add_lora(nn.Sequential(NonDynamicallyQuantizableLinear(4, 3)), r=2)
    assert isinstance(model[0], L.LoRALinear)


@pytest.mark.parametrize("make_model, helper", [
    (mlp, L.add_lora),
    (lora_mlp, L.mark_only_lora_as_trainable),
    (lora_mlp, lambda model: L.load_lora_state_dict(model, L.lora_state_dict(model))),
], ids=["add_lora", "mark_only_lora_as_trainable", "load_lora_state_dict"])
def test_helpers_that_change_a_model_return_it(make_model, helper):
    model = make_model()
    assert helper(model) is model


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


# --- the state_dict --------------------------------------------------------------------------------------


def test_state_dict_keys_are_the_base_keys_plus_lora_A_and_B():
    base = mlp()
    model = L.add_lora(copy.deepcopy(base), r=2)
    lora_keys = {k for k in model.state_dict() if k.endswith(("lora_A", "lora_B"))}
    assert set(model.state_dict()) == set(base.state_dict()) | lora_keys


def test_a_base_checkpoint_loads_non_strictly_missing_only_the_lora_keys():
    base = mlp()
    model = L.add_lora(copy.deepcopy(base), r=2)
    lora_keys = {k for k in model.state_dict() if k.endswith(("lora_A", "lora_B"))}
    result = model.load_state_dict(base.state_dict(), strict=False)
    assert set(result.missing_keys) == lora_keys and not result.unexpected_keys


# --- enable / disable a whole model ---------------------------------------------------------------------


def test_lora_disabled_computes_the_base_model_exactly():
    model, x = lora_mlp(), torch.randn(3, 6)
    with L.lora_disabled(model):
        assert torch.equal(model(x), mlp()(x))


def test_set_lora_enabled_true_restores_the_adapted_output():
    model, x = lora_mlp(), torch.randn(3, 6)
    y_lora = model(x)
    L.set_lora_enabled(model, False)
    L.set_lora_enabled(model, True)
    assert torch.equal(model(x), y_lora)


def test_lora_disabled_nests_and_restores_a_mixed_state():
    model = lora_mlp()
    layers = [layer for _, layer in L.lora_layers(model)]
    layers[1].enabled = False  # a mixed state must come back as it was
    with L.lora_disabled(model):
        with L.lora_disabled(model):
            assert not any(layer.enabled for layer in layers)
        assert not any(layer.enabled for layer in layers)
    assert [layer.enabled for layer in layers] == [True, False, True]


def test_lora_disabled_restores_the_state_after_an_exception():
    model = lora_mlp()
    layers = [layer for _, layer in L.lora_layers(model)]
    layers[1].enabled = False
    with pytest.raises(ZeroDivisionError):
        with L.lora_disabled(model):
            1 / 0
    assert [layer.enabled for layer in layers] == [True, False, True]


# --- merge_and_unload: an ordinary model computing what the LoRA model computes ----------------------------


def lora_sequential(case):
    """(the plain Sequential(linear, ReLU), the same with the drawn LoRALinear, input x)."""
    linear, layer, x = make(case)
    return nn.Sequential(copy.deepcopy(linear), nn.ReLU()), nn.Sequential(layer, nn.ReLU()), x


@given(cases())
def test_merge_and_unload_computes_what_the_model_computes(case):
    _, model, x = lora_sequential(case)
    torch.testing.assert_close(L.merge_and_unload(model)(x), model(x), **TOL[case.dtype])


@given(cases())
def test_merge_and_unload_state_dict_loads_into_the_plain_architecture(case):
    """Same keys as the model without LoRA, loadable with no LoRA code, computing the LoRA model's output."""
    original, model, x = lora_sequential(case)
    plain = L.merge_and_unload(model)
    assert set(plain.state_dict()) == set(original.state_dict())
    original.load_state_dict(plain.state_dict())
    torch.testing.assert_close(original(x), model(x), **TOL[case.dtype])


def test_merge_and_unload_leaves_plain_frozen_layers():
    plain = L.merge_and_unload(lora_mlp())
    assert not any(isinstance(m, L.LoRALayer) for m in plain.modules())
    assert not any(p.requires_grad for p in plain.parameters())  # the exported base stays frozen


def test_merge_and_unload_leaves_its_input_untouched():
    model = lora_mlp()
    before = snapshot(model)
    L.merge_and_unload(model)
    assert_unchanged(model, before)


def test_merge_and_unload_of_a_bare_layer_is_an_nn_linear():
    layer = randomize_B(nn.Sequential(L.LoRALinear(nn.Linear(4, 3), r=2)))[0]
    x = torch.randn(5, 4)
    plain = L.merge_and_unload(layer)
    assert type(plain) is nn.Linear
    torch.testing.assert_close(plain(x), layer(x))


@pytest.mark.parametrize("state", ["disabled", "merged"])
def test_merge_and_unload_exports_what_the_model_computes_now(state):
    """Disabled layers export W, merged ones their weight as it is (W + ΔW)."""
    model = randomize_B(L.add_lora(mlp(torch.float64), r=2)).eval()
    x = torch.randn(5, 6, dtype=torch.float64)
    if state == "disabled":
        L.set_lora_enabled(model, False)
    else:
        L.merge_lora(model)
    torch.testing.assert_close(L.merge_and_unload(model)(x), model(x))


def test_merge_and_unload_inplace_replaces_the_layers_of_the_model_itself():
    model = randomize_B(L.add_lora(mlp(torch.float64), r=2))
    x = torch.randn(5, 6, dtype=torch.float64)
    L.merge_lora(model)
    y = model.eval()(x)
    plain = L.merge_and_unload(model, inplace=True)
    assert plain is model and not list(L.lora_layers(model))
    torch.testing.assert_close(plain(x), y)


# --- modules registered twice and tied weights -----------------------------------------------------------


def shared_twice():
    """Sequential(linear, Tanh, the same linear) with LoRA (random B), in eval mode."""
    shared = nn.Linear(4, 4)
    return randomize_B(L.add_lora(nn.Sequential(shared, nn.Tanh(), shared), r=2)).eval()


def test_a_module_registered_twice_gets_one_lora_layer_that_shares_nothing_else():
    model = shared_twice()
    assert model[0] is model[2] and isinstance(model[0], L.LoRALinear) and model[0].shared_with == ()


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


def test_add_lora_records_a_tied_weight_in_shared_with():
    assert tied()[2].shared_with == ("0.weight",)


def test_merge_and_unload_of_tied_weights_is_correct_and_leaves_the_other_owner_W():
    model = tied()
    x = torch.randn(3, 4)
    W = model[0].weight.clone()
    plain = L.merge_and_unload(model)
    torch.testing.assert_close(plain(x), model(x))
    assert torch.equal(plain[0].weight, W)


# --- adapter files: lora_state_dict, save_adapter / load_adapter -------------------------------------------


def test_lora_state_dict_holds_lora_A_and_B_of_every_layer_only():
    model = lora_mlp()
    assert set(L.lora_state_dict(model)) == {f"{n}.{p}" for n in lora_names(model) for p in ("lora_A", "lora_B")}


def test_lora_state_dict_tensors_are_detached_like_state_dict():
    state = L.lora_state_dict(lora_mlp())
    assert not any(isinstance(v, nn.Parameter) or v.requires_grad for v in state.values())


def test_lora_state_dict_round_trip():
    model, fresh = lora_mlp(), L.add_lora(mlp(), r=2)
    x = torch.randn(4, 6)
    assert not torch.equal(fresh(x), model(x))
    L.load_lora_state_dict(fresh, L.lora_state_dict(model))
    assert torch.equal(fresh(x), model(x))


def test_save_adapter_records_each_layers_settings(tmp_path):
    L.save_adapter(L.add_lora(mlp(), r=2, alpha=3.0, target_modules=["2.0", "3"]), tmp_path / "adapter.pt")
    settings = {"r": 2, "alpha": 3.0, "use_rslora": False}
    assert torch.load(tmp_path / "adapter.pt", weights_only=True)["config"] == {"2.0": settings, "3": settings}


def test_save_and_load_adapter_round_trip(tmp_path):
    model = randomize_B(L.add_lora(mlp(), r=2, alpha=3.0, target_modules=["2.0", "3"]))
    L.save_adapter(model, tmp_path / "adapter.pt")
    fresh = L.add_lora(mlp(), r=2, alpha=3.0, target_modules=["2.0", "3"])
    L.load_adapter(fresh, tmp_path / "adapter.pt")
    x = torch.randn(4, 6)
    assert torch.equal(fresh(x), model(x))
