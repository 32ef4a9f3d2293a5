"""Tokenization: assistant-only labels, completions, truncation, default template, packing, padding."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from alignkit.data import (
    IGNORE_INDEX,
    DataError,
    attention_mask_from_lengths,
    ensure_chat_template,
    pack_sft,
    pad,
    tokenize_conversation,
    tokenize_example,
)
from alignkit.testing import tiny_tokenizer


def u(text):
    return {"role": "user", "content": text}


def a(text):
    return {"role": "assistant", "content": text}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def labelled_spans(tok, ids, labels):
    """Decoded runs of consecutive labelled tokens."""
    spans, run = [], []
    for i, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            assert label == i
            run.append(i)
        elif run:
            spans.append(run)
            run = []
    if run:
        spans.append(run)
    return [tok.decode(s) for s in spans]


def encode(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


# ---- sft -----------------------------------------------------------------------------------------

def test_assistant_only_labels_multi_turn(tok):
    messages = [{"role": "system", "content": "be nice"}, u("hello there"), a("yes the cat sat"), u("what is it"),
                a("a big dog")]
    ex = tokenize_example({"messages": messages}, tok, "sft", max_length=512)
    assert labelled_spans(tok, ex["input_ids"], ex["labels"]) == ["yes the cat sat<|im_end|>", "a big dog<|im_end|>"]
    full = encode(tok, tok.apply_chat_template(messages, tokenize=False))
    # the same tokens as rendering the whole conversation, minus the "\n" ChatML writes after the last <|im_end|>
    assert ex["input_ids"] == full[:-1] and tok.decode(full[-1:]) == "\n"
    _, _, prompt_len = tokenize_conversation(tok, messages)
    assert tok.decode(ex["input_ids"][prompt_len:]) == "a big dog<|im_end|>"


def test_template_that_rewrites_earlier_turns_is_an_error():
    tok = tiny_tokenizer()
    # like templates that drop reasoning from past assistant turns: a past turn renders differently
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' and not loop.last %}(earlier answer){% else %}{{ m['content'] }}{% endif %}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with pytest.raises(DataError, match="does not render .* as a prefix of the longer conversation"):
        tokenize_example({"messages": [u("q"), a("x"), u("q2"), a("y")]}, tok, "sft", max_length=512)


def test_token_merge_across_the_turn_boundary_keeps_prompt_tokens():
    tok = tiny_tokenizer()
    # the generation prompt ends with a space that the tokenizer would merge into the answer's first word
    tok.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '<|im_end|>' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    ids, labels, prompt_len = tokenize_conversation(tok, [u("hello"), a("yes")])
    assert ids[:prompt_len] == encode(tok, "user: hello<|im_end|>assistant: ")
    assert labelled_spans(tok, ids, labels) == ["yes<|im_end|>"]


def test_plain_sft_prompt_completion_and_text(tok):
    ex = tokenize_example({"prompt": "what is", "completion": " the cat"}, tok, "sft", max_length=64)
    assert ex["input_ids"] == encode(tok, "what is") + encode(tok, " the cat") + [tok.eos_token_id]
    assert labelled_spans(tok, ex["input_ids"], ex["labels"]) == [" the cat<|im_end|>"]
    ex = tokenize_example({"text": "the cat sat"}, tok, "sft", max_length=64)
    assert ex["labels"] == ex["input_ids"] == encode(tok, "the cat sat") + [tok.eos_token_id]


def test_plain_prompts_get_bos_only_when_the_tokenizer_adds_it():
    from tokenizers.processors import TemplateProcessing

    tok = tiny_tokenizer()
    tok.bos_token = "<|endoftext|>"
    ex = tokenize_example({"prompt": "what is", "answer": "x"}, tok, "prompt", max_length=64)
    assert ex["prompt_ids"] == encode(tok, "what is")  # has a bos token but never adds it
    tok._tokenizer.post_processor = TemplateProcessing(single="<|endoftext|> $A",
                                                       special_tokens=[("<|endoftext|>", tok.bos_token_id)])
    ex = tokenize_example({"prompt": "what is", "answer": "x"}, tok, "prompt", max_length=64)
    assert ex["prompt_ids"] == [tok.bos_token_id] + encode(tok, "what is")
    assert ex["prompt"] == "what is" and ex["answer"] == "x"


# ---- other kinds ---------------------------------------------------------------------------------

def test_preference_and_unpaired(tok):
    rec = {"prompt": [u("the cat")], "chosen": [a("sat on the mat")], "rejected": [a("no")]}
    ex = tokenize_example(rec, tok, "preference", max_length=512)
    assert tok.decode(ex["prompt_ids"]) == "<|im_start|>user\nthe cat<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(ex["chosen_ids"]) == "sat on the mat<|im_end|>"
    assert tok.decode(ex["rejected_ids"]) == "no<|im_end|>"
    ex = tokenize_example({"prompt": "the cat", "chosen": " sat", "rejected": " ran"}, tok, "preference", max_length=64)
    assert ex == {"prompt_ids": encode(tok, "the cat"), "chosen_ids": encode(tok, " sat") + [tok.eos_token_id],
                  "rejected_ids": encode(tok, " ran") + [tok.eos_token_id]}
    ex = tokenize_example({"prompt": [u("q")], "completion": [a("yes")], "label": False}, tok, "unpaired", max_length=64)
    assert tok.decode(ex["completion_ids"]) == "yes<|im_end|>" and ex["label"] is False


def test_scored(tok):
    ex = tokenize_example({"prompt": [u("film")], "completion": [a("great")], "score": 1.0}, tok, "scored",
                          max_length=64)
    assert tok.decode(ex["input_ids"][ex["prompt_len"]:]) == "great<|im_end|>" and ex["score"] == 1.0
    ex = tokenize_example({"text": "bad film", "score": 0.0}, tok, "scored", max_length=64)
    assert ex == {"input_ids": encode(tok, "bad film") + [tok.eos_token_id], "score": 0.0, "prompt_len": 0}


def test_prompt_kind_renders_generation_prompt(tok):
    ex = tokenize_example({"prompt": [u("what is two")], "answer": "2"}, tok, "prompt", max_length=64)
    assert tok.decode(ex["prompt_ids"]).endswith("<|im_start|>assistant\n") and ex["answer"] == "2"


# ---- truncation ----------------------------------------------------------------------------------

def test_truncation_cuts_prompt_from_left_and_keeps_completion(tok):
    long_q = " ".join(["the cat sat on the mat"] * 20)
    messages = [u(long_q), a("a dog")]
    full = tokenize_example({"messages": messages}, tok, "sft", max_length=10_000)
    stats = Counter()
    ex = tokenize_example({"messages": messages}, tok, "sft", max_length=24, stats=stats)
    assert len(ex["input_ids"]) == 24 and ex["input_ids"] == full["input_ids"][-24:]
    assert labelled_spans(tok, ex["input_ids"], ex["labels"]) == ["a dog<|im_end|>"]
    assert stats == {"truncated_prompt": 1, "truncated_completion": 0}

    ex = tokenize_example({"messages": messages}, tok, "sft", max_length=100, max_prompt_length=12, stats=stats)
    n_completion = len(encode(tok, "a dog")) + 1
    assert len(ex["input_ids"]) == 12 + n_completion and ex["input_ids"] == full["input_ids"][-(12 + n_completion):]
    assert stats["truncated_prompt"] == 2


def test_completion_longer_than_max_length_is_cut_on_the_right(tok):
    stats = Counter()
    answer = " ".join(["one two three"] * 10)
    ex = tokenize_example({"prompt": "q", "completion": answer}, tok, "sft", max_length=8, stats=stats)
    assert ex["input_ids"] == encode(tok, answer)[:8] and ex["labels"] == ex["input_ids"]
    assert stats == {"truncated_prompt": 1, "truncated_completion": 1}


def test_preference_truncation_fits_the_longest_completion(tok):
    stats = Counter()
    rec = {"prompt": " ".join(["the cat"] * 20), "chosen": " yes the dog ran", "rejected": " no"}
    ex = tokenize_example(rec, tok, "preference", max_length=12, stats=stats)
    chosen = encode(tok, " yes the dog ran") + [tok.eos_token_id]
    assert ex["chosen_ids"] == chosen and len(ex["prompt_ids"]) + len(chosen) == 12
    assert ex["prompt_ids"] == encode(tok, rec["prompt"])[-len(ex["prompt_ids"]):]
    assert stats["truncated_prompt"] == 1 and stats["truncated_completion"] == 0


# ---- default chat template -----------------------------------------------------------------------

def test_default_chat_template_when_missing(caplog):
    tok = tiny_tokenizer(with_template=False)
    assert not tok.chat_template
    with caplog.at_level("WARNING", logger="alignkit"):
        assert ensure_chat_template(tok) is True
    assert "no chat template" in caplog.text
    assert ensure_chat_template(tok) is False
    ex = tokenize_example({"messages": [u("hi"), a("yes")]}, tok, "sft", max_length=64)
    assert tok.decode(ex["input_ids"]) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyes<|im_end|>"


def test_missing_template_without_ensure_is_a_clear_error():
    tok = tiny_tokenizer(with_template=False)
    with pytest.raises(DataError, match="no chat template"):
        tokenize_example({"messages": [u("hi"), a("yes")]}, tok, "sft", max_length=64)


# ---- packing -------------------------------------------------------------------------------------

def test_pack_sft_best_fit(tok):
    lengths = [7, 5, 4, 3, 3, 2, 1, 9]
    examples = [{"input_ids": list(range(100 * k, 100 * k + n)), "labels": list(range(100 * k, 100 * k + n))}
                for k, n in enumerate(lengths)]
    rows = pack_sft(examples, max_length=10)
    # best-fit decreasing: 9+1, 7+3, 5+4, 3+2 (34 tokens in the minimum of 4 rows)
    assert sorted(len(r["input_ids"]) for r in rows) == [5, 9, 10, 10]
    seen = []
    for row in rows:
        assert len(row["input_ids"]) == len(row["labels"]) == len(row["position_ids"]) == sum(row["seq_lens"])
        start = 0
        for n in row["seq_lens"]:
            chunk = row["input_ids"][start:start + n]
            assert row["position_ids"][start:start + n] == list(range(n))
            assert row["labels"][start] == IGNORE_INDEX and row["labels"][start + 1:start + n] == chunk[1:]
            seen.append(chunk[0] // 100)
            start += n
    assert sorted(seen) == list(range(len(lengths)))
    with pytest.raises(ValueError, match="truncate before packing"):
        pack_sft(examples, max_length=8)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_equal_separate_logits(tok, attn):
    """transformers 5 builds a block-diagonal causal mask from restarting position_ids when attention_mask
    is None and no KV cache is in use (use_cache=False; with a cache the packing is not detected)."""
    from alignkit.testing import tiny_llama

    model = tiny_llama(tok).eval()
    model.set_attn_implementation(attn)
    texts = ["the cat sat on the mat", "hello world", "what is the capital of france? paris", "yes"]
    examples = [tokenize_example({"messages": [u(t), a(t[::-1])]}, tok, "sft", max_length=64) for t in texts]
    (row,) = pack_sft(examples, max_length=256)
    with torch.no_grad():
        packed = model(input_ids=torch.tensor([row["input_ids"]]), position_ids=torch.tensor([row["position_ids"]]),
                       use_cache=False).logits[0]
        start = 0
        for n in row["seq_lens"]:
            alone = model(input_ids=torch.tensor([row["input_ids"][start:start + n]]), use_cache=False).logits[0]
            torch.testing.assert_close(packed[start:start + n], alone, atol=1e-5, rtol=0)
            start += n


# ---- padding -------------------------------------------------------------------------------------

def test_pad_and_attention_mask():
    assert pad([[1, 2, 3], [4]], 0).tolist() == [[1, 2, 3], [4, 0, 0]]
    assert pad([[1, 2, 3], [4]], -100, side="left").tolist() == [[1, 2, 3], [-100, -100, 4]]
    assert pad([[1, 2, 3], [4]], 0).dtype == torch.long
    assert attention_mask_from_lengths([3, 1]).tolist() == [[1, 1, 1], [1, 0, 0]]
    assert attention_mask_from_lengths([3, 1], max_len=4, side="left").tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]


def test_template_exceptions_become_data_errors():
    tok = tiny_tokenizer()
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                         "{{ raise_exception('System role not supported') }}{% endif %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(DataError, match="field 'chat_template': the chat template failed .*System role not supported"):
        tokenize_example({"messages": [{"role": "system", "content": "s"}, u("q"), a("x")]}, tok, "sft",
                         max_length=64)


def test_preference_margin_column_reaches_the_tokenized_row(tmp_path):
    import json

    from alignkit.config import DataConfig, DataSource
    from alignkit.data import DataError, build_datasets
    from alignkit.testing import tiny_tokenizer

    rows = [{"prompt": "a cat", "chosen": " good", "rejected": " bad", "margin": 2.5},
            {"prompt": "a dog", "chosen": " good", "rejected": " bad"}]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = build_datasets(DataConfig(train=[DataSource(path=str(path))]), tiny_tokenizer(), "preference").train
    margins = sorted(r.get("margin") for r in out if "margin" in r)
    assert margins == [2.5] and len(out) == 2
    path.write_text(json.dumps({**rows[0], "margin": "big"}) + "\n")
    with pytest.raises(DataError, match="margin"):
        build_datasets(DataConfig(train=[DataSource(path=str(path))]), tiny_tokenizer(), "preference")
