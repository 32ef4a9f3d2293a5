"""The controlled-sentiment task on real, human-labelled movie-review snippets (the ``movie-reviews`` asset).

The demo's task, and the real runs' in ``examples/sentiment/``: not part of the alignkit package.

10,605 Rotten Tomatoes snippets carry the mean human sentiment score (-4..+4). From them we build,
with a fixed train/held-out split by review id (so no review is in both):

- ``rm_pairs``: reward-model pairs, chosen = the review humans scored higher (score gap >= ``min_gap``);
- ``dpo_pairs``: policy preference pairs for the instruction "Write a short movie review.",
  chosen = a clearly positive review (score >= 1.5), rejected = a clearly negative one (score <= -1.5);
- ``kto_rows``: the same reviews as unpaired desirable / undesirable completions;
- ``prompts``: review openings (first few words) to continue, for RL toward positive continuations.

``write_task_files(dir)`` writes them all as JSONL files in the formats alignkit reads.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

logger = logging.getLogger("alignkit")

INSTRUCTION = "Write a short movie review."
CONTINUE = "Continue this movie review: "


def _decode_text(raw: bytes, where: str) -> tuple[str, str]:
    try:
        return raw.decode("utf-8"), "utf-8"
    except UnicodeDecodeError as e:
        logger.warning("%s is not valid UTF-8 (%s); reading it as latin-1.", where, e)
        return raw.decode("latin-1"), "latin-1"


def parse_ground_truth(text: str, where: str) -> tuple[list[dict], list[str]]:
    """Parse VADER ground-truth lines ``id<TAB>score<TAB>text`` into records; returns (records, problems)."""
    records, problems = [], []
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = line.strip("\r\n")
        if not line.strip():
            continue
        parts = line.split("\t", 2)
        if len(parts) != 3:
            problems.append(f"{where}:{lineno}: expected 3 tab-separated fields, got {len(parts)}")
            continue
        rid, score, review = parts[0].strip(), parts[1].strip(), parts[2].strip()
        try:
            value = float(score)
        except ValueError:
            problems.append(f"{where}:{lineno}: score {score!r} is not a number")
            continue
        if not -4.0 <= value <= 4.0 or not review:
            problems.append(f"{where}:{lineno}: score {value} outside -4..4 or empty text")
            continue
        records.append({"id": int(rid) if rid.isdigit() else rid, "text": review, "score": value})
    return records, problems


def load_reviews() -> list[dict]:
    """The 10,605 Rotten Tomatoes snippets with their mean human scores, from the ``movie-reviews`` asset."""
    from alignkit.assets import fetch

    name = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
    text, _ = _decode_text((fetch("movie-reviews") / name).read_bytes(), name)
    records, problems = parse_ground_truth(text, name)
    if problems:
        logger.warning("movie-reviews: skipped %d malformed line(s) of %s; first: %s", len(problems), name,
                       problems[0])
    return records


def split_reviews(reviews: list[dict], heldout_fraction: float = 0.1, seed: int = 0) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    ids = sorted(r["id"] for r in reviews)
    rng.shuffle(ids)
    held = set(ids[: int(len(ids) * heldout_fraction)])
    return [r for r in reviews if r["id"] not in held], [r for r in reviews if r["id"] in held]


def rm_pairs(reviews: list[dict], n: int, seed: int = 0, min_gap: float = 1.0) -> list[dict]:
    """Pairs of reviews whose human scores differ by at least ``min_gap``; chosen = higher score."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        a, b = rng.sample(reviews, 2)
        if abs(a["score"] - b["score"]) < min_gap:
            continue
        hi, lo = (a, b) if a["score"] > b["score"] else (b, a)
        out.append({"prompt": [{"role": "user", "content": INSTRUCTION}],
                    "chosen": [{"role": "assistant", "content": hi["text"]}],
                    "rejected": [{"role": "assistant", "content": lo["text"]}],
                    "score_chosen": hi["score"], "score_rejected": lo["score"]})
    return out


def _polar(reviews: list[dict], max_words: int) -> tuple[list[dict], list[dict]]:
    short = [r for r in reviews if len(r["text"].split()) <= max_words]
    return [r for r in short if r["score"] >= 1.5], [r for r in short if r["score"] <= -1.5]


def dpo_pairs(reviews: list[dict], n: int, seed: int = 0, max_words: int = 30) -> list[dict]:
    """Conversational preference pairs: a positive review is preferred over a negative one."""
    rng = random.Random(seed)
    pos, neg = _polar(reviews, max_words)
    out = []
    for _ in range(n):
        c, r = rng.choice(pos), rng.choice(neg)
        out.append({"prompt": [{"role": "user", "content": INSTRUCTION}],
                    "chosen": [{"role": "assistant", "content": c["text"]}],
                    "rejected": [{"role": "assistant", "content": r["text"]}]})
    return out


def kto_rows(reviews: list[dict], n: int, seed: int = 0, max_words: int = 30) -> list[dict]:
    rng = random.Random(seed)
    pos, neg = _polar(reviews, max_words)
    out = []
    for i in range(n):
        r = rng.choice(pos if i % 2 == 0 else neg)
        out.append({"prompt": [{"role": "user", "content": INSTRUCTION}],
                    "completion": [{"role": "assistant", "content": r["text"]}], "label": i % 2 == 0})
    return out


def prompts(reviews: list[dict], n: int, seed: int = 0, words: int = 5) -> list[dict]:
    """Openings of real reviews to continue; the RL goal is a positive continuation."""
    rng = random.Random(seed)
    pool = [r for r in reviews if len(r["text"].split()) > words + 3]
    out = []
    for r in rng.sample(pool, n):
        opening = " ".join(r["text"].split()[:words])
        out.append({"prompt": [{"role": "user", "content": CONTINUE + opening}], "opening": opening,
                    "review_score": r["score"]})
    return out


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_task_files(out_dir: str | Path, *, n_rm: int = 2000, n_pairs: int = 512, n_prompts: int = 256,
                     n_eval: int = 200, seed: int = 0) -> dict[str, Path]:
    """Write the task's train / held-out files; returns name -> path."""
    out = Path(out_dir)
    train, held = split_reviews(load_reviews(), seed=seed)
    return {
        "rm_train": write_jsonl(rm_pairs(train, n_rm, seed), out / "rm_train.jsonl"),
        "rm_eval": write_jsonl(rm_pairs(held, n_eval, seed + 1), out / "rm_eval.jsonl"),
        "dpo_train": write_jsonl(dpo_pairs(train, n_pairs, seed), out / "dpo_train.jsonl"),
        "dpo_eval": write_jsonl(dpo_pairs(held, n_eval, seed + 1), out / "dpo_eval.jsonl"),
        "kto_train": write_jsonl(kto_rows(train, n_pairs, seed), out / "kto_train.jsonl"),
        "prompts_train": write_jsonl(prompts(train, n_prompts, seed), out / "prompts_train.jsonl"),
        "prompts_eval": write_jsonl(prompts(held, min(n_eval, 64), seed + 1), out / "prompts_eval.jsonl"),
    }


def train_reward_model(rm_train: str | Path, out: str | Path, *, steps: int = 100, rm_eval: str | Path | None = None,
                       backbone: str = "all-minilm-l6-v2", max_length: int = 96) -> Path:
    """Train the task's sentiment reward model (pairwise, on an encoder with its own tokenizer)."""
    from alignkit import train

    data = {"train": [str(rm_train)], "max_length": max_length}
    if rm_eval:
        data["eval"] = [str(rm_eval)]
    train("rm", model={"name_or_path": backbone, "dtype": "float32"}, data=data,
          training={"output_dir": str(out), "max_steps": steps, "per_device_batch_size": 16, "learning_rate": 5e-5,
                    "warmup_steps": 5, "overwrite_output_dir": True})
    return Path(out)
