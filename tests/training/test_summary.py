"""The end of a run: a short table people read (per method), the full result in output_dir/summary.json."""

from __future__ import annotations

import json
import re

import pytest
import torch
import yaml

from alignkit.training.summary import fmt_number, format_summary, jsonable
from alignkit.training.tracking import _fmt


@pytest.mark.parametrize("value,shown", [
    (5322.1459, "5322"), (53221.7, "53222"), (4.5601341247558596, "4.56"), (0.0026431, "0.002643"),
    (3e-05, "3e-05"), (1.2345678e-05, "1.23e-05"), (0.0, "0"), (12, "12"), (-0.5, "-0.5"), (float("nan"), "nan"),
])
def test_numbers_have_4_significant_digits_on_the_bar_and_in_the_table(value, shown):
    assert fmt_number(value) == shown
    assert _fmt(value) == shown  # the progress bar showed tok/s=5322.1459


def _table(text: str) -> dict[str, str]:
    lines = text.splitlines()
    starts = {len(line) - len(line.split("  ", 2)[-1].lstrip()) for line in lines[1:]}
    assert len(starts) == 1, text  # the values form one aligned column
    return {line.strip().split("  ", 1)[0]: line.split("  ", 2)[-1].strip() for line in lines[1:]}


def test_online_rl_table_shows_reward_kl_and_length_not_the_30_raw_metrics():
    result = {"method": "grpo", "step": 40, "output_dir": "/runs/grpo", "skipped_updates": 0, "seconds": 312.34,
              "train_first": {"step": 1, "reward": 0.12345678, "kl": 0.0, "response_length": 31.25},
              "train": {"reward": 0.4567891234, "kl": 0.031234567, "response_length": 20.251, "loss/policy": 0.1,
                        "advantages": 0.0, "tok/s": 5322.1459, "entropy": 1.5, "clipfrac": 0.01},
              "data_stats": {"train_rows": 64}, "model": torch.nn.Linear(1, 1)}
    text = format_summary(result)
    assert text.splitlines()[0] == "alignkit: grpo done"
    rows = _table(text)
    assert rows == {"reward": "0.1235 -> 0.4568", "KL to reference": "0.03123", "response length": "31.25 -> 20.25",
                    "steps": "40", "time": "5 min 12 s", "model": "/runs/grpo",
                    "all metrics": "/runs/grpo/summary.json"}


def test_reward_model_table_shows_accuracy_and_the_reward_stats():
    result = {"method": "rm", "step": 10, "output_dir": "rm", "skipped_updates": 3, "seconds": 4.25,
              "train_first": {"step": 1, "loss": 0.6931, "rewards/accuracies": 0.5},
              "train": {"loss": 0.25, "rewards/accuracies": 0.9375},
              "eval": {"eval/loss": 0.375, "eval/rewards/accuracies": 0.875, "eval/rewards/margins": 1.5},
              "best_eval": {"step": 5, "eval/loss": 0.3125}, "alignkit_reward_mean": 0.123456, "alignkit_reward_std": 1.5}
    rows = _table(format_summary(result))
    assert rows["eval accuracy"] == "0.875" and "train accuracy" not in rows  # eval's accuracy is the one to read
    assert rows["train loss"] == "0.6931 -> 0.25" and rows["eval loss"] == "0.375"
    assert rows["best eval loss"] == "0.3125 (step 5)"
    assert rows["reward mean ± std"].startswith("0.1235 ± 1.5")
    assert rows["steps"] == "10 (3 updates skipped: NaN/Inf)" and rows["time"] == "4.2 s"


def test_the_full_result_is_json_without_models_and_with_nan_as_null():
    out = jsonable({"model": torch.nn.Linear(1, 1), "train": {"loss": 1.2345678901234567, "x": float("nan")},
                    "n": torch.tensor(3), "rows": [1, object(), "a"]})
    assert out == {"train": {"loss": 1.2345678901234567, "x": None}, "n": 3, "rows": [1, "a"]}


def test_a_run_from_the_cli_ends_with_the_table_and_writes_summary_json(tmp_path, tiny_model_dir, sft_file, capsys):
    from alignkit.cli import main

    out = tmp_path / "run"
    cfg = {"model": {"name_or_path": str(tiny_model_dir), "dtype": "float32"},
           "data": {"train": [str(sft_file)], "max_length": 64, "eval_split": 4},
           "training": {"output_dir": str(out), "max_steps": 6, "learning_rate": 3e-3, "per_device_batch_size": 4,
                        "eval_steps": 2, "report_to": ["jsonl"], "mixed_precision": "no"}}
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", "sft", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "alignkit: done: {" not in printed
    text = printed[printed.index("alignkit: sft done"):].strip()
    rows = _table(text)
    logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in logged if "eval/loss" in r]
    train = [r for r in logged if "loss" in r]
    assert rows["eval loss"] == fmt_number(evals[-1]["eval/loss"])
    assert rows["train loss"] == f"{fmt_number(train[0]['loss'])} -> {fmt_number(train[-1]['loss'])}"
    assert rows["steps"] == "6" and rows["model"] == str(out)
    assert not re.search(r"\d\.\d{5,}", text)  # no 16-digit floats
    summary = json.loads((out / "summary.json").read_text())
    assert rows["all metrics"] == str(out / "summary.json")
    assert summary["method"] == "sft" and summary["step"] == 6 and "model" not in summary
    assert summary["eval"]["eval/loss"] == evals[-1]["eval/loss"]  # full precision
    best = min(evals, key=lambda r: r["eval/loss"])
    assert summary["best_eval"]["step"] == best["step"] and summary["best_eval"]["eval/loss"] == best["eval/loss"]
    assert summary["data_stats"]["eval_rows"] == 4 and summary["seconds"] > 0
