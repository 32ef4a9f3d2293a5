"""The environment contract's types (documented in :mod:`alignkit.rollout.environment`), on their own so the
adapters for environment libraries (:mod:`alignkit.rollout.env_verifiers`, :mod:`alignkit.rollout.env_openenv`)
can use them without importing the module that loads them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from alignkit.errors import AlignkitError


class AgentEnvironmentError(AlignkitError):
    """An environment (or its factory) broke the contract; the message names it and the fix."""


@dataclass
class StepResult:
    """What an environment answers to one assistant turn."""

    messages: list[dict] = field(default_factory=list)  # tool results / user replies, appended after the turn
    reward: float = 0.0  # this turn's reward; the episode's reward is the sum over its turns
    done: bool = False  # the episode is over (no further assistant turn)
    info: dict = field(default_factory=dict)  # counters for the metrics, e.g. {"tool_errors": 1}


@runtime_checkable
class Environment(Protocol):
    """One episode's environment (module docstring of :mod:`alignkit.rollout.environment`)."""

    tools: list[dict] | None

    def reset(self, row: Mapping[str, Any]) -> list[dict] | None: ...

    def step(self, message: dict) -> StepResult: ...


def missing_library(library: str, extra: str, error: ImportError) -> AgentEnvironmentError:
    """The one-line error for an environment spec whose library is not installed."""
    return AgentEnvironmentError(f"environment '{library}:...' needs the {library} package, which is not installed "
                                 f"({error}); install it with: pip install 'alignkit[{extra}]'")
