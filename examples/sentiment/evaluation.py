"""Held-out evaluation of saved models, loaded with plain transformers (used by the demo and the real runs).

- :func:`policy_preference_accuracy`: how often a causal LM gives the chosen completion a higher
  log-likelihood than the rejected one (summed, and length-normalised) — "does the model prefer it".
- :func:`reward_model_accuracy`: how often a reward model scores chosen above rejected, and the mean margin.
- :func:`mean_policy_reward`: the mean reward of a policy's seeded samples on held-out prompts, and how
  repetitive those samples are (:func:`distinct_n`).
"""

from __future__ import annotations

from pathlib import Path

import torch


def _pairs(data_path: str | Path, tokenizer, max_length: int) -> list[dict]:
    from alignkit.config import DataConfig, DataSource
    from alignkit.data import build_datasets

    return build_datasets(DataConfig(train=[DataSource(path=str(data_path))], max_length=max_length),
                          tokenizer, "preference").train


@torch.no_grad()
def policy_preference_accuracy(model_dir: str | Path, data_path: str | Path, *, max_length: int = 256,
                               batch_size: int = 16) -> dict[str, float]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignkit.data import IGNORE_INDEX, padded_batch
    from alignkit.forward import completion_logps

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows = _pairs(data_path, tok, max_length)
    wins = wins_norm = 0
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        seqs, labels = [], []
        for side in ("chosen_ids", "rejected_ids"):
            for r in chunk:
                seqs.append(r["prompt_ids"] + r[side])
                labels.append([IGNORE_INDEX] * len(r["prompt_ids"]) + r[side])
        batch = padded_batch(seqs, labels, tok.pad_token_id)
        logps, n, _ = completion_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        k = len(chunk)
        wins += int((logps[:k] > logps[k:]).sum())
        norm = logps / n.clamp(min=1)
        wins_norm += int((norm[:k] > norm[k:]).sum())
    return {"accuracy": wins / len(rows), "accuracy_length_normalised": wins_norm / len(rows), "pairs": len(rows)}


@torch.no_grad()
def reward_model_accuracy(rm_dir: str | Path, data_path: str | Path, *, max_length: int = 256,
                          batch_size: int = 32) -> dict[str, float]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from alignkit.rewards import RewardModelFraming

    tok = AutoTokenizer.from_pretrained(rm_dir)
    model = AutoModelForSequenceClassification.from_pretrained(rm_dir, dtype=torch.float32).eval()
    framing = RewardModelFraming.for_tokenizer(tok, max_length=max_length)
    rows = _pairs(data_path, tok, max_length)
    wins, margin = 0, 0.0
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        batch = framing.batch([(r["prompt_ids"], r["chosen_ids"]) for r in chunk]
                              + [(r["prompt_ids"], r["rejected_ids"]) for r in chunk])
        scores = framing.scores(model, batch)
        k = scores.shape[0] // 2
        wins += int((scores[:k] > scores[k:]).sum())
        margin += float((scores[:k] - scores[k:]).sum())
    return {"accuracy": wins / len(rows), "mean_margin": margin / len(rows), "pairs": len(rows)}


def distinct_n(texts: list[str], n: int = 2) -> dict[str, float]:
    """Repetition of generated ``texts`` as distinct-n (Li et al. 2016) over lower-cased words: ``corpus`` =
    distinct n-grams / all n-grams over every text (low: the texts repeat each other), ``per_text`` = the
    same inside each text, averaged over the texts with at least one n-gram (low: a text repeats itself,
    "a movie about a movie about a movie")."""
    corpus: list[tuple[str, ...]] = []
    per_text = []
    for text in texts:
        words = text.lower().split()
        grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
        corpus += grams
        if grams:
            per_text.append(len(set(grams)) / len(grams))
    return {"corpus": len(set(corpus)) / len(corpus) if corpus else 0.0,
            "per_text": sum(per_text) / len(per_text) if per_text else 0.0}


@torch.no_grad()
def sequence_kl(model, reference, rollout, temperature: float = 1.0) -> torch.Tensor:
    """``[N]`` KL(model || reference) of each sampled response: at every response position the exact KL of the
    two next-token distributions (over the whole vocabulary), summed over the response. Its mean over samples
    of ``model`` estimates the sequence-level KL with far less noise than a k1 estimate (log-ratio of the
    sampled tokens only), which can even come out negative on a few samples."""
    from alignkit.rollout import RolloutBatch

    batch = RolloutBatch.from_rollout(rollout)
    inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
    width = batch.response_width

    def logps(m):
        logits = m(**inputs, use_cache=False).logits[:, -width - 1:-1].float()
        return torch.log_softmax(logits / temperature if temperature > 0 else logits, -1)

    p, q = logps(model), logps(reference)
    return ((p.exp() * (p - q)).sum(-1) * batch.response_mask).sum(1)


@torch.no_grad()
def mean_policy_reward(model_dir: str | Path, prompts_path: str | Path, *, reward_model: str | None = None,
                       reward_functions: list[str] | None = None, max_new_tokens: int = 24,
                       temperature: float = 1.0, num_samples: int = 2, seed: int = 0,
                       max_prompt_length: int = 96, reference_dir: str | Path | None = None) -> dict[str, float]:
    """Mean reward of a saved policy's sampled responses to held-out prompts (seeded, so two policies
    are compared on the same prompts with the same sampling noise), and their distinct-2 (:func:`distinct_n`).
    With ``reference_dir`` (e.g. the model PPO started from) also ``kl_to_reference``: the mean
    :func:`sequence_kl` of the samples to that model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignkit.config import DataConfig, DataSource
    from alignkit.data import build_datasets
    from alignkit.rewards import RewardSourcesConfig, build_reward
    from alignkit.rollout import HFSampler, SamplingConfig

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows = build_datasets(DataConfig(train=[DataSource(path=str(prompts_path))], max_length=max_prompt_length),
                          tok, "prompt").train
    sampler = HFSampler(tok, SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature,
                                            num_samples=num_samples, do_sample=temperature > 0))
    reward = build_reward(RewardSourcesConfig(model=reward_model, functions=list(reward_functions or [])), tok, "cpu")
    reference = None
    if reference_dir is not None:
        reference = AutoModelForCausalLM.from_pretrained(reference_dir, dtype=torch.float32).eval()
    total, n, eos, texts, kl = 0.0, 0, 0, [], 0.0
    for i in range(0, len(rows), 16):
        chunk = rows[i:i + 16]
        rollout = sampler.generate(model, [r["prompt_ids"] for r in chunk], seed=seed + i)
        result = reward(rollout, chunk)
        total += float(result.combined.sum())
        n += len(result.combined)
        eos += int(rollout.ended_with_eos.sum())
        texts += rollout.response_texts
        if reference is not None:
            kl += float(sequence_kl(model, reference, rollout, temperature).sum())
    distinct = distinct_n(texts, 2)
    out = {"mean_reward": total / n, "responses": n, "ended_with_eos": eos / n,
           "distinct_2": distinct["corpus"], "distinct_2_per_response": distinct["per_text"]}
    if reference is not None:
        out["kl_to_reference"] = kl / n
    return out
