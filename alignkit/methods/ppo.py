"""PPO for language models (Ziegler et al. 2019; Ouyang et al. 2022, InstructGPT), with a learned critic.

Models: the policy (full / LoRA / QLoRA); a critic (``critic_init: policy`` or ``reward_model``); a reference
for the KL (a frozen copy, ``ppo.ref_model``, or the policy with its adapter off under LoRA); the reward
sources of :mod:`alignkit.rewards`. Policy and critic are one module (:class:`PolicyAndCritic`) for
accelerate / DeepSpeed: one engine, one optimizer, one checkpoint.

The critic is an ``AutoModelForSequenceClassification`` (one output) of the critic checkpoint: its
backbone runs over ``[prompt | response]`` and its score head is applied at *every* position, giving
``V(s_t)`` at the positions whose logits predict each response token. ``critic_init: policy`` starts the
head at zero (values 0, nothing random in the first advantages); ``reward_model`` starts from the reward
model (InstructGPT), which then has to share the policy's tokenizer and be a causal (decoder) model.

Per step, on each process:

1. ``rollout_batch_size`` prompts -> ``num_samples`` responses each (rollout engine; ZeRO-3 gathers the
   weights once per rollout), then rewards (EOS penalty, normalisation, clipping: ``alignkit.rewards``);
2. without gradients, once per rollout: old log-probs and values, reference log-probs;
3. token rewards ``r_t = -kl_coef * KL_t`` plus the score at the last token (``kl_penalty: reward``, k1 by
   default; with ``kl_penalty: loss`` the KL goes to the loss instead), GAE(gamma, lam) -> advantages and
   returns, advantages whitened (``whiten_advantages``);
4. ``ppo_epochs`` passes over shuffled minibatches: clipped surrogate (``clip_eps``, ``clip_eps_high``)
   + ``vf_coef`` * clipped value loss (``value_clip``, ``value_clip_range``) - ``entropy_coef`` * entropy
   [+ ``kl_coef`` * KL];
5. adaptive KL (``kl_target``, ``kl_horizon``) moves ``kl_coef`` towards the target KL per sequence.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from alignkit.config import ConfigError, RunConfig, opt, register_method_config
from alignkit.engine import (
    CONFIG_FILE,
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
    zero_stage,
)
from alignkit.losses.rl import gae, kl_estimate, masked_whiten, per_token_rewards, value_loss
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

CRITIC_INITS = ("policy", "reward_model")
CRITIC_DIR = "critic"
_VALUE_HEADS = ("score", "classifier")


@register_method_config("ppo")
@dataclass
class PPOConfig(OnlineRLConfig):
    ppo_epochs: int = opt(4, "Optimisation passes over EACH rollout batch (not training.num_epochs, which counts "
                             "passes over the prompt set).")
    critic_init: str = opt("policy", "Critic weights: policy (the policy checkpoint + a zero value head) or "
                                     "reward_model (the reward model; needs the policy's tokenizer).")
    gamma: float = opt(1.0, "GAE discount over response tokens (1 = undiscounted; the reward comes at the end).")
    lam: float = opt(0.95, "GAE lambda: 1 = Monte-Carlo returns (high variance), 0 = one-step TD (high bias).")
    whiten_advantages: bool = opt(True, "Whiten the advantages over the rollout batch (mean 0, std 1) before the loss.")
    vf_coef: float = opt(0.1, "Weight of the value loss in the total loss.")
    value_clip: bool = opt(True, "Clip the value loss: V may move at most value_clip_range from its rollout value.")
    value_clip_range: float = opt(0.2, "Clip range of the value loss (absolute, in reward units).")

    def validate(self, run: RunConfig) -> None:
        super().validate(run)
        if self.critic_init not in CRITIC_INITS:
            raise ConfigError(f"ppo.critic_init={self.critic_init!r} is not valid; choose one of: "
                              f"{', '.join(CRITIC_INITS)}.")
        if self.critic_init == "reward_model" and not self.reward_model:
            raise ConfigError("ppo.critic_init=reward_model but ppo.reward_model is not set; set it, or use "
                              "ppo.critic_init=policy.")
        for key, ok, rule in [("gamma", 0 <= self.gamma <= 1, "in [0, 1]"), ("lam", 0 <= self.lam <= 1, "in [0, 1]"),
                              ("vf_coef", self.vf_coef >= 0, ">= 0"),
                              ("value_clip_range", self.value_clip_range > 0, "> 0")]:
            if not ok:
                raise ConfigError(f"ppo.{key}={getattr(self, key)!r}: must be {rule}.")


# --------------------------------------------------------------------------------------------------
# The critic: a sequence classifier's backbone + score head, applied per token
# --------------------------------------------------------------------------------------------------


def _classifier(model):
    """The ``AutoModelForSequenceClassification`` inside a (PEFT-wrapped) critic."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def value_head(model) -> torch.nn.Module:
    inner = _classifier(model)
    for name in _VALUE_HEADS:
        head = getattr(inner, name, None)
        if isinstance(head, torch.nn.Module):
            return head
    raise ConfigError(f"the critic {type(inner).__name__} has no score/classifier head; use a causal-LM backbone "
                      "loaded as AutoModelForSequenceClassification (ppo.critic_init=policy always works).")


def critic_values(critic, input_ids, attention_mask, position_ids, keep: int) -> torch.Tensor:
    """``V(s_t)`` ``[B, keep]`` at the last ``keep`` positions (all when 0): the backbone's hidden states
    through the one-output score head, at every position instead of only the last one."""
    inner = _classifier(critic)
    backbone = getattr(inner, inner.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=False).last_hidden_state
    hidden = hidden[:, -keep:] if keep else hidden
    return value_head(critic)(hidden).squeeze(-1)


@dataclass
class PolicyCriticOutput:
    logits: torch.Tensor
    token_values: torch.Tensor | None


class PolicyAndCritic(torch.nn.Module):
    """Policy and critic as one module: one accelerate/DeepSpeed engine, one optimizer, one forward (DDP
    syncs both), one checkpoint. ``generate``, ``config``, ``generation_config`` and ``get_base_model``
    are the policy's, so the rollout engine samples from this module like from the policy itself
    (and under ZeRO-3 gathers it once per rollout)."""

    def __init__(self, policy: torch.nn.Module, critic: torch.nn.Module):
        super().__init__()
        self.policy, self.critic = policy, critic

    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep: int = 0,
                values: bool = True, **kwargs) -> PolicyCriticOutput:
        out = self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          logits_to_keep=logits_to_keep, **kwargs)
        v = critic_values(self.critic, input_ids, attention_mask, position_ids, logits_to_keep) if values else None
        return PolicyCriticOutput(logits=out.logits, token_values=v)

    def generate(self, *args, **kwargs):
        return self.policy.generate(*args, **kwargs)

    def get_base_model(self) -> torch.nn.Module:
        return self.policy.get_base_model() if hasattr(self.policy, "get_base_model") else self.policy

    @property
    def config(self):
        return self.get_base_model().config

    @property
    def generation_config(self):
        return self.get_base_model().generation_config


def _zero_(params: list[torch.nn.Parameter]) -> None:
    """Set parameters to 0, also when ZeRO-3 already partitioned them at load time."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            for p in params:
                p.data.zero_()
        return
    with torch.no_grad():
        for p in params:
            p.zero_()


def load_critic(cfg: RunConfig, tokenizer, policy) -> torch.nn.Module:
    """The trainable critic (same finetune mode as the policy), from the policy or the reward model."""
    from alignkit.models import load_model, load_tokenizer
    from alignkit.rewards import same_tokenizer

    args = cfg.method_args
    if args.critic_init == "reward_model":
        critic_cfg = dataclasses.replace(cfg.model, name_or_path=args.reward_model, gguf_file=None, revision=None,
                                         tokenizer=None, chat_template=None)
        if not same_tokenizer(load_tokenizer(critic_cfg), tokenizer):
            raise ConfigError(f"ppo.critic_init=reward_model: the reward model {args.reward_model} has its own "
                              "tokenizer, but the critic reads the policy's tokens. Use ppo.critic_init=policy (the "
                              "reward model still scores through its own tokenizer), or a reward model trained on "
                              "the policy's base model.")
        logger.info(f"ppo critic: initialised from the reward model {args.reward_model}")
    else:
        critic_cfg = cfg.model
        logger.info(f"ppo critic: the policy checkpoint {cfg.model.name_or_path} with a zero-initialised value head")
    critic = load_model(critic_cfg, tokenizer, task="seq_cls", num_labels=1)
    policy_vocab = policy.config.get_text_config().vocab_size
    critic_vocab = _classifier(critic).config.get_text_config().vocab_size
    if critic_vocab != policy_vocab or getattr(_classifier(critic).config, "is_encoder_decoder", False):
        raise ConfigError(f"ppo critic: {critic_cfg.name_or_path} has a vocabulary of {critic_vocab} tokens but the "
                          f"policy {policy_vocab}; the critic must read the policy's tokens (ppo.critic_init=policy).")
    if args.critic_init == "policy":
        _zero_(list(value_head(critic).parameters()))
    return critic


class PolicyCriticCheckpointer(Checkpointer):
    """The engine's checkpoints for :class:`PolicyAndCritic`: the HF folder holds the policy, ``critic/`` the
    critic (a normal sequence-classifier folder); optimizer, scheduler, RNG and method state as usual."""

    def save_model(self, path: Path) -> None:
        from alignkit.models import save_model

        acc = self.accelerator
        state_dict = acc.get_state_dict(self.model) if zero_stage(acc) == 3 else None  # a collective
        if acc.is_main_process:
            wrapper = acc.unwrap_model(self.model)
            for name, module, where in (("policy", wrapper.policy, path), ("critic", wrapper.critic, path / CRITIC_DIR)):
                part = None
                if state_dict is not None:
                    part = {k[len(name) + 1:]: v for k, v in state_dict.items() if k.startswith(f"{name}.")}
                save_model(module, self.tokenizer, where, state_dict=part)
            self.cfg.save(path / CONFIG_FILE)


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

    args, t = cfg.method_args, cfg.training
    accelerator = setup_accelerator(t)
    world, rank = accelerator.num_processes, accelerator.process_index
    autocast = accelerator.autocast
    tokenizer = load_tokenizer(cfg.model)
    with accelerator.main_process_first():
        splits = build_datasets(cfg.data, tokenizer, "prompt")
    resume_from = start_run(accelerator, cfg)
    out_dir = Path(t.output_dir)

    # models: policy, critic, reference, reward
    policy = load_model(cfg.model, tokenizer)  # first: its LoRA init draws from the seeded RNG
    critic = load_critic(cfg, tokenizer, policy)
    if args.disable_dropout:
        disable_dropout(policy)
        disable_dropout(critic)
    ref_model, adapter_ref = (load_reference(cfg, tokenizer, accelerator, policy) if args.uses_reference
                              else (None, False))
    reward = build_reward(sub_config(args, RewardConfig), tokenizer, accelerator.device, dtype=cfg.model.dtype,
                          prepare_model=lambda m: prepare_frozen(accelerator, m), section="ppo")
    kl_controller = build_kl_controller(args)

    # prompts, step counts, one optimizer over policy + critic
    prompts = prompt_stream(splits.train, args, accelerator, t.seed, "ppo")
    max_steps = total_steps(t, prompts.batches_per_epoch)
    n_updates = updates_per_rollout(args, t)
    minibatch_rows = t.per_device_batch_size * t.gradient_accumulation_steps
    wrapper = PolicyAndCritic(policy, critic)
    wrapper.train()
    optimizer = build_optimizer(wrapper, t)
    scheduler = build_scheduler(optimizer, t, max_steps * args.ppo_epochs * n_updates)
    model, optimizer = accelerator.prepare(wrapper, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    generator = build_engine(sub_config(args, GenerationConfig), tokenizer, model_name_or_path=cfg.model.name_or_path,
                             device=accelerator.device, dtype=cfg.model.dtype, seed=t.seed)
    # vLLM syncs weights by parameter name: give it the policy, not the wrapper
    gen_model = model if args.engine == "hf" else accelerator.unwrap_model(model).policy
    checkpointer = PolicyCriticCheckpointer(accelerator, model, tokenizer, cfg, OnlineState(kl_controller, reward))
    state = TrainState()
    if resume_from is not None:
        state = checkpointer.load(resume_from)
        logger.info(f"resumed from {resume_from} at step {state.step}")
    tracker = Tracker(out_dir, t.report_to, total_steps=max_steps, initial_step=state.step,
                      is_main=accelerator.is_main_process, run_name=t.run_name, wandb_project=t.wandb_project,
                      config=cfg.to_dict(), bar_keys=("reward", "kl", "loss/policy"), desc="ppo")
    logger.info(f"ppo: {max_steps} steps of {args.rollout_batch_size} prompts x {args.num_samples} samples x "
                f"{world} processes; {args.ppo_epochs} epochs x {n_updates} update(s) per rollout")
    temperature = 0.0 if args.greedy else args.temperature
    batches = prompts.iterate(state.micro_step)
    use_ds = is_deepspeed(accelerator)
    micro = t.per_device_batch_size
    last: dict[str, float] = {}

    while state.step < max_steps:
        timer, metrics = StepTimer(), MetricSums()
        rows = next(batches)
        state.micro_step += 1

        # 1. sample, then score
        timer.mark()
        rollout = generator.generate(gen_model, [r["prompt_ids"] for r in rows],
                                     seed=step_seed(t.seed, state.step, rank))
        timer.generation_done()
        result = reward(rollout, rows, gather=accelerator.gather if world > 1 else None)
        batch = RolloutBatch.from_rollout(rollout)
        mask = batch.response_mask
        mask_f = mask.float()
        reward_metrics(metrics, result, rollout)

        # 2. old log-probs and values, reference log-probs: once per rollout, no gradients
        old = score_rollout(model, batch, temperature, micro, autocast=autocast, values=True)
        ref_logps = None
        if args.uses_reference:
            ref_logps = reference_logps(model, batch, temperature, micro, ref_model=ref_model, autocast=autocast,
                                        adapter_model=accelerator.unwrap_model(model).policy if adapter_ref else None,
                                        values=False)

        # 3. token rewards (score at the end, KL penalty per token), GAE, whitening
        kl_coef = kl_controller.value
        kl_tokens = torch.zeros_like(mask_f)
        if ref_logps is not None:
            kl_tokens = kl_estimate(old.logps, ref_logps, args.kl_estimator, clamp=args.kl_clamp) * mask_f
            metrics.add("kl", float(kl_tokens.sum()), len(batch))
        reward_kl_coef = kl_coef if args.kl_penalty == "reward" else 0.0
        token_rewards = per_token_rewards(result.rewards.float(), kl_tokens, mask, reward_kl_coef)
        advantages, returns = gae(token_rewards, old.values, mask, gamma=args.gamma, lam=args.lam)
        metrics.add_values("advantages", advantages, mask)
        metrics.add_values("values", old.values, mask)
        metrics.add_values("returns", returns, mask)
        if args.whiten_advantages:
            advantages = masked_whiten(advantages, mask)

        # 4. ppo_epochs passes of minibatch updates of policy and critic
        grad_norm = None
        for epoch in range(args.ppo_epochs):
            for mb in minibatches(len(batch), minibatch_rows, step_seed(t.seed, state.step, rank, salt=1 + epoch)):
                mb = mb.to(mask.device)
                # exact normalisation over the minibatch on every process: policy items and value tokens
                items, tokens = global_counts(accelerator, loss_items(mask[mb], args.loss_agg), mask[mb].sum())
                scale = t.gradient_accumulation_steps * world
                bad = False
                for idx in mb.split(micro):
                    with accelerator.accumulate(model):
                        part = batch.select(idx)
                        w, m = part.response_width, part.response_mask
                        with autocast():
                            fwd = response_forward(model, part, temperature, entropy=True,
                                                   entropy_grad=args.entropy_coef > 0, values=True)
                        ref = ref_logps[idx, :w] if ref_logps is not None else None
                        terms = policy_terms(fwd, old.logps[idx, :w], advantages[idx, :w], m, args, kl_coef=kl_coef,
                                             ref_logps=ref)
                        v_loss, v_clipfrac = value_loss(fwd.values, old.values[idx, :w], returns[idx, :w], m,
                                                        args.value_clip_range if args.value_clip else None)
                        n_tok = float(m.sum())
                        loss = terms.loss_sum * scale / items + args.vf_coef * v_loss * n_tok * scale / tokens
                        if is_bad(accelerator, loss):
                            bad = True
                            if use_ds:
                                zero_grad_backward(accelerator, model)
                            continue
                        accelerator.backward(loss)
                        for k, (s, c) in terms.stats.items():
                            metrics.add(k, s, c)
                        metrics.add("loss/value", float(v_loss.detach()) * n_tok, n_tok)
                        metrics.add("value_clipfrac", float(v_clipfrac) * n_tok, n_tok)
                norm_now = optimizer_update(accelerator, model, optimizer, scheduler, state, t, bad=bad,
                                            tracker=tracker)
                grad_norm = norm_now if norm_now is not None else grad_norm

        # 5. bookkeeping: KL controller, metrics, samples, checkpoints
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
        logger.info(f"saved the trained policy to {out_dir} and the critic to {out_dir / CRITIC_DIR}")
    inner = accelerator.unwrap_model(model)
    return {"step": state.step, "train": last, "output_dir": str(out_dir), "skipped_updates": state.skipped_updates,
            "model": inner.policy, "critic": inner.critic, "data_stats": splits.stats}
