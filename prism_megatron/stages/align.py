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

How the two models share the processes: CO-LOCATED. Every rank holds its part of the policy and
of the discriminator, under ONE megatron layout: ``parallel.tp`` / ``parallel.pp`` for both (so
``discriminator.tp/pp`` must match) and ``discriminator.ep`` spreading the experts over
data-parallel ranks (the dense policy ignores it). Each model has its own DDP buffers, optimizer,
LR schedule and checkpoint (policy: ``checkpoint.save_dir``; discriminator:
``<checkpoint.save_dir>/discriminator``). Both stay resident (no offload): on GPUs size the pair
to fit, e.g. the 2B-4X discriminator beside a 4B/8B policy with the distributed optimizer.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import torch

from prism_megatron.algorithms.advantages import prism_advantages
from prism_megatron.algorithms.losses import discriminator_loss
from prism_megatron.config import ConfigError, OptimizerConfig, PrismConfig
from prism_megatron.models.discriminator.batching import read_scores
from prism_megatron.models.discriminator.pairs import PairSample
from prism_megatron.models.discriminator.segments import pair_segments
from prism_megatron.models.discriminator.stats import PairStats, load_metrics, reduce_load
from prism_megatron.stages.discriminator_warmup import _layout as disc_layout
from prism_megatron.stages.discriminator_warmup import describe_save_dir, plan_step, weighted
from prism_megatron.stages.rlvr import check_config as check_rl_config

log = logging.getLogger("prism.align")
DISCRIMINATOR_DIR = "discriminator"


def check_config(cfg: PrismConfig) -> None:
    check_rl_config(cfg, algorithms=("prism",))
    d = cfg.discriminator
    if not d.megatron_dir:
        raise ConfigError("discriminator.megatron_dir is empty: the warmed discriminator (the "
                          "warm-up stage's checkpoint.save_dir) or an upcycled checkpoint")
    if (d.tp, d.pp) != (cfg.parallel.tp, cfg.parallel.pp):
        raise ConfigError(f"discriminator.tp/pp = {d.tp}/{d.pp} but parallel.tp/pp = "
                          f"{cfg.parallel.tp}/{cfg.parallel.pp}: the alignment stage co-locates "
                          "both models under one layout, so they must be equal")


# ------------------------------------------------------------------------------ scoring

def vision_token_ids(hf_config) -> set[int]:
    names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    return {getattr(hf_config, n) for n in names if getattr(hf_config, n, None) is not None}


def student_tokens(samples, vision_ids: set[int], pad_id: int) -> tuple[list[list[int]], list[bool]]:
    """Response ids for the discriminator, and whether each is free of vision special tokens.
    A sampled image/video token has no image behind it: the response counts as malformed, and
    the token is replaced by the pad id so the discriminator's forward stays well-defined."""
    tokens, clean = [], []
    for s in samples:
        bad = any(t in vision_ids for t in s.token_ids)
        tokens.append([pad_id if t in vision_ids else t for t in s.token_ids])
        clean.append(not bad)
    return tokens, clean


# ------------------------------------------------------------------------------ discriminator update

def online_loss_fn(batch: dict, stats: PairStats, score_reg: float, score_clip: float):
    """Spec §3.4 per micro-batch: pairwise teacher-beats-student term over valid students (or
    the teacher-only fallback when NO rank has a valid student), plus the score regulariser over
    all real rows. Weighted by the real-row count, so the step is the row-weighted mean over
    micro-batches (the reference's micro/mini-batch scaling)."""
    n = batch["real"].numel()
    real, valid = batch["real"], batch["student_valid"]

    def loss_fn(values: torch.Tensor):
        scores = read_scores(values, batch["score_index"])
        tc, sc, tr, sr = scores.view(4, n)
        rows = int(real.sum())
        if rows == 0:   # an all-filler micro-batch: same graph, no contribution
            loss = values.sum() * 0
        else:
            loss = discriminator_loss(tc[real], sc[real], tr[real], sr[real], valid[real],
                                      score_reg=score_reg, valid_global=batch["valid_global"],
                                      score_clip=score_clip)
        stats.add_pairs(tc, sc, tr, sr, valid)
        return weighted(loss, rows, stats)

    return loss_fn


def discriminator_update(trainer, disc, pairs: list[PairSample], *, micro: int, pad_id: int,
                         score_reg: float, score_clip: float) -> dict[str, float]:
    """One optimizer step of the discriminator on this step's (teacher, student) pairs."""
    from megatron.core import parallel_state as ps

    stats = PairStats()
    plan = plan_step(pairs, list(range(len(pairs))), dp_rank=ps.get_data_parallel_rank(),
                     dp_size=ps.get_data_parallel_world_size(), micro=micro, pad_id=pad_id,
                     position_fn=disc.position_fn)

    def forward(batch, model):
        values = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       attention_mask=batch["attention_mask"], kind=batch["kind"],
                       valid_tokens=batch["valid_tokens"], pixel_values=batch.get("pixel_values"),
                       image_grid_thw=batch.get("image_grid_thw"))
        return values, online_loss_fn(batch, stats, score_reg, score_clip)

    out = trainer.train_step(plan.batches, forward, plan.seq_length)
    pair = stats.reduce()
    load = load_metrics(reduce_load(disc.take_load(), disc.config.sequence_parallel), "disc/load")
    return {"disc/loss": out["loss"], "disc/grad_norm": out["grad_norm"],
            "disc/acc_caption": pair["acc_caption"], "disc/acc_reasoning": pair["acc_reasoning"],
            "disc/gap_caption": pair["margin_caption"],
            "disc/gap_reasoning": pair["margin_reasoning"], "disc/pairs": pair["pairs"], **load}


# ------------------------------------------------------------------------------ the stage

class Discriminator:
    """The co-located discriminator: model, trainer (own optimizer), scorer."""

    def __init__(self, cfg: PrismConfig, total_steps: int, pad_id: int):
        from prism_megatron.models.discriminator.model import build_discriminator, load_discriminator
        from prism_megatron.models.discriminator.scoring import Scorer
        from prism_megatron.trainer import Trainer

        d = cfg.discriminator
        self.model, tconfig = build_discriminator(d.megatron_dir, d, cfg.model)
        self.model.set_aux_loss(d.aux_loss_coef)
        optimizer = OptimizerConfig(lr=d.lr, weight_decay=0.01, schedule="constant",
                                    warmup_ratio=0.0, clip_grad=cfg.optimizer.clip_grad)
        saving = cfg.checkpoint.enabled and cfg.checkpoint.save_dir
        save_dir = f"{cfg.checkpoint.save_dir}/{DISCRIMINATOR_DIR}" if saving else ""
        self.trainer = Trainer(self.model, tconfig, optimizer, disc_layout(cfg),
                               dataclasses.replace(cfg.checkpoint, save_dir=save_dir), total_steps,
                               bf16=cfg.model.dtype == "bf16")
        if save_dir:   # the saved directory is itself a discriminator checkpoint (export, reuse)
            describe_save_dir(d.megatron_dir, save_dir)
        self.init_dir = d.megatron_dir
        self.load = load_discriminator
        self.scorer = Scorer(self.trainer.model, pad_id, score_clip=d.score_clip)

    def resume(self, policy_step: int) -> None:
        """Load the discriminator saved at the policy's step (saved before the policy's, so it
        exists whenever the policy's does), or the initial weights at step 0."""
        from prism_megatron.checkpoint import load_checkpoint

        if policy_step == 0:
            self.load(self.model, self.init_dir)
            return
        path = Path(self.trainer.checkpoint.save_dir) / f"step_{policy_step:07d}"
        if not path.is_dir():
            raise ConfigError(f"policy checkpoint at step {policy_step} but no discriminator "
                              f"checkpoint {path}: keep checkpoint.keep_last >= 2")
        load_checkpoint(path, [self.trainer.model], self.trainer.optimizer, self.trainer.scheduler)


def score_students(disc: Discriminator, batch, tokenizer, vision_ids, pad_id):
    """Spec §3.3 scoring pass (no grad, before the update): caption / reasoning score and format
    validity per response; invalid responses score 0."""
    tokens, clean = student_tokens(batch["samples"], vision_ids, pad_id)
    prompts = [batch["prompts"][g].encoded for g in batch["group"]]
    scores = disc.scorer.score_responses(prompts, tokens, tokenizer)
    valid = scores.format_valid & torch.tensor(clean)
    zero = torch.zeros_like(scores.caption)
    return (torch.where(valid, scores.caption, zero), torch.where(valid, scores.reasoning, zero),
            valid, scores.segments)


def run(cfg: PrismConfig) -> dict:
    """Train; returns the last step's metrics (rank-independent)."""
    from prism_megatron.data.encode import load_processor
    from prism_megatron.data.rl import load_rl_prompts
    from prism_megatron.distributed import is_main_rank
    from prism_megatron.eval.heldout import PolicyEvaluator
    from prism_megatron.metrics import plot_curves
    from prism_megatron.models.discriminator.model import check_moe_layout, read_info
    from prism_megatron.preflight import check_paths
    from prism_megatron.runtime import stage_session
    from prism_megatron.stages.policy_worker import (
        open_policy, resume_policy, save_due, trained_tokens)

    check_config(cfg)
    check_paths(cfg, "align")   # paths, config.json, TP/PP vs heads/layers: before any work
    _, info = read_info(cfg.discriminator.megatron_dir)
    check_moe_layout(info["num_experts"], info["top_k"], cfg.discriminator.expert_routing,
                     tp=cfg.parallel.tp, ep=cfg.discriminator.ep,
                     dispatcher=cfg.discriminator.dispatcher)
    with stage_session(cfg, "align", tp=cfg.parallel.tp, pp=cfg.parallel.pp,
                       ep=cfg.discriminator.ep) as session:
        stack = session.stack
        processor = load_processor(cfg.model.hf_dir, cfg.data.min_pixels, cfg.data.max_pixels)
        tokenizer, pad_id = processor.tokenizer, processor.tokenizer.pad_token_id
        dataset, _ = load_rl_prompts(cfg.data.train_files, processor,
                                     max_prompt_length=cfg.data.max_prompt_length,
                                     require=("teacher_caption", "teacher_cot"),
                                     max_skip_fraction=cfg.data.max_skip_fraction,
                                     progress=is_main_rank(), data_cfg=cfg.data)
        teachers = [pair_segments(p.teacher["teacher_caption"], p.teacher["teacher_cot"],
                                  tokenizer, p.answer) for p in dataset]
        worker, sampler, total = open_policy(cfg, processor, len(dataset), stack)
        disc = Discriminator(cfg, total, pad_id)
        vision_ids = vision_token_ids(worker.hf_config)
        start = resume_policy(worker, sampler)
        disc.resume(start)
        session.begin(start, total)
        evaluator = PolicyEvaluator(cfg, processor)
        stack.callback(evaluator.shutdown)
        a, n = cfg.algorithm, cfg.rollout.n
        metrics = {}
        with session.metrics_logger(total, start, desc="align", show=(
                "disc/acc_caption", "disc/acc_reasoning", "format_rate")) as logger:
            if start == 0 and evaluator.files:
                logger.log(0, evaluator(worker.model, worker.hf_config))
            for step in range(start + 1, total + 1):
                logger.tick()
                t0 = time.perf_counter()
                indices = sampler.next_indices(a.prompts_per_step)
                prompts = [dataset[i] for i in indices]
                samples = worker.generate(prompts, step)
                group = [g for g in range(len(prompts)) for _ in range(n)]
                batch = {"prompts": prompts, "samples": samples, "group": group}
                t1 = time.perf_counter()
                caption, reasoning, valid, segments = score_students(
                    disc, batch, tokenizer, vision_ids, pad_id)
                advantages = prism_advantages(
                    caption, reasoning, valid, group, caption_weight=a.caption_weight,
                    reasoning_weight=a.reasoning_weight, format_penalty=a.format_penalty).float()
                t2 = time.perf_counter()
                metrics = {"time/rollout_s": t1 - t0, "time/score_s": t2 - t1,
                           **student_metrics(samples, caption, reasoning, valid, advantages)}
                metrics.update(worker.train(prompts, samples, group, advantages))
                t3 = time.perf_counter()
                pairs = [PairSample(f"{step}-{i}", prompts[g].encoded, teachers[indices[g]],
                                    _student(segments[i], valid[i]))
                         for i, g in enumerate(group)]
                metrics.update(discriminator_update(
                    disc.trainer, disc.model, pairs, micro=cfg.data.micro_batch_size,
                    pad_id=pad_id, score_reg=cfg.discriminator.score_reg,
                    score_clip=cfg.discriminator.score_clip))
                metrics["time/disc_update_s"] = time.perf_counter() - t3
                metrics["time/sync_s"] = worker.sync()
                if step == total and evaluator.files:
                    metrics.update(evaluator(worker.model, worker.hf_config))
                logger.log(step, metrics, samples=len(samples),
                           tokens=trained_tokens(prompts, samples, group))

                def save():
                    disc.trainer.save(step)   # first: a policy step always has its discriminator
                    return worker.trainer.save(step, {"sampler": sampler.state_dict()})

                session.after_step(step, due=save_due(cfg, step, total), save=save)
        if cfg.logging.plots:
            plot_curves(cfg.logging.run_dir, ["disc/acc_caption", "disc/acc_reasoning",
                                              "score_caption", "score_reasoning", "format_rate"],
                        "align_curves.png", "PRISM alignment")
        return metrics


def _student(segments, valid) -> object:
    """The scored segments, marked invalid when the response was (e.g. a sampled vision token)."""
    return segments if bool(valid) or not segments.valid else dataclasses.replace(segments,
                                                                                  valid=False)


def student_metrics(samples, caption, reasoning, valid, advantages) -> dict[str, float]:
    """Teacher-likeness of the policy (mean discriminator scores of its valid responses), format
    rate, advantage and length statistics."""
    lengths = torch.tensor([len(s) for s in samples], dtype=torch.float32)
    v = valid.bool()
    count = max(int(v.sum()), 1)
    return {"score_caption": float(caption[v].sum()) / count,
            "score_reasoning": float(reasoning[v].sum()) / count,
            "format_rate": float(v.float().mean()),
            "adv_mean": float(advantages.mean()), "adv_std": float(advantages.std()),
            "adv_min": float(advantages.min()), "adv_max": float(advantages.max()),
            "response_len_mean": float(lengths.mean()), "response_len_max": float(lengths.max()),
            "response_clipped": sum(s.finish_reason == "length" for s in samples) / len(samples)}


def cli(args, overrides) -> None:
    from prism_megatron.config import load_config

    run(load_config(args.config, overrides))
