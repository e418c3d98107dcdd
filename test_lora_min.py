"""The specification of lora_min, as property-based tests.

Above all: the hand-written LoRALinear computes what the classic
`torch.nn.utils.parametrize` LoRA computes (outputs and gradients), in every
shape, rank, scale, dtype and batch layout hypothesis draws.

Tolerances (torch.testing.assert_close, rtol / atol): float64 1e-10 / 1e-10
(near-exact: only summation order differs), float32 1e-4 / 1e-4. Values are O(1)
to O(10) and dot products are at most 24 terms long.
"""

import copy
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, strategies as st
from torch.nn.utils import parametrize

import lora_min as L

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-4)}
FLOAT_DTYPES = [torch.float32, torch.float64]


# --- the classic approach, for reference ---------------------------------------


class LoRAParametrization(nn.Module):
    """The classic LoRA: a parametrization that returns W + (B @ A) * scale as `weight`."""

    def __init__(self, A, B, scale):
        super().__init__()
        self.lora_A = nn.Parameter(A.detach().clone())
        self.lora_B = nn.Parameter(B.detach().clone())
        self.scale = scale

    def forward(self, W):
        return W + (self.lora_B @ self.lora_A) * self.scale


def parametrize_reference(linear, A, B, scale):
    ref = copy.deepcopy(linear).requires_grad_(False)
    parametrize.register_parametrization(ref, "weight", LoRAParametrization(A, B, scale))
    return ref, ref.parametrizations.weight[0]


# --- drawing cases ---------------------------------------------------------------


@dataclass
class Case:
    in_f: int
    out_f: int
    r: int
    alpha: float
    use_rslora: bool
    bias: bool
    batch: tuple
    dtype: torch.dtype
    seed: int


@st.composite
def cases(draw, dtypes=FLOAT_DTYPES):
    return Case(
        in_f=draw(st.integers(1, 24)),
        out_f=draw(st.integers(1, 24)),
        r=draw(st.integers(1, 8)),
        alpha=draw(st.floats(0.25, 16.0)),
        use_rslora=draw(st.booleans()),
        bias=draw(st.booleans()),
        batch=tuple(draw(st.lists(st.integers(1, 4), max_size=2))),  # (), (n,) or (n, m): 1-D to 3-D inputs
        dtype=draw(st.sampled_from(dtypes)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def make(case, nonzero_B=True):
    """(linear, its LoRALinear with random A and nonzero B, input x)."""
    g = torch.Generator().manual_seed(case.seed)
    randn = lambda *shape: torch.randn(*shape, generator=g, dtype=case.dtype)  # noqa: E731
    linear = nn.Linear(case.in_f, case.out_f, bias=case.bias, dtype=case.dtype)
    with torch.no_grad():
        linear.weight.copy_(randn(case.out_f, case.in_f))
        if case.bias:
            linear.bias.copy_(randn(case.out_f))
    layer = L.LoRALinear(copy.deepcopy(linear), r=case.r, alpha=case.alpha, use_rslora=case.use_rslora)
    if nonzero_B:  # with B = 0 every equivalence below would pass trivially
        with torch.no_grad():
            layer.lora_A.copy_(randn(case.r, case.in_f))
            layer.lora_B.copy_(randn(case.out_f, case.r) + 0.5)
    return linear, layer, randn(*case.batch, case.in_f)


def mlp(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 5), nn.Tanh()), nn.Linear(5, 3)).to(dtype)


def randomize_B(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in L.lora_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g, dtype=layer.lora_B.dtype))
    return model


# --- equivalence with the parametrize approach ----------------------------------------


@given(cases())
def test_equals_parametrize_outputs_and_gradients(case):
    linear, layer, x = make(case)
    ref, ref_lora = parametrize_reference(linear, layer.lora_A, layer.lora_B, layer.scale)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, y_ref = layer(x1), ref(x2)
    torch.testing.assert_close(y, y_ref, **TOL[case.dtype])
    assert not torch.allclose(y, linear(x), **TOL[case.dtype]), "LoRA must change the output"

    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(case.seed + 1), dtype=case.dtype)
    (y * w).sum().backward()
    (y_ref * w).sum().backward()
    torch.testing.assert_close(layer.lora_A.grad, ref_lora.lora_A.grad, **TOL[case.dtype])
    torch.testing.assert_close(layer.lora_B.grad, ref_lora.lora_B.grad, **TOL[case.dtype])
    torch.testing.assert_close(x1.grad, x2.grad, **TOL[case.dtype])
    assert layer.weight.grad is None and (layer.bias is None or layer.bias.grad is None)
    # The raw gradients (as DDP's hooks see them, before .grad's layout fix-up) are contiguous like the params.
    raw = torch.autograd.grad((layer(x) * w).sum(), [layer.lora_A, layer.lora_B])
    assert all(g.is_contiguous() for g in raw)


@given(cases(), st.booleans())
def test_hand_written_backward_equals_autograd_of_the_core_math(case, transposed_input):
    """All five gradients (x, W, b, A, B) with W and b unfrozen, on non-contiguous inputs
    and the expanded gradient that y.sum() sends back, against autograd of lora_forward."""
    _, layer, x = make(case)
    layer.weight.requires_grad_(True)
    if case.bias:
        layer.bias.requires_grad_(True)
    if transposed_input:  # same values, non-contiguous memory
        x = x.movedim(-1, 0).contiguous().movedim(0, -1)
    params = [layer.weight, layer.lora_A, layer.lora_B] + ([layer.bias] if case.bias else [])
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = torch.autograd.grad(layer(x1).sum(), [x1] + params)
    core = L.lora_forward(x2, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scale)
    reference = torch.autograd.grad(core.sum(), [x2] + params)
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, **TOL[case.dtype])


def test_dropout_gradients_equal_autograd_with_the_same_mask():
    """Dropout reaches only the LoRA branch: with W and b unfrozen, dW = g^T x uses x itself."""
    torch.manual_seed(0)
    layer = L.LoRALinear(nn.Linear(12, 7), r=3, dropout=0.3)
    nn.init.normal_(layer.lora_B)
    layer.weight.requires_grad_(True)
    layer.bias.requires_grad_(True)
    x = torch.randn(2, 5, 12)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(1)
    y = layer.train()(x1)
    torch.manual_seed(1)  # the same dropout mask
    y_ref = nn.functional.linear(x2, layer.weight, layer.bias) + L.lora_update(
        nn.functional.dropout(x2, 0.3, training=True), layer.lora_A, layer.lora_B, layer.scale)
    torch.testing.assert_close(y, y_ref)
    params = [layer.lora_A, layer.lora_B, layer.weight, layer.bias]
    for a, b in zip(torch.autograd.grad((y * y).sum(), [x1] + params), torch.autograd.grad((y_ref * y_ref).sum(), [x2] + params)):
        torch.testing.assert_close(a, b)


def test_autocast_bfloat16_matches_autograd_under_autocast():
    torch.manual_seed(0)
    layer = L.LoRALinear(nn.Linear(32, 16), r=4)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(8, 32)
    params = [layer.lora_A, layer.lora_B]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        y_ref = nn.functional.linear(x, layer.weight, layer.bias) + (x @ layer.lora_A.T * layer.scale) @ layer.lora_B.T
    assert y.dtype == y_ref.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_ref, rtol=2e-2, atol=2e-2)
    grads, grads_ref = torch.autograd.grad(y.float().sum(), params), torch.autograd.grad(y_ref.float().sum(), params)
    for a, b in zip(grads, grads_ref):
        assert a.dtype == torch.float32  # gradients reach the float32 parameters
        torch.testing.assert_close(a, b, rtol=2e-2, atol=5e-2)


# --- complete under autograd: double backward, forward mode, torch.func ------------------------


lora_fn = L._lora_linear  # the hand-written Function as a plain function of its tensors


@st.composite
def function_inputs(draw):
    """Float64 inputs of the hand-written Function, every one requiring grad; x_lora
    separate (the dropout path) or None (the same tensor as x)."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    in_f, out_f, r = draw(st.integers(1, 5)), draw(st.integers(1, 5)), draw(st.integers(1, 3))
    batch = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    randn = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)  # noqa: E731
    x = randn(*batch, in_f)
    x_lora = randn(*batch, in_f) if draw(st.booleans()) else None
    b = randn(out_f) if draw(st.booleans()) else None
    return (x, x_lora, randn(out_f, in_f), b, randn(r, in_f), randn(out_f, r), draw(st.floats(0.25, 4.0)))


@given(function_inputs())
def test_gradcheck_and_gradgradcheck_float64(inputs):
    """Numerical derivatives against backward, double backward (reverse over reverse and
    forward over reverse), forward mode (jvp) and batched gradients (vmap over backward)."""
    assert torch.autograd.gradcheck(lora_fn, inputs, check_forward_ad=True, check_batched_grad=True,
                                    check_batched_forward_grad=True)
    assert torch.autograd.gradgradcheck(lora_fn, inputs, check_fwd_over_rev=True, check_batched_grad=True)


def small_lora_model(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(dtype)
    return randomize_B(L.add_lora(model, r=2, alpha=3.0), seed)


def plain_math_model(model):
    """The same model computed with autograd through lora_forward: the independent oracle."""
    def run(x):
        for module in model:
            if isinstance(module, L.LoRALinear):
                x = L.lora_forward(x, module.weight, module.bias, module.lora_A, module.lora_B, module.scale)
            else:
                x = module(x)
        return x
    return run


def adapter_params(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def test_torch_func_grad_jacrev_jacfwd_equal_the_plain_math():
    from torch.func import functional_call, grad, jacfwd, jacrev

    model = small_lora_model()
    reference = plain_math_model(model)
    x = torch.randn(4, 5, dtype=torch.float64)
    params = adapter_params(model)

    def loss(p, x):
        return (functional_call(model, p, (x,)) ** 2).sum()

    ours = grad(loss)(params, x)
    expected = torch.autograd.grad((reference(x) ** 2).sum(), list(params.values()))
    for name, e in zip(params, expected):
        torch.testing.assert_close(ours[name], e, **TOL[torch.float64])
    jac_expected = torch.autograd.functional.jacobian(reference, x)
    torch.testing.assert_close(jacrev(model)(x), jac_expected, **TOL[torch.float64])
    torch.testing.assert_close(jacfwd(model)(x), jac_expected, **TOL[torch.float64])
    hess = torch.func.hessian(lambda x: (model(x) ** 3).sum())(x)
    hess_expected = torch.autograd.functional.hessian(lambda x: (reference(x) ** 3).sum(), x)
    torch.testing.assert_close(hess, hess_expected, **TOL[torch.float64])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_per_sample_gradients_with_vmap_equal_a_loop(dtype):
    """vmap(grad(...)): the per-example gradients of differentially private training."""
    from torch.func import functional_call, grad, vmap

    model = small_lora_model(dtype=dtype)
    params = adapter_params(model)
    g = torch.Generator().manual_seed(3)
    xs, ys = torch.randn(6, 5, generator=g, dtype=dtype), torch.randint(0, 3, (6,), generator=g)

    def loss(p, x, y):
        return nn.functional.cross_entropy(functional_call(model, p, (x[None],)), y[None])

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, xs, ys)
    for i in range(len(xs)):
        model.zero_grad()
        nn.functional.cross_entropy(model(xs[i:i + 1]), ys[i:i + 1]).backward()
        for name, p in params.items():
            torch.testing.assert_close(per_sample[name][i], p.grad, **TOL[dtype])


def test_vmap_over_stacked_adapters_equals_a_loop():
    """Ensembles: several adapters on one input, vmapped over lora_A / lora_B."""
    from torch.func import functional_call, stack_module_state, vmap

    models = [small_lora_model(seed) for seed in range(3)]
    for m in models[1:]:
        m.load_state_dict({**models[0].state_dict(), **L.lora_state_dict(m)})  # one base, three adapters
    adapters, _ = stack_module_state(models)
    adapters = {k: v for k, v in adapters.items() if "lora_" in k}
    x = torch.randn(4, 5, dtype=torch.float64)
    ys = vmap(lambda p: functional_call(models[0], p, (x,)))(adapters)
    for i, m in enumerate(models):
        torch.testing.assert_close(ys[i], m(x), **TOL[torch.float64])


def test_vmap_over_the_frozen_weight_alone_raises_instead_of_a_wrong_number():
    layer = L.LoRALinear(nn.Linear(4, 3, bias=False, dtype=torch.float64), r=2)
    Ws = torch.randn(5, 3, 4, dtype=torch.float64)
    x = torch.randn(2, 4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="vmap"):
        torch.func.vmap(lambda W: torch.func.functional_call(layer, {"weight": W}, (x,)))(Ws)


@given(cases(dtypes=[torch.float64]))
def test_gradient_penalty_double_backward_equals_the_plain_math(case):
    """A gradient penalty (create_graph=True) differentiates the hand-written backward."""
    _, layer, x = make(case)
    params = [layer.lora_A, layer.lora_B]

    def penalised(forward):
        x1 = x.clone().requires_grad_()
        y = forward(x1)
        (gx,) = torch.autograd.grad((y ** 2).sum(), x1, create_graph=True)
        return torch.autograd.grad((y ** 2).sum() + (gx ** 2).sum(), params)

    ours = penalised(layer)
    expected = penalised(lambda x: L.lora_forward(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scale))
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, **TOL[case.dtype])


@given(cases())
def test_scale_rule(case):
    _, layer, _ = make(case)
    expected = case.alpha / (case.r**0.5 if case.use_rslora else case.r)
    assert layer.scale == pytest.approx(expected)
    torch.testing.assert_close(layer.delta_weight(), layer.lora_B @ layer.lora_A * expected, **TOL[case.dtype])


# --- exact identities -------------------------------------------------------------------


@given(cases(), st.sampled_from([None, 1.0, 0.02]))
def test_fresh_layer_equals_linear_exactly(case, init_std):
    linear, _, x = make(case)
    layer = L.LoRALinear(copy.deepcopy(linear), r=case.r, alpha=case.alpha, init_std=init_std)
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
    assert torch.equal(layer(x), linear(x))


@given(cases())
def test_disabled_layer_equals_linear_exactly(case):
    linear, layer, x = make(case)
    layer.enabled = False
    assert torch.equal(layer(x), linear(x))
    layer.enabled = True
    assert not torch.equal(layer(x), linear(x))


def test_dropout_changes_training_outputs_only():
    torch.manual_seed(0)
    linear = nn.Linear(32, 16)
    plain = L.LoRALinear(copy.deepcopy(linear), r=4)
    nn.init.normal_(plain.lora_B)
    dropped = L.LoRALinear(copy.deepcopy(linear), r=4, dropout=0.5)
    dropped.load_state_dict(plain.state_dict())
    x = torch.randn(8, 32)
    assert not torch.allclose(dropped.train()(x), plain.train()(x))
    assert torch.equal(dropped.eval()(x), plain.eval()(x))


def test_without_dropout_the_lora_branch_reads_x_itself():
    """No dropout module at all (not Dropout(0)): the branch shares x, and backward its one buffer."""
    assert isinstance(L.LoRALinear(nn.Linear(4, 4)).lora_dropout, nn.Identity)
    assert isinstance(L.LoRALinear(nn.Linear(4, 4), dropout=0.1).lora_dropout, nn.Dropout)


def test_lora_params_follow_weight_dtype_and_identity():
    linear = nn.Linear(5, 7, dtype=torch.float64)
    layer = L.LoRALinear(linear, r=3)
    assert layer.weight is linear.weight and layer.bias is linear.bias
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.lora_A.shape == (3, 5) and layer.lora_B.shape == (7, 3)
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float64
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad


@pytest.mark.parametrize("std", [1.0, 0.02, 3.0])
def test_init_distributions(std):
    torch.manual_seed(0)
    layer = L.LoRALinear(nn.Linear(400, 300), r=64)  # kaiming-uniform(a=sqrt(5)): U(-1/sqrt(in), 1/sqrt(in))
    bound = 1 / 400**0.5
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.99 * bound  # 25,600 draws reach the bound
    gauss = L.LoRALinear(nn.Linear(400, 300), r=64, init_std=std)
    assert abs(gauss.lora_A.std().item() / std - 1.0) < 0.02 and abs(gauss.lora_A.mean().item()) < 0.02 * std
    gauss.lora_B.data.fill_(1.0)
    gauss.reset_lora_parameters(init_std=std)  # re-initialising draws afresh and zeroes B
    assert abs(gauss.lora_A.std().item() / std - 1.0) < 0.02 and torch.count_nonzero(gauss.lora_B) == 0


def test_alpha_defaults_to_r():
    """alpha = r unless given, so the scale is 1 (as loralib and the paper's default)."""
    layer = L.LoRALinear(nn.Linear(4, 4), r=4)
    assert layer.alpha == 4 and layer.scale == 1.0
    assert L.LoRALinear(nn.Linear(4, 4), r=9, use_rslora=True).scale == pytest.approx(3.0)  # 9 / sqrt(9)
    model = L.add_lora(mlp(), r=3)
    assert all(layer.alpha == 3 and layer.scale == 1.0 for _, layer in L.lora_layers(model))


def test_extra_repr():
    text = repr(L.LoRALinear(nn.Linear(4, 3), r=2, alpha=4))
    assert "bias=False" in repr(L.LoRALinear(nn.Linear(4, 3, bias=False), r=2))
    for part in ("in_features=4", "out_features=3", "bias=True", "r=2", "alpha=4", "scale=2", "merged=False"):
        assert part in text


# --- merge / unmerge ----------------------------------------------------------------------


@given(cases())
def test_merge_matches_unmerged_and_unmerge_restores(case):
    linear, layer, x = make(case)
    layer.eval()
    y = layer(x)
    W, delta = linear.weight.detach().clone(), layer.delta_weight().detach()
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer.weight, W + delta, **TOL[case.dtype])
    torch.testing.assert_close(layer(x), y, **TOL[case.dtype])
    layer.unmerge()
    assert not layer.merged
    bound = torch.finfo(case.dtype).eps * (W.abs() + delta.abs())
    assert ((layer.weight - W).abs() <= bound).all()
    torch.testing.assert_close(layer(x), y, **TOL[case.dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_unmerge_bound_per_dtype(dtype):
    """The documented bound: |unmerge(merge(W)) - W| <= eps(dtype) * (|W| + |ΔW|)."""
    torch.manual_seed(0)
    layer = L.LoRALinear(nn.Linear(64, 48, dtype=dtype), r=8, alpha=16)
    nn.init.normal_(layer.lora_B, std=0.5)
    W = layer.weight.detach().clone()
    delta = L.lora_delta(layer.lora_A.float(), layer.lora_B.float(), layer.scale)
    for _ in range(3):  # repeated cycles stay within the bound of one cycle's drift from W each
        layer.merge()
        layer.unmerge()
        err = (layer.weight.double() - W.double()).abs()
        bound = torch.finfo(dtype).eps * (W.double().abs() + delta.double().abs()) * 3
        assert (err <= bound).all()
    layer.merge(); layer.unmerge()  # noqa: E702
    one_cycle = torch.finfo(dtype).eps * (layer.weight.double().abs() + delta.double().abs())
    W2 = layer.weight.detach().clone()
    layer.merge(); layer.unmerge()  # noqa: E702
    assert ((layer.weight.double() - W2.double()).abs() <= one_cycle).all()


@pytest.mark.parametrize("merged", [False, True])
def test_train_and_eval_never_touch_weights(merged):
    torch.manual_seed(0)
    layer = L.LoRALinear(nn.Linear(6, 4), r=2)
    nn.init.normal_(layer.lora_B)
    if merged:
        layer.merge()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    for _ in range(2):
        layer.eval()
        layer.train()
    assert layer.merged == merged
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())


@given(cases())
def test_merge_and_unload(case):
    linear, layer, x = make(case)
    model = nn.Sequential(layer, nn.ReLU())
    original = nn.Sequential(copy.deepcopy(linear), nn.ReLU())
    y = model(x)
    plain = L.merge_and_unload(model)
    assert not any(isinstance(m, L.LoRALinear) for m in plain.modules())
    assert not any(p.requires_grad for p in plain.parameters())  # the exported base stays frozen
    assert isinstance(model[0], L.LoRALinear) and not model[0].merged  # input left untouched
    torch.testing.assert_close(plain(x), y, **TOL[case.dtype])
    assert set(plain.state_dict()) == set(original.state_dict())
    original.load_state_dict(plain.state_dict())  # loadable with no LoRA code
    torch.testing.assert_close(original(x), y, **TOL[case.dtype])


def test_merge_and_unload_of_a_bare_layer_is_an_nn_linear():
    layer = randomize_B(nn.Sequential(L.LoRALinear(nn.Linear(4, 3), r=2)))[0]
    x = torch.randn(5, 4)
    plain = L.merge_and_unload(layer)
    assert type(plain) is nn.Linear
    torch.testing.assert_close(plain(x), layer(x))


def test_merge_and_unload_exports_what_the_model_computes_now():
    model = randomize_B(L.add_lora(mlp(torch.float64), r=2))
    x = torch.randn(5, 6, dtype=torch.float64)
    with L.lora_disabled(model):
        torch.testing.assert_close(L.merge_and_unload(model)(x), model(x))  # disabled: base W
    L.merge_lora(model)  # already merged: weight used as is
    y = model.eval()(x)
    plain = L.merge_and_unload(model, inplace=True)
    assert plain is model and not list(L.lora_layers(model))
    torch.testing.assert_close(plain(x), y)


# --- training, trainable parameters ---------------------------------------------------------


def test_defaults_and_chaining():
    """r = 8 by default (as PEFT), and the helpers that change a model return it."""
    assert L.LoRALinear(nn.Linear(16, 16)).r == 8
    model = mlp()
    assert L.add_lora(model) is model and all(layer.r == 8 for _, layer in L.lora_layers(model))
    assert L.mark_only_lora_as_trainable(model) is model
    assert L.load_lora_state_dict(model, L.lora_state_dict(model)) is model


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


def test_state_dict_keys_and_base_checkpoint_loading():
    base = mlp()
    model = L.add_lora(copy.deepcopy(base), r=2)
    lora_keys = {k for k in model.state_dict() if k.endswith(("lora_A", "lora_B"))}
    assert set(model.state_dict()) == set(base.state_dict()) | lora_keys
    result = model.load_state_dict(base.state_dict(), strict=False)
    assert set(result.missing_keys) == lora_keys and not result.unexpected_keys


def test_add_lora_targets_by_full_name_or_suffix():
    model = L.add_lora(mlp(), r=2, target_modules=["0", "2.0"])
    assert [n for n, _ in L.lora_layers(model)] == ["0", "2.0"]
    assert isinstance(model[3], nn.Linear)
    assert not model[3].weight.requires_grad  # everything but LoRA is frozen

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.v_proj, self.o_proj = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    blocks = L.add_lora(nn.ModuleList([Block(), Block()]), r=1, target_modules=["q_proj", "v_proj"])
    assert [n for n, _ in L.lora_layers(blocks)] == ["0.q_proj", "0.v_proj", "1.q_proj", "1.v_proj"]


# --- enable / disable ------------------------------------------------------------------------


def test_lora_disabled_restores_state_nested_and_on_exception():
    model = randomize_B(L.add_lora(mlp(), r=2))
    x = torch.randn(3, 6)
    y_lora = model(x)
    layers = [layer for _, layer in L.lora_layers(model)]
    layers[1].enabled = False  # a mixed state must come back as it was
    state = [layer.enabled for layer in layers]
    with L.lora_disabled(model):
        with L.lora_disabled(model):
            assert not any(layer.enabled for layer in layers)
        assert not any(layer.enabled for layer in layers)
    assert [layer.enabled for layer in layers] == state
    with pytest.raises(ZeroDivisionError):
        with L.lora_disabled(model):
            1 / 0
    assert [layer.enabled for layer in layers] == state
    L.set_lora_enabled(model, True)
    assert torch.equal(model(x), y_lora)
    base = mlp()
    with L.lora_disabled(model):
        assert torch.equal(model(x), base(x))


# --- adapters -------------------------------------------------------------------------------------


def test_lora_state_dict_round_trip():
    model = randomize_B(L.add_lora(mlp(), r=2))
    state = L.lora_state_dict(model)
    assert not any(isinstance(v, nn.Parameter) or v.requires_grad for v in state.values())  # like state_dict()
    assert set(state) == {f"{n}.{p}" for n, _ in L.lora_layers(model) for p in ("lora_A", "lora_B")}
    fresh = L.add_lora(mlp(), r=2)
    x = torch.randn(4, 6)
    assert not torch.equal(fresh(x), model(x))
    L.load_lora_state_dict(fresh, state)
    assert torch.equal(fresh(x), model(x))


def test_save_and_load_adapter_round_trip(tmp_path):
    model = randomize_B(L.add_lora(mlp(), r=2, alpha=3.0, target_modules=["2.0", "3"]))
    path = tmp_path / "adapter.pt"
    L.save_adapter(model, path)
    saved = torch.load(path, weights_only=True)
    settings = {"r": 2, "alpha": 3.0, "use_rslora": False}
    assert saved["config"] == {"2.0": settings, "3": settings}
    fresh = L.add_lora(mlp(), r=2, alpha=3.0, target_modules=["2.0", "3"])
    L.load_adapter(fresh, path)
    x = torch.randn(4, 6)
    assert torch.equal(fresh(x), model(x))


def test_adapter_wrong_keys_shapes_and_settings_raise(tmp_path):
    model = L.add_lora(mlp(), r=2)
    state = L.lora_state_dict(model)
    with pytest.raises(ValueError, match=r"missing \['0.lora_A'\]"):
        L.load_lora_state_dict(L.add_lora(mlp(), r=2), {k: v for k, v in state.items() if k != "0.lora_A"})
    with pytest.raises(ValueError, match="unexpected.*9.lora_A"):
        L.load_lora_state_dict(L.add_lora(mlp(), r=2), {**state, "9.lora_A": state["0.lora_A"]})
    with pytest.raises(ValueError, match=r"0.lora_A has shape \(2, 6\), the model.s is \(4, 6\)"):
        L.load_lora_state_dict(L.add_lora(mlp(), r=4), state)
    with pytest.raises(ValueError, match="no LoRA layers"):
        L.load_lora_state_dict(mlp(), state)

    path = tmp_path / "adapter.pt"
    L.save_adapter(model, path)
    with pytest.raises(ValueError, match="alpha"):
        L.load_adapter(L.add_lora(mlp(), r=2, alpha=8), path)
    with pytest.raises(ValueError, match="use_rslora"):
        L.load_adapter(L.add_lora(mlp(), r=2, use_rslora=True), path)
    with pytest.raises(ValueError, match="'0': in the file, not a LoRA layer"):
        L.load_adapter(L.add_lora(mlp(), r=2, target_modules=["2.0", "3"]), path)
    L.save_adapter(L.add_lora(mlp(), r=2, target_modules=["2.0", "3"]), tmp_path / "two.pt")
    with pytest.raises(ValueError, match="'0': a LoRA layer of the model, not in the file"):
        L.load_adapter(L.add_lora(mlp(), r=2), tmp_path / "two.pt")
    future = torch.load(path, weights_only=True)
    torch.save({**future, "version": 2}, tmp_path / "future.pt")
    with pytest.raises(ValueError, match="format version 2; this file reads version 1"):
        L.load_adapter(L.add_lora(mlp(), r=2), tmp_path / "future.pt")
    torch.save(L.lora_state_dict(model), tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="not a lora_min adapter file"):
        L.load_adapter(L.add_lora(mlp(), r=2), tmp_path / "plain.pt")


# --- the pure-tensor core ----------------------------------------------------------------------------


@given(cases(dtypes=[torch.float64]))
def test_core_same_numbers_on_numpy_and_torch(case):
    linear, layer, x = make(case)
    W, A, B = (t.detach() for t in (linear.weight, layer.lora_A, layer.lora_B))
    b = linear.bias.detach() if case.bias else None
    as_np = lambda t: None if t is None else t.numpy()  # noqa: E731
    y_torch = L.lora_forward(x, W, b, A, B, layer.scale)
    y_numpy = L.lora_forward(as_np(x), as_np(W), as_np(b), as_np(A), as_np(B), layer.scale)
    assert isinstance(y_numpy, np.ndarray)
    np.testing.assert_allclose(y_numpy, y_torch.numpy(), rtol=1e-12, atol=1e-12)
    delta_numpy = L.lora_delta(A.numpy(), B.numpy(), layer.scale)
    np.testing.assert_allclose(delta_numpy, layer.delta_weight().detach().numpy(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y_torch, layer(x).detach(), **TOL[case.dtype])  # the layer computes the core's math


@given(cases(dtypes=[torch.float64]))
def test_core_runs_unchanged_on_the_strict_array_api(case):
    """lora_delta / lora_update / lora_forward use only the Python array API standard."""
    xp = pytest.importorskip("array_api_strict")
    linear, layer, x = make(case)
    W, A, B = (t.detach() for t in (linear.weight, layer.lora_A, layer.lora_B))
    b = linear.bias.detach() if case.bias else None
    as_xp = lambda t: None if t is None else xp.asarray(t.numpy())  # noqa: E731
    y = L.lora_forward(as_xp(x), as_xp(W), as_xp(b), as_xp(A), as_xp(B), layer.scale)
    assert type(y).__module__.startswith("array_api_strict")
    y_numpy = L.lora_forward(x.numpy(), W.numpy(), None if b is None else b.numpy(), A.numpy(), B.numpy(), layer.scale)
    np.testing.assert_allclose(np.asarray(y), y_numpy, rtol=1e-15, atol=1e-15)
    np.testing.assert_allclose(np.asarray(L.lora_delta(as_xp(A), as_xp(B), layer.scale)),
                               L.lora_delta(A.numpy(), B.numpy(), layer.scale), rtol=1e-15, atol=1e-15)


# --- invalid use fails loudly -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(r=0), ValueError, "positive int"),
        (dict(r=-2), ValueError, "positive int"),
        (dict(r=1.5), ValueError, "positive int"),
        (dict(r=True), ValueError, "positive int"),
        (dict(alpha=0), ValueError, "alpha must be a positive number"),
        (dict(alpha=-1.0), ValueError, "alpha must be a positive number"),
        (dict(dropout=1.0), ValueError, r"dropout must be a number in \[0, 1\)"),
        (dict(dropout=-0.1), ValueError, r"dropout must be a number in \[0, 1\)"),
        (dict(init_std=0.0), ValueError, "init_std"),
    ],
)
def test_invalid_settings_raise(kwargs, error, match):
    with pytest.raises(error, match=match):
        L.LoRALinear(nn.Linear(3, 3), **kwargs)


def test_invalid_layer_states_raise():
    with pytest.raises(TypeError, match="LoRALinear adapts nn.Linear, got Conv1d"):
        L.LoRALinear(nn.Conv1d(3, 3, 1))
    layer = L.LoRALinear(nn.Linear(3, 3), r=1)
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()
    layer.merge()
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    with pytest.raises(RuntimeError, match="cannot disable a merged"):
        layer.enabled = False
    with pytest.raises(RuntimeError, match="would get no gradient"):
        layer.train()(torch.randn(2, 3))
    layer.lora_A.requires_grad_(False)  # only B trained (as in LoRA-FA): still refused
    with pytest.raises(RuntimeError, match="would get no gradient"):
        layer.train()(torch.randn(2, 3))
    layer.lora_A.requires_grad_(True)
    with torch.no_grad():
        layer(torch.randn(2, 3))  # inference while merged is fine
    layer.eval()(torch.randn(2, 3))
    with pytest.raises(RuntimeError, match="reset_lora_parameters.*merged"):
        layer.reset_lora_parameters()  # would change ΔW while W still holds the old one
    layer.unmerge()
    layer.enabled = False
    with pytest.raises(RuntimeError, match="disabled"):
        layer.merge()


def test_model_level_invalid_use_raises():
    model = L.add_lora(mlp(), r=2)
    with pytest.raises(ValueError, match="already has LoRA"):
        L.add_lora(model, r=2)
    with pytest.raises(ValueError, match=r"\['fc9'\] match no module.*the modules LoRA can adapt: \['0', '2.0', '3'\]"):
        L.add_lora(mlp(), target_modules=["0", "fc9"])
    with pytest.raises(TypeError, match="LoRALinear"):
        L.add_lora(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="no nn.Linear"):
        L.add_lora(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match="out_proj"):
        L.add_lora(nn.MultiheadAttention(8, 2), target_modules=["out_proj"])
    mha = nn.Sequential(nn.MultiheadAttention(8, 2), nn.Linear(8, 8))
    with pytest.warns(UserWarning, match="skipping '0.out_proj'") as warned:
        L.add_lora(mha)  # the default (every nn.Linear) skips the bypassed out_proj, and says so
    assert warned[0].filename == __file__  # attributed to the caller's line
    assert [n for n, _ in L.lora_layers(mha)] == ["1"]
    with pytest.raises(RuntimeError, match="not merged"):
        L.unmerge_lora(model)
    model[0].merge()  # one layer merged, the others not: unmerge_lora refuses before touching any
    W = model[0].weight.clone()
    with pytest.raises(RuntimeError, match=r"unmerge_lora: layers not merged: \['2.0', '3'\]"):
        L.unmerge_lora(model)
    assert model[0].merged and torch.equal(model[0].weight, W)
    model[0].unmerge()
    model[3].enabled = False
    with pytest.raises(RuntimeError, match=r"disabled \(enable first\): \['3'\]"):
        L.merge_lora(model)
    assert not any(layer.merged for _, layer in L.lora_layers(model))  # nothing half-done
    model[3].enabled = True
    L.merge_lora(model)
    with pytest.raises(RuntimeError, match="already merged"):
        L.merge_lora(model)
    with pytest.raises(RuntimeError, match="unmerge_lora"):
        L.set_lora_enabled(model, False)
    with pytest.raises(RuntimeError, match="unmerge_lora"):
        with L.lora_disabled(model):
            pass
    assert all(layer.enabled for _, layer in L.lora_layers(model))
    with pytest.raises(RuntimeError, match="merged layers"):
        L.load_lora_state_dict(model, L.lora_state_dict(model))


def test_merged_checkpoint_never_loads_into_unmerged_model():
    model = randomize_B(L.add_lora(mlp(), r=2))
    L.merge_lora(model)
    merged_state = copy.deepcopy(model.state_dict())
    assert "0.lora_merged" in merged_state
    L.unmerge_lora(model)
    unmerged_state = copy.deepcopy(model.state_dict())
    assert not any(k.endswith("lora_merged") for k in unmerged_state)
    with pytest.raises(RuntimeError, match="saved merged.*call merge"):
        model.load_state_dict(merged_state)
    with pytest.raises(RuntimeError, match="saved merged"):
        model.load_state_dict(merged_state, strict=False)
    L.merge_lora(model)
    with pytest.raises(RuntimeError, match="saved unmerged.*call unmerge"):
        model.load_state_dict(unmerged_state)
    model.load_state_dict(merged_state)  # merged into merged: consistent
    L.unmerge_lora(model)
    model.load_state_dict(unmerged_state)


def test_a_bare_layer_names_itself_in_the_merged_checkpoint_error():
    layer = L.LoRALinear(nn.Linear(4, 4), r=2)
    layer.merge()
    merged_state = layer.state_dict()
    layer.unmerge()
    with pytest.raises(RuntimeError, match="LoRALinear: the checkpoint was saved merged"):
        layer.load_state_dict(merged_state)


def test_merged_flag_survives_torch_save(tmp_path):
    model = randomize_B(L.add_lora(mlp(), r=2))
    L.merge_lora(model)
    torch.save(model.state_dict(), tmp_path / "full.pt")
    fresh = randomize_B(L.add_lora(mlp(), r=2))
    with pytest.raises(RuntimeError, match="saved merged"):
        fresh.load_state_dict(torch.load(tmp_path / "full.pt", weights_only=True))


# --- models as people bring them: linears that are not plain, shared modules, tied weights ------------


class ScaledLinear(nn.Linear):
    """An nn.Linear subclass that computes something else (as quantized linears do)."""

    def forward(self, x):
        return 2 * super().forward(x)


class Block(nn.Module):
    def __init__(self, out_cls=nn.Linear):
        super().__init__()
        self.q_proj, self.qq_proj, self.out_proj = nn.Linear(4, 4), nn.Linear(4, 4), out_cls(4, 4)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.out_proj(self.act(self.q_proj(x) + self.qq_proj(x)))


def test_targets_match_whole_dotted_names_never_substrings():
    model = L.add_lora(nn.Sequential(Block()), r=2, target_modules=["q_proj"])
    assert [n for n, _ in L.lora_layers(model)] == ["0.q_proj"]  # not 0.qq_proj
    with pytest.raises(ValueError, match=r"\['proj'\] match no module"):
        L.add_lora(nn.Sequential(Block()), target_modules=["proj"])
    with pytest.raises(ValueError, match=r"\['_proj'\] match no module"):
        L.add_lora(nn.Sequential(Block()), target_modules=["_proj"])


@pytest.mark.parametrize("make, match", [
    (lambda: nn.Sequential(Block(out_cls=ScaledLinear)),
     r"'0.out_proj': it is a ScaledLinear, a subclass with its own forward\(\)"),
    (lambda: nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(4, 4))), r"'0': it is parametrized"),
    (lambda: nn.Sequential(nn.utils.weight_norm(nn.Linear(4, 4))), r"'0': it has a weight that is not an nn.Parameter"),
    (lambda: nn.Sequential(nn.Linear(4, 4)).apply(lambda m: m.register_forward_hook(lambda *a: None)), r"'0': it has hooks"),
])
def test_add_lora_refuses_linears_it_cannot_replace_exactly(make, match):
    model = make()
    x = torch.randn(3, 4)
    before = model(x)
    with pytest.raises(ValueError, match=match):
        L.add_lora(model, r=2)  # every nn.Linear, the odd one included
    assert not list(L.lora_layers(model)) and torch.equal(model(x), before)  # refused before changing anything


def test_add_lora_names_the_class_of_a_target_that_is_not_a_linear():
    with pytest.raises(ValueError, match=r"'0.act': it is a ReLU, not an nn.Linear"):
        L.add_lora(nn.Sequential(Block()), target_modules=["q_proj", "act"])


def test_linear_subclasses_that_keep_linear_forward_are_adapted():
    from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

    model = L.add_lora(nn.Sequential(NonDynamicallyQuantizableLinear(4, 3)), r=2)
    assert isinstance(model[0], L.LoRALinear)


def test_a_module_registered_twice_gets_one_shared_lora_layer():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.Tanh(), shared)  # the same layer used twice
    L.add_lora(model, r=2)
    assert model[0] is model[2] and isinstance(model[0], L.LoRALinear) and model[0].shared_with == ()
    randomize_B(model)
    x = torch.randn(3, 4)
    y = model.eval()(x)
    plain = L.merge_and_unload(model)
    assert type(plain[0]) is nn.Linear and plain[0] is plain[2]  # replaced under both names, still shared
    torch.testing.assert_close(plain(x), y)
    L.merge_lora(model)  # one module, merged once: fine
    torch.testing.assert_close(model(x), y)


def test_tied_weights_refuse_in_place_merge_but_merge_and_unload_is_correct():
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    model[2].weight = model[0].weight  # tied
    L.add_lora(model, r=2, target_modules=["2"])
    assert model[2].shared_with == ("0.weight",)
    randomize_B(model)
    x = torch.randn(3, 4)
    y, W = model.eval()(x), model[0].weight.clone()
    with pytest.raises(RuntimeError, match=r"shared with \['0.weight'\].*merge_and_unload"):
        L.merge_lora(model)
    with pytest.raises(RuntimeError, match="shared with"):
        model[2].merge()
    assert torch.equal(model[0].weight, W) and not model[2].merged
    plain = L.merge_and_unload(model)
    torch.testing.assert_close(plain(x), y)
    assert torch.equal(plain[0].weight, W)
    bare = L.LoRALinear(nn.Linear(4, 4))  # a layer built by hand: the caller says what it shares
    bare.shared_with = ("embedding.weight",)
    with pytest.raises(RuntimeError, match="embedding.weight"):
        bare.merge()


# --- adapter files that are not adapters are refused, never unpickled -------------------------------


class Payload:
    """Unpickling this runs code: the canary file appears."""

    def __init__(self, canary):
        self.canary = canary

    def __reduce__(self):
        return (open, (self.canary, "w"))


def test_load_adapter_refuses_files_that_are_not_adapters(tmp_path):
    model = L.add_lora(mlp(), r=2)
    canary = tmp_path / "canary"
    torch.save({"format": "lora_min.adapter", "payload": Payload(str(canary))}, tmp_path / "pickled.pt")
    (tmp_path / "text.pt").write_text("root:x:0:0:root:/root:/bin/bash\n")
    L.save_adapter(model, tmp_path / "good.pt")
    (tmp_path / "truncated.pt").write_bytes((tmp_path / "good.pt").read_bytes()[:300])
    import pickle

    (tmp_path / "pickle.pkl").write_bytes(pickle.dumps({"format": "lora_min.adapter"}))
    torch.save({"format": "lora_min.adapter", "config": {}, "state_dict": {"0.lora_A": "not a tensor"}}, tmp_path / "odd.pt")
    for name in ("pickled.pt", "text.pt", "truncated.pt", "pickle.pkl", "odd.pt"):
        with pytest.raises(ValueError, match=f"{name} is not a lora_min adapter file") as error:
            L.load_adapter(model, tmp_path / name)
        assert "weights_only" not in str(error.value)
        if name == "pickled.pt":
            assert "never unpickled" in str(error.value)
    assert not canary.exists()  # the pickled payload never ran
    with pytest.raises(FileNotFoundError):
        L.load_adapter(model, tmp_path / "missing.pt")


def test_save_peft_adapter_needs_lora_layers_inside_a_model(tmp_path):
    with pytest.raises(ValueError, match="needs a model with LoRA layers inside it"):
        L.save_peft_adapter(mlp(), tmp_path)  # no LoRA layers at all
    with pytest.raises(ValueError, match="needs a model with LoRA layers inside it"):
        L.save_peft_adapter(L.LoRALinear(nn.Linear(4, 4)), tmp_path)  # a bare layer has no module name for PEFT
    assert not list(tmp_path.iterdir())  # nothing written


def write_peft_config(folder, **fields):
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["0"], "bias": "none", **fields}
    (folder / "adapter_config.json").write_text(__import__("json").dumps(config))


@pytest.mark.parametrize("config_text, weights, error, match", [
    ("[1, 2]", None, ValueError, "adapter_config.json is not a PEFT adapter config"),
    (None, None, FileNotFoundError, "holds neither adapter_model.safetensors nor adapter_model.bin"),
    (None, [1, 2], ValueError, "adapter_model.bin is not a PEFT adapter file: not a dict of tensors"),
    (None, {"base_model.model.0.lora_A.weight": "text"}, ValueError, "adapter_model.bin is not a PEFT adapter file"),
    ('{"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": "all-linear"}', None, ValueError,
     "'all-linear' is not supported: list the names"),
    ('{"peft_type": "LORA", "r": 2, "target_modules": ["0"]}', None, ValueError, "the field 'lora_alpha' is missing"),
])
def test_load_peft_adapter_refuses_files_that_are_not_peft_adapters(tmp_path, config_text, weights, error, match):
    if config_text is None:
        write_peft_config(tmp_path)
    else:
        (tmp_path / "adapter_config.json").write_text(config_text)
    if weights is not None:
        torch.save(weights, tmp_path / "adapter_model.bin")
    model = mlp()
    with pytest.raises(error, match=match):
        L.load_peft_adapter(model, tmp_path)
    assert not list(L.lora_layers(model))


def test_save_peft_adapter_refuses_what_peft_cannot_express(tmp_path):
    def model_of(**layers):
        model = nn.Module()
        for name, layer in layers.items():
            setattr(model, name, layer)
        return model

    for setting, odd in (("use_rslora", dict(use_rslora=True)), ("dropout", dict(dropout=0.1))):
        model = model_of(a=L.LoRALinear(nn.Linear(4, 4), **odd), b=L.LoRALinear(nn.Linear(4, 4)))
        with pytest.raises(ValueError, match=f"PEFT has one {setting} for all layers"):
            L.save_peft_adapter(model, tmp_path)
    # rank_pattern keys match the end of a name: "q" would also give "inner.q" rank 2
    model = model_of(q=L.LoRALinear(nn.Linear(4, 4), r=2), inner=model_of(q=L.LoRALinear(nn.Linear(4, 4), r=4)),
                     other=L.LoRALinear(nn.Linear(4, 4), r=4))
    with pytest.raises(ValueError, match="cannot express the rank and alpha of 'inner.q'"):
        L.save_peft_adapter(model, tmp_path)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("alpha, written", [(2.5, 2.5), (3.0, 3)])
def test_save_peft_adapter_writes_alpha_exactly(tmp_path, alpha, written):
    L.save_peft_adapter(L.add_lora(mlp(), r=2, alpha=alpha), tmp_path)
    config = __import__("json").loads((tmp_path / "adapter_config.json").read_text())
    assert config["lora_alpha"] == written and type(config["lora_alpha"]) is type(written)
    assert config["target_modules"] == ["0", "3"]  # short names: "0" also selects "2.0", as it should here


def test_peft_round_trip_keeps_a_module_registered_twice_shared(tmp_path):
    shared = nn.Linear(4, 4)
    model = randomize_B(L.add_lora(nn.Sequential(shared, nn.Tanh(), shared), r=2))
    L.save_peft_adapter(model, tmp_path)
    assert __import__("json").loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == ["0", "2"]
    fresh = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    fresh.append(fresh[0])
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" not in k})
    L.load_peft_adapter(fresh, tmp_path)
    assert fresh[0] is fresh[2] and isinstance(fresh[0], L.LoRALinear)
    x = torch.randn(3, 4)
    torch.testing.assert_close(fresh(x), model(x))


def test_load_peft_adapter_refuses_other_settings_for_a_module_registered_twice(tmp_path):
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.Tanh(), shared)
    write_peft_config(tmp_path, target_modules=["0", "2"], rank_pattern={"2": 3})
    torch.save({f"base_model.model.{name}.lora_{AB}.weight": torch.zeros(shape) for name, r in (("0", 2), ("2", 3))
                for AB, shape in (("A", (r, 4)), ("B", (4, r)))}, tmp_path / "adapter_model.bin")
    with pytest.raises(ValueError, match="'2' and '0' are the same module but are asked for different LoRA settings"):
        L.load_peft_adapter(model, tmp_path)


def test_load_peft_adapter_refuses_a_pickled_bin_file(tmp_path):
    write_peft_config(tmp_path)
    canary = tmp_path / "canary"
    torch.save({"base_model.model.0.lora_A.weight": Payload(str(canary))}, tmp_path / "adapter_model.bin")
    model = mlp()
    with pytest.raises(ValueError, match="adapter_model.bin is not a PEFT adapter file") as error:
        L.load_peft_adapter(model, tmp_path)
    assert "weights_only" not in str(error.value) and not canary.exists() and not list(L.lora_layers(model))


# --- torch.compile -----------------------------------------------------------------------------------


@pytest.mark.slow  # compiles several graphs with inductor; the default run (and CI) includes it
def test_torch_compile_fullgraph_matches_eager_and_sees_state_changes():
    torch._dynamo.reset()
    base = mlp()
    model = randomize_B(L.add_lora(copy.deepcopy(base), r=2))
    compiled = torch.compile(model, fullgraph=True)  # fullgraph: any graph break is an error
    x = torch.randn(4, 6)

    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_eager, y_compiled = model(x1), compiled(x2)
    torch.testing.assert_close(y_compiled, y_eager)
    eager_grads = torch.autograd.grad(y_eager.sum(), [x1] + [p for p in model.parameters() if p.requires_grad])
    compiled_grads = torch.autograd.grad(y_compiled.sum(), [x2] + [p for p in model.parameters() if p.requires_grad])
    for a, b in zip(eager_grads, compiled_grads):
        torch.testing.assert_close(a, b)

    # State changes must take effect on the very next call, never a stale graph. A stale
    # graph would be off by the whole LoRA update; compiled kernels may round differently
    # from eager by an ulp or two (torch 2.4 does), which exactness does not promise.
    eps = torch.finfo(torch.float32).eps
    close_to_eager = lambda a, b: torch.testing.assert_close(a, b, rtol=4 * eps, atol=4 * eps)  # noqa: E731
    with torch.no_grad():
        L.set_lora_enabled(model, False)
        close_to_eager(compiled(x), base(x))
        L.set_lora_enabled(model, True)
        torch.testing.assert_close(compiled(x), y_eager)
        with L.lora_disabled(model):
            close_to_eager(compiled(x), base(x))
        model.eval()
        L.merge_lora(model)
        torch.testing.assert_close(compiled(x), y_eager)
        L.unmerge_lora(model)
        for _, layer in L.lora_layers(model):
            layer.lora_B.zero_()  # changed weights, not only flags
        torch.testing.assert_close(compiled(x), base(x))
