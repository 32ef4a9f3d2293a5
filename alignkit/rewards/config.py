"""The ``reward:`` section of online methods and rejection sampling, and the reward it builds."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from alignkit.config import ConfigError, check_choice, opt
from alignkit.rewards.answers import AnswerReward, FormatReward, check_answer_options
from alignkit.rewards.combine import NORMALIZE_CHOICES, CombinedReward
from alignkit.rewards.functions import FunctionReward
from alignkit.rewards.http import HTTPReward
from alignkit.rewards.model import RewardModelScorer


@dataclass
class RewardSourcesConfig:
    """Where rewards come from (a reward model, Python functions, an HTTP server: any mix, weighted) and how
    the sum is post-processed. YAML section ``reward:`` of the online methods and rejection sampling."""

    model: str | None = opt(None, "Reward model: a sequence-classifier folder, hub name or asset (scored with its own "
                                  "tokenizer; texts are re-tokenized when it differs from the policy's).")
    model_weight: float = opt(1.0, "Weight of the reward model's score in the sum.")
    model_normalize: bool = opt(False, "Standardise RM scores with the alignkit_reward_mean/std in its config.json.")
    model_batch_size: int = opt(16, "Responses per reward-model forward pass.")
    functions: list[str] = opt(factory=list, doc="Python reward functions, 'module:function' or 'file.py:function': "
                                                 "fn(prompts, completions, **row_fields) -> list[float].")
    function_weights: list[float] = opt(factory=list, doc="One weight per reward function (empty: 1.0 each).")
    url: str | None = opt(None, "HTTP reward endpoint: POST {prompts, completions, ...row fields} -> {rewards}.")
    url_weight: float = opt(1.0, "Weight of the HTTP endpoint's score in the sum.")
    url_timeout: float = opt(30.0, "Seconds to wait for the HTTP endpoint per attempt.")
    url_retries: int = opt(3, "Retries (with exponential backoff) on connection errors, timeouts and 5xx.")
    answer: str | None = opt(None, "The answer must be correct: math (math-verify equivalence), exact, regex (the "
                                   "reference is a regex) or reasoning_gym (the task's own verifier); 1 or 0 each. "
                                   "Needs pip install 'alignkit[reasoning]' for math and reasoning_gym.")
    answer_column: str = opt("answer", "Dataset column holding the reference answer for reward.answer.")
    answer_extract: str = opt("auto", "Which part of a completion is its answer: auto (last <answer></answer>, else last "
                                      "\\boxed{}, else all of it), tag, boxed, last_number, last_line, all.")
    answer_weight: float = opt(1.0, "Weight of the answer check in the sum.")
    format_pattern: str | None = opt(None, "Regex the whole completion must match for 1 (else 0), e.g. "
                                           "'<think>.*</think>\\s*<answer>.*</answer>'.")
    format_weight: float = opt(1.0, "Weight of the format check in the sum.")
    normalize: str = opt("none", "Normalise the summed reward: none, batch (this rollout's mean/std) or running "
                                 "(mean/std of all rewards so far).")
    clip: float | None = opt(None, "Clip the final reward to [-clip, clip] (None: no clipping).")
    missing_eos_penalty: float = opt(0.0, "Subtracted from the reward of responses that hit max_new_tokens without "
                                          "EOS (>= 0; e.g. 1.0).")

    def check(self, section: str = "reward", other_sources: bool = False) -> None:
        """Raise ConfigError naming ``section.key`` for a bad or missing value (no source at all is one, unless
        ``other_sources``: e.g. an environment's episode rewards)."""
        if not (self.model or self.functions or self.url or self.answer or self.format_pattern or other_sources):
            raise ConfigError(f"{section}: no reward source; set {section}.model, {section}.functions, "
                              f"{section}.url or {section}.answer.")
        if self.function_weights and len(self.function_weights) != len(self.functions):
            raise ConfigError(f"{section}.function_weights has {len(self.function_weights)} weights for "
                              f"{len(self.functions)} functions; give one per function or none.")
        check_answer_options(self.answer, self.answer_extract, self.format_pattern, section)
        check_choice(f"{section}.normalize", self.normalize, NORMALIZE_CHOICES)
        if self.clip is not None and self.clip < 0:
            raise ConfigError(f"{section}.clip={self.clip}: must be > 0 (or null for no clipping).")
        if self.missing_eos_penalty < 0:
            raise ConfigError(f"{section}.missing_eos_penalty={self.missing_eos_penalty}: give the penalty as a "
                              f"positive number ({-self.missing_eos_penalty}); it is subtracted.")
        if self.model_batch_size < 1 or self.url_retries < 0 or self.url_timeout <= 0:
            raise ConfigError(f"{section}: model_batch_size must be >= 1, url_retries >= 0 and url_timeout > 0.")

    def check_columns(self, rows: Sequence[Mapping], where: str, section: str = "reward") -> None:
        """Raise ConfigError when a reward function needs a column (a parameter without default) that rows of
        the data ``where`` lack, before any model loads; the function would stop at the first rollout."""
        for spec in self.functions:
            fn = FunctionReward(spec)
            for column in fn.required:
                lacking = sum(column not in row for row in rows)
                if not lacking:
                    continue
                columns = sorted({k for row in rows for k in row} - {"prompt", "prompt_ids"})
                which = (f"which the rows of {where} do not have (their columns besides the prompt: "
                         f"{', '.join(columns) or 'none'})" if lacking == len(rows)
                         else f"which {lacking} of the {len(rows)} rows of {where} lack")
                raise ConfigError(f"{section}.functions: {spec} needs the column {column!r} (a parameter of "
                                  f"{fn.name} without a default), {which}; add the column to the data, or give the "
                                  "parameter a default.")
        if self.answer:
            column = self.answer_column if self.answer != "reasoning_gym" else "reasoning_gym"
            lacking = sum(row.get(column) is None for row in rows)
            if lacking:
                columns = sorted({k for row in rows for k in row} - {"prompt", "prompt_ids"})
                fix = ("use a reasoning_gym: data source" if self.answer == "reasoning_gym" else
                       f"add the column to the data or set {section}.answer_column to the reference column")
                raise ConfigError(f"{section}.answer={self.answer} needs the column {column!r}, which {lacking} of "
                                  f"the {len(rows)} rows of {where} lack (their columns besides the prompt: "
                                  f"{', '.join(columns) or 'none'}); {fix}.")


def build_reward(cfg: RewardSourcesConfig, policy_tokenizer, device: torch.device | str | None = None, *,
                 dtype: str = "auto", prepare_model: Callable | None = None, section: str = "reward",
                 extra_sources: Sequence[tuple[str, Callable, float]] = ()) -> CombinedReward:
    """The CombinedReward of ``extra_sources`` (``(name, source, weight)``, e.g. an environment's episode
    rewards) and of ``cfg``: reward model (placed by ``prepare_model`` or moved to ``device``), functions, HTTP
    endpoint, answer check and format check, in that order."""
    cfg.check(section, other_sources=bool(extra_sources))
    sources: list[tuple[str, Callable, float]] = list(extra_sources)
    if cfg.model:
        scorer = RewardModelScorer.from_pretrained(
            cfg.model, policy_tokenizer, device=device, dtype=dtype, prepare_model=prepare_model,
            normalize=cfg.model_normalize, batch_size=cfg.model_batch_size)
        sources.append((scorer.name, scorer, cfg.model_weight))
    weights = cfg.function_weights or [1.0] * len(cfg.functions)
    for spec, weight in zip(cfg.functions, weights):
        fn = FunctionReward(spec)
        sources.append((fn.name, fn, weight))
    if cfg.url:
        http = HTTPReward(cfg.url, timeout=cfg.url_timeout, retries=cfg.url_retries)
        sources.append((http.name, http, cfg.url_weight))
    if cfg.answer:
        check = AnswerReward(cfg.answer, cfg.answer_column, cfg.answer_extract, section=section)
        sources.append((check.name, check, cfg.answer_weight))
    if cfg.format_pattern:
        sources.append((FormatReward.name, FormatReward(cfg.format_pattern, section=section), cfg.format_weight))
    return CombinedReward(sources, normalize=cfg.normalize, clip=cfg.clip,
                          missing_eos_penalty=cfg.missing_eos_penalty, policy_tokenizer=policy_tokenizer)
