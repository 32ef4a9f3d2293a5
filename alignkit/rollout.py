"""Rollout engines: sample responses from the current policy for PPO / RLOO / GRPO / REINFORCE++,
rejection sampling and on-policy distillation (GKD).

Two engines share one interface, ``engine.generate(model, prompts, seed=None) -> Rollout``:

- :class:`HFGenerateEngine` (``engine: hf``, the default): ``model.generate`` with a KV cache, in
  micro-batches, on the training model itself (plain, LoRA, DDP- or DeepSpeed-wrapped).
- :class:`VLLMEngine` (``engine: vllm``, optional extra): a vLLM instance colocated on each training
  process; the policy's weights are pushed into it before every rollout.

Layout of a :class:`Rollout` (``N`` = prompts x ``num_samples``; all tensors on the model's device)::

    prompt_ids    [N, P]  LEFT-padded with pad_token_id     prompt_mask   [N, P]  1 on real prompt tokens
    response_ids  [N, R]  RIGHT-padded with pad_token_id    response_mask [N, R]  1 on real response tokens,
                                                                                 the EOS token included
    ended_with_eos [N] bool    prompt_index [N] long (which prompt each row answers)
    response_texts list[str] (decoded without special tokens)

``torch.cat([prompt_ids, response_ids], 1)`` (:meth:`Rollout.sequences`) puts every response right
after its prompt at the same column ``P`` in every row, so response-token log-probs are the logits of
columns ``P-1 .. P+R-2`` — one slice for the whole batch, no per-row gather. Positions must follow the
attention mask (:meth:`Rollout.position_ids`), as they did during generation.

The ``num_samples`` samples of one prompt are consecutive rows (``repeat_interleave`` order:
``[p0_s0, p0_s1, ..., p1_s0, ...]``), the layout :mod:`alignkit.losses.rl` expects for RLOO/GRPO groups.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from alignkit.config import ConfigError, opt

logger = logging.getLogger("alignkit")

ENGINES = ("hf", "vllm")


@dataclass
class GenerationConfig:
    """How rollouts are sampled. RL method configs embed these fields (e.g. ``grpo.num_samples``)."""

    max_new_tokens: int = opt(128, "Most tokens generated per response; a response cut here has ended_with_eos=False.")
    temperature: float = opt(1.0, "Sampling temperature (0 = greedy). RL log-probs assume the same temperature.")
    top_p: float = opt(1.0, "Nucleus sampling: keep the smallest token set with this much probability (1 = off).")
    top_k: int = opt(0, "Keep only the k most likely tokens (0 = off).")
    num_samples: int = opt(1, "Responses sampled per prompt (the group size of RLOO/GRPO); consecutive rows.")
    do_sample: bool = opt(True, "Sample; false = greedy decoding (temperature/top_p/top_k ignored).")
    generation_batch_size: int = opt(0, "Sequences (prompts x samples) per generate call; 0 = all at once. "
                                        "Lower it when generation runs out of memory.")
    engine: str = opt("hf", "Rollout engine: hf (model.generate on the training model) or vllm (pip install alignkit[vllm]).")
    zero3_gather: bool = opt(True, "Under DeepSpeed ZeRO-3, gather the full weights once per rollout (fast; every GPU "
                                   "holds the whole model while generating). false: fetch layer by layer per token (slow).")
    vllm_gpu_memory_utilization: float = opt(0.3, "Fraction of GPU memory vLLM may take (weights + KV cache), next to training.")
    vllm_tensor_parallel_size: int = opt(1, "GPUs one vLLM instance spans; must divide the number of training processes.")
    vllm_max_model_len: int | None = opt(None, "vLLM context length (prompt + response); None = the model's maximum.")

    def validate_generation(self, section: str = "generation") -> None:
        """Raise ConfigError naming ``section.key`` for a bad value."""
        if self.engine not in ENGINES:
            raise ConfigError(f"{section}.engine={self.engine!r} is not valid; choose one of: {', '.join(ENGINES)}.")
        checks = [
            ("max_new_tokens", self.max_new_tokens >= 1, "at least 1"),
            ("num_samples", self.num_samples >= 1, "at least 1"),
            ("temperature", self.temperature >= 0, ">= 0 (0 = greedy)"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("top_k", self.top_k >= 0, ">= 0 (0 = off)"),
            ("generation_batch_size", self.generation_batch_size >= 0, ">= 0 (0 = all at once)"),
            ("vllm_gpu_memory_utilization", 0 < self.vllm_gpu_memory_utilization <= 1, "in (0, 1]"),
            ("vllm_tensor_parallel_size", self.vllm_tensor_parallel_size >= 1, "at least 1"),
        ]
        for key, ok, rule in checks:
            if not ok:
                raise ConfigError(f"{section}.{key}={getattr(self, key)!r}: must be {rule}.")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0


# --------------------------------------------------------------------------------------------------
# The rollout batch
# --------------------------------------------------------------------------------------------------


@dataclass
class Rollout:
    """Prompts and sampled responses, padded for training (layout in the module docstring)."""

    prompt_ids: torch.Tensor  # [N, P] left-padded
    prompt_mask: torch.Tensor  # [N, P]
    response_ids: torch.Tensor  # [N, R] right-padded
    response_mask: torch.Tensor  # [N, R], 1 on response tokens including EOS
    ended_with_eos: torch.Tensor  # [N] bool; False = cut at max_new_tokens
    prompt_index: torch.Tensor  # [N] long
    response_texts: list[str]

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    @property
    def num_prompts(self) -> int:
        return int(self.prompt_index.max()) + 1 if len(self) else 0

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.response_mask.sum(1)

    def sequences(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) ``[N, P+R]`` of ``[prompt | response]``; responses start at column P."""
        return (torch.cat([self.prompt_ids, self.response_ids], 1),
                torch.cat([self.prompt_mask, self.response_mask], 1))

    def position_ids(self) -> torch.Tensor:
        """Positions of :meth:`sequences` counted over real tokens only (what ``generate`` used), 0 on padding."""
        mask = torch.cat([self.prompt_mask, self.response_mask], 1).long()
        return (mask.cumsum(1) - 1).masked_fill(mask == 0, 0)

    def to(self, device: torch.device | str) -> Rollout:
        tensors = {k: getattr(self, k).to(device) for k in
                   ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "ended_with_eos", "prompt_index")}
        return Rollout(**tensors, response_texts=self.response_texts)


def eos_token_ids(tokenizer, model=None) -> list[int]:
    """Every end-of-sequence id: the tokenizer's eos and the model's (generation) config eos ids."""
    ids: list[int] = []
    sources = [getattr(tokenizer, "eos_token_id", None)]
    if model is not None:
        sources += [getattr(getattr(model, "generation_config", None), "eos_token_id", None),
                    getattr(getattr(model, "config", None), "eos_token_id", None)]
    for value in sources:
        for i in value if isinstance(value, (list, tuple)) else [value]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    if not ids:
        raise ValueError("neither the tokenizer nor the model defines an eos token, so responses cannot end; "
                         "set tokenizer.eos_token (e.g. the chat template's end-of-turn token).")
    return ids


def _pad_id(tokenizer, eos_ids: list[int]) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]


def _check_prompts(prompts: Sequence[Sequence[int]]) -> list[list[int]]:
    if torch.is_tensor(prompts):
        raise TypeError("prompts must be a list of token-id lists without padding (e.g. the rows' prompt_ids), "
                        "not a padded tensor.")
    out = [list(map(int, p)) for p in prompts]
    empty = [i for i, p in enumerate(out) if not p]
    if not out or empty:
        raise ValueError(f"prompts {empty} are empty; every prompt needs at least one token." if empty
                         else "no prompts to generate from.")
    return out


def build_rollout(prompts: list[list[int]], responses: list[list[int]], prompt_index: torch.Tensor,
                  eos_ids: Sequence[int], pad_id: int, tokenizer, device: torch.device | str = "cpu") -> Rollout:
    """A :class:`Rollout` from unpadded token lists; each response is cut after its first EOS token."""
    eos = set(eos_ids)
    cut, ended = [], []
    for r in responses:
        end = next((i for i, t in enumerate(r) if t in eos), None)
        cut.append(list(r) if end is None else list(r[: end + 1]))
        ended.append(end is not None)
    P = max(len(p) for p in prompts)
    R = max([len(r) for r in cut] + [1])  # at least one column: an all-empty batch still has shape [N, 1]
    prompt_ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((len(prompts), P), dtype=torch.long)
    response_ids = torch.full((len(prompts), R), pad_id, dtype=torch.long)
    response_mask = torch.zeros((len(prompts), R), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, cut)):
        prompt_ids[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
        prompt_mask[i, P - len(p):] = 1
        if r:
            response_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            response_mask[i, : len(r)] = 1
    return Rollout(
        prompt_ids=prompt_ids.to(device), prompt_mask=prompt_mask.to(device),
        response_ids=response_ids.to(device), response_mask=response_mask.to(device),
        ended_with_eos=torch.tensor(ended, dtype=torch.bool, device=device),
        prompt_index=prompt_index.to(device),
        response_texts=tokenizer.batch_decode(cut, skip_special_tokens=True),
    )


# --------------------------------------------------------------------------------------------------
# Unwrapping and ZeRO-3 gathering
# --------------------------------------------------------------------------------------------------


def _is_deepspeed_engine(model) -> bool:
    # by class name: importing deepspeed just to check costs seconds
    return any(c.__name__ == "DeepSpeedEngine" for c in type(model).__mro__)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP / DataParallel / DeepSpeedEngine / torch.compile wrappers (a PeftModel stays one)."""
    while True:
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)) \
                or _is_deepspeed_engine(model):
            model = model.module
        elif "_orig_mod" in getattr(model, "__dict__", {}).get("_modules", {}):
            model = model._orig_mod
        else:
            return model


def _zero3_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Parameters partitioned by DeepSpeed ZeRO-3 (they carry ``ds_id``); empty otherwise."""
    return [p for p in model.parameters() if hasattr(p, "ds_id")]


def _zero3_hook_owner(model):
    """The DeepSpeed object holding the ZeRO-3 fetch/release module hooks of an engine, or None."""
    if not _is_deepspeed_engine(model):
        return None
    optimizer = getattr(model, "optimizer", None)
    owner = getattr(optimizer, "parameter_offload", optimizer)
    return owner if hasattr(owner, "forward_hooks") and hasattr(owner, "_register_deepspeed_module") else None


@contextlib.contextmanager
def gathered_parameters(model: torch.nn.Module) -> Iterator[bool]:
    """Full (un-partitioned) parameters of a ZeRO-3 model inside the block; a no-op for other models.

    Yields whether it gathered. One all-gather for the whole block instead of one per layer per forward,
    so generation runs at normal speed; the price is memory: every GPU holds all the weights (in the
    training dtype) for the duration. ZeRO-3's per-module hooks are removed meanwhile (they would
    re-partition after each forward) and registered again after. A collective: every process must enter.
    """
    params = _zero3_params(model)
    if not params:
        yield False
        return
    import deepspeed

    owner = _zero3_hook_owner(model)
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        if owner is not None:
            for hook in owner.forward_hooks + owner.backward_hooks:
                hook.remove()
            owner.forward_hooks, owner.backward_hooks = [], []
        try:
            yield True
        finally:
            if owner is not None:
                coordinator = getattr(owner, "param_coordinator", None)
                if coordinator is not None and not coordinator.is_invalid_trace():
                    coordinator._invalidate_trace()  # the recorded fetch order no longer matches
                owner._register_deepspeed_module(owner.module)


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode (no dropout; gradient checkpointing inactive, so the KV cache works) and back."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def _clean_generation_config(model: torch.nn.Module) -> Iterator[None]:
    """Hide the checkpoint's generation_config.json defaults during generate.

    transformers fills every option we leave unset from the model's generation config (a hub
    repetition_penalty, min_p, min_length, ...); those would change the sampling distribution behind the
    RL log-probs' back. A blank config leaves only what :class:`GenerationConfig` says.
    """
    from transformers import GenerationConfig as HFGenerationConfig

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    original = getattr(base, "generation_config", None)
    if original is None:
        yield
        return
    base.generation_config = HFGenerationConfig()
    try:
        yield
    finally:
        base.generation_config = original


def _model_device(model: torch.nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


@contextlib.contextmanager
def _gathered(params: list[torch.nn.Parameter]) -> Iterator[None]:
    """These parameters in full inside the block when ZeRO-3 partitions them; a no-op otherwise."""
    if not any(hasattr(p, "ds_id") for p in params):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def merged_lora_weights(peft_model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(base checkpoint name, tensor) of every base weight of a PEFT LoRA model with its active adapters
    folded in, as new tensors (the model is not modified). LoRA tensors themselves are left out."""
    deltas: dict[str, torch.Tensor] = {}
    for module_name, module in peft_model.named_modules():
        if not hasattr(module, "get_delta_weight") or not hasattr(module, "base_layer"):
            continue
        for adapter in module.active_adapters:
            if adapter not in module.lora_A and adapter not in getattr(module, "lora_embedding_A", {}):
                continue
            if getattr(module, "use_dora", {}).get(adapter):
                raise NotImplementedError("syncing a DoRA adapter into vLLM is not supported; use engine: hf.")
            key = f"{module_name}.base_layer.weight"
            deltas[key] = deltas.get(key, 0) + module.get_delta_weight(adapter)
    prefix = getattr(peft_model, "prefix", "lora_")
    out = []
    for name, param in peft_model.named_parameters():
        if prefix in name or "original_module" in name:
            continue
        weight = param.data + deltas[name].to(param.dtype) if name in deltas else param.data
        clean = name.removeprefix("base_model.model.").replace(".base_layer", "")
        out.append((clean.replace("modules_to_save.default.", ""), weight))
    return out


# --------------------------------------------------------------------------------------------------
# Engines
# --------------------------------------------------------------------------------------------------


class HFGenerateEngine:
    """Rollouts with ``model.generate`` on the training model.

    - Prompts are left-padded here (built directly from the ids; the tokenizer's padding side is not
      touched) and positions follow the attention mask, so a prompt's response does not depend on
      the other prompts of its batch.
    - ``num_samples`` copies of each prompt are consecutive rows; micro-batches of
      ``generation_batch_size`` sequences bound the KV-cache memory.
    - Stops at any eos id of the tokenizer and of the model's (generation) config.
    - The model runs in eval mode with ``use_cache=True`` and goes back to its previous mode after.
    - Works on plain and PEFT models and on accelerate/DDP/DeepSpeed wrappers (unwrapped here). Under
      DeepSpeed ZeRO-3 the full weights are gathered once per rollout (:func:`gathered_parameters`):
      fast, but every GPU then holds the whole model besides its shard, optimizer state and KV cache.
      With ``zero3_gather: false`` each forward fetches layers as in training (fits any model that
      trains, one all-gather per layer per token: slow) and ``synced_gpus`` keeps processes in step;
      then every process must run the same number of micro-batches.
    - Sampling ignores the checkpoint's generation_config.json (repetition penalties etc.): the
      samples come from ``softmax(logits / temperature)`` with top-k/top-p only.
    """

    def __init__(self, tokenizer, config: GenerationConfig, device: torch.device | str | None = None):
        config.validate_generation()
        self.tokenizer, self.config, self.device = tokenizer, config, device

    def _hf_generation_config(self, eos_ids: list[int], pad_id: int):
        from transformers import GenerationConfig as HFGenerationConfig

        c = self.config
        kwargs = dict(max_new_tokens=c.max_new_tokens, eos_token_id=eos_ids, pad_token_id=pad_id, use_cache=True,
                      num_beams=1, num_return_sequences=1)
        if c.greedy:
            kwargs.update(do_sample=False)
        else:
            kwargs.update(do_sample=True, temperature=c.temperature, top_p=c.top_p, top_k=c.top_k)
        return HFGenerationConfig(**kwargs)

    @torch.no_grad()
    def generate(self, model: torch.nn.Module, prompts: Sequence[Sequence[int]], *, seed: int | None = None) -> Rollout:
        """Sample ``num_samples`` responses for each prompt (unpadded token-id lists).

        ``seed`` makes the sampling reproducible without touching the global RNG; None draws from the
        global RNG (seeded by ``training.seed``).
        """
        prompts = _check_prompts(prompts)
        k = self.config.num_samples
        prompt_index = torch.arange(len(prompts)).repeat_interleave(k)
        expanded = [prompts[i] for i in prompt_index.tolist()]
        inner = unwrap(model)
        eos_ids = eos_token_ids(self.tokenizer, inner)
        pad_id = _pad_id(self.tokenizer, eos_ids)
        gen_config = self._hf_generation_config(eos_ids, pad_id)
        step = self.config.generation_batch_size or len(expanded)
        zero3 = bool(_zero3_params(model))
        gather = self.config.zero3_gather

        responses: list[list[int]] = []
        with contextlib.ExitStack() as stack:
            stack.enter_context(_eval_mode(inner))
            stack.enter_context(_clean_generation_config(inner))
            if zero3 and gather:
                stack.enter_context(gathered_parameters(model))
            device = torch.device(self.device) if self.device is not None else _model_device(inner)
            if seed is not None:
                devices = [device] if device.type == "cuda" else []
                stack.enter_context(torch.random.fork_rng(devices=devices))
                torch.manual_seed(seed)
            for start in range(0, len(expanded), step):
                chunk = expanded[start:start + step]
                width = max(len(p) for p in chunk)
                ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for i, p in enumerate(chunk):
                    ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
                    mask[i, width - len(p):] = 1
                out = inner.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                     generation_config=gen_config, synced_gpus=zero3 and not gather)
                responses += out[:, width:].tolist()
        return build_rollout(expanded, responses, prompt_index, eos_ids, pad_id, self.tokenizer, device)


class VLLMEngine:
    """Rollouts with vLLM, one instance colocated on each training process (needs ``alignkit[vllm]``).

    Each process builds ``vllm.LLM(..., distributed_executor_backend="external_launcher")`` in-process,
    so the policy's weights can be written straight into vLLM's model: :meth:`sync_weights` runs at the
    start of every :meth:`generate`. With ``vllm_tensor_parallel_size > 1`` consecutive processes form one
    vLLM instance and share their prompts. vLLM schedules its own batches (``generation_batch_size`` is
    not used); it stops at the same eos ids as the HF engine and samples with the same
    temperature/top-p/top-k. Written against vLLM's in-process ("colocate") API
    (``llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights``), as TRL uses it;
    not exercised by alignkit's CPU test suite beyond a stand-in module.
    """

    def __init__(self, model_name_or_path: str, tokenizer, config: GenerationConfig, *, dtype: str = "auto",
                 seed: int = 0):
        try:
            import vllm
        except ImportError as e:
            raise ImportError("generation engine 'vllm' needs vLLM, which is not installed: "
                              "pip install alignkit[vllm] (or set engine: hf).") from e
        from alignkit import assets

        config.validate_generation()
        self.tokenizer, self.config = tokenizer, config
        self._vllm = vllm
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        tp = config.vllm_tensor_parallel_size
        if world % tp:
            raise ConfigError(f"vllm_tensor_parallel_size={tp} must divide the number of processes ({world}).")
        if world == 1:  # external_launcher reads the torch.distributed rendezvous variables
            from alignkit.launch import free_port

            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("LOCAL_RANK", "0")
            os.environ.setdefault("WORLD_SIZE", "1")
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
        self.tp_group = None
        if tp > 1:
            self.tp_group, _ = torch.distributed.new_subgroups_by_enumeration(
                [list(range(s, s + tp)) for s in range(0, world, tp)])
        path = assets.resolve_model(model_name_or_path) or model_name_or_path
        self.llm = vllm.LLM(model=str(path), tensor_parallel_size=tp, dtype=dtype,
                            gpu_memory_utilization=config.vllm_gpu_memory_utilization,
                            max_model_len=config.vllm_max_model_len, seed=seed + rank // tp,
                            distributed_executor_backend="external_launcher")

    @torch.no_grad()
    def sync_weights(self, model: torch.nn.Module) -> None:
        """Copy the policy's current weights into vLLM's model and drop its prefix cache (stale KV).

        ZeRO-3: a plain model is gathered one parameter at a time, a LoRA model whole. A LoRA adapter is
        folded into the copies only (``W + get_delta_weight``): merging into the model and unmerging
        after would add rounding error to the frozen base weights at every rollout.
        """
        inner = unwrap(model)
        vllm_model = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        if hasattr(inner, "peft_config"):
            with gathered_parameters(model):
                vllm_model.load_weights(merged_lora_weights(inner))
        else:
            for name, param in inner.named_parameters():
                with _gathered([param]):
                    vllm_model.load_weights([(name, param.data)])
        self.llm.reset_prefix_cache()

    @torch.no_grad()
    def generate(self, model: torch.nn.Module, prompts: Sequence[Sequence[int]], *, seed: int | None = None) -> Rollout:
        """Sync the weights of ``model`` into vLLM, then sample ``num_samples`` responses per prompt."""
        prompts = _check_prompts(prompts)
        self.sync_weights(model)
        c = self.config
        inner = unwrap(model)
        eos_ids = eos_token_ids(self.tokenizer, inner)
        params = self._vllm.SamplingParams(
            n=c.num_samples, max_tokens=c.max_new_tokens, stop_token_ids=eos_ids, seed=seed,
            temperature=0.0 if c.greedy else c.temperature, top_p=1.0 if c.greedy else c.top_p,
            top_k=-1 if c.greedy or c.top_k == 0 else c.top_k)
        mine = prompts
        if self.tp_group is not None:  # every member of a TP group generates the group's prompts
            everyone: list = [None] * c.vllm_tensor_parallel_size
            torch.distributed.all_gather_object(everyone, prompts, group=self.tp_group)
            mine = [p for group in everyone for p in group]
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in mine], sampling_params=params, use_tqdm=False)
        responses = [list(o.token_ids) for out in outputs for o in out.outputs]
        if self.tp_group is not None:  # keep this process's share
            rank = torch.distributed.get_rank(group=self.tp_group)
            start = sum(len(group) for group in everyone[:rank]) * c.num_samples
            responses = responses[start:start + len(prompts) * c.num_samples]
        prompt_index = torch.arange(len(prompts)).repeat_interleave(c.num_samples)
        expanded = [prompts[i] for i in prompt_index.tolist()]
        return build_rollout(expanded, responses, prompt_index, eos_ids, _pad_id(self.tokenizer, eos_ids),
                             self.tokenizer, _model_device(inner))


def build_engine(config: GenerationConfig, tokenizer, *, model_name_or_path: str | None = None,
                 device: torch.device | str | None = None, dtype: str = "auto", seed: int = 0):
    """The rollout engine ``config.engine`` names. vLLM needs ``model_name_or_path`` (the policy's
    starting checkpoint: it gives the architecture; weights are synced from the policy before each rollout)."""
    config.validate_generation()
    if config.engine == "vllm":
        if not model_name_or_path:
            raise ConfigError("engine=vllm needs the policy's model path to build vLLM (model.name_or_path).")
        return VLLMEngine(model_name_or_path, tokenizer, config, dtype=dtype, seed=seed)
    return HFGenerateEngine(tokenizer, config, device=device)
