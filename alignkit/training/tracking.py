"""Metrics: their reduction over processes (:class:`MetricSums`) and their sinks (:class:`Tracker`: progress
bar, JSONL file, TensorBoard, Weights & Biases; only the main process writes)."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from alignkit.training.accelerator import reduce_sum
from alignkit.training.summary import fmt_number

logger = logging.getLogger("alignkit")


def _fmt(value: float) -> str:
    """A progress-bar number: 4 significant digits (``tok/s=5322``, ``loss=4.56``, ``lr=3e-05``)."""
    return fmt_number(float(value))


def cut_jsonl(path: Path, max_step: int) -> int:
    """Drop the records of ``path`` logged after ``max_step`` (a resumed run logs those steps again); returns
    how many were dropped. A partial last line (a crash while writing) goes too."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            dropped += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] > max_step:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        tmp = path.with_name(f".tmp-{path.name}")
        tmp.write_text("".join(f"{line}\n" for line in kept))
        tmp.replace(path)
    return dropped


class Tracker:
    """Fans metrics out to the progress bar and the loggers named in ``training.report_to``."""

    def __init__(self, output_dir: str | Path, report_to: list[str], *, total_steps: int, initial_step: int,
                 is_main: bool, run_name: str | None = None, wandb_project: str | None = None,
                 config: dict | None = None, bar_keys: tuple[str, ...] = ("loss", "lr", "tok/s"),
                 desc: str = "train"):
        self.is_main = is_main
        self.bar_keys = bar_keys
        self.jsonl = None
        self.tb = None
        self.wandb = None
        self.bar = None
        if not is_main:
            return
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        # the steps after the checkpoint are logged again; a run from scratch (an earlier attempt that wrote no
        # checkpoint, e.g. killed during the first one, or overwrite_output_dir) logs every step again
        dropped = cut_jsonl(out / "metrics.jsonl", initial_step)
        if dropped:
            logger.info(f"dropped {dropped} metrics.jsonl record(s) of an earlier attempt logged after step "
                        f"{initial_step}: this run logs those steps again")
        if "jsonl" in report_to:
            self.jsonl = open(out / "metrics.jsonl", "a")  # append: a resumed run continues the file
        if "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step: TensorBoard hides the events an earlier attempt logged after the checkpoint (after
                # step 0 for a run from scratch)
                self.tb = SummaryWriter(log_dir=str(out / "tensorboard"), purge_step=initial_step + 1)
            except ImportError:
                logger.warning("tensorboard is not installed; `pip install tensorboard` to log there.")
        if "wandb" in report_to:
            try:
                import wandb

                self.wandb = wandb.init(project=wandb_project or "alignkit", name=run_name or out.name,
                                        config=config, resume="allow")
            except ImportError:
                logger.warning("report_to has wandb but it is not installed: `pip install alignkit[wandb]`.")
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total_steps, initial=initial_step, desc=desc, dynamic_ncols=True, unit="step")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.is_main:
            return
        metrics = {k: (float(v) if hasattr(v, "__float__") else v) for k, v in metrics.items()}
        if self.jsonl:
            self.jsonl.write(json.dumps({"step": step, "time": round(time.time(), 3), **metrics}) + "\n")
            self.jsonl.flush()
        for k, v in metrics.items():
            if not isinstance(v, (int, float)):
                continue
            if self.tb:
                self.tb.add_scalar(k, v, step)
        if self.wandb:
            self.wandb.log(metrics, step=step)
        if self.bar is not None:
            shown = {k: _fmt(metrics[k]) for k in self.bar_keys if k in metrics}
            if shown:
                self.bar.set_postfix(shown, refresh=False)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        elif self.is_main:
            print(text)

    def close(self) -> None:
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.close()
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()


class MetricSums:
    """Metrics of one step on this process, reduced over processes by :meth:`means` in one all-reduce.

    ``add(name, total, count)`` accumulates a mean (sum and count are summed over processes, then divided);
    ``add_total(name, value)`` a quantity summed over processes (tokens/s). Every process must add the same
    names (they become one vector).
    """

    def __init__(self) -> None:
        self.sums: dict[str, list[float]] = {}
        self.totals: dict[str, float] = {}

    def add(self, name: str, total: float, count: float = 1.0) -> None:
        entry = self.sums.setdefault(name, [0.0, 0.0])
        entry[0] += float(total)
        entry[1] += float(count)

    def add_total(self, name: str, value: float) -> None:
        self.totals[name] = self.totals.get(name, 0.0) + float(value)

    def add_values(self, name: str, values: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Mean and (population) standard deviation of ``values`` (where ``mask``) as ``name``, ``name_std``."""
        v = values.detach().double()
        if mask is not None:
            m = (mask != 0).to(v.dtype)
            v, n = v * m, float(m.sum())
        else:
            n = float(v.numel())
        self.add(name, float(v.sum()), n)
        self.add(f"{name}_std", float((v * v).sum()), n)  # E[x^2] until means() turns it into a std

    def means(self, accelerator=None) -> dict[str, float]:
        names, total_names = sorted(self.sums), sorted(self.totals)
        flat = ([self.sums[k][0] for k in names] + [self.sums[k][1] for k in names]
                + [self.totals[k] for k in total_names])
        if accelerator is not None:
            flat = reduce_sum(accelerator, flat)
        n = len(names)
        out = {k: s / c if c else 0.0 for k, s, c in zip(names, flat[:n], flat[n:2 * n])}
        for k in names:
            if k.endswith("_std") and k[:-4] in out:
                out[k] = math.sqrt(max(out[k] - out[k[:-4]] ** 2, 0.0))
        out.update(zip(total_names, flat[2 * n:]))
        return out
