"""``async_steps``: rollouts sampled ahead while the policy trains (alignkit.rollout.ahead). The queue keeps
step order, policy versions and the staleness bound; GRPO with the hf sampler one step ahead learns, logs its
staleness and recomputes the old log-probs; a run killed with SIGKILL mid-run and resumed trains on every
prompt of the stream exactly once; the config errors."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch
import yaml

from alignkit import build_config
from alignkit.config import ConfigError
from alignkit.rollout.ahead import RolloutsAhead
from tests.methods import test_online_rl as base

_metrics, _train = base._metrics, base._train
_one_thread, prompts, reward_spec = base._one_thread, base.prompts, base.reward_spec  # fixtures


class FakeSampler:
    """Records what the queue asks: the weights it holds (a version number) and which prompts it samples."""

    def __init__(self):
        self.weights, self.log = None, []

    def sync_weights(self, model):
        self.weights = model

    def submit(self, prompts, *, seed=None, logps=False) -> Future:
        self.log.append((self.weights, seed, prompts))
        future = Future()
        future.set_result({"weights": self.weights, "prompts": prompts})
        return future

    def close(self):
        self.log.append("closed")


def _queue(depth: int, end: int = 10) -> tuple[RolloutsAhead, FakeSampler]:
    sampler = FakeSampler()
    batches = iter([[{"prompt_ids": [i]}] for i in range(100)])
    return RolloutsAhead(sampler, batches, depth=depth, end=end, seed=lambda s: 1000 + s, logps=False), sampler


def test_the_queue_keeps_step_order_versions_and_the_staleness_bound():
    ahead, sampler = _queue(depth=2, end=5)
    ahead.push("v0", 0)  # steps 0, 1, 2 start with the first weights
    assert [(w, s, p) for w, s, p in sampler.log] == [("v0", 1000, [[0]]), ("v0", 1001, [[1]]), ("v0", 1002, [[2]])]
    staleness = []
    for step in range(5):
        rows, rollout, lag, _ = ahead.take(step)
        assert rows == [{"prompt_ids": [step]}] and rollout["prompts"] == [[step]]  # prompt batch `step` of the stream
        staleness.append(lag)
        ahead.push(f"v{step + 1}", step + 1)
    assert staleness == [0, 1, 2, 2, 2]
    assert len(sampler.log) == 5 and not ahead.pending  # nothing past `end`
    assert ahead.push("v6", 6)[1] is None and sampler.weights == "v2"  # no weights sent once all are sampled

    ahead, sampler = _queue(depth=1)
    ahead.push("v0", 0)
    ahead.take(0)
    ahead.push("v1", 1)
    ahead.take(1)  # no push after step 1: step 2's rollout (version 1) is fine, step 3 is not sampled yet
    rows, rollout, lag, _ = ahead.take(2)
    assert (rollout["weights"], lag) == ("v1", 1)
    ahead.close()
    assert sampler.log[-1] == "closed"

    ahead, sampler = _queue(depth=1)
    ahead.push("v0", 0)
    ahead.take(0)
    sampler.sync_weights("v1")  # as if version 1 had been pushed without new rollouts
    ahead.version = 1
    ahead.pending[0].version = -1  # and step 1's rollout were two versions behind: sampled again by version 1
    rows, rollout, lag, _ = ahead.take(1)
    assert (rollout["weights"], lag, rows) == ("v1", 0, [{"prompt_ids": [1]}])


def test_grpo_one_step_ahead_learns_and_logs_its_staleness(tmp_path, tiny_model_dir, prompts, reward_spec):
    """The hf sampler samples step s+1 from a copy of the policy while step s trains: staleness 0 at the first
    step, then 1; the trainer's old log-probs differ from the sampler's once the policy has moved (so they were
    recomputed, and tis_cap weighs the difference); the reward rises as in the synchronous loop."""
    out = tmp_path / "async"
    _train("grpo", tiny_model_dir, prompts, out, reward_spec, async_steps=1, tis_cap=2.0)
    rows = _metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 17))
    assert [r["async/staleness"] for r in rows] == [0.0] + [1.0] * 15
    assert rows[0]["sampler_logp_diff"] < 1e-5  # the first rollout: the policy's own weights
    assert min(r["sampler_logp_diff"] for r in rows[1:]) > 1e-2  # later: one update behind
    assert all(r["async/gen_wait"] >= 0 for r in rows)
    # every step sends its weights but the last two: the rollout of the last step is sampled after step 14
    assert all(r["weight_sync"] >= 0 for r in rows[:-2]) and not any("weight_sync" in r for r in rows[-2:])
    rewards = [r["reward"] for r in rows]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.1, rewards
    assert rows[-1]["epoch"] == 16 * 4 / 64  # the prompt batches trained on, not the ones sampled ahead


def _unique_prompts(path: Path, n: int) -> list[str]:
    from alignkit.testing import _WORDS

    rng = random.Random(0)
    texts = [f"{i} " + " ".join(rng.choice(_WORDS) for _ in range(4)) for i in range(n)]
    path.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    return texts


def test_kill_9_mid_run_then_resume_trains_every_prompt_exactly_once(tmp_path, tiny_model_dir, reward_spec):
    """A real run with async_steps 1 is killed with SIGKILL after it has trained past its last checkpoint (the
    next rollout sampled ahead), then resumed with --resume: over the whole run every prompt of one epoch is
    trained on exactly once (samples.jsonl logs every trained row; a resume drops the steps after its
    checkpoint), and every step once."""
    texts = _unique_prompts(tmp_path / "prompts.jsonl", 32)
    out = tmp_path / "run"
    cfg = {"model": {"name_or_path": str(tiny_model_dir), "dtype": "float32"},
           "data": {"train": [str(tmp_path / "prompts.jsonl")], "max_length": 64},
           "training": {"output_dir": str(out), "num_epochs": 1, "learning_rate": 1e-3, "per_device_batch_size": 4,
                        "save_steps": 2, "logging_steps": 1, "report_to": ["jsonl"], "seed": 0,
                        "mixed_precision": "no"},
           "grpo": {"generation": {"max_new_tokens": 8, "num_samples": 2}, "reward": {"functions": [reward_spec]},
                    "rollout_batch_size": 4, "kl_coef": 0.0, "async_steps": 1, "log_samples": 8}}
    path = tmp_path / "grpo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "alignkit.cli", "train", "grpo", str(path)]
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    metrics = out / "metrics.jsonl"
    # step 5 logged: checkpoint-4 is the last one, step 5 trained on, step 6's rollout sampled ahead
    while not (metrics.exists() and any(json.loads(x)["step"] >= 5 for x in metrics.read_text().splitlines())):
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "killed.log").read_text()[-3000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    log.close()
    killed = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    last_checkpoint = max(int(p.name.removeprefix("checkpoint-")) for p in out.glob("checkpoint-*"))
    assert max(s["step"] for s in killed) > last_checkpoint  # trained past the checkpoint it resumes from

    resumed = subprocess.run(command + ["--resume"], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert Counter(s["step"] for s in samples) == {step: 8 for step in range(1, 9)}  # 4 prompts x 2 samples
    trained = Counter(s["prompt"] for s in samples)
    assert trained == {t: 2 for t in texts}  # every prompt once (its 2 samples), none twice, none skipped
    rows = _metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 9)) and rows[-1]["epoch"] == 1.0


def test_config_errors():
    fn = {"functions": ["a:b"]}

    def grpo(**fields):
        training = fields.pop("training", {})
        return build_config("grpo", {"grpo": {"reward": fn, **fields}, "training": training})

    grpo(async_steps=2)  # hf and vllm_server accept it
    grpo(async_steps=1, generation={"sampler": "vllm_server"}, training={"deepspeed": "zero3"})
    with pytest.raises(ConfigError, match=r"grpo.async_steps=-1: must be >= 0"):
        grpo(async_steps=-1)
    with pytest.raises(ConfigError, match=r"grpo.async_steps with grpo.dynamic_sampling: .*turn dynamic_sampling "
                                          r"off or set grpo.async_steps: 0"):
        grpo(async_steps=1, dynamic_sampling=True)
    with pytest.raises(ConfigError, match=r"grpo.async_steps with grpo.environment"):
        grpo(async_steps=1, environment={"factory": "env.py:make"})
    with pytest.raises(ConfigError, match=r"sampler=vllm: .*use generation.sampler=vllm_server"):
        grpo(async_steps=1, generation={"sampler": "vllm"})
    with pytest.raises(ConfigError, match=r"sampler=hf samples from a copy of the policy, which training.deepspeed "
                                          r"shards"):
        grpo(async_steps=1, training={"deepspeed": "zero3"})
    with pytest.raises(ConfigError, match=r"training.fsdp shards"):
        grpo(async_steps=1, training={"fsdp": "full_shard"})
    with pytest.raises(ConfigError, match=r"set grpo.disable_dropout: true"):
        grpo(async_steps=1, disable_dropout=False)


def test_async_zero_is_the_synchronous_loop(tmp_path, tiny_model_dir, prompts, reward_spec):
    """async_steps: 0 (the default) leaves the loop as it was: the same metrics and weights, no async/ keys."""
    kw = dict(training={"max_steps": 2})
    res_a = _train("grpo", tiny_model_dir, prompts, tmp_path / "a", reward_spec, **kw)
    res_b = _train("grpo", tiny_model_dir, prompts, tmp_path / "b", reward_spec, async_steps=0, **kw)
    a, b = _metrics(tmp_path / "a"), _metrics(tmp_path / "b")
    for ra, rb in zip(a, b, strict=True):
        assert ra["reward"] == rb["reward"] and ra["loss/policy"] == rb["loss/policy"]
        assert not any(k.startswith("async/") for k in rb)
    for k, v in res_a["model"].state_dict().items():
        assert torch.equal(v, res_b["model"].state_dict()[k]), k
