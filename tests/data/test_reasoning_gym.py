"""reasoning-gym tasks as a data source (``reasoning_gym:TASK?size=N&seed=S``) with the real library."""

from __future__ import annotations

import sys

import pytest

from alignkit.config import DataConfig, DataSource
from alignkit.data import DataError, build_datasets, read_source
from alignkit.models import MissingPackageError

PATH = "reasoning_gym:chain_sum?size=40&seed=3&min_terms=2&max_terms=2&max_digits=1"


@pytest.fixture(scope="module")
def rg():
    return pytest.importorskip("reasoning_gym", reason="reasoning-gym is not installed (pip install 'alignkit[reasoning]')")


def test_rows_are_the_tasks_items_with_their_answer_and_verifier_spec(rg):
    rows = read_source(DataSource(path=PATH))
    assert len(rows) == 40
    direct = rg.create_dataset("chain_sum", size=40, seed=3, min_terms=2, max_terms=2, max_digits=1)
    for i in (0, 17, 39):
        row = rows[i].data
        assert row["prompt"][-1] == {"role": "user", "content": direct[i]["question"]}
        assert row["prompt"][0]["role"] == "system" and "<answer>" in row["prompt"][0]["content"]
        assert row["answer"] == direct[i]["answer"]
        assert row["reasoning_gym"] == {"task": "chain_sum", "index": i, "config": {
            "min_terms": 2, "max_terms": 2, "max_digits": 1, "size": 40, "seed": 3}}
    # same path, same rows; limit and system=none
    assert [r.data for r in read_source(DataSource(path=PATH, limit=5))] == [r.data for r in rows[:5]]
    bare = read_source(DataSource(path=PATH + "&system=none", limit=1))[0].data
    assert [m["role"] for m in bare["prompt"]] == ["user"]


def test_the_held_out_split_shares_no_question_with_training(rg):
    # one-digit sums of two terms: about 200 distinct questions, so two seeds of 40 items collide by chance
    train = {r.data["prompt"][-1]["content"] for r in read_source(DataSource(path=PATH))}
    held = read_source(DataSource(path=PATH, split="test"))
    questions = [r.data["prompt"][-1]["content"] for r in held]
    assert questions and not set(questions) & train
    assert len(held) < 40  # some collided and were dropped
    # a seed one apart would share 39 of 40 items: why the held-out seed is far away
    # split=test in the path (for commands that take only a path, like generate) is the same split
    assert [r.data for r in read_source(DataSource(path=PATH + "&split=test"))] == [r.data for r in held]
    near = [r.data["prompt"][-1]["content"] for r in read_source(DataSource(path=PATH.replace("seed=3", "seed=4")))]
    train_list = [r.data["prompt"][-1]["content"] for r in read_source(DataSource(path=PATH))]
    assert near[:39] == train_list[1:]


def test_its_verifier_scores_its_own_answers(rg):
    from alignkit.data.reasoning_gym import score_answer

    row = read_source(DataSource(path=PATH, split="test", limit=1))[0].data
    assert score_answer(row["answer"], row["reasoning_gym"]) == 1.0
    assert score_answer(str(int(row["answer"]) + 1), row["reasoning_gym"]) == 0.0
    assert score_answer(None, row["reasoning_gym"]) == 0.0


def test_build_datasets_gives_prompt_rows_that_keep_the_fields(rg):
    from alignkit.testing import tiny_tokenizer

    cfg = DataConfig(train=[DataSource(path=PATH)], eval=[DataSource(path=PATH, split="test", limit=8)])
    splits = build_datasets(cfg, tiny_tokenizer(), "prompt")
    assert len(splits.train) == 40 and len(splits.eval) == 8
    row = splits.train[0]
    assert row["prompt_ids"] and row["answer"] and row["reasoning_gym"]["task"] == "chain_sum"


@pytest.mark.parametrize("path, split, needle", [
    ("reasoning_gym:chain_su", "train", "no task 'chain_su'. did you mean chain_sum"),
    ("reasoning_gym:chain_sum?bogus=1", "train", "unexpected keyword argument 'bogus'"),
    ("reasoning_gym:chain_sum?min_terms=0", "train", "min_terms must be positive"),
    ("reasoning_gym:chain_sum?size=0", "train", "size=0 must be a positive integer"),
    ("reasoning_gym:chain_sum?seed=1&seed=2", "train", "option 'seed' given twice"),
    ("reasoning_gym:chain_sum?system=fancy", "train", "system='fancy' is not one of"),
    ("reasoning_gym:chain_sum", "dev", "split='dev' is not a reasoning-gym split"),
    ("reasoning_gym:", "train", "no task named"),
])
def test_bad_paths_name_the_problem_in_one_line(rg, path, split, needle):
    with pytest.raises(DataError) as e:
        read_source(DataSource(path=path, split=split))
    assert needle in str(e.value) and path in str(e.value) and "\n" not in str(e.value)


def test_without_the_library_the_error_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "reasoning_gym", None)
    with pytest.raises(MissingPackageError, match=r"pip install 'alignkit\[reasoning\]'"):
        read_source(DataSource(path=PATH))
