"""Forwards that compute logits only where needed: response log-probs equal an unpadded full forward."""

from __future__ import annotations

import pytest
import torch

from alignkit.forward import response_forward, score_rollout
from alignkit.rollout import RolloutBatch, build_rollout
from alignkit.testing import tiny_llama, tiny_tokenizer


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run thousands of small ops: one thread is faster, and on a busy machine OpenMP threads
    waiting for each other make a step ~100x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_llama(tok).eval()


def _rollout(tok):
    prompts = [tok("the cat sat on", add_special_tokens=False)["input_ids"],
               tok("a dog", add_special_tokens=False)["input_ids"],
               tok("what is the capital of france please", add_special_tokens=False)["input_ids"]]
    responses = [tok(" the mat", add_special_tokens=False)["input_ids"] + [tok.eos_token_id],
                 tok(" ran under the big blue tree and", add_special_tokens=False)["input_ids"],
                 tok(" paris", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    return build_rollout(prompts, responses, torch.arange(3), [tok.eos_token_id], tok.pad_token_id, tok)


def _reference_logps(model, prompt: list[int], response: list[int], temperature: float) -> torch.Tensor:
    """log p(response_t | prompt, response_<t) from an unpadded full forward and a full log-softmax."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1:-1] / temperature
    return logits.log_softmax(-1).gather(-1, torch.tensor(response)[:, None]).squeeze(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_response_logps_match_an_unpadded_full_forward(tok, model, temperature):
    rollout = _rollout(tok)
    batch = RolloutBatch.from_rollout(rollout)
    with torch.no_grad():
        out = response_forward(model, batch, temperature, entropy=True)
    for i in range(3):
        n = int(rollout.response_mask[i].sum())
        prompt = rollout.prompt_ids[i][rollout.prompt_mask[i].bool()].tolist()
        expected = _reference_logps(model, prompt, rollout.response_ids[i, :n].tolist(), temperature)
        torch.testing.assert_close(out.logps[i, :n], expected, rtol=1e-4, atol=1e-5)
        assert (out.logps[i, n:] == 0).all() and (out.entropy[i, n:] == 0).all()
        assert (out.entropy[i, :n] > 0).all()


def test_trimmed_micro_batches_give_the_same_logps(tok, model):
    batch = RolloutBatch.from_rollout(_rollout(tok))
    whole = score_rollout(model, batch, 1.0, micro_batch_size=3).logps
    in_ones = score_rollout(model, batch, 1.0, micro_batch_size=1).logps
    torch.testing.assert_close(whole, in_ones, rtol=1e-4, atol=1e-5)
    part = batch.select(torch.tensor([0, 2]))  # short prompt + long one, two short responses
    assert part.response_width == int(batch.response_mask[[0, 2]].sum(1).max()) < batch.response_width
    assert part.input_ids.shape[1] < batch.input_ids.shape[1]


def test_score_rollout_restores_train_mode(tok):
    m = tiny_llama(tok).train()
    score_rollout(m, RolloutBatch.from_rollout(_rollout(tok)), 1.0, micro_batch_size=2)
    assert m.training
