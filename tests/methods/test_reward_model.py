"""Reward models: pairwise (Bradley-Terry, margins) and regression objectives, causal-LM and encoder
backbones, and the saved output (plain transformers folder with reward mean/std in its config)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from alignkit import build_config
from alignkit.config import ConfigError
from alignkit.losses import bradley_terry_loss
from alignkit.methods.reward_model import RewardMethod
from alignkit.rewards import RewardModelFraming, encoder_special_tokens

from . import BAD, GOOD, TOPICS, metrics, preference_records, train, write_jsonl


@pytest.fixture
def pref_file(tmp_path):
    return write_jsonl(tmp_path / "pref.jsonl", preference_records())


def test_pairwise_rm_on_a_causal_lm_learns_and_saves_a_plain_classifier_with_reward_stats(
        tmp_path, tiny_model_dir, pref_file):
    out = tmp_path / "rm"
    result = train("rm", tiny_model_dir, pref_file, out)
    steps, final_eval = metrics(out)
    assert steps[6]["rewards/margins"] > steps[1]["rewards/margins"] + 0.5
    assert steps[6]["rewards/accuracies"] >= 0.75 and final_eval["eval/rewards/accuracies"] >= 0.75
    assert steps[6]["loss"] < steps[1]["loss"]

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.num_labels == 1
    assert model.config.alignkit_reward_std > 0
    assert model.config.alignkit_reward_mean == pytest.approx(result["alignkit_reward_mean"])
    assert model.config.alignkit_reward_stats_count == 2 * 16  # chosen and rejected of the 16 training pairs
    stats = json.loads((out / "alignkit_reward_stats.json").read_text())
    assert stats["alignkit_reward_std"] == pytest.approx(model.config.alignkit_reward_std)

    def score(text: str) -> float:
        ids = tok(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            return float(model(**ids).logits[0, 0])

    prompt = "tell me about the dog"
    assert score(prompt + " wonderful good love happy") > score(prompt + " awful boring sad hate")


def test_regression_rm_fits_scores(tmp_path, tiny_model_dir):
    rng = random.Random(1)
    records = []
    for i in range(24):
        good = i % 2 == 0
        words = GOOD if good else BAD
        records.append({"prompt": f"tell me about the {rng.choice(TOPICS)}",
                        "completion": " ".join(rng.choice(words) for _ in range(4)), "score": 1.0 if good else -1.0})
    data = write_jsonl(tmp_path / "scored.jsonl", records)
    out = tmp_path / "rm"
    train("rm", tiny_model_dir, data, out, overrides=["rm.objective=regression"], max_steps=8)
    steps, final_eval = metrics(out)
    assert steps[8]["loss"] < 0.5 * steps[1]["loss"]
    assert steps[8]["mae"] < steps[1]["mae"] and final_eval["eval/mae"] < 0.75
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(out)
    assert config.alignkit_reward_stats_count == 16 and config.alignkit_reward_std > 0


def test_rm_on_an_encoder_backbone_uses_its_pair_form_and_trains(tmp_path, pref_file):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from alignkit.testing import save_tiny_bert_classifier

    bert = save_tiny_bert_classifier(tmp_path / "bert")
    tok = AutoTokenizer.from_pretrained(bert)
    special = encoder_special_tokens(tok)
    assert special == (tok.cls_token_id, tok.sep_token_id)
    p = tok("tell me about the cat", add_special_tokens=False)["input_ids"]
    c = tok("happy good", add_special_tokens=False)["input_ids"]
    row = {"prompt_ids": p, "chosen_ids": c, "rejected_ids": c[:1]}
    framing = RewardModelFraming(tok.pad_token_id, special_tokens=special, max_length=64)
    batch = RewardMethod("pairwise", framing).collate([row])
    expected = tok("tell me about the cat", "happy good")
    assert batch["input_ids"][0].tolist() == expected["input_ids"]  # what scoring with the tokenizer gives
    assert "token_type_ids" not in batch  # this tokenizer does not make them, so training does not use them
    batch = RewardMethod("pairwise", RewardModelFraming(tok.pad_token_id, special_tokens=special,
                                                       token_type_ids=True)).collate([row])
    assert batch["token_type_ids"][0].tolist() == [0] * (len(p) + 2) + [1] * (len(c) + 1)  # BERT's segment ids

    out = tmp_path / "rm"
    train("rm", bert, pref_file, out, max_steps=8, learning_rate=3e-3)
    steps, final_eval = metrics(out)
    assert steps[8]["rewards/margins"] > steps[1]["rewards/margins"]
    assert final_eval["eval/rewards/accuracies"] >= 0.75
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert type(model).__name__ == "BertForSequenceClassification" and model.config.alignkit_reward_std > 0


class _FixedScores(torch.nn.Module):
    """A 'classifier' whose reward is the first input id."""

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        return type("Out", (), {"logits": input_ids[:, :1].float()})()


def test_pairwise_margin_field_is_scaled_and_used():
    rows = [{"prompt_ids": [3], "chosen_ids": [1], "rejected_ids": [1], "margin": 2.0},
            {"prompt_ids": [5], "chosen_ids": [1], "rejected_ids": [1]}]
    method = RewardMethod("pairwise", RewardModelFraming(pad_token_id=0), margin=0.5)
    batch = method.collate(rows)
    assert batch["margin"].tolist() == [1.0, 0.0]
    batch["input_ids"][2:, 0] = torch.tensor([1, 2])  # rejected rewards 1 and 2; chosen 3 and 5
    loss, m = method.loss(_FixedScores(), batch)
    expected = bradley_terry_loss(torch.tensor([3.0, 5.0]), torch.tensor([1.0, 2.0]), torch.tensor([1.0, 0.0])).sum()
    assert float(loss) == pytest.approx(float(expected))
    assert float(m["rewards/margins"]) == pytest.approx(5.0) and float(m["rewards/accuracies"]) == 2.0
    assert "margin" not in RewardMethod("pairwise", RewardModelFraming(0), margin=0.0).collate(rows)


def test_rm_config_errors():
    with pytest.raises(ConfigError, match="rm.objective='pointwise'.*pairwise, regression"):
        build_config("rm", {"rm": {"objective": "pointwise"}})


def test_padding_free_rm_trains_identically_and_reads_the_score_where_transformers_does(tmp_path, tiny_model_dir,
                                                                                      pref_file):
    for name, on in (("off", "false"), ("on", "true")):
        train("rm", tiny_model_dir, pref_file, tmp_path / name, max_steps=4, overrides=[f"rm.padding_free={on}"])
    off, off_eval = metrics(tmp_path / "off")
    on, on_eval = metrics(tmp_path / "on")
    for step in off:
        for key in ("loss", "rewards/margins", "rewards/chosen"):
            assert on[step][key] == pytest.approx(off[step][key], rel=1e-4, abs=1e-5), (step, key)
    assert on_eval["eval/loss"] == pytest.approx(off_eval["eval/loss"], rel=1e-4, abs=1e-5)

    # pad = eos in this tokenizer: transformers' classifier reads the last non-pad token, before the final eos
    from alignkit.forward import BatchLayout

    method = RewardMethod("pairwise", RewardModelFraming(pad_token_id=2), layout=BatchLayout(packed=True))
    batch = method.collate([{"prompt_ids": [5, 6], "chosen_ids": [7, 2], "rejected_ids": [8, 9, 2]}])
    flat = batch["input_ids"].reshape(-1)
    assert flat[batch["last_positions"]].tolist() == [7, 9]
