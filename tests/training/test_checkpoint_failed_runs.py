"""A run that fails leaves its folder usable: the lock is released on every exit, "holds a run" means a
checkpoint or a final model (decided before data and models load), a run from scratch starts a fresh
metrics file, and a damaged latest checkpoint falls back to the previous one."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import alignkit
from alignkit.errors import TrainingError
from alignkit.training.checkpoint import LOCK_FILE, TRAINER_STATE, acquire_run_lock, list_checkpoints


def _train(model_dir: Path, data: Path | str, out: Path, **training) -> dict:
    t = {"output_dir": str(out), "max_steps": 2, "learning_rate": 1e-3, "per_device_batch_size": 4,
         "report_to": ["jsonl"], "mixed_precision": "no", "save_steps": 0}
    t.update(training)
    return alignkit.train("sft", model={"name_or_path": str(model_dir), "dtype": "float32"},
                          data={"train": [str(data)], "max_length": 64}, training=t)


@pytest.fixture
def caplog(caplog, monkeypatch):
    """caplog that sees alignkit's log (setup_logging gives it its own handler, without propagation)."""
    from alignkit.api import setup_logging

    setup_logging()
    monkeypatch.setattr(logging.getLogger("alignkit"), "propagate", True)
    return caplog


def _steps(out: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]


# -- the lock is released on every exit ------------------------------------------------------------------


def test_a_run_that_fails_before_training_leaves_the_folder_free_for_the_corrected_rerun(tmp_path, tiny_model_dir,
                                                                                         sft_file):
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match="less than one global batch"):  # 16 rows, a batch of 32
        _train(tiny_model_dir, sft_file, out, per_device_batch_size=32)
    assert (out / "alignkit_config.yaml").is_file() and not (out / LOCK_FILE).exists()
    res = _train(tiny_model_dir, sft_file, out)  # corrected: not "already holds a run"
    assert res["step"] == 2 and (out / "config.json").is_file()


def test_a_nan_stop_releases_the_lock(tmp_path, tiny_model_dir, sft_file, monkeypatch):
    from alignkit.training.supervised import SFTMethod

    real = SFTMethod.loss

    def nan_loss(self, model, batch):
        loss, metrics = real(self, model, batch)
        return loss * float("nan"), metrics

    monkeypatch.setattr(SFTMethod, "loss", nan_loss)
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match="updates in a row had a NaN/Inf loss"):
        _train(tiny_model_dir, sft_file, out, max_nonfinite_updates=2)
    assert not (out / LOCK_FILE).exists()  # another host would read a lock left behind as "in use"


def test_sigterm_from_a_launcher_releases_the_lock(tmp_path):
    """A launcher stops the other processes with SIGTERM when one fails; the lock goes with them."""
    out = tmp_path / "run"
    script = textwrap.dedent(f"""
        import time
        import alignkit
        import alignkit.methods.sft as sft
        from alignkit.training.checkpoint import acquire_run_lock

        def busy(cfg):  # a run that took the lock and is training
            acquire_run_lock(cfg.training.output_dir)
            print("training", flush=True)
            time.sleep(60)

        sft.run = busy
        alignkit.train("sft", data={{"train": ["x.jsonl"]}}, training={{"output_dir": {str(out)!r}}})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"))
    try:
        assert proc.stdout.readline().strip() == "training"
        assert (out / LOCK_FILE).is_file()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        proc.kill()
        proc.wait()
    assert not (out / LOCK_FILE).exists()


@pytest.mark.parametrize("content", ["", "{not json", '{"pid": null, "host": null}'])
def test_an_empty_or_unreadable_lock_says_so_and_how_to_clear_it(tmp_path, content):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).write_text(content)
    with pytest.raises(TrainingError) as e:
        acquire_run_lock(out)
    text = str(e.value)
    assert "None" not in text
    assert text.startswith(f"{out / LOCK_FILE}: the run lock of training.output_dir={out} is empty or unreadable")
    assert f"delete {out / LOCK_FILE}" in text
    assert (out / LOCK_FILE).read_text() == content  # left for the user to judge


# -- "holds a run": a checkpoint or a final model, decided before data and models load ---------------------


def test_holds_a_run_is_decided_before_the_data_loads(tmp_path, tiny_model_dir, sft_file):
    out = tmp_path / "run"
    _train(tiny_model_dir, sft_file, out)  # save_steps=0: the final model only, no checkpoint
    assert not list_checkpoints(out)
    with pytest.raises(TrainingError, match=rf"training.output_dir={out} already holds a run"):
        _train(tiny_model_dir, tmp_path / "missing.jsonl", out)  # refused before the data error


def test_a_damaged_checkpoint_to_resume_is_refused_before_the_data_loads(tmp_path, tiny_model_dir, sft_file):
    out = tmp_path / "run"
    _train(tiny_model_dir, sft_file, out, save_steps=2)
    state = out / "checkpoint-2" / TRAINER_STATE / "model.safetensors"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(TrainingError) as e:
        _train(tiny_model_dir, tmp_path / "missing.jsonl", out, max_steps=4, resume="latest")
    text = str(e.value)
    assert text.startswith(f"training.resume=latest: {state} is damaged (SafetensorError")
    assert "no earlier complete checkpoint" in text and "overwrite_output_dir=true" in text
    with pytest.raises(TrainingError, match=rf"training.resume={out / 'checkpoint-2'}: {state} is damaged"):
        _train(tiny_model_dir, sft_file, tmp_path / "other", max_steps=4, resume=str(out / "checkpoint-2"))


# -- a run from scratch, a damaged latest checkpoint --------------------------------------------------------


def test_a_run_killed_during_its_first_checkpoint_starts_over_with_a_fresh_metrics_file(tmp_path, tiny_model_dir,
                                                                                        sft_file, monkeypatch, caplog):
    from alignkit.training import checkpoint

    class Killed(Exception):
        pass

    real = checkpoint.save_trainer_state

    def killed_while_writing(accelerator, model, optimizer, scheduler, folder, **kw):
        (folder / "optimizer.pt").parent.mkdir(parents=True, exist_ok=True)
        (folder / "optimizer.pt").write_bytes(b"partial")
        raise Killed()

    monkeypatch.setattr(checkpoint, "save_trainer_state", killed_while_writing)
    out = tmp_path / "run"
    logs = {"logging_steps": 1, "report_to": ["jsonl", "tensorboard"]}
    with pytest.raises(Killed):
        _train(tiny_model_dir, sft_file, out, max_steps=4, save_steps=2, **logs)
    assert _steps(out) == [1, 2] and (out / ".tmp-checkpoint-2").is_dir() and not list_checkpoints(out)
    monkeypatch.setattr(checkpoint, "save_trainer_state", real)
    with caplog.at_level("INFO", logger="alignkit"):
        res = _train(tiny_model_dir, sft_file, out, max_steps=4, save_steps=2, resume="latest", **logs)
    assert res["step"] == 4 and _steps(out) == [1, 2, 3, 4]  # each step once, not 1, 2, 1, 2, 3, 4
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4]  # TensorBoard hides the first attempt's too
    assert "no complete checkpoint; starting from scratch" in caplog.text
    assert "dropped 2 metrics.jsonl record(s) of an earlier attempt" in caplog.text
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, tiny_model_dir, sft_file, caplog):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    kw = {"save_steps": 1, "lr_scheduler": "constant"}  # constant: max_steps may change without changing updates
    _train(tiny_model_dir, sft_file, out, max_steps=4, **kw)
    straight = {k: v.clone() for k, v in load_file(str(out / "checkpoint-4" / TRAINER_STATE / "model.safetensors")).items()}
    for step in (1, 3):
        (out / f"checkpoint-{step}").rename(out / f"kept-{step}")  # checkpoints 2 and 4 left
    damaged = out / "checkpoint-4" / TRAINER_STATE / "model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])  # cut short, as by a full disk
    with caplog.at_level("INFO", logger="alignkit"):
        _train(tiny_model_dir, sft_file, out, max_steps=3, resume="latest", save_total_limit=1, **kw)
    assert f"{damaged} is damaged (SafetensorError" in caplog.text
    assert f"resuming from the previous checkpoint, {out / 'checkpoint-2'}, instead" in caplog.text
    assert f"resumed from {out / 'checkpoint-2'} at step 2" in caplog.text
    # save_total_limit=1: the checkpoint just written stays; the damaged later one does not crowd it out
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-3", "checkpoint-4"]
    caplog.clear()
    with caplog.at_level("INFO", logger="alignkit"):
        res = _train(tiny_model_dir, sft_file, out, max_steps=4, resume="latest", save_total_limit=1, **kw)
    assert f"resumed from {out / 'checkpoint-3'} at step 3" in caplog.text
    assert res["step"] == 4 and _steps(out) == [1, 2, 3, 4]
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-4"]  # rewritten whole at step 4
    redone = load_file(str(damaged))
    for k in straight:  # 2 -> 3 -> 4 redid the same updates as the straight run
        torch.testing.assert_close(redone[k], straight[k], rtol=1e-5, atol=1e-6, msg=k)


def test_an_online_run_killed_during_its_first_checkpoint_starts_over_with_fresh_metrics_and_samples(
        tmp_path, tiny_model_dir, monkeypatch):
    from conftest import WORD_SHARE_REWARD

    from alignkit.training import checkpoint

    class Killed(Exception):
        pass

    (tmp_path / "toy_reward.py").write_text(WORD_SHARE_REWARD)
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"tell me about {w}"}) + "\n"
                                                    for w in ["cats", "dogs", "trees", "birds"] * 2))
    out = tmp_path / "grpo"

    def grpo(**training):
        t = {"output_dir": str(out), "max_steps": 2, "save_steps": 2, "per_device_batch_size": 8,
             "report_to": ["jsonl"], "mixed_precision": "no", **training}
        section = {"generation": {"max_new_tokens": 4, "num_samples": 2}, "rollout_batch_size": 4, "log_samples": 3,
                   "reward": {"functions": [f"{tmp_path / 'toy_reward.py'}:word_share"]}}
        return alignkit.train("grpo", model={"name_or_path": str(tiny_model_dir), "dtype": "float32"},
                              data={"train": [str(tmp_path / "prompts.jsonl")], "max_length": 32}, training=t,
                              grpo=section)

    def killed_while_writing(*args, **kw):
        raise Killed()

    real = checkpoint.save_trainer_state
    monkeypatch.setattr(checkpoint, "save_trainer_state", killed_while_writing)
    with pytest.raises(Killed):
        grpo()
    samples = out / "samples.jsonl"
    assert _steps(out) == [1, 2] and [json.loads(x)["step"] for x in samples.read_text().splitlines()] == [1] * 3 + [2] * 3
    monkeypatch.setattr(checkpoint, "save_trainer_state", real)
    assert grpo(resume="latest")["step"] == 2
    assert _steps(out) == [1, 2]  # not 1, 2, 1, 2
    assert [json.loads(x)["step"] for x in samples.read_text().splitlines()] == [1] * 3 + [2] * 3


@pytest.mark.distributed
@pytest.mark.xdist_group("distributed")
def test_two_processes_that_fail_before_training_leave_the_folder_free(tmp_path, tiny_model_dir, sft_file):
    """Through the launcher (--num-processes 2): each process stops on the error, the lock goes with rank 0."""
    import yaml

    out = tmp_path / "run"
    cfg = {"model": {"name_or_path": str(tiny_model_dir), "dtype": "float32"},
           "data": {"train": [str(sft_file)], "max_length": 64},
           "training": {"output_dir": str(out), "max_steps": 2, "per_device_batch_size": 16, "report_to": ["jsonl"],
                        "mixed_precision": "no", "save_steps": 0}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")

    def train(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "alignkit.cli", "train", "sft", str(tmp_path / "cfg.yaml"),
                               "--num-processes", "2", *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)

    failed = train()  # 16 rows < 16 per process x 2 processes
    assert failed.returncode == 2 and "less than one global batch" in failed.stderr, failed.stderr[-3000:]
    assert not (out / LOCK_FILE).exists()
    fixed = train("--set", "training.per_device_batch_size=4")
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    assert "already holds a run" not in fixed.stderr and (out / "config.json").is_file()
