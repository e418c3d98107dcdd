"""lora_min on the architectures people copy it into: Llama, BERT, ViT (timm, torchvision).

Every model is built from a small config (no downloads). The oracle is PEFT itself where it
applies: given the same W, A and B, PEFT's LoRA must compute the same logits (float64, 1e-10)
and the same adapter gradients (1e-9); elsewhere the plain model merge_and_unload makes.
Sections: Llama against PEFT; training, adapter files, merge and generate on Llama; other
architectures; tied weights (LoRA on the lm_head, a linear, or on embed_tokens, an embedding).
PEFT's file format on these models: test_peft.py.
Needs the test requirements (pip install -r requirements-test.txt); CI installs them.
"""

import copy
import inspect
import re
import warnings

import pytest
import torch
import torch.nn as nn
from torchvision.models.vision_transformer import VisionTransformer

import lora_min as L
from conftest import (EXACT, assert_unchanged, lora_llama, lora_names, randomize_adapter, snapshot, tiny_llama, tokens,
                      train_language_model)

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

GRADS = dict(rtol=1e-9, atol=1e-9)


def peft_layer(peft_model, name):
    return peft_model.base_model.model.get_submodule(name)


# --- the same W, A, B compute the same as PEFT --------------------------------------------------


@pytest.fixture(scope="module")
def llama_and_peft():
    """(base, lora_min's Llama, PEFT's Llama with the same A and B on q_proj / v_proj); shared by the tests
    below, which only run forwards (one also backward: no other reads .grad)."""
    base, ours = lora_llama()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, layer in L.lora_layers(ours):
            peft_layer(theirs, name).lora_A["default"].weight.copy_(layer.lora_A)
            peft_layer(theirs, name).lora_B["default"].weight.copy_(layer.lora_B)
    return base, ours, theirs


def test_llama_logits_equal_peft(llama_and_peft):
    base, ours, theirs = llama_and_peft
    ids = tokens()
    ours_logits = ours(ids).logits
    torch.testing.assert_close(ours_logits, theirs(input_ids=ids).logits, **EXACT)
    assert not torch.allclose(ours_logits, base(ids).logits, **EXACT)  # the adapter does something


def test_llama_adapter_gradients_equal_peft(llama_and_peft):
    _, ours, theirs = llama_and_peft
    ids = tokens()
    (ours(ids).logits ** 2).mean().backward()
    (theirs(input_ids=ids).logits ** 2).mean().backward()
    for name, layer in L.lora_layers(ours):
        torch.testing.assert_close(layer.lora_A.grad, peft_layer(theirs, name).lora_A["default"].weight.grad, **GRADS)
        torch.testing.assert_close(layer.lora_B.grad, peft_layer(theirs, name).lora_B["default"].weight.grad, **GRADS)


def test_llama_parameter_counts_equal_peft(llama_and_peft):
    _, ours, theirs = llama_and_peft
    trainable = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert L.count_parameters(ours) == (trainable, sum(p.numel() for p in theirs.parameters()))


# --- training, adapter files, merge and generate on Llama ------------------------------------------------


@pytest.fixture(scope="module")
def trained_llama():
    """(base, the LoRA Llama after a few training steps (in eval mode), its non-LoRA state before training)."""
    base, model = lora_llama()
    model.train()
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    train_language_model(model, first_seed=10)
    return base, model.eval(), frozen


def test_llama_training_changes_only_the_adapter(trained_llama):
    _, model, frozen = trained_llama
    assert all(torch.equal(v, frozen[k]) for k, v in model.state_dict().items() if "lora_" not in k)


def test_llama_adapter_file_round_trip_is_exact(trained_llama, tmp_path):
    base, model, _ = trained_llama
    with warnings.catch_warnings():  # trained in train mode, nothing left out: no word (rotary's inv_freq is no state)
        warnings.simplefilter("error")
        L.save_adapter(model, tmp_path / "adapter.pt")
    reloaded = L.add_lora(copy.deepcopy(base), r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    L.load_adapter(reloaded, tmp_path / "adapter.pt")
    ids = tokens()
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, **EXACT)


def test_llama_merge_and_unload_is_the_plain_llama_with_equal_logits(trained_llama):
    base, model, _ = trained_llama
    plain = L.merge_and_unload(model)
    assert set(plain.state_dict()) == set(base.state_dict())
    assert not list(L.lora_layers(plain))
    ids = tokens()
    torch.testing.assert_close(plain(ids).logits, model(ids).logits, rtol=1e-9, atol=1e-9)


def test_llama_merged_model_generates_what_the_lora_model_generates(trained_llama):
    _, model, _ = trained_llama
    prompt = tokens()[:1, :3]
    generated = L.merge_and_unload(model).generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, 7)
    assert torch.equal(generated, model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0))


# --- other architectures ------------------------------------------------------------------------------------


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


@pytest.fixture
def timm_vit():
    """(a tiny timm ViT in float64, the same with LoRA on qkv (B = 0), three images)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    base = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                             embed_dim=32, num_heads=2, num_classes=10).to(torch.float64).eval()
    return base, L.add_lora(copy.deepcopy(base), r=4, target_modules=["qkv"]), torch.randn(3, 3, 32, 32, dtype=torch.float64)


def test_timm_vit_qkv_is_adapted_and_starts_as_the_base_model(timm_vit):
    base, model, images = timm_vit
    assert lora_names(model) == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    torch.testing.assert_close(model(images), base(images), **EXACT)  # B = 0: unchanged at the start


def test_timm_vit_qkv_trains_and_merges(timm_vit):
    base, model, images = timm_vit
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    nn.functional.cross_entropy(model.train()(images), torch.tensor([1, 2, 3])).backward()
    optimizer.step()
    model.eval()
    assert not torch.allclose(model(images), base(images), **EXACT)
    torch.testing.assert_close(L.merge_and_unload(model)(images), model(images), **EXACT)


@pytest.fixture(scope="module")
def torchvision_vit():
    """(a tiny torchvision ViT with LoRA (random B) on every linear it can adapt, two images); read only."""
    torch.manual_seed(0)
    base = VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32,
                             num_classes=5).to(torch.float64).eval()
    with pytest.warns(UserWarning, match="skipping 'encoder.layers.encoder_layer_0.self_attention.out_proj'"):
        model = randomize_adapter(L.add_lora(copy.deepcopy(base), r=2))
    return model, torch.randn(2, 3, 32, 32, dtype=torch.float64)


def test_torchvision_vit_adapts_its_linears_and_skips_mha_out_proj(torchvision_vit):
    assert set(lora_names(torchvision_vit[0])) == {
        "encoder.layers.encoder_layer_0.mlp.0", "encoder.layers.encoder_layer_0.mlp.3", "heads.head"}


def test_torchvision_vit_merges(torchvision_vit):
    model, images = torchvision_vit
    torch.testing.assert_close(L.merge_and_unload(model)(images), model(images), **EXACT)


# --- tied weights: a Llama whose lm_head is its embedding table, LoRA on either side --------------------------


# side: (the module with LoRA, the other owner of its weight); the other side stays plain
TIED_SIDES = {"lm_head": ("lm_head", "model.embed_tokens"), "embed_tokens": ("model.embed_tokens", "lm_head")}


@pytest.fixture(params=TIED_SIDES)
def tied_llama(request):
    """(base, a copy with LoRA (random) on one side of the tied pair and on q_proj, that side's name, the other's)."""
    adapted, other = TIED_SIDES[request.param]
    base = tiny_llama(tie=True)
    model = randomize_adapter(L.add_lora(copy.deepcopy(base), r=2, target_modules=[request.param, "q_proj"]))
    return base, model, adapted, other


def test_a_tied_weight_stays_tied_and_the_layer_records_what_it_shares(tied_llama):
    _, model, adapted, other = tied_llama
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied: training is fine
    assert model.get_submodule(adapted).shared_with == (f"{other}.weight",)
    assert model.model.layers[0].self_attn.q_proj.shared_with == ()


@pytest.mark.parametrize("merge", ["merge_lora", "merge()"])
def test_a_tied_weight_refuses_in_place_merge_and_changes_nothing(tied_llama, merge):
    _, model, adapted, other = tied_llama
    before = snapshot(model)
    with pytest.raises(RuntimeError, match=rf"shared with \['{re.escape(other)}\.weight'\].*merge_and_unload"):
        L.merge_lora(model) if merge == "merge_lora" else model.get_submodule(adapted).merge()
    assert_unchanged(model, before)  # nothing half-merged, the other owner untouched


def test_merge_and_unload_of_a_tied_weight_is_correct_and_the_other_owner_keeps_W(tied_llama):
    base, model, adapted, other = tied_llama
    ids = tokens()
    logits = model(ids).logits
    assert not torch.allclose(logits, base(ids).logits, **EXACT)  # the adapter does something
    before = snapshot(model)
    plain = L.merge_and_unload(model)  # copies: correct, and the other owner keeps W
    assert type(plain.get_submodule(adapted)) is type(base.get_submodule(adapted))
    torch.testing.assert_close(plain(ids).logits, logits, rtol=1e-9, atol=1e-9)
    assert torch.equal(plain.get_submodule(other).weight, base.get_submodule(other).weight)  # untied
    assert_unchanged(model, before)


def test_merged_state_dict_of_a_tied_weight_keeps_the_other_owners_W(tied_llama):
    base, model, adapted, other = tied_llama
    state = L.merged_state_dict(model)
    assert torch.equal(state[f"{other}.weight"], base.get_submodule(other).weight)
    delta = model.get_submodule(adapted).delta_weight()
    torch.testing.assert_close(state[f"{adapted}.weight"], base.get_submodule(adapted).weight + delta, **EXACT)
    expected = L.merge_and_unload(model).state_dict()
    assert set(state) == set(expected) and all(torch.equal(state[k], expected[k]) for k in expected)


# --- transformers' gradient checkpointing: its input-embedding hook moves with the module -------------


@pytest.mark.parametrize("when", ["before add_lora", "after add_lora"])
def test_gradient_checkpointing_with_lora_on_embed_tokens_trains_merges_and_generates(when):
    base = tiny_llama()
    model = copy.deepcopy(base).train()
    targets = ["embed_tokens", "q_proj", "v_proj"]

    def enable():
        model.gradient_checkpointing_enable()  # as Trainer(gradient_checkpointing=True) does
        if not model.get_input_embeddings()._forward_hooks:  # (transformers versions differ)
            model.enable_input_require_grads()
    if when == "before add_lora":
        enable()
    L.add_lora(model, r=4, alpha=8, target_modules=targets)
    if when == "after add_lora":
        enable()
    assert model.is_gradient_checkpointing and model.model.embed_tokens._forward_hooks
    reference = L.add_lora(copy.deepcopy(base).train(), r=4, alpha=8, target_modules=targets)
    reference.load_state_dict(model.state_dict())
    ids = tokens()
    for m in (model, reference):  # backward(), as Trainer calls it (reentrant checkpointing has no .grad())
        m(input_ids=ids, labels=ids).loss.backward()
    grads, grads_ref = ([p.grad for p in m.parameters() if p.requires_grad] for m in (model, reference))
    assert all(g is not None for g in grads)
    for a, b in zip(grads, grads_ref):  # checkpointing recomputes, and changes no gradient
        torch.testing.assert_close(a, b, **GRADS)
    model.zero_grad()
    train_language_model(model, first_seed=10)
    model.eval()
    plain = L.merge_and_unload(model)
    assert plain.model.embed_tokens._forward_hooks  # the hook moved on to the plain embedding
    torch.testing.assert_close(plain(ids).logits, model(ids).logits, **EXACT)
    out = plain.generate(ids[:1, :3], max_new_tokens=4, do_sample=False)
    torch.testing.assert_close(out, model.generate(ids[:1, :3], max_new_tokens=4, do_sample=False))
    model.gradient_checkpointing_disable()
    model.disable_input_require_grads()  # its handle still reaches the hook on the LoRA layer
    assert not model.model.embed_tokens._forward_hooks


# --- Gemma3n: a weight read in a child's method other than forward ----------------------------------------


def test_gemma3n_correction_coefs_read_in_altup_correct_is_checked_at_run_time():
    """Gemma3n's decoder layer calls self.altup.correct(...), which in training computes
    F.linear(x, self.correction_coefs.weight.clamp(...)) and in eval calls correction_coefs."""
    modeling = pytest.importorskip("transformers.models.gemma3n.modeling_gemma3n")
    config = transformers.Gemma3nTextConfig(
        vocab_size=64, vocab_size_per_layer_input=64, hidden_size=32, hidden_size_per_layer_input=8,
        intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        altup_num_inputs=2, laurel_rank=4, activation_sparsity_pattern=[0.0, 0.0],
        layer_types=["sliding_attention", "full_attention"], num_kv_shared_layers=0, sliding_window=8)
    torch.manual_seed(0)
    model = modeling.Gemma3nForCausalLM(config)
    with pytest.warns(UserWarning, match=r"Gemma3nTextDecoderLayer's forward reads the weight of "
                                         r"\['altup\.correction_coefs'\] directly on some code paths"):
        L.add_lora(model, r=2, target_modules=["correction_coefs"])
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(1))
    if "correction_coefs.weight.clamp(" in inspect.getsource(modeling.Gemma3nTextAltUp.correct):  # transformers 5
        with pytest.raises(RuntimeError, match=r"LoRA on \['altup\.correction_coefs'\] did not run"):
            model.train()(ids)
    else:  # transformers 4 clamps weight.data in place and always calls the layer: LoRA runs
        model.train()(ids).logits.sum().backward()
        assert all(layer.lora_B.grad is not None for _, layer in L.lora_layers(model))
    with torch.no_grad():
        assert model.eval()(ids).logits.shape == (1, 6, 64)  # eval calls the LoRA layer
