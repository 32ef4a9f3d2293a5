"""Online RL with padding-free rollout batches (``<method>.padding_free``): the same run as padded, step by step."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from conftest import WORD_SHARE_REWARD

import alignkit
from alignkit.forward import BatchLayout

COMPARED = ("loss/policy", "kl", "entropy", "reward", "response_length", "approx_kl")
# Not compared: value_clipfrac counts ties (V == V_old on the first minibatch) that float rounding breaks either
# way; and at a learning rate of 1e-2 (KL ~ 27 by step 3) float-level differences reach the sampled tokens.


@pytest.fixture(scope="module")
def stopping_model_dir(tmp_path_factory) -> Path:
    """The tiny Llama with its eos row half along its mean hidden state: responses end at very different lengths."""
    from alignkit.testing import save_tiny_llama, tiny_llama, tiny_tokenizer

    tok, path = tiny_tokenizer(), save_tiny_llama(tmp_path_factory.mktemp("stopping-llama"))
    model = tiny_llama(tok)
    with torch.no_grad():  # eos points half along the mean hidden state of a chat turn
        turn = tok.apply_chat_template([{"role": "user", "content": "the cat sat on the mat"}],
                                       add_generation_prompt=True, return_tensors="pt")
        hidden = model.model(**turn).last_hidden_state
        model.lm_head.weight[tok.eos_token_id] = 0.45 * torch.nn.functional.normalize(hidden[0].mean(0), dim=0)
    model.save_pretrained(path)
    return path


@pytest.fixture
def files(tmp_path) -> tuple[Path, str]:
    from alignkit.testing import _WORDS

    rng = random.Random(0)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": " ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 12)))})
                               + "\n" for _ in range(32)))
    reward = tmp_path / "toy_reward.py"
    reward.write_text(WORD_SHARE_REWARD)
    return prompts, f"{reward}:word_share"


def _run(method: str, model_dir: Path, files, out: Path, padding_free: bool, **fields) -> list[dict]:
    prompts, reward = files
    alignkit.train(method, model={"name_or_path": str(model_dir), "dtype": "float32"},
                   data={"train": [str(prompts)], "max_length": 64},
                   training={"output_dir": str(out), "max_steps": 3, "learning_rate": 1e-3, "per_device_batch_size": 4,
                             "lr_scheduler": "constant", "report_to": ["jsonl"], "seed": 0, "mixed_precision": "no",
                             "logging_steps": 1},
                   **{method: {"generation": {"max_new_tokens": 40, "num_samples": 4}, "rollout_batch_size": 4,
                               "reward": {"functions": [reward]}, "kl_coef": 0.05, "ppo_epochs": 2,
                               "padding_free": padding_free, **fields}})
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss/policy"' in x]


@pytest.mark.parametrize("method", ["grpo", "ppo"])
def test_padding_free_runs_are_the_padded_runs(tmp_path, stopping_model_dir, files, method, monkeypatch):
    packed_rows = []
    rows = BatchLayout.rows
    monkeypatch.setattr(BatchLayout, "rows", lambda self, lengths: packed_rows.append(lengths) or rows(self, lengths))
    fields = {"reuse_sampler_logps": False}  # the old log-probs from a forward: score_rollout packed too
    padded = _run(method, stopping_model_dir, files, tmp_path / "padded", False, **fields)
    assert not packed_rows
    packed = _run(method, stopping_model_dir, files, tmp_path / "packed", True, **fields)
    # old log-probs + reference + 2 epochs x 4 micro-batches of 4 rows, per step: all packed
    assert len(packed_rows) == 3 * (4 + 4 + 8)
    lengths = [n for batch in packed_rows for n in batch]
    assert max(lengths) > 2 * min(lengths)  # very different sequence lengths in the packed batches
    assert 0 < padded[0]["ended_with_eos"] < 1
    keys = COMPARED + (("loss/value", "values", "returns") if method == "ppo" else ())
    assert len(packed) == len(padded) == 3
    for step, (a, b) in enumerate(zip(packed, padded)):
        for key in keys:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (step, key)
        assert a["clipfrac"] == pytest.approx(b["clipfrac"], abs=0.005), step  # a fraction of tokens
