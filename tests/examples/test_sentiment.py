"""Held-out evaluation helpers and the sentiment task builder (synthetic reviews, no download)."""

from __future__ import annotations

import json

import pytest

from alignkit import sentiment
from alignkit.evaluation import mean_policy_reward, policy_preference_accuracy, reward_model_accuracy


def _pairs(path, chosen: str, rejected: str, n: int = 6):
    rows = [{"prompt": [{"role": "user", "content": f"say something {i}"}],
             "chosen": [{"role": "assistant", "content": chosen}],
             "rejected": [{"role": "assistant", "content": rejected}]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_policy_accuracy_counts_strict_wins(tmp_path, tiny_model_dir):
    ties = _pairs(tmp_path / "ties.jsonl", "the cat sat", "the cat sat")
    assert policy_preference_accuracy(tiny_model_dir, ties)["accuracy"] == 0.0  # equal is not a win
    both = _pairs(tmp_path / "a.jsonl", "the cat sat on the mat", "dog")
    swapped = _pairs(tmp_path / "b.jsonl", "dog", "the cat sat on the mat")
    a, b = policy_preference_accuracy(tiny_model_dir, both), policy_preference_accuracy(tiny_model_dir, swapped)
    assert a["accuracy"] + b["accuracy"] == pytest.approx(1.0) and a["pairs"] == 6


def test_reward_model_accuracy_is_symmetric(tmp_path):
    from alignkit.testing import save_tiny_bert_classifier

    rm = save_tiny_bert_classifier(tmp_path / "rm")
    a = reward_model_accuracy(rm, _pairs(tmp_path / "a.jsonl", "great film", "awful film"))
    b = reward_model_accuracy(rm, _pairs(tmp_path / "b.jsonl", "awful film", "great film"))
    assert a["accuracy"] + b["accuracy"] == pytest.approx(1.0)
    assert a["mean_margin"] == pytest.approx(-b["mean_margin"], abs=1e-5)


def test_mean_policy_reward_with_a_function(tmp_path, tiny_model_dir):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"tell me {i}"}) + "\n" for i in range(4)))
    res = mean_policy_reward(tiny_model_dir, prompts, reward_functions=["alignkit.rewards:target_token_share"],
                             max_new_tokens=6, num_samples=2)
    assert res["responses"] == 8 and 0.0 <= res["mean_reward"] <= 1.0
    again = mean_policy_reward(tiny_model_dir, prompts, reward_functions=["alignkit.rewards:target_token_share"],
                               max_new_tokens=6, num_samples=2)
    assert again == res  # seeded: comparable across policies


def test_sentiment_task_files(tmp_path, monkeypatch):
    import random

    rng = random.Random(0)
    words = "a fine film with actors and a plot that moves along well enough".split()
    fake = [{"id": i, "text": " ".join(rng.choice(words) for _ in range(12)), "score": rng.uniform(-4, 4)}
            for i in range(400)]
    monkeypatch.setattr(sentiment, "load_reviews", lambda: fake)
    files = sentiment.write_task_files(tmp_path, n_rm=50, n_pairs=20, n_prompts=10, n_eval=10)
    rm = [json.loads(x) for x in files["rm_train"].read_text().splitlines()]
    assert len(rm) == 50 and all(r["score_chosen"] - r["score_rejected"] >= 1.0 for r in rm)
    train_ids = {r["id"] for r in sentiment.split_reviews(fake)[0]}
    held_texts = {r["text"] for r in fake if r["id"] not in train_ids}
    evals = [json.loads(x) for x in files["dpo_eval"].read_text().splitlines()]
    assert all(e["chosen"][0]["content"] in held_texts for e in evals)  # held-out pairs use held-out reviews
    kto = [json.loads(x) for x in files["kto_train"].read_text().splitlines()]
    assert {r["label"] for r in kto} == {True, False}
    p = json.loads(files["prompts_train"].read_text().splitlines()[0])
    assert p["prompt"][0]["content"].startswith(sentiment.CONTINUE)
