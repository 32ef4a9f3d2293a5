"""Output folders and checkpoints: the start-of-run check, atomic checkpoints, rotation, exact resume.

A checkpoint ``checkpoint-N`` holds the model as a normal HF folder, the accelerate trainer state
(optimizer, scheduler, RNG) under ``trainer_state/`` and ``alignkit_state.json`` (step counters and the
method's state). It is written as ``.tmp-checkpoint-N`` and renamed when complete, and the state file is
written last, so a folder named ``checkpoint-N`` with a state file is always whole.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from alignkit.config import RunConfig, TrainingConfig
from alignkit.errors import TrainingError
from alignkit.training.accelerator import zero_stage

logger = logging.getLogger("alignkit")

STATE_FILE = "alignkit_state.json"  # written last: its presence marks a complete checkpoint
CONFIG_FILE = "alignkit_config.yaml"


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


def prepare_output_dir(accelerator, cfg: RunConfig) -> Path | None:
    """The start of every run: decide where to resume from (refusing to overwrite a run) on every process,
    then write the run config. Returns the checkpoint to resume from, or None."""
    resume_from = check_output_dir(cfg.training)  # before anything is written
    accelerator.wait_for_everyone()  # every process has checked before the main one writes
    out = Path(cfg.training.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / CONFIG_FILE)
    return resume_from


class Checkpointer:
    """Atomic checkpoints: write ``.tmp-checkpoint-N``, then rename to ``checkpoint-N``.

    ``method_state``: an object with ``state_dict()`` / ``load_state_dict()`` (JSON-able) that the method
    needs to resume exactly (a KL controller, an RNG), or None.
    """

    def __init__(self, accelerator, model, tokenizer, cfg: RunConfig, method_state=None):
        from alignkit.models import is_peft_model

        self.accelerator, self.model, self.tokenizer, self.cfg = accelerator, model, tokenizer, cfg
        self.method_state = method_state
        self.out = Path(cfg.training.output_dir)
        self.peft = is_peft_model(model)
        if self.peft:
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
            method_state = self.method_state.state_dict() if self.method_state is not None else {}
            payload = {"train_state": asdict(state), "method_state": method_state}
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
        if self.method_state is not None:
            self.method_state.load_state_dict(payload.get("method_state", {}))
        return TrainState(**payload["train_state"])
