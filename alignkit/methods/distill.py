"""Knowledge distillation from a frozen teacher that shares the student's vocabulary: KD, SeqKD, GKD.

Three method names, one teacher loader (:func:`load_teacher`, which refuses a teacher whose vocabulary
differs from the student's) and the divergences of :mod:`alignkit.losses.distill`.

``kd`` (supervised, off-policy; Hinton et al. 2015). Data kind "sft". Per micro-batch:

1. student forward with grad, teacher forward without, both asking the LM head only for the positions
   that predict completion tokens (:func:`alignkit.forward.target_logits`);
2. the token-level divergence ``divergence``: ``forward_kl`` KL(p_T‖p_S), ``reverse_kl`` KL(p_S‖p_T) or
   ``jsd`` (generalised JSD with ``beta``), at ``temperature``, summed over completion tokens;
3. plus ``sft_weight`` × the NLL of the dataset completion. Items are completion tokens (exact token mean).

Teacher logits are not cached: a full-vocabulary row is V floats per token (about 200 KB at V = 49k, so
~1 GB per 5k tokens of data), and top-k caching would change the objective (a truncated, renormalised
teacher). The teacher forward costs no backward, about a third of a student step of the same size.

``seqkd`` (Kim & Rush 2016). Data kind "prompt". The teacher generates completions for the training
prompts (``seqkd.generation``; greedy by default, an approximation of the teacher's mode), written to
``output_dir/teacher_data.jsonl`` in the SFT format (resumable, :mod:`alignkit.rollout.resumable`); then
the student does SFT on them (:class:`~alignkit.training.supervised.SFTMethod`).

``gkd`` (on-policy; Agarwal et al. 2024, "On-Policy Distillation of Language Models: Learning from
Self-Generated Mistakes"). Data kind "sft". Per micro-batch, with probability ``lmbda`` (one draw of a
seeded RNG whose state is checkpointed) the student samples completions for the batch's prompts
(``gkd.generation``) which replace the dataset completions; the loss is the generalised JSD with ``beta``
(0: forward KL, 1: reverse KL) over completion tokens at the sampling temperature
``gkd.generation.temperature`` (:func:`alignkit.losses.distill.generalized_jsd_loss`). How many tokens a sampled batch has is known only
after sampling, so GKD's item is a row: a micro-batch's loss is its token mean times its row count, and
the loop's mean over rows gives the mean of micro-batch token means — TRL's ``GKDTrainer`` reduction.

Metrics (train and ``eval/``): ``kl_to_teacher``, the mean per-token KL(p_T‖p_S) at temperature 1 on the
completions of the batch (eval: the eval set's completions, the same rows before and after training);
``divergence`` (the training divergence); GKD also ``on_policy`` (share of batches with student samples)
and ``completion_length``. With ``eval_before`` the summary has ``eval_before`` next to ``eval``.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from alignkit.config import ConfigError, DataSource, RunConfig, check_choice, opt
from alignkit.data import IGNORE_INDEX, build_datasets, padded_batch
from alignkit.forward import target_logits
from alignkit.losses.distill import generalized_jsd_loss
from alignkit.models import load_model, load_tokenizer, unwrap_model
from alignkit.rollout import Rollout, SamplingConfig, build_sampler
from alignkit.rollout.resumable import (
    PromptResult,
    SampleLog,
    prompts_fingerprint,
    sample_prompts,
    sft_record,
)
from alignkit.training import (
    OfflineMethod,
    autocast,
    evaluate,
    fit,
    prepare_frozen,
    setup_accelerator,
    zero_stage,
)
from alignkit.training.batches import derived_seed
from alignkit.training.checkpoint import check_output_dir, lock_output_dir
from alignkit.training.supervised import SFTMethod

logger = logging.getLogger("alignkit")

TEACHER_DATA_FILE = "teacher_data.jsonl"
DIVERGENCES = {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": None}  # -> beta of the generalised JSD


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


@dataclass
class TeacherConfig:
    """Fields every distillation method shares."""

    teacher: str | None = opt(None, "Teacher model (HF folder, hub name or asset), frozen. It must use the student's "
                                    "tokenizer: same vocabulary, token for token.")
    teacher_dtype: str | None = opt(None, "Teacher weights dtype (None: model.dtype).")
    eval_before: bool = opt(True, "Evaluate once before training, so the summary has eval_before (e.g. "
                                  "eval/kl_to_teacher) next to eval. Needs eval data.")

    def validate_teacher(self, run: RunConfig) -> None:
        if not self.teacher:
            raise ConfigError(f"{run.method}.teacher is required: the teacher model's folder, hub name or asset "
                              "(it must share the student's tokenizer).")


@dataclass
class KDConfig(TeacherConfig):
    divergence: str = opt("forward_kl", "forward_kl: KL(teacher||student), mode covering (Hinton); reverse_kl: "
                                        "KL(student||teacher), mode seeking; jsd: generalised JSD with beta.")
    beta: float = opt(0.5, "divergence jsd only: mixture weight in (0, 1) (GKD's beta).")
    temperature: float = opt(1.0, "Softmax temperature of both distributions in the divergence.")
    scale_by_temperature_sq: bool = opt(False, "Multiply the divergence by temperature^2 (Hinton's correction: keeps "
                                               "gradient sizes independent of the temperature).")
    sft_weight: float = opt(0.0, "Weight of the NLL of the dataset completions added to the divergence (0: pure KD).")

    def validate(self, run: RunConfig) -> None:
        self.validate_teacher(run)
        check_choice("kd.divergence", self.divergence, DIVERGENCES)
        if self.divergence == "jsd" and not 0 < self.beta < 1:
            raise ConfigError(f"kd.beta={self.beta}: divergence jsd needs 0 < beta < 1 (beta 0 and 1 are forward_kl "
                              "and reverse_kl).")
        if self.temperature <= 0:
            raise ConfigError(f"kd.temperature={self.temperature}: must be > 0.")
        if self.sft_weight < 0:
            raise ConfigError(f"kd.sft_weight={self.sft_weight}: must be >= 0.")


@dataclass
class SeqKDConfig(TeacherConfig):
    generation: SamplingConfig = opt(factory=lambda: SamplingConfig(do_sample=False, max_new_tokens=256),
                                     doc="The teacher's decoding: greedy by default (approximates the teacher's "
                                         "mode, as Kim & Rush's beam search); do_sample with num_samples > 1 for "
                                         "several completions per prompt. Cut completions are kept as they are.")
    sampling_batch_size: int = opt(16, "Prompts per teacher generation batch: the unit of progress, resume and seeding.")
    completion_only_loss: bool = opt(True, "SFT stage: loss on the teacher's completions only.")
    eval_kl_to_teacher: bool = opt(True, "Keep the teacher loaded during SFT to report eval/kl_to_teacher (when there "
                                         "is eval data); false frees its memory after generation.")

    def validate(self, run: RunConfig) -> None:
        self.validate_teacher(run)
        self.generation.check("seqkd.generation")
        if self.sampling_batch_size < 1:
            raise ConfigError(f"seqkd.sampling_batch_size={self.sampling_batch_size}: must be >= 1.")
        if self.generation.greedy and self.generation.num_samples > 1:
            raise ConfigError(f"seqkd.generation.num_samples={self.generation.num_samples} with greedy decoding "
                              "gives identical completions; set seqkd.generation.do_sample=true (and temperature "
                              "> 0) or num_samples=1.")


@dataclass
class GKDConfig(TeacherConfig):
    generation: SamplingConfig = opt(factory=lambda: SamplingConfig(temperature=0.9, max_new_tokens=128),
                                     doc="The student's sampling; its temperature is also that of both "
                                         "distributions in the loss. num_samples must be 1.")
    lmbda: float = opt(0.5, "λ: share of micro-batches whose completions the student samples itself (0: supervised "
                            "KD on the data, 1: fully on-policy).")
    beta: float = opt(0.5, "β of the generalised JSD: 0 = forward KL(teacher||student), 1 = reverse KL(student||teacher).")

    def validate(self, run: RunConfig) -> None:
        self.validate_teacher(run)
        self.generation.check("gkd.generation")
        if not 0 <= self.lmbda <= 1:
            raise ConfigError(f"gkd.lmbda={self.lmbda}: must be in [0, 1].")
        if not 0 <= self.beta <= 1:
            raise ConfigError(f"gkd.beta={self.beta}: must be in [0, 1].")
        if self.generation.temperature <= 0:
            raise ConfigError(f"gkd.generation.temperature={self.generation.temperature}: must be > 0 (it divides "
                              "the logits in the loss; for greedy student samples set gkd.generation.do_sample=false).")
        if self.generation.num_samples != 1:
            raise ConfigError(f"gkd.generation.num_samples={self.generation.num_samples}: GKD samples one completion "
                              "per prompt; set it to 1.")


# --------------------------------------------------------------------------------------------------
# The teacher
# --------------------------------------------------------------------------------------------------


def check_same_vocabulary(student_tokenizer, teacher_tokenizer, student_name: str, teacher_name: str,
                          key: str = "teacher") -> None:
    """Raise ConfigError naming both models when their token -> id maps differ."""
    s, t = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if s == t:
        return
    only_s = sorted(set(s.items()) - set(t.items()), key=lambda kv: kv[1])
    only_t = sorted(set(t.items()) - set(s.items()), key=lambda kv: kv[1])
    example = ""
    if only_s:
        token, i = only_s[0]
        example = f"; e.g. the student's token {token!r} (id {i}) is {'id ' + str(t[token]) if token in t else 'missing'} " \
                  "in the teacher's"
    elif only_t:
        token, i = only_t[0]
        example = f"; e.g. the teacher's token {token!r} (id {i}) is missing in the student's"
    raise ConfigError(
        f"{key}={teacher_name!r} and the student model.name_or_path={student_name!r} have different vocabularies "
        f"({len(t)} vs {len(s)} tokens{example}). Distillation compares next-token distributions token by token, "
        "so both models must use one tokenizer: pick a teacher of the student's model family (same tokenizer), "
        "or a student with the teacher's tokenizer.")


def _output_size(model) -> int:
    inner = unwrap_model(model)
    head = inner.get_output_embeddings()
    weight = getattr(head, "weight", None)
    size = getattr(weight, "ds_shape", None) or (weight.shape if weight is not None else None)
    return int(size[0]) if size is not None else int(inner.config.get_text_config().vocab_size)


def shared_vocab_size(student, teacher, tokenizer, student_name: str, teacher_name: str) -> int | None:
    """None when both LM heads have the same size; else the tokenizer's size, to slice both logits to.

    Models of one family may pad their LM heads to different sizes beyond the tokenizer's tokens (Qwen2.5:
    151936 vs 152064); those extra rows are never real tokens, so both distributions are taken over the
    tokenizer's tokens. A head smaller than the tokenizer is an error.
    """
    s, t, n = _output_size(student), _output_size(teacher), len(tokenizer)
    if s == t:
        return None
    if min(s, t) < n:
        raise ConfigError(f"teacher={teacher_name!r} has {t} output logits and the student {student_name!r} {s}, but "
                          f"their tokenizer has {n} tokens: the models do not share the vocabulary. Use a teacher of "
                          "the student's model family.")
    logger.warning("teacher %s has %d output logits, the student %s %d (padded LM heads): distilling over the "
                   "tokenizer's %d tokens.", teacher_name, t, student_name, s, n)
    return n


def load_teacher(cfg: RunConfig, tokenizer, accelerator) -> torch.nn.Module:
    """The frozen teacher of ``cfg.method_args.teacher``, placed with :func:`prepare_frozen`, after checking
    that its tokenizer's vocabulary is the student's."""
    args = cfg.method_args
    teacher_cfg = dataclasses.replace(cfg.model, name_or_path=args.teacher, gguf_file=None, revision=None,
                                      tokenizer=None, finetune="full", gradient_checkpointing=False,
                                      dtype=args.teacher_dtype or cfg.model.dtype)
    teacher_tokenizer = load_tokenizer(teacher_cfg)
    check_same_vocabulary(tokenizer, teacher_tokenizer, cfg.model.name_or_path, args.teacher, f"{cfg.method}.teacher")
    teacher = load_model(teacher_cfg, teacher_tokenizer, trainable=False)
    logger.info("%s teacher: frozen %s", cfg.method, args.teacher)
    return prepare_frozen(accelerator, teacher)


# --------------------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------------------


def last_completion_start(labels: list[int]) -> int:
    """Where the last labelled run starts: the prompt of the last assistant turn is everything before it."""
    end = max((i for i, v in enumerate(labels) if v != IGNORE_INDEX), default=len(labels) - 1)
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return start


class TeacherMethod(OfflineMethod):
    """Shared by KD and GKD: right-padded completion batches, teacher logits, the KL-to-teacher metric."""

    bar_metrics = ("kl_to_teacher",)

    def __init__(self, teacher: torch.nn.Module, pad_token_id: int, *, accelerator=None, vocab_size: int | None = None):
        self.teacher, self.pad_token_id = teacher, pad_token_id
        self.accelerator, self.vocab_size = accelerator, vocab_size

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = padded_batch([r["input_ids"] for r in rows], [r["labels"] for r in rows], self.pad_token_id)
        batch["prompt_len"] = torch.tensor([last_completion_start(r["labels"]) for r in rows], dtype=torch.long)
        return batch

    def count_items(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def logits_pair(self, model, input_ids, attention_mask, labels, position_ids=None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(student logits, teacher logits, targets) for the positions predicting labels, float32, aligned."""
        student, targets = target_logits(model, input_ids, attention_mask, labels, position_ids=position_ids)
        with torch.no_grad(), autocast(self.accelerator):
            teacher, _ = target_logits(self.teacher, input_ids, attention_mask, labels, position_ids=position_ids)
        if self.vocab_size is not None:
            student, teacher = student[..., : self.vocab_size], teacher[..., : self.vocab_size]
        return student.float(), teacher.float(), targets


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                  reduction: str = "sum") -> torch.Tensor:
    """KL(p_T || p_S) at temperature 1 over the target tokens (detached): the distillation progress metric."""
    return generalized_jsd_loss(student_logits.detach(), teacher_logits, targets, beta=0.0, reduction=reduction)


class KDMethod(TeacherMethod):
    """Supervised KD on dataset completions; items are completion tokens."""

    def __init__(self, args: KDConfig, teacher, pad_token_id: int, **kwargs: Any):
        super().__init__(teacher, pad_token_id, **kwargs)
        self.args = args

    def loss(self, model, batch):
        a = self.args
        student, teacher, targets = self.logits_pair(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        beta = a.beta if a.divergence == "jsd" else DIVERGENCES[a.divergence]
        divergence = generalized_jsd_loss(student, teacher, targets, beta=beta, temperature=a.temperature,
                                          reduction="sum")
        if a.scale_by_temperature_sq:
            divergence = divergence * a.temperature**2
        loss = divergence
        metrics = {"divergence": divergence.detach()}
        same = beta == 0.0 and a.temperature == 1.0 and not a.scale_by_temperature_sq
        metrics["kl_to_teacher"] = divergence.detach() if same else kl_to_teacher(student, teacher, targets)
        if a.sft_weight > 0:
            nll = F.cross_entropy(student.reshape(-1, student.shape[-1]), targets.reshape(-1),
                                  ignore_index=IGNORE_INDEX, reduction="sum")
            loss = loss + a.sft_weight * nll
            metrics["nll"] = nll.detach()
        return loss, metrics


class GKDMethod(TeacherMethod):
    """On-policy distillation; items are rows (a micro-batch's loss = its token mean x its rows)."""

    bar_metrics = ("kl_to_teacher", "on_policy")

    def __init__(self, args: GKDConfig, teacher, pad_token_id: int, sampler, *, seed: int, rank: int = 0,
                 **kwargs: Any):
        super().__init__(teacher, pad_token_id, **kwargs)
        self.args, self.sampler, self.seed, self.rank = args, sampler, seed, rank
        # the same seed on every process: all draw the same on/off-policy decision (generation is collective
        # under ZeRO-3), and a resumed run continues the sequence from the checkpointed state
        self.rng = random.Random(seed)
        self.draws = 0

    def count_items(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["input_ids"].shape[0])

    def state_dict(self) -> dict:
        version, internal, gauss = self.rng.getstate()
        return {"rng": [version, list(internal), gauss], "draws": self.draws}

    def load_state_dict(self, state: dict) -> None:
        if "rng" in state:
            version, internal, gauss = state["rng"]
            self.rng.setstate((version, tuple(internal), gauss))
            self.draws = int(state.get("draws", 0))

    def draw_on_policy(self) -> bool:
        self.draws += 1
        return self.rng.random() < self.args.lmbda

    def student_batch(self, model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch's prompts with completions sampled by the student (left-padded prompts, labels on responses)."""
        ids, prompt_len = batch["input_ids"], batch["prompt_len"].tolist()
        prompts = [ids[i, : max(n, 1)].tolist() for i, n in enumerate(prompt_len)]
        rollout: Rollout = self.sampler.generate(model, prompts, seed=derived_seed(self.seed, self.draws, self.rank))
        self.sampler.sleep()  # vLLM on a GPU frees its memory for the update
        input_ids, attention_mask = rollout.sequences()
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        labels[:, rollout.prompt_ids.shape[1]:] = rollout.response_ids.masked_fill(rollout.response_mask == 0,
                                                                                  IGNORE_INDEX)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                "position_ids": rollout.position_ids()}

    def loss(self, model, batch):
        a = self.args
        rows = batch["input_ids"].shape[0]
        # eval (model.eval()) scores the fixed eval completions and draws nothing
        on_policy = model.training and self.draw_on_policy()
        if on_policy:
            batch = self.student_batch(model, batch)
        student, teacher, targets = self.logits_pair(model, batch["input_ids"], batch["attention_mask"],
                                                     batch["labels"], batch.get("position_ids"))
        jsd = generalized_jsd_loss(student, teacher, targets, beta=a.beta,
                                   temperature=a.generation.temperature)  # token mean
        n_tokens = (targets != IGNORE_INDEX).sum()
        metrics = {
            "divergence": rows * jsd.detach(),
            "kl_to_teacher": rows * kl_to_teacher(student, teacher, targets, reduction="batchmean"),
            "on_policy": torch.tensor(float(rows if on_policy else 0)),
            "completion_length": n_tokens.float(),
        }
        return rows * jsd, metrics


class SeqKDMethod(SFTMethod):
    """SFT on the teacher's completions; with a teacher kept, eval also reports kl_to_teacher."""

    def __init__(self, pad_token_id: int, completion_only_loss: bool = True, *, teacher=None, accelerator=None,
                 vocab_size: int | None = None):
        super().__init__(pad_token_id, completion_only_loss)
        self.teacher, self.accelerator, self.vocab_size = teacher, accelerator, vocab_size

    def loss(self, model, batch):
        loss, logits, targets = self.token_loss(model, batch)
        metrics = {}
        if self.teacher is not None and not model.training:
            with torch.no_grad(), autocast(self.accelerator):
                teacher, _ = target_logits(self.teacher, batch["input_ids"], batch.get("attention_mask"),
                                           batch["labels"], position_ids=batch.get("position_ids"))
            student = logits
            if self.vocab_size is not None:
                student, teacher = student[..., : self.vocab_size], teacher[..., : self.vocab_size]
            metrics["kl_to_teacher"] = kl_to_teacher(student.float(), teacher.float(), targets)
        return loss, metrics


# --------------------------------------------------------------------------------------------------
# Recipes
# --------------------------------------------------------------------------------------------------


def evaluate_before(accelerator, model, method: OfflineMethod, rows: list[dict] | None, cfg: RunConfig) -> dict:
    """The eval metrics of the untrained student (empty without eval rows, with eval_before off, or under ZeRO-3,
    where the student is partitioned only when training starts)."""
    if not rows or not cfg.method_args.eval_before:
        return {}
    if zero_stage(accelerator) == 3:
        logger.info("%s.eval_before: skipped under ZeRO-3 (the student is placed only when training starts).",
                    cfg.method)
        return {}
    if not getattr(model, "is_loaded_in_4bit", False) and not getattr(model, "is_quantized", False):
        model.to(accelerator.device)
    with accelerator.autocast():
        metrics = evaluate(accelerator, model, method, rows, cfg.training.per_device_batch_size)
    logger.info("before training: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    return metrics


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run(cfg: RunConfig) -> dict:
    if cfg.method == "seqkd":
        return run_seqkd(cfg)
    args = cfg.method_args
    accelerator = setup_accelerator(cfg.training)
    tokenizer = load_tokenizer(cfg.model)
    with accelerator.main_process_first():
        splits = build_datasets(cfg.data, tokenizer, "sft")
    model = load_model(cfg.model, tokenizer)  # the student first: its LoRA init draws from the seeded RNG
    teacher = load_teacher(cfg, tokenizer, accelerator)
    vocab = shared_vocab_size(model, teacher, tokenizer, cfg.model.name_or_path, args.teacher)
    common = {"accelerator": accelerator, "vocab_size": vocab}
    if cfg.method == "kd":
        method: OfflineMethod = KDMethod(args, teacher, tokenizer.pad_token_id, **common)
    else:
        sampler = build_sampler(args.generation, tokenizer, model_name_or_path=cfg.model.name_or_path,
                                device=accelerator.device, dtype=cfg.model.dtype, seed=cfg.training.seed)
        method = GKDMethod(args, teacher, tokenizer.pad_token_id, sampler, seed=cfg.training.seed,
                           rank=accelerator.process_index, **common)
    before = evaluate_before(accelerator, model, method, splits.eval, cfg)
    result = fit(accelerator, model, tokenizer, method, cfg, splits.train, splits.eval)
    if cfg.method == "gkd":
        sampler.close()
    result["eval_before"] = before
    result["data_stats"] = splits.stats
    return result


def run_seqkd(cfg: RunConfig) -> dict:
    args: SeqKDConfig = cfg.method_args
    t = cfg.training
    out = Path(t.output_dir)
    accelerator = setup_accelerator(t)
    lock_output_dir(accelerator, t.output_dir)  # the teacher data file is appended to: one run at a time
    if not t.resume:
        check_output_dir(t)  # a finished run there: fail now, not after the teacher generated
    tokenizer = load_tokenizer(cfg.model)
    # the teacher answers every training prompt; data.eval / data.eval_split are SFT rows for the SFT stage
    prompt_data = dataclasses.replace(cfg.data, eval=[], eval_split=0.0)
    with accelerator.main_process_first():
        prompts = build_datasets(prompt_data, tokenizer, "prompt").train
    teacher = load_teacher(cfg, tokenizer, accelerator)

    # 1. teacher data (resumable)
    sampler = build_sampler(args.generation, tokenizer, model_name_or_path=args.teacher, device=accelerator.device,
                            dtype=args.teacher_dtype or cfg.model.dtype, seed=t.seed)
    g = args.generation
    settings = {"teacher": args.teacher, "sampling_batch_size": args.sampling_batch_size,
                **{f"generation.{k}": getattr(g, k) for k in ("max_new_tokens", "temperature", "top_p", "top_k",
                                                              "num_samples", "do_sample", "sampler")}}
    meta = {"method": "seqkd", "seed": t.seed, "processes": accelerator.num_processes, "prompts": len(prompts),
            "prompts_sha256": prompts_fingerprint(prompts), "settings": settings}
    log = SampleLog(out / TEACHER_DATA_FILE, meta, restart=t.overwrite_output_dir and not t.resume) \
        if accelerator.is_main_process else None
    k = g.num_samples

    def keep_all(rows: list[dict], prompt_ids: list[int], rollout: Rollout) -> list[PromptResult]:
        results = []
        for j, (row, pid) in enumerate(zip(rows, prompt_ids)):
            texts = rollout.response_texts[j * k:(j + 1) * k]
            results.append(PromptResult(pid, [{**sft_record(row["prompt"], text), "prompt_id": pid, "sample_index": s}
                                              for s, text in enumerate(texts) if text.strip()]))
        return results

    sample_prompts(accelerator, teacher, sampler, prompts, log, batch_size=args.sampling_batch_size, seed=t.seed,
                   choose=keep_all, desc="teacher data")
    if log is not None:
        n_rows = sum(e["rows"] for e in log.entries)
        logger.info("seqkd: %d teacher completions for %d prompts in %s", n_rows, len(prompts), log.path)
    sampler.close()
    del sampler

    # 2. SFT of the student on the teacher's completions
    sft_data = dataclasses.replace(cfg.data, train=[DataSource(path=str(out / TEACHER_DATA_FILE))])
    with accelerator.main_process_first():
        splits = build_datasets(sft_data, tokenizer, "sft")
    keep_teacher = args.eval_kl_to_teacher and bool(splits.eval)
    if not keep_teacher:
        teacher = None
        _free()
    model = load_model(cfg.model, tokenizer)
    vocab = shared_vocab_size(model, teacher, tokenizer, cfg.model.name_or_path, args.teacher) if keep_teacher else None
    method = SeqKDMethod(tokenizer.pad_token_id, args.completion_only_loss, teacher=teacher, accelerator=accelerator,
                         vocab_size=vocab)
    before = evaluate_before(accelerator, model, method, splits.eval, cfg)
    result = fit(accelerator, model, tokenizer, method, cfg, splits.train, splits.eval)
    result.update(eval_before=before, data_stats=splits.stats, teacher_data=str(out / TEACHER_DATA_FILE))
    return result
