"""Environments for multi-turn rollouts: what the policy talks to between its turns.

The contract (one object per episode, made by a factory ``make_env(row) -> Environment``)::

    env.tools                      -> list of JSON tool schemas (or None): given to the chat template's ``tools``
    env.reset(row)                 -> the episode's first messages (None: the row's ``prompt`` messages)
    env.step(message)              -> StepResult(messages, reward, done)

``message`` is the assistant's turn as a chat message: ``{"role": "assistant", "content": str}`` plus
``"tool_calls"`` (``[{"type": "function", "function": {"name", "arguments"}}]``) when it called tools, or
``"tool_call_error"`` (a one-line reason) when it wrote a tool call that could not be parsed. The
environment answers with the messages that follow (tool results, a user's reply; rendered by the chat
template and appended as tokens the policy is not trained on), a reward for this turn (the episode's
reward is the sum) and whether the episode is over. Exceptions raised by ``reset``/``step`` are bugs of the
environment and stop the run; errors a policy can cause (a malformed call, an unknown tool, a tool that
raises) are answered as tool messages and counted in the rollout's metrics.

:class:`ToolEnvironment` turns Python functions into such an environment (functions as tools, a reward
function for the final answer); :func:`load_environment` loads a factory from ``file.py:make_env`` or
``module:make_env`` as reward functions are loaded.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from alignkit.errors import AlignkitError
from alignkit.rollout.env_contract import AgentEnvironmentError, Environment, StepResult
from alignkit.rollout.env_openenv import load_openenv
from alignkit.rollout.env_verifiers import load_verifiers

__all__ = ["AgentEnvironmentError", "Environment", "StepResult", "ToolEnvironment", "load_environment",
           "make_episode_env", "parse_assistant_turn", "tool_schema"]


# --------------------------------------------------------------------------------------------------
# Tool calls in the model's format
# --------------------------------------------------------------------------------------------------

# The Hermes/Qwen/SmolLM format, ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, as a transformers
# response template: used when the tokenizer has no ``response_template`` of its own.
HERMES_RESPONSE_TEMPLATE = {
    "start_anchor": "<|im_start|>assistant\n",
    "defaults": {"role": "assistant"},
    "fields": {
        "content": {"content": "text"},
        "tool_calls": {"open": "<tool_call>", "close": "</tool_call>", "content": "json", "repeats": True,
                       "transform": {"type": "function", "function": "{content}"}},
    },
}


def parse_assistant_turn(tokenizer, text: str, tools: Sequence[dict] | None = None) -> dict:
    """The assistant message of one sampled turn (its text without the end-of-turn token).

    Tool calls are parsed by transformers' ``tokenizer.parse_response`` with the tokenizer's own
    ``response_template``, else :data:`HERMES_RESPONSE_TEMPLATE`; the text before the first call is the
    content. A call that cannot be parsed (bad JSON, no name, arguments not an object) gives a message with
    ``tool_call_error`` and no ``tool_calls`` instead of an exception. A JSON list of calls inside one
    ``<tool_call>`` tag (the smol-tools prompt of SmolLM2) is several calls.
    """
    message: dict[str, Any] = {"role": "assistant", "content": text}
    schema = getattr(tokenizer, "response_template", None) or HERMES_RESPONSE_TEMPLATE
    if schema is HERMES_RESPONSE_TEMPLATE and "<tool_call>" not in text:
        return message
    try:
        parsed = tokenizer.parse_response(text, schema, prefix="", tools=list(tools) if tools else None)
    except Exception as e:  # transformers raises ValueError/KeyError for malformed regions
        message["tool_call_error"] = f"malformed tool call ({str(e).splitlines()[0]})"
        return message
    calls = []
    for call in parsed.get("tool_calls") or []:
        inner = call.get("function") if isinstance(call, dict) else None
        # smol-tools' prompt (SmolLM2) asks for a JSON list of calls inside one <tool_call> tag: several calls
        calls.extend(inner if isinstance(inner, list) else [call])
    for call in calls:
        fn = call.get("function", call) if isinstance(call, dict) else None
        args = fn.get("arguments", {}) if isinstance(fn, dict) else None
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                args = None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(args, dict):
            message["tool_call_error"] = f"malformed tool call {json.dumps(call)[:200]}: needs a name and an " \
                                         "arguments object"
            return message
        fn["arguments"] = args
    if calls:
        message["content"] = text.split("<tool_call>", 1)[0].strip() if schema is HERMES_RESPONSE_TEMPLATE \
            else (parsed.get("content") or "")
        message["tool_calls"] = [{"type": "function", "function": c.get("function", c)} for c in calls]
    return message


# --------------------------------------------------------------------------------------------------
# Python functions as tools
# --------------------------------------------------------------------------------------------------


def tool_schema(fn: Callable) -> dict:
    """The JSON schema of a Python tool (transformers' ``get_json_schema``: type hints and a Google-style
    docstring with an ``Args:`` section); a clear error when the function cannot be described."""
    from transformers.utils import get_json_schema

    try:
        return get_json_schema(fn)
    except Exception as e:
        raise AgentEnvironmentError(f"tool {getattr(fn, '__name__', fn)!r} cannot be described to the model ({e}); give "
                                "it type hints and a docstring with an Args: section.") from e


class ToolEnvironment:
    """An episode where the policy may call Python functions before it answers.

    - A turn with tool calls: each call runs (``fn(**arguments)``) and its result (``str``; dicts and lists
      as JSON) comes back as a ``{"role": "tool", "name": ..., "content": ...}`` message; the episode goes
      on. An unknown tool, wrong arguments, an exception inside the tool or a malformed call are answered
      as a tool message starting ``error:`` and counted (``info["tool_errors"]``).
    - A turn without tool calls is the answer: ``reward(row, messages)`` scores the whole conversation and
      the episode ends.

    ``prompt(row)`` may give the first messages (default: the row's ``prompt``, a list of messages or a
    string as one user message).
    """

    def __init__(self, tools: Sequence[Callable], reward: Callable[[Mapping, list[dict]], float], *,
                 prompt: Callable[[Mapping], list[dict]] | None = None):
        self.functions = {fn.__name__: fn for fn in tools}
        self.tools = [tool_schema(fn) for fn in tools] or None
        self.reward_fn, self.prompt_fn = reward, prompt
        self.row: Mapping[str, Any] = {}
        self.messages: list[dict] = []

    def reset(self, row: Mapping[str, Any]) -> list[dict]:
        self.row = row
        if self.prompt_fn is not None:
            self.messages = list(self.prompt_fn(row))
        else:
            prompt = row["prompt"]
            self.messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        return list(self.messages)

    def step(self, message: dict) -> StepResult:
        self.messages.append(message)
        if "tool_call_error" in message:
            reply = {"role": "tool", "name": "error", "content": f"error: {message['tool_call_error']}"}
            self.messages.append(reply)
            return StepResult([reply], info={"tool_errors": 1})
        calls = message.get("tool_calls") or []
        if not calls:
            return StepResult(reward=float(self.reward_fn(self.row, self.messages)), done=True)
        replies, errors = [], 0
        for call in calls:
            name, args = call["function"]["name"], call["function"]["arguments"]
            fn = self.functions.get(name)
            if fn is None:
                content, errors = f"error: no tool named {name!r} (tools: {', '.join(self.functions)})", errors + 1
            else:
                try:
                    result = fn(**args)
                    content = result if isinstance(result, str) else json.dumps(result)
                except Exception as e:  # the policy's arguments made the tool fail: tell it, count it
                    content, errors = f"error: {type(e).__name__}: {e}", errors + 1
            replies.append({"role": "tool", "name": name, "content": content})
        self.messages += replies
        return StepResult(replies, info={"tool_errors": errors, "tool_calls": len(calls)})


# --------------------------------------------------------------------------------------------------
# Loading a factory from a user file
# --------------------------------------------------------------------------------------------------


# ``<library>:<target>`` specs: environments of other libraries through an adapter (docs/agents.md)
LIBRARIES = {"verifiers": load_verifiers, "openenv": load_openenv}


def load_environment(spec: str) -> Callable[[Mapping[str, Any]], Environment]:
    """The environment factory named by ``spec``: a callable ``make_env(row) -> Environment`` (a fresh object per
    episode; the row is also given to ``reset``).

    - ``"file.py:make_env"`` or ``"package.module:make_env"``: a factory of alignkit environments;
    - ``"verifiers:<env id>"`` or ``"verifiers:<file.py or module>:<function>"``: a verifiers environment
      (:mod:`alignkit.rollout.env_verifiers`, extra ``alignkit[verifiers]``);
    - ``"openenv:<file.py or module>:<Name>"`` or ``"openenv:<server url>"``: an OpenEnv environment
      (:mod:`alignkit.rollout.env_openenv`, extra ``alignkit[openenv]``).
    """
    from alignkit.rewards.functions import load_function

    library, sep, target = spec.partition(":")
    if sep and library in LIBRARIES:
        if not target:
            raise AgentEnvironmentError(f"environment {spec!r}: name the {library} environment after '{library}:' "
                                        "(docs/agents.md, Environment libraries).")
        return LIBRARIES[library](target)

    try:
        factory = load_function(spec)
    except AlignkitError as e:
        raise AgentEnvironmentError(str(e).replace("reward function", "environment", 1)) from e
    return factory


def make_episode_env(factory: Callable, row: Mapping[str, Any], where: str = "environment") -> Environment:
    """``factory(row)``, checked against the contract (a clear error naming ``where`` when it is not)."""
    env = factory(row)
    if not (callable(getattr(env, "reset", None)) and callable(getattr(env, "step", None))):
        raise AgentEnvironmentError(f"{where}: the factory returned {type(env).__name__}, which has no reset(row) and "
                                "step(message) methods; return an Environment (e.g. alignkit.rollout.environment."
                                "ToolEnvironment).")
    return env
