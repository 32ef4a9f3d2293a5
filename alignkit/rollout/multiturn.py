"""Multi-turn rollouts: the policy and an environment (:mod:`alignkit.rollout.environment`) take turns.

Token in, token out. An episode is one token sequence that only grows:

1. the prompt: the environment's first messages through the chat template (with its ``tools``);
2. each turn, the policy samples from the whole sequence so far, given as token ids (one batch per turn
   over the episodes still running: ``model.generate`` with the hf sampler, the colocated engine's
   ``TokensPrompt`` requests with the vllm sampler, whose weights are synced once per rollout); the sampled
   token ids and their log-probs come back as they are, end-of-turn token included, are appended, and are
   the only tokens trained on (``Rollout.action_mask``);
3. their text is parsed into an assistant message (tool calls through transformers' response parser) and
   given to the environment, whose reply messages are rendered by the chat template ONCE, as the text the
   template adds after the assistant's end-of-turn token up to the next generation prompt, tokenized and
   appended (attended to, masked out of the loss).

Nothing sampled is ever decoded and re-tokenized, so the log-prob the trainer computes over the final
sequence is the log-prob of exactly the token the sampler drew, in the context it drew it in.

An episode stops when the environment says ``done``, after ``max_turns`` assistant turns, when its tokens
after the prompt would pass ``max_episode_tokens`` (or vLLM's context, ``vllm_max_model_len``), when a turn
ends without the end-of-turn token (``max_new_tokens``; the environment still gets that turn and may score
it), or when the environment took more than ``timeout_s`` seconds in all (each call runs in a daemon thread:
one that never returns is left behind, it neither blocks the rollout nor the process's exit); the reason is
kept per episode (``Episodes.stop``, ``stop`` in samples.jsonl) and counted in the metrics (``env/stop_*``).
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from alignkit.config import ConfigError, opt
from alignkit.data import attention_mask_from_lengths, pad
from alignkit.models import resolve_dtype, unwrap_model
from alignkit.rollout.batch import Rollout, eos_token_ids, pad_token_id
from alignkit.rollout.config import SamplingConfig
from alignkit.rollout.environment import (
    AgentEnvironmentError,
    StepResult,
    load_environment,
    make_episode_env,
    parse_assistant_turn,
)
from alignkit.rollout.hf import HFSampler
from alignkit.rollout.weights import request_seed
from alignkit.rollout.zero3 import zero3_params

STOPS = ("done", "max_turns", "token_budget", "no_eos", "timeout")


@dataclass
class EnvironmentConfig:
    """A multi-turn environment for the online methods (YAML section ``environment:``)."""

    factory: str | None = opt(None, "Environment factory, 'file.py:make_env' or 'module:make_env': make_env(row) "
                                    "returns a fresh environment per episode; or a library's environment: "
                                    "'verifiers:<env id>', 'openenv:<module:Class>' or 'openenv:<url>' "
                                    "(docs/agents.md). None = single-turn.")
    max_turns: int = opt(4, "Most assistant turns per episode; an episode still running then stops (stop=max_turns).")
    max_episode_tokens: int = opt(1024, "Most tokens per episode after the prompt (sampled + environment); an "
                                        "episode that would pass it stops (stop=token_budget).")
    timeout_s: float = opt(60.0, "Seconds the environment may take in all per episode (reset and steps); past it "
                                 "the episode stops (stop=timeout) with the reward it has.")

    def check(self, section: str = "environment") -> None:
        for key, ok, rule in [("max_turns", self.max_turns >= 1, "at least 1"),
                              ("max_episode_tokens", self.max_episode_tokens >= 1, "at least 1"),
                              ("timeout_s", self.timeout_s > 0, "> 0")]:
            if not ok:
                raise ConfigError(f"{section}.{key}={getattr(self, key)!r}: must be {rule}.")

    @property
    def enabled(self) -> bool:
        return bool(self.factory)


@dataclass
class Episodes:
    """Per episode (the rows of the :class:`Rollout`): what the environment gave and why it stopped."""

    rewards: torch.Tensor  # [N] float32, sum of the environment's turn rewards
    turns: torch.Tensor  # [N] long, assistant turns taken
    stop: list[str]  # one of STOPS per episode
    tool_calls: torch.Tensor  # [N] long
    tool_errors: torch.Tensor  # [N] long: malformed calls, unknown tools, tools that raised
    messages: list[list[dict]] = field(default_factory=list)  # each whole conversation (for samples)

    def metrics(self) -> dict[str, tuple[float, float]]:
        """``name -> (sum, count)`` over the episodes: reward, turns, tool calls/errors, share of each stop."""
        n = float(len(self.stop))
        out = {"env/reward": (float(self.rewards.double().sum()), n), "env/turns": (float(self.turns.sum()), n),
               "env/tool_calls": (float(self.tool_calls.sum()), n),
               "env/tool_errors": (float(self.tool_errors.sum()), n)}
        for reason in STOPS:
            out[f"env/stop_{reason}"] = (float(sum(s == reason for s in self.stop)), n)
        return out


def _render(tokenizer, messages: list[dict], tools, generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except Exception as e:  # user-supplied template code
        raise AgentEnvironmentError(f"the chat template failed on an episode's conversation ({type(e).__name__}: {e}); "
                                "the template must render the environment's roles (e.g. 'tool') and tools, or set "
                                "model.chat_template to one that does.") from e


def environment_tokens(tokenizer, conversation: list[dict], replies: list[dict], tools, end_of_turn: str) -> list[int]:
    """Token ids of the environment's ``replies`` after the assistant turn that ends ``conversation``: the text
    the chat template writes after that turn's end-of-turn token, through the next generation prompt.

    Rendered as text once and tokenized once; the turn itself is not re-rendered into tokens (its sampled
    tokens stay as they are), so only template text that follows ``end_of_turn`` is added."""
    before = _render(tokenizer, conversation, tools, False)
    after = _render(tokenizer, conversation + replies, tools, True)
    if not after.startswith(before):
        raise AgentEnvironmentError("the chat template does not render the conversation so far as a prefix of the "
                                "conversation with the environment's reply (it rewrites earlier turns), so the "
                                "reply's tokens cannot be appended; use a template that only appends "
                                "(model.chat_template).")
    cut = before.rfind(end_of_turn) if end_of_turn else -1
    tail = before[cut + len(end_of_turn):] if cut >= 0 else ""
    return list(tokenizer(tail + after[len(before):], add_special_tokens=False)["input_ids"])


class _Episode:
    def __init__(self, index: int, env, messages: list[dict], prompt: list[int]):
        self.index, self.env, self.messages, self.prompt = index, env, messages, prompt
        self.tokens: list[int] = []  # after the prompt
        self.action: list[int] = []  # 1 on sampled tokens
        self.logps: list[float] = []
        self.reward, self.turns, self.tool_calls, self.tool_errors = 0.0, 0, 0, 0
        self.env_seconds, self.stop, self.ended_with_eos = 0.0, None, False

    def append(self, ids: Sequence[int], sampled: bool, logps: Sequence[float] | None = None) -> None:
        self.tokens += list(ids)
        self.action += [int(sampled)] * len(ids)
        self.logps += list(logps) if logps is not None else [0.0] * len(ids)


class MultiTurnSampler:
    """Episodes of the policy with an environment (module docstring), with the sampler's settings
    (``sampler`` hf or vllm, temperature, top-k/top-p, ``max_new_tokens`` per turn, hf's ``batch_size``);
    ``num_samples`` episodes per prompt row, consecutive rows as in single-turn rollouts.

    With ``sampler: vllm`` the colocated engine (:class:`~alignkit.rollout.vllm.VLLMSampler`) is built from
    ``model_name_or_path`` in ``dtype`` (``model.dtype``), or at the first rollout from the policy's own
    ``name_or_path`` and parameter dtype when they are not given."""

    def __init__(self, tokenizer, sampling: SamplingConfig, environment: EnvironmentConfig,
                 factory: Callable[[Mapping[str, Any]], Any] | None = None, device=None, where: str = "environment",
                 *, model_name_or_path: str | None = None, dtype: str | None = None, seed: int = 0,
                 policy: torch.nn.Module | None = None):
        sampling.check()
        environment.check()
        if sampling.sampler not in ("hf", "vllm"):
            raise ConfigError(f"{where}: multi-turn rollouts run on the hf and vllm samplers, not "
                              f"generation.sampler={sampling.sampler}; set generation.sampler=vllm or hf.")
        if factory is None and not environment.factory:
            raise ConfigError(f"{where}.factory is not set: name the environment factory (file.py:make_env).")
        self.tokenizer, self.sampling, self.config, self.device, self.where = tokenizer, sampling, environment, device, where
        self.factory = factory or load_environment(environment.factory)
        self.engine = None  # the vllm sampler
        self._engine_args = dict(dtype=dtype, seed=seed, policy=policy)
        if sampling.sampler == "vllm" and model_name_or_path:
            self._start_engine(model_name_or_path)

    def _start_engine(self, model_name_or_path: str, model: torch.nn.Module | None = None) -> None:
        from alignkit.rollout.vllm import VLLMSampler

        args = dict(self._engine_args)
        args["policy"] = args["policy"] if args["policy"] is not None else model  # its GPU memory check
        if args["dtype"] is None:  # the policy's own (it was loaded in model.dtype)
            floats = [p.dtype for p in (model.parameters() if model is not None else []) if p.is_floating_point()]
            args["dtype"] = str(floats[0]) if floats else "auto"
        args["dtype"] = str(resolve_dtype(args["dtype"])).removeprefix("torch.")
        self.engine = VLLMSampler(model_name_or_path, self.tokenizer, self.sampling, **args)

    def sleep(self) -> None:
        """vLLM on a GPU frees its memory until the next rollout; the hf sampler has nothing to free."""
        if self.engine is not None:
            self.engine.sleep()

    def close(self) -> None:
        """Shut the vLLM engine down (hf: nothing to do)."""
        if self.engine is not None:
            self.engine.close()
            self.engine = None

    def _call(self, ep: _Episode, fn, arg):
        """``fn(arg)`` within what is left of the episode's environment time; None on timeout (episode stopped)."""
        return self._wait(ep, _start(fn, arg), check=False)

    @torch.no_grad()
    def generate_episodes(self, model: torch.nn.Module, rows: Sequence[Mapping[str, Any]], *, seed: int | None = None,
                          logps: bool = False, any_running: Callable[[bool], bool] | None = None) -> Rollout:
        """``num_samples`` episodes per row; returns a :class:`Rollout` whose response is everything after the
        prompt, with ``action_mask`` (1 on sampled tokens) and ``episodes`` (:class:`Episodes`).

        ``any_running(flag)``: True on every process when ``flag`` is on any (e.g. an all-reduce). With several
        processes each keeps taking turns (a one-token dummy generate once its own episodes are over) until
        every process is done, since gathering ZeRO-3 weights for a generate is collective (vllm: the weight
        sync before the first turn is; with tensor parallelism an idle process joins its group's turns with
        no requests)."""
        tok, c, k = self.tokenizer, self.config, self.sampling.num_samples
        # ZeRO-3 forwards are collective: every process runs one generate per turn (all its episodes in one
        # batch) and keeps running forwards until every process's turn is over (synced_gpus)
        zero3 = bool(zero3_params(model))
        per_turn = dict(num_samples=1, share_prefill=False, **({"batch_size": 0} if zero3 else {}))
        inner = unwrap_model(model)
        eos_ids = eos_token_ids(tok, inner)
        pad_id = pad_token_id(tok, eos_ids)
        end_of_turn = tok.decode([eos_ids[0]])
        prompt_index = torch.arange(len(rows)).repeat_interleave(k)
        if self.sampling.sampler == "vllm":  # the weights go in once per rollout (collective under ZeRO-3)
            if self.engine is None:
                path = getattr(inner, "name_or_path", None)
                if not path:
                    raise ConfigError(f"{self.where}: generation.sampler=vllm builds vLLM from the policy's checkpoint, "
                                      "but the policy has no name_or_path; load it from a folder (model.name_or_path).")
                self._start_engine(path, inner)
            self.engine.ready(model)
        context = self.engine.max_model_len if self.engine is not None else None
        episodes = []
        for index, i in enumerate(prompt_index.tolist()):
            env = make_episode_env(self.factory, rows[i], self.where)
            ep = _Episode(index, env, [], [])
            first = self._call(ep, env.reset, rows[i])
            messages = list(first) if first is not None else _row_messages(rows[i], self.where)
            tools = getattr(env, "tools", None)
            ep.messages = messages
            ep.prompt = list(tok(_render(tok, messages, tools, True), add_special_tokens=False)["input_ids"])
            episodes.append(ep)
        for ep in episodes:  # a first prompt that fills vLLM's context leaves no room for a turn
            if context is not None and len(ep.prompt) >= context:
                ep.stop = "token_budget"
        for turn in range(c.max_turns):
            active = [ep for ep in episodes if ep.stop is None]
            if not (any_running(bool(active)) if any_running is not None else active):
                break
            turn_seed = None if seed is None else (seed * 1_000_003 + turn) % 2**63
            if not active:  # other processes still sample: take part in the collective generate (ZeRO-3's
                # gathers for hf, the tensor-parallel group's for vllm)
                if self.engine is not None:
                    self.engine.sample([], eos_ids, n=1)
                else:
                    HFSampler(tok, replace(self.sampling, max_new_tokens=1, **per_turn), device=self.device,
                              synced_gpus=True).generate(model, [[pad_id]], seed=seed)
                continue
            room = [min(self.sampling.max_new_tokens, c.max_episode_tokens - len(ep.tokens),
                        context - len(ep.prompt) - len(ep.tokens) if context is not None else c.max_episode_tokens)
                    for ep in active]
            contexts = [ep.prompt + ep.tokens for ep in active]
            if self.engine is not None:  # token ids in, token ids and their log-probs out
                seeds = None if turn_seed is None else [request_seed(turn_seed, ep.index) for ep in active]
                sampled, sampled_logps = self.engine.sample(contexts, eos_ids, seeds=seeds, max_new_tokens=room, n=1,
                                                            logps=logps)
            else:
                turn_sampler = HFSampler(tok, replace(self.sampling, max_new_tokens=max(room), **per_turn),
                                         device=self.device, synced_gpus=True if zero3 else None)
                out = turn_sampler.generate(model, contexts, seed=turn_seed, logps=logps)
                lengths = out.response_lengths.tolist()
                sampled = [out.response_ids[j, :lengths[j]].tolist() for j in range(len(active))]
                sampled_logps = [out.sampler_logps[j, :lengths[j]].tolist() for j in range(len(active))] if logps \
                    else None
            steps = []
            for j, ep in enumerate(active):
                n = min(len(sampled[j]), room[j])
                ids = sampled[j][:n]
                ep.append(ids, True, sampled_logps[j][:n] if logps else None)
                ep.turns += 1
                ep.ended_with_eos = bool(ids) and ids[-1] in eos_ids
                if not ep.ended_with_eos:  # cut by the turn's max_new_tokens or the episode's budget: the
                    # environment still sees (and may score) the cut turn, then the episode ends
                    ep.stop = "no_eos" if n >= self.sampling.max_new_tokens else "token_budget"
                text = tok.decode(ids[:-1] if ep.ended_with_eos else ids, skip_special_tokens=False)
                message = parse_assistant_turn(tok, text, getattr(ep.env, "tools", None))
                steps.append((ep, message, _start(ep.env.step, message)))
            for ep, message, future in steps:
                result = self._wait(ep, future)
                conversation = ep.messages + [message]
                ep.messages = conversation
                if result is None:
                    continue
                ep.reward += float(result.reward)
                ep.tool_calls += int(result.info.get("tool_calls", len(message.get("tool_calls") or [])))
                ep.tool_errors += int(result.info.get("tool_errors", 0))
                if result.done or ep.stop is not None:
                    ep.stop = "done" if result.done and ep.stop is None else ep.stop
                    continue
                if turn + 1 == c.max_turns:
                    ep.stop = "max_turns"
                    continue
                ids = environment_tokens(tok, conversation, list(result.messages), getattr(ep.env, "tools", None),
                                         end_of_turn)
                ep.messages = conversation + list(result.messages)
                if len(ep.tokens) + len(ids) >= c.max_episode_tokens or (  # no room left for another turn
                        context is not None and len(ep.prompt) + len(ep.tokens) + len(ids) >= context):
                    ep.stop = "token_budget"
                    continue
                ep.append(ids, False)
        return self._rollout(episodes, prompt_index, pad_id, logps)

    def _wait(self, ep: _Episode, future, check: bool = True):
        """The result of an environment call (:func:`_start`) within what is left of the episode's environment
        time; None when that ran out (the episode stops: ``timeout``)."""
        left = self.config.timeout_s - ep.env_seconds
        try:
            result, seconds = future.result(timeout=max(left, 0.0))
        except concurrent.futures.TimeoutError:
            ep.env_seconds, ep.stop = self.config.timeout_s, "timeout"
            return None
        ep.env_seconds += seconds
        if ep.env_seconds > self.config.timeout_s:
            ep.stop = "timeout"
            return None
        if check and not isinstance(result, StepResult):
            raise AgentEnvironmentError(f"{self.where}: step() returned {type(result).__name__}; return "
                                    "alignkit.rollout.environment.StepResult(messages, reward, done).")
        return result

    def _rollout(self, episodes: list[_Episode], prompt_index: torch.Tensor, pad_id: int, logps: bool) -> Rollout:
        device = torch.device(self.device) if self.device is not None else torch.device("cpu")
        width = max([len(ep.tokens) for ep in episodes] + [1])
        lengths = [len(ep.tokens) for ep in episodes]
        sampler_logps = None
        if logps:  # 0 on environment tokens and padding
            sampler_logps = torch.zeros(len(episodes), width, dtype=torch.float32)
            for i, ep in enumerate(episodes):
                sampler_logps[i, :len(ep.logps)] = torch.tensor(ep.logps, dtype=torch.float32)
            sampler_logps = sampler_logps.to(device)
        rollout = Rollout(
            prompt_ids=pad([ep.prompt for ep in episodes], pad_id, side="left").to(device),
            prompt_mask=attention_mask_from_lengths([len(ep.prompt) for ep in episodes], side="left").to(device),
            response_ids=pad([ep.tokens for ep in episodes], pad_id, width=width).to(device),
            response_mask=attention_mask_from_lengths(lengths, width).to(device),
            ended_with_eos=torch.tensor([ep.ended_with_eos for ep in episodes], dtype=torch.bool, device=device),
            prompt_index=prompt_index.to(device),
            response_texts=self.tokenizer.batch_decode([ep.tokens for ep in episodes], skip_special_tokens=True),
            sampler_logps=sampler_logps,
            action_mask=pad([ep.action for ep in episodes], 0, width=width).to(device),
        )
        rollout.episodes = Episodes(
            rewards=torch.tensor([ep.reward for ep in episodes], dtype=torch.float32, device=device),
            turns=torch.tensor([ep.turns for ep in episodes], dtype=torch.long),
            stop=[ep.stop or "max_turns" for ep in episodes],
            tool_calls=torch.tensor([ep.tool_calls for ep in episodes], dtype=torch.long),
            tool_errors=torch.tensor([ep.tool_errors for ep in episodes], dtype=torch.long),
            messages=[ep.messages for ep in episodes],
        )
        return rollout


def _start(fn, arg) -> concurrent.futures.Future:
    """``fn(arg)`` in a daemon thread of its own; the future gives ``(result, seconds)``. Not a thread pool: a
    pool's threads are joined at interpreter exit, so an environment call that never returns (past its
    timeout) would keep the process from exiting; a daemon thread is left behind instead."""
    future: concurrent.futures.Future = concurrent.futures.Future()

    def call() -> None:
        start = time.perf_counter()
        try:
            result = fn(arg)
        except BaseException as e:  # noqa: BLE001 - re-raised by future.result() in the rollout
            future.set_exception(e)
        else:
            future.set_result((result, time.perf_counter() - start))

    threading.Thread(target=call, daemon=True, name="alignkit-environment").start()
    return future


def _row_messages(row: Mapping[str, Any], where: str) -> list[dict]:
    prompt = row.get("prompt")
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list):
        return list(prompt)
    raise AgentEnvironmentError(f"{where}: reset() returned None and the row has no 'prompt' (messages or text) to "
                            "start the episode from; return the first messages from reset(row).")
