"""Shared online-RL pieces: response-only log-probs, trimming, exact loss normalisation, metrics, config checks."""

from __future__ import annotations

import pytest
import torch

from alignkit.config import ConfigError, build_config
from alignkit.losses.rl import aggregate_loss
from alignkit.online import (
    LOSS_AGGS,
    MetricSums,
    RolloutBatch,
    disable_dropout,
    loss_items,
    minibatches,
    response_forward,
    score_rollout,
    step_seed,
    sub_config,
)
from alignkit.rewards import RewardConfig
from alignkit.rollout import GenerationConfig, build_rollout
from alignkit.testing import tiny_llama, tiny_tokenizer


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run thousands of small ops: one thread is faster, and on a busy machine OpenMP threads
    waiting for each other make a step ~100x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_llama(tok).eval()


def _rollout(tok):
    prompts = [tok("the cat sat on", add_special_tokens=False)["input_ids"],
               tok("a dog", add_special_tokens=False)["input_ids"],
               tok("what is the capital of france please", add_special_tokens=False)["input_ids"]]
    responses = [tok(" the mat", add_special_tokens=False)["input_ids"] + [tok.eos_token_id],
                 tok(" ran under the big blue tree and", add_special_tokens=False)["input_ids"],
                 tok(" paris", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    return build_rollout(prompts, responses, torch.arange(3), [tok.eos_token_id], tok.pad_token_id, tok)


def _reference_logps(model, prompt: list[int], response: list[int], temperature: float) -> torch.Tensor:
    """log p(response_t | prompt, response_<t) from an unpadded full forward and a full log-softmax."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1:-1] / temperature
    return logits.log_softmax(-1).gather(-1, torch.tensor(response)[:, None]).squeeze(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_response_logps_match_an_unpadded_full_forward(tok, model, temperature):
    rollout = _rollout(tok)
    batch = RolloutBatch.from_rollout(rollout)
    with torch.no_grad():
        out = response_forward(model, batch, temperature, entropy=True)
    for i in range(3):
        n = int(rollout.response_mask[i].sum())
        prompt = rollout.prompt_ids[i][rollout.prompt_mask[i].bool()].tolist()
        expected = _reference_logps(model, prompt, rollout.response_ids[i, :n].tolist(), temperature)
        torch.testing.assert_close(out.logps[i, :n], expected, rtol=1e-4, atol=1e-5)
        assert (out.logps[i, n:] == 0).all() and (out.entropy[i, n:] == 0).all()
        assert (out.entropy[i, :n] > 0).all()


def test_trimmed_micro_batches_give_the_same_logps(tok, model):
    batch = RolloutBatch.from_rollout(_rollout(tok))
    whole = score_rollout(model, batch, 1.0, micro_batch_size=3).logps
    in_ones = score_rollout(model, batch, 1.0, micro_batch_size=1).logps
    torch.testing.assert_close(whole, in_ones, rtol=1e-4, atol=1e-5)
    part = batch.select(torch.tensor([0, 2]))  # short prompt + long one, two short responses
    assert part.response_width == int(batch.response_mask[[0, 2]].sum(1).max()) < batch.response_width
    assert part.input_ids.shape[1] < batch.input_ids.shape[1]


def test_score_rollout_restores_train_mode(tok):
    m = tiny_llama(tok).train()
    score_rollout(m, RolloutBatch.from_rollout(_rollout(tok)), 1.0, micro_batch_size=2)
    assert m.training


@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
def test_micro_batch_sums_over_global_items_equal_the_whole_batch_loss(loss_agg):
    """What the loops do: sum(aggregate * items) per micro-batch / global items == aggregate on the batch."""
    g = torch.Generator().manual_seed(0)
    per_token = torch.randn(6, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0],
                         [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]])
    whole = aggregate_loss(per_token, mask, loss_agg, max_length=5)
    parts = [slice(0, 2), slice(2, 3), slice(3, 6)]
    total_items = sum(float(loss_items(mask[s], loss_agg)) for s in parts)
    split = sum(aggregate_loss(per_token[s], mask[s], loss_agg, max_length=5) * loss_items(mask[s], loss_agg)
                for s in parts) / total_items
    torch.testing.assert_close(split, whole)


def test_loss_items_counts():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0]])
    assert float(loss_items(mask, "token-mean")) == 3
    assert float(loss_items(mask, "seq-mean-token-mean")) == 2
    assert float(loss_items(mask, "seq-mean-token-sum-norm")) == 3
    with pytest.raises(ValueError, match="loss_agg"):
        loss_items(mask, "mean")


def test_metric_sums_means_and_std():
    m = MetricSums()
    m.add("loss", 6.0, 3)
    m.add("loss", 4.0, 1)
    m.add_values("reward", torch.tensor([1.0, 2.0, 3.0, 100.0]), mask=torch.tensor([1, 1, 1, 0]))
    m.add_total("tok/s", 10.0)
    m.add_total("tok/s", 5.0)
    out = m.means()
    assert out["loss"] == pytest.approx(2.5)
    assert out["reward"] == pytest.approx(2.0)
    assert out["reward_std"] == pytest.approx(torch.tensor([1.0, 2.0, 3.0]).std(unbiased=False).item())
    assert out["tok/s"] == pytest.approx(15.0)


def test_minibatches_are_a_seeded_partition():
    a, b = minibatches(10, 4, seed=3), minibatches(10, 4, seed=3)
    assert [x.tolist() for x in a] == [x.tolist() for x in b]
    assert sorted(torch.cat(a).tolist()) == list(range(10)) and [len(x) for x in a] == [4, 4, 2]
    assert [x.tolist() for x in minibatches(10, 4, seed=4)] != [x.tolist() for x in a]


def test_step_seeds_differ_by_step_rank_and_salt():
    seeds = {step_seed(42, s, r, salt) for s in range(20) for r in range(4) for salt in range(3)}
    assert len(seeds) == 20 * 4 * 3


def test_disable_dropout():
    from peft import LoraConfig, get_peft_model

    tok = tiny_tokenizer()
    m = tiny_llama(tok)
    m.config.attention_dropout = 0.3
    for layer in m.model.layers:
        layer.self_attn.attention_dropout = 0.3
    m = get_peft_model(m, LoraConfig(r=4, lora_dropout=0.5, target_modules="all-linear"))
    disable_dropout(m)
    assert all(mod.p == 0 for mod in m.modules() if isinstance(mod, torch.nn.Dropout))
    assert all(layer.self_attn.attention_dropout == 0 for layer in m.get_base_model().model.layers)


def test_method_configs_embed_generation_and_reward_fields():
    cfg = build_config("grpo", {"grpo": {"num_samples": 4, "max_new_tokens": 16, "reward_functions": ["a:b"],
                                         "rollout_batch_size": 2}})
    gen, rew = sub_config(cfg.method_args, GenerationConfig), sub_config(cfg.method_args, RewardConfig)
    assert type(gen) is GenerationConfig and gen.num_samples == 4 and gen.max_new_tokens == 16
    assert type(rew) is RewardConfig and rew.reward_functions == ["a:b"]


def test_config_errors_name_the_keys():
    with pytest.raises(ConfigError, match=r"ppo.rollout_batch_size x ppo.num_samples .*per_device_batch_size"):
        build_config("ppo", {"ppo": {"rollout_batch_size": 3, "reward_functions": ["a:b"]},
                             "training": {"per_device_batch_size": 2}})
    with pytest.raises(ConfigError, match="rloo.num_samples=1"):
        build_config("rloo", {"rloo": {"num_samples": 1, "reward_functions": ["a:b"]}})
    with pytest.raises(ConfigError, match="grpo.kl_estimator"):
        build_config("grpo", {"grpo": {"kl_estimator": "k4", "reward_functions": ["a:b"]}})
    with pytest.raises(ConfigError, match="reinforce_pp: no reward source"):
        build_config("reinforce_pp", {})
    with pytest.raises(ConfigError, match="ppo.critic_init=reward_model but ppo.reward_model"):
        build_config("ppo", {"ppo": {"critic_init": "reward_model", "reward_functions": ["a:b"]}})
    with pytest.raises(ConfigError, match="kl_coef=0"):
        build_config("ppo", {"ppo": {"kl_target": 6.0, "kl_coef": 0.0, "reward_functions": ["a:b"]}})
