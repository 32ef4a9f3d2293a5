"""The training loop of offline methods (:func:`fit`) and the steps every loop shares (:class:`Run`).

:class:`Run` owns what the offline loop and the online RL loop (:mod:`alignkit.methods.online_rl`) have
in common: optimizer and schedule, the prepared (DDP/DeepSpeed) model, the NaN-guarded backward and
update, logging, checkpoints and the end of a run (final checkpoint, model save, tracker close). A loop
creates it with :func:`start_training` after :func:`~alignkit.training.checkpoint.prepare_output_dir`.

:func:`fit` trains an :class:`OfflineMethod` on a fixed dataset:

- gradient accumulation with *exact* normalisation: a method's loss is a sum over its "items" (tokens for
  SFT, pairs for DPO, ...), and the loop divides by the number of items in the whole global update, so
  2 processes x batch 2 equal 1 process x batch 4 up to float error;
- deterministic data order (:class:`~alignkit.training.batches.BatchStream`) that resume replays;
- periodic eval, progress bar, JSONL / TensorBoard / W&B logging.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from alignkit.config import RunConfig
from alignkit.errors import TrainingError
from alignkit.training.accelerator import any_process, is_deepspeed, is_fsdp2, plan_fsdp2, reduce_sum
from alignkit.training.batches import BatchStream, eval_batches, to_device
from alignkit.training.checkpoint import (
    Checkpointer,
    TrainState,
    list_checkpoints,
    prepare_output_dir,
    release_run_lock,
)
from alignkit.training.optim import build_optimizer, build_scheduler
from alignkit.training.summary import fmt_number
from alignkit.training.tracking import Tracker

logger = logging.getLogger("alignkit")

MIN_USEFUL_EVAL_ROWS = 8  # fewer eval rows than this: fit warns that eval/ metrics are noisy


class OfflineMethod:
    """What :func:`fit` needs from a method that trains on a fixed dataset.

    ``loss`` returns the *sum* of per-item losses in the micro-batch and a dict of metric *sums*
    over the same items; the loop divides both by the global item count of the update.
    """

    #: metrics shown on the progress bar besides loss/lr/tok/s
    bar_metrics: tuple[str, ...] = ()

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def count_items(self, batch: dict[str, torch.Tensor]) -> int:
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def count_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        if "attention_mask" in batch:
            return int(batch["attention_mask"].sum())
        return int(batch["input_ids"].numel())

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


# --------------------------------------------------------------------------------------------------
# A run: the shared step and the end of a run
# --------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """The moving parts of one training run, and the steps every loop takes with them."""

    cfg: RunConfig
    accelerator: Any
    model: torch.nn.Module  # prepared: DDP- or DeepSpeed-wrapped where that applies
    optimizer: torch.optim.Optimizer
    scheduler: Any
    checkpointer: Checkpointer
    tracker: Tracker
    state: TrainState
    max_steps: int
    grad_norm: float | None = field(default=None)  # of the last applied update, when known
    first_logged: dict[str, float] = field(default_factory=dict)  # the summary's "from" (train metrics)
    best_eval: dict[str, float] = field(default_factory=dict)  # the eval with the lowest eval/loss, and its step
    started: float = field(default_factory=time.perf_counter)

    @property
    def output_dir(self) -> Path:
        return Path(self.cfg.training.output_dir)

    def backward(self, loss: torch.Tensor) -> bool:
        """Backward of ``loss``; False instead when it is NaN/Inf on any process (the update will be skipped).

        Under DeepSpeed a skipped micro-batch still runs a zero backward: DeepSpeed counts micro-steps.
        """
        acc = self.accelerator
        if any_process(acc, not bool(torch.isfinite(loss.detach()).all())):
            if is_deepspeed(acc):
                acc.backward(sum(p.sum() for p in self.model.parameters() if p.requires_grad) * 0.0)
            return False
        acc.backward(loss)
        return True

    def update(self, bad: bool = False) -> bool:
        """Clip, step and zero the gradients of one update; True when it was applied.

        An update with a NaN/Inf loss (``bad``) or gradient is skipped (the NaN guard); after
        ``training.max_nonfinite_updates`` such updates in a row the run stops with a TrainingError.
        """
        acc, t, state = self.accelerator, self.cfg.training, self.state
        use_ds = is_deepspeed(acc)
        grad_norm = None
        if not bad and t.max_grad_norm > 0 and not use_ds:
            grad_norm = acc.clip_grad_norm_(self.model.parameters(), t.max_grad_norm)
            if grad_norm is not None and not math.isfinite(float(grad_norm)):
                bad = any_process(acc, True)
        elif use_ds and hasattr(self.model, "get_global_grad_norm"):
            grad_norm = self.model.get_global_grad_norm()
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
            state.nonfinite_in_a_row += 1
            state.skipped_updates += 1
            self.tracker.write(f"step {state.step + 1}: non-finite loss or gradient, update skipped "
                               f"({state.nonfinite_in_a_row} in a row)")
            if state.nonfinite_in_a_row >= t.max_nonfinite_updates:
                ckpts = list_checkpoints(t.output_dir)
                last = f"the last good checkpoint is {ckpts[-1]}" if ckpts else "no checkpoint was written yet"
                self.tracker.close()
                raise TrainingError(
                    f"{state.nonfinite_in_a_row} updates in a row had a NaN/Inf loss or gradient (at step "
                    f"{state.step + 1}); {last}. Lower training.learning_rate, use mixed_precision=bf16 instead "
                    "of fp16, or raise training.max_nonfinite_updates.")
            return False
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        state.nonfinite_in_a_row = 0
        if grad_norm is not None:
            self.grad_norm = float(grad_norm)
        return True

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def log_due(self) -> bool:
        """Whether this step's metrics are logged (every ``logging_steps`` and at the last step)."""
        return self.state.step % self.cfg.training.logging_steps == 0 or self.state.step == self.max_steps

    def due(self, every: int) -> bool:
        """Every ``every`` steps (0: never), except the last step, which :meth:`finish` handles."""
        return every > 0 and self.state.step % every == 0 and self.state.step < self.max_steps

    def log(self, metrics: dict[str, float]) -> None:
        """Log this step's train metrics (the first ones are kept for the summary's "from")."""
        if not self.first_logged:
            self.first_logged = {"step": self.state.step, **metrics}
        self.tracker.log(self.state.step, metrics)

    def log_eval(self, metrics: dict[str, float]) -> None:
        """Log eval metrics (the best by eval/loss is kept for the summary) and print them in one line."""
        loss = metrics.get("eval/loss")
        if loss is not None and (not self.best_eval or loss < self.best_eval["eval/loss"]):
            self.best_eval = {"step": self.state.step, **metrics}
        self.tracker.log(self.state.step, metrics)
        self.tracker.write(f"step {self.state.step}: " + ", ".join(f"{k}={fmt_number(v)}" for k, v in metrics.items()))

    def save_if_due(self) -> None:
        if self.due(self.cfg.training.save_steps):
            self.checkpointer.save(self.state)

    def finish(self) -> None:
        """The end of a run: the final checkpoint (when checkpoints are on), the model as an HF folder in
        ``output_dir``, trackers closed. Every process must call it (ZeRO-3 gathers the weights)."""
        if self.cfg.training.save_steps > 0:
            self.checkpointer.save(self.state)
        self.accelerator.wait_for_everyone()
        self.checkpointer.save_model(self.output_dir)
        self.tracker.close()
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            if "plots" in self.cfg.training.report_to:
                from alignkit.training.plots import plot_run

                plot_run(self.output_dir)  # output_dir/plots/*.png; never raises
            release_run_lock(self.output_dir)
            logger.info(f"saved the trained model to {self.output_dir}")

    def summary(self, **extra: Any) -> dict[str, Any]:
        """The run's result: steps, where the model is, time (from the start of training), the first logged
        train metrics (``train_first``) and the best eval; a loop adds its last metrics (``train``, ``eval``)."""
        out = {"method": self.cfg.method, "step": self.state.step, "output_dir": str(self.output_dir),
               "skipped_updates": self.state.skipped_updates, "seconds": round(time.perf_counter() - self.started, 1),
               "train_first": self.first_logged}
        if self.best_eval:
            out["best_eval"] = self.best_eval
        return {**out, **extra}


def start_training(accelerator, cfg: RunConfig, model: torch.nn.Module, tokenizer, *, resume_from: Path | None,
                   total_steps: int, total_updates: int, method_state=None, bar_keys: tuple[str, ...],
                   checkpointer_cls: type[Checkpointer] = Checkpointer) -> Run:
    """Optimizer and schedule over ``total_updates``, the prepared model, checkpoints (resumed from
    ``resume_from``) and trackers; ``total_steps`` is what the progress bar and ``max_steps`` count."""
    t = cfg.training
    model.train()
    optimizer = build_optimizer(model, t)
    scheduler = build_scheduler(optimizer, t, total_updates)
    if is_fsdp2(accelerator):
        plan_fsdp2(accelerator, model)
    model, optimizer = accelerator.prepare(model, optimizer)  # the scheduler is stepped by us, once per update
    checkpointer = checkpointer_cls(accelerator, model, optimizer, scheduler, tokenizer, cfg, method_state)
    state = TrainState()
    if resume_from is not None:
        state = checkpointer.load(resume_from)
        logger.info(f"resumed from {resume_from} at step {state.step}")
    tracker = Tracker(t.output_dir, t.report_to, total_steps=total_steps, initial_step=state.step,
                      is_main=accelerator.is_main_process, run_name=t.run_name, wandb_project=t.wandb_project,
                      config=cfg.to_dict(), bar_keys=bar_keys, desc=cfg.method)
    return Run(cfg, accelerator, model, optimizer, scheduler, checkpointer, tracker, state, total_steps)


# --------------------------------------------------------------------------------------------------
# The offline loop
# --------------------------------------------------------------------------------------------------


def evaluate(accelerator, model, method: OfflineMethod, rows: list[dict], batch_size: int) -> dict[str, float]:
    """Global means of the method's loss and metrics over the eval rows (every row once, on any process count)."""
    was_training = model.training
    model.eval()
    loss_sum, items, sums = 0.0, 0.0, {}
    with torch.no_grad():
        for batch, counts in eval_batches(rows, method.collate, batch_size, accelerator.num_processes,
                                          accelerator.process_index):
            batch = to_device(batch, accelerator.device)
            loss, metrics = method.loss(model, batch)
            if not counts:  # a filler batch: this process had no rows left (see eval_batches)
                continue
            loss_sum += float(loss)
            items += method.count_items(batch)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
    keys = sorted(sums)
    totals = reduce_sum(accelerator, [loss_sum, items] + [sums[k] for k in keys])
    model.train(was_training)
    denom = max(totals[1], 1.0)
    out = {"eval/loss": totals[0] / denom}
    out.update({f"eval/{k}": v / denom for k, v in zip(keys, totals[2:])})
    return out


def total_updates(t, batches_per_epoch: int) -> int:
    """Optimizer updates to run: ``training.max_steps``, else ``training.num_epochs`` passes over the data."""
    if t.max_steps > 0:
        return t.max_steps
    return max(1, math.ceil(t.num_epochs * batches_per_epoch / t.gradient_accumulation_steps))


def fit(accelerator, model: torch.nn.Module, tokenizer, method: OfflineMethod, cfg: RunConfig,
        train_rows: list[dict], eval_rows: list[dict] | None = None) -> dict[str, Any]:
    """Train ``model`` with ``method`` on ``train_rows``; save checkpoints and the final model.

    Returns a summary: final step, last train metrics, last eval metrics, output path, the trained model.
    """
    t = cfg.training
    resume_from = prepare_output_dir(accelerator, cfg)
    G = t.gradient_accumulation_steps
    stream = BatchStream(train_rows, method.collate, batch_size=t.per_device_batch_size,
                         world=accelerator.num_processes, rank=accelerator.process_index, seed=t.seed,
                         num_workers=t.dataloader_num_workers, group_by_length=t.group_by_length)
    max_steps = total_updates(t, stream.batches_per_epoch)
    run = start_training(accelerator, cfg, model, tokenizer, resume_from=resume_from, total_steps=max_steps,
                         total_updates=max_steps, method_state=method,
                         bar_keys=("loss", "lr", "tok/s", *method.bar_metrics))
    model, state = run.model, run.state
    batches = stream.iterate(state.micro_step)
    last_metrics: dict[str, float] = {}
    eval_metrics: dict[str, float] = {}
    t0, tokens_window = time.perf_counter(), 0

    if eval_rows and len(eval_rows) < MIN_USEFUL_EVAL_ROWS and accelerator.is_main_process:
        n = len(eval_rows)
        logger.warning(f"eval: only {n} eval row{'s' if n > 1 else ''} (after packing, when on): eval/ metrics "
                       f"are means over {'them' if n > 1 else 'it'} and will be noisy; raise data.eval_split "
                       "or give data.eval.")

    def run_eval() -> dict[str, float]:
        metrics = evaluate(accelerator, model, method, eval_rows, t.per_device_batch_size)
        run.log_eval(metrics)
        return metrics

    while state.step < max_steps:
        micro = [to_device(next(batches), accelerator.device) for _ in range(G)]
        state.micro_step += G
        # exact normalisation: every process divides by the mean item count per (process, micro-batch)
        local_items = sum(method.count_items(b) for b in micro)
        global_items = reduce_sum(accelerator, [local_items])[0]
        norm = max(global_items, 1.0) / (G * accelerator.num_processes)
        loss_sum, sums, bad, tokens = 0.0, {}, False, 0
        for b in micro:
            tokens += method.count_tokens(b)
            with accelerator.accumulate(model):
                loss, metrics = method.loss(model, b)
                if not run.backward(loss / norm):
                    bad = True
                    continue
                loss_sum += float(loss.detach())
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
        if not run.update(bad):
            continue
        state.step += 1
        state.tokens_seen += tokens
        tokens_window += tokens
        run.tracker.advance()

        if run.log_due():
            totals = reduce_sum(accelerator, [loss_sum, float(tokens_window)] + [sums[k] for k in sorted(sums)])
            elapsed = time.perf_counter() - t0
            last_metrics = {"loss": totals[0] / max(global_items, 1.0), "lr": run.lr,
                            "tok/s": totals[1] / max(elapsed, 1e-9),
                            "epoch": state.micro_step / stream.batches_per_epoch}
            last_metrics.update({k: v / max(global_items, 1.0) for k, v in zip(sorted(sums), totals[2:])})
            if run.grad_norm is not None:
                last_metrics["grad_norm"] = run.grad_norm
            run.log(last_metrics)
            t0, tokens_window = time.perf_counter(), 0
        if eval_rows and run.due(t.eval_steps):
            eval_metrics = run_eval()
        run.save_if_due()

    if eval_rows:
        eval_metrics = run_eval()
    run.finish()
    return run.summary(train=last_metrics, eval=eval_metrics, model=model)
