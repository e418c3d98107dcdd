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

Copy this file into your project; it needs only torch (tested with torch 2.4
to 2.14) and the standard library.

    model = add_lora(model, r=8, target_modules=["q_proj", "v_proj"])
    optimizer = torch.optim.AdamW(p for p in model.parameters() if p.requires_grad)
    ...train as usual...
    save_adapter(model, "adapter.pt")          # a few KB or MB, not the whole model
    save_peft_adapter(model, "adapter/")       # the same, in PEFT's format (PEFT, vLLM, ...)
    plain = merge_and_unload(model)            # an ordinary model with W + ΔW

Reading order: the math, the layer, the model-level helpers, adapter files
(ours and PEFT's), and last the hand-written backward that makes the layer fast.
"""

import collections
import contextlib
import copy
import json
import math
import os
import re
import warnings
from typing import Iterator, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

# ---------------------------------------------------------------------------
# The math: plain tensor algebra (@, *, +, .T only), so the same functions run
# on torch tensors, NumPy arrays or any Python array API library, and read as
# the equations above.
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

    Shared weights: merge() writes into `weight`, so it must not be merged if
    that Parameter is also used elsewhere (tied embeddings). add_lora finds such
    sharing and records it in `shared_with`, which makes merge() refuse; for a
    LoRALinear you build yourself, set `shared_with` or use merge_and_unload.
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

        self.r, self.alpha, self.use_rslora, self.dropout = r, float(alpha), use_rslora, float(dropout)
        self.scale = self.alpha / (math.sqrt(r) if use_rslora else r)
        factory = dict(device=self.weight.device, dtype=self.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **factory))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.shared_with = ()  # names of other modules' parameters that are this layer's weight or bias
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
        # lora_forward's math, with the gradients written out by hand for speed
        # (see _LoRALinearFunction at the end of this file).
        tensors = (x, x_lora, self.weight, self.bias, self.lora_A, self.lora_B)
        device = x.device.type
        if torch.is_autocast_enabled(device):  # autocast does not reach inside an autograd.Function:
            dtype = torch.get_autocast_dtype(device)  # cast as it would cast F.linear's inputs
            tensors = tuple(None if t is None else t.to(dtype) for t in tensors)
            with torch.autocast(device, enabled=False):
                return _lora_linear(*tensors, self.scale)
        return _lora_linear(*tensors, self.scale)

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

    def _check_can_write_weight(self, what):
        self._check_not_sharded(what)
        if self.shared_with:
            raise RuntimeError(f"{what}() would write W + ΔW into a weight that is shared with {list(self.shared_with)} "
                               "(tied weights): those would change too. Use merge_and_unload(model), which copies it.")

    @torch.no_grad()
    def merge(self):
        """Fold ΔW into weight in place: forward becomes a plain F.linear."""
        self._check_can_write_weight("merge")
        if self.merged:
            raise RuntimeError("merge() on a LoRA layer that is already merged")
        if not self.enabled:
            raise RuntimeError("merge() on a disabled LoRA layer would change its output; enable it first")
        self.weight.copy_(self._shifted_weight(+1))
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """Take ΔW back out of weight (exact up to the rounding documented above)."""
        self._check_can_write_weight("unmerge")
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
    """A target matches a module by its full name or by its last dotted components
    ("q_proj" matches "layers.0.attn.q_proj", never "layers.0.attn.qq_proj")."""
    return any(name == t or name.endswith("." + t) for t in targets)


def _cannot_adapt(module):
    """Why LoRALinear cannot stand in for this module (None if it can)."""
    kind = type(module).__name__
    if not isinstance(module, nn.Linear):
        return f"is a {kind}, not an nn.Linear"
    if parametrize.is_parametrized(module):
        return "is parametrized (torch.nn.utils.parametrize, e.g. weight_norm): its weight is computed, not stored"
    if type(module).forward is not nn.Linear.forward:  # quantized linears, custom forwards
        return f"is a {kind}, an nn.Linear subclass with its own forward(), which LoRALinear would not compute"
    if not isinstance(module.weight, nn.Parameter):
        return "has a weight that is not an nn.Parameter (old-style weight_norm?)"
    if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks:
        return "has hooks registered on it, which replacing the module would drop"
    return None


def _target_names(model, target_modules):
    """The names add_lora adapts: every nn.Linear, or those that target_modules names."""
    names = [n for n, _ in model.named_modules(remove_duplicate=False) if n]
    linears = [n for n in names if isinstance(model.get_submodule(n), nn.Linear)]
    # nn.MultiheadAttention reads out_proj.weight directly instead of calling
    # out_proj(x): a LoRALinear there would be silently ignored.
    mha_outs = {f"{n}.out_proj" if n else "out_proj" for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
    if target_modules is None:
        for name in sorted(mha_outs & set(linears)):
            warnings.warn(f"add_lora: skipping {name!r}: nn.MultiheadAttention reads its weight directly, "
                          "so LoRA there would be ignored", stacklevel=3)
        return [n for n in linears if n not in mha_outs]
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    unmatched = [t for t in target_modules if not any(_matches(n, [t]) for n in names)]
    if unmatched:
        raise ValueError(f"target_modules {unmatched} match no module in the model; nn.Linear names: {sorted(set(linears))}")
    chosen = [n for n in names if _matches(n, target_modules)]
    for name in chosen:
        if name in mha_outs:
            raise ValueError(f"{name!r} is nn.MultiheadAttention's out_proj, whose weight is read directly, "
                             "bypassing forward(): LoRA cannot adapt it")
    return chosen


def _owners(model):
    """id(parameter) -> [(module, "module.param")] for every place a parameter is registered."""
    owners = collections.defaultdict(list)
    for module_name, module in model.named_modules(remove_duplicate=False):
        for param_name, param in module.named_parameters(recurse=False):
            owners[id(param)].append((module, f"{module_name}.{param_name}" if module_name else param_name))
    return owners


def _attach_lora(model, settings):
    """Replace each named nn.Linear by a LoRALinear; settings: {name: LoRALinear kwargs}.

    Checks everything before changing anything. A module registered under
    several names gets one LoRALinear (still shared); a weight that another
    module also uses is recorded in the layer's shared_with (merge() refuses).
    """
    if any(True for _ in lora_layers(model)):
        raise ValueError("model already has LoRA layers; lora_min does not stack adapters")
    if not settings:
        raise ValueError("the model has no nn.Linear to adapt")
    for name in settings:
        reason = _cannot_adapt(model.get_submodule(name))
        if reason:
            raise ValueError(f"cannot add LoRA to {name!r}: it {reason}")
    owners, replaced = _owners(model), {}
    for name, kwargs in settings.items():
        linear = model.get_submodule(name)
        if id(linear) not in replaced:
            layer = LoRALinear(linear, **kwargs)
            params = [p for p in (linear.weight, linear.bias) if p is not None]
            layer.shared_with = tuple(n for p in params for module, n in owners[id(p)] if module is not linear)
            replaced[id(linear)] = (layer, kwargs)
        layer, first_kwargs = replaced[id(linear)]
        if kwargs != first_kwargs:
            raise ValueError(f"{name!r} is the same module as another target but asks for other LoRA settings")
        _set_submodule(model, name, layer)
    mark_only_lora_as_trainable(model)
    return model


def add_lora(model, r=8, alpha=None, dropout=0.0, target_modules=None, use_rslora=False, init_std=None):
    """Replace nn.Linear submodules by LoRALinear in place, freeze all else; return model.

    target_modules: None for every nn.Linear, or a list of module names, each the
    full name from model.named_modules() ("layers.0.attn.q_proj") or its end ("q_proj").
    A named module that LoRALinear cannot replace exactly (not an nn.Linear, a
    subclass with its own forward, parametrized, hooked) raises, naming it.
    """
    if isinstance(model, (nn.Linear, LoRALinear)):
        raise TypeError("add_lora adapts the linear layers inside a model; wrap a lone layer as LoRALinear(linear)")
    kwargs = dict(r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, init_std=init_std)
    return _attach_lora(model, {name: kwargs for name in _target_names(model, target_modules)})


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
    layers = list(lora_layers(model))
    for _, layer in layers:  # checked first, so a refusal leaves no layer half-done
        layer._check_can_write_weight("merge_lora")
    already = [name for name, layer in layers if layer.merged]
    disabled = [name for name, layer in layers if not layer.enabled]
    if already or disabled:
        raise RuntimeError(f"merge_lora: layers already merged: {already}; disabled (enable first): {disabled}")
    for _, layer in layers:
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
    Weights are copied, so tied weights stay correct (they are untied: the other
    owner keeps W). The input model is left untouched unless inplace=True.
    """
    for _, layer in lora_layers(model):
        layer._check_not_sharded("merge_and_unload")
    if not inplace:
        model = copy.deepcopy(model)
    plain = {}  # one nn.Linear per LoRALinear, also where it is registered under several names
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
        plain[id(layer)] = linear
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if id(module) in plain:
            _set_submodule(model, name, plain[id(module)])
    return model


def _is_sharded(tensor):
    """A DTensor (FSDP2, tensor parallel), without importing torch.distributed."""
    return hasattr(tensor, "full_tensor") and hasattr(tensor, "placements")


class ParameterCount(NamedTuple):
    trainable: int
    total: int


def count_parameters(model):
    """(trainable, total) parameter counts; shared parameters are counted once."""
    params = list(model.parameters())  # .parameters() already skips duplicates
    return ParameterCount(sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))


# ---------------------------------------------------------------------------
# Adapter files: only lora_A / lora_B and the settings that give them meaning
# ---------------------------------------------------------------------------


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


def _check_adapter_keys(expected, state, strict=True):
    """expected: {key: shape}. Missing / unexpected keys (if strict) raise KeyError, wrong shapes ValueError."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if strict and (missing or unexpected):
        raise KeyError(f"adapter keys do not match the model: missing {missing}, unexpected {unexpected}")
    bad = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(shape)}"
           for k, shape in expected.items() if k in state and tuple(state[k].shape) != tuple(shape)]
    if bad:
        raise ValueError("adapter tensor shapes do not match the model (different r or layer sizes?): " + "; ".join(bad))


def load_lora_state_dict(model, state, strict=True):
    """Copy adapter tensors into the model; wrong keys (if strict) or shapes raise."""
    own = _adapter_tensors(model, keep_vars=True)  # the Parameters, to copy into
    if not own:
        raise ValueError("the model has no LoRA layers; call add_lora(model, ...) first")
    _check_adapter_keys({k: p.shape for k, p in own.items()}, state, strict)
    merged = [name for name, layer in lora_layers(model) if layer.merged]
    if merged:
        raise RuntimeError(f"cannot load an adapter into merged layers {merged}; call unmerge_lora(model) first")
    with torch.no_grad():
        for k, param in own.items():
            if k not in state:
                continue
            value = state[k].to(device=param.device, dtype=param.dtype)
            if _is_sharded(param):  # FSDP2: keep only this rank's shard of the full tensor
                try:
                    from torch.distributed.tensor import distribute_tensor
                except ImportError:  # torch < 2.5 keeps it here
                    from torch.distributed._tensor import distribute_tensor
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


def _safe_torch_load(path, what):
    """torch.load(weights_only=True): tensors and plain containers only, never arbitrary
    pickled objects. Anything else is a ValueError naming the file."""
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
        raise ValueError(f"{path} is a lora_min adapter of format version {saved.get('version')!r}; this file reads version 1")
    return saved


def load_adapter(model, path):
    """Load a file written by save_adapter into a model with matching LoRA layers."""
    saved = _read_adapter(path)
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


# ---------------------------------------------------------------------------
# PEFT's adapter format (adapter_config.json + adapter_model.safetensors), read
# and written by Hugging Face PEFT, vLLM, TGI, ...: tensors are keyed
# "base_model.model.<module name>.lora_A.weight"; the config says which modules
# (target_modules) with which r and lora_alpha (rank_pattern / alpha_pattern
# for the modules that differ).
# ---------------------------------------------------------------------------

_PEFT_PREFIX = "base_model.model."
# Config fields that do not change what the adapted model computes.
_PEFT_NO_EFFECT = {"task_type", "base_model_name_or_path", "revision", "inference_mode", "peft_version",
                   "auto_mapping", "megatron_core", "qalora_group_size"}
# Initialisations that differ only in the starting A and B, which the file replaces.
_PEFT_PLAIN_INITS = (True, False, "gaussian")


def _peft_pattern_value(patterns, name, default):
    """PEFT's rank_pattern / alpha_pattern rule: the first key that matches the end of name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _peft_targets(config, name):
    """PEFT's target rule: a list matches a full name or its dotted end; a string is a
    regex that must match the full name. exclude_modules removes names the same way."""
    def matches(spec):
        return bool(re.fullmatch(spec, name)) if isinstance(spec, str) else _matches(name, spec)

    return matches(config["target_modules"]) and not (config.get("exclude_modules") and matches(config["exclude_modules"]))


def _most_common(values):
    return collections.Counter(values).most_common(1)[0][0]


def _peft_config(model, layers, base_model_name_or_path):
    """adapter_config.json's content for these {name: LoRALinear} layers of model."""
    for setting in ("use_rslora", "dropout"):
        if len({getattr(layer, setting) for layer in layers.values()}) > 1:
            raise ValueError(f"PEFT has one {setting} for all layers; these layers differ: "
                             f"{ {n: getattr(layer, setting) for n, layer in layers.items()} }")
    first = next(iter(layers.values()))
    r = _most_common(layer.r for layer in layers.values())
    alpha = _most_common(layer.alpha for layer in layers.values())
    # Short names ("q_proj") when they select exactly these modules, else full names.
    short = sorted({n.rsplit(".", 1)[-1] for n in layers})
    selected = {n for n, _ in model.named_modules(remove_duplicate=False) if _matches(n, short)}
    targets = short if selected == set(layers) else sorted(layers)
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_name_or_path,
        "r": r, "lora_alpha": int(alpha) if alpha == int(alpha) else alpha, "target_modules": targets,
        "rank_pattern": {n: layer.r for n, layer in layers.items() if layer.r != r},
        "alpha_pattern": {n: layer.alpha for n, layer in layers.items() if layer.alpha != alpha},
        "lora_dropout": first.dropout, "use_rslora": first.use_rslora,
        "bias": "none", "fan_in_fan_out": False, "use_dora": False, "modules_to_save": None,
        "layers_to_transform": None, "layers_pattern": None, "init_lora_weights": True, "inference_mode": True,
    }
    for n, layer in layers.items():  # PEFT's pattern rule must give every layer back its own r and alpha
        r_n, alpha_n = (_peft_pattern_value(config[key], n, default) for key, default in
                        (("rank_pattern", r), ("alpha_pattern", alpha)))
        if (r_n, alpha_n) != (layer.r, layer.alpha):
            raise ValueError(f"cannot express the rank and alpha of {n!r} in PEFT's rank_pattern / alpha_pattern")
    return config


def save_peft_adapter(model, directory, base_model_name_or_path=None):
    """Write the adapter as PEFT does: directory/adapter_config.json and
    adapter_model.safetensors (adapter_model.bin when safetensors is not installed),
    so that peft.PeftModel.from_pretrained(base, directory) computes what this model
    computes with every LoRA layer enabled (the adapter's weights, whatever the
    layers' enabled / merged state now)."""
    names = [n for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, LoRALinear)]
    layers = {n: model.get_submodule(n) for n in names}
    if not layers or "" in layers:
        raise ValueError("save_peft_adapter needs a model with LoRA layers inside it (see add_lora)")
    config = _peft_config(model, layers, base_model_name_or_path)
    # Separate contiguous copies: safetensors refuses tensors that share memory.
    tensors = {f"{_PEFT_PREFIX}{k}.weight": v.detach().cpu().clone().contiguous() for k, v in lora_state_dict(model).items()}
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    try:
        from safetensors.torch import save_file
    except ImportError:
        written, stale = "adapter_model.bin", "adapter_model.safetensors"
        torch.save(tensors, os.path.join(directory, written))
    else:
        written, stale = "adapter_model.safetensors", "adapter_model.bin"
        save_file(tensors, os.path.join(directory, written), metadata={"format": "pt"})
    if os.path.exists(os.path.join(directory, stale)):  # an older adapter in the other format would
        os.remove(os.path.join(directory, stale))  # be read instead of (or beside) this one


def _read_peft_config(directory):
    """directory/adapter_config.json, checked: every PEFT feature lora_min does not
    implement is refused, naming the field, instead of being ignored."""
    path = os.path.join(directory, "adapter_config.json")
    try:
        with open(path) as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} is not a PEFT adapter config (a JSON object)")
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type is {config.get('peft_type')!r}; lora_min reads only 'LORA' adapters")
    for field in ("r", "lora_alpha", "target_modules"):
        if config.get(field) is None:
            raise ValueError(f"{path}: the field {field!r} is missing")
    if isinstance(config["target_modules"], str) and config["target_modules"].lower() == "all-linear":
        raise ValueError(f"{path}: target_modules 'all-linear' is not supported; list the module names")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{path}: bias {config['bias']!r} is not supported (lora_min trains no biases); only 'none'")
    if config.get("init_lora_weights", True) not in _PEFT_PLAIN_INITS:
        raise ValueError(f"{path}: init_lora_weights {config['init_lora_weights']!r} is not supported")
    handled = {"peft_type", "r", "lora_alpha", "target_modules", "exclude_modules", "lora_dropout", "use_rslora",
               "rank_pattern", "alpha_pattern", "bias", "init_lora_weights"}
    for field, value in config.items():
        if field not in handled | _PEFT_NO_EFFECT and value not in (None, False, "", [], {}):
            raise ValueError(f"{path}: {field} = {value!r} is a PEFT feature lora_min does not implement")
    return config


def _read_peft_weights(directory):
    """The adapter tensors of directory: adapter_model.safetensors, else adapter_model.bin."""
    path = os.path.join(directory, "adapter_model.safetensors")
    if os.path.exists(path):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ImportError(f"reading {path} needs the safetensors package: pip install safetensors") from None
        try:
            return load_file(path)
        except Exception as e:  # a corrupt or truncated file
            raise ValueError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from None
    path = os.path.join(directory, "adapter_model.bin")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{directory} holds neither adapter_model.safetensors nor adapter_model.bin")
    state = _safe_torch_load(path, "a PEFT adapter file (adapter_model.bin)")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a PEFT adapter file: not a dict of tensors")
    return state


def load_peft_adapter(model, directory):
    """Add LoRA layers where a PEFT adapter says and load its weights; returns model.

    model: the base model, without LoRA layers, as PEFT's base model would be
    (module names must be those PEFT saw). Everything is checked before the model
    is changed: unsupported config fields, targets that are not plain nn.Linear
    modules, and tensors with missing, unexpected or wrongly shaped keys.
    """
    config = _read_peft_config(directory)
    state = _read_peft_weights(directory)
    names = [n for n, _ in model.named_modules(remove_duplicate=False) if n and _peft_targets(config, n)]
    if not names:
        raise ValueError(f"target_modules {config['target_modules']!r} of {directory} match no module of the model")
    settings = {}
    for n in names:
        settings[n] = dict(r=_peft_pattern_value(config.get("rank_pattern") or {}, n, config["r"]),
                           alpha=_peft_pattern_value(config.get("alpha_pattern") or {}, n, config["lora_alpha"]),
                           dropout=config.get("lora_dropout") or 0.0, use_rslora=bool(config.get("use_rslora")))
        reason = _cannot_adapt(model.get_submodule(n))
        if reason:
            raise ValueError(f"{directory} targets {n!r}, which lora_min cannot adapt: it {reason}")
    expected = {}
    for n, s in settings.items():
        linear = model.get_submodule(n)
        expected[f"{_PEFT_PREFIX}{n}.lora_A.weight"] = (s["r"], linear.in_features)
        expected[f"{_PEFT_PREFIX}{n}.lora_B.weight"] = (linear.out_features, s["r"])
    _check_adapter_keys(expected, state)
    _attach_lora(model, settings)
    return load_lora_state_dict(model, {k[len(_PEFT_PREFIX):-len(".weight")]: v for k, v in state.items()})


# ---------------------------------------------------------------------------
# The fast path: LoRALinear's forward and backward written out by hand
# ---------------------------------------------------------------------------


class _LoRALinearFunction(torch.autograd.Function):
    """y = x W^T + b + ((x_l A^T) s) B^T, with its gradients written out by hand.

    x: (N, in) (leading dimensions flattened), x_l: the LoRA branch's input
    (dropout(x), or None for x itself), h = x_l A^T s: (N, r), g = dL/dy: (N, out). Then

        dL/dB   = g^T h                  (out, r)
        dL/dA   = s (g B)^T x_l          (r, in)
        dL/dx_l = s (g B) A              (N, in)
        dL/dx   = g W                    (N, in), plus dL/dx_l when x_l is x
        dL/dW   = g^T x,  dL/db = sum_N g     (only if W, b are being trained)

    Autograd of lora_forward finds the same gradients (the tests check it);
    writing them out lets every thin product run in the layout BLAS is fastest
    at and accumulates the big product into the thin one's result in place
    (addmm_) instead of adding two (N, out) or (N, in) tensors. Measured at
    in = out = 4096, r = 8: 1.02-1.04x a frozen nn.Linear's training step,
    against 1.05-1.07x with autograd (README, Benchmarks).

    Everything else autograd offers still works, because backward is made of
    differentiable torch ops: double backward (gradient penalties), torch.func
    (grad, jacrev, vmap for per-sample gradients: generate_vmap_rule runs these
    same ops on batched tensors) and forward mode (jvp, jacfwd). Under vmap, torch
    runs the in-place addmm_ one sample at a time (and warns): correct, and 1.4x
    slower there than out-of-place ops (per-sample gradients, batch 128), the price
    of the speed outside vmap. The one vmap that raises is over the frozen W alone:
    an in-place add cannot widen a tensor that vmap does not batch.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, x_lora, W, b, A, B, scale):
        x2 = x.reshape(-1, x.shape[-1])
        xl2 = x2 if x_lora is None else x_lora.reshape(-1, x.shape[-1])
        h = (xl2 @ A.T) * scale  # (N, r)
        y = h @ B.T if b is None else torch.addmm(b, h, B.T)  # the thin product first, then
        y.addmm_(x2, W.T)  # the frozen product added in place: no second (N, out) tensor
        return y.view(*x.shape[:-1], W.shape[0]), h  # h only for backward (not differentiable)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, x_lora, W, b, A, B, scale = inputs
        _, h = output
        ctx.mark_non_differentiable(h)
        ctx.save_for_backward(x, x_lora, W, A, B, h)
        ctx.save_for_forward(x, x_lora, W, A, B)
        ctx.scale = scale

    @staticmethod
    def backward(ctx, g, _):
        x, x_lora, W, A, B, h = ctx.saved_tensors
        need_x, need_xl, need_W, need_b, need_A, need_B, _ = ctx.needs_input_grad
        s = ctx.scale
        x2 = x.reshape(-1, x.shape[-1])
        xl2 = x2 if x_lora is None else x_lora.reshape(-1, x.shape[-1])
        if torch.is_grad_enabled():  # create_graph=True: h must be a function of A and x_l for the
            h = (xl2 @ A.T) * s  # second derivatives; the saved h is a constant
        g = g.reshape(-1, W.shape[0])
        gB = (g @ B) * s  # (N, r)
        dx = dxl = dW = db = dA = dB = None
        if x_lora is None and need_x:
            dx = (gB @ A).addmm_(g, W).view(x.shape)  # both paths into x, in one buffer
        else:
            dx = (g @ W).view(x.shape) if need_x else None
            dxl = (gB @ A).view(x.shape) if need_xl else None
        if need_W:
            dW = g.T @ x2  # the frozen path sees x itself, never the dropped-out x_l
        if need_b:
            db = g.sum(0)
        if need_A:
            dA = gB.T @ xl2
        if need_B:
            # (r, out) then transposed is ~3x faster than g^T h; contiguous like lora_B
            # itself (the gradient layout DDP and optimizers expect; the copy is tiny)
            dB = (h.T @ g).T.contiguous()
        return dx, dxl, dW, db, dA, dB, None

    @staticmethod
    def jvp(ctx, dx, dxl, dW, db, dA, dB, _):
        """Forward mode: dy = dx W^T + x dW^T + db + s (dx_l A^T + x_l dA^T) B^T + s (x_l A^T) dB^T."""
        x, x_lora, W, A, B = ctx.saved_tensors
        s = ctx.scale
        xl, dxl = (x, dx) if x_lora is None else (x_lora, dxl)
        zero = torch.zeros_like  # inputs without a tangent
        dx, dxl, dW, dA, dB = (zero(t) if d is None else d for t, d in ((x, dx), (xl, dxl), (W, dW), (A, dA), (B, dB)))
        dy = dx @ W.T + x @ dW.T + ((dxl @ A.T + xl @ dA.T) * s) @ B.T + ((xl @ A.T) * s) @ dB.T
        return (dy if db is None else dy + db), None


def _lora_linear(x, x_lora, W, b, A, B, scale):
    """y = x W^T + b + ((x_lora A^T) scale) B^T: the hand-written Function in eager mode.
    Under torch.compile the plain math instead: the compiler differentiates and fuses it
    itself, and it cannot trace a custom jvp (nor, in torch 2.4, this kind of Function)."""
    if torch.compiler.is_compiling():
        return F.linear(x, W, b) + lora_update(x if x_lora is None else x_lora, A, B, scale)
    return _LoRALinearFunction.apply(x, x_lora, W, b, A, B, scale)[0]
