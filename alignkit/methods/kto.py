"""KTO: Kahneman-Tversky Optimization on unpaired completions labelled desirable / undesirable.

Ethayarajh et al. 2024. The loss is :func:`alignkit.losses.kto_loss`; this module feeds it log-probs.

Recipe: accelerator → tokenizer → data (kind "unpaired") → policy (full / LoRA / QLoRA) → reference
(``kto.ref_model``, else the adapter-off policy for LoRA/QLoRA, else a frozen copy) → training.fit.

Per micro-batch of B rows ``(x_i, y_i, label_i)``:

1. ``collate`` builds the B sequences ``x_i + y_i`` and (keys ``kl.*``) the B mismatched sequences
   ``x_i + y_{i-1}`` (completions shifted by one within the batch, as in the paper and TRL), each group laid
   out by the run's :class:`~alignkit.forward.BatchLayout` (padding-free with ``kto.padding_free``).
2. The reference point ``z0 = max(0, mean_i [log πθ(y_{i-1}|x_i) - log π_ref(y_{i-1}|x_i)])`` from the
   mismatched sequences (no grad), averaged over processes (``accelerator.reduce``) before use.
3. One policy forward with grad over the B matched sequences; the reference scores both groups. Log-probs
   come from the LM head run chunk by chunk at the completion positions only (``kto.chunked_logps``).
4. ``kto_loss`` per row, weighted by ``desirable_weight`` / ``undesirable_weight``, summed; items are rows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from alignkit.config import ConfigError, RunConfig, opt
from alignkit.data import IGNORE_INDEX, build_datasets
from alignkit.forward import BatchLayout, batch_logps, choose_layout
from alignkit.losses import kto_loss
from alignkit.models import load_model, load_tokenizer
from alignkit.reference import Reference, load_reference
from alignkit.training import OfflineMethod, autocast, fit, setup_accelerator

logger = logging.getLogger("alignkit")


@dataclass
class KTOConfig:
    beta: float = opt(0.1, "β: scale of the implicit reward β·log(πθ/π_ref); a higher β keeps the policy closer to the reference.")
    desirable_weight: float = opt(1.0, "λ_D: weight of desirable rows. The paper suggests λ_D·n_D / (λ_U·n_U) in [1, 4/3].")
    undesirable_weight: float = opt(1.0, "λ_U: weight of undesirable rows.")
    ref_model: str | None = opt(None, "Reference model (folder, hub name, asset). None: the policy with its adapter "
                                      "off (lora/qlora) or a frozen copy of model.name_or_path (full).")
    reference_point: bool = opt(True, "Estimate the KL reference point z0 from mismatched prompt/completion pairs "
                                      "(false: z0 = 0 and no forwards over mismatched pairs).")
    padding_free: bool = opt(True, "Pack the sequences end to end (position ids restart per sequence) instead of "
                                   "padding them; same log-probs, no pad tokens computed.")
    chunked_logps: bool = opt(True, "Apply the LM head and log-softmax a chunk of positions at a time, recomputed "
                                    "in backward: no [tokens x vocab] logits tensor. Same values and gradients.")

    def validate(self, run: RunConfig) -> None:
        if self.beta <= 0:
            raise ConfigError(f"kto.beta={self.beta}: must be > 0.")
        if self.desirable_weight < 0 or self.undesirable_weight < 0:
            raise ConfigError("kto.desirable_weight and kto.undesirable_weight must be >= 0.")
        if self.reference_point and run.training.per_device_batch_size < 2:
            raise ConfigError(
                "kto with training.per_device_batch_size=1: the KL reference point pairs each prompt with another "
                "row's completion in the same batch, so it needs at least 2 rows per batch. Raise "
                "training.per_device_batch_size (use gradient_accumulation_steps to keep the global batch), or "
                "set kto.reference_point=false."
            )


KL = "kl."  # key prefix of the mismatched sequences in a batch


def kl_part(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The mismatched (KL reference point) sequences of a collated batch, as a batch of their own."""
    return {k[len(KL):]: v for k, v in batch.items() if k.startswith(KL)}


class KTOMethod(OfflineMethod):
    """KTO; items are rows; ``reference`` gives the reference log-probs."""

    bar_metrics = ("rewards/accuracies", "rewards/margins")

    def __init__(self, args: KTOConfig, pad_token_id: int, max_length: int, *, reference: Reference,
                 accelerator=None, layout: BatchLayout | None = None):
        self.args, self.pad_token_id, self.max_length = args, pad_token_id, max_length
        self.accelerator, self.reference = accelerator, reference
        self.layout = layout or BatchLayout()

    def _sequences(self, pairs: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        return self.layout.sequences([p + c for p, c in pairs], [[IGNORE_INDEX] * len(p) + c for p, c in pairs],
                                     self.pad_token_id)

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        B = len(rows)
        pairs = [(list(r["prompt_ids"]), list(r["completion_ids"])) for r in rows]
        batch = self._sequences(pairs)
        if self.args.reference_point:
            # mismatched pairs: prompt i with completion i-1; the prompt is cut from the left to fit max_length
            mismatched = []
            for i in range(B):
                prompt, completion = pairs[i][0], pairs[(i - 1) % B][1]
                keep = max(0, min(len(prompt), self.max_length - len(completion)))
                mismatched.append((prompt[len(prompt) - keep:], completion))
            batch.update({KL + k: v for k, v in self._sequences(mismatched).items()})
        batch["desirable"] = torch.tensor([bool(r["label"]) for r in rows])
        return batch

    def count_items(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["desirable"].shape[0])

    def count_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["n_tokens"]) + int(batch.get(KL + "n_tokens", 0))

    def _logps(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return batch_logps(model, batch, chunked=self.args.chunked_logps)

    def _reference_logps(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with self.reference.applied(model) as ref, autocast(self.accelerator):
            return self._logps(ref, batch)[0]

    def _sum_over_processes(self, values: torch.Tensor) -> torch.Tensor:
        acc = self.accelerator
        if acc is not None and acc.num_processes > 1:
            return acc.reduce(values, reduction="sum")
        return values

    def loss(self, model, batch):
        a = self.args
        B = self.count_items(batch)
        desirable = batch["desirable"]
        device = batch["input_ids"].device
        kl_local = torch.zeros((), device=device)
        if a.reference_point:
            mismatched = kl_part(batch)
            ref_kl = self._reference_logps(model, mismatched)
            with torch.no_grad():
                policy_kl = self._logps(model, mismatched)[0]
            kl_local = (policy_kl - ref_kl).mean().detach().float()
        # one all-reduce: this micro-step's KL estimate (averaged over processes) and class counts
        n_desirable = desirable.sum().float().to(device)
        reduced = self._sum_over_processes(torch.stack([kl_local, n_desirable, B - n_desirable]))
        world = self.accelerator.num_processes if self.accelerator is not None else 1
        kl, counts = reduced[0] / world, reduced[1:]
        ref = self._reference_logps(model, batch)
        logps, _, mean_logits = self._logps(model, batch)
        losses, r_chosen, r_rejected, z0 = kto_loss(
            logps[desirable], logps[~desirable], None, ref[desirable], ref[~desirable], None,
            beta=a.beta, desirable_weight=a.desirable_weight, undesirable_weight=a.undesirable_weight, kl=kl)
        return losses.sum(), self._metrics(B, counts, desirable, logps, mean_logits, r_chosen, r_rejected, z0, a.beta)

    @staticmethod
    def _metrics(B, counts, desirable, logps, mean_logits, r_chosen, r_rejected, z0, beta) -> dict[str, torch.Tensor]:
        """Sums over this process' B rows that the loop's division by the global row count turns into means.

        Per-class values (rewards/chosen, logps/rejected, ...): this process' class sum scaled by
        N / N_class, where N_class and N count the class and all rows of the micro-step over all processes;
        summed over processes and divided by N that is the exact class mean of the micro-step (micro-steps
        of one update are averaged; one without that class adds 0). rewards/margins is the difference of the
        two class means. rewards/accuracies is per row: the share of rows whose reward lies on the correct
        side of the reference point (desirable above β·z0, undesirable below).
        """
        n_total = counts.sum()

        def class_mean(x: torch.Tensor, n_class: torch.Tensor) -> torch.Tensor:
            if n_class <= 0:
                return torch.zeros((), device=logps.device)
            return x.detach().float().sum() * n_total / n_class

        n_d, n_u = counts[0], counts[1]
        margin = (class_mean(r_chosen, n_d) - class_mean(r_rejected, n_u)) if n_d > 0 and n_u > 0 \
            else torch.zeros((), device=logps.device)
        correct = (r_chosen > beta * z0).sum() + (r_rejected < beta * z0).sum()
        return {
            "rewards/chosen": class_mean(r_chosen, n_d),
            "rewards/rejected": class_mean(r_rejected, n_u),
            "rewards/accuracies": correct.float(),
            "rewards/margins": margin,
            "logps/chosen": class_mean(logps[desirable], n_d),
            "logps/rejected": class_mean(logps[~desirable], n_u),
            "logits/chosen": class_mean(mean_logits[desirable], n_d),
            "logits/rejected": class_mean(mean_logits[~desirable], n_u),
            "kl": z0.float() * B,
            "count/desirable": desirable.sum().float(),
        }


def run(cfg: RunConfig) -> dict:
    accelerator = setup_accelerator(cfg.training)
    tokenizer = load_tokenizer(cfg.model)
    with accelerator.main_process_first():
        splits = build_datasets(cfg.data, tokenizer, "unpaired")
    args = cfg.method_args
    n_d = sum(bool(r["label"]) for r in splits.train)
    n_u = len(splits.train) - n_d
    if n_d == 0 or n_u == 0 or args.undesirable_weight == 0:
        logger.warning(f"kto: {n_d} desirable and {n_u} undesirable training rows (weights {args.desirable_weight} / "
                       f"{args.undesirable_weight}); KTO learns from the contrast of both kinds.")
    else:
        ratio = args.desirable_weight * n_d / (args.undesirable_weight * n_u)
        logger.info(f"kto: {n_d} desirable / {n_u} undesirable rows; λ_D·n_D / (λ_U·n_U) = {ratio:.2f}")
        if not 1.0 <= ratio <= 4 / 3:
            logger.warning(f"kto: λ_D·n_D / (λ_U·n_U) = {ratio:.2f} is outside the paper's recommended [1, 4/3]; "
                           "adjust kto.desirable_weight / kto.undesirable_weight.")
    model = load_model(cfg.model, tokenizer)  # the policy first: its LoRA init draws from the seeded RNG
    reference = load_reference(cfg, tokenizer, accelerator, model)
    layout = choose_layout(model, padding_free=args.padding_free, accelerator=accelerator, what="kto batches")
    method = KTOMethod(args, tokenizer.pad_token_id, cfg.data.max_length, reference=reference,
                       accelerator=accelerator, layout=layout)
    result = fit(accelerator, model, tokenizer, method, cfg, splits.train, splits.eval)
    result["data_stats"] = splits.stats
    return result
