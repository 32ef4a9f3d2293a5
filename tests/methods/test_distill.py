"""Distillation (kd, seqkd, gkd) on tiny Llamas: the student's KL to the teacher falls; vocab checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import alignkit
from alignkit.config import ConfigError


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory):
    from alignkit.testing import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("teacher"), seed=1)  # same tokenizer, other weights


@pytest.fixture
def data_file(tmp_path):
    from conftest import memorisation_records

    path = tmp_path / "sft.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in memorisation_records(24)) + "\n")
    return path


def _train(method: str, tmp_path: Path, student: Path, data: Path, section: dict, **training) -> dict:
    return alignkit.train(
        method,
        model={"name_or_path": str(student), "dtype": "float32"},
        data={"train": [str(data)], "eval_split": 8, "max_length": 64},
        training={"output_dir": str(tmp_path / method), "max_steps": 16, "per_device_batch_size": 4,
                  "learning_rate": 3e-3, "lr_scheduler": "constant", "report_to": ["jsonl"], **training},
        **{method: section},
    )


def _metrics(out: str | Path) -> list[dict]:
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
def test_kd_lowers_the_students_kl_to_the_teacher(tmp_path, tiny_model_dir, teacher_dir, data_file, divergence):
    res = _train("kd", tmp_path, tiny_model_dir, data_file, {"teacher": str(teacher_dir), "divergence": divergence})
    before, after = res["eval_before"]["eval/kl_to_teacher"], res["eval"]["eval/kl_to_teacher"]
    assert after < 0.5 * before, (before, after)
    divergences = [r["divergence"] for r in _metrics(res["output_dir"]) if "divergence" in r]
    assert divergences[-1] < divergences[0]


def test_gkd_lowers_kl_with_student_samples(tmp_path, tiny_model_dir, teacher_dir, data_file):
    res = _train("gkd", tmp_path, tiny_model_dir, data_file,
                 {"teacher": str(teacher_dir), "lmbda": 0.5, "beta": 0.5, "generation": {"max_new_tokens": 8}})
    before, after = res["eval_before"]["eval/kl_to_teacher"], res["eval"]["eval/kl_to_teacher"]
    assert after < 0.6 * before, (before, after)
    shares = [r["on_policy"] for r in _metrics(res["output_dir"]) if "on_policy" in r]
    assert 0 < sum(shares) < len(shares)  # both kinds of batches happened
    assert res["eval"]["eval/on_policy"] == 0.0  # eval scores the fixed eval completions


def test_gkd_rng_state_round_trips_through_a_checkpoint():
    from alignkit.methods.distill import GKDConfig, GKDMethod

    method = GKDMethod(GKDConfig(teacher="t", lmbda=0.5), None, 0, None, seed=3)
    for _ in range(7):
        method.draw_on_policy()
    state = json.loads(json.dumps(method.state_dict()))  # as the checkpoint stores it
    expected = [method.draw_on_policy() for _ in range(20)]
    resumed = GKDMethod(GKDConfig(teacher="t", lmbda=0.5), None, 0, None, seed=3)
    resumed.load_state_dict(state)
    assert [resumed.draw_on_policy() for _ in range(20)] == expected
    assert resumed.draws == method.draws


def test_seqkd_trains_on_the_teachers_greedy_completions(tmp_path, tiny_model_dir, teacher_dir, data_file):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignkit.data import tokenize_example
    from alignkit.rollout import HFSampler, SamplingConfig

    res = alignkit.train(
        "seqkd",
        model={"name_or_path": str(tiny_model_dir), "dtype": "float32"},
        data={"train": [str(data_file)], "eval": [str(data_file)], "max_length": 64},
        training={"output_dir": str(tmp_path / "seqkd"), "max_steps": 16, "per_device_batch_size": 4,
                  "learning_rate": 3e-3, "lr_scheduler": "constant", "report_to": ["jsonl"]},
        seqkd={"teacher": str(teacher_dir), "generation": {"max_new_tokens": 8}, "sampling_batch_size": 5},
    )
    rows = [json.loads(x) for x in Path(res["teacher_data"]).read_text().splitlines()]
    ids = [r["prompt_id"] for r in rows]
    assert len(set(ids)) == len(ids) >= 20  # at most once each (a blank completion is not kept)
    progress = Path(res["teacher_data"]).with_name("teacher_data.progress.jsonl").read_text().splitlines()[1:]
    assert sorted(i for line in progress for i in json.loads(line)["prompt_ids"]) == list(range(24))
    assert all(r["messages"][-1]["role"] == "assistant" and r["messages"][-2]["role"] == "user" for r in rows)
    # the teacher wrote them (greedy): regenerate one
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    row = rows[0]
    prompt_ids = tokenize_example({"prompt": row["messages"][:-1]}, tok, "prompt", max_length=64)["prompt_ids"]
    sampler = HFSampler(tok, SamplingConfig(max_new_tokens=8, do_sample=False))
    assert sampler.generate(teacher, [prompt_ids]).response_texts[0] == row["messages"][-1]["content"]
    losses = [r["loss"] for r in _metrics(res["output_dir"]) if "loss" in r]
    assert losses[-1] < 0.5 * losses[0]
    assert "eval/kl_to_teacher" in res["eval"] and "eval/kl_to_teacher" in res["eval_before"]


def _other_vocab_llama(path: Path) -> Path:
    from alignkit.testing import tiny_llama, tiny_tokenizer

    tok = tiny_tokenizer(vocab_size=384)
    tiny_llama(tok).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("teacher_kind", ["llama_other_vocab", "bert"])
def test_a_teacher_with_another_vocabulary_is_refused(tmp_path, tiny_model_dir, data_file, teacher_kind):
    from alignkit.testing import save_tiny_bert_classifier

    teacher = (_other_vocab_llama(tmp_path / "t") if teacher_kind == "llama_other_vocab"
               else save_tiny_bert_classifier(tmp_path / "t"))
    with pytest.raises(ConfigError) as e:
        _train("kd", tmp_path, tiny_model_dir, data_file, {"teacher": str(teacher)})
    msg = str(e.value)
    assert str(teacher) in msg and str(tiny_model_dir) in msg and "vocabular" in msg


def test_padded_lm_heads_are_compared_over_the_tokenizers_tokens(tiny_tok):
    from alignkit.methods.distill import shared_vocab_size
    from alignkit.testing import tiny_llama

    student = tiny_llama(tiny_tok)
    teacher = tiny_llama(tiny_tok)
    assert shared_vocab_size(student, teacher, tiny_tok, "s", "t") is None
    teacher.resize_token_embeddings(len(tiny_tok) + 64)
    assert shared_vocab_size(student, teacher, tiny_tok, "s", "t") == len(tiny_tok)


def test_kd_loss_is_the_summed_token_kl(tiny_tok):
    """forward_kl over completion tokens equals alignkit.losses.distill.forward_kl x token count."""
    from conftest import memorisation_records

    from alignkit.data import tokenize_example
    from alignkit.losses.distill import forward_kl
    from alignkit.methods.distill import KDConfig, KDMethod
    from alignkit.testing import tiny_llama

    student, teacher = tiny_llama(tiny_tok, seed=0), tiny_llama(tiny_tok, seed=1)
    method = KDMethod(KDConfig(teacher="t", temperature=2.0), teacher.eval(), tiny_tok.pad_token_id)
    batch = method.collate([tokenize_example(r, tiny_tok, "sft", max_length=64) for r in memorisation_records(3)])
    loss, metrics = method.loss(student, batch)
    s_logits = student(batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    with torch.no_grad():
        t_logits = teacher(batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    mask = batch["labels"][:, 1:] != -100
    expected = forward_kl(s_logits, t_logits, mask, temperature=2.0) * mask.sum()
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)
    assert method.count_items(batch) == int(mask.sum())
    assert metrics["kl_to_teacher"] > 0
