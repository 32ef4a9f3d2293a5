"""GSPO, CISPO, DAPO's overlong shaping and dynamic-sampling filter, sequence-level mismatch masking: values
and gradients written out from the papers' equations with plain Python arithmetic, and GSPO, CISPO and the
overlong penalty against TRL 1.16 on identical inputs."""

from __future__ import annotations

import math

import pytest
import torch

from alignkit.losses.policy import (
    cispo_policy_loss,
    groups_with_signal,
    gspo_policy_loss,
    mismatch_sequence_mask,
    overlong_penalty,
    sequence_log_ratio,
)
from alignkit.losses.rl import ppo_policy_loss


def t(values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype)


def close(actual, expected, tol=1e-9):
    expected = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float64), expected, atol=tol, rtol=0)


# two sequences: 3 response tokens and 2 (+ one padded position holding garbage)
OLD = [[-1.0, -2.0, -0.5], [-0.7, -1.2, float("-inf")]]
NEW = [[-0.9, -2.1, -0.3], [-0.7, -1.0, float("nan")]]
MASK = [[1, 1, 1], [1, 1, 0]]


# --------------------------------------------------------------------------------------------------
# GSPO
# --------------------------------------------------------------------------------------------------


def test_sequence_log_ratio_is_the_mean_token_log_ratio():
    close(sequence_log_ratio(t(NEW), t(OLD), t(MASK)), [(0.1 - 0.1 + 0.2) / 3, (0.0 + 0.2) / 2])
    close(sequence_log_ratio(t([[0.0]]), t([[1.0]]), t([[0]])), [0.0])  # no response token: 0


def test_gspo_value_clipping_and_gradient_by_hand():
    logp = t(NEW).requires_grad_(True)
    adv = t([[1.0], [-2.0]])
    # s_0 = exp(0.2/3) ~ 1.069 and s_1 = exp(0.1) ~ 1.105, both above 1 + 0.05
    s0, s1 = math.exp(0.2 / 3), math.exp(0.1)
    eps = 0.05
    loss, stats = gspo_policy_loss(logp, t(OLD), adv.expand(2, 3), t(MASK), clip_eps=eps, clip_eps_high=eps)
    # seq 0 (A = 1): max(-s0, -(1.05)) = -1.05, clipped (no gradient); seq 1 (A = -2): max(2 s1, 2.1) = 2 s1
    expected = ((-1.05) + 2 * s1) / 2
    close(loss, expected)
    close(stats["clipfrac"], 0.5)
    close(stats["ratio_mean"], (s0 + s1) / 2)
    loss.backward()
    # d/dlogp_t of 1/2 * 2 * s1 = s1 * 1/|y_1| for the two tokens of seq 1; seq 0 is clipped: 0 everywhere
    close(logp.grad, [[0.0, 0.0, 0.0], [s1 / 2, s1 / 2, 0.0]])


def test_gspo_one_ratio_per_sequence_unlike_token_level_ppo():
    # token ratios exp(+1) and exp(-1) average to a sequence ratio of exactly 1: nothing clipped in GSPO,
    # while token-level PPO clips both tokens
    old, new, mask, adv = t([[0.0, 0.0]]), t([[1.0, -1.0]]), t([[1, 1]]), t([[1.0, 1.0]])
    loss, stats = gspo_policy_loss(new, old, adv, mask, clip_eps=0.2, clip_eps_high=0.2)
    close(loss, -1.0)
    close(stats["clipfrac"], 0.0)
    _, ppo_stats = ppo_policy_loss(new, old, adv, mask, clip_eps=0.2)
    close(ppo_stats["clipfrac"], 0.5)  # the exp(+1) token (A > 0 and ratio > 1.2)


def test_gspo_on_policy_is_the_mean_advantage_and_ignores_padding():
    logp = t(NEW)
    loss, stats = gspo_policy_loss(logp, logp.detach(), t([[0.5] * 3, [1.5] * 3]), t(MASK))
    close(loss, -(0.5 + 1.5) / 2)  # s = 1 for both, seq-mean-token-mean
    close(stats["ratio_mean"], 1.0)
    assert torch.isfinite(loss)


# --------------------------------------------------------------------------------------------------
# CISPO
# --------------------------------------------------------------------------------------------------


def test_cispo_value_and_every_token_keeps_a_gradient():
    old = t([[0.0, 0.0, 0.0]])
    logp = t([[math.log(0.5), math.log(1.5), math.log(8.0)]]).requires_grad_(True)  # ratios 0.5, 1.5, 8
    adv = t([[1.0, -1.0, 1.0]])
    loss, stats = cispo_policy_loss(logp, old, adv, t([[1, 1, 1]]), clip_eps_high=1.0)  # cap 2, no floor
    w = [0.5, 1.5, 2.0]
    lp = [math.log(0.5), math.log(1.5), math.log(8.0)]
    a = [1.0, -1.0, 1.0]
    close(loss, -sum(w[i] * a[i] * lp[i] for i in range(3)) / 3)
    close(stats["clipfrac"], 1 / 3)
    close(stats["ratio_mean"], (0.5 + 1.5 + 8) / 3)
    loss.backward()
    # d/dlogp_t = -w_t A_t / 3: the clipped token (ratio 8) still has a gradient (PPO would give it 0)
    close(logp.grad, [[-w[i] * a[i] / 3 for i in range(3)]])
    assert logp.grad[0, 2] != 0


def test_cispo_lower_clip_and_on_policy_reinforce():
    old = t([[0.0, 0.0]])
    logp = t([[math.log(0.5), 0.0]])
    loss, _ = cispo_policy_loss(logp, old, t([[1.0, 1.0]]), t([[1, 1]]), clip_eps_high=0.2, clip_eps_low=0.2)
    close(loss, -(0.8 * math.log(0.5) + 1.0 * 0.0) / 2)  # 0.5 raised to 1 - 0.2
    # on-policy: the weight is 1, the loss is REINFORCE's -A * log pi (token-mean)
    lp = t(NEW).requires_grad_(True)
    loss, _ = cispo_policy_loss(lp, lp.detach(), t([[1.0] * 3, [2.0] * 3]), t(MASK))
    close(loss, -((-0.9 - 2.1 - 0.3) * 1.0 + (-0.7 - 1.0) * 2.0) / 5)
    loss.backward()
    close(lp.grad, [[-1 / 5] * 3, [-2 / 5, -2 / 5, 0.0]])


# --------------------------------------------------------------------------------------------------
# DAPO: overlong shaping and dynamic sampling
# --------------------------------------------------------------------------------------------------


def test_overlong_penalty_piecewise():
    # L_max = 100, L_cache = 20: free up to 80, linear to -1 at 100, -1 beyond
    lengths = torch.tensor([10, 80, 81, 90, 100, 120])
    close(overlong_penalty(lengths, 100, 20), [0.0, 0.0, -1 / 20, -10 / 20, -1.0, -1.0], tol=1e-6)
    close(overlong_penalty(lengths, 100, 20, factor=0.5), [0.0, 0.0, -0.025, -0.25, -0.5, -0.5], tol=1e-6)
    with pytest.raises(ValueError, match="cache"):
        overlong_penalty(lengths, 100, 0)


def test_groups_with_signal_drops_all_equal_groups():
    scores = t([1, 1, 1, 0, 0, 0, 0, 0, 0.5, 0.5, 0.5, 0.5000001])
    close(groups_with_signal(scores, 4).double(), [1.0, 0.0, 1.0])
    close(groups_with_signal(scores, 4, tol=1e-3).double(), [1.0, 0.0, 0.0])
    close(groups_with_signal(scores, 4).repeat_interleave(4).double(), [1] * 4 + [0] * 4 + [1] * 4)
    with pytest.raises(ValueError, match="groups"):
        groups_with_signal(scores, 5)


# --------------------------------------------------------------------------------------------------
# Sequence-level mismatch masking
# --------------------------------------------------------------------------------------------------


def test_mismatch_sequence_mask_geometric_and_sequence():
    sampler = t([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    trainer = t([[0.001, 0.001, 0.001, 0.001],  # mean log ratio 0.001, sum 0.004
                 [0.03, -0.01, 0.0, 0.0],  # mean 0.005, sum 0.02
                 [-0.05, 0.0, 9.0, 9.0]])  # two padded positions hold a huge mismatch
    mask = t([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]])
    # geometric, threshold 1.002: |mean log rho| <= log 1.002 = 0.001998; row 2 mean is -0.025
    keep = mismatch_sequence_mask(trainer, sampler, mask, 1.002)
    assert keep.tolist() == [True, False, False]
    # geometric, threshold 1.01 (log 0.00995): rows 0, 1 kept; row 2 (-0.025) still out
    assert mismatch_sequence_mask(trainer, sampler, mask, 1.01).tolist() == [True, True, False]
    # an explicit lower bound of 0.9 (log -0.105) lets row 2 in
    assert mismatch_sequence_mask(trainer, sampler, mask, 1.01, lower=0.9).tolist() == [True, True, True]
    # sequence level, threshold 1.01: sums 0.004, 0.02, -0.05 against log 1.01 = 0.00995
    assert mismatch_sequence_mask(trainer, sampler, mask, 1.01, level="sequence").tolist() == [True, False, False]
    assert mismatch_sequence_mask(trainer, sampler, mask, 1.06, level="sequence").tolist() == [True, True, True]
    with pytest.raises(ValueError, match="threshold"):
        mismatch_sequence_mask(trainer, sampler, mask, 1.0)


def test_overlong_penalty_matches_trl_soft_overlong_punishment():
    trl_rewards = pytest.importorskip("trl.rewards", reason="TRL (a dev dependency) is not installed")
    lengths = list(range(0, 140, 7))
    theirs = trl_rewards.get_soft_overlong_punishment(max_completion_len=100, soft_punish_cache=30)(
        completion_ids=[[0] * n for n in lengths])
    close(overlong_penalty(torch.tensor(lengths), 100, 30), theirs, tol=1e-6)


def _trl_grpo_loss(loss_type: str, level: str, eps_low: float, eps_high: float, logp, old, adv, mask):
    """TRL 1.16's GRPOTrainer._compute_loss on these log-probs (no model: a stand-in trainer returns them)."""
    from collections import defaultdict
    from types import SimpleNamespace

    grpo_trainer = pytest.importorskip("trl.trainer.grpo_trainer", reason="TRL (a dev dependency) is not installed")
    accelerator = SimpleNamespace(num_processes=1, sync_gradients=True, gather=lambda x: x,
                                  gather_for_metrics=lambda x: x, reduce=lambda x, reduction: x)
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None),
        aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level=level, loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high, beta=0.0,
        args=SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1), use_vllm=False,
        vllm_importance_sampling_correction=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, accelerator=accelerator, _entropy_bonus_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)), max_completion_length=logp.shape[1])
    n = logp.shape[0]
    inputs = {"prompt_ids": torch.zeros(n, 1, dtype=torch.long), "prompt_mask": torch.ones(n, 1, dtype=torch.long),
              "completion_ids": torch.zeros_like(mask, dtype=torch.long), "completion_mask": mask,
              "advantages": adv, "old_per_token_logps": old, "num_items_in_batch": mask.sum()}
    return grpo_trainer.GRPOTrainer._compute_loss(trainer, None, inputs)


@pytest.mark.parametrize("objective", ["gspo", "cispo"])
def test_gspo_and_cispo_match_trl_on_identical_inputs(objective):
    gen = torch.Generator().manual_seed(0)
    old = -torch.rand(4, 6, generator=gen, dtype=torch.float64) * 3
    logp_values = old + torch.randn(4, 6, generator=gen, dtype=torch.float64) * 0.3
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4, [1] * 5 + [0]])
    adv = torch.tensor([1.0, -0.5, 2.0, -1.5], dtype=torch.float64)
    theirs_logp = logp_values.clone().requires_grad_(True)
    ours_logp = logp_values.clone().requires_grad_(True)
    if objective == "gspo":  # TRL: loss_type="grpo" (sequence mean), importance_sampling_level="sequence"
        theirs = _trl_grpo_loss("grpo", "sequence", 0.02, 0.03, theirs_logp, old, adv, mask)
        ours, stats = gspo_policy_loss(ours_logp, old, adv[:, None].expand(4, 6), mask, clip_eps=0.02,
                                       clip_eps_high=0.03)
    else:  # TRL's epsilon_high for cispo is the absolute cap: 1 + our clip_eps_high
        theirs = _trl_grpo_loss("cispo", "token", 0.2, 1.1, theirs_logp, old, adv, mask)
        ours, stats = cispo_policy_loss(ours_logp, old, adv[:, None].expand(4, 6), mask, clip_eps_high=0.1)
    assert 0 < stats["clipfrac"] < 1  # both clipped and unclipped terms are compared
    close(ours, theirs.detach())
    theirs.backward()
    ours.backward()
    close(ours_logp.grad, theirs_logp.grad)
