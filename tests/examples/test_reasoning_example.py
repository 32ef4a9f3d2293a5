"""The CPU reasoning example (examples/reasoning): its pipeline file validates and its evaluation helpers work.
CI never runs the real example (SmolLM2-135M, minutes of GRPO); the tiny model stands in for it here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignkit.pipeline import run_pipeline
from examples.reasoning.evaluate import held_out_accuracy, reward_curve, sparkline

PIPELINE = Path(__file__).resolve().parents[2] / "examples" / "reasoning" / "pipeline.yaml"


def test_the_pipeline_file_passes_the_dry_run_with_the_tiny_model(tmp_path, tiny_model_dir, capsys):
    pytest.importorskip("reasoning_gym")
    summary = run_pipeline(PIPELINE, dry_run=True, overrides=[
        f"output_dir={tmp_path / 'out'}", f"defaults.model.name_or_path={tiny_model_dir}",
        f"accuracy_before.args.model_dir={tiny_model_dir}"])
    assert [e["stage"] for e in summary["stages"]] == ["accuracy_before", "grpo", "accuracy_after", "reward_curve"]
    assert {e["status"] for e in summary["stages"]} == {"run"}
    out = capsys.readouterr().out
    assert f"name_or_path: {tiny_model_dir}" in out and "answer: reasoning_gym" in out
    assert not (tmp_path / "out").exists()


def test_held_out_accuracy_scores_the_test_split_with_the_task_verifier(tmp_path, tiny_model_dir):
    pytest.importorskip("reasoning_gym")
    from alignkit.config import DataSource
    from alignkit.data.reasoning_gym import read_reasoning_gym

    path = "reasoning_gym:chain_sum?size=50&seed=0&min_terms=2&max_terms=3&min_digits=1&max_digits=1"
    result = held_out_accuracy(tiny_model_dir, path, limit=4, max_new_tokens=3, batch_size=3, samples=2,
                               output_dir=tmp_path)
    records = [json.loads(x) for x in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert result["prompts"] == len(records) == 4 and len(result["samples"]) == 2
    train = {r.data["prompt"][-1]["content"] for r in read_reasoning_gym(DataSource(path=path))}
    assert not train & {r["question"] for r in records}  # held out: no training question
    # the random tiny model writes no sum: its answers score 0 unless the last number it wrote is the sum
    for r in records:
        assert r["score"] == float(r["answer"] is not None and int(float(r["answer"])) == eval(
            r["question"].rsplit(":", 1)[-1].rstrip("= ")))
    assert result["accuracy"] == sum(r["score"] for r in records) / 4


def test_reward_curve_reads_the_run_metrics_and_plots(tmp_path):
    rows = [{"step": i + 1, "reward": v, "loss": 0.1} for i, v in enumerate([0.1, 0.2, 0.3, 0.5, 0.7, 0.9])]
    rows.insert(2, {"step": 2, "eval/loss": 1.0})  # rows without the key are skipped
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    curve = reward_curve(tmp_path, window=2, output_dir=tmp_path / "plot")
    assert curve["steps"] == [1, 2, 3, 4, 5, 6] and curve["first"] == pytest.approx(0.15)
    assert curve["last"] == pytest.approx(0.8)
    if "plot" in curve:
        assert Path(curve["plot"]).stat().st_size > 0
    assert sparkline([0.0, 0.5, 1.0]) == "▁▅█"
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    with pytest.raises(ValueError, match="no 'reward' metric"):
        reward_curve(tmp_path)


def test_paired_counts_counts_prompts_fixed_and_broken_by_training(tmp_path):
    from examples.reasoning.evaluate import paired_counts

    def answers(name, scores, questions=("q0", "q1", "q2", "q3", "q4", "q1")):  # q1 twice, as a split may ask
        path = tmp_path / name
        path.write_text("".join(json.dumps({"question": q, "score": s}) + "\n" for q, s in zip(questions, scores)))
        return path

    before = answers("before.jsonl", [0.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    after = answers("after.jsonl", [1.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    assert paired_counts(before, after) == (3, 1)
    assert paired_counts(after, before) == (1, 3)
    with pytest.raises(ValueError, match="different held-out prompts"):
        paired_counts(before, answers("other.jsonl", [1.0]))
