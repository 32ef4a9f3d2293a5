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


@pytest.mark.parametrize("which", ["output", "progress"])
def test_a_file_cut_inside_a_utf8_character_resumes(tmp_path, which):
    """A crash during an append can cut a multi-byte character in two; reading the file as text stopped the
    resume with a UnicodeDecodeError. The partial last line is dropped, the committed rows are kept."""
    from alignkit.rollout.resumable import PromptResult

    out = tmp_path / "x.jsonl"
    log = SampleLog(out, {"seed": 0})
    log.append(0, [PromptResult(0, [{"prompt_id": 0, "text": "café ☕"}])])
    cut = out if which == "output" else log.progress
    partial = '{"prompt_id": 1, "text": "☕☕"}'.encode()
    with open(cut, "ab") as f:
        f.write(partial[: partial.index("☕".encode()) + 1])  # the first byte of a three-byte character
    resumed = SampleLog(out, {"seed": 0})
    assert resumed.done_ids == {0} and resumed.rows() == [{"prompt_id": 0, "text": "café ☕"}]
    assert cut.read_bytes().endswith(b"\n")  # the partial line is gone from the file too
