"""The supervised objective in every batch layout, and length-grouped data order (replayable)."""

from __future__ import annotations

import pytest
import torch

from alignkit.data import pack_sft
from alignkit.forward import BatchLayout
from alignkit.testing import tiny_llama, tiny_tokenizer
from alignkit.training.batches import BatchStream, row_tokens
from alignkit.training.supervised import SFTMethod


def _examples(n: int = 6, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        P, C = 2 + i % 3, 3 + (2 * i) % 5
        ids = torch.randint(3, 500, (P + C,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * P + ids[P:]})
    return out


def _loss_and_grads(model, method: SFTMethod, rows: list[dict]):
    model.zero_grad()
    batch = method.collate(rows)
    loss, _ = method.loss(model, batch)
    loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()]), method.count_items(batch)


@pytest.mark.parametrize("completion_only_loss", [True, False])
def test_sft_loss_and_gradients_are_the_same_in_every_layout(completion_only_loss):
    tok = tiny_tokenizer()
    model = tiny_llama(tok)
    rows = _examples()
    pad = tok.pad_token_id
    expected = _loss_and_grads(model, SFTMethod(pad, completion_only_loss, chunked=False), rows)
    for layout in (BatchLayout(), BatchLayout(packed=True), BatchLayout(packed=True, one_row=True)):
        for chunked in (False, True):
            loss, grads, items = _loss_and_grads(model, SFTMethod(pad, completion_only_loss, layout=layout,
                                                                  chunked=chunked), rows)
            torch.testing.assert_close(loss, expected[0], rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(grads, expected[1], rtol=1e-4, atol=1e-5)
            assert items == expected[2]
    # pack_sft rows (positions restart inside a row) give the per-example loss too: no token is trained to
    # predict the first token of the next example, also when every token is a target
    packed_rows = pack_sft(rows, max_length=24)
    assert len(packed_rows) < len(rows)
    loss, grads, items = _loss_and_grads(model, SFTMethod(pad, completion_only_loss), packed_rows)
    assert items == expected[2]
    torch.testing.assert_close(loss, expected[0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grads, expected[1], rtol=1e-4, atol=1e-5)


def _rows(n: int) -> list[dict]:
    return [{"prompt_ids": [1] * (i % 7), "chosen_ids": [2] * (3 * i % 11), "rejected_ids": [3]} for i in range(n)]


def test_length_grouping_is_a_replayable_function_of_seed_and_epoch():
    rows = _rows(203)
    plain = BatchStream(rows, list, batch_size=4, world=2, rank=0, seed=3)
    grouped = [BatchStream(rows, list, batch_size=4, world=2, rank=r, seed=3, group_by_length=True) for r in range(2)]
    again = BatchStream(rows, list, batch_size=4, world=2, rank=0, seed=3, group_by_length=True)
    for epoch in (0, 1):
        mine = grouped[0].epoch_batches(epoch)
        assert mine == again.epoch_batches(epoch)  # a function of (seed, epoch) only
        assert len(mine) == plain.batches_per_epoch == 203 // 8
        both = [i for r in range(2) for b in grouped[r].epoch_batches(epoch) for i in b]
        assert len(set(both)) == len(both)  # no row twice, the same count as without grouping
        # global batches hold rows of similar length: far less spread than a random order
        spread = [max(row_tokens(rows[i]) for i in g) - min(row_tokens(rows[i]) for i in g)
                  for g in (a + b for a, b in zip(grouped[0].epoch_batches(epoch), grouped[1].epoch_batches(epoch)))]
        random_spread = [max(row_tokens(rows[i]) for i in b) - min(row_tokens(rows[i]) for i in b)
                         for b in plain.epoch_batches(epoch)]
        assert sum(spread) < 0.5 * sum(random_spread)
    assert grouped[0].epoch_batches(0) != grouped[0].epoch_batches(1)
    # resume: micro-batch n of a fresh stream is micro-batch n of the uninterrupted one
    resumed = BatchStream(rows, list, batch_size=4, world=2, rank=0, seed=3, group_by_length=True).iterate(30)
    uninterrupted = again.iterate(0)
    for _ in range(30):
        next(uninterrupted)
    for _ in range(5):
        assert next(resumed) == next(uninterrupted)
