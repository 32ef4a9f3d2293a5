"""Tiny models and tokenizers built from scratch, for tests and quick experiments (no download).

``tiny_tokenizer()`` trains a byte-level BPE on a generated corpus and gives it a ChatML chat template
with ``<|im_end|>`` as eos and pad, like SmolLM2/Qwen. ``tiny_llama()`` and ``tiny_bert()`` build small
random models from config. ``save_tiny_llama(dir)`` writes a complete HF folder.
"""

from __future__ import annotations

import random
from functools import lru_cache
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_WORDS = (
    "the a cat dog bird sat ran flew on under over mat log tree red blue green big small happy sad "
    "film movie story great bad good awful wonderful boring plot actor scene music love hate very not "
    "what is capital of france paris answer question please tell me about one two three four five "
    "yes no hello world assistant user system you i we they it this that and or but because"
).split()


def generated_corpus(n_lines: int = 2000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        lines.append(" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 14))) + rng.choice([".", "!", "?"]))
    return lines


@lru_cache(maxsize=4)
def _tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(generated_corpus(), trainer=trainer)
    return tok.to_str()


def tiny_tokenizer(vocab_size: int = 512, with_pad: bool = True, with_template: bool = True):
    """A PreTrainedTokenizerFast with ChatML template; eos = pad = <|im_end|> (pad omitted if asked)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json(vocab_size)))
    tok.eos_token = "<|im_end|>"
    tok.bos_token = None
    if with_pad:
        tok.pad_token = "<|im_end|>"
    if with_template:
        tok.chat_template = CHATML_TEMPLATE
    return tok


def tiny_llama(tokenizer=None, hidden: int = 64, layers: int = 2, seed: int = 0, heads: int = 4, kv_heads: int = 2):
    """A random Llama. ``heads=2, kv_heads=1`` gives head_dim 32 with the same weight shapes: vLLM's CPU
    attention needs a head size of at least 32 (the default 4 heads give 16)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tokenizer or tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
        # wider than the 0.02 default: with a frozen norm and LM head (LoRA), 0.02 caps logits near
        # +-1.3 and an adapter cannot fit anything; real checkpoints have far larger head norms
        initializer_range=0.1,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def save_tiny_llama(path: str | Path, seed: int = 0, with_pad: bool = True, with_template: bool = True,
                    heads: int = 4, kv_heads: int = 2) -> Path:
    """Write a tiny Llama + tokenizer as a normal HF folder and return its path (heads: see tiny_llama)."""
    path = Path(path)
    tok = tiny_tokenizer(with_pad=with_pad, with_template=with_template)
    model = tiny_llama(tiny_tokenizer(), seed=seed, heads=heads, kv_heads=kv_heads)
    if not with_pad:
        model.config.pad_token_id = None
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def tiny_bert_tokenizer():
    """A WordPiece tokenizer (different vocabulary from tiny_tokenizer), no chat template."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok.train_from_iterator(generated_corpus(), trainer=trainer)
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


def save_tiny_bert_classifier(path: str | Path, seed: int = 0) -> Path:
    """A tiny BERT sequence classifier (1 label) + its WordPiece tokenizer as an HF folder."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    path = Path(path)
    tok = tiny_bert_tokenizer()
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=256, num_labels=1,
                        pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    BertForSequenceClassification(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path
