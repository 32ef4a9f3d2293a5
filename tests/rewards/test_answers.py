"""Rewards that check answers (reward.answer, reward.format_pattern) with the real math-verify and reasoning-gym."""

from __future__ import annotations

import sys

import pytest
import torch

from alignkit import build_config
from alignkit.config import ConfigError, DataSource
from alignkit.models import MissingPackageError
from alignkit.rewards import (
    AnswerReward,
    FormatReward,
    RewardError,
    RewardInputs,
    RewardSourcesConfig,
    build_reward,
    extract_answer,
)


def inputs(completions, **columns):
    n = len(completions)
    return RewardInputs(prompts=["q"] * n, completions=list(completions), row_fields=columns,
                        ended_with_eos=torch.ones(n, dtype=torch.bool))


def needs(module: str):
    return pytest.importorskip(module, reason=f"{module} is not installed (pip install 'alignkit[reasoning]')")


def test_extract_answer_rules():
    text = "Think: 3 + 4 = 7, so \\boxed{\\frac{1}{2}} hmm <answer> 12 </answer> and <answer>1,234</answer>\nLast line 5."
    assert extract_answer(text) == "1,234"  # the last answer tag wins over \boxed
    assert extract_answer(text, "boxed") == "\\frac{1}{2}"  # braces balanced
    assert extract_answer(text, "last_number") == "5"
    assert extract_answer(text, "last_line") == "Last line 5."
    assert extract_answer("so \\boxed{x^{2}} it is") == "x^{2}"  # auto without a tag: the last \boxed
    assert extract_answer("  just 42  ") == "just 42"  # auto with neither: the whole completion
    assert extract_answer("no tag here", "tag") is None and extract_answer("", "all") is None
    assert extract_answer("total: -1,250.5 apples", "last_number") == "-1250.5"


def test_exact_regex_and_format_scores():
    exact = AnswerReward("exact")
    got = exact(inputs(["<answer> Paris. </answer>", "I think PARIS", "<answer>Lyon</answer>", "paris"],
                       answer=["paris", "paris", "paris", "Paris"]))
    assert got.tolist() == [1.0, 0.0, 0.0, 1.0]  # "I think PARIS" is not the answer "paris"
    regex = AnswerReward("regex", column="pattern")
    got = regex(inputs(["<answer>-12</answer>", "<answer>12 apples</answer>", "\\boxed{yes}"],
                       pattern=[r"-?\d+", r"-?\d+", r"(?i)yes|y"]))
    assert got.tolist() == [1.0, 0.0, 1.0]
    fmt = FormatReward(r"<think>.*</think>\s*<answer>.*</answer>")
    got = fmt(inputs(["<think>a\nb</think>\n<answer>3</answer>\n", "<answer>3</answer>", "<think>x</think><answer>3"]))
    assert got.tolist() == [1.0, 0.0, 0.0]


def test_math_answers_are_checked_by_equivalence():
    needs("math_verify")
    check = AnswerReward("math")
    completions = ["The answer is \\boxed{0.5}.", "<answer>\\frac{2}{4}</answer>", "so 1/2", "I get \\boxed{\\frac{1}{3}}",
                   "", "<answer>30</answer>", "The total is 30 apples."]
    refs = ["\\frac{1}{2}", "0.5", "$\\frac{1}{2}$", "1/2", "1/2", "30", "30"]
    assert check(inputs(completions, answer=refs)).tolist() == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0]
    # a tagged answer is read as \boxed{...}: math-verify reads a bare 2\sqrt{2} as 2 and a bare x+1 not at all
    tagged = ["<answer>2\\sqrt{2}</answer>", "<answer>x+1</answer>", "<answer>2\\sqrt{2}</answer>"]
    assert check(inputs(tagged, answer=["\\sqrt{8}", "1+x", "2"])).tolist() == [1.0, 1.0, 0.0]


def test_math_agrees_with_trl_accuracy_reward_on_boxed_answers():
    needs("math_verify")
    trl_rewards = pytest.importorskip("trl.rewards", reason="TRL (a dev dependency) is not installed")
    completions = ["so \\boxed{\\frac{1}{3}}", "so \\boxed{\\frac{1}{2}}", "\\boxed{2\\sqrt{2}}", "\\boxed{x+1}"]
    refs = ["$\\frac{1}{3}$", "$\\frac{1}{3}$", "$\\sqrt{8}$", "$1+x$"]
    theirs = trl_rewards.accuracy_reward([[{"role": "assistant", "content": c}] for c in completions], refs)
    assert AnswerReward("math")(inputs(completions, answer=refs)).tolist() == theirs == [1.0, 0.0, 1.0, 1.0]


def test_reasoning_gym_rows_are_scored_by_the_tasks_verifier():
    needs("reasoning_gym")
    from alignkit.data.reasoning_gym import read_reasoning_gym

    rows = [r.data for r in read_reasoning_gym(DataSource(path="reasoning_gym:basic_arithmetic?size=4&seed=7"))]
    right = [f"step by step ... <answer>{r['answer']}</answer>" for r in rows]
    wrong = [f"<answer>{int(r['answer']) + 1}</answer>" for r in rows]
    check = AnswerReward("reasoning_gym")
    field = [r["reasoning_gym"] for r in rows]
    assert check(inputs(right + wrong, reasoning_gym=field + field)).tolist() == [1.0] * 4 + [0.0] * 4


def test_a_missing_reference_column_names_the_column_and_the_fix():
    with pytest.raises(RewardError, match=r"reward.answer=exact needs the column 'answer', which the data does "
                                          r"not have \(columns: solution\).*answer_column"):
        AnswerReward("exact")(inputs(["a"], solution=["a"]))
    with pytest.raises(RewardError, match="is empty in 1 rows"):
        AnswerReward("exact")(inputs(["a", "b"], answer=["a", None]))
    assert AnswerReward("exact", column="solution")(inputs(["a"], solution=["a"])).tolist() == [1.0]


def test_config_sums_answer_and_format_and_logs_each():
    cfg = RewardSourcesConfig(answer="exact", answer_weight=2.0, format_pattern=r"<answer>.*</answer>",
                              format_weight=0.5)
    reward = build_reward(cfg, None)
    result = reward(inputs(["<answer>4</answer>", "4", "<answer>5</answer>"], answer=["4", "4", "4"]))
    assert result.combined.tolist() == [2.5, 2.0, 0.5]
    assert result.metrics()["reward/answer_exact"] == pytest.approx(2 / 3)
    assert result.metrics()["reward/format"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("raw, needle", [
    ({"answer": "maths"}, "grpo.reward.answer='maths' is not valid (did you mean 'math'?)"),
    ({"answer": "exact", "answer_extract": "boxd"}, "grpo.reward.answer_extract='boxd' is not valid"),
    ({"format_pattern": "<answer>(.*"}, "grpo.reward.format_pattern='<answer>(.*' is not a valid regular expression"),
    ({"verifier": "math"}, "grpo.reward.verifier (did you mean 'answer'?)"),
    ({"solution_column": "x"}, "did you mean 'answer_column'?"),
])
def test_config_errors_name_the_key(raw, needle):
    with pytest.raises(ConfigError) as e:
        build_config("grpo", {"grpo": {"reward": raw}})
    assert needle in str(e.value)


def test_the_answer_alone_is_a_reward_source_in_config():
    cfg = build_config("grpo", {"grpo": {"reward": {"answer": "exact", "answer_column": "solution"}}})
    assert cfg.method_args.reward.answer == "exact" and cfg.method_args.reward.answer_column == "solution"


@pytest.mark.parametrize("kind, module", [("math", "math_verify"), ("reasoning_gym", "reasoning_gym")])
def test_a_missing_library_is_one_line_naming_the_pip_command(monkeypatch, kind, module):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    with pytest.raises(MissingPackageError) as e:
        RewardSourcesConfig(answer=kind).check("grpo.reward")
    assert "pip install 'alignkit[reasoning]'" in str(e.value) and "\n" not in str(e.value)
