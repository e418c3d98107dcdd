"""LoRA layer implementations side by side: training step, saved-for-backward memory, inference.

    python benchmarks/bench_lora.py                       # in = out = 4096, r in {1, 8, 64}, 512 tokens
    python benchmarks/bench_lora.py --dim 256 --tokens 64 --ranks 4 --reps 3   # a smoke run
    python benchmarks/bench_lora.py --layers embedding,conv    # only the nn.Embedding and nn.Conv2d tables
    python benchmarks/bench_lora.py --layers experts           # one MoE experts layer (transformers 5)

Every implementation is measured in the same process on the same tensors, and the
measurements are interleaved (one step of each in turn, in a new random order every
round), so a noisy machine slows all of them alike: compare the ratios, not the
milliseconds. Ratios are to a frozen nn.Linear: forward plus backward to the input,
which any adapter in a deep network must pay anyway (the floor).

Implementations: lora_min.LoRALinear (its backward written out by hand) and the lesson's
forward alone under autograd (use_fast_path = False); the classic parametrize LoRA (W + (B @ A) *
scale registered on `weight`); PEFT's and loralib's LoRA Linear when installed
(pip install -r benchmarks/requirements.txt); full fine-tuning of nn.Linear.

The linear tables are followed (--layers, default linear,embedding,conv) by one for
an `embedding` (a 32000 x 4096 nn.Embedding looking up --tokens indices) and one for
a `conv` (a 3x3 nn.Conv2d, 256 -> 256 channels, batch 8 of 28 x 28), r = 8, each
with the same four contenders: the frozen layer (the floor: a frozen
embedding has no backward at all, so its floor is the lookup alone; the frozen
conv's includes the gradient to its input), lora_min's LoRAEmbedding / LoRAConv,
PEFT's lora.Embedding / lora.Conv2d, and parametrize LoRA (the table or kernel
W + ΔW formed on every call). All adapters start from the same nonzero A and B
(PEFT's own init has A = 0 for embeddings), so all do the same work.

`qlora` (QLoRA: --dim x --dim, r = 8) trains LoRA on a frozen 4-bit base: bitsandbytes'
Linear4bit (nf4, double quantization, compute in the run's dtype), lora_min's QLoRALinear
against PEFT's bnb Linear4bit on the same quantized layer (outputs checked to agree), with the
frozen 4-bit layer as the floor, and the float layer and its LoRALinear in the same interleaved
table for the price of 4 bits; then the bytes of the layer in 4 bits against the float one.

`--layers experts` (opt in: it needs transformers 5, and takes a few minutes on 2 CPU
cores) measures one MoE experts layer: transformers' MixtralExperts (64 and 128 experts,
gate_up_proj (E, 2I, H), down_proj (E, H, I), H = 512, I = 256) on 1024 tokens routed
top-4 (random router logits, softmax, top-k, renormalised; fixed seed), r = 8, with LoRA
on both stacked Parameters (target_parameters). Contenders: the frozen layer (the floor),
lora_min's LoRAParameter factored (experts_forward: ΔW never formed) and general
(factored = False: W + ΔW in W's place each forward), and PEFT's ParamWrapper; each run
under transformers' default experts implementation here (grouped_mm) and under eager,
each implementation in its own interleaved table against its own frozen layer. Before
timing, the adapters' outputs are checked to agree (PEFT's A and B are the same values,
in its (r E, in) and (out, r E) layout). CPU grouped_mm has no float64 kernel. Each table also
counts the aten ops of one step (a TorchDispatchMode; on CUDA also the kernels, by torch.profiler):
what a GPU launches. `--summary` ends any run with every row in one table; benchmarks/gpu.sh is
the GPU run.
"""

import argparse
import collections
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.utils.parametrize as parametrize

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import lora_min  # noqa: E402


# --- implementations: each returns (module, its trainable parameters) -------------------


class ParametrizeLoRA(nn.Module):
    """The classic way: `weight` becomes W + (B @ A) * scale, formed on every call."""

    def __init__(self, out_f, in_f, r, alpha, device, dtype):
        super().__init__()
        self.lora_A = nn.Parameter(torch.randn(r, in_f, device=device, dtype=dtype) / in_f**0.5)
        self.lora_B = nn.Parameter(torch.zeros(out_f, r, device=device, dtype=dtype))
        self.scale = alpha / r

    def forward(self, W):
        return W + (self.lora_B @ self.lora_A) * self.scale


class ParametrizeEmbeddingLoRA(ParametrizeLoRA):
    """An embedding table (num, dim) is W^T of the one-hot linear map: table + (B @ A)^T * scale."""

    def forward(self, W):
        return W + (self.lora_B @ self.lora_A).T * self.scale


class ParametrizeConvLoRA(ParametrizeLoRA):
    """A kernel (out, in, *k) is the linear map of flattened patches: W + (B @ A).view(W.shape) * scale."""

    def forward(self, W):
        return W + (self.lora_B @ self.lora_A).view(W.shape) * self.scale


def base_linear(d, device, dtype, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(d, d, device=device, dtype=dtype)


def make_frozen(d, r, device, dtype):
    layer = base_linear(d, device, dtype).requires_grad_(False)
    return layer, []


def make_full(d, r, device, dtype):
    layer = base_linear(d, device, dtype)
    return layer, list(layer.parameters())


def make_lora_min(d, r, device, dtype):
    layer = lora_min.LoRALinear(base_linear(d, device, dtype), r=r, alpha=2 * r)
    return layer, [layer.lora_A, layer.lora_B]


def make_lora_min_lesson(d, r, device, dtype):
    """The lesson's forward alone under autograd: what the hand-written backward is measured against."""
    layer, params = make_lora_min(d, r, device, dtype)
    layer.use_fast_path = False
    return layer, params


def make_parametrize(d, r, device, dtype):
    layer = base_linear(d, device, dtype).requires_grad_(False)
    lora = ParametrizeLoRA(d, d, r, 2 * r, device, dtype)
    parametrize.register_parametrization(layer, "weight", lora)
    return layer, [lora.lora_A, lora.lora_B]


def make_peft(d, r, device, dtype):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(nn.Sequential(base_linear(d, device, dtype)), LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"]))
    layer = model.base_model.model[0].to(device=device, dtype=dtype)  # peft's lora.Linear
    return layer, [p for p in layer.parameters() if p.requires_grad]


def make_loralib(d, r, device, dtype):
    import loralib

    torch.manual_seed(0)
    layer = loralib.Linear(d, d, r=r, lora_alpha=2 * r, merge_weights=False).to(device=device, dtype=dtype)
    loralib.mark_only_lora_as_trainable(layer)
    return layer, [p for p in layer.parameters() if p.requires_grad]


IMPLEMENTATIONS = {
    "frozen nn.Linear (floor)": make_frozen,
    "lora_min.LoRALinear": make_lora_min,
    "lora_min, the lesson's autograd": make_lora_min_lesson,
    "parametrize LoRA": make_parametrize,
    "PEFT lora.Linear": make_peft,
    "loralib.Linear": make_loralib,
    "full fine-tuning": make_full,
}


# --- QLoRA: a frozen 4-bit nn.Linear (bitsandbytes), the same for every contender ---------------------


def base_4bit(d, device, dtype):
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(d, d, quant_type="nf4", compress_statistics=True, compute_dtype=dtype)
    layer.load_state_dict(base_linear(d, "cpu", torch.float32).state_dict())
    return layer.to(device)  # bitsandbytes quantizes here


def make_frozen_4bit(d, r, device, dtype):
    return base_4bit(d, device, dtype), []


def make_qlora_min(d, r, device, dtype):
    layer = lora_min.QLoRALinear(base_4bit(d, device, dtype), r=r, alpha=2 * r)  # float32 A, B (as PEFT's)
    return layer, [layer.lora_A, layer.lora_B]


def make_qlora_peft(d, r, device, dtype):
    from peft import LoraConfig, get_peft_model

    base = nn.Sequential(base_4bit(d, device, dtype))
    base.is_loaded_in_4bit = True  # as transformers marks a 4-bit model: PEFT then uses its bnb layer
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"]))
    layer = model.base_model.model[0].to(device)  # peft's bnb Linear4bit
    return layer, [p for p in layer.parameters() if p.requires_grad]


QLORA_FLOOR = "frozen Linear4bit nf4 (floor)"
QLORA_IMPLEMENTATIONS = {
    QLORA_FLOOR: make_frozen_4bit,
    "lora_min.QLoRALinear": make_qlora_min,
    "PEFT bnb Linear4bit": make_qlora_peft,
    "frozen nn.Linear (float)": make_frozen,
    "lora_min.LoRALinear (float)": make_lora_min,
}


def state_bytes(module):
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def bench_qlora(impls, d, r, tokens, device, dtype, warmup, reps):
    """The QLoRA training-step table (after checking both adapters compute the same), and the layer's bytes."""
    layers = build(impls, d, r, device, dtype)
    x = torch.randn(tokens, d, device=device, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(tokens, d, device=device, dtype=dtype)
    quantized = {n: layer for n, layer in layers.items() if "float" not in n}
    check = check_same_output(quantized, QLORA_FLOOR, x) if len(quantized) > 2 else "(PEFT not installed)"
    table = bench_layers(layers, QLORA_FLOOR, x, grad_out, device, warmup, reps, beyond=True)[0]
    plain, four_bit = state_bytes(base_linear(d, device, dtype)), state_bytes(layers[QLORA_FLOOR])
    adapter = state_bytes(layers["lora_min.QLoRALinear"]) - four_bit
    float32 = state_bytes(base_linear(d, "cpu", torch.float32))
    mib = lambda b: f"{b / 2**20:.2f} MiB"  # noqa: E731
    sizes = (f"layer bytes: float32 {mib(float32)}, {dtype} {mib(plain)}; nf4 {mib(four_bit)} "
             f"({four_bit / float32:.3f} x float32); the adapter {adapter / 2**20:.3f} MiB")
    return check, table, sizes


# --- embeddings and convolutions: makers take (size, r, device, dtype) and return (module, [A, B]) --------
# size: (num_embeddings, embedding_dim) or (channels, kernel_size). A and B come back in that order,
# whatever the implementation calls them, so that same_init gives every contender the same values.


def base_embedding(size, device, dtype, seed=0):
    torch.manual_seed(seed)
    return nn.Embedding(*size, device=device, dtype=dtype)


def base_conv(size, device, dtype, seed=0):
    channels, k = size
    torch.manual_seed(seed)
    return nn.Conv2d(channels, channels, k, padding=k // 2, device=device, dtype=dtype)


def frozen_maker(base):
    def make(size, r, device, dtype):
        return base(size, device, dtype).requires_grad_(False), []
    return make


def lora_min_maker(lora_class, base):
    def make(size, r, device, dtype):
        layer = lora_class(base(size, device, dtype), r=r, alpha=2 * r)
        return layer, [layer.lora_A, layer.lora_B]
    return make


def parametrize_maker(parametrization, base):
    """parametrization(size, r) -> a ParametrizeLoRA whose A and B fit the base's weight."""
    def make(size, r, device, dtype):
        layer = base(size, device, dtype).requires_grad_(False)
        lora = parametrization(size, r, device, dtype)
        parametrize.register_parametrization(layer, "weight", lora)
        return layer, [lora.lora_A, lora.lora_B]
    return make


def peft_maker(base, tensors):
    """tensors(peft_layer) -> [A, B] as the peft layer holds them."""
    def make(size, r, device, dtype):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(nn.Sequential(base(size, device, dtype)), LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"]))
        layer = model.base_model.model[0].to(device=device, dtype=dtype)
        return layer, tensors(layer)
    return make


EMBEDDING_IMPLEMENTATIONS = {
    "frozen nn.Embedding (floor)": frozen_maker(base_embedding),
    "lora_min.LoRAEmbedding": lora_min_maker(lora_min.LoRAEmbedding, base_embedding),
    "PEFT lora.Embedding": peft_maker(base_embedding,
                                      lambda layer: [layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]]),
    "parametrize LoRA": parametrize_maker(  # A (r, num), B (dim, r)
        lambda size, r, device, dtype: ParametrizeEmbeddingLoRA(size[1], size[0], r, 2 * r, device, dtype), base_embedding),
}

CONV_IMPLEMENTATIONS = {
    "frozen nn.Conv2d (floor)": frozen_maker(base_conv),
    "lora_min.LoRAConv": lora_min_maker(lora_min.LoRAConv, base_conv),
    "PEFT lora.Conv2d": peft_maker(base_conv,  # (r, in, k, k), (out, r, 1, 1)
                                   lambda layer: [layer.lora_A["default"].weight, layer.lora_B["default"].weight]),
    "parametrize LoRA": parametrize_maker(  # A (r, in k k), B (out, r)
        lambda size, r, device, dtype: ParametrizeConvLoRA(size[0], size[0] * size[1] ** 2, r, 2 * r, device, dtype),
        base_conv),
}


# --- MoE experts: transformers 5's MixtralExperts, LoRA on its stacked (E, out, in) Parameters ---------
# spec: an ExpertsSpec. The makers take (spec, r, device, dtype) and return (module, tensors): the module
# takes x alone (Routed), tensors are [A, B] of gate_up_proj, then of down_proj, each in lora_min's layout
# (A (E, r, in), B (E, out, r); PEFT's as views), so that same_init gives every contender the same values.

ExpertsSpec = collections.namedtuple("ExpertsSpec", "hidden intermediate num_experts top_k implementation")
EXPERTS_TARGETS = ["gate_up_proj", "down_proj"]  # the module's own order: down_proj is the outer wrapper


class Routed(nn.Module):
    """An experts layer with its routing fixed, called with x alone: experts(x, top_k_index, top_k_weights).
    So train_step, saved_bytes and bench_layers measure it as any layer; add_lora and PEFT adapt its
    `.experts`, and the outer wrapper is what runs."""

    def __init__(self, experts):
        super().__init__()
        self.experts, self.top_k_index, self.top_k_weights = experts, None, None

    def forward(self, x):
        return self.experts(x, self.top_k_index, self.top_k_weights)


def default_experts_implementation():
    """What transformers picks for a Mixtral model on this machine (a lone experts layer's config holds None,
    which runs the eager loop): the default of get_correct_experts_implementation, read off a tiny model."""
    from transformers import MixtralConfig, MixtralModel

    tiny = MixtralConfig(hidden_size=8, intermediate_size=4, num_local_experts=2, num_experts_per_tok=1,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=4, vocab_size=8)
    return MixtralModel(tiny).config._experts_implementation


def base_experts(spec, device, dtype, seed=0):
    """Routed(MixtralExperts) running spec.implementation, its weights N(0, 1 / in) (the class leaves them empty)."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    config = MixtralConfig(hidden_size=spec.hidden, intermediate_size=spec.intermediate,
                           num_local_experts=spec.num_experts, num_experts_per_tok=spec.top_k)
    config._experts_implementation = spec.implementation
    torch.manual_seed(seed)
    experts = MixtralExperts(config)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, p.shape[-1] ** -0.5)
    return Routed(experts.to(device=device, dtype=dtype))


def frozen_experts(spec, r, device, dtype):
    return base_experts(spec, device, dtype).requires_grad_(False), []


def lora_min_experts(factored):
    """factored=False: every LoRAParameter forms W + ΔW per forward (as PEFT) instead of running factored."""
    def make(spec, r, device, dtype):
        routed = lora_min.add_lora(base_experts(spec, device, dtype), r=r, alpha=r, target_modules=[],
                                   target_parameters=EXPERTS_TARGETS)
        layers = {layer.parameter_name: layer for _, layer in lora_min.lora_layers(routed)}
        for layer in layers.values():
            layer.factored = factored
        return routed, [t for name in EXPERTS_TARGETS for t in (layers[name].lora_A, layers[name].lora_B)]
    return make


def peft_factors(wrapper, num_experts, tensor=lambda linear: linear.weight):
    """A PEFT ParamWrapper's lora_A (r E, in) and lora_B (out, r E) (or their .grad, by `tensor`) as views
    in lora_min's layout: A_e = a.view(E, r, in)[e], B_e = b.view(out, r, E).permute(2, 0, 1)[e]."""
    a, b = tensor(wrapper.lora_A["default"]), tensor(wrapper.lora_B["default"])
    return [a.view(num_experts, -1, a.shape[-1]), b.view(b.shape[0], -1, num_experts).permute(2, 0, 1)]


def peft_wrappers(module):
    """{parameter name: PEFT ParamWrapper} inside module."""
    return {m.parameter_name: m for m in module.modules() if type(m).__name__ == "ParamWrapper"}


def peft_experts(spec, r, device, dtype):
    from peft import LoraConfig, get_peft_model

    routed = base_experts(spec, device, dtype)
    get_peft_model(routed, LoraConfig(r=r, lora_alpha=r, target_modules=[], target_parameters=EXPERTS_TARGETS))
    wrappers = peft_wrappers(routed)  # adapted in place: routed.experts is now the outer ParamWrapper
    return routed, [t for name in EXPERTS_TARGETS for t in peft_factors(wrappers[name], spec.num_experts)]


EXPERTS_FLOOR = "frozen MixtralExperts (floor)"
EXPERTS_IMPLEMENTATIONS = {
    EXPERTS_FLOOR: frozen_experts,
    "lora_min factored": lora_min_experts(factored=True),
    "lora_min general (W + ΔW)": lora_min_experts(factored=False),
    "PEFT target_parameters": peft_experts,
}


def experts_inputs(spec, tokens, device, dtype, seed=2):
    """x (tokens, hidden) that needs its gradient, Mixtral's routing of it from random router logits
    (softmax, top-k, renormalised), and a gradient for the (tokens, hidden) output."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, spec.hidden, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    probs = torch.randn(tokens, spec.num_experts, generator=gen).softmax(-1)
    weights, index = probs.topk(spec.top_k, dim=-1)
    weights = (weights / weights.sum(-1, keepdim=True)).to(device=device, dtype=dtype)
    return x, index.to(device), weights, torch.randn(tokens, spec.hidden, generator=gen).to(device=device, dtype=dtype)


def route(layers, index, weights):
    for layer in layers.values():
        layer.top_k_index, layer.top_k_weights = index, weights


def check_same_output(layers, floor, x, rtol=1e-4, atol=1e-5):
    """Raise unless every adapter's output matches the first adapter's (allclose) and differs from the floor's;
    return a line saying by how much."""
    with torch.no_grad():
        ys = {n: layer(x) for n, layer in layers.items()}
    (first, y0), *others = [(n, y) for n, y in ys.items() if n != floor]
    diffs = {n: (y - y0).abs().max().item() for n, y in others}
    for n, y in others:
        if not torch.allclose(y, y0, rtol=rtol, atol=atol):
            raise AssertionError(f"{n} computes another output than {first}: max |diff| {diffs[n]:.3g}")
    update = (ys[floor] - y0).abs().max().item()
    if update <= atol:
        raise AssertionError(f"the LoRA update is zero: {first} computes the floor's output")
    return (f"outputs agree: {', '.join(diffs)} match {first} (allclose, max |diff| {max(diffs.values()):.2g}); "
            f"the frozen layer's differs by up to {update:.2g} (the update is real)")


def available(names, table=IMPLEMENTATIONS, probe=8):
    """The implementations of `table` whose packages are installed, and a note for each skipped one.
    probe: a tiny size to build each at (an int for linear, a pair for embeddings and convs)."""
    out, notes = {}, []
    for name in names:
        try:
            table[name](probe, 2, "cpu", torch.float32)
            out[name] = table[name]
        except ImportError as e:
            notes.append(f"{name}: skipped ({e.name} not installed; pip install -r benchmarks/requirements.txt)")
    return out, notes


# --- measurements ------------------------------------------------------------------------------------


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def randomize(params):
    """Random values for the trainable tensors, so no product is trivially zero."""
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.01)


def same_init(params, seed=1, std=0.01):
    """The same random values, in order, for every contender's [A, B], whatever their shapes
    (PEFT's conv B is (out, r, 1, 1), ours (out, r)): the i-th element of each gets the same number."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_((torch.randn(p.numel(), generator=gen, dtype=torch.float64) * std).view(p.shape))


def train_step(layer, x, grad_out):
    """Forward and backward of the scalar loss sum(y * grad_out) (without the cost of forming it).
    A frozen layer on an input that needs no gradient (an embedding's indices) has no backward."""
    y = layer(x)
    if y.requires_grad:
        y.backward(grad_out)
    x.grad = None
    for p in layer.parameters():
        p.grad = None


def saved_bytes(layer, x):
    """Bytes that autograd saves for backward in one forward, beyond tensors that exist anyway
    (parameters and the input), and the largest such tensor's shape."""
    existing = {p.untyped_storage().data_ptr() for p in layer.parameters()} | {x.untyped_storage().data_ptr()}
    seen, total, largest = set(), 0, (0, ())

    def pack(t):
        nonlocal total, largest
        ptr = t.untyped_storage().data_ptr()
        if ptr not in existing and ptr not in seen:
            seen.add(ptr)
            nbytes = t.untyped_storage().nbytes()
            total += nbytes
            largest = max(largest, (nbytes, tuple(t.shape)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    del y
    return total, largest[1]


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def interleaved(fns, device, warmup, reps, reference):
    """Time each fn one call at a time in turn, in a new (seeded) random order every round: a rotated order
    would put each fn always right after the same one (the floor after full fine-tuning's 64 MiB gradient).

    Returns {name: (median seconds, median over rounds of its time / reference's
    time in the same round)}: pairing within a round cancels the slow drifts of a
    shared machine, which medians of raw times do not.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times = {name: [] for name in names}
    for rep in range(reps):
        order = random.Random(rep).sample(names, len(names))
        for name in order:
            times[name].append(timed(fns[name], device))
    return {name: (statistics.median(t), statistics.median(a / b for a, b in zip(t, times[reference])))
            for name, t in times.items()}


def peak_memory(fn, device):
    if device.type != "cuda":
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated() - base


def bench_setting(impls, d, r, tokens, device, dtype, warmup, reps, **options):
    layers = {}
    for name, make in impls.items():
        layer, params = make(d, r, device, dtype)
        randomize(params)
        layer.train()  # (loralib's train() returns None, so not chained)
        layers[name] = layer
    x = torch.randn(tokens, d, device=device, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(tokens, d, device=device, dtype=dtype)
    return bench_layers(layers, "frozen nn.Linear (floor)", x, grad_out, device, warmup, reps, **options)


def embedding_inputs(size, tokens, device, dtype):
    """`tokens` random indices into a (num, dim) table, and a gradient for the (tokens, dim) output."""
    num, dim = size
    torch.manual_seed(2)
    return torch.randint(num, (tokens,), device=device), torch.randn(tokens, dim, device=device, dtype=dtype)


def conv_inputs(size, batch, image_size, device, dtype):
    """A (batch, channels, image_size, image_size) input that needs its gradient, as inside a network,
    and a gradient for the output (the same shape: the padding keeps the size)."""
    channels, _ = size
    torch.manual_seed(2)
    shape = (batch, channels, image_size, image_size)
    return (torch.randn(shape, device=device, dtype=dtype, requires_grad=True),
            torch.randn(shape, device=device, dtype=dtype))


def build(impls, size, r, device, dtype):
    """{name: module in train mode}, every adapter's A and B set to the same nonzero values."""
    layers = {}
    for name, make in impls.items():
        layer, params = make(size, r, device, dtype)
        same_init(params)
        layer.train()
        layers[name] = layer
    return layers


def bench_layers(layers, floor, x, grad_out, device, warmup, reps, beyond=False, counts=False, title=""):
    """The training-step table for built layers that all take x: time, ratio to `floor`, saved bytes
    (beyond=True: also the saved bytes minus the floor's; counts=True: aten ops per step, and CUDA kernels on CUDA).
    Returns (table, {name: x floor}, {name: saved bytes}, {name: (ops, kernels)}); each row also goes to SUMMARY."""
    steps = {n: (lambda layer=layer: train_step(layer, x, grad_out)) for n, layer in layers.items()}
    step = interleaved(steps, device, warmup, reps, reference=floor)
    memory = {n: saved_bytes(layer, x) for n, layer in layers.items()}
    peaks = {n: peak_memory(lambda layer=layer: train_step(layer, x, grad_out), device) for n, layer in layers.items()}
    ops = {n: (op_count(fn), cuda_kernels(fn, device)) if counts else (None, None) for n, fn in steps.items()}
    ops_cuda = device.type == "cuda"

    fmt_mib = lambda b: f"{b / 2**20:.2f}"  # noqa: E731
    header = "| implementation | train step (ms) | x floor | saved for backward (MiB) | largest saved tensor |"
    align = "| --- | ---: | ---: | ---: | --- |"
    if beyond:
        header, align = header + " beyond floor (MiB) |", align + " ---: |"
    if device.type == "cuda":
        header, align = header + " peak memory (MiB) |", align + " ---: |"
    for column in (["aten ops per step"] if counts else []) + (["CUDA kernels per step"] if counts and ops_cuda else []):
        header, align = header + f" {column} |", align + " ---: |"
    lines = [header, align]
    for n in layers:
        nbytes, largest = memory[n]
        row = f"| {n} | {1e3 * step[n][0]:.1f} | {step[n][1]:.3f} | {fmt_mib(nbytes)} | {largest or '-'} |"
        if beyond:
            row += f" {fmt_mib(nbytes - memory[floor][0])} |"
        if device.type == "cuda":
            row += f" {fmt_mib(peaks[n])} |"
        if counts:
            row += "".join(f" {c} |" for c in ops[n] if c is not None)
        lines.append(row)
        SUMMARY.append((title, n, 1e3 * step[n][0], step[n][1], nbytes - memory[floor][0], *ops[n]))
    return "\n".join(lines), {n: step[n][1] for n in layers}, memory, ops


SUMMARY = []  # (setting, implementation, ms, x floor, saved beyond floor (bytes), aten ops, CUDA kernels): --summary


def summary_table(rows):
    """Every training-step row of this run in one table (--summary)."""
    lines = ["| setting | implementation | train step (ms) | x floor | saved beyond floor (MiB) | aten ops per step "
             "| CUDA kernels per step |", "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for title, n, ms, ratio, beyond, ops, kernels in rows:
        lines.append(f"| {title} | {n} | {ms:.2f} | {ratio:.3f} | {beyond / 2**20:.2f} | "
                     f"{'-' if ops is None else ops} | {'-' if kernels is None else kernels} |")
    return "\n".join(lines)


def op_count(fn):
    """The aten ops one call of fn dispatches, counted by a TorchDispatchMode (on a GPU: about one kernel each)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))

    with Count() as counter:
        fn()
    return counter.n


def cuda_kernels(fn, device):
    """The CUDA kernels (memcpy and memset included) one call of fn launches, by torch.profiler; None off CUDA."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    fn()  # warm: lazy initialisation and cuBLAS workspaces launch only once
    sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        sync(device)
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def bench_inference(d, r, tokens, device, dtype, warmup, reps):
    """Eval forward: plain nn.Linear vs LoRALinear unmerged vs merged (ratios to plain)."""
    plain = base_linear(d, device, dtype).eval()
    unmerged = make_lora_min(d, r, device, dtype)[0].eval()
    merged = make_lora_min(d, r, device, dtype)[0].eval()
    randomize([merged.lora_B, unmerged.lora_B])
    merged.merge()
    x = torch.randn(tokens, d, device=device, dtype=dtype)

    def forward(layer):
        with torch.no_grad():
            layer(x)

    t = interleaved({"plain": lambda: forward(plain), "unmerged": lambda: forward(unmerged),
                     "merged": lambda: forward(merged)}, device, warmup, reps, reference="plain")
    return {k: ratio for k, (_, ratio) in t.items()}


def bench_compile(d, r, tokens, device, dtype, warmup, reps):
    """LoRALinear training step, eager vs torch.compile(fullgraph=True)."""
    eager = make_lora_min(d, r, device, dtype)[0]
    randomize([eager.lora_B])
    compiled = torch.compile(eager, fullgraph=True)
    x = torch.randn(tokens, d, device=device, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(tokens, d, device=device, dtype=dtype)
    start = time.perf_counter()
    train_step(compiled, x, grad_out)
    compile_s = time.perf_counter() - start
    t = interleaved({"eager": lambda: train_step(eager, x, grad_out), "compiled": lambda: train_step(compiled, x, grad_out)},
                    device, warmup, reps, reference="eager")
    return t["compiled"][1], compile_s


def profile_lora(d, r, tokens, device, dtype, steps=5):
    """Where LoRALinear's extra time goes: ops by self time per step, with input shapes."""
    layers = {"floor": make_frozen(d, r, device, dtype)[0], "lora_min": make_lora_min(d, r, device, dtype)[0]}
    randomize([layers["lora_min"].lora_B])
    x = torch.randn(tokens, d, device=device, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(tokens, d, device=device, dtype=dtype)
    return profile_layers(layers, x, grad_out, device, steps)


def profile_layers(layers, x, grad_out, device, steps=5, by_shape=True):
    """{name: layer} -> a table of the aten ops of one training step by self time (over 0.1 ms);
    by_shape=False: each op over all its input shapes (per-expert ops each have their own)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    lines = ["| layer | op | input shapes | ms per step |", "| --- | --- | --- | ---: |"]
    for name, layer in layers.items():
        train_step(layer, x, grad_out)
        with profile(activities=activities, record_shapes=True) as prof:
            for _ in range(steps):
                train_step(layer, x, grad_out)
            sync(device)
        events = sorted(prof.key_averages(group_by_input_shape=by_shape), key=lambda e: -e.self_cpu_time_total)
        for e in events:
            ms = e.self_cpu_time_total / steps / 1e3
            if ms >= 0.1 and e.key.startswith("aten::"):
                shapes = e.input_shapes if by_shape else f"all ({e.count // steps} calls)"
                lines.append(f"| {name} | {e.key} | {shapes} | {ms:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=4096, help="in = out features")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--tokens", type=int, default=None, help="rows of x (default 512 on CPU, 8192 on GPU)")
    p.add_argument("--dtypes", nargs="+", default=None, help="float32 bfloat16 ... (default float32, plus bfloat16 on GPU)")
    p.add_argument("--device", default="auto")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--compile", action="store_true", help="also time torch.compile(fullgraph=True) vs eager")
    p.add_argument("--summary", action="store_true",
                   help="count aten ops (and CUDA kernels) per step in every table, end with every row in one")
    p.add_argument("--profile", action="store_true",
                   help="also show where each lora_min layer's extra time goes (torch.profiler)")
    p.add_argument("--layers", type=layer_list, default=list(DEFAULT_LAYERS),
                   help=f"comma-separated, from {','.join(LAYERS)} (default {','.join(DEFAULT_LAYERS)})")
    e = p.add_argument_group("embedding (--layers ...embedding...; --tokens indices are looked up)")
    e.add_argument("--vocab", type=int, default=32000, help="num_embeddings")
    e.add_argument("--embed-dim", type=int, default=4096, help="embedding_dim")
    e.add_argument("--embedding-ranks", type=int, nargs="+", default=[8])
    c = p.add_argument_group("conv (--layers ...conv...): Conv2d, channels -> channels, padding keeps the size")
    c.add_argument("--channels", type=int, default=256)
    c.add_argument("--kernel-size", type=int, default=3)
    c.add_argument("--image-size", type=int, default=28)
    c.add_argument("--batch", type=int, default=8)
    c.add_argument("--conv-ranks", type=int, nargs="+", default=[8])
    p.add_argument("--qlora-ranks", type=int, nargs="+", default=[8], help="r of the qlora table (--layers qlora)")
    x = p.add_argument_group("experts (--layers ...experts...): transformers' MixtralExperts, top-k routed tokens")
    x.add_argument("--experts-hidden", type=int, default=512, help="hidden_size")
    x.add_argument("--experts-intermediate", type=int, default=256, help="intermediate_size")
    x.add_argument("--num-experts", type=int, nargs="+", default=[64, 128], help="num_local_experts (each a table)")
    x.add_argument("--experts-top-k", type=int, default=4, help="num_experts_per_tok")
    x.add_argument("--experts-tokens", type=int, default=1024)
    x.add_argument("--experts-ranks", type=int, nargs="+", default=[8])
    x.add_argument("--experts-implementations", nargs="+", default=None,
                   help="transformers experts implementations (default: transformers' default here, and eager)")
    args = p.parse_args(argv)
    SUMMARY.clear()  # (main may run more than once in a process: the tests call it)

    device = torch.device(("cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu")
                          if args.device == "auto" else args.device)
    tokens = args.tokens or (512 if device.type == "cpu" else 8192)
    dtypes = args.dtypes or (["float32"] + (["bfloat16"] if device.type != "cpu" else []))
    impls, notes = available(list(IMPLEMENTATIONS)) if "linear" in args.layers else ({}, [])
    emb_size, conv_size = (args.vocab, args.embed_dim), (args.channels, args.kernel_size)
    emb_impls, emb_notes = (available(list(EMBEDDING_IMPLEMENTATIONS), EMBEDDING_IMPLEMENTATIONS, (8, 4))
                            if "embedding" in args.layers else ({}, []))
    conv_impls, conv_notes = (available(list(CONV_IMPLEMENTATIONS), CONV_IMPLEMENTATIONS, (4, 3))
                              if "conv" in args.layers else ({}, []))
    qlora_impls, qlora_notes = (available(list(QLORA_IMPLEMENTATIONS), QLORA_IMPLEMENTATIONS, 64)
                                if "qlora" in args.layers else ({}, []))
    experts_impls, experts_notes = (available(list(EXPERTS_IMPLEMENTATIONS), EXPERTS_IMPLEMENTATIONS,
                                              ExpertsSpec(4, 2, 2, 1, "eager"))
                                    if "experts" in args.layers else ({}, []))
    hw = torch.cuda.get_device_name() if device.type == "cuda" else f"{device.type}, {torch.get_num_threads()} threads"
    shape = f"in = out = {args.dim}, {tokens} tokens, " if "linear" in args.layers else ""
    print(f"# LoRA layer benchmark: {shape}{hw}, torch {torch.__version__}")
    print(f"{args.reps} interleaved rounds after {args.warmup} warm-up rounds; time: median; "
          f"x floor: median of the per-round ratios\n")
    for note in notes + emb_notes + conv_notes + qlora_notes + experts_notes:
        print(f"- {note}")
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        for r in args.ranks if "linear" in args.layers else ():
            print(f"\n## training step, r = {r}, {dtype_name}\n")
            table = bench_setting(impls, args.dim, r, tokens, device, dtype, args.warmup, args.reps,
                                  counts=args.summary, title=f"linear {args.dim}, {tokens} tokens, r = {r}, {dtype_name}")[0]
            print(table)
            inf = bench_inference(args.dim, r, tokens, device, dtype, args.warmup, args.reps)
            print(f"\ninference (eval forward, x plain nn.Linear): unmerged {inf['unmerged']:.3f}, merged {inf['merged']:.3f}")
            if args.compile:
                ratio, compile_s = bench_compile(args.dim, r, tokens, device, dtype, args.warmup, args.reps)
                print(f"torch.compile(fullgraph=True) training step: {ratio:.3f} x eager (compiling took {compile_s:.1f} s)")
            if args.profile:
                print(f"\nprofile of one training step (ops over 0.1 ms):\n\n{profile_lora(args.dim, r, tokens, device, dtype)}")
        for r in args.embedding_ranks if emb_impls else ():
            print(f"\n## embedding training step: nn.Embedding({args.vocab}, {args.embed_dim}), {tokens} tokens, "
                  f"r = {r}, {dtype_name}\n")
            layers = build(emb_impls, emb_size, r, device, dtype)
            idx, grad_out = embedding_inputs(emb_size, tokens, device, dtype)
            print(bench_layers(layers, "frozen nn.Embedding (floor)", idx, grad_out, device, args.warmup, args.reps,
                               counts=args.summary, title=f"embedding {emb_size}, r = {r}, {dtype_name}")[0])
            if args.profile:
                print(f"\nprofile of one training step (ops over 0.1 ms):\n\n{profile_layers(unparametrized(layers), idx, grad_out, device)}")
            del layers
        for r in args.conv_ranks if conv_impls else ():
            k = args.kernel_size
            print(f"\n## conv training step: nn.Conv2d({args.channels}, {args.channels}, {k}x{k}, padding {k // 2}), "
                  f"batch {args.batch} x {args.image_size} x {args.image_size}, r = {r}, {dtype_name}\n")
            layers = build(conv_impls, conv_size, r, device, dtype)
            x, grad_out = conv_inputs(conv_size, args.batch, args.image_size, device, dtype)
            print(bench_layers(layers, "frozen nn.Conv2d (floor)", x, grad_out, device, args.warmup, args.reps,
                               counts=args.summary, title=f"conv {args.channels}, {k}x{k}, r = {r}, {dtype_name}")[0])
            if args.profile:
                print(f"\nprofile of one training step (ops over 0.1 ms):\n\n{profile_layers(unparametrized(layers), x, grad_out, device)}")
            del layers
        for r in args.qlora_ranks if QLORA_FLOOR in qlora_impls else ():
            print(f"\n## QLoRA training step: 4-bit nf4 base (bitsandbytes, double quantization), in = out = "
                  f"{args.dim}, {tokens} tokens, r = {r}, {dtype_name}\n")
            check, table, sizes = bench_qlora(qlora_impls, args.dim, r, tokens, device, dtype, args.warmup, args.reps)
            print(f"{check}\n\n{table}\n\n{sizes}")
        for r in args.experts_ranks if EXPERTS_FLOOR in experts_impls else ():
            bench_experts(experts_impls, args, r, device, dtype, dtype_name)
    if args.summary:
        print(f"\n## every row: {hw}, torch {torch.__version__} (x floor: each table's frozen layer)\n")
        print(summary_table(SUMMARY))


def experts_spec(args, implementation, num_experts):
    return ExpertsSpec(args.experts_hidden, args.experts_intermediate, num_experts, args.experts_top_k, implementation)


def bench_experts(impls, args, r, device, dtype, dtype_name):
    """One table per number of experts and experts implementation (the contenders interleaved against that
    frozen layer, after checking that all adapters compute the same output), aten ops (and CUDA kernels) per
    step counted; then all side by side."""
    default = default_experts_implementation()
    implementations = args.experts_implementations or list(dict.fromkeys([default, "eager"]))
    results = {}
    for num_experts in args.num_experts:
        for implementation in implementations:
            spec = experts_spec(args, implementation, num_experts)
            note = " (transformers' default here)" if implementation == default else ""
            title = f"{num_experts} experts, {implementation}{note}"
            print(f"\n## experts training step: MixtralExperts, {num_experts} experts, {spec.hidden} -> "
                  f"2x{spec.intermediate} -> {spec.hidden}, {args.experts_tokens} tokens, top-{spec.top_k}, r = {r}, "
                  f"{dtype_name}, {implementation}{note}\n")
            if dtype != torch.float32:  # the same values in float32: agreement to float32's tolerance, not bfloat16's
                checked = build(impls, spec, r, device, torch.float32)
                x, index, weights, _ = experts_inputs(spec, args.experts_tokens, device, torch.float32)
                route(checked, index, weights)
                print(check_same_output(checked, EXPERTS_FLOOR, x) + " (checked in float32)\n")
                del checked
            layers = build(impls, spec, r, device, dtype)
            x, index, weights, grad_out = experts_inputs(spec, args.experts_tokens, device, dtype)
            route(layers, index, weights)
            if dtype == torch.float32:
                print(check_same_output(layers, EXPERTS_FLOOR, x) + "\n")
            table, ratios, memory, ops = bench_layers(layers, EXPERTS_FLOOR, x, grad_out, device, args.warmup,
                                                      args.reps, beyond=True, counts=True, title=f"MoE {title}")
            print(table)
            if args.profile:
                print(f"\nprofile of one training step (ops over 0.1 ms):\n\n"
                      f"{profile_layers(layers, x, grad_out, device, steps=2, by_shape=False)}")
            results[num_experts, implementation] = {
                n: (ratios[n], nbytes - memory[EXPERTS_FLOOR][0], *ops[n]) for n, (nbytes, _) in memory.items()}
            del layers
    print(experts_side_by_side(results, r, dtype_name))


def experts_side_by_side(results, r, dtype_name):
    """{(experts, implementation): {contender: (x floor, bytes beyond floor, aten ops, CUDA kernels)}} -> one
    table, and the targets: factored <= 1.3 x floor and faster than PEFT, general no slower than PEFT."""
    cuda = any(row[3] is not None for rows in results.values() for row in rows.values())
    lines = [f"\n## experts side by side: r = {r}, {dtype_name} (x floor: that setting's frozen layer; beyond: saved "
             "for backward minus the frozen layer's; ops: aten ops per training step)\n",
             "| experts | implementation | contender | x floor | beyond floor (MiB) | aten ops |" +
             (" CUDA kernels |" if cuda else ""),
             "| ---: | --- | --- | ---: | ---: | ---: |" + (" ---: |" if cuda else "")]
    for (num_experts, implementation), rows in results.items():
        for n, (ratio, beyond, ops, kernels) in rows.items():
            lines.append(f"| {num_experts} | {implementation} | {n} | {ratio:.3f} | {beyond / 2**20:.2f} | {ops} |" +
                         (f" {kernels} |" if cuda else ""))
    factored, general, peft = "lora_min factored", "lora_min general (W + ΔW)", "PEFT target_parameters"
    lines.append("")
    for (num_experts, implementation), rows in results.items():
        if {factored, general, peft} <= set(rows):
            lines.append(f"{num_experts} experts, {implementation}: factored {rows[factored][0]:.3f} x floor "
                         f"(target <= 1.3), factored / PEFT train step {rows[factored][0] / rows[peft][0]:.3f} "
                         f"(target < 1), general / PEFT {rows[general][0] / rows[peft][0]:.3f} (target <= 1), "
                         f"factored / PEFT saved beyond floor {rows[factored][1] / max(rows[peft][1], 1):.3f}")
    return "\n".join(lines)


def unparametrized(layers):
    """The layers to profile: the floor, lora_min and PEFT (parametrize's cost is no mystery)."""
    return {n: layer for n, layer in layers.items() if not n.startswith("parametrize")}


LAYERS = ("linear", "embedding", "conv", "qlora", "experts")
DEFAULT_LAYERS = ("linear", "embedding", "conv", "qlora")  # experts: opt in (needs transformers; a few minutes on CPU)


def layer_list(text):
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in LAYERS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: choose from {','.join(LAYERS)}")
    return names


if __name__ == "__main__":
    main()
