"""Online RL with multi-turn environments (alignkit.rollout.multiturn): GRPO learns a 2-turn toy task, the loss
only sees sampled tokens, and a multi-turn run killed with SIGKILL resumes exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import alignkit
from alignkit.config import ConfigError

ENV = '''
import re
from alignkit.rollout.environment import StepResult


class TwoTurns:
    """Two assistant turns; each scores the share of the word "good" in it (halved), a tool message between."""

    tools = None

    def __init__(self):
        self.turn = 0

    def reset(self, row):
        return None  # the row's prompt

    def step(self, message):
        self.turn += 1
        words = re.findall(r"[a-z0-9']+", message["content"].lower())
        share = sum(w == "good" for w in words) / len(words) if words else 0.0
        if self.turn >= 2:
            return StepResult(reward=share / 2, done=True)
        return StepResult([{"role": "tool", "content": "the cat sat on the mat"}], reward=share / 2)


def make_env(row):
    return TwoTurns()
'''


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ending_model_dir(tmp_path_factory) -> Path:
    """The tiny Llama whose eos row points along its mean hidden state, so turns end after a few tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignkit.testing import save_tiny_llama

    path = save_tiny_llama(tmp_path_factory.mktemp("ending-llama"))
    tok, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)
    ids = tok("<|im_start|>user\nthe cat sat on the mat<|im_end|>\n<|im_start|>assistant\nhello world the dog",
              return_tensors="pt").input_ids
    with torch.no_grad():
        mean = model.model(ids).last_hidden_state[0].mean(0)
        model.lm_head.weight[tok.eos_token_id] = 0.9 * mean / mean.norm()
    model.save_pretrained(path)
    return path


@pytest.fixture
def env_spec(tmp_path) -> str:
    path = tmp_path / "two_turns.py"
    path.write_text(ENV)
    return f"{path}:make_env"


@pytest.fixture
def prompts(tmp_path) -> Path:
    import random

    from alignkit.testing import _WORDS

    rng = random.Random(0)
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": " ".join(
        rng.choice(_WORDS) for _ in range(5))}]}) + "\n" for _ in range(64)))
    return path


def _train(method: str, model_dir: Path, prompts: Path, out: Path, env_spec: str, *, training=None, **fields):
    t = {"output_dir": str(out), "max_steps": 16, "learning_rate": 1e-2, "per_device_batch_size": 4,
         "lr_scheduler": "constant", "report_to": ["jsonl"], "seed": 0, "mixed_precision": "no"}
    t.update(training or {})
    section = {"generation": {"max_new_tokens": 8, "num_samples": 4}, "rollout_batch_size": 4, "kl_coef": 0.01,
               "environment": {"factory": env_spec, "max_turns": 3, "max_episode_tokens": 64}, **fields}
    return alignkit.train(method, model={"name_or_path": str(model_dir), "dtype": "float32"},
                          data={"train": [str(prompts)], "max_length": 64}, training=t, **{method: section})


def _metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_grpo_learns_a_two_turn_environment(tmp_path, ending_model_dir, prompts, env_spec):
    out = tmp_path / "grpo"
    _train("grpo", ending_model_dir, prompts, out, env_spec, log_samples=2)
    rows = _metrics(out)
    rewards = [r["reward"] for r in rows]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.1, rewards
    assert rows[0]["env/turns"] > 1.3  # episodes really take several turns
    assert all(r["reward/environment"] == pytest.approx(r["reward"]) for r in rows)
    for key in ("env/stop_done", "env/stop_no_eos", "env/stop_max_turns", "env/tool_errors", "kl"):
        assert key in rows[0], key
    sample = json.loads((out / "samples.jsonl").read_text().splitlines()[0])
    roles = [m["role"] for m in sample["episode"]]
    assert roles[:2] == ["user", "assistant"] and sample["turns"] == roles.count("assistant")
    assert sample["stop"] in ("done", "no_eos", "max_turns", "token_budget")  # marked per episode
    assert sum(rows[0][f"env/stop_{s}"] for s in ("done", "no_eos", "max_turns", "token_budget", "timeout")) == \
        pytest.approx(1.0)  # every episode counted under one reason
    if sample["turns"] == 2:
        assert roles == ["user", "assistant", "tool", "assistant"]


def test_environment_tokens_get_no_gradient(tmp_path, ending_model_dir, prompts, env_spec, monkeypatch):
    """The policy loss is masked by the action mask: tokens the environment added weigh nothing."""
    import alignkit.methods.online_rl as online_rl

    seen = []
    real = online_rl.policy_terms

    def spy(fwd, old, adv, mask, *args, **kwargs):
        seen.append(mask.clone())
        return real(fwd, old, adv, mask, *args, **kwargs)

    monkeypatch.setattr(online_rl, "policy_terms", spy)
    real_forward = online_rl.response_forward
    batches = []

    def forward_spy(model, part, *args, **kwargs):
        batches.append(part)
        return real_forward(model, part, *args, **kwargs)

    monkeypatch.setattr(online_rl, "response_forward", forward_spy)
    _train("grpo", ending_model_dir, prompts, tmp_path / "mask", env_spec, training={"max_steps": 2})
    holes = 0
    for mask, part in zip(seen, batches):
        assert torch.equal(mask, part.action_mask)
        holes += int((part.response_mask.bool() & ~part.action_mask.bool()).sum())
    assert holes > 0  # some environment tokens were in the batches, and masked


HELD_ENV = ENV + '''

import os
import threading
from pathlib import Path


class Held(TwoTurns):
    """With HOLD_RUN set: once checkpoint-2 and step 3's metrics are written, the next step() says so in a file
    and never returns (the test kills the process with SIGKILL there, mid-episode in step 4)."""

    def step(self, message):
        out = Path(os.environ["HOLD_RUN"])
        metrics = out / "metrics.jsonl"
        if (out / "checkpoint-2").is_dir() and metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
            (out.parent / "held").write_text("")
            threading.Event().wait()
        return super().step(message)


def make_held_env(row):
    return Held() if os.environ.get("HOLD_RUN") else TwoTurns()
'''


def test_multi_turn_run_killed_with_sigkill_resumes_exactly(tmp_path, ending_model_dir, prompts):
    """A real training process is killed with SIGKILL in the middle of an episode of step 4 (after checkpoint 2 and
    step 3's log lines); ``--resume`` replays steps 3 and 4 to the same metrics, samples and final weights as an
    uninterrupted run (ppo_epochs 2, gradient accumulation: the optimizer and data order resume too)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml
    from safetensors.torch import load_file

    env_file = tmp_path / "held.py"
    env_file.write_text(HELD_ENV)
    spec = f"{env_file}:make_held_env"
    training = {"max_steps": 4, "save_steps": 2, "per_device_batch_size": 2, "gradient_accumulation_steps": 2,
                "learning_rate": 3e-3}
    _train("grpo", ending_model_dir, prompts, tmp_path / "straight", spec, training=training, ppo_epochs=2,
           log_samples=2)

    out = tmp_path / "killed"
    cfg = {"model": {"name_or_path": str(ending_model_dir), "dtype": "float32"},
           "data": {"train": [str(prompts)], "max_length": 64},
           "training": {"output_dir": str(out), "lr_scheduler": "constant",
                        "report_to": ["jsonl"], "seed": 0, "mixed_precision": "no", **training},
           "grpo": {"generation": {"max_new_tokens": 8, "num_samples": 4}, "rollout_batch_size": 4, "kl_coef": 0.01,
                    "ppo_epochs": 2, "log_samples": 2,
                    "environment": {"factory": spec, "max_turns": 3, "max_episode_tokens": 64}}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    command = [sys.executable, "-m", "alignkit.cli", "train", "grpo", str(tmp_path / "run.yaml")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(command, cwd=tmp_path, env=dict(env, HOLD_RUN=str(out)), stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + 300
            while not (tmp_path / "held").exists():
                assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "the run never reached step 4"
                time.sleep(0.05)
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait(timeout=60) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert not (out / "checkpoint-4").exists()

    resumed = subprocess.run([*command, "--resume"], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = _metrics(tmp_path / "straight"), _metrics(out)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for key in ("reward", "loss/policy", "kl", "env/turns", "response_length", "env/stop_done",
                    "env/stop_no_eos"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-6), (ra["step"], key)
    samples = [[json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
               for run in (tmp_path / "straight", out)]
    assert [(s["step"], s["episode"], s["stop"], s["turns"]) for s in samples[0]] == \
        [(s["step"], s["episode"], s["stop"], s["turns"]) for s in samples[1]]  # the same episodes, each once
    sa, sb = load_file(tmp_path / "straight" / "model.safetensors"), load_file(out / "model.safetensors")
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6, msg=k)


def test_environment_config_errors_name_the_keys(tmp_path, ending_model_dir, prompts, env_spec):
    with pytest.raises(ConfigError, match="grpo.environment.max_turns"):
        _train("grpo", ending_model_dir, prompts, tmp_path / "a", env_spec,
               environment={"factory": env_spec, "max_turns": 0})
    with pytest.raises(ConfigError, match="grpo.environment: multi-turn episodes run on the hf and vllm samplers, not "
                                          "grpo.generation.sampler=vllm_server"):
        _train("grpo", ending_model_dir, prompts, tmp_path / "c", env_spec, generation={"sampler": "vllm_server"})
    with pytest.raises(ConfigError, match="grpo.reward: no reward source"):
        _train("grpo", ending_model_dir, prompts, tmp_path / "b", env_spec, environment={"factory": None})


RANKED_ENV = ENV + '''

import os


class ByRank(TwoTurns):
    """Process 0's episodes end after one turn, process 1's take three: the processes take different numbers of
    turns, and ZeRO-3's weight gathering per generate is collective."""

    def step(self, message):
        result = super().step(message)
        result.done = os.environ.get("RANK") == "0" or self.turn >= 3
        return result


def make_ranked_env(row):
    return ByRank()
'''


@pytest.mark.distributed
@pytest.mark.xdist_group("distributed")
def test_zero3_two_processes_with_different_numbers_of_turns(tmp_path, ending_model_dir, prompts):
    import os
    import subprocess
    import sys

    import yaml

    env_file = tmp_path / "ranked.py"
    env_file.write_text(RANKED_ENV)
    cfg = {"model": {"name_or_path": str(ending_model_dir), "dtype": "float32"},
           "data": {"train": [str(prompts)], "max_length": 64},
           "training": {"output_dir": str(tmp_path / "z3"), "max_steps": 2, "per_device_batch_size": 4,
                        "learning_rate": 1e-2, "report_to": ["jsonl"], "seed": 0, "mixed_precision": "no"},
           "grpo": {"generation": {"max_new_tokens": 8, "num_samples": 2}, "rollout_batch_size": 2, "kl_coef": 0.0,
                    "environment": {"factory": f"{env_file}:make_ranked_env", "max_turns": 3}}}
    path = tmp_path / "z3.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "alignkit.cli", "train", "grpo", str(path), "--num-processes", "2",
                           "--deepspeed", "zero3"], cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    rows = _metrics(tmp_path / "z3")
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["env/turns"] > 1  # averaged over both processes: process 1 took more than one turn
