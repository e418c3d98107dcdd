"""The specification of PEFT's adapter format (adapter_config.json + adapter_model.safetensors), both ways.

save_peft_adapter writes what peft.PeftModel.from_pretrained loads into the same model;
load_peft_adapter reads what PEFT's save_pretrained writes; the oracle is PEFT itself, on
a tiny Llama built from a config (float64: equal logits to 1e-10).

Every layer type (linear, embedding, conv) both ways: a Llama's projections, its embed_tokens,
and a small CNN's convolutions.

Sections: lora_min -> PEFT (outputs, keys and shapes, exact targets under PEFT's rule);
PEFT -> lora_min (outputs, rank / alpha patterns, target rules, modes, base weights PEFT
saves); round trips of small models; safetensors or .bin; what save_peft_adapter refuses;
PEFT features lora_min does not implement; files that are not (valid) PEFT adapters.
Per-field validation of the config, with the unchanged-model oracle: test_misuse.py.
"""

import copy
import json
import shutil
import sys

import pytest
import torch
import torch.nn as nn

import lora_min as L
from conftest import (EXACT, randomize_peft, trained_with_saved_modules, Payload, assert_unchanged, cnn, images, lora_llama, lora_names, lora_two_blocks, mlp,
                      randomize, randomize_adapter, randomize_B, snapshot, tiny_llama, tokens, train_language_model,
                      two_blocks, write_peft, write_peft_config)

peft = pytest.importorskip("peft")
safetensors_torch = pytest.importorskip("safetensors.torch")


def peft_from_pretrained(base, directory):
    return peft.PeftModel.from_pretrained(copy.deepcopy(base), str(directory)).eval()


def read_config(directory):
    return json.loads((directory / "adapter_config.json").read_text())


def read_safetensors(path):
    return safetensors_torch.load_file(str(path))


def output(model, x):
    """The logits of a language model, the output of any other."""
    y = model(x)
    return getattr(y, "logits", y)


KINDS = ["linear", "embedding", "conv"]
CNN_TARGETS = ["0", "2"]
# kind: (the base model, PEFT's r, lora_alpha and target_modules, the input, the scale of random A and B)
PEFT_KINDS = {
    "linear": (tiny_llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), tokens, 0.1),
    "embedding": (tiny_llama, dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj", "v_proj"]), tokens, 0.1),
    "conv": (cnn, dict(r=3, lora_alpha=6, target_modules=CNN_TARGETS), images, 0.3),
}


def lora_min_model(kind):
    """(base, lora_min's model with a random adapter of this kind, in eval mode, an input)."""
    make_base, config, x, scale = PEFT_KINDS[kind]
    base = make_base()
    model = L.add_lora(copy.deepcopy(base), r=config["r"], alpha=config["lora_alpha"], target_modules=config["target_modules"])
    return base, randomize(model, scale=scale).eval(), x()


def peft_model(kind, **fields):
    """(base, PEFT's model with a random adapter of this kind (and these LoraConfig fields), in eval mode, an input)."""
    make_base, config, x, scale = PEFT_KINDS[kind]
    base = make_base()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config, **fields))
    return base, randomize_peft(theirs, scale=scale).eval(), x()


def peft_adapted(peft_model):
    """The names of the modules a PeftModel adapts."""
    return [n for n, m in peft_model.base_model.model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]


# --- lora_min -> PEFT -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    """(base Llama, the model with a random adapter on q_proj / v_proj, the folder save_peft_adapter wrote)."""
    base, model = lora_llama()
    folder = tmp_path_factory.mktemp("saved_llama")
    L.save_peft_adapter(model, folder, base_model_name_or_path="tiny-llama")
    return base, model, folder


def test_save_peft_adapter_writes_the_settings_in_peft_config_fields(saved_llama):
    config = read_config(saved_llama[2])
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["target_modules"] == ["q_proj", "v_proj"] and config["bias"] == "none"
    assert config["use_rslora"] is False and config["lora_dropout"] == 0.0 and config["rank_pattern"] == {}


@pytest.mark.parametrize("kind", KINDS)
def test_save_peft_adapter_loads_in_peft_computing_what_lora_min_computes(kind, tmp_path):
    base, model, x = lora_min_model(kind)
    L.save_peft_adapter(model, tmp_path)
    y = output(model, x)
    assert not torch.allclose(y, output(base, x), **EXACT)  # the adapter does something
    torch.testing.assert_close(output(peft_from_pretrained(base, tmp_path), x), y, **EXACT)


def llama_keys(r, layers=(0, 1)):
    """PEFT's keys and shapes for rank-r LoRA on q_proj (32 -> 32) and v_proj (32 -> 16) of the tiny Llama."""
    prefix = "base_model.model.model.layers"
    return {f"{prefix}.{i}.self_attn.{p}.lora_{ab}.weight": shape for i in layers
            for p, out in (("q_proj", 32), ("v_proj", 16)) for ab, shape in (("A", (r, 32)), ("B", (out, r)))}


PEFT_FILES = {  # kind: the keys and shapes of the adapter file PEFT writes
    # linears: lora_A.weight (r, in), lora_B.weight (out, r)
    "linear": llama_keys(4),
    # embeddings: no ".weight" suffix; A (r, vocabulary), B (dim, r)
    "embedding": {"base_model.model.model.embed_tokens.lora_embedding_A": (4, 97),
                  "base_model.model.model.embed_tokens.lora_embedding_B": (32, 4), **llama_keys(4)},
    # convs: A conv-shaped (r, in, kh, kw), B a 1x1 conv (out, r, 1, 1)
    "conv": {"base_model.model.0.lora_A.weight": (3, 3, 3, 3), "base_model.model.0.lora_B.weight": (8, 3, 1, 1),
             "base_model.model.2.lora_A.weight": (3, 8, 3, 3), "base_model.model.2.lora_B.weight": (8, 3, 1, 1)},
}


@pytest.mark.parametrize("kind", KINDS)
def test_peft_and_lora_min_write_the_same_keys_and_shapes(kind, tmp_path):
    """PEFT's layout, which save_peft_adapter writes too (and nothing else: PEFT may add the base
    weights of a targeted embedding, lora_min never does)."""
    make_base, config, _, _ = PEFT_KINDS[kind]
    base = make_base()
    peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config)).save_pretrained(str(tmp_path / "peft"))
    L.save_peft_adapter(L.add_lora(copy.deepcopy(base), r=config["r"], target_modules=config["target_modules"]),
                        tmp_path / "ours")
    theirs = read_safetensors(tmp_path / "peft" / "adapter_model.safetensors")
    ours = read_safetensors(tmp_path / "ours" / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in theirs.items() if ".lora_" in k} == PEFT_FILES[kind]
    assert {k: tuple(v.shape) for k, v in ours.items()} == PEFT_FILES[kind]


@pytest.mark.parametrize("alpha, written", [(2.5, 2.5), (3.0, 3)])
def test_save_peft_adapter_writes_alpha_exactly(tmp_path, alpha, written):
    """An integral alpha as a JSON int, as PEFT writes it; any other as a float."""
    L.save_peft_adapter(L.add_lora(mlp(), r=2, alpha=alpha), tmp_path)
    lora_alpha = read_config(tmp_path)["lora_alpha"]
    assert lora_alpha == written and type(lora_alpha) is type(written)


def test_save_peft_adapter_writes_short_target_names_where_they_select_exactly_the_layers(tmp_path):
    L.save_peft_adapter(L.add_lora(mlp(), r=2), tmp_path)
    assert read_config(tmp_path)["target_modules"] == ["0", "3"]  # "0" also selects "2.0", as it should here


@pytest.fixture(scope="module")
def one_layer_of_many(tmp_path_factory):
    """(base Llama, the model with LoRA on layer 1's q_proj only, its saved folder)."""
    base = tiny_llama()
    model = randomize_adapter(L.add_lora(copy.deepcopy(base), r=2, target_modules=["model.layers.1.self_attn.q_proj"]))
    folder = tmp_path_factory.mktemp("one_layer_of_many")
    L.save_peft_adapter(model, folder)
    return base, model, folder


def test_save_peft_adapter_writes_full_names_when_short_ones_would_select_more(one_layer_of_many):
    assert read_config(one_layer_of_many[2])["target_modules"] == ["model.layers.1.self_attn.q_proj"]


def test_peft_adapts_only_the_one_layer_of_many_that_was_saved(one_layer_of_many):
    base, model, folder = one_layer_of_many
    ids = tokens()
    torch.testing.assert_close(peft_from_pretrained(base, folder)(input_ids=ids).logits, model(ids).logits, **EXACT)


def nested():
    """Sequential(Linear, Sequential(Linear)): the target "0" is also the dotted end of "1.0"."""
    return nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4)))


def numbered():
    """Eleven Sequential(Linear, Linear): linears "0.0", "0.1", ..., "10.0", "10.1" ("0.1" is the dotted end of no other)."""
    return nn.Sequential(*[nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)) for _ in range(11)])


def aliased_leaf():
    model = nn.Module()
    model.a = nn.Linear(4, 4)
    model.b = nn.Sequential(nn.Linear(4, 4))
    model.c = model.b  # the same Sequential under a second name
    return model


@pytest.mark.parametrize("make, targets", [
    (nested, ["0"]), (nested, ["1.0"]), (numbered, ["1.0", "10.1"]), (numbered, ["1.1"]),
    (aliased_leaf, ["a"]), (aliased_leaf, ["b.0"]),
])
def test_save_peft_adapter_targets_select_exactly_the_saved_layers_under_peft(make, targets, tmp_path):
    torch.manual_seed(0)
    base = make().requires_grad_(False)  # frozen as add_lora leaves it (else saving warns of the trainable rest)
    model, layers = copy.deepcopy(base), {}
    for name in targets:  # exactly these layers (add_lora's suffix rule would take "1.0" for "0")
        linear = model.get_submodule(name)
        layer = layers.setdefault(id(linear), L.LoRALinear(linear, r=2))
        nn.init.normal_(layer.lora_B)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    L.save_peft_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).base_model.model
    adapted = {n for n, m in theirs.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}
    assert adapted == {n for n, _ in L.lora_layers(model)}
    ours = L.load_peft_adapter(copy.deepcopy(base), tmp_path)
    assert {n for n, _ in L.lora_layers(ours)} == {n for n, _ in L.lora_layers(model)}
    x = torch.randn(3, 4)
    outputs = lambda m: torch.cat([m.get_submodule(n)(x) for n, _ in L.lora_layers(model)])  # noqa: E731
    torch.testing.assert_close(outputs(ours.eval()), outputs(theirs.eval()))
    torch.testing.assert_close(outputs(ours), outputs(model.eval()))


# --- PEFT -> lora_min -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_a_peft_adapter_of_each_layer_type_loads_computing_what_peft_computes(kind, tmp_path):
    """The layers PEFT adapts, each a LoRA layer of its type, with PEFT's dropout (none on an
    embedding, as PEFT's), computing PEFT's outputs."""
    base, theirs, x = peft_model(kind, lora_dropout=0.1)
    theirs.save_pretrained(str(tmp_path))
    ours = L.load_peft_adapter(copy.deepcopy(base), tmp_path).eval()
    assert lora_names(ours) == peft_adapted(theirs)
    for name, layer in L.lora_layers(ours):
        assert type(layer) is L.lora_class_for(base.get_submodule(name)), name
        assert layer.dropout == (0.0 if isinstance(layer, L.LoRAEmbedding) else 0.1), name
    y = output(ours, x)
    assert not torch.allclose(y, output(base, x), **EXACT)
    torch.testing.assert_close(y, output(theirs, x), **EXACT)


@pytest.fixture(scope="module")
def patterned(tmp_path_factory):
    """A PEFT adapter whose layers differ (rank_pattern, alpha_pattern, rslora, dropout), loaded by lora_min:
    (base, PEFT's model, lora_min's model, the folder lora_min saved it to again)."""
    base = tiny_llama()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True,
                             rank_pattern={"model.layers.0.self_attn.q_proj": 2, "down_proj": 6},
                             alpha_pattern={"v_proj": 3}, lora_dropout=0.1, init_lora_weights=False)
    theirs = peft.get_peft_model(copy.deepcopy(base), config).eval()
    folder = tmp_path_factory.mktemp("patterned")
    theirs.save_pretrained(folder / "peft")
    ours = L.load_peft_adapter(copy.deepcopy(base), folder / "peft").eval()
    L.save_peft_adapter(ours, folder / "ours")
    return base, theirs, ours, folder / "ours"


def test_load_peft_adapter_gives_each_layer_its_rank_alpha_rslora_and_dropout(patterned):
    layers = dict(L.lora_layers(patterned[2]))
    assert layers["model.layers.0.self_attn.q_proj"].r == 2 and layers["model.layers.1.self_attn.q_proj"].r == 4
    assert layers["model.layers.1.mlp.down_proj"].r == 6 and layers["model.layers.1.self_attn.v_proj"].alpha == 3
    assert all(layer.use_rslora and layer.dropout == 0.1 for layer in layers.values())


def test_a_patterned_peft_adapter_computes_what_peft_computes(patterned):
    _, theirs, ours, _ = patterned
    ids = tokens()
    torch.testing.assert_close(ours(ids).logits, theirs(input_ids=ids).logits, **EXACT)


def test_save_peft_adapter_writes_rank_and_alpha_patterns_and_rslora(patterned):
    written = read_config(patterned[3])
    assert written["rank_pattern"] and written["alpha_pattern"] and written["use_rslora"]


def test_a_patterned_adapter_saved_again_loads_in_peft_with_equal_logits(patterned):
    base, _, ours, folder = patterned
    ids = tokens()
    torch.testing.assert_close(peft_from_pretrained(base, folder)(input_ids=ids).logits, ours(ids).logits, **EXACT)


@pytest.fixture(scope="module")
def trained_by_peft(tmp_path_factory):
    """(base, the folder of a PEFT adapter trained for a few steps, lora_min's model loaded from it)."""
    base = tiny_llama()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "o_proj"]))
    train_language_model(theirs, first_seed=20)
    folder = tmp_path_factory.mktemp("trained_by_peft")
    theirs.save_pretrained(folder)
    return base, folder, L.load_peft_adapter(copy.deepcopy(base), folder)


def test_load_peft_adapter_adapts_the_targeted_layers_with_the_trained_weights(trained_by_peft):
    ours = trained_by_peft[2]
    assert lora_names(ours) == [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "o_proj")]
    assert all(torch.count_nonzero(layer.lora_B) for _, layer in L.lora_layers(ours))  # trained, not the init


def test_a_trained_peft_adapter_computes_what_peft_computes(trained_by_peft):
    base, folder, ours = trained_by_peft
    ids = tokens()
    expected = peft_from_pretrained(base, folder)(input_ids=ids).logits
    torch.testing.assert_close(ours.eval()(ids).logits, expected, **EXACT)


def test_a_loaded_peft_adapter_trains_only_its_tensors(trained_by_peft):
    ours = trained_by_peft[2]
    assert L.count_parameters(ours).trainable == sum(v.numel() for v in L.lora_state_dict(ours).values())


@pytest.mark.parametrize("targets, excluded, adapted", [
    (r"model\.layers\.1\..*(q_proj|up_proj)", None, ["model.layers.1.self_attn.q_proj", "model.layers.1.mlp.up_proj"]),
    (["q_proj", "k_proj"], ["model.layers.0.self_attn.k_proj"],
     ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj"]),
], ids=["a regex over the full name", "a list of name ends, minus exclude_modules"])
def test_load_peft_adapter_follows_peft_target_rules(tmp_path, targets, excluded, adapted):
    """A string target is a regex over the full name; a list entry matches a name or its dotted end;
    exclude_modules takes names out the same way. The same layers as PEFT's, the same logits."""
    base = tiny_llama()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=2, target_modules=targets, exclude_modules=excluded, init_lora_weights=False))
    theirs.save_pretrained(tmp_path)
    ours = L.load_peft_adapter(copy.deepcopy(base), tmp_path)
    assert lora_names(ours) == adapted
    ids = tokens()
    torch.testing.assert_close(ours.eval()(ids).logits, theirs.eval()(input_ids=ids).logits, **EXACT)


# PEFT gives a module the value of the first rank_pattern / alpha_pattern key that matches the END of
# its name at a dot: re.match(rf"(.*\.)?({key})$", name). Keys that tell that rule from a substring match:
PATTERNS = {
    # "0.1" is a substring of "10.1" but not its dotted end; "1" ends "0.1" ... "10.1" (not "1.0" or "10.0");
    # "0" ends every "*.0", never "10.1"
    "numbered": (numbered, dict(target_modules=r"\d+\.\d", rank_pattern={"0.1": 3, "1": 5},
                                alpha_pattern={"10.1": 9, "0": 7})),
    # "proj" and "_proj" are substrings of every q_proj / v_proj / o_proj but the dotted end of none;
    # "1.self_attn.q_proj" ends layer 1's q_proj only
    "llama": (tiny_llama, dict(target_modules=["q_proj", "v_proj", "o_proj"],
                               rank_pattern={"proj": 8, "1.self_attn.q_proj": 6, "v_proj": 3},
                               alpha_pattern={"_proj": 5, "self_attn.o_proj": 7})),
}
PATTERN_SPOTS = {  # a few (module, r, alpha) the rule gives, where a substring rule would give others
    "numbered": [("0.1", 3, 2), ("10.1", 5, 9), ("1.1", 5, 2), ("10.0", 2, 7), ("1.0", 2, 7)],
    "llama": [("model.layers.0.self_attn.q_proj", 2, 2), ("model.layers.1.self_attn.q_proj", 6, 2),
              ("model.layers.0.self_attn.v_proj", 3, 2), ("model.layers.1.self_attn.o_proj", 2, 7)],
}


@pytest.mark.parametrize("model", PATTERNS)
def test_rank_and_alpha_patterns_go_only_to_the_modules_peft_gives_them_to(model, tmp_path):
    """The oracle is PEFT: every layer's r and alpha equal those of PEFT's model built from the same config."""
    make_base, config = PATTERNS[model]
    torch.manual_seed(0)
    base = make_base()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=2, init_lora_weights=False,
                                                                      **config))
    theirs.save_pretrained(str(tmp_path))
    ours = dict(L.lora_layers(L.load_peft_adapter(copy.deepcopy(base), tmp_path)))
    expected = {n: (m.r["default"], m.lora_alpha["default"]) for n, m in theirs.base_model.model.named_modules()
                if n in peft_adapted(theirs)}
    assert {n: (layer.r, layer.alpha) for n, layer in ours.items()} == expected
    for name, r, alpha in PATTERN_SPOTS[model]:
        assert (ours[name].r, ours[name].alpha) == (r, alpha), name


def test_a_peft_file_with_null_optional_fields_loads(tmp_path):
    write_peft(tmp_path, ["0.fc"], lora_dropout=None, rank_pattern=None, alpha_pattern=None, exclude_modules=None,
               use_rslora=None)
    model = L.load_peft_adapter(two_blocks(), tmp_path)
    assert [n for n, _ in L.lora_layers(model)] == ["0.fc"]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_load_peft_adapter_gives_new_layers_the_mode_of_the_modules_they_replace(training, tmp_path):
    write_peft(tmp_path, ["0.fc"], lora_dropout=0.5)
    model = L.load_peft_adapter(two_blocks().train(training), tmp_path)
    assert model[0].fc.training == training
    x = torch.randn(8, 4)
    if not training:  # as PeftModel.from_pretrained: eval, so no dropout and repeatable outputs
        assert torch.equal(model(x), model(x))


@pytest.fixture
def peft_embed_tokens(tmp_path):
    """(base Llama, the folder of a PEFT adapter on embed_tokens and q_proj, which also holds embed_tokens' W)."""
    base, theirs, _ = peft_model("embedding")
    theirs.save_pretrained(str(tmp_path))
    return base, tmp_path


def test_load_peft_adapter_accepts_the_base_layer_weight_peft_writes_when_it_equals_the_models(peft_embed_tokens):
    base, folder = peft_embed_tokens
    state = read_safetensors(folder / "adapter_model.safetensors")
    assert torch.equal(state["base_model.model.model.embed_tokens.base_layer.weight"], base.model.embed_tokens.weight)
    model = L.load_peft_adapter(copy.deepcopy(base), folder)
    assert torch.equal(model.model.embed_tokens.weight, base.model.embed_tokens.weight)


def test_load_peft_adapter_refuses_a_base_layer_weight_that_differs_from_the_models(peft_embed_tokens):
    base, folder = peft_embed_tokens
    path = folder / "adapter_model.safetensors"
    state = read_safetensors(path)
    state["base_model.model.model.embed_tokens.base_layer.weight"][5, 3] += 1.0  # e.g. a fine-tuned base
    safetensors_torch.save_file(state, str(path), metadata={"format": "pt"})
    model = copy.deepcopy(base)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"carries its own base weight 'base_model\.model\.model\.embed_tokens\.base_layer"):
        L.load_peft_adapter(model, folder)
    assert_unchanged(model, before)  # refused before changing anything


# --- round trips of small models -----------------------------------------------------------------------------


@pytest.fixture
def shared_saved(tmp_path):
    """A Sequential(linear, Tanh, the same linear) with LoRA, saved in PEFT's format: (model, folder)."""
    shared = nn.Linear(4, 4)
    model = randomize_B(L.add_lora(nn.Sequential(shared, nn.Tanh(), shared), r=2))
    L.save_peft_adapter(model, tmp_path)
    return model, tmp_path


def test_save_peft_adapter_names_a_module_registered_twice_under_both_names(shared_saved):
    assert read_config(shared_saved[1])["target_modules"] == ["0", "2"]


def test_peft_round_trip_keeps_a_module_registered_twice_shared(shared_saved):
    model, folder = shared_saved
    fresh = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    fresh.append(fresh[0])
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" not in k})
    L.load_peft_adapter(fresh, folder)
    assert fresh[0] is fresh[2] and isinstance(fresh[0], L.LoRALinear)
    x = torch.randn(3, 4)
    torch.testing.assert_close(fresh(x), model(x))


# --- safetensors or .bin ---------------------------------------------------------------------------------------


@pytest.fixture
def saved_without_safetensors(tmp_path, monkeypatch):
    """(base, model, folder): an older adapter saved as safetensors, then the model's saved without the package."""
    base, model = lora_llama()
    L.save_peft_adapter(lora_llama(seed=99)[1], tmp_path)  # an older adapter, in the other format
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # as if safetensors were not installed
    L.save_peft_adapter(model, tmp_path)
    monkeypatch.undo()
    return base, model, tmp_path


def test_without_safetensors_save_peft_adapter_writes_bin_and_removes_the_stale_safetensors(saved_without_safetensors):
    folder = saved_without_safetensors[2]
    assert (folder / "adapter_model.bin").exists() and not (folder / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("reader", ["peft", "lora_min"])
def test_a_bin_adapter_loads_with_equal_logits(saved_without_safetensors, reader):
    base, model, folder = saved_without_safetensors
    ids = tokens()
    loaded = peft_from_pretrained(base, folder) if reader == "peft" else L.load_peft_adapter(copy.deepcopy(base), folder)
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(ids).logits, **EXACT)


def test_reading_safetensors_without_the_package_says_what_to_install(saved_llama, monkeypatch):
    base, _, folder = saved_llama
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ImportError, match="needs the safetensors package: pip install safetensors"):
        L.load_peft_adapter(copy.deepcopy(base), folder)


# --- what save_peft_adapter refuses: what PEFT's format cannot express --------------------------------------


def model_of(**layers):
    model = nn.Module()
    for name, layer in layers.items():
        setattr(model, name, layer)
    return model


def lora(**kwargs):
    return L.LoRALinear(nn.Linear(4, 4), **kwargs)


@pytest.mark.parametrize("make, words", [
    (mlp, "needs a model with LoRA layers inside it"),  # no LoRA layers at all
    (lambda: lora(), "needs a model with LoRA layers inside it"),  # a bare layer has no module name for PEFT
    (lambda: model_of(a=lora(use_rslora=True), b=lora()), "PEFT has one use_rslora for all layers"),
    (lambda: model_of(a=lora(dropout=0.1), b=lora()), "PEFT has one dropout for all layers"),
    # rank_pattern keys match the end of a name: "q" would also give "inner.q" rank 2
    (lambda: model_of(q=lora(r=2), inner=model_of(q=lora(r=4)), other=lora(r=4)),
     "cannot express the rank and alpha of 'inner.q'"),
    # PEFT's conv LoRA runs A with the base's stride and padding only
    (lambda: L.add_lora(nn.Sequential(nn.Conv2d(2, 2, 3, padding=1, padding_mode="circular")), r=2, target_modules=["0"]),
     "'0': PEFT's conv LoRA ignores padding_mode and dilation.*padding_mode='circular'"),
    (lambda: L.add_lora(nn.Sequential(nn.Conv2d(2, 2, 3, dilation=2)), r=2, target_modules=["0"]),
     r"'0': PEFT's conv LoRA ignores padding_mode and dilation.*dilation=\(2, 2\)"),
], ids=["no LoRA layers", "a bare layer", "use_rslora differs", "dropout differs", "rank_pattern cannot say it",
        "a conv with another padding_mode", "a dilated conv"])
def test_save_peft_adapter_refuses_what_peft_cannot_express_and_writes_nothing(tmp_path, make, words):
    with pytest.raises(ValueError, match=words):
        L.save_peft_adapter(make(), tmp_path)
    assert not list(tmp_path.iterdir())


def test_save_peft_adapter_checks_before_it_overwrites_an_adapter(tmp_path):
    model = lora_two_blocks()
    L.save_peft_adapter(model, tmp_path)
    good = (tmp_path / "adapter_config.json").read_text()
    with pytest.raises(ValueError, match="base_model_name_or_path must be a str or None, got PosixPath"):
        L.save_peft_adapter(model, tmp_path, base_model_name_or_path=tmp_path)
    assert (tmp_path / "adapter_config.json").read_text() == good


# --- PEFT features lora_min does not implement are refused, naming the field ---------------------------


def copy_with_config(source, folder, **overrides):
    """Copy the adapter folder `source` into `folder`, with these config fields changed."""
    shutil.copytree(source, folder, dirs_exist_ok=True)
    set_config(folder, **overrides)


def set_config(folder, **overrides):
    (folder / "adapter_config.json").write_text(json.dumps({**read_config(folder), **overrides}))


@pytest.mark.parametrize("field, value", [
    ("use_dora", True), ("bias", "all"), ("bias", "lora_only"),
    ("layers_to_transform", [0]), ("layers_pattern", "layers"), ("peft_type", "IA3"),
    ("lora_bias", True), ("layer_replication", [[0, 1]]), ("trainable_token_indices", [1, 2]),
    ("target_parameters", "experts.weight"), ("init_lora_weights", "pissa"), ("some_future_feature", {"on": 1}),
    ("target_modules", "all-linear"),
])
def test_unsupported_peft_features_are_refused_naming_the_field(saved_llama, tmp_path, field, value):
    base, _, source = saved_llama
    copy_with_config(source, tmp_path, **{field: value})
    model = copy.deepcopy(base)
    before = snapshot(model)
    with pytest.raises(ValueError, match=field):
        L.load_peft_adapter(model, tmp_path)
    assert_unchanged(model, before)  # the model is left as it was


# --- files that are not (valid) PEFT adapters --------------------------------------------------------------------


def truncate(path):
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])


@pytest.mark.parametrize("change, error, words", [
    (lambda folder: truncate(folder / "adapter_model.safetensors"), ValueError,
     "adapter_model.safetensors is not a readable safetensors file"),
    (lambda folder: (folder / "adapter_config.json").write_text("{not json"), ValueError,
     "adapter_config.json is not valid JSON"),
    (lambda folder: set_config(folder, target_modules=["w_proj", "proj"]), ValueError,  # "proj" is no dotted end of "q_proj"
     r"target_modules \['w_proj', 'proj'\].*match nothing in the model"),
    (lambda folder: set_config(folder, r=8), ValueError,  # the tensors say r = 4
     r"q_proj.lora_A.weight has shape \(4, 32\), the model.s is \(8, 32\)"),
    (lambda folder: set_config(folder, target_modules=["q_proj", "k_proj", "v_proj"]), ValueError,  # no k_proj tensors
     "missing.*k_proj"),
    (lambda folder: set_config(folder, target_modules=["q_proj", "mlp"]), ValueError,
     "'model.layers.0.mlp', which lora_min cannot adapt: it is a LlamaMLP"),
], ids=["truncated safetensors", "invalid JSON", "targets match no module", "another rank", "tensors missing",
        "a target lora_min cannot adapt"])
def test_a_bad_llama_adapter_is_refused_naming_the_problem(saved_llama, tmp_path, change, error, words):
    base, _, source = saved_llama
    shutil.copytree(source, tmp_path, dirs_exist_ok=True)
    change(tmp_path)
    model = copy.deepcopy(base)
    before = snapshot(model)
    with pytest.raises(error, match=words):
        L.load_peft_adapter(model, tmp_path)
    assert_unchanged(model, before)  # checked before the model was changed


@pytest.mark.parametrize("config_text, weights, error, words", [
    ("[1, 2]", None, ValueError, "adapter_config.json is not a PEFT adapter config"),
    (None, None, FileNotFoundError, "holds neither adapter_model.safetensors nor adapter_model.bin"),
    (None, lambda tmp: [1, 2], ValueError, "adapter_model.bin is not a PEFT adapter file: not a dict of tensors"),
    (None, lambda tmp: {"base_model.model.0.lora_A.weight": "text"}, ValueError, "adapter_model.bin is not a PEFT adapter file"),
    (None, lambda tmp: {"base_model.model.0.lora_A.weight": Payload(str(tmp / "canary"))}, ValueError,
     "adapter_model.bin is not a PEFT adapter file"),  # a pickled object: refused, never unpickled
    ('{"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": "all-linear"}', None, ValueError,
     "'all-linear' is not supported: list the names"),
    ('{"peft_type": "LORA", "r": 2, "target_modules": ["0"]}', None, ValueError, "the field 'lora_alpha' is missing"),
], ids=["config not an object", "no weights file", "weights not a dict", "weights not tensors", "weights pickled",
        "all-linear", "lora_alpha missing"])
def test_load_peft_adapter_refuses_files_that_are_not_peft_adapters(tmp_path, config_text, weights, error, words):
    if config_text is None:
        write_peft_config(tmp_path)
    else:
        (tmp_path / "adapter_config.json").write_text(config_text)
    if weights is not None:
        torch.save(weights(tmp_path), tmp_path / "adapter_model.bin")
    model = mlp()
    before = snapshot(model)
    with pytest.raises(error, match=words) as raised:
        L.load_peft_adapter(model, tmp_path)
    assert "weights_only" not in str(raised.value)
    assert_unchanged(model, before)


def test_load_peft_adapter_never_unpickles_a_bin_file(tmp_path):
    write_peft_config(tmp_path)
    torch.save({"base_model.model.0.lora_A.weight": Payload(str(tmp_path / "canary"))}, tmp_path / "adapter_model.bin")
    with pytest.raises(ValueError, match="adapter_model.bin is not a PEFT adapter file"):
        L.load_peft_adapter(mlp(), tmp_path)
    assert not (tmp_path / "canary").exists()


# --- wrapped models, GPT-2's Conv1D and bfloat16 bases, both ways -----------------------------------------


def tiny_gpt2(seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=2, n_positions=16)
    return transformers.GPT2LMHeadModel(config).to(torch.float64).eval()


def test_an_adapter_saved_from_a_compiled_model_loads_in_peft_with_the_trained_weights(tmp_path):
    base, model = lora_llama()
    L.save_peft_adapter(torch.compile(model), tmp_path)
    assert all(k.startswith("base_model.model.model.layers.") for k in read_safetensors(tmp_path / "adapter_model.safetensors"))
    ids = tokens()
    torch.testing.assert_close(output(peft_from_pretrained(base, tmp_path), ids), output(model, ids), **EXACT)


def test_gpt2_conv1d_adapter_saved_by_lora_min_loads_in_peft_with_equal_logits(tmp_path):
    base = tiny_gpt2()
    model = randomize_adapter(L.add_lora(copy.deepcopy(base), r=4, alpha=8, target_modules=["c_attn", "c_fc"]))
    L.save_peft_adapter(model, tmp_path)
    assert read_config(tmp_path)["fan_in_fan_out"] is True
    ids = tokens()
    torch.testing.assert_close(output(peft_from_pretrained(base, tmp_path), ids), output(model, ids), **EXACT)


def test_gpt2_peft_adapter_loads_in_lora_min_with_equal_logits(tmp_path):
    base = tiny_gpt2()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.1)
    theirs.save_pretrained(str(tmp_path))
    ours = L.load_peft_adapter(copy.deepcopy(base), tmp_path)
    assert {type(layer).__name__ for _, layer in L.lora_layers(ours)} == {"LoRAConv1D"}
    ids = tokens()
    torch.testing.assert_close(output(ours, ids), output(theirs.eval(), ids), **EXACT)


def test_a_peft_adapter_on_a_bfloat16_base_loads_as_peft_loads_it(tmp_path):
    base, model = lora_llama()
    L.save_peft_adapter(model, tmp_path)
    base16 = base.to(torch.bfloat16)
    theirs = peft_from_pretrained(base16, tmp_path)
    ours = L.load_peft_adapter(copy.deepcopy(base16), tmp_path).eval()
    their_A = {n: p for n, p in theirs.named_parameters() if "lora_A" in n}
    assert {p.dtype for p in their_A.values()} == {torch.float32}  # PEFT's autocast_adapter_dtype
    assert {layer.lora_A.dtype for _, layer in L.lora_layers(ours)} == {torch.float32}
    ids = tokens()
    torch.testing.assert_close(output(ours, ids), output(theirs, ids))


def test_a_peft_file_whose_target_parameters_match_nothing_is_refused_naming_them(tmp_path):
    write_peft_config(tmp_path, r=4, lora_alpha=8, target_modules=[], target_parameters=["experts.gate_up_proj"])
    torch.save({}, tmp_path / "adapter_model.bin")
    with pytest.raises(ValueError, match=r"target_parameters \['experts.gate_up_proj'\] of .* match nothing"):
        L.load_peft_adapter(mlp(), tmp_path)


# --- modules_to_save in PEFT's format ------------------------------------------------------------


def test_modules_to_save_in_peft_format_both_ways(tmp_path):
    peft = pytest.importorskip("peft")
    base, model = trained_with_saved_modules()
    x = torch.randn(4, 6, dtype=torch.float64)
    L.save_peft_adapter(model, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(theirs(x), model(x), **EXACT)
    theirs.save_pretrained(str(tmp_path / "theirs"))
    loaded = L.load_peft_adapter(copy.deepcopy(base), tmp_path / "theirs").eval()
    torch.testing.assert_close(loaded(x), model(x), **EXACT)


def test_a_peft_sequence_classification_adapter_loads_and_equals_peft(tmp_path):
    transformers, peft = pytest.importorskip("transformers"), pytest.importorskip("peft")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=97, num_labels=3, pad_token_id=0)
    base = transformers.LlamaForSequenceClassification(config).double().eval()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                                                      target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    theirs.save_pretrained(str(tmp_path))
    saved = json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"]
    assert set(saved) >= {"classifier", "score"}  # PEFT adds both; only "score" exists here
    ours = L.load_peft_adapter(copy.deepcopy(base), tmp_path).eval()
    ids = torch.randint(1, 97, (2, 7), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ours(ids).logits, theirs.eval()(ids).logits, **EXACT)
    with L.lora_disabled(ours):
        assert torch.equal(ours(ids).logits, base(ids).logits)


@pytest.mark.parametrize("conv", [nn.Conv1d, nn.Conv3d])
def test_conv1d_and_conv3d_adapters_in_peft_format_both_ways(conv, tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Sequential(conv(3, 4, 3, padding=1), nn.ReLU(), conv(4, 2, 3, stride=2)).double().eval()
    dims = {nn.Conv1d: 1, nn.Conv3d: 3}[conv]
    x = torch.randn(2, 3, *[6] * dims, dtype=torch.float64)
    model = randomize(L.add_lora(copy.deepcopy(base), r=2, alpha=4, target_modules=["0", "2"]), scale=0.3).eval()
    L.save_peft_adapter(model, tmp_path / "ours")  # a Conv1d's B (out, r, 1) is no expert stack
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(theirs(x), model(x), **EXACT)
    theirs.save_pretrained(str(tmp_path / "theirs"))
    torch.testing.assert_close(L.load_peft_adapter(copy.deepcopy(base), tmp_path / "theirs")(x), model(x), **EXACT)
