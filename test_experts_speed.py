"""Expert LoRA at the speed of the model's own experts: a constant number of kernels, compiled whole.

Properties, never timings (the benchmark times): aten ops per training step counted with a TorchDispatchMode do
not grow with the number of experts and stay under 2x the frozen model's; the factored path runs the kernels of
the experts implementation the model is configured with (grouped_mm, batched_mm, eager), each giving the same
outputs and gradients, and transformers' compile-safe loop where the grouped kernel cannot run (float64, a rank
whose rows are no multiple of 16 bytes); torch.compile(fullgraph=True) of a whole adapted MoE model equals eager
(dropout too); the general path forms W + ΔW in one pass, rounded once, and under eager writes no stack per
expert.
"""

import copy
import warnings

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

import lora_min as L
from conftest import EXACT, randomize
from test_parameters import (EXPERT_KINDS, GRADS, Projection, deltas_by_hand, experts_by_hand, lora_experts,
                             lora_parameters, needs_experts, routing)

transformers = pytest.importorskip("transformers")


class Ops(TorchDispatchMode):
    """The aten ops that run inside it, by name (each one kernel launch on a GPU, or one fused call)."""

    def __init__(self):
        super().__init__()
        self.names, self.sizes, self.views = [], [], []  # each op's name, its output's number of elements, if a view

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.names.append(func.__name__)
        self.sizes.append(out.numel() if isinstance(out, torch.Tensor) else 0)
        self.views.append(func.is_view)
        return out


def qwen3_moe(num_experts, implementation="grouped_mm", dtype=torch.float32, layers=1, family="qwen3_moe"):
    """A tiny Qwen3-MoE (or gpt-oss: experts stored transposed, with biases): hidden 32, experts' intermediate 16,
    top-2; frozen, in train mode."""
    needs_experts()
    torch.manual_seed(0)
    common = dict(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                  vocab_size=97, num_experts_per_tok=2, experts_implementation=implementation,
                  attn_implementation="eager", initializer_range=0.2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if family == "gpt_oss":
            config = transformers.GptOssConfig(intermediate_size=16, num_local_experts=num_experts,
                                               layer_types=["full_attention"] * layers, **common)
            return transformers.GptOssForCausalLM(config).to(dtype).requires_grad_(False)
        config = transformers.Qwen3MoeConfig(moe_intermediate_size=16, num_experts=num_experts, **common)
        return transformers.Qwen3MoeForCausalLM(config).to(dtype).requires_grad_(False)


def adapt(model, r=8, **settings):
    """LoRA on both expert projections, B random (so ΔW != 0)."""
    model = L.add_lora(model, r=r, target_modules=[], target_parameters=["gate_up_proj", "down_proj"], **settings)
    return randomize(model, 1, scale=0.2)


def step_ops(model, ids):
    """The aten ops of one training step: forward on embeddings that need their gradient (as a layer deep in a
    network gets them), backward of a loss."""
    x = model.model.embed_tokens(ids).detach().requires_grad_()
    with Ops() as ops:
        model(inputs_embeds=x).logits.square().mean().backward()
    return ops.names


IDS = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm", "eager"])
@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_ops_per_training_step_do_not_grow_with_the_number_of_experts(family, implementation):
    counts = {}
    for num_experts in (8, 128):
        frozen = len(step_ops(qwen3_moe(num_experts, implementation, family=family), IDS))
        adapted = step_ops(adapt(qwen3_moe(num_experts, implementation, family=family)), IDS)
        counts[num_experts] = len(adapted)
        assert len(adapted) < 2 * frozen, (num_experts, len(adapted), frozen)
    if implementation != "eager":  # eager's frozen model loops over the experts hit itself; LoRA's loop matches it
        assert abs(counts[128] - counts[8]) <= 0.1 * counts[8], counts
    if implementation == "grouped_mm":  # the grouped kernel ran: 3 products per projection in the forward alone
        assert adapted.count("_grouped_mm.default") >= 2 * 3


def test_eager_expert_lora_writes_no_full_size_gradient_per_expert():
    """Under eager, the rows are split per expert (and A, B unbound), never sliced: each slice's backward writes a
    zero gradient as large as all the rows, once per expert hit. Elements written per step: within 2x the frozen's."""
    written = {}
    for name, model in (("frozen", qwen3_moe(128, "eager")), ("adapted", adapt(qwen3_moe(128, "eager")))):
        x = model.model.embed_tokens(IDS).detach().requires_grad_()
        with Ops() as ops:
            model(inputs_embeds=x).logits.square().mean().backward()
        written[name] = sum(size for size, view in zip(ops.sizes, ops.views) if not view)
    assert written["adapted"] < 2 * written["frozen"], written


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_the_general_path_under_eager_writes_each_stack_twice_per_step(family):
    """W + ΔW (layer.factored = False) under eager runs experts_forward's loop on the unbound experts: a training
    step writes each (E, out, in) stack twice, W + ΔW (one baddbmm) and its gradient (one stack), at any number of
    experts. transformers' own eager loop indexes W[e], whose backward writes a zero stack once per expert hit."""
    for num_experts in (8, 128):
        model = adapt(qwen3_moe(num_experts, "eager", family=family))
        for _, layer in L.lora_layers(model):
            layer.factored = False
        stacks = {p.numel() for n, p in model.named_parameters() if n.endswith(("gate_up_proj", "down_proj"))}
        x = model.model.embed_tokens(IDS).detach().requires_grad_()
        with Ops() as ops:
            model(inputs_embeds=x).logits.square().mean().backward()
        written = [n for n, size, view in zip(ops.names, ops.sizes, ops.views) if size in stacks and not view]
        assert sorted(written) == ["baddbmm.default"] * 2 + ["stack.default"] * 2, (num_experts, written)


@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm"])
def test_expert_lora_adds_no_host_sync(implementation, monkeypatch):
    syncs = []  # .tolist() / .item() (a GPU waits for the host there; torch.compile breaks its graph); the
    for method in ("tolist", "item"):  # dispatch mode does not see tolist: spy on the methods themselves
        original = getattr(torch.Tensor, method)
        monkeypatch.setattr(torch.Tensor, method, lambda t, *a, _f=original, _m=method: syncs.append(_m) or _f(t, *a))
    step_ops(qwen3_moe(8, implementation), IDS)
    frozen, syncs[:] = list(syncs), []
    step_ops(adapt(qwen3_moe(8, implementation)), IDS)
    assert syncs == frozen  # the model's own, if any: LoRA adds none


def kernels_of(model, ids):
    """{op name: count} of the matmul kernels a training step ran."""
    names = step_ops(model, ids)
    return {n: names.count(n) for n in set(names) if "grouped_mm" in n or n.startswith(("bmm", "mm"))}


@pytest.mark.parametrize("case", ["float32 r=8: grouped kernel", "float32 r=3: rows of 12 bytes",
                                  "float64: transformers' loop"])
def test_every_experts_implementation_gives_the_same_outputs_and_gradients(case):
    dtype, r = (torch.float32, 8) if "r=8" in case else (torch.float32, 3) if "r=3" in case else (torch.float64, 2)
    results = {}
    for implementation in ("eager", "batched_mm", "grouped_mm"):
        model = adapt(qwen3_moe(4, implementation, dtype, layers=2), r=r)
        y = model(IDS).logits
        results[implementation] = y, torch.autograd.grad(y.square().mean(), lora_parameters(model))
        kernels = kernels_of(model, IDS)  # each implementation's own: grouped_mm the kernel or transformers' loop
        grouped, fallback = kernels.get("_grouped_mm.default", 0), kernels.get("grouped_mm_fallback.default", 0)
        if implementation == "grouped_mm":
            assert (grouped > 0) == (dtype == torch.float32)  # (r = 3: W's products still)
            assert (fallback > 0) == ("r=8" not in case)
        else:
            assert grouped == fallback == 0
    tol = EXACT if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    y0, g0 = results["eager"]
    for implementation, (y, g) in results.items():
        torch.testing.assert_close(y, y0, **tol)
        for a, b in zip(g, g0):
            torch.testing.assert_close(a, b, **(GRADS if dtype == torch.float64 else tol))
    assert all(g.abs().sum() > 0 for g in g0)


@pytest.mark.parametrize("implementation", ["batched_mm", "grouped_mm"])
@pytest.mark.parametrize("kind", EXPERT_KINDS)
def test_each_implementation_computes_the_plain_math_for_every_kind_of_experts(kind, implementation):
    plain, holder, settings = lora_experts(kind)  # float64: grouped_mm runs transformers' loop
    holder.experts.inner.config._experts_implementation = implementation
    x, index, weights = routing(tokens=6)
    wrt = lora_parameters(holder) + [x.requires_grad_(), weights.requires_grad_()]
    y = holder(x, index, weights)
    torch.testing.assert_close(y, experts_by_hand(plain, x, index, weights, deltas_by_hand(holder, settings)), **EXACT)
    got = torch.autograd.grad(y.square().sum(), wrt)
    holder.experts.inner.config._experts_implementation = "eager"
    for a, b in zip(got, torch.autograd.grad(holder(x, index, weights).square().sum(), wrt)):
        torch.testing.assert_close(a, b, **GRADS)


def test_a_bfloat16_base_runs_the_lora_products_in_bfloat16_from_float32_adapters():
    # the documented choice: bfloat16 copies of the float32 A and B (as autocast makes), so on CUDA the products
    # stay on the bfloat16-only grouped kernel; the gradients reach the float32 adapters
    model = adapt(qwen3_moe(4, dtype=torch.bfloat16))
    assert {p.dtype for p in lora_parameters(model)} == {torch.float32}
    as_autocast = copy.deepcopy(model)
    for _, layer in L.lora_layers(as_autocast):  # the same values, rounded to bfloat16 beforehand
        layer.lora_A.data, layer.lora_B.data = layer.lora_A.bfloat16().float(), layer.lora_B.bfloat16().float()
    assert torch.equal(model(IDS).logits, as_autocast(IDS).logits)
    assert kernels_of(model, IDS).get("_grouped_mm.default", 0) > 0
    grads = torch.autograd.grad(model(IDS).logits.float().square().mean(), lora_parameters(model))
    assert all(g.dtype == torch.float32 and g.abs().sum() > 0 for g in grads)


@pytest.mark.slow  # compiles a 1-layer MoE model's forward and backward with inductor
@pytest.mark.parametrize("dropout, factored", [(0.0, True), (0.3, True), (0.0, False)])
def test_torch_compile_fullgraph_of_an_adapted_moe_model_equals_eager(dropout, factored):
    model = adapt(qwen3_moe(4), r=4, dropout=dropout).train()
    for _, layer in L.lora_layers(model):
        layer.factored = factored  # False: W + ΔW in W's place, in experts_forward too
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)  # fullgraph: a host sync or any graph break raises
    x = model.model.embed_tokens(IDS).detach()

    def step(f):
        torch.manual_seed(3)
        inputs = x.clone().requires_grad_()
        y = f(inputs_embeds=inputs).logits
        return y, torch.autograd.grad(y.square().mean(), lora_parameters(model) + [inputs])

    with torch._inductor.config.patch(fallback_random=True):  # compiled dropout draws eager's masks
        (y_eager, g_eager), (y_compiled, g_compiled) = step(model), step(compiled)
    torch.testing.assert_close(y_compiled, y_eager, rtol=1e-4, atol=1e-5)
    for a, b in zip(g_compiled, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())
    if dropout:  # the masks were really drawn, and equal: another seed gives another output
        with torch.no_grad(), torch._inductor.config.patch(fallback_random=True):
            torch.manual_seed(4)
            assert not torch.allclose(compiled(inputs_embeds=x).logits, y_eager)


# --- the general path: W + ΔW in one pass ------------------------------------------------------------------------


def old_plus(layer, sign):
    """W + sign * ΔW as before: ΔW formed, transposed, scaled, added in float32; rounded once."""
    dtype = torch.promote_types(layer.weight.dtype, torch.float32)
    return (layer.weight.to(dtype) + sign * layer.delta_weight(dtype)).to(layer.weight.dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", EXPERT_KINDS)
def test_the_general_path_forms_w_plus_delta_w_in_one_pass_rounded_once(kind, dtype):
    _, holder, _ = lora_experts(kind)
    holder.to(dtype)
    half = dtype in (torch.float16, torch.bfloat16)
    for _, layer in L.lora_layers(holder):
        with torch.no_grad():  # float32 adapters on a half base (add_lora's default there); ΔW as large as W
            layer.lora_A.data = layer.lora_A.float() if half else layer.lora_A
            layer.lora_B.data = (layer.lora_B.float() if half else layer.lora_B) * 3
        for sign in (+1, -1):
            with Ops() as ops:
                result = layer._weight_plus(sign, check_finite=False)
            # one pass over the (E, out, in) stack: one baddbmm (a half W: copied to float32 first, rounded after)
            stack = [n for n, size in zip(ops.names, ops.sizes) if size == layer.weight.numel()
                     and not n.startswith(("transpose", "t."))]
            assert stack == (["_to_copy.default", "baddbmm.default", "_to_copy.default"] if half else
                             ["baddbmm.default"])
            assert result.dtype == dtype
            eps, old = torch.finfo(dtype).eps, old_plus(layer, sign)
            if half:  # formed in float32, rounded once: the exact sum's neighbour at most
                exact = (layer.weight.double() + sign * layer.delta_weight(torch.float64)).to(dtype)
                torch.testing.assert_close(result, exact, rtol=eps, atol=0)
                torch.testing.assert_close(result, old, rtol=eps, atol=0)
            else:
                torch.testing.assert_close(result, old, rtol=4 * eps, atol=4 * eps * old.abs().max().item())


def test_the_general_path_of_a_bare_weight_is_one_addmm():
    model = randomize(L.add_lora(nn.Sequential(Projection()), r=2, target_modules=[], target_parameters=["w"]), 1)
    layer = model[0]
    with Ops() as ops:
        result = layer._weight_plus(+1, check_finite=False)
    assert [n for n in ops.names if not n.startswith(("t.", "promote_types"))] == ["addmm.default"]
    torch.testing.assert_close(result, old_plus(layer, +1), **EXACT)
