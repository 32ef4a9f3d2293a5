"""Python API: the same config objects as the CLI, one call to train.

    import alignkit
    cfg = alignkit.load_config("sft", "my.yaml", overrides=["training.max_steps=10"])
    result = alignkit.train(cfg)          # returns {"output_dir", "train", "eval", ...}
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from alignkit.config import RunConfig, build_config, load_config


def setup_logging(level: int = logging.INFO) -> None:
    import os

    log = logging.getLogger("alignkit")
    if log.handlers:
        return
    handler = logging.StreamHandler()
    rank = os.environ.get("RANK")
    prefix = f"[alignkit rank {rank}]" if rank not in (None, "0") else "[alignkit]"
    handler.setFormatter(logging.Formatter(f"{prefix} %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(level if rank in (None, "0") else logging.WARNING)
    log.propagate = False


def train(config: RunConfig | str, path: str | Path | None = None, overrides: list[str] | None = None,
          **sections: dict[str, Any]) -> dict:
    """Train with a RunConfig, or build one: ``train("sft", "cfg.yaml", ["training.lr=1e-5"])`` or
    ``train("sft", model={...}, data={...}, training={...})``. Returns the run summary."""
    from alignkit.methods import get_runner

    setup_logging()
    if isinstance(config, str):
        if sections:
            config = build_config(config, sections, overrides)
        else:
            config = load_config(config, path, overrides)
    return get_runner(config.method)(config)
