"""lora_min: Low-Rank Adaptation (LoRA) in one readable file.

LoRA (Hu et al., 2021, https://arxiv.org/abs/2106.09685) freezes a pretrained layer's W and learns a low-rank update:

    W' = W + ΔW,    ΔW = (B @ A) * scale,    scale = alpha / r

    W: (out, in)   frozen, never changed by training
    A: (r, in)     trained, random at the start
    B: (out, r)    trained, zero at the start, so ΔW = 0 and W' = W at first

Only r * (in + out) numbers are trained per layer instead of in * out. For a linear layer
y = x W^T + b we never form ΔW in training: the factored forward y = x W^T + b + ((x A^T) B^T) * scale
costs two thin matrix products, and backward needs no (out, in) gradient. `merge()` folds ΔW into W once.

The lesson comes first and runs on its own: the math, LoRALayer and LoRALinear. The plumbing follows, each
part named for its promise: other layers (quantized bases too), adapting a model, adapter files (ours and
PEFT's), the guards, a faster backward. Needs only torch (2.4-2.14) and the stdlib.
"""
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

# ---------------------------------------------------------------------------
# The math: plain tensor algebra (@, *, +, .T only), so the same functions run on torch tensors, NumPy
# arrays or any Python array API library, and read as the equations above (so they take no type hints).
# ---------------------------------------------------------------------------


def lora_delta(A, B, scale):
    """The weight update ΔW = (B @ A) * scale.

    A: (r, in), B: (out, r), scale: float  ->  ΔW: (out, in)
    """
    return (B @ A) * scale


def lora_update(x, A, B, scale):
    """The LoRA branch of the forward, x ΔW^T, without ever forming ΔW.

    x: (..., in), A: (r, in), B: (out, r)  ->  (..., out)

    Scaling the thin (..., r) tensor instead of the (..., out) result is the same math at r/out of the cost.
    """
    return ((x @ A.T) * scale) @ B.T


def lora_forward(x, W, b, A, B, scale):
    """The whole LoRA linear layer: y = x W^T + b + ((x A^T) B^T) * scale.

    x: (..., in), W: (out, in), b: (out,) or None, A: (r, in), B: (out, r)  ->  y: (..., out). Never forms B @ A.
    """
    y = x @ W.T
    if b is not None:
        y = y + b
    return y + lora_update(x, A, B, scale)


# ---------------------------------------------------------------------------
# The layer: what every LoRA layer shares (LoRALayer), then LoRALinear
# ---------------------------------------------------------------------------

# In a LoRA layer's state_dict only while it is merged: a checkpoint whose `weight` holds
# W + ΔW can never be loaded as if it held W (ΔW would then count twice).
MERGED_KEY = "lora_merged"


class LoRALayer(nn.Module):
    """A frozen base layer's weight W plus a trainable low-rank update ΔW = (B @ A) * scale.

    What every adapted layer shares: lora_A, lora_B, the scale, the `enabled` and `merged` states, merge /
    unmerge and the checkpoint flag. A subclass says what differs: the shapes of A and B (`lora_shapes`), ΔW in
    W's layout (`as_weight`), the base's forward and the adapted one (`base_forward`, `adapted_forward`), and
    the plain layer (`base_module`).

    Args (every subclass):
        base: the layer to adapt. Its `weight` and `bias` Parameters are reused (not copied) and frozen, so
            the state_dict keys are the base's plus `lora_A` and `lora_B`.
        r: rank of the update, a positive int.
        alpha: scaling numerator, a positive number; defaults to r (scale 1).
        dropout: dropout probability on the input of the LoRA branch only.
        use_rslora: scale = alpha / sqrt(r) (rank-stabilised LoRA) instead of alpha / r.
        init_std: None for the layer type's usual init of A; a float for A ~ N(0, init_std^2).
        lora_dtype: A's and B's dtype; None: float32 on a float16 / bfloat16 base (small updates
            would round away there), else the base's. The output is in the base's dtype.

    States: `enabled` (False: exactly the base layer), `merged` (ΔW is folded into `weight`; train() and eval()
    never touch weights). `shared_with`: other modules' names for this weight (tied embeddings, found by
    add_lora): merge() refuses to write into them.
    """

    base_types: tuple = ()  # the nn.Module classes a subclass adapts

    def __init__(self, base: nn.Module, r: int = 8, alpha: Optional[float] = None, dropout: float = 0.0,
                 use_rslora: bool = False, init_std: Optional[float] = None, lora_dtype: Optional[torch.dtype] = None):
        self.check(base, r, alpha, dropout, use_rslora, init_std, lora_dtype)
        super().__init__()
        self.keep_base(base)  # self.weight, self.bias: the base's own Parameters (no copy), frozen here
        for p in (self.weight, self.bias):
            if p is not None:
                p.requires_grad_(False)
        self.r, self.alpha, self.use_rslora, self.dropout = r, float(r if alpha is None else alpha), use_rslora, dropout
        self.scale = self.alpha / (math.sqrt(r) if use_rslora else r)
        a_shape, b_shape = self.lora_shapes(base, r)
        dtype = lora_dtype or torch.promote_types(self.weight_dtype(base), torch.float32)  # half: float32 A, B
        self.lora_A = nn.Parameter(torch.empty(a_shape, device=self.weight.device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(b_shape, device=self.weight.device, dtype=dtype))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.shared_with = ()
        self._enabled, self.merged = True, False
        self.keep_base_settings(base)
        self.reset_lora_parameters(init_std)
        self.train(base.training)  # a new layer behaves as the one it replaces (eval stays eval)

    def keep_base(self, base: nn.Module) -> None:
        self.weight, self.bias = base.weight, getattr(base, "bias", None)  # the same Parameter objects

    @staticmethod
    def weight_dtype(base: nn.Module) -> torch.dtype:  # the dtype W computes in (a quantized W: see QLoRALinear)
        return base.weight.dtype

    @classmethod
    def check(cls, base: nn.Module, r: int = 8, alpha: Optional[float] = None, dropout: float = 0.0,
              use_rslora: bool = False, init_std: Optional[float] = None,
              lora_dtype: Optional[torch.dtype] = None) -> None:
        """Raise ValueError if this layer type cannot adapt `base` with these settings."""
        def number(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        if cls.base_class(base) is None:
            names = " / ".join("nn." + t.__name__ for t in cls.base_types) or cls.__name__[len("LoRA"):]
            raise TypeError(f"{cls.__name__} adapts {names}, got {type(base).__name__}")
        if not (isinstance(r, int) and not isinstance(r, bool) and r >= 1):
            raise ValueError(f"r (the LoRA rank) must be a positive int, got {r!r}")
        for name, value in (("alpha", alpha), ("init_std", init_std)):
            if value is not None and not (number(value) and value > 0):
                raise ValueError(f"{name} must be a positive number or None, got {value!r}")
        if not (number(dropout) and 0 <= dropout < 1):
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        if not isinstance(use_rslora, bool):
            raise ValueError(f"use_rslora must be True or False, got {use_rslora!r}")
        if not (lora_dtype is None or isinstance(lora_dtype, torch.dtype) and lora_dtype.is_floating_point):
            raise ValueError(f"lora_dtype must be None or a floating torch.dtype, got {lora_dtype!r}")
        if cls.weight_dtype(base) not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise ValueError(f"{cls.__name__} needs a float16 / bfloat16 / float32 / float64 weight, got "
                             f"{cls.weight_dtype(base)} (quantized: bitsandbytes' Linear4bit / Linear8bitLt, torchao)")
        if reason := cls.why_unsupported(base, r, dropout):
            raise ValueError(f"{cls.__name__} cannot adapt this {type(base).__name__}: {reason}")

    @classmethod
    def why_unsupported(cls, base: nn.Module, r: int, dropout: float) -> Optional[str]:
        """Why this layer type cannot compute `base` exactly with this r and dropout (None if it can)."""
        return None

    @classmethod
    def base_class(cls, module: nn.Module) -> Optional[type]:  # the one of base_types module is, or None
        return next((t for t in cls.base_types if isinstance(module, t)), None)

    def reset_lora_parameters(self, init_std: Optional[float] = None) -> None:
        """A random (kaiming-uniform as the base layer's own init, or N(0, init_std^2)), B = 0: ΔW = 0."""
        if self.merged:
            raise RuntimeError("reset_lora_parameters() on a merged layer; call unmerge() first")
        with torch.no_grad():
            if init_std is None:
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            else:
                nn.init.normal_(self.lora_A, mean=0.0, std=init_std)
            nn.init.zeros_(self.lora_B)

    @property
    def enabled(self) -> bool:
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        if self.merged and not value:
            raise RuntimeError("cannot disable a merged LoRA layer: its weight holds W + ΔW; call unmerge() first")
        self._enabled = bool(value)

    def delta_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """ΔW = (lora_B @ lora_A) * scale in the weight's shape (in `dtype` if given)."""
        A, B = self.lora_A.to(dtype or self.lora_A.dtype), self.lora_B.to(dtype or self.lora_B.dtype)
        return self.as_weight(lora_delta(A.flatten(1), B, self.scale))

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # named as in nn.Linear: self.fc(input=x) works
        x, trained = input, self.lora_A.requires_grad or self.lora_B.requires_grad
        if self.merged and self.training and torch.is_grad_enabled() and trained:
            raise RuntimeError("forward in training mode on a merged LoRA layer: lora_A and lora_B would get no "
                               "gradient. Call unmerge() to train, or use eval() / torch.no_grad() for inference.")
        if self.merged or not self.enabled:
            return self.base_forward(x)  # the base layer, bit for bit (with W + ΔW when merged)
        return self.adapted_forward(x)

    # --- merge / unmerge: W rewritten in place, computed in at least float32, rounded once. So unmerge() restores W
    # up to rounding: |W_unmerged - W| <= eps (|W| + |ΔW|), eps = finfo(W.dtype).eps (or use merged_state_dict).

    def merged_weight(self) -> torch.Tensor:
        """W + ΔW, computed in at least float32, rounded once to W's dtype."""
        return self._weight_plus(+1)

    def _weight_plus(self, sign, check_finite=True):
        result = self._plus(sign, torch.promote_types(self.weight.dtype, torch.float32))
        if check_finite and result.device.type != "meta" and not torch.isfinite(result).all():
            raise RuntimeError(f"W {'+' if sign > 0 else '-'} ΔW has inf or NaN entries in {self.weight.dtype} "
                               "(overflow?); the weight was left unchanged")
        return result

    def _plus(self, sign, dtype):  # W + sign * ΔW computed in dtype, rounded once to W's
        return (self.weight.to(dtype) + sign * self.delta_weight(dtype)).to(self.weight.dtype)

    def check_writable(self, what: str) -> None:
        """Raise where writing into `weight` would change more than this layer."""
        if any(hasattr(p, "placements") for p in (self.weight, self.lora_A, self.lora_B)):  # DTensor shards
            raise RuntimeError(f"{what}() on sharded (FSDP2 / DTensor) parameters: each rank holds a slice of W; "
                               "load a full state dict into an unsharded model and merge that")
        if self.shared_with:
            raise RuntimeError(f"{what}() would write W + ΔW into a weight that is shared with "
                               f"{list(self.shared_with)} (tied weights): those would change too. Use "
                               "merge_and_unload(model), which copies it.")

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ΔW into weight in place: forward becomes the plain layer's."""
        if self.merged or not self.enabled:
            raise RuntimeError(f"merge() on a LoRA layer that is {'already merged' if self.merged else 'disabled'}")
        self.check_writable("merge")
        self.weight.copy_(self.merged_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take ΔW back out of weight (exact up to the rounding documented above)."""
        if not self.merged:
            raise RuntimeError("unmerge() on a LoRA layer that is not merged")
        self.check_writable("unmerge")
        self.weight.copy_(self._weight_plus(-1))
        self.merged = False

    # --- checkpoints remember whether `weight` holds W or W + ΔW ------------------

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.merged:
            destination[prefix + MERGED_KEY] = torch.tensor(True)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        saved_merged = bool(state_dict.pop(prefix + MERGED_KEY, False))
        holds_this_layer = any(k.startswith(prefix) and "." not in k[len(prefix):] for k in state_dict)
        if saved_merged != self.merged and (saved_merged or holds_this_layer):
            what = {True: "merged (weight = W + ΔW)", False: "unmerged (weight = W)"}
            error_msgs.append(f"{prefix.rstrip('.') or type(self).__name__}: the checkpoint was saved "
                              f"{what[saved_merged]} but this layer is {what[self.merged]}; call "
                              f"{'merge' if saved_merged else 'unmerge'}() on it before loading.")
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        base = self.base_module(self.weight, self.bias)  # the layer it adapts (repr only: shares the Parameters)
        return (f"{type(base).__name__}({base.extra_repr()}), r={self.r}, alpha={self.alpha:g}, "
                f"scale={self.scale:.4g}, enabled={self.enabled}, merged={self.merged}")


class LoRALinear(LoRALayer):
    """A frozen nn.Linear plus a trainable low-rank update: y = x W^T + b + ((dropout(x) A^T) B^T) * scale.

    Shapes: weight (out, in), bias (out,), lora_A (r, in), lora_B (out, r); input (..., in) -> output (..., out).
    Args: see LoRALayer. use_fast_path (True after the lesson): the same math, its backward written out, faster.
    """

    base_types = (nn.Linear,)
    use_fast_path = False

    @staticmethod
    def lora_shapes(linear: nn.Linear, r: int) -> tuple:
        return (r, linear.in_features), (linear.out_features, r)

    def keep_base_settings(self, linear: nn.Linear) -> None:
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def as_weight(self, delta: torch.Tensor) -> torch.Tensor:
        return delta

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        x_lora = self.lora_dropout(x).to(self.lora_A.dtype)  # the branch runs in the adapter's dtype
        if self.use_fast_path and _fast_path_applies(self, x, x_lora):
            return _fast_lora_linear(self, x, x_lora)
        y = self.base_forward(x)  # x W^T + b: (..., out)
        h = F.linear(x_lora, self.lora_A) * self.scale  # dropout(x) A^T * scale: (..., r)
        return (y + F.linear(h, self.lora_B)).to(y.dtype)  # + h B^T: (..., out), rounded once

    def base_module(self, weight: nn.Parameter, bias: Optional[nn.Parameter]) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device="meta")
        linear.weight, linear.bias = weight, bias
        return linear


# ===========================================================================
# The plumbing: everything above is LoRA; each part below keeps one promise.
# ===========================================================================

import ast, collections, contextlib, copy, difflib, functools, inspect, json, os, re, textwrap, warnings  # noqa
from typing import Any, Iterable, Iterator, Sequence, Union  # noqa: E402  (the lesson above needs only torch)

from torch.nn.utils import parametrize  # noqa: E402

# --- The same idea on other layers: an embedding is a linear map of one-hot rows,
# a convolution a linear map of image patches. Each gets the same A, B and ΔW.


class LoRAEmbedding(LoRALayer):
    """A frozen nn.Embedding plus a trainable low-rank update.

    Seen as a linear map of one-hot rows (in = num_embeddings, out = embedding_dim),
    the table is W^T, so with A (r, num_embeddings), B (embedding_dim, r):

        ΔW_table = (B @ A)^T * scale                       (num_embeddings, embedding_dim)
        y = W[idx] + (A^T[idx] B^T) * scale                 idx: (...) -> y: (..., embedding_dim)

    A^T[idx] is a lookup of A's columns: the forward never forms ΔW. Init: B = 0, A ~ N(0, 1) (a
    one-hot input has fan-in 1). padding_idx: as in nn.Embedding, the pad row passes no gradient;
    A's column for it starts at zero. No dropout (an index cannot be dropped out; nor in PEFT).
    """

    base_types = (nn.Embedding,)

    @classmethod
    def why_unsupported(cls, base: nn.Embedding, r: int, dropout: float) -> Optional[str]:
        if base.max_norm is not None:  # F.embedding renormalises W's rows in place: W + ΔW would need it
            return f"max_norm={base.max_norm} renormalises the stored table, which LoRA's factored lookup cannot do"
        if base.scale_grad_by_freq:  # the B gradient would not be scaled as the merged table's is
            return "scale_grad_by_freq=True has no exact factored form"
        if dropout:
            return "dropout does not apply to an embedding's indices; use dropout=0 (add_lora does so itself)"
        return None

    @staticmethod
    def lora_shapes(embedding: nn.Embedding, r: int) -> tuple:
        return (r, embedding.num_embeddings), (embedding.embedding_dim, r)

    def keep_base_settings(self, embedding: nn.Embedding) -> None:
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.padding_idx, self.sparse = embedding.padding_idx, embedding.sparse

    def reset_lora_parameters(self, init_std: Optional[float] = None) -> None:
        """A ~ N(0, init_std^2) (std 1 by default), B = 0, A's padding_idx column = 0."""
        super().reset_lora_parameters(1.0 if init_std is None else init_std)
        if self.padding_idx is not None:
            with torch.no_grad():
                self.lora_A[:, self.padding_idx] = 0

    def as_weight(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.T

    def base_forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.weight, self.padding_idx, sparse=self.sparse)

    def adapted_forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = F.embedding(idx, self.lora_A.T, self.padding_idx)  # (..., r): column idx of A
        update = (h * self.scale) @ self.lora_B.T
        if self.padding_idx is not None:  # the pad row is a constant, as nn.Embedding treats it
            update = torch.where((idx == self.padding_idx).unsqueeze(-1), update.detach(), update)
        y = self.base_forward(idx)
        return (y + update).to(y.dtype)

    def base_module(self, weight: nn.Parameter, bias: None) -> nn.Embedding:
        embedding = nn.Embedding(self.num_embeddings, self.embedding_dim, self.padding_idx, sparse=self.sparse,
                                 device="meta")
        embedding.weight = weight
        return embedding


class LoRAConv(LoRALayer):
    """A frozen nn.Conv1d / Conv2d / Conv3d plus a trainable low-rank update.

    A convolution is a linear map of patches (in = in_channels * prod(kernel_size)),
    so A is r filters of the base's own kernel and B mixes them pointwise:

        lora_A (r, in_channels, *kernel), lora_B (out_channels, r)
        ΔW = (B @ A.flatten(1)).view(W.shape) * scale
        y = conv(x, W, b) + B · conv(dropout(x), A) * scale     (B per pixel: a 1x1 conv)

    Both convolutions run the base's own _conv_forward with its stride, padding, dilation and
    padding_mode, so unmerged computes exactly what merged does. Grouped convolutions (groups =
    G > 1) follow PEFT's rule: A dense (every input channel), B a grouped 1x1 conv (out, r / G).
    That ΔW mixes channels the grouped W never does, so it does not fit W: these never merge.
    """

    base_types = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

    @classmethod
    def why_unsupported(cls, base: nn.Module, r: int, dropout: float) -> Optional[str]:
        if base.groups != 1 and r % base.groups:
            return f"groups={base.groups}: a grouped convolution's r must be a multiple of groups (PEFT's rule), r={r}"
        if base.groups != 1 and (base.padding_mode != "zeros" or any(d != 1 for d in base.dilation)):
            return f"groups={base.groups} with padding_mode={base.padding_mode!r}, dilation={base.dilation}"
        return None

    @staticmethod
    def lora_shapes(conv: nn.Module, r: int) -> tuple:
        return (r, conv.in_channels, *conv.kernel_size), (conv.out_channels, r // conv.groups)

    def delta_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        if self.groups != 1:
            raise RuntimeError(f"groups={self.groups}: the ΔW of a grouped convolution's LoRA (a dense A) does not "
                               "fit its grouped weight, so it cannot be merged; keep the layer unmerged")
        return super().delta_weight(dtype)

    def keep_base_settings(self, conv: nn.Module) -> None:
        self.conv_class = self.base_class(conv)
        for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                     "padding_mode", "_reversed_padding_repeated_twice"):
            setattr(self, name, getattr(conv, name))

    def as_weight(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.view(self.weight.shape)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_class._conv_forward(self, x, self.weight, self.bias)

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        y, x_lora = self.base_forward(x), self.lora_dropout(x).to(self.lora_A.dtype)
        conv = (F.conv1d, F.conv2d, F.conv3d)[len(self.kernel_size) - 1]
        if self.groups == 1:
            h = self.conv_class._conv_forward(self, x_lora, self.lora_A, None)  # (N, r, *spatial)
        else:  # A is dense: all input channels, the base's stride and padding (PEFT's rule)
            h = conv(x_lora, self.lora_A, None, self.stride, self.padding)
        B = self.lora_B.view(*self.lora_B.shape, *[1] * len(self.kernel_size))  # B per pixel: a 1x1 convolution
        return (y + conv(h * self.scale, B, groups=self.groups)).to(y.dtype)

    def base_module(self, weight: nn.Parameter, bias: Optional[nn.Parameter]) -> nn.Module:
        conv = self.conv_class(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                               self.dilation, self.groups, bias is not None, self.padding_mode, device="meta")
        conv.weight, conv.bias = weight, bias
        return conv


class LoRAConv1D(LoRALayer):
    """transformers' Conv1D (GPT-2's projections) plus a trainable low-rank update. Conv1D is a
    linear layer whose weight is stored transposed, (in, out): y = x W + b. A (r, in) and B (out, r)
    are LoRALinear's, so ΔW in Conv1D's layout is (B @ A)^T * scale and the branch is the same.
    Found by its class name, without importing transformers."""

    @classmethod
    def base_class(cls, module: nn.Module) -> Optional[type]:
        return next((k for k in type(module).__mro__ if k.__name__ == "Conv1D" and hasattr(module, "nf")), None)

    @staticmethod
    def lora_shapes(conv1d: nn.Module, r: int) -> tuple:
        return (r, conv1d.nx), (conv1d.nf, r)

    def keep_base_settings(self, conv1d: nn.Module) -> None:
        self.conv1d_class, self.nx, self.nf = self.base_class(conv1d), conv1d.nx, conv1d.nf

    def as_weight(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.T

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv1d_class.forward(self, x)  # x W + b, as Conv1D computes it (nf, weight, bias are ours)

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_forward(x)
        h = F.linear(self.lora_dropout(x).to(self.lora_A.dtype), self.lora_A) * self.scale  # (..., r)
        return (y + F.linear(h, self.lora_B)).to(y.dtype)

    def base_module(self, weight: nn.Parameter, bias: Optional[nn.Parameter]) -> nn.Module:
        with torch.device("meta"):  # Conv1D's __init__ allocates and initialises a weight we replace
            conv1d = self.conv1d_class(self.nf, self.nx)
        conv1d.weight, conv1d.bias = weight, bias
        return conv1d


# --- QLoRA (Dettmers et al., 2023): the same LoRALinear on a frozen quantized W (bitsandbytes, torchao).


def _is_torchao(weight):  # any torchao tensor class: its subclasses of TorchAOBaseTensor, and NF4Tensor (torchtune's)
    return any(k.__module__.startswith("torchao.") for k in type(weight).__mro__)


class QLoRALinear(LoRALinear):
    """LoRALinear on a frozen quantized linear layer: a quantized W is just another W, y = base_q(x) +
    ((dropout(x) A^T) B^T) * scale. The quantized module computes, saves and loads its own part, so no float
    copy of W is made and its state_dict keys stay (weight, weight.absmax, SCB, ...); A and B train in float.
    Bases, found by class name: bitsandbytes' Linear4bit (nf4 / fp4) and Linear8bitLt, an nn.Linear with a
    torchao weight. W + ΔW does not fit in 4 or 8 bits: merge() refuses; merge_and_unload and
    merged_state_dict export dequantized W + ΔW (in float32, rounded once to W's dtype before it was
    quantized, the model's around it)."""

    @classmethod
    def base_class(cls, module: nn.Module) -> Optional[type]:
        bnb = (k for k in type(module).__mro__ if k.__name__ in ("Linear4bit", "Linear8bitLt")
               and k.__module__.startswith("bitsandbytes"))
        return next(bnb, nn.Linear if isinstance(module, nn.Linear) and _is_torchao(module.weight) else None)

    @classmethod
    def why_unsupported(cls, base: nn.Module, r: int, dropout: float) -> Optional[str]:
        w = base.weight
        if getattr(w, "has_fp16_weights", False):
            return "has_fp16_weights=True: bitsandbytes trains that float16 weight itself; freeze it in 8 bits"
        if getattr(w, "bnb_quantized", True) is False or type(w).__name__ == "Int8Params" and w.dtype != torch.int8:
            return "its weight is not quantized yet (bitsandbytes quantizes on .to(device)): move the model first"
        if any(getattr(w, a, None) is not None for a in ("act_quant_kwargs", "activation_quantization",
                                                          "input_quant_func")):
            return f"its torchao {type(w).__name__} quantizes the input too, which then gets no gradient"
        return None

    @staticmethod
    def weight_dtype(base: nn.Module) -> torch.dtype:  # W's float dtype before it was quantized: the model's around it
        w = base.weight  # (so the export runs where the layer ran, whatever bitsandbytes' compute dtype)
        if type(w).__name__ == "Params4bit":  # (bitsandbytes' CPU eval layout keeps the dtype in original_dtype)
            state = w.quant_state
            return (base.compute_dtype or w.dtype) if state is None else getattr(state, "original_dtype", state.dtype)
        if type(w).__name__ == "Int8Params":
            return torch.float32 if base.bias is None else base.bias.dtype
        return w.dtype  # torchao's tensors report the dtype they quantized

    def keep_base(self, base: nn.Module) -> None:
        super().keep_base(base)
        object.__setattr__(self, "quantized", base)  # unregistered: its Parameters are ours, so are its keys
        kind = type(base.weight).__name__
        self.quantization = {"Params4bit": f"bitsandbytes 4-bit ({getattr(base.weight, 'quant_type', '')})",
                             "Int8Params": "bitsandbytes 8-bit"}.get(kind, f"torchao {kind}")
        self.export_dtype = self.weight_dtype(base)

    def train(self, mode: bool = True) -> "QLoRALinear":
        self.quantized.train(mode)  # bitsandbytes computes differently in train and eval mode
        return super().train(mode)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantized.forward(x)  # its forward, not its __call__: its hooks are ours now

    def check_writable(self, what: str) -> None:
        raise RuntimeError(f"{what}() would write W + ΔW into a {self.quantization} weight, which cannot "
                           "hold it; export a float model with merge_and_unload(model) or merged_state_dict(model)")

    def dequantized_weight(self) -> torch.Tensor:
        """W as its quantization stores it, dequantized: (out, in)."""
        w = self.weight
        if type(w).__name__ not in ("Params4bit", "Int8Params"):  # torchao's
            return w.get_original_weight() if hasattr(w, "get_original_weight") else w.dequantize()  # (NF4Tensor's)
        import bitsandbytes.functional as bnb_functional
        if type(w).__name__ == "Int8Params":
            return bnb_functional.int8_vectorwise_dequant(w.data, w.SCB if w.SCB is not None else
                                                          self.quantized.state.SCB)
        if getattr(w.quant_state, "packing_format_for_cpu", False):  # its CPU eval layout: first back to
            w.data, w.quant_state = bnb_functional._convert_weight_packed_for_cpu_inverse(w.data, w.quant_state)
        return bnb_functional.dequantize_4bit(w.data, w.quant_state)  # its own, as its state_dict() does

    def _weight_plus(self, sign, check_finite=True):  # dequantized W + sign ΔW, for export only
        dtype = torch.promote_types(self.export_dtype, torch.float32)
        W = self.dequantized_weight().to(dtype)
        result = (W + sign * self.delta_weight(dtype) if sign else W).to(self.export_dtype)
        if check_finite and not torch.isfinite(result).all():
            raise RuntimeError(f"dequantized W + ΔW has inf or NaN entries in {self.export_dtype} (overflow?)")
        return result

    def base_module(self, weight: nn.Parameter, bias: Optional[nn.Parameter]) -> nn.Module:
        if weight is not self.weight:  # a float W + ΔW (merge_and_unload): a plain nn.Linear
            return super().base_module(weight, None if bias is None else nn.Parameter(bias.to(weight.dtype), False))
        self.quantized.weight, self.quantized.bias = weight, bias
        return self.quantized

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        self.quantized._save_to_state_dict(destination, prefix, keep_vars)  # W, b, its quantization's keys

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        ours = [prefix + k for k in ("lora_A", "lora_B", MERGED_KEY)]
        base = {k: v for k, v in state_dict.items() if k not in ours}
        self.quantized._load_from_state_dict(base, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                             error_msgs)  # W, b and its own keys, as it loads them
        self.weight, self.bias = self.quantized.weight, self.quantized.bias  # new ones if it loaded with assign=True
        n = len(missing_keys)
        super()._load_from_state_dict({k: v for k, v in state_dict.items() if k in ours}, prefix, local_metadata,
                                      strict, missing_keys, unexpected_keys, error_msgs)
        missing_keys[n:] = [k for k in missing_keys[n:] if k not in (prefix + "weight", prefix + "bias")]


# --- LoRA on a Parameter no nn.Linear holds: transformers 5's MoE experts (stacks (E, out, in)),
# nn.MultiheadAttention's in_proj_weight. add_lora's target_parameters names them.

# LoRAParameter's base: inner.<name>, inner wrapped in base_layer (itself, or LoRAParameters around it).
ModuleParameter = collections.namedtuple("ModuleParameter", "base_layer name weight training inner")


def _in_experts_forward(module, name):
    """Whether experts_forward computes module.<name>: a projection of transformers' @use_experts_implementation,
    with no forward of the module's own (accelerate's hooks: experts_forward would skip them), not expert-parallel."""
    experts = hasattr(type(module).forward, "__wrapped__") and "forward" not in vars(module)
    experts = experts and not getattr(module, "_is_expert_parallel", False)
    return experts and name in ("gate_up_proj", "up_proj", "down_proj") and all(
        hasattr(module, a) for a in ("num_experts", "has_gate", "has_bias", "is_transposed", "down_proj"))


class _PassThrough:
    """Attributes a wrapper lacks are read from the module it stands for (`inner`): a parent reading
    mha.batch_first, experts.num_experts or out_proj.weight (nn.MultiheadAttention) still finds them."""

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if not self.__dict__.get("_modules"):  # still in __init__
                raise
            return getattr(self.inner, name)


class LoRAParameter(_PassThrough, LoRALayer):
    """LoRA on one Parameter of any module (PEFT's target_parameters): a weight (out, in) or a stack
    (E, out, in) of E experts' weights, each expert with its own update:

        lora_A (E, r, in), lora_B (E, out, r):   ΔW_e = (B_e @ A_e) * scale     (a weight: (r, in), (out, r))

    A stack stored transposed, (E, in, out) (is_transposed: gpt-oss), holds ΔW_e^T. The module becomes
    `base_layer`, untouched; a module's Parameters nest, as in PEFT. Two forwards, one result: transformers'
    experts run in experts_forward, factored while `factored` (no ΔW); else, and other modules, with W + ΔW in W's
    place (at least float32, rounded once, as merge()): no dropout. Children it reads (`reads`) get W + ΔW too.
    """

    base_types = (ModuleParameter,)

    @classmethod
    def why_unsupported(cls, base: ModuleParameter, r: int, dropout: float) -> Optional[str]:
        if base.weight.dim() not in (2, 3):
            return f"its shape {tuple(base.weight.shape)} is no weight (out, in) nor stack (E, out, in)"
        if dropout and not _in_experts_forward(base.inner, base.name):
            return f"dropout={dropout}: its module runs with W + ΔW (only transformers' experts' projections factor)"
        return None

    @staticmethod
    def lora_shapes(base: ModuleParameter, r: int) -> tuple:
        *stack, out, in_ = base.weight.shape
        if stack and getattr(base.inner, "is_transposed", False):
            out, in_ = in_, out
        return (*stack, r, in_), (*stack, out, r)

    def keep_base(self, base: ModuleParameter) -> None:
        self.base_layer, self.parameter_name = base.base_layer, base.name

    def keep_base_settings(self, base: ModuleParameter) -> None:
        self.transposed = self.weight.dim() == 3 and getattr(self.inner, "is_transposed", False)
        self.factored = _in_experts_forward(self.inner, self.parameter_name)
        self.reads = ()
        below = self.base_layer  # `inside`: the LoRAParameters inside this one (a module's others), outermost first
        self.inside = (below, *below.inside) if isinstance(below, LoRAParameter) else ()

    @property
    def inner(self) -> nn.Module:  # the module that holds the Parameter
        return self.base_layer.inner if isinstance(self.base_layer, LoRAParameter) else self.base_layer

    @property
    def weight(self) -> nn.Parameter:
        return getattr(self.inner, self.parameter_name)

    @property
    def bias(self) -> Optional[nn.Parameter]:  # the module's own bias Parameter (a parent may read it), if any
        bias = getattr(self.inner, "bias", None)
        return bias if isinstance(bias, torch.Tensor) else None

    def reset_lora_parameters(self, init_std: Optional[float] = None) -> None:
        super().reset_lora_parameters(init_std)
        if init_std is None:  # each expert's A as an (r, in) linear's: fan_in = in (as PEFT's)
            with torch.no_grad():
                nn.init.kaiming_uniform_(self.lora_A.view(-1, self.lora_A.shape[-1]), a=math.sqrt(5))

    def delta_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        delta = lora_delta(self.lora_A.to(dtype or self.lora_A.dtype), self.lora_B.to(dtype or self.lora_B.dtype),
                           self.scale)  # batched over experts: (E, out, in)
        return delta.transpose(-2, -1) if self.transposed else delta

    def _plus(self, sign: int, dtype: torch.dtype) -> torch.Tensor:  # W + sign * B @ A * scale in one baddbmm
        A, B = self.lora_A.to(dtype), self.lora_B.to(dtype)
        left, right = (A.mT, B.mT) if self.transposed else (B, A)  # a stack stored (E, in, out): + A^T B^T * scale
        plus = torch.baddbmm if self.weight.dim() == 3 else torch.addmm
        return plus(self.weight.to(dtype), left, right, alpha=sign * self.scale).to(self.weight.dtype)

    def forward(self, *args, **kwargs) -> Any:  # LoRALayer.forward's one input is here the call: (args, kwargs)
        return super().forward((args, kwargs))

    def adapted_forward(self, call: tuple) -> Any:
        chain = (self, *self.inside)  # transformers' experts: all of the module's LoRAParameters in one call
        ours = all(_in_experts_forward(self.inner, layer.parameter_name) for layer in chain)
        for lora in chain if ours else [self]:  # (an inner one's forward does not run then: its guard is here)
            trained = lora.lora_A.requires_grad or lora.lora_B.requires_grad
            if lora.merged and trained and lora.training and torch.is_grad_enabled():
                raise RuntimeError(f"{lora.parameter_name} is merged, so it gets no gradient: unmerge() it, or eval()")
            if lora.enabled and not lora.merged and lora.dropout and lora.training and not (ours and lora.factored):
                raise RuntimeError(f"dropout={lora.dropout} on {lora.parameter_name}, which runs as W + ΔW here: "
                                   "set layer.factored = True (transformers' experts) or use dropout=0")
        if ours:
            live = {lora.parameter_name: lora for lora in chain if lora.enabled and not lora.merged}
            return experts_forward(self.inner, *call[0], **call[1], loras=live)
        return self.base_forward(call, self._weight_plus(+1, check_finite=False))

    def base_forward(self, call: tuple, weight: Optional[torch.Tensor] = None) -> Any:
        """base_layer(*args, **kwargs), `weight` (if given) in W's place, W + ΔW for each child in `reads`."""
        depth = "base_layer." * len(self.inside)
        children = {f"{depth}{n}.weight": self.inner.get_submodule(n) for n in self.reads}
        new = {k: c._weight_plus(+1, check_finite=False) for k, c in children.items() if c.enabled and not c.merged}
        if weight is not None:
            new[depth + self.parameter_name] = weight
        return torch.func.functional_call(self.base_layer, new, *call)

    def base_module(self, weight: nn.Parameter, bias: None) -> nn.Module:
        setattr(self.inner, self.parameter_name, weight)
        return self.inner

    # --- the state_dict keys of the module as it was (experts.gate_up_proj, not experts.base_layer.base_layer.
    # gate_up_proj), so a base checkpoint loads; LoRA's own keys (lora_A, lora_B, ...) nest as the modules do.

    def _base_keys(self, prefix: str, keys: Iterable[str]) -> dict:
        """{nested key: the module's own key} for the keys under base_layer. that are the module's, not LoRA's."""
        inner = prefix + "base_layer."
        copies = tuple(f"{inner}{n}." for n, m in self.base_layer.named_modules() if isinstance(m, TrainedCopy))
        return {k: prefix + k[len(inner):] for k in keys if k.startswith(inner) and not k.startswith(copies)
                and k.rsplit(".", 1)[-1] not in ("lora_A", "lora_B", MERGED_KEY)}

    def state_dict(self, *args, **kwargs) -> dict:
        state = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
        for nested, key in self._base_keys(prefix, list(state)).items():
            state[key] = state.pop(nested)
        return state

    def _load_from_state_dict(self, state_dict, prefix, *args):  # the keys state_dict() gives back in base_layer
        expected = self.base_layer.state_dict(prefix=prefix + "base_layer.", keep_vars=True)
        for nested, key in self._base_keys(prefix, expected).items():
            if key in state_dict:
                state_dict[nested] = state_dict.pop(key)
        own = prefix + "base_layer." * (len(self.inside) + 1) + self.parameter_name  # (LoRALayer looks at prefix.*)
        if self.merged and own in state_dict and not state_dict.get(prefix + MERGED_KEY, False):
            for key in [k for k in state_dict if k.startswith(prefix + "base_layer.")]:
                del state_dict[key]  # (the module below loads from what is left here)
            args[-1].append(f"{prefix + self.parameter_name}: the checkpoint was saved unmerged (weight = W) but this "
                            "layer is merged (weight = W + ΔW); call unmerge() on it before loading.")
            return
        super()._load_from_state_dict(state_dict, prefix, *args)

    def extra_repr(self) -> str:
        return f"{self.parameter_name}={tuple(self.weight.shape)}, " + super().extra_repr()


def experts_forward(experts: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor, loras: dict) -> torch.Tensor:
    """transformers' experts computation, each projection in `loras` factored (if not, W + ΔW in W's place):
    y_e = x_e W_e^T + b_e + ((dropout(x_e) A_e^T) B_e^T) * scale for the rows x_e routed to expert e.

    hidden_states (T, H), top_k_index / top_k_weights (T, k) -> (T, H); loras: {Parameter name: LoRAParameter}.
    Each product x_e M_e for all experts at once, as the model's experts implementation runs it (transformers'
    kernels): batched_mm gathers each row's matrix (one bmm); eager loops over the experts hit; any other (grouped_mm)
    runs one grouped matmul on the rows sorted by expert, or transformers' compile-safe loop where that kernel cannot
    take the dtype (float64) or the strides (rows of 16 bytes). No host sync but eager's. The LoRA products run in
    W's dtype (a bfloat16 base: bfloat16 copies of the float32 A and B, as autocast makes), so they stay on the
    grouped kernel. Backward keeps the routed inputs and the (rows, r) products: factored, never an (E, out, in) one.
    """
    from transformers.integrations import moe  # the model's own kernels (only transformers' experts come here)
    how, k = experts.config._experts_implementation, top_k_index.shape[-1]
    ids, order = top_k_index.flatten().sort(stable=True)  # the T * k routed rows, grouped by expert
    ends = torch.searchsorted(ids, torch.arange(experts.num_experts, device=ids.device), right=True).int()
    counts = torch.diff(ends, prepend=ends.new_zeros(1)).tolist() if how == "eager" else None  # rows per expert

    def mm(x, M):  # rows x (S, in) grouped by expert, M (E, in, out) -> (S, out): x_e M_e for every expert e
        if how == "batched_mm":
            return torch.bmm(x.unsqueeze(1), M[ids]).squeeze(1)
        fits = M.dtype != torch.float64 and all(n * M.element_size() % 16 == 0 for n in M.shape[1:])
        return (moe._grouped_mm if fits else torch.ops.transformers.grouped_mm_fallback)(x, M, offs=ends)

    def factors(lora, dtype):  # A (E, in, r), B (E, r, out), in W's dtype
        return lora.lora_A.to(dtype).mT, lora.lora_B.to(dtype).mT

    def eager(x, W, lora):  # the experts that have rows one by one (as transformers' eager), products together
        # split and unbound, never sliced or indexed: each slice's backward would write a full-size zero gradient
        xs, Ws, ys = x.split(counts), W.unbind(), []
        if lora:
            xls, (A, B) = lora.lora_dropout(x).split(counts), [M.unbind() for M in factors(lora, W.dtype)]
        for e in [e for e, n in enumerate(counts) if n]:
            y_e = xs[e] @ Ws[e]
            ys.append(torch.addmm(y_e, xls[e] @ A[e], B[e], alpha=lora.scale) if lora else y_e)
        return torch.cat(ys or [x[:0] @ W[0]])

    def project(name, x):  # (rows, in) -> (rows, out)
        W, lora = getattr(experts, name), loras.get(name)
        W, lora = (lora._weight_plus(+1, check_finite=False), None) if lora and not lora.factored else (W, lora)
        W = W if experts.is_transposed else W.mT  # (E, in, out)
        x = x.to(W.dtype)
        y = eager(x, W, lora) if how == "eager" else mm(x, W)
        if lora and how != "eager":  # (eager adds each expert's LoRA product in its loop)
            A, B = factors(lora, W.dtype)
            y = y + mm(mm(lora.lora_dropout(x), A) * lora.scale, B)
        return y + getattr(experts, name + "_bias")[ids] if experts.has_bias else y

    h = project("gate_up_proj" if experts.has_gate else "up_proj", hidden_states[order // k])
    h = experts._apply_gate(h) if experts.has_gate else experts.act_fn(h)
    y = project("down_proj", h)
    y = experts.post_expert_norm(y) if getattr(experts, "has_post_expert_norm", False) else y
    y = (y * top_k_weights.flatten()[order, None])[order.argsort()]  # back to (token, k) order
    return y.view(*top_k_index.shape, y.shape[-1]).sum(1).to(hidden_states.dtype)


LORA_CLASSES = (QLoRALinear, LoRALinear, LoRAEmbedding, LoRAConv, LoRAConv1D)


def lora_class_for(module: nn.Module) -> Optional[type]:
    """The LoRA layer type that adapts this module, or None."""
    return next((cls for cls in LORA_CLASSES if cls.base_class(module)), None)


# --- Adapting a model: one inventory of its modules, every check, then the change


def _inner(model):
    """The model inside torch.compile's, DDP's or DataParallel's wrapper: every helper uses its names."""
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return _inner(model.module)
    if isinstance(getattr(model, "_orig_mod", None), nn.Module):
        return _inner(model._orig_mod)
    return model


def lora_layers(model: nn.Module, remove_duplicate: bool = True) -> Iterator[tuple[str, LoRALayer]]:
    """(name, layer) for every LoRA layer; a layer under several names once, or under each."""
    modules = _inner(model).named_modules(remove_duplicate=remove_duplicate)
    yield from ((name, module) for name, module in modules if isinstance(module, LoRALayer))


class TrainedCopy(_PassThrough, nn.Module):
    """A module trained in full beside the adapter (add_lora's modules_to_save, as in PEFT): `trained`,
    a copy, runs and goes into adapter files; `original` stays as it was and runs while LoRA is off."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.original, self.trained = module, copy.deepcopy(module)
        self.enabled, self.merged = True, False

    def forward(self, *args, **kwargs) -> Any:
        return self.running(*args, **kwargs)

    @property
    def running(self) -> nn.Module:
        return self.trained if self.enabled else self.original

    inner = running


def _trained_copies(model):
    return [(name, m) for name, m in _inner(model).named_modules() if isinstance(m, TrainedCopy)]


def _matches(name, targets):
    """A target matches a module by its full name or its dotted end ("q_proj": "a.q_proj", never "a.qq_proj")."""
    return any(name == t or name.endswith("." + t) for t in targets)


def _target_names(modules, target_modules, field="target_modules", adaptable=lora_class_for):
    """The names add_lora adapts: every nn.Linear and Conv1D, or those target_modules names
    (modules: [(name, module or Parameter)]; adaptable says which ones the hints list)."""
    if target_modules is None:
        return [n for n, m in modules if n and (isinstance(m, nn.Linear) or LoRAConv1D.base_class(m))]
    targets = [target_modules] if isinstance(target_modules, str) else target_modules
    if not (isinstance(targets, (list, tuple)) and all(isinstance(t, str) for t in targets)):
        raise ValueError(f"{field} must be None, a module name or a list of names, got {target_modules!r}")
    unmatched = [t for t in targets if not any(_matches(n, [t]) for n, _ in modules if n)]
    if unmatched:
        short = sorted({n.rsplit(".", 1)[-1] for n, m in modules if n and adaptable(m)})
        hints = [f"did you mean {close} for {t!r}?" for t in unmatched
                 if (close := difflib.get_close_matches(t.rsplit(".", 1)[-1], short, n=3))]
        if any(t.lower() == "all-linear" for t in unmatched):
            hints.append("'all-linear' is PEFT's name for every linear layer but the output head: here "
                         "target_modules=None adapts every nn.Linear, the head too")
        what = "Parameter" if field == "target_parameters" else "module"
        raise ValueError(f"{field} {unmatched} match no {what} in the model; {' '.join(hints + [''])}the "
                         f"{what}s LoRA can adapt are named (at their end): {short}")
    return [n for n, _ in modules if n and _matches(n, targets)]


def add_lora(model: nn.Module, r: int = 8, alpha: Optional[float] = None, dropout: float = 0.0,
             target_modules: Optional[Union[str, Sequence[str]]] = None, use_rslora: bool = False,
             init_std: Optional[float] = None, lora_dtype: Optional[torch.dtype] = None,
             modules_to_save: Sequence[str] = (), target_parameters: Sequence[str] = ()) -> nn.Module:
    """Replace submodules by LoRA layers in place, freeze all else; return model.

    target_modules: None for every nn.Linear and Conv1D, or module names, each a full name
    ("layers.0.attn.q_proj") or its dotted end ("q_proj"): linears, embeddings, convs.
    dropout: linears and convs only (an embedding's indices take none). lora_dtype: see LoRALayer.
    modules_to_save: modules (named the same way) trained in full beside the adapter, each as a
    TrainedCopy; the default targets leave them out. target_parameters: Parameters (full name or
    dotted end: "experts.gate_up_proj"), each a LoRAParameter; target_modules=[] adapts only them.
    Naming an nn.MultiheadAttention adapts its in_proj_weight and out_proj (as PEFT). A module no LoRA
    layer can replace exactly raises, naming it and why; nothing is changed then.
    """
    given, model = model, _inner(model)
    if isinstance(model, LoRALayer) or lora_class_for(model):
        raise TypeError("add_lora adapts the layers inside a model; wrap a lone layer yourself: LoRALinear(linear)")
    modules = list(model.named_modules(remove_duplicate=False))
    settings = dict(r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, init_std=init_std, lora_dtype=lora_dtype)
    to_save = _target_names(modules, modules_to_save, "modules_to_save") if modules_to_save else []
    names = [n for n in _target_names(modules, target_modules)
             if not (target_modules is None and any(_matches(n, [s]) or n.startswith(s + ".") for s in to_save))]
    params = [(f"{n}.{p}".lstrip("."), w) for n, m in modules for p, w in m.named_parameters(recurse=False)]
    names += _target_names(params, target_parameters or (), "target_parameters", lambda p: p.dim() > 1)
    _attach_lora(model, modules, {name: settings for name in names}, target_modules is None, to_save)
    return given


def _attach_lora(model, modules, settings, skip_unused=False, to_save=()):
    """Replace each module named in settings ({name: layer kwargs}) by its LoRA layer, each in to_save
    by a TrainedCopy, after every check; a module under several names gets one layer under each.
    A name in settings that is no module's is a Parameter's: a LoRAParameter, nested per module."""
    by_name = dict(modules)
    for n in [n for n in settings if isinstance(m := by_name.get(n), nn.MultiheadAttention) and m.in_proj_weight
              is not None]:  # PEFT's rule: in_proj_weight and out_proj (kdim / vdim: no in_proj, refused below)
        settings[f"{n}.out_proj"] = settings[f"{n}.in_proj_weight"] = settings.pop(n)
    settings = {n: dict(kwargs, dropout=0.0) if isinstance(by_name.get(n), nn.Embedding) else dict(kwargs)
                for n, kwargs in settings.items()}  # an embedding's input is indices: no dropout (as PEFT)
    targets, reads, wrapped = _check_targets(modules, settings, skip_unused, to_save)
    saved = {}
    for n in to_save:  # deep copies, made before any change
        try:
            saved[id(by_name[n])] = TrainedCopy(by_name[n])
        except Exception as e:
            raise ValueError(f"modules_to_save {n!r} cannot be copied to train it ({type(e).__name__}: {e})") from None
    owners, layers = _owners(modules), {}
    for name, module in targets.items():
        if id(module) not in layers:  # with the module's forward hooks (a LoRAParameter runs its module's own)
            layers[id(module)] = layer = _carry_hooks(module, lora_class_for(module)(module, **settings[name]))
            params = [p for p in (module.weight, getattr(module, "bias", None)) if p is not None]
            layer.shared_with = tuple(n for p in params for m, n in owners[_memory(p)] if m is not module)
    for owner, names, covered in wrapped.values():  # nested in the module's own order, as PEFT nests them
        layer = owner
        for p, weight in [(p, w) for p, w in owner.named_parameters(recurse=False) if p in names]:
            layer = LoRAParameter(ModuleParameter(layer, p, weight, owner.training, owner), **settings[names[p]])
            layer.shared_with = tuple(n for m, n in owners[_memory(weight)] if m is not owner)
        layer.reads, layers[id(owner)] = tuple(covered), layer
    _replace_modules(model, modules, saved | layers)
    _note_base_buffers(model)
    model.register_load_state_dict_post_hook(_note_base_buffers)  # a base loaded after add_lora is the base
    for reader, paths in reads.items():
        _BypassCheck(reader, sorted(paths))
    for encoder in [m for m in model.modules() if isinstance(m, nn.TransformerEncoder)]:
        if set(encoder.modules()) & set(reads):  # its fast path would make the input nested: only the layers' takes it
            _BypassCheck(encoder, [])
    return mark_only_lora_as_trainable(model)


def _replace_modules(model, modules, new):
    """Put new[id(module)] in place of each such module, under every name it has (inner ones first)."""
    for name, module in [(n, m) for n, m in reversed(modules) if id(m) in new]:
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, new[id(module)])


def mark_only_lora_as_trainable(model: nn.Module) -> nn.Module:
    """requires_grad = True for lora_A / lora_B (and TrainedCopy's trained), False for every other parameter."""
    model.requires_grad_(False)
    for _, layer in lora_layers(model):
        layer.lora_A.requires_grad_(True)
        layer.lora_B.requires_grad_(True)
    for _, saved in _trained_copies(model):
        saved.trained.requires_grad_(True)
    return model


def set_lora_enabled(model: nn.Module, enabled: bool) -> None:
    """Turn every LoRA layer on (the adapted model) or off (exactly the base model)."""
    layers = [layer for _, layer in list(lora_layers(model)) + _trained_copies(model)]
    if not enabled and any(layer.merged for layer in layers):
        raise RuntimeError("cannot disable LoRA while layers are merged; call unmerge_lora(model) first")
    for layer in layers:
        layer.enabled = enabled


@contextlib.contextmanager
def lora_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model inside the block; restores each layer's previous state on exit."""
    previous = [(layer, layer.enabled) for _, layer in list(lora_layers(model)) + _trained_copies(model)]
    set_lora_enabled(model, False)
    try:
        yield model
    finally:
        for layer, was_enabled in previous:
            layer.enabled = was_enabled


def merge_lora(model: nn.Module) -> None:
    """Fold ΔW into W in every LoRA layer, after checking all of them (W + ΔW finite too)."""
    layers = list(lora_layers(model))
    for _, layer in layers:
        layer.check_writable("merge_lora")
    already = [name for name, layer in layers if layer.merged]
    disabled = [name for name, layer in layers if not layer.enabled]
    if already or disabled:
        raise RuntimeError(f"merge_lora: layers already merged: {already}; disabled (enable first): {disabled}")
    for name, layer in layers:
        _exported_weight(name, layer)  # computed once to check it, then again to write it: no second copy held
    for _, layer in layers:
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Take ΔW back out of W in every LoRA layer."""
    layers = list(lora_layers(model))
    not_merged = [name for name, layer in layers if not layer.merged]
    if not_merged:
        raise RuntimeError(f"unmerge_lora: layers not merged: {not_merged}")
    for _, layer in layers:
        layer.check_writable("unmerge_lora")
    for _, layer in layers:
        layer.unmerge()


def _exported_weight(name, layer):
    """The weight of the plain layer that computes what `layer` computes now."""
    if not layer.enabled or layer.merged:
        return layer._weight_plus(0) if isinstance(layer, QLoRALinear) else layer.weight.detach()  # (W dequantized)
    try:
        return layer.merged_weight()
    except RuntimeError as e:
        raise RuntimeError(f"{name or type(layer).__name__!r}: {e}") from None


def _check_exportable(layers, what):
    """Refuse sharded (FSDP2) layers: ΔW needs all of A and B. Tied ones are fine: W is copied."""
    for layer in [layer for layer in layers if _is_sharded(layer.weight) or _is_sharded(layer.lora_A)]:
        layer.check_writable(what)


def merge_and_unload(model: nn.Module, inplace: bool = False) -> nn.Module:
    """A model whose every LoRA layer is its plain layer, computing what it computes now:
    weight W + ΔW (W if disabled), the original state_dict keys, no LoRA code. Weights are
    copied, so tied weights stay correct (untied: the other owner keeps W). inplace=False
    deep-copies the model first (twice its memory for a moment; merged_state_dict does not)."""
    def merged(name, layer):
        bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        return nn.Parameter(_exported_weight(name, layer).clone(), requires_grad=False), bias
    _check_exportable([layer for _, layer in lora_layers(model)], "merge_and_unload")
    return _to_base_layers(model, inplace, merged, "merge_and_unload", keep="running")


def unload(model: nn.Module, inplace: bool = False) -> nn.Module:
    """The base model back unmerged (PEFT's unload()): each LoRA layer its base layer, the very W and b."""
    merged = [name for name, layer in lora_layers(model) if layer.merged]
    if merged:
        raise RuntimeError(f"unload: {merged} are merged (their weight holds W + ΔW): call unmerge_lora(model) "
                           "first, or merge_and_unload(model) to keep ΔW")
    return _to_base_layers(model, inplace, lambda name, layer: (layer.weight, layer.bias), "unload", keep="original")


def _to_base_layers(model, inplace, weights, what, keep):
    """model (a copy unless inplace), each LoRA layer replaced by its base layer holding weights(name,
    layer) = (weight, bias) and the layer's forward hooks, each TrainedCopy by its `keep` module."""
    model = _inner(model)
    for name, layer in [(name, layer) for name, layer in lora_layers(model) if _hooks(layer)]:
        raise ValueError(f"{what}: {name or type(layer).__name__!r} has hooks that replacing it with a plain "
                         f"layer would drop: {', '.join(_hooks(layer))}; remove them first")
    model = model if inplace else copy.deepcopy(model)
    layers = list(lora_layers(model))
    new = {id(layer): weights(name, layer) for name, layer in layers}  # all computed (and checked) first
    _BypassCheck.remove_all(model)
    model.__dict__.pop("_lora_base_buffers", None)  # the plain model's saves check nothing
    for key in [k for k, hook in model._load_state_dict_post_hooks.items() if hook is _note_base_buffers]:
        del model._load_state_dict_post_hooks[key]
    plain = {id(layer): _carry_hooks(layer, layer.base_module(*new[id(layer)]).train(layer.training))
             for _, layer in reversed(layers)}  # one per LoRA layer (nested LoRAParameters: the outer's hooks last)
    plain.update({id(saved): getattr(saved, keep) for _, saved in _trained_copies(model)})
    if isinstance(model, LoRALayer):
        return plain[id(model)]
    _replace_modules(model, list(model.named_modules(remove_duplicate=False)), plain)
    return model


def merged_state_dict(model: nn.Module) -> dict:
    """The state_dict of merge_and_unload(model), without copying or changing the model: W + ΔW one
    layer at a time, every other tensor model.state_dict()'s own. For pushing merged weights to an
    inference server every few steps: unlike merge() / unmerge() it never writes into W (no drift)."""
    model = _inner(model)
    layers = dict(lora_layers(model, remove_duplicate=False))
    _check_exportable(layers.values(), "merged_state_dict")
    state, exported = model.state_dict(), {}
    for name, layer in layers.items():
        prefix = f"{name}." if name else ""
        for key in ("lora_A", "lora_B", MERGED_KEY):
            state.pop(prefix + key, None)
        if id(layer) not in exported:
            with torch.no_grad():
                exported[id(layer)] = _exported_weight(name, layer)
        if isinstance(layer, QLoRALinear):  # a plain nn.Linear's keys: the quantization's go, b takes W's dtype
            for key in [k for k in state if k.startswith(prefix) and k[len(prefix):] not in ("weight", "bias")]:
                del state[key]
            if prefix + "bias" in state:
                state[prefix + "bias"] = state[prefix + "bias"].to(exported[id(layer)].dtype)
        key = layer.parameter_name if isinstance(layer, LoRAParameter) else "weight"
        state[_base_name(model, f"{name}.{key}".lstrip("."))] = exported[id(layer)]
    for name, saved in _trained_copies(model):
        running = f"{name}.trained." if saved.enabled else f"{name}.original."
        for key in [k for k in state if k.startswith(f"{name}.original.") or k.startswith(f"{name}.trained.")]:
            value = state.pop(key)
            if key.startswith(running):
                state[_base_name(model, name) + "." + key[len(running):]] = value
    return state


def _base_name(model, name):
    """A name in the model as it was: without the base_layer. each LoRAParameter adds (as its state_dict keys)."""
    parts = name.split(".")
    return ".".join(p for i, p in enumerate(parts) if p != "base_layer" or i == len(parts) - 1
                    or not isinstance(model.get_submodule(".".join(parts[:i])), LoRAParameter))


ParameterCount = collections.namedtuple("ParameterCount", ["trainable", "total"])


def count_parameters(model: nn.Module) -> ParameterCount:
    """(trainable, total) parameter counts; shared parameters are counted once."""
    params = list(model.parameters())  # .parameters() already skips duplicates
    return ParameterCount(sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))


# --- Adapter files: only lora_A / lora_B and the settings that give them meaning


def lora_state_dict(model: nn.Module) -> dict:
    """The adapter's tensors, keyed as in model.state_dict(); FSDP2 shards gathered (call on every rank)."""
    return {k: v.full_tensor() if _is_sharded(v) else v for k, v in _adapter_tensors(model).items()}


def _adapter_tensors(model, keep_vars=False):
    """lora_A / lora_B and TrainedCopy entries of model.state_dict() (the tensors themselves if keep_vars)."""
    state = _inner(model).state_dict(keep_vars=keep_vars)
    saved = tuple(f"{n}.trained." for n, _ in _trained_copies(model))
    return {k: v for k, v in state.items() if k.rsplit(".", 1)[-1] in ("lora_A", "lora_B") or k.startswith(saved)}


def load_lora_state_dict(model: nn.Module, state: dict, strict: bool = True) -> nn.Module:
    """Copy adapter tensors into the model, every key (if strict), type, shape and value checked first."""
    return _load_adapter_tensors(model, state, strict, "the adapter")


def _load_adapter_tensors(model, state, strict, source):
    own = _adapter_tensors(model, keep_vars=True)  # the Parameters, to copy into
    if not own:
        raise ValueError("the model has no LoRA layers; call add_lora(model, ...) first")
    if any(p.is_meta for p in own.values()):
        raise ValueError("the model's LoRA parameters are on the meta device, with no memory to load into: "
                         "materialise the model first (model.to_empty(device=...)), then load")
    _check_adapter_tensors({k: (p.shape, p.dtype) for k, p in own.items()}, state, strict, source)
    merged = [name for name, layer in lora_layers(model) if layer.merged]
    if merged:
        raise RuntimeError(f"cannot load an adapter into merged layers {merged}; call unmerge_lora(model) first")
    with torch.no_grad():
        for k, param in [(k, p) for k, p in own.items() if k in state]:
            param.copy_(_shard_like(param, state[k].to(device=param.device, dtype=param.dtype)))
    return model


def _lora_config(model):
    """The settings that give the adapter tensors meaning, as plain Python values (and a LoRAParameter's Parameter)."""
    return {name: {"r": m.r, "alpha": m.alpha, "use_rslora": m.use_rslora} | (
        {"parameter": m.parameter_name} if isinstance(m, LoRAParameter) else {}) for name, m in lora_layers(model)}


def _persistent_buffers(model):
    """{name: buffer}: the floating-point buffers a state_dict holds (BatchNorm's statistics), modules_to_save's not."""
    copies = tuple(f"{n}." for n, _ in _trained_copies(model))
    return {f"{m}.{b}".lstrip("."): t for m, module in _inner(model).named_modules() if not f"{m}.".startswith(copies)
            for b, t in module._buffers.items() if t is not None and t.is_floating_point()
            and b not in module._non_persistent_buffers_set}


def _note_base_buffers(model, incompatible_keys=None):
    """A copy of the buffers that saving checks for training (_lora_base_buffers): at add_lora, at each load."""
    model._lora_base_buffers = {n: b.detach().to("cpu", copy=True) for n, b in _persistent_buffers(model).items()
                                if not b.is_meta}


def _warn_unsaved(model, what):
    """Warn of what trained and the file leaves out: parameters that require grad, buffers changed since add_lora
    (its copy, _lora_base_buffers, compared by value: .to(), load_state_dict and DDP rewrite buffers unchanged)."""
    kept = {id(p) for p in _adapter_tensors(model, keep_vars=True).values()}
    left = [n for n, p in _inner(model).named_parameters() if p.requires_grad and id(p) not in kept]
    if left:
        warnings.warn(f"{what}: the trainable parameters {left} are not in the adapter, so loading it will not restore "
                      f"them: add_lora(..., modules_to_save={sorted({n.rpartition('.')[0] for n in left} - {''})}) "
                      "trains and saves their modules; or requires_grad_(False) if not meant to train", stacklevel=3)
    base = getattr(_inner(model), "_lora_base_buffers", {})
    moved = sorted({n.rpartition(".")[0] for n, b in _persistent_buffers(model).items()
                    if n in base and not b.is_meta and not torch.allclose(base[n].to(b), b, 0, 0, equal_nan=True)})
    if moved:
        warnings.warn(f"{what}: the buffers of {moved} changed since add_lora (train mode updates BatchNorm's running "
                      f"statistics), and the adapter does not hold them: add_lora(..., modules_to_save={moved}) trains "
                      "and saves them; or run those layers in eval mode only", stacklevel=3)


def save_adapter(model: nn.Module, path: Union[str, os.PathLike]) -> None:
    """Save only the adapter: its tensors, each layer's r, alpha and scaling rule, modules_to_save."""
    if not _lora_config(model):
        raise ValueError("save_adapter: the model has no LoRA layers, so there is no adapter to save (see add_lora)")
    _warn_unsaved(model, "save_adapter")
    state = {k: v.detach().cpu() for k, v in lora_state_dict(model).items()}
    torch.save({"format": "lora_min.adapter", "version": 1, "config": _lora_config(model), "state_dict": state,
                "modules_to_save": [n for n, _ in _trained_copies(model)]}, path)


def load_adapter(model: nn.Module, path: Union[str, os.PathLike]) -> nn.Module:
    """Load a file written by save_adapter into a model with matching LoRA layers."""
    saved = _read_adapter(path)
    want, have = saved["config"], _lora_config(model)
    to_save = saved.get("modules_to_save", [])
    targets = _exact_peft_targets(_inner(model), want) if not have else None
    if not have and isinstance(targets, list) and len({repr(v) for v in want.values()}) == 1 and not any(
            "parameter" in v for v in want.values()):  # (LoRAParameters: the settings below name them)
        r, alpha, use_rslora = (next(iter(want.values()))[k] for k in ("r", "alpha", "use_rslora"))
        extra = (", use_rslora=True" if use_rslora else "") + (f", modules_to_save={to_save}" if to_save else "")
        raise ValueError(f"the model has no LoRA layers; add the file's first: add_lora(model, r={r}, alpha={alpha!r}"
                         f", target_modules={targets}{extra}), then load_adapter(model, {str(path)!r})")
    if to_save != [n for n, _ in _trained_copies(model)]:
        raise ValueError(f"{path} trains {to_save} in full: add_lora(..., modules_to_save={to_save})")
    if want != have:
        diffs = [f"{n!r}: in the file, not a LoRA layer of the model" if n not in have else
                 f"{n!r}: a LoRA layer of the model, not in the file" if n not in want else
                 f"{n!r}: file {want[n]} vs model {have[n]}"
                 for n in sorted(set(want) | set(have)) if want.get(n) != have.get(n)]
        raise ValueError(f"adapter settings in {path} do not match the model's LoRA layers: " + "; ".join(diffs))
    return _load_adapter_tensors(model, saved["state_dict"], True, str(path))


# --- PEFT's adapter format (adapter_config.json + adapter_model.safetensors), read and written by
# Hugging Face PEFT, vLLM, TGI, ...: tensors are keyed "base_model.model.<module name>.lora_A.weight"
# (embeddings: ".lora_embedding_A"); the config says which modules (target_modules) with which r and
# lora_alpha (rank_pattern / alpha_pattern for the modules that differ).

_PEFT_PREFIX = "base_model.model."


def _peft_pattern_value(patterns, name, default):
    """PEFT's rank_pattern / alpha_pattern rule: the first key that matches the end of name."""
    return next((value for key, value in (patterns or {}).items() if re.match(rf"(.*\.)?({key})$", name)), default)


def _peft_targets(config, name):
    """PEFT's rule: a list matches a full name or its dotted end, a string is a regex of the full name."""
    def matches(spec):
        return bool(re.fullmatch(spec, name)) if isinstance(spec, str) else _matches(name, spec)
    excluded = config.get("exclude_modules")
    return matches(config["target_modules"]) and not (excluded and matches(excluded))


def _peft_layout(name, cls, module, r):
    """{"lora_A": (PEFT's key, PEFT's shape), "lora_B": ...} for the layer of type cls at `name`
    (module: its base, or the layer). Embeddings: "lora_embedding_A", no ".weight"; conv B: 1x1 conv."""
    a_shape, b_shape = cls.lora_shapes(module, r)
    if cls is LoRAConv:
        b_shape = (*b_shape, *[1] * len(module.kernel_size))
    elif len(b_shape) == 3:  # an expert stack: A (r*E, in) expert-major, B (out, r*E) rank-major (see _from_peft)
        (E, r, in_), (_, out, _) = a_shape, b_shape
        a_shape, b_shape = (E * r, in_), (out, r * E)
    key = f"{_PEFT_PREFIX}{name}." + ("lora_embedding_{}" if cls is LoRAEmbedding else "lora_{}.weight")
    return {"lora_A": (key.format("A"), a_shape), "lora_B": (key.format("B"), b_shape)}


def _from_peft(ab, value, shape):
    """A PEFT tensor in our `shape`: a stack's B (out, r*E) is rank-major, B_e = b.reshape(out, r, E)[..., e]."""
    if ab == "lora_B" and len(shape) == 3:
        return value.reshape(shape[1], shape[2], shape[0]).permute(2, 0, 1)
    return value.reshape(shape)


def _peft_name(name):
    """A layer's name in the base model, as PEFT's config names it (LoRAParameter wrappers add base_layer.)."""
    return re.sub(r"(^|\.)base_layer(?=\.|$)", "", name).lstrip(".")


def _exact_peft_targets(model, names, parameters=False):
    """target_modules (or target_parameters) that select exactly `names` under PEFT's rule: short names
    where they do, else full names, else a regex (a list entry matches dotted ends: ["0"] selects "1.0")."""
    every = [f"{_peft_name(n)}.{p}".lstrip(".") for n, m in model.named_modules(remove_duplicate=False) for p, _ in
             m.named_parameters(recurse=False) if p not in ("lora_A", "lora_B")] if parameters else \
        [_peft_name(n) for n, _ in model.named_modules(remove_duplicate=False) if n]
    for targets in (sorted({n.rsplit(".", 1)[-1] for n in names}), sorted(names)):
        if {n for n in every if _matches(n, targets)} == set(names):
            return targets
    return "|".join(re.escape(n) for n in sorted(names))


def _peft_modules_to_save(model):
    """config's modules_to_save: names PEFT's rule (the end of a name, no dot needed) maps back to ours."""
    names = [n for n, _ in _trained_copies(model)]
    if any(".base_layer." in n for n in names):  # PEFT refuses a ModulesToSaveWrapper inside a ParamWrapper
        raise ValueError(f"PEFT cannot train {names} in full inside a module whose Parameters have LoRA")
    every = [n for n, _ in _inner(model).named_modules() if n and ".original" not in n and ".trained" not in n]
    if {n for n in every if any(n.endswith(t) for t in names)} != set(names):
        raise ValueError(f"PEFT's modules_to_save rule (a name's end) would select more modules than {names}")
    return names or None


def _peft_config(model, layers, base_model_name_or_path):
    """adapter_config.json's content for these {name: LoRA layer} layers of model. PEFT names a
    LoRAParameter by its Parameter (target_parameters: "experts.gate_up_proj"), an nn.MultiheadAttention
    by the module (target_modules: its out_proj's LoRA, inside it, comes with it)."""
    mha = {n for n, layer in layers.items() if isinstance(getattr(layer, "inner", None), nn.MultiheadAttention)
           and layer.parameter_name == "in_proj_weight" and f"{n}.base_layer.out_proj" in layers}  # (add_lora's rule)
    if mha:
        warnings.warn(f"PEFT 0.21 adds the out_proj ΔW of {sorted(mha)} twice (its issue #3774): there PeftModel "
                      "computes W + 2 ΔW, lora_min W + ΔW", stacklevel=3)
    params = {f"{_peft_name(n)}.{layer.parameter_name}": layer for n, layer in layers.items()
              if isinstance(layer, LoRAParameter) and n not in mha}
    if params and any(layer.dropout for layer in layers.values()):
        raise ValueError("PEFT's target_parameters take no dropout (its ParamWrapper refuses it): use save_adapter")
    inside = {f"{m}.base_layer.out_proj" for m in mha}  # comes with its attention
    modules = {_peft_name(n): layer for n, layer in layers.items()
               if (n in mha or not isinstance(layer, LoRAParameter)) and n not in inside}
    with_dropout = {n: layer for n, layer in layers.items() if not isinstance(layer, LoRAEmbedding)}  # (none there)
    for setting, group in (("use_rslora", layers), ("dropout", with_dropout)):
        values = {n: getattr(layer, setting) for n, layer in group.items()}
        if len(set(values.values())) > 1:
            raise ValueError(f"PEFT has one {setting} for all layers; these layers differ: {values}")
    r = collections.Counter(layer.r for layer in layers.values()).most_common(1)[0][0]
    alpha = collections.Counter(layer.alpha for layer in layers.values()).most_common(1)[0][0]
    config = {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_name_or_path,
              "r": r, "lora_alpha": int(alpha) if alpha == int(alpha) else alpha,
              "target_modules": _exact_peft_targets(model, modules) if modules else [],
              "rank_pattern": {n: layer.r for n, layer in (modules | params).items() if layer.r != r},
              "alpha_pattern": {n: layer.alpha for n, layer in (modules | params).items() if layer.alpha != alpha},
              "lora_dropout": next(iter(with_dropout.values())).dropout if with_dropout else 0.0,
              "use_rslora": next(iter(layers.values())).use_rslora,
              "bias": "none", "fan_in_fan_out": any(isinstance(layer, LoRAConv1D) for layer in layers.values()),
              "use_dora": False, "modules_to_save": _peft_modules_to_save(model),
              "layers_to_transform": None, "layers_pattern": None, "init_lora_weights": True, "inference_mode": True}
    if params:
        config["target_parameters"] = _exact_peft_targets(model, params, parameters=True)
    for n, layer in (modules | params).items():  # PEFT's pattern rule must give every layer back its own r, alpha
        r_n, alpha_n = (_peft_pattern_value(config[key], n, default) for key, default in
                        (("rank_pattern", r), ("alpha_pattern", alpha)))
        if (r_n, alpha_n) != (layer.r, layer.alpha):
            raise ValueError(f"cannot express the rank and alpha of {n!r} in PEFT's rank_pattern / alpha_pattern")
    return config


def save_peft_adapter(model: nn.Module, directory: Union[str, os.PathLike],
                      base_model_name_or_path: Optional[str] = None) -> None:
    """Write the adapter as PEFT does (adapter_config.json, adapter_model.safetensors, or .bin
    without safetensors): peft.PeftModel.from_pretrained(base, directory) then computes what this
    model computes, all LoRA enabled (but for PEFT 0.21's double MultiheadAttention out_proj ΔW: a warning)."""
    model = _inner(model)
    layers = dict(lora_layers(model, remove_duplicate=False))
    if not layers or "" in layers:
        raise ValueError("save_peft_adapter needs a model with LoRA layers inside it (see add_lora)")
    if base_model_name_or_path is not None and not isinstance(base_model_name_or_path, str):
        raise ValueError(f"base_model_name_or_path must be a str or None, got {type(base_model_name_or_path).__name__}")
    for name, layer in layers.items():  # PEFT's conv LoRA runs A with the base's stride and padding only
        if isinstance(layer, LoRAConv) and (layer.padding_mode != "zeros" or any(d != 1 for d in layer.dilation)):
            raise ValueError(f"{name!r}: PEFT's conv LoRA ignores padding_mode and dilation, so PEFT would compute "
                             f"something else for this conv (padding_mode={layer.padding_mode!r}, dilation="
                             f"{layer.dilation}); save_adapter keeps it exactly")
    config = json.dumps(_peft_config(model, layers, base_model_name_or_path), indent=2)  # checked before any write
    _warn_unsaved(model, "save_peft_adapter")
    tensors = {}
    copies = {f"{n}.trained.": n for n, _ in _trained_copies(model)}
    for key, value in lora_state_dict(model).items():
        name, ab = key.rsplit(".", 1)
        saved = next((prefix for prefix in copies if key.startswith(prefix)), None)
        if saved:  # PEFT keys a module trained in full as the plain module: base_model.model.score.weight
            peft_key, shape = _PEFT_PREFIX + copies[saved] + "." + key[len(saved):], value.shape
        else:
            peft_key, shape = _peft_layout(name, type(layers[name]), layers[name], layers[name].r)[ab]
            value = value.permute(1, 2, 0) if ab == "lora_B" and value.dim() == 3 else value  # see _from_peft
        # A copy of its own: safetensors refuses tensors that share memory.
        tensors[peft_key] = value.detach().cpu().reshape(shape).clone(memory_format=torch.contiguous_format)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        f.write(config)
    try:
        from safetensors.torch import save_file
    except ImportError:
        torch.save(tensors, os.path.join(directory, "adapter_model.bin"))
        stale = "adapter_model.safetensors"
    else:
        save_file(tensors, os.path.join(directory, "adapter_model.safetensors"), metadata={"format": "pt"})
        stale = "adapter_model.bin"
    if os.path.exists(os.path.join(directory, stale)):  # an older adapter in the other format would be read
        os.remove(os.path.join(directory, stale))


def load_peft_adapter(model: nn.Module, directory: Union[str, os.PathLike]) -> nn.Module:
    """Add LoRA layers where a PEFT adapter says and load its weights into model, the base model
    (names as PEFT saw them); returns model. Every field, target and tensor is checked first."""
    model, config = _inner(model), _read_peft_config(directory)
    path, state = _read_peft_weights(directory)
    modules = list(model.named_modules(remove_duplicate=False))
    names = [n for n, _ in modules if n and _peft_targets(config, n)]
    mha = {n for n in names if isinstance(m := model.get_submodule(n), nn.MultiheadAttention) and m.in_proj_weight
           is not None}  # add_lora's rule, and PEFT's: in_proj_weight on the attention, out_proj inside it
    found = {o: [(p, w) for p, w in m.named_parameters(recurse=False) if _matches(f"{o}.{p}".lstrip("."),
             config.get("target_parameters") or [])] for o, m in modules}  # in the module's order, as PEFT nests
    depth = {o: len(f) for o, f in found.items() if f} | {n: 1 for n in mha}
    entries = []  # (name in settings, our layer's name, its base: a module or a ModuleParameter)
    for n in names:
        m = model.get_submodule(n)
        entries += [(n, _adapted(n, depth), ModuleParameter(m, "in_proj_weight", m.in_proj_weight, m.training, m)),
                    (n, _adapted(f"{n}.out_proj", depth), m.out_proj)] if n in mha else [(n, _adapted(n, depth), m)]
    for o, m in [(o, m) for o, m in modules if found[o]]:  # the last Parameter outermost
        entries += [(f"{o}.{p}".lstrip("."), _adapted(o, depth) + ".base_layer" * (len(found[o]) - 1 - i),
                     ModuleParameter(m, p, w, m.training, m)) for i, (p, w) in enumerate(found[o])]
    if not entries:
        raise ValueError(f"target_modules {config['target_modules']!r} and target_parameters "
                         f"{config.get('target_parameters')!r} of {directory} match nothing in the model")
    settings, expected, keys = {}, {}, {}
    for n, layer_name, base in entries:
        cls = LoRAParameter if isinstance(base, ModuleParameter) else lora_class_for(base)
        if cls is not LoRAParameter and (reason := _why_not_replaceable(base)):
            raise ValueError(f"{directory} targets {n!r}, which lora_min cannot adapt: it {reason}")
        if base.weight.is_meta:
            raise ValueError(f"{n!r} is on the meta device, with no memory to load into: materialise the model "
                             "first (model.to_empty(device=...) and its base weights), then load the adapter")
        settings[n] = dict(r=_peft_pattern_value(config.get("rank_pattern"), n, config["r"]),
                           alpha=_peft_pattern_value(config.get("alpha_pattern"), n, config["lora_alpha"]),
                           dropout=config.get("lora_dropout") or 0.0, use_rslora=bool(config.get("use_rslora")))
        dtype = cls.weight_dtype(base)  # float32 adapters on float16 / bfloat16, as PEFT's
        for ab, (key, shape) in _peft_layout(layer_name, cls, base, settings[n]["r"]).items():
            expected[key], keys[key] = (shape, torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype), \
                f"{layer_name}.{ab}"
    # PEFT's modules_to_save rule (a name's end, no dot); one matching nothing is fine (SEQ_CLS lists classifier, score)
    to_save = [n for n, _ in modules if n and any(n.endswith(t) for t in config.get("modules_to_save") or [])]
    for n in to_save:
        for k, v in model.get_submodule(n).state_dict().items():
            expected[f"{_PEFT_PREFIX}{n}.{k}"], keys[f"{_PEFT_PREFIX}{n}.{k}"] = (v.shape, v.dtype), f"{n}.trained.{k}"
    state = _check_peft_base_weights(model, {k: v for k, v in state.items() if k not in expected}, path) | {
        k: v for k, v in state.items() if k in expected}
    _check_adapter_tensors(expected, state, source=path)
    _attach_lora(model, modules, settings, to_save=to_save)
    own = {k: p.shape for k, p in _adapter_tensors(model).items()}
    return _load_adapter_tensors(model, {keys[k]: _from_peft(keys[k].rsplit(".", 1)[-1], v, own[keys[k]])
                                         for k, v in state.items()}, True, path)


def _adapted(name, depth):
    """A module's name once each module in depth ({name: k}) is inside k LoRAParameters (base_layer. each)."""
    *outer, last = name.split(".")
    return ".".join([p + ".base_layer" * depth.get(".".join(outer[:i + 1]), 0) for i, p in enumerate(outer)] + [last])


def _read_peft_weights(directory):
    """The adapter tensors of directory: adapter_model.safetensors, else adapter_model.bin."""
    path = os.path.join(directory, "adapter_model.safetensors")
    if os.path.exists(path):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ImportError(f"reading {path} needs the safetensors package: pip install safetensors") from None
        try:
            return path, load_file(path)
        except Exception as e:  # a corrupt or truncated file
            raise ValueError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from None
    path = os.path.join(directory, "adapter_model.bin")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{directory} holds neither adapter_model.safetensors nor adapter_model.bin")
    state = _safe_torch_load(path, "a PEFT adapter file (adapter_model.bin)")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a PEFT adapter file: not a dict of tensors")
    return path, state


# --- The guards: misuse raises, naming what is wrong, and a refused call changes nothing. In the order of the README's
# "Limits": settings (LoRALayer.check), modules no layer computes exactly, LoRA the model would never run, tied
# weights, check-then-change, files. check_* raises; why_* returns a reason or None.

# --- modules no LoRA layer computes exactly ---------------------------------------

# Forward hooks see the same inputs and outputs on the replacement: they move to it (the same
# dicts, so their handles still remove them). Backward and state-dict hooks would not.
_CARRIED_HOOKS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
                  "_forward_hooks_with_kwargs", "_forward_hooks_always_called")
_DROPPED_HOOKS = ("_backward_pre_hooks", "_backward_hooks", "_state_dict_pre_hooks", "_state_dict_hooks",
                  "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


def _hooks(module, every=False, quantized=False):
    """Each hook on the module a replacement would drop ("backward pre hook fn"); every: each kind it has.
    quantized: a QLoRALinear's base, which still loads its state itself (and runs its load pre-hooks)."""
    if every:
        return [kind for kind in _CARRIED_HOOKS + _DROPPED_HOOKS if getattr(module, kind, None)]
    return [f"{kind.strip('_').replace('_hooks', ' hook')} {getattr(h, '__qualname__', repr(h))}"
            for kind in _DROPPED_HOOKS if not (quantized and kind == "_load_state_dict_pre_hooks")
            for h in getattr(module, kind, {}).values()]


def _carry_hooks(old, new):
    """new, with old's forward hooks and pre-hooks (see _CARRIED_HOOKS); a LoRAParameter's join its module's."""
    for kind in _CARRIED_HOOKS:
        if isinstance(old, LoRAParameter):
            getattr(new, kind).update(getattr(old, kind))
        elif hasattr(old, kind):
            setattr(new, kind, getattr(old, kind))
    return new


def _why_not_replaceable(module):
    """Why no LoRA layer can stand in for this module exactly (None if one can)."""
    kind, cls = type(module).__name__, lora_class_for(module)
    hooks = _hooks(module, quantized=cls is QLoRALinear)
    if isinstance(module, nn.MultiheadAttention):  # (one with in_proj_weight is adapted by add_lora's rule)
        return "is a MultiheadAttention with kdim / vdim: name its q_proj_weight, ... in target_parameters"
    if cls is None:
        return f"is a {kind}, not an nn.Linear, nn.Embedding, nn.Conv1d/2d/3d or transformers' Conv1D"
    if parametrize.is_parametrized(module):
        return "is parametrized (torch.nn.utils.parametrize, e.g. weight_norm): its weight is computed, not stored"
    for method in ("forward", "_conv_forward"):  # quantized layers, custom forwards, weight-standardised convs
        if getattr(type(module), method, None) is not getattr(cls.base_class(module), method, None):
            return f"is a {kind}, a subclass with its own {method}(), which {cls.__name__} would not compute"
    if not isinstance(module.weight, nn.Parameter):
        return "has a weight that is not an nn.Parameter (old-style weight_norm?)"
    if hooks:
        return f"has hooks that replacing the module would drop: {', '.join(hooks)}"
    return None


# --- LoRA the model would never run -------------------------------------------------
# A parent whose code reads a child's weight itself, F.linear(x, self.out_proj.weight), instead of
# calling self.out_proj(x), would skip a LoRA layer put there: no error, no gradient. We read the
# source of each module's forward and of what it calls on self (self.helper(...), super().forward(...),
# self.altup.correct(...)). A child that is read and never called is refused; one also called (on other
# code paths) is adapted, and _BypassCheck raises when a forward skips it. Not seen: reads through
# local aliases or a module passed as an argument, and code without Python source.

_METADATA = {"dtype", "device", "shape", "ndim", "requires_grad", "is_cuda", "is_meta", "size", "dim", "numel"}


def _self_path(node):
    """("a", "0", "b") for the expression self.a[0].b (also self.a[-1], self.heads["q"]), else None."""
    names = []
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        if isinstance(node, ast.Attribute):
            names.append(node.attr)
        else:
            key = node.slice
            if isinstance(key, ast.UnaryOp) and isinstance(key.op, ast.USub) and isinstance(key.operand, ast.Constant):
                key = ast.Constant(-key.operand.value)  # self.layers[-1]
            if not (isinstance(key, ast.Constant) and isinstance(key.value, (int, str))):
                return None
            names.append(str(key.value))  # self.layers[0]: the submodule named "layers.0"
        node = node.value
    return tuple(reversed(names)) if isinstance(node, ast.Name) and node.id == "self" and names else None


def _is_tensor_use(node, parent_of):
    """Whether self.<path>.weight is used as a tensor: not .dtype, not isinstance, not compared (is None)."""
    parent = parent_of.get(node)
    if (isinstance(parent, ast.Attribute) and parent.attr in _METADATA
            or isinstance(parent, ast.Call) and getattr(parent.func, "id", None) in ("isinstance", "hasattr")):
        return False
    while isinstance(parent_of.get(node), (ast.Subscript, ast.Attribute, ast.BinOp, ast.UnaryOp, ast.Compare)):
        node = parent_of[node]
        if isinstance(node, ast.Compare):
            return False
    return True


@functools.lru_cache(maxsize=None)
def _uses(cls, method, after=None, attrs=("weight",)):
    """(read, called, supers) of cls's `method` (found after `after` in the MRO, for super()): paths
    self.<path> whose .weight (or other attrs) it uses, those it calls or hands to a call, supers."""
    mro = cls.__mro__[cls.__mro__.index(after) + 1:] if after else cls.__mro__
    klass = next((k for k in mro if method in vars(k)), nn.Module)
    try:  # the function's own lines only: cheap even in a 5000-line module
        tree = None if klass is nn.Module else ast.parse(textwrap.dedent(inspect.getsource(vars(klass)[method])))
    except (OSError, TypeError, SyntaxError):  # no Python source
        tree = None
    parent_of = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)} if tree else {}
    read, called, supers = set(), set(), set()
    for node in parent_of:  # every node but the root
        func = node.func if isinstance(node, ast.Call) else None
        receiver = getattr(func, "value", None)  # super() in super().forward(x)
        if isinstance(receiver, ast.Call) and getattr(receiver.func, "id", None) == "super":
            supers.add((func.attr, klass))
        elif func is not None and _self_path(func):
            called.add(_self_path(func))
        if func is not None and getattr(func, "id", None) not in ("isinstance", "hasattr", "getattr", "type", "id"):
            # a module or method handed to a call is called there: checkpoint(self.fc, x), checkpoint(self._f, x)
            called.update(_self_path(arg) for arg in node.args if _self_path(arg))
        elif isinstance(node, ast.Attribute) and node.attr in attrs and isinstance(node.ctx, ast.Load) and (
                path := () if getattr(node.value, "id", None) == "self" else _self_path(node.value)) is not None \
                and _is_tensor_use(node, parent_of):  # () : its own, self.w (in a method a parent calls)
            read.add(path)
    return read, called, supers


def _submodule(module, path):
    """module's submodule at path ("a", "-1", "b"), or None."""
    for name in path:
        container = isinstance(module, (nn.ModuleList, nn.Sequential)) and name.lstrip("-").isdigit()
        try:
            module = module[int(name)] if container else getattr(module, name)
        except (AttributeError, IndexError, TypeError):
            return None
    return module if isinstance(module, nn.Module) else None


def _direct_reads(modules, targets, attrs=("weight",)):
    """[(reader name, reader, child path, child, whether any forward calls it)] where a reader's
    forward (or a method it reaches) reads the weight (or attrs) of a target (targets: {id: module})."""
    called, found, seen = set(), set(), set()
    jobs = [(name, module, module, "forward", None) for name, module in modules]
    while jobs:
        name, reader, module, method, after = jobs.pop()
        if (id(reader), id(module), method, after) in seen:
            continue
        seen.add((id(reader), id(module), method, after))
        read, calls, supers = _uses(type(module), method, after, attrs)
        jobs += [(name, reader, module, m, klass) for m, klass in supers]
        for path in calls:
            callee, owner = _submodule(module, path), _submodule(module, path[:-1])
            if callee is not None or path[-1] == "forward" and owner is not None:  # self.fc(x), self.fc.forward(x)
                called.add(id(callee if callee is not None else owner))
            elif owner is not None:  # a method: self.helper(...), self.altup.correct(...)
                jobs.append((name, reader, owner, path[-1], None))
        for path in read:
            child = _submodule(module, path)
            if child is not None and child is not reader and id(child) in targets:  # by its name: "layers.1"
                found.add((name, reader, next(n for n, m in reader.named_modules() if m is child), child))
    return sorted(((n, r, p, c, id(c) in called) for n, r, p, c in found), key=lambda f: (f[0], f[2]))


class _BypassCheck:
    """Hooks on a reader of LoRA children's weights: after its forward each enabled, unmerged child must
    have run, or it raises. Inside it torch's attention fast path (which reads weights itself) is off."""

    def __init__(self, reader, paths):
        self.paths, self.ran, self.fastpath, self.runners = paths, set(), [], {}
        reader.register_forward_pre_hook(self.before)
        reader.register_forward_hook(self.after, always_call=True)
        for path in paths:  # a LoRAParameter that puts a child's W + ΔW in runs for it (MultiheadAttention)
            parent = reader.get_submodule(path.rpartition(".")[0])
            covered = isinstance(parent, LoRAParameter) and path.rpartition(".")[2] in parent.reads
            self.runners[path] = parent if covered else reader.get_submodule(path)
            self.runners[path].register_forward_hook(self.child_ran)

    def child_ran(self, child, args, output):
        self.ran.add(id(child))

    def before(self, reader, args):
        if not torch.compiler.is_compiling():
            self.ran.clear()
            self.fastpath.append(torch.backends.mha.get_fastpath_enabled())
            torch.backends.mha.set_fastpath_enabled(False)

    def after(self, reader, args, output):
        if torch.compiler.is_compiling() or not self.fastpath:
            return
        torch.backends.mha.set_fastpath_enabled(self.fastpath.pop())
        children = {p: reader.get_submodule(p) for p in self.paths}
        skipped = [p for p, c in children.items() if c.enabled and not c.merged and id(self.runners[p]) not in self.ran]
        if skipped and output is not None:  # None: the forward raised (this hook is always called)
            raise RuntimeError(f"LoRA on {skipped} did not run: this {type(reader).__name__}'s forward read their "
                               "weight directly instead of calling them, so it computed the model without LoRA. For "
                               "inference, merge_lora(model) first (the merged weight is what it reads).")

    @staticmethod
    def remove_all(model):
        for module in model.modules():
            for hooks in (module._forward_pre_hooks, module._forward_hooks):
                for key in [k for k, h in hooks.items() if isinstance(getattr(h, "__self__", None), _BypassCheck)]:
                    del hooks[key]
                    getattr(module, "_forward_hooks_always_called", {}).pop(key, None)


# --- tied weights and sharded ones ---------------------------------------------------


def _owners(modules):
    """{memory: [(module, "module.param")]}: Parameters over one storage are tied, as one registered twice."""
    owners = collections.defaultdict(list)
    for module_name, module in modules:
        for param_name, param in module.named_parameters(prefix=module_name, recurse=False):
            owners[_memory(param)].append((module, param_name))
    return owners


def _memory(tensor):
    try:
        pointer = tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        pointer = 0
    return (tensor.device, pointer) if pointer else id(tensor)


def _is_sharded(tensor):
    """A DTensor (FSDP2, tensor parallel), without importing torch.distributed."""
    return hasattr(tensor, "full_tensor") and hasattr(tensor, "placements")


def _shard_like(param, value):
    """value, a full tensor, as param holds it: under FSDP2 only this rank's shard."""
    if not _is_sharded(param):
        return value
    try:
        from torch.distributed.tensor import distribute_tensor
    except ImportError:  # torch < 2.5 keeps it here
        from torch.distributed._tensor import distribute_tensor
    return distribute_tensor(value, param.device_mesh, param.placements)


# --- check everything, then change -----------------------------------------------------


def _check_targets(modules, settings, skip_unused, to_save=()):
    """Check every target, change nothing (warnings come first); ({name: module}, {reader: {paths}},
    {id(owner): (owner, {Parameter: its name in settings}, [children it reads])})."""
    if any(isinstance(m, (LoRALayer, TrainedCopy)) for _, m in modules):
        raise ValueError("model already has LoRA layers; lora_min does not stack adapters: unload(model) first to "
                         "add others, or load_adapter(model, path) to swap in another adapter for the same layers")
    by_name = dict(modules)
    for name in to_save:
        inside = [n for n in list(settings) + list(to_save) if n != name and (n.startswith(name + ".")
                                                                             or name.startswith(n + "."))]
        if name in settings or inside:
            raise ValueError(f"modules_to_save {name!r} is also a LoRA target or holds one, or is inside another: "
                             f"{[name] if name in settings else inside}; a module is trained either way, not both")
        module = by_name[name]
        others, hooks = [n for n, m in modules if m is module and n != name], _hooks(module, every=True)
        if any(not p.is_floating_point() or type(p) not in (torch.Tensor, nn.Parameter) for p in module.parameters()):
            raise ValueError(f"modules_to_save {name!r} holds quantized weights, which cannot train in full; adapt "
                             "it with LoRA (target_modules) instead")
        if others or hooks:
            problem = f"is also registered as {others}" if others else f"has hooks ({', '.join(hooks)})"
            raise ValueError(f"modules_to_save {name!r} {problem}, which its trained copy would not share")
    targets = {name: module for name, module in modules if name in settings}
    for name, module in targets.items():
        try:
            if reason := _why_not_replaceable(module):
                raise ValueError(f"it {reason}")
            lora_class_for(module).check(module, **settings[name])
        except ValueError as e:
            raise ValueError(f"cannot add LoRA to {name!r}: {e}") from None
    first = {}
    for name, module in targets.items():
        other = first.setdefault(id(module), name)
        if settings[name] != settings[other]:
            raise ValueError(f"{name!r} and {other!r} are the same module but are asked for different LoRA settings: "
                             f"{settings[name]} vs {settings[other]}")
    params, owners = {}, _owners(modules)
    for name in [n for n in settings if n not in by_name]:
        owner_name, _, p = name.rpartition(".")
        owner, weight = by_name[owner_name], getattr(by_name[owner_name], p)
        owned, hooks = [n for m, n in owners[_memory(weight)] if m in targets.values()], _hooks(owner, every=True)
        try:
            if not owner_name or owned or hooks:  # (the wrapper's factored path would skip the module's hooks)
                raise ValueError("it is the model's own, and add_lora wraps submodules" if not owner_name else
                                 f"a LoRA layer from target_modules holds it too, as {owned}" if owned else
                                 f"its module has hooks ({', '.join(hooks)})")
            LoRAParameter.check(ModuleParameter(owner, p, weight, owner.training, owner), **settings[name])
        except ValueError as e:
            raise ValueError(f"cannot add LoRA to {name!r}: {e}") from None
        params.setdefault(id(owner), (owner, {}, []))[1][p] = name
    attrs = tuple(sorted({"weight"} | {p for _, names, _ in params.values() for p in names}))
    reads = _direct_reads(modules, {id(m): m for m in [*targets.values(), *(o for o, _, _ in params.values())]}, attrs)
    for _, reader, path, child, _ in [read for read in reads if id(read[1]) in params and id(read[3]) not in params]:
        params[id(reader)][2].append(path)  # a LoRAParameter puts the W + ΔW of the LoRA children it reads in
    covered = {id(read[3]) for read in reads if id(read[1]) in params and id(read[3]) not in params}
    reads = [(n, r, p, c, called or id(c) in covered) for n, r, p, c, called in reads if id(r) not in params
             or id(c) in params]
    never_called = {id(c): (n, r) for n, r, _, c, called in reads if not called}
    for (rname, reader), (_, names, _) in [(never_called[i], params[i]) for i in never_called if i in params]:
        raise ValueError(f"cannot add LoRA to {sorted(names.values())}: the module's parent "
                         f"{rname or type(reader).__name__!r} reads them directly and never calls it")
    for name in [n for n, m in targets.items() if id(m) in never_called]:
        rname, reader = never_called[id(targets.pop(name))]
        if not skip_unused:
            raise ValueError(f"cannot add LoRA to {name!r}: its parent {rname!r} ({type(reader).__name__}) reads its "
                             "weight directly and never calls it, so LoRA there would be ignored")
        warnings.warn(f"add_lora: skipping {name!r}: its parent {type(reader).__name__} reads its weight directly "
                      "and never calls it, so LoRA there would be ignored", stacklevel=4)  # the caller of add_lora
    if not targets and not params:
        raise ValueError("the model has no nn.Linear that LoRA can adapt")
    checked = collections.defaultdict(set)  # the children that run, and are read too
    for _, reader, path, _, called in reads:
        if called:
            checked[reader].add(path)
    for reader, paths in checked.items():
        warnings.warn(f"add_lora: {type(reader).__name__}'s forward reads the weight of {sorted(paths)} directly on "
                      "some code paths, and sees W there, not W + ΔW; a forward that does not call them raises",
                      stacklevel=4)
    return targets, checked, params


# --- files -------------------------------------------------------------------------------


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_adapter_tensors(expected, state, strict=True, source="the adapter"):
    """expected: {key: (shape, dtype)}. Refuse missing or unexpected keys (if strict) and any
    value that is not a dense floating tensor of that shape, finite in that dtype."""
    if not isinstance(state, dict):
        raise ValueError(f"{source}: expected a dict of tensors keyed by name, got a {type(state).__name__}")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected), key=str)
    if strict and (missing or unexpected):
        raise ValueError(f"{source}: keys do not match the model: missing {missing}, unexpected {unexpected}")
    for k in sorted(set(expected) & set(state)):
        value, (shape, dtype) = state[k], expected[k]
        if not isinstance(value, torch.Tensor):
            problem = f"is a {type(value).__name__}, not a torch.Tensor"
        elif value.is_meta:
            problem = "is a meta tensor: it holds no values"
        elif value.layout != torch.strided:
            problem = f"is a {value.layout} tensor; adapters hold dense tensors"
        elif dtype.is_floating_point and not value.is_floating_point():
            problem = f"has dtype {value.dtype}, not a floating-point dtype"
        elif value.is_floating_point() != dtype.is_floating_point:  # a buffer: BatchNorm's num_batches_tracked
            problem = f"has dtype {value.dtype}, the model's is {dtype}"
        elif tuple(value.shape) != tuple(shape):
            problem = f"has shape {tuple(value.shape)}, the model's is {tuple(shape)} (a different r or layer size?)"
        elif dtype.is_floating_point and not torch.isfinite(value.to(dtype)).all():
            problem = f"has inf or NaN values (in the model's {dtype})"
        else:
            continue
        raise ValueError(f"{source}: {k} {problem}")


def _safe_torch_load(path, what):
    """torch.load(weights_only=True): tensors and plain containers, never arbitrary objects."""
    if os.path.isdir(path):
        raise ValueError(f"{path} is a folder, not {what}; for a PEFT adapter folder use load_peft_adapter")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError:  # missing file, a folder, no permission: torch's own message is right
        raise
    except Exception as e:  # not a torch file, truncated, or pickled objects a safe load refuses
        raise ValueError(f"{path} is not {what}: it cannot be read as a file of tensors ({type(e).__name__}); "
                         "files that hold other Python objects are refused, never unpickled") from None


def _read_adapter(path):
    """The contents of a file written by save_adapter, checked: {"config": ..., "state_dict": ...}."""
    what = "a lora_min adapter file (written by save_adapter)"
    saved = _safe_torch_load(path, what)
    if not (isinstance(saved, dict) and saved.get("format") == "lora_min.adapter"
            and isinstance(saved.get("config"), dict) and isinstance(saved.get("state_dict"), dict)
            and all(isinstance(v, torch.Tensor) for v in saved["state_dict"].values())):
        raise ValueError(f"{path} is not {what}")
    if saved.get("version") != 1:
        raise ValueError(f"{path} is a lora_min adapter of format version {saved.get('version')!r}; "
                         "this file reads version 1")
    to_save = saved.get("modules_to_save", [])
    if not (isinstance(to_save, list) and all(isinstance(n, str) for n in to_save)):
        raise ValueError(f"{path}: modules_to_save is not a list of module names: {to_save!r}")
    for name, settings in saved["config"].items():
        if not (isinstance(name, str) and isinstance(settings, dict) and set(settings) - {"parameter"} == {
                "r", "alpha", "use_rslora"} and _is_int(settings["r"]) and _is_number(settings["alpha"])
                and isinstance(settings["use_rslora"], bool) and isinstance(settings.get("parameter", ""), str)):
            raise ValueError(f"{path}: the settings of layer {name!r} are not {{'r': int, 'alpha': number, "
                             f"'use_rslora': bool}} (and a LoRAParameter's 'parameter': str): {settings!r}")
    return saved


def _is_regex(v, rule="{}"):
    """Whether v compiles as a regex, inside PEFT's rule for pattern keys if given."""
    try:
        return isinstance(v, str) and bool(re.compile(rule.format(v)))
    except re.error:
        return False


def _is_names(v, regex=False):
    """A list of names, or (regex=True) also one regex string: PEFT's two forms of target_modules."""
    return isinstance(v, list) and all(isinstance(t, str) for t in v) or regex and _is_regex(v)


def _is_pattern_dict(check):
    """{name regex: value}, each key compiling inside PEFT's rule (see _peft_pattern_value)."""
    return lambda v: isinstance(v, dict) and all(_is_regex(k, r"(.*\.)?({})$") and check(x) for k, x in v.items())


# The one list of PEFT config fields lora_min reads: field -> (what its value must be,
# the check). null means the default. Any other field must hold its default (null,
# false, empty) or be one of _PEFT_NO_EFFECT; else it is a PEFT feature we refuse.
_PEFT_FIELDS = {
    "peft_type": ("'LORA' (lora_min reads only LoRA adapters)", lambda v: v == "LORA"),
    "r": ("a positive int", lambda v: _is_int(v) and v > 0),
    "lora_alpha": ("a positive number", lambda v: _is_number(v) and v > 0),
    "target_modules": ("a list of module names or a regex string ('all-linear' is not supported: list the names)",
                       lambda v: _is_names(v, regex=True) and v != "all-linear"),
    "exclude_modules": ("a list of module names or a regex string", lambda v: _is_names(v, regex=True)),
    "lora_dropout": ("a number in [0, 1)", lambda v: _is_number(v) and 0 <= v < 1),
    "use_rslora": ("true or false", lambda v: isinstance(v, bool)),
    "rank_pattern": ("an object {name regex: positive int}", _is_pattern_dict(lambda x: _is_int(x) and x > 0)),
    "alpha_pattern": ("an object {name regex: positive number}", _is_pattern_dict(lambda x: _is_number(x) and x > 0)),
    "bias": ("'none' (lora_min trains no biases)", lambda v: v == "none"),
    # Initialisations that differ only in the starting A and B, which the file replaces:
    "init_lora_weights": ("true, false or 'gaussian'", lambda v: v is True or v is False or v == "gaussian"),
    "modules_to_save": ("a list of module names", _is_names),
    "target_parameters": ("a list of Parameter names", _is_names),
}
_PEFT_REQUIRED = ("peft_type", "r", "lora_alpha", "target_modules")
# Fields that do not change what the adapted model computes (fan_in_fan_out: PEFT sets it per layer, True for Conv1D).
_PEFT_NO_EFFECT = {"task_type", "base_model_name_or_path", "revision", "inference_mode", "peft_version",
                   "auto_mapping", "megatron_core", "qalora_group_size", "fan_in_fan_out"}


def _read_peft_config(directory):
    """directory/adapter_config.json, every field checked (_PEFT_FIELDS) or refused by name."""
    if os.path.isfile(directory):
        raise ValueError(f"{directory} is a file, not a PEFT adapter folder; for save_adapter's files use load_adapter")
    path = os.path.join(directory, "adapter_config.json")
    try:
        with open(path) as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} is not a PEFT adapter config (a JSON object)")
    for field, value in config.items():
        off = value is None or value is False or (isinstance(value, (str, list, dict)) and not value)  # 0 is not off
        if field in _PEFT_FIELDS:
            what, check = _PEFT_FIELDS[field]
            if value is not None and not check(value):
                raise ValueError(f"{path}: {field} = {value!r}: lora_min reads {what} here")
        elif field not in _PEFT_NO_EFFECT and not off:
            raise ValueError(f"{path}: {field} = {value!r} is a PEFT feature lora_min does not implement")
    if config.get("target_modules") is None and config.get("target_parameters"):
        config["target_modules"] = []  # PEFT's own file for Parameters only
    for field in [field for field in _PEFT_REQUIRED if config.get(field) is None]:
        raise ValueError(f"{path}: the field {field!r} is missing")
    return config


def _check_peft_base_weights(model, state, path):
    """state without the base weights PEFT may store (save_embedding_layers: "<name>.base_layer.weight",
    or "<name>.weight"), each of which must equal the model's own: lora_min never overwrites them."""
    params = dict(model.named_parameters(remove_duplicate=False))
    names = {key: key[len(_PEFT_PREFIX):] for key in state if key.startswith(_PEFT_PREFIX)}
    base_keys = {key: name.replace(".base_layer.", ".") for key, name in names.items()
                 if name.rsplit(".", 1)[-1] in ("weight", "bias") and ".lora_" not in name}
    for key, name in base_keys.items():
        own = params.get(name)
        if own is None:
            raise ValueError(f"{path} carries a base weight {key!r}, but the model has no parameter {name!r}")
        if not (state[key].shape == own.shape and torch.equal(state[key].to(own), own.detach())):
            raise ValueError(f"{path} carries its own base weight {key!r}, which differs from the model's "
                             f"{name!r} (a resized vocabulary or other fine-tuned base weights?); lora_min loads "
                             "adapters only and never overwrites base weights: load those weights into the model first")
    return {k: v for k, v in state.items() if k not in base_keys}


# --- The fast path: LoRALinear's training step with its backward written out, the lesson's math made faster.


class _LoRALinearFunction(torch.autograd.Function):
    """y = x W^T + b + h B^T, h = x_lora A^T * scale; x_lora = dropout(x) (or x itself): (..., in), N rows; y (N, out).
    g = dL/dy, dh = g B (N, r): dL/dB = g^T h, dL/dA = dh^T x_lora * scale, dL/dx = g W + dh A * scale (as x).

    Autograd of the lesson makes x W^T + b and h B^T (and g W and dh A) as separate full-size tensors, then adds
    them; here the second of each pair is added into the first (addmm_): with x_lora = x, dL/dx is one tensor.
    Below rank 16, g B and g^T h run transposed, where CPU BLAS (MKL) is up to 5x slower at them plain.
    """

    @staticmethod
    def forward(ctx, x, x_lora, W, b, A, B, scale):
        h = F.linear(_rows(x_lora), A) * scale  # (N, r)
        y = F.linear(_rows(x), W, b).addmm_(h, B.T)  # (N, out): on rows, a new tensor and not a view
        need_x, need_W, need_B = (ctx.needs_input_grad[i] for i in (0, 2, 5))  # keep what autograd would keep:
        ctx.save_for_backward(x if need_W else None, x_lora, W if need_x else None, A, B, h if need_B else None)
        ctx.x_shape, ctx.same, ctx.scale, ctx.transposed = x.shape, x_lora is x, scale, B.shape[1] < 16  # (why: above)
        return y

    @staticmethod
    def backward(ctx, g):
        x, x_lora, W, A, B, h = ctx.saved_tensors
        need_x, need_x_lora, need_W, need_b, need_A, need_B, _ = ctx.needs_input_grad
        x_lora = _rows(x_lora)  # (saved whole: a view made in forward would not carry x_lora's graph)
        if torch.is_grad_enabled():  # create_graph: h as a function of x_lora and A (the saved h is a constant)
            h = x_lora @ A.T * ctx.scale
        dh = ((B.T @ g.T).T if ctx.transposed else g @ B) * ctx.scale  # dL/dh times scale (N, r)
        dB = ((h.T @ g).T.contiguous() if ctx.transposed else g.T @ h) if need_B else None  # (laid out as lora_B)
        # dL/dx in x's shape and not a view: autograd then adds x's other gradients into it in place
        dx = g.reshape(*ctx.x_shape[:-1], W.shape[0]) @ W if need_x else None
        if need_x and ctx.same:
            dx.view(dh.shape[0], A.shape[1]).addmm_(dh, A)
        dx_lora = (dh @ A).view(ctx.x_shape) if need_x_lora and not ctx.same else None
        return (dx, dx_lora, g.T @ _rows(x) if need_W else None, g.sum(0) if need_b else None,
                dh.T @ x_lora if need_A else None, dB, None)


def _rows(t):  # t: (..., n) as a matrix (N, n), a view where it can be
    return t.reshape(t.shape[:-1].numel(), t.shape[-1])


def _fast_path_applies(layer, x, x_lora):
    """Plain dense tensors of one float dtype, a trained A (the Function keeps x_lora where autograd would), a number
    scale; eager, outside autocast (it cannot reach inside a Function), torch.func (a batched h cannot go into an
    unbatched y in place), forward-mode AD (no jvp). Else the lesson runs (torch.jit.trace cannot save a Function)."""
    tensors = [t for t in (layer.weight, layer.bias, layer.lora_A, layer.lora_B, x, x_lora) if t is not None]
    if x.layout != torch.strided or x.is_nested or {t.dtype for t in tensors} != {x.dtype} or not x.is_floating_point():
        return False
    if any(type(t) not in (torch.Tensor, nn.Parameter) or torch.autograd.forward_ad.unpack_dual(t).tangent is not None
           for t in tensors):  # a tensor subclass (quantized, DTensor), or a dual tensor
        return False
    if not layer.lora_A.requires_grad or not isinstance(layer.scale, (int, float)) or torch.compiler.is_compiling() or (
            torch.jit.is_tracing() or torch._C._are_functorch_transforms_active()):
        return False
    try:
        return not torch.is_autocast_enabled(x.device.type)
    except RuntimeError:  # a device type autocast does not know, such as "meta"
        return False


def _fast_lora_linear(layer, x, x_lora):  # LoRALinear's adapted forward (x_lora = dropout(x): autograd's)
    y = _LoRALinearFunction.apply(x, x_lora, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scale)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])  # (..., out), as F.linear gives it


LoRALinear.use_fast_path = True  # the switch (see LoRALinear): False runs the lesson's forward alone
