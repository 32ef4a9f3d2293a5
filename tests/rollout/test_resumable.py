"""Resumable sampling logs: committed batches survive, other settings are refused."""

from __future__ import annotations

import pytest

from alignkit.config import ConfigError
from alignkit.rollout.resumable import SampleLog


def test_a_resumed_log_with_other_settings_is_refused(tmp_path):
    SampleLog(tmp_path / "x.jsonl", {"settings": {"num_samples": 4}})
    with pytest.raises(ConfigError, match="num_samples"):
        SampleLog(tmp_path / "x.jsonl", {"settings": {"num_samples": 8}})
    SampleLog(tmp_path / "x.jsonl", {"settings": {"num_samples": 8}}, restart=True)
