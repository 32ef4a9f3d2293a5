"""Rollout forwards without padding: packed rows give the padded log-probs, entropies, values and gradients."""

from __future__ import annotations

import pytest
import torch

from alignkit.forward import BatchLayout, choose_layout, response_forward, score_rollout
from alignkit.rollout import RolloutBatch, build_rollout
from alignkit.testing import tiny_llama, tiny_tokenizer

PACKED = BatchLayout(packed=True, attention_cost=0.05)  # attention costly: several narrow rows
ONE_ROW = BatchLayout(packed=True, one_row=True)  # every sequence of the micro-batch in one row


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _rollout(tok, seed: int = 0, multi_turn: bool = False):
    """Six rows: prompts of 2 to 9 tokens, responses of 1 to 60 (some ended by eos, some cut)."""
    g = torch.Generator().manual_seed(seed)
    vocab = len(tok)
    prompt_lengths, response_lengths = [2, 9, 4, 7, 3, 5], [60, 1, 23, 3, 41, 8]
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in prompt_lengths]
    responses = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in response_lengths]
    for r in responses[1::2]:
        r.append(tok.eos_token_id)
    rollout = build_rollout(prompts, responses, torch.arange(6), [tok.eos_token_id], tok.pad_token_id, tok)
    if multi_turn:  # environment tokens inside the responses: attended to, never trained on
        action = rollout.response_mask.clone()
        action[0, 10:25] = 0
        action[4, 5:9] = 0
        action[2, 0:4] = 0
        rollout.action_mask = action
    return rollout


def _grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def _run(model, batch, layout, **kwargs):
    model.zero_grad()
    out = response_forward(model, batch, 0.7, entropy=True, entropy_grad=True, layout=layout, **kwargs)
    mask = batch.loss_mask.float()
    weights = torch.linspace(-1.0, 2.0, mask.numel()).view(mask.shape)  # a different gradient per token
    loss = ((out.logps * weights + 0.3 * out.entropy) * mask).sum()
    if out.values is not None:
        loss = loss + ((out.values - 1.0) ** 2 * mask).sum()
    loss.backward()
    return out, _grads(model)


def _assert_same(tested, expected, mask, what: str):
    (out, grads), (ref, ref_grads) = tested, expected
    m = mask.bool()
    torch.testing.assert_close(out.logps[m], ref.logps[m], rtol=1e-5, atol=1e-5, msg=f"{what}: logps")
    torch.testing.assert_close(out.entropy[m], ref.entropy[m], rtol=1e-5, atol=1e-5, msg=f"{what}: entropy")
    if ref.values is not None:
        torch.testing.assert_close(out.values[m], ref.values[m], rtol=1e-5, atol=1e-5, msg=f"{what}: values")
    torch.testing.assert_close(grads, ref_grads, rtol=1e-4, atol=2e-5, msg=f"{what}: gradients")


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("chunked", [True, False])
def test_packed_rollouts_give_the_padded_logps_entropies_and_gradients(tok, attention, chunked):
    model = tiny_llama(tok)
    model.config._attn_implementation = attention
    batch = RolloutBatch.from_rollout(_rollout(tok))
    padded = _run(model, batch, None, chunked=chunked)
    for layout in (PACKED, ONE_ROW):
        _assert_same(_run(model, batch, layout, chunked=chunked), padded, batch.response_mask,
                     f"{attention} chunked={chunked} one_row={layout.one_row}")


def test_packed_rows_hold_no_padding_inside_and_restart_positions(tok):
    batch = RolloutBatch.from_rollout(_rollout(tok))
    lengths = batch.attention_mask.sum(1).tolist()
    packed = batch.packed(ONE_ROW.rows(lengths))
    assert packed.input_ids.shape == (1, sum(lengths))  # no pad token computed at all
    assert int((packed.position_ids == 0).sum()) == len(batch)  # one restart per sequence
    assert torch.equal(packed.input_ids.view(-1)[packed.slots[packed.slots >= 0]],
                       batch.input_ids[batch.attention_mask.bool()])
    rows = PACKED.rows(lengths)
    wide = batch.packed(rows)
    assert len(rows) > 1 and sorted(i for row in rows for i in row) == list(range(len(batch)))
    assert wide.input_ids.shape[1] <= batch.input_ids.shape[1]  # never wider than the padded batch
    assert wide.input_ids.numel() < batch.input_ids.numel()


def test_multi_turn_masks_train_the_same_tokens_packed(tok):
    model = tiny_llama(tok)
    batch = RolloutBatch.from_rollout(_rollout(tok, seed=1, multi_turn=True))
    assert float(batch.loss_mask.sum()) < float(batch.response_mask.sum())
    padded = _run(model, batch, None)
    for layout in (PACKED, ONE_ROW):
        _assert_same(_run(model, batch, layout), padded, batch.loss_mask, f"multi-turn one_row={layout.one_row}")


def _policy_and_critic(tok):
    from transformers import LlamaForSequenceClassification

    from alignkit.critic import PolicyAndCritic

    policy = tiny_llama(tok)
    torch.manual_seed(1)
    critic = LlamaForSequenceClassification(policy.config.__class__(**{**policy.config.to_dict(), "num_labels": 1}))
    return PolicyAndCritic(policy, critic)


def test_ppo_critic_values_and_gradients_are_the_padded_ones_packed(tok):
    model = _policy_and_critic(tok)
    batch = RolloutBatch.from_rollout(_rollout(tok, seed=2))
    padded = _run(model, batch, None, values=True)
    assert padded[0].values is not None
    for layout in (PACKED, ONE_ROW):
        _assert_same(_run(model, batch, layout, values=True), padded, batch.response_mask,
                     f"critic one_row={layout.one_row}")


def test_score_rollout_in_packed_micro_batches_equals_padded(tok):
    model = _policy_and_critic(tok)
    batch = RolloutBatch.from_rollout(_rollout(tok, seed=3, multi_turn=True))
    padded = score_rollout(model, batch, 1.0, 4, entropy=True, values=True)
    packed = score_rollout(model, batch, 1.0, 4, entropy=True, values=True, layout=choose_layout(
        model, padding_free=True))
    m = batch.response_mask.bool()
    assert packed.logps.shape == padded.logps.shape == batch.response_mask.shape
    for name in ("logps", "entropy", "values"):
        torch.testing.assert_close(getattr(packed, name)[m], getattr(padded, name)[m], rtol=1e-5, atol=1e-5)


def test_a_reference_that_cannot_pack_runs_padded(tok, monkeypatch, caplog):
    import alignkit.forward as forward
    from alignkit.reference import Reference

    ref_model = tiny_llama(tok)
    monkeypatch.setattr(forward, "exact_layouts", lambda *a, **k: {"packed": False, "one_row": False,
                                                                    "shared_prompt": False})
    reference = Reference(ref_model)
    assert reference.layout_for(ref_model, PACKED).packed is False
    assert reference.layout_for(ref_model, None) is None
    policy = tiny_llama(tok)
    assert reference.layout_for(policy, PACKED) is PACKED  # the adapter-off policy: the policy's own layout
