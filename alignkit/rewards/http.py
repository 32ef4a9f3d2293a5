"""A reward server: POST JSON, read ``{"rewards": [...]}``, with retries (standard library only)."""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from typing import Any

import torch

from alignkit.config import ConfigError
from alignkit.rewards.inputs import RewardError, RewardInputs, as_scores

logger = logging.getLogger("alignkit")


class HTTPReward:
    """POST ``{"prompts": [...], "completions": [...], <row fields>: [...]}`` as JSON, read ``{"rewards": [...]}``.

    Connection errors, timeouts and 5xx answers are retried ``retries`` times, waiting ``backoff * 2**i``
    seconds; a 4xx answer is not retried. Only the standard library is used.
    """

    def __init__(self, url: str, *, timeout: float = 30.0, retries: int = 3, backoff: float = 1.0,
                 name: str = "http"):
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"reward.url={url!r}: give an http:// or https:// URL.")
        self.url, self.timeout, self.retries, self.backoff, self.name = url, timeout, retries, backoff, name

    def _post(self, body: bytes) -> Any:
        request = urllib.request.Request(self.url, data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            return json.loads(response.read().decode("utf-8"))

    def __call__(self, inputs: RewardInputs) -> torch.Tensor:
        payload = {**inputs.row_fields, "prompts": inputs.prompt_texts, "completions": list(inputs.completions)}
        try:
            body = json.dumps(payload).encode("utf-8")
        except TypeError as e:
            raise RewardError(f"reward server {self.url}: the row fields are not JSON-serialisable ({e}).") from e
        error: Exception | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                answer = self._post(body)
                break
            except urllib.error.HTTPError as e:
                detail = e.read().decode("utf-8", "replace")[:300]
                if e.code < 500:
                    raise RewardError(f"reward server {self.url} refused the request: HTTP {e.code} {detail}") from e
                error = e
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                error = e
            except ValueError as e:
                raise RewardError(f"reward server {self.url} did not answer JSON ({e}).") from e
            logger.warning("reward server %s: attempt %d/%d failed: %s", self.url, attempt + 1,
                           self.retries + 1, error)
        else:
            raise RewardError(f"reward server {self.url} is not reachable after {self.retries + 1} attempts: "
                              f"{error}. Start the server, or fix reward.url.") from error
        if not isinstance(answer, dict) or "rewards" not in answer:
            raise RewardError(f"reward server {self.url} must answer {{\"rewards\": [...]}}, got {str(answer)[:200]}.")
        return as_scores(answer["rewards"], len(inputs), f"reward server {self.url}")
