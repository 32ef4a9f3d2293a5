"""alignkit's GRPO update is TRL's: both train the tiny model on the very same rollouts and end with the same
weights, with the KL gradient weighted by the importance ratio (``kl_ratio_weight``, TRL's
``use_bias_correction_kl``) and without it. (benchmarks/compare_grpo_update_trl.py does this with
SmolLM2-135M on the reasoning example.)"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import WORD_SHARE_REWARD

import alignkit
import alignkit.methods.online_rl as online_rl

trl = pytest.importorskip("trl")

STEPS, GROUP, LR, BETA, TEMPERATURE = 3, 4, 3e-3, 0.2, 1.0
PROMPTS = ["apple river stone cloud", "green house under the light"]


def recording(real_build, record: list):
    """``build_sampler`` whose sampler keeps each rollout as [(prompt ids, [response ids] * GROUP)] per prompt."""

    def build(*a, **k):
        sampler = real_build(*a, **k)
        generate = sampler.generate

        def generate_and_record(model, prompts, **kw):
            rollout = generate(model, prompts, **kw)
            groups: list = []
            for i in range(len(rollout)):
                if i % GROUP == 0:
                    groups.append((rollout.prompt_ids[i][rollout.prompt_mask[i].bool()].tolist(), []))
                groups[-1][1].append(rollout.response_ids[i][rollout.response_mask[i].bool()].tolist())
            record.append(groups)
            return rollout

        sampler.generate = generate_and_record
        return sampler

    return build


def trl_on_the_same_rollouts(model_dir, record: list, out, ratio_weight: bool, namespace: dict):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    calls = []

    def replay(prompts, trainer):  # TRL's prompts come in groups of GROUP; the i-th group gets alignkit's i-th
        groups = record[len(calls)]
        calls.append(prompts)
        assert len(prompts) == len(groups) * GROUP
        return {"prompt_ids": [g[0] for g in groups for _ in range(GROUP)],
                "completion_ids": [r for g in groups for r in g[1]],
                "logprobs": [[0.0] * len(r) for g in groups for r in g[1]]}

    args = GRPOConfig(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=len(PROMPTS) * GROUP,
                      gradient_accumulation_steps=1, num_generations=GROUP, num_iterations=1, max_completion_length=8,
                      temperature=TEMPERATURE, top_p=1.0, top_k=0, beta=BETA, use_bias_correction_kl=ratio_weight,
                      epsilon=0.2, loss_type="grpo", scale_rewards="group", learning_rate=LR,
                      lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                      optim="adamw_torch", bf16=False, fp16=False, use_cpu=True, gradient_checkpointing=False,
                      disable_dropout=True, seed=0, logging_steps=1, save_strategy="no", report_to="none",
                      dataloader_num_workers=0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainer = GRPOTrainer(model=model, reward_funcs=namespace["word_share"], args=args,
                          train_dataset=Dataset.from_list([{"prompt": p} for p in PROMPTS]),
                          processing_class=AutoTokenizer.from_pretrained(model_dir), rollout_func=replay)
    trainer.train()
    assert len(calls) == STEPS
    return model, [x["grad_norm"] for x in trainer.state.log_history if "reward" in x]


@pytest.mark.parametrize("ratio_weight", [True, False])
def test_grpo_update_equals_trls_on_the_same_rollouts(tmp_path, tiny_model_dir, monkeypatch, ratio_weight):
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    (tmp_path / "toy_reward.py").write_text(WORD_SHARE_REWARD)
    namespace: dict = {}
    exec(WORD_SHARE_REWARD, namespace)
    record: list = []
    monkeypatch.setattr(online_rl, "build_sampler", recording(online_rl.build_sampler, record))
    res = alignkit.train(
        "grpo", model={"name_or_path": str(tiny_model_dir), "dtype": "float32"},
        data={"train": [str(tmp_path / "prompts.jsonl")], "max_length": 64},
        training={"output_dir": str(tmp_path / "ak"), "max_steps": STEPS, "learning_rate": LR,
                  "per_device_batch_size": len(PROMPTS) * GROUP, "lr_scheduler": "constant", "seed": 0,
                  "report_to": ["jsonl"], "mixed_precision": "no", "max_grad_norm": 1.0},
        grpo={"generation": {"max_new_tokens": 8, "num_samples": GROUP, "temperature": TEMPERATURE},
              "reward": {"functions": [f"{tmp_path / 'toy_reward.py'}:word_share"]},
              "rollout_batch_size": len(PROMPTS), "kl_coef": BETA, "kl_ratio_weight": ratio_weight})
    logged = [json.loads(x) for x in (tmp_path / "ak" / "metrics.jsonl").read_text().splitlines()]
    assert len(record) == STEPS and any(x["reward_std"] > 0 for x in logged)  # the rollouts carry a signal

    trl_model, trl_norms = trl_on_the_same_rollouts(str(tiny_model_dir), record, tmp_path / "trl", ratio_weight,
                                                    namespace)
    torch.testing.assert_close(torch.tensor([x["grad_norm"] for x in logged]), torch.tensor(trl_norms),
                               rtol=1e-4, atol=0)
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    ours, theirs = res["model"].state_dict(), trl_model.state_dict()
    moved = sum(float((theirs[k] - base[k]).pow(2).sum()) for k in base) ** 0.5
    apart = sum(float((ours[k] - theirs[k]).pow(2).sum()) for k in base) ** 0.5
    assert moved > 1e-2 and apart < 1e-3 * moved, (moved, apart)
