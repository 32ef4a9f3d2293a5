"""Checkpoint converters: raw state dicts and Megatron checkpoints -> Hugging Face model folders.

``convert_state_dict`` and ``convert_megatron`` return the written folder; ``convert_main`` is the
``alignkit convert`` command. Every expected failure raises :class:`ConvertError` with a one-line message.
"""

from alignkit.convert.cli import convert_main
from alignkit.convert.common import ConvertError
from alignkit.convert.megatron import convert_megatron
from alignkit.convert.state_dict import convert_state_dict

__all__ = ["ConvertError", "convert_main", "convert_megatron", "convert_state_dict"]
