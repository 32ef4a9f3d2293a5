"""OpenEnv environments (the environments TRL trains with) as alignkit environments.

Two spellings for ``environment.factory``:

- ``"openenv:<file.py or module>:<Name>"``: ``Name`` is an OpenEnv ``Environment`` class, run in this process, one
  instance per episode; or a function returning an ``Environment`` instance or an OpenEnv client (an
  ``EnvClient`` such as ``EchoEnv(base_url=...)``), called once per episode;
- ``"openenv:<url>"`` (``http(s)://`` or ``ws(s)://``): a running OpenEnv server (``openenv serve``, a Docker image,
  a Space), one session per episode through OpenEnv's ``GenericEnvClient`` (no environment package needed).

Driven through OpenEnv's own ``reset``/``step`` API; the policy's turns are sampled by alignkit (token-in/token-out)
and reach the environment as actions:

- an MCP environment (``MCPEnvironment``, or a server whose action is ``CallToolAction``): its tools
  (``ListToolsAction``) are the episode's tools; each tool call is a ``CallToolAction`` and its result the tool
  message;
- any other environment: its action type is one tool, named after the action class (``EchoAction`` -> ``echo``)
  with the action's fields as parameters; the observation's fields are the tool message.

A turn without a tool call ends the episode (as OpenEnv's ``MCPHarnessAdapter`` does), so does an observation
with ``done``. Rewards are the environment's: each observation's ``reward`` ("reward signal from the last action")
counts for the turn that caused it, and the episode's reward is their sum (an environment that rewards only at the
end, as OpenEnv's tool environments do, gives that reward; ``None`` counts as 0). Rows may
carry ``reset_kwargs`` (a dict) for ``reset`` (e.g. ``{"split": "train", "index": 12}`` for a task provider); the
row's ``prompt`` starts the conversation, and the reset observation's content, when it has any, is appended to its
last user message (as TRL appends what ``reset`` returns).
"""

from __future__ import annotations

import inspect
import json
import re
import typing
from collections.abc import Callable, Mapping
from typing import Any

from alignkit.errors import AlignkitError
from alignkit.rollout.env_contract import AgentEnvironmentError, StepResult, missing_library

URL_SCHEMES = ("http://", "https://", "ws://", "wss://")
OBSERVATION_BOOKKEEPING = ("done", "reward", "metadata")


def _import_openenv():
    try:
        from openenv.core import env_server
        from openenv.core.env_client import EnvClient
        from openenv.core.generic_client import GenericEnvClient
    except ImportError as e:
        raise missing_library("openenv", "openenv", e) from e
    return env_server, EnvClient, GenericEnvClient


def load_openenv(target: str) -> Callable[[Mapping[str, Any]], OpenEnvEpisode]:
    """The alignkit factory for ``"openenv:<target>"`` (module docstring)."""
    env_server, EnvClient, GenericEnvClient = _import_openenv()
    where = f"environment 'openenv:{target}'"
    if target.startswith(URL_SCHEMES):
        base_url = target.rstrip("/")
        return lambda row: OpenEnvEpisode(_Client(GenericEnvClient(base_url=base_url), where), where)

    from alignkit.rewards.functions import load_function

    try:
        make = load_function(target)
    except AlignkitError as e:
        raise AgentEnvironmentError(str(e).replace(f"reward function {target!r}", where, 1)) from e

    def factory(row):
        made = make()
        if isinstance(made, env_server.Environment):
            return OpenEnvEpisode(_InProcess(made), where)
        if isinstance(made, EnvClient) or hasattr(made, "async_client"):  # a client, or its .sync() wrapper
            return OpenEnvEpisode(_Client(made, where), where)
        raise AgentEnvironmentError(f"{where}: {target} gave {type(made).__name__}, not an OpenEnv Environment or "
                                    "client; name an Environment class or a function returning one (or a client).")

    return factory


# --------------------------------------------------------------------------------------------------
# Where the environment runs: in this process, or behind a client
# --------------------------------------------------------------------------------------------------


def _action_class(cls: type, base: type) -> type | None:
    """The action type ``A`` of ``cls(base[A, O, S])`` (Environment or EnvClient), else the annotation of
    ``step``'s ``action`` parameter."""
    from openenv.core.env_server.types import Action

    for klass in cls.__mro__:
        for orig in getattr(klass, "__orig_bases__", ()):
            origin = typing.get_origin(orig)
            if isinstance(origin, type) and issubclass(origin, base):
                args = typing.get_args(orig)
                if args and isinstance(args[0], type) and issubclass(args[0], Action):
                    return args[0]
    try:
        hint = typing.get_type_hints(cls.step).get("action")
    except Exception:  # unresolved forward references: no hint to go by
        hint = None
    return hint if isinstance(hint, type) and issubclass(hint, Action) else None


def _plain(observation) -> dict:
    return observation.model_dump() if hasattr(observation, "model_dump") else dict(observation or {})


class _InProcess:
    """An OpenEnv ``Environment`` instance stepped directly (actions as its pydantic types)."""

    def __init__(self, env):
        from openenv.core.env_server import Environment, MCPEnvironment

        self.env = env
        self.mcp = MCPEnvironment is not None and isinstance(env, MCPEnvironment)
        self.action_cls = None if self.mcp else _action_class(type(env), Environment)
        self.action_schema = self.action_cls.model_json_schema() if self.action_cls is not None else None

    def reset(self, **kwargs) -> tuple[dict, float | None, bool]:
        obs = self.env.reset(**kwargs)
        return _plain(obs), obs.reward, bool(obs.done)

    def step(self, action: dict) -> tuple[dict, float | None, bool]:
        obs = self.env.step(self._action(action))
        return _plain(obs), obs.reward, bool(obs.done)

    def _action(self, action: dict):
        if self.mcp:
            return _mcp_action(action)
        return self.action_cls(**action)  # pydantic validates the policy's arguments

    def close(self) -> None:
        self.env.close()


def _mcp_action(action: dict):
    """OpenEnv's MCP action for ``{"type": "list_tools"}`` / ``{"type": "call_tool", ...}``, else None."""
    from openenv.core.env_server import CallToolAction, ListToolsAction

    if action.get("type") == "list_tools":
        return ListToolsAction()
    if action.get("type") == "call_tool":
        return CallToolAction(tool_name=action["tool_name"], arguments=action["arguments"])
    return None


class _Client:
    """An OpenEnv client: a typed one (its action type from its class) or a generic one (the action schema from
    the server's ``/schema``, dict actions); each episode has its own client, so its own server session."""

    def __init__(self, client, where: str):
        from openenv.core.env_client import EnvClient

        self.client = client.sync() if isinstance(client, EnvClient) else client
        typed = getattr(self.client, "async_client", client)
        self.where, self.url = where, re.sub(r"^ws", "http", getattr(typed, "base_url", None) or "")
        self.action_cls = _action_class(type(typed), EnvClient)
        self.action_schema = self.action_cls.model_json_schema() if self.action_cls else self._served_schema()
        self.mcp = _is_mcp_schema(self.action_schema)

    def _served_schema(self) -> dict:
        import requests

        try:
            return requests.get(f"{self.url}/schema", timeout=30).json()["action"]
        except Exception as e:
            raise AgentEnvironmentError(f"{self.where}: no OpenEnv server answers at {self.url or '(no url)'}/schema "
                                        f"({e}); start it first (openenv serve, its Docker image) or fix the URL.") from e

    def reset(self, **kwargs) -> tuple[dict, float | None, bool]:
        try:
            result = self.client.reset(**kwargs)
        except RuntimeError as e:
            if "CAPACITY_REACHED" not in str(e):
                raise
            raise AgentEnvironmentError(f"{self.where}: the server at {self.url} is at capacity ({str(e).splitlines()[0]})"
                                        "; every episode of a step is a session at once (rollout_batch_size x "
                                        "num_samples per process): raise the server's max_concurrent_envs.") from e
        return _plain(result.observation), result.reward, bool(result.done)

    def step(self, action: dict) -> tuple[dict, float | None, bool]:
        if self.mcp:
            action = _mcp_action(action)
        elif self.action_cls is not None:
            action = self.action_cls(**action)  # pydantic validates the policy's arguments
        result = self.client.step(action)
        return _plain(result.observation), result.reward, bool(result.done)

    def close(self) -> None:
        self.client.close()


def _is_mcp_schema(schema: dict) -> bool:
    text = json.dumps(schema)
    return '"tool_name"' in text and ('"call_tool"' in text or "CallToolAction" in text)


# --------------------------------------------------------------------------------------------------
# The episode
# --------------------------------------------------------------------------------------------------


def _observation_text(observation: dict) -> str:
    """An observation's content as text: its one string field, else its fields as JSON."""
    fields = {k: v for k, v in observation.items() if k not in OBSERVATION_BOOKKEEPING}
    if len(fields) == 1 and isinstance(next(iter(fields.values())), str):
        return next(iter(fields.values()))
    return json.dumps(fields, default=str) if fields else ""


def _tool_result_text(result: Any) -> str:
    """An MCP tool result as text: the text of its content parts, its structured data, or the value as JSON."""
    if isinstance(result, dict):
        if isinstance(result.get("content"), list):
            texts = [p.get("text", "") for p in result["content"] if isinstance(p, dict) and p.get("type") == "text"]
            if texts:
                return "".join(texts)
        for key in ("data", "structured_content"):
            if result.get(key) is not None:
                result = result[key]
                break
    if hasattr(result, "content") and isinstance(result.content, list):
        return "".join(getattr(p, "text", "") for p in result.content)
    return result if isinstance(result, str) else json.dumps(result, default=str)


def _action_tool(schema: dict) -> dict:
    """The one tool of a non-MCP environment: its action type, named after the class (EchoAction -> echo)."""
    title = schema.get("title", "act")
    name = re.sub(r"(?<!^)(?=[A-Z])", "_", re.sub(r"Action$", "", title)).lower() or "act"
    properties = {k: v for k, v in schema.get("properties", {}).items() if k != "metadata"}
    parameters = {"type": "object", "properties": properties,
                  "required": [k for k in schema.get("required", []) if k != "metadata"]}
    if "$defs" in schema:
        parameters["$defs"] = schema["$defs"]
    return {"type": "function", "function": {"name": name, "description": inspect.cleandoc(
        schema.get("description", f"Take a {title} in the environment.")), "parameters": parameters}}


class OpenEnvEpisode:
    """One episode of an OpenEnv environment behind alignkit's ``reset``/``step`` (module docstring)."""

    def __init__(self, backend, where: str):
        self.backend, self.where = backend, where
        self.tools: list[dict] | None = None
        self.closed = False

    def reset(self, row: Mapping[str, Any]) -> list[dict]:
        observation, reward, done = self.backend.reset(**dict(row.get("reset_kwargs") or {}))
        if self.backend.mcp:
            listed, _, _ = self.backend.step({"type": "list_tools"})
            self.tools = [{"type": "function", "function": {"name": t["name"], "description": t.get("description", ""),
                                                            "parameters": t.get("input_schema") or {}}}
                          for t in listed.get("tools", [])] or None
        elif self.backend.action_schema is not None:
            self.tools = [_action_tool(self.backend.action_schema)]
        else:
            raise AgentEnvironmentError(f"{self.where}: cannot tell the environment's action type; declare it "
                                        "(class MyEnv(Environment[MyAction, MyObservation, State])) or type step's "
                                        "action parameter.")
        prompt = row.get("prompt")
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt or []]
        text = _observation_text(observation)
        if text and messages and messages[-1].get("role") == "user" and isinstance(messages[-1].get("content"), str):
            messages[-1]["content"] += "\n\n" + text  # as TRL appends reset()'s text to the last user message
        elif text:
            messages.append({"role": "user", "content": text})
        if not messages:
            raise AgentEnvironmentError(f"{self.where}: the row has no 'prompt' and the reset observation is empty: "
                                        "nothing to start the episode from; give rows a prompt.")
        return messages

    def step(self, message: dict) -> StepResult:
        if "tool_call_error" in message:
            return StepResult([{"role": "tool", "name": "error", "content": f"error: {message['tool_call_error']}"}],
                              info={"tool_errors": 1})
        calls = message.get("tool_calls") or []
        if not calls:  # the policy answered without acting: the episode is over
            self.close()
            return StepResult(done=True)
        replies, errors, turn_reward, done = [], 0, 0.0, False
        for call in calls:
            name = call["function"]["name"]
            text, reward, done, error = self._call(name, call["function"]["arguments"])
            errors += error
            turn_reward += float(reward or 0.0)
            replies.append({"role": "tool", "name": name, "content": text})
            if done:  # the calls after the one that ended the episode are not run
                break
        if done:
            self.close()
        return StepResult(replies, reward=turn_reward, done=done, info={"tool_calls": len(calls), "tool_errors": errors})

    def _call(self, name: str, args: dict) -> tuple[str, float | None, bool, int]:
        """``(text, reward, done, errors)`` of one tool call; what the policy got wrong is answered as an error."""
        if self.backend.mcp:
            action = {"type": "call_tool", "tool_name": name, "arguments": args}
        else:
            tool = self.tools[0]["function"]["name"]
            if name != tool:
                return f"error: no tool named {name!r} (tools: {tool})", None, False, 1
            action = args
        try:
            observation, reward, done = self.backend.step(action)
        except (TypeError, ValueError) as e:  # the arguments do not make a valid action (pydantic's error)
            return f"error: {type(e).__name__}: {str(e).splitlines()[0]}", None, False, 1
        if not self.backend.mcp:
            return _observation_text(observation), reward, done, 0
        error = observation.get("error")
        if error:  # unknown tool, invalid arguments, a tool that raised or timed out
            return f"error: {error.get('message', error) if isinstance(error, dict) else error}", reward, done, 1
        return _tool_result_text(observation.get("result")), reward, done, 0

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.backend.close()
