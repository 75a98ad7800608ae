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

``algorithm.off_policy_steps=1``: step t+1's prompts are drawn and generated (engine thread on
the sender, weights of step t-1) while step t trains; the sync after step t waits for that
generation. Step t+1 then trains on samples one step stale (recorded per sample:
``RolloutBatch.behaviour_step``, logged as ``off_policy/staleness_*``), corrected by the TIS
weight against the recorded engine log-probs. The first step of a run and every step after a
``checkpoint.save_interval`` step generate on-policy (nothing runs ahead across a checkpoint
step), so a run resumed from any such checkpoint equals the uninterrupted run (docs/algorithm.md).
"""

from __future__ import annotations

import logging
import time

import torch
import torch.distributed as dist

from prism_megatron.algorithms.advantages import grpo_advantages
from prism_megatron.algorithms.sampling import keep_informative_groups, overlong_penalty
from prism_megatron.config import ConfigError, PrismConfig
from prism_megatron.data.sampler import ResumableSampler
from prism_megatron.distributed import shard_map
from prism_megatron.errors import PrismError
from prism_megatron.rewards.verifiable import score_responses
from prism_megatron.rl.batch import RolloutBatch, is_local
from prism_megatron.rl.policy import Policy, check_rl_config, response_metrics, samples_received
from prism_megatron.rl.timing import StepTimer
from prism_megatron.runtime import Checkpoints, Snapshot, StepResult, stage_session

log = logging.getLogger("prism.rlvr")
RLVR_ALGORITHMS = ("grpo", "dapo", "gspo")


def score(batch: RolloutBatch, cfg) -> None:
    """Rule rewards (spec §5) + DAPO's overlong term (spec §6.3) per sample, into ``batch``;
    each sample is scored on one rank and the scores are shared as scalars: a broadcast batch
    round-robin over the world (``shard_map``), a scattered one by the first tensor- and
    pipeline-parallel rank of the data-parallel rank that holds it."""
    r = cfg.rewards

    def run(indices: list[int]) -> list:
        return list(score_responses(
            [batch.samples[i].text for i in indices], [batch.prompt_of(i).answer for i in indices],
            num_workers=r.num_workers, accuracy_weight=r.accuracy_weight,
            format_weight=r.format_weight)) if indices else []

    if all(is_local(s) for s in batch.samples):
        results = shard_map(run, list(range(len(batch))))
    else:
        from megatron.core import parallel_state as ps

        scorer = (ps.get_tensor_model_parallel_rank() == 0
                  and ps.get_pipeline_model_parallel_rank() == 0)
        mine = [i for i, s in enumerate(batch.samples) if scorer and is_local(s)]
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, dict(zip(mine, run(mine))))
        merged = {i: res for part in parts for i, res in part.items()}
        results = [merged[i] for i in range(len(batch))]
    shaping = overlong_penalty(batch.response_lengths().long(), cfg.rollout.max_new_tokens,
                               r.overlong_buffer, r.overlong_penalty_factor)
    batch.rewards = torch.tensor([res.score + float(p) for res, p in zip(results, shaping)])
    batch.accuracy = torch.tensor([float(res.accuracy) for res in results])
    batch.format_ok = torch.tensor([bool(res.format_ok) for res in results])


def collect(policy, dataset, sampler, cfg, step: int, *, version: int = -1, first=None,
            timer: StepTimer | None = None) -> tuple[RolloutBatch, dict]:
    """Generation rounds until ``prompts_per_step`` groups are kept (one round without dynamic
    sampling); ``first``: round 0's batch, generated ahead (one-step-off-policy). Every rank
    computes the same thing from the samples' scalars. ``rollout`` / ``reward`` go into
    ``timer``."""
    a = cfg.algorithm
    timer = timer or StepTimer()
    kept_batches, kept = [], 0
    generated = rounds = 0
    while kept < a.prompts_per_step:
        if rounds == a.max_num_gen_batches:
            raise PrismError(
                f"dynamic sampling kept {kept}/{a.prompts_per_step} groups after "
                f"{rounds} generation rounds (algorithm.max_num_gen_batches): every other group "
                "was all-correct or all-wrong. Raise max_num_gen_batches or "
                "gen_batch_prompts, or use easier/harder prompts")
        if rounds == 0 and first is not None:
            batch = first
        else:
            count = (a.gen_batch_prompts or a.prompts_per_step) if a.dynamic_sampling \
                else a.prompts_per_step
            prompts = [dataset[i] for i in sampler.next_indices(count)]
            start = time.perf_counter()
            # Scattered unless DAPO selects groups from the rounds (the training layout is known
            # only then).
            batch = policy.generate(prompts, step, rounds, version=version,
                                    scatter=not a.dynamic_sampling)
            timer.add("rollout", time.perf_counter() - start, int(batch.response_lengths().sum()))
        with timer.phase("reward"):
            score(batch, cfg)
        keep = torch.ones(len(batch), dtype=torch.bool)
        if a.dynamic_sampling:
            keep = keep_informative_groups(batch.accuracy, batch.group)
        groups = [g for g in range(batch.num_groups)
                  if bool(keep[torch.tensor(batch.group) == g].all())]
        groups = groups[:a.prompts_per_step - kept]
        kept_batches.append(batch.select_groups(groups))
        kept += len(groups)
        generated += batch.num_groups
        rounds += 1
    return RolloutBatch.concat(kept_batches), {"gen_rounds": rounds,
                                               "groups_kept": kept / generated}


def staleness_metrics(batch: RolloutBatch, step: int) -> dict[str, float]:
    """Trained policy version (``step - 1``) minus each sample's behaviour version."""
    stale = (step - 1 - batch.behaviour_step).float()
    return {"off_policy/staleness_mean": float(stale.mean()),
            "off_policy/staleness_max": float(stale.max())}


def check_behaviour_log_probs(batch: RolloutBatch) -> None:
    """Off-policy samples need the engine's log-probs (the TIS weight's denominator); every rank
    sees the same answer (a ``RemoteSample`` carries it)."""
    for s in batch.samples:
        ok = len(s.logprobs) == len(s.token_ids) if is_local(s) else s.has_log_probs
        if not ok:
            raise ConfigError(
                "algorithm.off_policy_steps=1 needs the engine's log-prob of every sampled token, "
                f"and a {len(s)}-token sample came without them: use an engine that returns "
                "them, or algorithm.off_policy_steps=0")


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
        sampler_state = Snapshot(sampler)   # the sampler runs a step ahead when off-policy
        checkpoints = Checkpoints(cfg, policy.trainer, state={"sampler": sampler_state})
        start = checkpoints.resume()
        policy.sync()      # the engine loaded model.hf_dir: give it the trainer's weights

        engine_version = [start]   # trained steps of the weights the engine holds
        ahead: dict[int, tuple[RolloutBatch, dict]] = {}   # step -> batch generated ahead

        def one_step(step: int) -> StepResult:
            timer = StepTimer()
            first, drawn = ahead.pop(step, (None, None))
            batch, metrics = collect(policy, dataset, sampler, cfg, step,
                                     version=engine_version[0], first=first, timer=timer)
            sampler_state.at(drawn or sampler.state_dict())   # what a checkpoint here resumes
            pending = None
            if a.off_policy_steps and step < total and step % cfg.checkpoint.save_interval:
                # Step t+1 on the engine (weights of step t-1) while step t trains. Not at
                # checkpoint steps: a run resumed there regenerates t+1 on-policy, and so must
                # the uninterrupted run for the two to be equal.
                prompts = [dataset[i] for i in sampler.next_indices(a.prompts_per_step)]
                pending = policy.launch(prompts, step + 1, version=engine_version[0])
                drawn = sampler.state_dict()
            if a.off_policy_steps:
                check_behaviour_log_probs(batch)
            metrics.update(batch_metrics(batch))
            metrics.update(staleness_metrics(batch, step))
            metrics.update(samples_received(batch))
            batch.advantages = grpo_advantages(batch.rewards, batch.group,
                                               norm_by_std=a.norm_adv_by_std).float()
            metrics.update(policy.train(batch, timer))
            if pending is not None:        # never sync while the engine generates
                nxt, seconds, waited = policy.receive(pending, scatter=True)
                timer.add("wait_generation", waited)
                timer.add("rollout", seconds, int(nxt.response_lengths().sum()))
                ahead[step + 1] = (nxt, drawn)
            timer.add("sync", policy.sync())
            engine_version[0] = step
            metrics.update(timer.metrics())
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
