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


# -- one run per output folder -----------------------------------------------------------------------


def test_a_second_run_in_a_busy_output_dir_is_refused_and_a_stale_lock_taken_over(tmp_path, caplog):
    import os
    import socket
    import subprocess
    import sys

    from alignkit.training.checkpoint import LOCK_FILE, acquire_run_lock, release_run_lock

    out = tmp_path / "run"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = out / LOCK_FILE
        out.mkdir()
        lock.write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(), "started": "earlier"}))
        with pytest.raises(TrainingError, match=rf"is in use by another run \(pid {sleeper.pid} on host"):
            _run(out)
        assert not list(out.glob("checkpoint-*"))  # refused before anything was written
    finally:
        sleeper.kill()
        sleeper.wait()
    with caplog.at_level("WARNING", logger="alignkit"):
        _run(out)  # the holder is dead now: its lock is taken over
    assert "no longer running" in caplog.text
    assert not (out / LOCK_FILE).exists()  # released when the run ended
    acquire_run_lock(out)
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
    release_run_lock(out)
    assert not (out / LOCK_FILE).exists()


# -- resume: what may change --------------------------------------------------------------------------


def test_resume_refuses_changed_settings_and_names_each(tmp_path):
    _run(tmp_path / "run", max_steps=2, save_steps=2)
    with pytest.raises(TrainingError) as e:
        _run(tmp_path / "run", max_steps=4, resume="latest", learning_rate=5e-4, per_device_batch_size=2)
    text = str(e.value)
    assert "training.learning_rate: 0.001 -> 0.0005" in text and "training.per_device_batch_size: 4 -> 2" in text
    assert "model.name_or_path=" in text and "max_steps" not in text.split("(")[1].split(")")[0]


def test_resume_may_change_length_and_cadence_and_the_saved_config_tells_the_truth(tmp_path):
    import yaml

    _run(tmp_path / "run", max_steps=2, save_steps=2)
    res = _run(tmp_path / "run", max_steps=4, resume="latest", save_steps=1, logging_steps=2)
    assert res["step"] == 4
    saved = yaml.safe_load((tmp_path / "run" / "alignkit_config.yaml").read_text())["training"]
    assert (saved["max_steps"], saved["save_steps"], saved["logging_steps"]) == (4, 1, 2)


def test_metrics_after_the_checkpoint_are_cut_on_resume(tmp_path, monkeypatch):
    from alignkit.training import Checkpointer

    class Crash(Exception):
        pass

    real_save = Checkpointer.save

    def crash_after_step_3(self, state):
        path = real_save(self, state)
        if state.step == 3:
            raise Crash()
        return path

    monkeypatch.setattr(Checkpointer, "save", crash_after_step_3)
    with pytest.raises(Crash):  # checkpoints at 2 and 3; the crash hits after step 3's metrics were logged
        _run(tmp_path / "run", max_steps=6, save_steps=1)
    monkeypatch.setattr(Checkpointer, "save", real_save)
    (tmp_path / "run" / "checkpoint-3").rename(tmp_path / "run" / "gone")  # as if the crash came before it
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 1')  # and a half-written line
    _run(tmp_path / "run", max_steps=6, save_steps=1, resume="latest")
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


# -- a full disk --------------------------------------------------------------------------------------


def test_a_full_disk_names_the_path_removes_the_partial_checkpoint_and_keeps_the_last_good_one(tmp_path, monkeypatch):
    import errno

    from alignkit.training import checkpoint

    real = checkpoint.save_trainer_state

    def full_at_step_4(accelerator, model, optimizer, scheduler, folder, **kw):
        if folder.parent.name == ".tmp-checkpoint-4":
            (folder / "optimizer.pt").parent.mkdir(parents=True, exist_ok=True)
            (folder / "optimizer.pt").write_bytes(b"partial")
            raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 1024 vs 512")
        return real(accelerator, model, optimizer, scheduler, folder, **kw)

    monkeypatch.setattr(checkpoint, "save_trainer_state", full_at_step_4)
    with pytest.raises(TrainingError) as e:
        _run(tmp_path / "run", max_steps=6, save_steps=2)
    text = str(e.value)
    assert text.startswith(f"no space left on {tmp_path / 'run'} while writing checkpoint-4")
    assert "checkpoint-2" in text
    assert not (tmp_path / "run" / ".tmp-checkpoint-4").exists()
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path / "run")] == ["checkpoint-2"]
    assert checkpoint._is_no_space(OSError(errno.ENOSPC, "No space left on device"))
    assert not checkpoint._is_no_space(OSError(errno.EACCES, "Permission denied"))
