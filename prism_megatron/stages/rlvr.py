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
from prism_megatron.config import PrismConfig
from prism_megatron.data.sampler import ResumableSampler
from prism_megatron.distributed import shard_map
from prism_megatron.errors import PrismError
from prism_megatron.rewards.verifiable import score_responses
from prism_megatron.rl.batch import RolloutBatch
from prism_megatron.rl.policy import Policy, check_rl_config, response_metrics
from prism_megatron.runtime import Checkpoints, StepResult, stage_session

log = logging.getLogger("prism.rlvr")
RLVR_ALGORITHMS = ("grpo", "dapo", "gspo")


def score(batch: RolloutBatch, cfg) -> None:
    """Rule rewards (spec §5) + DAPO's overlong term (spec §6.3) per sample, into ``batch``;
    each sample is scored on one rank (``shard_map``) and the scores are shared."""
    r = cfg.rewards
    pairs = [(s.text, batch.prompt_of(i).answer) for i, s in enumerate(batch.samples)]
    results = shard_map(lambda part: score_responses(
        [t for t, _ in part], [a for _, a in part], num_workers=r.num_workers,
        accuracy_weight=r.accuracy_weight, format_weight=r.format_weight), pairs)
    shaping = overlong_penalty(batch.response_lengths().long(), cfg.rollout.max_new_tokens,
                               r.overlong_buffer, r.overlong_penalty_factor)
    batch.rewards = torch.tensor([res.score + float(p) for res, p in zip(results, shaping)])
    batch.accuracy = torch.tensor([float(res.accuracy) for res in results])
    batch.format_ok = torch.tensor([bool(res.format_ok) for res in results])


def collect(policy, dataset, sampler, cfg, step: int) -> tuple[RolloutBatch, dict]:
    """Generation rounds until ``prompts_per_step`` groups are kept (one round without dynamic
    sampling). Every rank computes the same thing from the broadcast samples."""
    a = cfg.algorithm
    kept_batches, kept = [], 0
    timings = {"time/rollout_s": 0.0, "time/reward_s": 0.0}
    generated = rounds = 0
    while kept < a.prompts_per_step:
        if rounds == a.max_num_gen_batches:
            raise PrismError(
                f"dynamic sampling kept {kept}/{a.prompts_per_step} groups after "
                f"{rounds} generation rounds (algorithm.max_num_gen_batches): every other group "
                "was all-correct or all-wrong. Raise max_num_gen_batches or "
                "gen_batch_prompts, or use easier/harder prompts")
        count = (a.gen_batch_prompts or a.prompts_per_step) if a.dynamic_sampling \
            else a.prompts_per_step
        prompts = [dataset[i] for i in sampler.next_indices(count)]
        start = time.perf_counter()
        batch = policy.generate(prompts, step, rounds)
        timings["time/rollout_s"] += time.perf_counter() - start
        start = time.perf_counter()
        score(batch, cfg)
        timings["time/reward_s"] += time.perf_counter() - start
        keep = torch.ones(len(batch), dtype=torch.bool)
        if a.dynamic_sampling:
            keep = keep_informative_groups(batch.accuracy, batch.group)
        groups = [g for g in range(batch.num_groups)
                  if bool(keep[torch.tensor(batch.group) == g].all())]
        groups = groups[:a.prompts_per_step - kept]
        kept_batches.append(batch.select_groups(groups))
        kept += len(groups)
        generated += len(prompts)
        rounds += 1
    return RolloutBatch.concat(kept_batches), {**timings, "gen_rounds": rounds,
                                               "groups_kept": kept / generated}


def batch_metrics(batch: RolloutBatch) -> dict[str, float]:
    return {"reward": float(batch.rewards.mean()), "accuracy": float(batch.accuracy.mean()),
            "format_rate": float(batch.format_ok.float().mean()), **response_metrics(batch)}


def run(cfg: PrismConfig) -> dict:
    """Train; returns the last step's metrics (with held-out accuracy, rank-independent)."""
    from prism_megatron.data.rl import load_rl_prompts
    from prism_megatron.distributed import is_main_rank
    from prism_megatron.preflight import check_paths

    check_rl_config(cfg, RLVR_ALGORITHMS)
    check_paths(cfg, "rlvr")   # paths, config.json, TP/PP vs heads/layers: before any work
    a = cfg.algorithm
    with stage_session(cfg, "rlvr", tp=cfg.parallel.tp, pp=cfg.parallel.pp) as session:
        processor = session.processor()
        dataset, _ = load_rl_prompts(cfg.data.train_files, processor,
                                     max_prompt_length=cfg.data.max_prompt_length,
                                     max_skip_fraction=cfg.data.max_skip_fraction,
                                     progress=is_main_rank(), data_cfg=cfg.data)
        total = session.total_steps(len(dataset), a.prompts_per_step)
        policy = Policy(cfg, processor, total)
        session.cleanup(policy.shutdown)
        sampler = ResumableSampler(len(dataset), seed=cfg.seed, shuffle=cfg.data.shuffle)
        checkpoints = Checkpoints(cfg, policy.trainer, state={"sampler": sampler})
        start = checkpoints.resume()
        policy.sync()      # the engine loaded model.hf_dir: give it the trainer's weights

        def one_step(step: int) -> StepResult:
            batch, metrics = collect(policy, dataset, sampler, cfg, step)
            metrics.update(batch_metrics(batch))
            batch.advantages = grpo_advantages(batch.rewards, batch.group,
                                               norm_by_std=a.norm_adv_by_std).float()
            metrics.update(policy.train(batch))
            metrics["time/sync_s"] = policy.sync()
            return StepResult(metrics, len(batch), batch.tokens())

        metrics = session.train_loop(
            one_step, start=start, total=total, checkpoints=checkpoints,
            desc=f"rlvr/{a.name}", show=("reward", "accuracy", "format_rate"),
            eval_interval=cfg.eval.interval,
            evaluate=session.policy_evaluator(processor, policy.model, policy.hf_config,
                                              engine=policy.engine, shared=True))
        session.plot(["reward", "accuracy", "format_rate", "entropy"], "rlvr_curves.png",
                     f"RLVR ({a.name})")
        return metrics


def cli(args, overrides) -> None:
    from prism_megatron.config import load_config

    run(load_config(args.config, overrides))
