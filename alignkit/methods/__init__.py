"""Method registry: each method module registers its config section and its ``run`` recipe.

A method module defines
- a config dataclass decorated with ``@register_method_config("name")`` (its YAML section), and
- ``run(cfg: RunConfig) -> dict``: the recipe, readable top to bottom. Offline methods build a
  :class:`alignkit.engine.OfflineMethod` and hand it to :func:`alignkit.engine.fit`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

# method name -> module that implements it
METHOD_MODULES: dict[str, str] = {
    "sft": "alignkit.methods.sft",
    "rm": "alignkit.methods.reward",
    "dpo": "alignkit.methods.preference",
    "simpo": "alignkit.methods.preference",
    "cpo": "alignkit.methods.preference",
    "orpo": "alignkit.methods.preference",
    "kto": "alignkit.methods.kto",
    "ppo": "alignkit.methods.ppo",
    "rloo": "alignkit.methods.pg",
    "grpo": "alignkit.methods.pg",
    "reinforce_pp": "alignkit.methods.pg",
    "kd": "alignkit.methods.distill",
    "seqkd": "alignkit.methods.distill",
    "gkd": "alignkit.methods.distill",
    "rejection_sampling": "alignkit.methods.rejection_sampling",
}


def load_all() -> None:
    for module in list(METHOD_MODULES.values()):
        importlib.import_module(module)


def get_runner(method: str) -> Callable[[Any], dict]:
    from alignkit.config import method_config_class

    method_config_class(method)  # validates the name with a suggestion
    return importlib.import_module(METHOD_MODULES[method]).run


load_all()
