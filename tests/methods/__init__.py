"""Helpers for the method tests: synthetic data with a clear preference signal, short training runs."""

from __future__ import annotations

import json
import random
from pathlib import Path

GOOD = "happy good great wonderful love yes".split()
BAD = "sad bad awful boring hate no".split()
TOPICS = "cat dog bird tree film movie story music".split()


def preference_records(n: int = 24, seed: int = 0) -> list[dict]:
    """Prompt/chosen/rejected strings: chosen completions use GOOD words, rejected ones BAD words."""
    rng = random.Random(seed)
    return [{"prompt": f"tell me about the {rng.choice(TOPICS)}",
             "chosen": " ".join(rng.choice(GOOD) for _ in range(4)),
             "rejected": " ".join(rng.choice(BAD) for _ in range(4))} for _ in range(n)]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def train(method: str, model_dir: Path, data: Path, out: Path, *, overrides: list[str] | None = None,
          model: dict | None = None, data_cfg: dict | None = None, **training) -> dict:
    """A short in-process run on the tiny model; returns the run summary."""
    import alignkit

    t = {"output_dir": str(out), "max_steps": 6, "learning_rate": 1e-3, "per_device_batch_size": 4,
         "report_to": ["jsonl"], "mixed_precision": "no", "lr_scheduler": "constant", "seed": 3}
    t.update(training)
    d = {"train": [str(data)], "max_length": 64, "eval_split": 8}
    d.update(data_cfg or {})
    m = {"name_or_path": str(model_dir), "dtype": "float32"}
    m.update(model or {})
    return alignkit.train(method, overrides=overrides, model=m, data=d, training=t)


def metrics(out: Path) -> tuple[dict[int, dict], dict]:
    """(train metrics by step, the final eval metrics) from ``out/metrics.jsonl``."""
    lines = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    train_rows = {r["step"]: r for r in lines if "loss" in r}
    evals = [r for r in lines if "eval/loss" in r]
    return train_rows, (evals[-1] if evals else {})
