"""The agents example's task: arithmetic the model cannot do in its head, with a ``calculator`` tool.

An episode (``make_env(row)``, an alignkit :class:`~alignkit.rollout.environment.ToolEnvironment`):

1. the prompt: a system message that describes the tool and the call format, one worked example
   (question, call, tool result, answer) and the question, e.g. ``What is 347 * 28?``;
2. the model calls the tool, ``<tool_call>{"name": "calculator", "arguments": {"expression": "347 * 28"}}</tool_call>``,
   and reads the result (a ``tool`` message), as many times as it likes within ``environment.max_turns``;
3. a turn without a tool call is its answer: reward 1 when the last number in it is the right result, else 0.

SmolLM2-135M-Instruct's chat template has no ``tools`` slot (it ignores ``tools=``, so the JSON schema that
``ToolEnvironment`` passes there never reaches the model): a short system message names the tool and the call
format, and one worked example shows it, in the Hermes ``<tool_call>`` format that alignkit parses
(:mod:`alignkit.rollout.environment`). The 135M model follows the example about half the time; otherwise it
guesses the result or invents arguments (``{"operation": "add"}``), which is what GRPO has to train away.
"""

from __future__ import annotations

import ast
import json
import operator
import random
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from alignkit.rollout.environment import ToolEnvironment

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression with integers, +, -, * and parentheses.

    Args:
        expression: the expression, e.g. "347 * 28"
    """

    def value(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand)
        raise ValueError(f"cannot evaluate {expression!r}: use integers, +, -, * and parentheses")

    try:
        tree = ast.parse(str(expression).replace("×", "*").replace(",", ""), mode="eval")
    except SyntaxError:
        raise ValueError(f"cannot evaluate {expression!r}: not an arithmetic expression") from None
    result = value(tree.body)
    if abs(result) > 10**12:
        raise ValueError("the result is too large")
    return str(result)


SYSTEM = ("You have a calculator tool. To use it, write only <tool_call>{\"name\": \"calculator\", \"arguments\": "
          "{\"expression\": \"...\"}}</tool_call>. The result comes back in a tool message. Then give the final answer.")
ASK = " Use the calculator."  # without it the model answers in its head (no call in 16 of 16 greedy tries)

# one worked example before the question: the call format and a short final answer to copy
EXAMPLE = [
    {"role": "user", "content": "What is 214 * 36?" + ASK},
    {"role": "assistant", "content": '<tool_call>{"name": "calculator", "arguments": {"expression": "214 * 36"}}'
                                     "</tool_call>"},
    {"role": "tool", "content": "7704"},
    {"role": "assistant", "content": "The answer is 7704."},
]


def prompt_messages(row: Mapping[str, Any]) -> list[dict]:
    """The episode's first messages: the tool in the system message, the worked example, then the question."""
    return [{"role": "system", "content": SYSTEM}, *EXAMPLE, {"role": "user", "content": row["question"] + ASK}]


def final_number(text: str) -> float | None:
    """The last number in ``text`` (``9,716`` counts as 9716); None when there is none."""
    numbers = _NUMBER.findall(text)
    return float(numbers[-1].replace(",", "")) if numbers else None


def check(row: Mapping[str, Any], messages: list[dict]) -> float:
    """1.0 when the last number of the answer (the conversation's last message) is the right result."""
    return float(final_number(messages[-1].get("content") or "") == float(row["answer"]))


def make_env(row: Mapping[str, Any]) -> ToolEnvironment:
    """One episode's environment (``environment.factory: examples/agents/calculator.py:make_env``)."""
    return ToolEnvironment([calculator], reward=check, prompt=prompt_messages)


# --------------------------------------------------------------------------------------------------
# Data: questions with their answers, train and held-out disjoint
# --------------------------------------------------------------------------------------------------

TEMPLATES = ["What is {a} {op} {b}?", "Compute {a} {op} {b}.", "Calculate {a} {op} {b}.", "{a} {op} {b} = ?"]


def make_question(rng: random.Random) -> dict:
    """One question: a product of a 3-digit and a 2-digit number, or a sum/difference of two 4-digit numbers."""
    op = rng.choice(["*", "*", "+", "-"])
    a, b = (rng.randint(101, 999), rng.randint(11, 99)) if op == "*" else (rng.randint(1001, 9999), rng.randint(1001, 9999))
    question = rng.choice(TEMPLATES).format(a=a, op=op, b=b)
    answer = _OPS[{"*": ast.Mult, "+": ast.Add, "-": ast.Sub}[op]](a, b)
    return {"prompt": question + ASK, "question": question, "answer": answer}


def make_rows(n: int, seed: int, exclude: set[str] = frozenset()) -> list[dict]:
    """``n`` distinct questions from ``seed``, none of them in ``exclude``."""
    rng, rows, seen = random.Random(seed), [], set(exclude)
    while len(rows) < n:
        row = make_question(rng)
        if row["question"] not in seen:
            seen.add(row["question"])
            rows.append(row)
    return rows


def write_data(output_dir: str | Path, n_train: int = 512, n_eval: int = 64, seed: int = 0) -> dict[str, str]:
    """``train.jsonl`` and ``eval.jsonl`` (held out: no question of the training set) under ``output_dir``."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    train = make_rows(n_train, seed)
    held_out = make_rows(n_eval, seed + 1, exclude={r["question"] for r in train})
    paths = {}
    for name, rows in (("train", train), ("eval", held_out)):
        paths[name] = str(out / f"{name}.jsonl")
        Path(paths[name]).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths
