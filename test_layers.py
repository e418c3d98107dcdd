"""The specification of LoRA on nn.Embedding (LoRAEmbedding) and nn.Conv1d/2d/3d (LoRAConv).

Above all: each layer computes what independent oracles compute from the same W, A
and B, in every setting hypothesis draws:

    embedding   F.embedding(idx, W + (B @ A)^T * scale, padding_idx), and the classic
                torch.nn.utils.parametrize LoRA on a plain nn.Embedding (outputs, and
                the gradients of A and B)
    conv        F.pad + F.conv{1,2,3}d with W + (B @ A.flatten(1)).view(W.shape) * scale,
                written out here from the settings (stride, padding ints / 'same' /
                'valid', dilation, padding_mode), and the parametrize LoRA on a plain
                nn.ConvNd (outputs, and the gradients of A, B and x)

and then everything that works for linears works for them too: merge / unmerge,
enable / disable, merge_and_unload, merged_state_dict, adapter files, PEFT's format
(oracle: PEFT itself), torch.compile and autocast.

Tolerances (torch.testing.assert_close, rtol / atol): float64 1e-10 / 1e-10 (only the
summation order differs), float32 1e-4 / 1e-4; bfloat16 autocast 2e-2 / 5e-2.
"""

import copy
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch.nn.utils import parametrize

import lora_min as L

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-4)}
EXACT = TOL[torch.float64]
BF16 = dict(rtol=2e-2, atol=5e-2)
FLOAT_DTYPES = [torch.float32, torch.float64]
CONV_CLASSES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
PADDING_MODES = ["zeros", "reflect", "replicate", "circular"]
# Tests that build convolutions run half the profile's examples each (50 by default): several
# such tests draw from the same space, each with its own derandomized examples.
CONV_SETTINGS = settings(max_examples=max(10, settings.default.max_examples // 2))


# --- independent oracles -------------------------------------------------------------------------------


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
    delta = embedding_delta if isinstance(layer, L.LoRAEmbedding) else conv_delta
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
    return make_embedding(case) if isinstance(case, EmbeddingCase) else make_conv(case)


def layer_cases(dtypes=FLOAT_DTYPES):
    """Either layer type, every setting."""
    return embedding_cases(dtypes) | conv_cases(dtypes)


# --- small models that hold all three layer types --------------------------------------------------------


class Mixed(nn.Module):
    """Embedding -> Conv1d (reflect) -> Conv2d (dilated, 'same') -> Linear -> Linear (head, never adapted)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 6, padding_idx=0)
        self.conv1 = nn.Conv1d(6, 8, 3, padding=1, padding_mode="reflect")
        self.conv2 = nn.Conv2d(1, 2, 3, padding="same", dilation=2, padding_mode="circular")
        self.fc = nn.Linear(16, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, idx):
        h = self.embed(idx)  # (N, T, 6)
        h = torch.tanh(self.conv1(h.transpose(1, 2)))  # (N, 8, T)
        h = self.conv2(h.unsqueeze(1))  # (N, 2, 8, T)
        h = h.flatten(1, 2).transpose(1, 2)  # (N, T, 16)
        return self.head(torch.tanh(self.fc(h)))


MIXED_TARGETS = ["embed", "conv1", "conv2", "fc"]


def mixed(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return Mixed().to(dtype)


def randomize(model, seed=1, scale=1.0):
    """Random A and B (A's pad columns kept zero, as the layer keeps them)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in L.lora_layers(model):
            for p in (layer.lora_A, layer.lora_B):
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
            if isinstance(layer, L.LoRAEmbedding) and layer.padding_idx is not None:
                layer.lora_A[:, layer.padding_idx] = 0
    return model


def lora_mixed(dtype=torch.float64, **kwargs):
    """(the frozen base model, a copy with LoRA on MIXED_TARGETS and random A, B). Frozen as LoRA
    freezes it: torch's F.linear may take another kernel (other rounding) for a weight that requires grad."""
    base = mixed(dtype).requires_grad_(False)
    return base, randomize(L.add_lora(copy.deepcopy(base), r=3, alpha=5, target_modules=MIXED_TARGETS, **kwargs))


def ids(seed=1, batch=2, length=7, vocab=20):
    out = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))
    out[0, 0] = 0  # the embedding's padding_idx
    return out


def tiny_llama(tie=False, seed=0, dtype=torch.float64):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=100, max_position_embeddings=64,
                                      tie_word_embeddings=tie, attn_implementation="eager")
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


def tokens(seed=1, batch=2, length=7):
    return torch.randint(0, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


def cnn(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 3 * 3, 5)).to(dtype).eval()


def images(seed=1, dtype=torch.float64):
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --- equivalence with independent oracles: embeddings -----------------------------------------------------


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


@given(embedding_cases(dtypes=[torch.float64]))
def test_embedding_equals_parametrize_outputs_and_gradients(case):
    """Outputs and the gradients of A and B equal the parametrize LoRA's (float64, 1e-10)."""
    base, layer, idx = make_embedding(case)
    ref, ref_lora = parametrize_reference(base, layer)
    y, y_ref = layer(idx), ref(idx)
    torch.testing.assert_close(y, y_ref, **EXACT)
    changed = lora_positions(base, idx)
    if changed.any():
        assert not torch.allclose(y[changed], base(idx)[changed], **EXACT), "LoRA must change the output"
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(case.seed + 1), dtype=case.dtype)
    (y * w).sum().backward()
    (y_ref * w).sum().backward()
    torch.testing.assert_close(layer.lora_A.grad, ref_lora.lora_A.grad, **EXACT)
    torch.testing.assert_close(layer.lora_B.grad, ref_lora.lora_B.grad, **EXACT)
    assert layer.weight.grad is None


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


# --- equivalence with independent oracles: convolutions ---------------------------------------------------


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


@CONV_SETTINGS
@given(conv_cases(dtypes=[torch.float64]))
def test_conv_equals_parametrize_outputs_and_gradients(case):
    """Outputs and the gradients of A, B and x equal the parametrize LoRA's (float64, 1e-10)."""
    base, layer, x = make_conv(case)
    ref, ref_lora = parametrize_reference(base, layer)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, y_ref = layer(x1), ref(x2)
    torch.testing.assert_close(y, y_ref, **EXACT)
    assert not torch.allclose(y, base(x), **EXACT), "LoRA must change the output"
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(case.seed + 1), dtype=case.dtype)
    (y * w).sum().backward()
    (y_ref * w).sum().backward()
    torch.testing.assert_close(layer.lora_A.grad, ref_lora.lora_A.grad, **EXACT)
    torch.testing.assert_close(layer.lora_B.grad, ref_lora.lora_B.grad, **EXACT)
    torch.testing.assert_close(x1.grad, x2.grad, **EXACT)
    assert layer.weight.grad is None and (layer.bias is None or layer.bias.grad is None)


@CONV_SETTINGS
@given(conv_cases())
def test_conv_lora_shapes_follow_the_base_kernel(case):
    """A: (r, in_channels, *kernel_size), B: (out_channels, r), in W's dtype; W and b are the base's Parameters."""
    base = make_conv(case)[0]
    layer = L.LoRAConv(base, r=case.r)
    assert layer.lora_A.shape == (case.r, case.in_ch, *case.kernel) and layer.lora_B.shape == (case.out_ch, case.r)
    assert layer.lora_A.dtype == layer.lora_B.dtype == case.dtype
    assert layer.weight is base.weight and layer.bias is base.bias and not layer.weight.requires_grad


# --- merge / unmerge ------------------------------------------------------------------------------------


@CONV_SETTINGS
@given(layer_cases())
def test_merged_output_equals_unmerged(case):
    """merge() folds ΔW into W and the plain forward then computes the unmerged output, for
    every stride, padding, dilation and padding_mode (PEFT's conv drops the last two)."""
    _, layer, x = make(case)
    layer.eval()
    y = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), y, **TOL[case.dtype])


@CONV_SETTINGS
@given(layer_cases())
def test_merged_weight_is_W_plus_delta(case):
    base, layer, _ = make(case)
    W, delta = base.weight.detach().clone(), layer.delta_weight().detach()
    layer.merge()
    torch.testing.assert_close(layer.weight, W + delta, **TOL[case.dtype])


@CONV_SETTINGS
@given(layer_cases())
def test_unmerge_restores_W_within_the_documented_bound(case):
    """|unmerge(merge(W)) - W| <= eps(dtype) * (|W| + |ΔW|), elementwise; and the output is the unmerged one again."""
    base, layer, x = make(case)
    layer.eval()
    y = layer(x)
    W, delta = base.weight.detach().clone(), layer.delta_weight().detach()
    layer.merge()
    layer.unmerge()
    assert not layer.merged
    bound = torch.finfo(case.dtype).eps * (W.abs() + delta.abs())
    assert ((layer.weight - W).abs() <= bound).all()
    torch.testing.assert_close(layer(x), y, **TOL[case.dtype])


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


# --- initialisation ------------------------------------------------------------------------------------------


@CONV_SETTINGS
@given(layer_cases(), st.sampled_from([None, 1.0, 0.02]))
def test_fresh_layer_has_zero_B_and_equals_the_base_exactly(case, init_std):
    base, _, x = make(case)
    cls = L.LoRAEmbedding if isinstance(case, EmbeddingCase) else L.LoRAConv
    layer = cls(copy.deepcopy(base), r=case.r, alpha=case.alpha, init_std=init_std)
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


# --- refusals, by name ----------------------------------------------------------------------------------------


class DoubledConv(nn.Conv2d):
    """An nn.Conv2d subclass that computes something else."""

    def forward(self, x):
        return 2 * super().forward(x)


@pytest.mark.parametrize("module, match", [
    (lambda: nn.Embedding(10, 4, max_norm=1.0), r"'0': LoRAEmbedding cannot adapt this Embedding: max_norm=1.0"),
    (lambda: nn.Embedding(10, 4, scale_grad_by_freq=True), r"'0': LoRAEmbedding cannot adapt.*scale_grad_by_freq"),
    (lambda: nn.Conv2d(4, 4, 3, groups=4), r"'0': LoRAConv cannot adapt this Conv2d: groups=4"),
    (lambda: nn.Conv1d(4, 6, 3, groups=2), r"'0': LoRAConv cannot adapt this Conv1d: groups=2"),
    (lambda: nn.ConvTranspose2d(3, 4, 3), r"'0': it is a ConvTranspose2d, not an nn.Linear, nn.Embedding or nn.Conv"),
    (lambda: DoubledConv(3, 4, 3), r"'0': it is a DoubledConv, a subclass with its own forward\(\)"),
])
def test_add_lora_refuses_modules_it_cannot_compute_exactly(module, match):
    """A ValueError naming the module and the reason; the model is left as it was."""
    target = module()
    model = nn.Sequential(target)
    with pytest.raises(ValueError, match=match):
        L.add_lora(model, r=2, target_modules=["0"])
    assert model[0] is target and not list(L.lora_layers(model))


@pytest.mark.parametrize("module, match", [
    (lambda: nn.Embedding(10, 4, max_norm=1.0), "max_norm"),
    (lambda: nn.Embedding(10, 4, scale_grad_by_freq=True), "scale_grad_by_freq"),
    (lambda: nn.Conv2d(4, 4, 3, groups=4), "groups=4"),
])
def test_layer_constructors_refuse_the_same_modules(module, match):
    with pytest.raises(ValueError, match=match):
        L.lora_class_for(module())(module(), r=2)


def test_lora_embedding_refuses_dropout():
    with pytest.raises(ValueError, match="dropout does not apply to an embedding"):
        L.LoRAEmbedding(nn.Embedding(10, 4), r=2, dropout=0.1)


def test_lora_conv_refuses_conv_transpose():
    with pytest.raises(TypeError, match="LoRAConv adapts nn.Conv1d / nn.Conv2d / nn.Conv3d, got ConvTranspose2d"):
        L.LoRAConv(nn.ConvTranspose2d(3, 4, 3))


# --- dropout ------------------------------------------------------------------------------------------------


def test_add_lora_dropout_reaches_linears_and_convs_but_not_embeddings():
    model = L.add_lora(mixed(), r=2, dropout=0.1, target_modules=MIXED_TARGETS)
    assert isinstance(model.embed.lora_dropout, nn.Identity) and model.embed.dropout == 0.0
    for layer in (model.conv1, model.conv2, model.fc):
        assert isinstance(layer.lora_dropout, nn.Dropout) and layer.lora_dropout.p == 0.1


def test_conv_dropout_changes_training_outputs_only():
    """Dropout on the LoRA branch's input: training outputs differ from the layer without it;
    eval outputs equal it exactly and are deterministic."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")
    plain = L.LoRAConv(copy.deepcopy(conv), r=2)
    nn.init.normal_(plain.lora_B)
    dropped = L.LoRAConv(copy.deepcopy(conv), r=2, dropout=0.5)
    dropped.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 6, 6)
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


# --- what works for linears works here: enable / disable ------------------------------------------------------


@CONV_SETTINGS
@given(layer_cases())
def test_disabled_layer_equals_the_base_exactly(case):
    base, layer, x = make(case)
    layer.enabled = False
    assert torch.equal(layer(x), base(x))
    layer.enabled = True
    changed = lora_positions(base, x)
    if changed.any():
        assert not torch.equal(layer(x)[changed], base(x)[changed])


def test_lora_disabled_runs_the_base_model_exactly_and_restores_each_state():
    base, model = lora_mixed()
    x = ids()
    y = model(x)
    assert not torch.allclose(y, base(x))
    model.conv2.enabled = False  # a mixed state must come back as it was
    state = [layer.enabled for _, layer in L.lora_layers(model)]
    with L.lora_disabled(model):
        assert torch.equal(model(x), base(x))
    assert [layer.enabled for _, layer in L.lora_layers(model)] == state
    L.set_lora_enabled(model, True)
    assert torch.equal(model(x), y)


# --- merge_lora / unmerge_lora / merge_and_unload --------------------------------------------------------------


def test_merge_lora_equals_unmerged_and_unmerge_lora_restores_each_W():
    base, model = lora_mixed()
    model.eval()
    x = ids()
    y = model(x)
    L.merge_lora(model)
    assert all(layer.merged for _, layer in L.lora_layers(model))
    torch.testing.assert_close(model(x), y, **EXACT)
    L.unmerge_lora(model)
    for name, layer in L.lora_layers(model):
        W = base.get_submodule(name).weight
        bound = torch.finfo(W.dtype).eps * (W.abs() + layer.delta_weight().abs())
        assert not layer.merged and ((layer.weight - W).abs() <= bound).all(), name
    torch.testing.assert_close(model(x), y, **EXACT)


@CONV_SETTINGS
@given(layer_cases())
def test_merge_and_unload_gives_the_plain_layer_with_the_same_settings(case):
    base, layer, _ = make(case)
    plain = L.merge_and_unload(nn.Sequential(layer))[0]
    assert type(plain) is type(base)
    names = ["num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"] \
        if isinstance(base, nn.Embedding) else \
        ["in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode",
         "_reversed_padding_repeated_twice"]
    for name in names:
        assert getattr(plain, name) == getattr(base, name), name
    assert (getattr(plain, "bias", None) is None) == (getattr(base, "bias", None) is None)
    assert not any(p.requires_grad for p in plain.parameters())


@CONV_SETTINGS
@given(layer_cases())
def test_merge_and_unload_output_equals_the_lora_layer(case):
    _, layer, x = make(case)
    plain = L.merge_and_unload(nn.Sequential(layer))
    assert isinstance(layer, L.LoRALayer) and not layer.merged  # the input is left as it was
    torch.testing.assert_close(plain(x), layer(x), **TOL[case.dtype])


def test_merge_and_unload_of_a_model_loads_into_the_original_architecture():
    base, model = lora_mixed()
    x = ids()
    y = model.eval()(x)
    plain = L.merge_and_unload(model)
    assert not list(L.lora_layers(plain))
    assert set(plain.state_dict()) == set(base.state_dict())
    fresh = mixed(seed=5)
    fresh.load_state_dict(plain.state_dict())  # no LoRA code needed
    torch.testing.assert_close(fresh(x), y, **EXACT)


# --- adapters: lora_state_dict, save_adapter --------------------------------------------------------------------


def test_lora_state_dict_round_trip():
    base, model = lora_mixed()
    state = L.lora_state_dict(model)
    assert set(state) == {f"{n}.{ab}" for n in MIXED_TARGETS for ab in ("lora_A", "lora_B")}
    assert state["embed.lora_A"].shape == (3, 20) and state["embed.lora_B"].shape == (6, 3)
    assert state["conv2.lora_A"].shape == (3, 1, 3, 3) and state["conv2.lora_B"].shape == (2, 3)
    fresh = L.add_lora(copy.deepcopy(base), r=3, alpha=5, target_modules=MIXED_TARGETS)
    x = ids()
    assert not torch.equal(fresh(x), model(x))
    L.load_lora_state_dict(fresh, state)
    assert torch.equal(fresh(x), model(x))


def test_save_and_load_adapter_round_trip(tmp_path):
    base, model = lora_mixed()
    L.save_adapter(model, tmp_path / "adapter.pt")
    fresh = L.add_lora(copy.deepcopy(base), r=3, alpha=5, target_modules=MIXED_TARGETS)
    L.load_adapter(fresh, tmp_path / "adapter.pt")
    x = ids()
    assert torch.equal(fresh(x), model(x))


# --- torch.compile, autocast, train / eval ----------------------------------------------------------------------


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


@pytest.mark.parametrize("case", [
    EmbeddingCase(40, 16, 4, 8.0, False, 1, False, (3, 5), torch.float32, 0),
    ConvCase(1, 3, 4, (3,), (2,), (1,), (2,), "reflect", True, 2, (12,), 4, 8.0, False, torch.float32, 0),
    ConvCase(2, 3, 4, (3, 2), (1, 1), "same", (1, 2), "circular", True, 2, (7, 8), 4, 8.0, False, torch.float32, 0),
    ConvCase(3, 2, 3, (2, 2, 2), (1, 2, 1), (1, 0, 1), (1, 1, 1), "zeros", False, None, (5, 5, 5), 2, 2.0, True,
             torch.float32, 0),
], ids=["embedding", "conv1d-reflect", "conv2d-same-circular", "conv3d-unbatched"])
def test_autocast_bfloat16_equals_parametrize_under_the_same_autocast(case):
    base, layer, x = make(case)
    with torch.no_grad():
        for p in (base.weight, layer.weight, layer.lora_A, layer.lora_B):
            p.mul_(0.3)  # O(1) outputs: the bfloat16 tolerance is absolute in part
    ref, _ = parametrize_reference(base, layer)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_ref = layer(x), ref(x)
    # F.embedding is not autocast (float32 lookup + bfloat16 matmul -> float32); convolutions are.
    assert y.dtype == y_ref.dtype == (torch.float32 if isinstance(case, EmbeddingCase) else torch.bfloat16)
    torch.testing.assert_close(y, y_ref, **BF16)


@pytest.mark.parametrize("training", [False, True])
def test_new_layers_take_the_train_or_eval_mode_of_the_modules_they_replace(training):
    model = mixed().train(training)
    L.add_lora(model, r=2, dropout=0.1, target_modules=MIXED_TARGETS)
    for _, layer in L.lora_layers(model):
        assert layer.training == training and layer.lora_dropout.training == training


def test_train_and_eval_never_touch_the_weights():
    _, model = lora_mixed()
    model.eval()
    L.merge_lora(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    model.eval()
    assert all(layer.merged for _, layer in L.lora_layers(model))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# --- tied embeddings: LoRA on embed_tokens of a Llama whose lm_head is the same Parameter -------------------------


def tied_llama_with_lora_on_embed_tokens():
    base = tiny_llama(tie=True)
    model = randomize(L.add_lora(copy.deepcopy(base), r=4, target_modules=["embed_tokens"]), scale=0.1)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied: training is fine
    return base, model


def test_tied_embed_tokens_merge_refuses_naming_lm_head():
    _, model = tied_llama_with_lora_on_embed_tokens()
    assert model.model.embed_tokens.shared_with == ("lm_head.weight",)
    with pytest.raises(RuntimeError, match=r"shared with \['lm_head\.weight'\]"):
        model.model.embed_tokens.merge()


def test_tied_embed_tokens_merge_lora_refuses_and_changes_nothing():
    _, model = tied_llama_with_lora_on_embed_tokens()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"lm_head\.weight.*merge_and_unload"):
        L.merge_lora(model)
    assert not model.model.embed_tokens.merged
    assert set(model.state_dict()) == set(before)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_tied_embed_tokens_merge_and_unload_logits_equal_the_lora_model():
    base, model = tied_llama_with_lora_on_embed_tokens()
    x = tokens()
    logits = model(x).logits
    assert not torch.allclose(logits, base(x).logits, **EXACT)  # the adapter does something
    plain = L.merge_and_unload(model)
    assert type(plain.model.embed_tokens) is nn.Embedding
    torch.testing.assert_close(plain(x).logits, logits, rtol=1e-9, atol=1e-9)
    assert torch.equal(plain.lm_head.weight, base.lm_head.weight)  # untied: the head keeps W


# --- PEFT, both ways (the oracle is PEFT itself) -----------------------------------------------------------------


def randomize_peft(peft_model, seed=3, scale=0.1):
    """Random values for every LoRA tensor of a PEFT model (its init has A or B at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return peft_model


def peft_from_pretrained(base, directory):
    peft = pytest.importorskip("peft")
    return peft.PeftModel.from_pretrained(copy.deepcopy(base), str(directory)).eval()


def read_safetensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


LLAMA_TARGETS = ["embed_tokens", "q_proj", "v_proj"]


def llama_with_lora_on_embed_tokens():
    base = tiny_llama()
    return base, randomize(L.add_lora(copy.deepcopy(base), r=4, alpha=8, target_modules=LLAMA_TARGETS), scale=0.1)


def test_save_peft_adapter_with_embed_tokens_loads_in_peft_with_equal_logits(tmp_path):
    base, model = llama_with_lora_on_embed_tokens()
    L.save_peft_adapter(model, tmp_path)
    x = tokens()
    logits = model(x).logits
    assert not torch.allclose(logits, base(x).logits, **EXACT)
    torch.testing.assert_close(peft_from_pretrained(base, tmp_path)(input_ids=x).logits, logits, **EXACT)


def test_save_peft_adapter_writes_embedding_keys_without_weight_suffix(tmp_path):
    _, model = llama_with_lora_on_embed_tokens()
    L.save_peft_adapter(model, tmp_path)
    shapes = {k: tuple(v.shape) for k, v in read_safetensors(tmp_path / "adapter_model.safetensors").items()}
    assert shapes["base_model.model.model.embed_tokens.lora_embedding_A"] == (4, 100)  # (r, vocab)
    assert shapes["base_model.model.model.embed_tokens.lora_embedding_B"] == (32, 4)  # (dim, r)
    assert not any("embed_tokens" in k and k.endswith(".weight") for k in shapes)
    assert len(shapes) == 2 + 2 * 2 * 2  # embedding + (q_proj, v_proj) x 2 layers, A and B each


def peft_llama_with_lora_on_embed_tokens(directory):
    peft = pytest.importorskip("peft")
    base = tiny_llama()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], lora_dropout=0.1)
    theirs = randomize_peft(peft.get_peft_model(copy.deepcopy(base), config)).eval()
    theirs.save_pretrained(str(directory))
    return base, theirs


def test_peft_adapter_with_embed_tokens_loads_in_lora_min_with_equal_logits(tmp_path):
    base, theirs = peft_llama_with_lora_on_embed_tokens(tmp_path)
    ours = L.load_peft_adapter(copy.deepcopy(base), tmp_path).eval()
    assert isinstance(ours.model.embed_tokens, L.LoRAEmbedding) and ours.model.embed_tokens.dropout == 0.0
    assert ours.model.layers[0].self_attn.q_proj.dropout == 0.1
    x = tokens()
    logits = ours(x).logits
    assert not torch.allclose(logits, base(x).logits, **EXACT)
    torch.testing.assert_close(logits, theirs(input_ids=x).logits, **EXACT)


def test_load_peft_adapter_accepts_the_base_layer_weight_peft_writes_when_it_equals_the_models(tmp_path):
    base, _ = peft_llama_with_lora_on_embed_tokens(tmp_path)
    state = read_safetensors(tmp_path / "adapter_model.safetensors")
    assert torch.equal(state["base_model.model.model.embed_tokens.base_layer.weight"], base.model.embed_tokens.weight)
    model = L.load_peft_adapter(copy.deepcopy(base), tmp_path)
    assert torch.equal(model.model.embed_tokens.weight, base.model.embed_tokens.weight)


def test_load_peft_adapter_refuses_a_base_layer_weight_that_differs_from_the_models(tmp_path):
    from safetensors.torch import save_file

    base, _ = peft_llama_with_lora_on_embed_tokens(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    state = read_safetensors(path)
    state["base_model.model.model.embed_tokens.base_layer.weight"][5, 3] += 1.0  # e.g. a fine-tuned base
    save_file(state, str(path), metadata={"format": "pt"})
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match=r"carries its own base weight 'base_model\.model\.model\.embed_tokens\.base_layer"):
        L.load_peft_adapter(model, tmp_path)
    assert not list(L.lora_layers(model))  # refused before changing anything


CNN_TARGETS = ["0", "2"]


def test_cnn_adapter_saved_by_lora_min_loads_in_peft_with_equal_outputs(tmp_path):
    base = cnn()
    ours = randomize(L.add_lora(copy.deepcopy(base), r=3, alpha=6, target_modules=CNN_TARGETS), scale=0.3).eval()
    L.save_peft_adapter(ours, tmp_path)
    x = images()
    y = ours(x)
    assert not torch.allclose(y, base(x), **EXACT)
    torch.testing.assert_close(peft_from_pretrained(base, tmp_path)(x), y, **EXACT)


def test_cnn_adapter_saved_by_peft_loads_in_lora_min_with_equal_outputs(tmp_path):
    peft = pytest.importorskip("peft")
    base = cnn()
    theirs = randomize_peft(peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=3, lora_alpha=6, target_modules=CNN_TARGETS, lora_dropout=0.1)), scale=0.3).eval()
    theirs.save_pretrained(str(tmp_path))
    ours = L.load_peft_adapter(copy.deepcopy(base), tmp_path).eval()
    assert [type(ours[i]) for i in (0, 2)] == [L.LoRAConv, L.LoRAConv]
    x = images()
    y = ours(x)
    assert not torch.allclose(y, base(x), **EXACT)
    torch.testing.assert_close(y, theirs(x), **EXACT)


def test_cnn_peft_files_hold_conv_shaped_A_and_1x1_B_both_ways(tmp_path):
    """PEFT's layout: lora_A.weight (r, in, kh, kw), lora_B.weight (out, r, 1, 1); lora_min writes the same."""
    peft = pytest.importorskip("peft")
    base = cnn()
    peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=3, target_modules=CNN_TARGETS)).save_pretrained(
        str(tmp_path / "peft"))
    L.save_peft_adapter(L.add_lora(copy.deepcopy(base), r=3, target_modules=CNN_TARGETS), tmp_path / "ours")
    expected = {"base_model.model.0.lora_A.weight": (3, 3, 3, 3), "base_model.model.0.lora_B.weight": (8, 3, 1, 1),
                "base_model.model.2.lora_A.weight": (3, 8, 3, 3), "base_model.model.2.lora_B.weight": (8, 3, 1, 1)}
    for directory in ("peft", "ours"):
        state = read_safetensors(tmp_path / directory / "adapter_model.safetensors")
        assert {k: tuple(v.shape) for k, v in state.items()} == expected, directory


# --- merged_state_dict -------------------------------------------------------------------------------------------


def mixed_with_disabled_and_merged_layers():
    """LoRA on linear, embedding and both convs; fc disabled, conv1 merged; head without LoRA."""
    base, model = lora_mixed()
    model.eval()
    model.fc.enabled = False
    model.conv1.merge()
    return base, model


def test_merged_state_dict_equals_the_state_dict_of_merge_and_unload():
    _, model = mixed_with_disabled_and_merged_layers()
    state, expected = L.merged_state_dict(model), L.merge_and_unload(model).state_dict()
    assert list(state) == list(expected)
    for k in expected:
        assert torch.equal(state[k], expected[k]), k


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
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    flags = [(layer.enabled, layer.merged) for _, layer in L.lora_layers(model)]
    for _ in range(1000):
        L.merged_state_dict(model)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n][0]) and p.requires_grad == before[n][1], n
    assert [(layer.enabled, layer.merged) for _, layer in L.lora_layers(model)] == flags


def test_merged_state_dict_shares_the_tensors_it_does_not_merge():
    """Layers without LoRA, base biases and (here) the merged layer's weight: the model's own memory, not copies."""
    _, model = mixed_with_disabled_and_merged_layers()
    state = L.merged_state_dict(model)
    shared = {"head.weight": model.head.weight, "head.bias": model.head.bias, "embed.weight": None,
              "conv1.bias": model.conv1.bias, "conv2.bias": model.conv2.bias, "fc.bias": model.fc.bias,
              "conv1.weight": model.conv1.weight, "fc.weight": model.fc.weight}
    for key, param in shared.items():
        if param is not None:
            assert state[key].data_ptr() == param.data_ptr(), key
    assert state["embed.weight"].data_ptr() != model.embed.weight.data_ptr()  # merged: a new tensor
    assert state["conv2.weight"].data_ptr() != model.conv2.weight.data_ptr()


def test_merged_state_dict_with_a_tied_lm_head_keeps_the_embedding_W():
    base = tiny_llama(tie=True)
    model = randomize(L.add_lora(copy.deepcopy(base), r=4, target_modules=["lm_head"]), scale=0.1)
    assert model.lm_head.shared_with == ("model.embed_tokens.weight",)
    state = L.merged_state_dict(model)
    assert torch.equal(state["model.embed_tokens.weight"], base.model.embed_tokens.weight)
    torch.testing.assert_close(state["lm_head.weight"], base.lm_head.weight + model.lm_head.delta_weight(), **EXACT)
    expected = L.merge_and_unload(model).state_dict()
    assert set(state) == set(expected) and all(torch.equal(state[k], expected[k]) for k in expected)


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


def test_merged_state_dict_calls_do_not_drift_in_bfloat16():
    base, model = bf16_mixed()
    first = L.merged_state_dict(model)
    for _ in range(100):
        state = L.merged_state_dict(model)
    for name, _ in L.lora_layers(model):
        assert torch.equal(model.get_submodule(name).weight, base.get_submodule(name).weight), name
    assert all(torch.equal(state[k], first[k]) for k in first)
