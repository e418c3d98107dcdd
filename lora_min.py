"""lora_min: Low-Rank Adaptation (LoRA) of nn.Linear layers, in one readable file.

LoRA (Hu et al., 2021, https://arxiv.org/abs/2106.09685) fine-tunes a frozen
pretrained linear layer y = x W^T + b by learning a low-rank update of W:

    W' = W + ΔW,    ΔW = (B @ A) * scale,    scale = alpha / r

    W: (out, in)   frozen, never changed by training
    A: (r, in)     trained, random at the start
    B: (out, r)    trained, zero at the start, so ΔW = 0 and W' = W at first

Only r * (in + out) numbers are trained per layer instead of in * out.

In training we never form ΔW: the factored forward

    y = x W^T + b + ((x A^T) B^T) * scale

costs two thin matrix products, and backward needs no (out, in) gradient. For
inference, `merge()` folds ΔW into W once, so the layer costs exactly what a
plain nn.Linear costs.

Copy this file into your project; it needs only torch and the standard library.

    model = add_lora(model, r=8, target_modules=["q_proj", "v_proj"])
    optimizer = torch.optim.AdamW(p for p in model.parameters() if p.requires_grad)
    ...train as usual...
    save_adapter(model, "adapter.pt")          # a few KB or MB, not the whole model
    plain = merge_and_unload(model)            # an ordinary model with W + ΔW
"""

import contextlib
import copy
import math
import warnings
from typing import Iterator, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

# ---------------------------------------------------------------------------
# The math: plain tensor algebra (@, *, +, .T only), so the same two functions
# run on torch tensors and on NumPy arrays, and read as the equations above.
# ---------------------------------------------------------------------------


def lora_delta(A, B, scale):
    """The weight update ΔW = (B @ A) * scale.

    A: (r, in), B: (out, r), scale: float  ->  ΔW: (out, in)
    """
    return (B @ A) * scale


def lora_update(x, A, B, scale):
    """The LoRA branch of the forward, x ΔW^T, without ever forming ΔW.

    x: (..., in), A: (r, in), B: (out, r)  ->  (..., out)

    Scaling the thin (..., r) tensor instead of the (..., out) result is the same
    math at r/out of the cost.
    """
    return ((x @ A.T) * scale) @ B.T


def lora_forward(x, W, b, A, B, scale):
    """The whole LoRA linear layer: y = x W^T + b + ((x A^T) B^T) * scale.

    x: (..., in), W: (out, in), b: (out,) or None, A: (r, in), B: (out, r)
    ->  y: (..., out).  Never forms B @ A.
    """
    y = x @ W.T
    if b is not None:
        y = y + b
    return y + lora_update(x, A, B, scale)


class _LoRALinearFunction(torch.autograd.Function):
    """y = x W^T + b + ((x_l A^T) s) B^T, with its gradients written out by hand.

    x: (N, in) (leading dimensions flattened), x_l: the LoRA branch's input
    (dropout(x), or None for x itself), h = x_l A^T s: (N, r), g = dL/dy: (N, out). Then

        dL/dB   = g^T h                  (out, r)
        dL/dA   = s (g B)^T x_l          (r, in)
        dL/dx_l = s (g B) A              (N, in)
        dL/dx   = g W                    (N, in), plus dL/dx_l when x_l is x
        dL/dW   = g^T x,  dL/db = sum_N g     (only if W, b are being trained)

    Autograd finds the same gradients (test_lora_min.py checks it against a
    parametrize LoRA); writing them out lets every thin product run in the layout
    BLAS is fastest at and adds s (g B) A into g W in place. Measured at
    in = out = 4096, r = 8: 1.02-1.04x a frozen nn.Linear's training step, against
    1.05-1.07x with autograd (README, Benchmarks). Double backward is not supported.
    """

    @staticmethod
    def forward(ctx, x, x_lora, W, b, A, B, scale):
        x2 = x.reshape(-1, x.shape[-1])
        xl2 = x2 if x_lora is None else x_lora.reshape(-1, x.shape[-1])
        h = (xl2 @ A.T) * scale  # (N, r)
        y = x2 @ W.T if b is None else torch.addmm(b, x2, W.T)
        y.addmm_(h, B.T)  # y += h B^T without an (N, out) temporary
        ctx.save_for_backward(x2, xl2, W, A, B, h)
        ctx.scale, ctx.same_input, ctx.x_shape = scale, x_lora is None, x.shape
        return y.view(*x.shape[:-1], W.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x2, xl2, W, A, B, h = ctx.saved_tensors
        need_x, need_xl, need_W, need_b, need_A, need_B, _ = ctx.needs_input_grad
        g = g.reshape(-1, W.shape[0])
        gB = (g @ B) * ctx.scale  # (N, r)
        dx = dxl = dW = db = dA = dB = None
        if ctx.same_input and need_x:
            dx = (g @ W).addmm_(gB, A).view(ctx.x_shape)  # both paths into x, in one buffer
        else:
            dx = (g @ W).view(ctx.x_shape) if need_x else None
            dxl = (gB @ A).view(ctx.x_shape) if need_xl else None
        if need_W:
            dW = g.T @ x2
        if need_b:
            db = g.sum(0)
        if need_A:
            dA = gB.T @ xl2
        if need_B:
            # (r, out) then transposed is ~3x faster than g^T h; contiguous like lora_B
            # itself (the gradient layout DDP and optimizers expect; the copy is tiny)
            dB = (h.T @ g).T.contiguous()
        return dx, dxl, dW, db, dA, dB, None


# ---------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------

# Key added to a LoRALinear's state_dict only while it is merged, so that a
# checkpoint whose `weight` already holds W + ΔW can never be loaded as if it
# held W (ΔW would then count twice).
_MERGED_KEY = "lora_merged"


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update.

        y = x W^T + b + dropout(x) A^T B^T * scale

    Args:
        linear: the nn.Linear to adapt. Its `weight` and `bias` Parameters are
            reused (not copied) and frozen, so the state_dict keys are those of
            the linear plus `lora_A` and `lora_B`.
        r: rank of the update, a positive int.
        alpha: scaling numerator; defaults to r (scale 1).
        dropout: dropout probability on the input of the LoRA branch only.
        use_rslora: scale = alpha / sqrt(r) (rank-stabilised LoRA) instead of alpha / r.
        init_std: None for the usual kaiming-uniform init of A (as nn.Linear,
            loralib and PEFT); a float for A ~ N(0, init_std^2).

    Shapes: weight (out, in), bias (out,), lora_A (r, in), lora_B (out, r);
    input (..., in) -> output (..., out).

    States: `enabled` (False: exactly the original linear) and `merged` (ΔW is
    folded into `weight`; see merge). Merging is explicit: train() and eval()
    never touch the weights.
    """

    def __init__(self, linear, r=8, alpha=None, dropout=0.0, use_rslora=False, init_std=None):
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"LoRALinear adapts an nn.Linear, got {type(linear).__name__}")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"r (the LoRA rank) must be a positive int, got {r!r}")
        alpha = r if alpha is None else alpha
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if init_std is not None and not init_std > 0:
            raise ValueError(f"init_std must be > 0 or None, got {init_std!r}")

        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # the same Parameter objects: no copy, and frozen
        self.bias = linear.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)

        self.r, self.alpha, self.use_rslora = r, float(alpha), use_rslora
        self.scale = self.alpha / (math.sqrt(r) if use_rslora else r)
        factory = dict(device=self.weight.device, dtype=self.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **factory))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._enabled = True
        self.merged = False
        self.reset_lora_parameters(init_std)

    def reset_lora_parameters(self, init_std=None):
        """A random (kaiming-uniform, or N(0, init_std^2)), B = 0, so ΔW = 0."""
        if self.merged:
            raise RuntimeError("reset_lora_parameters() on a merged layer; call unmerge() first")
        with torch.no_grad():
            if init_std is None:
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            else:
                nn.init.normal_(self.lora_A, mean=0.0, std=init_std)
            nn.init.zeros_(self.lora_B)

    @property
    def enabled(self):
        return self._enabled

    @enabled.setter
    def enabled(self, value):
        if self.merged and not value:
            raise RuntimeError("cannot disable a merged LoRA layer: its weight holds W + ΔW; call unmerge() first")
        self._enabled = bool(value)

    def delta_weight(self):
        """ΔW = (lora_B @ lora_A) * scale, shape (out, in), in the weight's dtype."""
        return lora_delta(self.lora_A, self.lora_B, self.scale)

    def forward(self, x):
        """x: (..., in) -> (..., out)."""
        if self.merged:
            if self.training and torch.is_grad_enabled() and (self.lora_A.requires_grad or self.lora_B.requires_grad):
                raise RuntimeError(
                    "forward in training mode on a merged LoRA layer: lora_A and lora_B would get no "
                    "gradient. Call unmerge() to train, or use eval() / torch.no_grad() for inference."
                )
            return F.linear(x, self.weight, self.bias)
        # Disabled: F.linear is exactly what nn.Linear computes, bit for bit.
        if not self.enabled:
            return F.linear(x, self.weight, self.bias)
        x_lora = self.lora_dropout(x)
        x_lora = None if x_lora is x else x_lora  # None: the same tensor (no dropout, or eval)
        tensors = (x, x_lora, self.weight, self.bias, self.lora_A, self.lora_B)
        device = x.device.type
        if torch.is_autocast_enabled(device):  # autocast does not reach inside an autograd.Function:
            dtype = torch.get_autocast_dtype(device)  # cast as it would cast F.linear's inputs
            tensors = tuple(None if t is None else t.to(dtype) for t in tensors)
            with torch.autocast(device, enabled=False):
                return _LoRALinearFunction.apply(*tensors, self.scale)
        return _LoRALinearFunction.apply(*tensors, self.scale)

    # --- merge / unmerge -----------------------------------------------------
    # W is rewritten in place, computed in at least float32 and rounded once to
    # the weight's dtype. unmerge() therefore restores W only up to rounding:
    # elementwise |W_unmerged - W| <= eps * (|W| + |ΔW|), eps = torch.finfo(W.dtype).eps
    # (exact in float64 for practical purposes; about 1e-7 relative in float32,
    # 8e-3 in bfloat16). Keep a copy of W if you need it bit for bit.

    def _shifted_weight(self, sign):
        """W + sign * ΔW, computed in at least float32, rounded once to W's dtype."""
        dtype = torch.promote_types(self.weight.dtype, torch.float32)
        delta = lora_delta(self.lora_A.to(dtype), self.lora_B.to(dtype), self.scale)
        return (self.weight.to(dtype) + sign * delta).to(self.weight.dtype)

    def _check_not_sharded(self, what):
        # Under FSDP2 the parameters are DTensor shards between forwards: ΔW needs
        # all of A and B, and each rank holds only a slice of W.
        if any(_is_sharded(p) for p in (self.weight, self.lora_A, self.lora_B)):
            raise RuntimeError(f"{what}() on sharded (FSDP2 / DTensor) parameters: gather a full copy first, "
                               "e.g. load get_model_state_dict(model, options=StateDictOptions(full_state_dict=True)) "
                               "into an unsharded model, then merge that")

    @torch.no_grad()
    def merge(self):
        """Fold ΔW into weight in place: forward becomes a plain F.linear."""
        self._check_not_sharded("merge")
        if self.merged:
            raise RuntimeError("merge() on a LoRA layer that is already merged")
        if not self.enabled:
            raise RuntimeError("merge() on a disabled LoRA layer would change its output; enable it first")
        self.weight.copy_(self._shifted_weight(+1))
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """Take ΔW back out of weight (exact up to the rounding documented above)."""
        self._check_not_sharded("unmerge")
        if not self.merged:
            raise RuntimeError("unmerge() on a LoRA layer that is not merged")
        self.weight.copy_(self._shifted_weight(-1))
        self.merged = False

    # --- checkpoints remember whether `weight` holds W or W + ΔW ---------------

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.merged:
            destination[prefix + _MERGED_KEY] = torch.tensor(True)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        saved_merged = bool(state_dict.pop(prefix + _MERGED_KEY, False))
        if saved_merged != self.merged:
            what = {True: "merged (weight = W + ΔW)", False: "unmerged (weight = W)"}
            error_msgs.append(
                f"{prefix.rstrip('.') or 'LoRALinear'}: the checkpoint was saved {what[saved_merged]} but this layer is "
                f"{what[self.merged]}; call {'merge' if saved_merged else 'unmerge'}() on it before loading."
            )
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self):
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"r={self.r}, alpha={self.alpha:g}, scale={self.scale:.4g}, enabled={self.enabled}, merged={self.merged}"
        )


# ---------------------------------------------------------------------------
# Model-level helpers
# ---------------------------------------------------------------------------


def lora_layers(model) -> Iterator[tuple[str, LoRALinear]]:
    """Yield (name, layer) for every LoRALinear in the model."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def _set_submodule(model, name, new):
    parent_name, _, child_name = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child_name, new)


def _matches(name, targets):
    """A target matches a module by its full name or by its last dotted components."""
    return any(name == t or name.endswith("." + t) for t in targets)


def add_lora(model, r=8, alpha=None, dropout=0.0, target_modules=None, use_rslora=False, init_std=None):
    """Replace nn.Linear submodules by LoRALinear in place, freeze all else; return model.

    target_modules: None for every nn.Linear, or a list of module names, each the
    full name from model.named_modules() ("layers.0.attn.q_proj") or its end ("q_proj").
    """
    if isinstance(model, (nn.Linear, LoRALinear)):
        raise TypeError("add_lora adapts the linear layers inside a model; wrap a lone layer as LoRALinear(linear)")
    if any(True for _ in lora_layers(model)):
        raise ValueError("model already has LoRA layers; add_lora does not stack adapters")
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    # nn.MultiheadAttention reads out_proj.weight directly instead of calling
    # out_proj(x): a LoRALinear there would be silently ignored.
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            mha_out = f"{name}.out_proj" if name else "out_proj"
            if target_modules is not None and _matches(mha_out, target_modules):
                raise ValueError(f"{mha_out!r} is nn.MultiheadAttention's out_proj, whose weight is read directly, "
                                 "bypassing forward(): LoRA cannot adapt it")
            if linears.pop(mha_out, None) is not None:
                warnings.warn(f"add_lora: skipping {mha_out!r}: nn.MultiheadAttention reads its weight directly, "
                              "so LoRA there would be ignored", stacklevel=2)
    if target_modules is not None:
        if isinstance(target_modules, str):
            target_modules = [target_modules]
        unmatched = [t for t in target_modules if not any(_matches(n, [t]) for n in linears)]
        if unmatched:
            raise ValueError(f"target_modules {unmatched} match no nn.Linear in the model; valid names: {sorted(linears)}")
        linears = {n: m for n, m in linears.items() if _matches(n, target_modules)}
    if not linears:
        raise ValueError("the model has no nn.Linear to adapt")
    for name, linear in linears.items():
        _set_submodule(model, name, LoRALinear(linear, r, alpha, dropout, use_rslora, init_std))
    mark_only_lora_as_trainable(model)
    return model


def mark_only_lora_as_trainable(model):
    """requires_grad = True for lora_A / lora_B, False for every other parameter."""
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in lora_layers(model):
        layer.lora_A.requires_grad_(True)
        layer.lora_B.requires_grad_(True)
    return model


def set_lora_enabled(model, enabled):
    """Turn every LoRA layer on (the adapted model) or off (exactly the base model)."""
    layers = [layer for _, layer in lora_layers(model)]
    if not enabled and any(layer.merged for layer in layers):
        raise RuntimeError("cannot disable LoRA while layers are merged; call unmerge_lora(model) first")
    for layer in layers:
        layer.enabled = enabled


@contextlib.contextmanager
def lora_disabled(model):
    """Run the base model inside the block; restores each layer's previous state on exit."""
    previous = [(layer, layer.enabled) for _, layer in lora_layers(model)]
    set_lora_enabled(model, False)
    try:
        yield model
    finally:
        for layer, was_enabled in previous:
            layer.enabled = was_enabled


def merge_lora(model):
    """Fold ΔW into W in every LoRA layer (for inference at plain-linear cost)."""
    already = [name for name, layer in lora_layers(model) if layer.merged]
    disabled = [name for name, layer in lora_layers(model) if not layer.enabled]
    if already or disabled:  # checked first, so a refusal leaves no layer half-done
        raise RuntimeError(f"merge_lora: layers already merged: {already}; disabled (enable first): {disabled}")
    for _, layer in lora_layers(model):
        layer.merge()


def unmerge_lora(model):
    """Take ΔW back out of W in every LoRA layer."""
    not_merged = [name for name, layer in lora_layers(model) if not layer.merged]
    if not_merged:
        raise RuntimeError(f"unmerge_lora: layers not merged: {not_merged}")
    for _, layer in lora_layers(model):
        layer.unmerge()


def merge_and_unload(model, inplace=False):
    """A model whose every LoRALinear is a plain nn.Linear computing what it computes now.

    Enabled layers become nn.Linear with weight W + ΔW, disabled ones with W; the
    result has the original model's state_dict keys and needs no LoRA code.
    The input model is left untouched unless inplace=True.
    """
    for _, layer in lora_layers(model):
        layer._check_not_sharded("merge_and_unload")
    if not inplace:
        model = copy.deepcopy(model)
    for name, layer in list(lora_layers(model)):
        W = layer.weight
        if layer.enabled and not layer.merged:
            W = layer._shifted_weight(+1)
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        linear.weight = nn.Parameter(W.detach().clone(), requires_grad=False)
        if layer.bias is not None:
            linear.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        if name == "":
            return linear
        _set_submodule(model, name, linear)
    return model


def _is_sharded(tensor):
    """A DTensor (FSDP2, tensor parallel), without importing torch.distributed."""
    return hasattr(tensor, "full_tensor") and hasattr(tensor, "placements")


def lora_state_dict(model):
    """Only the adapter tensors (lora_A, lora_B), keyed as in model.state_dict().

    Sharded (FSDP2) tensors are gathered into full ones, so under FSDP2 every
    rank must call this (it is a collective); rank 0 can then save the result.
    """
    return {k: v.full_tensor() if _is_sharded(v) else v for k, v in _adapter_tensors(model).items()}


def _adapter_tensors(model, keep_vars=False):
    """lora_A / lora_B entries of model.state_dict() (the Parameters themselves if keep_vars)."""
    state = model.state_dict(keep_vars=keep_vars)
    return {k: v for k, v in state.items() if k.rsplit(".", 1)[-1] in ("lora_A", "lora_B")}


def load_lora_state_dict(model, state, strict=True):
    """Copy adapter tensors into the model; wrong keys (if strict) or shapes raise."""
    own = _adapter_tensors(model, keep_vars=True)  # the Parameters, to copy into
    if not own:
        raise ValueError("the model has no LoRA layers; call add_lora(model, ...) first")
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if strict and (missing or unexpected):
        raise KeyError(f"adapter keys do not match the model: missing {missing}, unexpected {unexpected}")
    bad = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
           for k in own if k in state and state[k].shape != own[k].shape]
    if bad:
        raise ValueError("adapter tensor shapes do not match the model (different r or layer sizes?): " + "; ".join(bad))
    merged = [name for name, layer in lora_layers(model) if layer.merged]
    if merged:
        raise RuntimeError(f"cannot load an adapter into merged layers {merged}; call unmerge_lora(model) first")
    with torch.no_grad():
        for k, param in own.items():
            if k not in state:
                continue
            value = state[k].to(device=param.device, dtype=param.dtype)
            if _is_sharded(param):  # FSDP2: keep only this rank's shard of the full tensor
                from torch.distributed.tensor import distribute_tensor

                value = distribute_tensor(value, param.device_mesh, param.placements)
            param.copy_(value)
    return model


def _lora_config(model):
    """The settings that give the adapter tensors meaning, as plain Python values."""
    return {name: {"r": layer.r, "alpha": layer.alpha, "use_rslora": layer.use_rslora} for name, layer in lora_layers(model)}


def save_adapter(model, path):
    """Save only the adapter: its tensors plus r, alpha, scaling rule and target modules."""
    state = {k: v.detach().cpu() for k, v in lora_state_dict(model).items()}
    torch.save({"format": "lora_min.adapter", "version": 1, "config": _lora_config(model), "state_dict": state}, path)


def load_adapter(model, path):
    """Load a file written by save_adapter into a model with matching LoRA layers."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(saved, dict) or saved.get("format") != "lora_min.adapter":
        raise ValueError(f"{path} is not a lora_min adapter file (written by save_adapter)")
    want, have = saved["config"], _lora_config(model)
    if want != have:
        def difference(n):
            if n not in have:
                return f"{n!r}: in the file, not a LoRA layer of the model"
            if n not in want:
                return f"{n!r}: a LoRA layer of the model, not in the file"
            return f"{n!r}: file {want[n]} vs model {have[n]}"
        diffs = [difference(n) for n in sorted(set(want) | set(have)) if want.get(n) != have.get(n)]
        raise ValueError(f"adapter settings in {path} do not match the model's LoRA layers: " + "; ".join(diffs))
    return load_lora_state_dict(model, saved["state_dict"], strict=True)


class ParameterCount(NamedTuple):
    trainable: int
    total: int


def count_parameters(model):
    """(trainable, total) parameter counts; shared parameters are counted once."""
    params = list(model.parameters())  # .parameters() already skips duplicates
    return ParameterCount(sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))
