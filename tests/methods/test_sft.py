"""SFT through the public API: learning for full / LoRA / QLoRA, outputs load with plain HF libraries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import alignkit


def _sft(tmp_path: Path, model_dir: Path, data: Path, finetune: str, **extra) -> dict:
    training = {"output_dir": str(tmp_path / finetune), "max_steps": 25, "per_device_batch_size": 4,
                "learning_rate": 3e-3, "report_to": ["jsonl"],
                "warmup_steps": 0, "lr_scheduler": "constant"}
    training.update(extra.pop("training", {}))
    return alignkit.train(
        "sft",
        model={"name_or_path": str(model_dir), "finetune": finetune, "dtype": "float32", "lora_dropout": 0.0},
        data={"train": [str(data)], "max_length": 64, **extra.pop("data", {})},
        training=training, **extra,
    )


def _first_last(out: Path) -> tuple[float, float]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return rows[0]["loss"], rows[-1]["loss"]


def _answer_logprob(model_dir, tok, records) -> float:
    """Mean log-prob of the memorised answers under a model loaded from disk."""
    from transformers import AutoModelForCausalLM

    from alignkit.data import tokenize_example

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    total, n = 0.0, 0
    for r in records:
        ex = tokenize_example(r, tok, "sft", max_length=64)
        ids = torch.tensor([ex["input_ids"]])
        labels = torch.tensor([ex["labels"]])
        with torch.no_grad():
            logp = model(ids).logits[:, :-1].log_softmax(-1)
        mask = labels[:, 1:] != -100
        total += logp.gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)[mask].sum().item()
        n += int(mask.sum())
    return total / n


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_sft_memorises(tmp_path, tiny_model_dir, sft_file, finetune):
    res = _sft(tmp_path, tiny_model_dir, sft_file, finetune)
    first, last = _first_last(Path(res["output_dir"]))
    assert last < 0.5 * first, (first, last)


def test_full_output_loads_with_transformers_and_learned(tmp_path, tiny_model_dir, sft_file):
    from conftest import memorisation_records
    from transformers import AutoTokenizer

    res = _sft(tmp_path, tiny_model_dir, sft_file, "full")
    tok = AutoTokenizer.from_pretrained(res["output_dir"])
    recs = memorisation_records()
    assert _answer_logprob(res["output_dir"], tok, recs) > _answer_logprob(tiny_model_dir, tok, recs) + 1.0


def test_lora_adapter_loads_with_plain_peft(tmp_path, tiny_model_dir, sft_file):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    res = _sft(tmp_path, tiny_model_dir, sft_file, "lora")
    out = Path(res["output_dir"])
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, out).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        ours = res["model"].eval()(ids).logits
        theirs = model(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_qlora_learns(tmp_path, tiny_model_dir, sft_file):
    pytest.importorskip("bitsandbytes")
    res = _sft(tmp_path, tiny_model_dir, sft_file, "qlora", training={"max_steps": 20})
    first, last = _first_last(Path(res["output_dir"]))
    assert last < 0.7 * first, (first, last)
    assert (Path(res["output_dir"]) / "adapter_config.json").is_file()


def test_packing_trains_on_fewer_rows(tmp_path, tiny_model_dir, sft_file):
    res = _sft(tmp_path, tiny_model_dir, sft_file, "full", sft={"packing": True},
               training={"per_device_batch_size": 2, "max_steps": 15})
    assert res["data_stats"]["packed_train_rows"] < res["data_stats"]["train_rows"]
    first, last = _first_last(Path(res["output_dir"]))
    assert last < 0.6 * first
