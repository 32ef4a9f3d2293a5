"""The end of a run that people read: a short table of what matters for the method, the full result as JSON.

:func:`format_summary` picks, from a run's result (what ``alignkit.train`` returns), the rows that the
method has: loss and eval loss (best too) for offline methods, accuracy for reward models and preference
methods, reward and KL for online RL, the best-of-n scores for rejection sampling; then steps, time and
where the model is, numbers with 4 significant digits. :func:`write_summary` writes the whole result
(everything JSON can hold, full precision) to ``output_dir/summary.json``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

SUMMARY_FILE = "summary.json"


def fmt_number(value: Any) -> str:
    """A number for people: 4 significant digits (``5322``, ``4.56``, ``0.0026``, ``3e-05``), whole numbers
    from 10,000 up (``53221``), integers as they are."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    if abs(value) >= 1e4:
        return f"{value:.0f}" if abs(value) < 1e12 else f"{value:.3e}"
    if abs(value) < 1e-3:
        return f"{value:.3g}"
    return f"{value:.4g}"


def fmt_seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    minutes, s = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {s:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _number(d: Any, key: str) -> float | None:
    value = d.get(key) if isinstance(d, dict) else None
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _change(before: float | None, after: float | None) -> str | None:
    """``after``, or ``before -> after`` when both are known."""
    if after is None:
        return None
    return fmt_number(after) if before is None else f"{fmt_number(before)} -> {fmt_number(after)}"


# (label, key): a train metric shown as "first logged -> last logged" (KL: last; it starts at 0), an eval metric
# as "final" (and "before -> final" where the method measured it before training); a row appears when the run
# has its key.
TRAIN_ROWS = (
    ("reward", "reward"), ("KL to reference", "kl"), ("response length", "response_length"),
    ("train loss", "loss"), ("train accuracy", "rewards/accuracies"), ("train MAE", "mae"),
)
EVAL_ROWS = (
    ("eval loss", "eval/loss"), ("eval accuracy", "eval/rewards/accuracies"), ("eval margin", "eval/rewards/margins"),
    ("eval MAE", "eval/mae"), ("eval KL to teacher", "eval/kl_to_teacher"),
)


def summary_rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    """The (label, value) rows of the table for ``result``, in order."""
    train, first = result.get("train") or {}, result.get("train_first") or {}
    evals, before, best = result.get("eval") or {}, result.get("eval_before") or {}, result.get("best_eval") or {}
    rows: list[tuple[str, str | None]] = []
    for label, key in TRAIN_ROWS:
        if key == "loss" and "reward" in train:
            continue  # online RL: the policy loss is no progress measure
        if key == "rewards/accuracies" and "eval/rewards/accuracies" in evals:
            continue
        rows.append((label, _change(_number(first, key) if key != "kl" else None, _number(train, key))))
    for label, key in EVAL_ROWS:
        rows.append((label, _change(_number(before, key), _number(evals, key))))
    best_loss = _number(best, "eval/loss")
    if best_loss is not None and best_loss != _number(evals, "eval/loss"):  # the final eval is not the best one
        rows.append(("best eval loss", f"{fmt_number(best_loss)} (step {best.get('step')})"))
    mean, std = _number(result, "alignkit_reward_mean"), _number(result, "alignkit_reward_std")
    if mean is not None:
        rows.append(("reward mean ± std", f"{fmt_number(mean)} ± {fmt_number(std)} (for normalising in RL)"))
    bon = result.get("best_of_n") or {}
    if _number(bon, "mean_best_score") is not None:
        rows.append(("best-of-n score", f"{fmt_number(bon['mean_best_score'])} (first sample "
                                        f"{fmt_number(_number(bon, 'mean_first_sample_score'))})"))
        rows.append(("kept rows", _change(None, _number(bon, "kept_rows"))))
    steps = result.get("step")
    if isinstance(steps, int) and (steps or result.get("train")):
        skipped = result.get("skipped_updates") or 0
        rows.append(("steps", f"{steps}" + (f" ({skipped} updates skipped: NaN/Inf)" if skipped else "")))
    if _number(result, "seconds") is not None:
        rows.append(("time", fmt_seconds(result["seconds"])))
    if result.get("output_dir"):
        trained = bool(steps or result.get("train"))
        rows.append(("model" if trained else "output", str(result["output_dir"])))
        rows.append(("all metrics", str(Path(result["output_dir"]) / SUMMARY_FILE)))
    return [(label, value) for label, value in rows if value is not None]


def format_summary(result: dict[str, Any]) -> str:
    """The end-of-run table: a title line, then aligned ``label  value`` rows."""
    rows = summary_rows(result)
    width = max((len(label) for label, _ in rows), default=0)
    title = f"alignkit: {result.get('method') or 'run'} done"
    return "\n".join([title] + [f"  {label.ljust(width)}  {value}" for label, value in rows])


def jsonable(value: Any) -> Any:
    """``value`` with what JSON cannot hold left out (models, tensors that are not scalars); NaN/Inf as null."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            v = jsonable(v)
            if v is not _SKIP:
                out[str(k)] = v
        return out
    if isinstance(value, (list, tuple)):
        return [v for v in (jsonable(x) for x in value) if v is not _SKIP]
    if isinstance(value, bool) or value is None or isinstance(value, (str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # a 0-d tensor or numpy scalar
        return jsonable(value.item())
    return _SKIP


_SKIP = object()


def write_summary(result: dict[str, Any], output_dir: str | Path | None = None) -> Path | None:
    """Write ``result`` (JSON-able parts, full precision) to ``output_dir/summary.json``; the path, or None when
    the run has no output folder."""
    out = output_dir or result.get("output_dir")
    if not out or not Path(out).is_dir():
        return None
    path = Path(out) / SUMMARY_FILE
    tmp = path.with_name(f".tmp-{SUMMARY_FILE}")
    tmp.write_text(json.dumps(jsonable(result), indent=1) + "\n")
    tmp.replace(path)
    return path
