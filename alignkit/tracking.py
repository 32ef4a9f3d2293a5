"""Metric sinks: progress bar, JSONL file, TensorBoard, Weights & Biases. Only the main process logs."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger("alignkit")


def _fmt(value: float) -> str:
    if value == 0 or not math.isfinite(value):
        return f"{value}"
    if abs(value) >= 1e4 or abs(value) < 1e-3:
        return f"{value:.2e}"
    return f"{value:.4f}"


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
        if "jsonl" in report_to:
            self.jsonl = open(out / "metrics.jsonl", "a")  # append: a resumed run continues the file
        if "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir=str(out / "tensorboard"))
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
