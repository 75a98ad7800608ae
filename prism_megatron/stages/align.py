"""Stage 2: PRISM distribution alignment: response-level adversarial on-policy distillation
(spec §1.2-1.3, §2.3, §3.3-3.5, §4).

    prism align CONFIG [key=value ...]
    torchrun --nproc_per_node N -m prism_megatron.cli align CONFIG [key=value ...]

One step: ``algorithm.prompts_per_step`` prompts (each with its teacher caption and reasoning)
-> ``rollout.n`` policy samples each -> every response split into its perception (caption) and
reasoning segments at token level -> discriminator scores of both segments, no grad, BEFORE the
discriminator update (invalid responses score 0 and are flagged) -> ``prism_advantages`` ->
policy update (clipped ratio, token-mean, no KL) -> discriminator update on the same batch
(teacher segments vs every student of the prompt, pairwise loss with the score regulariser;
invalid students out of the pairwise term; the valid count is summed over data-parallel ranks) ->
weight sync -> log and checkpoint. No teacher logits anywhere.

Observing the game, every step: the within-group spread of the scores and the share of flat
groups (``spread/*``, ``adv/flat_groups``: a saturated judge leaves group normalisation ranking
noise), the ground-truth fidelity of the step's own samples when every prompt carries the
synthetic task's ``meta`` (``fidelity/*``), and with ``eval.probe_rows`` the policy's NLL of fixed
teacher demonstrations after its update (``probe/*``, ``rl/probe.py``). ``discriminator.frozen``
is the ablation without the discriminator update: no optimizer is built, the same pair
statistics (``disc/acc_*``, ``disc/gap_*``, ``disc/loss``) are computed forward-only on the step's
pairs, and nothing is saved for it (a resumed run reloads ``discriminator.megatron_dir``).

How the two models share the processes: CO-LOCATED. Every rank holds its part of the policy and
of the discriminator, under ONE megatron layout: ``parallel.tp`` / ``parallel.pp`` for both (so
``discriminator.tp/pp`` must match) and ``discriminator.ep`` spreading the experts over
data-parallel ranks (the dense policy ignores it). Each model has its own DDP buffers, optimizer,
LR schedule and checkpoint (policy: ``checkpoint.save_dir``; discriminator:
``<checkpoint.save_dir>/discriminator``, saved first at the policy's steps). Both stay resident
(no offload): on GPUs size the pair to fit, e.g. the 2B-4X discriminator beside a 4B/8B policy
with the distributed optimizer.
"""

from __future__ import annotations

import logging
import time

from prism_megatron.algorithms.advantages import group_spread, prism_advantages
from prism_megatron.config import ConfigError, PrismConfig
from prism_megatron.data.sampler import ResumableSampler
from prism_megatron.data.segments import pair_segments
from prism_megatron.rl.discriminator import (
    Discriminator, check_discriminator, online_pairs, vision_token_ids)
from prism_megatron.rl.policy import Policy, check_rl_config, response_metrics
from prism_megatron.rl.probe import make_probe
from prism_megatron.rl.timing import StepTimer
from prism_megatron.runtime import Checkpoints, StepResult, stage_session

log = logging.getLogger("prism.align")


def check_config(cfg: PrismConfig) -> None:
    check_rl_config(cfg, ("prism",))
    if cfg.algorithm.off_policy_steps:
        raise ConfigError("algorithm.off_policy_steps=1 is implemented for RLVR only: the "
                          "alignment step's discriminator update would also have to run a step "
                          "behind its scores; use algorithm.off_policy_steps=0")
    d = cfg.discriminator
    if not d.megatron_dir:
        raise ConfigError("discriminator.megatron_dir is empty: the warmed discriminator (the "
                          "warm-up stage's checkpoint.save_dir) or an upcycled checkpoint")
    if (d.tp, d.pp) != (cfg.parallel.tp, cfg.parallel.pp):
        raise ConfigError(f"discriminator.tp/pp = {d.tp}/{d.pp} but parallel.tp/pp = "
                          f"{cfg.parallel.tp}/{cfg.parallel.pp}: the alignment stage co-locates "
                          "both models under one layout, so they must be equal")


def student_metrics(batch) -> dict[str, float]:
    """Teacher-likeness of the policy (mean discriminator scores of its valid responses), format
    rate, advantage, score-spread and length statistics, and the samples' fidelity. The batch
    is broadcast (every rank holds every sample), so these are the same on every rank."""
    v = batch.valid.bool()
    count = max(int(v.sum()), 1)
    adv = batch.advantages
    spread = group_spread(batch.caption, batch.reasoning, v, batch.group, adv)
    return {"score_caption": float(batch.caption[v].sum()) / count,
            "score_reasoning": float(batch.reasoning[v].sum()) / count,
            "format_rate": float(v.float().mean()),
            "adv_mean": float(adv.mean()), "adv_std": float(adv.std()),
            "adv_min": float(adv.min()), "adv_max": float(adv.max()),
            "spread/caption": spread["caption"], "spread/reasoning": spread["reasoning"],
            "adv/flat_groups": spread["flat_groups"],
            **response_metrics(batch), **fidelity_metrics(batch)}


def fidelity_metrics(batch) -> dict[str, float]:
    """``fidelity/<key>`` of the step's samples against their rows' ground truth
    (``eval/fidelity.py``), only when every prompt has the synthetic task's ``meta``."""
    from prism_megatron.eval.fidelity import FIDELITY_KEYS, score_fidelity, summarize_fidelity

    if not batch.prompts or any(getattr(p, "meta", None) is None for p in batch.prompts):
        return {}
    summary = summarize_fidelity([score_fidelity(s.text, batch.prompt_of(i).meta,
                                                 batch.prompt_of(i).answer)
                                  for i, s in enumerate(batch.samples)])
    return {f"fidelity/{k}": v for k in FIDELITY_KEYS if (v := summary[k]) is not None}


def run(cfg: PrismConfig) -> dict:
    """Train; returns the last step's metrics (rank-independent)."""
    from prism_megatron.data.rl import load_rl_prompts
    from prism_megatron.distributed import is_main_rank
    from prism_megatron.preflight import check_paths

    check_config(cfg)
    check_paths(cfg, "align")   # paths, config.json, TP/PP vs heads/layers: before any work
    check_discriminator(cfg, tp=cfg.parallel.tp)
    a = cfg.algorithm
    with stage_session(cfg, "align", tp=cfg.parallel.tp, pp=cfg.parallel.pp,
                       ep=cfg.discriminator.ep) as session:
        processor = session.processor()
        tokenizer = processor.tokenizer
        dataset, _ = load_rl_prompts(cfg.data.train_files, processor,
                                     max_prompt_length=cfg.data.max_prompt_length,
                                     require=("teacher_caption", "teacher_cot"),
                                     max_skip_fraction=cfg.data.max_skip_fraction,
                                     progress=is_main_rank(), data_cfg=cfg.data)
        teachers = [pair_segments(p.teacher["teacher_caption"], p.teacher["teacher_cot"],
                                  tokenizer, p.answer) for p in dataset]
        total = session.total_steps(len(dataset), a.prompts_per_step)
        policy = Policy(cfg, processor, total)
        session.cleanup(policy.shutdown)
        disc = Discriminator.for_alignment(cfg, total, tokenizer.pad_token_id)
        vision_ids = vision_token_ids(policy.hf_config)
        probe = make_probe(cfg, dataset, tokenizer, policy.hf_config)
        sampler = ResumableSampler(len(dataset), seed=cfg.seed, shuffle=cfg.data.shuffle)
        checkpoints = Checkpoints(cfg, policy.trainer, state={"sampler": sampler},
                                  companions=(disc,))
        start = checkpoints.resume()
        policy.sync()      # the engine loaded model.hf_dir: give it the trainer's weights

        def one_step(step: int) -> StepResult:
            timer = StepTimer()
            indices = sampler.next_indices(a.prompts_per_step)
            start = time.perf_counter()
            batch = policy.generate([dataset[i] for i in indices], step, version=step - 1)
            timer.add("rollout", time.perf_counter() - start, int(batch.response_lengths().sum()))
            with timer.phase("score"):
                disc.score(batch, tokenizer, vision_ids)     # before the discriminator's update
                batch.advantages = prism_advantages(
                    batch.caption, batch.reasoning, batch.valid, batch.group,
                    caption_weight=a.caption_weight, reasoning_weight=a.reasoning_weight,
                    format_penalty=a.format_penalty).float()
            metrics = student_metrics(batch)
            metrics.update(policy.train(batch, timer))
            if probe is not None:
                with timer.phase("probe", tokens=probe.batch.tokens()):
                    metrics.update(probe.nll(policy.model))
            with timer.phase("disc_update"):
                pairs = online_pairs(batch, [teachers[i] for i in indices], step)
                metrics.update(disc.online_step(pairs, batch.group))
            timer.add("sync", policy.sync())
            metrics.update(timer.metrics())
            return StepResult(metrics, len(batch), batch.tokens())

        metrics = session.train_loop(
            one_step, start=start, total=total, checkpoints=checkpoints, desc="align",
            show=("disc/acc_caption", "disc/acc_reasoning", "format_rate"),
            eval_interval=cfg.eval.interval,
            evaluate=session.policy_evaluator(processor, policy.model, policy.hf_config,
                                              engine=policy.engine, shared=True))
        session.plot(["disc/acc_caption", "disc/acc_reasoning", "score_caption",
                      "score_reasoning", "format_rate", "spread/caption", "spread/reasoning",
                      "adv/flat_groups", "fidelity/perception_precision",
                      "fidelity/reasoning_precision", "probe/nll_caption",
                      "probe/nll_reasoning"], "align_curves.png", "PRISM alignment")
        return metrics


def cli(args, overrides) -> None:
    from prism_megatron.config import load_config

    run(load_config(args.config, overrides))
