"""LoRA on named Parameters (add_lora's target_parameters): transformers' MoE experts, nn.MultiheadAttention
(named in target_modules: its in_proj_weight and its out_proj), and a bare weight of any module.

The oracles are written out here, never lora_min's own: per expert y_e = x_e (W_e + B_e A_e s)^T + b_e, routed
and weighted token by token (`experts_by_hand`); transformers' own experts forward with W + ΔW put in by hand
(`merged_by_hand`); torch's F.multi_head_attention_forward with W_in + ΔW_in and W_out + ΔW_out; PEFT's
ParamWrapper given the same A and B; gradcheck / gradgradcheck in float64.
Sections: MoE models of seven transformers families; transformers' experts implementations; one experts module
(plain math, gradients, dropout); a bare Parameter; nn.MultiheadAttention (alone, in torchvision's ViT, in
nn.TransformerEncoderLayer); refusals; the bugs this file found, each a test; the bugs an adversarial review
found (PEFT files of Parameters, hooks, modules_to_save inside a wrapper, ...), each a test; torch.compile (slow).
"""

import copy
import functools
import itertools
import json
import math
import re
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings as hypothesis_settings, strategies as st

import lora_min as L
from conftest import EXACT, assert_unchanged, lora_names, randomize, randomize_peft, snapshot, tokens

transformers = pytest.importorskip("transformers")

GRADS = dict(rtol=1e-9, atol=1e-9)  # float64 gradients: longer sums than the outputs'
TOL32 = dict(rtol=1e-5, atol=1e-5)
SETTINGS = dict(r=3, alpha=5.0)  # scale 5/3: a dropped or doubled scale shows


def needs_experts():
    """transformers' experts interface, or a skip: transformers 4 (the oldest tested) has none (nn.Linear experts)."""
    return pytest.importorskip("transformers.integrations.moe")


def scale_of(settings):
    """alpha / r, or alpha / sqrt(r) with use_rslora: the LoRA paper's scale and rsLoRA's."""
    r, alpha = settings["r"], settings.get("alpha", settings["r"])
    return alpha / (math.sqrt(r) if settings.get("use_rslora") else r)


def delta_by_hand(layer, settings):
    """ΔW = B @ A * s in (out, in) layout, for each expert of a stack: (E, out, r) @ (E, r, in) -> (E, out, in)."""
    return layer.lora_B.detach() @ layer.lora_A.detach() * scale_of(settings)


def base_name(name):
    """The module a LoRA layer stands for, by its name in the base model (the wrappers' "base_layer" dropped)."""
    return ".".join(part for part in name.split(".") if part != "base_layer")


def set_factored(model, factored):
    for _, layer in L.lora_layers(model):
        if isinstance(layer, L.LoRAParameter):
            layer.factored = factored


def lora_parameters(model):
    return [p for _, layer in L.lora_layers(model) for p in (layer.lora_A, layer.lora_B)]


experts_forward = L.experts_forward  # the real one, for the spies that count its calls


# --- MoE models: seven transformers families, each built from a tiny config ------------------------------------

HIDDEN, INTER, N_EXPERTS = 32, 12, 4  # gate_up (E, 24, 32), down (E, 32, 12): no square weight, so a lost transpose shows
COMMON = dict(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=97,
              max_position_embeddings=64, attn_implementation="eager", experts_implementation="eager",
              initializer_range=0.2)  # weights ~ N(0, 0.2): LoRA's effect is neither lost nor clamped (gpt-oss)
ROUTED = dict(num_experts_per_tok=2)
FAMILIES = {  # name: (config class, model class, the family's own fields)
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(intermediate_size=INTER, num_local_experts=N_EXPERTS, **ROUTED)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(moe_intermediate_size=INTER, num_experts=N_EXPERTS, head_dim=8, **ROUTED)),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",  # experts stored transposed (E, in, out), with biases
                dict(intermediate_size=INTER, num_local_experts=N_EXPERTS, head_dim=8,
                     layer_types=["full_attention", "sliding_attention"], **ROUTED)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(moe_intermediate_size=INTER, shared_expert_intermediate_size=16, num_experts=N_EXPERTS, **ROUTED)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(intermediate_size=INTER, num_experts=N_EXPERTS, **ROUTED)),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(moe_intermediate_size=INTER, intermediate_size=16, n_routed_experts=N_EXPERTS, n_group=1,
                         topk_group=1, first_k_dense_replace=0, n_shared_experts=1, kv_lora_rank=16, q_lora_rank=16,
                         qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, num_key_value_heads=4, **ROUTED)),
    "nemotron_h": ("NemotronHConfig", "NemotronHForCausalLM",  # has_gate=False: up_proj, not gate_up_proj
                   dict(layers_block_type=["full_attention", "moe"], head_dim=8, n_routed_experts=N_EXPERTS,
                        moe_intermediate_size=INTER, moe_shared_expert_intermediate_size=12, intermediate_size=12,
                        mamba_num_heads=4, mamba_head_dim=8, n_groups=1, ssm_state_size=8, use_mamba_kernels=False,
                        experts_implementation="batched_mm", **ROUTED)),  # its eager experts sum in float32
}


@functools.lru_cache(maxsize=None)
def _moe_base(family):
    needs_experts()
    config_class, model_class, fields = FAMILIES[family]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = getattr(transformers, config_class)(**{**COMMON, **fields})
    # frozen as add_lora freezes it: torch may take another kernel (other rounding) for a weight that requires grad
    return getattr(transformers, model_class)(config).to(torch.float64).eval().requires_grad_(False)


def moe_base(family):
    """A 2-layer float64 model of this family in eval mode, frozen (a copy: tests may change it)."""
    return copy.deepcopy(_moe_base(family))


def experts_modules(model):
    """[(name, module)] of transformers' experts modules, found by transformers' own attributes."""
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "has_gate") and hasattr(m, "num_experts")
            and not isinstance(m, L.LoRALayer)]


def projections(model):
    """The experts' two projections: gate_up_proj (or up_proj without a gate) and down_proj."""
    has_gate = {m.has_gate for _, m in experts_modules(model)}
    assert len(has_gate) == 1
    return ["gate_up_proj" if has_gate.pop() else "up_proj", "down_proj"]


def lora_moe(family, seed=1, **settings):
    """(base, a copy with LoRA on both projections of every experts module, random A and B, the settings)."""
    base, settings = moe_base(family), {**SETTINGS, **settings}
    model = L.add_lora(copy.deepcopy(base), target_modules=[], target_parameters=projections(base), **settings)
    return base, randomize(model, seed, scale=0.3), settings


def merged_by_hand(base, model, settings):
    """A copy of the base whose every adapted weight holds W + ΔW, ΔW computed here from the model's A and B:
    transformers' own modules then compute what the adapted model must."""
    expected = copy.deepcopy(base)
    with torch.no_grad():
        for name, layer in L.lora_layers(model):
            owner = expected.get_submodule(base_name(name))
            weight = getattr(owner, layer.parameter_name if isinstance(layer, L.LoRAParameter) else "weight")
            delta = delta_by_hand(layer, settings)
            if weight.dim() == 3 and getattr(owner, "is_transposed", False):  # stored (E, in, out): holds ΔW_e^T
                delta = delta.transpose(-2, -1)
            weight.add_(delta)
    return expected


def logits(model, ids=None):
    return model(tokens() if ids is None else ids).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_moe_experts_get_one_lora_per_projection_nested_as_peft_nests_them(family):
    base = moe_base(family)
    experts = dict(experts_modules(base))
    up, down = projections(base)
    L.add_lora(base, target_modules=[], target_parameters=[up, down], **SETTINGS)
    assert lora_names(base) == [n + suffix for n in experts for suffix in ("", ".base_layer")]
    for name, owner in experts.items():
        outer = base.get_submodule(name)  # the last Parameter in the module's own order is the outer wrapper
        assert isinstance(outer, L.LoRAParameter) and outer.parameter_name == down and outer.factored
        inner = outer.base_layer
        assert isinstance(inner, L.LoRAParameter) and inner.parameter_name == up and inner.factored
        assert inner.base_layer is owner and outer.inner is owner and inner.inner is owner
        assert outer.num_experts == N_EXPERTS  # a parent reading experts.num_experts reads the module's
        out_up = 2 * INTER if up == "gate_up_proj" else INTER
        assert inner.lora_A.shape == (N_EXPERTS, 3, HIDDEN) and inner.lora_B.shape == (N_EXPERTS, out_up, 3)
        assert outer.lora_A.shape == (N_EXPERTS, 3, INTER) and outer.lora_B.shape == (N_EXPERTS, HIDDEN, 3)
        assert not outer.lora_B.any() and not inner.lora_B.any()  # B = 0: ΔW = 0 at the start
    torch.testing.assert_close(logits(base), logits(_moe_base(family)), **EXACT)


@pytest.mark.parametrize("family", FAMILIES)
def test_moe_factored_general_merged_unloaded_and_by_hand_all_agree(family):
    base, model, settings = lora_moe(family)
    expected = logits(merged_by_hand(base, model, settings))
    factored = logits(model)
    assert (factored - logits(base)).abs().max() > 1e-2  # the adapter does something
    torch.testing.assert_close(factored, expected, **EXACT)
    set_factored(model, False)  # W + ΔW in W's place
    torch.testing.assert_close(logits(model), expected, **EXACT)
    set_factored(model, True)
    plain = L.merge_and_unload(model)
    assert not list(L.lora_layers(plain))
    assert [type(m) for _, m in experts_modules(plain)] == [type(m) for _, m in experts_modules(base)]
    assert list(plain.state_dict()) == list(base.state_dict())
    torch.testing.assert_close(logits(plain), expected, **EXACT)
    L.merge_lora(model)
    torch.testing.assert_close(logits(model), expected, **EXACT)


def test_experts_run_in_experts_forward_factored_or_with_w_plus_delta_w(monkeypatch):
    _, model, _ = lora_moe("gpt_oss")
    calls, formed, weight_plus = [], [], L.LoRAParameter._weight_plus
    monkeypatch.setattr(L, "experts_forward", lambda *a, **k: calls.append(1) or experts_forward(*a, **k))
    monkeypatch.setattr(L.LoRAParameter, "_weight_plus", lambda *a, **k: pytest.fail("ΔW formed on the factored path"))
    logits(model).square().mean().backward()
    assert len(calls) == 2  # one per layer: both projections in one call
    set_factored(model, False)  # W + ΔW in W's place, still in experts_forward (not the module's own eager loop,
    monkeypatch.setattr(L.LoRAParameter, "_weight_plus",  # whose W[e] of W + ΔW writes a zero stack per expert)
                        lambda layer, *a, **k: formed.append(layer.parameter_name) or weight_plus(layer, *a, **k))
    logits(model)
    assert len(calls) == 4 and sorted(formed) == ["down_proj", "down_proj", "gate_up_proj", "gate_up_proj"]


@pytest.mark.parametrize("family", FAMILIES)
def test_moe_disabled_is_the_base_bit_for_bit(family):
    base, model, _ = lora_moe(family)
    expected = logits(base)
    for factored in (True, False):
        set_factored(model, factored)
        with L.lora_disabled(model):
            assert torch.equal(logits(model), expected)
    assert not torch.allclose(logits(model), expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_moe_training_step_trains_only_the_adapter(family):
    base = moe_base(family)
    model = copy.deepcopy(base)
    before = dict(model.named_parameters())
    L.add_lora(model, target_modules=[], target_parameters=projections(base), **SETTINGS)
    randomize(model, 1, scale=0.3)
    trained = {id(p) for p in lora_parameters(model)}
    assert {id(p) for p in model.parameters()} - trained == {id(p) for p in before.values()}  # the same objects
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    adapter_before = [p.detach().clone() for p in lora_parameters(model)]
    model.train()
    ids = tokens(seed=3)
    model(input_ids=ids, labels=ids).loss.backward()
    for p in model.parameters():
        if id(p) in trained:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0
        else:
            assert not p.requires_grad and p.grad is None
    optimizer.step()
    for name, p in before.items():  # frozen and bit-identical
        assert not p.requires_grad and torch.equal(p, base.get_parameter(name)), name
    assert all(not torch.equal(p, q) for p, q in zip(lora_parameters(model), adapter_before))


@pytest.mark.parametrize("family", FAMILIES)
def test_moe_merged_state_dict_is_merge_and_unloads_state_dict(family):
    base, model, _ = lora_moe(family)
    before = snapshot(model)
    state = L.merged_state_dict(model)
    assert_unchanged(model, before)  # nothing written into W
    plain = L.merge_and_unload(model).state_dict()
    assert list(state) == list(plain) == list(base.state_dict())
    for key, value in plain.items():
        assert torch.equal(state[key], value), key
    assert any(not torch.equal(state[k], v) for k, v in base.state_dict().items())


@pytest.mark.parametrize("family", FAMILIES)
def test_moe_merge_then_unmerge_restores_the_weights_and_outputs(family):
    base, model, settings = lora_moe(family)
    expected_merged = dict(merged_by_hand(base, model, settings).named_parameters())
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    y = logits(model)
    L.merge_lora(model)
    for name, layer in L.lora_layers(model):
        assert layer.merged
        key = f"{base_name(name)}.{layer.parameter_name}"
        torch.testing.assert_close(layer.weight, expected_merged[key], **EXACT)
    L.unmerge_lora(model)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, weights[name], rtol=0, atol=1e-14)  # float64: W restored up to rounding
    torch.testing.assert_close(logits(model), y, **EXACT)


@pytest.mark.parametrize("family", FAMILIES)
def test_moe_adapter_round_trips_into_a_fresh_model(family, tmp_path):
    base, model, settings = lora_moe(family)
    state = L.lora_state_dict(model)
    assert set(state) == {f"{n}.lora_{ab}" for n, _ in L.lora_layers(model) for ab in "AB"}
    L.save_adapter(model, tmp_path / "adapter.pt")
    for load in (lambda m: L.load_adapter(m, tmp_path / "adapter.pt"), lambda m: L.load_lora_state_dict(m, state)):
        fresh = L.add_lora(copy.deepcopy(base), target_modules=[], target_parameters=projections(base), **settings)
        assert not torch.allclose(logits(fresh), logits(model))
        load(fresh)
        assert torch.equal(logits(fresh), logits(model))


# --- PEFT's ParamWrapper: the same A and B compute the same ------------------------------------------------------


def to_peft(A, B):
    """(PEFT's lora_A.weight, lora_B.weight) for our A (E, r, in), B (E, out, r): A (E * r, in) expert-major,
    B (out, r * E) with column j * E + e for expert e's j-th rank (PEFT's reshape(out, r, E))."""
    E, r, _ = A.shape
    return A.detach().reshape(E * r, -1), B.detach().permute(1, 2, 0).reshape(-1, r * E)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "nemotron_h"])
def test_moe_equals_peft_target_parameters(family):
    peft = pytest.importorskip("peft")
    base, model, settings = lora_moe(family)
    config = peft.LoraConfig(r=settings["r"], lora_alpha=settings["alpha"], target_modules=[],
                             target_parameters=projections(base))
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    prefix = "base_model.model."
    theirs_keys = {k[len(prefix):].replace(".default.weight", "") for k in theirs.state_dict()}
    lora_keys = {k for k in theirs_keys if k.rsplit(".", 1)[-1] in ("lora_A", "lora_B")}
    assert set(L.lora_state_dict(model)) == lora_keys  # the same nesting: outer wrapper = last Parameter
    assert set(model.state_dict()) == lora_keys | set(base.state_dict())  # the base's keys where the base has them
    with torch.no_grad():
        for name, layer in L.lora_layers(model):
            peft_layer = theirs.base_model.model.get_submodule(name)
            assert peft_layer.parameter_name == layer.parameter_name
            a, b = to_peft(layer.lora_A, layer.lora_B)
            peft_layer.lora_A["default"].weight.copy_(a)
            peft_layer.lora_B["default"].weight.copy_(b)
    ids = tokens()
    ours_logits, theirs_logits = logits(model, ids), theirs(input_ids=ids).logits
    torch.testing.assert_close(ours_logits, theirs_logits, **EXACT)
    ours_logits.square().mean().backward()
    theirs_logits.square().mean().backward()
    for name, layer in L.lora_layers(model):
        peft_layer = theirs.base_model.model.get_submodule(name)
        grads = to_peft(layer.lora_A.grad, layer.lora_B.grad)
        torch.testing.assert_close(grads[0], peft_layer.lora_A["default"].weight.grad, **GRADS)
        torch.testing.assert_close(grads[1], peft_layer.lora_B["default"].weight.grad, **GRADS)


# --- transformers' experts implementations: both paths run each in experts_forward (with transformers' kernels) ----


@pytest.mark.parametrize("implementation", ["eager", "batched_mm", "grouped_mm"])
@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "nemotron_h", "deepseek_v3"])
def test_each_experts_implementation_gives_the_outputs_and_gradients_of_the_module_own_forward(family, implementation, monkeypatch):
    moe_integration = needs_experts()
    dtype = torch.float32 if implementation == "grouped_mm" else torch.float64  # grouped_mm on CPU: no float64
    base, model, settings = lora_moe(family)
    model.to(dtype)
    model.config._experts_implementation = implementation
    assert {m.config._experts_implementation for _, m in experts_modules(model)} == {implementation}
    calls = []
    if implementation != "eager":
        original = moe_integration.ALL_EXPERTS_FUNCTIONS[implementation]
        monkeypatch.setitem(moe_integration.ALL_EXPERTS_FUNCTIONS._local_mapping, implementation,
                            lambda *a, **k: calls.append(1) or original(*a, **k))
    results = {}
    for path in ("factored", "W + ΔW", "the module's own forward of W + ΔW"):  # the last: transformers', the oracle
        set_factored(model, path == "factored")
        n_calls = len(calls)
        with monkeypatch.context() as patch:
            if path.startswith("the module's"):
                patch.setattr(L, "_in_experts_forward", lambda module, name: False)
            y = logits(model)
            results[path] = y, torch.autograd.grad(y.square().mean(), lora_parameters(model))
        owners = len(experts_modules(model)) if path.startswith("the module's") and implementation != "eager" else 0
        assert len(calls) - n_calls == owners  # else experts_forward runs, never the module's own implementation
    y_o, g_o = results.pop("the module's own forward of W + ΔW")
    for y, g in results.values():
        if family == "nemotron_h" and implementation == "eager":  # its eager loop sums in the router's float32
            torch.testing.assert_close(y, y_o, rtol=1e-5, atol=1e-5)
            for a, b in zip(g, g_o):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
        elif dtype == torch.float64:
            torch.testing.assert_close(y, y_o, **EXACT)
            torch.testing.assert_close(y, logits(merged_by_hand(base, model, settings)), **EXACT)
            for a, b in zip(g, g_o):
                torch.testing.assert_close(a, b, **GRADS)
        else:
            torch.testing.assert_close(y, y_o, rtol=1e-4, atol=1e-4)
            for a, b in zip(g, g_o):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())
    g_f = results["factored"][1]
    assert all(g.abs().sum() > 0 for g in g_f)


# --- one experts module: plain math, gradients, dropout -------------------------------------------------------

SMALL = dict(hidden_size=6, experts_implementation="eager")  # gate_up (3, 8, 6), down (3, 6, 4): none square
EXPERT_KINDS = {  # kind: () -> a transformers experts module with 3 experts, hidden 6, intermediate 4
    "gated (Mixtral)": lambda: transformers.models.mixtral.modeling_mixtral.MixtralExperts(
        transformers.MixtralConfig(intermediate_size=4, num_local_experts=3, **SMALL)),
    "transposed, biased, interleaved gate (gpt-oss)": lambda: transformers.models.gpt_oss.modeling_gpt_oss.GptOssExperts(
        transformers.GptOssConfig(intermediate_size=4, num_local_experts=3, **SMALL)),
    "no gate (NemotronH)": lambda: transformers.models.nemotron_h.modeling_nemotron_h.NemotronHExperts(
        transformers.NemotronHConfig(moe_intermediate_size=4, n_routed_experts=3, **SMALL)),
}


class Holder(nn.Module):
    """A model around one experts module (add_lora adapts the modules inside a model)."""

    def __init__(self, experts):
        super().__init__()
        self.experts = experts

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return self.experts(hidden_states, top_k_index, top_k_weights)


def lora_experts(kind, seed=0, **settings):
    """(the plain experts module, random in float64; a Holder of a copy with LoRA on both projections, random
    A and B, in eval mode; the settings)."""
    needs_experts()
    torch.manual_seed(seed)
    plain = EXPERT_KINDS[kind]().to(torch.float64)
    with torch.no_grad():
        for p in plain.parameters():
            p.normal_(0, 0.5)
    plain.requires_grad_(False).eval()
    settings = {**SETTINGS, **settings}
    up = "gate_up_proj" if plain.has_gate else "up_proj"
    holder = L.add_lora(Holder(copy.deepcopy(plain)), target_modules=[], target_parameters=[up, "down_proj"], **settings)
    return plain, randomize(holder, seed + 1, scale=0.5).eval(), settings


def routing(tokens=5, top_k=2, n_experts=3, seed=0, dtype=torch.float64):
    """(hidden_states (T, 6), top_k_index (T, k): k distinct experts per token as a router's top-k picks,
    top_k_weights (T, k))."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, 6, generator=g, dtype=dtype)
    index = torch.randn(tokens, n_experts, generator=g).topk(top_k, dim=-1).indices
    weights = torch.randn(tokens, top_k, generator=g, dtype=dtype).softmax(-1)
    return x, index, weights


def deltas_by_hand(holder, settings):
    return {layer.parameter_name: delta_by_hand(layer, settings) for _, layer in L.lora_layers(holder)}


def experts_by_hand(experts, x, index, weights, deltas, masks=None):
    """Token by token, y_t = Σ_k w_tk down_e(gate(up_e(x_t))) with e = index[t, k]; each projection
    v W_e^T + b_e + (v * mask) ΔW_e^T (ΔW_e (out, in), masks: a known dropout of the LoRA branch's input).
    Only the activation and gate are the module's own (experts._apply_gate / act_fn)."""
    masks = masks or {}

    def project(name, e, v):
        W = getattr(experts, name)[e]
        W = W.T if experts.is_transposed else W  # transformers' flag: stored (in, out)
        y = v @ W.T + (getattr(experts, name + "_bias")[e] if experts.has_bias else 0)
        if name in deltas:
            y = y + (v * masks.get(name, 1)) @ deltas[name][e].T
        return y

    up = "gate_up_proj" if experts.has_gate else "up_proj"
    rows = []
    for t in range(x.shape[0]):
        y = 0
        for k in range(index.shape[1]):
            e = int(index[t, k])
            h = project(up, e, x[t])
            h = experts._apply_gate(h) if experts.has_gate else experts.act_fn(h)
            y = y + weights[t, k] * project("down_proj", e, h)
        rows.append(y)
    return torch.stack(rows)


@hypothesis_settings(max_examples=20, deadline=None)
@given(kind=st.sampled_from(list(EXPERT_KINDS)), r=st.integers(1, 4), alpha=st.floats(0.5, 8.0),
       use_rslora=st.booleans(), tokens=st.integers(1, 6), top_k=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_factored_experts_equal_the_plain_math(kind, r, alpha, use_rslora, tokens, top_k, seed):
    plain, holder, settings = lora_experts(kind, seed, r=r, alpha=alpha, use_rslora=use_rslora)
    x, index, weights = routing(tokens, top_k, seed=seed)  # some experts get no token, some several
    expected = experts_by_hand(plain, x, index, weights, deltas_by_hand(holder, settings))
    torch.testing.assert_close(holder(x, index, weights), expected, **EXACT)
    set_factored(holder, False)
    torch.testing.assert_close(holder(x, index, weights), expected, **EXACT)
    with L.lora_disabled(holder):
        assert torch.equal(holder(x, index, weights), plain(x, index, weights))


@pytest.mark.parametrize("kind", EXPERT_KINDS)
def test_one_wrapper_disabled_or_merged_leaves_the_other_adapting(kind):
    plain, holder, settings = lora_experts(kind)
    x, index, weights = routing(tokens=6)
    deltas = deltas_by_hand(holder, settings)
    outer, inner = holder.experts, holder.experts.base_layer
    for outer.factored, inner.factored in itertools.product((True, False), repeat=2):  # mixed: one call, ΔW and B A
        torch.testing.assert_close(holder(x, index, weights), experts_by_hand(plain, x, index, weights, deltas),
                                   **EXACT)
        for layer, other in ((inner, outer), (outer, inner)):
            layer.enabled = False  # only the other projection's ΔW
            expected = experts_by_hand(plain, x, index, weights, {other.parameter_name: deltas[other.parameter_name]})
            torch.testing.assert_close(holder(x, index, weights), expected, **EXACT)
            layer.enabled = True
            layer.merge()  # its ΔW now in W: the same output as unmerged
            torch.testing.assert_close(holder(x, index, weights), experts_by_hand(plain, x, index, weights, deltas),
                                       **EXACT)
            layer.unmerge()


LORA_SETTINGS = [dict(r=2, alpha=3.0), dict(r=3, alpha=2.0, use_rslora=True)]  # scale 1.5, 2 / sqrt(3)


def as_function(holder, index):
    """(lora_A, lora_B, ... of every LoRA layer, hidden_states, top_k_weights) -> the output, by functional_call."""
    names = [n for n, p in holder.named_parameters() if p.requires_grad]

    def f(*tensors):
        *adapter, x, weights = tensors
        return torch.func.functional_call(holder, dict(zip(names, adapter)), (x, index, weights))

    return f, [p.detach().clone() for n, p in holder.named_parameters() if p.requires_grad]


@pytest.mark.parametrize("settings", LORA_SETTINGS, ids=["alpha 3 r 2", "rslora"])
@pytest.mark.parametrize("kind", EXPERT_KINDS)
def test_factored_experts_pass_gradcheck_and_gradgradcheck(kind, settings, monkeypatch):
    _, holder, _ = lora_experts(kind, **settings)
    calls = []
    monkeypatch.setattr(L, "experts_forward", lambda *a, **k: calls.append(1) or experts_forward(*a, **k))
    x, index, weights = routing(tokens=4)
    f, adapter = as_function(holder, index)
    inputs = [t.requires_grad_() for t in adapter + [x, weights]]  # also the routing weights: the router trains
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)
    assert calls  # the factored forward is what was checked


@pytest.mark.parametrize("settings", LORA_SETTINGS, ids=["alpha 3 r 2", "rslora"])
@pytest.mark.parametrize("kind", EXPERT_KINDS)
def test_factored_and_general_gradients_are_equal(kind, settings):
    plain, holder, settings = lora_experts(kind, **settings)
    x, index, weights = routing(tokens=6, seed=3)
    wrt = lora_parameters(holder) + [x.requires_grad_(), weights.requires_grad_()]
    g = torch.randn(6, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    grads = {}
    for factored in (True, False):
        set_factored(holder, factored)
        grads[factored] = torch.autograd.grad((holder(x, index, weights) * g).sum(), wrt)
    deltas = {n: d.requires_grad_() for n, d in deltas_by_hand(holder, settings).items()}
    expected_x = torch.autograd.grad((experts_by_hand(plain, x, index, weights, deltas) * g).sum(), [x, weights])
    for a, b in zip(grads[True], grads[False]):
        torch.testing.assert_close(a, b, **GRADS)
    for a, b in zip(grads[True][-2:], expected_x):
        torch.testing.assert_close(a, b, **GRADS)


class FixedMask(nn.Module):
    """A dropout whose mask is known: each input feature kept (times 2) or dropped, the same for every row."""

    def __init__(self, mask):
        super().__init__()
        self.mask, self.calls = mask, 0

    def forward(self, x):
        self.calls += 1
        return x * self.mask


@pytest.mark.parametrize("kind", EXPERT_KINDS)
def test_factored_dropout_drops_the_input_of_each_lora_branch_only(kind):
    plain, holder, settings = lora_experts(kind, dropout=0.5)
    g = torch.Generator().manual_seed(5)
    masks = {}
    for _, layer in L.lora_layers(holder):
        assert isinstance(layer.lora_dropout, nn.Dropout) and layer.lora_dropout.p == 0.5
        masks[layer.parameter_name] = (torch.rand(layer.lora_A.shape[-1], generator=g) < 0.5).double() * 2
        layer.lora_dropout = FixedMask(masks[layer.parameter_name])
    x, index, weights = routing(tokens=6)
    expected = experts_by_hand(plain, x, index, weights, deltas_by_hand(holder, settings), masks)
    torch.testing.assert_close(holder.train()(x, index, weights), expected, **EXACT)
    assert [layer.lora_dropout.calls for _, layer in L.lora_layers(holder)] == [1, 1]  # once per projection


@pytest.mark.parametrize("kind", EXPERT_KINDS)
def test_factored_dropout_trains_and_is_off_in_eval_mode(kind):
    plain, holder, settings = lora_experts(kind, dropout=0.5)
    x, index, weights = routing(tokens=6)
    expected = experts_by_hand(plain, x, index, weights, deltas_by_hand(holder, settings))
    torch.testing.assert_close(holder.eval()(x, index, weights), expected, **EXACT)
    holder.train()
    torch.manual_seed(0)
    y = holder(x, index, weights)
    torch.manual_seed(0)
    assert torch.equal(holder(x, index, weights), y)  # one seed, one mask
    assert not torch.allclose(y, expected)
    y.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
               for p in lora_parameters(holder))


@pytest.mark.parametrize("kind", EXPERT_KINDS)
def test_the_general_path_with_dropout_raises_in_training_and_runs_in_eval(kind):
    plain, holder, settings = lora_experts(kind, dropout=0.5)
    x, index, weights = routing()
    outer, inner = holder.experts, holder.experts.base_layer
    for formed in (outer, inner):  # the inner one runs inside the outer one's call too
        set_factored(holder, True)
        formed.factored = False
        with pytest.raises(RuntimeError, match=rf"^dropout=0\.5 on {formed.parameter_name}, which runs as W \+ ΔW "
                                               r"here: set layer\.factored = True"):
            holder.train()(x, index, weights)
    set_factored(holder, False)
    expected = experts_by_hand(plain, x, index, weights, deltas_by_hand(holder, settings))
    torch.testing.assert_close(holder.eval()(x, index, weights), expected, **EXACT)


@pytest.mark.parametrize("factored", [True, False])
def test_training_with_one_projection_merged_raises_as_a_merged_layer_does(factored):
    """The inner LoRAParameter's own forward (and its guard) does not run inside the outer one's experts_forward."""
    plain, holder, settings = lora_experts("gated (Mixtral)")
    set_factored(holder, factored)
    inner = holder.experts.base_layer
    inner.merge()
    x, index, weights = routing()
    expected = experts_by_hand(plain, x, index, weights, deltas_by_hand(holder, settings))
    holder.train()
    for frozen in (None, inner.lora_A):  # training B alone (LoRA-FA) is training too
        if frozen is not None:
            frozen.requires_grad_(False)
        with pytest.raises(RuntimeError, match=rf"^{inner.parameter_name} is merged, so it gets no gradient"):
            holder(x, index, weights)
    with torch.no_grad():
        torch.testing.assert_close(holder(x, index, weights), expected, **EXACT)
    torch.testing.assert_close(holder.eval()(x, index, weights), expected, **EXACT)
    inner.lora_B.requires_grad_(False)  # a frozen adapter in train mode trains nothing: it runs
    torch.testing.assert_close(holder.train()(x, index, weights), expected, **EXACT)


def test_expert_parallel_experts_run_the_general_path(monkeypatch):
    plain, holder, settings = lora_experts("gated (Mixtral)")
    holder.experts.inner._is_expert_parallel = True  # transformers' sentinel routing: experts_forward does not do it
    monkeypatch.setattr(L, "experts_forward", lambda *a, **k: pytest.fail("factored under expert parallelism"))
    x, index, weights = routing()
    expected = experts_by_hand(plain, x, index, weights, deltas_by_hand(holder, settings))
    torch.testing.assert_close(holder(x, index, weights), expected, **EXACT)
    _, holder, _ = lora_experts("gated (Mixtral)", dropout=0.5)
    holder.experts.inner._is_expert_parallel = True  # W + ΔW there: no dropout, though the layers are factored
    with pytest.raises(RuntimeError, match=r"^dropout=0\.5 on down_proj, which runs as W \+ ΔW here"):
        holder.train()(x, index, weights)


# --- a bare Parameter of any module ----------------------------------------------------------------------------


class Projection(nn.Module):
    """Bare Parameters, no nn.Linear: y = tanh(x w^T + b) v^T, w (hidden, in), b (hidden,), v (out, hidden)."""

    def __init__(self, in_f=5, hidden=4, out_f=3, dtype=torch.float64):
        super().__init__()
        self.w = nn.Parameter(torch.randn(hidden, in_f, dtype=dtype))
        self.b = nn.Parameter(torch.randn(hidden, dtype=dtype))
        self.v = nn.Parameter(torch.randn(out_f, hidden, dtype=dtype))

    def forward(self, x):
        return torch.tanh(x @ self.w.T + self.b) @ self.v.T


def projection_by_hand(base, x, deltas):
    w, v = base.w + deltas.get("w", 0), base.v + deltas.get("v", 0)
    return torch.tanh(x @ w.T + base.b) @ v.T


@hypothesis_settings(max_examples=25, deadline=None)
@given(in_f=st.integers(1, 6), hidden=st.integers(1, 6), out_f=st.integers(1, 6), r=st.integers(1, 4),
       alpha=st.floats(0.5, 8.0), use_rslora=st.booleans(),
       targets=st.sampled_from([["w"], ["v"], ["w", "v"], ["0.v", "0.w"]]),
       batch=st.lists(st.integers(1, 3), max_size=2), seed=st.integers(0, 2**16))
def test_a_bare_weight_computes_the_plain_math_merges_and_unloads(in_f, hidden, out_f, r, alpha, use_rslora, targets,
                                                                  batch, seed):
    torch.manual_seed(seed)
    base = nn.Sequential(Projection(in_f, hidden, out_f)).eval().requires_grad_(False)
    settings = dict(r=r, alpha=alpha, use_rslora=use_rslora)
    model = randomize(L.add_lora(copy.deepcopy(base), target_modules=[], target_parameters=targets, **settings), seed)
    x = torch.randn(*batch, in_f, dtype=torch.float64)
    deltas = deltas_by_hand(model, settings)
    assert set(deltas) == {t.rsplit(".", 1)[-1] for t in targets}
    expected = projection_by_hand(base[0], x, deltas)
    torch.testing.assert_close(model(x), expected, **EXACT)
    with L.lora_disabled(model):
        assert torch.equal(model(x), base(x))
    plain = L.merge_and_unload(model)
    assert type(plain[0]) is Projection and list(plain.state_dict()) == list(base.state_dict())
    torch.testing.assert_close(plain(x), expected, **EXACT)
    torch.testing.assert_close(L.merged_state_dict(model)["0.w"], base[0].w + deltas.get("w", 0), **EXACT)
    unloaded = L.unload(model)
    assert type(unloaded[0]) is Projection and torch.equal(unloaded(x), base(x))
    L.merge_lora(model)
    torch.testing.assert_close(model(x), expected, **EXACT)
    L.unmerge_lora(model)
    torch.testing.assert_close(model[0].inner.w, base[0].w, rtol=0, atol=1e-13)


def test_parameters_of_one_module_nest_in_the_modules_own_order():
    for order in (["w", "v"], ["v", "w"]):
        torch.manual_seed(0)
        model = nn.Sequential(Projection())
        owner = model[0]
        L.add_lora(model, r=2, target_modules=[], target_parameters=order)
        outer = model[0]
        assert isinstance(outer, L.LoRAParameter) and outer.parameter_name == "v"  # v comes after w in Projection
        assert isinstance(outer.base_layer, L.LoRAParameter) and outer.base_layer.parameter_name == "w"
        assert outer.base_layer.base_layer is owner and outer.inner is owner
        assert outer.lora_A.shape == (2, 4) and outer.lora_B.shape == (3, 2)
        assert outer.base_layer.lora_A.shape == (2, 5) and outer.base_layer.lora_B.shape == (4, 2)
        # LoRA's keys nest as the modules do (as PEFT's); the module's own keep their names, in its order
        assert list(model.state_dict()) == ["0.lora_A", "0.lora_B", "0.base_layer.lora_A", "0.base_layer.lora_B",
                                            "0.w", "0.b", "0.v"]


def test_a_target_parameter_name_is_a_full_name_or_its_dotted_end():
    def adapted(targets):
        torch.manual_seed(0)
        return lora_names(L.add_lora(nn.Sequential(Projection(), Projection()), r=2, target_modules=[],
                                     target_parameters=targets))
    assert adapted(["w"]) == ["0", "1"]
    assert adapted(["1.w"]) == ["1"]
    assert adapted(["0.v", "1.w"]) == ["0", "1"]


def test_only_the_adapter_of_a_bare_weight_trains():
    torch.manual_seed(0)
    model = nn.Sequential(Projection())
    params = list(model.parameters())
    L.add_lora(model, r=2, target_modules=[], target_parameters=["w", "v"])
    randomize(model)
    model(torch.randn(4, 5, dtype=torch.float64)).square().sum().backward()
    assert all(p.grad is None and not p.requires_grad for p in params)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_parameters(model))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_general_path_on_a_half_precision_parameter_forms_w_plus_delta_w_in_float32_and_rounds_once(dtype):
    """As merge() does: W + ΔW in float32, then W's dtype, bit for bit. ΔW rounded first would round twice."""
    torch.manual_seed(0)
    base = nn.Sequential(Projection(in_f=16, hidden=16, out_f=3, dtype=dtype)).eval().requires_grad_(False)
    model = randomize(L.add_lora(copy.deepcopy(base), r=4, alpha=3.0, target_modules=[], target_parameters=["w"]), 1)
    layer = model[0]
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32  # the adapter of a half-precision base
    delta = layer.lora_B.detach() @ layer.lora_A.detach() * 0.75
    w = (base[0].w.float() + delta).to(dtype)
    assert not torch.equal(w, base[0].w + delta.to(dtype))  # rounding twice differs here: the test can fail
    x = torch.randn(5, 16, dtype=dtype)
    assert torch.equal(model(x), torch.tanh(x @ w.T + base[0].b) @ base[0].v.T)


# --- nn.MultiheadAttention named in target_modules: in_proj_weight and out_proj ------------------------------


def lora_mha(batch_first, seed=0, **settings):
    """(base: Sequential(MultiheadAttention(8, 2)) in float64, eval, frozen, nonzero biases; a copy with LoRA on
    it (random A, B); the settings)."""
    torch.manual_seed(seed)
    base = nn.Sequential(nn.MultiheadAttention(8, 2, batch_first=batch_first)).double().eval().requires_grad_(False)
    with torch.no_grad():  # torch starts both biases at 0: a lost bias would not show
        base[0].in_proj_bias.normal_()
        base[0].out_proj.bias.normal_()
    settings = {"r": 2, "alpha": 3.0, **settings}
    return base, randomize(L.add_lora(copy.deepcopy(base), target_modules=["0"], **settings), seed + 1, 0.5), settings


def mha_by_hand(mha, d_in, d_out, query, key, value, **kwargs):
    """torch's F.multi_head_attention_forward with W_in + ΔW_in and W_out + ΔW_out: (output, weights)."""
    if mha.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    out, weights = F.multi_head_attention_forward(
        query, key, value, mha.embed_dim, mha.num_heads, mha.in_proj_weight + d_in, mha.in_proj_bias, mha.bias_k,
        mha.bias_v, mha.add_zero_attn, 0.0, mha.out_proj.weight + d_out, mha.out_proj.bias, training=False, **kwargs)
    return (out.transpose(0, 1) if mha.batch_first else out), weights


def mha_deltas(model, settings, name="0"):
    layers = dict(L.lora_layers(model))
    return delta_by_hand(layers[name], settings), delta_by_hand(layers[f"{name}.base_layer.out_proj"], settings)


def qkv(batch_first, length=5, source=7, seed=2):
    g = torch.Generator().manual_seed(seed)
    shape = (lambda n: (3, n, 8)) if batch_first else (lambda n: (n, 3, 8))
    return (torch.randn(shape(length), generator=g, dtype=torch.float64),
            torch.randn(shape(source), generator=g, dtype=torch.float64),
            torch.randn(shape(source), generator=g, dtype=torch.float64))


@pytest.mark.parametrize("batch_first", [True, False])
def test_naming_a_multihead_attention_adapts_its_in_proj_and_its_out_proj(batch_first):
    torch.manual_seed(0)
    model = nn.Sequential(nn.MultiheadAttention(8, 2, batch_first=batch_first))
    mha, out_proj = model[0], model[0].out_proj
    L.add_lora(model, r=2, target_modules=["0"])
    assert lora_names(model) == ["0", "0.base_layer.out_proj"]
    wrapper = model[0]
    assert isinstance(wrapper, L.LoRAParameter) and wrapper.parameter_name == "in_proj_weight"
    assert wrapper.base_layer is mha and not wrapper.factored
    assert isinstance(mha.out_proj, L.LoRALinear) and mha.out_proj.weight is out_proj.weight
    assert wrapper.lora_A.shape == (2, 8) and wrapper.lora_B.shape == (24, 2)
    assert wrapper.batch_first is batch_first and wrapper.embed_dim == 8  # read through to the module


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_equals_torchs_attention_with_both_updates(batch_first):
    base, model, settings = lora_mha(batch_first)
    d_in, d_out = mha_deltas(model, settings)
    q, k, v = qkv(batch_first)
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask[0, 4:] = True
    for args, kwargs in [((q, q, q), {}), ((q, k, v), dict(key_padding_mask=mask)),
                         ((q, k, v), dict(need_weights=True, average_attn_weights=False))]:
        expected = mha_by_hand(base[0], d_in, d_out, *args, **kwargs)
        got = model[0](*args, **kwargs)
        torch.testing.assert_close(got[0], expected[0], **EXACT)
        torch.testing.assert_close(got[1], expected[1], **EXACT)
        assert not torch.allclose(got[0], base[0](*args, **kwargs)[0])
    with torch.no_grad():  # eval + no_grad: torch's fast path, which reads the weights itself
        got = model[0](q, q, q, need_weights=False)[0]
    torch.testing.assert_close(got, mha_by_hand(base[0], d_in, d_out, q, q, q)[0], **EXACT)


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_disabled_merged_and_unloaded(batch_first):
    base, model, _ = lora_mha(batch_first)
    q, k, v = qkv(batch_first)
    y = model[0](q, k, v)
    with L.lora_disabled(model):
        for got, expected in zip(model[0](q, k, v), base[0](q, k, v)):
            assert torch.equal(got, expected)
    state = L.merged_state_dict(model)
    plain = L.merge_and_unload(model)
    assert type(plain[0]) is nn.MultiheadAttention and not list(L.lora_layers(plain))
    assert list(plain.state_dict()) == list(state) == list(base.state_dict())
    assert all(torch.equal(state[key], value) for key, value in plain.state_dict().items())
    for got, expected in zip(plain[0](q, k, v), y):
        torch.testing.assert_close(got, expected, **EXACT)
    L.merge_lora(model)
    for got, expected in zip(model[0](q, k, v), y):
        torch.testing.assert_close(got, expected, **EXACT)
    L.unmerge_lora(model)
    for got, expected in zip(model[0](q, k, v), y):
        torch.testing.assert_close(got, expected, **EXACT)


def test_multihead_attention_trains_both_adapters_and_nothing_else():
    _, model, _ = lora_mha(True)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert len(frozen) == 4  # in_proj_weight, in_proj_bias, out_proj.weight, out_proj.bias
    q, k, v = qkv(True)
    model.train()[0](q, k, v)[0].square().sum().backward()
    assert all(p.grad is None for p in frozen)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_parameters(model))


def tiny_vit():
    from torchvision.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    vit = VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64,
                            num_classes=5).double().eval().requires_grad_(False)
    nn.init.normal_(vit.heads.head.weight)  # torchvision starts the head at zero: every output would be 0
    return vit


def test_torchvision_vit_self_attention_is_adapted_in_both_projections():
    pytest.importorskip("torchvision")
    base = tiny_vit()
    settings = dict(r=2, alpha=4.0)
    model = randomize(L.add_lora(copy.deepcopy(base), target_modules=["self_attention"], **settings), 1, scale=0.5)
    name = "encoder.layers.encoder_layer_0.self_attention"
    assert lora_names(model) == [name, f"{name}.base_layer.out_proj"]
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = merged_by_hand(base, model, settings)(images)
    y = model(images)
    assert not torch.allclose(y, base(images))
    torch.testing.assert_close(y, expected, **EXACT)
    with torch.no_grad():
        torch.testing.assert_close(model(images), expected, **EXACT)
    with L.lora_disabled(model):
        assert torch.equal(model(images), base(images))
    torch.testing.assert_close(L.merge_and_unload(model)(images), expected, **EXACT)


def test_transformer_encoder_layer_keeps_lora_in_eval_mode_under_no_grad():
    torch.manual_seed(0)
    base = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True).eval()
    base.requires_grad_(False)
    settings = dict(r=2, alpha=3.0)
    with pytest.warns(UserWarning, match=r"TransformerEncoderLayer's forward reads the weight of \['self_attn', 'self_attn.out_proj'\]"):
        model = L.add_lora(copy.deepcopy(base), target_modules=["self_attn"], **settings)
    randomize(model, 1)
    assert lora_names(model) == ["self_attn", "self_attn.base_layer.out_proj"]
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))
    expected_model = merged_by_hand(base, model, settings)
    expected = expected_model.requires_grad_(True)(x).detach()  # weights that require grad: not the fast path
    with torch.no_grad():  # eval + no_grad: torch's fast path would read in_proj_weight and out_proj.weight itself
        torch.testing.assert_close(model(x), expected, **TOL32)
        assert not torch.allclose(base(x), expected, **TOL32)
    torch.testing.assert_close(model(x), expected, **TOL32)


def test_by_default_a_multihead_attentions_out_proj_is_still_skipped_with_a_warning():
    model = nn.Sequential(nn.MultiheadAttention(8, 2), nn.Linear(8, 8))
    with pytest.warns(UserWarning, match=r"skipping '0\.out_proj': its parent MultiheadAttention reads its weight"):
        L.add_lora(model)
    assert lora_names(model) == ["1"]
    assert type(model[0]) is nn.MultiheadAttention


# --- refusals: each names the problem and changes nothing ------------------------------------------------------


class IntWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.zeros(3, 4, dtype=torch.long), requires_grad=False)
        self.w = nn.Parameter(torch.randn(3, 4))


def with_backward_hook():
    model = nn.Sequential(Projection())
    model[0].register_full_backward_hook(lambda m, gi, go: None)
    return model


def with_forward_pre_hook():
    model = nn.Sequential(Projection())
    model[0].register_forward_pre_hook(lambda m, args: (args[0] * 2,))
    return model


def block():
    return nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Conv2d(2, 2, 3)))


def adapted_projection():
    return L.add_lora(nn.Sequential(Projection()), r=2, target_modules=[], target_parameters=["w"])


def gpt_oss_experts():
    """A Holder of one gpt-oss experts module, random (transformers starts it as torch.empty)."""
    needs_experts()
    torch.manual_seed(0)
    experts = EXPERT_KINDS["transposed, biased, interleaved gate (gpt-oss)"]().to(torch.float64)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, 0.5)
    return Holder(experts)


class Owner(nn.Module):
    """A Parameter w that forward and a second method, project, both read: x w^T."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 4, dtype=torch.float64))

    def forward(self, x):
        return x @ self.w.T

    def project(self, x):
        return x @ self.w.T


class CallsAMethod(nn.Module):
    """Calls its child's project, never the child: a wrapper around the child would never run."""

    def __init__(self):
        super().__init__()
        self.o = Owner()

    def forward(self, x):
        return self.o.project(x)


REFUSALS = [  # (rule, () -> model, model -> the refused call, error, a regex of its message)
    ("a name that matches no Parameter is refused, listing those that LoRA can adapt",
     lambda: nn.Sequential(Projection()), lambda m: L.add_lora(m, target_modules=[], target_parameters=["u"]),
     ValueError, r"^target_parameters \['u'\] match no Parameter in the model; .*named \(at their end\): \['v', 'w'\]$"),
    ("a misspelt name gets a hint", lambda: nn.Sequential(Projection()),
     lambda m: L.add_lora(m, target_modules=[], target_parameters=["0.vv"]), ValueError,
     r"did you mean \['v'.*\] for '0\.vv'\?"),
    ("a 1-D Parameter (a bias) is refused", lambda: nn.Sequential(Projection()),
     lambda m: L.add_lora(m, target_modules=[], target_parameters=["b"]), ValueError,
     r"^cannot add LoRA to '0\.b': .*its shape \(4,\) is no weight \(out, in\) nor stack \(E, out, in\)$"),
    ("a LayerNorm's weight is refused", block,
     lambda m: L.add_lora(m, target_modules=[], target_parameters=["0.1.weight"]), ValueError,
     r"^cannot add LoRA to '0\.1\.weight': .*its shape \(4,\) is no weight"),
    ("a convolution's 4-D weight is refused", block,
     lambda m: L.add_lora(m, target_modules=[], target_parameters=["0.2.weight"]), ValueError,
     r"^cannot add LoRA to '0\.2\.weight': .*its shape \(2, 2, 3, 3\) is no weight"),
    ("a non-floating Parameter is refused", lambda: nn.Sequential(IntWeight()),
     lambda m: L.add_lora(m, target_modules=[], target_parameters=["table"]), ValueError,
     r"^cannot add LoRA to '0\.table': .*needs a float16 / bfloat16 / float32 / float64 weight, got torch\.int64"),
    ("a Parameter that a LoRA layer from target_modules adapts is refused", block,
     lambda m: L.add_lora(m, target_modules=["0.0"], target_parameters=["0.0.weight"]), ValueError,
     r"^cannot add LoRA to '0\.0\.weight': a LoRA layer from target_modules holds it too, as \['0\.0\.weight'\]$"),
    ("a MultiheadAttention with kdim != embed_dim is refused",
     lambda: nn.Sequential(nn.MultiheadAttention(8, 2, kdim=4, vdim=4)),
     lambda m: L.add_lora(m, target_modules=["0"]), ValueError,
     r"^cannot add LoRA to .0.: it is a MultiheadAttention with kdim / vdim: name its q_proj_weight, \.\.\. in target_parameters$"),
    ("a rank of zero is refused", lambda: nn.Sequential(Projection()),
     lambda m: L.add_lora(m, r=0, target_modules=[], target_parameters=["w"]), ValueError,
     r"^cannot add LoRA to '0\.w': r \(the LoRA rank\) must be a positive int, got 0$"),
    ("a fractional rank is refused", lambda: nn.Sequential(Projection()),
     lambda m: L.add_lora(m, r=1.5, target_modules=[], target_parameters=["w"]), ValueError,
     r"^cannot add LoRA to '0\.w': r \(the LoRA rank\) must be a positive int, got 1\.5$"),
    ("dropout on a Parameter that runs as W + ΔW is refused by name", lambda: nn.Sequential(Projection()),
     lambda m: L.add_lora(m, dropout=0.1, target_modules=[], target_parameters=["w"]), ValueError,
     r"^cannot add LoRA to '0\.w': .*dropout=0\.1: its module runs with W \+ ΔW \(only transformers' experts' projections"),
    ("dropout on a MultiheadAttention is refused by name", lambda: nn.Sequential(nn.MultiheadAttention(8, 2)),
     lambda m: L.add_lora(m, dropout=0.1, target_modules=["0"]), ValueError,
     r"^cannot add LoRA to '0\.in_proj_weight': .*dropout=0\.1: its module runs with W \+ ΔW"),
    ("a module with a hook that wrapping it would drop is refused", with_backward_hook,
     lambda m: L.add_lora(m, target_modules=[], target_parameters=["w"]), ValueError,
     r"^cannot add LoRA to '0\.w': its module has hooks \(_backward_hooks\)$"),
    ("a module with a forward pre-hook is refused (the factored path would skip it, W + ΔW run it twice)",
     with_forward_pre_hook, lambda m: L.add_lora(m, target_modules=[], target_parameters=["w"]), ValueError,
     r"^cannot add LoRA to '0\.w': its module has hooks \(_forward_pre_hooks\)$"),
    ("names that are not strings are refused", lambda: nn.Sequential(Projection()),
     lambda m: L.add_lora(m, target_modules=[], target_parameters=[3]), ValueError,
     r"^target_parameters must be None, a module name or a list of names, got \[3\]$"),
    ("a Parameter of the model itself is refused (its wrapper would be the model's own child)", Projection,
     lambda m: L.add_lora(m, r=2, target_modules=[], target_parameters=["w"]), ValueError,
     r"^cannot add LoRA to 'w': it is the model's own, and add_lora wraps submodules"),
    ("a model with LoRA gets no second adapter", adapted_projection,
     lambda m: L.add_lora(m, target_modules=[], target_parameters=["v"]), ValueError,
     r"^model already has LoRA layers; lora_min does not stack adapters"),
    ("dropout on an experts Parameter that is no projection is refused by name (it runs as W + ΔW)", gpt_oss_experts,
     lambda m: L.add_lora(m, dropout=0.1, target_modules=[], target_parameters=["gate_up_proj", "down_proj_bias"]),
     ValueError, r"^cannot add LoRA to 'experts\.down_proj_bias': .*dropout=0\.1: its module runs with W \+ ΔW"),
    ("a parent that calls a method of the module, never the module, is refused (its LoRA would never run)",
     CallsAMethod, lambda m: L.add_lora(m, r=2, target_modules=[], target_parameters=["w"]), ValueError,
     r"^cannot add LoRA to \['o\.w'\]: the module's parent 'CallsAMethod' reads them directly and never calls it$"),
]


@pytest.mark.parametrize("rule, make, call, error, match", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_a_refused_target_parameter_names_the_problem_and_changes_nothing(rule, make, call, error, match):
    torch.manual_seed(0)
    model = make()
    before = snapshot(model)
    with pytest.raises(error, match=match):
        call(model)
    assert_unchanged(model, before)


def test_each_refusal_pattern_matches_only_its_own_message():
    messages = {}
    for rule, make, call, error, _ in REFUSALS:
        with pytest.raises(error) as raised:
            call(make())
        messages[rule] = str(raised.value)
    for rule, _, _, _, match in REFUSALS:
        assert [r for r, message in messages.items() if re.search(match, message)] == [rule]


def test_an_adapter_file_for_another_parameter_of_the_same_shape_is_refused(tmp_path):
    """The file records which Parameter each LoRAParameter adapts: keys and shapes alone would load w's into v."""
    torch.manual_seed(0)
    base = nn.Sequential(Projection(in_f=4, hidden=4, out_f=4)).requires_grad_(False)  # w and v: both (4, 4)
    source = randomize(L.add_lora(copy.deepcopy(base), r=2, target_modules=[], target_parameters=["w"]), 1)
    L.save_adapter(source, tmp_path / "w.pt")
    model = L.add_lora(copy.deepcopy(base), r=2, target_modules=[], target_parameters=["v"])
    assert {k: v.shape for k, v in L.lora_state_dict(model).items()} == {
        k: v.shape for k, v in L.lora_state_dict(source).items()}
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"w\.pt do not match the model's LoRA layers: "
                                         r"'0': file \{.*'parameter': 'w'\} vs model \{.*'parameter': 'v'\}$"):
        L.load_adapter(model, tmp_path / "w.pt")
    assert_unchanged(model, before)


# --- bugs found by this file, fixed: each test failed before its fix ---------------------------------------


def test_lora_on_another_experts_parameter_runs_as_w_plus_delta_w():
    # gpt-oss's 2-D gate_up_proj_bias (E, 2I) is a weight to LoRA (as to PEFT); experts_forward factors only the
    # projections, so a chain holding any other Parameter runs the general path, also for the projections in it
    base = moe_base("gpt_oss")
    model = L.add_lora(copy.deepcopy(base), target_modules=[], target_parameters=["gate_up_proj_bias", "down_proj"], r=2)
    randomize(model, 1, scale=0.3)
    assert sorted(layer.factored for _, layer in L.lora_layers(model)) == [False, False, True, True]  # 2 layers
    adapted = logits(model)
    set_factored(model, False)
    torch.testing.assert_close(adapted, logits(model), **EXACT)
    assert not torch.allclose(adapted, logits(base))
    torch.testing.assert_close(logits(L.merge_and_unload(model)), adapted, **EXACT)


def test_a_target_parameter_that_its_parent_reads_directly_is_refused_and_nothing_changes():
    # MultiheadAttention reads out_proj.weight itself and never calls out_proj: a wrapper there would never run
    base = nn.Sequential(nn.MultiheadAttention(8, 2, batch_first=True))
    before = snapshot(base)
    with pytest.raises(ValueError, match=r"^cannot add LoRA to \['0\.out_proj\.weight'\]: the module's parent '0' "
                                         r"reads them directly and never calls it$"):
        L.add_lora(base, r=2, target_modules=[], target_parameters=["0.out_proj.weight"])
    assert_unchanged(base, before)


def test_a_wrapped_parameters_module_keeps_its_bias_for_a_parent_that_reads_it():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 3))
    model = L.add_lora(copy.deepcopy(base), r=2, target_modules=[], target_parameters=["0.weight"])
    assert model[0].bias is model[0].base_layer.bias and torch.equal(model[0].bias, base[0].bias)
    randomize(model, 1)
    x = torch.randn(5, 4)
    layer = model[0]
    torch.testing.assert_close(model(x), x @ (base[0].weight + layer.lora_B @ layer.lora_A).T + base[0].bias, **TOL32)


@pytest.mark.parametrize("targets", [None, ["self_attn"]], ids=["default", "self_attn"])
def test_transformer_encoder_runs_with_a_padding_mask_in_eval_mode(targets):
    torch.manual_seed(0)
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True), 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        L.add_lora(model, r=2, target_modules=targets)
    randomize(model, 1)
    x, mask = torch.randn(2, 5, 8), torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 3:] = True
    expected = model.train()(x, src_key_padding_mask=mask)  # dropout 0: train mode computes the same, unfused
    y = model.eval()(x, src_key_padding_mask=mask)
    y = y.to_padded_tensor(0.0) if y.is_nested else y
    torch.testing.assert_close(y[1], expected[1], **TOL32)
    torch.testing.assert_close(y[0, :3], expected[0, :3], **TOL32)


def test_lora_on_in_proj_weight_alone_runs_in_a_transformer_encoder_layer_in_eval_mode():
    torch.manual_seed(0)
    base = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True).eval()
    base.requires_grad_(False)
    settings = dict(r=2, alpha=2.0)
    model = randomize(L.add_lora(copy.deepcopy(base), target_modules=[], target_parameters=["self_attn.in_proj_weight"],
                                 **settings), 1)
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))
    expected = merged_by_hand(base, model, settings).requires_grad_(True)(x).detach()  # not the fast path
    torch.testing.assert_close(model(x), expected, **TOL32)


def test_merged_state_dict_keeps_a_module_really_named_base_layer():
    torch.manual_seed(0)
    model = nn.Module()
    model.base_layer, model.p = nn.Linear(3, 3), Projection(3, 4, 2)
    L.add_lora(model, r=2, target_modules=[], target_parameters=["p.w"])
    assert list(L.merged_state_dict(model)) == list(L.merge_and_unload(model).state_dict())


# --- bugs an adversarial review found, fixed: each test failed before its fix --------------------------------


class WithHead(nn.Module):
    """A Parameter w and two children that forward calls: y = head(fc(x w^T))."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4, dtype=torch.float64))
        self.head, self.fc = nn.Linear(4, 3, dtype=torch.float64), nn.Linear(4, 4, dtype=torch.float64)

    def forward(self, x):
        return self.head(self.fc(x @ self.w.T))


def test_a_module_trained_in_full_inside_a_wrapped_module_runs_exports_and_round_trips(tmp_path):
    torch.manual_seed(0)
    base = nn.Sequential(WithHead()).eval().requires_grad_(False)

    def adapted():
        return L.add_lora(copy.deepcopy(base), r=2, target_modules=["fc"], target_parameters=["0.w"],
                          modules_to_save=["head"])

    model = randomize(adapted(), 1)
    saved = model[0].inner.head  # the module's own child: what its forward calls
    assert isinstance(saved, L.TrainedCopy) and saved is model[0].base_layer.head
    with torch.no_grad():
        saved.trained.weight.add_(1.0)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    layers = dict(L.lora_layers(model))
    w, fc = base[0].w + delta_by_hand(layers["0"], dict(r=2)), base[0].fc
    h = x @ w.T @ (fc.weight + delta_by_hand(layers["0.base_layer.fc"], dict(r=2))).T + fc.bias
    y = model(x)
    torch.testing.assert_close(y, saved.trained(h), **EXACT)  # the trained copy runs
    assert not torch.allclose(y, base[0].head(h))
    with L.lora_disabled(model):
        assert torch.equal(model(x), base(x))
    state, plain = L.merged_state_dict(model), L.merge_and_unload(model)
    # the same keys, as sets: merged_state_dict puts a trained copy's keys last, merge_and_unload in module order
    assert state.keys() == plain.state_dict().keys() == base.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in plain.state_dict().items())
    assert torch.equal(state["0.head.weight"], saved.trained.weight)
    torch.testing.assert_close(plain(x), y, **EXACT)
    L.save_adapter(model, tmp_path / "adapter.pt")
    fresh = L.load_adapter(adapted(), tmp_path / "adapter.pt")
    assert torch.equal(fresh(x), y)
    # PEFT refuses a ModulesToSaveWrapper inside a ParamWrapper: no file of its format says this model
    (tmp_path / "peft").mkdir()
    with pytest.raises(ValueError, match=r"^PEFT cannot train \['0\.base_layer\.head'\] in full inside a module "
                                         r"whose Parameters have LoRA"):
        L.save_peft_adapter(model, tmp_path / "peft")
    assert not list((tmp_path / "peft").iterdir())


@pytest.mark.parametrize("export", [L.merge_and_unload, L.unload], ids=["merge_and_unload", "unload"])
def test_export_keeps_the_forward_hooks_of_every_wrapper_and_of_the_module(export):
    torch.manual_seed(0)
    model = randomize(L.add_lora(nn.Sequential(Projection()), r=2, target_modules=[], target_parameters=["w", "v"]), 1)
    calls = []
    for name, module in [("outer", model[0]), ("inner wrapper", model[0].base_layer), ("module", model[0].inner)]:
        module.register_forward_hook(lambda m, args, out, name=name: calls.append(name))
    x = torch.randn(2, 5, dtype=torch.float64)
    y = model(x)
    assert calls == ["module", "inner wrapper", "outer"]
    calls.clear()
    plain = export(model)
    assert type(plain[0]) is Projection
    out = plain(x)
    assert calls == ["module", "inner wrapper", "outer"]  # each once, in the order they ran before
    if export is L.merge_and_unload:
        torch.testing.assert_close(out, y, **EXACT)


class Gated(nn.Module):
    """A Parameter p and a child fc that forward calls: y = fc(tanh(x p^T))."""

    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.randn(4, 4, dtype=torch.float64))
        self.fc = nn.Linear(4, 4, dtype=torch.float64)

    def forward(self, x):
        return self.fc(torch.tanh(x @ self.p.T))


def read_config(directory):
    return json.loads((directory / "adapter_config.json").read_text())


@pytest.mark.parametrize("target_modules", [["fc"], None], ids=["a target module inside the wrapped one",
                                                                 "target_modules null"])
def test_a_peft_adapter_on_a_parameter_loads_equal_to_peft_and_saves_back(target_modules, tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Sequential(Gated()).eval().requires_grad_(False)
    config = peft.LoraConfig(r=2, lora_alpha=3, target_modules=target_modules, target_parameters=["0.p"])
    theirs = randomize_peft(peft.get_peft_model(copy.deepcopy(base), config), scale=0.5).eval()
    theirs.save_pretrained(str(tmp_path / "theirs"))
    if target_modules is None:
        assert read_config(tmp_path / "theirs")["target_modules"] is None  # PEFT's file for Parameters only
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = theirs(x)
    assert not torch.allclose(y, base(x))
    ours = L.load_peft_adapter(copy.deepcopy(base), tmp_path / "theirs")
    assert lora_names(ours) == ["0"] + (["0.base_layer.fc"] if target_modules else [])  # PEFT's nesting
    torch.testing.assert_close(ours(x), y, **EXACT)
    L.save_peft_adapter(ours, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(back(x), y, **EXACT)


class Attending(nn.Module):
    """y = fc(attn(q, k, v)) with one nn.MultiheadAttention(8, 2) (kdims: its kdim / vdim)."""

    def __init__(self, **kdims):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True, dtype=torch.float64, **kdims)
        self.fc = nn.Linear(8, 8, dtype=torch.float64)

    def forward(self, q, k, v):
        return self.fc(self.attn(q, k, v, need_weights=False)[0])


@pytest.mark.parametrize("kdims, targets", [
    ({}, ["attn.in_proj_weight"]),
    (dict(kdim=4, vdim=6), ["q_proj_weight", "k_proj_weight", "v_proj_weight"]),
], ids=["in_proj_weight alone", "q / k / v_proj_weight of an attention with kdim / vdim"])
def test_an_attentions_input_projections_alone_save_as_target_parameters(kdims, targets, tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = Attending(**kdims).eval().requires_grad_(False)
    with torch.no_grad():
        base.attn.in_proj_bias.normal_()  # torch starts it at 0
    model = randomize(L.add_lora(copy.deepcopy(base), r=2, alpha=3.0, target_modules=[], target_parameters=targets),
                      1, scale=0.5)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, n, d, generator=g, dtype=torch.float64)
               for n, d in [(5, 8), (3, kdims.get("kdim", 8)), (3, kdims.get("vdim", 8))])
    y = model(q, k, v)
    assert not torch.allclose(y, base(q, k, v))
    L.save_peft_adapter(model, tmp_path)
    config = read_config(tmp_path)
    assert config["target_modules"] == [] and sorted(config["target_parameters"]) == sorted(
        t.rsplit(".", 1)[-1] for t in targets)  # the Parameters, not the attention (which would add out_proj)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    torch.testing.assert_close(theirs(q, k, v), y, **EXACT)
    torch.testing.assert_close(L.load_peft_adapter(copy.deepcopy(base), tmp_path)(q, k, v), y, **EXACT)


def test_an_experts_module_under_two_names_round_trips_through_peft_files(tmp_path):
    base = moe_base("mixtral")
    base.model.layers[1].mlp.experts = base.model.layers[0].mlp.experts  # one module, two names
    model = L.add_lora(copy.deepcopy(base), target_modules=[], target_parameters=projections(base), **SETTINGS)
    randomize(model, 1, scale=0.3)
    names = [n for n, _ in L.lora_layers(model, remove_duplicate=False)]
    assert names == [f"model.layers.{i}.mlp.experts{end}" for i in (0, 1) for end in ("", ".base_layer")]
    L.save_peft_adapter(model, tmp_path)
    loaded = L.load_peft_adapter(copy.deepcopy(base), tmp_path)
    assert [n for n, _ in L.lora_layers(loaded, remove_duplicate=False)] == names  # both names, as for an nn.Linear
    assert loaded.model.layers[1].mlp.experts is loaded.model.layers[0].mlp.experts
    y = logits(model)
    assert not torch.allclose(y, logits(base))
    torch.testing.assert_close(logits(loaded), y, **EXACT)


@pytest.mark.parametrize("kind", EXPERT_KINDS)
def test_adapted_experts_take_zero_tokens(kind):
    plain, holder, _ = lora_experts(kind)
    x, index, weights = routing(tokens=0)
    expected = plain(x, index, weights)
    assert expected.shape == (0, 6)
    for factored in (True, False):
        set_factored(holder, factored)
        y = holder(x, index, weights)
        assert y.shape == (0, 6) and y.dtype == expected.dtype and torch.equal(y, expected)


class FlagBias(nn.Module):
    """A weight w and a bias that is a flag, no tensor: y = x w^T (+ 1 if self.bias)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 4, dtype=torch.float64))
        self.bias = True

    def forward(self, x):
        return x @ self.w.T + (1.0 if self.bias else 0.0)


def test_a_module_whose_bias_is_no_tensor_keeps_it():
    torch.manual_seed(0)
    base = nn.Sequential(FlagBias())
    model = randomize(L.add_lora(copy.deepcopy(base), r=2, target_modules=[], target_parameters=["w"]), 1)
    assert model[0].inner.bias is True
    x = torch.randn(5, 4, dtype=torch.float64)
    torch.testing.assert_close(model(x), x @ (base[0].w + delta_by_hand(model[0], dict(r=2))).T + 1.0, **EXACT)
    torch.testing.assert_close(L.merge_and_unload(model)(x), model(x), **EXACT)


class CallsForward(nn.Module):
    """Calls its child's forward by name: the wrapper's forward, so LoRA runs."""

    def __init__(self):
        super().__init__()
        self.o = Owner()

    def forward(self, x):
        return self.o.forward(x)


def test_a_parent_calling_its_childs_forward_by_name_is_not_refused():
    torch.manual_seed(0)
    base = CallsForward()
    model = randomize(L.add_lora(copy.deepcopy(base), r=2, target_modules=[], target_parameters=["w"]), 1)
    x = torch.randn(5, 4, dtype=torch.float64)
    torch.testing.assert_close(model(x), x @ (base.o.w + delta_by_hand(model.o, dict(r=2))).T, **EXACT)


def test_save_peft_adapter_warns_that_peft_doubles_a_multihead_attentions_out_proj_delta_w(tmp_path):
    peft = pytest.importorskip("peft")
    base, model, _ = lora_mha(batch_first=True)
    q, k, v = qkv(True)

    def peft_attention(folder):  # what PEFT loads from the folder save_peft_adapter writes, with the warning
        with pytest.warns(UserWarning, match=r"PEFT 0\.21 adds the out_proj ΔW of \['0'\] twice \(its issue #3774\)"):
            L.save_peft_adapter(model, folder)
        return peft.PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval().base_model.model[0]

    theirs = peft_attention(tmp_path / "random")
    doubled = copy.deepcopy(model)
    with torch.no_grad():
        dict(L.lora_layers(doubled))["0.base_layer.out_proj"].lora_B.mul_(2)
    y = theirs(q, k, v)[0]
    torch.testing.assert_close(y, doubled[0](q, k, v)[0], **EXACT)  # the warning is true: W_out + 2 ΔW_out
    assert not torch.allclose(y, model[0](q, k, v)[0])
    with torch.no_grad():
        dict(L.lora_layers(model))["0.base_layer.out_proj"].lora_B.zero_()  # ΔW_out = 0: PEFT computes ours
    torch.testing.assert_close(peft_attention(tmp_path / "zero")(q, k, v)[0], model[0](q, k, v)[0], **EXACT)


# --- torch.compile -----------------------------------------------------------------------------------------------


@pytest.mark.slow  # compiles a forward and a backward graph with inductor
def test_torch_compile_of_the_factored_experts_equals_eager():
    plain, holder, settings = lora_experts("transposed, biased, interleaved gate (gpt-oss)")
    x, index, weights = routing(tokens=6)
    torch._dynamo.reset()
    compiled = torch.compile(holder)  # experts_forward's per-expert split is data-dependent: graph breaks are fine
    wrt = lora_parameters(holder) + [x.requires_grad_()]
    y_compiled, y_eager = compiled(x, index, weights), holder(x, index, weights)
    close = dict(rtol=1e-9, atol=1e-9)  # float64: compiled kernels may sum in another order
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # compiled, not silently run eagerly
    torch.testing.assert_close(y_compiled, y_eager, **close)
    torch.testing.assert_close(y_eager, experts_by_hand(plain, x, index, weights, deltas_by_hand(holder, settings)),
                               **EXACT)
    for a, b in zip(torch.autograd.grad(y_compiled.square().sum(), wrt), torch.autograd.grad(y_eager.square().sum(), wrt)):
        torch.testing.assert_close(a, b, **close)


def test_experts_whose_forward_is_patched_on_the_instance_run_the_general_path():
    # accelerate's hooks (device_map) replace module.forward on the instance: the factored path would skip them
    needs_experts()
    plain = EXPERT_KINDS["gated (Mixtral)"]().to(torch.float64)
    with torch.no_grad():
        for p in plain.parameters():
            p.normal_(0, 0.5)
    calls, original = [], plain.forward
    plain.forward = lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs)
    holder = L.add_lora(Holder(plain), target_modules=[], target_parameters=["gate_up_proj", "down_proj"], r=2)
    assert [layer.factored for _, layer in L.lora_layers(holder)] == [False, False]
    x, index, weights = routing()
    holder(x, index, weights)
    assert calls == [1]


# --- base keys: an adapted model's state_dict holds the base's keys unchanged, plus LoRA's ----------------------


def adapted_pair(case):
    """(base, a copy adapted with random A and B, a call running both, the classes that must stay in the tree)."""
    if case == "mha":
        base, model, _ = lora_mha(batch_first=True)
        q, k, v = qkv(True)
        return base, model, lambda m: m[0](q, k, v)[0], (nn.MultiheadAttention,)
    base = moe_base("mixtral")  # the experts' two stacks and the router's weight: three Parameters, two modules
    model = randomize(L.add_lora(copy.deepcopy(base), r=2, target_modules=[],
                                 target_parameters=["gate_up_proj", "down_proj", "gate.weight"]), 1, scale=0.3)
    mlp = transformers.models.mixtral.modeling_mixtral
    return base, model, logits, (mlp.MixtralExperts, mlp.MixtralTopKRouter)


@pytest.mark.parametrize("case", ["moe: experts and router", "mha"])
def test_an_adapted_models_state_dict_holds_the_bases_keys_unchanged_plus_loras(case):
    base, model, run, classes = adapted_pair("mha" if case == "mha" else "moe")
    state, adapter = model.state_dict(), L.lora_state_dict(model)
    assert adapter and all(k.rsplit(".", 1)[-1] in ("lora_A", "lora_B") for k in adapter)
    assert list(k for k in state if k not in adapter) == list(base.state_dict())  # the base's keys, in its order
    assert all(torch.equal(state[k], v) for k, v in base.state_dict().items())
    for cls in classes:  # each adapted module still in the tree, as its own class (transformers finds experts so)
        assert sum(type(m) is cls for m in model.modules()) == sum(type(m) is cls for m in base.modules()) > 0
    # a base checkpoint (other weights) loads with strict=False: no unexpected key, only LoRA's missing, all filled
    other = copy.deepcopy(base)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    adapter_before = {k: v.clone() for k, v in adapter.items()}
    result = model.load_state_dict(other.state_dict(), strict=False)
    assert result.unexpected_keys == [] and set(result.missing_keys) == set(adapter)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in other.state_dict().items())
    assert all(torch.equal(v, adapter_before[k]) for k, v in L.lora_state_dict(model).items())
    with L.lora_disabled(model):
        assert torch.equal(run(model), run(other))
    # the whole state_dict round-trips strictly into a fresh adapted model, and LoRA's keys are what PEFT nests
    fresh = adapted_pair("mha" if case == "mha" else "moe")[1]
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(run(fresh), run(model), **EXACT)
    assert list(L.merged_state_dict(model)) == list(L.merge_and_unload(model).state_dict()) == list(base.state_dict())


def test_a_checkpoint_with_the_nested_keys_of_lora_min_before_still_loads():
    base, model, run, _ = adapted_pair("moe")
    experts = "model.layers.0.mlp.experts."  # gate_up_proj inside down_proj's wrapper: base_layer. twice before
    old = {k.replace(experts + "gate_up_proj", experts + "base_layer.base_layer.gate_up_proj")
           .replace(experts + "down_proj", experts + "base_layer.base_layer.down_proj"): v.clone() * 2
           for k, v in model.state_dict().items()}
    assert experts + "base_layer.base_layer.gate_up_proj" in old
    result = model.load_state_dict(old)
    assert not result.missing_keys and not result.unexpected_keys
    loaded = model.model.layers[0].mlp.experts.inner.gate_up_proj
    assert torch.equal(loaded, old[experts + "base_layer.base_layer.gate_up_proj"])


@pytest.mark.parametrize("case", ["moe: experts and router", "mha"])
def test_a_base_checkpoint_is_refused_by_merged_parameter_layers_as_by_merged_linears(case):
    """A merged layer's weight holds W + ΔW: a checkpoint of W loaded into it would make unmerge() give W - ΔW.
    Refused naming the layer, as LoRALinear refuses it (the base keys' mapping hid the base weight from that check)."""
    base, model, _, _ = adapted_pair("mha" if case == "mha" else "moe")
    L.merge_lora(model)
    merged = {name: layer.weight.detach().clone() for name, layer in L.lora_layers(model)}
    with pytest.raises(RuntimeError, match=r"the checkpoint was saved unmerged \(weight = W\) but this layer is merged"):
        model.load_state_dict(base.state_dict(), strict=False)
    assert all(torch.equal(layer.weight, merged[name]) and layer.merged for name, layer in L.lora_layers(model))
