"""Critic-free policy gradient: RLOO, GRPO and REINFORCE++. One loop; the method name picks the advantage.

Per step (``training.max_steps`` counts these), on each process:

1. ``rollout_batch_size`` prompts -> ``num_samples`` responses each (the rollout engine; under ZeRO-3 it
   gathers the weights once per rollout);
2. rewards (reward model / functions / HTTP, EOS penalty, normalisation, clipping: :mod:`alignkit.rewards`);
3. without gradients, once per rollout: reference log-probs (when ``kl_coef > 0``) and the "old" policy
   log-probs (only when they can differ from the training pass: several updates per rollout, or a KL in
   the reward);
4. advantages, by method (:mod:`alignkit.losses.rl`):

   - ``rloo``: ``A_i = s_i - mean_{j != i} s_j`` over the ``k = num_samples`` samples of a prompt
     (Ahmadian et al. 2024), ``s = reward - kl_coef * sum_t KL_t`` when ``kl_penalty: reward``;
   - ``grpo``: ``A_i = (s_i - mean_group) / std_group`` (``scale_rewards: group``; ``batch`` uses the
     batch std; ``none`` no division = Dr. GRPO), KL as a k3 loss term by default (Shao et al. 2024);
   - ``reinforce_pp``: token rewards ``r_t = -kl_coef * KL_t`` (+ score at the last token), return-to-go
     with ``gamma``, then whitened over the batch (Hu 2025);

5. ``ppo_epochs`` passes of clipped-surrogate updates (``ppo_policy_loss``) over minibatches of
   ``per_device_batch_size x gradient_accumulation_steps`` rows, plus ``kl_coef * KL`` (``kl_penalty:
   loss``) and ``- entropy_coef * H``, aggregated by ``loss_agg``. With one update per rollout the ratio
   is 1 and this is REINFORCE with the method's baseline.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from alignkit.config import ConfigError, RunConfig, opt, register_method_config
from alignkit.engine import (
    Checkpointer,
    TrainState,
    build_optimizer,
    build_scheduler,
    is_bad,
    is_deepspeed,
    optimizer_update,
    prepare_frozen,
    setup_accelerator,
    zero_grad_backward,
)
from alignkit.losses.rl import (
    grpo_advantages,
    kl_estimate,
    masked_whiten,
    reinforce_pp_advantages,
    rloo_advantages,
)
from alignkit.online import (
    MetricSums,
    OnlineRLConfig,
    OnlineState,
    RolloutBatch,
    StepTimer,
    build_kl_controller,
    disable_dropout,
    global_counts,
    loss_items,
    minibatches,
    policy_terms,
    prompt_stream,
    reference_logps,
    response_forward,
    reward_metrics,
    score_rollout,
    start_run,
    step_metrics,
    step_seed,
    sub_config,
    total_steps,
    updates_per_rollout,
    write_samples,
)

logger = logging.getLogger("alignkit")

SCALE_REWARDS = ("group", "batch", "none")


@dataclass
class PGConfig(OnlineRLConfig):
    """Fields of the critic-free family (all of OnlineRLConfig: sampling, reward, KL, clipping, loss_agg)."""

    def validate(self, run: RunConfig) -> None:
        super().validate(run)
        if run.method in ("rloo", "grpo") and self.num_samples < 2:
            raise ConfigError(f"{run.method}.num_samples={self.num_samples}: the group baseline needs at least 2 "
                              "samples per prompt (e.g. 4).")


@register_method_config("rloo")
@dataclass
class RLOOConfig(PGConfig):
    num_samples: int = opt(4, "k: responses per prompt; each one's baseline is the mean reward of the other k-1.")
    kl_coef: float = opt(0.05, "KL coefficient beta; with kl_penalty reward the score becomes reward - beta * "
                               "sum_t KL_t before the leave-one-out baseline.")
    whiten_advantages: bool = opt(False, "Also whiten the leave-one-out advantages over the batch (mean 0, std 1).")


@register_method_config("grpo")
@dataclass
class GRPOConfig(PGConfig):
    num_samples: int = opt(8, "G: responses per prompt (the group whose mean, and std, normalise the rewards).")
    kl_coef: float = opt(0.04, "beta of the KL loss term (0 = no KL and no reference model).")
    kl_penalty: str = opt("loss", "loss (GRPO: beta * KL added to the loss per token) or reward (subtracted from "
                                  "the sequence reward before group normalisation).")
    kl_estimator: str = opt("k3", "k3 (GRPO's unbiased, non-negative estimator), k2 or k1.")
    loss_agg: str = opt("seq-mean-token-mean", "seq-mean-token-mean (GRPO paper), token-mean (DAPO), "
                                               "seq-mean-token-sum-norm (Dr. GRPO, with scale_rewards none).")
    scale_rewards: str = opt("group", "Advantage scale: group ((r - group mean) / group std, GRPO), batch (group "
                                      "mean, batch std) or none (r - group mean only: Dr. GRPO).")

    def validate(self, run: RunConfig) -> None:
        super().validate(run)
        if self.scale_rewards not in SCALE_REWARDS:
            raise ConfigError(f"grpo.scale_rewards={self.scale_rewards!r} is not valid; choose one of: "
                              f"{', '.join(SCALE_REWARDS)}.")


@register_method_config("reinforce_pp")
@dataclass
class ReinforcePPConfig(PGConfig):
    num_samples: int = opt(1, "Responses per prompt (REINFORCE++ needs no group; the baseline is the batch mean).")
    kl_coef: float = opt(0.01, "beta of the per-token KL penalty in the reward, r_t = -beta * KL_t (+ score at the end).")
    gamma: float = opt(1.0, "Discount of the return-to-go over response tokens (1 = undiscounted).")


# --------------------------------------------------------------------------------------------------
# The advantage estimator the method name picks
# --------------------------------------------------------------------------------------------------


def advantages(method: str, args: PGConfig, scores: torch.Tensor, kl_tokens: torch.Tensor | None,
               mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Token advantages ``[N, R]`` (0 off-mask) from final rewards ``scores`` ``[N]`` and per-token KL."""
    kl_in_reward = args.kl_penalty == "reward" and kl_tokens is not None
    mask_f = mask.to(scores.dtype)
    if method == "reinforce_pp":
        kl = kl_tokens if kl_in_reward else torch.zeros_like(mask_f)
        return reinforce_pp_advantages(scores, kl, mask, kl_coef if kl_in_reward else 0.0, gamma=args.gamma)
    seq_scores = scores - kl_coef * (kl_tokens * mask_f).sum(1) if kl_in_reward else scores
    if method == "rloo":
        adv = rloo_advantages(seq_scores, args.num_samples)
        if args.whiten_advantages:
            adv = masked_whiten(adv, torch.ones_like(adv))
    elif method == "grpo":
        adv = grpo_advantages(seq_scores, args.num_samples, scale=args.scale_rewards)
    else:
        raise ValueError(f"pg: unknown method {method!r}; rloo, grpo or reinforce_pp.")
    return adv[:, None] * mask_f


# --------------------------------------------------------------------------------------------------
# Recipe
# --------------------------------------------------------------------------------------------------


def run(cfg: RunConfig) -> dict:
    from alignkit.data import build_datasets
    from alignkit.methods.preference import load_reference
    from alignkit.models import load_model, load_tokenizer
    from alignkit.rewards import RewardConfig, build_reward
    from alignkit.rollout import GenerationConfig, build_engine
    from alignkit.tracking import Tracker

    args, t, method = cfg.method_args, cfg.training, cfg.method
    accelerator = setup_accelerator(t)
    world, rank = accelerator.num_processes, accelerator.process_index
    autocast = accelerator.autocast
    tokenizer = load_tokenizer(cfg.model)
    with accelerator.main_process_first():
        splits = build_datasets(cfg.data, tokenizer, "prompt")
    resume_from = start_run(accelerator, cfg)
    out_dir = Path(t.output_dir)

    # models: policy (full / LoRA / QLoRA), reference (frozen copy or the adapter-off policy), reward
    policy = load_model(cfg.model, tokenizer)  # first: its LoRA init draws from the seeded RNG
    if args.disable_dropout:
        disable_dropout(policy)
    # None under LoRA: the policy with its adapter switched off is the reference (reference_logps below)
    ref_model = load_reference(cfg, tokenizer, accelerator, policy)[0] if args.uses_reference else None
    reward = build_reward(sub_config(args, RewardConfig), tokenizer, accelerator.device, dtype=cfg.model.dtype,
                          prepare_model=lambda m: prepare_frozen(accelerator, m), section=method)
    kl_controller = build_kl_controller(args)

    # prompts, step counts, optimiser over every update of every rollout
    prompts = prompt_stream(splits.train, args, accelerator, t.seed, method)
    max_steps = total_steps(t, prompts.batches_per_epoch)
    n_updates = updates_per_rollout(args, t)
    minibatch_rows = t.per_device_batch_size * t.gradient_accumulation_steps
    # one update per rollout: the training forward IS the rollout policy, no separate "old" pass needed
    on_policy = args.ppo_epochs == 1 and n_updates == 1
    need_old = not on_policy or (args.uses_reference and args.kl_penalty == "reward")
    policy.train()
    optimizer = build_optimizer(policy, t)
    scheduler = build_scheduler(optimizer, t, max_steps * args.ppo_epochs * n_updates)
    model, optimizer = accelerator.prepare(policy, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    generator = build_engine(sub_config(args, GenerationConfig), tokenizer, model_name_or_path=cfg.model.name_or_path,
                             device=accelerator.device, dtype=cfg.model.dtype, seed=t.seed)
    checkpointer = Checkpointer(accelerator, model, tokenizer, cfg, OnlineState(kl_controller, reward))
    state = TrainState()
    if resume_from is not None:
        state = checkpointer.load(resume_from)
        logger.info(f"resumed from {resume_from} at step {state.step}")
    tracker = Tracker(out_dir, t.report_to, total_steps=max_steps, initial_step=state.step,
                      is_main=accelerator.is_main_process, run_name=t.run_name, wandb_project=t.wandb_project,
                      config=cfg.to_dict(), bar_keys=("reward", "kl", "loss/policy"), desc=method)
    logger.info(f"{method}: {max_steps} steps of {args.rollout_batch_size} prompts x {args.num_samples} samples x "
                f"{world} processes; {args.ppo_epochs} epoch(s) x {n_updates} update(s) per rollout")
    temperature = 0.0 if args.greedy else args.temperature
    batches = prompts.iterate(state.micro_step)
    use_ds = is_deepspeed(accelerator)
    last: dict[str, float] = {}

    while state.step < max_steps:
        timer, metrics = StepTimer(), MetricSums()
        rows = next(batches)
        state.micro_step += 1

        # 1. sample num_samples responses per prompt
        timer.mark()
        rollout = generator.generate(model, [r["prompt_ids"] for r in rows], seed=step_seed(t.seed, state.step, rank))
        timer.generation_done()

        # 2. rewards
        result = reward(rollout, rows, gather=accelerator.gather if world > 1 else None)
        batch = RolloutBatch.from_rollout(rollout)
        mask = batch.response_mask
        reward_metrics(metrics, result, rollout)

        # 3. old and reference log-probs: once per rollout, no gradients
        micro = t.per_device_batch_size
        old_logps = score_rollout(model, batch, temperature, micro, autocast=autocast).logps if need_old else None
        ref_logps = None
        if args.uses_reference:
            ref_logps = reference_logps(model, batch, temperature, micro, ref_model=ref_model, autocast=autocast)
        kl_tokens = None
        if old_logps is not None and ref_logps is not None:
            kl_tokens = kl_estimate(old_logps, ref_logps, args.kl_estimator, clamp=args.kl_clamp) * mask
            metrics.add("kl", float(kl_tokens.sum()), len(batch))

        # 4. advantages
        kl_coef = kl_controller.value
        adv = advantages(method, args, result.rewards.float(), kl_tokens, mask, kl_coef)
        metrics.add_values("advantages", adv, mask)

        # 5. ppo_epochs passes of minibatch updates
        grad_norm = None
        for epoch in range(args.ppo_epochs):
            for mb in minibatches(len(batch), minibatch_rows, step_seed(t.seed, state.step, rank, salt=1 + epoch)):
                mb = mb.to(mask.device)
                # exact normalisation: the minibatch's loss items over every micro-batch and process
                items = global_counts(accelerator, loss_items(mask[mb], args.loss_agg))[0]
                norm = items / (t.gradient_accumulation_steps * world)
                bad = False
                for idx in mb.split(micro):
                    with accelerator.accumulate(model):
                        part = batch.select(idx)
                        w, m = part.response_width, part.response_mask
                        with autocast():
                            fwd = response_forward(model, part, temperature, entropy=True,
                                                    entropy_grad=args.entropy_coef > 0)
                        old = old_logps[idx, :w] if old_logps is not None else fwd.logps.detach()
                        ref = ref_logps[idx, :w] if ref_logps is not None else None
                        if kl_tokens is None and ref is not None:  # on-policy: measure the KL here
                            kl = kl_estimate(fwd.logps.detach(), ref, args.kl_estimator, clamp=args.kl_clamp) * m
                            metrics.add("kl", float(kl.sum()), len(idx))
                        terms = policy_terms(fwd, old, adv[idx, :w], m, args, kl_coef=kl_coef, ref_logps=ref)
                        loss = terms.loss_sum / norm
                        if is_bad(accelerator, loss):
                            bad = True
                            if use_ds:
                                zero_grad_backward(accelerator, model)
                            continue
                        accelerator.backward(loss)
                        for k, (s, c) in terms.stats.items():
                            metrics.add(k, s, c)
                norm_now = optimizer_update(accelerator, model, optimizer, scheduler, state, t, bad=bad,
                                            tracker=tracker)
                grad_norm = norm_now if norm_now is not None else grad_norm

        # 6. bookkeeping: KL controller, metrics, samples, checkpoints
        state.step += 1
        state.tokens_seen += int(rollout.prompt_mask.sum() + mask.sum())
        step_metrics(metrics, timer, rollout)
        means = metrics.means(accelerator)
        if "kl" in means:
            kl_controller.update(means["kl"], len(batch) * world)
        tracker.advance()
        if state.step % t.logging_steps == 0 or state.step == max_steps:
            last = {**means, "kl_coef": kl_coef, "lr": scheduler.get_last_lr()[0],
                    "episodes": state.step * len(batch) * world,
                    "epoch": state.micro_step / prompts.batches_per_epoch}
            if grad_norm is not None:
                last["grad_norm"] = grad_norm
            tracker.log(state.step, last)
            if args.log_samples and accelerator.is_main_process:
                write_samples(out_dir / "samples.jsonl", state.step, rollout, rows, result, args.log_samples)
        if t.save_steps > 0 and state.step % t.save_steps == 0 and state.step < max_steps:
            checkpointer.save(state)

    if t.save_steps > 0:
        checkpointer.save(state)
    accelerator.wait_for_everyone()
    checkpointer.save_model(out_dir)
    tracker.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        logger.info(f"saved the trained policy to {out_dir}")
    return {"step": state.step, "train": last, "output_dir": str(out_dir), "skipped_updates": state.skipped_updates,
            "model": model, "data_stats": splits.stats}
