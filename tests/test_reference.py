"""The reference policy: a frozen model, or the policy with its LoRA adapter switched off."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from alignkit import build_config
from alignkit.config import ConfigError, ModelConfig
from alignkit.models import load_model, load_tokenizer
from alignkit.reference import Reference, adapters_disabled, load_reference
from alignkit.testing import save_tiny_llama

TEXTS = ["the cat sat on the mat.", "what is the capital of france? paris is the answer!"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")


def logits(model, inputs):
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits


def lora_policy(tiny_dir):
    cfg = ModelConfig(name_or_path=str(tiny_dir), dtype="float32", finetune="lora")
    tok = load_tokenizer(cfg)
    model = load_model(cfg, tok)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a trained adapter: the policy differs from its base
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return model, tok


def test_adapters_disabled_gives_the_base_model(tiny_dir):
    model, tok = lora_policy(tiny_dir)
    plain = AutoModelForCausalLM.from_pretrained(tiny_dir)
    inputs = tok(TEXTS, return_tensors="pt", padding=True)
    with adapters_disabled(model):
        torch.testing.assert_close(logits(model, inputs), logits(plain, inputs))
    enabled = logits(model, inputs)
    assert (enabled - logits(plain, inputs)).abs().max() > 1e-3
    with adapters_disabled(plain):  # a no-op for plain models
        torch.testing.assert_close(logits(plain, inputs), logits(plain, inputs))


def test_adapter_off_reference_runs_the_base_without_grad_and_restores_train_mode(tiny_dir):
    model, tok = lora_policy(tiny_dir)
    plain = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    inputs = tok(TEXTS, return_tensors="pt", padding=True)
    model.train()
    reference = Reference()
    assert reference.is_adapter_off_policy
    with reference.applied(model) as ref:
        assert ref is model and not model.training
        out = ref(**inputs).logits
    assert model.training and not out.requires_grad
    torch.testing.assert_close(out, logits(plain, inputs))


def test_frozen_reference_is_used_as_it_is(tiny_dir):
    model, tok = lora_policy(tiny_dir)
    frozen = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    with Reference(frozen).applied(model) as ref:
        assert ref is frozen and not ref(**tok(TEXTS[:1], return_tensors="pt")).logits.requires_grad


def test_load_reference_picks_by_finetune_mode_and_checks_the_vocabulary(tiny_dir, tmp_path):
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    base = {"model": {"name_or_path": str(tiny_dir), "dtype": "float32"}}
    lora = build_config("dpo", {**base, "model": {**base["model"], "finetune": "lora"}})
    tok = load_tokenizer(lora.model)
    policy = load_model(lora.model, tok)
    assert load_reference(lora, tok, acc, policy).is_adapter_off_policy
    full = build_config("dpo", base)
    ref = load_reference(full, tok, acc, load_model(full.model, tok))
    assert not ref.is_adapter_off_policy and not any(p.requires_grad for p in ref.model.parameters())

    from alignkit.testing import tiny_llama, tiny_tokenizer

    other = tmp_path / "other-vocab"
    wider = tiny_llama(tiny_tokenizer())
    wider.resize_token_embeddings(700)  # another model family's vocabulary
    wider.save_pretrained(other)
    bad = build_config("dpo", {**base, "dpo": {"ref_model": str(other)}})
    with pytest.raises(ConfigError, match="dpo.ref_model=.*vocabulary of 700 tokens"):
        load_reference(bad, tok, acc, load_model(bad.model, tok))
