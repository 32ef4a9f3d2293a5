"""Tests of alignkit.convert: raw state dicts and real Megatron checkpoints -> HF folders."""
