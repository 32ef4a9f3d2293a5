"""Losses, advantage estimators and KL utilities for RL fine-tuning (PPO, RLOO, GRPO, REINFORCE++).

Every function is a pure tensor function. Shapes: ``B`` sequences, ``T`` response tokens. A ``mask`` is a
``[B, T]`` bool or 0/1 float tensor that is true on response tokens; values at masked-out positions (padding,
prompt, tool output) never reach a mean, a variance or an advantage, even when they are ``inf`` or ``nan``.

Conventions shared by the whole module:

* Log-probabilities are per-token log-probs of the sampled tokens, ``[B, T]``.
* Sequence-level ``scores`` (reward-model outputs, verifier rewards) are ``[B]``.
* Grouped samples (RLOO, GRPO) are laid out as ``group_size`` *consecutive* rows per prompt:
  ``[p0_s0, p0_s1, ..., p0_s{k-1}, p1_s0, ...]`` (``repeat_interleave`` order).
* Advantage estimators run under ``torch.no_grad`` and return tensors without a graph.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

LossAgg = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
KLKind = Literal["k1", "k2", "k3"]

_WHITEN_EPS = 1e-8


# --------------------------------------------------------------------------------------------------
# Masked statistics
# --------------------------------------------------------------------------------------------------


def _masked_zero(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x * mask`` that is exactly 0 where ``mask == 0`` even if ``x`` is inf/nan there; also the float mask."""
    mask_f = mask.to(x.dtype)
    return torch.where(mask_f != 0, x * mask_f, torch.zeros_like(x)), mask_f


def _nonzero(denominator: torch.Tensor) -> torch.Tensor:
    """Replace zero denominators by 1: the numerator is then 0 too, so an empty mask averages to 0."""
    return torch.where(denominator != 0, denominator, torch.ones_like(denominator))


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is set: ``sum(x * m) / sum(m)``.

    ``dim=None`` reduces over all elements (a scalar); an int reduces that dimension only. A float mask acts as
    weights. An empty mask (or an empty row with ``dim``) gives 0 rather than ``nan``.
    """
    x_masked, mask_f = _masked_zero(x, mask)
    if dim is None:
        return x_masked.sum() / _nonzero(mask_f.sum())
    return x_masked.sum(dim) / _nonzero(mask_f.sum(dim))


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over the masked positions (a scalar).

    ``var = mean_m((x - mean_m(x))^2)``, times Bessel's correction ``n / (n - 1)`` when ``unbiased`` (``n`` is
    the number of masked positions). With fewer than two masked positions the variance is 0 (no ``nan`` and no
    host sync to check for it).
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.to(x.dtype).sum()
        var = var * (n / (n - 1).clamp_min(1.0))
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Whiten ``x`` with the statistics of its masked positions (advantage normalisation in PPO code).

    ``(x - mean) / sqrt(var + 1e-8)`` with ``mean`` and unbiased ``var`` taken over the mask (the
    OpenAI lm-human-preferences / TRL convention). With ``shift_mean=False`` the mean is added back, so only the
    scale changes (used for rewards, where the sign carries meaning). Masked-out positions are set to 0.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    whitened = (x - mean) * torch.rsqrt(var + _WHITEN_EPS)
    if not shift_mean:
        whitened = whitened + mean
    return _masked_zero(whitened, mask)[0]


# --------------------------------------------------------------------------------------------------
# KL estimators and per-token rewards
# --------------------------------------------------------------------------------------------------


def kl_estimate(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    kind: KLKind = "k1",
    clamp: float | None = None,
) -> torch.Tensor:
    """Per-token estimate of ``KL(pi || ref)`` from tokens sampled from ``pi`` (Schulman 2020).

    With ``log r = ref_logp - logp`` (J. Schulman, "Approximating KL divergence", 2020):

    * ``k1 = -log r = logp - ref_logp``: unbiased, high variance, can be negative per token.
    * ``k2 = 0.5 * (log r)^2``: biased, low variance, always >= 0.
    * ``k3 = (r - 1) - log r = exp(ref_logp - logp) - (ref_logp - logp) - 1``: unbiased, low variance,
      always >= 0 (the GRPO / "low_var_kl" estimator).

    ``clamp`` (optional) clips the estimate to ``[-clamp, clamp]`` for stability (verl clamps k3 at 10).
    Returns a tensor of the input's shape; apply the response mask downstream.
    """
    if kind == "k1":
        kl = logp - ref_logp
    elif kind == "k2":
        kl = 0.5 * (logp - ref_logp) ** 2
    elif kind == "k3":
        log_ratio = ref_logp - logp
        kl = torch.exp(log_ratio) - log_ratio - 1.0
    else:
        raise ValueError(f"kl_estimate: unknown kind={kind!r}; use 'k1', 'k2' or 'k3'.")
    if clamp is not None:
        kl = kl.clamp(min=-clamp, max=clamp)
    return kl


def kl_loss_tokens(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    old_logp: torch.Tensor,
    kind: KLKind = "k3",
    clamp: float | None = None,
    ratio_weight: bool = False,
) -> torch.Tensor:
    """Per-token KL penalty for the loss (``kl_penalty: loss``), differentiable through ``logp``.

    ``ratio_weight=False``: ``k(logp, ref_logp)`` (:func:`kl_estimate`), the GRPO paper's term. Its value
    estimates ``KL(pi || ref)``, but its gradient does not: for k3 it is ``(1 - ref/pi) grad log pi``, bounded
    by 1 where the policy has raised a token far above the reference.

    ``ratio_weight=True`` (DeepSeek-V3.2, 2025; TRL's ``use_bias_correction_kl``): the estimate times the
    importance ratio ``rho = exp(logp - old_logp)``, ``old_logp`` the behaviour policy's (no gradient).
    On-policy ``rho`` is 1 in value but not in gradient, and for k3
    ``grad (rho k3) = (1 - r + k3) grad log pi = (log pi - log ref) grad log pi`` (``r = ref / pi``):
    the score-function gradient of ``KL(pi || ref)``, growing with the log ratio. Returns ``[B, T]``;
    apply the mask downstream.
    """
    kl = kl_estimate(logp, ref_logp, kind, clamp=clamp)
    if ratio_weight:
        kl = kl * torch.exp(logp - old_logp.detach())
    return kl


def _last_token_index(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the last set position of each row of ``mask`` ``[B, T]``, and whether the row has any."""
    mask_b = mask != 0
    seq_len = mask_b.shape[1]
    last = seq_len - 1 - mask_b.flip(1).to(torch.long).argmax(dim=1)
    return last, mask_b.any(dim=1)


@torch.no_grad()
def per_token_rewards(
    scores: torch.Tensor,
    kl_per_token: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
) -> torch.Tensor:
    """Token-level rewards with a KL penalty (Ziegler et al. 2019; Ouyang et al. 2022, InstructGPT).

    ``r_t = -kl_coef * KL_t`` at every response token, plus the sequence score ``s`` at the last response token:
    ``r_T = s - kl_coef * KL_T``. ``scores`` is ``[B]``, ``kl_per_token`` and ``mask`` are ``[B, T]`` (use
    :func:`kl_estimate`). "Last" is the last set position of each mask row, so right padding, left padding and
    holes all work; a row with no response token gets no score. Masked-out positions are 0.
    """
    rewards = _masked_zero(-kl_coef * kl_per_token, mask)[0]
    last, has_tokens = _last_token_index(mask)
    score = torch.where(has_tokens, scores.to(rewards.dtype), torch.zeros_like(rewards[:, 0]))
    return rewards.scatter_add(1, last.unsqueeze(1), score.unsqueeze(1))


# --------------------------------------------------------------------------------------------------
# Advantage estimators
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2016) over token-level rewards.

    Reverse-time recursion over the response tokens::

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}
        R_t     = A_t + V_t                    (the value targets, "returns")

    ``rewards``, ``values`` and ``mask`` are ``[B, T]``. The episode ends after the last masked token, so the
    bootstrap value beyond it is 0. Masked-out positions are skipped by the recursion (``t+1`` means the next
    *response* token), which handles right/left padding and holes such as tool output in multi-turn rollouts
    (as in verl). Advantages and returns are 0 at masked-out positions. Returns ``(advantages, returns)``.
    """
    mask_f = (mask != 0).to(values.dtype)
    rewards = _masked_zero(rewards.to(values.dtype), mask)[0]
    values = _masked_zero(values, mask)[0]
    next_value = torch.zeros_like(values[:, 0])
    last_gae = torch.zeros_like(values[:, 0])
    advantages = torch.zeros_like(values)
    for t in reversed(range(values.shape[1])):
        m = mask_f[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        gae_t = delta + gamma * lam * last_gae
        # At a masked-out position carry the running quantities over unchanged.
        last_gae = m * gae_t + (1 - m) * last_gae
        next_value = m * values[:, t] + (1 - m) * next_value
        advantages[:, t] = m * gae_t
    returns = (advantages + values) * mask_f
    return advantages, returns


@torch.no_grad()
def rloo_advantages(scores: torch.Tensor, k: int) -> torch.Tensor:
    """REINFORCE Leave-One-Out advantages (Kool et al. 2019; Ahmadian et al. 2024, "Back to Basics").

    ``A_i = r_i - 1/(k-1) * sum_{j != i} r_j`` within each group of ``k`` samples of the same prompt.
    ``scores`` is ``[B * k]`` with the ``k`` samples of a prompt in consecutive rows. Returns ``[B * k]``.
    """
    if k < 2:
        raise ValueError(
            f"rloo_advantages: k={k} but the leave-one-out baseline needs k >= 2 samples per prompt."
        )
    if scores.numel() % k:
        raise ValueError(
            f"rloo_advantages: {scores.numel()} scores do not split into groups of k={k}; "
            "pass k samples per prompt in consecutive rows."
        )
    grouped = scores.reshape(-1, k)
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (k - 1)
    return (grouped - baseline).reshape(scores.shape)


@torch.no_grad()
def grpo_advantages(
    scores: torch.Tensor,
    group_size: int,
    scale: Literal["group", "batch", "none"] = "group",
    eps: float = 1e-4,
) -> torch.Tensor:
    """Group-relative advantages (Shao et al. 2024, DeepSeekMath GRPO).

    ``A_i = (r_i - mean_group(r)) / (std_group(r) + eps)`` where the group is the ``group_size`` consecutive
    samples of one prompt and ``std`` is the unbiased (Bessel-corrected) standard deviation, as in TRL.

    * ``scale="group"``: GRPO as published.
    * ``scale="none"``: Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"): ``A_i = r_i - mean``,
      no std division (which biases towards too easy / too hard prompts).
    * ``scale="batch"``: group mean but the std of the whole batch (TRL's ``scale_rewards="batch"``).
    """
    if group_size < 2:
        raise ValueError(
            f"grpo_advantages: group_size={group_size}; group baselines need >= 2 samples per prompt."
        )
    if scores.numel() % group_size:
        raise ValueError(
            f"grpo_advantages: {scores.numel()} scores do not split into groups of group_size={group_size}; "
            "pass group_size samples per prompt in consecutive rows."
        )
    grouped = scores.reshape(-1, group_size)
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "group":
        centered = centered / (grouped.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        centered = centered / (scores.std() + eps)
    elif scale != "none":
        raise ValueError(f"grpo_advantages: unknown scale={scale!r}; use 'group', 'batch' or 'none'.")
    return centered.reshape(scores.shape)


@torch.no_grad()
def reinforce_pp_advantages(
    scores: torch.Tensor,
    kl_per_token: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    gamma: float = 1.0,
) -> torch.Tensor:
    """REINFORCE++ advantages (Hu 2025, "REINFORCE++: ... Robust to Both Prompt and Reward Models").

    1. Token rewards ``r_t = 1[t = last] * s - kl_coef * KL_t`` (:func:`per_token_rewards`).
    2. Discounted return-to-go ``G_t = sum_{l >= t} gamma^(l - t) r_l`` over response tokens (no critic).
    3. Global batch normalisation: ``A = (G - mean(G)) / std(G)`` over *all* masked tokens of the batch
       (:func:`masked_whiten`), replacing the critic / group baseline.

    ``scores`` ``[B]``, ``kl_per_token`` and ``mask`` ``[B, T]``. Returns advantages ``[B, T]``, 0 off-mask.
    """
    rewards = per_token_rewards(scores, kl_per_token, mask, kl_coef)
    # GAE with V = 0 and lam = 1 is exactly the discounted return-to-go (with the same mask handling).
    returns, _ = gae(rewards, torch.zeros_like(rewards), mask, gamma=gamma, lam=1.0)
    return masked_whiten(returns, mask, shift_mean=True)


# --------------------------------------------------------------------------------------------------
# Policy and value losses
# --------------------------------------------------------------------------------------------------


def aggregate_loss(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    loss_agg: LossAgg = "token-mean",
    max_length: int | None = None,
) -> torch.Tensor:
    """Reduce a ``[B, T]`` per-token loss to a scalar over the masked tokens.

    * ``"token-mean"``: ``sum_{i,t} l_it / sum_{i,t} m_it``, every response token in the batch weighs the same
      (DAPO, Yu et al. 2025; TRL's ``"dapo"``/``"bnpo"`` within a batch).
    * ``"seq-mean-token-mean"``: ``1/G sum_i 1/|o_i| sum_t l_it`` (GRPO as published, Shao et al. 2024);
      ``G`` counts the rows with at least one response token.
    * ``"seq-mean-token-sum-norm"``: ``1/B sum_i 1/L sum_t l_it`` with a constant ``L`` (Dr. GRPO, Liu et al.
      2025), removing the length bias. ``L = max_length`` or, if ``None``, ``T = mask.shape[1]``.
    """
    if loss_agg == "token-mean":
        return masked_mean(per_token_loss, mask)
    loss_sum, mask_f = _masked_zero(per_token_loss, mask)
    if loss_agg == "seq-mean-token-mean":
        n_tokens = mask_f.sum(dim=1)
        seq_loss = loss_sum.sum(dim=1) / _nonzero(n_tokens)
        has_tokens = (n_tokens > 0).to(seq_loss.dtype)
        return (seq_loss * has_tokens).sum() / has_tokens.sum().clamp_min(1.0)
    if loss_agg == "seq-mean-token-sum-norm":
        norm = max_length if max_length is not None else mask.shape[1]
        return (loss_sum.sum(dim=1) / norm).mean()
    raise ValueError(
        f"aggregate_loss: unknown loss_agg={loss_agg!r}; use 'token-mean', 'seq-mean-token-mean' "
        "or 'seq-mean-token-sum-norm'."
    )


def loss_items(mask: torch.Tensor, loss_agg: LossAgg) -> torch.Tensor:
    """What ``loss_agg`` averages over, counted in ``mask`` ``[B, T]``: tokens (token-mean), sequences with at
    least one token (seq-mean-token-mean) or rows (seq-mean-token-sum-norm). A float32 scalar tensor.

    ``aggregate_loss(x, mask, loss_agg) * loss_items(mask, loss_agg)`` is then a *sum* over items, which can
    be added over micro-batches and processes and divided by the global count: the minibatch loss is the
    same however it is split.
    """
    mask_b = mask != 0
    if loss_agg == "token-mean":
        n = mask_b.sum()
    elif loss_agg == "seq-mean-token-mean":
        n = mask_b.any(1).sum()
    elif loss_agg == "seq-mean-token-sum-norm":
        n = torch.tensor(mask.shape[0], device=mask.device)
    else:
        raise ValueError(f"loss_items: unknown loss_agg={loss_agg!r}; use 'token-mean', 'seq-mean-token-mean' "
                         "or 'seq-mean-token-sum-norm'.")
    return n.to(torch.float32)


def ppo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    loss_agg: LossAgg = "token-mean",
    max_length: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate objective of PPO (Schulman et al. 2017), as a loss to minimise.

    With ``rho_t = exp(logp_t - old_logp_t)``::

        L_t = max(-A_t * rho_t, -A_t * clip(rho_t, 1 - clip_eps, 1 + clip_eps_high))

    aggregated over the mask with :func:`aggregate_loss` (``loss_agg``, ``max_length``). ``clip_eps_high``
    defaults to ``clip_eps``; a larger value is DAPO's "clip-higher" (Yu et al. 2025). ``advantages`` is
    ``[B, T]`` (broadcast a ``[B, 1]`` sequence advantage for GRPO/RLOO).

    Returns ``(loss, stats)`` with detached scalar stats over the masked tokens:

    * ``clipfrac``: fraction of tokens where the clipped term is the active one (its gradient is 0).
    * ``approx_kl``: k3 estimate of ``KL(pi_old || pi)`` from tokens sampled by ``pi_old``:
      ``mean((rho - 1) - log rho)`` (non-negative, unbiased; see :func:`kl_estimate`).
    * ``ratio_mean``: mean of ``rho``.
    """
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    # Zero the inputs off-mask so padded log-probs (-inf) never overflow exp() and nan never reaches a gradient.
    log_ratio = _masked_zero(logp - old_logp, mask)[0]
    advantages = _masked_zero(advantages, mask)[0]
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + eps_high)
    loss = aggregate_loss(torch.maximum(unclipped, clipped), mask, loss_agg, max_length)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), mask),
            "approx_kl": masked_mean((ratio - 1.0) - log_ratio, mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range_value: float | None = 0.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value-function loss of PPO implementations (OpenAI baselines / lm-human-preferences, TRL).

    ``V_clip = old_V + clip(V - old_V, -c, c)`` and
    ``L = 0.5 * mean_m(max((V - R)^2, (V_clip - R)^2))``. ``clip_range_value=None`` disables clipping
    (plain ``0.5 * mean_m((V - R)^2)``). Returns ``(loss, clipfrac)``, ``clipfrac`` being the detached
    fraction of masked tokens where the clipped term is larger.
    """
    # Zero the inputs off-mask so padding garbage (inf, nan) never reaches a gradient.
    values, old_values, returns = (_masked_zero(x, mask)[0] for x in (values, old_values, returns))
    unclipped = (values - returns) ** 2
    if clip_range_value is None:
        return 0.5 * masked_mean(unclipped, mask), torch.zeros((), dtype=values.dtype, device=values.device)
    values_clipped = old_values + (values - old_values).clamp(-clip_range_value, clip_range_value)
    clipped = (values_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).to(values.dtype), mask)
    return loss, clipfrac


def entropy_from_logits(logits: torch.Tensor, chunk_size: int = 128) -> torch.Tensor:
    """Per-position entropy of ``softmax(logits)`` in nats: ``H = -sum_v p_v log p_v``, ``p = softmax(logits)``.

    ``logits`` is ``[..., V]``; returns ``[...]``. Rows are processed ``chunk_size`` at a time so the
    ``log_softmax`` temporary is ``chunk_size x V`` rather than the whole ``[B, T, V]`` (as in TRL).
    """
    flat = logits.reshape(-1, logits.shape[-1])
    chunks = []
    for chunk in flat.split(chunk_size, dim=0):
        logps = F.log_softmax(chunk, dim=-1)
        chunks.append(-(logps.exp() * logps).sum(dim=-1))
    if not chunks:  # zero rows
        return logits.new_zeros(logits.shape[:-1])
    return torch.cat(chunks).reshape(logits.shape[:-1])


# --------------------------------------------------------------------------------------------------
# KL coefficient controllers
# --------------------------------------------------------------------------------------------------


class FixedKLController:
    """A constant KL coefficient ``beta``; ``update`` does nothing."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> None:
        """No-op, present so both controllers share one interface."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences").

    After each batch with measured ``KL`` over ``n_steps`` samples::

        e    = clip(KL / target - 1, -0.2, 0.2)
        beta = beta * (1 + e * n_steps / horizon)

    so ``beta`` grows when the policy drifts past ``target`` nats and shrinks below it. ``state_dict`` holds
    the current ``beta`` (``target`` and ``horizon`` come from the config), so a resumed run continues exactly.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(
                f"AdaptiveKLController: target={target} and horizon={horizon} must both be > 0 "
                "(set kl target/horizon in the method config)."
            )
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> None:
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
