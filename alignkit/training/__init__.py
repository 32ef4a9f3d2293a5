"""The training loop and what every loop shares, one concern per module:

- :mod:`~alignkit.training.accelerator`: the Accelerator (DDP, DeepSpeed ZeRO-1/2/3, mixed precision),
  frozen-model placement, collectives;
- :mod:`~alignkit.training.optim`: AdamW and the warmup + decay schedules;
- :mod:`~alignkit.training.batches`: data order and seeds that resume replays;
- :mod:`~alignkit.training.checkpoint`: the start-of-run output-dir check, atomic checkpoints, resume;
- :mod:`~alignkit.training.tracking`: metric reduction and sinks (progress bar, JSONL, TensorBoard, W&B);
- :mod:`~alignkit.training.loop`: :class:`Run` (NaN-guarded update, logging, end of run) and :func:`fit`,
  the loop of offline methods (:class:`OfflineMethod`). The online RL loop is
  :mod:`alignkit.methods.online_rl`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from alignkit.errors import TrainingError
from alignkit.lazy import lazy_exports

# the module of each name, imported on first use: ``alignkit plot`` (alignkit.training.plots) and its --help
# start without torch
_HOMES = {
    **dict.fromkeys(("autocast", "is_deepspeed", "is_fsdp2", "prepare_frozen", "reduce_sum", "setup_accelerator", "zero_stage"),
                    "accelerator"),
    **dict.fromkeys(("CONFIG_FILE", "Checkpointer", "TrainState", "prepare_output_dir"), "checkpoint"),
    **dict.fromkeys(("OfflineMethod", "Run", "evaluate", "fit", "start_training"), "loop"),
}
__getattr__ = lazy_exports(__name__, _HOMES)

if TYPE_CHECKING:
    from alignkit.training.accelerator import (
        autocast,
        is_deepspeed,
        is_fsdp2,
        prepare_frozen,
        reduce_sum,
        setup_accelerator,
        zero_stage,
    )
    from alignkit.training.checkpoint import CONFIG_FILE, Checkpointer, TrainState, prepare_output_dir
    from alignkit.training.loop import OfflineMethod, Run, evaluate, fit, start_training

__all__ = [
    "CONFIG_FILE", "Checkpointer", "OfflineMethod", "Run", "TrainState", "TrainingError", "autocast", "evaluate",
    "fit", "is_deepspeed", "is_fsdp2", "prepare_frozen", "prepare_output_dir", "reduce_sum", "setup_accelerator",
    "start_training", "zero_stage",
]
