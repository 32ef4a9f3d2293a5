"""The ``hf`` sampler: ``model.generate`` on the training model itself."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence

import torch

from alignkit.data import attention_mask_from_lengths, pad
from alignkit.models import eval_mode, model_device, unwrap_model
from alignkit.rollout.batch import Rollout, build_rollout, check_prompts, eos_token_ids, pad_token_id
from alignkit.rollout.config import SamplingConfig
from alignkit.rollout.fsdp2 import unsharded
from alignkit.rollout.zero3 import gathered_parameters, zero3_params


@contextlib.contextmanager
def _clean_generation_config(model: torch.nn.Module) -> Iterator[None]:
    """Hide the checkpoint's generation_config.json defaults during generate.

    transformers fills every option we leave unset from the model's generation config (a hub
    repetition_penalty, min_p, min_length, ...); those would change the sampling distribution behind the
    RL log-probs' back. A blank config leaves only what :class:`SamplingConfig` says.
    """
    from transformers import GenerationConfig

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    original = getattr(base, "generation_config", None)
    if original is None:
        yield
        return
    base.generation_config = GenerationConfig()
    try:
        yield
    finally:
        base.generation_config = original


class HFSampler:
    """Rollouts with ``model.generate`` on the training model.

    - Prompts are left-padded here (built directly from the ids; the tokenizer's padding side is not
      touched) and positions follow the attention mask, so a prompt's response does not depend on
      the other prompts of its batch.
    - ``num_samples`` copies of each prompt are consecutive rows; batches of ``batch_size`` sequences
      bound the KV-cache memory. With ``share_prefill`` each prompt's prefill runs once and its KV cache
      is copied to its rows (``batch_size`` a multiple of ``num_samples``; a smaller batch is rounded
      down to whole groups).
    - Stops at any eos id of the tokenizer and of the model's (generation) config.
    - The model runs in eval mode with ``use_cache=True`` and goes back to its previous mode after.
    - Works on plain and PEFT models and on accelerate/DDP/DeepSpeed wrappers (unwrapped here). Under
      DeepSpeed ZeRO-3 the full weights are gathered once per rollout (:func:`gathered_parameters`):
      fast, but every GPU then holds the whole model besides its shard, optimizer state and KV cache.
      With ``zero3_gather: false`` each forward fetches layers as in training (fits any model that
      trains, one all-gather per layer per token: slow) and ``synced_gpus`` keeps processes in step;
      then every process must run the same number of batches. Under FSDP2 the full weights are always
      gathered once per rollout (:func:`~alignkit.rollout.fsdp2.unsharded`; ``zero3_gather`` is ZeRO-3's).
    - Sampling ignores the checkpoint's generation_config.json (repetition penalties etc.): the
      samples come from ``softmax(logits / temperature)`` with top-k/top-p only.
    - ``generate(..., logps=True)`` also returns each sampled token's log-prob under that distribution
      (``Rollout.sampler_logps``), from generate's processed scores: they hold one ``[rows, vocab]``
      tensor per generated token until the batch ends, so ask only when needed.
    """

    def __init__(self, tokenizer, config: SamplingConfig, device: torch.device | str | None = None,
                 synced_gpus: bool | None = None):
        """``synced_gpus``: under ZeRO-3, keep every process's generate in step (each runs forwards until all
        are done); None = only with per-layer fetches (``zero3_gather: false``). Multi-turn rollouts set it,
        since their processes sample turns of different lengths."""
        config.check()
        self.tokenizer, self.config, self.device, self.synced_gpus = tokenizer, config, device, synced_gpus

    def sleep(self) -> None:
        """Nothing to free: the training model itself samples (the vLLM sampler frees its memory here)."""

    def close(self) -> None:
        """Nothing to shut down (the vLLM sampler stops its engine here)."""

    def _generation_config(self, eos_ids: list[int], pad_id: int, logps: bool = False):
        from transformers import GenerationConfig

        c = self.config
        kwargs = dict(max_new_tokens=c.max_new_tokens, eos_token_id=eos_ids, pad_token_id=pad_id, use_cache=True,
                      num_beams=1, num_return_sequences=1, output_scores=logps, return_dict_in_generate=logps)
        if c.greedy:
            kwargs.update(do_sample=False)
        else:
            kwargs.update(do_sample=True, temperature=c.temperature, top_p=c.top_p, top_k=c.top_k)
        return GenerationConfig(**kwargs)

    @torch.no_grad()
    def generate(self, model: torch.nn.Module, prompts: Sequence[Sequence[int]], *, seed: int | None = None,
                 logps: bool = False) -> Rollout:
        """Sample ``num_samples`` responses for each prompt (unpadded token-id lists).

        ``seed`` makes the sampling reproducible without touching the global RNG; None draws from the
        global RNG (seeded by ``training.seed``). ``logps``: fill ``Rollout.sampler_logps``.
        """
        prompts = check_prompts(prompts)
        k = self.config.num_samples
        prompt_index = torch.arange(len(prompts)).repeat_interleave(k)
        expanded = [prompts[i] for i in prompt_index.tolist()]
        inner = unwrap_model(model)
        eos_ids = eos_token_ids(self.tokenizer, inner)
        pad_id = pad_token_id(self.tokenizer, eos_ids)
        gen_config = self._generation_config(eos_ids, pad_id, logps)
        step = self.config.batch_size or len(expanded)
        zero3 = bool(zero3_params(model))
        gather = self.config.zero3_gather
        # One prefill per prompt, its KV cache copied to the prompt's k rows (chunks rounded down to whole
        # groups). Not with per-layer ZeRO-3 fetches (synced_gpus) nor for one-token prompts (no prefix).
        share = (self.config.share_prefill and k > 1 and step >= k and not (zero3 and not gather)
                 and min(map(len, prompts)) > 1)
        if share:
            step -= step % k

        responses: list[list[int]] = []
        response_logps: list[list[float]] | None = [] if logps else None
        with contextlib.ExitStack() as stack:
            stack.enter_context(eval_mode(inner))
            stack.enter_context(_clean_generation_config(inner))
            if zero3 and gather:  # only what generates: PPO's engine also holds the critic
                stack.enter_context(gathered_parameters(model, part=getattr(inner, "sampled_module", None)))
            stack.enter_context(unsharded(inner))  # FSDP2 only; all of it: PPO's shared prefill runs the critic
            device = torch.device(self.device) if self.device is not None else model_device(inner)
            if seed is not None:
                devices = [device] if device.type == "cuda" else []
                stack.enter_context(torch.random.fork_rng(devices=devices))
                torch.manual_seed(seed)
            for start in range(0, len(expanded), step):
                chunk = expanded[start:start + step]
                ids = pad(chunk, pad_id, side="left").to(device)
                mask = attention_mask_from_lengths([len(p) for p in chunk], side="left").to(device)
                cache = _shared_prefill(inner, ids[::k], mask[::k], k) if share else None
                synced = zero3 and (not gather if self.synced_gpus is None else self.synced_gpus)
                out = inner.generate(input_ids=ids, attention_mask=mask, **_cache_kwarg(inner, cache),
                                     generation_config=gen_config, synced_gpus=synced)
                sequences = out.sequences if logps else out
                new_tokens = sequences[:, ids.shape[1]:]
                responses += new_tokens.tolist()
                if response_logps is not None:
                    response_logps += _token_logps(out.scores, new_tokens).tolist()
        return build_rollout(expanded, responses, prompt_index, eos_ids, pad_id, self.tokenizer, device,
                             logps=response_logps)


def _shared_prefill(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, k: int):
    """The KV cache of every prompt but its last token, computed once per prompt and repeated for its
    ``k`` samples; ``generate`` then starts from the last prompt token. Returns None where the model's
    cache cannot be repeated (generate then prefills every row itself).

    Left padding puts every prompt's last token in the last column, so the prefix is ``ids[:, :-1]``; its
    positions follow the mask as generate's would (padding at position 1, masked out either way).
    """
    prefix_mask = mask[:, :-1]
    positions = (prefix_mask.long().cumsum(-1) - 1).masked_fill(prefix_mask == 0, 1)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(base.forward).parameters else {}
    out = model(input_ids=ids[:, :-1], attention_mask=prefix_mask, position_ids=positions, use_cache=True, **head)
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    if cache is None or not hasattr(cache, "batch_repeat_interleave"):
        return None
    cache.batch_repeat_interleave(k)
    return cache


def _cache_kwarg(model: torch.nn.Module, cache) -> dict:
    """``{name: cache}`` under the name this transformers takes (``cache`` from 5.2x, ``past_key_values``
    before), or nothing."""
    if cache is None:
        return {}
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {"cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values": cache}


def _token_logps(scores: Sequence[torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """``[rows, steps]`` log-probs of ``tokens`` under generate's processed scores (one ``[rows, vocab]``
    tensor per step: logits / temperature, top-k/top-p filtered to -inf), one step at a time."""
    columns = [torch.log_softmax(step.float(), -1).gather(-1, tokens[:, t:t + 1]) for t, step in enumerate(scores)]
    return torch.cat(columns, 1) if columns else tokens.new_zeros(tokens.shape, dtype=torch.float32)
