"""Preference and reward-model losses as pure tensor functions.

Every function takes per-example sequence log-probabilities (or scores) of shape ``[B]`` and returns
per-example losses ``[B]`` (plus the method's implicit rewards, detached, for logging), so the caller
chooses the reduction (``.mean()`` as TRL does, or a sum over a gradient-accumulation window).

Notation: ``log π(y|x)`` is a sequence log-probability from :func:`alignkit.losses.logprobs.sequence_logps`
(summed over completion tokens unless the argument name says ``_avg``: then it is divided by the
number of completion tokens), ``y_w``/``y_l`` the chosen/rejected completion, ``σ`` the logistic sigmoid.
Losses are written with ``F.logsigmoid`` (never ``log(sigmoid(.))``) so large margins stay finite.

Where TRL has the loss, ``tests/losses/test_preference.py`` checks these functions against TRL 1.16 on
identical inputs; conventions that differ from TRL are stated in the docstrings.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DPO_LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo")
CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo")


def _check_same_shape(fn: str, **tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{name}={shape}" for name, shape in shapes.items())
        raise ValueError(f"{fn}: inputs must have the same shape (one value per example), got {listed}.")


def _check_label_smoothing(fn: str, loss_type: str, label_smoothing: float) -> None:
    if loss_type == "sigmoid":
        # Conservative DPO: eps is the probability that a label is flipped; 0.5 means "no information".
        if not 0.0 <= label_smoothing <= 0.5:
            raise ValueError(
                f"{fn}: label_smoothing must be in [0, 0.5] for loss_type='sigmoid', got {label_smoothing}."
            )
    elif loss_type == "robust":
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(
                f"{fn}: label_smoothing must be in [0, 0.5) for loss_type='robust' (it divides by 1 - 2*eps), "
                f"got {label_smoothing}."
            )
    elif label_smoothing != 0.0:
        raise ValueError(
            f"{fn}: label_smoothing={label_smoothing} has no meaning for loss_type='{loss_type}'; set it to 0 "
            "or use loss_type='sigmoid' (conservative) or 'robust'."
        )


def _conservative_logistic(logits: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """-(1 - eps) log σ(β z) - eps log σ(-β z); exactly -log σ(β z) when eps = 0."""
    loss = -F.logsigmoid(beta * logits)
    if label_smoothing == 0.0:
        return loss
    return (1 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-beta * logits)


def _pairwise_loss(
    fn: str,
    logits: torch.Tensor,
    beta: float,
    loss_type: str,
    label_smoothing: float,
    allowed: tuple[str, ...],
) -> torch.Tensor:
    if loss_type not in allowed:
        raise ValueError(f"{fn}: unknown loss_type '{loss_type}'; choose one of {list(allowed)}.")
    if beta <= 0:
        raise ValueError(f"{fn}: beta must be > 0, got {beta}.")
    _check_label_smoothing(fn, loss_type, label_smoothing)
    if loss_type == "sigmoid":
        return _conservative_logistic(logits, beta, label_smoothing)
    if loss_type == "robust":
        clean = -(1 - label_smoothing) * F.logsigmoid(beta * logits)
        flipped = -label_smoothing * F.logsigmoid(-beta * logits)
        return (clean - flipped) / (1 - 2 * label_smoothing)
    if loss_type == "hinge":
        return torch.relu(1 - beta * logits)
    # ipo
    return (logits - 1 / (2 * beta)) ** 2


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct Preference Optimization and its pairwise variants.

    With the log-ratio margin

        h = [log πθ(y_w|x) - log π_ref(y_w|x)] - [log πθ(y_l|x) - log π_ref(y_l|x)]

    the per-example loss is, by ``loss_type``:

    - ``"sigmoid"``: DPO, Rafailov et al. 2023, "Direct Preference Optimization", eq. 7, with the
      conservative-DPO (cDPO, Mitchell 2023, "A note on DPO with noisy preferences") label smoothing
      ``eps = label_smoothing`` (probability a label is flipped)::

          L = -(1 - eps) log σ(β h) - eps log σ(-β h)

    - ``"robust"``: rDPO, Chowdhury et al. 2024, "Provably Robust DPO" (unbiased under label noise
      ``eps``, requires ``eps < 0.5``)::

          L = [-(1 - eps) log σ(β h) + eps log σ(-β h)] / (1 - 2 eps)

    - ``"hinge"``: SLiC-HF hinge, Zhao et al. 2023: ``L = max(0, 1 - β h)``.
    - ``"ipo"``: IPO, Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
      Preferences", eq. 17, with ``β`` as the regulariser ``τ``: ``L = (h - 1/(2β))^2``.
      ``h`` is built from the log-probs you pass. IPO's squared loss grows with completion length when
      they are token sums, so TRL divides the summed log-ratios by the number of completion tokens (length
      averages; the IPO authors confirmed this matches the paper's experiments). To do the same, pass
      ``sum_logps / n_tokens`` for all four inputs; pass sums for the paper's literal form.

    Implicit rewards (for logging, detached): ``β (log πθ(y|x) - log π_ref(y|x))`` for y_w and y_l, from the
    log-probs given (so length-averaged ones for IPO if you averaged; TRL logs summed ones).

    TRL 1.16 differences: ``DPOTrainer`` ignores ``label_smoothing`` for ``"sigmoid"`` (it only feeds
    robust/EXO/AOT there); here ``label_smoothing > 0`` with ``"sigmoid"`` is cDPO, the form TRL's CPO
    trainer and earlier TRL DPO releases use. With ``label_smoothing = 0`` all four types match TRL 1.16.

    Args:
        policy_chosen_logps, policy_rejected_logps: ``[B]`` log πθ of chosen/rejected completions.
        ref_chosen_logps, ref_rejected_logps: ``[B]`` log π_ref of the same completions (no grad needed).
        beta: β, inverse strength of the KL regulariser (IPO: τ).
        loss_type: one of ``"sigmoid"``, ``"robust"``, ``"hinge"``, ``"ipo"``.
        label_smoothing: eps for ``"sigmoid"`` (in [0, 0.5]) and ``"robust"`` (in [0, 0.5)); must be 0 otherwise.

    Returns:
        ``(losses [B], chosen_rewards [B], rejected_rewards [B])``.
    """
    _check_same_shape(
        "dpo_loss",
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    logits = chosen_logratios - rejected_logratios
    losses = _pairwise_loss("dpo_loss", logits, beta, loss_type, label_smoothing, DPO_LOSS_TYPES)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def cpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Contrastive Preference Optimization preference term (reference-free DPO form).

    Xu et al. 2024, "Contrastive Preference Optimization: Pushing the Boundaries of LLM Performance in
    Machine Translation", eq. 3 (the ``L_prefer`` term), with ``h = log πθ(y_w|x) - log πθ(y_l|x)``:

    - ``"sigmoid"``: ``-(1 - eps) log σ(β h) - eps log σ(-β h)`` (eps = ``label_smoothing``, as TRL);
    - ``"hinge"``: ``max(0, 1 - β h)``;
    - ``"ipo"``: ``(h - 1/(2β))^2`` (TRL's CPO trainer feeds it length-averaged log-probs).

    The full CPO objective adds a behaviour-cloning NLL on the chosen completions, ``L = L_prefer + α L_NLL``
    (``cpo_alpha`` in TRL, default 1.0). TRL's NLL is the token mean over the whole batch of chosen
    tokens, so with ``sum_c, n_c = sequence_logps(chosen_logits, chosen_labels)``::

        losses, chosen_rewards, rejected_rewards = cpo_loss(sum_c, sum_r, beta)
        nll = -sum_c.sum() / n_c.sum()
        loss = losses.mean() + cpo_alpha * nll

    CPO-SimPO (TRL ``loss_type="simpo"`` with ``cpo_alpha > 0``) is :func:`simpo_loss` on length-averaged
    log-probs plus the same ``cpo_alpha * nll``.

    Rewards (detached, logging only): ``β log πθ(y_w|x)`` and ``β log πθ(y_l|x)``, as TRL.

    Returns:
        ``(losses [B], chosen_rewards [B], rejected_rewards [B])``.
    """
    _check_same_shape("cpo_loss", chosen_logps=chosen_logps, rejected_logps=rejected_logps)
    losses = _pairwise_loss(
        "cpo_loss", chosen_logps - rejected_logps, beta, loss_type, label_smoothing, CPO_LOSS_TYPES
    )
    return losses, beta * chosen_logps.detach(), beta * rejected_logps.detach()


def simpo_loss(
    chosen_logps_avg: torch.Tensor,
    rejected_logps_avg: torch.Tensor,
    beta: float = 2.0,
    gamma_beta_ratio: float = 0.5,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO: reference-free, length-normalised margin loss.

    Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward", eq. 6::

        L = -log σ( β/|y_w| log πθ(y_w|x) - β/|y_l| log πθ(y_l|x) - γ ),   γ = gamma_beta_ratio · β

    with cDPO-style smoothing ``-(1 - eps) log σ(z) - eps log σ(-z)`` when ``label_smoothing = eps > 0``
    (as the SimPO reference code and TRL's CPO trainer). The inputs are length-averaged log-probs
    (``sum_logps / n_tokens``). The margin is parameterised like the SimPO code (``gamma_beta_ratio``);
    TRL's ``CPOConfig.simpo_gamma`` is the absolute ``γ``, so TRL ``simpo_gamma = gamma_beta_ratio * beta``.
    CPO-SimPO adds ``cpo_alpha * NLL(chosen)``, see :func:`cpo_loss`.

    Rewards (detached): ``β · avg log πθ(y|x)`` for y_w and y_l.

    Returns:
        ``(losses [B], chosen_rewards [B], rejected_rewards [B])``.
    """
    _check_same_shape("simpo_loss", chosen_logps_avg=chosen_logps_avg, rejected_logps_avg=rejected_logps_avg)
    if beta <= 0:
        raise ValueError(f"simpo_loss: beta must be > 0, got {beta}.")
    _check_label_smoothing("simpo_loss", "sigmoid", label_smoothing)
    logits = (chosen_logps_avg - rejected_logps_avg) - gamma_beta_ratio
    losses = _conservative_logistic(logits, beta, label_smoothing)
    return losses, beta * chosen_logps_avg.detach(), beta * rejected_logps_avg.detach()


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -log 2 (Mächler 2012)."""
    use_log1p = x < -math.log(2)
    # torch.where differentiates both branches: feed each only inputs where it is finite,
    # otherwise log1p(-exp(x)) at x ~ 0 sends 0 * inf = NaN into the gradient.
    x_log1p = torch.where(use_log1p, x, torch.full_like(x, -1.0))
    x_expm1 = torch.where(use_log1p, torch.full_like(x, -0.5), x)
    return torch.where(use_log1p, torch.log1p(-torch.exp(x_log1p)), torch.log(-torch.expm1(x_expm1)))


def orpo_loss(
    chosen_logps_avg: torch.Tensor,
    rejected_logps_avg: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORPO odds-ratio term (the part of ORPO beyond the SFT loss).

    Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model", eqs. 4-7, with
    ``P(y|x) = exp(avg log πθ(y|x))`` (length-averaged log-probs) and ``odds(y|x) = P / (1 - P)``::

        log_odds = log odds(y_w|x) - log odds(y_l|x)
                 = (l_w - l_l) - (log(1 - exp(l_w)) - log(1 - exp(l_l)))
        L_OR     = -log σ(log_odds)
        L_ORPO   = L_SFT + λ L_OR,      λ = beta

    This returns ``losses = beta * L_OR`` per example (non-negative), so ``loss = nll + losses.mean()``.
    TRL's ``odds_ratio_loss`` returns the opposite sign, ``beta * log σ(log_odds)``, and computes
    ``nll - losses.mean()``: the same total. TRL's ORPO NLL is the token-mean cross-entropy of the chosen
    sequences over prompt *and* completion (all attended tokens), not only the completion.

    Numerics: computed in float32 (float64 stays float64), as TRL. ``log(1 - exp(l))`` uses
    ``log1p(-exp(l))`` below ``-log 2`` and ``log(-expm1(l))`` above; log-probs at or above 0 (a near-
    certain completion rounds to 0) are clamped to ``-finfo.tiny`` so the loss and gradient stay finite.

    Returns:
        ``(losses [B], chosen_rewards [B], rejected_rewards [B], log_odds_ratio [B], log_odds_chosen [B])``:
        rewards are ``β · avg log πθ`` (detached); ``log_odds_ratio = log σ(log_odds)`` and
        ``log_odds_chosen = log_odds`` are detached per-example values of TRL's metrics of the same names
        (TRL logs their batch means).
    """
    _check_same_shape("orpo_loss", chosen_logps_avg=chosen_logps_avg, rejected_logps_avg=rejected_logps_avg)
    dtype = torch.float64 if chosen_logps_avg.dtype == torch.float64 else torch.float32
    chosen = chosen_logps_avg.to(dtype)
    rejected = rejected_logps_avg.to(dtype)
    max_logp = -torch.finfo(dtype).tiny
    log_odds = (chosen - rejected) - (
        _log1mexp(chosen.clamp(max=max_logp)) - _log1mexp(rejected.clamp(max=max_logp))
    )
    log_sigmoid_odds = F.logsigmoid(log_odds)
    losses = -beta * log_sigmoid_odds
    return (
        losses,
        beta * chosen.detach(),
        beta * rejected.detach(),
        log_sigmoid_odds.detach(),
        log_odds.detach(),
    )


def kto_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    policy_kl_logps: torch.Tensor | None,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    ref_kl_logps: torch.Tensor | None,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    kl: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kahneman-Tversky Optimization loss (TRL's ``loss_type="kto"``).

    Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", eq. 7:
    ``L = λ_y - v(x, y)`` with the value ``v = λ_D σ(β (r - z0))`` for desirable and ``λ_U σ(β (z0 - r))``
    for undesirable completions. With the implicit reward
    ``r(x, y) = log πθ(y|x) - log π_ref(y|x)`` and the reference point

        z0 = max(0, mean_j [log πθ(y'_j|x_j) - log π_ref(y'_j|x_j)])   (detached)

    estimated on mismatched pairs (prompt ``x_j`` with another example's completion ``y'_j``)::

        desirable y:    L = λ_D (1 - σ(β (r - z0)))
        undesirable y:  L = λ_U (1 - σ(β (z0 - r)))

    ``λ_D = desirable_weight``, ``λ_U = undesirable_weight`` (the paper suggests ``λ_D n_D / (λ_U n_U)`` in
    [1, 4/3]). The batch loss in TRL is the mean of ``losses`` (``nanmean``).

    The KL estimate: TRL 1.16 takes ``mean(policy_kl_logps - ref_kl_logps)`` on each process, averages
    that over processes, then clamps at 0. For the multi-process form, compute the per-process mean
    yourself, all-reduce (average) it, and pass it as ``kl=``; the KL log-probs are then not needed.
    ``kl`` is detached and clamped at 0 here either way. ``kl=0.0`` disables the reference point.

    Args:
        policy_chosen_logps, ref_chosen_logps: ``[n_D]`` summed log-probs of desirable completions.
        policy_rejected_logps, ref_rejected_logps: ``[n_U]`` summed log-probs of undesirable completions
            (either group may be empty).
        policy_kl_logps, ref_kl_logps: ``[n_KL]`` summed log-probs of the mismatched completions, or None
            when ``kl`` is given.
        beta: β. desirable_weight, undesirable_weight: λ_D, λ_U.
        kl: optional pre-reduced KL estimate (scalar), used instead of the KL log-probs.

    Returns:
        ``(losses [n_D + n_U], chosen_rewards [n_D], rejected_rewards [n_U], kl [])``: losses are the
        desirable ones then the undesirable ones (TRL's order), already weighted; rewards are ``β r``
        (detached); ``kl`` is ``z0``.
    """
    _check_same_shape("kto_loss", policy_chosen_logps=policy_chosen_logps, ref_chosen_logps=ref_chosen_logps)
    _check_same_shape(
        "kto_loss", policy_rejected_logps=policy_rejected_logps, ref_rejected_logps=ref_rejected_logps
    )
    if beta <= 0:
        raise ValueError(f"kto_loss: beta must be > 0, got {beta}.")
    if kl is None:
        if policy_kl_logps is None or ref_kl_logps is None:
            raise ValueError(
                "kto_loss: pass policy_kl_logps and ref_kl_logps, or a pre-reduced kl= estimate."
            )
        _check_same_shape("kto_loss", policy_kl_logps=policy_kl_logps, ref_kl_logps=ref_kl_logps)
        if policy_kl_logps.numel() == 0:
            raise ValueError(
                "kto_loss: policy_kl_logps is empty; the KL reference point needs at least one mismatched "
                "(prompt, completion) pair. Pass kl= (e.g. a value all-reduced from other processes) instead."
            )
        kl = (policy_kl_logps - ref_kl_logps).mean()
    device = policy_chosen_logps.device if policy_chosen_logps.numel() else policy_rejected_logps.device
    kl = torch.as_tensor(kl, device=device).detach().clamp(min=0)

    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    chosen_losses = 1 - torch.sigmoid(beta * (chosen_logratios - kl))
    rejected_losses = 1 - torch.sigmoid(beta * (kl - rejected_logratios))
    losses = torch.cat((desirable_weight * chosen_losses, undesirable_weight * rejected_losses), dim=0)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach(), kl


def bradley_terry_loss(
    chosen_scores: torch.Tensor,
    rejected_scores: torch.Tensor,
    margin: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Pairwise reward-model loss under the Bradley-Terry model.

    Ouyang et al. 2022 (InstructGPT), eq. 1; with the preference-strength margin ``m(r)`` of Touvron et
    al. 2023 (Llama 2), eq. 2::

        L = -log σ(r(x, y_w) - r(x, y_l) - m)

    Args:
        chosen_scores, rejected_scores: ``[B]`` scalar rewards (squeeze a ``[B, 1]`` head output first).
        margin: optional ``[B]`` tensor or float; None means 0.

    Returns:
        ``losses [B]``; TRL's ``RewardTrainer`` loss is their mean.
    """
    _check_same_shape("bradley_terry_loss", chosen_scores=chosen_scores, rejected_scores=rejected_scores)
    diff = chosen_scores - rejected_scores
    if margin is not None:
        if isinstance(margin, torch.Tensor) and margin.dim() > 0:
            _check_same_shape("bradley_terry_loss", chosen_scores=chosen_scores, margin=margin)
        diff = diff - margin
    return -F.logsigmoid(diff)


def regression_loss(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Squared error of scalar rewards against target scores: ``L = (r(x, y) - t)^2`` per example.

    For reward models trained on absolute ratings instead of pairs; the batch loss (MSE) is the mean.

    Returns:
        ``losses`` with the shape of ``scores``.
    """
    _check_same_shape("regression_loss", scores=scores, targets=targets)
    return (scores - targets.to(scores.dtype)) ** 2
