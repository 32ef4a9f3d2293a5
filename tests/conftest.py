"""Shared fixtures: tiny models built in the test run (no downloads) and small data files."""

from __future__ import annotations

import contextlib
import json
import os
import random

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")


@pytest.fixture(autouse=True, scope="session")
def _one_thread_per_worker():
    """Tiny models gain nothing from intra-op threads; with 2 xdist workers on 2 cores, extra threads
    only contend (a tiny RL step went from 8 s to 0.04 s on a busy machine)."""
    import torch

    torch.set_num_threads(1)
    yield


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Each in-process training run gets a fresh Accelerator state."""
    yield
    try:
        from accelerate.state import AcceleratorState, GradientState, PartialState

        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        PartialState._reset_state()
    except Exception:
        pass


class Crash(Exception):
    """The kill of the resume tests: raised right after a checkpoint is written."""


@contextlib.contextmanager
def crash_after_checkpoint(monkeypatch, step: int, method: str | None = None):
    """The run inside stops with :class:`Crash` right after it writes checkpoint ``step`` (of ``method``'s run
    only, when given); afterwards checkpoints save normally and accelerate's state is fresh for the resume."""
    from accelerate.state import AcceleratorState, GradientState

    from alignkit.training import Checkpointer

    real_save = Checkpointer.save

    def save_then_crash(self, state):
        path = real_save(self, state)
        if state.step == step and method in (None, self.cfg.method):
            raise Crash()
        return path

    monkeypatch.setattr(Checkpointer, "save", save_then_crash)
    with pytest.raises(Crash):
        yield
    monkeypatch.setattr(Checkpointer, "save", real_save)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from alignkit.testing import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_tok():
    from alignkit.testing import tiny_tokenizer

    return tiny_tokenizer()


def memorisation_records(n: int = 16, seed: int = 0) -> list[dict]:
    """Short question/answer chats with a fixed answer per question: learnable in a few steps."""
    rng = random.Random(seed)
    words = ["cat", "dog", "bird", "tree", "mat", "log", "red", "blue"]
    recs = []
    for i in range(n):
        q = f"what is {words[i % len(words)]} {i}"
        a = " ".join(rng.choice(words) for _ in range(4))
        recs.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    return recs


@pytest.fixture
def sft_file(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in memorisation_records()) + "\n")
    return path


# Reward functions as the source of a user's reward file (tests write it and name it file.py:function).
COUNT_E_REWARD = '''
def count_e(prompts, completions, **_):
    return [float(c.count("e")) for c in completions]
'''

# The share of a completion's words that are words of the tiny models' corpus: a random tiny Llama writes
# byte soup (~10% real words), so the reward has room to rise and varies enough between samples to learn fast.
WORD_SHARE_REWARD = '''
from alignkit.testing import _WORDS

WORDS = set(_WORDS)


def word_share(prompts, completions, **_):
    out = []
    for c in completions:
        words = c.split()
        out.append(sum(w in WORDS for w in words) / len(words) if words else 0.0)
    return out
'''
