"""The CPU agents example (examples/agents): the calculator environment's tool results, rewards and episodes,
its held-out data, the evaluation's counts, and the pipeline end to end with the tiny model standing in for
SmolLM2-135M (CI never runs the real example: minutes of GRPO)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from alignkit.pipeline import run_pipeline
from alignkit.rollout.environment import parse_assistant_turn
from examples.agents.calculator import EXAMPLE, SYSTEM, calculator, make_env, make_rows, write_data
from examples.agents.evaluate import format_episode, paired, tool_use

PIPELINE = Path(__file__).resolve().parents[2] / "examples" / "agents" / "pipeline.yaml"
ROW = {"prompt": "What is 347 * 28? Use the calculator.", "question": "What is 347 * 28?", "answer": 9716}


def _call(expression_args: dict) -> dict:
    return {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "calculator", "arguments": expression_args}}]}


def test_calculator_evaluates_integer_arithmetic_and_rejects_the_rest():
    assert calculator("347 * 28") == "9716"
    assert calculator("(1200 - 1300) * 3") == "-300"
    assert calculator("9,021 - 4,578") == "4443"
    for bad in ("2 ** 10", "__import__('os')", "1.5 * 2", "347 *", "10**20 * 10**20"):
        with pytest.raises(ValueError, match="cannot evaluate|too large"):
            calculator(bad)


def test_an_episode_is_a_tool_call_then_an_answer_scored_by_its_last_number():
    env = make_env(ROW)
    first = env.reset(ROW)
    assert first[0] == {"role": "system", "content": SYSTEM} and first[1:5] == EXAMPLE
    assert first[-1] == {"role": "user", "content": ROW["prompt"]}

    called = env.step(_call({"expression": "347 * 28"}))
    assert not called.done and called.reward == 0.0
    assert called.messages == [{"role": "tool", "name": "calculator", "content": "9716"}]
    answered = env.step({"role": "assistant", "content": "The answer is 9,716."})
    assert answered.done and answered.reward == 1.0

    wrong = make_env(ROW)
    wrong.reset(ROW)
    assert wrong.step({"role": "assistant", "content": "347 * 28 = 9816."}).reward == 0.0
    close = make_env(ROW)
    close.reset(ROW)
    assert close.step({"role": "assistant", "content": "The answer is 9716.5"}).reward == 0.0
    # arguments the tool does not take, and an expression it refuses: error messages, counted, episode goes on
    bad = make_env(ROW)
    bad.reset(ROW)
    result = bad.step(_call({"operation": "multiply"}))
    assert result.messages[0]["content"].startswith("error: TypeError") and result.info["tool_errors"] == 1
    assert not result.done
    result = bad.step(_call({"expression": "347 ** 28"}))
    assert result.messages[0]["content"].startswith("error: ValueError") and result.info["tool_errors"] == 1


def test_the_worked_example_is_in_the_format_alignkit_parses(tiny_tok):
    """The call the prompt shows the model parses into a tool call whose result is the example's tool message."""
    message = parse_assistant_turn(tiny_tok, EXAMPLE[1]["content"])
    assert message["tool_calls"][0]["function"] == {"name": "calculator", "arguments": {"expression": "214 * 36"}}
    env = make_env(ROW)
    env.reset(ROW)
    assert env.step(message).messages[0]["content"] == EXAMPLE[2]["content"]
    assert "7704" in EXAMPLE[3]["content"]


def test_the_held_out_questions_are_not_in_the_training_file_and_the_answers_are_right(tmp_path):
    paths = write_data(tmp_path, n_train=300, n_eval=40, seed=3)
    train = [json.loads(x) for x in Path(paths["train"]).read_text().splitlines()]
    held_out = [json.loads(x) for x in Path(paths["eval"]).read_text().splitlines()]
    assert len(train) == 300 and len(held_out) == 40
    assert not {r["question"] for r in train} & {r["question"] for r in held_out}
    for r in train + held_out:
        expression = r["question"].split(" ", 2)[-1] if r["question"].startswith("What") else r["question"]
        expression = expression.replace("Compute", "").replace("Calculate", "").strip(" ?.=")
        assert int(calculator(expression)) == r["answer"], r
        assert r["prompt"].startswith(r["question"])
    assert make_rows(5, 7) == make_rows(5, 7)  # deterministic from the seed


def test_tool_use_paired_and_format_episode(tmp_path):
    prompt = [{"role": "system", "content": SYSTEM}, *EXAMPLE, {"role": "user", "content": ROW["prompt"]}]
    solved = prompt + [_call({"expression": "347 * 28"}), {"role": "tool", "name": "calculator", "content": "9716"},
                       {"role": "assistant", "content": "The answer is 9716."}]
    malformed = {"role": "assistant", "content": "<tool_call>{oops", "tool_call_error": "malformed tool call"}
    failed = prompt + [malformed, {"role": "tool", "content": "error: malformed tool call"},
                       _call({"operation": "x"}), {"role": "tool", "content": "error: TypeError: ..."},
                       {"role": "assistant", "content": "The answer is 5."}]
    assert tool_use(solved, tool_calls=1, tool_errors=0) == {"attempts": 1, "valid": 1, "answered": 1}
    assert tool_use(failed, tool_calls=1, tool_errors=2) == {"attempts": 2, "valid": 0, "answered": 1}
    assert tool_use(prompt + [_call({"expression": "1"})], 1, 0)["answered"] == 0
    assert format_episode(solved) == [
        f"user: {ROW['prompt']}",
        'assistant: <tool_call>{"name": "calculator", "arguments": {"expression": "347 * 28"}}</tool_call>',
        "tool: 9716", "assistant: The answer is 9716."]

    def write(folder, rewards):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "episodes.jsonl").write_text("".join(
            json.dumps({"question": f"q{i}", "reward": r, "episode": solved if r else failed}) + "\n"
            for i, r in enumerate(rewards)))
        return tmp_path / folder

    result = paired(write("before", [1.0, 0.0, 0.0, 1.0, 0.0]), write("after", [1.0, 1.0, 1.0, 0.0, 0.0]))
    assert {k: result[k] for k in ("questions", "fixed", "broken", "both", "neither")} == {
        "questions": 5, "fixed": 2, "broken": 1, "both": 1, "neither": 1}
    assert result["examples"]["fixed"]["after"][-1] == "assistant: The answer is 9716."
    assert result["examples"]["broken"]["after"][-1] == "assistant: The answer is 5."


def _tiny(tiny_model_dir, out: Path) -> list[str]:
    return [f"output_dir={out}", f"defaults.model.name_or_path={tiny_model_dir}",
            f"success_before.args.model_dir={tiny_model_dir}", "data.args.n_train=16", "data.args.n_eval=4",
            "success_before.args.limit=4", "success_after.args.limit=4", "success_before.args.max_new_tokens=6",
            "success_after.args.max_new_tokens=6", "grpo.grpo.generation.max_new_tokens=6",
            "grpo.grpo.generation.num_samples=2", "grpo.grpo.rollout_batch_size=2",
            "grpo.training.per_device_batch_size=4", "grpo.training.gradient_accumulation_steps=1",
            "grpo.grpo.environment.max_episode_tokens=24",
            "grpo.data.max_length=64"]


def test_the_pipeline_file_passes_the_dry_run_with_the_tiny_model(tmp_path, tiny_model_dir, capsys):
    summary = run_pipeline(PIPELINE, dry_run=True, overrides=_tiny(tiny_model_dir, tmp_path / "out"))
    assert [e["stage"] for e in summary["stages"]] == ["data", "success_before", "grpo", "success_after",
                                                       "reward_curve"]
    out = capsys.readouterr().out
    assert "factory: examples/agents/calculator.py:make_env" in out and "log_samples: 4" in out
    assert not (tmp_path / "out").exists()


def test_the_example_runs_end_to_end_with_the_tiny_model(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """Every stage runs and run.py prints its numbers; samples.jsonl holds whole episodes. (The tiny model
    learns nothing here; the real run's numbers are in the README.)"""
    from examples.agents.run import run

    monkeypatch.chdir(Path(__file__).resolve().parents[2])  # the factory is a path from the repository root
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(tmp_path / "out", steps=2, overrides=_tiny(tiny_model_dir, tmp_path / "out")[1:])
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert "held-out success (greedy whole episodes, 4 held-out questions)" in printed
    assert "paired:" in printed and "valid tool calls" in printed and "before (" in printed
    samples = [json.loads(x) for x in (tmp_path / "out" / "grpo" / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {1, 2}
    for s in samples:
        roles = [m["role"] for m in s["episode"]]
        assert roles[:6] == ["system", "user", "assistant", "tool", "assistant", "user"] and roles[6] == "assistant"
        assert s["turns"] == roles.count("assistant") - 2  # the worked example's two turns are in the prompt
    episodes = [json.loads(x) for x in (tmp_path / "out" / "success_after" / "episodes.jsonl").read_text().splitlines()]
    assert len(episodes) == 4 and all(e["episode"][1:5] == EXAMPLE for e in episodes)
