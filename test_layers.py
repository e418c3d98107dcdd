"""The specification of the LoRA layers, LoRALinear, LoRAEmbedding and LoRAConv, side by side.

Above all: each layer computes what independent oracles compute from the same W, A and B, in
every setting hypothesis draws:

    every type  the classic torch.nn.utils.parametrize LoRA on the plain layer, whose weight is
                W + ΔW (outputs, and the gradients of A, B and a floating input x)
    embedding   F.embedding(idx, W + (B @ A)^T * scale, padding_idx)
    conv        F.pad + F.conv{1,2,3}d with W + (B @ A.flatten(1)).view(W.shape) * scale,
                written out here from the settings (stride, padding ints / 'same' /
                'valid', dilation, padding_mode)

Every behaviour the three types share is one test parametrized over the type (KINDS: linear,
embedding, conv): the shapes and init of A and B, enable / disable, merge / unmerge (and the
exact rounding of a merge), train / eval, merge_and_unload of one layer, devices and dtypes
(meta, autocast, adapters in another dtype than the base, nested inputs), torch.compile.
LoRALinear's own math, autograd and fast path: test_lora_min.py; whole models: test_model.py;
refusals: test_misuse.py; PEFT's format: test_peft.py.

Sections: oracles; drawing cases; embeddings and convolutions against their own oracles; every
type against parametrize; gradcheck; shapes and init; dropout; enable / disable; merge / unmerge;
merge_and_unload of one layer; devices and dtypes; torch.compile.

Tolerances (conftest.TOL, torch.testing.assert_close, rtol / atol): float64 1e-10 / 1e-10 (only
the summation order differs), float32 1e-4 / 1e-4; bfloat16 autocast 2e-2 / 5e-2.
"""

import copy
import dataclasses
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch.nn.utils import parametrize

import lora_min as L
from conftest import (EXACT, FLOAT_DTYPES, MODEL_KINDS, TOL, adapted, assert_unchanged, Case, cases as linear_cases,
                      cnn, expected_lora_shapes, ids, lora_mixed, make as make_linear, mlp, randomize_B, snapshot,
                      tables)

BF16 = dict(rtol=2e-2, atol=5e-2)
KINDS = ["linear", "embedding", "conv"]
CONV_CLASSES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
PADDING_MODES = ["zeros", "reflect", "replicate", "circular"]
# Tests that build convolutions run half the profile's examples (50 by default) for each layer type:
# several such tests draw from the same space, each with its own derandomized examples.
CONV_SETTINGS = settings(max_examples=max(10, settings.default.max_examples // 2))


# --- independent oracles -------------------------------------------------------------------------------


def linear_delta(A, B, scale):
    """ΔW of a linear weight (out, in)."""
    return (B @ A) * scale


def embedding_delta(A, B, scale):
    """ΔW of an embedding table (num_embeddings, dim): the linear map of one-hot rows is W^T."""
    return (B @ A).T * scale


def conv_delta(A, B, scale):
    """ΔW of a conv weight (out, in, *kernel): B mixes the r filters of A pointwise."""
    return (B @ A.reshape(A.shape[0], -1)).reshape(B.shape[0], *A.shape[1:]) * scale


class LoRAParametrization(nn.Module):
    """The classic LoRA: a parametrization that returns W + delta(A, B, scale) as `weight`."""

    def __init__(self, A, B, scale, delta):
        super().__init__()
        self.lora_A = nn.Parameter(A.detach().clone())
        self.lora_B = nn.Parameter(B.detach().clone())
        self.scale, self.delta = scale, delta

    def forward(self, W):
        return W + self.delta(self.lora_A, self.lora_B, self.scale)


def parametrize_reference(base, layer):
    """A frozen copy of the plain layer whose weight is parametrized by copies of layer's A and B."""
    delta = {L.LoRALinear: linear_delta, L.LoRAEmbedding: embedding_delta, L.LoRAConv: conv_delta}[type(layer)]
    ref = copy.deepcopy(base).requires_grad_(False)
    if isinstance(ref, nn.Embedding):  # a sparse gradient of the table cannot flow back through B @ A
        ref.sparse = False  # (sparse changes only the format of W's gradient, and W is frozen)
    parametrize.register_parametrization(ref, "weight", LoRAParametrization(layer.lora_A, layer.lora_B, layer.scale, delta))
    return ref, ref.parametrizations.weight[0]


def conv_by_hand(case, x, weight, bias):
    """The convolution the case's settings describe, from F.pad and F.conv{n}d alone."""
    n = case.n
    if case.padding == "same":  # total d (k - 1) per dimension; the odd one extra on the right (as torch)
        pads = [(d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2) for k, d in zip(case.kernel, case.dilation)]
    elif case.padding == "valid":
        pads = [(0, 0)] * n
    else:
        pads = [(p, p) for p in case.padding]
    flat = [p for pair in reversed(pads) for p in pair]  # F.pad wants the last dimension first
    mode = "constant" if case.padding_mode == "zeros" else case.padding_mode
    x = F.pad(x, flat, mode=mode)
    return getattr(F, f"conv{n}d")(x, weight, bias, stride=case.stride, padding=0, dilation=case.dilation)


# --- drawing cases -------------------------------------------------------------------------------------


@dataclass
class EmbeddingCase:
    num: int
    dim: int
    r: int
    alpha: float
    use_rslora: bool
    padding_idx: Optional[int]  # as given to nn.Embedding: may be negative
    sparse: bool
    idx_shape: tuple  # (), (n,) or (n, m): 0-D, 1-D and 2-D index tensors
    dtype: torch.dtype
    seed: int


@st.composite
def embedding_cases(draw, dtypes=FLOAT_DTYPES, small=False):
    num = draw(st.integers(2, 8 if small else 30))
    return EmbeddingCase(
        num=num,
        dim=draw(st.integers(1, 4 if small else 12)),
        r=draw(st.integers(1, 3 if small else 6)),
        alpha=draw(st.floats(0.25, 16.0)),
        use_rslora=draw(st.booleans()),
        padding_idx=draw(st.none() | st.integers(-num, num - 1)),
        sparse=draw(st.booleans()),
        idx_shape=tuple(draw(st.lists(st.integers(1, 5), max_size=2))),
        dtype=draw(st.sampled_from(dtypes)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def make_embedding(case):
    """(embedding, its LoRAEmbedding with random A and nonzero B, indices that include the pad index).
    A's padding_idx column stays zero, as the layer keeps it from its init on."""
    g = torch.Generator().manual_seed(case.seed)
    randn = lambda *shape: torch.randn(*shape, generator=g, dtype=case.dtype)  # noqa: E731
    base = nn.Embedding(case.num, case.dim, padding_idx=case.padding_idx, sparse=case.sparse, dtype=case.dtype)
    with torch.no_grad():
        base.weight.copy_(randn(case.num, case.dim))
    layer = L.LoRAEmbedding(copy.deepcopy(base), r=case.r, alpha=case.alpha, use_rslora=case.use_rslora)
    with torch.no_grad():  # with B = 0 every equivalence below would pass trivially
        layer.lora_A.copy_(randn(case.r, case.num))
        layer.lora_B.copy_(randn(case.dim, case.r) + 0.5)
        if layer.padding_idx is not None:
            layer.lora_A[:, layer.padding_idx] = 0
    idx = torch.randint(0, case.num, case.idx_shape, generator=g)
    if base.padding_idx is not None:
        idx.view(-1)[0] = base.padding_idx  # the pad index is looked up too
    return base, layer, idx


@dataclass
class ConvCase:
    n: int  # 1, 2, 3: Conv1d / Conv2d / Conv3d
    in_ch: int
    out_ch: int
    kernel: tuple
    stride: tuple
    padding: object  # a tuple of ints, "same" or "valid"
    dilation: tuple
    padding_mode: str
    bias: bool
    batch: Optional[int]  # None: an unbatched input (C, *spatial)
    spatial: tuple
    r: int
    alpha: float
    use_rslora: bool
    dtype: torch.dtype
    seed: int


@st.composite
def conv_cases(draw, dtypes=FLOAT_DTYPES, small=False):
    n = draw(st.integers(1, 3))
    per_dim = lambda strategy: tuple(draw(strategy) for _ in range(n))  # noqa: E731
    kernel = per_dim(st.integers(1, 2 if small else 3))
    dilation = per_dim(st.integers(1, 2))
    padding = draw(st.sampled_from(["ints", "same", "valid"]))
    if padding == "same":  # torch allows 'same' only with stride 1
        stride = (1,) * n
    else:
        stride = per_dim(st.integers(1, 3))
        padding = per_dim(st.integers(0, 2)) if padding == "ints" else padding
    # Every dimension at least 3 wider than the dilated kernel: reflect needs padding < size
    # (padding <= 2, 'same' pads at most d (k - 1)), and the output is never empty.
    spatial = tuple(d * (k - 1) + 3 + draw(st.integers(0, 1 if small else 2)) for k, d in zip(kernel, dilation))
    return ConvCase(
        n=n,
        in_ch=draw(st.integers(1, 2 if small else 3)),
        out_ch=draw(st.integers(1, 2 if small else 4)),
        kernel=kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        padding_mode=draw(st.sampled_from(PADDING_MODES)),
        bias=draw(st.booleans()),
        batch=draw(st.none() | st.integers(1, 1 if small else 2)),
        spatial=spatial,
        r=draw(st.integers(1, 2 if small else 4)),
        alpha=draw(st.floats(0.25, 8.0)),
        use_rslora=draw(st.booleans()),
        dtype=draw(st.sampled_from(dtypes)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def make_conv(case):
    """(conv, its LoRAConv with random A and nonzero B, input x)."""
    g = torch.Generator().manual_seed(case.seed)
    randn = lambda *shape: torch.randn(*shape, generator=g, dtype=case.dtype)  # noqa: E731
    base = CONV_CLASSES[case.n](case.in_ch, case.out_ch, case.kernel, stride=case.stride, padding=case.padding,
                                dilation=case.dilation, bias=case.bias, padding_mode=case.padding_mode, dtype=case.dtype)
    with torch.no_grad():
        base.weight.copy_(randn(*base.weight.shape))
        if case.bias:
            base.bias.copy_(randn(case.out_ch))
    layer = L.LoRAConv(copy.deepcopy(base), r=case.r, alpha=case.alpha, use_rslora=case.use_rslora)
    with torch.no_grad():
        layer.lora_A.copy_(randn(*layer.lora_A.shape))
        layer.lora_B.copy_(randn(case.out_ch, case.r) + 0.5)
    batch = () if case.batch is None else (case.batch,)
    return base, layer, randn(*batch, case.in_ch, *case.spatial)


def lora_positions(base, x):
    """Where LoRA can change the output: everywhere, except an embedding's pad positions
    (A's pad column is zero there, so the pad vector is W's)."""
    if isinstance(base, nn.Embedding) and base.padding_idx is not None:
        return x != base.padding_idx
    return torch.ones((), dtype=torch.bool)


def make(case):
    """(the plain layer, its LoRA layer with random A and nonzero B, an input) for a case of any type."""
    if isinstance(case, Case):
        return make_linear(case)
    return make_embedding(case) if isinstance(case, EmbeddingCase) else make_conv(case)


def drawn(kind, dtypes=FLOAT_DTYPES):
    """The strategy that draws cases of this layer type, in every setting."""
    return {"linear": linear_cases, "embedding": embedding_cases, "conv": conv_cases}[kind](dtypes)


# One fixed case of each type (float64), for the tests that do not draw: example(kind, dtype=...).
EXAMPLES = {
    "linear": Case(in_f=6, out_f=4, r=2, alpha=4.0, use_rslora=False, bias=True, batch=(3,), dtype=torch.float64,
                   seed=0),
    "embedding": EmbeddingCase(num=12, dim=5, r=3, alpha=6.0, use_rslora=False, padding_idx=1, sparse=False,
                               idx_shape=(2, 4), dtype=torch.float64, seed=0),
    "conv": ConvCase(n=2, in_ch=3, out_ch=4, kernel=(3, 3), stride=(1, 2), padding=(1, 1), dilation=(1, 1),
                     padding_mode="zeros", bias=True, batch=2, spatial=(6, 7), r=2, alpha=4.0, use_rslora=False,
                     dtype=torch.float64, seed=0),
}


def example(kind, **changes):
    return make(dataclasses.replace(EXAMPLES[kind], **changes))


# --- embeddings against their own oracles -----------------------------------------------------


@given(embedding_cases())
def test_embedding_equals_lookup_in_W_plus_delta(case):
    """y == F.embedding(idx, W + ΔW): the factored lookup is the lookup in the merged table."""
    base, layer, idx = make_embedding(case)
    expected = F.embedding(idx, base.weight + layer.delta_weight(), base.padding_idx)
    torch.testing.assert_close(layer(idx), expected, **TOL[case.dtype])


@given(embedding_cases())
def test_embedding_delta_weight_is_the_transposed_update(case):
    """delta_weight() == (B @ A)^T * scale, in the table's shape (num_embeddings, dim)."""
    _, layer, _ = make_embedding(case)
    assert layer.delta_weight().shape == (case.num, case.dim)
    torch.testing.assert_close(layer.delta_weight(), embedding_delta(layer.lora_A, layer.lora_B, layer.scale),
                               **TOL[case.dtype])


def test_embedding_gradients_equal_parametrize_for_an_adapter_whose_pad_column_is_not_zero():
    """An adapter loaded from a file (load_lora_state_dict, load_adapter, a PEFT adapter made with
    init_lora_weights=False) may hold a nonzero padding_idx column of A. The layer must still train
    as nn.Embedding with weight W + ΔW does: the pad row of the table gets no gradient, so pad
    positions contribute nothing to the gradient of B either."""
    base = nn.Embedding(10, 4, padding_idx=2, dtype=torch.float64)
    layer = L.LoRAEmbedding(copy.deepcopy(base), r=3)
    g = torch.Generator().manual_seed(0)
    L.load_lora_state_dict(nn.ModuleDict({"e": layer}), {
        "e.lora_A": torch.randn(3, 10, generator=g, dtype=torch.float64),  # column 2 is not zero
        "e.lora_B": torch.randn(4, 3, generator=g, dtype=torch.float64)})
    ref, ref_lora = parametrize_reference(base, layer)
    idx = torch.tensor([[0, 2, 3], [2, 2, 9]])
    torch.testing.assert_close(layer(idx), ref(idx), **EXACT)  # the forward agrees
    layer(idx).sum().backward()
    ref(idx).sum().backward()
    torch.testing.assert_close(layer.lora_A.grad, ref_lora.lora_A.grad, **EXACT)
    torch.testing.assert_close(layer.lora_B.grad, ref_lora.lora_B.grad, **EXACT)


# --- convolutions against their own oracles ---------------------------------------------------


@CONV_SETTINGS
@given(conv_cases())
def test_conv_equals_F_conv_with_W_plus_delta(case):
    """y == F.pad + F.conv{n}d with W + ΔW, for every stride, padding, dilation, padding_mode,
    bias, kernel and batched / unbatched input: the LoRA branch uses the base's settings."""
    base, layer, x = make_conv(case)
    W = base.weight + conv_delta(layer.lora_A, layer.lora_B, layer.scale)
    torch.testing.assert_close(layer(x), conv_by_hand(case, x, W, base.bias), **TOL[case.dtype])


@CONV_SETTINGS
@given(conv_cases())
def test_conv_equals_the_base_conv_forward_with_W_plus_delta(case):
    """y == base._conv_forward(x, W + delta_weight(), b): the base class's own code, merged weight."""
    base, layer, x = make_conv(case)
    expected = base._conv_forward(x, base.weight + layer.delta_weight(), base.bias)
    torch.testing.assert_close(layer(x), expected, **TOL[case.dtype])


@CONV_SETTINGS
@given(conv_cases())
def test_conv_by_hand_oracle_is_the_plain_conv(case):
    """The hand-written oracle itself: F.pad + F.conv{n}d with W computes nn.Conv{n}d (so it checks the settings)."""
    base, _, x = make_conv(case)
    torch.testing.assert_close(conv_by_hand(case, x, base.weight, base.bias), base(x), **TOL[case.dtype])


# --- every type against the parametrize LoRA ----------------------------------------------------------


# Linears in float32 and float64; embeddings and convs (longer sums) in float64 at 1e-10.
PARAMETRIZE_DTYPES = {"linear": FLOAT_DTYPES, "embedding": [torch.float64], "conv": [torch.float64]}


@pytest.mark.parametrize("kind", KINDS)
@CONV_SETTINGS
@given(data=st.data())
def test_equals_parametrize_outputs_and_gradients(kind, data):
    """Outputs and the gradients of A, B and x (where x is not indices) equal the parametrize LoRA's;
    the frozen W and b get no gradient."""
    case = data.draw(drawn(kind, PARAMETRIZE_DTYPES[kind]), label="case")
    base, layer, x = make(case)
    tol = TOL[case.dtype]
    ref, ref_lora = parametrize_reference(base, layer)
    floating = x.is_floating_point()
    x1, x2 = (x.clone().requires_grad_(), x.clone().requires_grad_()) if floating else (x, x)
    y, y_ref = layer(x1), ref(x2)
    torch.testing.assert_close(y, y_ref, **tol)
    changed = lora_positions(base, x)
    if changed.any():
        assert not torch.allclose(y[changed], base(x)[changed], **tol), "LoRA must change the output"
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(case.seed + 1), dtype=case.dtype)
    (y * w).sum().backward()
    (y_ref * w).sum().backward()
    torch.testing.assert_close(layer.lora_A.grad, ref_lora.lora_A.grad, **tol)
    torch.testing.assert_close(layer.lora_B.grad, ref_lora.lora_B.grad, **tol)
    if floating:
        torch.testing.assert_close(x1.grad, x2.grad, **tol)
    assert layer.weight.grad is None and (layer.bias is None or layer.bias.grad is None)


# --- complete under autograd: gradcheck and gradgradcheck (float64) ------------------------------------------


@settings(max_examples=25)
@given(embedding_cases(dtypes=[torch.float64], small=True))
def test_embedding_gradcheck_and_gradgradcheck(case):
    """First and second derivatives in A and B, against finite differences. Without the pad index:
    there nn.Embedding defines the derivative as zero although the value depends on the table."""
    _, layer, idx = make_embedding(case)
    if layer.padding_idx is not None:
        idx = torch.where(idx == layer.padding_idx, (layer.padding_idx + 1) % case.num, idx)
    A, B = layer.lora_A.detach().clone().requires_grad_(), layer.lora_B.detach().clone().requires_grad_()
    f = lambda A, B: torch.func.functional_call(layer, {"lora_A": A, "lora_B": B}, (idx,))  # noqa: E731
    assert torch.autograd.gradcheck(f, (A, B))
    assert torch.autograd.gradgradcheck(f, (A, B))


@settings(max_examples=25)
@given(conv_cases(dtypes=[torch.float64], small=True))
def test_conv_gradcheck_and_gradgradcheck(case):
    """First and second derivatives in A, B and x, against finite differences, in fast mode (along
    random directions: the full Jacobians cost 7x as much; the next test takes them on three cases)."""
    _, layer, x = make_conv(case)
    inputs = tuple(t.detach().clone().requires_grad_() for t in (layer.lora_A, layer.lora_B, x))
    f = lambda A, B, x: torch.func.functional_call(layer, {"lora_A": A, "lora_B": B}, (x,))  # noqa: E731
    assert torch.autograd.gradcheck(f, inputs, fast_mode=True)
    assert torch.autograd.gradgradcheck(f, inputs, fast_mode=True)


@pytest.mark.parametrize("case", [
    ConvCase(1, 1, 2, (3,), (2,), (1,), (2,), "reflect", True, 1, (6,), 2, 3.0, False, torch.float64, 0),
    ConvCase(2, 1, 2, (2, 3), (1, 2), (1, 0), (2, 1), "circular", False, None, (4, 4), 2, 2.0, True, torch.float64, 1),
    ConvCase(3, 1, 2, (2, 2, 1), (1, 1, 1), "same", (1, 2, 1), "replicate", True, 1, (3, 3, 2), 1, 1.0, False,
             torch.float64, 2),
], ids=["conv1d-reflect-stride-dilation", "conv2d-circular-unbatched", "conv3d-same-replicate"])
def test_conv_gradcheck_and_gradgradcheck_full_jacobians(case):
    """The full Jacobians (every entry by finite differences) in A, B and x, on three small cases."""
    _, layer, x = make_conv(case)
    inputs = tuple(t.detach().clone().requires_grad_() for t in (layer.lora_A, layer.lora_B, x))
    f = lambda A, B, x: torch.func.functional_call(layer, {"lora_A": A, "lora_B": B}, (x,))  # noqa: E731
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


# --- shapes and init --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@CONV_SETTINGS
@given(data=st.data())
def test_lora_shapes_follow_the_base_layer_and_only_A_and_B_train(kind, data):
    """A and B have the type's shapes (conftest.expected_lora_shapes: linear (r, in), (out, r); embedding
    (r, num), (dim, r); conv (r, in, *kernel), (out, r)) in W's dtype and train; W and b are the base's
    own Parameters, frozen."""
    case = data.draw(drawn(kind), label="case")
    base = make(case)[0]
    layer = L.lora_class_for(base)(base, r=case.r)
    assert (layer.lora_A.shape, layer.lora_B.shape) == expected_lora_shapes(base, case.r)
    assert layer.lora_A.dtype == layer.lora_B.dtype == case.dtype
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad
    assert layer.weight is base.weight and layer.bias is getattr(base, "bias", None)
    assert not layer.weight.requires_grad and (layer.bias is None or not layer.bias.requires_grad)


@pytest.mark.parametrize("kind", KINDS)
@CONV_SETTINGS
@given(data=st.data(), init_std=st.sampled_from([None, 1.0, 0.02]))
def test_fresh_layer_has_zero_B_and_equals_the_base_exactly(kind, data, init_std):
    """B = 0 and A != 0 at the start, so a new layer computes its base layer bit for bit."""
    case = data.draw(drawn(kind), label="case")
    base, _, x = make(case)
    layer = L.lora_class_for(base)(copy.deepcopy(base), r=case.r, alpha=case.alpha, init_std=init_std)
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
    assert torch.equal(layer(x), base(x))


def test_embedding_A_is_standard_normal_by_default():
    """A ~ N(0, 1): a one-hot input has one active entry, so kaiming's fan-in is 1."""
    torch.manual_seed(0)
    A = L.LoRAEmbedding(nn.Embedding(5000, 8), r=16).lora_A  # 80,000 draws
    assert abs(A.std().item() - 1.0) < 0.02 and abs(A.mean().item()) < 0.02


@pytest.mark.parametrize("std", [0.02, 3.0])
def test_embedding_init_std_sets_the_std_of_A(std):
    torch.manual_seed(0)
    A = L.LoRAEmbedding(nn.Embedding(5000, 8), r=16, init_std=std).lora_A
    assert abs(A.std().item() / std - 1.0) < 0.02 and abs(A.mean().item()) < 0.02 * std


@pytest.mark.parametrize("padding_idx, column", [(7, 7), (0, 0), (-1, 49)])
def test_embedding_pad_column_of_A_starts_at_zero(padding_idx, column):
    torch.manual_seed(0)
    layer = L.LoRAEmbedding(nn.Embedding(50, 8, padding_idx=padding_idx), r=4)
    assert torch.count_nonzero(layer.lora_A[:, column]) == 0
    others = torch.cat([layer.lora_A[:, :column], layer.lora_A[:, column + 1:]], dim=1)
    assert torch.count_nonzero(others) == others.numel()  # only the pad column


def test_embedding_reset_lora_parameters_zeroes_the_pad_column_again():
    layer = L.LoRAEmbedding(nn.Embedding(50, 8, padding_idx=7), r=4)
    with torch.no_grad():
        layer.lora_A.fill_(1.0)
        layer.lora_B.fill_(1.0)
    layer.reset_lora_parameters(init_std=0.5)
    assert torch.count_nonzero(layer.lora_A[:, 7]) == 0 and torch.count_nonzero(layer.lora_B) == 0


def test_embedding_pad_column_and_pad_vector_stay_fixed_after_optimizer_steps():
    """The pad column of A gets no gradient (nor weight decay of a zero), so the pad vector
    stays W[padding_idx] while B trains, as nn.Embedding promises for its pad row."""
    torch.manual_seed(0)
    base = nn.Embedding(30, 8, padding_idx=3)
    model = L.add_lora(nn.Sequential(copy.deepcopy(base), nn.Linear(8, 2)), r=4, target_modules=["0"])
    layer = model[0]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, weight_decay=0.1)
    idx = torch.tensor([[3, 1, 4, 3, 5], [9, 3, 2, 6, 3]])
    for _ in range(3):
        optimizer.zero_grad()
        model(idx).pow(2).sum().backward()
        assert torch.count_nonzero(layer.lora_A.grad[:, 3]) == 0
        optimizer.step()
    assert torch.count_nonzero(layer.lora_B) > 0  # the adapter did train
    assert torch.count_nonzero(layer.lora_A[:, 3]) == 0
    assert torch.equal(layer(torch.tensor([3])), base(torch.tensor([3])))
    assert not torch.equal(layer(torch.tensor([4])), base(torch.tensor([4])))


@pytest.mark.parametrize("conv, r", [
    (nn.Conv1d(20, 4, 5), 256),  # fan_in = 20 * 5 = 100
    (nn.Conv2d(16, 4, 5), 64),  # fan_in = 16 * 25 = 400
    (nn.Conv3d(4, 4, (2, 3, 4)), 256),  # fan_in = 4 * 24 = 96
])
def test_conv_A_is_kaiming_uniform_with_fan_in_of_the_whole_patch(conv, r):
    """A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = in_channels * prod(kernel_size), as the conv's own init:
    about 25,000 draws reach the bound and none exceeds it."""
    torch.manual_seed(0)
    A = L.LoRAConv(conv, r=r).lora_A
    fan_in = conv.in_channels * torch.tensor(conv.kernel_size).prod().item()
    bound = 1 / fan_in**0.5
    assert A.abs().max() <= bound and A.abs().max() > 0.99 * bound


# --- dropout ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "conv"])  # an embedding refuses dropout (test_misuse.py)
def test_dropout_changes_training_outputs_only(kind):
    """Dropout on the LoRA branch's input: training outputs differ from the layer without it;
    eval outputs equal it exactly and are deterministic."""
    torch.manual_seed(0)
    base, plain, x = example(kind)
    dropped = type(plain)(copy.deepcopy(base), r=plain.r, alpha=plain.alpha, dropout=0.5)
    dropped.load_state_dict(plain.state_dict())
    assert not torch.allclose(dropped.train()(x), plain.train()(x))
    assert torch.equal(dropped.eval()(x), plain.eval()(x))
    assert torch.equal(dropped(x), dropped(x))


def test_conv_dropout_reaches_the_lora_branch_only():
    """With a fixed mask: y = conv(x, W, b) + B · conv(dropout(x), A) * scale."""
    torch.manual_seed(0)
    layer = L.LoRAConv(nn.Conv1d(3, 4, 3, padding=1), r=2, dropout=0.3).train()
    nn.init.normal_(layer.lora_B)
    x = torch.randn(2, 3, 9)
    torch.manual_seed(1)
    y = layer(x)
    torch.manual_seed(1)  # the same mask
    h = F.conv1d(F.dropout(x, 0.3, training=True), layer.lora_A, padding=1) * layer.scale
    expected = F.conv1d(x, layer.weight, layer.bias, padding=1) + torch.einsum("or,nrl->nol", layer.lora_B, h)
    torch.testing.assert_close(y, expected)


# --- enable / disable -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@CONV_SETTINGS
@given(data=st.data())
def test_disabled_layer_equals_the_base_exactly_and_enabling_brings_back_its_output(kind, data):
    base, layer, x = make(data.draw(drawn(kind), label="case"))
    y = layer(x)
    layer.enabled = False
    assert torch.equal(layer(x), base(x))
    layer.enabled = True
    assert torch.equal(layer(x), y)
    changed = lora_positions(base, x)
    if changed.any():
        assert not torch.equal(y[changed], base(x)[changed])


# --- merge / unmerge ------------------------------------------------------------------------------------


def merge_case(data, kind):
    """(a drawn case of this type, its layer in eval mode, x, the unmerged output y, W, ΔW)."""
    case = data.draw(drawn(kind), label="case")
    base, layer, x = make(case)
    layer.eval()
    return case, layer, x, layer(x), base.weight.detach().clone(), layer.delta_weight().detach()


def unmerge_bound(W, delta, dtype):
    """The documented bound on |W after merge + unmerge - W|: eps(dtype) * (|W| + |ΔW|), in float64."""
    return torch.finfo(dtype).eps * (W.double().abs() + delta.double().abs())


@pytest.mark.parametrize("kind", KINDS)
@CONV_SETTINGS
@given(data=st.data())
def test_merge_folds_delta_into_the_weight_and_keeps_the_outputs(kind, data):
    """merge() folds ΔW into W and the plain forward then computes the unmerged output, for every
    setting drawn (a conv's stride, padding, dilation and padding_mode: PEFT's conv drops the last two)."""
    case, layer, x, y, W, delta = merge_case(data, kind)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer.weight, W + delta, **TOL[case.dtype])
    torch.testing.assert_close(layer(x), y, **TOL[case.dtype])


@pytest.mark.parametrize("kind", KINDS)
@CONV_SETTINGS
@given(data=st.data())
def test_unmerge_restores_W_within_the_documented_bound_and_the_outputs(kind, data):
    """|unmerge(merge(W)) - W| <= eps(dtype) * (|W| + |ΔW|), elementwise; and the output is the unmerged one again."""
    case, layer, x, y, W, delta = merge_case(data, kind)
    layer.merge()
    layer.unmerge()
    assert not layer.merged
    assert ((layer.weight.double() - W.double()).abs() <= unmerge_bound(W, delta, case.dtype)).all()
    torch.testing.assert_close(layer(x), y, **TOL[case.dtype])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kind", KINDS)
def test_every_merge_rounds_W_plus_delta_once_from_float32_bit_for_bit(kind, dtype):
    """merge(), merged_state_dict and merge_and_unload all write (W.float() + delta_weight(float32))
    rounded once to W's dtype, bit for bit: not W + ΔW computed in the weight's own half precision."""
    _, layer, _ = example(kind, dtype=dtype)
    W = layer.weight.detach().clone()
    expected = (W.float() + layer.delta_weight(torch.float32)).to(dtype)
    assert not torch.equal(expected, W)  # the adapter changes W
    if dtype != torch.float32:  # rounding twice (ΔW, then the sum, in half precision) gives other bits here
        assert not torch.equal(W + layer.delta_weight(torch.float32).to(dtype), expected)
    model = nn.Sequential(layer)
    assert torch.equal(L.merged_state_dict(model)["0.weight"], expected)
    assert torch.equal(L.merge_and_unload(model)[0].weight, expected)
    layer.merge()
    assert torch.equal(layer.weight, expected)
    assert torch.equal(L.merged_state_dict(model)["0.weight"], expected)  # merged: the weight as it is
    assert torch.equal(L.merge_and_unload(model)[0].weight, expected)


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
@pytest.mark.parametrize("kind", KINDS)
def test_train_and_eval_never_touch_the_weights(kind, merged):
    """Merging is explicit: eval() and train() change no tensor and no merged state."""
    _, layer, _ = example(kind)
    if merged:
        layer.merge()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    for _ in range(2):
        layer.eval()
        layer.train()
    assert layer.merged == merged
    assert layer.state_dict().keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())


# --- merge_and_unload of one layer ----------------------------------------------------------------------


PLAIN_SETTINGS = {  # the attributes that make a plain layer compute what it computes
    nn.Linear: ["in_features", "out_features"],
    nn.Embedding: ["num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq",
                   "sparse"],
    nn.modules.conv._ConvNd: ["in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                              "padding_mode", "_reversed_padding_repeated_twice"],
}


@pytest.mark.parametrize("kind", KINDS)
@CONV_SETTINGS
@given(data=st.data())
def test_merge_and_unload_gives_the_plain_layer_with_the_same_settings(kind, data):
    """In a model and as a bare layer: the base's own class, settings and bias, frozen."""
    base, layer, x = make(data.draw(drawn(kind), label="case"))
    names = next(names for cls, names in PLAIN_SETTINGS.items() if isinstance(base, cls))
    for plain in (L.merge_and_unload(nn.Sequential(layer))[0], L.merge_and_unload(layer)):
        assert type(plain) is type(base)
        for name in names:
            assert getattr(plain, name) == getattr(base, name), name
        assert (getattr(plain, "bias", None) is None) == (getattr(base, "bias", None) is None)
        assert not any(p.requires_grad for p in plain.parameters())
    torch.testing.assert_close(plain(x), layer(x), **TOL[layer.weight.dtype])  # the bare one computes it too


@pytest.mark.parametrize("kind", KINDS)
@CONV_SETTINGS
@given(data=st.data())
def test_merge_and_unload_computes_what_the_layer_computes_in_the_plain_architecture(kind, data):
    """Sequential(layer, ReLU) -> a plain model with the base model's state_dict keys, loadable with no
    LoRA code, computing the LoRA model's output; the input model is left as it was."""
    case = data.draw(drawn(kind), label="case")
    base, layer, x = make(case)
    model = nn.Sequential(layer, nn.ReLU())
    before = snapshot(model)
    plain = L.merge_and_unload(model)
    assert_unchanged(model, before)
    torch.testing.assert_close(plain(x), model(x), **TOL[case.dtype])
    original = nn.Sequential(copy.deepcopy(base), nn.ReLU())
    assert set(plain.state_dict()) == set(original.state_dict())
    original.load_state_dict(plain.state_dict())
    torch.testing.assert_close(original(x), model(x), **TOL[case.dtype])


# --- devices and dtypes ---------------------------------------------------------------------------------


ON_META = {  # kind: (the plain layer on the meta device, an input there)
    "linear": (lambda: nn.Linear(4, 3, device="meta"), lambda: torch.empty(2, 4, device="meta")),
    "embedding": (lambda: nn.Embedding(10, 3, device="meta"), lambda: torch.zeros(2, 5, dtype=torch.long, device="meta")),
    "conv": (lambda: nn.Conv2d(4, 3, 3, device="meta"), lambda: torch.empty(2, 4, 8, 8, device="meta")),
}


@pytest.mark.parametrize("kind", KINDS)
def test_forward_on_the_meta_device_gives_the_base_layers_shape(kind):
    base, x = ON_META[kind][0](), ON_META[kind][1]()
    layer = L.lora_class_for(base)(base, r=2)
    assert layer(x).shape == base(x).shape and layer(x).device.type == "meta"


@pytest.mark.parametrize("kind", KINDS)
def test_on_the_meta_device_merge_unmerge_and_the_merged_exports_work_without_values(kind):
    """A model is often built on meta first: merge() has no values to check for overflow, and must
    not try; it flips merged. merged_state_dict and merge_and_unload give meta tensors of W's shape."""
    base = ON_META[kind][0]()
    layer = L.lora_class_for(base)(base, r=2)

    def check_exports():
        weight = L.merged_state_dict(nn.Sequential(layer))["0.weight"]
        plain = L.merge_and_unload(nn.Sequential(layer))[0]
        assert weight.is_meta and weight.shape == base.weight.shape
        assert type(plain) is type(base) and plain.weight.is_meta

    check_exports()  # unmerged: W + ΔW, computed on meta
    layer.merge()
    assert layer.merged and layer.weight.is_meta
    check_exports()  # merged: the weight as it is
    layer.unmerge()
    assert not layer.merged


def autocast_weight_and_input_dtypes():
    """(kind, weight dtype, input dtype): every pair for linears and convs; an embedding's input is indices."""
    dtypes = [torch.float64, torch.float32, torch.bfloat16]
    floating = [pytest.param(kind, w, i, id=f"{kind}-{str(w)[6:]}-weight-{str(i)[6:]}-input")
                for kind in ("linear", "conv") for w in dtypes for i in dtypes]
    return floating + [pytest.param("embedding", w, None, id=f"embedding-{str(w)[6:]}-weight") for w in dtypes]


@pytest.mark.parametrize("kind, weight_dtype, input_dtype", autocast_weight_and_input_dtypes())
def test_under_cpu_autocast_the_layer_casts_what_its_base_layer_casts(kind, weight_dtype, input_dtype):
    """B = 0: the same product as the base layer's, in the dtype autocast gives the base; where torch
    refuses the mix (float64 with bfloat16), so does the layer."""
    torch.manual_seed(0)
    base, _, x = example(kind, dtype=torch.float32)
    base = base.to(weight_dtype)
    layer = L.lora_class_for(base)(copy.deepcopy(base), r=2)
    x = x if input_dtype is None else x.to(input_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        try:
            expected = base(x)
        except RuntimeError:  # mixed float64 and bfloat16: torch refuses, so must we
            with pytest.raises(RuntimeError):
                layer(x)
            return
        got = layer(x)
    assert got.dtype == expected.dtype
    torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("case", [
    Case(32, 16, 4, 4.0, False, True, (8,), torch.float32, 0),
    EmbeddingCase(40, 16, 4, 8.0, False, 1, False, (3, 5), torch.float32, 0),
    ConvCase(1, 3, 4, (3,), (2,), (1,), (2,), "reflect", True, 2, (12,), 4, 8.0, False, torch.float32, 0),
    ConvCase(2, 3, 4, (3, 2), (1, 1), "same", (1, 2), "circular", True, 2, (7, 8), 4, 8.0, False, torch.float32, 0),
    ConvCase(3, 2, 3, (2, 2, 2), (1, 2, 1), (1, 0, 1), (1, 1, 1), "zeros", False, None, (5, 5, 5), 2, 2.0, True,
             torch.float32, 0),
], ids=["linear", "embedding", "conv1d-reflect", "conv2d-same-circular", "conv3d-unbatched"])
def test_autocast_bfloat16_equals_parametrize_under_the_same_autocast(case):
    """Under CPU autocast: the output dtype the plain layer gives, the parametrize LoRA's values, and
    float32 gradients of A and B equal to its gradients."""
    base, layer, x = make(case)
    with torch.no_grad():
        for p in (base.weight, layer.weight, layer.lora_A, layer.lora_B):
            p.mul_(0.3)  # O(1) outputs: the bfloat16 tolerance is absolute in part
    ref, ref_lora = parametrize_reference(base, layer)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_ref = layer(x), ref(x)
    # F.embedding is not autocast (float32 lookup + bfloat16 matmul -> float32); linears and convolutions are.
    assert y.dtype == y_ref.dtype == (torch.float32 if isinstance(case, EmbeddingCase) else torch.bfloat16)
    torch.testing.assert_close(y, y_ref, **BF16)
    grads = torch.autograd.grad(y.float().sum(), [layer.lora_A, layer.lora_B])
    grads_ref = torch.autograd.grad(y_ref.float().sum(), [ref_lora.lora_A, ref_lora.lora_B])
    for a, b in zip(grads, grads_ref):
        assert a.dtype == torch.float32  # gradients reach the float32 parameters
        torch.testing.assert_close(a, b, **BF16)


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_a_float64_model_runs_under_autocast_after_add_lora(kind):
    """Autocast leaves float64 alone, in the base model and in its LoRA layers."""
    small = adapted(kind)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert small.model(small.x).dtype == torch.float64


@pytest.mark.parametrize("kind", KINDS)
def test_a_float32_adapter_on_a_bfloat16_base_computes_in_float32_and_returns_the_bases_dtype(kind):
    torch.manual_seed(0)
    base, _, x = example(kind, dtype=torch.float32)
    base = base.to(torch.bfloat16)
    layer = L.lora_class_for(base)(base, r=2)
    layer.lora_A.data, layer.lora_B.data = layer.lora_A.data.float(), torch.randn(layer.lora_B.shape)
    x = x if not x.is_floating_point() else x.to(torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    merged = L.merge_and_unload(nn.Sequential(layer))[0]
    torch.testing.assert_close(y, merged(x), rtol=2e-2, atol=2e-2)


def test_nested_tensor_inputs_compute_what_the_plain_math_computes():
    torch.manual_seed(0)
    layer = L.LoRALinear(nn.Linear(4, 3), r=2)
    nn.init.normal_(layer.lora_B)
    parts = [torch.randn(2, 4), torch.randn(5, 4)]
    out = layer(torch.nested.nested_tensor(parts))
    for got, x in zip(out.unbind(), parts):
        torch.testing.assert_close(got, layer(x))


# --- torch.compile ------------------------------------------------------------------------------------------


@pytest.mark.slow  # compiles a forward and a backward graph with inductor
def test_torch_compile_fullgraph_equals_eager_for_all_three_layer_types():
    torch._dynamo.reset()
    _, model = lora_mixed()
    compiled = torch.compile(model, fullgraph=True)  # any graph break is an error
    x = ids()
    y_eager, y_compiled = model(x), compiled(x)
    close = dict(rtol=1e-9, atol=1e-9)  # float64: compiled kernels may sum in another order
    torch.testing.assert_close(y_compiled, y_eager, **close)
    params = [p for p in model.parameters() if p.requires_grad]
    for a, b in zip(torch.autograd.grad(y_compiled.pow(2).sum(), params), torch.autograd.grad(y_eager.pow(2).sum(), params)):
        torch.testing.assert_close(a, b, **close)


# --- GPT-2's Conv1D: a linear layer with its weight stored (in, out) -------------------------------------

def conv1d_class():
    return pytest.importorskip("transformers.pytorch_utils").Conv1D  # (the rest of this file needs no transformers)


def lora_conv1d(nx=5, nf=7, r=2, alpha=3.0, dtype=torch.float64, seed=0, dropout=0.0):
    torch.manual_seed(seed)
    base = conv1d_class()(nf, nx).to(dtype)
    nn.init.normal_(base.bias)
    layer = L.LoRAConv1D(copy.deepcopy(base), r=r, alpha=alpha, dropout=dropout)
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_B.normal_()
    return base, layer


@pytest.mark.parametrize("batch", [(), (3,), (2, 4)])
def test_conv1d_lora_equals_x_times_W_plus_delta_and_parametrize(batch):
    base, layer = lora_conv1d()
    x = torch.randn(*batch, 5, dtype=torch.float64, requires_grad=True)
    delta = (layer.lora_B @ layer.lora_A).T * layer.scale  # (in, out), Conv1D's layout
    torch.testing.assert_close(layer.delta_weight(), delta)
    torch.testing.assert_close(layer(x), x @ (base.weight + delta) + base.bias, **EXACT)
    ref = copy.deepcopy(base).requires_grad_(False)
    A, B = (nn.Parameter(t.detach().clone()) for t in (layer.lora_A, layer.lora_B))

    class Delta(nn.Module):
        def forward(self, W):
            return W + (B @ A).T * layer.scale

    parametrize.register_parametrization(ref, "weight", Delta())
    y, y_ref = layer(x), ref(x)
    torch.testing.assert_close(y, y_ref, **EXACT)
    ours = torch.autograd.grad(y.sum(), [layer.lora_A, layer.lora_B])
    theirs = torch.autograd.grad(y_ref.sum(), [A, B])
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **EXACT)


def test_conv1d_lora_disabled_is_conv1d_bit_for_bit_and_merges_exactly():
    base, layer = lora_conv1d(dtype=torch.float32)
    x = torch.randn(4, 5)
    with torch.no_grad():
        layer.enabled = False
        assert torch.equal(layer(x), base(x))
        layer.enabled = True
        y = layer(x)
        W = layer.weight.clone()
        layer.eval().merge()
        assert torch.equal(layer.weight, (W.float() + layer.delta_weight(torch.float32)).to(W.dtype))
        torch.testing.assert_close(layer(x), y)
        plain = L.merge_and_unload(nn.Sequential(layer))[0]
    assert type(plain) is conv1d_class() and torch.equal(plain.weight, layer.weight) and plain.weight.shape == (5, 7)


def test_conv1d_lora_gradcheck_and_gradgradcheck():
    _, layer = lora_conv1d()
    x = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    params = {"lora_A": layer.lora_A, "lora_B": layer.lora_B}
    f = lambda x, A, B: torch.func.functional_call(layer, {"lora_A": A, "lora_B": B}, (x,))  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, *params.values()))
    assert torch.autograd.gradgradcheck(f, (x, *params.values()))


def test_add_lora_by_default_adapts_gpt2s_conv1d_layers():
    transformers = pytest.importorskip("transformers")
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2))
    L.add_lora(model, r=2)
    kinds = {name.rsplit(".", 1)[-1]: type(layer).__name__ for name, layer in L.lora_layers(model)}
    assert kinds == {"c_attn": "LoRAConv1D", "c_proj": "LoRAConv1D", "c_fc": "LoRAConv1D", "lm_head": "LoRALinear"}


# --- fp32 adapters on low-precision bases ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_adapters_on_a_half_precision_base_are_float32_and_the_output_is_the_bases_dtype(dtype):
    model = L.add_lora(mlp(dtype=dtype), r=2)
    assert all(layer.lora_A.dtype == layer.lora_B.dtype == torch.float32 for _, layer in L.lora_layers(model))
    assert model(torch.randn(3, 6, dtype=dtype)).dtype == dtype
    kept = L.add_lora(mlp(dtype=dtype), r=2, lora_dtype=dtype)
    assert all(layer.lora_A.dtype == dtype for _, layer in L.lora_layers(kept))


def test_float32_adapters_on_bfloat16_learn_where_bfloat16_adapters_round_small_steps_away():
    """5 AdamW steps at lr 1e-4: every entry of every float32 lora_A moves; in bfloat16 most do not."""
    def moved(lora_dtype):
        torch.manual_seed(0)
        model = randomize_B(L.add_lora(mlp(dtype=torch.bfloat16), r=4, lora_dtype=lora_dtype))
        before = {n: layer.lora_A.detach().clone() for n, layer in L.lora_layers(model)}
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        for step in range(5):
            optimizer.zero_grad()
            model(torch.randn(16, 6, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(step))).float().pow(2).mean().backward()
            optimizer.step()
        return min((layer.lora_A != before[n]).float().mean().item() for n, layer in L.lora_layers(model))
    assert moved(None) == 1.0
    assert moved(torch.bfloat16) < 0.5


@pytest.mark.parametrize("make, targets", [(mlp, None), (tables, ["tok", "pos"]), (cnn, ["0", "2"])],
                         ids=["linear", "embedding", "conv"])
def test_a_merge_into_a_bfloat16_base_is_rounded_once_from_float32(make, targets):
    model = randomize_B(L.add_lora(make().to(torch.bfloat16), r=2, target_modules=targets))
    expected = {n: (layer.weight.float() + layer.delta_weight(torch.float32)).to(torch.bfloat16)
                for n, layer in L.lora_layers(model)}
    merged = L.merged_state_dict(model)
    L.merge_lora(model.eval())
    for n, layer in L.lora_layers(model):
        assert torch.equal(layer.weight, expected[n]) and torch.equal(merged[f"{n}.weight"], expected[n])


# --- grouped and depthwise convolutions, as PEFT adapts them ------------------------------------------


class Conv2dGroups(nn.Module):
    """PEFT's own test model for grouped convolutions (tests/testing_common: Conv2dGroups), smaller."""

    def __init__(self, groups=2, depthwise=False):
        super().__init__()
        channels = 4 if depthwise else 6
        self.conv2d = nn.Conv2d(channels, channels, 3, padding=1, groups=channels if depthwise else groups)
        self.relu, self.flat = nn.ReLU(), nn.Flatten()
        self.lin0 = nn.Linear(channels * 5 * 5, 3)

    def forward(self, x):
        return self.lin0(self.flat(self.relu(self.conv2d(x))))


@pytest.mark.parametrize("depthwise", [False, True], ids=["groups=2", "depthwise"])
def test_grouped_conv_lora_equals_peft_both_ways_and_refuses_to_merge(depthwise, tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = Conv2dGroups(depthwise=depthwise).double().eval()
    r = 4
    ours = randomize_B(L.add_lora(copy.deepcopy(base), r=r, alpha=8, target_modules=["conv2d"]))
    with torch.no_grad():
        ours.conv2d.lora_A.normal_()
    x = torch.randn(2, base.conv2d.in_channels, 5, 5, dtype=torch.float64)
    assert ours.conv2d.lora_B.shape == (base.conv2d.out_channels, r // base.conv2d.groups)
    L.save_peft_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(theirs(x), ours(x), **EXACT)
    assert not torch.allclose(ours(x), base(x))
    theirs.save_pretrained(str(tmp_path / "theirs"))
    torch.testing.assert_close(L.load_peft_adapter(copy.deepcopy(base), tmp_path / "theirs")(x), ours(x), **EXACT)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    for merge in (L.merge_lora, L.merge_and_unload, L.merged_state_dict, lambda m: m.conv2d.merge()):
        with pytest.raises(RuntimeError, match=r"groups=\d+: the ΔW of a grouped convolution's LoRA"):
            merge(ours)
        assert all(torch.equal(ours.state_dict()[k], v) for k, v in before.items()) and not ours.conv2d.merged


def test_grouped_conv_lora_refuses_a_rank_that_is_not_a_multiple_of_groups():
    with pytest.raises(ValueError, match=r"groups=2: a grouped convolution's r must be a multiple of groups"):
        L.add_lora(Conv2dGroups(), r=3, target_modules=["conv2d"])
