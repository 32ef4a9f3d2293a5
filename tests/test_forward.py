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


# --------------------------------------------------------------------------------------------------
# Offline batches: padded, packed (padding-free), shared prompt; chunked and full LM head
# --------------------------------------------------------------------------------------------------

from alignkit.data.tokenize import packed_sequences, padded_sequences, shared_prompt_pairs  # noqa: E402
from alignkit.forward import (  # noqa: E402
    BatchLayout,
    batch_logps,
    completion_logps,
    exact_layouts,
    sequence_scores,
)

# (prompt, chosen, rejected) lengths: different prompts, an empty prompt, a one-token completion
PAIR_LENGTHS = [(3, 5, 2), (7, 1, 6), (1, 4, 4), (0, 3, 2)]


def _pairs(vocab: int, seed: int = 0) -> list[tuple[list[int], list[int], list[int]]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for P, C, R in PAIR_LENGTHS:
        ids = torch.randint(3, vocab, (P + C + R,), generator=g).tolist()
        out.append((ids[:P], ids[P:P + C], ids[P + C:]))
    return out


def _sequences(pairs):
    seqs = [p + c for p, c, _ in pairs] + [p + r for p, _, r in pairs]
    labels = [[-100] * len(p) + c for p, c, _ in pairs] + [[-100] * len(p) + r for p, _, r in pairs]
    return seqs, labels


def _layouts(pairs) -> dict[str, dict]:
    seqs, labels = _sequences(pairs)
    return {"padded": padded_sequences(seqs, labels, 0),
            "packed": packed_sequences(seqs, labels, 0),
            "one_row": packed_sequences(seqs, labels, 0, row_width=10**6),
            "shared_prompt": shared_prompt_pairs(pairs, 0),
            "shared_prompt_one_row": shared_prompt_pairs(pairs, 0, row_width=10**6)}


def _unpadded_logps(model, pairs) -> torch.Tensor:
    """Each sequence alone (no padding, no packing), full log-softmax: the definition."""
    out = []
    for seq, lab in zip(*_sequences(pairs)):
        logits = model(torch.tensor([seq])).logits[0, :-1].double()
        target = torch.tensor(lab[1:])
        mask = target != -100
        out.append(logits.log_softmax(-1)[mask].gather(-1, target[mask, None]).sum())
    return torch.stack(out)


def _grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_every_layout_and_the_chunked_head_give_the_unpadded_logps_and_gradients(tok, attention):
    model = tiny_llama(tok)
    model.config._attn_implementation = attention
    pairs = _pairs(len(tok))
    expected = _unpadded_logps(model, pairs)
    weights = torch.linspace(-1.0, 2.0, len(expected))  # a different gradient per sequence
    model.zero_grad()
    (_unpadded_logps(model, pairs).float() * weights).sum().backward()
    expected_grads = _grads(model)
    for name, batch in _layouts(pairs).items():
        for chunked in (False, True):
            model.zero_grad()
            logps, n_tokens, _ = batch_logps(model, batch, chunked=chunked)
            (logps * weights).sum().backward()
            torch.testing.assert_close(logps.double(), expected.detach(), rtol=1e-5, atol=2e-5,
                                       msg=f"{name} chunked={chunked}")
            torch.testing.assert_close(_grads(model), expected_grads, rtol=1e-4, atol=2e-5,
                                       msg=f"{name} chunked={chunked}")
            # without a prompt the first completion token has no context: it is not scored
            assert n_tokens.tolist() == [C - (P == 0) for P, C, _ in PAIR_LENGTHS] + [R - (P == 0) for P, _, R in PAIR_LENGTHS]


def test_shared_prompt_segments_attend_as_two_sequences():
    pairs = [([1, 2], [3, 4, 5], [6, 7])]
    batch = shared_prompt_pairs(pairs, 0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 2, 3]]  # rejected continues from the prompt
    mask = batch["attention_mask"][0, 0].int()
    assert mask[5].tolist() == [1, 1, 0, 0, 0, 1, 0]  # first rejected token: the prompt and itself
    assert mask[4].tolist() == [1, 1, 1, 1, 1, 0, 0]  # last chosen token: prompt + chosen
    # targets: chosen 3, 4, 5 predicted at 1, 2, 3; rejected 6 at the last prompt token (1), 7 at 5
    got = sorted(zip(batch["target_sequences"].tolist(), batch["target_positions"].tolist(),
                     batch["target_ids"].tolist()))
    assert got == [(0, 1, 3), (0, 2, 4), (0, 3, 5), (1, 1, 6), (1, 5, 7)]
    assert batch["n_tokens"] == 7 and batch["sequence_tokens"].tolist() == [3, 2]


def test_packed_rows_are_no_wider_than_the_longest_sequence_and_hold_no_padding_inside():
    seqs = [[1] * 6, [2] * 2, [3] * 3, [4] * 4]
    batch = packed_sequences(seqs, [list(s) for s in seqs], 0)
    assert batch["input_ids"].shape == (3, 6)  # 6 | 4+2 | 3 (+3 pad at the end)
    assert batch["position_ids"][1].tolist() == [0, 1, 2, 3, 0, 1]
    assert batch["labels"][1].tolist() == [-100, 4, 4, 4, -100, 2]  # no target crosses a sequence start
    assert batch["n_tokens"] == 15 and batch["sequence_tokens"].tolist() == [5, 1, 2, 3]
    one = packed_sequences(seqs, [list(s) for s in seqs], 0, row_width=100)
    assert one["input_ids"].shape == (1, 15)


def _saved_shapes(fn) -> list[tuple[int, ...]]:
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return shapes


def test_chunked_head_keeps_no_vocabulary_sized_activation_for_backward(tok):
    model = tiny_llama(tok)
    batch = _layouts(_pairs(len(tok)))["packed"]
    V = len(tok)

    def vocab_sized(chunked: bool) -> list:
        shapes = _saved_shapes(lambda: batch_logps(model, batch, chunked=chunked)[0].sum().backward())
        return [s for s in shapes if len(s) >= 2 and s[-1] == V]

    assert vocab_sized(chunked=False)  # the full path saves [tokens, V] logits
    assert vocab_sized(chunked=True) == []  # the chunked one only hidden states (and the [V, H] weight)


def _tied_llama(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        tie_word_embeddings=True, initializer_range=0.1))


def _lora_llama(tok, targets):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(tok), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                       target_modules=targets))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: move it so the adapter changes the logits
            torch.nn.init.normal_(p, std=0.2, generator=torch.Generator().manual_seed(1))
    return model


@pytest.mark.parametrize("kind", ["tied", "lora_lm_head", "lora_body"])
def test_chunked_logps_match_full_logits_for_tied_and_lora_heads(tok, kind):
    model = {"tied": lambda: _tied_llama(tok), "lora_lm_head": lambda: _lora_llama(tok, ["q_proj", "lm_head"]),
             "lora_body": lambda: _lora_llama(tok, ["q_proj", "v_proj"])}[kind]()
    batch = _layouts(_pairs(len(tok)))["packed"]
    weights = torch.linspace(-1.0, 2.0, 8)
    results = []
    for chunked in (False, True):
        model.zero_grad()
        logps = batch_logps(model, batch, chunked=chunked)[0]
        (logps * weights).sum().backward()
        results.append((logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (full, full_grads), (chunked, chunked_grads) = results
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)
    assert sorted(chunked_grads) == sorted(full_grads)
    if kind == "tied":
        assert "model.embed_tokens.weight" in full_grads  # one parameter: embedding and LM head
    else:
        assert any("lm_head" in n for n in full_grads) == (kind == "lora_lm_head")
    for name in full_grads:
        torch.testing.assert_close(chunked_grads[name], full_grads[name], rtol=1e-4, atol=1e-6, msg=name)


class _SoftCapped(torch.nn.Module):
    """A model whose logits are not lm_head(hidden) (soft-capped, under a config attribute alignkit does not
    know): the chunked path must notice and use full logits."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def get_output_embeddings(self):
        return self.inner.lm_head

    def forward(self, **kwargs):
        out = self.inner(**kwargs)
        out.logits = 3.0 * torch.tanh(out.logits / 3.0)
        return out


def test_a_model_whose_logits_are_not_its_head_output_gets_full_logits(tok):
    model = _SoftCapped(tiny_llama(tok))
    batch = _layouts(_pairs(len(tok)))["padded"]
    full = batch_logps(model, batch, chunked=False)[0]
    torch.testing.assert_close(batch_logps(model, batch, chunked=True)[0], full)
    assert model._alignkit_chunked_head_ok is False  # probed once, remembered


class _NoPositions(torch.nn.Module):
    """A model that ignores position_ids (as some architectures' masks do): packing would mix sequences."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def get_output_embeddings(self):
        return self.inner.lm_head

    def forward(self, position_ids=None, **kwargs):
        return self.inner(**kwargs)


def test_exact_layouts_probes_the_model(tok):
    model = tiny_llama(tok)
    assert exact_layouts(model, pairs=True) == {"packed": True, "one_row": False, "shared_prompt": True}
    assert exact_layouts(_NoPositions(model), pairs=True)["packed"] is False
    model.config._attn_implementation = "flash_attention_2"  # varlen: one row, no custom masks
    assert exact_layouts(model, pairs=True, probe=False) == {"packed": True, "one_row": True, "shared_prompt": False}


def test_shared_prompt_auto_picks_the_cheaper_layout():
    layout = BatchLayout(packed=True, shared_prompt="auto", attention_cost=1e-3)
    long_prompt = [([1] * 200, [2] * 20, [3] * 20)] * 2
    long_answers = [([1] * 5, [2] * 300, [3] * 300)] * 2
    assert "attention_mask" in layout.pairs(long_prompt, 0)  # a 4D mask: shared
    assert "attention_mask" not in layout.pairs(long_answers, 0)  # packed rows are cheaper here


def test_completion_logps_keeps_its_padded_signature(tok):
    model = tiny_llama(tok)
    pairs = _pairs(len(tok))
    b = _layouts(pairs)["padded"]
    torch.testing.assert_close(completion_logps(model, b["input_ids"], b["attention_mask"], b["labels"])[0].double(),
                               _unpadded_logps(model, pairs).detach(), rtol=1e-5, atol=2e-5)


def test_sequence_scores_of_packed_rows_equal_the_classifier_on_each_sequence(tok):
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(0)
    model = LlamaForSequenceClassification(tiny_llama(tok).config.__class__(
        **{**tiny_llama(tok).config.to_dict(), "num_labels": 1})).eval()
    seqs, _ = _sequences(_pairs(len(tok)))
    batch = packed_sequences(seqs, [[-100] * len(s) for s in seqs], tok.pad_token_id)
    expected = torch.stack([model(torch.tensor([s])).logits[0, 0] for s in seqs])
    torch.testing.assert_close(sequence_scores(model, batch), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("entropy_grad", [False, True])
def test_chunked_response_forward_matches_full_logits_with_entropy_gradients(tok, entropy_grad):
    model = tiny_llama(tok)
    batch = RolloutBatch.from_rollout(_rollout(tok))
    outs = []
    for chunked in (False, True):
        model.zero_grad()
        out = response_forward(model, batch, 0.7, entropy=True, entropy_grad=entropy_grad, chunked=chunked)
        (out.logps.sum() + (out.entropy * 0.3).sum()).backward()
        outs.append((out, _grads(model)))
    (full, full_grads), (chunked, chunked_grads) = outs
    torch.testing.assert_close(chunked.logps, full.logps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked.entropy, full.entropy, rtol=1e-5, atol=1e-5)
    assert chunked.entropy.requires_grad == full.entropy.requires_grad == entropy_grad
    torch.testing.assert_close(chunked_grads, full_grads, rtol=1e-4, atol=1e-6)
