"""The objectives and filters of alignkit.losses.policy wired into the online loop: policy_loss gspo/cispo,
overlong_buffer, mismatch_seq_threshold, dynamic_sampling (with exact resume); the defaults are unchanged;
the config errors where an option makes no sense."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import WORD_SHARE_REWARD, crash_after_checkpoint

import alignkit
from alignkit import build_config
from alignkit.config import ConfigError
from alignkit.rollout.hf import HFSampler
from tests.methods import test_online_rl as base

_metrics = base._metrics
_one_thread, prompts = base._one_thread, base.prompts  # the fixtures: one torch thread, 64 five-word prompts

# prompts whose first word has an even letter sum score 0 whatever the completion: their groups carry no signal
GATED_REWARD = WORD_SHARE_REWARD + '''

def dead(prompt):
    return sum(map(ord, prompt.split()[0])) % 2 == 0


def gated(prompts, completions, **_):
    return [0.0 if dead(p) else s for p, s in zip(prompts, word_share(prompts, completions))]
'''


@pytest.fixture
def reward_file(tmp_path) -> Path:
    path = tmp_path / "toy_reward.py"
    path.write_text(GATED_REWARD)
    return path


def _dead(prompt: str) -> bool:
    return sum(map(ord, prompt.split()[0])) % 2 == 0


def _train(method, model_dir, prompts, out, reward_file, *, fn="word_share", training=None, **fields):
    t = {"output_dir": str(out), "max_steps": 16, "learning_rate": 1e-2, "per_device_batch_size": 4,
         "lr_scheduler": "constant", "report_to": ["jsonl"], "seed": 0, "mixed_precision": "no"}
    t.update(training or {})
    section = {"generation": {"max_new_tokens": 8, "num_samples": 4}, "reward": {"functions": [f"{reward_file}:{fn}"]},
               "rollout_batch_size": 4, "kl_coef": 0.01, **fields}
    return alignkit.train(method, model={"name_or_path": str(model_dir), "dtype": "float32"},
                          data={"train": [str(prompts)], "max_length": 64}, training=t, **{method: section})


def _rises(rows: list[dict]) -> None:
    rewards = [r["reward"] for r in rows]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.15, rewards


def test_defaults_are_unchanged(tmp_path, tiny_model_dir, prompts, reward_file):
    """The new keys at their defaults are today's loop: the same metrics and weights as a run without them."""
    kw = dict(training={"max_steps": 3}, ppo_epochs=2)
    res_a = _train("grpo", tiny_model_dir, prompts, tmp_path / "a", reward_file, **kw)
    res_b = _train("grpo", tiny_model_dir, prompts, tmp_path / "b", reward_file, policy_loss="ppo_clip",
                   overlong_buffer=0, mismatch_seq_threshold=0, dynamic_sampling=False, **kw)
    a, b = _metrics(tmp_path / "a"), _metrics(tmp_path / "b")
    for ra, rb in zip(a, b, strict=True):
        for key in ("reward", "loss/policy", "kl", "clipfrac", "ratio", "epoch"):
            assert ra[key] == rb[key], key
        assert not any(k.startswith(("dynamic_sampling", "mismatch")) or k == "reward/overlong" for k in rb)
    for k, v in res_a["model"].state_dict().items():
        assert torch.equal(v, res_b["model"].state_dict()[k]), k


@pytest.mark.parametrize("loss", ["gspo", "cispo"])
def test_grpo_with_gspo_and_cispo_raises_the_reward(tmp_path, tiny_model_dir, prompts, reward_file, loss):
    out = tmp_path / loss
    _train("grpo", tiny_model_dir, prompts, out, reward_file, policy_loss=loss)
    rows = _metrics(out)
    _rises(rows)
    # several updates per rollout: the later ones are off-policy, so ratios move from 1 and some get clipped
    assert any(r["ratio"] != pytest.approx(1.0, abs=1e-7) for r in rows)
    assert all(0.0 <= r["clipfrac"] <= 1.0 for r in rows)
    if loss == "gspo":  # sequence ratios are clipped to [1 - 3e-4, 1 + 4e-4]: after an update most are
        assert max(r["clipfrac"] for r in rows) > 0.2


@pytest.mark.parametrize("method", ["ppo", "rloo", "reinforce_pp"])
def test_gspo_and_cispo_run_with_every_method(tmp_path, tiny_model_dir, prompts, reward_file, method):
    for loss in ("gspo", "cispo"):
        out = tmp_path / f"{method}-{loss}"
        _train(method, tiny_model_dir, prompts, out, reward_file, policy_loss=loss, training={"max_steps": 2})
        rows = _metrics(out)
        assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss/policy"])) for r in rows)


def test_overlong_buffer_penalises_responses_near_max_new_tokens(tmp_path, tiny_model_dir, prompts, reward_file):
    """reward/final = task reward + DAPO's penalty, which is 0 up to max_new_tokens - buffer and -1 at the end."""
    out = tmp_path / "overlong"
    _train("grpo", tiny_model_dir, prompts, out, reward_file, overlong_buffer=4, training={"max_steps": 3},
           log_samples=16)
    rows = _metrics(out)
    assert any(r["reward/overlong"] < 0 for r in rows)
    for r in rows:
        assert -1.0 <= r["reward/overlong"] <= 0.0
        assert r["reward/final"] == pytest.approx(r["reward"] + r["reward/overlong"], abs=1e-6)
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    for s in samples:  # a response cut at max_new_tokens = 8 has length 8: the full penalty
        assert s["reward/final"] == pytest.approx(s["reward"] + s["reward/overlong"], abs=1e-6)
        if not s["ended_with_eos"]:
            assert s["reward/overlong"] == -1.0, s
    assert any(not s["ended_with_eos"] for s in samples)


def test_mismatch_seq_threshold_drops_the_sequences_the_sampler_disagrees_on(tmp_path, tiny_model_dir, prompts,
                                                                               reward_file, monkeypatch):
    """The HF sampler samples from the trainer's distribution (rho = 1, nothing dropped); shift the sampler's
    log-probs of every other sequence by 0.5 per token and exactly those are dropped (rho = e^0.5 > 1.01)."""
    out = tmp_path / "clean"
    _train("grpo", tiny_model_dir, prompts, out, reward_file, training={"max_steps": 2}, mismatch_seq_threshold=1.01,
           reuse_sampler_logps=False)
    assert [r["mismatch_rejected"] for r in _metrics(out)] == [0.0, 0.0]

    real = HFSampler.generate

    def skewed(self, *args, **kwargs):
        rollout = real(self, *args, **kwargs)
        rollout.sampler_logps[::2] -= 0.5 * rollout.response_mask[::2]
        return rollout

    monkeypatch.setattr(HFSampler, "generate", skewed)
    out = tmp_path / "skewed"
    _train("grpo", tiny_model_dir, prompts, out, reward_file, training={"max_steps": 2}, mismatch_seq_threshold=1.01,
           reuse_sampler_logps=False, ppo_epochs=2)
    rows = _metrics(out)
    assert [r["mismatch_rejected"] for r in rows] == [0.5, 0.5]
    assert all(torch.isfinite(torch.tensor(r["loss/policy"])) for r in rows)


def _ds_run(out, tiny_model_dir, prompts, reward_file, **training):
    return _train("grpo", tiny_model_dir, prompts, out, reward_file, fn="gated", dynamic_sampling=True,
                  max_refill_rounds=3, log_samples=16, ppo_epochs=2,
                  training={"max_steps": 6, "save_steps": 3, "per_device_batch_size": 2,
                            "gradient_accumulation_steps": 2, "learning_rate": 3e-3, **training})


def test_dynamic_sampling_refills_and_resumes_exactly(tmp_path, tiny_model_dir, prompts, reward_file, monkeypatch):
    """Groups without signal (all rewards equal) never reach the update unless the refill bound is hit; the
    refill draws further prompts from the stream; 6 steps straight == 3 steps, crash, resume, 3 more: the same
    prompts consumed (samples, epoch), the same metrics and weights."""

    res_a = _ds_run(tmp_path / "straight", tiny_model_dir, prompts, reward_file)
    a = _metrics(tmp_path / "straight")
    assert sum(r["dynamic_sampling/refilled"] for r in a) > 0 and sum(r["dynamic_sampling/rounds"] for r in a) > 0
    assert a[-1]["epoch"] > 6 * 4 / 64  # more prompt batches drawn than steps
    samples = [json.loads(x) for x in (tmp_path / "straight" / "samples.jsonl").read_text().splitlines()]
    short = {r["step"] for r in a if r["dynamic_sampling/short"] > 0}
    assert len(samples) == 6 * 16
    for s in samples:
        assert s["step"] in short or not _dead(s["prompt"]), s

    with crash_after_checkpoint(monkeypatch, 3):
        _ds_run(tmp_path / "resumed", tiny_model_dir, prompts, reward_file)
    torch.manual_seed(1234)
    res_b = _ds_run(tmp_path / "resumed", tiny_model_dir, prompts, reward_file, resume="latest")

    b = _metrics(tmp_path / "resumed")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b):
        for key in ("reward", "reward/final", "loss/policy", "kl", "epoch", "dynamic_sampling/refilled",
                    "dynamic_sampling/rounds", "dynamic_sampling/short"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-6), (ra["step"], key)
    samples_b = [json.loads(x) for x in (tmp_path / "resumed" / "samples.jsonl").read_text().splitlines()]
    assert [(s["step"], s["prompt"]) for s in samples_b] == [(s["step"], s["prompt"]) for s in samples]
    sa, sb = res_a["model"].state_dict(), res_b["model"].state_dict()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6, msg=k)


def test_config_errors_say_where_an_option_does_not_apply():
    fn = {"functions": ["a:b"]}
    for method in ("ppo", "reinforce_pp"):
        with pytest.raises(ConfigError, match=rf"{method}.dynamic_sampling: {method} has no groups"):
            build_config(method, {method: {"reward": fn, "dynamic_sampling": True}})
    build_config("rloo", {"rloo": {"reward": fn, "dynamic_sampling": True}})  # grouped methods accept it
    with pytest.raises(ConfigError, match=r"grpo.policy_loss"):
        build_config("grpo", {"grpo": {"reward": fn, "policy_loss": "dapo"}})
    with pytest.raises(ConfigError, match=r"grpo.mismatch_seq_threshold=0.5: must be > 1"):
        build_config("grpo", {"grpo": {"reward": fn, "mismatch_seq_threshold": 0.5}})
    with pytest.raises(ConfigError, match=r"grpo.overlong_buffer=300: must be in \[0, generation.max_new_tokens="):
        build_config("grpo", {"grpo": {"reward": fn, "overlong_buffer": 300, "generation": {"max_new_tokens": 256}}})
    with pytest.raises(ConfigError, match=r"grpo.cispo_clip_eps_low=2.0"):
        build_config("grpo", {"grpo": {"reward": fn, "cispo_clip_eps_low": 2.0}})
    with pytest.raises(ConfigError, match=r"grpo.max_refill_rounds=-1"):
        build_config("grpo", {"grpo": {"reward": fn, "max_refill_rounds": -1}})
