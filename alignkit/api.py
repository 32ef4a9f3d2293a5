"""Python API: the same config objects as the CLI, one call to train.

    import alignkit
    cfg = alignkit.load_config("sft", "my.yaml", overrides=["training.max_steps=10"])
    result = alignkit.train(cfg)          # returns {"output_dir", "train", "eval", ...}
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from alignkit import config
from alignkit.config import RunConfig
from alignkit.methods import config_class, runner


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is logged, not the stream of the moment the handler
    was made (a replaced stderr, such as a progress bar's or a test's capture, may be closed by then)."""

    @property
    def stream(self):
        import sys

        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(level: int = logging.INFO) -> None:
    import os

    log = logging.getLogger("alignkit")
    if log.handlers:
        return
    handler = _CurrentStderr()
    rank = os.environ.get("RANK")
    prefix = f"[alignkit rank {rank}]" if rank not in (None, "0") else "[alignkit]"
    handler.setFormatter(logging.Formatter(f"{prefix} %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(level if rank in (None, "0") else logging.WARNING)
    log.propagate = False


def build_config(method: str, raw: dict[str, Any] | None = None, overrides: list[str] | None = None) -> RunConfig:
    """A validated RunConfig for ``method`` from a plain dict (YAML sections) and ``section.key=value`` overrides."""
    return config.build_config(method, config_class(method), raw, overrides)


def load_config(method: str, path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML config file (optional) for ``method`` and apply ``--set`` style overrides."""
    cls = config_class(method)  # an unknown method fails before the file is read
    raw = config.read_yaml(path, method) if path is not None else {}
    return config.build_config(method, cls, raw, overrides)


def train(run_config: RunConfig | str, path: str | Path | None = None, overrides: list[str] | None = None,
          **sections: dict[str, Any]) -> dict:
    """Train with a RunConfig, or build one: ``train("sft", "cfg.yaml", ["training.lr=1e-5"])`` or
    ``train("sft", model={...}, data={...}, training={...})``. Returns the run summary."""
    setup_logging()
    if isinstance(run_config, str):
        if sections:
            run_config = build_config(run_config, sections, overrides)
        else:
            run_config = load_config(run_config, path, overrides)
    from alignkit.training.checkpoint import check_run_start, releasing_run_lock  # torch: only when training

    # a run to keep there, a damaged or changed checkpoint to resume: refused before data and models load
    check_run_start(run_config, quiet=True)
    with releasing_run_lock(run_config.training.output_dir):  # on every exit, errors included
        return _with_summary_file(runner(run_config.method)(run_config), run_config.method)


def _with_summary_file(result: dict, method: str) -> dict:
    """``result`` (with its method), written in full to ``output_dir/summary.json`` by the main process."""
    from accelerate import PartialState

    from alignkit.training.summary import write_summary

    result.setdefault("method", method)
    if PartialState().is_main_process:
        write_summary(result)
    return result
