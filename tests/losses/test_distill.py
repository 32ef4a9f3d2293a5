"""Distillation losses: hand-computed values, limits of GJSD, and parity with TRL's GKD loss."""

from __future__ import annotations

import math

import pytest
import torch

from alignkit.losses.distill import forward_kl, generalized_jsd_loss, reverse_kl


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def logits_of(*rows):
    """Logits (log-probabilities) of a [1, len(rows), V] batch from probability rows."""
    return torch.tensor([[[math.log(x) for x in row] for row in rows]], dtype=torch.float64)


def random_logits(seed, shape=(3, 5, 11)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * 2


def test_gjsd_two_token_vocab_by_hand():
    p_teacher, p_student = [0.8, 0.2], [0.4, 0.6]
    student, teacher = logits_of(p_student), logits_of(p_teacher)
    for beta in (0.5, 0.3):
        m = [beta * t + (1 - beta) * s for t, s in zip(p_teacher, p_student)]
        expected = beta * kl(p_teacher, m) + (1 - beta) * kl(p_student, m)
        assert generalized_jsd_loss(student, teacher, beta=beta).item() == pytest.approx(expected, abs=1e-12)
    # beta = 0.5 is the symmetric Jensen-Shannon divergence
    assert generalized_jsd_loss(student, teacher, beta=0.5).item() == pytest.approx(
        generalized_jsd_loss(teacher, student, beta=0.5).item(), abs=1e-12
    )
    m = [0.6, 0.4]
    by_hand = 0.5 * (0.8 * math.log(0.8 / 0.6) + 0.2 * math.log(0.2 / 0.4)) + 0.5 * (
        0.4 * math.log(0.4 / 0.6) + 0.6 * math.log(0.6 / 0.4)
    )
    assert by_hand == pytest.approx(0.5 * kl(p_teacher, m) + 0.5 * kl(p_student, m))
    assert generalized_jsd_loss(student, teacher, beta=0.5).item() == pytest.approx(by_hand, abs=1e-12)


def test_gjsd_endpoints_are_forward_and_reverse_kl():
    p_teacher, p_student = [0.8, 0.2], [0.4, 0.6]
    student, teacher = logits_of(p_student), logits_of(p_teacher)
    assert generalized_jsd_loss(student, teacher, beta=0.0).item() == pytest.approx(kl(p_teacher, p_student))
    assert generalized_jsd_loss(student, teacher, beta=1.0).item() == pytest.approx(kl(p_student, p_teacher))

    student, teacher = random_logits(0), random_logits(1)
    labels = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(2))
    labels[0, :2] = -100
    labels[2, 4] = -100
    mask = labels != -100
    torch.testing.assert_close(
        generalized_jsd_loss(student, teacher, labels, beta=0.0), forward_kl(student, teacher, mask)
    )
    torch.testing.assert_close(
        generalized_jsd_loss(student, teacher, labels, beta=1.0), reverse_kl(student, teacher, mask)
    )


def test_gjsd_masks_ignored_positions_and_applies_temperature():
    p_teacher, p_student = [0.8, 0.2], [0.4, 0.6]
    student = logits_of(p_student, [0.99, 0.01])
    teacher = logits_of(p_teacher, [0.01, 0.99])  # very different at the ignored position
    labels = torch.tensor([[1, -100]])
    m = [0.6, 0.4]
    expected = 0.5 * kl(p_teacher, m) + 0.5 * kl(p_student, m)
    assert generalized_jsd_loss(student, teacher, labels).item() == pytest.approx(expected, abs=1e-12)
    float_mask = torch.tensor([[1.0, 0.0]])
    assert generalized_jsd_loss(student, teacher, float_mask).item() == pytest.approx(expected, abs=1e-12)

    # temperature 2 on log-probabilities: p_tau proportional to p^(1/2)
    def soften(p):
        z = sum(math.sqrt(x) for x in p)
        return [math.sqrt(x) / z for x in p]

    pt, ps = soften(p_teacher), soften(p_student)
    m = [0.5 * a + 0.5 * b for a, b in zip(pt, ps)]
    expected = 0.5 * kl(pt, m) + 0.5 * kl(ps, m)
    got = generalized_jsd_loss(student, teacher, labels, temperature=2.0)
    assert got.item() == pytest.approx(expected, abs=1e-12)


def test_forward_and_reverse_kl_by_hand_with_temperature_scaling():
    p_teacher, p_student = [0.8, 0.2], [0.4, 0.6]
    q_teacher, q_student = [0.5, 0.5], [0.1, 0.9]
    student = logits_of(p_student, q_student, [0.3, 0.7])
    teacher = logits_of(p_teacher, q_teacher, [0.9, 0.1])
    mask = torch.tensor([[1, 1, 0]])
    forward = (kl(p_teacher, p_student) + kl(q_teacher, q_student)) / 2
    reverse = (kl(p_student, p_teacher) + kl(q_student, q_teacher)) / 2
    assert forward_kl(student, teacher, mask).item() == pytest.approx(forward, abs=1e-12)
    assert reverse_kl(student, teacher, mask).item() == pytest.approx(reverse, abs=1e-12)
    tau = 3.0
    scaled = forward_kl(student, teacher, mask, temperature=tau, scale_by_temperature_sq=True)
    unscaled = forward_kl(student, teacher, mask, temperature=tau)
    assert scaled.item() == pytest.approx(tau**2 * unscaled.item(), abs=1e-12)
    assert forward_kl(student, student, mask).item() == pytest.approx(0.0, abs=1e-12)


def test_distill_rejects_mismatched_vocab():
    with pytest.raises(ValueError, match="shared vocabulary"):
        generalized_jsd_loss(torch.zeros(1, 2, 5), torch.zeros(1, 2, 6))
    with pytest.raises(ValueError, match="forward_kl"):
        forward_kl(torch.zeros(1, 2, 5), torch.zeros(1, 2, 6))


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_gjsd_matches_trl(beta, temperature):
    pytest.importorskip("trl")
    gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer")
    trl_loss = gkd.GKDTrainer.generalized_jsd_loss

    student = random_logits(10, (3, 5, 11)).float()
    teacher = random_logits(11, (3, 5, 11)).float()
    labels = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(12))
    labels[0, :3] = -100
    labels[1, 4] = -100
    for reduction in ("batchmean", "sum", "mean", "none"):
        for lab in (labels, None):
            ours = generalized_jsd_loss(student, teacher, lab, beta, temperature, reduction)
            theirs = trl_loss(student, teacher, lab, beta=beta, temperature=temperature, reduction=reduction)
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    ours = generalized_jsd_loss(student, teacher, labels, beta, temperature, num_items_in_batch=7)
    theirs = trl_loss(student, teacher, labels, beta=beta, temperature=temperature, num_items_in_batch=7)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)

    # gradients agree too
    s1, s2 = student.clone().requires_grad_(), student.clone().requires_grad_()
    generalized_jsd_loss(s1, teacher, labels, beta, temperature).backward()
    trl_loss(s2, teacher, labels, beta=beta, temperature=temperature).backward()
    torch.testing.assert_close(s1.grad, s2.grad, atol=1e-5, rtol=1e-5)
