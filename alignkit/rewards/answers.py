"""Rewards that check answers: ``reward.answer`` (is the answer correct?) and ``reward.format_pattern`` (is the
completion laid out as asked?), each 1.0 or 0.0 per completion (a reasoning-gym verifier may give partial
credit in between).

``reward.answer`` picks how the answer in a completion is compared with the dataset's reference
(``reward.answer_column``, ``answer`` by default):

- ``math``: `math-verify <https://github.com/huggingface/Math-Verify>`_ parses both (LaTeX, ``\\boxed{}``,
  plain expressions) and checks mathematical equivalence (``1/2`` = ``0.5`` = ``\\frac{2}{4}``);
- ``exact``: equal after trimming, collapsing whitespace, dropping a final period and ignoring case;
- ``regex``: the reference is a regular expression the answer must match in full;
- ``reasoning_gym``: the task's own verifier, for rows from a ``reasoning_gym:`` data source (their
  ``reasoning_gym`` column names the task and item; :mod:`alignkit.data.reasoning_gym`).

Which part of the completion is the answer (``reward.answer_extract``): ``auto`` takes the last
``<answer>...</answer>`` when there is one, else the last ``\\boxed{...}``, else the whole completion (``math``
then lets math-verify find the final expression itself); ``tag``, ``boxed``, ``last_number``, ``last_line``
and ``all`` force one rule. A completion with nothing to extract scores 0.

The optional dependencies (math-verify, reasoning-gym) are ``pip install 'alignkit[reasoning]'``.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from typing import Any

import torch

from alignkit.config import ConfigError, check_choice
from alignkit.rewards.inputs import RewardError, RewardInputs, as_scores

logger = logging.getLogger("alignkit")

ANSWER_KINDS = ("math", "exact", "regex", "reasoning_gym")
EXTRACT_CHOICES = ("auto", "tag", "boxed", "last_number", "last_line", "all")
INSTALL_HINT = "pip install 'alignkit[reasoning]'"

_TAG = re.compile(r"<answer>(.*?)</answer>", re.S | re.I)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def last_boxed(text: str) -> str | None:
    r"""The content of the last ``\boxed{...}`` (or ``\fbox{...}``) in ``text``, braces balanced; None if none."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None


def extract_answer(completion: str, how: str = "auto") -> str | None:
    """The answer part of ``completion`` by rule ``how`` (module docstring); None when there is none."""
    if how in ("auto", "tag"):
        tags = _TAG.findall(completion)
        if tags:
            return tags[-1].strip()
        if how == "tag":
            return None
    if how in ("auto", "boxed"):
        boxed = last_boxed(completion)
        if boxed is not None:
            return boxed.strip()
        if how == "boxed":
            return None
    if how == "last_number":
        numbers = _NUMBER.findall(completion)
        return numbers[-1].replace(",", "") if numbers else None
    if how == "last_line":
        lines = [line.strip() for line in completion.strip().splitlines() if line.strip()]
        return lines[-1] if lines else None
    if how not in ("auto", "all"):
        raise ValueError(f"extract_answer: unknown rule {how!r}; use one of {', '.join(EXTRACT_CHOICES)}.")
    return completion.strip() or None


def normalize_text(text: str) -> str:
    """Trimmed, whitespace collapsed, one final period dropped, lower case (``exact`` compares these)."""
    return " ".join(text.split()).removesuffix(".").strip().lower()


def _math_verify() -> tuple[Callable, Callable]:
    try:
        from math_verify import parse, verify
    except ImportError as e:
        from alignkit.models import MissingPackageError

        raise MissingPackageError(f"reward.answer=math needs math-verify: {INSTALL_HINT} ({e}).") from e
    return parse, verify


def math_equal(answer: str | None, reference: str, *, bare: bool = True) -> bool:
    """Whether math-verify finds ``answer`` equivalent to ``reference``.

    ``bare``: ``answer`` is just the answer (from a tag or a box), read as ``\\boxed{answer}`` as the
    reference is (math-verify reads a bare ``2\\sqrt{2}`` as 2 and a bare ``x+1`` not at all); otherwise it is
    a whole completion, in which math-verify finds the final expression itself. A reference that has its own
    ``$...$`` or ``\\boxed{}`` is read as written.
    """
    if not answer:
        return False
    parse, verify = _math_verify()
    # math-verify's timeouts use signal.alarm, which only works in the main thread
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    gold = parse(_boxed(reference), parsing_timeout=timeout) or parse(reference, parsing_timeout=timeout)
    if not gold:
        raise ValueError(f"math-verify cannot parse the reference answer {reference!r}")
    guess = parse(_boxed(answer) if bare else answer, parsing_timeout=timeout)
    return bool(guess) and bool(verify(gold, guess, timeout_seconds=timeout))


def _boxed(text: str) -> str:
    return text if "$" in text or "\\boxed" in text else f"\\boxed{{{text}}}"


def check_answer_options(answer: str | None, extract: str, format_pattern: str | None, section: str = "reward") -> None:
    """ConfigError naming ``section.answer`` / ``answer_extract`` / ``format_pattern`` for a bad value, and a
    MissingPackageError naming the pip command when ``answer`` needs a library that is not installed: at
    config time, before any model loads."""
    if answer is not None:
        AnswerReward(answer, extract=extract, section=section)
    if format_pattern is not None:
        FormatReward(format_pattern, section=section)


class AnswerReward:
    """``reward.answer``: 1.0 when a completion's answer is correct, else 0.0 (module docstring).

    ``kind`` is one of :data:`ANSWER_KINDS`; ``column`` the dataset column with the reference answer (for
    ``reasoning_gym``: the row's ``reasoning_gym`` field, whatever ``column`` says); ``extract`` one of
    :data:`EXTRACT_CHOICES`. Missing libraries are reported when the source is built, not at the first rollout.
    """

    def __init__(self, kind: str, column: str = "answer", extract: str = "auto", section: str = "reward"):
        check_choice(f"{section}.answer", kind, ANSWER_KINDS)
        check_choice(f"{section}.answer_extract", extract, EXTRACT_CHOICES)
        self.kind, self.extract, self.section = kind, extract, section
        self.column = "reasoning_gym" if kind == "reasoning_gym" else column
        self.name = f"answer_{kind}"
        self._unparsed_warned = False
        if kind == "math":
            _math_verify()
        elif kind == "reasoning_gym":
            from alignkit.data.reasoning_gym import import_reasoning_gym

            import_reasoning_gym()

    @property
    def columns(self) -> tuple[str, ...]:
        """The dataset columns this source reads."""
        return (self.column,)

    def references(self, inputs: RewardInputs) -> list[Any]:
        """The reference of each completion (the ``column`` values), or a RewardError naming the column."""
        values = inputs.row_fields.get(self.column)
        missing = list(range(len(inputs))) if values is None else [i for i, v in enumerate(values) if v is None]
        if missing:
            have = sorted(inputs.row_fields) or ["none besides the prompt"]
            fix = ("use a reasoning_gym: data source" if self.kind == "reasoning_gym" else
                   f"rename the reference column with the source's columns: {{YOUR_COLUMN: {self.column}}} or set "
                   f"{self.section}.answer_column")
            raise RewardError(f"{self.section}.answer={self.kind} needs the column {self.column!r}, which "
                              f"{'the data does not have' if values is None else f'is empty in {len(missing)} rows'} "
                              f"(columns: {', '.join(have)}); {fix}.")
        return values

    def score_one(self, completion: str, reference: Any) -> float:
        if self.kind == "reasoning_gym":
            from alignkit.data.reasoning_gym import score_answer

            return score_answer(extract_answer(completion, self.extract), reference)
        answer = extract_answer(completion, self.extract)
        if answer is None:
            return 0.0
        reference = str(reference)
        if self.kind == "exact":
            return float(normalize_text(answer) == normalize_text(reference))
        if self.kind == "regex":
            try:
                return float(re.fullmatch(reference, answer.strip(), re.S) is not None)
            except re.error as e:
                raise RewardError(f"{self.section}.answer=regex: the reference {reference!r} in column "
                                  f"{self.column!r} is not a valid regular expression ({e}).") from e
        whole = self.extract in ("all", "last_line") or (self.extract == "auto" and answer == completion.strip())
        try:
            return float(math_equal(answer, reference, bare=not whole))
        except ValueError as e:  # an unparseable reference: 0, and say so once
            if not self._unparsed_warned:
                logger.warning("%s.answer=math: %s (column %r); such rows score 0.", self.section, e, self.column)
                self._unparsed_warned = True
            return 0.0

    def __call__(self, inputs: RewardInputs) -> torch.Tensor:
        refs = self.references(inputs)
        return as_scores([self.score_one(c, r) for c, r in zip(inputs.completions, refs)], len(inputs),
                         f"{self.section}.answer={self.kind}")


class FormatReward:
    """``reward.format_pattern``: 1.0 when the whole completion (trimmed) matches the regular expression
    ``pattern`` (``re.fullmatch``, ``.`` matching newlines too), else 0.0; e.g.
    ``<think>.*</think>\\s*<answer>.*</answer>`` for a reasoning-then-answer layout."""

    name = "format"

    def __init__(self, pattern: str, section: str = "reward"):
        try:
            self.pattern = re.compile(pattern, re.S)
        except re.error as e:
            raise ConfigError(f"{section}.format_pattern={pattern!r} is not a valid regular expression ({e}).") from e

    def __call__(self, inputs: RewardInputs) -> torch.Tensor:
        return torch.tensor([float(self.pattern.fullmatch(c.strip()) is not None) for c in inputs.completions],
                            dtype=torch.float32)
