"""Knowledge-distillation losses between a student's and a teacher's next-token distributions.

Logits are ``[B, T, V]`` (or any ``[..., V]``) and already aligned: position ``t`` of both predicts the same
token, and student and teacher share one vocabulary. Token masks are ``[B, T]``.

* :func:`generalized_jsd_loss`: GKD's generalised Jensen-Shannon divergence (on- or off-policy distillation),
  numerically identical to TRL's ``GKDTrainer.generalized_jsd_loss`` (trl 1.16), reductions included.
* :func:`forward_kl`, :func:`reverse_kl`: token-level KL for supervised KD (Hinton et al. 2015), averaged over
  masked tokens.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from alignkit.losses.rl import masked_mean


def _check_logits(fn: str, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"{fn}: student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ; distillation needs aligned positions and one shared vocabulary "
            "(use a teacher with the student's tokenizer, or slice the teacher's padded vocab to the student's)."
        )


def _token_mask(labels_mask: torch.Tensor) -> torch.Tensor:
    """A bool mask from labels (``-100`` = ignore) or from a bool/float mask (nonzero = keep)."""
    if labels_mask.dtype == torch.bool or labels_mask.is_floating_point():
        return labels_mask != 0
    return labels_mask != -100


def generalized_jsd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels_mask: torch.Tensor | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: Literal["batchmean", "sum", "mean", "none"] = "batchmean",
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Generalised Jensen-Shannon divergence of GKD (Agarwal et al. 2024, "On-Policy Distillation of
    Language Models: Learning from Self-Generated Mistakes", Eq. 1).

    With ``p_T = softmax(teacher_logits / temperature)``, ``p_S = softmax(student_logits / temperature)`` and
    the mixture ``m = beta * p_T + (1 - beta) * p_S``::

        JSD_beta = beta * KL(p_T || m) + (1 - beta) * KL(p_S || m)        for 0 < beta < 1
        beta = 0:  KL(p_T || p_S)    forward KL (mode covering, ordinary KD)
        beta = 1:  KL(p_S || p_T)    reverse KL (mode seeking)

    ``JSD_beta`` itself tends to 0 at both ends; the endpoints are special-cased to the KLs, as in TRL. No
    ``temperature^2`` factor is applied (TRL does not either).

    ``labels_mask`` selects the positions that count: an integer tensor is read as labels (``-100`` =
    ignore, the HF convention), a bool/float tensor as a mask (nonzero = keep; pass an integer 0/1 mask as
    ``mask.bool()``, or it is read as labels and keeps everything). Reductions follow TRL's
    conventions exactly, on the element-wise ``[..., V]`` divergence terms:

    * ``"batchmean"``: sum / number of kept positions (tokens); without a mask, sum / ``size(0)``, i.e. per
      *sequence* for ``[B, T, V]`` input.
    * ``"sum"``: the sum; ``"mean"``: mean over kept positions *and* vocabulary entries.
    * ``"none"``: the element-wise terms, ``[N_kept, V]`` if masked, else the input shape.
    * ``num_items_in_batch`` overrides the reduction with sum / ``num_items_in_batch`` (global token count,
      for gradient-accumulation-correct averaging).
    """
    _check_logits("generalized_jsd_loss", student_logits, teacher_logits)
    student_log_probs = F.log_softmax(student_logits / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits / temperature, dim=-1)

    # F.kl_div(input, target, log_target=True) = exp(target) * (target - input): KL(target || input).
    if beta == 0:
        jsd = F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(teacher_log_probs, student_log_probs, reduction="none", log_target=True)
    else:
        beta_t = torch.tensor(beta, dtype=student_log_probs.dtype, device=student_log_probs.device)
        mixture_log_probs = torch.logsumexp(
            torch.stack([student_log_probs + torch.log1p(-beta_t), teacher_log_probs + torch.log(beta_t)]),
            dim=0,
        )
        kl_teacher = F.kl_div(mixture_log_probs, teacher_log_probs, reduction="none", log_target=True)
        kl_student = F.kl_div(mixture_log_probs, student_log_probs, reduction="none", log_target=True)
        jsd = beta_t * kl_teacher + (1 - beta_t) * kl_student

    mask = None
    if labels_mask is not None:
        mask = _token_mask(labels_mask)
        jsd = jsd[mask]

    if num_items_in_batch is not None:
        jsd_sum = jsd.sum()
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(jsd_sum.device)
        return jsd_sum / num_items_in_batch
    if reduction == "batchmean":
        # clamp_min(1): a batch without kept positions gives 0, not nan.
        denominator = mask.sum().clamp_min(1) if mask is not None else max(jsd.size(0), 1)
        return jsd.sum() / denominator
    if reduction == "sum":
        return jsd.sum()
    if reduction == "mean":
        return jsd.mean()
    if reduction == "none":
        return jsd
    raise ValueError(
        f"generalized_jsd_loss: unknown reduction={reduction!r}; use 'batchmean', 'sum', 'mean' or 'none'."
    )


def _token_kl(
    target_logits: torch.Tensor,
    input_logits: torch.Tensor,
    mask: torch.Tensor | None,
    temperature: float,
    scale_by_temperature_sq: bool,
) -> torch.Tensor:
    """``mean_mask(sum_v p (log p - log q))`` with ``p = softmax(target / tau)``, ``q = softmax(input / tau)``."""
    target_log_probs = F.log_softmax(target_logits / temperature, dim=-1)
    input_log_probs = F.log_softmax(input_logits / temperature, dim=-1)
    per_token = F.kl_div(input_log_probs, target_log_probs, reduction="none", log_target=True).sum(dim=-1)
    loss = per_token.mean() if mask is None else masked_mean(per_token, mask)
    if scale_by_temperature_sq:
        loss = loss * temperature**2
    return loss


def forward_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    scale_by_temperature_sq: bool = False,
) -> torch.Tensor:
    """Forward KL for supervised distillation (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network").

    ``L = mean_{t in mask} sum_v p_T(v) * (log p_T(v) - log p_S(v))`` = ``KL(p_T || p_S)`` per token, with
    ``p = softmax(logits / temperature)``, averaged over the masked tokens (``mask`` ``[B, T]``; ``None``
    averages over all positions). Mode covering: the student must put mass wherever the teacher does.

    ``scale_by_temperature_sq=True`` multiplies by ``temperature^2``, Hinton's correction that keeps gradient
    magnitudes independent of the temperature (soft-target gradients scale as ``1 / temperature^2``); off by
    default so the returned value is the KL itself.
    """
    _check_logits("forward_kl", student_logits, teacher_logits)
    return _token_kl(teacher_logits, student_logits, mask, temperature, scale_by_temperature_sq)


def reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    scale_by_temperature_sq: bool = False,
) -> torch.Tensor:
    """Reverse KL ``KL(p_S || p_T)`` per token, averaged over masked tokens.

    The divergence MiniLLM (Gu et al. 2024) minimises, here in its token-level, exact-over-the-vocabulary form
    on fixed sequences (no policy gradient through sampling).

    ``L = mean_{t in mask} sum_v p_S(v) * (log p_S(v) - log p_T(v))``, ``p = softmax(logits / temperature)``.
    Mode seeking: the student concentrates on the teacher's high-probability tokens. ``mask`` and
    ``scale_by_temperature_sq`` as in :func:`forward_kl`.
    """
    _check_logits("reverse_kl", student_logits, teacher_logits)
    return _token_kl(student_logits, teacher_logits, mask, temperature, scale_by_temperature_sq)
