"""``alignkit estimate``: will a run fit on N GPUs of M GB each, and which config change would make it fit.

    alignkit estimate METHOD [CONFIG.yaml] [--set section.key=value ...] --gpus N --gpu-memory 40GB [--json]

The estimate reads the same config a run uses (``alignkit train`` takes the same file and ``--set``s) and
the model configs only: each model (policy, reference, critic, reward model, teacher) is built on the meta
device from its ``config.json`` (a local folder, a named asset, a ``config.json`` path, a known preset or,
online, the Hub), so nothing is downloaded and no weights are read. For each phase of a step (rollout,
scoring, training forward/backward, optimizer step) it adds up, per GPU:

- weights (per dtype; 4-bit NF4 with double quantisation; LoRA adapters), gradients, AdamW's ``m`` and ``v``
  and, under DeepSpeed mixed precision, the fp32 master weights, divided by N as ZeRO-1/2/3 partition them
  (or moved to the CPU by ``training.zero_offload``), plus DDP's gradient buckets and DeepSpeed's reduce bucket;
- the activations autograd saves, from a per-layer formula for Llama-style decoders (see
  :func:`~alignkit.estimate.memory.layer_activation_bytes` and docs/estimate.md), with or without gradient checkpointing;
- the logits, only at the positions alignkit computes them (:mod:`alignkit.forward`), and the float32
  temporaries of the loss (the chunked ``selective_log_softmax`` or SFT's cross-entropy);
- every other model the method holds and how it is placed (a frozen copy, the adapter-off policy at no
  cost, a ZeRO-3 partitioned frozen engine), the generation KV cache, and a colocated vLLM's share.

The peak is the largest phase plus an allowance for the CUDA context and the caching allocator
(:data:`CONTEXT_GIB`, :data:`FRAGMENTATION`). Suggestions are config changes (``--set`` overrides), each
scored by running the estimate again with it; when the run does not fit, they are combined until it does
(or the closest combination is named). All sizes are GiB (2**30 bytes), the unit GPU names use
("40GB" = 40960 MiB). docs/estimate.md holds the formulas and the measured accuracy.

The package: :mod:`~alignkit.estimate.architecture` reads model configs without weights,
:mod:`~alignkit.estimate.memory` is the memory model (phases of a step, bytes per GPU) and
:mod:`~alignkit.estimate.command` adds the suggestions, their combination and the command line.
"""

from alignkit.estimate.architecture import (
    PRESETS,
    Arch,
    EstimateError,
    arch_of,
    lora_parameters,
    read_model_config,
)
from alignkit.estimate.command import (
    build_parser,
    candidate_changes,
    estimate,
    estimate_main,
    fitting_plan,
    parse_gib,
    suggestions,
)
from alignkit.estimate.memory import (
    CONTEXT_GIB,
    FRAGMENTATION,
    GIB,
    NF4_BYTES_PER_PARAM,
    Estimate,
    Setup,
    activation_bytes,
    estimate_memory,
    kv_cache_bytes,
    layer_activation_bytes,
    setup_of,
)

__all__ = [
    "CONTEXT_GIB", "FRAGMENTATION", "GIB", "NF4_BYTES_PER_PARAM", "PRESETS", "Arch", "Estimate", "EstimateError",
    "Setup", "activation_bytes", "arch_of", "build_parser", "candidate_changes", "estimate", "estimate_main",
    "estimate_memory", "fitting_plan", "kv_cache_bytes", "layer_activation_bytes", "lora_parameters", "parse_gib",
    "read_model_config", "setup_of", "suggestions",
]
