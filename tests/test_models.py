import json
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from alignkit import models
from alignkit.config import ConfigError, ModelConfig
from alignkit.models import (
    count_parameters,
    describe_model,
    is_peft_model,
    load_model,
    load_tokenizer,
    merge_lora,
    resolve_dtype,
    save_model,
)
from alignkit.testing import CHATML_TEMPLATE, save_tiny_llama, tiny_llama, tiny_tokenizer

TEXTS = ["the cat sat on the mat.", "what is the capital of france? paris is the answer!"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="module")
def tiny_dir_no_pad(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama-nopad", with_pad=False)


def batch(tokenizer, texts=TEXTS):
    return tokenizer(texts, return_tensors="pt", padding=True)


def logits(model, inputs):
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits


def perturb_lora(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)


# -- dtype, tokenizer ------------------------------------------------------------------------------


def test_resolve_dtype():
    assert resolve_dtype("fp32") is torch.float32 and resolve_dtype("float32") is torch.float32
    assert resolve_dtype("bf16") is torch.bfloat16 and resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_dtype("fp16") is torch.float16 and resolve_dtype("float16") is torch.float16
    expected = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    assert resolve_dtype("auto") is expected
    with pytest.raises(ConfigError, match="model.dtype"):
        resolve_dtype("float8")


def test_load_tokenizer_and_model_from_local_folder(tiny_dir):
    cfg = ModelConfig(name_or_path=str(tiny_dir), dtype="float32")
    tok = load_tokenizer(cfg)
    assert tok.pad_token == tok.eos_token == "<|im_end|>"
    assert tok.padding_side == "right"
    assert tok.chat_template == CHATML_TEMPLATE
    model = load_model(cfg, tok)
    assert type(model).__name__ == "LlamaForCausalLM" and not is_peft_model(model)
    assert model.config.pad_token_id == tok.pad_token_id
    assert model.dtype == torch.float32
    trainable, total = count_parameters(model)
    assert trainable == total == sum(p.numel() for p in model.parameters())
    assert not model.is_gradient_checkpointing  # off unless asked
    reference = AutoModelForCausalLM.from_pretrained(tiny_dir)
    inputs = batch(tok)
    torch.testing.assert_close(logits(model, inputs), logits(reference, inputs), rtol=0, atol=0)


def test_dtype_argument_overrides_config(tiny_dir):
    cfg = ModelConfig(name_or_path=str(tiny_dir), dtype="float32")
    model = load_model(cfg, load_tokenizer(cfg), dtype="bfloat16")
    assert model.dtype == torch.bfloat16


def test_missing_pad_token_uses_eos_and_warns(tiny_dir_no_pad, caplog):
    cfg = ModelConfig(name_or_path=str(tiny_dir_no_pad), dtype="float32")
    assert AutoTokenizer.from_pretrained(tiny_dir_no_pad).pad_token is None
    with caplog.at_level(logging.WARNING, logger="alignkit.models"):
        tok = load_tokenizer(cfg)
    assert tok.pad_token == "<|im_end|>" == tok.eos_token
    assert any("no pad token" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    model = load_model(cfg, tok)
    assert model.config.pad_token_id == tok.eos_token_id
    assert model.get_input_embeddings().num_embeddings == len(tok)  # nothing added, nothing resized
    batch(tok)  # padding works


def save_tiny_llama_without_special_tokens(path):
    tok = tiny_tokenizer(with_pad=False)
    tok.eos_token = None
    model = tiny_llama(tiny_tokenizer())
    model.config.pad_token_id = None
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_no_pad_eos_or_unk_adds_pad_token_and_resizes(tmp_path, caplog):
    save_tiny_llama_without_special_tokens(tmp_path)
    cfg = ModelConfig(name_or_path=str(tmp_path), dtype="float32")
    with caplog.at_level(logging.WARNING, logger="alignkit.models"):
        tok = load_tokenizer(cfg)
    assert tok.pad_token == models.PAD_TOKEN_ADDED
    assert any("added a new pad token" in r.getMessage() for r in caplog.records)
    model = load_model(cfg, tok)
    assert model.get_input_embeddings().num_embeddings == len(tok) == model.config.vocab_size
    assert model.config.pad_token_id == tok.pad_token_id == len(tok) - 1
    assert model(**batch(tok)).logits.shape[-1] == len(tok)


def test_chat_template_override_string_and_file(tiny_dir, tmp_path):
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    tok = load_tokenizer(ModelConfig(name_or_path=str(tiny_dir), chat_template=template))
    messages = [{"role": "user", "content": "hello"}]
    assert tok.apply_chat_template(messages, tokenize=False) == "[user] hello\n"
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}<{{ m.role }}> {{ m.content }}\n{% endfor %}")
    tok = load_tokenizer(ModelConfig(name_or_path=str(tiny_dir), chat_template=str(path)))
    assert tok.apply_chat_template(messages, tokenize=False) == "<user> hello\n"
    with pytest.raises(ConfigError, match="model.chat_template"):
        load_tokenizer(ModelConfig(name_or_path=str(tiny_dir), chat_template=str(tmp_path / "missing.jinja")))
    with pytest.raises(ConfigError, match="not valid Jinja"):
        load_tokenizer(ModelConfig(name_or_path=str(tiny_dir), chat_template="{% for m in messages %}"))


def test_tokenizer_from_another_source(tiny_dir, tmp_path):
    other = tiny_tokenizer(vocab_size=400)
    other.save_pretrained(tmp_path)
    tok = load_tokenizer(ModelConfig(name_or_path=str(tiny_dir), tokenizer=str(tmp_path)))
    assert len(tok) == len(other) != len(tiny_tokenizer())


def test_bad_paths_name_the_config_key(tmp_path):
    with pytest.raises(ConfigError, match="model.name_or_path"):
        load_tokenizer(ModelConfig(name_or_path=str(tmp_path / "nope")))
    with pytest.raises(ConfigError, match="no such GGUF"):
        load_tokenizer(ModelConfig(name_or_path=str(tmp_path / "nope.gguf")))
    with pytest.raises(ConfigError, match="model.gguf_file"):
        load_tokenizer(ModelConfig(name_or_path=str(tmp_path), gguf_file="missing.gguf"))


def test_hub_failure_suggests_assets():
    class Unreachable:
        @classmethod
        def from_pretrained(cls, name, **kwargs):
            raise OSError("We couldn't connect to 'https://huggingface.co'")

    source = models._resolve_source("smollm2-135m", None, "model.name_or_path")
    assert not source.local
    with pytest.raises(OSError, match="not in the Hugging Face cache.*Did you mean the asset 'smollm2-135m-instruct'"):
        models._from_pretrained(Unreachable, source, "model.name_or_path")


@pytest.mark.parametrize("name, local", [
    ("outputs/typo", True), ("./tiny", True), ("/abs/model", True), ("~/m", True), ("a/b/c", True),
    ("runs\\sft", True), ("my model", True), ("outputs/", True), ("C:/models/x", True), ("org/..x", True),
    ("Qwen/Qwen2.5-0.5B-Instruct", False), ("gpt2", False), ("someorg/some_model.v2", False),
])
def test_looks_like_local_path(name, local, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()  # outputs/typo: a folder of that name is here, so not a Hub organisation
    assert models.looks_like_local_path(name) is local


def test_local_looking_names_fail_at_once_without_the_hub(tmp_path, monkeypatch):
    """A typo of a local path, or a folder without a model, fails in one line before any Hub call."""
    import transformers

    def no_hub(*args, **kwargs):
        raise AssertionError(f"from_pretrained{args} was called: a local path went to the Hub / transformers")

    for cls in (transformers.AutoTokenizer, transformers.AutoModelForCausalLM, transformers.AutoConfig):
        monkeypatch.setattr(cls, "from_pretrained", no_hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs" / "empty").mkdir(parents=True)
    (tmp_path / "outputs" / "run" / "checkpoint-20").mkdir(parents=True)
    (tmp_path / "outputs" / "run" / "checkpoint-20" / "config.json").write_text("{}")
    (tmp_path / "outputs" / "quantized").mkdir()
    (tmp_path / "outputs" / "quantized" / "m.Q4.gguf").write_bytes(b"GGUF")
    cases = {"outputs/typo": "not a model folder: outputs/typo does not exist",
             "outputs/empty": r"not a model folder: outputs/empty \(expected config.json\)",
             "outputs/run": r"not a model folder: outputs/run \(expected config.json\); it holds checkpoints: "
                            r"give one, e.g. outputs/run/checkpoint-20",
             "outputs/quantized": r"not a model folder: outputs/quantized \(expected config.json\); it holds a GGUF "
                                  r"file: give that file, e.g. outputs/quantized/m.Q4.gguf"}
    for name, message in cases.items():
        with pytest.raises(ConfigError, match=f"model.name_or_path='{name}': {message}") as e:
            load_tokenizer(ModelConfig(name_or_path=name))
        assert "\n" not in str(e.value)
        with pytest.raises(ConfigError, match=message):
            load_model(ModelConfig(name_or_path=name), tiny_tokenizer())
    from alignkit.estimate.architecture import EstimateError, read_model_config

    for name in ("outputs/typo", "outputs/empty"):
        with pytest.raises(EstimateError, match=f"not a model folder: {name}"):
            read_model_config(name, "model.name_or_path")


_HUB_PROBE = """
import sys
from alignkit.config import ModelConfig
from alignkit.models import load_tokenizer
try:
    load_tokenizer(ModelConfig(name_or_path=sys.argv[1]))
    print("LOADED")
except Exception as e:
    print(type(e).__name__ + ": " + str(e))
"""


def _closed_port() -> int:
    import socket

    with socket.socket() as s:  # bound, then closed: nothing listens there now
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _hf_cache_with(cache, repo, source_dir):
    """An HF Hub cache (as huggingface_hub lays it out) holding ``source_dir``'s files as ``repo``'s main."""
    import shutil

    root = cache / "hub" / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    shutil.copytree(source_dir, root / "snapshots" / commit)


def test_a_hub_name_without_network_fails_at_once_in_one_line(tiny_dir, tmp_path):
    """With HF_HUB_OFFLINE unset and the Hub unreachable, a Hub name not in the cache is one line with no
    retry warnings (huggingface_hub alone retries for ~50 s); a cached one loads from the cache."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}", HF_HOME=str(tmp_path / "hf"),
               ALIGNKIT_CACHE=str(tmp_path / "alignkit"))
    _hf_cache_with(tmp_path / "hf", "someorg/cached-model", tiny_dir)

    def probe(name):
        proc = subprocess.run([sys.executable, "-c", _HUB_PROBE, name], env=env, capture_output=True, text=True,
                              timeout=300, cwd=tmp_path)
        return proc.stdout.strip(), proc.stderr

    out, err = probe("someorg/missing-model")
    assert out.startswith("ModelLoadError: model.name_or_path='someorg/missing-model': not a local folder"), out
    assert "the Hub is unreachable (127.0.0.1:" in out and "\n" not in out
    assert "Retry" not in err and "Traceback" not in err, err
    out, err = probe("someorg/cached-model")
    assert out == "LOADED", out + err


# -- LoRA, QLoRA, reference via disabled adapters --------------------------------------------------


def test_lora_targets_all_linear_but_lm_head_and_trains_only_lora(tiny_dir):
    cfg = ModelConfig(name_or_path=str(tiny_dir), dtype="float32", finetune="lora", lora_r=4, lora_alpha=8)
    tok = load_tokenizer(cfg)
    model = load_model(cfg, tok)
    assert is_peft_model(model)
    base = model.get_base_model()
    linear = {n for n, m in base.named_modules() if type(m).__name__ == "Linear" and "lora_" not in n
              and not n.endswith("base_layer")}
    wrapped = {n for n, m in base.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == {n for n in linear if n != "lm_head"}
    assert len(wrapped) == 2 * 7  # q k v o gate up down per layer
    assert "lm_head" not in wrapped
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    assert model.peft_config["default"].r == 4
    assert model.peft_config["default"].base_model_name_or_path == str(tiny_dir)
    assert "LoRA(r=4, alpha=8)" in describe_model(model)


def test_lora_explicit_target_modules_and_bad_name(tiny_dir):
    cfg = ModelConfig(name_or_path=str(tiny_dir), finetune="lora", lora_target_modules=["q_proj", "v_proj"])
    tok = load_tokenizer(cfg)
    model = load_model(cfg, tok)
    wrapped = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == {"q_proj", "v_proj"}
    cfg.lora_target_modules = ["query"]
    with pytest.raises(ConfigError, match="model.lora_target_modules.*q_proj"):
        load_model(cfg, tok)


def test_gradient_checkpointing_only_when_asked(tiny_dir):
    import warnings

    cfg = ModelConfig(name_or_path=str(tiny_dir), dtype="float32", finetune="lora", gradient_checkpointing=True)
    tok = load_tokenizer(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # no deprecated transformers call of ours
        model = load_model(cfg, tok)
    assert model.get_base_model().is_gradient_checkpointing
    model.train()
    out = model(**batch(tok), labels=batch(tok)["input_ids"])
    out.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


def test_frozen_model_for_reference_or_teacher(tiny_dir):
    cfg = ModelConfig(name_or_path=str(tiny_dir), finetune="lora")
    model = load_model(cfg, load_tokenizer(cfg), trainable=False)
    assert not is_peft_model(model) and not model.training
    assert count_parameters(model)[0] == 0 and count_parameters(model)[1] > 0


def test_qlora_on_cpu_quantizes_and_backpropagates(tiny_dir):
    pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes (pip install alignkit[qlora])")
    cfg = ModelConfig(name_or_path=str(tiny_dir), dtype="float32", finetune="qlora", lora_r=4)
    tok = load_tokenizer(cfg)
    try:
        model = load_model(cfg, tok)
    except (RuntimeError, NotImplementedError) as e:  # pragma: no cover - depends on the bnb build
        pytest.skip(f"bitsandbytes cannot run 4-bit on this CPU: {e}")
    import bitsandbytes as bnb

    base = model.get_base_model()
    four_bit = [n for n, m in base.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four_bit) == 14 and all("lm_head" not in n for n in four_bit)
    assert base.is_loaded_in_4bit and "4-bit NF4" in describe_model(model)
    quant = base.model.layers[0].self_attn.q_proj.base_layer.weight.quant_state
    assert quant.quant_type == "nf4" and quant.nested  # double quantization
    trainable, total = count_parameters(model)
    assert 0 < trainable < total
    model.train()
    inputs = batch(tok)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    model(**inputs, labels=labels).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all("lora_" in n for n in grads)
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "lora_A" in n or "lora_B" in n)


def test_qlora_without_bitsandbytes_says_how_to_install(tiny_dir, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "bitsandbytes":
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    cfg = ModelConfig(name_or_path=str(tiny_dir), finetune="qlora")
    with pytest.raises(ImportError, match=r"pip install alignkit\[qlora\]"):
        load_model(cfg, load_tokenizer(cfg))


# -- sequence classification -----------------------------------------------------------------------


def test_seq_cls_on_tiny_llama_uses_the_pad_id(tiny_dir_no_pad):
    cfg = ModelConfig(name_or_path=str(tiny_dir_no_pad), dtype="float32")
    tok = load_tokenizer(cfg)
    model = load_model(cfg, tok, task="seq_cls", num_labels=1).eval()
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert model.config.pad_token_id == tok.pad_token_id is not None
    padded = batch(tok)
    assert (padded["attention_mask"] == 0).any()
    with torch.no_grad():
        scores = model(**padded).logits
        alone = model(**tok(TEXTS[0], return_tensors="pt")).logits
    assert scores.shape == (2, 1)
    torch.testing.assert_close(scores[0], alone[0])  # the right-padded row scores its last real token


def test_a_new_score_head_is_no_load_report_but_a_missing_weight_is(tiny_dir, tmp_path, caplog):
    """A classifier on a causal LM (critic, reward model) has a new score head and drops the LM head: expected,
    so transformers' LOAD REPORT table stays out; a weight missing from the checkpoint still shows it."""
    import shutil

    from safetensors.torch import load_file, save_file

    tok = load_tokenizer(ModelConfig(name_or_path=str(tiny_dir)))
    with caplog.at_level(logging.WARNING):
        load_model(ModelConfig(name_or_path=str(tiny_dir), dtype="float32"), tok, task="seq_cls")
    assert not any("LOAD REPORT" in r.getMessage() for r in caplog.records)
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    weights = load_file(broken / "model.safetensors")
    del weights["model.norm.weight"]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load_model(ModelConfig(name_or_path=str(broken), dtype="float32"), tok, task="seq_cls")
    reports = [r.getMessage() for r in caplog.records if "LOAD REPORT" in r.getMessage()]
    assert len(reports) == 1 and "model.norm.weight" in reports[0]


def test_deepspeeds_cpu_note_is_dropped(monkeypatch):
    """accelerate imports DeepSpeed on every save; on a machine without a GPU its note is no news."""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    ds_logger = logging.getLogger("DeepSpeed")
    ds_logger.addHandler(handler)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    try:
        ds_logger.warning("Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to "
                          "detect it.")
        ds_logger.warning("something else")
    finally:
        ds_logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == ["something else"]


def test_seq_cls_lora_trains_the_score_head(tiny_dir):
    cfg = ModelConfig(name_or_path=str(tiny_dir), dtype="float32", finetune="lora")
    tok = load_tokenizer(cfg)
    model = load_model(cfg, tok, task="seq_cls", num_labels=2)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("score" in n and "modules_to_save" in n for n in trainable)
    assert not any("score" in n and "lora_" in n for n in trainable)  # the head trains in full, not via LoRA
    assert all("lora_" in n or "score" in n for n in trainable)
    assert model(**batch(tok)).logits.shape == (2, 2)


# -- saving and merging ----------------------------------------------------------------------------


def test_save_full_model_reloads_with_plain_transformers(tiny_dir, tmp_path):
    cfg = ModelConfig(name_or_path=str(tiny_dir), dtype="float32")
    tok = load_tokenizer(cfg)
    model = load_model(cfg, tok)
    with torch.no_grad():
        model.lm_head.weight.add_(0.1)
    save_model(model, tok, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    tok2 = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok2.pad_token == tok.pad_token and tok2.chat_template == tok.chat_template
    inputs = batch(tok)
    torch.testing.assert_close(logits(reloaded, inputs), logits(model, inputs), rtol=0, atol=0)


def test_save_lora_writes_adapter_only_and_reloads_with_peft(tiny_dir, tmp_path):
    from peft import AutoPeftModelForCausalLM

    cfg = ModelConfig(name_or_path=str(tiny_dir), dtype="float32", finetune="lora")
    tok = load_tokenizer(cfg)
    model = load_model(cfg, tok)
    perturb_lora(model)
    save_model(model, tok, tmp_path / "adapter")
    files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= files
    assert "model.safetensors" not in files
    reloaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    inputs = batch(tok)
    torch.testing.assert_close(logits(reloaded, inputs), logits(model, inputs), rtol=0, atol=0)


def _adapter_from_a_relative_base(tmp_path, monkeypatch):
    """A LoRA adapter trained from ``model.name_or_path=tiny`` (relative) in tmp_path/work; its logits."""
    work = tmp_path / "work"
    save_tiny_llama(work / "tiny")
    monkeypatch.chdir(work)
    cfg = ModelConfig(name_or_path="tiny", dtype="float32", finetune="lora")
    tok = load_tokenizer(cfg)
    model = load_model(cfg, tok)
    perturb_lora(model, seed=3)
    save_model(model, tok, "outputs/lora")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    return work / "outputs" / "lora", logits(model, batch(tok)), tok


def test_an_adapter_loads_from_another_working_directory(tmp_path, monkeypatch):
    """adapter_config.json records a base that resolves from anywhere: alignkit and plain PEFT load it."""
    from peft import AutoPeftModelForCausalLM

    from alignkit.generate import load_inference_model

    adapter, expected, tok = _adapter_from_a_relative_base(tmp_path, monkeypatch)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "work" / "tiny")
    peft_model = AutoPeftModelForCausalLM.from_pretrained(adapter)
    torch.testing.assert_close(logits(peft_model, batch(tok)), expected, rtol=0, atol=0)
    loaded = load_inference_model(str(adapter), dtype="float32")
    torch.testing.assert_close(logits(loaded.model, batch(tok)), expected, rtol=1e-5, atol=1e-5)


def test_an_older_adapter_with_a_relative_base_is_found_above_it(tmp_path, monkeypatch, caplog):
    """Adapters saved before the fix record ``tiny``: found in the folders above the adapter, with a warning."""
    from alignkit.generate import load_inference_model

    adapter, expected, tok = _adapter_from_a_relative_base(tmp_path, monkeypatch)
    config_file = adapter / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "base_model_name_or_path": "tiny"}))
    with caplog.at_level(logging.WARNING, logger="alignkit.models"):
        loaded = load_inference_model(str(adapter), dtype="float32")
    torch.testing.assert_close(logits(loaded.model, batch(tok)), expected, rtol=1e-5, atol=1e-5)
    assert any("relative path 'tiny'" in r.getMessage() for r in caplog.records)
    merged = merge_lora(adapter, tmp_path / "merged")
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(merged), batch(tok)), expected,
                               rtol=1e-5, atol=1e-5)


def test_merge_lora_gives_a_plain_model_with_the_adapter_logits(tiny_dir, tmp_path):
    cfg = ModelConfig(name_or_path=str(tiny_dir), dtype="float32", finetune="lora")
    tok = load_tokenizer(cfg)
    model = load_model(cfg, tok)
    perturb_lora(model, seed=1)
    save_model(model, tok, tmp_path / "adapter")
    merge_lora(tmp_path / "adapter", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert AutoTokenizer.from_pretrained(tmp_path / "merged").chat_template == CHATML_TEMPLATE
    inputs = batch(tok)
    torch.testing.assert_close(logits(merged, inputs), logits(model, inputs), rtol=1e-4, atol=1e-5)


def test_lora_with_an_added_pad_token_saves_embeddings_and_merges(tmp_path):
    base = save_tiny_llama_without_special_tokens(tmp_path / "base")
    cfg = ModelConfig(name_or_path=str(base), dtype="float32", finetune="lora")
    tok = load_tokenizer(cfg)
    model = load_model(cfg, tok)
    perturb_lora(model)
    save_model(model, tok, tmp_path / "adapter")
    merge_lora(tmp_path / "adapter", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.config.vocab_size == len(tok) == len(AutoTokenizer.from_pretrained(tmp_path / "merged"))
    inputs = batch(tok)
    torch.testing.assert_close(logits(merged, inputs), logits(model, inputs), rtol=1e-4, atol=1e-5)


def test_merge_lora_seq_cls(tiny_dir, tmp_path):
    cfg = ModelConfig(name_or_path=str(tiny_dir), dtype="float32", finetune="lora")
    tok = load_tokenizer(cfg)
    model = load_model(cfg, tok, task="seq_cls", num_labels=3)
    perturb_lora(model)
    with torch.no_grad():
        model.base_model.model.score.modules_to_save["default"].weight.add_(1.0)
    save_model(model, tok, tmp_path / "adapter")
    merge_lora(tmp_path / "adapter", tmp_path / "merged")
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert merged.config.num_labels == 3
    inputs = batch(tok)
    torch.testing.assert_close(logits(merged, inputs), logits(model, inputs), rtol=1e-4, atol=1e-5)


def test_merge_lora_rejects_a_non_adapter_folder(tiny_dir):
    with pytest.raises(models.ModelLoadError, match="adapter_config.json"):
        merge_lora(tiny_dir, tiny_dir / "never")


# -- GGUF ------------------------------------------------------------------------------------------


def write_tiny_gguf(path, tokenizer, model):
    """Write a tiny Llama + its byte-level BPE tokenizer as GGUF (F32), the way llama.cpp's converter does."""
    import gguf
    import numpy as np

    def permute(w, n_head):  # llama.cpp stores q/k rows interleaved for its rotary layout
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    tokens = [t for t, _ in sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])]
    special = {a["content"] for a in spec["added_tokens"]}
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    w.add_eos_token_id(tokenizer.eos_token_id)
    w.add_pad_token_id(tokenizer.pad_token_id)
    w.add_chat_template(tokenizer.chat_template)
    top = {"model.embed_tokens.weight": "token_embd", "model.norm.weight": "output_norm", "lm_head.weight": "output"}
    block = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for key, tensor in model.state_dict().items():
        array = tensor.numpy().astype(np.float32)
        if key in top:
            name = top[key]
        else:
            _, _, layer, *rest = key.split(".")
            module = ".".join(rest[:-1])
            name = f"blk.{layer}.{block[module]}"
            if module == "self_attn.q_proj":
                array = permute(array, c.num_attention_heads)
            elif module == "self_attn.k_proj":
                array = permute(array, c.num_key_value_heads)
        w.add_tensor(f"{name}.weight", np.ascontiguousarray(array))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    tok = tiny_tokenizer()
    model = tiny_llama(tok).eval()
    path = write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", tok, model)
    return path, tok, model


def test_gguf_file_loads_as_a_plain_model_that_saves(tiny_gguf, tmp_path):
    path, original_tok, original = tiny_gguf
    inputs = batch(original_tok)
    for cfg in (ModelConfig(name_or_path=str(path), dtype="float32"),
                ModelConfig(name_or_path=str(path.parent), gguf_file=path.name, dtype="float32")):
        tok = load_tokenizer(cfg)
        assert tok(TEXTS).input_ids == original_tok(TEXTS).input_ids
        assert tok.chat_template == CHATML_TEMPLATE and tok.pad_token == "<|im_end|>"
        model = load_model(cfg, tok)
        assert getattr(model, "hf_quantizer", None) is None
        assert not hasattr(model.config, "quantization_config")
        torch.testing.assert_close(logits(model, inputs), logits(original, inputs))
    save_model(model, tok, tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    torch.testing.assert_close(logits(reloaded, inputs), logits(original, inputs))


def test_gguf_with_lora_and_qlora_refusal(tiny_gguf):
    path, _, _ = tiny_gguf
    cfg = ModelConfig(name_or_path=str(path), dtype="float32", finetune="lora")
    tok = load_tokenizer(cfg)
    model = load_model(cfg, tok)
    assert is_peft_model(model) and model.peft_config["default"].base_model_name_or_path == str(path.resolve())
    cfg.finetune = "qlora"
    with pytest.raises(ConfigError, match="convert_gguf"):
        load_model(cfg, tok)


def test_convert_gguf_writes_a_normal_folder(tiny_gguf, tmp_path):
    path, original_tok, original = tiny_gguf
    from alignkit.gguf import convert_gguf

    out = convert_gguf(path, tmp_path / "converted")
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == CHATML_TEMPLATE and tok.eos_token == "<|im_end|>"
    inputs = batch(original_tok)
    torch.testing.assert_close(logits(model, inputs), logits(original, inputs))


# -- real model (slow) -----------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_asset_answers_paris():
    cfg = ModelConfig(name_or_path="smollm2-135m-instruct", dtype="float32")
    tok = load_tokenizer(cfg)
    assert tok.eos_token == tok.pad_token == "<|im_end|>" and tok.chat_template
    model = load_model(cfg, tok, trainable=False)
    assert model.name_or_path == "smollm2-135m-instruct"
    assert 134e6 < count_parameters(model)[1] < 135e6
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_smollm2_asset_lora_adapter_records_the_asset_name(tmp_path):
    cfg = ModelConfig(name_or_path="smollm2-135m-instruct", dtype="float32", finetune="lora", lora_r=8)
    tok = load_tokenizer(cfg)
    model = load_model(cfg, tok)
    perturb_lora(model, seed=2)
    save_model(model, tok, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "smollm2-135m-instruct"  # portable across caches
    merge_lora(tmp_path / "adapter", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    inputs = batch(tok)
    # 30 layers of W x + B A x versus (W + B A) x in fp32: agreement to ~1e-4 of the logit scale
    torch.testing.assert_close(logits(merged, inputs), logits(model, inputs), rtol=1e-3, atol=2e-3)


@pytest.mark.slow
def test_minilm_asset_as_a_reward_model():
    cfg = ModelConfig(name_or_path="all-minilm-l6-v2", dtype="float32")
    tok = load_tokenizer(cfg)
    assert tok.pad_token == "[PAD]"
    model = load_model(cfg, tok, task="seq_cls", num_labels=1)
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model(**tok(TEXTS, return_tensors="pt", padding=True)).logits.shape == (2, 1)
