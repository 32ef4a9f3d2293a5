"""training.fsdp (PyTorch FSDP2 through accelerate) on CPU processes with gloo: the same run as one process,
exact resume from gathered full-tensor trainer state, plain HF folders, LoRA, DPO with its reference, PPO."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import WORD_SHARE_REWARD

from tests.methods import preference_records, write_jsonl
from tests.test_distributed import _run

pytestmark = [pytest.mark.distributed, pytest.mark.xdist_group("distributed")]


def _config(tmp_path: Path, model_dir: Path, data: Path, out: str, section: dict | None = None,
            method: str = "sft", model: dict | None = None, **training) -> Path:
    t = {"output_dir": str(tmp_path / out), "max_steps": 4, "learning_rate": 3e-3, "per_device_batch_size": 4,
         "report_to": ["jsonl"], "seed": 7, "mixed_precision": "no", "lr_scheduler": "constant"}
    t.update(training)
    cfg = {"model": {"name_or_path": str(model_dir), "dtype": "float32", **(model or {})},
           "data": {"train": [str(data)], "max_length": 64}, "training": t}
    if section:
        cfg[method] = section
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_fsdp_two_processes_match_one_resume_exactly_and_save_a_plain_hf_folder(tmp_path, tiny_model_dir, sft_file):
    """One process x batch 4 for 4 steps equals two FSDP2 processes x batch 2 that stop after 2 steps (a
    checkpoint) and resume to 4: the gathered full-tensor optimizer state comes back into the shards."""
    one = _config(tmp_path, tiny_model_dir, sft_file, "one", fsdp="full_shard")
    _run(["train", "sft", str(one)], tmp_path)
    two = _config(tmp_path, tiny_model_dir, sft_file, "two", per_device_batch_size=2, max_steps=2, save_steps=2)
    _run(["train", "sft", str(two), "--num-processes", "2", "--fsdp", "full_shard"], tmp_path)
    state = tmp_path / "two" / "checkpoint-2" / "trainer_state"
    assert {p.name for p in state.iterdir()} >= {"fsdp.json", "model.safetensors", "optimizer.pt"}
    _run(["train", "sft", str(two), "--num-processes", "2", "--fsdp", "full_shard", "--resume",
          "--set", "training.max_steps=4"], tmp_path)
    l1, l2 = [r["loss"] for r in _metrics(tmp_path / "one")], [r["loss"] for r in _metrics(tmp_path / "two")]
    assert len(l1) == len(l2) == 4 and l1[-1] < l1[0]
    assert l2 == pytest.approx(l1, rel=1e-4)

    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    m1 = AutoModelForCausalLM.from_pretrained(tmp_path / "one").state_dict()
    m2 = AutoModelForCausalLM.from_pretrained(tmp_path / "two").state_dict()  # gathered from the shards
    assert m1.keys() == m2.keys() == base.keys()
    for k in base:
        assert not torch.equal(m2[k], base[k]) or "norm" in k, k  # trained, not a shard or the base weights
        torch.testing.assert_close(m2[k], m1[k], rtol=1e-4, atol=1e-5, msg=k)


def test_fsdp_lora_two_processes_trains_resumes_and_saves_a_plain_adapter(tmp_path, tiny_model_dir, sft_file):
    cfg = _config(tmp_path, tiny_model_dir, sft_file, "lora", model={"finetune": "lora"}, per_device_batch_size=2,
                  learning_rate=1e-2, max_steps=3, save_steps=3)
    _run(["train", "sft", str(cfg), "--num-processes", "2", "--fsdp", "full_shard"], tmp_path)
    _run(["train", "sft", str(cfg), "--num-processes", "2", "--fsdp", "full_shard", "--resume",
          "--set", "training.max_steps=6"], tmp_path)
    losses = [r["loss"] for r in _metrics(tmp_path / "lora")]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.5

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "lora")
    assert sum(float(p.abs().sum()) for n, p in model.named_parameters() if "lora_B" in n) > 0


def test_fsdp_dpo_with_a_frozen_reference_two_processes_learns(tmp_path, tiny_model_dir):
    """shard_grad_op (the other mode), and the reference whole on each process."""
    data = write_jsonl(tmp_path / "pref.jsonl", preference_records())
    cfg = _config(tmp_path, tiny_model_dir, data, "dpo", {"beta": 0.1}, method="dpo", per_device_batch_size=2,
                  learning_rate=5e-3, max_steps=6)
    _run(["train", "dpo", str(cfg), "--num-processes", "2", "--fsdp", "shard_grad_op"], tmp_path)
    rows = _metrics(tmp_path / "dpo")
    assert rows[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-4)  # the reference is the starting policy
    assert rows[-1]["rewards/margins"] > 0.1 and rows[-1]["loss"] < rows[0]["loss"]


def _prompts_and_reward(tmp_path: Path, n: int) -> tuple[Path, Path]:
    import random

    from alignkit.testing import _WORDS

    rng = random.Random(0)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": " ".join(rng.choice(_WORDS) for _ in range(5))}) + "\n"
                               for _ in range(n)))
    reward = tmp_path / "toy_reward.py"
    reward.write_text(WORD_SHARE_REWARD)
    return prompts, reward


def test_fsdp_grpo_two_processes_raises_the_reward(tmp_path, tiny_model_dir):
    """The online loop on FSDP2: generation on the gathered weights each rollout, then sharded training."""
    prompts, reward = _prompts_and_reward(tmp_path, 64)
    section = {"generation": {"max_new_tokens": 8, "num_samples": 4}, "rollout_batch_size": 2, "kl_coef": 0.01,
               "reward": {"functions": [f"{reward}:word_share"]}}
    cfg = _config(tmp_path, tiny_model_dir, prompts, "grpo", section, method="grpo", learning_rate=1e-2,
                  max_steps=12, seed=0)
    _run(["train", "grpo", str(cfg), "--num-processes", "2", "--fsdp", "full_shard"], tmp_path)
    rewards = [r["reward"] for r in _metrics(tmp_path / "grpo")]
    assert len(rewards) == 12 and sum(rewards[-4:]) / 4 > sum(rewards[:4]) / 4 + 0.08, rewards


def test_fsdp_ppo_two_processes_generates_trains_policy_and_critic(tmp_path, tiny_model_dir):
    prompts, reward = _prompts_and_reward(tmp_path, 32)
    section = {"generation": {"max_new_tokens": 8, "num_samples": 2}, "reward": {"functions": [f"{reward}:word_share"]},
               "rollout_batch_size": 2, "kl_coef": 0.01, "ppo_epochs": 2}
    cfg = _config(tmp_path, tiny_model_dir, prompts, "ppo", section, method="ppo", learning_rate=1e-2, max_steps=2,
                  save_steps=1, save_total_limit=1)
    _run(["train", "ppo", str(cfg), "--num-processes", "2", "--fsdp", "full_shard"], tmp_path)
    rows = _metrics(tmp_path / "ppo")
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-4) and rows[1]["kl"] > 0  # the policy moved
    assert all(torch.isfinite(torch.tensor(float(r[k]))) for r in rows for k in ("loss/policy", "loss/value"))

    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    out = tmp_path / "ppo"
    policy = AutoModelForCausalLM.from_pretrained(out).state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert sum(not torch.equal(v, base[k]) for k, v in policy.items()) > len(base) // 2
    critic = AutoModelForSequenceClassification.from_pretrained(out / "critic")
    assert critic.score.weight.abs().sum() > 0  # the zero-initialised value head trained
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-2"]


_WEIGHTS_SCRIPT = """
import json, sys, torch
from alignkit.config import TrainingConfig
from alignkit.rollout.weights import policy_weights
from alignkit.testing import tiny_llama
from alignkit.training.accelerator import plan_fsdp2, setup_accelerator

acc = setup_accelerator(TrainingConfig(fsdp="full_shard", mixed_precision="no"))
model = tiny_llama(seed=0)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
plan_fsdp2(acc, model)
model, optimizer = acc.prepare(model, optimizer)
sharded = [n for n, p in model.named_parameters() if type(p).__name__ == "DTensor"]
reference = dict(tiny_llama(seed=0).named_parameters())
sent = dict(policy_weights(model))
same = sorted(sent) == sorted(reference) and all(torch.equal(sent[k], reference[k].detach()) for k in reference)
after = all(type(p).__name__ == "DTensor" for n, p in model.named_parameters() if n in sharded)
x = torch.randint(0, 500, (2, 16))
acc.backward(model(input_ids=x, labels=x).loss)
optimizer.step()
local = lambda t: t.to_local() if type(t).__name__ == "DTensor" else t
held = {"policy weights": sum(local(p).nbytes for p in model.parameters()),
        "gradients": sum(local(p.grad).nbytes for p in model.parameters()),
        "optimizer states (AdamW m, v)": sum(local(v).nbytes for st in optimizer.state.values()
                                             for k, v in st.items() if k != "step")}
print(json.dumps({"rank": acc.process_index, "sharded": len(sharded), "same": same, "sharded_after": after,
                  "held": held}))
"""


def test_fsdp_weights_for_vllm_are_the_whole_model_gathered_from_the_shards(tmp_path, tiny_model_dir):
    """The vllm samplers' weight sync under FSDP2: every process sends the full weights (gathered, copied),
    and the model is sharded again after. Then one update: the bytes of parameters, gradients and AdamW
    state each process holds are what ``alignkit estimate`` says for FSDP2 full_shard on 2 processes."""
    import os
    import subprocess
    import sys

    from alignkit.launch import free_port

    script = tmp_path / "weights.py"
    script.write_text(_WEIGHTS_SCRIPT)
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1"))
             for r in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][1][-3000:] + outs[1][1][-3000:]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    for r in results:
        assert r["sharded"] > 0 and r["same"] and r["sharded_after"], r

    import alignkit
    from alignkit.estimate import estimate
    from alignkit.testing import tiny_llama

    cfg = alignkit.build_config("sft", {"model": {"name_or_path": str(tiny_model_dir), "dtype": "float32"},
                                        "training": {"fsdp": "full_shard", "mixed_precision": "no"}})
    predicted = estimate(cfg, 2, 80, device="cpu", suggest=False).phases["optimizer"]
    full = sum(p.numel() * 4 for p in tiny_llama().parameters())
    for name in ("policy weights", "gradients", "optimizer states (AdamW m, v)"):
        held = sum(r["held"][name] for r in results)
        assert held == (2 if "optimizer" in name else 1) * full, name  # the shards add up to the whole
        for r in results:
            assert r["held"][name] == pytest.approx(predicted[name], rel=0.02), name
