"""Held-out evaluation for the reasoning example: greedy accuracy of a saved policy on a reasoning-gym task's
held-out split, scored by the task's own verifier, and the GRPO run's reward curve.

- :func:`held_out_accuracy`: greedy answers to the held-out prompts (the same every run), the share the
  task's verifier scores correct, how many answers it found at all, the answers' distinct-2 (does the text stay
  varied, or collapse into one template?) and a few samples to read.
- :func:`paired_counts`: how many held-out prompts training fixed and how many it broke (is a gain more
  than prompts swinging both ways?).
- :func:`reward_curve`: the mean reward of each GRPO step from the run's ``metrics.jsonl``, smoothed, and a
  PNG plot of it when matplotlib is installed.

Evaluation is task code: it loads the model with plain transformers, as a user would after training.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def _rows(data_path: str, limit: int) -> list[dict]:
    from alignkit.config import DataSource
    from alignkit.data.reasoning_gym import read_reasoning_gym

    return [r.data for r in read_reasoning_gym(DataSource(path=data_path, split="test", limit=limit))]


@torch.no_grad()
def held_out_accuracy(model_dir: str | Path, data_path: str, *, limit: int = 64, max_new_tokens: int = 48,
                      answer_extract: str = "last_number", batch_size: int = 16, samples: int = 3,
                      output_dir: str | Path | None = None) -> dict:
    """Greedy held-out accuracy of the policy in ``model_dir`` on the test split of ``data_path`` (a
    ``reasoning_gym:TASK?...`` source; the test split shares no question with training), at most ``limit``
    prompts. Each answer is extracted by ``answer_extract`` (as the training reward does) and scored by the
    task's verifier. Writes every answer to ``<output_dir>/answers.jsonl``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignkit.assets import resolve_model
    from alignkit.data.reasoning_gym import FIELD, score_answer
    from alignkit.rewards.answers import extract_answer
    from examples.sentiment.evaluation import distinct_n

    path = resolve_model(str(model_dir)) or model_dir
    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    rows = _rows(data_path, limit)
    texts = [tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True) for r in rows]
    completions: list[str] = []
    for i in range(0, len(texts), batch_size):
        enc = tok(texts[i:i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id or tok.eos_token_id)
        completions += tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    records = []
    for row, completion in zip(rows, completions):
        answer = extract_answer(completion, answer_extract)
        records.append({"question": row["prompt"][-1]["content"], "reference": row["answer"],
                        "completion": completion.strip(), "answer": answer,
                        "score": score_answer(answer, row[FIELD])})
    if output_dir is not None:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(output_dir) / "answers.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    n = len(records)
    return {"accuracy": sum(r["score"] >= 1.0 for r in records) / n,
            "answered": sum(r["answer"] is not None for r in records) / n,
            "mean_length_words": sum(len(r["completion"].split()) for r in records) / n,
            "distinct_2": distinct_n([r["completion"] for r in records])["corpus"],
            "prompts": n,
            "samples": [{k: r[k] for k in ("question", "reference", "completion", "score")} for r in records[:samples]]}


def paired_counts(before: str | Path, after: str | Path) -> tuple[int, int]:
    """(fixed, broken) between two ``answers.jsonl`` files of the same held-out prompts: the prompts answered
    wrong before and right after, and the reverse. A gain is real when fixed clearly outnumbers broken, not
    when a few prompts swing both ways."""
    def rows(path):  # line by line: a held-out split may ask the same question twice
        return [(r["question"], r["score"] >= 1.0) for r in map(json.loads, Path(path).read_text().splitlines())]

    b, a = rows(before), rows(after)
    if [q for q, _ in b] != [q for q, _ in a]:
        raise ValueError(f"{before} and {after} hold different held-out prompts; evaluate both on the same ones")
    return (sum(right and not was for (_, was), (_, right) in zip(b, a)),
            sum(was and not right for (_, was), (_, right) in zip(b, a)))


def reward_curve(run_dir: str | Path, *, key: str = "reward", window: int = 5,
                 output_dir: str | Path | None = None) -> dict:
    """The per-step ``key`` of a training run's ``metrics.jsonl`` (``reward`` = the mean reward of each
    rollout), its moving average over ``window`` steps, the mean of the first and last ``window`` steps, and
    ``<output_dir>/reward_curve.png`` when matplotlib is installed."""
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    points = [(r["step"], float(r[key])) for r in rows if key in r and "step" in r]
    if not points:
        raise ValueError(f"{run_dir}/metrics.jsonl has no {key!r} metric; is it an online RL run?")
    steps, values = [s for s, _ in points], [v for _, v in points]
    smooth = [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1])
              for i in range(len(values))]
    out = {"steps": steps, "values": values, "first": sum(values[:window]) / len(values[:window]),
           "last": sum(values[-window:]) / len(values[-window:])}
    if output_dir is not None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return out
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(steps, values, alpha=0.35, label=f"{key} per step")
        ax.plot(steps, smooth, label=f"moving average ({window} steps)")
        ax.set_xlabel("GRPO step")
        ax.set_ylabel(f"mean {key} (1 = correct)")
        ax.legend()
        fig.tight_layout()
        out["plot"] = str(Path(output_dir) / "reward_curve.png")
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        fig.savefig(out["plot"], dpi=120)
        plt.close(fig)
    return out


def sparkline(values: list[float], lo: float = 0.0, hi: float = 1.0) -> str:
    """``values`` as one line of block characters (the reward curve in a terminal)."""
    bars = "▁▂▃▄▅▆▇█"
    return "".join(bars[min(len(bars) - 1, max(0, int((v - lo) / (hi - lo) * len(bars))))] for v in values)
