"""RL losses and estimators on small inputs whose expected values are written out from the equations."""

from __future__ import annotations

import math

import pytest
import torch

from alignkit.losses.rl import (
    AdaptiveKLController,
    FixedKLController,
    aggregate_loss,
    entropy_from_logits,
    gae,
    grpo_advantages,
    kl_estimate,
    kl_loss_tokens,
    loss_items,
    masked_mean,
    masked_var,
    masked_whiten,
    per_token_rewards,
    ppo_policy_loss,
    reinforce_pp_advantages,
    rloo_advantages,
    value_loss,
)


def t(values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype)


def close(actual, expected, tol=1e-9):
    expected = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float64), expected, atol=tol, rtol=0)


# --------------------------------------------------------------------------------------------------
# Masked statistics
# --------------------------------------------------------------------------------------------------


def test_masked_mean_ignores_padding_even_inf_and_nan():
    x = t([[1.0, 2.0, float("inf")], [3.0, float("nan"), 100.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    close(masked_mean(x, mask), (1 + 2 + 3) / 3)
    close(masked_mean(x, mask, dim=1), [1.5, 3.0])
    close(masked_mean(x, mask.double()), 2.0)  # float mask gives the same
    close(masked_mean(x, torch.zeros_like(mask)), 0.0)  # empty mask: 0, not nan


def test_masked_var_biased_and_unbiased():
    x = t([[1.0, 2.0, 3.0, 50.0]])
    mask = t([[1, 1, 1, 0]])
    # mean 2, squared deviations 1, 0, 1
    close(masked_var(x, mask, unbiased=False), 2 / 3)
    close(masked_var(x, mask, unbiased=True), 2 / 2)
    close(masked_var(x, t([[1, 0, 0, 0]])), 0.0)  # a single element: 0, not nan


def test_masked_whiten_uses_masked_statistics_only():
    x = t([[1.0, 2.0, 3.0, 1e6], [2.0, -7.0, -7.0, -7.0]])
    mask = t([[1, 1, 1, 0], [1, 0, 0, 0]])
    # masked values 1, 2, 3, 2: mean 2, unbiased var (1 + 0 + 1 + 0) / 3
    std = math.sqrt(2 / 3 + 1e-8)
    expected = [[-1 / std, 0.0, 1 / std, 0.0], [0.0, 0.0, 0.0, 0.0]]
    close(masked_whiten(x, mask), expected)
    expected_no_shift = [[2 - 1 / std, 2.0, 2 + 1 / std, 0.0], [2.0, 0.0, 0.0, 0.0]]
    close(masked_whiten(x, mask, shift_mean=False), expected_no_shift)


# --------------------------------------------------------------------------------------------------
# KL estimators
# --------------------------------------------------------------------------------------------------


def test_kl_estimators_on_known_values():
    logp, ref_logp = t([math.log(0.5)]), t([math.log(0.25)])
    log_r = math.log(0.25) - math.log(0.5)  # log(ref / pi) = -log 2
    close(kl_estimate(logp, ref_logp, "k1"), [-log_r])
    close(kl_estimate(logp, ref_logp, "k2"), [0.5 * log_r**2])
    close(kl_estimate(logp, ref_logp, "k3"), [math.exp(log_r) - log_r - 1])  # 0.5 + log 2 - 1
    close(kl_estimate(logp, ref_logp, "k3"), [math.log(2) - 0.5])
    close(kl_estimate(t([0.0]), t([-30.0]), "k1", clamp=10.0), [10.0])


def test_k1_and_k3_are_unbiased_and_k2_is_not():
    # Exact expectations under pi over a 3-token support: E_pi[k] = sum_v pi(v) k(v).
    pi, ref = [0.5, 0.25, 0.25], [0.25, 0.5, 0.25]
    true_kl = sum(p * math.log(p / q) for p, q in zip(pi, ref))  # = 0.25 log 2
    close(true_kl, 0.25 * math.log(2))
    logp, ref_logp = t([math.log(p) for p in pi]), t([math.log(q) for q in ref])
    weights = t(pi)
    close((weights * kl_estimate(logp, ref_logp, "k1")).sum(), true_kl)
    close((weights * kl_estimate(logp, ref_logp, "k3")).sum(), true_kl)
    k2_expectation = 0.5 * (0.5 * math.log(2) ** 2 + 0.25 * math.log(2) ** 2)
    close((weights * kl_estimate(logp, ref_logp, "k2")).sum(), k2_expectation)
    assert abs(k2_expectation - true_kl) > 1e-3
    # k1 is negative on the second token, k3 never is.
    assert kl_estimate(logp, ref_logp, "k1")[1] < 0
    random_logp, random_ref = torch.randn(1000, dtype=torch.float64), torch.randn(1000, dtype=torch.float64)
    assert (kl_estimate(random_logp, random_ref, "k3") >= 0).all()
    assert (kl_estimate(random_logp, random_ref, "k2") >= 0).all()


def test_kl_estimate_rejects_unknown_kind():
    with pytest.raises(ValueError, match="k1"):
        kl_estimate(t([0.0]), t([0.0]), "k4")


def test_kl_loss_tokens_values_and_gradients_on_known_values():
    # One token, pi = 0.5, ref = 0.25, sampled by pi (old = pi): log r = log(ref / pi) = -log 2.
    def grads(ratio_weight):
        logp = t([math.log(0.5)]).requires_grad_()
        kl = kl_loss_tokens(logp, t([math.log(0.25)]), logp.detach(), "k3", ratio_weight=ratio_weight)
        kl.sum().backward()
        return kl.detach(), logp.grad

    plain, g_plain = grads(False)
    weighted, g_weighted = grads(True)
    close(plain, [math.log(2) - 0.5])  # k3 = r - 1 - log r
    close(weighted, [math.log(2) - 0.5])  # the ratio is 1 on-policy: the same value
    close(g_plain, [1 - 0.5])  # d k3 / d log pi = 1 - r
    close(g_weighted, [math.log(2)])  # (1 - r) + k3 = log pi - log ref
    # Off-policy (pi / old = 2): the value is weighted by the ratio as well.
    logp = t([math.log(0.5)]).requires_grad_()
    off = kl_loss_tokens(logp, t([math.log(0.25)]), t([math.log(0.25)]), "k3", ratio_weight=True)
    close(off.detach(), [2 * (math.log(2) - 0.5)])


def test_ratio_weighted_kl_gradient_is_the_true_kl_gradient():
    # pi = softmax(theta) over 3 tokens: sum_v pi(v) grad[rho k3](v) is the exact gradient of KL(pi || ref);
    # the plain k3 term's expected gradient is not.
    ref = t([0.25, 0.5, 0.25])
    theta = t([0.3, -0.2, 0.1]).requires_grad_()
    true_grad = torch.autograd.grad((theta.softmax(0) * (theta.log_softmax(0) - ref.log())).sum(), theta)[0]

    def expected_grad(ratio_weight):
        logp = theta.log_softmax(0)
        kl = kl_loss_tokens(logp, ref.log(), logp.detach(), "k3", ratio_weight=ratio_weight)
        weights = theta.softmax(0).detach()  # E over tokens sampled from pi: no gradient through the sampling
        return torch.autograd.grad((weights * kl).sum(), theta)[0]

    close(expected_grad(True), true_grad, tol=1e-12)
    assert (expected_grad(False) - true_grad).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------------
# Rewards and advantages
# --------------------------------------------------------------------------------------------------


def test_per_token_rewards_adds_score_at_last_response_token():
    scores = t([2.0, -1.0, 5.0])
    kl = t([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6], [0.7, 0.8, 0.9]])
    mask = t([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    expected = [
        [-0.5 * 0.1, 2.0 - 0.5 * 0.2, 0.0],
        [-0.5 * 0.4, -0.5 * 0.5, -1.0 - 0.5 * 0.6],
        [0.0, 0.0, 0.0],  # no response token: no score anywhere
    ]
    close(per_token_rewards(scores, kl, mask, kl_coef=0.5), expected)


def test_gae_one_sequence_three_tokens_with_masked_tail():
    gamma, lam = 0.9, 0.8
    r, v = [0.5, -0.2, 1.0], [0.3, 0.4, 0.6]
    rewards = t([r + [7.0]])
    values = t([v + [float("nan")]])  # padding garbage must not leak
    mask = t([[1, 1, 1, 0]])
    # delta_t = r_t + gamma V_{t+1} - V_t, with V after the last response token = 0
    d2 = r[2] + gamma * 0.0 - v[2]
    d1 = r[1] + gamma * v[2] - v[1]
    d0 = r[0] + gamma * v[1] - v[0]
    a2 = d2
    a1 = d1 + gamma * lam * a2
    a0 = d0 + gamma * lam * a1
    close([a0, a1, a2], [0.72416, 0.228, 0.4])  # the same numbers, by hand
    advantages, returns = gae(rewards, values, mask, gamma=gamma, lam=lam)
    close(advantages, [[a0, a1, a2, 0.0]])
    close(returns, [[a0 + v[0], a1 + v[1], a2 + v[2], 0.0]])


def test_gae_skips_left_padding_and_holes():
    rewards, values, mask = t([[0.5, -0.2, 1.0]]), t([[0.3, 0.4, 0.6]]), t([[1, 1, 1]])
    compact, _ = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # Same tokens with a left pad and a hole in the middle (e.g. a tool's output in a multi-turn rollout).
    spread_rewards = t([[9.0, 0.5, 3.0, -0.2, 1.0, 4.0]])
    spread_values = t([[9.0, 0.3, 3.0, 0.4, 0.6, 4.0]])
    spread_mask = t([[0, 1, 0, 1, 1, 0]])
    spread, _ = gae(spread_rewards, spread_values, spread_mask, gamma=0.9, lam=0.8)
    close(spread[0, [1, 3, 4]], compact[0])
    close(spread[0, [0, 2, 5]], [0.0, 0.0, 0.0])


def test_rloo_leave_one_out_k3():
    scores = t([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])
    expected = [
        1.0 - (2.0 + 6.0) / 2,
        2.0 - (1.0 + 6.0) / 2,
        6.0 - (1.0 + 2.0) / 2,
        0.0 - (0.0 + 3.0) / 2,
        0.0 - (0.0 + 3.0) / 2,
        3.0 - (0.0 + 0.0) / 2,
    ]
    close(rloo_advantages(scores, k=3), expected)
    with pytest.raises(ValueError, match="k >= 2"):
        rloo_advantages(scores, k=1)
    with pytest.raises(ValueError, match="groups of k=4"):
        rloo_advantages(scores, k=4)


def test_grpo_group_std_and_dr_grpo():
    scores = t([1.0, 2.0, 6.0, 4.0, 4.0, 4.0])
    # group 1: mean 3, unbiased std sqrt((4 + 1 + 9) / 2); group 2: all equal -> 0 advantage
    std1 = math.sqrt((4 + 1 + 9) / 2)
    eps = 1e-4
    close(grpo_advantages(scores, 3), [-2 / (std1 + eps), -1 / (std1 + eps), 3 / (std1 + eps), 0, 0, 0])
    close(grpo_advantages(scores, 3, scale="none"), [-2.0, -1.0, 3.0, 0.0, 0.0, 0.0])
    batch_mean = sum(scores.tolist()) / 6
    batch_std = math.sqrt(sum((s - batch_mean) ** 2 for s in scores.tolist()) / 5)
    close(grpo_advantages(scores, 3, scale="batch"), [x / (batch_std + eps) for x in [-2, -1, 3, 0, 0, 0]])
    with pytest.raises(ValueError, match="scale"):
        grpo_advantages(scores, 3, scale="std")


def test_reinforce_pp_returns_to_go_then_global_whitening():
    scores = t([1.0, 0.0])
    kl = t([[0.2, 0.1, 0.0], [0.0, 0.4, 9.0]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    kl_coef, gamma = 0.5, 0.9
    r0 = [-kl_coef * 0.2, -kl_coef * 0.1, 1.0 - kl_coef * 0.0]
    r1 = [-kl_coef * 0.0, 0.0 - kl_coef * 0.4]
    g0 = [r0[0] + gamma * r0[1] + gamma**2 * r0[2], r0[1] + gamma * r0[2], r0[2]]
    g1 = [r1[0] + gamma * r1[1], r1[1]]
    flat = g0 + g1
    mean = sum(flat) / len(flat)
    std = math.sqrt(sum((g - mean) ** 2 for g in flat) / (len(flat) - 1) + 1e-8)
    expected = [[(g - mean) / std for g in g0], [(g - mean) / std for g in g1] + [0.0]]
    close(reinforce_pp_advantages(scores, kl, mask, kl_coef=kl_coef, gamma=gamma), expected)


# --------------------------------------------------------------------------------------------------
# Policy and value losses
# --------------------------------------------------------------------------------------------------


def test_ppo_policy_loss_with_clipping_active():
    ratios = [1.5, 0.9, 0.5]
    adv = [1.0, 1.0, -1.0]
    # A padded 4th token whose log-ratio would overflow exp() if it leaked.
    logp = t([[math.log(r) for r in ratios] + [1000.0]]).requires_grad_()
    old_logp = t([[0.0, 0.0, 0.0, 0.0]])
    advantages = t([adv + [5.0]])
    mask = t([[1, 1, 1, 0]])
    loss, stats = ppo_policy_loss(logp, old_logp, advantages, mask, clip_eps=0.2)
    # max(-A r, -A clip(r, 0.8, 1.2)): token 0 -> max(-1.5, -1.2); token 1 -> -0.9; token 2 -> max(0.5, 0.8)
    per_token = [-1.2, -0.9, 0.8]
    close(loss, sum(per_token) / 3)
    close(stats["clipfrac"], 2 / 3)
    close(stats["ratio_mean"], sum(ratios) / 3)
    close(stats["approx_kl"], sum((r - 1) - math.log(r) for r in ratios) / 3)
    loss.backward()
    # clipped tokens get no gradient; d(-A r)/d logp = -A r on the unclipped one
    close(logp.grad, [[0.0, -1.0 * 0.9 / 3, 0.0, 0.0]])


def test_ppo_policy_loss_without_clipping_and_clip_higher():
    ratios, adv = [1.1, 0.9, 1.5], [2.0, -1.0, 1.0]
    logp, old_logp = t([[math.log(r) for r in ratios]]), t([[0.0, 0.0, 0.0]])
    mask = t([[1, 1, 0]])
    loss, stats = ppo_policy_loss(logp, old_logp, t([adv]), mask, clip_eps=0.2)
    close(loss, (-2.0 * 1.1 + 1.0 * 0.9) / 2)
    close(stats["clipfrac"], 0.0)
    # DAPO clip-higher: ratio 1.5 with A > 0 is clipped at 1.2 symmetric, unclipped with eps_high = 0.6
    full = t([[1, 1, 1]])
    loss_sym, stats_sym = ppo_policy_loss(logp, old_logp, t([adv]), full, clip_eps=0.2)
    loss_high, stats_high = ppo_policy_loss(logp, old_logp, t([adv]), full, clip_eps=0.2, clip_eps_high=0.6)
    close(loss_sym, (-2.2 + 0.9 - 1.2) / 3)
    close(loss_high, (-2.2 + 0.9 - 1.5) / 3)
    close(stats_sym["clipfrac"], 1 / 3)
    close(stats_high["clipfrac"], 0.0)


def test_losses_keep_nan_padding_out_of_values_and_gradients():
    nan, inf = float("nan"), float("inf")
    mask = t([[1, 1, 0]])
    logp = t([[-0.1, -0.2, inf]]).requires_grad_()
    loss, stats = ppo_policy_loss(logp, t([[-0.2, -0.2, -inf]]), t([[1.0, -1.0, nan]]), mask)
    values = t([[0.5, 0.2, nan]]).requires_grad_()
    v_loss, _ = value_loss(values, t([[0.4, 0.3, nan]]), t([[1.0, 0.0, inf]]), mask)
    (loss + v_loss).backward()
    for x in (loss, v_loss, *stats.values(), logp.grad, values.grad):
        assert torch.isfinite(x).all()
    assert logp.grad[0, 2] == 0 and values.grad[0, 2] == 0


def test_loss_aggregation_modes():
    # ratio 1 everywhere, so the per-token loss is -A.
    advantages = t([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
    mask = t([[1, 1, 1, 0], [1, 0, 0, 0]])
    zeros = torch.zeros_like(advantages)

    def loss(agg, max_length=None):
        return ppo_policy_loss(zeros, zeros, advantages, mask, loss_agg=agg, max_length=max_length)[0]

    close(loss("token-mean"), -(1 + 2 + 3 + 4) / 4)
    close(loss("seq-mean-token-mean"), -((1 + 2 + 3) / 3 + 4 / 1) / 2)
    close(loss("seq-mean-token-sum-norm"), -((1 + 2 + 3) / 4 + 4 / 4) / 2)
    close(loss("seq-mean-token-sum-norm", max_length=8), -((1 + 2 + 3) / 8 + 4 / 8) / 2)
    # a row without response tokens is not a sequence for the per-sequence mean
    empty_row = t([[1, 1, 1, 0], [0, 0, 0, 0]])
    close(aggregate_loss(-advantages, empty_row, "seq-mean-token-mean"), -(1 + 2 + 3) / 3)
    with pytest.raises(ValueError, match="token-mean"):
        aggregate_loss(advantages, mask, "sum")


def test_value_loss_clipped():
    values = t([[1.0, 0.0, 2.0, 99.0]])
    old_values = t([[0.5, 0.5, 2.0, 0.0]])
    returns = t([[2.0, 0.0, 1.0, 0.0]])
    mask = t([[1, 1, 1, 0]])
    # clip(V, old +- 0.2): 0.7, 0.3, 2.0
    unclipped = [(1.0 - 2.0) ** 2, (0.0 - 0.0) ** 2, (2.0 - 1.0) ** 2]
    clipped = [(0.7 - 2.0) ** 2, (0.3 - 0.0) ** 2, (2.0 - 1.0) ** 2]
    loss, clipfrac = value_loss(values, old_values, returns, mask, clip_range_value=0.2)
    close(loss, 0.5 * sum(max(u, c) for u, c in zip(unclipped, clipped)) / 3)
    close(loss, 0.5 * (1.69 + 0.09 + 1.0) / 3)
    close(clipfrac, 2 / 3)
    loss_plain, clipfrac_plain = value_loss(values, old_values, returns, mask, clip_range_value=None)
    close(loss_plain, 0.5 * sum(unclipped) / 3)
    close(clipfrac_plain, 0.0)


def test_entropy_from_logits_matches_direct_formula():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, dtype=torch.float64) * 3
    probs = torch.softmax(logits, dim=-1)
    direct = -(probs * torch.log(probs)).sum(-1)
    close(entropy_from_logits(logits, chunk_size=3), direct.tolist(), tol=1e-12)
    close(entropy_from_logits(torch.zeros(1, 4, dtype=torch.float64)), [math.log(4)])
    p = [0.7, 0.2, 0.1]
    close(entropy_from_logits(t([[math.log(x) for x in p]])), [-sum(x * math.log(x) for x in p)])


# --------------------------------------------------------------------------------------------------
# KL controllers
# --------------------------------------------------------------------------------------------------


def test_adaptive_kl_controller_update_numbers():
    controller = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    controller.update(current_kl=9.0, n_steps=256)  # error 0.5 clipped to 0.2
    expected = 0.1 * (1 + 0.2 * 256 / 10000)
    assert controller.value == pytest.approx(expected, abs=1e-15)
    controller.update(current_kl=torch.tensor(5.4), n_steps=256)  # error -0.1
    expected *= 1 + (5.4 / 6.0 - 1) * 256 / 10000
    assert controller.value == pytest.approx(expected, rel=1e-7)
    controller.update(current_kl=0.0, n_steps=100)  # error -1 clipped to -0.2
    expected *= 1 - 0.2 * 100 / 10000
    assert controller.value == pytest.approx(expected, rel=1e-7)


def test_kl_controllers_resume_exactly():
    controller = AdaptiveKLController(0.05, target=3.0, horizon=500)
    for kl in [1.0, 4.0, 3.3]:
        controller.update(kl, n_steps=64)
    resumed = AdaptiveKLController(0.05, target=3.0, horizon=500)
    resumed.load_state_dict(controller.state_dict())
    for kl in [2.0, 7.0]:
        controller.update(kl, n_steps=64)
        resumed.update(kl, n_steps=64)
    assert resumed.value == controller.value

    fixed = FixedKLController(0.2)
    fixed.update(100.0, n_steps=64)
    assert fixed.value == 0.2
    other = FixedKLController(0.0)
    other.load_state_dict(fixed.state_dict())
    assert other.value == 0.2


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_micro_batch_sums_over_global_items_equal_the_whole_batch_loss(loss_agg):
    """What the loops do: sum(aggregate * items) per micro-batch / global items == aggregate on the batch."""
    g = torch.Generator().manual_seed(0)
    per_token = torch.randn(6, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0],
                         [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]])
    whole = aggregate_loss(per_token, mask, loss_agg, max_length=5)
    parts = [slice(0, 2), slice(2, 3), slice(3, 6)]
    total_items = sum(float(loss_items(mask[s], loss_agg)) for s in parts)
    split = sum(aggregate_loss(per_token[s], mask[s], loss_agg, max_length=5) * loss_items(mask[s], loss_agg)
                for s in parts) / total_items
    torch.testing.assert_close(split, whole)


def test_loss_items_counts():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0]])
    assert float(loss_items(mask, "token-mean")) == 3
    assert float(loss_items(mask, "seq-mean-token-mean")) == 2
    assert float(loss_items(mask, "seq-mean-token-sum-norm")) == 3
    with pytest.raises(ValueError, match="loss_agg"):
        loss_items(mask, "mean")
