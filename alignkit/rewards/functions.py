"""Python reward functions: ``fn(prompts, completions, **row_fields) -> list[float]``."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from alignkit.config import ConfigError
from alignkit.rewards.inputs import RewardInputs, as_scores


def load_function(spec: str) -> Callable:
    """The function named by ``"package.module:function"`` or ``"path/to/file.py:function"``."""
    if ":" not in spec:
        raise ConfigError(f"reward function {spec!r}: write it as module:function (e.g. my_rewards:accuracy) "
                          "or path/to/file.py:function.")
    target, fn_name = spec.rsplit(":", 1)
    if target.endswith(".py"):
        path = Path(target).expanduser()
        if not path.is_file():
            raise ConfigError(f"reward function {spec!r}: no such file {path}.")
        module_name = f"alignkit_reward_{path.stem}_{abs(hash(str(path.resolve())))}"
        module = sys.modules.get(module_name)
        if module is None:
            module_spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_name] = module
            try:
                module_spec.loader.exec_module(module)
            except Exception:
                del sys.modules[module_name]
                raise
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise ConfigError(f"reward function {spec!r}: cannot import module {target!r} ({e}); is it on "
                              "PYTHONPATH? A file works too: path/to/file.py:function.") from e
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ConfigError(f"reward function {spec!r}: {target} has no function {fn_name!r}.")
    return fn


def required_columns(fn: Callable) -> list[str]:
    """The dataset columns ``fn(prompts, completions, ...)`` cannot be called without: its parameters after the
    first two that have no default (a function reaches ``row_fields`` only through them or ``**kwargs``)."""
    params = list(inspect.signature(fn).parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    rest = [p for p in params if p not in positional[:2]]
    return [p.name for p in rest if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


class FunctionReward:
    """``fn(prompts: list[str], completions: list[str], **row_fields) -> list[float]``, batched.

    ``prompts`` are plain texts (chat prompts: message contents joined by blank lines), one per
    completion; ``row_fields`` are the other dataset columns as lists aligned with the completions (e.g.
    ``answer`` for a math verifier). A function without ``**kwargs`` gets only the columns it names.
    Returns must be one finite number per completion.
    """

    def __init__(self, fn: str | Callable, name: str | None = None):
        self.spec = fn if isinstance(fn, str) else f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__name__', fn)}"
        self.fn = load_function(fn) if isinstance(fn, str) else fn
        self.name = name or getattr(self.fn, "__name__", "function")
        params = inspect.signature(self.fn).parameters.values()
        self._takes_all = any(p.kind is p.VAR_KEYWORD for p in params)
        self._named = {p.name for p in params}
        self.required = required_columns(self.fn)

    def __call__(self, inputs: RewardInputs) -> torch.Tensor:
        fields = inputs.row_fields if self._takes_all else {
            k: v for k, v in inputs.row_fields.items() if k in self._named}
        values = self.fn(inputs.prompt_texts, list(inputs.completions), **fields)
        return as_scores(values, len(inputs), f"reward function {self.spec}")


def target_token_share(prompts: list[str], completions: list[str], target: str = "good", **_: Any) -> list[float]:
    """Share of the words of each completion equal to ``target`` (case-insensitive), in [0, 1]; 0 when empty.

    A reward a tiny model can learn in a few steps: tests and demos.
    """
    import re

    target = target.lower()
    out = []
    for text in completions:
        words = re.findall(r"[a-z0-9']+", text.lower())
        out.append(sum(w == target for w in words) / len(words) if words else 0.0)
    return out
