"""Stage 1: multimodal SFT of the policy on Megatron (TP/PP/DP).

    prism sft CONFIG [key=value ...]
    torchrun --nproc_per_node N -m prism_megatron.cli sft CONFIG [key=value ...]

Each step takes ``data.global_batch_size`` row indices from a resumable sampler (identical on
every rank); every data-parallel rank reads and encodes only its share, in ``data.num_workers``
DataLoader processes (data/sft.py), and splits it into micro-batches of ``data.micro_batch_size``
rows (padded, or packed when ``data.packing``) run through megatron's pipeline schedule. The loss
is the token mean over the whole global batch (see trainer.py); an unusable row is dropped from its
step, so that step's mean is over the rows that remain.
"""

from __future__ import annotations

import logging
from functools import partial

from prism_megatron.config import PrismConfig
from prism_megatron.data.collate import segment_attention_mask
from prism_megatron.data.encode import load_processor
from prism_megatron.data.sampler import ResumableSampler
from prism_megatron.data.rows import row_sources
from prism_megatron.data.sft import (SKIP_CHECK_MIN_ROWS, EncodeLimits, SFTDataset, SkipMonitor,
                                     StepRequests, StepShard, StepShards, StepTotals, agree_step,
                                     gather_reasons, pad_step, step_loader)
from prism_megatron.eval.heldout import PolicyEvaluator
from prism_megatron.metrics import plot_curves
from prism_megatron.trainer import Trainer, token_loss_fn

log = logging.getLogger("prism.sft")


def step_micro_batches(shard: StepShard, *, micro_batch_size: int, pad_id: int,
                       group=None) -> tuple[list[dict], int, StepTotals]:
    """This rank's micro-batches for one step, all padded to one sequence length and as many
    as on every other data-parallel rank (the pipeline schedule exchanges fixed shapes): one
    all-gather of (length, micro-batches, rows seen/skipped, tokens) over ``group``."""
    totals = agree_step(shard, group)
    batches = pad_step(shard, totals, micro_batch_size=micro_batch_size, pad_id=pad_id)
    return batches, totals.seq_length, totals


def sft_forward(batch: dict, model):
    """Megatron forward step: per-token LM loss on the response tokens."""
    output = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                   attention_mask=segment_attention_mask(batch["segment_ids"]),
                   labels=batch["labels"].clamp(min=0), pixel_values=batch.get("pixel_values"),
                   image_grid_thw=batch.get("image_grid_thw"))
    return output, token_loss_fn(batch["loss_mask"])


def run(cfg: PrismConfig) -> dict:
    """Train; returns the final metrics (rank-independent)."""
    from prism_megatron.preflight import check_paths

    check_paths(cfg, "sft")   # paths, config.json, TP/PP vs heads/layers: before any work
    from megatron.core import parallel_state as ps

    from prism_megatron.models.qwen3_vl.model import build_qwen3vl_model, load_initial_weights
    from prism_megatron.models.qwen3_vl.rope import rope_index_for_sample
    from prism_megatron.runtime import stage_session

    with stage_session(cfg, "sft", tp=cfg.parallel.tp, pp=cfg.parallel.pp) as session:
        processor = load_processor(cfg.model.hf_dir, cfg.data.min_pixels, cfg.data.max_pixels)
        dataset = SFTDataset(row_sources(cfg.data), processor, EncodeLimits(
            cfg.data.max_prompt_length, cfg.data.max_response_length), data_cfg=cfg.data)
        log.info("SFT data: %s; %d rows, read and encoded on demand", dataset.describe(),
                 len(dataset))
        steps_per_epoch = max(1, len(dataset) // cfg.data.global_batch_size)
        total_steps = cfg.train_steps or steps_per_epoch * cfg.data.epochs
        model, transformer_config = build_qwen3vl_model(cfg.model, cfg.parallel)
        load_initial_weights(model, cfg.model)
        trainer = Trainer(model, transformer_config, cfg.optimizer, cfg.parallel, cfg.checkpoint,
                          total_steps, bf16=cfg.model.dtype == "bf16")
        sampler = ResumableSampler(len(dataset), seed=cfg.seed, shuffle=cfg.data.shuffle)
        monitor = SkipMonitor(cfg.data.max_skip_fraction,
                              min_rows=min(SKIP_CHECK_MIN_ROWS, len(dataset)))
        resumed = trainer.maybe_resume()
        if resumed:
            sampler.load_state_dict(resumed["sampler"])
            monitor.load_state_dict(resumed.get("data_rows", {}))
        start = resumed.get("step", 0)
        session.begin(start, total_steps)
        dp_group = ps.get_data_parallel_group()
        pad_id = processor.tokenizer.pad_token_id
        shards = StepShards(dataset, micro_batch_size=cfg.data.micro_batch_size,
                            packing=cfg.data.packing, pad_id=pad_id,
                            position_fn=partial(rope_index_for_sample, hf_config=model.hf_config))
        requests = StepRequests(sampler, range(start + 1, total_steps + 1),
                                cfg.data.global_batch_size, ps.get_data_parallel_rank(),
                                ps.get_data_parallel_world_size())
        loader = step_loader(shards, requests, num_workers=cfg.data.num_workers,
                             prefetch_steps=cfg.data.prefetch_steps)
        steps = iter(loader)  # workers start encoding now, overlapping the first evaluation
        evaluator = PolicyEvaluator(cfg, processor)
        session.stack.callback(evaluator.shutdown)
        metrics = {}
        with session.metrics_logger(total_steps, start, desc="sft", show=("loss", "lr")) as logger:
            if start == 0 and evaluator.files:
                before = evaluator(model, model.hf_config)
                logger.log(0, before)
                log.info("before SFT: %s", before)
            logger.tick()
            for shard in steps:       # (the clock includes waiting for the data workers)
                step = shard.step
                batches, seq_length, totals = step_micro_batches(
                    shard, micro_batch_size=cfg.data.micro_batch_size, pad_id=pad_id,
                    group=dp_group)
                monitor.update(totals, shard)
                if monitor.exceeded():
                    monitor.check(gather_reasons(monitor.reasons, dp_group))
                if totals.tokens:
                    metrics = trainer.train_step(batches, sft_forward, seq_length)
                else:  # every row of the global batch was unusable: nothing to average
                    log.warning("step %d: no usable row in the global batch, step skipped", step)
                    metrics = {"skipped": 1.0}
                metrics["rows_skipped"] = float(monitor.skipped)
                if step == total_steps and evaluator.files:
                    metrics.update(evaluator(model, model.hf_config))
                    log.info("after SFT: %s", {k: v for k, v in metrics.items() if "eval" in k})
                logger.log(step, metrics, samples=totals.seen - totals.skipped,
                           tokens=totals.tokens)
                session.after_step(
                    step, due=step % cfg.checkpoint.save_interval == 0 or step == total_steps,
                    save=lambda: trainer.save(step, {"sampler": shard.sampler_state,
                                                     "data_rows": monitor.state_dict()}))
                logger.tick()
        read = dataset.layouts           # the files' layouts, with the rows read and skipped
        read.seen, read.skipped = monitor.seen, gather_reasons(monitor.reasons, dp_group)
        log.info("SFT data: %s", read.summary())
        if cfg.logging.plots:
            plot_curves(cfg.logging.run_dir, ["loss", "lr", "grad_norm"], "sft_curves.png", "SFT")
        return metrics


def cli(args, overrides) -> None:
    from prism_megatron.config import load_config

    run(load_config(args.config, overrides))
