"""Online RL (PPO, RLOO, GRPO, REINFORCE++, one loop): the reward of a verifiable toy task rises; the
advantage estimators are the loss functions; a reward model with another tokenizer scores the decoded texts;
the critic's per-token values; LoRA (adapter-off reference); exact resume; ZeRO-3 with 2 processes."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import WORD_SHARE_REWARD, crash_after_checkpoint

import alignkit
from alignkit import build_config
from alignkit.config import ConfigError
from alignkit.losses.rl import grpo_advantages, reinforce_pp_advantages, rloo_advantages
from alignkit.testing import tiny_llama, tiny_tokenizer

REWARD = WORD_SHARE_REWARD

PPO_METRICS = ("reward", "reward_std", "reward/final", "kl", "kl_coef", "entropy", "loss/policy", "loss/value",
               "clipfrac", "approx_kl", "value_clipfrac", "response_length", "ended_with_eos", "values", "returns",
               "advantages_std", "gen_share", "tok/s", "lr", "grad_norm", "episodes")


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


def _section(reward: dict, *, max_new_tokens: int = 8, num_samples: int = 4, **fields) -> dict:
    return {"generation": {"max_new_tokens": max_new_tokens, "num_samples": num_samples}, "reward": reward,
            "rollout_batch_size": 4, "kl_coef": 0.01, **fields}


def _train(method: str, model_dir: Path, prompts: Path, out: Path, reward_spec: str, *, training=None,
           reward: dict | None = None, model: dict | None = None, **fields):
    t = {"output_dir": str(out), "max_steps": 16, "learning_rate": 1e-2, "per_device_batch_size": 4,
         "lr_scheduler": "constant", "report_to": ["jsonl"], "seed": 0, "mixed_precision": "no"}
    t.update(training or {})
    section = _section({"functions": [reward_spec], **(reward or {})}, **fields)
    return alignkit.train(method, model={"name_or_path": str(model_dir), "dtype": "float32", **(model or {})},
                          data={"train": [str(prompts)], "max_length": 64}, training=t, **{method: section})


def _ppo_config(model_dir: Path, prompts: Path, out: Path, reward: dict, *, training=None, model=None,
                **fields) -> dict:
    t = {"output_dir": str(out), "max_steps": 10, "learning_rate": 1e-2, "per_device_batch_size": 8,
         "lr_scheduler": "constant", "report_to": ["jsonl"], "seed": 0, "mixed_precision": "no"}
    t.update(training or {})
    return {"model": {"name_or_path": str(model_dir), "dtype": "float32", **(model or {})},
            "data": {"train": [str(prompts)], "max_length": 64}, "training": t, "ppo": _section(reward, **fields)}


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
    from alignkit.methods.online_rl import advantages

    scores = torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, 0.0, 1.0, 3.0])
    mask = torch.tensor([[1, 1, 0]] * 4 + [[1, 1, 1]] * 4)
    kl = torch.full((8, 3), 0.5)
    for method in ("rloo", "grpo", "reinforce_pp"):
        cfg = build_config(method, {method: {"generation": {"num_samples": 4}, "reward": {"functions": ["a:b"]},
                                             "kl_coef": 0.1, "rollout_batch_size": 2}}).method_args
        got, returns = advantages(method, cfg, scores, kl, mask, kl_coef=0.1)
        assert returns is None  # only PPO's GAE has value targets
        if method == "rloo":  # KL in the reward: sequence score minus beta * summed KL
            want = rloo_advantages(scores - 0.1 * (kl * mask).sum(1), 4)[:, None] * mask
        elif method == "grpo":  # KL goes to the loss: advantages from the scores alone
            want = grpo_advantages(scores, 4)[:, None] * mask
        else:
            want = reinforce_pp_advantages(scores, kl, mask, 0.1)
        torch.testing.assert_close(got, want.float(), msg=method)
    dr = build_config("grpo", {"grpo": {"generation": {"num_samples": 4}, "reward": {"functions": ["a:b"]},
                                        "scale_rewards": "none", "loss_agg": "seq-mean-token-sum-norm",
                                        "rollout_batch_size": 2}}).method_args
    torch.testing.assert_close(advantages("grpo", dr, scores, None, mask, 0.0)[0],
                               grpo_advantages(scores, 4, scale="none")[:, None] * mask.float())
    # PPO: GAE over token rewards (KL penalty per token, score at the last token) against the critic's values
    from alignkit.losses.rl import gae, per_token_rewards

    ppo = build_config("ppo", {"ppo": {"reward": {"functions": ["a:b"]}, "rollout_batch_size": 8}}).method_args
    values = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
    got, returns = advantages("ppo", ppo, scores, kl, mask, 0.1, values)
    want = gae(per_token_rewards(scores, kl, mask, 0.1), values, mask, gamma=ppo.gamma, lam=ppo.lam)
    torch.testing.assert_close(got, want[0])
    torch.testing.assert_close(returns, want[1])


def test_ppo_reward_rises(tmp_path, tiny_model_dir, prompts, reward_spec):
    out = tmp_path / "ppo"
    res = alignkit.train("ppo", **_ppo_config(tiny_model_dir, prompts, out, {"functions": [reward_spec]}))
    rows = _metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 11))
    rewards = [r["reward"] for r in rows]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.2, rewards
    for key in PPO_METRICS + ("reward/word_share",):
        assert all(torch.isfinite(torch.tensor(float(r[key]))) for r in rows), key
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-4) and rows[-1]["kl"] > 0.1
    assert rows[0]["values"] == 0.0  # critic_init=policy: the value head starts at zero
    assert rows[-1]["values"] > 0.1  # ... and learns the (positive) returns

    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    policy = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(policy.state_dict(), res["model"].state_dict())
    critic = AutoModelForSequenceClassification.from_pretrained(out / "critic")
    torch.testing.assert_close(critic.state_dict(), res["critic"].state_dict())


def test_critic_values_are_the_score_head_at_every_position(tiny_model_dir):
    from alignkit.config import ModelConfig
    from alignkit.critic import critic_values
    from alignkit.models import load_model, load_tokenizer

    cfg = ModelConfig(name_or_path=str(tiny_model_dir), dtype="float32")
    tok = load_tokenizer(cfg)
    critic = load_model(cfg, tok, task="seq_cls", trainable=False)
    ids = torch.tensor([tok("the cat sat on the mat", add_special_tokens=False)["input_ids"]])
    mask, pos = torch.ones_like(ids), torch.arange(ids.shape[1])[None]
    with torch.no_grad():
        values = critic_values(critic, ids, mask, pos, keep=0)
        assert values.shape == ids.shape
        # the classifier's own score is read at the last token: the same number
        torch.testing.assert_close(values[0, -1], critic(input_ids=ids).logits[0, 0])
        for t in (1, 3):  # causal: a prefix's value does not depend on what follows
            torch.testing.assert_close(critic_values(critic, ids[:, :t + 1], mask[:, :t + 1], pos[:, :t + 1], 0)[0],
                                       values[0, :t + 1], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(critic_values(critic, ids, mask, pos, keep=3), values[:, -3:])


def test_reward_model_with_another_tokenizer_scores_the_decoded_texts(tmp_path, tiny_model_dir, prompts):
    """The tiny BERT has a WordPiece vocabulary: the rollout's ids mean nothing to it, so the scorer must decode
    and re-tokenize. The rewards logged for each sample equal what BERT gives on (prompt, completion)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from alignkit.testing import save_tiny_bert_classifier

    rm = save_tiny_bert_classifier(tmp_path / "bert-rm")
    out = tmp_path / "ppo-bert"
    alignkit.train("ppo", **_ppo_config(tiny_model_dir, prompts, out, {"model": str(rm)}, training={"max_steps": 2},
                                        log_samples=16))
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 32 and {s["step"] for s in samples} == {1, 2}
    bert_tok = AutoTokenizer.from_pretrained(rm)
    bert = AutoModelForSequenceClassification.from_pretrained(rm).eval()
    enc = bert_tok([s["prompt"] for s in samples], [s["completion"] for s in samples], padding=True,
                   return_tensors="pt")
    with torch.no_grad():
        expected = bert(**enc).logits[:, 0]
    logged = torch.tensor([s["reward/reward_model"] for s in samples])
    torch.testing.assert_close(logged, expected, rtol=1e-4, atol=1e-5)
    rows = _metrics(out)
    assert rows[0]["reward"] == pytest.approx(float(expected[:16].mean()), rel=1e-4, abs=1e-5)

    # the critic cannot start from it: it reads the policy's tokens
    with pytest.raises(ConfigError, match="critic_init=reward_model.*own tokenizer"):
        alignkit.train("ppo", **_ppo_config(tiny_model_dir, prompts, tmp_path / "bad", {"model": str(rm)},
                                            critic_init="reward_model"))


def test_lora_policy_is_its_own_reference(tmp_path, tiny_model_dir, prompts, reward_spec):
    out = tmp_path / "ppo-lora"
    res = alignkit.train("ppo", **_ppo_config(tiny_model_dir, prompts, out, {"functions": [reward_spec]},
                                              training={"max_steps": 3},
                                              model={"finetune": "lora", "lora_r": 8, "lora_alpha": 16},
                                              kl_penalty="loss", kl_estimator="k3"))
    rows = _metrics(out)
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-5) and rows[-1]["kl"] > 0  # adapter on vs off
    assert all(torch.isfinite(torch.tensor(r["loss/kl"])) for r in rows)
    assert (out / "adapter_config.json").is_file() and (out / "critic" / "adapter_config.json").is_file()
    assert type(res["model"]).__name__ == "PeftModelForCausalLM"


@pytest.mark.distributed
@pytest.mark.xdist_group("distributed")
def test_ppo_zero3_two_processes_generates_and_trains(tmp_path, tiny_model_dir, prompts, reward_spec):
    cfg = _ppo_config(tiny_model_dir, prompts, tmp_path / "z3", {"functions": [reward_spec]},
                      training={"max_steps": 2, "per_device_batch_size": 4, "save_steps": 1, "save_total_limit": 1},
                      rollout_batch_size=2, ppo_epochs=2)
    path = tmp_path / "z3.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "alignkit.cli", "train", "ppo", str(path), "--num-processes", "2",
                           "--deepspeed", "zero3"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    rows = _metrics(tmp_path / "z3")
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["episodes"] == r["step"] * 2 * 4 * 2  # prompts x samples x processes
        for key in PPO_METRICS:
            assert torch.isfinite(torch.tensor(float(r[key]))), key
    assert rows[1]["kl"] > 0  # the policy moved between the two rollouts

    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    out = tmp_path / "z3"
    policy = AutoModelForCausalLM.from_pretrained(out)  # gathered from the shards into plain HF folders
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    changed = [k for k, v in policy.state_dict().items() if not torch.equal(v, base.state_dict()[k])]
    assert len(changed) == len(base.state_dict())
    critic = AutoModelForSequenceClassification.from_pretrained(out / "critic")
    assert critic.score.weight.abs().sum() > 0  # the zero-initialised head trained
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-2"]


def test_exact_resume(tmp_path, tiny_model_dir, prompts, reward_spec, monkeypatch):
    """6 steps straight == 3 steps, crash, resume, 3 more: same rewards, losses, KL coefficient and weights.

    Several updates per rollout (old log-probs), adaptive KL and running reward normalisation all carry state.
    """

    kwargs = dict(training={"max_steps": 6, "save_steps": 3, "per_device_batch_size": 2,
                            "gradient_accumulation_steps": 2, "lr_scheduler": "cosine", "learning_rate": 3e-3},
                  ppo_epochs=2, kl_target=0.5, kl_horizon=100, kl_coef=0.05, reward={"normalize": "running"})
    res_a = _train("grpo", tiny_model_dir, prompts, tmp_path / "straight", reward_spec, **kwargs)

    with crash_after_checkpoint(monkeypatch, 3):
        _train("grpo", tiny_model_dir, prompts, tmp_path / "resumed", reward_spec, **kwargs)
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


def test_exact_resume_restores_policy_critic_and_kl_state(tmp_path, tiny_model_dir, prompts, reward_spec, monkeypatch):
    """6 steps straight == 3 steps, crash, resume, 3 more (adaptive KL, running reward normalisation)."""

    def cfg(out, **training):
        return _ppo_config(tiny_model_dir, prompts, out, {"functions": [reward_spec], "normalize": "running"},
                           kl_target=0.5, kl_horizon=100, kl_coef=0.05, ppo_epochs=2,
                           training={"max_steps": 6, "save_steps": 3, "per_device_batch_size": 4,
                                 "gradient_accumulation_steps": 2, "lr_scheduler": "cosine", "learning_rate": 3e-3,
                                 **training})

    res_a = alignkit.train("ppo", **cfg(tmp_path / "straight"))
    with crash_after_checkpoint(monkeypatch, 3):
        alignkit.train("ppo", **cfg(tmp_path / "resumed"))
    torch.manual_seed(1234)
    res_b = alignkit.train("ppo", **cfg(tmp_path / "resumed", resume="latest"))

    a, b = _metrics(tmp_path / "straight"), _metrics(tmp_path / "resumed")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert len({r["kl_coef"] for r in a}) > 1
    for ra, rb in zip(a, b):
        for key in ("reward", "reward/final", "loss/policy", "loss/value", "values", "kl", "kl_coef", "lr"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-6), (ra["step"], key)
    for part in ("model", "critic"):
        sa, sb = res_a[part].state_dict(), res_b[part].state_dict()
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6, msg=f"{part}.{k}")


def test_disable_dropout():
    from peft import LoraConfig, get_peft_model

    from alignkit.methods.online_rl import disable_dropout

    tok = tiny_tokenizer()
    m = tiny_llama(tok)
    m.config.attention_dropout = 0.3
    for layer in m.model.layers:
        layer.self_attn.attention_dropout = 0.3
    m = get_peft_model(m, LoraConfig(r=4, lora_dropout=0.5, target_modules="all-linear"))
    disable_dropout(m)
    assert all(mod.p == 0 for mod in m.modules() if isinstance(mod, torch.nn.Dropout))
    assert all(layer.self_attn.attention_dropout == 0 for layer in m.get_base_model().model.layers)


def test_config_errors_name_the_keys():
    fn = {"functions": ["a:b"]}
    with pytest.raises(ConfigError, match=r"ppo.rollout_batch_size x ppo.generation.num_samples .*per_device_batch"):
        build_config("ppo", {"ppo": {"rollout_batch_size": 3, "reward": fn}, "training": {"per_device_batch_size": 2}})
    with pytest.raises(ConfigError, match="rloo.generation.num_samples=1"):
        build_config("rloo", {"rloo": {"generation": {"num_samples": 1}, "reward": fn}})
    with pytest.raises(ConfigError, match="grpo.kl_estimator"):
        build_config("grpo", {"grpo": {"kl_estimator": "k4", "reward": fn}})
    with pytest.raises(ConfigError, match="reinforce_pp.reward: no reward source"):
        build_config("reinforce_pp", {})
    with pytest.raises(ConfigError, match="ppo.critic_init=reward_model but ppo.reward.model"):
        build_config("ppo", {"ppo": {"critic_init": "reward_model", "reward": fn}})
    with pytest.raises(ConfigError, match="kl_coef=0"):
        build_config("ppo", {"ppo": {"kl_target": 6.0, "kl_coef": 0.0, "reward": fn}})


def test_truncated_importance_sampling_weights_the_sampler_mismatch(tmp_path, tiny_model_dir, prompts, reward_spec):
    """tis_cap: each token's loss is weighted by min(pi_old / pi_sampler, cap). The HF sampler samples from the
    trainer's own distribution, so the weights are 1 up to float error; a distorted sampler log-prob is capped."""
    out = tmp_path / "tis"
    _train("grpo", tiny_model_dir, prompts, out, reward_spec, training={"max_steps": 2}, tis_cap=2.0,
           reuse_sampler_logps=False)  # the trainer recomputes its log-probs: two computations compared
    rows = _metrics(out)
    for r in rows:
        assert r["tis_weight"] == pytest.approx(1.0, abs=1e-4) and r["sampler_logp_diff"] < 1e-4
        assert r["tis_capped"] == 0.0
    with pytest.raises(ConfigError, match="grpo.tis_cap=0.5: must be >= 1"):
        build_config("grpo", {"grpo": {"reward": {"functions": ["a:b"]}, "tis_cap": 0.5}})
