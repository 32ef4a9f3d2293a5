"""GGUF checkpoints as plain Hugging Face models.

transformers loads a ``.gguf`` file (dequantizing its weights) but the loaded model refuses
``save_pretrained``. :func:`load_gguf` rebuilds it as a plain model of the same architecture, which saves,
trains and shards like any other; :func:`convert_gguf` writes that model and its tokenizer as an HF folder.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("alignkit")


def load_gguf(auto_cls: Any, folder: str | Path, gguf_file: str, dtype: torch.dtype, **kwargs: Any) -> Any:
    """``auto_cls`` (e.g. AutoModelForCausalLM) of ``folder/gguf_file`` as a plain model in ``dtype``, eval mode.

    ``attn_implementation`` / ``trust_remote_code`` apply to the rebuilt model; other kwargs go to the
    GGUF loader (which dequantizes to fp32 first).
    """
    from_config_kwargs = {k: kwargs.pop(k) for k in ("attn_implementation", "trust_remote_code") if k in kwargs}
    logger.info("Dequantizing GGUF %s/%s ...", folder, gguf_file)
    loaded = auto_cls.from_pretrained(str(folder), gguf_file=gguf_file, dtype=torch.float32, **kwargs)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = auto_cls.from_config(config, dtype=dtype, **from_config_kwargs)
    result = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"GGUF conversion: weights do not match the architecture (missing {missing[:5]}, "
                           f"unexpected {result.unexpected_keys[:5]}).")
    model.generation_config = loaded.generation_config
    del loaded
    return model.eval()


def convert_gguf(gguf_path: str | Path, output_dir: str | Path) -> Path:
    """Dequantize a causal-LM GGUF file into a plain HF folder (fp32 safetensors + tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model = load_gguf(AutoModelForCausalLM, gguf_path.parent, gguf_path.name, torch.float32)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return Path(output_dir)
