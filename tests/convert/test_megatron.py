"""Megatron -> HF against real megatron-core output: converted models reproduce Megatron's own logits.

``megatron_writer.py`` (run once per session in this interpreter, which must have megatron-core) builds
a tiny GQA/SwiGLU GPT with megatron-core on the CPU at several tensor/pipeline-parallel sizes, runs
Megatron's forward on fixed tokens and saves torch_dist and per-rank checkpoints. Each checkpoint is
converted here and the HF model's fp32 logits must equal Megatron's within 1e-5.
Run with ``make test-megatron`` (builds .venv-megatron).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from alignkit.convert import ConvertError, convert_main, convert_megatron

# Only looked up, not imported: importing megatron.core allowlists argparse.Namespace (and more) for
# torch.load(weights_only=True) in the whole process, which would hide the --allow-pickle checks here.
pytestmark = [
    pytest.mark.megatron,
    pytest.mark.skipif(importlib.util.find_spec("megatron") is None or importlib.util.find_spec("megatron.core") is None,
                       reason="needs megatron-core: run `make test-megatron` (builds .venv-megatron)"),
]

WRITER = Path(__file__).with_name("megatron_writer.py")
ATOL = 1e-5


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("megatron")
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, str(WRITER), str(out)], capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, f"megatron_writer.py failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}"
    print(f"\nmegatron_writer.py wrote {out} in {time.perf_counter() - started:.0f} s")
    return out


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    from alignkit.testing import tiny_tokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    tiny_tokenizer().save_pretrained(folder)
    return folder


def _case(checkpoints: Path, name: str) -> dict:
    return json.loads((checkpoints / name / "case.json").read_text())


def _given_args(case: dict) -> dict:
    """What a user passes when the checkpoint's args are not read."""
    return {"num_attention_heads": case["num_attention_heads"], "rope_theta": float(case["rotary_base"]),
            "norm_eps": case["norm_eps"]}


def _hf_logits(folder: Path, tokens: torch.Tensor):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model, model(tokens).logits


def _assert_matches_megatron(folder: Path, checkpoints: Path, name: str):
    reference = torch.load(checkpoints / name / "reference.pt")
    model, logits = _hf_logits(folder, reference["tokens"])
    megatron_logits = reference["logits"][..., : logits.shape[-1]]
    torch.testing.assert_close(logits, megatron_logits, atol=ATOL, rtol=0)
    assert megatron_logits.abs().max() > 1.0  # a real comparison, not of near-zero outputs
    return model


# (case, checkpoint folder, where the architecture args come from)
CONVERSIONS = [
    ("tp1", "torch_dist", "given"),
    ("tp1", "legacy", "given"),
    ("tp1_tied", "torch_dist", "given"),
    ("tp1_tied", "legacy", "given"),
    ("tp2", "torch_dist", "given"),
    ("tp2", "torch_dist_per_layer", "given"),
    ("tp2", "legacy", "given"),
    ("tp2", "legacy_language_model", "given"),
    ("pp2_tied", "torch_dist", "given"),
    ("pp2_tied", "torch_dist", "stored"),  # Megatron-LM args in common.pt
    ("pp2_tied", "legacy", "given"),
    ("pp2_tied", "legacy_args", "stored"),  # Megatron-LM args in each rank file
    ("tp2_pp2_qkv_bias", "torch_dist", "given"),
    ("tp2_pp2_qkv_bias", "legacy", "given"),
]


@pytest.mark.parametrize(("name", "folder", "args"), CONVERSIONS, ids=["-".join(c) for c in CONVERSIONS])
def test_converted_model_reproduces_megatron_logits(name, folder, args, checkpoints, tokenizer_dir, tmp_path):
    case = _case(checkpoints, name)
    kwargs = _given_args(case) if args == "given" else {"allow_pickle": True}
    out = convert_megatron(checkpoints / name / folder, str(tokenizer_dir), tmp_path / "hf", **kwargs)
    model = _assert_matches_megatron(out, checkpoints, name)

    expected = "Qwen2ForCausalLM" if case["qkv_bias"] and not case["all_biases"] else "LlamaForCausalLM"
    assert type(model).__name__ == expected
    config = model.config
    assert config.tie_word_embeddings == case["tied"]
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (
        case["num_layers"], case["num_attention_heads"], case["num_query_groups"])
    assert config.vocab_size == case["vocab_size"]
    if case["all_biases"]:
        assert config.attention_bias and config.mlp_bias


def test_vocab_size_drops_megatrons_padding_rows(checkpoints, tokenizer_dir, tmp_path):
    case = _case(checkpoints, "tp2")
    out = convert_megatron(checkpoints / "tp2" / "legacy", str(tokenizer_dir), tmp_path / "hf", vocab_size=512,
                           **_given_args(case))
    model = _assert_matches_megatron(out, checkpoints, "tp2")
    assert model.config.vocab_size == 512 < case["vocab_size"]


def test_the_comparison_sees_a_wrong_rope_theta(checkpoints, tokenizer_dir, tmp_path):
    """The logits check is sensitive: Megatron's default rope theta instead of the trained 1e6 fails it."""
    out = convert_megatron(checkpoints / "pp2_tied" / "legacy", str(tokenizer_dir), tmp_path / "hf",
                           num_attention_heads=4)
    with pytest.raises(AssertionError):
        _assert_matches_megatron(out, checkpoints, "pp2_tied")


def test_pickled_megatron_lm_args_need_the_flag(checkpoints, tokenizer_dir, tmp_path):
    with pytest.raises(ConvertError) as error:
        convert_megatron(checkpoints / "pp2_tied" / "legacy_args", str(tokenizer_dir), tmp_path / "hf",
                         num_attention_heads=4)
    message = str(error.value)
    assert "\n" not in message and "argparse.Namespace" in message and "--allow-pickle" in message


def test_unknown_heads_ask_for_the_value_or_the_flag(checkpoints, tokenizer_dir, tmp_path):
    with pytest.raises(ConvertError) as error:
        convert_megatron(checkpoints / "pp2_tied" / "torch_dist", str(tokenizer_dir), tmp_path / "hf")
    message = str(error.value)
    assert "common.pt" in message and "--num-attention-heads" in message and "--allow-pickle" in message
    with pytest.raises(ConvertError, match="pass --num-attention-heads"):
        convert_megatron(checkpoints / "tp1" / "torch_dist", str(tokenizer_dir), tmp_path / "hf")


def test_query_groups_that_contradict_the_shapes_are_refused(checkpoints, tokenizer_dir, tmp_path):
    with pytest.raises(ConvertError, match="mean 2 query groups, not the 4 given"):
        convert_megatron(checkpoints / "tp1" / "torch_dist", str(tokenizer_dir), tmp_path / "hf",
                         num_attention_heads=4, num_query_groups=4)


def test_a_missing_rank_file_is_named(checkpoints, tokenizer_dir, tmp_path):
    copy = tmp_path / "ckpt"
    shutil.copytree(checkpoints / "tp2_pp2_qkv_bias" / "legacy", copy)
    shutil.rmtree(copy / "iter_0000001" / "mp_rank_01_001")
    with pytest.raises(ConvertError, match="tp 1 / pp 1"):
        convert_megatron(copy, str(tokenizer_dir), tmp_path / "hf", num_attention_heads=4)


def test_cli_converts_a_megatron_checkpoint(checkpoints, tokenizer_dir, tmp_path):
    case = _case(checkpoints, "tp2_pp2_qkv_bias")
    argv = ["megatron", str(checkpoints / "tp2_pp2_qkv_bias" / "torch_dist"), "--tokenizer", str(tokenizer_dir),
            "--num-attention-heads", "4", "--norm-eps", str(case["norm_eps"]), "-o", str(tmp_path / "hf")]
    assert convert_main(argv) == 0
    _assert_matches_megatron(tmp_path / "hf", checkpoints, "tp2_pp2_qkv_bias")


def test_converted_model_trains_with_alignkit(checkpoints, tokenizer_dir, tmp_path, sft_file):
    import alignkit

    case = _case(checkpoints, "tp2_pp2_qkv_bias")
    model_dir = convert_megatron(checkpoints / "tp2_pp2_qkv_bias" / "torch_dist", str(tokenizer_dir),
                                 tmp_path / "hf", **_given_args(case))
    out = tmp_path / "sft"
    alignkit.train("sft", model={"name_or_path": str(model_dir), "dtype": "float32"},
                   data={"train": [str(sft_file)], "max_length": 64},
                   training={"output_dir": str(out), "max_steps": 12, "per_device_batch_size": 4,
                             "learning_rate": 3e-3, "warmup_steps": 0, "lr_scheduler": "constant",
                             "report_to": ["jsonl"]})
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert losses[-1] < losses[0]
