"""Several CPU processes through the CLI launcher: DDP parity with one process, and ZeRO-3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.distributed, pytest.mark.xdist_group("distributed")]


def _run(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "alignkit.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def _config(tmp_path: Path, model_dir: Path, data: Path, out: str, **training) -> Path:
    t = {"output_dir": str(tmp_path / out), "max_steps": 4, "learning_rate": 3e-3, "per_device_batch_size": 4,
         "report_to": ["jsonl"], "seed": 7, "mixed_precision": "no"}
    t.update(training)
    cfg = {"model": {"name_or_path": str(model_dir), "dtype": "float32"},
           "data": {"train": [str(data)], "max_length": 64}, "training": t}
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _losses(out: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_ddp_two_processes_match_one(tmp_path, tiny_model_dir, sft_file):
    one = _config(tmp_path, tiny_model_dir, sft_file, "one", per_device_batch_size=4)
    two = _config(tmp_path, tiny_model_dir, sft_file, "two", per_device_batch_size=2)
    _run(["train", "sft", str(one)], tmp_path)
    _run(["train", "sft", str(two), "--num-processes", "2"], tmp_path)
    l1, l2 = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(l1) == len(l2) == 4
    for a, b in zip(l1, l2):
        assert a == pytest.approx(b, rel=1e-4)
    import torch
    from transformers import AutoModelForCausalLM

    m1 = AutoModelForCausalLM.from_pretrained(tmp_path / "one")
    m2 = AutoModelForCausalLM.from_pretrained(tmp_path / "two")
    for (k, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=k)


def test_sft_zero3_two_processes_trains_saves_and_resumes_exactly(tmp_path, tiny_model_dir, sft_file):
    cfg = _config(tmp_path, tiny_model_dir, sft_file, "z3", per_device_batch_size=2, max_steps=8,
                  lr_scheduler="constant")
    _run(["train", "sft", str(cfg), "--num-processes", "2", "--deepspeed", "zero3"], tmp_path)
    losses = _losses(tmp_path / "z3")
    assert losses[-1] < losses[0]
    # 4 steps and a checkpoint, then resume to 8 (max_steps may change on resume): DeepSpeed's partitioned
    # optimizer state comes back through the safe loader, and the losses continue exactly
    half = _config(tmp_path, tiny_model_dir, sft_file, "z3-resumed", per_device_batch_size=2, max_steps=4,
                   save_steps=4, lr_scheduler="constant")
    _run(["train", "sft", str(half), "--num-processes", "2", "--deepspeed", "zero3"], tmp_path)
    state = tmp_path / "z3-resumed" / "checkpoint-4" / "trainer_state"
    assert (state / "deepspeed").is_dir() and not list(state.rglob("*.pkl"))
    _run(["train", "sft", str(half), "--num-processes", "2", "--deepspeed", "zero3", "--resume",
          "--set", "training.max_steps=8"], tmp_path)
    resumed = _losses(tmp_path / "z3-resumed")
    assert len(resumed) == 8
    for a, b in zip(losses, resumed):
        assert a == pytest.approx(b, rel=1e-4)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "z3")  # a plain, complete HF folder
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    changed = [k for k, v in model.state_dict().items() if not (v == base.state_dict()[k]).all()]
    assert len(changed) == len(base.state_dict())  # every tensor trained and saved (none left partitioned)
