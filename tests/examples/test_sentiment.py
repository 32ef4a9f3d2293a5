"""The demo's sentiment task (examples/sentiment): its data files, evaluation helpers and VADER reward."""

from __future__ import annotations

import json

import pytest
import torch

from examples.sentiment import task as sentiment
from examples.sentiment import vader_reward
from examples.sentiment.evaluation import (
    distinct_n,
    mean_policy_reward,
    policy_preference_accuracy,
    reward_model_accuracy,
)


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
    assert 0.0 < res["distinct_2"] <= 1.0 and 0.0 < res["distinct_2_per_response"] <= 1.0
    again = mean_policy_reward(tiny_model_dir, prompts, reward_functions=["alignkit.rewards:target_token_share"],
                               max_new_tokens=6, num_samples=2)
    assert again == res  # seeded: comparable across policies


def test_held_out_kl_is_the_exact_kl_of_the_next_token_distributions(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from examples.sentiment.evaluation import sequence_kl

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"tell me {i}"}) + "\n" for i in range(3)))
    args = dict(reward_functions=["alignkit.rewards:target_token_share"], max_new_tokens=5, num_samples=2)
    same = mean_policy_reward(tiny_model_dir, prompts, reference_dir=tiny_model_dir, **args)
    assert same["kl_to_reference"] == pytest.approx(0.0, abs=1e-6)
    other = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        other.lm_head.weight.mul_(3.0)  # sharper next-token distributions
    other.save_pretrained(tmp_path / "other")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "other")
    moved = mean_policy_reward(tmp_path / "other", prompts, reference_dir=tiny_model_dir, **args)
    assert moved["kl_to_reference"] > 0.01
    # by hand on one rollout: sum over response positions of sum_v p_v (log p_v - log q_v)
    from alignkit.rollout import HFSampler, RolloutBatch, SamplingConfig

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    rollout = HFSampler(tok, SamplingConfig(max_new_tokens=4)).generate(other.eval(), [[5, 6, 7], [8, 9]], seed=0)
    b = RolloutBatch.from_rollout(rollout)
    want = []
    for i in range(len(b)):
        ids = b.input_ids[i][b.attention_mask[i].bool()][None]
        n = int(b.response_mask[i].sum())
        p = torch.log_softmax(other(ids).logits[0, -n - 1:-1], -1) if n else None
        q = torch.log_softmax(base(ids).logits[0, -n - 1:-1], -1) if n else None
        want.append(float((p.exp() * (p - q)).sum()) if n else 0.0)
    torch.testing.assert_close(sequence_kl(other, base, rollout), torch.tensor(want), rtol=1e-4, atol=1e-5)


def test_distinct_2_counts_repeated_word_pairs():
    loop = "Mike is a movie about a movie about a movie"  # 9 pairs, 5 distinct
    assert distinct_n([loop]) == {"corpus": 5 / 9, "per_text": 5 / 9}
    fresh = "A warm and funny film"  # 4 distinct pairs
    both = distinct_n([loop, fresh, fresh.upper()])  # the same words upper-cased repeat the same pairs
    assert both["corpus"] == (5 + 4) / (9 + 4 + 4)
    assert both["per_text"] == (5 / 9 + 1 + 1) / 3
    assert distinct_n(["one", ""]) == {"corpus": 0.0, "per_text": 0.0}  # no pair at all


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


def test_parse_ground_truth_skips_malformed_lines():
    text = "1\t2.5\tA fine film.\r\n2\tnot-a-number\tx\n3\tonly two fields\n\n4\t-4.0\tAwful.\n5\t9\tOut of range\n"
    records, problems = sentiment.parse_ground_truth(text, "f.txt")
    assert records == [{"id": 1, "text": "A fine film.", "score": 2.5}, {"id": 4, "text": "Awful.", "score": -4.0}]
    assert len(problems) == 3 and problems[0].startswith("f.txt:2:")


def test_decode_falls_back_to_latin1():
    assert sentiment._decode_text("café".encode(), "x") == ("café", "utf-8")
    assert sentiment._decode_text("café".encode("latin-1"), "x") == ("café", "latin-1")


def test_vader_reward_loads_the_asset_scorer_by_file_location(tmp_path, monkeypatch):
    import sys

    from alignkit import assets

    package = tmp_path / "vaderSentiment"
    package.mkdir()
    (package / "vaderSentiment.py").write_text(
        "class SentimentIntensityAnalyzer:\n"
        "    def polarity_scores(self, text):\n"
        "        return {'compound': 0.5 if 'great' in text else -0.5}\n")
    monkeypatch.setattr(assets, "fetch", lambda name: tmp_path)
    path_before = list(sys.path)
    vader_reward._analyzer.cache_clear()
    try:
        assert vader_reward.vader_sentiment(["", ""], ["a great film", "awful"]) == [0.5, -0.5]
    finally:
        vader_reward._analyzer.cache_clear()
    assert sys.path == path_before and "vaderSentiment" not in sys.modules


@pytest.mark.slow
def test_real_reviews_and_vader_on_the_asset():
    reviews = sentiment.load_reviews()
    assert len(reviews) == 10605
    assert all(set(r) == {"id", "text", "score"} and -4 <= r["score"] <= 4 and r["text"] for r in reviews)
    assert reviews[0]["text"].startswith("The Rock is destined")
    assert any("clichés" in r["text"] for r in reviews)  # decoded as UTF-8, not mojibake
    vader_reward._analyzer.cache_clear()
    good, bad = vader_reward.vader_sentiment(["", ""], ["a great, wonderful film", "an awful, boring film"])
    assert -1 <= bad < -0.5 and 0.5 < good <= 1
