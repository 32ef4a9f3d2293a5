"""Reward models: how a (prompt, completion) pair becomes reward-model input and where its score is read
(:class:`RewardModelFraming`, shared with the reward-model trainer), and a scorer for sampled responses
(:class:`RewardModelScorer`) that works with a tokenizer other than the policy's."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch

from alignkit.config import ConfigError
from alignkit.data import attention_mask_from_lengths, pad
from alignkit.rewards.inputs import RewardInputs, prompt_text

logger = logging.getLogger("alignkit")

MEAN_KEY, STD_KEY = "alignkit_reward_mean", "alignkit_reward_std"  # written into the RM's config by its trainer


def encoder_special_tokens(tokenizer) -> tuple[int, int] | None:
    """(cls, sep) for BERT-style tokenizers that frame their inputs with them, else None."""
    cls, sep = getattr(tokenizer, "cls_token_id", None), getattr(tokenizer, "sep_token_id", None)
    if cls is None or sep is None:
        return None
    framed = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    return (cls, sep) if framed[:1] == [cls] and framed[-1:] == [sep] else None


class RewardModelFraming:
    """How a (prompt ids, completion ids) pair becomes one reward-model input row, and where its score is read.

    Causal LMs get ``prompt + completion``. Encoders (a tokenizer that frames its inputs with [CLS]/[SEP])
    get their pair form ``[CLS] prompt [SEP] completion [SEP]`` (with token type ids when the tokenizer makes
    them), the same as ``tokenizer(prompt, completion)`` gives at inference time. Rows longer than
    ``max_length`` lose prompt tokens from the left first, then completion tokens from the right. The score
    is read where transformers' classifier reads it: the last non-pad token for causal LMs, the first
    ([CLS]) token for encoders.
    """

    def __init__(self, pad_token_id: int, *, special_tokens: tuple[int, int] | None = None,
                 token_type_ids: bool = False, max_length: int | None = None):
        self.pad_token_id, self.special_tokens = pad_token_id, special_tokens
        self.token_type_ids, self.max_length = token_type_ids, max_length

    @classmethod
    def for_tokenizer(cls, tokenizer, *, pad_token_id: int | None = None, max_length: int | None = None
                      ) -> RewardModelFraming:
        special = encoder_special_tokens(tokenizer)
        return cls(tokenizer.pad_token_id if pad_token_id is None else pad_token_id, special_tokens=special,
                   token_type_ids=special is not None and "token_type_ids" in tokenizer.model_input_names,
                   max_length=max_length)

    def sequence(self, prompt: list[int], completion: list[int]) -> tuple[list[int], list[int]]:
        """(input_ids, token_type_ids) of one scored sequence; the prompt is cut from the left to fit."""
        if self.special_tokens is None:
            extra, ids_of = 0, (lambda p, c: (p + c, [0] * (len(p) + len(c))))
        else:
            cls, sep = self.special_tokens

            def ids_of(p, c):
                if not p:
                    return [cls] + c + [sep], [0] * (len(c) + 2)
                return [cls] + p + [sep] + c + [sep], [0] * (len(p) + 2) + [1] * (len(c) + 1)

            extra = 3 if prompt else 2
        if self.max_length is not None:
            over = len(prompt) + len(completion) + extra - self.max_length
            if over > 0:
                cut = min(over, len(prompt))
                prompt, over = prompt[cut:], over - cut
                if over > 0:
                    completion = completion[:len(completion) - over]
        return ids_of(list(prompt), list(completion))

    def batch(self, pairs: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        """input_ids / attention_mask (/ token_type_ids) of the framed pairs, right-padded."""
        seqs = [self.sequence(list(p), list(c)) for p, c in pairs]
        input_ids = pad([s for s, _ in seqs], self.pad_token_id)
        batch = {"input_ids": input_ids,
                 "attention_mask": attention_mask_from_lengths([len(s) for s, _ in seqs], input_ids.shape[1])}
        if self.token_type_ids:
            batch["token_type_ids"] = pad([t for _, t in seqs], 0)
        return batch

    @staticmethod
    def scores(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """One float32 reward per row of the batch."""
        kwargs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        try:
            logits = model(**kwargs, use_cache=False).logits  # causal LMs would build a KV cache otherwise
        except TypeError:  # a classifier whose forward has no use_cache
            logits = model(**kwargs).logits
        return logits[:, 0].float()


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
    trainer (:mod:`alignkit.methods.reward_model`) trains on, framed, truncated and scored by the same
    :class:`RewardModelFraming`:

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
        from alignkit.models import unwrap_model

        self.model, self.tokenizer, self.name, self.batch_size = model, tokenizer, name, batch_size
        config = unwrap_model(model).config
        self.reuse_ids = same_tokenizer(tokenizer, policy_tokenizer)
        limits = [n for n in (max_length, getattr(config, "max_position_embeddings", None),
                              getattr(tokenizer, "model_max_length", None)) if n and n < 10**7]
        self.max_length = min(limits) if limits else None
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else config.pad_token_id
        if pad_id is None:
            raise ConfigError(f"reward model {name}: its tokenizer has no pad token; set one (e.g. its eos).")
        self.framing = RewardModelFraming.for_tokenizer(tokenizer, pad_token_id=pad_id, max_length=self.max_length)
        self.mean, self.std = 0.0, 1.0
        if normalize:
            mean, std = getattr(config, MEAN_KEY, None), getattr(config, STD_KEY, None)
            if mean is None or std is None or not std > 0:
                where = getattr(config, "_name_or_path", "") or name
                raise ConfigError(
                    f"reward.model_normalize=true but the reward model's config ({where}/config.json) has no "
                    f"{MEAN_KEY} / positive {STD_KEY}; alignkit's reward-model trainer writes them. Add them "
                    "to config.json or set reward.model_normalize=false.")
            self.mean, self.std = float(mean), float(std)

    @classmethod
    def from_pretrained(cls, name_or_path: str, policy_tokenizer, *, device: torch.device | str | None = None,
                        dtype: str = "auto", prepare_model: Callable | None = None, **kwargs: Any) -> RewardModelScorer:
        """Load an RM folder / hub name / asset and its tokenizer; ``prepare_model`` places the model (e.g.
        ``lambda m: alignkit.training.prepare_frozen(accelerator, m)`` under ZeRO-3), else it goes to ``device``."""
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
        from alignkit.models import model_device, unwrap_model

        pairs = self.pairs(inputs)
        device = model_device(unwrap_model(self.model))
        scores = []
        for start in range(0, len(pairs), self.batch_size):
            batch = self.framing.batch(pairs[start:start + self.batch_size])
            scores.append(self.framing.scores(self.model, {k: v.to(device) for k, v in batch.items()}))
        return (torch.cat(scores) - self.mean) / self.std
