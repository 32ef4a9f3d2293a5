"""Multi-turn rollouts: the policy and an environment (:mod:`alignkit.rollout.environment`) take turns.

Token in, token out. An episode is one token sequence that only grows:

1. the prompt: the environment's first messages through the chat template (with its ``tools``);
2. each turn, the policy samples from the whole sequence so far (the hf sampler, one batch per turn over
   the episodes still running); the sampled tokens are appended as they are, end-of-turn token included,
   and are the only tokens trained on (``Rollout.action_mask``);
3. their text is parsed into an assistant message (tool calls through transformers' response parser) and
   given to the environment, whose reply messages are rendered by the chat template ONCE, as the text the
   template adds after the assistant's end-of-turn token up to the next generation prompt, tokenized and
   appended (attended to, masked out of the loss).

Nothing sampled is ever decoded and re-tokenized, so the log-prob the trainer computes over the final
sequence is the log-prob of exactly the token the sampler drew, in the context it drew it in.

An episode stops when the environment says ``done``, after ``max_turns`` assistant turns, when its tokens
after the prompt would pass ``max_episode_tokens``, when a turn ends without the end-of-turn token
(``max_new_tokens``; the environment still gets that turn and may score it), or when the environment took
more than ``timeout_s`` seconds in all; the reason is kept per episode (``Episodes.stop``) and counted in
the metrics.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from alignkit.config import ConfigError, opt
from alignkit.data import attention_mask_from_lengths, pad
from alignkit.models import unwrap_model
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
from alignkit.rollout.zero3 import zero3_params

STOPS = ("done", "max_turns", "token_budget", "no_eos", "timeout")


@dataclass
class EnvironmentConfig:
    """A multi-turn environment for the online methods (YAML section ``environment:``)."""

    factory: str | None = opt(None, "Environment factory, 'file.py:make_env' or 'module:make_env': make_env(row) "
                                    "returns a fresh environment per episode (docs/agents.md). None = single-turn.")
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
    def __init__(self, env, messages: list[dict], prompt: list[int]):
        self.env, self.messages, self.prompt = env, messages, prompt
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
    """Episodes of the policy with an environment (module docstring), with the hf sampler's settings
    (temperature, top-k/top-p, ``max_new_tokens`` per turn, ``batch_size``); ``num_samples`` episodes per
    prompt row, consecutive rows as in single-turn rollouts."""

    def __init__(self, tokenizer, sampling: SamplingConfig, environment: EnvironmentConfig,
                 factory: Callable[[Mapping[str, Any]], Any] | None = None, device=None, where: str = "environment"):
        sampling.check()
        environment.check()
        if sampling.sampler != "hf":
            raise ConfigError(f"{where}: multi-turn rollouts run on the hf sampler for now; set generation.sampler=hf.")
        if factory is None and not environment.factory:
            raise ConfigError(f"{where}.factory is not set: name the environment factory (file.py:make_env).")
        self.tokenizer, self.sampling, self.config, self.device, self.where = tokenizer, sampling, environment, device, where
        self.factory = factory or load_environment(environment.factory)

    def sleep(self) -> None:
        """Nothing to free (the training model samples)."""

    def close(self) -> None:
        """Nothing to shut down."""

    def _call(self, pool, ep: _Episode, fn, arg):
        """``fn(arg)`` within what is left of the episode's environment time; None on timeout (episode stopped)."""
        left = self.config.timeout_s - ep.env_seconds
        start = time.perf_counter()
        future = pool.submit(fn, arg)
        try:
            return future.result(timeout=max(left, 0.0))
        except concurrent.futures.TimeoutError:
            ep.stop = "timeout"
            return None
        finally:
            ep.env_seconds += time.perf_counter() - start

    @torch.no_grad()
    def generate_episodes(self, model: torch.nn.Module, rows: Sequence[Mapping[str, Any]], *, seed: int | None = None,
                          logps: bool = False, any_running: Callable[[bool], bool] | None = None) -> Rollout:
        """``num_samples`` episodes per row; returns a :class:`Rollout` whose response is everything after the
        prompt, with ``action_mask`` (1 on sampled tokens) and ``episodes`` (:class:`Episodes`).

        ``any_running(flag)``: True on every process when ``flag`` is on any (e.g. an all-reduce). With several
        processes each keeps taking turns (a one-token dummy generate once its own episodes are over) until
        every process is done, since gathering ZeRO-3 weights for a generate is collective."""
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
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=min(32, max(1, len(prompt_index))))
        try:
            episodes = []
            for i in prompt_index.tolist():
                env = make_episode_env(self.factory, rows[i], self.where)
                ep = _Episode(env, [], [])
                first = self._call(pool, ep, env.reset, rows[i])
                messages = list(first) if first is not None else _row_messages(rows[i], self.where)
                tools = getattr(env, "tools", None)
                ep.messages = messages
                ep.prompt = list(tok(_render(tok, messages, tools, True), add_special_tokens=False)["input_ids"])
                episodes.append(ep)
            for turn in range(c.max_turns):
                active = [ep for ep in episodes if ep.stop is None]
                if not (any_running(bool(active)) if any_running is not None else active):
                    break
                if not active:  # other processes still sample: take part in the (collective) generate
                    HFSampler(tok, replace(self.sampling, max_new_tokens=1, **per_turn), device=self.device,
                              synced_gpus=True).generate(model, [[pad_id]], seed=seed)
                    continue
                room = [min(self.sampling.max_new_tokens, c.max_episode_tokens - len(ep.tokens)) for ep in active]
                turn_sampler = HFSampler(tok, replace(self.sampling, max_new_tokens=max(room), **per_turn),
                                         device=self.device, synced_gpus=True if zero3 else None)
                turn_seed = None if seed is None else (seed * 1_000_003 + turn) % 2**63
                out = turn_sampler.generate(model, [ep.prompt + ep.tokens for ep in active], seed=turn_seed,
                                            logps=logps)
                lengths = out.response_lengths.tolist()
                steps = []
                for j, ep in enumerate(active):
                    n = min(lengths[j], room[j])
                    ids = out.response_ids[j, :n].tolist()
                    ep.append(ids, True, out.sampler_logps[j, :n].tolist() if logps else None)
                    ep.turns += 1
                    ep.ended_with_eos = bool(ids) and ids[-1] in eos_ids
                    if not ep.ended_with_eos:  # cut by the turn's max_new_tokens or the episode's budget: the
                        # environment still sees (and may score) the cut turn, then the episode ends
                        ep.stop = "no_eos" if n >= self.sampling.max_new_tokens else "token_budget"
                    text = tok.decode(ids[:-1] if ep.ended_with_eos else ids, skip_special_tokens=False)
                    message = parse_assistant_turn(tok, text, getattr(ep.env, "tools", None))
                    steps.append((ep, message, pool.submit(_timed, ep.env.step, message)))
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
                    if len(ep.tokens) + len(ids) >= c.max_episode_tokens:  # no room left for another turn
                        ep.stop = "token_budget"
                        continue
                    ep.append(ids, False)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        return self._rollout(episodes, prompt_index, pad_id, logps)

    def _wait(self, ep: _Episode, future) -> StepResult | None:
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
        if not isinstance(result, StepResult):
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


def _timed(fn, arg) -> tuple[Any, float]:
    start = time.perf_counter()
    return fn(arg), time.perf_counter() - start


def _row_messages(row: Mapping[str, Any], where: str) -> list[dict]:
    prompt = row.get("prompt")
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list):
        return list(prompt)
    raise AgentEnvironmentError(f"{where}: reset() returned None and the row has no 'prompt' (messages or text) to "
                            "start the episode from; return the first messages from reset(row).")
