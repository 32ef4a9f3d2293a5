"""The memory model of ``alignkit estimate``: per-GPU bytes of each phase of a step (weights, gradients,
optimizer states, activations, logits, KV cache, vLLM) for a run's config, from the models' configs only.
The formulas and their measured accuracy are in docs/estimate.md."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignkit.config import RunConfig
from alignkit.estimate.architecture import Arch, EstimateError, arch_of, lora_parameters, lora_targets

GIB = 2**30
CONTEXT_GIB = 0.75  # CUDA context, cuBLAS/NCCL workspaces: memory a GPU process holds outside PyTorch's tensors
FRAGMENTATION = 0.05  # the caching allocator reserves ~5% more than the live tensors at the peak
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4 bits + 8-bit absmax per 64 + fp32 absmax per 256 blocks
NF4_NO_DOUBLE_QUANT = 0.5 + 4 / 64
DS_REDUCE_BUCKET = 500_000_000  # DeepSpeed's default reduce_bucket_size (elements); alignkit does not change it
DS_MAX_LIVE_PARAMETERS = 1_000_000_000  # stage3_max_live_parameters default
LOGSOFTMAX_CHUNK_ELEMENTS = 2**25  # alignkit.losses.logprobs: float32 elements per selective_log_softmax chunk
ENTROPY_CHUNK_ROWS = 128  # alignkit.losses.rl.entropy_from_logits
ONLINE = ("ppo", "rloo", "grpo", "reinforce_pp")
PREFERENCE = ("dpo", "simpo", "cpo", "orpo")
_DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}


# --------------------------------------------------------------------------------------------------
# Precision and placement of a run
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    device: str  # cuda | cpu: what "auto" dtypes resolve to, AdamW's foreach temporaries, the CUDA allowance
    gpus: int
    weight_bytes: int  # model.dtype
    compute_bytes: int  # activations: 2 under bf16/fp16 autocast, else the weight dtype
    mixed: str  # no | bf16 | fp16
    stage: int  # DeepSpeed ZeRO stage, 0 = none; FSDP2: 3 (full_shard) or 2 (shard_grad_op), see fsdp
    offload: bool  # ZeRO-2/3 optimizer (and ZeRO-3 parameter) offload to CPU; FSDP2's CPU offload
    fsdp: bool = False  # PyTorch FSDP2 instead of DeepSpeed (stage: the ZeRO stage its memory matches)

    @property
    def ds_half(self) -> bool:
        """DeepSpeed with bf16/fp16 casts every parameter to 2 bytes and keeps fp32 masters in the optimizer."""
        return self.stage > 0 and not self.fsdp and self.mixed in ("bf16", "fp16")

    @property
    def zero3(self) -> bool:
        """DeepSpeed ZeRO-3 itself (its partitioned frozen engines, per-layer fetch limits, zero3_gather)."""
        return self.stage == 3 and not self.fsdp

    @property
    def label(self) -> str:
        zero = f"ZeRO-{self.stage}{' + offload' if self.offload else ''}" if self.stage else (
            "DDP" if self.gpus > 1 else "one process")
        if self.fsdp:
            mode = "full_shard" if self.stage == 3 else "shard_grad_op"
            zero = f"FSDP2 {mode} (~ZeRO-{self.stage}){' + CPU offload' if self.offload else ''}"
        dtype = {2: "bf16", 4: "fp32"}[self.weight_bytes]
        return f"{zero}, weights {dtype}, mixed precision {self.mixed}"


def setup_of(cfg: RunConfig, gpus: int, device: str) -> Setup:
    t, m = cfg.training, cfg.model
    dtype = m.dtype.lower().removeprefix("torch.")
    weight_bytes = (2 if device == "cuda" else 4) if dtype == "auto" else _DTYPE_BYTES[dtype]
    mixed = t.mixed_precision if t.mixed_precision != "auto" else ("bf16" if device == "cuda" else "no")
    stage, offload = 0, False
    if t.fsdp:  # full_shard shards parameters, gradients and optimizer state like ZeRO-3; shard_grad_op keeps
        # the parameters gathered from forward to backward, so its peak is ZeRO-2's
        return Setup(device=device, gpus=gpus, weight_bytes=weight_bytes,
                     compute_bytes=2 if mixed in ("bf16", "fp16") else weight_bytes, mixed=mixed,
                     stage=3 if t.fsdp == "full_shard" else 2, offload=t.fsdp_cpu_offload, fsdp=True)
    if t.deepspeed in ("zero1", "zero2", "zero3"):
        stage, offload = int(t.deepspeed[-1]), t.zero_offload and t.deepspeed != "zero1"
    elif t.deepspeed:
        ds = json.loads(Path(t.deepspeed).read_text())
        zero = ds.get("zero_optimization", {})
        stage = int(zero.get("stage", 0))
        offload = (zero.get("offload_optimizer") or {}).get("device", "none") == "cpu"
        if ds.get("bf16", {}).get("enabled") is True:
            mixed = "bf16"
    compute = 2 if mixed in ("bf16", "fp16") else weight_bytes
    return Setup(device=device, gpus=gpus, weight_bytes=weight_bytes, compute_bytes=compute, mixed=mixed,
                 stage=stage, offload=offload)


# --------------------------------------------------------------------------------------------------
# Weights, gradients, optimizer states
# --------------------------------------------------------------------------------------------------


@dataclass
class Trained:
    """A model that trains (the policy; PPO's critic): its weights and trainable parameters on one GPU."""

    weights: float  # bytes per GPU, resident
    trainable: int  # trainable parameters (all of them, before any partitioning)
    param_bytes: int  # bytes per trainable parameter as stored (LoRA adapters: fp32 unless DeepSpeed casts)
    largest: int  # elements of the largest trainable tensor (AdamW's single-tensor temporaries on CPU)
    layer_params: int  # one decoder layer (ZeRO-3 gathers a few at a time)
    lora: list[tuple[str, int, int]] = field(default_factory=list)  # adapted linear layers (activations)
    full: float = 0.0  # bytes of all weights gathered (ZeRO-3 rollout)


def trained_model(arch: Arch, cfg: RunConfig, s: Setup) -> Trained:
    """Weights on one GPU and trainable parameters of ``arch`` trained with ``model.finetune``."""
    m = cfg.model
    w = 2 if s.ds_half else s.weight_bytes
    if s.fsdp and s.mixed != "no":  # accelerate upcasts what trains to fp32 (FSDP2 computes in bf16/fp16)
        w = 4
    if m.finetune == "full":
        full = arch.params * w
        trained = Trained(weights=full, trainable=arch.params, param_bytes=w, largest=arch.largest,
                          layer_params=arch.layer_params, full=full)
    else:
        n_lora = lora_parameters(arch, list(m.lora_target_modules), m.lora_r)
        lora_bytes = 2 if s.ds_half else 4  # peft keeps adapters in fp32 (autocast_adapter_dtype)
        if m.finetune == "lora":
            base = arch.params * w
        else:  # qlora: linear layers in NF4; prepare_model_for_kbit_training upcasts the rest to fp32
            other = 2 if s.ds_half else 4
            base = arch.quantizable * NF4_BYTES_PER_PARAM + (arch.params - arch.quantizable) * other
        targets = lora_targets(arch, list(m.lora_target_modules))
        largest = max([m.lora_r * max(i, o) for _, i, o in targets] + [arch.head_params if arch.task == "seq_cls" else 0])
        trained = Trained(weights=base + n_lora * lora_bytes, trainable=n_lora, param_bytes=lora_bytes,
                          largest=largest, layer_params=arch.layer_params, lora=targets,
                          full=base + n_lora * lora_bytes)
    if s.stage == 3 or s.fsdp:  # FSDP2's shard_grad_op shards them at rest too
        trained.weights = 0.0 if s.offload else trained.weights / s.gpus
    return trained


def optimizer_states(t: Trained, s: Setup) -> dict[str, float]:
    """Resident optimizer memory per GPU: AdamW's m and v (and DeepSpeed's fp32 master weights; FSDP2's
    sharded parameters are the fp32 masters themselves)."""
    if s.stage == 0:
        return {"optimizer states (AdamW m, v)": 2 * t.trainable * t.param_bytes}
    if s.offload:
        return {"optimizer states (AdamW m, v)": 0.0}
    if s.fsdp:
        return {"optimizer states (AdamW m, v)": 2 * t.trainable * t.param_bytes / s.gpus}
    out = {"optimizer states (AdamW m, v)": 8 * t.trainable / s.gpus}
    if s.ds_half:
        out["fp32 master weights"] = 4 * t.trainable / s.gpus
    return out


def gradient_bytes(t: Trained, s: Setup) -> float:
    """Gradients per GPU during backward: the full set without ZeRO-2/3, a 1/N partition with them."""
    if s.stage == 0:
        return t.trainable * t.param_bytes
    if s.fsdp:  # reduce-scattered into the parameters' dtype; offloaded to CPU with fsdp_cpu_offload
        return 0.0 if s.offload else t.trainable * t.param_bytes / s.gpus
    g = 2 if s.ds_half else 4
    return t.trainable * g / (s.gpus if s.stage >= 2 else 1)


def step_temporaries(t: Trained, s: Setup) -> float:
    """The optimizer step's temporaries: foreach AdamW's sqrt(v) copy of every state (CUDA); the single-tensor loop
    on CPU needs sqrt(v) and sqrt(v) / c of the largest tensor; DeepSpeed: the fp32 gradient of the partition
    and its sqrt(v) copy."""
    if s.stage == 0:
        n = t.trainable if s.device == "cuda" else 2 * t.largest
        return n * t.param_bytes
    if s.offload:
        return 0.0
    if s.fsdp:  # the foreach AdamW of the shards (CUDA), the single-tensor loop on CPU
        n = t.trainable / s.gpus if s.device == "cuda" else 2 * t.largest / s.gpus
        return n * t.param_bytes
    return 8 * t.trainable / s.gpus if s.ds_half else 4 * t.trainable / s.gpus


def gradient_buffers(t: Trained, s: Setup) -> tuple[str, float]:
    """Communication buffers for gradients: DDP's buckets (a full copy), DeepSpeed ZeRO-2/3's reduce bucket."""
    if s.stage == 0:
        return "DDP gradient buckets", (t.trainable * t.param_bytes if s.gpus > 1 else 0.0)
    if s.fsdp:  # one layer's unsharded gradients and their reduce-scatter output at a time
        return "FSDP2 reduce-scatter buffers", 2 * t.layer_params * t.param_bytes
    if s.stage >= 2:
        return "DeepSpeed reduce bucket", DS_REDUCE_BUCKET * (2 if s.ds_half else 4)
    return "DeepSpeed reduce bucket", 0.0


def frozen_weights(arch: Arch, dtype_bytes: int, s: Setup) -> float:
    """A frozen model (reference, reward model, teacher) on one GPU: whole in its dtype (FSDP2 too), or a ZeRO-3
    partitioned engine (cast to 2 bytes under bf16/fp16)."""
    if s.zero3:
        return arch.params * (2 if s.ds_half else dtype_bytes) / s.gpus
    return arch.params * dtype_bytes


def zero3_working_set(arch: Arch, s: Setup) -> float:
    """Parameters ZeRO-3 gathers during a forward/backward: the current and the prefetched layer. FSDP2
    full_shard: the same two layers in the compute dtype, and the embeddings and head, which stay gathered
    from the forward to the backward; shard_grad_op: every weight gathered in the compute dtype."""
    if s.fsdp:
        if s.stage == 3:
            return (2 * arch.layer_params + arch.params - arch.layers * arch.layer_params) * s.compute_bytes
        return arch.params * s.compute_bytes
    if s.stage != 3:
        return 0.0
    return min(2 * arch.layer_params, DS_MAX_LIVE_PARAMETERS) * (2 if s.ds_half else s.weight_bytes)


# --------------------------------------------------------------------------------------------------
# Activations and logits
# --------------------------------------------------------------------------------------------------


def layer_activation_bytes(arch: Arch, rows: int, seq: int, s: Setup, lora: list[tuple[str, int, int]] | None = None,
                           lora_dropout: float = 0.0, lora_rank: int = 0, padded: bool = True) -> float:
    """Bytes autograd saves in one Llama-style decoder layer for ``rows x seq`` tokens (training forward).

    With ``t`` tokens, ``h``/``q``/``kv``/``i`` the hidden, query, key-value and MLP widths, ``r`` the weight
    dtype bytes and ``a`` the compute dtype bytes (2 under bf16/fp16 autocast)::

        2 RMSNorms   2 x (4 + r + a) h t   the float32 input (pow), the normalised input (for the norm's
                                           weight gradient; not with LoRA: frozen norms), the weighted
                                           output (the q/k/v and gate/up projections' input)
                     + 2 x 4 t             rsqrt
        attention    (2 q + 2 kv) a t      q and k after RoPE, v, the SDPA output (= o_proj's input)
                     + 4 heads t           SDPA's log-sum-exp (float32)
                     padded batches: repeat_kv materialises k and v at q width (2 q instead of 2 kv) and
                     the boolean mask becomes a float mask per layer: + rows seq^2 a
        MLP          4 i a t               gate, SiLU(gate), up, their product (= down_proj's input)
        autocast with fp32 weights: the 2-byte copies of the layer's weights, and of the normalised
                     inputs once per projection (q, k, v; gate, up): + 3 h a t
        LoRA         + rank a t per adapted layer (lora_A's output), + the 2-byte copies of the fp32
                     adapters under autocast. With lora_dropout > 0 every adapted
                     layer saves its dropout output (a) and mask (1 byte on CUDA; on CPU a float tensor of
                     the adapter dtype) per input feature, and the frozen projections no longer keep the
                     shared normalised inputs and the MLP product.

    Checked exactly against ``torch.autograd.graph.saved_tensors_hooks`` on CPU (docs/estimate.md).
    """
    t = rows * seq
    h, q, kv, i = arch.hidden, arch.q_dim, arch.kv_dim, arch.intermediate
    r, a = s.weight_bytes, s.compute_bytes
    dropout = bool(lora) and lora_dropout > 0
    norm_input = 0 if lora else r  # frozen norm weights need no copy of their input
    norm_output = 0 if dropout else a  # with LoRA dropout only the dropped copies are kept
    total = 2 * (4 + norm_input + norm_output) * h * t + 2 * 4 * t
    total += (2 * q + (2 * q if padded else 2 * kv)) * a * t + 4 * arch.heads * t
    if padded:
        total += rows * seq * seq * a
    total += (3 if dropout else 4) * i * a * t
    if s.weight_bytes == 4 and a == 2:  # autocast casts the weights, and each projection casts its own input
        total += 2 * arch.layer_params + (0 if dropout else 3 * h * a * t)
    if lora:  # the adapted layers of one decoder layer (an average over the model's layers)
        total += len(lora) / arch.layers * lora_rank * a * t
        if a == 2 and not s.ds_half:  # autocast's 2-byte copies of the fp32 adapters
            total += 2 * lora_rank * sum(d_in + d_out for _, d_in, d_out in lora) / arch.layers
        if dropout:
            mask = 1 if s.device == "cuda" else (2 if s.ds_half else 4)
            total += sum(d_in for _, d_in, _ in lora) / arch.layers * (a + mask) * t
    return float(total)


def activation_bytes(arch: Arch, rows: int, seq: int, s: Setup, cfg: RunConfig, lora: list | None = None,
                     padded: bool = True) -> float:
    """Saved activations of a training forward over ``rows x seq`` tokens: every layer, or with gradient
    checkpointing each layer's input plus one layer recomputed in backward; plus the final norm."""
    m = cfg.model
    dropout = 0.0 if getattr(cfg.method_args, "disable_dropout", False) else m.lora_dropout  # online methods
    layer = layer_activation_bytes(arch, rows, seq, s, lora, dropout, m.lora_r, padded)
    t = rows * seq
    final_norm = (4 + s.weight_bytes + s.compute_bytes) * arch.hidden * t
    if m.gradient_checkpointing:
        return arch.layers * arch.hidden * t * s.weight_bytes + layer + final_norm
    return arch.layers * layer + final_norm


def chunk_rows(vocab: int, rows: int) -> int:
    """Rows of one chunk of the chunked log-softmax / LM head: about 128 MiB of float32 logits, at most ``rows``."""
    return max(1, min(LOGSOFTMAX_CHUNK_ELEMENTS // vocab, rows))


def logits_workspace(kind: str, tokens: int, arch: Arch, s: Setup, *, rows_per_sequence: int,
                     head_trainable: bool = False, entropy: bool = False, teacher_bytes: int = 2,
                     jsd: bool = False) -> float:
    """Peak bytes of the LM head's output and the loss' temporaries for ``tokens`` target positions.

    - ``chunked`` (the default of SFT, the DPO family, KTO and the online methods): the head runs a chunk of
      ``c`` rows at a time (:func:`alignkit.losses.logprobs.linear_logps`); no ``[tokens, V]`` tensor exists.
      Forward: the chunk's matmul output (in the autocast dtype), its float32 logits and two or three
      float32 temporaries (log-softmax, probabilities, the entropy's product). Backward recomputes a chunk
      the same way; a trainable head (full fine-tuning) adds a float32 ``[V, h]`` gradient accumulator (and,
      under autocast, the chunk's 2-byte ``[V, h]`` product and its float32 copy).
    - ``full`` (ZeRO-3, whose partitioned head cannot run outside the forward; ``chunked_logps: false``):
      the kept logits, their gathered copy and both gradients in the compute dtype, plus two float32 chunks
      of ``selective_log_softmax``.
    - ``cross_entropy`` (SeqKD's SFT stage): a float32 log-softmax kept, then its gradient and the gradient of
      its input: 3 x 4 bytes per logit, after the forward's logits and their float32 copy.
    - ``distill`` (KD/GKD): student and teacher logits, their float32 copies, both log-softmaxes and the
      element-wise divergence (more for the generalised JSD).
    """
    vocab, a = arch.vocab, s.compute_bytes
    n = float(tokens) * vocab
    chunk = float(chunk_rows(vocab, tokens if kind == "chunked" else rows_per_sequence)) * vocab
    if kind == "chunked":
        cast = a if a != 4 else 0  # the matmul's 2-byte output before its float32 copy
        forward = chunk * (cast + 4 * (4 if entropy else 3))
        backward = chunk * (2 * cast + 4 * 2)
        if head_trainable:
            backward += vocab * arch.hidden * (4 + (cast + 4 if cast else 0))
        return max(forward, backward)
    if kind == "full":
        return 3 * a * n + 2 * 4 * chunk
    if kind == "cross_entropy":
        return max(n * (a + (4 if a != 4 else 0) + 4), 12 * n)
    if kind == "distill":
        return n * (a + teacher_bytes + 4 * (8 if jsd else 5))
    return 0.0


def inference_workspace(arch: Arch, rows: int, seq: int, logit_tokens: int, s: Setup, padded: bool = True) -> float:
    """Peak transient of a forward without gradients over ``rows x seq`` tokens: the residual stream and the
    normalised input (with the norm's float32 temporary), then the larger of attention (q, k, v, RoPE copies,
    repeat_kv, the output) and the MLP (SiLU(gate), up, their product); the expanded mask; the kept logits and
    two float32 chunks of the log-softmax."""
    t = rows * seq
    a = s.compute_bytes
    q, kv = arch.q_dim, arch.kv_dim
    attention = (5 * q + 2 * kv + (2 * q if padded else 0)) * a
    mlp = 3 * arch.intermediate * a
    layer = t * (arch.hidden * (4 + s.weight_bytes + a) + max(attention, mlp))
    mask = rows * seq * seq * a if padded else 0
    logits = logit_tokens * arch.vocab * a + (2 * 4 * chunk_rows(arch.vocab, seq) * arch.vocab if logit_tokens else 0)
    return float(layer + mask + logits)


def kv_cache_bytes(arch: Arch, sequences: int, length: int, a: int) -> float:
    """The generation KV cache: sequences x length x layers x 2 (k, v) x kv_heads x head_dim x dtype bytes."""
    return float(sequences) * length * arch.layers * 2 * arch.kv_heads * arch.head_dim * a


# --------------------------------------------------------------------------------------------------
# The result
# --------------------------------------------------------------------------------------------------


@dataclass
class Estimate:
    """Per-GPU memory by phase; ``per_gpu_peak_gb`` includes the CUDA/allocator allowance."""

    method: str
    gpus: int
    gpu_memory_gb: float
    device: str
    setup: str
    models: dict[str, str]  # role -> one line (name, parameters, placement)
    phases: dict[str, dict[str, float]]  # phase -> part -> bytes
    assumptions: list[str]
    suggestions: list[dict[str, Any]] = field(default_factory=list)
    plan: dict[str, Any] | None = None  # when it does not fit: suggestions combined until it fits, or the closest

    @property
    def phase_totals(self) -> dict[str, float]:
        return {name: sum(parts.values()) / GIB for name, parts in self.phases.items()}

    @property
    def peak_phase(self) -> str:
        totals = self.phase_totals
        return max(totals, key=totals.get)

    @property
    def tensor_peak_gb(self) -> float:
        return max(self.phase_totals.values())

    @property
    def allowance_gb(self) -> float:
        return 0.0 if self.device == "cpu" else CONTEXT_GIB + FRAGMENTATION * self.tensor_peak_gb

    @property
    def per_gpu_peak_gb(self) -> float:
        return self.tensor_peak_gb + self.allowance_gb

    @property
    def fits(self) -> bool:
        return self.per_gpu_peak_gb <= self.gpu_memory_gb

    def verdict(self) -> str:
        peak, mem = self.per_gpu_peak_gb, self.gpu_memory_gb
        each = "per GPU" if self.device == "cuda" else "per process"
        where = f"{_gib(peak)} {each} ({self.peak_phase}) of {_gib(mem)}"
        if self.fits:
            return f"fits: {where}, {_gib(mem - peak)} to spare."
        line = f"does not fit: {where}, {_gib(peak - mem)} over."
        plan = self.plan
        if plan is None:  # suggestions only (no search): the best single change that fits, if one does
            fixes = [sg for sg in self.suggestions if sg["fits"]]
            plan = {"set": fixes[0]["set"], "peak_gb": fixes[0]["peak_gb"], "fits": True} if fixes else None
        if plan is None:
            return line
        sets = "--set " + " --set ".join(plan["set"])
        if plan["fits"]:
            return line + f" It fits with {sets} ({_gib(plan['peak_gb'])})."
        line += (f" No combination of the suggestions fits; the closest, {sets}, needs {_gib(plan['peak_gb'])} "
                 f"{each} ({_gib(plan['peak_gb'] - mem)} over)")
        if plan.get("gpus_needed"):
            return line + f"; with it, it fits on {plan['gpus_needed']} GPUs of {_gib(mem)}."
        return line + ("; use GPUs with more memory." if self.device == "cuda" else ".")

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method, "gpus": self.gpus, "gpu_memory_gb": round(self.gpu_memory_gb, 3),
            "device": self.device, "setup": self.setup,
            "per_gpu_peak_gb": round(self.per_gpu_peak_gb, 3), "tensor_peak_gb": round(self.tensor_peak_gb, 3),
            "allowance_gb": round(self.allowance_gb, 3), "fits": self.fits, "peak_phase": self.peak_phase,
            "phases": {k: round(v, 3) for k, v in self.phase_totals.items()},
            "breakdown": {p: {k: round(v / GIB, 4) for k, v in parts.items()} for p, parts in self.phases.items()},
            "models": self.models, "assumptions": self.assumptions, "suggestions": self.suggestions,
            "plan": self.plan, "verdict": self.verdict(),
        }

    def table(self) -> str:
        names = list(self.phases)
        unit, scale = ("GiB", GIB) if self.tensor_peak_gb >= 1 else ("MiB", 2**20)
        rows: list[str] = []
        for parts in self.phases.values():
            rows += [k for k in parts if k not in rows]
        width = max(len(r) for r in rows + ["per-GPU peak (with allowance)"]) + 2
        col = max(10, max(len(n) for n in names) + 2)
        devices = "GPU(s)" if self.device == "cuda" else "CPU process(es)"
        out = [f"alignkit estimate {self.method}: {self.gpus} {devices} x {self.gpu_memory_gb:.1f} GiB, {self.setup}"]
        out += [f"  {role}: {line}" for role, line in self.models.items()]
        out.append("")
        out.append(" " * width + "".join(f"{n:>{col}}" for n in names) + f"   ({unit} per GPU)")
        for r in rows:
            cells = [self.phases[n].get(r) for n in names]
            if all(c is None or c == 0 for c in cells):
                continue
            out.append(f"{r:<{width}}" + "".join(f"{'-' if c is None else f'{c / scale:.2f}':>{col}}" for c in cells))
        totals = {n: sum(parts.values()) / scale for n, parts in self.phases.items()}
        out.append(f"{'total (tensors)':<{width}}" + "".join(f"{totals[n]:>{col}.2f}" for n in names))
        if self.allowance_gb:
            out.append(f"{'+ CUDA context and allocator':<{width}}{self.allowance_gb * GIB / scale:>{col}.2f}")
        peak = self.per_gpu_peak_gb * GIB / scale
        out.append(f"{'per-GPU peak (with allowance)':<{width}}{peak:>{col}.2f}  ({self.peak_phase})")
        out.append("")
        out += [f"assumes: {a}" for a in self.assumptions]
        if self.suggestions:
            out.append("")
            out.append("suggestions (each re-estimated with the change):")
            for sg in self.suggestions:
                flag = "  fits" if sg["fits"] else ""
                sets = " ".join(f"--set {x}" for x in sg["set"])
                out.append(f"  {sets:<72} -{sg['saves_gb']:.2f} GiB -> {sg['peak_gb']:.2f} GiB{flag}")
        if self.plan:
            out.append("")
            out.append("the cheapest way to fit (each change re-estimated on top of the others):" if self.plan["fits"]
                       else "nothing fits; the closest combination (each change re-estimated on top of the others):")
            sets = " ".join(f"--set {x}" for x in self.plan["set"])
            out.append(f"  {sets} -> {self.plan['peak_gb']:.2f} GiB{'  fits' if self.plan['fits'] else ''}")
        out.append("")
        out.append(self.verdict())
        return "\n".join(out)


def _gib(x: float) -> str:
    return f"{x:.1f} GiB" if x >= 10 else f"{x:.2f} GiB"


# --------------------------------------------------------------------------------------------------
# The phases of each method
# --------------------------------------------------------------------------------------------------


class _Plan:
    """Collects what is resident (every phase) and what each phase adds."""

    def __init__(self, gpu_memory_gb: float) -> None:
        self.gpu_memory_gb = gpu_memory_gb
        self.resident: dict[str, float] = {}
        self.phases: dict[str, dict[str, float]] = {}
        self.models: dict[str, str] = {}
        self.assumptions: list[str] = []

    def keep(self, part: str, nbytes: float) -> None:
        self.resident[part] = self.resident.get(part, 0.0) + nbytes

    def phase(self, name: str, parts: dict[str, float], resident: dict[str, float] | None = None) -> None:
        base = dict(self.resident if resident is None else resident)
        for k, v in parts.items():
            base[k] = base.get(k, 0.0) + v
        self.phases[name] = base


def _describe(arch: Arch, how: str) -> str:
    size = f"{arch.params / 1e9:.2f}B" if arch.params >= 1e9 else f"{arch.params / 1e6:.2f}M"
    return f"{arch.name} ({size} params, {arch.layers} layers, vocab {arch.vocab}): {how}"


def _policy_line(arch: Arch, cfg: RunConfig, t: Trained, s: Setup) -> str:
    m = cfg.model
    how = {"full": "full fine-tuning", "lora": f"LoRA r={m.lora_r}", "qlora": f"QLoRA (NF4) + LoRA r={m.lora_r}"}
    where = f", {'FSDP2 sharded' if s.fsdp else 'ZeRO-3 partitioned'} over {s.gpus}" if s.stage == 3 else ""
    return _describe(arch, f"{how[m.finetune]}, {t.trainable / 1e6:.2f}M trainable{where}")


def _frozen_line(arch: Arch, dtype_bytes: int, s: Setup) -> str:
    if s.zero3:
        return _describe(arch, f"frozen, a ZeRO-3 partitioned engine ({frozen_weights(arch, dtype_bytes, s) / GIB:.2f} "
                               "GiB per GPU)")
    return _describe(arch, f"frozen copy, {'bf16' if dtype_bytes == 2 else 'fp32'}")


def _train_phase(plan: _Plan, t: Trained, s: Setup, arch: Arch, acts: float, logits: float, head_grad: float,
                 accumulation: int, extra: dict[str, float] | None = None) -> None:
    """Forward/backward and optimizer-step phases of a trained model.

    Backward frees activations layer by layer while gradients appear, so (one process, one micro-batch per
    update) the peak is the larger of its start (every activation, the logits' backward, the head's gradient)
    and its end (every gradient). With accumulation or ZeRO the gradients are there from the start.
    """
    grads = gradient_bytes(t, s)
    bucket_name, bucket = gradient_buffers(t, s)
    work = zero3_working_set(arch, s)
    parts = dict(extra or {})
    start = {"activations": acts, "logits and loss temporaries": logits, "gradients": grads}
    if s.stage == 0 and accumulation == 1:
        start["gradients"] = min(head_grad, grads)
        end = {"activations": acts / arch.layers, "gradients": grads}
        parts.update(start if sum(start.values()) >= sum(end.values()) else end)
    else:
        parts.update(start)
    if bucket and s.stage >= 2:  # DDP's buckets are resident (allocated with the DDP wrapper)
        parts[bucket_name] = bucket
    if work:
        parts["FSDP2 gathered weights" if s.fsdp else "ZeRO-3 gathered layers"] = work
    plan.phase("train", parts)
    plan.phase("optimizer", {"gradients": grads, "optimizer step temporaries": step_temporaries(t, s)})


def _reference(plan: _Plan, cfg: RunConfig, s: Setup, policy_arch: Arch, overrides: dict[str, str | None]) -> Arch | None:
    """Place the reference: the adapter-off policy (free), or a frozen copy of ``ref_model`` / the policy."""
    ref_name = getattr(cfg.method_args, "ref_model", None)
    if not ref_name and cfg.model.finetune in ("lora", "qlora"):
        plan.models["reference"] = "the policy with its LoRA adapter off (no extra weights)"
        return None
    arch = policy_arch if not ref_name else arch_of(ref_name, key=f"{cfg.method}.ref_model",
                                                    config_override=overrides.get("ref"))
    plan.keep("reference model", frozen_weights(arch, s.weight_bytes, s))
    plan.models["reference"] = _frozen_line(arch, s.weight_bytes, s)
    return arch


def _offline(plan: _Plan, cfg: RunConfig, s: Setup, overrides: dict[str, str | None]) -> None:
    method, m, t = cfg.method, cfg.model, cfg.training
    task = "seq_cls" if method == "rm" else "causal_lm"
    arch = arch_of(m.name_or_path, task, gguf_file=m.gguf_file, config_override=overrides.get("policy"))
    trained = trained_model(arch, cfg, s)
    plan.models["policy" if method != "rm" else "reward model (trained)"] = _policy_line(arch, cfg, trained, s)
    plan.keep("policy weights", trained.weights)
    for k, v in optimizer_states(trained, s).items():
        plan.keep(k, v)
    bucket_name, bucket = gradient_buffers(trained, s)
    if s.stage == 0 and bucket:
        plan.keep(bucket_name, bucket)
    b, seq = t.per_device_batch_size, cfg.data.max_length
    rows = 2 * b if method in PREFERENCE or (method == "rm" and cfg.method_args.objective == "pairwise") else b
    logit_kind, teacher_bytes = _head_path(cfg, s), 2
    reference = _reference(plan, cfg, s, arch, overrides) if method in ("dpo", "kto") else None
    if method in ("kd", "gkd"):
        args = cfg.method_args
        teacher_bytes = _DTYPE_BYTES.get((args.teacher_dtype or "").lower(), s.weight_bytes)
        teacher = arch_of(args.teacher, key=f"{method}.teacher", config_override=overrides.get("teacher"))
        plan.keep("teacher", frozen_weights(teacher, teacher_bytes, s))
        plan.models["teacher"] = _frozen_line(teacher, teacher_bytes, s)
    lora = trained.lora if m.finetune != "full" else None
    acts = activation_bytes(arch, rows, seq, s, cfg, lora)
    logits = logits_workspace(logit_kind, rows * seq, arch, s, rows_per_sequence=seq, head_trainable=m.finetune == "full",
                              teacher_bytes=teacher_bytes,
                              jsd=method == "gkd" or getattr(cfg.method_args, "divergence", "") == "jsd")
    head_grad = (arch.head_params or arch.vocab * arch.hidden) * trained.param_bytes if m.finetune == "full" else 0
    if method == "gkd":  # on-policy batches: the student generates its completions first
        args = cfg.method_args
        gen_len = seq + args.generation.max_new_tokens
        plan.phase("rollout", {"generation KV cache": kv_cache_bytes(arch, b, gen_len, s.compute_bytes),
                               "generation forward": inference_workspace(arch, b, seq, b, s)})
    if method == "dpo" and reference is not None and _precomputes_reference(cfg, s):
        # the policy is loaded, the reference scores every row once, then it is freed before training
        ref_bytes = plan.resident.pop("reference model")
        plan.phase("reference precompute", {"reference model": ref_bytes, "reference forward":
                                            inference_workspace(reference, rows, seq, rows * seq, s)},
                   resident={"policy weights": trained.weights})
        plan.models["reference"] += "; freed after precomputing the log-probs"
    _train_phase(plan, trained, s, arch, acts, logits, head_grad, t.gradient_accumulation_steps)
    plan.assumptions.append(f"every micro-batch is {rows} rows x {seq} tokens (data.max_length), padded, with "
                            "targets at every position")


def _head_path(cfg: RunConfig, s: Setup) -> str:
    """How a method's LM head runs (see :func:`logits_workspace`)."""
    method = cfg.method
    if method == "rm":
        return "none"
    if method in ("kd", "gkd"):
        return "distill"
    if method == "seqkd":
        return "cross_entropy"
    chunked = getattr(cfg.method_args, "chunked_logps", True)
    # ZeRO-3's partitioned head, and FSDP2's sharded one: full logits
    return "chunked" if chunked and s.stage != 3 and not s.fsdp else "full"


def _precomputes_reference(cfg: RunConfig, s: Setup) -> bool:
    """``dpo.precompute_ref_logps``: true, or auto when the run visits every training row (num_epochs >= 1 and
    no max_steps: the estimate does not know the data size otherwise) and the reference is not the
    adapter-off policy under ZeRO-3."""
    mode, t = cfg.method_args.precompute_ref_logps, cfg.training
    if mode == "auto":
        return t.max_steps <= 0 and t.num_epochs >= 1
    return mode is True


def _online(plan: _Plan, cfg: RunConfig, s: Setup, overrides: dict[str, str | None]) -> None:
    method, m, t, args = cfg.method, cfg.model, cfg.training, cfg.method_args
    g = args.generation
    arch = arch_of(m.name_or_path, gguf_file=m.gguf_file, config_override=overrides.get("policy"))
    policy = trained_model(arch, cfg, s)
    plan.models["policy"] = _policy_line(arch, cfg, policy, s)
    plan.keep("policy weights", policy.weights)
    trained, critic_arch = policy, None
    if method == "ppo":
        critic_source = args.reward.model if args.critic_init == "reward_model" else m.name_or_path
        critic_arch = arch_of(critic_source, "seq_cls", key="ppo critic",
                              config_override=overrides.get("reward" if args.critic_init == "reward_model" else "policy"))
        critic = trained_model(critic_arch, cfg, s)
        plan.keep("critic weights", critic.weights)
        plan.models["critic"] = _policy_line(critic_arch, cfg, critic, s) + " (trained with the policy)"
        trained = Trained(weights=policy.weights + critic.weights, trainable=policy.trainable + critic.trainable,
                          param_bytes=policy.param_bytes, largest=max(policy.largest, critic.largest),
                          layer_params=policy.layer_params, lora=policy.lora)
    for k, v in optimizer_states(trained, s).items():
        plan.keep(k, v)
    bucket_name, bucket = gradient_buffers(trained, s)
    if s.stage == 0 and bucket:
        plan.keep(bucket_name, bucket)
    if args.uses_reference:
        _reference(plan, cfg, s, arch, overrides)
    reward_arch = None
    if args.reward.model:
        reward_arch = arch_of(args.reward.model, "seq_cls", key=f"{method}.reward.model",
                              config_override=overrides.get("reward"))
        plan.keep("reward model", frozen_weights(reward_arch, s.weight_bytes, s))
        plan.models["reward model"] = _frozen_line(reward_arch, s.weight_bytes, s)
    vllm = g.sampler == "vllm"
    vllm_share = vllm_bytes(g, arch, s, plan.gpu_memory_gb) if vllm else 0.0
    if vllm and not vllm_sleeps(g, s):
        plan.keep(VLLM_PART, vllm_share)
    servers = g.sampler == "vllm_server"
    if servers:
        _vllm_servers(plan, g, arch, s)
    # lengths and batches
    prompt = min(cfg.data.max_length, cfg.data.max_prompt_length or cfg.data.max_length)
    response = g.max_new_tokens
    seq = prompt + response
    sequences = args.rollout_batch_size * g.num_samples
    gen_batch = g.batch_size or sequences
    b = t.per_device_batch_size
    a = s.compute_bytes
    # rollout
    rollout: dict[str, float] = {}
    if vllm:
        if vllm_sleeps(g, s):  # asleep while the policy trains: its memory is there during the rollout only
            rollout[VLLM_PART] = vllm_share
        if m.finetune != "full":  # LoRA sync: merged copies of the adapted weights
            rollout["vLLM weight sync (merged LoRA copies)"] = sum(i * o for _, i, o in policy.lora) * a
        if s.zero3:
            rollout["ZeRO-3 gathered policy"] = policy.full if m.finetune != "full" else arch.largest * a
    elif servers:  # the servers generate; the trainer only sends them the weights
        rollout.update(_server_sync_bytes(g, m.finetune, policy, arch, s))
    else:
        rollout["generation KV cache"] = kv_cache_bytes(arch, gen_batch, seq, a)
        if _sampler_logps(cfg, s):  # generate keeps each step's float32 [sequences, V] scores
            rollout["sampler scores (log-probs)"] = 4.0 * gen_batch * response * arch.vocab
        rollout["generation forward"] = inference_workspace(arch, gen_batch, prompt, gen_batch, s) + 3 * 4 * gen_batch * arch.vocab
        if s.zero3:  # the sampler gathers the policy (PPO's critic stays partitioned)
            rollout["ZeRO-3 gathered policy"] = policy.full if g.zero3_gather else zero3_working_set(arch, s)
        elif s.fsdp:  # the sampler gathers the whole model (PPO's critic too), in the compute dtype
            rollout["FSDP2 gathered model"] = (arch.params + (critic_arch.params if critic_arch is not None else 0)
                                               ) * s.compute_bytes
    plan.phase("rollout", rollout)
    # scoring without gradients: old log-probs (+ values), reference, reward model
    scoring = {"policy forward (no grad)": inference_workspace(arch, b, seq, b * (response + 1), s)}
    if reward_arch is not None:
        rm_rows = min(args.reward.model_batch_size, sequences)
        scoring["reward model forward"] = inference_workspace(reward_arch, rm_rows, seq, 0, s) + zero3_working_set(reward_arch, s)
    plan.phase("scoring", scoring)
    # training on minibatches
    lora = policy.lora if m.finetune != "full" else None
    acts = activation_bytes(arch, b, seq, s, cfg, lora)
    if critic_arch is not None:
        acts += activation_bytes(critic_arch, b, seq, s, cfg, lora)
    head = _head_path(cfg, s)
    logits = logits_workspace(head, b * response, arch, s, rows_per_sequence=response + 1,
                              head_trainable=m.finetune == "full", entropy=True)
    if head == "full":  # entropy_from_logits: float32 chunks of 128 rows, no grad
        logits += 3 * 4.0 * min(ENTROPY_CHUNK_ROWS, b * response) * arch.vocab
    head_grad = (arch.head_params or arch.vocab * arch.hidden) * trained.param_bytes if m.finetune == "full" else 0
    _train_phase(plan, trained, s, arch, acts, logits, head_grad, t.gradient_accumulation_steps)
    plan.assumptions.append(f"prompts of {prompt} tokens (data.max_prompt_length, else data.max_length), responses "
                            f"of {response} (generation.max_new_tokens), {gen_batch} sequences per generate call")


def _sampler_logps(cfg: RunConfig, s: Setup) -> bool:
    """Whether the HF sampler returns its tokens' log-probs (``tis_cap``, or the old log-probs taken from the
    sampler: fp32, no autocast, plain sampling, when the loop needs old log-probs)."""
    args, t = cfg.method_args, cfg.training
    g = args.generation
    if getattr(args, "tis_cap", None) is not None:
        return True
    minibatch = t.per_device_batch_size * t.gradient_accumulation_steps
    on_policy = args.ppo_epochs == 1 and args.rollout_batch_size * g.num_samples // minibatch == 1
    need_old = cfg.method == "ppo" or not on_policy or (args.uses_reference and args.kl_penalty == "reward")
    plain = not g.greedy and g.top_p == 1 and g.top_k == 0
    return (need_old and getattr(args, "reuse_sampler_logps", False) and plain and s.mixed == "no"
            and s.weight_bytes == 4)


def _sampling_then_sft(plan: _Plan, cfg: RunConfig, s: Setup, overrides: dict[str, str | None]) -> None:
    """rejection_sampling (policy + reward sources sample, then optional SFT) and seqkd (the teacher samples,
    then the student is trained with SFT)."""
    method, m, args = cfg.method, cfg.model, cfg.method_args
    g = args.generation
    if method == "seqkd":
        sampler_arch = arch_of(args.teacher, key="seqkd.teacher", config_override=overrides.get("teacher"))
        dtype_bytes = _DTYPE_BYTES.get((args.teacher_dtype or "").lower(), s.weight_bytes)
        plan.models["teacher"] = _frozen_line(sampler_arch, dtype_bytes, s)
    else:
        sampler_arch = arch_of(m.name_or_path, gguf_file=m.gguf_file, config_override=overrides.get("policy"))
        dtype_bytes = s.weight_bytes
        plan.models["sampling policy"] = _frozen_line(sampler_arch, dtype_bytes, s)
    prompt = min(cfg.data.max_length, cfg.data.max_prompt_length or cfg.data.max_length)
    sequences = args.sampling_batch_size * g.num_samples
    gen_batch = g.batch_size or sequences
    sampling = {"sampling model": frozen_weights(sampler_arch, dtype_bytes, s),
                "generation KV cache": kv_cache_bytes(sampler_arch, gen_batch, prompt + g.max_new_tokens, s.compute_bytes),
                "generation forward": inference_workspace(sampler_arch, gen_batch, prompt, gen_batch, s)}
    if s.zero3:
        sampling["ZeRO-3 gathered model"] = sampler_arch.params * 2
    if method == "rejection_sampling" and args.reward.model:
        rm = arch_of(args.reward.model, "seq_cls", key="rejection_sampling.reward.model",
                     config_override=overrides.get("reward"))
        sampling["reward model"] = frozen_weights(rm, s.weight_bytes, s)
        plan.models["reward model"] = _frozen_line(rm, s.weight_bytes, s)
    if g.sampler == "vllm":
        sampling = {VLLM_PART: vllm_bytes(g, sampler_arch, s, plan.gpu_memory_gb),
                    **{k: v for k, v in sampling.items() if k in ("reward model",)}}
    elif g.sampler == "vllm_server":  # the model stays here (its weights go to the servers once), no generation
        _vllm_servers(plan, g, sampler_arch, s)
        sampling = {k: v for k, v in sampling.items() if k in ("sampling model", "reward model")}
    plan.phase("sampling", sampling, resident={})
    plan.assumptions.append(f"prompts of {prompt} tokens, {g.max_new_tokens} new tokens, {gen_batch} sequences "
                            "per generate call")
    if method == "rejection_sampling" and not args.train_sft:
        return
    # rejection sampling trains with SFT (chunked head); SeqKD's SFT stage computes full logits (cross-entropy)
    sft_cfg = dataclasses.replace(cfg, method="sft" if method == "rejection_sampling" else "seqkd")
    if method == "seqkd" and args.eval_kl_to_teacher:
        plan.keep("teacher (eval KL)", frozen_weights(sampler_arch, dtype_bytes, s))
    _offline(plan, sft_cfg, s, overrides)


VLLM_PART = "vLLM (weights + KV cache)"


def vllm_bytes(g, arch: Arch, s: Setup, gpu_memory_gb: float) -> float:
    """A colocated vLLM's memory on one GPU: its weights (split over ``vllm_tensor_parallel_size``) and
    ``vllm_kv_cache_gb`` of KV cache when that is set, else ``vllm_gpu_memory_utilization`` of the GPU."""
    if g.vllm_kv_cache_gb:
        return arch.params * s.compute_bytes / g.vllm_tensor_parallel_size + g.vllm_kv_cache_gb * GIB
    return g.vllm_gpu_memory_utilization * gpu_memory_gb * GIB


SERVERS_HERE = "vLLM servers started here (weights + KV cache)"
CPU_SERVER_KV_CACHE_GB = 1.0  # vllm_server's KV cache for a server it starts on CPU without vllm_kv_cache_gb


def _vllm_servers(plan: _Plan, g, arch: Arch, s: Setup) -> None:
    """``generation.sampler: vllm_server``. Servers at ``vllm_server_urls`` run elsewhere: no memory here.
    Without URLs the run starts ``vllm_server_count`` servers on this machine, which stay up for the whole
    run (no sleep mode) on the first GPU (CPU: in memory)."""
    if g.vllm_server_urls:
        plan.assumptions.append(f"the {len(g.vllm_server_urls)} vLLM server(s) of generation.vllm_server_urls run "
                                "elsewhere: their memory is not counted")
        return
    if s.device == "cpu" and not g.vllm_kv_cache_gb:
        g = dataclasses.replace(g, vllm_kv_cache_gb=CPU_SERVER_KV_CACHE_GB)
    plan.keep(SERVERS_HERE, g.vllm_server_count * vllm_bytes(g, arch, s, plan.gpu_memory_gb))
    plan.assumptions.append(f"generation.vllm_server_count={g.vllm_server_count} vLLM server(s) started on this "
                            "machine share the first GPU (counted on every GPU: it is the peak of GPU 0); give "
                            "generation.vllm_server_urls to run them elsewhere")


def _server_sync_bytes(g, finetune: str, policy: Trained, arch: Arch, s: Setup) -> dict[str, float]:
    """What the trainer holds while it sends the policy to vLLM servers: the weights go one tensor at a time
    (the files sync copies each to the CPU), so only the gathered or merged tensors count."""
    out: dict[str, float] = {}
    a = s.compute_bytes
    if finetune != "full" and not g.vllm_server_lora:  # merged LoRA weights, one adapted matrix at a time
        out["vLLM weight sync (one merged LoRA matrix)"] = max((i * o for _, i, o in policy.lora), default=0) * a
    if s.zero3:  # one parameter gathered (and copied) at a time
        out["ZeRO-3 gathered policy"] = 2 * arch.largest * a
    elif s.fsdp:  # the sync reads the whole gathered module
        out["FSDP2 gathered model"] = arch.params * a
    return out


def vllm_sleeps(g, s: Setup) -> bool:
    """``vllm_sleep_mode`` (default: on with CUDA) frees vLLM's weights and KV cache while the policy trains."""
    return g.vllm_sleep_mode if g.vllm_sleep_mode is not None else s.device == "cuda"


# --------------------------------------------------------------------------------------------------
# The estimate
# --------------------------------------------------------------------------------------------------


def estimate_memory(cfg: RunConfig, gpus: int | None, gpu_memory_gb: float, *, device: str = "cuda",
                    model_config: str | None = None) -> Estimate:
    """Per-GPU memory of ``cfg`` on ``gpus`` GPUs (default: ``training.num_processes``) of ``gpu_memory_gb`` GiB,
    phase by phase, without suggestions (:func:`alignkit.estimate.estimate` adds them).

    ``device="cpu"`` models a CPU run instead (auto dtypes -> fp32, no autocast, no CUDA allowance): the
    configuration the CPU measurements in docs/estimate.md use. ``model_config`` (a config.json path, folder
    or preset) replaces the policy's config.
    """
    if device not in ("cuda", "cpu"):
        raise EstimateError(f"device={device!r}: use cuda or cpu.")
    gpus = gpus or cfg.training.num_processes
    if gpus < 1:
        raise EstimateError(f"--gpus {gpus}: give at least 1.")
    s = setup_of(cfg, gpus, device)
    plan = _Plan(gpu_memory_gb)
    overrides = {"policy": model_config}
    if cfg.method in ONLINE:
        _online(plan, cfg, s, overrides)
    elif cfg.method in ("seqkd", "rejection_sampling"):
        _sampling_then_sft(plan, cfg, s, overrides)
    else:
        _offline(plan, cfg, s, overrides)
    if cfg.model.dtype == "auto":
        plan.assumptions.append(f"model.dtype auto = {'bf16 (a bf16 GPU)' if device == 'cuda' else 'fp32 (CPU)'}")
    return Estimate(method=cfg.method, gpus=gpus, gpu_memory_gb=gpu_memory_gb, device=device, setup=s.label,
                    models=plan.models, phases=plan.phases, assumptions=plan.assumptions)
