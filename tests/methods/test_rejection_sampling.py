"""Rejection sampling (best-of-N): keeps the best under a known reward; an interrupted run resumes exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import COUNT_E_REWARD

import alignkit
from alignkit.config import ConfigError

REWARD = COUNT_E_REWARD


@pytest.fixture
def reward_spec(tmp_path) -> str:
    path = tmp_path / "my_reward.py"
    path.write_text(REWARD)
    return f"{path}:count_e"


@pytest.fixture
def chat_prompts(tmp_path) -> Path:
    from conftest import memorisation_records

    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in memorisation_records(10)) + "\n")
    return path


@pytest.fixture
def text_prompts(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"tell me about the cat {i}"}) for i in range(11)) + "\n")
    return path


def _config(model_dir: Path, prompts: Path, out: Path, reward_spec: str, **section) -> dict:
    return {
        "model": {"name_or_path": str(model_dir), "dtype": "float32"},
        "data": {"train": [str(prompts)], "max_length": 64},
        "training": {"output_dir": str(out), "per_device_batch_size": 4, "max_steps": 12, "learning_rate": 3e-3,
                     "lr_scheduler": "constant", "report_to": ["jsonl"], "seed": 7},
        "rejection_sampling": {"generation": {"num_samples": 4, "max_new_tokens": 12}, "sampling_batch_size": 3,
                               "reward": {"functions": [reward_spec]}, **section},
    }


def _rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "best_of_n.jsonl").read_text().splitlines()]


def test_keeps_the_best_response_and_trains_sft_on_it(tmp_path, tiny_model_dir, chat_prompts, reward_spec):
    cfg = _config(tiny_model_dir, chat_prompts, tmp_path / "run", reward_spec, train_sft=True)
    res = alignkit.train("rejection_sampling", **cfg)
    rows = _rows(tmp_path / "run")
    assert sorted(r["prompt_id"] for r in rows) == list(range(10))  # every prompt once
    for r in rows:
        assert len(r["all_scores"]) == 4
        assert r["score"] == max(r["all_scores"]) == r["all_scores"][r["sample_index"]]
        assert r["messages"][-1]["role"] == "assistant"  # chat prompts give conversations
        assert r["score"] == r["messages"][-1]["content"].count("e")  # the kept text scores that
    summary = json.loads((tmp_path / "run" / "best_of_n_summary.json").read_text())
    assert summary == res["best_of_n"]
    assert summary["mean_best_score"] > summary["mean_first_sample_score"]
    assert summary["kept_rows"] == 10
    losses = [json.loads(x)["loss"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert res["step"] == 12 and losses[-1] < 0.5 * losses[0]  # SFT learned the kept responses


def test_threshold_keeps_every_response_at_or_above_it(tmp_path, tiny_model_dir, text_prompts, reward_spec):
    cfg = _config(tiny_model_dir, text_prompts, tmp_path / "run", reward_spec, keep="threshold", threshold=2.0)
    alignkit.train("rejection_sampling", **cfg)
    rows = _rows(tmp_path / "run")
    progress = [json.loads(x) for x in (tmp_path / "run" / "best_of_n.progress.jsonl").read_text().splitlines()[1:]]
    scores = {pid: s for e in progress for pid, s in zip(e["prompt_ids"], e["all_scores"])}
    assert sorted(scores) == list(range(11))
    assert all(set(r) >= {"prompt", "completion", "score"} and r["score"] >= 2.0 for r in rows)
    for pid, s in scores.items():
        kept = [r for r in rows if r["prompt_id"] == pid]
        assert len(kept) == sum(x >= 2.0 for x in s)  # (no blank responses at this length)
        assert [r["score"] for r in kept] == sorted(r["score"] for r in kept)[::-1]


def test_an_interrupted_run_resumes_to_exactly_the_uninterrupted_result(tmp_path, tiny_model_dir, text_prompts,
                                                                       reward_spec, monkeypatch):
    from alignkit.cli import main
    from alignkit.rollout import HFSampler
    from alignkit.rollout.resumable import SampleLog

    # uninterrupted, through the CLI
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(_config(tiny_model_dir, text_prompts, tmp_path / "full", reward_spec)))
    assert main(["train", "rejection_sampling", str(path)]) == 0
    full = _rows(tmp_path / "full")

    # crash while writing the third batch: half of its text reaches the file, no commit
    real_append, calls = SampleLog.append, []

    def crashing_append(self, batch, results):
        calls.append(batch)
        if len(calls) == 3:
            text = "".join(json.dumps(r) + "\n" for res in results for r in res.records)
            with open(self.path, "a") as f:
                f.write(text[: len(text) // 2 + 5])
            raise RuntimeError("simulated crash")
        real_append(self, batch, results)

    monkeypatch.setattr(SampleLog, "append", crashing_append)
    cfg = _config(tiny_model_dir, text_prompts, tmp_path / "crash", reward_spec)
    with pytest.raises(RuntimeError, match="simulated crash"):
        alignkit.train("rejection_sampling", **cfg)
    written = (tmp_path / "crash" / "best_of_n.jsonl").read_text()
    assert written.count("\n") > 6 and not written.endswith("\n")  # two batches, part of the third, a cut line
    monkeypatch.setattr(SampleLog, "append", real_append)

    generated = []
    real_generate = HFSampler.generate

    def counting_generate(self, model, prompts, *, seed=None):
        generated.append(len(prompts))
        return real_generate(self, model, prompts, seed=seed)

    monkeypatch.setattr(HFSampler, "generate", counting_generate)
    res = alignkit.train("rejection_sampling", **cfg)
    assert sum(generated) == 11 - 6  # only the prompts of uncommitted batches were sampled again
    resumed = _rows(tmp_path / "crash")
    assert sorted(r["prompt_id"] for r in resumed) == list(range(11))
    assert resumed == full
    assert res["best_of_n"]["prompts_done"] == 11


def test_config_errors_name_the_key(tiny_model_dir, text_prompts, reward_spec, tmp_path):
    with pytest.raises(ConfigError, match="rejection_sampling.keep=threshold needs"):
        alignkit.load_config("rejection_sampling", overrides=["rejection_sampling.keep=threshold",
                                                              f"rejection_sampling.reward.functions=[{reward_spec}]"])
    with pytest.raises(ConfigError, match="rejection_sampling.reward.normalize='batch'"):
        alignkit.load_config("rejection_sampling", overrides=["rejection_sampling.reward.normalize=batch",
                                                              f"rejection_sampling.reward.functions=[{reward_spec}]"])
