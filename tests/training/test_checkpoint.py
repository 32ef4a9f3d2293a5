"""Checkpoints load without running code: a booby-trapped pickle is refused, and so is the old format."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from alignkit import build_config
from alignkit.data import IGNORE_INDEX
from alignkit.errors import TrainingError
from alignkit.testing import tiny_llama, tiny_tokenizer
from alignkit.training import fit, setup_accelerator
from alignkit.training.checkpoint import TRAINER_STATE, safe_torch_load
from alignkit.training.supervised import SFTMethod


class Trap:
    """Unpickling this object runs ``open(marker, "w")``: what a malicious checkpoint would do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _rows(tok, n=8):
    rows = []
    for i in range(n):
        p = tok(f"question {i}", add_special_tokens=False)["input_ids"]
        c = tok(" the dog sat", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append({"input_ids": p + c, "labels": [IGNORE_INDEX] * len(p) + c})
    return rows


def _run(out, **training):
    t = {"output_dir": str(out), "max_steps": 2, "save_steps": 2, "learning_rate": 1e-3, "per_device_batch_size": 4,
         "report_to": ["jsonl"]}
    t.update(training)
    cfg = build_config("sft", {"training": t})
    tok = tiny_tokenizer()
    return fit(setup_accelerator(cfg.training), tiny_llama(tok), tok, SFTMethod(tok.pad_token_id), cfg, _rows(tok))


def test_trainer_state_is_safetensors_json_and_plain_tensors(tmp_path):
    _run(tmp_path / "run")
    state = tmp_path / "run" / "checkpoint-2" / TRAINER_STATE
    assert sorted(p.name for p in state.iterdir()) == ["model.safetensors", "optimizer.pt", "rng_state_0.json",
                                                      "scheduler.json"]
    assert isinstance(safe_torch_load(state / "optimizer.pt"), dict)
    assert json.loads((state / "rng_state_0.json").read_text())["torch"]


def test_a_booby_trapped_optimizer_file_is_refused_without_running_it(tmp_path):
    _run(tmp_path / "run")
    state = tmp_path / "run" / "checkpoint-2" / TRAINER_STATE
    marker = tmp_path / "pwned"
    state.joinpath("optimizer.pt").write_bytes(pickle.dumps({"state": Trap(str(marker))}, protocol=2))
    with pytest.raises(TrainingError, match=r"optimizer.pt: refusing to load it.*running code"):
        _run(tmp_path / "run", max_steps=4, resume="latest")
    assert not marker.exists()
    # a plain unpickle of the same file runs it: the test can fail
    pickle.loads(state.joinpath("optimizer.pt").read_bytes())
    assert marker.exists()


def test_a_checkpoint_in_the_old_pickled_format_is_refused(tmp_path):
    _run(tmp_path / "run")
    state = tmp_path / "run" / "checkpoint-2" / TRAINER_STATE
    marker = tmp_path / "pwned"
    state.joinpath("custom_checkpoint_0.pkl").write_bytes(pickle.dumps(Trap(str(marker))))
    with pytest.raises(TrainingError, match=r"custom_checkpoint_0.pkl.*runs code when loaded.*model.name_or_path="):
        _run(tmp_path / "run", max_steps=4, resume="latest")
    assert not marker.exists()


def test_deepspeed_files_are_checked_with_deepspeeds_two_plain_classes_only(tmp_path):
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from alignkit.training.checkpoint import _deepspeed_safe_globals

    ok = tmp_path / "ok.pt"
    torch.save({"zero_stage": ZeroStageEnum.weights, "x": torch.ones(2)}, ok)
    assert safe_torch_load(ok, _deepspeed_safe_globals())["zero_stage"] == ZeroStageEnum.weights
    bad = tmp_path / "bad.pt"
    torch.save({"zero_stage": ZeroStageEnum.weights, "trap": Trap(str(tmp_path / "pwned"))}, bad)
    with pytest.raises(TrainingError, match="bad.pt: refusing"):
        safe_torch_load(bad, _deepspeed_safe_globals())
    assert not (tmp_path / "pwned").exists()
