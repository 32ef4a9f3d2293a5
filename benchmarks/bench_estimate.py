"""How good is ``alignkit estimate``? Estimated vs measured peak memory, and the seeds' outcomes. Writes docs/estimate.md.

    python benchmarks/bench_estimate.py                  # CPU measurements (tiny model + SmolLM2-135M) and seeds
    python benchmarks/bench_estimate.py --only tiny      # cases whose name contains "tiny"
    python benchmarks/bench_estimate.py --gpu            # on a CUDA machine: vs torch.cuda.max_memory_allocated

**What is compared on CPU.** Each case is a real ``alignkit.train`` run (a few steps) in its own
subprocess, under ``torch.profiler`` with ``profile_memory=True`` started before the models are loaded. The
profiler sees every allocation and free of PyTorch's CPU allocator and reports the bytes of live tensors
after each one ("Total Allocated" of its memory events); the measured peak is the largest value from the
start of the run to the start of the final save (``Run.finish``). That is the CPU counterpart of
``torch.cuda.max_memory_allocated``: tensor bytes only, not the process RSS (Python, libraries, allocator
caches). The estimate is ``estimate(cfg, device="cpu")``'s tensor peak (no CUDA allowance) for the same
config. Rollout and scoring spans are marked with ``record_function`` so their peaks are reported apart.

**GPU** (``--gpu``, needs CUDA): random-init bf16 models of 0.5B-7B built from config presets, a few SFT / DPO
steps each, compared with ``torch.cuda.max_memory_allocated``. Not yet run: the section says so until it is.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DOC = ROOT / "docs" / "estimate.md"
MIB = 2**20

WORDS = ("the a cat dog bird sat ran flew on under over mat log tree red blue green big small happy sad film movie "
         "story great bad good awful wonderful boring plot actor scene music love hate very not").split()

# --------------------------------------------------------------------------------------------------
# Cases: (name, method, model, finetune, sections). "tiny" = alignkit.testing's tiny Llama, "smollm2" = the asset.
# --------------------------------------------------------------------------------------------------


LENGTHS = {"tiny": (64, 24, 16), "smollm2": (96, 32, 24)}  # model -> (data.max_length, max_prompt_length, new tokens)


def cases(work: Path) -> list[dict]:
    out = []
    for model, (max_length, prompt_len, new_tokens) in LENGTHS.items():
        data = work / model
        for finetune in ("full", "lora"):
            common = {"model": {"finetune": finetune, "dtype": "float32"},
                      "training": {"mixed_precision": "no", "max_steps": 2, "report_to": [], "seed": 0,
                                   "overwrite_output_dir": True}}
            out.append(_case(f"sft {model} {finetune}", "sft", model, common, {
                "data": {"train": [str(data / "sft.jsonl")], "max_length": max_length},
                "training": {"per_device_batch_size": 2 if model == "smollm2" else 4}}))
            out.append(_case(f"dpo {model} {finetune}", "dpo", model, common, {
                "data": {"train": [str(data / "pref.jsonl")], "max_length": max_length},
                "training": {"per_device_batch_size": 2}}))
            gen = {"max_new_tokens": new_tokens, "temperature": 1.0}
            prompts = {"train": [str(data / "prompts.jsonl")], "max_length": 256, "max_prompt_length": prompt_len}
            out.append(_case(f"grpo {model} {finetune}", "grpo", model, common, {
                "data": prompts, "training": {"per_device_batch_size": 4, "gradient_accumulation_steps": 2},
                "grpo": {"rollout_batch_size": 2, "generation": {**gen, "num_samples": 4},
                         "reward": {"functions": [f"{work / 'bench_reward.py'}:length_reward"]}}}))
            out.append(_case(f"ppo {model} {finetune}", "ppo", model, common, {
                "data": prompts, "training": {"per_device_batch_size": 2, "gradient_accumulation_steps": 1},
                "ppo": {"rollout_batch_size": 4, "ppo_epochs": 1, "generation": gen,
                        "reward": {"model": "@model"}}}))
    return out


def _case(name: str, method: str, model: str, common: dict, sections: dict) -> dict:
    merged = json.loads(json.dumps(common))
    for key, value in sections.items():
        merged[key] = {**merged.get(key, {}), **value}
    return {"name": name, "method": method, "model": model, "sections": merged}


def write_data(work: Path, model: str, tokenizer, max_length: int, prompt_len: int, seed: int = 0) -> None:
    """Data whose sequences have the lengths the estimate assumes: SFT rows and preference completions at
    ``max_length`` tokens (cut to it), every other row 1-3 tokens shorter so padded batches are padded; prompts
    at ``prompt_len`` (cut to it), every other one 1-3 tokens shorter (left padding)."""
    from alignkit.data.tokenize import tokenize_example

    rng = random.Random(seed)
    folder = work / model
    folder.mkdir(parents=True, exist_ok=True)

    def words(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))

    def sized(record: dict, field: str, kind: str, target: int, count) -> dict:
        """``record`` with ``field`` grown word by word to the longest text of at most ``target`` tokens."""
        text = ""
        while True:
            longer = (text + " " + rng.choice(WORDS)).strip()
            if count(tokenize_example({**record, field: longer}, tokenizer, kind, max_length=10**6)) > target:
                return {**record, field: text}
            text = longer

    def sft_tokens(row: dict) -> int:
        return len(row["input_ids"])

    def prompt_tokens(row: dict) -> int:
        return len(row["prompt_ids"])

    sft, pref, prompts = [], [], []
    for i in range(32):
        short = rng.randint(1, 3) if i % 2 else 0
        prompt = words(rng.randint(3, 6))
        if short:
            sft.append(sized({"prompt": prompt}, "completion", "sft", max_length - short, sft_tokens))
        else:
            sft.append({"prompt": prompt, "completion": words(3 * max_length)})
        rejected = sized({"prompt": prompt, "completion": ""}, "completion", "sft", max_length - short,
                         sft_tokens)["completion"] if short else words(3 * max_length)
        pref.append({"prompt": prompt, "chosen": words(3 * max_length), "rejected": rejected})
        head = "Write a long story about"
        prompts.append(sized({}, "prompt", "prompt", prompt_len - short, prompt_tokens) if short else
                       {"prompt": f"{head} {words(3 * prompt_len)}"})
    for name, rows in (("sft", sft), ("pref", pref), ("prompts", prompts)):
        (folder / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (work / "bench_reward.py").write_text(
        "def length_reward(prompts, completions, **kwargs):\n"
        "    return [len(c) / 100.0 for c in completions]\n")


def prepare_data(work: Path) -> None:
    from alignkit.config import ModelConfig
    from alignkit.models import load_tokenizer

    for model, (max_length, prompt_len, _) in LENGTHS.items():
        write_data(work, model, load_tokenizer(ModelConfig(name_or_path=model_path(model, work))), max_length,
                   prompt_len)


def model_path(model: str, work: Path) -> str:
    if model == "tiny":
        from alignkit.testing import save_tiny_llama

        path = work / "tiny-llama"
        if not path.exists():
            save_tiny_llama(path)
        return str(path)
    from alignkit.assets import fetch

    return str(fetch("smollm2-135m-instruct"))


def resolved_sections(case: dict, work: Path) -> dict:
    sections = json.loads(json.dumps(case["sections"]))
    path = model_path(case["model"], work)
    sections["model"]["name_or_path"] = path
    method_section = sections.get(case["method"], {})
    if method_section.get("reward", {}).get("model") == "@model":
        method_section["reward"]["model"] = path
    sections["training"]["output_dir"] = str(work / "out" / case["name"].replace(" ", "-"))
    return sections


# --------------------------------------------------------------------------------------------------
# Measurement (in a subprocess): the profiler's live tensor bytes
# --------------------------------------------------------------------------------------------------


def _mark(owner, attr: str, label: str) -> None:
    """Wrap ``owner.attr`` in ``record_function(label)`` so its span shows in the trace."""
    from torch.profiler import record_function

    original = getattr(owner, attr)

    def wrapped(*args, **kwargs):
        with record_function(label):
            return original(*args, **kwargs)

    setattr(owner, attr, wrapped)


def measure_main(case_json: str) -> None:
    """Run one case under the profiler and print {"peak", "phases", ...} as JSON (bytes)."""
    import torch

    torch.set_num_threads(1)
    case = json.loads(case_json)
    from torch.profiler import ProfilerActivity, profile

    import alignkit
    import alignkit.methods.online_rl as online
    import alignkit.reference as reference
    import alignkit.rollout.hf as hf
    from alignkit.rewards import CombinedReward
    from alignkit.training.loop import Run

    _mark(hf.HFSampler, "generate", "bench:rollout")
    _mark(online, "score_rollout", "bench:scoring")
    _mark(reference, "score_rollout", "bench:scoring")
    _mark(CombinedReward, "__call__", "bench:scoring")
    _mark(Run, "finish", "bench:finish")
    start = time.time()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = alignkit.train(case["method"], **case["sections"])
    elapsed = time.time() - start
    trace = Path(case["trace"])
    prof.export_chrome_trace(str(trace))
    events = json.loads(trace.read_text())["traceEvents"]
    trace.unlink()
    spans = {}
    for e in events:
        if e.get("ph") == "X" and str(e.get("name", "")).startswith("bench:"):
            spans.setdefault(e["name"][6:], []).append((e["ts"], e["ts"] + e["dur"]))
    finish = min((s for s, _ in spans.get("finish", [])), default=float("inf"))
    # live bytes from the allocation (+) and free (-) events; frees of blocks allocated before the profiler
    # started are skipped. (The events' own "Total Allocated" misses blocks some loaders allocate, e.g.
    # safetensors' buffer for a whole checkpoint, so it is summed here.)
    memory = sorted((e["ts"], e["args"]["Bytes"], e["args"]["Addr"]) for e in events
                    if e.get("name") == "[memory]" and e.get("ph") == "i" and e["args"].get("Device Type") == 0)
    phases: dict[str, int] = {}
    peak = total = 0
    live: dict[int, int] = {}
    for ts, nbytes, addr in memory:
        if ts >= finish:
            break
        if nbytes > 0:
            live[addr] = live.get(addr, 0) + nbytes
            total += nbytes
        elif addr in live:
            freed = min(-nbytes, live[addr])
            live[addr] -= freed
            total -= freed
            if not live[addr]:
                del live[addr]
        peak = max(peak, total)
        where = next((name for name in ("rollout", "scoring") if any(a <= ts <= b for a, b in spans.get(name, []))),
                     "train")
        phases[where] = max(phases.get(where, 0), total)
    print("RESULT " + json.dumps({"peak": peak, "phases": phases, "seconds": elapsed, "steps": result["step"]}))


def measure(case: dict, work: Path) -> dict:
    """Run ``case`` in a fresh process under the profiler; its peak and per-phase peaks in bytes."""
    sections = resolved_sections(case, work)
    payload = json.dumps({"method": case["method"], "sections": sections, "trace": str(work / "trace.json")})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, __file__, "--measure", payload], capture_output=True, text=True, env=env,
                          cwd=work)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{case['name']}: the measured run failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][7:])


def estimated(case: dict, work: Path):
    import alignkit
    from alignkit.estimate import estimate

    cfg = alignkit.build_config(case["method"], resolved_sections(case, work))
    return estimate(cfg, 1, 1024.0, device="cpu", suggest=False)


def run_cpu_cases(work: Path, only: str | None) -> list[dict]:
    """Estimated vs measured peak (MiB) of every CPU case."""
    prepare_data(work)
    rows = []
    for case in cases(work):
        if only and only not in case["name"]:
            continue
        est = estimated(case, work)
        got = measure(case, work)
        row = {"name": case["name"], "estimate": est.tensor_peak_gb * 1024, "measured": got["peak"] / MIB,
               "estimate_phase": est.peak_phase, "seconds": got["seconds"],
               "estimate_phases": {k: v * 1024 for k, v in est.phase_totals.items()},
               "measured_phases": {k: v / MIB for k, v in got["phases"].items()}, "source": source_state()}
        row["ratio"] = row["estimate"] / row["measured"]
        rows.append(row)
        print(f"{case['name']:<20} estimate {row['estimate']:9.2f} MiB  measured {row['measured']:9.2f} MiB  "
              f"ratio {row['ratio']:.3f}  ({got['seconds']:.0f} s)", flush=True)
    return rows


def source_state() -> str:
    """Which alignkit was measured: the commit, and whether alignkit/ had uncommitted changes."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "alignkit"], capture_output=True, text=True,
                               cwd=ROOT, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "alignkit source: not a git checkout"
    return f"alignkit at commit {commit}" + (" with uncommitted changes in alignkit/" if dirty else "")


def _rounded(x):
    if isinstance(x, float):
        return round(x, 3)
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_rounded(v) for v in x]
    return x


def cpu_section(rows: list[dict], previous: str = "") -> str:
    """The accuracy table; rows of cases not run this time are kept from the ``previous`` section (its data
    comment), so ``--only`` refreshes a subset."""
    found = re.search(r"<!-- data: (.*) -->", previous)
    old = {r["name"]: r for r in json.loads(found.group(1))} if found else {}
    new = {r["name"]: r for r in rows}
    order = [c["name"] for c in cases(Path("."))]
    rows = [new.get(name) or old[name] for name in order if name in new or name in old]
    sources = sorted({r.get("source", "an unrecorded alignkit") for r in rows})
    lines = [f"Measured with {'; '.join(sources)}.", "",
             "| case | estimate (MiB) | measured (MiB) | estimate / measured | estimated peak phase | "
             "measured rollout / scoring / train (MiB) |", "| --- | ---: | ---: | ---: | --- | --- |"]
    for r in rows:
        m = r["measured_phases"]
        phases = " / ".join(f"{m[k]:.1f}" if k in m else "-" for k in ("rollout", "scoring", "train"))
        lines.append(f"| {r['name']} | {r['estimate']:.1f} | {r['measured']:.1f} | {r['ratio']:.3f} | "
                     f"{r['estimate_phase']} | {phases} |")
    worst = max(rows, key=lambda r: abs(r["ratio"] - 1))
    lines += ["", f"{len(rows)} runs; the largest deviation is {worst['name']} ({100 * (worst['ratio'] - 1):+.1f}%). "
              f"All within +-20%: {all(abs(r['ratio'] - 1) <= 0.2 for r in rows)}.", "",
              f"<!-- data: {json.dumps(_rounded(rows))} -->"]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# The per-layer formula against autograd's saved tensors
# --------------------------------------------------------------------------------------------------


def layer_section() -> str:
    """layer_activation_bytes vs the bytes saved_tensors_hooks sees in a middle layer, for the dtype cases."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from alignkit.estimate import Setup, layer_activation_bytes
    from alignkit.estimate.architecture import _arch_from_json

    values = dict(vocab_size=1000, hidden_size=128, intermediate_size=344, num_attention_heads=8,
                  num_key_value_heads=2, tie_word_embeddings=False)

    def saved(layers: int, padded: bool, dtype, autocast: bool, lora: float | None) -> int:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=layers, **values)).to(dtype)
        if lora is not None:
            model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=lora, target_modules="all-linear"))
        model.train()
        ids = torch.randint(0, 1000, (2, 64))
        mask = torch.ones(2, 64, dtype=torch.long)
        if padded:
            mask[0, -3:] = 0
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen: dict[int, int] = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in params:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            model(input_ids=ids, attention_mask=mask, logits_to_keep=1, use_cache=False)
        return sum(seen.values())

    arch = _arch_from_json("layer-check", json.dumps({"model_type": "llama", "num_hidden_layers": 1, **values}),
                           "causal_lm")
    lines = ["| layer (b=2, s=64, h=128, 8 heads / 2 kv, i=344) | saved by autograd (bytes) | formula (bytes) |",
             "| --- | ---: | ---: |"]
    for name, padded, dtype, autocast, lora, (r, a) in [
        ("fp32, no padding", False, torch.float32, False, None, (4, 4)),
        ("fp32, padded", True, torch.float32, False, None, (4, 4)),
        ("fp32 weights, bf16 autocast, padded", True, torch.float32, True, None, (4, 2)),
        ("bf16 weights, bf16 autocast, padded", True, torch.bfloat16, True, None, (2, 2)),
        ("fp32 LoRA r=8, dropout 0.05, padded", True, torch.float32, False, 0.05, (4, 4)),
        ("fp32 LoRA r=8, no dropout, padded", True, torch.float32, False, 0.0, (4, 4)),
        ("bf16 LoRA r=8, dropout 0.05, bf16 autocast, padded", True, torch.bfloat16, True, 0.05, (2, 2)),
    ]:
        measured = (saved(3, padded, dtype, autocast, lora) - saved(1, padded, dtype, autocast, lora)) // 2
        setup = Setup(device="cpu", gpus=1, weight_bytes=r, compute_bytes=a, mixed="bf16" if autocast else "no",
                      stage=0, offload=False)
        adapted = [x for x in arch.linears if x[0] != "lm_head"] if lora is not None else None
        formula = layer_activation_bytes(arch, 2, 64, setup, adapted, lora or 0.0, 8, padded)
        lines.append(f"| {name} | {measured} | {formula:.0f} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# The seeds: outcomes users saw on 2 x A100-40GB
# --------------------------------------------------------------------------------------------------

QWEN, LLAMA, GEMMA = "Qwen/Qwen2-7B", "huggyllama/llama-7b", "google/gemma-2b"
SEEDS = [  # (method, finetune, zero, policy, reward model, what was seen)
    ("rloo", "lora", "zero3", QWEN, QWEN, "fits (15-30 GB)", True),
    ("rloo", "qlora", "zero2", QWEN, QWEN, "fits (30-40 GB)", True),
    ("ppo", "lora", "zero2", LLAMA, GEMMA, "OOM", False),
    ("ppo", "lora", "zero3", LLAMA, GEMMA, "fits (20-25 GB)", True),
    ("ppo", "qlora", "zero2", LLAMA, GEMMA, "fits (30 GB)", True),
]
SEED_ASSUMPTIONS = ["data.max_prompt_length=256"]  # the rest: alignkit's defaults (see docs/estimate.md)


def seed_estimate(method: str, finetune: str, zero: str, policy: str, reward: str, *extra: str):
    import alignkit
    from alignkit.estimate import estimate

    sets = [f"model.name_or_path={policy}", f"model.finetune={finetune}", f"training.deepspeed={zero}",
            "training.num_processes=2", f"{method}.reward.model={reward}", f"{method}.generation.max_new_tokens=64",
            *SEED_ASSUMPTIONS, *extra]
    return estimate(alignkit.build_config(method, {}, sets), 2, 40.0), sets


def seeds_section() -> str:
    lines = ["| run (2 x A100-40GB) | seen | estimate (GiB per GPU, peak phase) | verdict | agrees | "
             "with gradient checkpointing | Qwen2-7B + Qwen2-7B RM |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for method, finetune, zero, policy, reward, seen, seen_fits in SEEDS:
        est, _ = seed_estimate(method, finetune, zero, policy, reward)
        checkpointed, _ = seed_estimate(method, finetune, zero, policy, reward, "model.gradient_checkpointing=true")
        qwen = "" if policy == QWEN else f"{seed_estimate(method, finetune, zero, QWEN, QWEN)[0].per_gpu_peak_gb:.1f}"
        name = f"{method.upper()} {'QLoRA' if finetune == 'qlora' else 'LoRA'} ZeRO-{zero[-1]}, " \
               f"{policy.split('/')[-1]} + {reward.split('/')[-1]} RM"
        lines.append(f"| {name} | {seen} | {est.per_gpu_peak_gb:.1f} ({est.peak_phase}) | "
                     f"{'fits' if est.fits else 'OOM'} | {'yes' if est.fits == seen_fits else '**no**'} | "
                     f"{checkpointed.per_gpu_peak_gb:.1f} | {qwen} |")
    return "\n".join(lines)


def seed_example() -> str:
    est, sets = seed_estimate("ppo", "lora", "zero2", LLAMA, GEMMA)
    command = "alignkit estimate ppo " + " ".join(f"--set {s}" for s in sets if not s.startswith("training.num"))
    return f"```text\n$ {command} --gpus 2 --gpu-memory 40GB\n{est.table()}\n```"


# --------------------------------------------------------------------------------------------------
# GPU: random-init bf16 models, vs torch.cuda.max_memory_allocated (needs CUDA)
# --------------------------------------------------------------------------------------------------

GPU_CASES = [  # (preset, method, finetune)
    ("Qwen/Qwen2.5-0.5B", "sft", "full"), ("Qwen/Qwen2.5-0.5B", "dpo", "full"), ("Qwen/Qwen2.5-0.5B", "grpo", "lora"),
    ("google/gemma-2b", "sft", "lora"), ("google/gemma-2b", "dpo", "lora"),
    ("Qwen/Qwen2-7B", "sft", "lora"), ("Qwen/Qwen2-7B", "grpo", "lora"),
]


def gpu_model(preset: str, work: Path) -> Path:
    """A random-init bf16 checkpoint of ``preset`` (config from alignkit.estimate.PRESETS) with a tiny tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from alignkit.estimate import PRESETS
    from alignkit.testing import tiny_tokenizer

    path = work / preset.replace("/", "--")
    if (path / "config.json").exists():
        return path
    values = dict(PRESETS[preset])
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)  # ids < 512: valid for any vocabulary
    del model
    torch.cuda.empty_cache()
    return path


def gpu_measure_main(payload: str) -> None:
    import torch

    import alignkit

    case = json.loads(payload)
    torch.cuda.reset_peak_memory_stats()
    alignkit.train(case["method"], **case["sections"])
    print("RESULT " + json.dumps({"peak": torch.cuda.max_memory_allocated()}))


def run_gpu_cases(work: Path) -> str:
    import torch

    import alignkit
    from alignkit.estimate import estimate
    from alignkit.testing import tiny_tokenizer

    write_data(work, "gpu", tiny_tokenizer(), 512, 64)
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    lines = [f"GPU: {torch.cuda.get_device_name(0)} ({total:.0f} GiB); bf16, one process, 3 steps, max_length 512.", "",
             "| case | estimate (GiB) | max_memory_allocated (GiB) | estimate / measured |", "| --- | ---: | ---: | ---: |"]
    for preset, method, finetune in GPU_CASES:
        sections = {"model": {"name_or_path": str(gpu_model(preset, work)), "finetune": finetune},
                    "training": {"max_steps": 3, "report_to": [], "overwrite_output_dir": True,
                                 "output_dir": str(work / "out"), "per_device_batch_size": 4},
                    "data": {"train": [str(work / "gpu" / ("pref.jsonl" if method == "dpo" else
                                                           "prompts.jsonl" if method == "grpo" else "sft.jsonl"))],
                             "max_length": 512, "max_prompt_length": 64}}
        if method == "grpo":
            sections["grpo"] = {"rollout_batch_size": 2, "generation": {"num_samples": 4, "max_new_tokens": 128},
                                "reward": {"functions": [f"{work / 'bench_reward.py'}:length_reward"]}}
        est = estimate(alignkit.build_config(method, sections), 1, total, suggest=False)
        payload = json.dumps({"method": method, "sections": sections})
        proc = subprocess.run([sys.executable, __file__, "--gpu-measure", payload], capture_output=True, text=True,
                              cwd=work)
        found = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if not found:
            lines.append(f"| {preset} {method} {finetune} | {est.tensor_peak_gb:.2f} | failed: "
                         f"{' '.join(proc.stderr.split()[-30:])} | |")
            continue
        peak = json.loads(found[-1][7:])["peak"] / 2**30
        lines.append(f"| {preset} {method} {finetune} | {est.tensor_peak_gb:.2f} | {peak:.2f} | "
                     f"{est.tensor_peak_gb / peak:.3f} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# docs/estimate.md
# --------------------------------------------------------------------------------------------------

INTRO = """\
# Memory estimates: `alignkit estimate`

`alignkit estimate` answers "will this run fit, and what would make it fit" before anything is loaded. It
reads the same config as `alignkit train` (a YAML file and/or `--set` overrides) and only the models'
`config.json`: every model is built on the meta device, so no weights are downloaded or read.

```bash
alignkit estimate METHOD [CONFIG.yaml] [--set section.key=value ...] --gpus N --gpu-memory 40GB
    [--deepspeed zero3] [--model-config path/to/config.json] [--json] [--no-suggestions] [--device cpu]
```

```python
from alignkit.estimate import estimate
result = estimate(alignkit.load_config("ppo", "ppo.yaml"), gpus=2, gpu_memory_gb=40)
result.per_gpu_peak_gb, result.fits, result.phase_totals, result.suggestions
```

It prints a table (rows: what is in memory; columns: the phases of a step), the assumptions and one verdict
line; `--json` prints one object with `per_gpu_peak_gb`, `fits`, `phases` (name -> GiB), `breakdown` (phase
-> part -> GiB), `models`, `assumptions`, `verdict` and `suggestions`, ranked by the memory they save, each
`{"set": ["section.key=value", ...], "saves_gb": ..., "peak_gb": ..., "fits": ..., "note": ...}`. `set` is a
list because some changes go together (a smaller micro-batch with more accumulation). Every suggestion is
applied with `alignkit.build_config` and estimated again; only those that lower the peak are listed.
Sizes are GiB (2^30 bytes), the unit GPU names use ("A100-40GB" = 40960 MiB).

**When the run does not fit**, the suggestions are combined (`plan` in the JSON, `result.plan` in Python;
in the table, "the cheapest way to fit" and the verdict). Each round re-estimates every suggestion on the run as changed so far and
applies the cheapest one that makes it fit, else the one that saves the most; once it fits, every change
the fit does not need is dropped again. "Cheapest" is an order: changes that only cost speed (gradient
checkpointing, smaller micro-batches or generation chunks, vLLM sleep mode, a higher ZeRO stage) before
those that move memory to the CPU, and last those that change what is trained or seen (LoRA/QLoRA,
shorter responses, truncation). For a 7B RLOO (policy and reward model `Qwen/Qwen2-7B`) on 2 x 40 GB at
alignkit's defaults, 126 GiB per GPU, no single suggestion fits and the verdict reads `It fits with --set
model.finetune=qlora --set model.gradient_checkpointing=true (29.8 GiB)`. When no combination fits, the
verdict says so, gives the closest combination and its peak, and on how many GPUs of this size it would
fit (up to 64), if any.

`--device cpu` models a CPU run; without `--gpu-memory` its processes share this machine's memory.

## Where model configs come from

`model.name_or_path` (and `ref_model`, `reward.model`, `teacher`) may be a local folder (its
`config.json`), the path of a `config.json`, a `.gguf` file (its metadata), a named asset (its cached
folder, else a built-in copy of its config), a preset, or a Hub name (then only `config.json` is fetched;
offline this is a one-line error that points to `--model-config`). Presets, usable offline under their Hub
names: `smollm2-135m-instruct` / `HuggingFaceTB/SmolLM2-135M-Instruct`, `all-minilm-l6-v2`,
`Qwen/Qwen2-7B` (hidden 3584, 28 layers, 28 heads, 4 KV heads, MLP 18944, vocab 152064, untied: 7.62B),
`Qwen/Qwen2.5-0.5B`, `huggyllama/llama-7b` (LLaMA-7B, 6.74B) and `google/gemma-2b` (2.51B).
`--model-config` replaces the policy's config (a file, a folder or a preset). A LoRA adapter folder (what
a `finetune: lora` run saves, e.g. a reward model that `train ppo` loads) counts as it loads: the base model
its `adapter_config.json` names plus the adapter (and, for a reward model, the score head it saves in full).

## What is counted, per GPU

**Precision.** `model.dtype: auto` is bf16 for the estimate (a bf16 GPU; `--device cpu` models fp32 on
CPU), `training.mixed_precision: auto` is bf16. Without DeepSpeed, weights, gradients and AdamW's `m`
and `v` are in the weight dtype (bf16 weights: 2 + 2 + 4 bytes per trainable parameter), and peft keeps
LoRA adapters in fp32 (4 + 4 + 8). DeepSpeed with bf16/fp16 casts every parameter to 2 bytes and keeps
fp32 master weights, `m` and `v` in the optimizer: 2 + 2 + 12 bytes per trainable parameter.

**Weights.** Full: parameters x dtype bytes. LoRA: the frozen base plus `r x (in + out)` per adapted
linear layer (`all-linear`: every `nn.Linear` but the LM head; a sequence classifier's score head trains
in full); the count equals peft's (tested). QLoRA: every linear layer but the head in NF4 with double
quantisation, 0.5 + 1/64 + 1/4096 bytes per weight (4 bits, an 8-bit absmax per block of 64, an fp32
absmax per 256 blocks; the storage dtype changes the element type, not the bytes), the rest upcast to
fp32 by `prepare_model_for_kbit_training` (bf16 again under DeepSpeed).

**ZeRO across N GPUs.**

| | weights | gradients | master + m + v | buffers |
| --- | --- | --- | --- | --- |
| none / DDP | whole | whole | whole (m, v) | DDP buckets: one more copy of the gradients when N > 1 |
| ZeRO-1 | whole | whole | / N | |
| ZeRO-2 | whole | / N | / N | reduce bucket, 5e8 elements (DeepSpeed's default; 0.93 GiB in bf16) |
| ZeRO-3 | / N | / N | / N | reduce bucket; the layers being gathered (2 layers) |
| + `zero_offload` | ZeRO-3: on CPU | | on CPU | |

**The optimizer step** adds AdamW's temporaries: the foreach implementation (CUDA) makes one `sqrt(v)`
copy of every state; the single-tensor loop (CPU) two copies of the largest tensor; DeepSpeed the fp32
gradient of its partition and the `sqrt(v)` copy.

**Activations** (training forward, per micro-batch of `b` rows x `s` tokens, `t = b s`). Per Llama-style
decoder layer, with `h`, `q = heads x head_dim`, `kv = kv_heads x head_dim`, `i` the MLP width, `r` the
weight dtype bytes and `a` the compute dtype bytes (2 under bf16 autocast):

```
2 RMSNorms    2 (4 + r + a) h t     the float32 input (saved by pow), the normalised input (for the norm
                                    weight's gradient; not with LoRA), the weighted output (input of q/k/v,
                                    gate/up)             + 2 x 4 t for rsqrt
attention     (2 q + 2 kv) a t      q, k after RoPE, v, the SDPA output (also o_proj's input)
              + 4 heads t           SDPA's log-sum-exp in float32
              padded batches:       repeat_kv copies k, v at q width (2 q instead of 2 kv), and the mask is
                                    expanded per layer: + b s^2 a
MLP           4 i a t               gate, SiLU(gate), up, their product (down_proj's input)
fp32 weights under bf16 autocast:   + 2 bytes per layer weight (the casts autograd keeps) + 3 h a t
LoRA          + rank a t per adapted layer, + the 2-byte copies of fp32 adapters under autocast;
              with lora_dropout > 0 each adapted layer keeps its dropout output (a) and mask (1 byte on
              CUDA, an adapter-dtype tensor on CPU) per input feature, and the shared normalised inputs
              and the MLP product are no longer kept (the base projections are frozen)
```

The estimate assumes padded batches (the usual case; the mask and `repeat_kv` copies are what padding
costs). Gradient checkpointing keeps each layer's input (`h t r`) and recomputes one layer in backward.
Online methods set dropout to 0 (`disable_dropout`), so their LoRA layers keep no dropout copies. The
formula is checked exactly against the bytes `torch.autograd.graph.saved_tensors_hooks` sees (below).

**Backward.** Without accumulation or ZeRO, gradients appear while activations are freed layer by layer,
so the peak is the larger of the start of backward (every activation, the logits' backward, the head's
gradient) and its end (every gradient, one layer of activations). With accumulation (or ZeRO's buffers)
all gradients are counted next to all activations.

**The LM head.** Only target positions reach it (`alignkit/forward.py`). SFT, the DPO family, KTO and the
online methods run it chunk by chunk (`linear_logps`, `chunked_logps: true`): at most one chunk of about
2^25 logits (128 MiB in float32) exists at a time, as the matmul's output (in the autocast dtype), its
float32 copy and two or three float32 temporaries; backward recomputes each chunk, and a trainable head
(full fine-tuning) adds a float32 `[V, h]` gradient accumulator. Under ZeRO-3 the partitioned head cannot
run outside the model's forward, so full logits are computed: the kept logits, their gathered copy and
both gradients in the compute dtype plus two float32 chunks of `selective_log_softmax`. SeqKD's SFT stage
uses cross-entropy on full logits (a float32 log-softmax and two float32 gradients, 12 bytes per logit);
KD/GKD hold student and teacher logits, their float32 copies, both log-softmaxes and the element-wise
divergence.

**Other models.** A reference is free when it is the LoRA policy with its adapter off, else a frozen copy
(`ref_model`, or the policy's checkpoint for full fine-tuning); DPO with `precompute_ref_logps` holds it
only while precomputing (`auto` precomputes when the run visits every training row; the estimate takes
that to be a run of at least one epoch without `max_steps`, as it does not know the data size, and
otherwise counts a live reference). PPO's critic is a sequence classifier of the critic checkpoint,
trained with the policy in one optimizer (its activations too). Reward models and teachers are frozen
copies in the model dtype. Under ZeRO-3 each frozen model is its own partitioned engine (1/N of its
weights, plus the layers gathered during its forward); otherwise every GPU holds it whole.

**Rollout.** The HF sampler's KV cache is `sequences x (prompt + response) x layers x 2 x kv_heads x
head_dim x a` for the sequences of one `generate` call (`generation.batch_size`, else the whole rollout),
plus the prefill's working set and the float32 sampling logits; when the sampler returns its tokens'
log-probs (`tis_cap`, or fp32 runs without autocast that reuse them as the old log-probs) `generate` also
keeps every step's float32 `[sequences, V]` scores. Under ZeRO-3 with `zero3_gather` (the
default) every GPU also holds the whole trained module while generating (PPO: policy and critic). A
colocated vLLM (`generation.sampler: vllm`) takes `vllm_gpu_memory_utilization x GPU memory`, or its
weights plus `vllm_kv_cache_gb` when that is set; with sleep mode (`vllm_sleep_mode`, on by default with
CUDA) it frees that memory while the policy trains, so the share counts in the rollout phase only, else in
every phase. With LoRA, weight syncs add merged copies of the adapted weights.

**Peak and allowance.** The per-GPU peak is the largest phase plus 0.75 GiB for the CUDA context (cuBLAS
and NCCL workspaces, kernels) and 5% of the tensor peak for the caching allocator's fragmentation.
`--device cpu` has no allowance: it is the tensor peak the CPU measurements below compare with.

**Lengths.** Offline methods: every sequence at `data.max_length`, every position a target. Online
methods: prompts of `data.max_prompt_length` (else `data.max_length`) tokens and responses of
`generation.max_new_tokens`. These are upper bounds: padding-free and shared-prompt layouts, length-grouped
batches and shorter rows only lower the real figure. Set `data.max_prompt_length` to what your prompts need.

## Accuracy on CPU (measured)

Each case runs the real `alignkit.train` for 2 steps in a fresh process, fp32, one thread, under
`torch.profiler` with `profile_memory=True` started before any model is loaded. The measured peak is the
largest sum of live tensor bytes (allocations minus frees of PyTorch's CPU allocator, from the profiler's
memory events) between the start and the final save: the CPU counterpart of
`torch.cuda.max_memory_allocated`, not the process RSS (Python, libraries and allocator caches are not
tensors). The estimate is `estimate(cfg, device="cpu")` for the same config (its tensor peak). Rollout and
scoring spans are marked with `record_function`, so their peaks show apart. Data: sequences at the
lengths the estimate assumes, built with each model's tokenizer: SFT rows and chosen completions cut to
`data.max_length` (64 tokens for the tiny model, 96 for SmolLM2), every other SFT row and rejected
completion 1-3 tokens shorter (so padded batches have padding), prompts cut to `data.max_prompt_length`
(24 / 32; every other one 1-3 tokens shorter), responses of 16 / 24 tokens. SFT: 4 / 2 rows per
micro-batch, DPO: 2 pairs, GRPO: 2 prompts x 4 samples, micro-batches of 4 with 2 accumulation steps,
PPO: 4 prompts, micro-batches of 2, a reward model (the policy's checkpoint as a sequence classifier);
PPO full fine-tuning holds policy, critic, reference and reward model.
"""

CPU_NOTE = """\
The estimate is an upper bound by design (every position a target, an expanded mask in every batch), and
the small model shows it most: at 3-6 MiB, the worst-case terms (the mask and `repeat_kv` copies that
DPO's padding-free rows of one sequence do not need, log-probs at prompt positions) are a tenth of the
total. On SmolLM2 the estimate is within a few percent, and the phase it names as the peak is the one
measured (the optimizer step for full SFT and PPO, whose AdamW temporaries are exact; the training
forward/backward otherwise).
"""

SEEDS_TEXT = """\
## The seeds: what users saw on 2 x A100-40GB

Seen outcomes next to the estimator's verdicts (`gpu_memory_gb=40`, 2 GPUs). What the seeds give:
method, fine-tuning mode, ZeRO stage, models, response length 64. What the estimates assume beyond
that (alignkit's defaults where the seeds say nothing): prompts of 256 tokens (`data.max_prompt_length=256`),
`per_device_batch_size` 4, no accumulation, no gradient checkpointing, `rollout_batch_size` 8 prompts per
GPU with RLOO's default k = 4 samples (PPO: 1), the HF sampler with `zero3_gather`, PPO's critic from the
policy checkpoint, reward models in bf16. "Qwen2-7B policy and reward model" are the `Qwen/Qwen2-7B`
preset (the reward model as a sequence classifier); the 6.7B policy is LLaMA-7B (`huggyllama/llama-7b`,
6.74B) and the 2B reward model Gemma-2B (`google/gemma-2b`, 2.51B). The PPO ZeRO-3 and QLoRA lines,
which follow the ZeRO-2 OOM, are taken to use the same pair of models; the last column gives the estimate for the Qwen2-7B
pair instead.
"""

def seeds_discussion() -> str:
    """What the seeds' table means, with the numbers of the variants it mentions (estimated here, so they
    stay in step with the estimator)."""

    def peak(*args: str) -> str:
        return f"{seed_estimate(*args)[0].per_gpu_peak_gb:.1f}"

    ppo3 = ("ppo", "lora", "zero3", LLAMA, GEMMA)
    rloo3 = ("rloo", "lora", "zero3", QWEN, QWEN)
    no_gather, checkpointing = "generation.zero3_gather=false", "model.gradient_checkpointing=true"
    return f"""\
All five verdicts agree with what was seen. The numbers behind them:

- **PPO LoRA ZeRO-3 (seen: fits at 20-25 GB; estimated: {peak(*ppo3)} GiB, fits).** alignkit trains PPO's
  policy and critic as one ZeRO-3 engine; to generate, the HF sampler gathers only the policy's weights
  (`generation.zero3_gather`, the default), while the critic's 6.6B stay partitioned. Before that was so,
  the sampler gathered the critic as well (about 25 GiB more per GPU, 44.7 GiB: OOM). Generating with
  per-layer gathers (`--set ppo.{no_gather}`) gives {peak(*ppo3, "ppo." + no_gather)} GiB, and with gradient
  checkpointing as well {peak(*ppo3, "ppo." + no_gather, checkpointing)} GiB. The seen figure is below the
  estimate, which assumes every response at its full length and no checkpointing.
- **RLOO LoRA ZeRO-3 (seen 15-30 GB; estimated {peak(*rloo3)} GiB).** Above the seen range: each GPU
  gathers the whole Qwen2-7B policy (14.2 GiB) on top of its shards while generating, the price of one
  gather per rollout instead of one per layer per token.
  Without the gather and with checkpointing: {peak(*rloo3, "rloo." + no_gather, checkpointing)} GiB.
- **The ZeRO-2 OOM is decided by the activations.** Without gradient checkpointing (alignkit's default)
  the PPO run needs {peak("ppo", "lora", "zero2", LLAMA, GEMMA)} GiB, with it
  {peak("ppo", "lora", "zero2", LLAMA, GEMMA, checkpointing)} GiB, which would fit: the seed does not say
  which it used. The column "with gradient checkpointing" shows how each run moves.
- **QLoRA ZeRO-2** runs agree in verdict and size (RLOO: {peak("rloo", "qlora", "zero2", QWEN, QWEN)} GiB
  estimated vs 30-40 GB seen; PPO: {peak("ppo", "qlora", "zero2", LLAMA, GEMMA)} GiB vs 30 GB). Seen figures are often `nvidia-smi` readings, which include the caching allocator's reserve, so
  they sit above allocated memory.
- With the Qwen2-7B pair (last column) PPO needs more: alignkit's critic is a second 7B model.

One example, the OOM seed, as the command prints it:
"""


LIMITS = """\
## Limits

- The activation formula is exact for Llama-style decoders (Llama, Qwen2, Mistral, Gemma's layout) with
  SDPA attention; other architectures (encoders, MoE, MLA) get the same formula from their config's widths,
  an approximation. FlashAttention-2 (`attn_implementation`) keeps no expanded mask: the estimate is
  conservative there.
- Lengths are upper bounds (every row at `max_length`, every response at `max_new_tokens`); real batches
  are often shorter.
- DeepSpeed buffers use DeepSpeed's defaults (alignkit's generated configs do not change them); a custom
  JSON config with other bucket sizes is read for its stage, offload and bf16 only.
- vLLM's own use inside its share (weights, KV cache, CUDA graphs) is vLLM's business: the estimate
  counts the share.
- Transients of model loading and of the final save are not estimated; on a GPU, loading happens on the
  CPU first (except QLoRA).
"""


def read_sections(path: Path) -> dict[str, str]:
    """The generated sections of an existing docs/estimate.md (between <!-- name --> markers)."""
    if not path.exists():
        return {}
    text, found = path.read_text(), {}
    for name in ("cpu", "layer", "seeds", "gpu"):
        marker = f"<!-- {name} -->"
        if text.count(marker) == 2:
            found[name] = text.split(marker)[1].strip("\n")
    return found


def write_doc(sections: dict[str, str]) -> None:
    old = read_sections(DOC)
    merged = {**old, **{k: v for k, v in sections.items() if v}}
    gpu = merged.get("gpu") or ("**Not yet run**: this machine has no GPU. `python benchmarks/bench_estimate.py "
                                "--gpu` fills this section on a CUDA machine (random-init bf16 models of "
                                "0.5B-7B from the presets, SFT/DPO/GRPO, estimate vs `torch.cuda.max_memory_"
                                "allocated`).")

    def block(name: str, body: str) -> str:
        return f"<!-- {name} -->\n{body}\n<!-- {name} -->"

    doc = "\n".join([
        INTRO, block("cpu", merged.get("cpu", "(not run yet)")), "", CPU_NOTE, "",
        "### The per-layer formula against autograd", "",
        "Bytes that `torch.autograd.graph.saved_tensors_hooks` sees for one middle decoder layer (3 layers "
        "minus 1, halved) and what `layer_activation_bytes` says:", "",
        block("layer", merged.get("layer", "(not run yet)")), "",
        SEEDS_TEXT, block("seeds", merged.get("seeds", "(not run yet)")), "", seeds_discussion(),
        seed_example(), "",
        "## Accuracy on a GPU", "", block("gpu", gpu), "", LIMITS,
        "Regenerate: `python benchmarks/bench_estimate.py` (CPU cases, layer check, seeds; about "
        "15-30 minutes on 2 busy cores) and, on a CUDA machine, `python benchmarks/bench_estimate.py --gpu`.", ""])
    DOC.write_text(doc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--gpu-measure", help=argparse.SUPPRESS)
    parser.add_argument("--only", help="run only the CPU cases whose name contains this")
    parser.add_argument("--no-cpu", action="store_true", help="skip the CPU measurements (layer check and seeds only)")
    parser.add_argument("--gpu", action="store_true", help="measure on this machine's GPU instead (needs CUDA)")
    args = parser.parse_args(argv)
    if args.measure:
        measure_main(args.measure)
        return 0
    if args.gpu_measure:
        gpu_measure_main(args.gpu_measure)
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sections: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="alignkit-bench-estimate-") as tmp:
        if args.gpu:
            sections["gpu"] = run_gpu_cases(Path(tmp))
        else:
            if not args.no_cpu:
                previous = read_sections(DOC).get("cpu", "")
                sections["cpu"] = cpu_section(run_cpu_cases(Path(tmp), args.only), previous)
            sections["layer"] = layer_section()
            sections["seeds"] = seeds_section()
    write_doc(sections)
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
