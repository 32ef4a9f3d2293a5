"""verifiers environments (prime-rl's environment library) as alignkit environments.

``environment.factory: "verifiers:<env id>"`` loads an installed verifiers environment the way prime-rl does
(``verifiers.load_environment(env_id)``: the module named after the id, its ``load_environment()``);
``"verifiers:<file.py or module>:<function>"`` calls a function of yours that returns one (to pass arguments, or
for an environment in a local file). One verifiers environment object serves every episode, each with its own
verifiers ``State``, as in verifiers itself.

What is driven, and what is not. verifiers' ``rollout()`` samples the model itself through an OpenAI-style client
(it sends messages, the server re-tokenizes them); alignkit keeps token-in/token-out, so the adapter never calls
``rollout()`` and gives verifiers no model. It replays verifiers' multi-turn loop with the environment's own
hooks instead, one alignkit turn at a time:

- ``reset(row)``: ``init_state`` (the row's ``prompt``/``answer``/``info``, the environment's system prompt added
  as verifiers adds it to its dataset), ``setup_state``, the first prompt messages; the tools are the state's
  ``tool_defs`` (the environment's, or the row's ``info["tool_defs"]``);
- ``step(message)``: the policy's turn becomes a verifiers trajectory step (``add_trajectory_step``); then
  ``is_completed`` (the environment's stop conditions: no tool call for a ``ToolEnv``, ``max_turns``, errors,
  ...); if it goes on, ``env_response`` (through ``get_prompt_messages``) gives the messages that follow; when it
  ends, the cleanup handlers run and the environment's ``rubric.score_rollout`` gives the episode's reward, all at
  the end (its metrics are kept in ``StepResult.info``).

Supported: the classic verifiers API (``SingleTurnEnv``, ``MultiTurnEnv``, ``ToolEnv``, ``StatefulToolEnv`` and
their subclasses, rubrics scoring one rollout at a time) in verifiers 0.3.x (``import verifiers as vf``). Not
supported, with an error: rubrics with group reward functions (they score a group of rollouts together), and an
environment that asks for a model response itself. verifiers 0.4 dropped the classic API for its v1 stack
(tasksets and harnesses whose agents call the model over HTTP), which this adapter does not drive.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from alignkit.errors import AlignkitError
from alignkit.rollout.env_contract import AgentEnvironmentError, StepResult, missing_library


def _import_verifiers():
    try:
        import verifiers as vf
        from verifiers.legacy.clients.client import Client
    except ImportError as e:
        raise missing_library("verifiers", "verifiers", e) from e
    return vf, Client


# --------------------------------------------------------------------------------------------------
# One event loop for verifiers' coroutines (the environment's state may hold loop-bound objects)
# --------------------------------------------------------------------------------------------------

_loop: asyncio.AbstractEventLoop | None = None
_loop_lock = threading.Lock()


def run_coroutine(coro) -> Any:
    """``coro``'s result, run on alignkit's one background event loop (started on first use); the calling thread
    waits. Episodes stepped from several threads at once run concurrently on it."""
    global _loop
    with _loop_lock:
        if _loop is None:
            _loop = asyncio.new_event_loop()
            threading.Thread(target=_loop.run_forever, name="alignkit-verifiers-loop", daemon=True).start()
    return asyncio.run_coroutine_threadsafe(coro, _loop).result()


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def load_verifiers(target: str) -> Callable[[Mapping[str, Any]], VerifiersEpisode]:
    """The alignkit factory for ``"verifiers:<target>"`` (module docstring)."""
    env, client, where = _load_env(target), _policy_client(), f"environment 'verifiers:{target}'"
    return lambda row: VerifiersEpisode(env, client, where)


def write_dataset(target: str, path: str | Path, split: str = "train", n: int = -1) -> int:
    """Write the verifiers environment's own dataset (``split``: "train" or "eval"; ``n`` rows, -1 = all) as the
    JSONL prompt file the online methods read (``data.train``): one row per example with verifiers' formatted
    ``prompt`` (system prompt included), ``answer``, ``info`` and ``example_id``. Returns the number of rows."""
    env = _load_env(target.removeprefix("verifiers:"))
    dataset = env.get_dataset(n) if split == "train" else env.get_eval_dataset(n)
    keep = [c for c in ("prompt", "answer", "info", "task", "example_id") if c in dataset.column_names]
    with open(path, "w") as f:
        for row in dataset.select_columns(keep):
            f.write(json.dumps(row, default=str) + "\n")
    return len(dataset)


def _load_env(target: str):
    vf, _ = _import_verifiers()
    where = f"environment 'verifiers:{target}'"
    # verifiers installs SIGINT/SIGTERM handlers when an environment is built; keep the run's own
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        if ":" in target:
            from alignkit.rewards.functions import load_function

            try:
                fn = load_function(target)
            except AlignkitError as e:
                raise AgentEnvironmentError(str(e).replace(f"reward function {target!r}", where, 1)) from e
            env = fn()
        else:
            try:
                env = vf.load_environment(target)
            except (ValueError, RuntimeError) as e:  # verifiers' own: not installed / load_environment failed
                raise AgentEnvironmentError(f"{where}: {str(e).splitlines()[0]} (an environment id is the name of an "
                                            "installed module with load_environment(); a function works too: "
                                            "verifiers:my_env.py:load_environment).") from e
    finally:
        if threading.current_thread() is threading.main_thread():
            for s, h in handlers.items():
                if h is not None:
                    signal.signal(s, h)
    if not isinstance(env, vf.MultiTurnEnv):
        raise AgentEnvironmentError(f"{where}: got {type(env).__name__}, not a verifiers MultiTurnEnv (SingleTurnEnv, "
                                    "ToolEnv, ...); alignkit drives the classic verifiers environments (docs/agents.md).")
    if env.rubric.has_group_rewards:
        raise AgentEnvironmentError(f"{where}: its rubric has group reward functions, which score a group of rollouts "
                                    "together; alignkit scores each episode on its own: use a rubric of per-rollout "
                                    "reward functions.")
    return env


def _policy_client():
    """A verifiers ``Client`` for the state's ``client`` slot that refuses to sample: the policy's turns come from
    alignkit's sampler, never from verifiers."""
    _, Client = _import_verifiers()

    class AlignkitPolicy(Client):
        def setup_client(self, config):
            return None

        async def _refuse(self, *args, **kwargs):
            raise AgentEnvironmentError("a verifiers environment asked for a model response itself (its client); "
                                        "alignkit samples the policy token-in/token-out and drives only the "
                                        "environment's hooks (env_response, stop conditions, rubric).")

        to_native_tool = to_native_prompt = get_native_response = raise_from_native_response = _refuse
        from_native_response = _refuse

        async def close(self):
            return None

    return AlignkitPolicy(None)


# --------------------------------------------------------------------------------------------------
# Messages between alignkit (dicts) and verifiers (pydantic models)
# --------------------------------------------------------------------------------------------------


def _as_dict(message) -> dict:
    """A verifiers message as a chat-template message (text content; tool calls in the OpenAI shape)."""
    raw = message.model_dump(exclude_none=True) if hasattr(message, "model_dump") else dict(message)
    content = raw.get("content")
    if isinstance(content, list):  # text parts joined; other parts (images) have no place in a text episode
        raw["content"] = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if raw.get("tool_calls"):
        raw["tool_calls"] = [{"type": "function", "id": c.get("id"),
                              "function": {"name": c["name"], "arguments": json.loads(c["arguments"] or "{}")}}
                             for c in raw["tool_calls"]]
    return {k: v for k, v in raw.items() if k in ("role", "content", "tool_calls", "tool_call_id", "name")}


def _tool_schema(tool) -> dict:
    return {"type": "function", "function": {"name": tool.name, "description": tool.description,
                                             "parameters": tool.parameters}}


class VerifiersEpisode:
    """One episode of a verifiers environment behind alignkit's ``reset``/``step`` (module docstring)."""

    def __init__(self, env, client, where: str):
        self.env, self.client, self.where = env, client, where
        self.tools: list[dict] | None = None
        self.state = None
        self.prompt: list = []  # verifiers' messages so far (before the next assistant turn)
        self.turn = 0

    def _input(self, row: Mapping[str, Any]) -> dict:
        prompt = row.get("prompt")
        system, few_shot = self.env.system_prompt, list(self.env.few_shot or [])
        if isinstance(prompt, str):  # as verifiers formats its datasets (Environment._ensure_prompt)
            prompt = ([{"role": "system", "content": system}] if system else []) + few_shot + \
                     [{"role": "user", "content": prompt}]
        elif isinstance(prompt, list):
            prompt = [dict(m) for m in prompt]
            if system and (not prompt or prompt[0].get("role") != "system"):
                prompt = [{"role": "system", "content": system}] + prompt
        else:
            raise AgentEnvironmentError(f"{self.where}: the row has no 'prompt' (messages or text); give rows with "
                                        "the environment's prompt, answer and info (e.g. its dataset as JSONL).")
        data = {"prompt": prompt, "example_id": int(row.get("example_id", 0) or 0)}
        for key in ("answer", "info", "task"):
            if row.get(key) is not None:
                data[key] = row[key]
        return data

    def reset(self, row: Mapping[str, Any]) -> list[dict]:
        vf = _import_verifiers()[0]
        env = self.env
        state = run_coroutine(env.init_state(self._input(row), self.client, "alignkit-policy", None))
        try:
            state = run_coroutine(env.setup_state(state)) or state
        except vf.Error as e:  # verifiers records it; has_error then ends the episode at the first turn
            state["error"] = e
        self.state = state
        self.prompt = list(run_coroutine(env.get_prompt_messages(state)))
        self.tools = [_tool_schema(t) for t in state.get("tool_defs") or []] or None
        return [_as_dict(m) for m in self.prompt]

    def _assistant(self, message: dict):
        from verifiers.legacy.types import ResponseMessage, ToolCall

        calls = [ToolCall(id=f"call_{self.turn}_{k}", name=c["function"]["name"],
                          arguments=json.dumps(c["function"]["arguments"]))
                 for k, c in enumerate(message.get("tool_calls") or [])]
        # a malformed call reaches verifiers as text, as from an OpenAI server whose tool parser failed
        return ResponseMessage(content=message.get("content") or "", tool_calls=calls or None,
                               finish_reason="tool_calls" if calls else "stop", is_truncated=False)

    def step(self, message: dict) -> StepResult:
        from verifiers.legacy.types import AssistantMessage, Response, TrajectoryStep

        vf = _import_verifiers()[0]
        env, state = self.env, self.state
        self.turn += 1
        reply = self._assistant(message)
        assistant = AssistantMessage(**reply.model_dump(include={"role", "content", "tool_calls"}))
        response = Response(id=uuid.uuid4().hex, created=int(time.time()), model="alignkit-policy", message=reply)
        run_coroutine(env.add_trajectory_step(state, TrajectoryStep(
            prompt=self.prompt, completion=[assistant], response=response, tokens=None, reward=None, advantage=None,
            is_truncated=False, trajectory_id=state["trajectory_id"], extras={})))
        known = getattr(env, "tool_map", None)  # a ToolEnv answers unknown tools itself; count them as errors
        unknown = sum(known is not None and c.name not in known for c in reply.tool_calls or [])
        info = {"tool_calls": len(reply.tool_calls or []), "tool_errors": int("tool_call_error" in message) + unknown}
        replies: list = []
        if not run_coroutine(env.is_completed(state)):
            before = len(self.prompt) + 1
            try:
                self.prompt = list(run_coroutine(env.get_prompt_messages(state)))  # runs env_response
                replies = self.prompt[before:]
            except vf.Error as e:  # as verifiers' rollout loop: recorded, and a stop condition ends the episode
                cause = e
                while cause is not None and not isinstance(cause, AgentEnvironmentError):
                    cause = cause.__cause__ or cause.__context__
                if cause is not None:  # it asked the policy client for a response: a contract error, not the policy's
                    raise AgentEnvironmentError(f"{self.where}: {cause}") from e
                if isinstance(e, vf.OverlongPromptError):
                    state["prompt_too_long"] = True
                else:
                    state["error"] = e
            if not run_coroutine(env.is_completed(state)):  # (a final_env_response is one of its stop conditions)
                return StepResult([_as_dict(m) for m in replies], info=info)
        reward, metrics = self._score()
        return StepResult([_as_dict(m) for m in replies], reward=reward, done=True,
                          info={**info, "verifiers_metrics": metrics, "stop_condition": state.get("stop_condition")})

    def _score(self) -> tuple[float, dict]:
        """verifiers' end of a rollout: cleanup handlers (which render the completion), then the rubric."""
        env, state = self.env, self.state
        run_coroutine(env.cleanup(state))
        if env.score_rollouts:
            run_coroutine(env.rubric.score_rollout(state))
        else:
            run_coroutine(env.rubric.dummy_score_rollout(state))
        run_coroutine(env.rubric.cleanup(state))
        return float(state.get("reward") or 0.0), dict(state.get("metrics") or {})
