"""Checkpoint converters: raw state dicts and Megatron checkpoints -> Hugging Face model folders.

``convert_state_dict`` and ``convert_megatron`` return the written folder; ``convert_main`` is the
``alignkit convert`` command. Every expected failure raises :class:`ConvertError` with a one-line message.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from alignkit.convert.cli import convert_main
from alignkit.convert.common import ConvertError
from alignkit.lazy import lazy_exports

# imported on first use: `alignkit convert --help` starts without torch
__getattr__ = lazy_exports(__name__, {"convert_megatron": "megatron", "convert_state_dict": "state_dict"})

if TYPE_CHECKING:
    from alignkit.convert.megatron import convert_megatron
    from alignkit.convert.state_dict import convert_state_dict

__all__ = ["ConvertError", "convert_main", "convert_megatron", "convert_state_dict"]
