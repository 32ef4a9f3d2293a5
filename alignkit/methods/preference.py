"""The DPO family on preference pairs: DPO (sigmoid / IPO / hinge / robust), SimPO, CPO (and CPO-SimPO), ORPO.

Four method names, one :class:`PreferenceMethod` parametrised by the name. The losses themselves are the
pure functions of :mod:`alignkit.losses.preference`; this module feeds them log-probabilities.

Recipe: accelerator → tokenizer → data (kind "preference") → policy (full / LoRA / QLoRA) → reference
(DPO only) → optional precomputed reference log-probs → training.fit.

Per micro-batch of B pairs:

1. ``collate``: 2B sequences, ``prompt + chosen`` then ``prompt + rejected``, laid out by the run's
   :class:`~alignkit.forward.BatchLayout`: padding-free rows (``<method>.padding_free``), and, where the
   attention kernel takes a custom mask, ``[prompt | chosen | rejected]`` segments that compute each
   prompt once (``<method>.shared_prompt``); right-padded rows otherwise. All give the same log-probs.
2. One policy forward (``alignkit.forward.batch_logps``) in which only the positions that predict a
   completion token reach the LM head, chunk by chunk (``<method>.chunked_logps``): no ``[tokens, vocab]``
   logits, no log-softmax over the prompt.
3. DPO only, ``log π_ref(y|x)``: precomputed in the rows (``dpo.precompute_ref_logps``; ``auto`` does it
   when the run visits every training row at least once), or the reference (:mod:`alignkit.reference`): a
   frozen model (``dpo.ref_model``, else a frozen copy of ``model.name_or_path``), or, for LoRA/QLoRA, the
   policy with its adapter off.
4. The loss summed over pairs and metric sums over pairs (the training loop divides by the global pair
   count).
"""

from __future__ import annotations

import gc
import logging
import math
from dataclasses import dataclass

import torch

from alignkit.config import ConfigError, RunConfig, check_choice, opt
from alignkit.data import build_datasets
from alignkit.forward import BatchLayout, batch_logps, choose_layout
from alignkit.losses import cpo_loss, dpo_loss, orpo_loss, simpo_loss
from alignkit.models import load_model, load_tokenizer
from alignkit.reference import Reference, load_reference
from alignkit.training import OfflineMethod, autocast, fit, setup_accelerator, zero_stage
from alignkit.training.loop import total_updates

logger = logging.getLogger("alignkit")

DPO_LOSS_TYPES = ["sigmoid", "ipo", "hinge", "robust"]
CPO_LOSS_TYPES = ["sigmoid", "ipo", "hinge", "simpo"]


# --------------------------------------------------------------------------------------------------
# Config: a small base (beta) and one dataclass per method name
# --------------------------------------------------------------------------------------------------


@dataclass
class PreferenceConfig:
    """Fields every method of the family shares."""

    beta: float = opt(0.1, "β: scale of the implicit reward β·log π(y|x) (DPO: a higher β keeps the policy closer "
                           "to the reference).")
    padding_free: bool = opt(True, "Pack the chosen/rejected sequences end to end (position ids restart per "
                                   "sequence) instead of padding them; same log-probs, no pad tokens computed.")
    shared_prompt: bool | str = opt("auto", "Compute each prompt once for chosen and rejected (one segment, custom "
                                            "attention mask; sdpa/eager only). auto: per batch, when estimated "
                                            "cheaper; true: always; false: never.")
    chunked_logps: bool = opt(True, "Apply the LM head and log-softmax a chunk of positions at a time, recomputed "
                                    "in backward: no [tokens x vocab] logits tensor. Same values and gradients.")

    def validate(self, run: RunConfig) -> None:
        if self.beta <= 0:
            raise ConfigError(f"{run.method}.beta={self.beta}: must be > 0.")
        if self.shared_prompt not in (True, False, "auto"):
            raise ConfigError(f"{run.method}.shared_prompt={self.shared_prompt!r}: use auto, true or false.")

    def _check_smoothing(self, run: RunConfig, loss_type: str) -> None:
        eps = self.label_smoothing
        if loss_type in ("sigmoid", "simpo") and not 0.0 <= eps <= 0.5:
            raise ConfigError(f"{run.method}.label_smoothing={eps}: must be in [0, 0.5] (the probability that a "
                              "preference label is flipped).")
        if loss_type == "robust" and not 0.0 <= eps < 0.5:
            raise ConfigError(f"{run.method}.label_smoothing={eps}: loss_type robust needs it in [0, 0.5) "
                              "(it divides by 1 - 2*label_smoothing).")
        if loss_type in ("ipo", "hinge") and eps != 0.0:
            raise ConfigError(f"{run.method}.label_smoothing={eps} has no meaning for loss_type {loss_type}; set it "
                              "to 0, or use loss_type sigmoid (conservative DPO) or robust.")

    def _refuse_fp16(self, run: RunConfig) -> None:
        if run.training.mixed_precision == "fp16" or run.model.dtype in ("float16", "fp16"):
            raise ConfigError(
                f"{run.method} in float16 (training.mixed_precision={run.training.mixed_precision}, "
                f"model.dtype={run.model.dtype}): its reference-free, length-normalised log-probabilities "
                "(and ORPO's log(1 - p)) lose their precision or overflow in fp16 and the loss turns NaN. "
                "Use training.mixed_precision=bf16 (GPUs with bf16) or no (fp32), and model.dtype "
                "bfloat16, float32 or auto."
            )


@dataclass
class DPOConfig(PreferenceConfig):
    loss_type: str = opt("sigmoid", "sigmoid (DPO), ipo (IPO, on length-averaged log-ratios), hinge (SLiC), robust (rDPO).")
    label_smoothing: float = opt(0.0, "Probability a label is flipped: conservative DPO (sigmoid) or robust DPO; 0 otherwise.")
    ref_model: str | None = opt(None, "Reference model (folder, hub name, asset). None: the policy with its adapter "
                                      "off (lora/qlora) or a frozen copy of model.name_or_path (full).")
    precompute_ref_logps: bool | str = opt("auto", "Score every train/eval row with the reference once before "
                                                   "training, then free the reference model (one forward less per "
                                                   "step). auto: when the run visits every training row at least "
                                                   "once (and the reference allows it).")

    def validate(self, run: RunConfig) -> None:
        super().validate(run)
        if self.precompute_ref_logps not in (True, False, "auto"):
            raise ConfigError(f"dpo.precompute_ref_logps={self.precompute_ref_logps!r}: use auto, true or false.")
        check_choice(f"{run.method}.loss_type", self.loss_type, DPO_LOSS_TYPES)
        self._check_smoothing(run, self.loss_type)


@dataclass
class SimPOConfig(PreferenceConfig):
    beta: float = opt(2.0, "β: scale of the length-normalised reward β/|y| log πθ(y|x) (SimPO uses 2-10).")
    gamma_beta_ratio: float = opt(0.5, "Target reward margin γ as a fraction of β (γ = gamma_beta_ratio * β).")
    label_smoothing: float = opt(0.0, "Probability a label is flipped (conservative loss), in [0, 0.5].")

    def validate(self, run: RunConfig) -> None:
        super().validate(run)
        self._check_smoothing(run, "simpo")
        self._refuse_fp16(run)


@dataclass
class CPOConfig(PreferenceConfig):
    loss_type: str = opt("sigmoid", "Preference term: sigmoid (CPO), hinge, ipo, or simpo (CPO-SimPO: SimPO's "
                                    "length-normalised margin loss plus the NLL term).")
    label_smoothing: float = opt(0.0, "Probability a label is flipped (sigmoid / simpo), in [0, 0.5].")
    cpo_alpha: float = opt(1.0, "Weight α of the NLL (behaviour cloning) term on the chosen completions.")
    gamma_beta_ratio: float = opt(0.5, "loss_type simpo only: target margin γ = gamma_beta_ratio * β.")

    def validate(self, run: RunConfig) -> None:
        super().validate(run)
        check_choice(f"{run.method}.loss_type", self.loss_type, CPO_LOSS_TYPES)
        self._check_smoothing(run, self.loss_type)
        if self.cpo_alpha < 0:
            raise ConfigError(f"cpo.cpo_alpha={self.cpo_alpha}: must be >= 0.")
        self._refuse_fp16(run)


@dataclass
class ORPOConfig(PreferenceConfig):
    beta: float = opt(0.1, "λ: weight of the odds-ratio term added to the NLL of the chosen completions.")

    def validate(self, run: RunConfig) -> None:
        super().validate(run)
        self._refuse_fp16(run)


# --------------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------------


class PreferenceMethod(OfflineMethod):
    """DPO / SimPO / CPO / ORPO on concatenated chosen+rejected batches; items are pairs.

    ``reference``: DPO's :class:`~alignkit.reference.Reference`; rows holding ``ref_chosen_logps`` /
    ``ref_rejected_logps`` (precomputed) need none.
    """

    bar_metrics = ("rewards/accuracies", "rewards/margins")

    def __init__(self, method: str, args: PreferenceConfig, pad_token_id: int, *, accelerator=None,
                 reference: Reference | None = None, layout: BatchLayout | None = None):
        if method not in ("dpo", "simpo", "cpo", "orpo"):
            raise ValueError(f"PreferenceMethod: unknown method {method!r}.")
        self.method, self.args, self.pad_token_id = method, args, pad_token_id
        self.accelerator, self.reference = accelerator, reference
        self.layout = layout or BatchLayout()

    # -- data ---------------------------------------------------------------------------------------

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        triples = [(list(r["prompt_ids"]), list(r["chosen_ids"]), list(r["rejected_ids"])) for r in rows]
        batch = self.layout.pairs(triples, self.pad_token_id)
        if all("ref_chosen_logps" in r for r in rows):
            batch["ref_logps"] = torch.tensor([r["ref_chosen_logps"] for r in rows]
                                              + [r["ref_rejected_logps"] for r in rows], dtype=torch.float32)
        return batch

    def count_items(self, batch: dict[str, torch.Tensor]) -> int:
        return len(batch["sequence_tokens"]) // 2

    def count_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["n_tokens"])

    def logps(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per sequence (B chosen, then B rejected): summed completion log-probs, token counts, mean logits."""
        return batch_logps(model, batch, chunked=self.args.chunked_logps)

    # -- reference ----------------------------------------------------------------------------------

    def reference_logps(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``log π_ref`` of the 2B rows: precomputed, else from the reference (frozen model or adapter-off policy)."""
        if "ref_logps" in batch:
            return batch["ref_logps"].to(batch["input_ids"].device)
        if self.reference is None:
            raise RuntimeError("dpo needs reference log-probs: give a reference or precomputed rows.")
        with self.reference.applied(model) as ref, autocast(self.accelerator):
            return self.logps(ref, batch)[0]

    def precompute_reference(self, model, rows: list[dict], batch_size: int) -> None:
        """Store ``ref_chosen_logps``/``ref_rejected_logps`` in every row (rows are sharded over processes,
        every process runs the same number of forwards, results are gathered to all)."""
        acc = self.accelerator
        world, rank = (acc.num_processes, acc.process_index) if acc is not None else (1, 0)
        device = acc.device if acc is not None else torch.device("cpu")
        mine = list(range(rank, len(rows), world))
        n_batches = math.ceil(math.ceil(len(rows) / world) / batch_size)
        found = []
        for b in range(n_batches):
            idx = mine[b * batch_size:(b + 1) * batch_size]
            # a process with no rows left still runs a forward (ZeRO-3 gathers weights collectively)
            batch = self.collate([rows[i] for i in idx] or [rows[0]])
            batch.pop("ref_logps", None)
            batch = {k: v.to(device) for k, v in batch.items()}
            ref = self.reference_logps(model, batch).float().cpu()
            k = self.count_items(batch)
            found += [(i, float(ref[j]), float(ref[k + j])) for j, i in enumerate(idx)]
        if world > 1:
            from accelerate.utils import gather_object

            found = gather_object(found)
        for i, chosen, rejected in found:
            rows[i]["ref_chosen_logps"] = chosen
            rows[i]["ref_rejected_logps"] = rejected
        missing = sum("ref_chosen_logps" not in r for r in rows)
        if missing:
            raise RuntimeError(f"precompute_ref_logps: {missing} rows got no reference log-probs.")

    # -- loss ---------------------------------------------------------------------------------------

    def loss(self, model, batch):
        B = self.count_items(batch)
        a = self.args
        ref = self.reference_logps(model, batch) if self.method == "dpo" else None
        logps, n_tokens, mean_logits = self.logps(model, batch)
        avg = logps / n_tokens.clamp(min=1)  # length-normalised log-probs (SimPO, IPO, ORPO, NLL)
        nll = None
        extra = {}
        if self.method == "dpo":
            if a.loss_type == "ipo":  # IPO on per-token log-ratios (TRL / the IPO authors' experiments)
                pol, ref_used = avg, ref / n_tokens.clamp(min=1)
            else:
                pol, ref_used = logps, ref
            losses, r_chosen, r_rejected = dpo_loss(pol[:B], pol[B:], ref_used[:B], ref_used[B:], beta=a.beta,
                                                    loss_type=a.loss_type, label_smoothing=a.label_smoothing)
        elif self.method == "simpo":
            losses, r_chosen, r_rejected = simpo_loss(avg[:B], avg[B:], beta=a.beta,
                                                      gamma_beta_ratio=a.gamma_beta_ratio,
                                                      label_smoothing=a.label_smoothing)
        elif self.method == "cpo":
            if a.loss_type == "simpo":
                losses, r_chosen, r_rejected = simpo_loss(avg[:B], avg[B:], beta=a.beta,
                                                          gamma_beta_ratio=a.gamma_beta_ratio,
                                                          label_smoothing=a.label_smoothing)
            else:
                pol = avg if a.loss_type == "ipo" else logps
                losses, r_chosen, r_rejected = cpo_loss(pol[:B], pol[B:], beta=a.beta, loss_type=a.loss_type,
                                                        label_smoothing=a.label_smoothing)
            # NLL per pair: the chosen completion's mean token NLL (per-pair, so the engine's pair mean
            # is exact under any batching)
            nll = -avg[:B]
            losses = losses + a.cpo_alpha * nll
        else:  # orpo
            odds, r_chosen, r_rejected, log_odds_ratio, log_odds_chosen = orpo_loss(avg[:B], avg[B:], beta=a.beta)
            nll = -avg[:B]
            losses = nll + odds.to(nll.dtype)
            extra = {"log_odds_ratio": log_odds_ratio.sum(), "log_odds_chosen": log_odds_chosen.sum()}
        metrics = {
            "rewards/chosen": r_chosen.sum(),
            "rewards/rejected": r_rejected.sum(),
            "rewards/accuracies": (r_chosen > r_rejected).float().sum(),
            "rewards/margins": (r_chosen - r_rejected).sum(),
            "logps/chosen": logps[:B].detach().sum(),
            "logps/rejected": logps[B:].detach().sum(),
            "logits/chosen": mean_logits[:B].sum(),
            "logits/rejected": mean_logits[B:].sum(),
        }
        if nll is not None:
            metrics["nll"] = nll.detach().sum()
        metrics.update(extra)
        return losses.sum(), {k: v.detach().float() for k, v in metrics.items()}


# --------------------------------------------------------------------------------------------------
# Recipe
# --------------------------------------------------------------------------------------------------


def _precompute_reference(cfg: RunConfig, accelerator, reference: Reference, n_train: int) -> bool:
    """Whether to score the rows with the reference before training (``dpo.precompute_ref_logps``); logged."""
    mode = cfg.method_args.precompute_ref_logps
    adapter_off_zero3 = reference.is_adapter_off_policy and zero_stage(accelerator) == 3
    if mode is True:
        if adapter_off_zero3:
            raise ConfigError("dpo.precompute_ref_logps with a LoRA policy as its own reference is not supported "
                              "under ZeRO-3 (the policy is not placed before training); set "
                              "dpo.precompute_ref_logps=false (a LoRA reference costs no extra memory).")
        return True
    if mode is False:
        return False
    t = cfg.training
    per_batch = t.per_device_batch_size * accelerator.num_processes
    visited = total_updates(t, max(n_train // per_batch, 1)) * t.gradient_accumulation_steps * per_batch
    precompute = visited >= n_train and not adapter_off_zero3
    why = ("a LoRA policy as its own reference cannot be scored before training under ZeRO-3"
           if adapter_off_zero3 and visited >= n_train else
           f"the run scores {visited} training rows with a live reference, the train set has {n_train}")
    logger.info("dpo.precompute_ref_logps=auto: %s (%s)", "precomputing reference log-probs" if precompute
                else "live reference", why)
    return precompute


def run(cfg: RunConfig) -> dict:
    accelerator = setup_accelerator(cfg.training)
    tokenizer = load_tokenizer(cfg.model)
    with accelerator.main_process_first():
        splits = build_datasets(cfg.data, tokenizer, "preference")
    model = load_model(cfg.model, tokenizer)  # the policy first: its LoRA init draws from the seeded RNG
    reference = load_reference(cfg, tokenizer, accelerator, model) if cfg.method == "dpo" else None
    args = cfg.method_args
    layout = choose_layout(model, padding_free=args.padding_free, shared_prompt=args.shared_prompt, pairs=True,
                           accelerator=accelerator, what=f"{cfg.method} batches")
    method = PreferenceMethod(cfg.method, args, tokenizer.pad_token_id, accelerator=accelerator,
                              reference=reference, layout=layout)
    if cfg.method == "dpo" and _precompute_reference(cfg, accelerator, reference, len(splits.train)):
        if reference.is_adapter_off_policy:
            model.to(accelerator.device)
        for rows in (splits.train, splits.eval or []):
            method.precompute_reference(model, rows, cfg.training.per_device_batch_size)
        logger.info("dpo: reference log-probs precomputed for %d train and %d eval rows; reference freed",
                    len(splits.train), len(splits.eval or []))
        method.reference = reference = None
        gc.collect()
    result = fit(accelerator, model, tokenizer, method, cfg, splits.train, splits.eval)
    result["data_stats"] = splits.stats
    return result
