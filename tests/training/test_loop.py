"""The training loop: learning, exact resume, NaN guard, atomic checkpoints, output_dir safety."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import crash_after_checkpoint

from alignkit import build_config
from alignkit.data import IGNORE_INDEX
from alignkit.errors import TrainingError
from alignkit.testing import tiny_llama, tiny_tokenizer
from alignkit.training import fit, setup_accelerator
from alignkit.training.batches import BatchStream
from alignkit.training.checkpoint import list_checkpoints
from alignkit.training.optim import lr_lambda
from alignkit.training.supervised import SFTMethod


def _rows(tok, n=16):
    rows = []
    for i in range(n):
        p = tok(f"question {i} what is the cat", add_special_tokens=False)["input_ids"]
        c = tok(" the dog sat on the mat" + " red" * (i % 3), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append({"input_ids": p + c, "labels": [IGNORE_INDEX] * len(p) + c})
    return rows


def _cfg(out, **training):
    t = {"output_dir": str(out), "max_steps": 6, "learning_rate": 3e-3, "per_device_batch_size": 4,
         "report_to": ["jsonl"], "lr_scheduler": "cosine", "warmup_steps": 1}
    t.update(training)
    return build_config("sft", {"training": t})


def _losses(out) -> dict[int, float]:
    lines = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


def _train(cfg, model=None, tok=None, rows=None):
    tok = tok or tiny_tokenizer()
    acc = setup_accelerator(cfg.training)
    model = model if model is not None else tiny_llama(tok)
    return fit(acc, model, tok, SFTMethod(tok.pad_token_id), cfg, rows or _rows(tok))


def test_sft_loss_falls(tmp_path):
    _train(_cfg(tmp_path, max_steps=20))
    losses = _losses(tmp_path)
    assert losses[20] < 0.5 * losses[1]
    assert (tmp_path / "config.json").is_file() and (tmp_path / "alignkit_config.yaml").is_file()


def _lora(tok):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    return get_peft_model(tiny_llama(tok), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.2,
                                                        target_modules="all-linear"))


@pytest.mark.parametrize("finetune, group_by_length", [("full", False), ("lora", False), ("full", True)])
def test_exact_resume(tmp_path, monkeypatch, finetune, group_by_length):
    """6 steps straight == 3 steps, crash, resume, 3 more: same losses and same weights (also with
    length-grouped batches, whose order crosses an epoch boundary here)."""
    tok = tiny_tokenizer()
    make = (lambda: tiny_llama(tok)) if finetune == "full" else (lambda: _lora(tok))
    straight = tmp_path / "straight"
    geometry = {"save_steps": 3, "gradient_accumulation_steps": 2, "per_device_batch_size": 2,
                "group_by_length": group_by_length}
    res_a = _train(_cfg(straight, **geometry), make(), tok)

    resumed = tmp_path / "resumed"
    with crash_after_checkpoint(monkeypatch, 3):
        _train(_cfg(resumed, **geometry), make(), tok)
    torch.manual_seed(1234)  # a different RNG state: resume must restore the saved one
    res_b = _train(_cfg(resumed, **geometry, resume="latest"), make(), tok)

    la, lb = _losses(straight), _losses(resumed)
    for step in range(1, 7):
        assert la[step] == pytest.approx(lb[step], rel=1e-5, abs=1e-6), step
    sa, sb = res_a["model"].state_dict(), res_b["model"].state_dict()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6, msg=k)


class NaNAt(SFTMethod):
    """SFT whose loss is NaN at chosen micro-batch calls (counted from 1)."""

    def __init__(self, pad, bad_calls):
        super().__init__(pad)
        self.calls, self.bad = 0, set(bad_calls)

    def loss(self, model, batch):
        self.calls += 1
        loss, m = super().loss(model, batch)
        return (loss * float("nan") if self.calls in self.bad else loss), m


def test_nan_update_is_skipped(tmp_path):
    tok = tiny_tokenizer()
    cfg = _cfg(tmp_path, max_steps=4)
    acc = setup_accelerator(cfg.training)
    res = fit(acc, tiny_llama(tok), tok, NaNAt(tok.pad_token_id, {2}), cfg, _rows(tok))
    assert res["skipped_updates"] == 1 and res["step"] == 4
    assert all(torch.isfinite(p).all() for p in res["model"].parameters())


def test_nan_in_a_row_stops_and_keeps_checkpoint(tmp_path):
    tok = tiny_tokenizer()
    cfg = _cfg(tmp_path, max_steps=10, save_steps=2, max_nonfinite_updates=3)
    acc = setup_accelerator(cfg.training)
    with pytest.raises(TrainingError, match=r"3 updates in a row.*checkpoint-2"):
        fit(acc, tiny_llama(tok), tok, NaNAt(tok.pad_token_id, {3, 4, 5}), cfg, _rows(tok))
    ckpts = list_checkpoints(tmp_path)
    assert [c.name for c in ckpts] == ["checkpoint-2"]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(ckpts[0])  # the kept checkpoint loads


def test_incomplete_checkpoint_is_ignored_and_rotation(tmp_path):
    _train(_cfg(tmp_path, max_steps=6, save_steps=2, save_total_limit=2))
    assert [c.name for c in list_checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-6"]
    (tmp_path / ".tmp-checkpoint-8").mkdir()  # a crash mid-save
    (tmp_path / "checkpoint-9").mkdir()  # no state file: incomplete
    assert list_checkpoints(tmp_path)[-1].name == "checkpoint-6"


def test_output_dir_with_a_run_is_not_overwritten(tmp_path):
    _train(_cfg(tmp_path, max_steps=1))
    with pytest.raises(TrainingError, match="resume=latest"):
        _train(_cfg(tmp_path, max_steps=1))


def test_batch_stream_shards_like_one_big_batch():
    rows = list(range(12))
    one = BatchStream(rows, list, batch_size=4, world=1, rank=0, seed=3)
    two = [BatchStream(rows, list, batch_size=2, world=2, rank=r, seed=3) for r in range(2)]
    for e in range(2):
        for g, big in enumerate(one.epoch_batches(e)):
            assert sorted(big) == sorted(two[0].epoch_batches(e)[g] + two[1].epoch_batches(e)[g])
    assert one.epoch_batches(0) != one.epoch_batches(1)


def test_lr_schedule():
    f = lr_lambda("cosine", warmup=2, total=10)
    assert f(0) == pytest.approx(0.5) and f(1) == pytest.approx(1.0)
    assert f(2) == pytest.approx(1.0) and f(10) == pytest.approx(0.0, abs=1e-9)
    assert lr_lambda("linear", 0, 10)(5) == pytest.approx(0.5)
    assert lr_lambda("constant", 0, 10)(7) == 1.0
