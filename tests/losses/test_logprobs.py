"""Token and sequence log-probabilities: hand-computed values, the naive log_softmax+gather, and TRL."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from alignkit.losses.logprobs import selective_log_softmax, sequence_logps, token_logps


def naive_logps(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return logits.log_softmax(-1).gather(-1, index.unsqueeze(-1)).squeeze(-1)


def test_selective_log_softmax_hand_computed():
    rows = [[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [-1.0, 5.0, 0.5]]
    picks = [2, 1, 0]
    expected = [row[i] - math.log(sum(math.exp(z) for z in row)) for row, i in zip(rows, picks)]
    got = selective_log_softmax(torch.tensor(rows, dtype=torch.float64), torch.tensor(picks))
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)
    # uniform row: log(1/3)
    assert got[1].item() == pytest.approx(-math.log(3), abs=1e-12)


@pytest.mark.parametrize("chunk_rows", [None, 1, 3, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_selective_log_softmax_matches_log_softmax_gather(chunk_rows, dtype):
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 7, 33, generator=gen) * 4).to(dtype)
    index = torch.randint(0, 33, (3, 7), generator=gen)
    got = selective_log_softmax(logits, index, chunk_rows=chunk_rows)
    assert got.dtype == dtype and got.shape == (3, 7)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got, naive_logps(logits, index), rtol=tol, atol=tol)


@pytest.mark.parametrize("shape", [(33,), (5, 33), (2, 3, 4, 33)])
def test_selective_log_softmax_any_leading_shape(shape):
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(*shape, generator=gen, dtype=torch.float64)
    index = torch.randint(0, 33, shape[:-1], generator=gen)
    got = selective_log_softmax(logits, index, chunk_rows=2)
    torch.testing.assert_close(got, naive_logps(logits, index), rtol=1e-12, atol=1e-12)


def test_selective_log_softmax_gradient_matches_and_gradchecks():
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(2, 6, 9, generator=gen, dtype=torch.float64)
    index = torch.randint(0, 9, (2, 5), generator=gen)
    weights = torch.randn(2, 5, generator=gen, dtype=torch.float64)

    ours = base.clone().requires_grad_()
    (selective_log_softmax(ours[:, :-1], index, chunk_rows=2) * weights).sum().backward()
    ref = base.clone().requires_grad_()
    (naive_logps(ref[:, :-1], index) * weights).sum().backward()
    torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-12, atol=1e-12)

    x = base[:, :-1].clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda z: selective_log_softmax(z, index, chunk_rows=3), (x,))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_selective_log_softmax_half_precision_upcasts_per_chunk(dtype):
    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(2, 9, 40, generator=gen) * 6).to(dtype)
    index = torch.randint(0, 40, (2, 8), generator=gen)
    got = selective_log_softmax(logits[:, :-1], index, chunk_rows=4)
    assert got.dtype == torch.float32
    # Same as the float32 log-softmax of the (already rounded) half-precision logits.
    expected = naive_logps(logits[:, :-1].float(), index)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    leaf = logits.clone().requires_grad_()
    selective_log_softmax(leaf[:, :-1], index).sum().backward()
    assert leaf.grad.dtype == dtype
    ref = logits.float().requires_grad_()
    naive_logps(ref[:, :-1], index).sum().backward()
    torch.testing.assert_close(leaf.grad.float(), ref.grad, rtol=0, atol=4e-3)  # grads rounded to half


def test_selective_log_softmax_large_logits_stay_finite():
    logits = torch.tensor([[1e4, 0.0, -1e4], [-3e4, -3e4, -3e4]])
    got = selective_log_softmax(logits, torch.tensor([1, 2]))
    torch.testing.assert_close(got, torch.tensor([-1e4, -math.log(3)]))


def test_selective_log_softmax_rejects_mismatched_index():
    with pytest.raises(ValueError, match=r"logits.shape\[:-1\]"):
        selective_log_softmax(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))


def test_token_logps_masks_positions_and_their_gradient():
    logits = torch.tensor([[[0.0, 1.0], [2.0, 0.0], [0.5, 0.5]]], dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([[1, -100, 0]])
    got = token_logps(logits, targets)
    lse0 = math.log(math.exp(0.0) + math.exp(1.0))
    torch.testing.assert_close(got, torch.tensor([[1.0 - lse0, 0.0, -math.log(2)]], dtype=torch.float64))
    got.sum().backward()
    assert torch.all(logits.grad[0, 1] == 0)

    # An explicit mask wins over ignore_index; masked targets may hold any id.
    masked = token_logps(logits.detach(), torch.tensor([[1, 0, 0]]), mask=torch.tensor([[1, 1, 0]]))
    lse1 = math.log(math.exp(2.0) + 1.0)
    torch.testing.assert_close(masked, torch.tensor([[1.0 - lse0, 2.0 - lse1, 0.0]], dtype=torch.float64))


def test_sequence_logps_shifts_labels_hand_computed():
    # Position t predicts label t+1: rows 0 and 1 of the logits score labels[1] and labels[2].
    rows = [[0.0, 1.0, 2.0], [3.0, 0.0, 0.0], [9.0, 9.0, 9.0]]
    logits = torch.tensor([rows, rows], dtype=torch.float64)
    labels = torch.tensor([[-100, 2, 0], [-100, -100, 1]])

    def lp(row, i):
        return row[i] - math.log(sum(math.exp(z) for z in row))

    sums, counts = sequence_logps(logits, labels)
    torch.testing.assert_close(
        sums, torch.tensor([lp(rows[0], 2) + lp(rows[1], 0), lp(rows[1], 1)], dtype=torch.float64)
    )
    assert counts.tolist() == [2, 1]
    # The last position's logits never count (nothing follows it).
    logits2 = logits.clone()
    logits2[:, -1] = -50.0
    torch.testing.assert_close(sequence_logps(logits2, labels)[0], sums)


def test_sequence_logps_all_masked_row_is_zero():
    logits = torch.randn(2, 4, 6)
    labels = torch.tensor([[-100] * 4, [1, 2, 3, 4]])
    sums, counts = sequence_logps(logits, labels)
    assert sums[0].item() == 0.0 and counts[0].item() == 0
    assert counts[1].item() == 3


def test_sequence_logps_rejects_shifted_labels():
    with pytest.raises(ValueError, match="unshifted labels"):
        sequence_logps(torch.zeros(2, 5, 7), torch.zeros(2, 4, dtype=torch.long))


def test_token_mean_nll_recipe_equals_cross_entropy():
    """The NLL recipe in the docstrings equals the shifted CrossEntropyLoss TRL's CPO/ORPO use."""
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 8, 20, generator=gen)
    labels = torch.randint(0, 20, (3, 8), generator=gen)
    labels[0, :3] = -100
    labels[2, 5:] = -100
    sums, counts = sequence_logps(logits, labels)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 20), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(-sums.sum() / counts.sum(), expected)


# --- parity with TRL 1.16 -------------------------------------------------------------------------


def test_selective_log_softmax_matches_trl():
    pytest.importorskip("trl")
    from trl.trainer.utils import selective_log_softmax as trl_selective_log_softmax

    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 10, 50, generator=gen) * 3
    index = torch.randint(0, 50, (4, 10), generator=gen)
    torch.testing.assert_close(
        selective_log_softmax(logits, index), trl_selective_log_softmax(logits, index), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("trainer", ["cpo", "orpo"])
@pytest.mark.parametrize("average", [False, True])
def test_sequence_logps_matches_trl_get_batch_logps(trainer, average):
    pytest.importorskip("trl")
    if trainer == "cpo":
        from trl.experimental.cpo import CPOTrainer as Trainer
    else:
        from trl.experimental.orpo import ORPOTrainer as Trainer

    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(5, 12, 30, generator=gen) * 2
    labels = torch.randint(0, 30, (5, 12), generator=gen)
    for row, prompt_len in enumerate([1, 3, 6, 11, 2]):
        labels[row, :prompt_len] = -100
    labels[4, 9:] = -100  # right padding
    sums, counts = sequence_logps(logits, labels)
    ours = sums / counts.clamp(min=1) if average else sums
    theirs = Trainer.get_batch_logps(logits, labels.clone(), average_log_prob=average)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# linear_logps: the LM head and the log-softmax gather, chunk by chunk
# --------------------------------------------------------------------------------------------------

from alignkit.losses.logprobs import linear_logps  # noqa: E402


def _naive_linear(hidden, weight, bias, targets, scale):
    z = scale * F.linear(hidden, weight, bias)
    return z.log_softmax(-1).gather(-1, targets[:, None])[:, 0], -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)


@pytest.mark.parametrize("frozen_head", [False, True])  # a frozen head takes the gradient-in-forward path
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("scale", [1.0, 1 / 0.7])
@pytest.mark.parametrize("chunk_rows", [1, 4, None])
def test_linear_logps_values_and_gradients_match_full_logits(frozen_head, bias, scale, chunk_rows):
    gen = torch.Generator().manual_seed(3)
    N, H, V = 13, 8, 37
    h0, w0 = torch.randn(N, H, generator=gen, dtype=torch.float64), torch.randn(V, H, generator=gen, dtype=torch.float64)
    b0 = torch.randn(V, generator=gen, dtype=torch.float64) if bias else None
    targets = torch.randint(0, V, (N,), generator=gen)
    g_logp, g_ent = torch.randn(N, generator=gen, dtype=torch.float64), torch.randn(N, generator=gen, dtype=torch.float64)

    def leaves():
        return (h0.clone().requires_grad_(), w0.clone().requires_grad_(not frozen_head),
                None if b0 is None else b0.clone().requires_grad_(not frozen_head))

    h, w, b = leaves()
    logps, ent, mean = linear_logps(h, w, targets, b, scale=scale, entropy=True, chunk_rows=chunk_rows)
    ((logps * g_logp).sum() + (ent * g_ent).sum()).backward()
    h2, w2, b2 = leaves()
    logps2, ent2 = _naive_linear(h2, w2, b2, targets, scale)
    ((logps2 * g_logp).sum() + (ent2 * g_ent).sum()).backward()
    tight = {"rtol": 1e-10, "atol": 1e-10}
    torch.testing.assert_close(logps, logps2, **tight)
    torch.testing.assert_close(ent, ent2, **tight)
    torch.testing.assert_close(mean, F.linear(h0, w0, b0).mean(-1), **tight)
    assert not mean.requires_grad
    torch.testing.assert_close(h.grad, h2.grad, **tight)
    if not frozen_head:
        torch.testing.assert_close(w.grad, w2.grad, **tight)
        if bias:
            torch.testing.assert_close(b.grad, b2.grad, **tight)


def test_linear_logps_gradchecks_and_detaches_entropy_on_request():
    gen = torch.Generator().manual_seed(4)
    h = torch.randn(5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(11, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 11, (5,), generator=gen)

    def f(h, w, b):
        logps, ent, _ = linear_logps(h, w, t, b, scale=1.3, entropy=True, chunk_rows=2)
        return logps.sum() + 0.5 * ent.sum()

    assert torch.autograd.gradcheck(f, (h, w, b))
    _, ent, _ = linear_logps(h, w, t, b, entropy=True, entropy_grad=False)
    assert not ent.requires_grad
    assert linear_logps(h, w, t, b)[1] is None


def test_linear_logps_float32_and_bfloat16_matmuls():
    gen = torch.Generator().manual_seed(5)
    h, w = torch.randn(40, 16, generator=gen), torch.randn(300, 16, generator=gen) * 0.5
    t = torch.randint(0, 300, (40,), generator=gen)
    exact = _naive_linear(h.double(), w.double(), None, t, 1.0)[0]
    logps = linear_logps(h, w, t, chunk_rows=7)[0]
    assert logps.dtype == torch.float32
    torch.testing.assert_close(logps.double(), exact, rtol=1e-5, atol=1e-5)
    # bf16 matmuls (what autocast gives the LM head), float32 log-softmax: bf16 rounding of the logits only
    bf16 = linear_logps(h, w, t, matmul_dtype=torch.bfloat16)[0]
    expected = F.linear(h.bfloat16(), w.bfloat16()).float().log_softmax(-1).gather(-1, t[:, None])[:, 0]
    torch.testing.assert_close(bf16, expected, rtol=1e-5, atol=1e-5)


def test_linear_logps_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match=r"must be \[N, H\], \[V, H\] and \[N\]"):
        linear_logps(torch.zeros(3, 4), torch.zeros(5, 3), torch.zeros(3, dtype=torch.long))
