"""Stage 3: RL with verifiable rewards: GRPO, DAPO or GSPO on Megatron (spec §1.4, §5, §6).

    prism rlvr CONFIG [key=value ...]
    torchrun --nproc_per_node N -m prism_megatron.cli rlvr CONFIG [key=value ...]

One step: ``algorithm.prompts_per_step`` prompts -> ``rollout.n`` samples each from the engine ->
rule rewards ``accuracy_weight * acc + format_weight * format`` (+ DAPO's overlong shaping) ->
DAPO dynamic sampling (drop groups whose accuracy does not vary; sample more rounds until the
batch is full) -> GRPO group-normalised advantages -> old log-probs recomputed by the Megatron
policy -> ``ppo_epochs`` x mini-batch updates with the algorithm's loss -> weight sync -> log and
checkpoint. Resuming restores the policy, optimizer, prompt order and step; rollout seeds depend
on (seed, step), so a resumed run sees the same data.
"""

from __future__ import annotations

import logging
import time

import torch

from prism_megatron.algorithms.advantages import grpo_advantages
from prism_megatron.algorithms.sampling import keep_informative_groups, overlong_penalty
from prism_megatron.config import ConfigError, PrismConfig
from prism_megatron.errors import PrismError
from prism_megatron.rewards.verifiable import score_responses

log = logging.getLogger("prism.rlvr")
RLVR_ALGORITHMS = ("grpo", "dapo", "gspo")


def check_config(cfg: PrismConfig, algorithms=RLVR_ALGORITHMS) -> None:
    """The RL-specific rules the schema cannot express; raises ConfigError with the fix."""
    a = cfg.algorithm
    if a.name not in algorithms:
        raise ConfigError(f"algorithm.name={a.name!r}: this stage runs {list(algorithms)}"
                          + (" (the alignment stage is `prism align`)" if a.name == "prism" else ""))
    if cfg.rollout.n < 2:
        raise ConfigError(f"rollout.n={cfg.rollout.n}: group-normalised advantages need at "
                          "least 2 samples per prompt")
    if a.loss_agg == "seq-mean-token-sum-norm":
        raise ConfigError("algorithm.loss_agg=seq-mean-token-sum-norm is not supported: the "
                          "Megatron loss is normalised by global token or sequence counts; use "
                          "token-mean, seq-mean-token-mean or seq-mean-token-sum")
    if a.prompts_per_step < 1 or a.ppo_epochs < 1 or a.mini_batch_prompts < 0:
        raise ConfigError("algorithm.prompts_per_step and ppo_epochs must be >= 1 and "
                          "mini_batch_prompts >= 0")
    for key in ("model.hf_dir", "model.megatron_dir"):
        section, name = key.split(".")
        if not getattr(getattr(cfg, section), name):
            raise ConfigError(f"{key} is empty (the policy to train: HF dir for the processor and "
                              "engine, Megatron checkpoint for the trainer)")


class RewardedBatch:
    """The step's groups after rewards (and dynamic sampling): prompts, samples, rewards."""

    def __init__(self):
        self.prompts, self.samples, self.group = [], [], []
        self.rewards, self.accuracy, self.format_ok = [], [], []

    def add_group(self, prompt, samples, rewards, accuracy, format_ok) -> None:
        g = len(self.prompts)
        self.prompts.append(prompt)
        self.samples += samples
        self.group += [g] * len(samples)
        self.rewards += rewards
        self.accuracy += accuracy
        self.format_ok += format_ok

    def __len__(self) -> int:
        return len(self.prompts)


def score(samples, prompts, group, cfg) -> tuple[list[float], list[float], list[bool]]:
    """Rule rewards (spec §5) + DAPO's overlong term (spec §6.3) per sample."""
    r = cfg.rewards
    results = score_responses([s.text for s in samples], [prompts[g].answer for g in group],
                              num_workers=r.num_workers, accuracy_weight=r.accuracy_weight,
                              format_weight=r.format_weight)
    lengths = torch.tensor([len(s) for s in samples])
    shaping = overlong_penalty(lengths, cfg.rollout.max_new_tokens, r.overlong_buffer,
                               r.overlong_penalty_factor)
    rewards = [res.score + float(p) for res, p in zip(results, shaping)]
    return rewards, [res.accuracy for res in results], [res.format_ok for res in results]


def collect(worker, dataset, sampler, cfg, step: int) -> tuple[RewardedBatch, dict]:
    """Generation rounds until ``prompts_per_step`` groups are kept (one round without dynamic
    sampling). Every rank computes the same thing from the broadcast samples."""
    a, n = cfg.algorithm, cfg.rollout.n
    batch, timings = RewardedBatch(), {"time/rollout_s": 0.0, "time/reward_s": 0.0}
    generated = kept = rounds = 0
    while len(batch) < a.prompts_per_step:
        if rounds == a.max_num_gen_batches:
            raise PrismError(
                f"dynamic sampling kept {len(batch)}/{a.prompts_per_step} groups after "
                f"{rounds} generation rounds (algorithm.max_num_gen_batches): every other group "
                "was all-correct or all-wrong. Raise max_num_gen_batches or "
                "gen_batch_prompts, or use easier/harder prompts")
        count = (a.gen_batch_prompts or a.prompts_per_step) if a.dynamic_sampling \
            else a.prompts_per_step
        prompts = [dataset[i] for i in sampler.next_indices(count)]
        start = time.perf_counter()
        samples = worker.generate(prompts, step, rounds)
        timings["time/rollout_s"] += time.perf_counter() - start
        start = time.perf_counter()
        group = [g for g in range(len(prompts)) for _ in range(n)]
        rewards, accuracy, format_ok = score(samples, prompts, group, cfg)
        timings["time/reward_s"] += time.perf_counter() - start
        keep = torch.ones(len(samples), dtype=torch.bool)
        if a.dynamic_sampling:
            keep = keep_informative_groups(torch.tensor(accuracy), group)
        for g, prompt in enumerate(prompts):
            span = slice(g * n, (g + 1) * n)
            if keep[span].all() and len(batch) < a.prompts_per_step:
                batch.add_group(prompt, samples[span], rewards[span], accuracy[span],
                                format_ok[span])
                kept += 1
        generated += len(prompts)
        rounds += 1
    return batch, {**timings, "gen_rounds": rounds, "groups_kept": kept / generated}


def batch_metrics(batch: RewardedBatch, max_new_tokens: int) -> dict[str, float]:
    lengths = torch.tensor([len(s) for s in batch.samples], dtype=torch.float32)
    return {"reward": sum(batch.rewards) / len(batch.rewards),
            "accuracy": sum(batch.accuracy) / len(batch.accuracy),
            "format_rate": sum(batch.format_ok) / len(batch.format_ok),
            "response_len_mean": float(lengths.mean()), "response_len_max": float(lengths.max()),
            "response_clipped": sum(s.finish_reason == "length" for s in batch.samples)
            / len(batch.samples)}


def run(cfg: PrismConfig) -> dict:
    """Train; returns the last step's metrics (with held-out accuracy, rank-independent)."""
    from prism_megatron.data.encode import load_processor
    from prism_megatron.data.rl import load_rl_prompts
    from prism_megatron.distributed import is_main_rank
    from prism_megatron.eval.heldout import PolicyEvaluator
    from prism_megatron.metrics import plot_curves
    from prism_megatron.preflight import check_paths
    from prism_megatron.runtime import stage_session
    from prism_megatron.stages.policy_worker import (
        open_policy, resume_policy, save_due, trained_tokens)

    check_config(cfg)
    check_paths(cfg, "rlvr")   # paths, config.json, TP/PP vs heads/layers: before any work
    with stage_session(cfg, "rlvr", tp=cfg.parallel.tp, pp=cfg.parallel.pp) as session:
        stack = session.stack
        processor = load_processor(cfg.model.hf_dir, cfg.data.min_pixels, cfg.data.max_pixels)
        dataset, _ = load_rl_prompts(cfg.data.train_files, processor,
                                     max_prompt_length=cfg.data.max_prompt_length,
                                     max_skip_fraction=cfg.data.max_skip_fraction,
                                     progress=is_main_rank(), data_cfg=cfg.data)
        worker, sampler, total = open_policy(cfg, processor, len(dataset), stack)
        start = resume_policy(worker, sampler)
        session.begin(start, total)
        evaluator = PolicyEvaluator(cfg, processor)
        stack.callback(evaluator.shutdown)
        metrics = {}
        with session.metrics_logger(total, start, desc=f"rlvr/{cfg.algorithm.name}",
                                    show=("reward", "accuracy", "format_rate")) as logger:
            if start == 0 and evaluator.files:
                logger.log(0, evaluator(worker.model, worker.hf_config))
            for step in range(start + 1, total + 1):
                logger.tick()
                batch, metrics = collect(worker, dataset, sampler, cfg, step)
                metrics.update(batch_metrics(batch, cfg.rollout.max_new_tokens))
                advantages = grpo_advantages(torch.tensor(batch.rewards), batch.group,
                                             norm_by_std=cfg.algorithm.norm_adv_by_std)
                metrics.update(worker.train(batch.prompts, batch.samples, batch.group,
                                            advantages.float()))
                metrics["time/sync_s"] = worker.sync()
                if step == total and evaluator.files:
                    metrics.update(evaluator(worker.model, worker.hf_config))
                logger.log(step, metrics, samples=len(batch.samples),
                           tokens=trained_tokens(batch.prompts, batch.samples, batch.group))
                session.after_step(step, due=save_due(cfg, step, total),
                                   save=lambda: worker.trainer.save(
                                       step, {"sampler": sampler.state_dict()}))
        if cfg.logging.plots:
            plot_curves(cfg.logging.run_dir, ["reward", "accuracy", "format_rate", "entropy"],
                        "rlvr_curves.png", f"RLVR ({cfg.algorithm.name})")
        return metrics


def cli(args, overrides) -> None:
    from prism_megatron.config import load_config

    run(load_config(args.config, overrides))
