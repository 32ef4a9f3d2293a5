"""Held-out evaluation for the agents example: whole greedy episodes of a saved policy with the calculator
environment, the share it solves, how it uses the tool, and the paired before/after comparison.

- :func:`held_out_success`: one greedy episode per held-out question, run by alignkit's own multi-turn
  sampler (the same token-in/token-out loop, parser and environment as training); writes ``episodes.jsonl``.
- :func:`tool_use`: per episode, how many tool calls the model wrote and how many were valid.
- :func:`paired`: questions solved before and not after (broken), and after and not before (fixed).
- :func:`format_episode`: an episode as the lines a person reads (tool calls written out).

The model is loaded with plain transformers, as a user would after training.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from examples.agents.calculator import EXAMPLE


def _read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


def tool_use(messages: list[dict], tool_calls: int, tool_errors: int) -> dict[str, int]:
    """One episode's tool use, from its messages and the sampler's counters (``Episodes.tool_calls`` and
    ``tool_errors``): ``attempts`` (calls that parsed plus turns whose call did not parse), ``valid`` (calls that
    parsed and ran without an error) and ``answered`` (1 when the last turn was an answer, not a call)."""
    turns = [m for m in messages if m.get("role") == "assistant"]
    malformed = sum("tool_call_error" in m for m in turns)
    last = turns[-1] if turns else {}
    return {"attempts": tool_calls + malformed, "valid": tool_calls + malformed - tool_errors,
            "answered": int(bool(turns) and not last.get("tool_calls") and "tool_call_error" not in last)}


def format_episode(messages: list[dict]) -> list[str]:
    """The conversation after the prompt's system message and worked example, one line per message, with each
    tool call written as the model wrote it."""
    lines = []
    for m in messages[1 + len(EXAMPLE):]:
        text = m.get("content") or ""
        for call in m.get("tool_calls") or []:
            text += ("" if not text else " ") + "<tool_call>" + json.dumps(call["function"]) + "</tool_call>"
        lines.append(f"{m['role']}: {text.strip()}")
    return lines


@torch.no_grad()
def held_out_success(model_dir: str | Path, data_path: str | Path, *, limit: int = 64, max_turns: int = 3,
                     max_new_tokens: int = 40, max_episode_tokens: int = 256, samples: int = 3,
                     output_dir: str | Path | None = None) -> dict:
    """Greedy whole episodes of the policy in ``model_dir`` on the first ``limit`` questions of ``data_path``
    (held out: none is in the training file), with the calculator environment. Writes each episode to
    ``<output_dir>/episodes.jsonl``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignkit.assets import resolve_model
    from alignkit.rollout.config import SamplingConfig
    from alignkit.rollout.multiturn import EnvironmentConfig, MultiTurnSampler
    from examples.agents.calculator import make_env

    path = resolve_model(str(model_dir)) or model_dir
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    rows = _read_jsonl(data_path)[:limit]
    sampler = MultiTurnSampler(tok, SamplingConfig(max_new_tokens=max_new_tokens, do_sample=False),
                               EnvironmentConfig(factory="examples.agents.calculator:make_env", max_turns=max_turns,
                                                 max_episode_tokens=max_episode_tokens), factory=make_env)
    episodes = sampler.generate_episodes(model, rows, seed=0).episodes
    records = []
    for i, row in enumerate(rows):
        messages = episodes.messages[i]
        records.append({"question": row["question"], "answer": row["answer"], "reward": float(episodes.rewards[i]),
                        "turns": int(episodes.turns[i]), "stop": episodes.stop[i],
                        **tool_use(messages, int(episodes.tool_calls[i]), int(episodes.tool_errors[i])),
                        "episode": messages})
    if output_dir is not None:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(output_dir) / "episodes.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    n = len(records)
    attempts = sum(r["attempts"] for r in records)
    return {"success": sum(r["reward"] >= 1.0 for r in records) / n,
            "episodes": n,
            "called_tool": sum(r["attempts"] > 0 for r in records) / n,
            "tool_call_validity": sum(r["valid"] for r in records) / attempts if attempts else 0.0,
            "tool_calls": attempts,
            "turns": sum(r["turns"] for r in records) / n,
            "samples": [{"question": r["question"], "answer": r["answer"], "reward": r["reward"],
                         "lines": format_episode(r["episode"])} for r in records[:samples]]}


def paired(before_dir: str | Path, after_dir: str | Path) -> dict:
    """The same held-out questions before and after (their ``episodes.jsonl``): ``fixed`` (solved after, not
    before), ``broken`` (solved before, not after), ``both`` and ``neither``, and one fixed and one broken
    question's episodes, before and after."""
    before = {r["question"]: r for r in _read_jsonl(Path(before_dir) / "episodes.jsonl")}
    after = {r["question"]: r for r in _read_jsonl(Path(after_dir) / "episodes.jsonl")}
    common = [q for q in before if q in after]
    solved = {q: (before[q]["reward"] >= 1.0, after[q]["reward"] >= 1.0) for q in common}
    out = {"questions": len(common), "fixed": sum(not b and a for b, a in solved.values()),
           "broken": sum(b and not a for b, a in solved.values()), "both": sum(b and a for b, a in solved.values()),
           "neither": sum(not b and not a for b, a in solved.values()), "examples": {}}
    for kind, want in (("fixed", (False, True)), ("broken", (True, False))):
        q = next((q for q, s in solved.items() if s == want), None)
        if q is not None:
            out["examples"][kind] = {"question": q, "before": format_episode(before[q]["episode"]),
                                     "after": format_episode(after[q]["episode"])}
    return out
