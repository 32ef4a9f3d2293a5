"""RLOO, GRPO, REINFORCE++: the reward of a verifiable toy task rises; advantages; exact resume."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

import alignkit
from alignkit.config import build_config
from alignkit.losses.rl import grpo_advantages, reinforce_pp_advantages, rloo_advantages

# The share of a completion's words that are words of the tiny models' corpus: a random tiny Llama writes
# byte soup (~10% real words), so the reward has room to rise and varies enough between samples to learn fast.
REWARD = '''
from alignkit.testing import _WORDS

WORDS = set(_WORDS)


def word_share(prompts, completions, **_):
    out = []
    for c in completions:
        words = c.split()
        out.append(sum(w in WORDS for w in words) / len(words) if words else 0.0)
    return out
'''


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run thousands of small ops: one thread is faster, and on a busy machine OpenMP threads
    waiting for each other make a step ~100x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def reward_spec(tmp_path) -> str:
    path = tmp_path / "toy_reward.py"
    path.write_text(REWARD)
    return f"{path}:word_share"


@pytest.fixture
def prompts(tmp_path) -> Path:
    from alignkit.testing import _WORDS

    rng = random.Random(0)
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": " ".join(rng.choice(_WORDS) for _ in range(5))}) + "\n"
                            for _ in range(64)))
    return path


def _train(method: str, model_dir: Path, prompts: Path, out: Path, reward_spec: str, *, training=None, **section):
    t = {"output_dir": str(out), "max_steps": 16, "learning_rate": 1e-2, "per_device_batch_size": 4,
         "lr_scheduler": "constant", "report_to": ["jsonl"], "seed": 0, "mixed_precision": "no"}
    t.update(training or {})
    s = {"reward_functions": [reward_spec], "max_new_tokens": 8, "rollout_batch_size": 4, "num_samples": 4,
         "kl_coef": 0.01}
    s.update(section)
    return alignkit.train(method, model={"name_or_path": str(model_dir), "dtype": "float32"},
                          data={"train": [str(prompts)], "max_length": 64}, training=t, **{method: s})


def _metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["rloo", "grpo", "reinforce_pp"])
def test_reward_rises(tmp_path, tiny_model_dir, prompts, reward_spec, method):
    out = tmp_path / method
    res = _train(method, tiny_model_dir, prompts, out, reward_spec)
    rows = _metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 17))
    rewards = [r["reward"] for r in rows]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.15, rewards
    # the KL to the reference is measured and grows from 0 as the policy moves
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-4) and rows[-1]["kl"] > 0.1
    for key in ("reward_std", "reward/word_share", "entropy", "loss/policy", "clipfrac", "approx_kl",
                "response_length", "ended_with_eos", "advantages_std", "gen_share", "tok/s", "kl_coef"):
        assert all(torch.isfinite(torch.tensor(r[key])) for r in rows), key
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(out)  # the final policy is a plain HF folder
    torch.testing.assert_close(saved.state_dict(), {k: v for k, v in res["model"].state_dict().items()})


def test_advantage_estimators_are_the_loss_functions():
    from alignkit.methods.pg import advantages

    scores = torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, 0.0, 1.0, 3.0])
    mask = torch.tensor([[1, 1, 0]] * 4 + [[1, 1, 1]] * 4)
    kl = torch.full((8, 3), 0.5)
    for method in ("rloo", "grpo", "reinforce_pp"):
        cfg = build_config(method, {method: {"num_samples": 4, "reward_functions": ["a:b"], "kl_coef": 0.1,
                                             "rollout_batch_size": 2}}).method_args
        got = advantages(method, cfg, scores, kl, mask, kl_coef=0.1)
        if method == "rloo":  # KL in the reward: sequence score minus beta * summed KL
            want = rloo_advantages(scores - 0.1 * (kl * mask).sum(1), 4)[:, None] * mask
        elif method == "grpo":  # KL goes to the loss: advantages from the scores alone
            want = grpo_advantages(scores, 4)[:, None] * mask
        else:
            want = reinforce_pp_advantages(scores, kl, mask, 0.1)
        torch.testing.assert_close(got, want.float(), msg=method)
    dr = build_config("grpo", {"grpo": {"num_samples": 4, "reward_functions": ["a:b"], "scale_rewards": "none",
                                        "loss_agg": "seq-mean-token-sum-norm", "rollout_batch_size": 2}}).method_args
    torch.testing.assert_close(advantages("grpo", dr, scores, None, mask, 0.0),
                               grpo_advantages(scores, 4, scale="none")[:, None] * mask.float())


class Crash(Exception):
    pass


def test_exact_resume(tmp_path, tiny_model_dir, prompts, reward_spec, monkeypatch):
    """6 steps straight == 3 steps, crash, resume, 3 more: same rewards, losses, KL coefficient and weights.

    Several updates per rollout (old log-probs), adaptive KL and running reward normalisation all carry state.
    """
    from accelerate.state import AcceleratorState, GradientState

    from alignkit.engine import Checkpointer

    kwargs = dict(training={"max_steps": 6, "save_steps": 3, "per_device_batch_size": 2,
                            "gradient_accumulation_steps": 2, "lr_scheduler": "cosine", "learning_rate": 3e-3},
                  ppo_epochs=2, kl_target=0.5, kl_horizon=100, kl_coef=0.05, reward_normalize="running")
    res_a = _train("grpo", tiny_model_dir, prompts, tmp_path / "straight", reward_spec, **kwargs)

    real_save = Checkpointer.save

    def save_then_crash(self, state):
        path = real_save(self, state)
        if state.step == 3:
            raise Crash()
        return path

    monkeypatch.setattr(Checkpointer, "save", save_then_crash)
    with pytest.raises(Crash):
        _train("grpo", tiny_model_dir, prompts, tmp_path / "resumed", reward_spec, **kwargs)
    monkeypatch.setattr(Checkpointer, "save", real_save)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    torch.manual_seed(1234)  # a different global RNG state: resume must not depend on it
    kwargs["training"]["resume"] = "latest"
    res_b = _train("grpo", tiny_model_dir, prompts, tmp_path / "resumed", reward_spec, **kwargs)

    a, b = _metrics(tmp_path / "straight"), _metrics(tmp_path / "resumed")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert len({r["kl_coef"] for r in a}) > 1  # the adaptive coefficient moved
    for ra, rb in zip(a, b):
        for key in ("reward", "reward/final", "loss/policy", "kl", "kl_coef", "lr", "ratio"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-6), (ra["step"], key)
    sa, sb = res_a["model"].state_dict(), res_b["model"].state_dict()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6, msg=k)
