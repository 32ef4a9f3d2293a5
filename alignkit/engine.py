"""The shared training engine: one accelerate loop for every offline method.

What it owns, so that methods don't have to:

- the Accelerator (DDP, DeepSpeed ZeRO-1/2/3, mixed precision) — :func:`setup_accelerator`;
- AdamW with decoupled weight decay, warmup + cosine/linear/constant schedule;
- gradient accumulation with *exact* normalisation: a method's loss is a sum over its "items"
  (tokens for SFT, pairs for DPO, ...), and the engine divides by the number of items in the whole
  global update, so 2 processes x batch 2 equal 1 process x batch 4 up to float error;
- gradient clipping, the NaN/Inf guard (skip the update, stop after ``max_nonfinite_updates`` in a row);
- deterministic data order (a seeded permutation per epoch, sharded by rank) that resume can replay;
- atomic checkpoints (``checkpoint-N`` appears only once complete), rotation, exact resume;
- periodic eval, progress bar, JSONL / TensorBoard / W&B logging.

A method plugs in through :class:`OfflineMethod`; online RL recipes reuse the pieces directly.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from alignkit.config import RunConfig, TrainingConfig
from alignkit.errors import AlignkitError
from alignkit.tracking import Tracker

logger = logging.getLogger("alignkit")

STATE_FILE = "alignkit_state.json"  # written last: its presence marks a complete checkpoint
CONFIG_FILE = "alignkit_config.yaml"


class TrainingError(AlignkitError, RuntimeError):
    """Training cannot continue; the message says why and what to do."""


class OfflineMethod:
    """What the engine needs from a method that trains on a fixed dataset.

    ``loss`` returns the *sum* of per-item losses in the micro-batch and a dict of metric *sums*
    over the same items; the engine divides both by the global item count of the update.
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
# Accelerator
# --------------------------------------------------------------------------------------------------


def resolve_mixed_precision(name: str) -> str:
    if name != "auto":
        if name == "fp16" and not torch.cuda.is_available():
            raise TrainingError("training.mixed_precision=fp16 needs a CUDA GPU; on CPU use bf16 or no.")
        return name
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def deepspeed_config(t: TrainingConfig, mixed_precision: str) -> dict:
    """A DeepSpeed config from the training section (or the user's JSON file)."""
    if t.deepspeed not in ("zero1", "zero2", "zero3"):
        return json.loads(Path(t.deepspeed).read_text())
    stage = int(t.deepspeed[-1])
    zero: dict[str, Any] = {"stage": stage, "overlap_comm": False, "contiguous_gradients": True}
    if stage == 3:
        # gather the 16-bit weights on save so the checkpoint is a normal HF folder
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if t.zero_offload and stage >= 2:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": t.per_device_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "gradient_clipping": t.max_grad_norm if t.max_grad_norm > 0 else 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": mixed_precision == "bf16"},
        "fp16": {"enabled": mixed_precision == "fp16", "initial_scale_power": 16},
        # we hand DeepSpeed a torch AdamW; allow it with CPU offload too (no JIT-compiled CPU Adam needed)
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }


def setup_accelerator(t: TrainingConfig):
    """Create the Accelerator for this process: plain, DDP (gloo on CPU) or DeepSpeed."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DeepSpeedPlugin, set_seed

    mixed_precision = resolve_mixed_precision(t.mixed_precision)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cpu_multi = world > 1 and not torch.cuda.is_available()
    if cpu_multi:
        # CPU processes: without cpu=True accelerate reports DistributedType.NO and nothing is synced;
        # gloo must be chosen before DeepSpeed initialises its own backend
        PartialState(cpu=True, backend="gloo")
    plugin = None
    if t.deepspeed:
        os.environ.setdefault("ACCELERATE_USE_DEEPSPEED", "true")
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        try:
            import deepspeed  # noqa: F401
        except ImportError as e:
            raise TrainingError("training.deepspeed is set but DeepSpeed is not installed: pip install alignkit[deepspeed]") from e
        plugin = DeepSpeedPlugin(hf_ds_config=deepspeed_config(t, mixed_precision))
        plugin.set_mixed_precision(mixed_precision)
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        deepspeed_plugin=plugin,
        cpu=cpu_multi and plugin is None,
    )
    if world > 1 and accelerator.num_processes > 1 and accelerator.distributed_type.value == "NO":
        raise TrainingError("accelerate did not initialise distributed training across "
                            f"{world} processes; check the launcher environment (WORLD_SIZE, MASTER_ADDR).")
    set_seed(t.seed)
    return accelerator


def is_deepspeed(accelerator) -> bool:
    return getattr(accelerator.state, "deepspeed_plugin", None) is not None


def zero_stage(accelerator) -> int:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return int(plugin.zero_stage) if plugin is not None else 0


def prepare_frozen(accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """Place a frozen model (reference, teacher, reward) for inference on this process.

    Under ZeRO-3 it is partitioned like the policy (its own DeepSpeed engine, no optimizer);
    otherwise it is simply moved to the device.
    """
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if zero_stage(accelerator) == 3:
        import deepspeed

        cfg = dict(accelerator.state.deepspeed_plugin.deepspeed_config)
        cfg = {k: v for k, v in cfg.items() if k not in ("optimizer", "scheduler")}
        cfg["zero_optimization"] = {"stage": 3, "stage3_param_persistence_threshold": 1e4}
        cfg["train_micro_batch_size_per_gpu"] = cfg.get("train_micro_batch_size_per_gpu", 1)
        engine, *_ = deepspeed.initialize(model=model, config=cfg)
        engine.eval()
        return engine
    return model.to(accelerator.device)


# --------------------------------------------------------------------------------------------------
# Optimiser and schedule
# --------------------------------------------------------------------------------------------------


def build_optimizer(model: torch.nn.Module, t: TrainingConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    if not decay and not no_decay:
        raise TrainingError("the model has no trainable parameters (check model.finetune and lora_target_modules).")
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=t.learning_rate,
                             betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon)


def lr_lambda(kind: str, warmup: int, total: int):
    """Multiplier of the peak LR at update ``step``: linear warmup, then cosine/linear decay or constant."""

    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def build_scheduler(optimizer, t: TrainingConfig, total_steps: int):
    warmup = t.warmup_steps if t.warmup_steps > 0 else int(t.warmup_ratio * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t.lr_scheduler, warmup, total_steps))


# --------------------------------------------------------------------------------------------------
# Data order: a seeded permutation per epoch, cut into global batches, sharded by rank
# --------------------------------------------------------------------------------------------------


class BatchStream:
    """Micro-batches in a fixed order that a resumed run can replay from any position.

    Epoch ``e`` visits ``randperm(n, seed + e)``; global batch ``g`` is rows ``[g*B*W, (g+1)*B*W)``
    and process ``r`` takes its ``r``-th slice of ``B`` rows. Incomplete global batches are dropped.
    """

    def __init__(self, rows: list[dict], collate, *, batch_size: int, world: int, rank: int, seed: int,
                 shuffle: bool = True, num_workers: int = 0):
        self.rows, self.collate = rows, collate
        self.batch_size, self.world, self.rank = batch_size, world, rank
        self.seed, self.shuffle, self.num_workers = seed, shuffle, num_workers
        self.batches_per_epoch = len(rows) // (batch_size * world)
        if self.batches_per_epoch == 0:
            raise TrainingError(
                f"{len(rows)} rows is less than one global batch ({batch_size} per process x {world} processes); "
                "lower training.per_device_batch_size or add data."
            )

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        n = len(self.rows)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        else:
            order = list(range(n))
        per_global = self.batch_size * self.world
        out = []
        for g in range(self.batches_per_epoch):
            start = g * per_global + self.rank * self.batch_size
            out.append(order[start:start + self.batch_size])
        return out

    def iterate(self, start_micro_step: int = 0) -> Iterator[dict]:
        """Endless micro-batches, starting at global micro-batch index ``start_micro_step``."""
        from torch.utils.data import DataLoader

        epoch, offset = divmod(start_micro_step, self.batches_per_epoch)
        while True:
            batches = self.epoch_batches(epoch)[offset:]
            # its own generator: the loader must not draw from the global RNG (dropout's), or a
            # resumed run would see different dropout masks than the uninterrupted one
            loader = DataLoader(self.rows, batch_sampler=batches, collate_fn=self.collate,
                                num_workers=self.num_workers,
                                generator=torch.Generator().manual_seed(self.seed + epoch))
            yield from loader
            epoch, offset = epoch + 1, 0


def eval_batches(rows: list[dict], collate, batch_size: int, world: int, rank: int) -> Iterator[dict]:
    """This process's share of the eval rows; every process gets the same number of batches."""
    usable = len(rows) - len(rows) % world
    mine = rows[rank:usable:world]
    for i in range(0, len(mine), batch_size):
        yield collate(mine[i:i + batch_size])


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------


@dataclass
class TrainState:
    step: int = 0  # optimizer updates done
    micro_step: int = 0  # micro-batches consumed (per process), the data position to resume from
    nonfinite_in_a_row: int = 0
    skipped_updates: int = 0
    tokens_seen: int = 0


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (their state file exists), oldest first."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    ckpts = [p for p in out.glob("checkpoint-*") if p.is_dir() and (p / STATE_FILE).is_file()
             and p.name.split("-")[-1].isdigit()]
    return sorted(ckpts, key=lambda p: int(p.name.split("-")[-1]))


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config")


def check_output_dir(t: TrainingConfig) -> Path | None:
    """Decide where to resume from, refusing to silently overwrite a previous run."""
    out = Path(t.output_dir)
    ckpts = list_checkpoints(out)
    if t.resume == "latest":
        if not ckpts:
            logger.warning(f"training.resume=latest but {out} has no complete checkpoint; starting from scratch.")
            return None
        return ckpts[-1]
    if t.resume:
        path = Path(t.resume)
        if not (path / STATE_FILE).is_file():
            raise TrainingError(f"training.resume={t.resume}: not a complete alignkit checkpoint (no {STATE_FILE}).")
        return path
    if (ckpts or (out / CONFIG_FILE).is_file()) and not t.overwrite_output_dir:
        raise TrainingError(
            f"training.output_dir={out} already holds a run. Set training.resume=latest to continue it, "
            "training.overwrite_output_dir=true to start over there, or choose another output_dir."
        )
    return None


class Checkpointer:
    """Atomic checkpoints: write ``.tmp-checkpoint-N``, then rename to ``checkpoint-N``."""

    def __init__(self, accelerator, model, tokenizer, cfg: RunConfig, method: OfflineMethod | None = None):
        self.accelerator, self.model, self.tokenizer, self.cfg, self.method = accelerator, model, tokenizer, cfg, method
        self.out = Path(cfg.training.output_dir)
        peft = _is_peft(accelerator.unwrap_model(model))
        self.peft = peft
        if peft:
            trainable = {n for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad}

            def keep_trainable(models, weights, output_dir):
                # frozen base weights are in the base model already: save only what training changes
                for w in weights:
                    for k in [k for k in w if k not in trainable and k.removeprefix("module.") not in trainable]:
                        del w[k]

            accelerator.register_save_state_pre_hook(keep_trainable)

    def save_model(self, path: Path) -> None:
        """A normal HF folder (model or adapter + tokenizer + config), from every process (ZeRO-3 gathers)."""
        from alignkit.models import save_model

        acc = self.accelerator
        state_dict = acc.get_state_dict(self.model) if zero_stage(acc) == 3 else None
        if acc.is_main_process:
            save_model(acc.unwrap_model(self.model), self.tokenizer, path, state_dict=state_dict)
            self.cfg.save(path / CONFIG_FILE)

    def save(self, state: TrainState) -> Path:
        acc = self.accelerator
        final = self.out / f"checkpoint-{state.step}"
        tmp = self.out / f".tmp-checkpoint-{state.step}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        self.save_model(tmp)
        acc.save_state(str(tmp / "trainer_state"))
        acc.wait_for_everyone()
        if acc.is_main_process:
            payload = {"train_state": asdict(state), "method_state": self.method.state_dict() if self.method else {}}
            (tmp / STATE_FILE).write_text(json.dumps(payload, indent=1))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._rotate()
        acc.wait_for_everyone()
        return final

    def _rotate(self) -> None:
        limit = self.cfg.training.save_total_limit
        if limit is None or limit < 1:
            return
        for old in list_checkpoints(self.out)[:-limit]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, path: Path) -> TrainState:
        payload = json.loads((path / STATE_FILE).read_text())
        self.accelerator.load_state(str(path / "trainer_state"), **({"strict": False} if self.peft else {}))
        if self.method is not None:
            self.method.load_state_dict(payload.get("method_state", {}))
        return TrainState(**payload["train_state"])


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


def reduce_sum(accelerator, values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    if accelerator.num_processes > 1:
        t = accelerator.reduce(t, reduction="sum")
    return t.tolist()


def any_process(accelerator, flag: bool) -> bool:
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


def zero_grad_backward(accelerator, model) -> None:
    """A backward of 0 (DeepSpeed counts micro-steps: a skipped micro-batch must still call backward)."""
    accelerator.backward(sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0)


def is_bad(accelerator, loss: torch.Tensor) -> bool:
    """True on every process when the loss is NaN/Inf on any process."""
    return any_process(accelerator, not bool(torch.isfinite(loss.detach()).all()))


def optimizer_update(accelerator, model, optimizer, scheduler, state: TrainState, t, *, bad: bool,
                     tracker) -> float | None:
    """Clip, step and zero the gradients of one minibatch; returns the gradient norm (None when unknown).

    A minibatch with a NaN/Inf loss or gradient is skipped (the engine's NaN guard); after
    ``training.max_nonfinite_updates`` such updates in a row the run stops with a TrainingError.
    """
    use_ds = is_deepspeed(accelerator)
    grad_norm = None
    if not bad and t.max_grad_norm > 0 and not use_ds:
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
        if grad_norm is not None and not math.isfinite(float(grad_norm)):
            bad = any_process(accelerator, True)
    elif use_ds and hasattr(model, "get_global_grad_norm"):
        grad_norm = model.get_global_grad_norm()
    if bad:
        optimizer.zero_grad(set_to_none=True)
        state.nonfinite_in_a_row += 1
        state.skipped_updates += 1
        tracker.write(f"step {state.step + 1}: non-finite loss or gradient, update skipped "
                      f"({state.nonfinite_in_a_row} in a row)")
        if state.nonfinite_in_a_row >= t.max_nonfinite_updates:
            ckpts = list_checkpoints(t.output_dir)
            last = f"the last good checkpoint is {ckpts[-1]}" if ckpts else "no checkpoint was written yet"
            tracker.close()
            raise TrainingError(
                f"{state.nonfinite_in_a_row} updates in a row had a NaN/Inf loss or gradient (at step "
                f"{state.step + 1}); {last}. Lower training.learning_rate, use mixed_precision=bf16 instead of "
                "fp16, or raise training.max_nonfinite_updates.")
        return None
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    state.nonfinite_in_a_row = 0
    return None if grad_norm is None else float(grad_norm)


def evaluate(accelerator, model, method: OfflineMethod, rows: list[dict], batch_size: int) -> dict[str, float]:
    """Global means of the method's loss and metrics over the eval rows."""
    was_training = model.training
    model.eval()
    loss_sum, items, sums = 0.0, 0.0, {}
    with torch.no_grad():
        for batch in eval_batches(rows, method.collate, batch_size, accelerator.num_processes, accelerator.process_index):
            batch = _to_device(batch, accelerator.device)
            loss, metrics = method.loss(model, batch)
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


def _to_device(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def total_updates(t: TrainingConfig, batches_per_epoch: int) -> int:
    if t.max_steps > 0:
        return t.max_steps
    return max(1, math.ceil(t.num_epochs * batches_per_epoch / t.gradient_accumulation_steps))


def fit(accelerator, model: torch.nn.Module, tokenizer, method: OfflineMethod, cfg: RunConfig,
        train_rows: list[dict], eval_rows: list[dict] | None = None) -> dict[str, Any]:
    """Train ``model`` with ``method`` on ``train_rows``; save checkpoints and the final model.

    Returns a summary: final step, last train metrics, last eval metrics, output path.
    """
    t = cfg.training
    out = Path(t.output_dir)
    resume_from = check_output_dir(t)  # before anything is written
    accelerator.wait_for_everyone()  # every process checks before the main one writes
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / CONFIG_FILE)
    G = t.gradient_accumulation_steps
    stream = BatchStream(train_rows, method.collate, batch_size=t.per_device_batch_size,
                         world=accelerator.num_processes, rank=accelerator.process_index, seed=t.seed,
                         num_workers=t.dataloader_num_workers)
    max_steps = total_updates(t, stream.batches_per_epoch)

    model.train()
    optimizer = build_optimizer(model, t)
    scheduler = build_scheduler(optimizer, t, max_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)  # stepped by us, once per update on every process
    checkpointer = Checkpointer(accelerator, model, tokenizer, cfg, method)

    state = TrainState()
    if resume_from is not None:
        state = checkpointer.load(resume_from)
        logger.info(f"resumed from {resume_from} at step {state.step}")

    tracker = Tracker(out, t.report_to, total_steps=max_steps, initial_step=state.step,
                      is_main=accelerator.is_main_process, run_name=t.run_name, wandb_project=t.wandb_project,
                      config=cfg.to_dict(), bar_keys=("loss", "lr", "tok/s", *method.bar_metrics), desc=cfg.method)
    use_ds = is_deepspeed(accelerator)
    batches = stream.iterate(state.micro_step)
    last_metrics: dict[str, float] = {}
    eval_metrics: dict[str, float] = {}
    t0, tokens_window = time.perf_counter(), 0

    while state.step < max_steps:
        micro = [_to_device(next(batches), accelerator.device) for _ in range(G)]
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
                if is_bad(accelerator, loss):
                    bad = True
                    if use_ds:
                        zero_grad_backward(accelerator, model)
                    continue
                accelerator.backward(loss / norm)
                loss_sum += float(loss.detach())
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
        skipped_before = state.skipped_updates
        grad_norm = optimizer_update(accelerator, model, optimizer, scheduler, state, t, bad=bad, tracker=tracker)
        if state.skipped_updates > skipped_before:
            continue
        state.step += 1
        state.tokens_seen += tokens
        tokens_window += tokens
        tracker.advance()

        if state.step % t.logging_steps == 0 or state.step == max_steps:
            totals = reduce_sum(accelerator, [loss_sum, float(tokens_window)] + [sums[k] for k in sorted(sums)])
            elapsed = time.perf_counter() - t0
            last_metrics = {"loss": totals[0] / max(global_items, 1.0), "lr": scheduler.get_last_lr()[0],
                            "tok/s": totals[1] / max(elapsed, 1e-9),
                            "epoch": state.micro_step / stream.batches_per_epoch}
            last_metrics.update({k: v / max(global_items, 1.0) for k, v in zip(sorted(sums), totals[2:])})
            if grad_norm is not None:
                last_metrics["grad_norm"] = float(grad_norm)
            tracker.log(state.step, last_metrics)
            t0, tokens_window = time.perf_counter(), 0
        if eval_rows and t.eval_steps > 0 and state.step % t.eval_steps == 0 and state.step < max_steps:
            eval_metrics = evaluate(accelerator, model, method, eval_rows, t.per_device_batch_size)
            tracker.log(state.step, eval_metrics)
            tracker.write(f"step {state.step}: " + ", ".join(f"{k}={v:.4f}" for k, v in eval_metrics.items()))
        if t.save_steps > 0 and state.step % t.save_steps == 0 and state.step < max_steps:
            checkpointer.save(state)

    if eval_rows:
        eval_metrics = evaluate(accelerator, model, method, eval_rows, t.per_device_batch_size)
        tracker.log(state.step, eval_metrics)
        tracker.write(f"step {state.step}: " + ", ".join(f"{k}={v:.4f}" for k, v in eval_metrics.items()))
    if t.save_steps > 0:
        checkpointer.save(state)
    accelerator.wait_for_everyone()
    checkpointer.save_model(out)
    tracker.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        logger.info(f"saved the trained model to {out}")
    return {"step": state.step, "train": last_metrics, "eval": eval_metrics, "output_dir": str(out),
            "skipped_updates": state.skipped_updates, "model": model}
