"""Shared pytest setup and the helpers more than one test file uses.

- the hypothesis profile: deterministic, fast runs (the same examples every run);
- tolerances and drawn cases: TOL, EXACT, FLOAT_DTYPES, the `cases` strategy and `make`;
- small models: `mlp`, `Block` (fc -> tanh -> out), `two_blocks`, `Attention` (q_proj, qq_proj,
  v_proj, out_proj), `tied` (two linears, one weight), `Mixed` (an embedding, two convs and two
  linears), `cnn`, `randomize_B`, `randomize`, `lora_names`;
- one small model of each layer type with LoRA: `MODEL_KINDS` and `adapted(kind)`;
- the refusal oracle: `snapshot` / `assert_unchanged` (a refused call changes nothing);
- files: `write_peft_config`, `write_peft`, and `Payload`, a pickle that runs code when unpickled;
- tiny transformers models (built from configs, no downloads): `tiny_llama`, `lora_llama`,
  `tokens`, `randomize_adapter`, `train_language_model`.
Test files import them: `from conftest import ...`.
"""

import copy
import json
import os
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, settings, strategies as st

import lora_min as L

settings.register_profile(
    "default",
    derandomize=True,  # the same examples on every run: CI is deterministic
    deadline=None,  # the first call into torch can be slow; timing is not under test
    max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "100")),
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.load_profile("default")

# Two threads: the CI machine has two cores; more threads only add contention.
torch.set_num_threads(min(2, torch.get_num_threads()))

# Tolerances (torch.testing.assert_close, rtol / atol): float64 near-exact (only the
# summation order differs), float32 1e-4. Values are O(1) to O(10), dot products short.
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-4)}
EXACT = TOL[torch.float64]
FLOAT_DTYPES = [torch.float32, torch.float64]


# --- drawn cases: one LoRALinear with random W, A and nonzero B ------------------------------------------


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
        r=draw(st.integers(1, 8) | st.sampled_from([16, 24])),  # 16 and up: LoRALinear's plain backward layouts
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
    if nonzero_B:  # with B = 0 every equivalence would pass trivially
        with torch.no_grad():
            layer.lora_A.copy_(randn(case.r, case.in_f))
            layer.lora_B.copy_(randn(case.out_f, case.r) + 0.5)
    return linear, layer, randn(*case.batch, case.in_f)


# --- small models -------------------------------------------------------------------------------------------


def mlp(dtype=torch.float32, seed=0):
    """Linears named "0", "2.0" and "3" (6 -> 8 -> 5 -> 3)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 5), nn.Tanh()), nn.Linear(5, 3)).to(dtype)


class Block(nn.Module):
    """Two linears, fc and out, both called by forward."""

    def __init__(self, d=4):
        super().__init__()
        self.fc, self.out = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        return self.out(torch.tanh(self.fc(x)))


class Attention(nn.Module):
    """Projections whose names test the target rule: "q_proj" is not "qq_proj", "proj" names none."""

    def __init__(self, out_cls=nn.Linear):
        super().__init__()
        self.q_proj, self.qq_proj, self.v_proj, self.out_proj = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4), out_cls(4, 4)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.out_proj(self.act(self.q_proj(x) + self.qq_proj(x) + self.v_proj(x)))


def two_blocks():
    """Sequential(Block(), Block()): linears "0.fc", "0.out", "1.fc", "1.out" (4 -> 4)."""
    return nn.Sequential(Block(), Block())


def lora_two_blocks(**kwargs):
    """two_blocks() with rank-2 LoRA (random B) on every linear."""
    return randomize_B(L.add_lora(two_blocks(), r=2, **kwargs))


def tied():
    """Sequential(Linear, Tanh, Linear) whose two linears share one weight Parameter, with LoRA
    (random B) on "2" only, in eval mode."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    model[2].weight = model[0].weight
    return randomize_B(L.add_lora(model, r=2, target_modules=["2"])).eval()


def lora_names(model):
    """The names of the model's LoRA layers, in module order."""
    return [n for n, _ in L.lora_layers(model)]


def randomize_B(model, seed=1):
    """Nonzero lora_B in every LoRA layer, so that the adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in L.lora_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g, dtype=layer.lora_B.dtype))
    return model


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


class Tables(nn.Module):
    """Token and position embeddings (as GPT-2's wte and wpe) -> Linear head."""

    def __init__(self):
        super().__init__()
        self.tok, self.pos = nn.Embedding(20, 6, padding_idx=0), nn.Embedding(7, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, idx):
        return self.head(self.tok(idx) + self.pos(torch.arange(idx.shape[-1], device=idx.device)))


def tables(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return Tables().to(dtype)


def cnn(dtype=torch.float64, seed=0):
    """Conv2d "0" (3 -> 8, padding 1) -> ReLU -> Conv2d "2" (8 -> 8, stride 2) -> ReLU -> Flatten -> Linear "5"."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 3 * 3, 5)).to(dtype).eval()


def ids(seed=1, batch=2, length=7, vocab=20):
    """Token indices for Mixed and Tables; the first is the embedding's padding_idx 0."""
    out = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))
    out[0, 0] = 0
    return out


def images(seed=1, dtype=torch.float64):
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def randomize(model, seed=1, scale=1.0):
    """Random A and B in every LoRA layer (A's pad columns kept zero, as the layer keeps them)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in L.lora_layers(model):
            for p in (layer.lora_A, layer.lora_B):
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
            if isinstance(layer, L.LoRAEmbedding) and layer.padding_idx is not None:
                layer.lora_A[:, layer.padding_idx] = 0
    return model


def expected_lora_shapes(module, r):
    """The shapes of A and B for a plain module, from its own attributes: linear (r, in), (out, r);
    embedding (r, num_embeddings), (embedding_dim, r); conv (r, in_channels, *kernel_size), (out_channels, r)."""
    if isinstance(module, nn.Embedding):
        return (r, module.num_embeddings), (module.embedding_dim, r)
    if isinstance(module, nn.Linear):
        return (r, module.in_features), (module.out_features, r)
    return (r, module.in_channels, *module.kernel_size), (module.out_channels, r)


def lora_mixed(dtype=torch.float64, **kwargs):
    """(the frozen base model, a copy with LoRA on MIXED_TARGETS and random A, B). Frozen as LoRA
    freezes it: torch's F.linear may take another kernel (other rounding) for a weight that requires grad."""
    base = mixed(dtype).requires_grad_(False)
    return base, randomize(L.add_lora(copy.deepcopy(base), r=3, alpha=5, target_modules=MIXED_TARGETS, **kwargs))


# --- one small float64 model of each layer type, with LoRA ------------------------------------------------

# kind: (the architecture (dtype, seed) -> model, add_lora's settings, the input)
MODEL_KINDS = {
    "linear": (mlp, dict(r=2, alpha=3.0, target_modules=["2.0", "3"]),
               lambda: torch.randn(4, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)),
    "embedding": (tables, dict(r=3, alpha=5, target_modules=["tok", "pos"]), ids),
    "conv": (cnn, dict(r=3, alpha=6, target_modules=["0", "2"]), images),
    "all three": (mixed, dict(r=3, alpha=5, target_modules=MIXED_TARGETS), ids),
}


@dataclass
class Adapted:
    """A small model of one kind: `base` (frozen, eval mode), `model` (a copy with LoRA on two or more
    layers of that kind, random A and B), an input `x`, and how to make them again."""
    kind: str
    base: nn.Module
    model: nn.Module
    x: torch.Tensor
    settings: dict  # add_lora's arguments

    def architecture(self, seed=0):
        """The base model's architecture with other random weights (seed 0: the base's own)."""
        return MODEL_KINDS[self.kind][0](torch.float64, seed).eval()

    def fresh(self):
        """The base with a new (B = 0) adapter of the same settings: what an adapter file loads into."""
        return L.add_lora(copy.deepcopy(self.base), **self.settings)


def adapted(kind, device=None):
    """Adapted(kind); on `device` ("meta": no memory, the input stays on the CPU)."""
    architecture, settings, x = MODEL_KINDS[kind]
    with torch.device(device or "cpu"):
        base = architecture(torch.float64, 0).eval().requires_grad_(False)  # frozen: see lora_mixed
        model = randomize(L.add_lora(copy.deepcopy(base), **settings))
    return Adapted(kind, base, model, x(), settings)


# --- the refusal oracle: a snapshot of everything a call could change ---------------------------------


def randomize_peft(peft_model, seed=3, scale=0.1):
    """Random values for every LoRA tensor of a PEFT model (its init has A or B at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return peft_model


def snapshot(model):
    """Everything about a model that a refused call must leave as it was: each module (identity,
    type, mode, hooks, and a LoRA layer's enabled / merged state) and each parameter (identity,
    requires_grad, value)."""
    modules = {n: (id(m), type(m), m.training, len(m._forward_hooks), len(m._forward_pre_hooks),
                   getattr(m, "enabled", None), getattr(m, "merged", None))
               for n, m in model.named_modules(remove_duplicate=False)}
    params = {n: (id(p), p.requires_grad, p.detach().clone()) for n, p in model.named_parameters(remove_duplicate=False)}
    return modules, params


def assert_unchanged(model, before):
    modules, params = snapshot(model)
    assert modules == before[0]
    assert params.keys() == before[1].keys()
    for name, (pid, requires_grad, value) in params.items():
        assert (pid, requires_grad) == before[1][name][:2], name
        assert torch.equal(value, before[1][name][2]), name


# --- files --------------------------------------------------------------------------------------------------


def write_peft_config(folder, **fields):
    """folder/adapter_config.json: a minimal valid PEFT LoRA config (r = lora_alpha = 2, target "0"), with `fields` on top."""
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["0"], "bias": "none", **fields}
    (folder / "adapter_config.json").write_text(json.dumps(config))


def write_peft(folder, model_names, shapes=None, **fields):
    """A PEFT adapter folder for linears of size 4: config fields and rank-2 A, B tensors (shapes: others)."""
    r = 2
    write_peft_config(folder, **{"target_modules": model_names, **fields})
    tensors = {}
    for name in model_names:
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(r, 4)
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(4, r)
    torch.save({**tensors, **(shapes or {})}, folder / "adapter_model.bin")


class Payload:
    """Unpickling this runs code: the canary file appears."""

    def __init__(self, canary):
        self.canary = canary

    def __reduce__(self):
        return (open, (self.canary, "w"))


# --- tiny transformers models (test_real_models.py, test_peft.py) -------------------------------------------


def tiny_llama(tie=False, seed=0):
    """A 2-layer float64 Llama (hidden 32, vocabulary 97) in eval mode."""
    # Imported here, not above: transformers takes seconds to import, and only the files that
    # build these models need it (they skip themselves without it).
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=97, max_position_embeddings=64,
                                      tie_word_embeddings=tie, attn_implementation="eager")
    return transformers.LlamaForCausalLM(config).to(torch.float64).eval()


def tokens(seed=1, batch=2, length=7):
    return torch.randint(0, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


def randomize_adapter(model, seed=2):
    """Nonzero B (and a fresh A), so that equal outputs are not equal by accident."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in L.lora_layers(model):
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g, dtype=layer.lora_A.dtype))
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g, dtype=layer.lora_B.dtype) * 0.1)
    return model


def lora_llama(seed=2):
    """(base Llama, a copy with a random rank-4 adapter, alpha 8, on q_proj and v_proj)."""
    base = tiny_llama()
    model = L.add_lora(copy.deepcopy(base), r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    return base, randomize_adapter(model, seed)


def train_language_model(model, first_seed, steps=3):
    """A few AdamW steps of next-token prediction on random tokens, on what requires grad."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps):
        ids = tokens(seed=first_seed + step)
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


# --- modules_to_save (test_model.py, test_peft.py) ------------------------------------------------


class WithNorm(nn.Module):
    """Linear -> BatchNorm1d -> Linear head "head": BatchNorm's running statistics move in train mode."""

    def __init__(self):
        super().__init__()
        self.body, self.norm, self.head = nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.norm(self.body(x)))


def trained_with_saved_modules(seed=0):
    torch.manual_seed(seed)
    base = WithNorm().double()
    model = L.add_lora(copy.deepcopy(base), r=2, modules_to_save=["norm", "head"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        optimizer.zero_grad()
        model(torch.randn(16, 6, dtype=torch.float64)).pow(2).mean().backward()
        optimizer.step()
    return base, model.eval()
