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


def test_single_process_deepspeed_runs_as_a_group_of_one(tmp_path, tiny_model_dir, sft_file):
    cfg = _config(tmp_path, tiny_model_dir, sft_file, "z3-one", max_steps=2)
    proc = _run(["train", "sft", str(cfg), "--deepspeed", "zero3"], tmp_path)
    assert len(_losses(tmp_path / "z3-one")) == 2
    # quiet output: neither DeepSpeed's CPU note nor torch's deprecation warnings about DeepSpeed's collectives
    assert "FutureWarning" not in proc.stderr and "Setting accelerator to CPU" not in proc.stderr, proc.stderr[-3000:]


def _adapter_changes_the_base(out: Path, base_dir: Path) -> bool:
    """The saved adapter loads with plain peft on the full-precision base, and it trained (LoRA B != 0)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out)
    return sum(float(p.abs().sum()) for n, p in model.named_parameters() if "lora_B" in n) > 0


def test_qlora_under_zero3_with_two_processes_trains_and_saves_a_plain_adapter(tmp_path, tiny_model_dir, sft_file):
    """The seeds hit "output tensor must have the same type as input tensor" here; alignkit packs the 4-bit
    weights in the run dtype (bnb_4bit_quant_storage) so ZeRO-3 can shard them."""
    cfg = _config(tmp_path, tiny_model_dir, sft_file, "qlora-z3", per_device_batch_size=2, max_steps=6,
                  learning_rate=1e-2, lr_scheduler="constant")
    _run(["train", "sft", str(cfg), "--num-processes", "2", "--deepspeed", "zero3", "--set", "model.finetune=qlora"],
         tmp_path)
    losses = _losses(tmp_path / "qlora-z3")
    assert losses[-1] < losses[0]
    assert _adapter_changes_the_base(tmp_path / "qlora-z3", tiny_model_dir)


def test_rloo_with_qlora_under_zero3_trains(tmp_path, tiny_model_dir):
    import random

    from alignkit.testing import _WORDS

    rng = random.Random(0)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": " ".join(rng.choice(_WORDS) for _ in range(4))}) + "\n"
                               for _ in range(32)))
    reward = tmp_path / "length.py"  # varies between samples, so the advantages are not all zero
    reward.write_text("def length(prompts, completions, **_):\n    return [len(c) / 10 for c in completions]\n")
    cfg = {"model": {"name_or_path": str(tiny_model_dir), "dtype": "float32", "finetune": "qlora"},
           "data": {"train": [str(prompts)], "max_length": 32},
           "training": {"output_dir": str(tmp_path / "rloo"), "max_steps": 3, "learning_rate": 1e-2,
                        "per_device_batch_size": 4, "report_to": ["jsonl"], "mixed_precision": "no"},
           "rloo": {"generation": {"num_samples": 2, "max_new_tokens": 6},
                    "reward": {"functions": [f"{reward}:length"]}, "rollout_batch_size": 2}}
    path = tmp_path / "rloo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    _run(["train", "rloo", str(path), "--num-processes", "2", "--deepspeed", "zero3"], tmp_path)
    rows = [json.loads(x) for x in (tmp_path / "rloo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["kl"] > 0  # the adapter moved the policy
    assert _adapter_changes_the_base(tmp_path / "rloo", tiny_model_dir)


def test_two_nodes_of_one_process_train_as_one_run(tmp_path, tiny_model_dir, sft_file):
    """torchrun --nnodes 2: two "nodes" on this machine meet at one rendezvous endpoint and train as one run,
    matching one process with the same global batch."""
    from alignkit.launch import free_port

    one = _config(tmp_path, tiny_model_dir, sft_file, "single", per_device_batch_size=4)
    two = _config(tmp_path, tiny_model_dir, sft_file, "nodes", per_device_batch_size=2)
    _run(["train", "sft", str(one)], tmp_path)
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node",
                               "1", "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port",
                               str(port), "-m", "alignkit.cli", "train", "sft", str(two)],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    outputs = [p.communicate(timeout=300)[0] for p in nodes]
    assert all(p.returncode == 0 for p in nodes), outputs[0][-3000:] + outputs[1][-3000:]
    for a, b in zip(_losses(tmp_path / "single"), _losses(tmp_path / "nodes")):
        assert a == pytest.approx(b, rel=1e-4)


def test_eval_loss_is_the_mean_over_eval_rows_fewer_than_processes(tmp_path, tiny_model_dir, sft_file):
    """README-style eval_split with packing leaves one packed eval row: the second process has none. Its
    eval/loss was 0.0 (the row was dropped to give both processes the same count); it is the mean over the
    rows that exist, as with one process."""
    def config(out: str, batch: int) -> Path:
        path = _config(tmp_path, tiny_model_dir, sft_file, out, per_device_batch_size=batch, eval_steps=2)
        cfg = yaml.safe_load(path.read_text())
        cfg["data"]["eval_split"] = 0.05
        cfg["sft"] = {"packing": True}
        path.write_text(yaml.safe_dump(cfg))
        return path

    _run(["train", "sft", str(config("one", 2))], tmp_path)
    two = _run(["train", "sft", str(config("two", 1)), "--num-processes", "2"], tmp_path)

    def evals(out: str) -> list[float]:
        rows = [json.loads(x) for x in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]
        return [r["eval/loss"] for r in rows if "eval/loss" in r]

    e1, e2 = evals("one"), evals("two")
    assert len(e1) == len(e2) == 2 and min(e1) > 1.0
    assert e2 == pytest.approx(e1, rel=1e-4)
    assert (two.stdout + two.stderr).count("only 1 eval row") == 1  # said once, in one line
