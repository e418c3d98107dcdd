"""The specification of LoRALinear and of the math it computes, as property-based tests.

First, the lesson: lora_min.py's first 300 lines, cut and imported on their own, are a complete
LoRALinear equal to the plain math and to the `parametrize` LoRA. What every layer type shares
(above all: outputs and gradients equal the parametrize LoRA's) is one test per behaviour in
test_layers.py, parametrized over linear, embedding and conv.

Sections here: the lesson; autograd of the plain math; complete
under autograd (gradcheck, double backward, forward mode, torch.func, vmap); exact
identities and init; merge / unmerge; enable / disable and dropout; torch.compile;
the pure-tensor core on NumPy and the array API. Model-level helpers: test_model.py;
refusals: test_misuse.py; PEFT's format: test_peft.py.

Tolerances (conftest.TOL, rtol / atol): float64 1e-10 / 1e-10 (near-exact: only
summation order differs), float32 1e-4 / 1e-4. Values are O(1) to O(10) and dot
products are at most 24 terms long.
"""

import ast
import copy
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, strategies as st
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, stack_module_state, vmap
from torch.nn.utils import parametrize
from torch.utils._python_dispatch import TorchDispatchMode

import lora_min as L
from conftest import FLOAT_DTYPES, TOL, cases, make, mlp, randomize_B

try:
    import array_api_strict as xp
except ImportError:  # requirements-test.txt installs it; CI never skips
    xp = None
needs_array_api_strict = pytest.mark.skipif(xp is None, reason="needs array-api-strict")

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


def weights_like(y, seed):
    """Random weights for the loss (y * w).sum(): every output element gets its own gradient."""
    return torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)


# --- the lesson: the first 300 lines of lora_min.py are a complete, runnable LoRA ----------------------


def the_lesson():
    """lora_min.py cut before its first top-level statement that starts after line 300 (the
    decorators of a decorated definition count as its start), imported as a module of its own:
    what a reader who stops there has."""
    path = Path(L.__file__)
    source = path.read_text()
    starts = [min([n.lineno] + [d.lineno for d in getattr(n, "decorator_list", [])]) for n in ast.parse(source).body]
    cut = next((line for line in starts if line > 300), None)
    assert cut is not None, "lora_min.py is no longer than its lesson"
    module = types.ModuleType("lora_min_lesson")
    exec(compile("\n".join(source.splitlines()[: cut - 1]), f"{path} (lines 1-{cut - 1})", "exec"), module.__dict__)
    return module


@pytest.fixture(scope="module")
def lesson():
    return the_lesson()


def test_the_lesson_is_the_first_300_lines_and_holds_the_layer(lesson):
    assert {"lora_delta", "lora_update", "lora_forward", "LoRALayer", "LoRALinear"} <= set(vars(lesson))
    assert "add_lora" not in vars(lesson)  # the plumbing comes after it


@given(cases(dtypes=[torch.float64]), st.floats(0.0, 0.5, allow_subnormal=False))
def test_the_lessons_layer_equals_the_plain_math_and_parametrize(lesson, case, dropout):
    """Outputs and gradients of the cut file's LoRALinear (its own forward: no fast path exists
    there) equal autograd of lora_forward and the parametrize LoRA, with dropout's mask shared."""
    linear, full_layer, x = make(case)
    layer = lesson.LoRALinear(copy.deepcopy(linear), r=case.r, alpha=case.alpha, use_rslora=case.use_rslora,
                              dropout=dropout)
    layer.load_state_dict(full_layer.state_dict())
    torch.manual_seed(0)
    y = layer(x)
    torch.manual_seed(0)
    x_lora = layer.lora_dropout(x)  # the same mask
    expected = L.lora_forward(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scale) + (
        L.lora_update(x_lora - x, layer.lora_A, layer.lora_B, layer.scale))
    torch.testing.assert_close(y, expected, **TOL[case.dtype])
    w = weights_like(y, 1)
    ours = torch.autograd.grad((y * w).sum(), [layer.lora_A, layer.lora_B])
    theirs = torch.autograd.grad((expected * w).sum(), [layer.lora_A, layer.lora_B])
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **TOL[case.dtype])
    if dropout == 0:
        ref, lora = parametrize_reference(linear, layer.lora_A, layer.lora_B, layer.scale)
        torch.testing.assert_close(layer(x), ref(x), **TOL[case.dtype])


def test_the_lessons_layer_trains_merges_unmerges_disables_and_guards_its_states(lesson, tmp_path):
    torch.manual_seed(0)
    base = nn.Linear(8, 4)
    W = base.weight.detach().clone()
    layer = lesson.LoRALinear(base, r=2, alpha=4)
    assert not base.weight.requires_grad and layer.lora_A.requires_grad and layer.lora_B.requires_grad
    x = torch.randn(16, 8)
    optimizer = torch.optim.SGD([layer.lora_A, layer.lora_B], lr=0.1)
    for _ in range(3):  # trains: the loss falls, W stays W bit for bit
        optimizer.zero_grad()
        loss = (layer(x) - 1).pow(2).mean()
        loss.backward()
        optimizer.step()
    assert (layer(x) - 1).pow(2).mean() < loss and torch.equal(layer.weight, W)
    assert layer.lora_B.abs().sum() > 0
    y = layer(x).detach()
    layer.enabled = False  # disabled: exactly the base layer
    assert torch.equal(layer(x), F.linear(x, W, base.bias))
    layer.enabled = True
    layer.eval()
    layer.merge()
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    with pytest.raises(RuntimeError, match="cannot disable a merged LoRA layer"):
        layer.enabled = False
    merged_checkpoint = copy.deepcopy(layer.state_dict())
    layer.unmerge()
    torch.testing.assert_close(layer.weight, W, rtol=0, atol=1e-6)
    with pytest.raises(RuntimeError, match="unmerge\\(\\) on a LoRA layer that is not merged"):
        layer.unmerge()
    with pytest.raises(RuntimeError, match="the checkpoint was saved merged"):
        layer.load_state_dict(merged_checkpoint)
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-6)


# --- equivalence with the parametrize approach and with autograd of the plain math ---------------------


@given(cases())
def test_raw_lora_gradients_are_contiguous(case):
    """The raw gradients (as DDP's hooks see them, before .grad's layout fix-up) are contiguous like the params."""
    _, layer, x = make(case)
    y = layer(x)
    raw = torch.autograd.grad((y * weights_like(y, case.seed + 1)).sum(), [layer.lora_A, layer.lora_B])
    assert all(g.is_contiguous() for g in raw)


@given(cases(), st.booleans())
def test_all_five_gradients_equal_autograd_of_the_core_math(case, transposed_input):
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


def graph_names(y):
    """The names of the autograd nodes behind y."""
    names, nodes = set(), [y.grad_fn]
    while nodes:
        node = nodes.pop()
        if node is not None and type(node).__name__ not in names:
            names.add(type(node).__name__)
            nodes += [next_node for next_node, _ in node.next_functions]
    return names


def test_the_fast_path_runs_on_plain_tensors_and_the_lessons_forward_elsewhere():
    """use_fast_path: a layer of one dtype trains through _LoRALinearFunction (so the equalities in this file
    test its hand-written backward); float32 adapters on a bfloat16 base, autocast, forward-mode AD (a dual
    input), a frozen lora_A and use_fast_path = False run the lesson's forward (autograd of F.linear)."""
    torch.manual_seed(0)
    layer, x = L.LoRALinear(nn.Linear(6, 4), r=2), torch.randn(3, 6, requires_grad=True)
    assert "_LoRALinearFunctionBackward" in graph_names(layer(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert "_LoRALinearFunctionBackward" not in graph_names(layer(x))
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x, torch.ones_like(x))
        assert "_LoRALinearFunctionBackward" not in graph_names(layer(dual))
    layer.lora_A.requires_grad_(False)
    assert "_LoRALinearFunctionBackward" not in graph_names(layer(x))
    layer.lora_A.requires_grad_(True)
    layer.use_fast_path = False
    assert "_LoRALinearFunctionBackward" not in graph_names(layer(x))
    half = L.LoRALinear(nn.Linear(6, 4, dtype=torch.bfloat16), r=2)  # float32 adapter
    assert "_LoRALinearFunctionBackward" not in graph_names(half(x.to(torch.bfloat16)))


def fast_and_lesson(layer):
    """The layer, and a copy of it that runs the lesson's forward alone (use_fast_path = False)."""
    lesson = copy.deepcopy(layer)
    lesson.use_fast_path = False
    return layer, lesson


def test_the_fast_path_equals_the_lesson_under_forward_over_reverse_and_saves_no_more():
    """Forward mode over a plain backward (a Hessian-vector product), with dropout (the same mask); and what
    backward keeps: with dropout and W frozen, not x itself (only the dropped-out input, as the lesson)."""
    torch.manual_seed(0)
    fast, lesson = fast_and_lesson(randomize_B(L.LoRALinear(nn.Linear(5, 4, dtype=torch.float64), r=2, dropout=0.3)))
    x, vA, vB = (torch.randn(*shape, dtype=torch.float64) for shape in ((3, 5), (2, 5), (4, 2)))
    results = []
    for layer in (fast, lesson):
        with torch.autograd.forward_ad.dual_level():
            A = torch.autograd.forward_ad.make_dual(layer.lora_A.detach().requires_grad_(), vA)
            B = torch.autograd.forward_ad.make_dual(layer.lora_B.detach().requires_grad_(), vB)
            torch.manual_seed(1)
            y = functional_call(layer, {"lora_A": A, "lora_B": B}, (x,))
            grads = torch.autograd.grad((y ** 2).sum(), (A, B))
            results.append([t for g in grads for t in torch.autograd.forward_ad.unpack_dual(g)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, **TOL[torch.float64])
    saved = []
    for layer in (fast, lesson):
        ptrs = set()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: ptrs.add(t.untyped_storage().data_ptr()) or t,
                                                      lambda t: t):
            layer(x)
        saved.append(ptrs - {p.untyped_storage().data_ptr() for p in layer.parameters()})
    assert x.untyped_storage().data_ptr() not in saved[0] and len(saved[0]) <= len(saved[1])


class AtenOps(TorchDispatchMode):
    """The aten ops that run inside it: (name, such as "add.Tensor", the number of elements of its output)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append((func.__name__, out.numel() if isinstance(out, torch.Tensor) else 0))
        return out


def test_the_fast_path_adds_inside_the_matmuls():
    """Without dropout, a training step forms y and dL/dx once each, each LoRA part added inside by addmm_, where
    the lesson's autograd forms x W^T + b and h B^T (and g W and dh A) apart and adds them (full-size adds)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, requires_grad=True)
    adds = []
    for layer in fast_and_lesson(randomize_B(L.LoRALinear(nn.Linear(6, 5), r=2))):
        with AtenOps() as ops:
            layer(x).backward(torch.randn(2, 3, 5))
        adds.append([name for name, n in ops.ops if name.split(".")[0] in ("add", "add_") and n in (30, 36)])
    assert adds[0] == [] and adds[1], adds


@pytest.mark.parametrize("kind", ["x changed in place", "tensor scale", "sparse input", "in_features=0", "no rows",
                                  "jit.trace"])
def test_the_fast_path_runs_what_the_lesson_runs(kind, tmp_path):
    """Cases an adversarial review found raising or losing a gradient on the fast path alone."""
    torch.manual_seed(0)
    fast, lesson = fast_and_lesson(randomize_B(L.LoRALinear(nn.Linear(0 if kind == "in_features=0" else 5, 4), r=2,
                                                            dropout=0.1 if kind == "x changed in place" else 0.0)))
    x = torch.randn(0 if kind == "no rows" else 3, fast.in_features)
    outputs = []
    for layer in (fast, lesson):
        if kind == "tensor scale":
            layer.scale = nn.Parameter(torch.tensor(2.0))
        if kind == "jit.trace":
            path = tmp_path / "traced.pt"
            torch.jit.save(torch.jit.trace(layer.eval(), x), path)
            outputs.append(torch.jit.load(path)(x))
            continue
        torch.manual_seed(1)
        xi = x.to_sparse() if kind == "sparse input" else x.clone()
        y = layer(xi)
        if kind == "x changed in place":
            xi.add_(1.0)
        params = [p for p in layer.parameters() if p.requires_grad]
        outputs += [y, *torch.autograd.grad((y ** 2).sum(), params)]
    for a, b in zip(outputs[:len(outputs) // 2], outputs[len(outputs) // 2:]):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", ["x changed in place, A frozen", "W changed in place, x without grad",
                                  "3-D output changed in place", "2-D output detached in place", "complex"])
def test_the_fast_path_keeps_and_returns_what_autograd_would(kind):
    """What an adversarial review found the fast path keeping (and so refusing a later in-place change) or
    returning (a view) where autograd of the lesson does not; and a complex layer, which takes the lesson."""
    torch.manual_seed(0)
    fast, lesson = fast_and_lesson(randomize_B(L.LoRALinear(nn.Linear(5, 4, dtype=torch.float64), r=2)))
    x = torch.randn(2, 3, 5, dtype=torch.float64) if kind.startswith("3-D") else torch.randn(3, 5, dtype=torch.float64)
    results = []
    for layer in (fast, lesson):
        if kind == "complex":  # (values with imaginary parts: backward must conjugate)
            layer.to(torch.complex128)
            with torch.no_grad():
                layer.lora_A.mul_(1 - 2j), layer.lora_B.mul_(1 + 1j), layer.weight.mul_(1 + 0.5j)
        layer.lora_A.requires_grad_(kind != "x changed in place, A frozen")
        xi = x * (1 + 0.5j) if kind == "complex" else x
        xi = (xi.requires_grad_() if kind != "W changed in place, x without grad" else xi) * 1
        y = layer(xi)
        if kind.startswith("x changed"):
            xi.mul_(2)
        if kind.startswith("W changed"):
            with torch.no_grad():
                layer.weight.mul_(2)
        if kind.endswith("changed in place"):
            y = y.mul_(2)
        if kind.endswith("detached in place"):
            results.append([y.detach_()])
            continue
        params = [p for p in layer.parameters() if p.requires_grad]
        results.append([y, *torch.autograd.grad((y.abs() ** 2).sum(), params)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


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


# --- complete under autograd: double backward, forward mode, torch.func ------------------------


def lora_fn(x, x_lora, W, b, A, B, scale):
    """LoRALinear's own adapted forward, run on these tensors (x_lora: the LoRA branch's input,
    what dropout(x) gave, or None for x itself)."""
    state = types.SimpleNamespace(weight=W, bias=b, lora_A=A, lora_B=B, scale=scale, use_fast_path=True,
                                  lora_dropout=lambda x: x if x_lora is None else x_lora)
    state.base_forward = lambda x: L.LoRALinear.base_forward(state, x)
    return L.LoRALinear.adapted_forward(state, x)


@st.composite
def function_inputs(draw):
    """Float64 inputs of LoRALinear's forward, every one requiring grad; x_lora separate
    (the dropout path) or None (the same tensor as x)."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    in_f, out_f, r = draw(st.integers(1, 5)), draw(st.integers(1, 5)), draw(st.sampled_from([1, 2, 3, 16]))
    batch = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    randn = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)  # noqa: E731
    x = randn(*batch, in_f)
    x_lora = randn(*batch, in_f) if draw(st.booleans()) else None
    b = randn(out_f) if draw(st.booleans()) else None
    return (x, x_lora, randn(out_f, in_f), b, randn(r, in_f), randn(out_f, r), draw(st.floats(0.25, 4.0)))


@given(function_inputs())
def test_gradcheck_and_gradgradcheck_float64(inputs):
    """Numerical derivatives against backward, double backward (reverse over reverse and
    forward over reverse), forward mode (the lesson's: the fast path has no jvp) and batched gradients
    (vmap over backward)."""
    # torch's own F.linear(x, W) of a 1-D x fails vmap over forward mode ("a forward gradient
    # that has a different size"), with or without LoRA: that check runs for batched x only.
    assert torch.autograd.gradcheck(lora_fn, inputs, check_forward_ad=True, check_batched_grad=True,
                                    check_batched_forward_grad=inputs[0].dim() > 1)
    assert torch.autograd.gradgradcheck(lora_fn, inputs, check_fwd_over_rev=True, check_batched_grad=True)


@given(cases(dtypes=[torch.float64]))
def test_gradient_penalty_double_backward_equals_the_plain_math(case):
    """A gradient penalty (create_graph=True) differentiates the layer's backward."""
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


def test_double_backward_through_lora_B_alone_equals_the_plain_math():
    """A frozen, B trained: dL/dB = g^T h depends on x through h, which a penalty on dL/dB differentiates."""
    torch.manual_seed(0)
    layer = randomize_B(L.LoRALinear(nn.Linear(5, 4, dtype=torch.float64), r=2))
    layer.lora_A.requires_grad_(False)
    x = torch.randn(3, 5, dtype=torch.float64)

    def penalised(forward):
        x1 = x.clone().requires_grad_()
        (dB,) = torch.autograd.grad((forward(x1) ** 2).sum(), layer.lora_B, create_graph=True)
        return torch.autograd.grad((dB ** 2).sum(), x1)

    ours = penalised(layer)
    expected = penalised(lambda x: L.lora_forward(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scale))
    torch.testing.assert_close(ours, expected, **TOL[torch.float64])


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


def test_torch_func_grad_equals_the_plain_math():
    model = small_lora_model()
    x = torch.randn(4, 5, dtype=torch.float64)
    params = adapter_params(model)

    def loss(p, x):
        return (functional_call(model, p, (x,)) ** 2).sum()

    ours = grad(loss)(params, x)
    expected = torch.autograd.grad((plain_math_model(model)(x) ** 2).sum(), list(params.values()))
    for name, e in zip(params, expected):
        torch.testing.assert_close(ours[name], e, **TOL[torch.float64])


@pytest.mark.parametrize("jacobian", [jacrev, jacfwd], ids=["jacrev", "jacfwd"])
def test_torch_func_jacobian_equals_the_plain_math(jacobian):
    model = small_lora_model()
    x = torch.randn(4, 5, dtype=torch.float64)
    expected = torch.autograd.functional.jacobian(plain_math_model(model), x)
    torch.testing.assert_close(jacobian(model)(x), expected, **TOL[torch.float64])


def test_torch_func_hessian_equals_the_plain_math():
    model = small_lora_model()
    reference = plain_math_model(model)
    x = torch.randn(4, 5, dtype=torch.float64)
    hess = hessian(lambda x: (model(x) ** 3).sum())(x)
    expected = torch.autograd.functional.hessian(lambda x: (reference(x) ** 3).sum(), x)
    torch.testing.assert_close(hess, expected, **TOL[torch.float64])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_per_sample_gradients_with_vmap_equal_a_loop(dtype):
    """vmap(grad(...)): the per-example gradients of differentially private training."""
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
    models = [small_lora_model(seed) for seed in range(3)]
    for m in models[1:]:
        m.load_state_dict({**models[0].state_dict(), **L.lora_state_dict(m)})  # one base, three adapters
    adapters, _ = stack_module_state(models)
    adapters = {k: v for k, v in adapters.items() if "lora_" in k}
    x = torch.randn(4, 5, dtype=torch.float64)
    ys = vmap(lambda p: functional_call(models[0], p, (x,)))(adapters)
    for i, m in enumerate(models):
        torch.testing.assert_close(ys[i], m(x), **TOL[torch.float64])


def test_vmap_over_the_frozen_weight_alone_equals_a_loop():
    layer = randomize_B(nn.Sequential(L.LoRALinear(nn.Linear(4, 3, bias=False, dtype=torch.float64), r=2)))[0]
    Ws = torch.randn(5, 3, 4, dtype=torch.float64)
    x = torch.randn(2, 4, dtype=torch.float64)
    batched = vmap(lambda W: functional_call(layer, {"weight": W}, (x,)))(Ws)
    torch.testing.assert_close(batched, torch.stack([functional_call(layer, {"weight": W}, (x,)) for W in Ws]))


# --- exact identities, shapes and init -------------------------------------------------------------


@given(cases())
def test_scale_is_alpha_over_r_or_over_sqrt_r_with_rslora(case):
    _, layer, _ = make(case)
    assert layer.scale == pytest.approx(case.alpha / (case.r**0.5 if case.use_rslora else case.r))


@given(cases())
def test_delta_weight_is_B_at_A_times_scale(case):
    _, layer, _ = make(case)
    expected = case.alpha / (case.r**0.5 if case.use_rslora else case.r)
    torch.testing.assert_close(layer.delta_weight(), layer.lora_B @ layer.lora_A * expected, **TOL[case.dtype])


@pytest.mark.parametrize("make_layers, alpha, scale", [
    (lambda: [L.LoRALinear(nn.Linear(4, 4), r=4)], 4, 1.0),
    (lambda: [L.LoRALinear(nn.Linear(4, 4), r=9, use_rslora=True)], 9, 3.0),  # 9 / sqrt(9)
    (lambda: [layer for _, layer in L.lora_layers(L.add_lora(mlp(), r=3))], 3, 1.0),
], ids=["LoRALinear", "LoRALinear rslora", "add_lora"])
def test_alpha_defaults_to_r(make_layers, alpha, scale):
    """alpha = r unless given, so the scale is 1 (as loralib and the paper's default)."""
    layers = make_layers()
    assert layers and all(layer.alpha == alpha and layer.scale == scale for layer in layers)


def test_default_init_of_A_is_kaiming_uniform():
    torch.manual_seed(0)
    layer = L.LoRALinear(nn.Linear(400, 300), r=64)  # kaiming-uniform(a=sqrt(5)): U(-1/sqrt(in), 1/sqrt(in))
    bound = 1 / 400**0.5
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.99 * bound  # 25,600 draws reach the bound


@pytest.mark.parametrize("std", [1.0, 0.02, 3.0])
def test_init_std_draws_A_from_a_normal_of_that_std(std):
    torch.manual_seed(0)
    layer = L.LoRALinear(nn.Linear(400, 300), r=64, init_std=std)
    assert abs(layer.lora_A.std().item() / std - 1.0) < 0.02 and abs(layer.lora_A.mean().item()) < 0.02 * std


@pytest.mark.parametrize("std", [1.0, 0.02, 3.0])
def test_reset_lora_parameters_draws_A_afresh_and_zeroes_B(std):
    torch.manual_seed(0)
    layer = L.LoRALinear(nn.Linear(400, 300), r=64, init_std=std)
    layer.lora_B.data.fill_(1.0)
    layer.reset_lora_parameters(init_std=std)
    assert abs(layer.lora_A.std().item() / std - 1.0) < 0.02 and torch.count_nonzero(layer.lora_B) == 0


def test_default_rank_is_8_as_in_peft():
    assert L.LoRALinear(nn.Linear(16, 16)).r == 8


def test_extra_repr_shows_the_shapes_and_settings():
    text = repr(L.LoRALinear(nn.Linear(4, 3), r=2, alpha=4))
    assert "bias=False" in repr(L.LoRALinear(nn.Linear(4, 3, bias=False), r=2))
    for part in ("in_features=4", "out_features=3", "bias=True", "r=2", "alpha=4", "scale=2", "merged=False"):
        assert part in text


# --- merge / unmerge ----------------------------------------------------------------------


def merge_case(case):
    """(the drawn layer in eval mode, x, its unmerged output y, W, ΔW)."""
    linear, layer, x = make(case)
    layer.eval()
    return layer, x, layer(x), linear.weight.detach().clone(), layer.delta_weight().detach()


def unmerge_bound(W, delta, dtype, cycles=1):
    """The documented bound on |W after merge + unmerge cycles - W|: cycles * eps(dtype) * (|W| + |ΔW|)."""
    return cycles * torch.finfo(dtype).eps * (W.double().abs() + delta.double().abs())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_unmerge_bound_per_dtype(dtype):
    """The documented bound: |unmerge(merge(W)) - W| <= eps(dtype) * (|W| + |ΔW|), in every dtype,
    and repeated cycles drift by at most one cycle's bound each."""
    torch.manual_seed(0)
    layer = L.LoRALinear(nn.Linear(64, 48, dtype=dtype), r=8, alpha=16)
    nn.init.normal_(layer.lora_B, std=0.5)
    W = layer.weight.detach().clone()
    delta = L.lora_delta(layer.lora_A.float(), layer.lora_B.float(), layer.scale)
    for _ in range(3):  # repeated cycles stay within the bound of one cycle's drift from W each
        layer.merge()
        layer.unmerge()
        assert ((layer.weight.double() - W.double()).abs() <= unmerge_bound(W, delta, dtype, cycles=3)).all()
    layer.merge(); layer.unmerge()  # noqa: E702
    W2 = layer.weight.detach().clone()
    layer.merge(); layer.unmerge()  # noqa: E702
    assert ((layer.weight.double() - W2.double()).abs() <= unmerge_bound(W2, delta, dtype)).all()


@pytest.mark.parametrize("inference", ["no_grad", "eval"])
def test_a_merged_layer_runs_for_inference(inference):
    """Under torch.no_grad() or in eval mode a merged layer computes (only training forward is refused)."""
    layer = L.LoRALinear(nn.Linear(3, 3), r=1)
    layer.merge()
    if inference == "no_grad":
        with torch.no_grad():
            layer(torch.randn(2, 3))
    else:
        layer.eval()(torch.randn(2, 3))


@pytest.mark.parametrize("merged", [False, True])
def test_the_state_dict_carries_the_merged_flag_only_while_merged(merged):
    model = randomize_B(L.add_lora(mlp(), r=2))
    if merged:
        L.merge_lora(model)
    flags = {k for k in model.state_dict() if k.endswith("lora_merged")}
    assert flags == ({"0.lora_merged", "2.0.lora_merged", "3.lora_merged"} if merged else set())


@pytest.mark.parametrize("merged", [False, True])
def test_a_checkpoint_loads_into_a_model_in_the_state_it_was_saved_in(merged):
    model = randomize_B(L.add_lora(mlp(), r=2))
    if merged:
        L.merge_lora(model)
    state = copy.deepcopy(model.state_dict())
    model.load_state_dict(state)
    assert all(layer.merged == merged for _, layer in L.lora_layers(model))


# --- enable / disable, dropout -----------------------------------------------------------------------


@pytest.mark.parametrize("dropout, module", [(0.0, nn.Identity), (0.1, nn.Dropout)])
def test_without_dropout_the_lora_branch_reads_x_itself(dropout, module):
    """No dropout module at all (not Dropout(0)): the branch shares x, and backward its one buffer."""
    assert isinstance(L.LoRALinear(nn.Linear(4, 4), dropout=dropout).lora_dropout, module)


# --- torch.compile -----------------------------------------------------------------------------------


@pytest.mark.slow  # compiles with inductor; the default run (and CI) includes it
def test_torch_compile_fullgraph_matches_eager_outputs_and_gradients():
    torch._dynamo.reset()
    model = randomize_B(L.add_lora(mlp(), r=2))
    compiled = torch.compile(model, fullgraph=True)  # fullgraph: any graph break is an error
    x = torch.randn(4, 6)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_eager, y_compiled = model(x1), compiled(x2)
    torch.testing.assert_close(y_compiled, y_eager)
    trainable = [p for p in model.parameters() if p.requires_grad]
    eager_grads = torch.autograd.grad(y_eager.sum(), [x1] + trainable)
    compiled_grads = torch.autograd.grad(y_compiled.sum(), [x2] + trainable)
    for a, b in zip(eager_grads, compiled_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.slow
def test_torch_compile_sees_every_state_change_on_the_next_call():
    """Enable / disable, lora_disabled, merge and changed weights take effect at once, never a stale graph.

    A stale graph would be off by the whole LoRA update; compiled kernels may round differently
    from eager by an ulp or two (torch 2.4 does), which exactness does not promise."""
    torch._dynamo.reset()
    base = mlp()
    model = randomize_B(L.add_lora(copy.deepcopy(base), r=2))
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(4, 6)
    eps = torch.finfo(torch.float32).eps
    close_to_eager = lambda a, b: torch.testing.assert_close(a, b, rtol=4 * eps, atol=4 * eps)  # noqa: E731
    with torch.no_grad():
        y_eager = model(x)
        torch.testing.assert_close(compiled(x), y_eager)
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


# --- the pure-tensor core: the same functions on NumPy and on the array API -------------------------------


def core_inputs(case):
    """(x, W, b, A, B, scale) of a drawn layer, as detached float64 torch tensors (b may be None)."""
    linear, layer, x = make(case)
    b = linear.bias.detach() if case.bias else None
    return x, linear.weight.detach(), b, layer.lora_A.detach(), layer.lora_B.detach(), layer.scale


def as_numpy(t):
    return None if t is None else t.numpy()


@given(cases(dtypes=[torch.float64]))
def test_core_forward_same_numbers_on_numpy_and_torch(case):
    x, W, b, A, B, scale = core_inputs(case)
    y_numpy = L.lora_forward(*map(as_numpy, (x, W, b, A, B)), scale)
    assert isinstance(y_numpy, np.ndarray)
    np.testing.assert_allclose(y_numpy, L.lora_forward(x, W, b, A, B, scale).numpy(), rtol=1e-12, atol=1e-12)


@given(cases(dtypes=[torch.float64]))
def test_core_delta_on_numpy_equals_the_layers_delta_weight(case):
    _, layer, _ = make(case)
    delta_numpy = L.lora_delta(layer.lora_A.detach().numpy(), layer.lora_B.detach().numpy(), layer.scale)
    np.testing.assert_allclose(delta_numpy, layer.delta_weight().detach().numpy(), rtol=1e-12, atol=1e-12)


@given(cases(dtypes=[torch.float64]))
def test_the_layer_computes_the_cores_lora_forward(case):
    _, layer, x = make(case)
    y_core = L.lora_forward(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scale)
    torch.testing.assert_close(y_core.detach(), layer(x).detach(), **TOL[case.dtype])


@needs_array_api_strict
@given(cases(dtypes=[torch.float64]))
def test_core_forward_runs_unchanged_on_the_strict_array_api(case):
    """lora_update / lora_forward use only the Python array API standard."""
    inputs = core_inputs(case)
    as_xp = lambda t: None if t is None else xp.asarray(t.numpy())  # noqa: E731
    y = L.lora_forward(*map(as_xp, inputs[:5]), inputs[5])
    assert type(y).__module__.startswith("array_api_strict")
    y_numpy = L.lora_forward(*map(as_numpy, inputs[:5]), inputs[5])
    np.testing.assert_allclose(np.asarray(y), y_numpy, rtol=1e-15, atol=1e-15)


@needs_array_api_strict
@given(cases(dtypes=[torch.float64]))
def test_core_delta_runs_unchanged_on_the_strict_array_api(case):
    """lora_delta uses only the Python array API standard."""
    _, _, _, A, B, scale = core_inputs(case)
    delta = L.lora_delta(xp.asarray(A.numpy()), xp.asarray(B.numpy()), scale)
    assert type(delta).__module__.startswith("array_api_strict")
    np.testing.assert_allclose(np.asarray(delta), L.lora_delta(A.numpy(), B.numpy(), scale), rtol=1e-15, atol=1e-15)
