"""build_datasets end to end: file types x kinds, mixing, eval split, skip counts, truncation stats, packing."""

from __future__ import annotations

import csv
import json
from collections import Counter

import pytest

from alignkit.config import DataConfig, DataSource
from alignkit.data import IGNORE_INDEX, DataError, build_datasets
from alignkit.testing import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def u(text):
    return {"role": "user", "content": text}


def a(text):
    return {"role": "assistant", "content": text}


def write(path, records):
    """Write ``records`` in the file type given by ``path``'s suffix (or a datasets folder without one)."""
    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    elif suffix == ".json":
        path.write_text(json.dumps(records))
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)
    elif suffix == ".csv":
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(records[0]))
            w.writeheader()
            w.writerows({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()} for r in records)
    else:
        from datasets import Dataset

        Dataset.from_list(records).save_to_disk(str(path))
    return str(path)


def cfg(*paths, **kwargs):
    return DataConfig(train=[DataSource(p) if isinstance(p, str) else p for p in paths], **kwargs)


CHATS = [{"messages": [u(f"what is {i}"), a(f"it is {i}")]} for i in range(6)]
PREFS = [{"prompt": [u(f"q {i}")], "chosen": [a("yes good")], "rejected": [a("no bad")]} for i in range(6)]


@pytest.mark.parametrize("name", ["d.jsonl", "d.json", "d.parquet", "d.csv", "ds_folder"])
def test_file_types_sft(tmp_path, tok, name):
    splits = build_datasets(cfg(write(tmp_path / name, CHATS)), tok, "sft")
    assert len(splits.train) == 6 and splits.eval is None
    texts = sorted(tok.decode([t for t, lab in zip(r["input_ids"], r["labels"]) if lab != IGNORE_INDEX])
                   for r in splits.train)
    assert texts == [f"it is {i}<|im_end|>" for i in range(6)]


@pytest.mark.parametrize("name", ["d.jsonl", "d.parquet", "ds_folder"])
def test_file_types_preference_and_unpaired(tmp_path, tok, name):
    path = write(tmp_path / name, PREFS)
    pref = build_datasets(cfg(path), tok, "preference")
    assert {tok.decode(r["chosen_ids"]) for r in pref.train} == {"yes good<|im_end|>"}
    unpaired = build_datasets(cfg(path), tok, "unpaired")
    assert Counter(r["label"] for r in unpaired.train) == {True: 6, False: 6}


def test_alpaca_sharegpt_text_scored_prompt(tmp_path, tok):
    alpaca = write(tmp_path / "alpaca.json", [{"instruction": "add", "input": "1 2", "output": "3"}])
    sharegpt = write(tmp_path / "sg.jsonl", [{"conversations": [{"from": "human", "value": "hi"},
                                                                {"from": "gpt", "value": "yo"}]}])
    text = write(tmp_path / "text.jsonl", [{"text": "the cat sat"}])
    splits = build_datasets(cfg(alpaca, sharegpt, text), tok, "sft")
    decoded = sorted(tok.decode(r["input_ids"]) for r in splits.train)
    assert decoded == ["<|im_start|>user\nadd\n\n1 2<|im_end|>\n<|im_start|>assistant\n3<|im_end|>",
                       "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>",
                       "the cat sat<|im_end|>"]
    scored = write(tmp_path / "scored.csv", [{"text": "good film", "score": "1.5"}, {"text": "bad", "score": "-1"}])
    assert sorted(r["score"] for r in build_datasets(cfg(scored), tok, "scored").train) == [-1.0, 1.5]
    prompts = build_datasets(cfg(alpaca), tok, "prompt").train
    assert prompts[0]["prompt"] == [u("add\n\n1 2")] and tok.decode(prompts[0]["prompt_ids"]).endswith("assistant\n")


def test_columns_format_and_system_prompt(tmp_path, tok):
    path = write(tmp_path / "qa.jsonl", [{"question": "what is one", "answer": "one", "label": 1}])
    src = DataSource(path, columns={"question": "prompt", "answer": "completion"}, format="prompt_completion")
    (row,) = build_datasets(cfg(src, system_prompt="be nice"), tok, "sft").train
    # plain strings: no template, no system prompt
    assert tok.decode(row["input_ids"]) == "what is oneone<|im_end|>"
    (row,) = build_datasets(cfg(write(tmp_path / "c.jsonl", CHATS[:1]), system_prompt="be nice"), tok, "sft").train
    assert tok.decode(row["input_ids"]).startswith("<|im_start|>system\nbe nice<|im_end|>\n<|im_start|>user")


def test_mixing_ratios_are_deterministic(tmp_path, tok):
    small = write(tmp_path / "small.jsonl", [{"text": f"small {i}"} for i in range(10)])
    big = write(tmp_path / "big.jsonl", [{"text": f"big {i}"} for i in range(20)])
    config = cfg(DataSource(small, ratio=2.5), DataSource(big, ratio=0.5), shuffle_seed=3)
    splits = build_datasets(config, tok, "sft")
    texts = [tok.decode(r["input_ids"][:-1]) for r in splits.train]
    counts = Counter(t.split()[0] for t in texts)
    assert counts == {"small": 25, "big": 10}
    assert Counter(t for t in texts if t.startswith("small")).most_common()[-1][1] >= 2  # every row at least twice
    assert len({t for t in texts if t.startswith("big")}) == 10  # sampled without replacement
    assert [s["rows_drawn"] for s in splits.stats["sources"]] == [25, 10]
    assert [s["rows_used"] for s in splits.stats["sources"]] == [10, 20]
    again = [tok.decode(r["input_ids"][:-1]) for r in build_datasets(config, tok, "sft").train]
    assert again == texts
    other_seed = cfg(DataSource(small, ratio=2.5), DataSource(big, ratio=0.5), shuffle_seed=4)
    assert [tok.decode(r["input_ids"][:-1]) for r in build_datasets(other_seed, tok, "sft").train] != texts


@pytest.mark.parametrize("eval_split, n_eval", [(0.2, 4), (3, 3), (0.01, 1)])
def test_eval_split(tmp_path, tok, eval_split, n_eval):
    path = write(tmp_path / "d.jsonl", [{"text": f"row {i}"} for i in range(20)])
    splits = build_datasets(cfg(path, eval_split=eval_split), tok, "sft")
    assert (len(splits.train), len(splits.eval)) == (20 - n_eval, n_eval)
    assert splits.stats["train_rows"] == 20 - n_eval and splits.stats["eval_rows"] == n_eval
    train = {tuple(r["input_ids"]) for r in splits.train}
    assert not train & {tuple(r["input_ids"]) for r in splits.eval}


def test_eval_split_never_shares_repeated_rows(tmp_path, tok):
    path = write(tmp_path / "d.jsonl", [{"text": f"row {i}"} for i in range(10)])
    splits = build_datasets(cfg(DataSource(path, ratio=3), eval_split=2), tok, "sft")
    eval_ids = {tuple(r["input_ids"]) for r in splits.eval}
    assert len(splits.eval) == 2 and not eval_ids & {tuple(r["input_ids"]) for r in splits.train}
    assert len(splits.train) == 30 - 3 * len(eval_ids)  # every copy of a held-out row leaves train


def test_eval_sources_and_bad_split(tmp_path, tok):
    train = write(tmp_path / "t.jsonl", [{"text": f"row {i}"} for i in range(5)])
    ev = write(tmp_path / "e.jsonl", [{"text": "held out"}])
    splits = build_datasets(DataConfig(train=[DataSource(train)], eval=[DataSource(ev)], eval_split=0.5), tok, "sft")
    assert len(splits.train) == 5 and len(splits.eval) == 1
    with pytest.raises(DataError, match="eval_split=5 holds out 5 of 5 training rows"):
        build_datasets(cfg(train, eval_split=5), tok, "sft")


def test_skip_mode_counts_every_bad_row(tmp_path, tok, caplog):
    lines = [json.dumps(CHATS[0]), "{not json", json.dumps({"messages": [u("a"), u("b")]}),
             json.dumps({"messages": [u("x"), a("")]}), json.dumps(CHATS[1])]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines))
    with pytest.raises(DataError, match="mixed.jsonl line 2"):
        build_datasets(cfg(str(path)), tok, "sft")
    with caplog.at_level("WARNING", logger="alignkit"):
        splits = build_datasets(cfg(str(path), on_bad_row="skip"), tok, "sft")
    assert len(splits.train) == 2 and splits.stats["skipped"] == 3
    assert splits.stats["sources"][0] == {"path": str(path), "split": "train", "rows_read": 5, "skipped": 3,
                                          "rows_used": 2, "rows_drawn": 2}
    assert "skipped 3 bad rows" in caplog.text


def test_rows_read_are_used_or_skipped_at_every_stage(tmp_path, caplog):
    tok = tiny_tokenizer()  # a template that rejects system messages: those rows fail only when tokenized
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}"
                         "{% endif %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}")
    system = {"role": "system", "content": "be brief"}
    pairs = [PREFS[0], {**PREFS[1], "prompt": [system, u("q")]}, "{broken", {"chosen": "x", "rejected": "y"}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(p if isinstance(p, str) else json.dumps(p) for p in pairs))
    with caplog.at_level("INFO", logger="alignkit"):
        splits = build_datasets(cfg(str(path), on_bad_row="skip"), tok, "unpaired")
    # read error (line 3), normalisation error (line 4), tokenization error (line 2, a pair: one skip)
    assert splits.stats["sources"][0] == {"path": str(path), "split": "train", "rows_read": 4, "rows_used": 1,
                                          "skipped": 3, "rows_drawn": 1}
    assert len(splits.train) == 2 and splits.stats["skipped"] == 3
    assert f"{path}: 4 rows read = 1 used + 3 skipped" in caplog.text
    assert "pairs.jsonl line 2, field 'chat_template'" in caplog.text


def test_truncation_stats(tmp_path, tok, caplog):
    long = " ".join(["the cat sat on the mat"] * 10)
    path = write(tmp_path / "d.jsonl", [{"messages": [u(long), a("yes")]}, {"messages": [u("hi"), a("yes")]}])
    with caplog.at_level("WARNING", logger="alignkit"):
        splits = build_datasets(cfg(path, max_length=16), tok, "sft")
    assert splits.stats["truncated_prompt"] == 1 and splits.stats["truncated_completion"] == 0 and "truncated 1 prompts" in caplog.text
    assert all(len(r["input_ids"]) <= 16 for r in splits.train)
    plain_path = write(tmp_path / "p.jsonl", [{"prompt": "q", "completion": long}])
    stats = build_datasets(cfg(plain_path, max_length=16), tok, "sft").stats
    assert (stats["truncated_prompt"], stats["truncated_completion"]) == (1, 1)


def test_packing_keeps_every_token(tmp_path, tok):
    path = write(tmp_path / "d.jsonl", CHATS)
    plain = build_datasets(cfg(path, max_length=64), tok, "sft")
    packed = build_datasets(cfg(path, max_length=64), tok, "sft", packing=True)
    assert len(packed.train) < len(plain.train) and packed.stats["packed_train_rows"] == len(packed.train)
    assert sum(len(r["input_ids"]) for r in packed.train) == sum(len(r["input_ids"]) for r in plain.train)
    assert all(len(r["input_ids"]) <= 64 and r["position_ids"][0] == 0 for r in packed.train)
    with pytest.raises(ValueError, match="packing is only for kind 'sft'"):
        build_datasets(cfg(path), tok, "preference", packing=True)


def test_default_template_set_for_conversations(tmp_path):
    tok = tiny_tokenizer(with_template=False)
    build_datasets(cfg(write(tmp_path / "t.jsonl", [{"text": "plain"}])), tok, "sft")
    assert not tok.chat_template  # plain text needs no template
    build_datasets(cfg(write(tmp_path / "c.jsonl", CHATS)), tok, "sft")
    assert tok.chat_template


def test_empty_train_and_wrong_kind(tmp_path, tok):
    with pytest.raises(DataError, match="data.train is empty"):
        build_datasets(DataConfig(), tok, "sft")
    with pytest.raises(DataError, match=r"d.jsonl line 1: this record looks like format 'messages'"):
        build_datasets(cfg(write(tmp_path / "d.jsonl", CHATS)), tok, "preference")


def test_tokenizing_shows_progress_where_info_lines_show(tmp_path, tok, capsys, monkeypatch):
    """A large source tokenizes for a while: rank 0 (INFO enabled) gets a progress bar, other ranks none."""
    import logging

    import alignkit.data as data

    path = write(tmp_path / "chats.jsonl", CHATS * 10)
    monkeypatch.setattr(data, "_PROGRESS_DELAY", 0)  # the bar waits a second before it shows
    logger = logging.getLogger("alignkit")
    level = logger.level
    try:
        logger.setLevel(logging.INFO)
        build_datasets(cfg(path), tok, "sft")
        assert "tokenizing " + path in capsys.readouterr().err
        logger.setLevel(logging.WARNING)  # what setup_logging gives ranks other than 0
        build_datasets(cfg(path), tok, "sft")
        assert "tokenizing" not in capsys.readouterr().err
    finally:
        logger.setLevel(level)
