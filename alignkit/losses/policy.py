"""Policy objectives and rollout filters that came after GRPO: GSPO, CISPO, DAPO's overlong shaping and
dynamic-sampling filter, and sequence-level masking of the sampler/trainer mismatch.

Pure tensor functions with the conventions of :mod:`alignkit.losses.rl`: ``B`` sequences, ``T`` response
tokens, ``[B, T]`` per-token log-probs, a ``[B, T]`` response ``mask`` (values off the mask never reach a
result, even ``inf``/``nan``), sequence-level ``scores`` ``[B]``, and groups of ``group_size``
consecutive rows per prompt.

Where each fits (the online loop wires them; each says where it does not apply):

* :func:`gspo_policy_loss`, :func:`cispo_policy_loss`: replace :func:`~alignkit.losses.rl.ppo_policy_loss`
  for any advantage estimator (GRPO, RLOO, REINFORCE++, PPO's GAE). GSPO's ratio is per sequence, so it is
  meant for sequence-level advantages (GRPO, RLOO); with token advantages (GAE, REINFORCE++) each token
  keeps its own advantage but shares its sequence's ratio.
* :func:`overlong_penalty`: added to the reward of every method.
* :func:`groups_with_signal`: grouped methods only (GRPO, RLOO): PPO and REINFORCE++ have no groups.
* :func:`mismatch_sequence_mask`: wherever the sampler returns its own log-probs (as for ``tis_cap``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from alignkit.losses.rl import LossAgg, _masked_zero, aggregate_loss, masked_mean


def sequence_log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Length-normalised log importance ratio of each sequence, ``[B]``:

        log s_i = 1/|y_i| * sum_t (log pi(y_it) - log pi_old(y_it))

    i.e. ``s_i = (pi(y_i | x) / pi_old(y_i | x)) ** (1 / |y_i|)``. A row with no response token gives 0.
    """
    return masked_mean(_masked_zero(logp - old_logp, mask)[0], mask, dim=1)


def gspo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 3e-4,
    clip_eps_high: float | None = 4e-4,
    loss_agg: LossAgg = "seq-mean-token-mean",
    max_length: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Group Sequence Policy Optimization (Zheng et al. 2025, "Group Sequence Policy Optimization", Eq. 5-7),
    as a loss to minimise::

        s_i(theta) = (pi_theta(y_i | x) / pi_old(y_i | x)) ** (1 / |y_i|)
                   = exp(1/|y_i| * sum_t log(pi_theta(y_it | x, y_i<t) / pi_old(y_it | x, y_i<t)))
        J_GSPO     = 1/G * sum_i min(s_i * A_i, clip(s_i, 1 - clip_eps, 1 + clip_eps_high) * A_i)

    The importance ratio and its clipping are per *sequence*: one clipped sequence contributes no gradient at
    all, and the gradient of an unclipped one is ``A_i * s_i * 1/|y_i| * sum_t grad log pi_theta(y_it)`` (every
    token weighted alike). Each token gets its sequence's term ``max(-A * s, -A * clip(s))``, aggregated by
    :func:`~alignkit.losses.rl.aggregate_loss`; the default ``seq-mean-token-mean`` is the paper's ``1/G sum_i``
    when the advantage is constant over a sequence (GRPO, RLOO). The paper clips to ``[1 - 3e-4, 1 + 4e-4]``
    (the defaults): sequence ratios stay much closer to 1 than token ratios. ``advantages`` is ``[B, T]``
    (broadcast a ``[B, 1]`` sequence advantage).

    Stats (detached): ``clipfrac`` (fraction of sequences whose clipped term is active), ``ratio_mean`` (mean
    of ``s_i``), ``approx_kl`` (mean over tokens of the k3 estimate of ``KL(pi_old || pi)``).
    """
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    has_tokens = (mask != 0).any(dim=1)
    seq_ratio = torch.exp(sequence_log_ratio(logp, old_logp, mask)).unsqueeze(1)  # [B, 1]
    advantages = _masked_zero(advantages.expand_as(logp), mask)[0]
    unclipped = -advantages * seq_ratio
    clipped = -advantages * seq_ratio.clamp(1.0 - clip_eps, 1.0 + eps_high)
    loss = aggregate_loss(torch.maximum(unclipped, clipped), mask, loss_agg, max_length)
    with torch.no_grad():
        clipped_seq = ((clipped > unclipped) & (mask != 0)).any(dim=1)
        n_seq = has_tokens.sum().clamp_min(1)
        log_ratio = _masked_zero(logp - old_logp, mask)[0]
        stats = {
            "clipfrac": (clipped_seq & has_tokens).sum().to(logp.dtype) / n_seq,
            "ratio_mean": (seq_ratio.squeeze(1) * has_tokens).sum() / n_seq,
            "approx_kl": masked_mean(torch.exp(log_ratio) - 1.0 - log_ratio, mask),
        }
    return loss, stats


def cispo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps_high: float = 4.0,
    clip_eps_low: float | None = None,
    loss_agg: LossAgg = "token-mean",
    max_length: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped IS-weight Policy Optimization (MiniMax 2025, "MiniMax-M1", Eq. 4-5), as a loss to minimise::

        r_it     = pi_theta(y_it | x, y_i<t) / pi_old(y_it | x, y_i<t)
        rhat_it  = clip(r_it, 1 - clip_eps_low, 1 + clip_eps_high)
        J_CISPO  = 1/sum_i |y_i| * sum_i sum_t sg(rhat_it) * A_it * log pi_theta(y_it | x, y_i<t)

    ``sg`` is stop-gradient: the importance weight is clipped and *detached*, so unlike PPO's clipped surrogate
    (whose gradient is 0 for a clipped token) every token keeps the REINFORCE gradient
    ``rhat * A * grad log pi``, only its weight is bounded. On-policy (``r = 1``) it is plain REINFORCE with the
    given advantages. ``clip_eps_low=None`` leaves the weight unbounded below, as the paper does; the
    default upper bound ``1 + 4.0 = 5`` is the cap TRL recommends (TRL's ``epsilon_high`` for ``cispo`` is
    that absolute cap, i.e. ``1 + clip_eps_high`` here). The default ``token-mean`` is the paper's
    ``1 / sum |y_i|``. ``advantages`` is ``[B, T]`` (broadcast a ``[B, 1]`` sequence advantage).

    Stats (detached): ``clipfrac`` (fraction of tokens whose weight was clipped), ``ratio_mean`` (mean of
    ``r``), ``approx_kl`` (k3 estimate of ``KL(pi_old || pi)``).
    """
    log_ratio = _masked_zero(logp - old_logp, mask)[0]
    ratio = torch.exp(log_ratio.detach())
    low = 0.0 if clip_eps_low is None else 1.0 - clip_eps_low
    weight = ratio.clamp(low, 1.0 + clip_eps_high)
    advantages = _masked_zero(advantages.expand_as(logp), mask)[0]
    per_token = -weight * advantages * _masked_zero(logp, mask)[0]
    loss = aggregate_loss(per_token, mask, loss_agg, max_length)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((weight != ratio).to(logp.dtype), mask),
            "ratio_mean": masked_mean(ratio, mask),
            "approx_kl": masked_mean(ratio - 1.0 - log_ratio.detach(), mask),
        }
    return loss, stats


@torch.no_grad()
def overlong_penalty(lengths: torch.Tensor, max_length: int, cache: int, factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, "DAPO", Eq. 13), a reward term ``[B]`` (<= 0)::

                     0                                       |y| <= L_max - L_cache
        R_length = ((L_max - L_cache) - |y|) / L_cache       L_max - L_cache < |y| <= L_max
                     -1                                      |y| > L_max

    times ``factor``. ``lengths`` are response lengths in tokens ``[B]``; ``max_length`` is ``L_max`` (the
    sampler's ``max_new_tokens``), ``cache`` the ``L_cache`` tokens before it over which the penalty grows
    linearly from 0 to -1. Add it to the task reward. It applies to every method (PPO, RLOO, GRPO,
    REINFORCE++).
    """
    if not 0 < cache <= max_length:
        raise ValueError(f"overlong_penalty: cache={cache} must be in (0, max_length={max_length}].")
    lengths = lengths.to(torch.float32)
    start = max_length - cache
    soft = ((start - lengths) / cache).clamp(max=0.0)
    return factor * torch.where(lengths > max_length, torch.full_like(lengths, -1.0), soft)


@torch.no_grad()
def groups_with_signal(scores: torch.Tensor, group_size: int, tol: float = 0.0) -> torch.Tensor:
    """DAPO's dynamic-sampling filter (Yu et al. 2025, "DAPO", Eq. 11: keep a prompt only when
    ``0 < |{o_i : o_i is correct}| < G``), for any reward: ``[num_groups]`` bool, true for the groups whose
    ``group_size`` rewards are not all equal (``max - min > tol``).

    A group whose samples all score alike has zero group-relative advantage, so it only dilutes the batch;
    DAPO drops such groups and samples new prompts until the batch is full. Rows to keep:
    ``groups_with_signal(scores, k).repeat_interleave(k)``. Grouped methods only (GRPO, RLOO).
    """
    if group_size < 1 or scores.numel() % group_size:
        raise ValueError(f"groups_with_signal: {scores.numel()} scores do not split into groups of "
                         f"group_size={group_size}; pass group_size samples per prompt in consecutive rows.")
    grouped = scores.reshape(-1, group_size)
    return (grouped.max(dim=1).values - grouped.min(dim=1).values) > tol


@torch.no_grad()
def mismatch_sequence_mask(
    logp: torch.Tensor,
    sampler_logp: torch.Tensor,
    mask: torch.Tensor,
    threshold: float,
    level: Literal["geometric", "sequence"] = "geometric",
    lower: float | None = None,
) -> torch.Tensor:
    """Sequence-level rejection of sampler/trainer mismatch (Liu, Li et al. 2025, "When Speed Kills
    Stability"; verl's ``rollout_rs``, TRL's ``sequence_mask``), ``[B]`` bool, true for sequences to keep.

    With ``rho_t = pi_trainer(y_t) / pi_sampler(y_t)`` (``logp``: the trainer's log-probs of the sampled
    tokens, e.g. the old policy's; ``sampler_logp``: the sampler's own)::

        geometric:  rho_i = exp(1/|y_i| * sum_t log rho_t)     (per-token average mismatch)
        sequence:   rho_i = exp(sum_t log rho_t)               (the whole sequence's likelihood ratio)
        keep_i = lower <= rho_i <= threshold                   (lower defaults to 1 / threshold)

    A rejected sequence is dropped whole (multiply it into the response mask), beside the token-level
    truncation ``min(rho_t, tis_cap)``, which keeps every sequence but bounds each token's weight. Typical
    thresholds: ``geometric`` 1.001-1.01 (a mean per-token deviation of 0.1-1%), ``sequence`` 2-10. A row
    with no response token is kept (it contributes nothing anyway). Applies to every method.
    """
    if threshold <= 1.0:
        raise ValueError(f"mismatch_sequence_mask: threshold={threshold} must be > 1.")
    lo = 1.0 / threshold if lower is None else lower
    if not 0.0 <= lo < 1.0:
        raise ValueError(f"mismatch_sequence_mask: lower={lower} must be in [0, 1).")
    if level == "geometric":
        log_rho = sequence_log_ratio(logp, sampler_logp, mask)
    elif level == "sequence":
        log_rho = _masked_zero(logp - sampler_logp, mask)[0].sum(dim=1)
    else:
        raise ValueError(f"mismatch_sequence_mask: unknown level={level!r}; use 'geometric' or 'sequence'.")
    log_lo = math.log(lo) if lo > 0 else -math.inf
    return (log_rho >= log_lo) & (log_rho <= math.log(threshold))
