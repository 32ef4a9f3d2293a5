"""Output folders and checkpoints: the start-of-run check, atomic checkpoints, rotation, exact resume.

A checkpoint ``checkpoint-N`` holds the model as a normal HF folder, the trainer state under
``trainer_state/`` and ``alignkit_state.json`` (step counters and the method's state). It is written as
``.tmp-checkpoint-N`` and renamed when complete, and the state file is written last, so a folder named
``checkpoint-N`` with a state file is always whole.

Nothing in a checkpoint can run code when it is loaded (a shared checkpoint is untrusted input):

- ``trainer_state/model.safetensors``: the trained parameters, by name (safetensors);
- ``trainer_state/optimizer.pt``: the optimizer's state dict, read with ``torch.load(weights_only=True)``;
- ``trainer_state/scheduler.json``, ``rng_state_<rank>.json`` (Python, NumPy, torch and CUDA generators),
  ``scaler.json`` (fp16 loss scale): plain JSON;
- under DeepSpeed, ``trainer_state/deepspeed/``: DeepSpeed's own checkpoint (partitioned weights and
  optimizer), which DeepSpeed unpickles; every file in it is first read with ``weights_only=True`` and the
  checkpoint is refused unless all of them pass (only tensors and plain containers);
- under FSDP2, the same ``model.safetensors`` and ``optimizer.pt``, gathered from the shards into full
  tensors keyed by parameter name (torch's distributed state-dict API), and ``fsdp.json`` marking them;
  every process reads them back and keeps its own shard.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import random
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from alignkit.config import RunConfig, TrainingConfig
from alignkit.errors import TrainingError
from alignkit.training.accelerator import is_deepspeed, is_fsdp2, zero_stage

logger = logging.getLogger("alignkit")

STATE_FILE = "alignkit_state.json"  # written last: its presence marks a complete checkpoint
CONFIG_FILE = "alignkit_config.yaml"
TRAINER_STATE = "trainer_state"
_PICKLED = (".pkl", ".bin", ".pickle")  # what older checkpoints held (accelerate's save_state)


@dataclass
class TrainState:
    step: int = 0  # optimizer updates done (online RL: rollout steps)
    micro_step: int = 0  # batches consumed (per process), the data position to resume from
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


FINAL_MODEL_FILES = ("config.json", "adapter_config.json")  # what Run.finish leaves in output_dir


def holds_run(output_dir: str | Path) -> bool:
    """Whether ``output_dir`` holds a run worth keeping: a complete checkpoint or a final model. The config
    and metrics an attempt writes before its first checkpoint do not count: that attempt is lost anyway."""
    out = Path(output_dir)
    return bool(list_checkpoints(out)) or any((out / name).is_file() for name in FINAL_MODEL_FILES)


def damaged_file(checkpoint: Path) -> tuple[Path, str] | None:
    """The first file of ``checkpoint`` that resuming would fail to read, and why: a state file that is not
    JSON, a safetensors file whose header does not parse or whose data is cut short (a crash or a full disk
    while it was written, a bad copy). None when every one reads."""
    import yaml
    from safetensors import safe_open

    state = checkpoint / TRAINER_STATE
    for path in [checkpoint / STATE_FILE, *sorted(state.glob("*.json"))]:
        try:
            json.loads(path.read_text())
        except (OSError, ValueError) as e:
            return path, f"{type(e).__name__}: {e}"
    if (checkpoint / CONFIG_FILE).is_file():  # what check_resume_config compares against
        try:
            yaml.safe_load((checkpoint / CONFIG_FILE).read_text())
        except (OSError, ValueError, yaml.YAMLError) as e:
            return checkpoint / CONFIG_FILE, f"{type(e).__name__}: {' '.join(str(e).split())}"
    for path in sorted(checkpoint.rglob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except Exception as e:  # safetensors raises its own SafetensorError (and OSError) for a damaged file
            return path, f"{type(e).__name__}: {e}"
    return None


def _latest_readable(out: Path, ckpts: list[Path], quiet: bool) -> Path:
    """The newest of ``ckpts`` whose files read, saying which damaged ones it passed over."""
    for i in range(len(ckpts) - 1, -1, -1):
        damage = damaged_file(ckpts[i])
        if damage is None:
            return ckpts[i]
        path, why = damage
        if i == 0:
            raise TrainingError(
                f"training.resume=latest: {path} is damaged ({why}) and {out} has no earlier complete checkpoint "
                "to resume from. Start over there with training.overwrite_output_dir=true and no training.resume, "
                "or choose another output_dir.")
        if not quiet:
            logger.warning(f"{path} is damaged ({why}); resuming from the previous checkpoint, {ckpts[i - 1]}, "
                           "instead.")
    raise AssertionError("unreachable")


def check_output_dir(t: TrainingConfig, *, quiet: bool = False) -> Path | None:
    """Decide where to resume from, refusing to silently overwrite a previous run. ``quiet``: no warnings
    (the early check of :func:`check_run_start`; the run's own check says them)."""
    out = Path(t.output_dir)
    ckpts = list_checkpoints(out)
    if t.resume == "latest":
        if not ckpts:
            if not quiet:
                logger.warning(f"training.resume=latest but {out} has no complete checkpoint; starting from scratch.")
            return None
        return _latest_readable(out, ckpts, quiet)
    if t.resume:
        path = Path(t.resume)
        if not (path / STATE_FILE).is_file():
            raise TrainingError(f"training.resume={t.resume}: not a complete alignkit checkpoint (no {STATE_FILE}).")
        damage = damaged_file(path)
        if damage is not None:
            raise TrainingError(f"training.resume={t.resume}: {damage[0]} is damaged ({damage[1]}); resume from "
                                "an earlier checkpoint of that run instead.")
        return path
    if holds_run(out) and not t.overwrite_output_dir:
        raise TrainingError(
            f"training.output_dir={out} already holds a run. Set training.resume=latest to continue it, "
            "training.overwrite_output_dir=true to start over there, or choose another output_dir."
        )
    return None


# --------------------------------------------------------------------------------------------------
# One run per output folder
# --------------------------------------------------------------------------------------------------

LOCK_FILE = ".alignkit.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _read_lock(lock: Path) -> dict | None:
    """The holder a lock file names, or None when it is empty or unreadable. A lock is created empty and
    written at once, so an empty one is read again after a moment before it counts as broken."""
    import time

    for wait in (0.0, 0.5):
        time.sleep(wait)
        try:
            holder = json.loads(lock.read_text())
        except FileNotFoundError:
            return {}  # released meanwhile: try again to take it
        except (OSError, ValueError):
            continue
        if isinstance(holder, dict) and isinstance(holder.get("pid"), int) and holder.get("host"):
            return holder
    return None


def acquire_run_lock(output_dir: str | Path) -> Path:
    """Take ``output_dir``'s run lock (pid, host, start time) for this process, or raise naming the holder.

    A lock left by a dead process on this host is taken over with a warning; one this process already
    holds (an earlier run in it that raised) is taken over silently.
    """
    import socket
    import time

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    lock = out / LOCK_FILE
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_lock(lock)
            if holder is None:
                raise TrainingError(
                    f"{lock}: the run lock of training.output_dir={out} is empty or unreadable, so it does not say "
                    "which run holds the folder (one killed while taking it, or a full disk). If no run is using "
                    f"{out}, delete {lock} and start again.") from None
            if not holder:
                continue
            pid, host = holder["pid"], holder["host"]
            same_host = host == me["host"]
            if same_host and pid == me["pid"]:
                lock.unlink(missing_ok=True)
                continue
            if same_host and not _alive(pid):
                logger.warning(f"{lock}: taking over the lock of pid {pid} (started {holder.get('started')}), which "
                               "is no longer running.")
                lock.unlink(missing_ok=True)
                continue
            raise TrainingError(
                f"training.output_dir={out} is in use by another run (pid {pid} on host {host}, started "
                f"{holder.get('started')}); two runs there would overwrite each other. Wait for it to end or use "
                f"another output_dir (if that run is gone, delete {lock}).") from None
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
        except BaseException:
            lock.unlink(missing_ok=True)  # never leave an empty lock (a full disk, an interrupt)
            raise
        return lock
    raise TrainingError(f"{lock}: could not take the run lock; delete it if no run is using {out}.")


def release_run_lock(output_dir: str | Path) -> None:
    """Remove ``output_dir``'s run lock if this process holds it."""
    import socket

    lock = Path(output_dir) / LOCK_FILE
    try:
        holder = json.loads(lock.read_text())
        if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            lock.unlink()
    except (OSError, ValueError, AttributeError):
        pass


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def releasing_run_lock(output_dir: str | Path) -> Iterator[None]:
    """Run the block, then remove ``output_dir``'s run lock if this process took it, however the block ends:
    returned, raised (bad data, a NaN stop, a full disk), interrupted, or stopped by SIGTERM (a launcher
    stopping the other processes when one failed), which becomes SystemExit while the block runs."""
    import signal
    import threading

    previous = None
    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:  # never replace a handler someone installed
        previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        yield
    finally:
        release_run_lock(output_dir)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def lock_output_dir(accelerator, output_dir: str | Path) -> None:
    """The main process takes the run lock; every process raises the same error when it cannot."""
    error = [None]
    if accelerator.is_main_process:
        try:
            acquire_run_lock(output_dir)
        except TrainingError as e:
            error = [str(e)]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(error, from_process=0)
    if error[0]:
        raise TrainingError(error[0])


# --------------------------------------------------------------------------------------------------
# Resume: what may change
# --------------------------------------------------------------------------------------------------

# Settings a resumed run may change: when and where it logs, evaluates and saves, how long it runs, and
# speed-only knobs. Everything else decides what the run computes (model, data, batch geometry, optimizer,
# schedule, method), so a resume with it changed would silently mix two runs.
RESUMABLE_TRAINING = {"output_dir", "overwrite_output_dir", "resume", "max_steps", "num_epochs", "logging_steps",
                      "eval_steps", "save_steps", "save_total_limit", "report_to", "wandb_project", "run_name",
                      "max_nonfinite_updates", "dataloader_num_workers", "zero_offload",
                      "fsdp_cpu_offload"}
RESUMABLE_METHOD = {"log_samples", "eval_before", "eval_kl_to_teacher", "generation.batch_size", "generation.share_prefill",
                    "generation.zero3_gather", "generation.vllm_gpu_memory_utilization", "reward.model_batch_size",
                    "reward.url_timeout", "reward.url_retries"}


def _flatten(d: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and k != "columns":
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(saved: dict, current: RunConfig) -> list[str]:
    """``key: old -> new`` for each setting that differs and may not change on resume."""
    old, new = _flatten(saved), _flatten(current.to_dict())
    changes = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) == new.get(key):
            continue
        section, _, rest = key.partition(".")
        if (section == "training" and rest in RESUMABLE_TRAINING) or (section == current.method and rest in
                                                                         RESUMABLE_METHOD):
            continue
        if key == "data.eval" or key.startswith("data.eval."):  # held-out rows do not change training
            continue
        changes.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}")
    return changes


def check_resume_config(checkpoint: Path, cfg: RunConfig) -> None:
    """Refuse to resume ``checkpoint`` with settings that would change what the run computes."""
    import yaml

    saved_file = checkpoint / CONFIG_FILE
    if not saved_file.is_file():
        return
    changes = config_changes(yaml.safe_load(saved_file.read_text()) or {}, cfg)
    if changes:
        raise TrainingError(
            f"cannot resume {checkpoint} with a changed config ({'; '.join(changes)}): these settings decide what "
            "the run computes, and a resumed run must continue the same one. Restore them (only the training "
            "length, logging, eval and save cadence may change), or start a new run from the checkpoint's "
            f"weights: model.name_or_path={checkpoint} with another training.output_dir.")


def check_run_start(cfg: RunConfig, *, quiet: bool = False) -> Path | None:
    """Everything about the output folder a run can be refused for, from the files alone: a run there to
    keep, a checkpoint to resume that is missing or damaged, or one saved with settings that may not change.
    Returns the checkpoint to resume from, or None. Cheap: call it before data and models load."""
    resume_from = check_output_dir(cfg.training, quiet=quiet)
    if resume_from is not None:
        check_resume_config(resume_from, cfg)
    return resume_from


def prepare_output_dir(accelerator, cfg: RunConfig) -> Path | None:
    """The start of every run: take the output folder's run lock, decide where to resume from (refusing to
    overwrite a run or to resume with changed settings), then write the run config. Returns the checkpoint
    to resume from, or None."""
    lock_output_dir(accelerator, cfg.training.output_dir)
    try:
        resume_from = check_run_start(cfg)  # before anything is written
    except TrainingError:
        if accelerator.is_main_process:
            release_run_lock(cfg.training.output_dir)
        raise
    accelerator.wait_for_everyone()  # every process has checked before the main one writes
    out = Path(cfg.training.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / CONFIG_FILE)  # the settings this run applies (a resumed run's allowed changes included)
    return resume_from


# --------------------------------------------------------------------------------------------------
# Trainer state that loads without running code
# --------------------------------------------------------------------------------------------------


def _deepspeed_safe_globals() -> list:
    """The two DeepSpeed classes its optimizer-state files hold besides tensors: an int enum and a plain
    class with attributes; building them runs no code of the file's choosing."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    return [ZeroStageEnum, LossScaler]


def safe_torch_load(path: Path, allowed: list | None = None) -> object:
    """``torch.load`` that only builds tensors, plain containers and the ``allowed`` classes; a file that
    needs anything else (a pickle that could run code) is a TrainingError naming it."""
    try:
        with torch.serialization.safe_globals(allowed or []):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError (and others) for anything outside its allowlist
        raise TrainingError(
            f"{path}: refusing to load it: it holds objects other than tensors and plain data, which loading would "
            f"create by running code from the file ({type(e).__name__}: {str(e).splitlines()[0][:200]}). Use "
            "checkpoints written by alignkit, or start a new run from the checkpoint's model folder "
            "(model.name_or_path=<checkpoint-N>).") from None


def _rng_state() -> dict:
    import numpy as np

    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss], "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: dict) -> None:
    import numpy as np

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _trained_tensors(model: torch.nn.Module, trainable_only: bool,
                     full: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The state dict (or only the parameters that train), by name; tensors sharing storage saved once.
    ``full``: the state dict gathered from FSDP2 shards (one copy per name), to pick from instead."""
    from alignkit.models import unwrap_model

    inner = unwrap_model(model)
    if trainable_only:
        named = [(n, p) for n, p in inner.named_parameters() if p.requires_grad]
        if full is not None:
            named = [(n, full[n]) for n, _ in named if n in full]
    else:
        named = list((full if full is not None else inner.state_dict(keep_vars=True)).items())
    out, seen = {}, set()
    for name, t in named:
        key = (t.data_ptr(), tuple(t.shape), t.dtype)
        if t.numel() and key in seen:  # tied weights: one copy (they are one parameter again after loading)
            continue
        seen.add(key)
        out[name] = t.detach().contiguous().cpu()
    return out


def save_trainer_state(accelerator, model, optimizer, scheduler, folder: Path, *, trainable_only: bool) -> None:
    """Everything resume needs besides the step counters, in formats that load without running code.
    Every process must call it."""
    from safetensors.torch import save_file

    acc = accelerator
    if acc.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
    acc.wait_for_everyone()
    if is_deepspeed(acc):  # a collective: partitioned weights and optimizer, one file per rank
        model.save_checkpoint(str(folder / "deepspeed"), tag="state", save_latest=False,
                              exclude_frozen_parameters=trainable_only)
    elif is_fsdp2(acc):  # a collective: the shards gathered into full tensors on the main process
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        # copies: on CPU the gathered tensors may share storage with FSDP's own (see full_state_dict), and
        # tied weights become one tensor per name, as loading by name wants them
        weights = {k: v.clone() for k, v in get_model_state_dict(model, options=options).items()}
        optim = get_optimizer_state_dict(model, optimizer, options=options)
        if acc.is_main_process:
            save_file(_trained_tensors(model, trainable_only, full=weights), str(folder / "model.safetensors"))
            torch.save(optim, folder / "optimizer.pt")
            (folder / FSDP_MARK).write_text(json.dumps({"fsdp": acc.state.fsdp_plugin.reshard_after_forward,
                                                       "processes": acc.num_processes}))
    elif acc.is_main_process:
        save_file(_trained_tensors(model, trainable_only), str(folder / "model.safetensors"))
        torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    if acc.is_main_process:
        (folder / "scheduler.json").write_text(json.dumps(scheduler.state_dict()))
        if acc.scaler is not None:
            (folder / "scaler.json").write_text(json.dumps(acc.scaler.state_dict()))
    (folder / f"rng_state_{acc.process_index}.json").write_text(json.dumps(_rng_state()))
    acc.wait_for_everyone()


FSDP_MARK = "fsdp.json"  # in trainer_state/ of a checkpoint written under FSDP2


def _check_keys(folder: Path, missing: list[str], unexpected: list[str]) -> None:
    if missing or unexpected:
        raise TrainingError(f"{folder}/model.safetensors does not match this model (missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}): the checkpoint is of another model or "
                            "finetune mode; start a new run instead.")


def _load_fsdp2(model, optimizer, tensors: dict[str, torch.Tensor], optim: dict, folder: Path, *,
                trainable_only: bool) -> None:
    """Full tensors by name into an FSDP2 model and optimizer: each process keeps its own shard. A collective."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    trained = {n for n, p in model.named_parameters() if p.requires_grad or not trainable_only}
    known = set(model.state_dict())
    _check_keys(folder, sorted(trained - set(tensors)), sorted(set(tensors) - known))
    set_model_state_dict(model, tensors, options=StateDictOptions(full_state_dict=True, strict=not trainable_only))
    set_optimizer_state_dict(model, optimizer, optim, options=StateDictOptions(full_state_dict=True))


def load_trainer_state(accelerator, model, optimizer, scheduler, folder: Path, *, trainable_only: bool) -> None:
    """The inverse of :func:`save_trainer_state`; refuses files that would run code when loaded."""
    from safetensors.torch import load_file

    from alignkit.models import unwrap_model

    acc = accelerator
    pickled = sorted(p.name for p in folder.glob("*") if p.suffix in _PICKLED)
    if pickled:
        raise TrainingError(
            f"{folder} holds {', '.join(pickled)}: trainer state in a format that runs code when loaded (pickle, "
            "written by alignkit before 0.2); alignkit no longer loads it. Start a new run from the checkpoint's "
            f"model folder instead (model.name_or_path={folder.parent}).")
    if is_deepspeed(acc):
        ds = folder / "deepspeed"
        if not ds.is_dir():
            raise TrainingError(f"{folder}: no DeepSpeed state; this checkpoint was written without DeepSpeed. "
                                "Resume it without training.deepspeed, or start a new run from its model folder.")
        allowed = _deepspeed_safe_globals()
        for path in sorted(ds.rglob("*.pt")):
            safe_torch_load(path, allowed)  # raises before DeepSpeed unpickles anything that is not plain data
        model.load_checkpoint(str(ds), tag="state", load_module_strict=not trainable_only,
                              load_optimizer_states=True, load_lr_scheduler_states=False)
    else:
        if (folder / "deepspeed").is_dir():
            raise TrainingError(f"{folder}: written under DeepSpeed; resume it with the same training.deepspeed.")
        if is_fsdp2(acc) != (folder / FSDP_MARK).is_file():
            raise TrainingError(f"{folder}: written {'without' if is_fsdp2(acc) else 'under'} FSDP2; resume it with "
                                "the same training.fsdp as the run that wrote it, or start a new run from its model "
                                f"folder (model.name_or_path={folder.parent}).")
        try:
            tensors = load_file(str(folder / "model.safetensors"))
        except Exception as e:  # SafetensorError: a damaged file that damaged_file() did not catch up front
            raise TrainingError(f"{folder / 'model.safetensors'} is damaged ({type(e).__name__}: {e}); resume from "
                                "an earlier checkpoint of that run (training.resume=<checkpoint-N>).") from None
        inner = unwrap_model(model)
        if is_fsdp2(acc):
            _load_fsdp2(model, optimizer, tensors, safe_torch_load(folder / "optimizer.pt"), folder,
                        trainable_only=trainable_only)
        else:
            result = inner.load_state_dict(tensors, strict=False)
            expected = _trained_tensors(model, trainable_only).keys()
            _check_keys(folder, [k for k in result.missing_keys if k in expected], result.unexpected_keys)
            optimizer.load_state_dict(safe_torch_load(folder / "optimizer.pt"))
    scheduler.load_state_dict(json.loads((folder / "scheduler.json").read_text()))
    if acc.scaler is not None and (folder / "scaler.json").is_file():
        acc.scaler.load_state_dict(json.loads((folder / "scaler.json").read_text()))
    rng_file = folder / f"rng_state_{acc.process_index}.json"
    if rng_file.is_file():
        _set_rng_state(json.loads(rng_file.read_text()))


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------


def _is_no_space(e: BaseException) -> bool:
    # torch's zip writer reports a full disk as a RuntimeError ("enforce fail at inline_container.cc")
    text = str(e)
    return (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left" in text or (
        isinstance(e, RuntimeError) and ("inline_container" in text or "PytorchStreamWriter failed" in text))


@contextlib.contextmanager
def no_space_error(partial: Path, doing: str) -> Iterator[None]:
    """A full disk inside the block: remove the partial folder (it holds the space) and raise one clear line."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        if not _is_no_space(e):
            raise
        shutil.rmtree(partial, ignore_errors=True)
        kept = list_checkpoints(partial.parent)
        last = f"the last good checkpoint is {kept[-1]}" if kept else "no complete checkpoint was written before"
        raise TrainingError(
            f"no space left on {partial.parent} while {doing}; removed the partial {partial.name} and {last}. Free "
            "space, lower training.save_total_limit, or point training.output_dir at a larger disk.") from None


def full_state_dict(accelerator, model) -> dict[str, torch.Tensor]:
    """The whole state dict of a ZeRO-3 or FSDP2 model on the main process (empty on the others). A collective.

    On CPU, FSDP2's gathered tensors can share storage with its own buffers, which it frees when it reshards:
    they are copied."""
    state_dict = accelerator.get_state_dict(model)
    if is_fsdp2(accelerator) and accelerator.device.type == "cpu":
        state_dict = {k: v.clone() for k, v in state_dict.items()}
    return state_dict


class Checkpointer:
    """Atomic checkpoints: write ``.tmp-checkpoint-N``, then rename to ``checkpoint-N``.

    ``method_state``: an object with ``state_dict()`` / ``load_state_dict()`` (JSON-able) that the method
    needs to resume exactly (a KL controller, an RNG), or None.
    """

    def __init__(self, accelerator, model, optimizer, scheduler, tokenizer, cfg: RunConfig, method_state=None):
        from alignkit.models import is_peft_model

        self.accelerator, self.model, self.tokenizer, self.cfg = accelerator, model, tokenizer, cfg
        self.optimizer, self.scheduler, self.method_state = optimizer, scheduler, method_state
        self.out = Path(cfg.training.output_dir)
        # frozen base weights are in the base model already: save only what training changes
        self.trainable_only = is_peft_model(model)

    def save_model(self, path: Path) -> None:
        """A normal HF folder (model or adapter + tokenizer + config), from every process (ZeRO-3 and FSDP2
        gather the full weights to the main process)."""
        from alignkit.models import save_model

        acc = self.accelerator
        state_dict = full_state_dict(acc, self.model) if zero_stage(acc) == 3 or is_fsdp2(acc) else None
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
        with no_space_error(tmp, f"writing {final.name}"):
            self.save_model(tmp)
            save_trainer_state(acc, self.model, self.optimizer, self.scheduler, tmp / TRAINER_STATE,
                               trainable_only=self.trainable_only)
            if acc.is_main_process:
                method_state = self.method_state.state_dict() if self.method_state is not None else {}
                payload = {"train_state": asdict(state), "method_state": method_state}
                (tmp / STATE_FILE).write_text(json.dumps(payload, indent=1))
        if acc.is_main_process:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._rotate(state.step)
        acc.wait_for_everyone()
        return final

    def _rotate(self, step: int) -> None:
        """Keep the newest ``save_total_limit`` checkpoints up to ``step``, the one just written. Later ones
        (left by a run resumed from an earlier checkpoint, e.g. past a damaged one) are not newer: they are
        replaced when the run reaches their step, and never crowd out the checkpoint just written."""
        limit = self.cfg.training.save_total_limit
        if limit is None or limit < 1:
            return
        upto = [c for c in list_checkpoints(self.out) if int(c.name.split("-")[-1]) <= step]
        for old in upto[:-limit]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, path: Path) -> TrainState:
        payload = json.loads((path / STATE_FILE).read_text())
        load_trainer_state(self.accelerator, self.model, self.optimizer, self.scheduler, path / TRAINER_STATE,
                           trainable_only=self.trainable_only)
        if self.method_state is not None:
            self.method_state.load_state_dict(payload.get("method_state", {}))
        return TrainState(**payload["train_state"])
