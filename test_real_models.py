"""lora_min on the architectures people copy it into, and adapters that travel to and from PEFT.

Every model is built from a small config (no downloads). The oracle is PEFT itself:
given the same W, A and B, PEFT's LoRA must compute the same logits (float64, 1e-10)
and the same adapter gradients (1e-9); an adapter written by one must load in the other.
Needs the test requirements (pip install -r requirements-test.txt); CI installs them.
"""

import copy
import json

import pytest
import torch
import torch.nn as nn

import lora_min as L

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

EXACT = dict(rtol=1e-10, atol=1e-10)
GRADS = dict(rtol=1e-9, atol=1e-9)


def tiny_llama(tie=False, seed=0):
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


def train_language_model(model, first_seed, steps=3):
    """A few AdamW steps of next-token prediction on random tokens, on what requires grad."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps):
        ids = tokens(seed=first_seed + step)
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def peft_layer(peft_model, name):
    return peft_model.base_model.model.get_submodule(name)


def lora_llama(**kwargs):
    base = tiny_llama()
    model = randomize_adapter(L.add_lora(copy.deepcopy(base), r=4, alpha=8, target_modules=["q_proj", "v_proj"], **kwargs))
    return base, model


# --- the same W, A, B compute the same as PEFT --------------------------------------------------


def test_llama_logits_gradients_and_counts_equal_peft():
    base, ours = lora_llama()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, layer in L.lora_layers(ours):
            peft_layer(theirs, name).lora_A["default"].weight.copy_(layer.lora_A)
            peft_layer(theirs, name).lora_B["default"].weight.copy_(layer.lora_B)
    ids = tokens()
    ours_logits, their_logits = ours(ids).logits, theirs(input_ids=ids).logits
    torch.testing.assert_close(ours_logits, their_logits, **EXACT)
    assert not torch.allclose(ours_logits, base(ids).logits, **EXACT)  # the adapter does something

    (ours_logits ** 2).mean().backward()
    (their_logits ** 2).mean().backward()
    for name, layer in L.lora_layers(ours):
        torch.testing.assert_close(layer.lora_A.grad, peft_layer(theirs, name).lora_A["default"].weight.grad, **GRADS)
        torch.testing.assert_close(layer.lora_B.grad, peft_layer(theirs, name).lora_B["default"].weight.grad, **GRADS)
    trainable = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert L.count_parameters(ours) == (trainable, sum(p.numel() for p in theirs.parameters()))


def test_llama_training_save_load_merge_and_generate(tmp_path):
    base, model = lora_llama()
    model.train()
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    train_language_model(model, first_seed=10)
    model.eval()
    assert all(torch.equal(v, frozen[k]) for k, v in model.state_dict().items() if "lora_" not in k)
    ids = tokens()
    logits = model(ids).logits

    L.save_adapter(model, tmp_path / "adapter.pt")
    reloaded = L.add_lora(copy.deepcopy(base), r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    L.load_adapter(reloaded, tmp_path / "adapter.pt")
    torch.testing.assert_close(reloaded(ids).logits, logits, **EXACT)

    plain = L.merge_and_unload(model)
    assert set(plain.state_dict()) == set(base.state_dict())
    assert not list(L.lora_layers(plain))
    torch.testing.assert_close(plain(ids).logits, logits, rtol=1e-9, atol=1e-9)
    prompt = ids[:1, :3]
    generated = plain.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, 7)
    assert torch.equal(generated, model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0))


def test_bert_query_value_equals_peft():
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                     vocab_size=97, max_position_embeddings=64, attn_implementation="eager")
    base = transformers.BertModel(config).to(torch.float64).eval()
    ours = randomize_adapter(L.add_lora(copy.deepcopy(base), r=2, alpha=4, target_modules=["query", "value"]))
    assert len(list(L.lora_layers(ours))) == 4
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"]))
    peft.set_peft_model_state_dict(theirs, {f"base_model.model.{k}.weight": v for k, v in L.lora_state_dict(ours).items()})
    ids = tokens()
    torch.testing.assert_close(ours(ids).last_hidden_state, theirs(input_ids=ids).last_hidden_state, **EXACT)


def test_timm_vit_qkv_trains_and_merges():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    base = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                             embed_dim=32, num_heads=2, num_classes=10).to(torch.float64).eval()
    model = L.add_lora(copy.deepcopy(base), r=4, target_modules=["qkv"])
    assert [n for n, _ in L.lora_layers(model)] == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(model(images), base(images), **EXACT)  # B = 0: unchanged at the start
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    nn.functional.cross_entropy(model.train()(images), torch.tensor([1, 2, 3])).backward()
    optimizer.step()
    model.eval()
    assert not torch.allclose(model(images), base(images), **EXACT)
    torch.testing.assert_close(L.merge_and_unload(model)(images), model(images), **EXACT)


def test_torchvision_vit_adapts_its_linears_and_skips_mha_out_proj():
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    base = VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32,
                             num_classes=5).to(torch.float64).eval()
    with pytest.warns(UserWarning, match="skipping 'encoder.layers.encoder_layer_0.self_attention.out_proj'"):
        model = randomize_adapter(L.add_lora(copy.deepcopy(base), r=2))
    assert {n for n, _ in L.lora_layers(model)} == {"encoder.layers.encoder_layer_0.mlp.0",
                                                     "encoder.layers.encoder_layer_0.mlp.3", "heads.head"}
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(L.merge_and_unload(model)(images), model(images), **EXACT)


def test_gpt2_conv1d_target_is_refused_naming_its_class():
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=97,
                                                                 n_positions=64, bos_token_id=0, eos_token_id=0))
    with pytest.raises(ValueError, match=r"'transformer.h.0.attn.c_attn': it is a Conv1D, not an nn.Linear"):
        L.add_lora(model, target_modules=["c_attn"])
    assert not list(L.lora_layers(model))  # refused before anything changed


# --- tied weights --------------------------------------------------------------------------------------


def test_tied_lm_head_trains_but_refuses_in_place_merge():
    base = tiny_llama(tie=True)
    model = randomize_adapter(L.add_lora(copy.deepcopy(base), r=2, target_modules=["lm_head", "q_proj"]))
    head = model.lm_head
    assert head.weight is model.model.embed_tokens.weight  # still tied: training is fine
    assert head.shared_with == ("model.embed_tokens.weight",)
    assert model.model.layers[0].self_attn.q_proj.shared_with == ()
    ids = tokens()
    logits = model(ids).logits
    embedding = model.model.embed_tokens.weight.clone()
    with pytest.raises(RuntimeError, match=r"shared with \['model.embed_tokens.weight'\].*merge_and_unload"):
        L.merge_lora(model)
    with pytest.raises(RuntimeError, match="model.embed_tokens.weight"):
        head.merge()
    assert not any(layer.merged for _, layer in L.lora_layers(model))  # nothing half-merged
    assert torch.equal(model.model.embed_tokens.weight, embedding)
    plain = L.merge_and_unload(model)  # copies: correct, and the embedding keeps W
    torch.testing.assert_close(plain(ids).logits, logits, rtol=1e-9, atol=1e-9)
    assert torch.equal(plain.model.embed_tokens.weight, embedding)
    torch.testing.assert_close(model(ids).logits, logits, **EXACT)


# --- PEFT's file format, both ways -------------------------------------------------------------------------


def peft_from_pretrained(base, directory):
    return peft.PeftModel.from_pretrained(copy.deepcopy(base), str(directory)).eval()


def test_save_peft_adapter_loads_in_peft_with_equal_logits(tmp_path):
    base, model = lora_llama()
    L.save_peft_adapter(model, tmp_path, base_model_name_or_path="tiny-llama")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["target_modules"] == ["q_proj", "v_proj"] and config["bias"] == "none"
    assert config["use_rslora"] is False and config["lora_dropout"] == 0.0 and config["rank_pattern"] == {}
    from safetensors.torch import load_file

    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys and len(keys) == 8
    ids = tokens()
    torch.testing.assert_close(peft_from_pretrained(base, tmp_path)(input_ids=ids).logits, model(ids).logits, **EXACT)


def test_peft_rank_alpha_patterns_and_rslora_round_trip(tmp_path):
    """A PEFT adapter whose layers differ: loaded by lora_min, saved again, loaded by PEFT."""
    base = tiny_llama()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True,
                             rank_pattern={"model.layers.0.self_attn.q_proj": 2, "down_proj": 6},
                             alpha_pattern={"v_proj": 3}, lora_dropout=0.1, init_lora_weights=False)
    theirs = peft.get_peft_model(copy.deepcopy(base), config).eval()
    theirs.save_pretrained(tmp_path / "peft")
    ours = L.load_peft_adapter(copy.deepcopy(base), tmp_path / "peft").eval()
    layers = dict(L.lora_layers(ours))
    assert layers["model.layers.0.self_attn.q_proj"].r == 2 and layers["model.layers.1.self_attn.q_proj"].r == 4
    assert layers["model.layers.1.mlp.down_proj"].r == 6 and layers["model.layers.1.self_attn.v_proj"].alpha == 3
    assert all(layer.use_rslora and layer.dropout == 0.1 for layer in layers.values())
    ids = tokens()
    torch.testing.assert_close(ours(ids).logits, theirs(input_ids=ids).logits, **EXACT)

    L.save_peft_adapter(ours, tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert written["rank_pattern"] and written["alpha_pattern"] and written["use_rslora"]
    torch.testing.assert_close(peft_from_pretrained(base, tmp_path / "ours")(input_ids=ids).logits, ours(ids).logits, **EXACT)


def test_load_peft_adapter_of_a_trained_peft_model_equals_peft(tmp_path):
    base = tiny_llama()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "o_proj"]))
    train_language_model(theirs, first_seed=20)
    theirs.save_pretrained(tmp_path)
    ours = L.load_peft_adapter(copy.deepcopy(base), tmp_path)
    expected_names = [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "o_proj")]
    assert [n for n, _ in L.lora_layers(ours)] == expected_names
    assert all(torch.count_nonzero(layer.lora_B) for _, layer in L.lora_layers(ours))  # trained, not the init
    ids = tokens()
    expected = peft_from_pretrained(base, tmp_path)(input_ids=ids).logits
    torch.testing.assert_close(ours.eval()(ids).logits, expected, **EXACT)
    assert L.count_parameters(ours).trainable == sum(v.numel() for v in L.lora_state_dict(ours).values())


def test_peft_target_rules_regex_suffix_and_exclude(tmp_path):
    """A string target is a regex over the full name; a list entry matches a name or its dotted end."""
    base = tiny_llama()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=2, target_modules=r"model\.layers\.1\..*(q_proj|up_proj)", init_lora_weights=False))
    theirs.save_pretrained(tmp_path / "regex")
    ours = L.load_peft_adapter(copy.deepcopy(base), tmp_path / "regex")
    assert [n for n, _ in L.lora_layers(ours)] == ["model.layers.1.self_attn.q_proj", "model.layers.1.mlp.up_proj"]
    ids = tokens()
    torch.testing.assert_close(ours.eval()(ids).logits, theirs.eval()(input_ids=ids).logits, **EXACT)

    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=2, target_modules=["q_proj", "k_proj"], exclude_modules=["model.layers.0.self_attn.k_proj"], init_lora_weights=False))
    theirs.save_pretrained(tmp_path / "exclude")
    ours = L.load_peft_adapter(copy.deepcopy(base), tmp_path / "exclude")
    assert "model.layers.0.self_attn.k_proj" not in dict(L.lora_layers(ours)) and len(list(L.lora_layers(ours))) == 3
    torch.testing.assert_close(ours.eval()(ids).logits, theirs.eval()(input_ids=ids).logits, **EXACT)


def test_save_peft_adapter_writes_full_names_when_short_ones_would_select_more(tmp_path):
    base = tiny_llama()
    model = randomize_adapter(L.add_lora(copy.deepcopy(base), r=2, target_modules=["model.layers.1.self_attn.q_proj"]))
    L.save_peft_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == ["model.layers.1.self_attn.q_proj"]
    ids = tokens()
    torch.testing.assert_close(peft_from_pretrained(base, tmp_path)(input_ids=ids).logits, model(ids).logits, **EXACT)


def test_save_peft_adapter_without_safetensors_writes_bin(tmp_path, monkeypatch):
    import sys

    base, model = lora_llama()
    L.save_peft_adapter(randomize_adapter(L.add_lora(copy.deepcopy(base), r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
                                          seed=99), tmp_path)  # an older adapter, in the other format
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # as if safetensors were not installed
    L.save_peft_adapter(model, tmp_path)
    assert (tmp_path / "adapter_model.bin").exists() and not (tmp_path / "adapter_model.safetensors").exists()
    monkeypatch.undo()
    ids = tokens()
    torch.testing.assert_close(peft_from_pretrained(base, tmp_path)(input_ids=ids).logits, model(ids).logits, **EXACT)
    torch.testing.assert_close(L.load_peft_adapter(copy.deepcopy(base), tmp_path)(ids).logits, model(ids).logits, **EXACT)


def test_reading_safetensors_without_the_package_says_what_to_install(tmp_path, monkeypatch):
    import sys

    base, model = lora_llama()
    L.save_peft_adapter(model, tmp_path)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ImportError, match="needs the safetensors package: pip install safetensors"):
        L.load_peft_adapter(copy.deepcopy(base), tmp_path)


# --- PEFT adapters lora_min does not implement are refused, naming the field ---------------------------


def write_peft(tmp_path, **overrides):
    base, model = lora_llama()
    L.save_peft_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config.update(overrides)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    return base


@pytest.mark.parametrize("field, value", [
    ("use_dora", True), ("modules_to_save", ["lm_head"]), ("bias", "all"), ("bias", "lora_only"),
    ("fan_in_fan_out", True), ("layers_to_transform", [0]), ("layers_pattern", "layers"), ("peft_type", "IA3"),
    ("lora_bias", True), ("layer_replication", [[0, 1]]), ("trainable_token_indices", [1, 2]),
    ("target_parameters", ["mlp.experts.weight"]), ("init_lora_weights", "pissa"), ("some_future_feature", {"on": 1}),
    ("target_modules", "all-linear"),
])
def test_unsupported_peft_features_are_refused_naming_the_field(tmp_path, field, value):
    base = write_peft(tmp_path, **{field: value})
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match=field):
        L.load_peft_adapter(model, tmp_path)
    assert not list(L.lora_layers(model))  # the model is left as it was


def test_bad_peft_files_raise_clear_errors(tmp_path):
    base = write_peft(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="adapter_model.safetensors is not a readable safetensors file"):
        L.load_peft_adapter(copy.deepcopy(base), tmp_path)
    write_peft(tmp_path, target_modules=["w_proj", "proj"])  # "proj" is not a dotted end of "q_proj"
    with pytest.raises(ValueError, match=r"target_modules \['w_proj', 'proj'\].*match no module"):
        L.load_peft_adapter(copy.deepcopy(base), tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="adapter_config.json is not valid JSON"):
        L.load_peft_adapter(copy.deepcopy(base), tmp_path)
    write_peft(tmp_path, r=8)  # the tensors say r = 4
    with pytest.raises(ValueError, match=r"q_proj.lora_A.weight has shape \(4, 32\), the model.s is \(8, 32\)"):
        L.load_peft_adapter(copy.deepcopy(base), tmp_path)
    write_peft(tmp_path, target_modules=["q_proj", "k_proj", "v_proj"])  # no k_proj tensors in the file
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match="missing.*k_proj"):
        L.load_peft_adapter(model, tmp_path)
    assert not list(L.lora_layers(model))  # checked before the model was changed
    write_peft(tmp_path, target_modules=["q_proj", "mlp"])
    with pytest.raises(ValueError, match="'model.layers.0.mlp', which lora_min cannot adapt: it is a LlamaMLP"):
        L.load_peft_adapter(copy.deepcopy(base), tmp_path)
