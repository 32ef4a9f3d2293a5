"""Preference and reward losses: hand-computed values, edge cases, and parity with TRL 1.16.

TRL 1.16 computes the DPO and KTO losses inline in ``_compute_loss``; the parity tests call those
methods unbound with a stand-in ``self`` and a stand-in model that returns chosen per-token log-probs,
and read the per-example tensors (``per_sequence_loss``, ``losses``, rewards, ``kl``) from the method's
locals when it returns. The returned scalar loss is compared too.
"""

from __future__ import annotations

import math
import sys
import types
from collections import defaultdict

import pytest
import torch

from alignkit.losses.preference import (
    bradley_terry_loss,
    cpo_loss,
    dpo_loss,
    kto_loss,
    orpo_loss,
    regression_loss,
    simpo_loss,
)


def logsig(x: float) -> float:
    """log σ(x), stable for large |x|."""
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sig(x: float) -> float:
    return math.exp(logsig(x))


def t(*values: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def close(actual: torch.Tensor, expected, tol: float = 1e-9) -> None:
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected.reshape(actual.shape), rtol=tol, atol=tol)


# --- DPO ------------------------------------------------------------------------------------------


def dpo_expected(h: float, beta: float, loss_type: str, eps: float) -> float:
    z = beta * h
    if loss_type == "sigmoid":
        return -(1 - eps) * logsig(z) - eps * logsig(-z)
    if loss_type == "robust":
        return (-(1 - eps) * logsig(z) + eps * logsig(-z)) / (1 - 2 * eps)
    if loss_type == "hinge":
        return max(0.0, 1 - z)
    return (h - 1 / (2 * beta)) ** 2


@pytest.mark.parametrize(
    ("loss_type", "eps"),
    [("sigmoid", 0.0), ("sigmoid", 0.1), ("robust", 0.0), ("robust", 0.1), ("hinge", 0.0), ("ipo", 0.0)],
)
def test_dpo_loss_hand_computed(loss_type, eps):
    # h = (-10 - -11) - (-12 - -11) = 2; second example: equal log-probs, h = 0; third: h = -3.
    pc, pr = t(-10.0, -7.0, -20.0), t(-12.0, -7.0, -18.0)
    rc, rr = t(-11.0, -7.0, -21.0), t(-11.0, -7.0, -22.0)
    beta = 0.1
    losses, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, beta, loss_type, eps)
    close(losses, [dpo_expected(h, beta, loss_type, eps) for h in (2.0, 0.0, -3.0)])
    close(chosen_rewards, [0.1, 0.0, 0.1])
    close(rejected_rewards, [-0.1, 0.0, 0.4])


def test_dpo_loss_equal_logps_values():
    zero = t(-5.0)
    assert dpo_loss(zero, zero, zero, zero, 0.1, "sigmoid")[0].item() == pytest.approx(math.log(2))
    assert dpo_loss(zero, zero, zero, zero, 0.1, "sigmoid", 0.1)[0].item() == pytest.approx(math.log(2))
    assert dpo_loss(zero, zero, zero, zero, 0.1, "robust", 0.1)[0].item() == pytest.approx(math.log(2))
    assert dpo_loss(zero, zero, zero, zero, 0.1, "hinge")[0].item() == pytest.approx(1.0)
    assert dpo_loss(zero, zero, zero, zero, 0.1, "ipo")[0].item() == pytest.approx(25.0)  # (0 - 1/0.2)^2


@pytest.mark.parametrize(
    ("loss_type", "eps"),
    [("sigmoid", 0.0), ("sigmoid", 0.1), ("robust", 0.0), ("robust", 0.1), ("hinge", 0.0), ("ipo", 0.0)],
)
@pytest.mark.parametrize("h", [100.0, -100.0])
def test_dpo_loss_large_margins_finite(loss_type, eps, h):
    beta = 1.0
    pc = torch.tensor([h], requires_grad=True)  # float32, where overflow would show
    zero = torch.zeros(1)
    losses, _, _ = dpo_loss(pc, zero, zero, zero, beta, loss_type, eps)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(pc.grad).all()
    close(losses, [dpo_expected(h, beta, loss_type, eps)], tol=1e-5)


def test_dpo_loss_batch_of_one_and_gradient_sign():
    pc = torch.tensor([-3.0], requires_grad=True)
    pr = torch.tensor([-4.0], requires_grad=True)
    losses, chosen_rewards, _ = dpo_loss(pc, pr, torch.tensor([-3.5]), torch.tensor([-3.5]))
    assert losses.shape == (1,) and not chosen_rewards.requires_grad
    losses.sum().backward()
    assert pc.grad.item() < 0 < pr.grad.item()  # raise chosen, lower rejected


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"loss_type": "kto"}, "unknown loss_type"),
        ({"loss_type": "hinge", "label_smoothing": 0.1}, "no meaning"),
        ({"loss_type": "robust", "label_smoothing": 0.5}, r"\[0, 0.5\)"),
        ({"loss_type": "sigmoid", "label_smoothing": 0.7}, r"\[0, 0.5\]"),
        ({"beta": 0.0}, "beta must be > 0"),
    ],
)
def test_dpo_loss_rejects_bad_config(kwargs, message):
    x = t(-1.0)
    with pytest.raises(ValueError, match=message):
        dpo_loss(x, x, x, x, **kwargs)


def test_dpo_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="ref_rejected_logps"):
        dpo_loss(t(-1.0, -2.0), t(-1.0, -2.0), t(-1.0, -2.0), t(-1.0))


# --- CPO / SimPO ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("loss_type", "eps"), [("sigmoid", 0.0), ("sigmoid", 0.1), ("hinge", 0.0), ("ipo", 0.0)]
)
def test_cpo_loss_hand_computed(loss_type, eps):
    chosen, rejected = t(-20.0, -5.0, -1.0), t(-24.0, -5.0, -101.0)  # h = 4, 0, 100
    beta = 0.1
    losses, chosen_rewards, rejected_rewards = cpo_loss(chosen, rejected, beta, loss_type, eps)
    close(losses, [dpo_expected(h, beta, loss_type, eps) for h in (4.0, 0.0, 100.0)])
    close(chosen_rewards, [-2.0, -0.5, -0.1])
    close(rejected_rewards, [-2.4, -0.5, -10.1])


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_simpo_loss_hand_computed(eps):
    chosen, rejected = t(-0.8, -1.0, -0.1), t(-1.2, -1.0, -60.0)
    beta, ratio = 2.0, 0.5
    losses, chosen_rewards, rejected_rewards = simpo_loss(chosen, rejected, beta, ratio, eps)
    expected = []
    for c, r in [(-0.8, -1.2), (-1.0, -1.0), (-0.1, -60.0)]:
        z = beta * (c - r) - ratio * beta  # gamma = gamma_beta_ratio * beta
        expected.append(-(1 - eps) * logsig(z) - eps * logsig(-z))
    close(losses, expected)
    close(chosen_rewards, [-1.6, -2.0, -0.2])
    close(rejected_rewards, [-2.4, -2.0, -120.0])


def test_simpo_loss_large_margin_finite_float32():
    chosen = torch.tensor([0.0, -200.0], requires_grad=True)
    rejected = torch.tensor([-200.0, 0.0])
    losses, _, _ = simpo_loss(chosen, rejected, beta=2.0, label_smoothing=0.1)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(chosen.grad).all()
    close(
        losses,
        [-0.9 * logsig(399.0) - 0.1 * logsig(-399.0), -0.9 * logsig(-401.0) - 0.1 * logsig(401.0)],
        1e-5,
    )


# --- ORPO -----------------------------------------------------------------------------------------


def orpo_expected(lc: float, lr: float, beta: float) -> tuple[float, float]:
    def log1mexp(x: float) -> float:
        return math.log(-math.expm1(x))

    log_odds = (lc - lr) - (log1mexp(lc) - log1mexp(lr))
    return -beta * logsig(log_odds), log_odds


def test_orpo_loss_hand_computed():
    pairs = [(-0.5, -1.5), (-2.0, -0.3), (-1.0, -1.0), (-1e-6, -3.0), (-40.0, -0.01)]
    chosen = t(*[c for c, _ in pairs])
    rejected = t(*[r for _, r in pairs])
    beta = 0.1
    losses, chosen_rewards, rejected_rewards, log_odds_ratio, log_odds = orpo_loss(chosen, rejected, beta)
    expected = [orpo_expected(c, r, beta) for c, r in pairs]
    close(losses, [e[0] for e in expected])
    close(log_odds, [e[1] for e in expected])
    close(log_odds_ratio, [logsig(e[1]) for e in expected])
    close(chosen_rewards, [beta * c for c, _ in pairs])
    close(rejected_rewards, [beta * r for _, r in pairs])
    assert losses[2].item() == pytest.approx(beta * math.log(2))  # equal log-probs: log odds 0


def test_orpo_loss_logps_near_zero_finite_float32():
    # A near-certain completion rounds to log-prob 0 (or a hair below): log(1 - p) -> -inf without care.
    chosen = torch.tensor([0.0, -1e-9, -1e-30, 0.0, -5.0], requires_grad=True)
    rejected = torch.tensor([-2.0, -2.0, -0.5, 0.0, -1e-9], requires_grad=True)
    losses, *_, log_odds = orpo_loss(chosen, rejected, beta=0.1)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(log_odds).all()
    assert torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()
    assert losses[3].item() == pytest.approx(0.1 * math.log(2))  # both 0: equal odds
    expected = orpo_expected(-1e-9, -2.0, 0.1)
    assert losses[1].item() == pytest.approx(expected[0], rel=1e-5)
    assert log_odds[1].item() == pytest.approx(expected[1], rel=1e-5)
    assert log_odds[4].item() == pytest.approx(orpo_expected(-5.0, -1e-9, 0.1)[1], rel=1e-5)


# --- KTO ------------------------------------------------------------------------------------------


def test_kto_loss_hand_computed():
    beta, wd, wu = 0.1, 1.0, 1.5
    pc, rc = t(-5.0, -9.0), t(-6.0, -9.0)  # r = 1, 0
    pr, rr = t(-8.0), t(-7.0)  # r = -1
    pkl, rkl = t(-3.0, -4.0, -2.0), t(-3.5, -4.5, -2.5)  # mean 0.5
    losses, chosen_rewards, rejected_rewards, kl = kto_loss(pc, pr, pkl, rc, rr, rkl, beta, wd, wu)
    z0 = 0.5
    close(kl, z0)
    close(
        losses,
        [wd * (1 - sig(beta * (1 - z0))), wd * (1 - sig(beta * (0 - z0))), wu * (1 - sig(beta * (z0 + 1)))],
    )
    close(chosen_rewards, [0.1, 0.0])
    close(rejected_rewards, [-0.1])


def test_kto_loss_negative_kl_clamps_and_kl_override():
    pc, rc, pr, rr = t(-5.0), t(-6.0), t(-8.0), t(-7.0)
    losses, _, _, kl = kto_loss(pc, pr, t(-5.0), rc, rr, t(-3.0), beta=0.1)  # mean -2 -> 0
    assert kl.item() == 0.0
    close(losses, [1 - sig(0.1), 1 - sig(0.1)])
    # A pre-reduced KL (e.g. averaged over processes) replaces the KL log-probs.
    losses_kl, _, _, kl2 = kto_loss(pc, pr, None, rc, rr, None, beta=0.1, kl=torch.tensor(2.0))
    close(kl2, 2.0)
    close(losses_kl, [1 - sig(0.1 * (1 - 2)), 1 - sig(0.1 * (2 + 1))])
    _, _, _, kl3 = kto_loss(pc, pr, None, rc, rr, None, kl=-0.3)
    assert kl3.item() == 0.0


def test_kto_loss_one_sided_batches_and_large_rewards():
    empty = torch.zeros(0)
    losses, chosen_rewards, rejected_rewards, _ = kto_loss(t(0.0), empty, t(-1.0), t(-100.0), empty, t(-1.0))
    assert losses.shape == (1,) and rejected_rewards.shape == (0,)
    close(losses, [1 - sig(10.0)])
    losses, _, _, _ = kto_loss(empty, t(0.0), t(-1.0), empty, t(-100.0), t(-1.0), beta=10.0)
    assert torch.isfinite(losses).all()
    close(losses, [1 - sig(-1000.0)])  # strongly preferred undesirable: loss -> 1


def test_kto_loss_needs_a_kl_estimate():
    with pytest.raises(ValueError, match="kl="):
        kto_loss(t(-1.0), t(-1.0), None, t(-1.0), t(-1.0), None)
    with pytest.raises(ValueError, match="empty"):
        kto_loss(t(-1.0), t(-1.0), torch.zeros(0), t(-1.0), t(-1.0), torch.zeros(0))


# --- reward models --------------------------------------------------------------------------------


def test_bradley_terry_loss_hand_computed():
    chosen, rejected = t(2.0, 0.0, -50.0), t(0.5, 0.0, 50.0)
    close(bradley_terry_loss(chosen, rejected), [-logsig(1.5), math.log(2), -logsig(-100.0)])
    close(bradley_terry_loss(chosen, rejected, margin=t(1.0, 0.0, 0.0)), [-logsig(0.5), math.log(2), 100.0])
    close(bradley_terry_loss(chosen, rejected, margin=1.0), [-logsig(0.5), -logsig(-1.0), -logsig(-101.0)])


def test_regression_loss_hand_computed():
    close(regression_loss(t(1.0, -2.0, 0.5), t(0.0, 1.0, 0.5)), [1.0, 9.0, 0.0])


# --- parity with TRL 1.16 -------------------------------------------------------------------------


def call_capturing_locals(fn, *args, **kwargs):
    """Call ``fn`` and return (its result, its local variables at return)."""
    captured: dict = {}

    def profiler(frame, event, arg):
        if event == "return" and frame.f_code is fn.__code__:
            captured.update(frame.f_locals)

    previous = sys.getprofile()
    sys.setprofile(profiler)
    try:
        result = fn(*args, **kwargs)
    finally:
        sys.setprofile(previous)
    return result, captured


def identity_accelerator():
    return types.SimpleNamespace(
        device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x
    )


def fake_lm(per_token_logps: torch.Tensor):
    """Stands in for TRL's fused-LM-head model output: only the per-token log-probs matter."""
    shape = per_token_logps.shape

    def forward(**kwargs):
        return types.SimpleNamespace(
            log_probs=per_token_logps,
            entropy=torch.zeros(shape),
            mean_logits=torch.zeros(shape),
            is_top1=torch.zeros(shape, dtype=torch.bool),
        )

    return forward


def spread_over_tokens(seq_logps: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Per-token log-probs [N, T-1] on the shifted completion positions that sum to ``seq_logps``."""
    shift_mask = completion_mask[:, 1:].to(seq_logps.dtype)
    return shift_mask * (seq_logps / shift_mask.sum(1)).unsqueeze(1)


def random_completion_mask(n: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    lengths = torch.randint(1, seq_len, (n,), generator=gen)  # position 0 is always prompt
    positions = torch.arange(seq_len).unsqueeze(0)
    return (positions >= seq_len - lengths.unsqueeze(1)).long()


def trl_dpo(pc, pr, rc, rr, completion_mask, beta, loss_type, label_smoothing):
    pytest.importorskip("trl")
    from trl import DPOTrainer

    self = types.SimpleNamespace(
        model=types.SimpleNamespace(training=False),
        accelerator=identity_accelerator(),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros(completion_mask.shape, dtype=torch.long),
        "attention_mask": torch.ones_like(completion_mask),
        "completion_mask": completion_mask,
        "ref_chosen_logps": rc,
        "ref_rejected_logps": rr,
    }
    model = fake_lm(spread_over_tokens(torch.cat([pc, pr]), completion_mask))
    loss, local = call_capturing_locals(DPOTrainer._compute_loss, self, model, inputs, return_outputs=False)
    return loss, local["per_sequence_loss"], local["chosen_rewards"], local["rejected_rewards"]


def random_pairs(batch: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    pc, pr, rc, rr = (-(torch.rand(batch, generator=gen) * 60 + 1) for _ in range(4))
    return gen, pc, pr, rc, rr


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize(
    ("loss_type", "eps"), [("sigmoid", 0.0), ("hinge", 0.0), ("robust", 0.0), ("robust", 0.1)]
)
def test_dpo_loss_matches_trl(batch, loss_type, eps):
    gen, pc, pr, rc, rr = random_pairs(batch, seed=10)
    completion_mask = random_completion_mask(2 * batch, 12, gen)
    beta = 0.1
    trl_loss, trl_losses, trl_chosen, trl_rejected = trl_dpo(
        pc, pr, rc, rr, completion_mask, beta, loss_type, eps
    )
    losses, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, beta, loss_type, eps)
    torch.testing.assert_close(losses, trl_losses, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(losses.mean(), trl_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chosen_rewards, trl_chosen, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rejected_rewards, trl_rejected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 8])
def test_dpo_ipo_on_length_averaged_logps_matches_trl(batch):
    """TRL's IPO divides the summed log-ratios by the completion length; pass averages to get the same."""
    gen, pc, pr, rc, rr = random_pairs(batch, seed=11)
    completion_mask = random_completion_mask(2 * batch, 12, gen)
    n_chosen, n_rejected = completion_mask.sum(1).float().chunk(2)
    beta = 0.5
    trl_loss, trl_losses, _, _ = trl_dpo(pc, pr, rc, rr, completion_mask, beta, "ipo", 0.0)
    losses, _, _ = dpo_loss(pc / n_chosen, pr / n_rejected, rc / n_chosen, rr / n_rejected, beta, "ipo")
    torch.testing.assert_close(losses, trl_losses, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(losses.mean(), trl_loss, rtol=1e-5, atol=1e-5)


def test_dpo_sigmoid_label_smoothing_is_cdpo_not_trl_dpo():
    """TRL 1.16's DPO ignores label_smoothing for 'sigmoid'; ours is cDPO, equal to TRL CPO's form."""
    gen, pc, pr, rc, rr = random_pairs(6, seed=12)
    completion_mask = random_completion_mask(12, 10, gen)
    _, trl_dpo_losses, _, _ = trl_dpo(pc, pr, rc, rr, completion_mask, 0.1, "sigmoid", 0.1)
    plain, _, _ = dpo_loss(pc, pr, rc, rr, 0.1, "sigmoid", 0.0)
    torch.testing.assert_close(plain, trl_dpo_losses, rtol=1e-5, atol=1e-5)
    smoothed, _, _ = dpo_loss(pc, pr, rc, rr, 0.1, "sigmoid", 0.1)
    zeros = torch.zeros_like(pc)
    trl_cpo_losses, _, _ = trl_cpo(pc - rc, pr - rr, beta=0.1, loss_type="sigmoid", label_smoothing=0.1)
    torch.testing.assert_close(smoothed, trl_cpo_losses, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dpo_loss(pc - rc, pr - rr, zeros, zeros, 0.1, "sigmoid", 0.1)[0], smoothed)


def trl_cpo(chosen, rejected, beta, loss_type, label_smoothing=0.0, simpo_gamma=0.5):
    pytest.importorskip("trl")
    from trl.experimental.cpo import CPOTrainer

    self = types.SimpleNamespace(
        alpha=0.0,
        beta=beta,
        loss_type=loss_type,
        label_smoothing=label_smoothing,
        simpo_gamma=simpo_gamma,
        accelerator=identity_accelerator(),
    )
    return CPOTrainer.cpo_loss(self, chosen, rejected)


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize(
    ("loss_type", "eps"), [("sigmoid", 0.0), ("sigmoid", 0.1), ("hinge", 0.0), ("ipo", 0.0)]
)
def test_cpo_loss_matches_trl(batch, loss_type, eps):
    _, chosen, rejected, _, _ = random_pairs(batch, seed=13)
    beta = 0.2
    trl_losses, trl_chosen, trl_rejected = trl_cpo(chosen, rejected, beta, loss_type, eps)
    losses, chosen_rewards, rejected_rewards = cpo_loss(chosen, rejected, beta, loss_type, eps)
    torch.testing.assert_close(losses, trl_losses, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chosen_rewards, trl_chosen, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rejected_rewards, trl_rejected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_simpo_loss_matches_trl_cpo_simpo(batch, eps):
    gen = torch.Generator().manual_seed(14)
    chosen, rejected = (-(torch.rand(batch, generator=gen) * 3 + 0.05) for _ in range(2))
    beta, ratio = 2.0, 0.3
    # TRL's simpo_gamma is the absolute margin gamma = gamma_beta_ratio * beta.
    trl_losses, trl_chosen, trl_rejected = trl_cpo(
        chosen, rejected, beta, "simpo", eps, simpo_gamma=ratio * beta
    )
    losses, chosen_rewards, rejected_rewards = simpo_loss(chosen, rejected, beta, ratio, eps)
    torch.testing.assert_close(losses, trl_losses, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chosen_rewards, trl_chosen, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rejected_rewards, trl_rejected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 8])
def test_orpo_loss_matches_trl(batch):
    pytest.importorskip("trl")
    from trl.experimental.orpo import ORPOTrainer

    gen = torch.Generator().manual_seed(15)
    chosen, rejected = (-(torch.rand(batch, generator=gen) * 3 + 0.01) for _ in range(2))
    chosen[0] = -0.2  # one on each side of the -log 2 branch point
    beta = 0.25
    self = types.SimpleNamespace(beta=beta, accelerator=identity_accelerator())
    trl_terms, trl_chosen, trl_rejected, trl_ratio_mean, trl_log_odds_mean = ORPOTrainer.odds_ratio_loss(
        self, chosen, rejected
    )
    losses, chosen_rewards, rejected_rewards, log_odds_ratio, log_odds = orpo_loss(chosen, rejected, beta)
    # TRL returns beta * log σ(log_odds) and subtracts it from the NLL; ours is the loss, the negation.
    torch.testing.assert_close(losses, -trl_terms, rtol=1e-5, atol=1e-5)
    nll = torch.tensor(1.7)
    torch.testing.assert_close(nll + losses.mean(), nll - trl_terms.mean(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chosen_rewards, trl_chosen, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rejected_rewards, trl_rejected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(log_odds_ratio.mean(), trl_ratio_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(log_odds.mean(), trl_log_odds_mean, rtol=1e-5, atol=1e-5)


def trl_kto(policy_logps, ref_logps, is_desirable, policy_kl_logps, ref_kl_logps, beta, wd, wu):
    pytest.importorskip("trl")
    from trl import KTOTrainer

    n = policy_logps.shape[0]
    gen = torch.Generator().manual_seed(0)
    completion_mask = random_completion_mask(n, 10, gen)
    self = types.SimpleNamespace(
        model=types.SimpleNamespace(training=False),
        accelerator=identity_accelerator(),
        _compute_kl_logps=lambda model, batch: policy_kl_logps,
        aux_loss_enabled=False,
        precompute_ref_logps=True,
        calculate_KL=True,
        loss_type="kto",
        beta=beta,
        desirable_weight=wd,
        undesirable_weight=wu,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "label": is_desirable,
        "input_ids": torch.zeros(completion_mask.shape, dtype=torch.long),
        "attention_mask": torch.ones_like(completion_mask),
        "completion_mask": completion_mask,
        "ref_logps": ref_logps,
        "ref_KL_logps": ref_kl_logps,
    }
    model = fake_lm(spread_over_tokens(policy_logps, completion_mask))
    loss, local = call_capturing_locals(KTOTrainer._compute_loss, self, model, inputs, return_outputs=False)
    return loss, local["losses"], local["chosen_rewards"], local["rejected_rewards"], local["kl"]


@pytest.mark.parametrize(
    "labels",
    [
        [True, False, False, True, True, False, True, False],
        [True, True, True],
        [False, False],
        [True],
        [False],
    ],
)
@pytest.mark.parametrize("kl_shift", [-1.0, 0.0, 3.0])  # KL estimate clamped to 0, near 0, clearly positive
def test_kto_loss_matches_trl(labels, kl_shift):
    gen = torch.Generator().manual_seed(16)
    n = len(labels)
    is_desirable = torch.tensor(labels)
    policy_logps, ref_logps = (-(torch.rand(n, generator=gen) * 40 + 1) for _ in range(2))
    ref_kl_logps = -(torch.rand(n, generator=gen) * 40 + 1)
    policy_kl_logps = ref_kl_logps + (torch.rand(n, generator=gen) * 2 - 1) + kl_shift
    beta, wd, wu = 0.1, 1.0, 1.33
    trl_loss, trl_losses, trl_chosen, trl_rejected, trl_kl = trl_kto(
        policy_logps, ref_logps, is_desirable, policy_kl_logps, ref_kl_logps, beta, wd, wu
    )
    losses, chosen_rewards, rejected_rewards, kl = kto_loss(
        policy_logps[is_desirable],
        policy_logps[~is_desirable],
        policy_kl_logps,
        ref_logps[is_desirable],
        ref_logps[~is_desirable],
        ref_kl_logps,
        beta,
        wd,
        wu,
    )
    torch.testing.assert_close(losses, trl_losses, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(losses.mean(), trl_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chosen_rewards, trl_chosen.reshape(chosen_rewards.shape), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        rejected_rewards, trl_rejected.reshape(rejected_rewards.shape), rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(kl, trl_kl, rtol=1e-5, atol=1e-5)
    if kl_shift > 0:
        assert kl.item() > 1.0
    # The same with the KL passed pre-reduced, as a multi-process caller would.
    pre_reduced = kto_loss(
        policy_logps[is_desirable],
        policy_logps[~is_desirable],
        None,
        ref_logps[is_desirable],
        ref_logps[~is_desirable],
        None,
        beta,
        wd,
        wu,
        kl=(policy_kl_logps - ref_kl_logps).mean(),
    )[0]
    torch.testing.assert_close(pre_reduced, trl_losses, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_margin", [False, True])
@pytest.mark.parametrize("batch", [1, 8])
def test_bradley_terry_loss_matches_trl_reward_trainer(with_margin, batch):
    pytest.importorskip("trl")
    from trl import RewardTrainer

    gen = torch.Generator().manual_seed(17)
    chosen, rejected = (torch.randn(batch, generator=gen) * 3 for _ in range(2))
    margin = torch.rand(batch, generator=gen) if with_margin else None
    self = types.SimpleNamespace(
        model=types.SimpleNamespace(training=False),
        accelerator=identity_accelerator(),
        args=types.SimpleNamespace(center_rewards_coefficient=None),
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros(2 * batch, 4, dtype=torch.long),
        "attention_mask": torch.ones(2 * batch, 4),
    }
    if with_margin:
        inputs["margin"] = margin

    def model(**kwargs):
        return types.SimpleNamespace(logits=torch.cat([chosen, rejected]).unsqueeze(-1))

    trl_loss = RewardTrainer.compute_loss(self, model, inputs)
    torch.testing.assert_close(
        bradley_terry_loss(chosen, rejected, margin).mean(), trl_loss, rtol=1e-5, atol=1e-5
    )
