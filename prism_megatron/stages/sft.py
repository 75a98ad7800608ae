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
from prism_megatron.data.rows import row_sources
from prism_megatron.data.sampler import ResumableSampler
from prism_megatron.data.sft import (SKIP_CHECK_MIN_ROWS, EncodeLimits, SFTDataset, SkipMonitor,
                                     StepRequests, StepShard, StepShards, StepTotals, agree_step,
                                     gather_reasons, pad_step, step_loader)
from prism_megatron.runtime import Checkpoints, Snapshot, StepResult, stage_session
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
                   segment_ids=batch["segment_ids"],
                   labels=batch["labels"].clamp(min=0), pixel_values=batch.get("pixel_values"),
                   image_grid_thw=batch.get("image_grid_thw"))
    return output, token_loss_fn(batch["loss_mask"])


def run(cfg: PrismConfig) -> dict:
    """Train; returns the final metrics (rank-independent)."""
    from megatron.core import parallel_state as ps

    from prism_megatron.models.qwen3_vl.model import build_qwen3vl_model, load_initial_weights
    from prism_megatron.models.qwen3_vl.rope import rope_index_for_sample
    from prism_megatron.preflight import check_paths

    check_paths(cfg, "sft")   # paths, config.json, TP/PP vs heads/layers: before any work
    d = cfg.data
    with stage_session(cfg, "sft", tp=cfg.parallel.tp, pp=cfg.parallel.pp) as session:
        processor = session.processor()
        dataset = SFTDataset(row_sources(d), processor, EncodeLimits(
            d.max_prompt_length, d.max_response_length), data_cfg=d)
        log.info("SFT data: %s; %d rows, read and encoded on demand", dataset.describe(),
                 len(dataset))
        total = session.total_steps(len(dataset), d.global_batch_size)
        model, transformer_config = build_qwen3vl_model(cfg.model, cfg.parallel)
        load_initial_weights(model, cfg.model)
        trainer = Trainer(model, transformer_config, cfg.optimizer, cfg.parallel, cfg.checkpoint,
                          total, bf16=cfg.model.dtype == "bf16")
        sampler = ResumableSampler(len(dataset), seed=cfg.seed, shuffle=d.shuffle)
        position = Snapshot(sampler)     # the loader runs ahead: save where the trained step was
        monitor = SkipMonitor(d.max_skip_fraction, min_rows=min(SKIP_CHECK_MIN_ROWS, len(dataset)))
        checkpoints = Checkpoints(cfg, trainer, state={"sampler": position, "data_rows": monitor})
        start = checkpoints.resume()
        dp_group, pad_id = ps.get_data_parallel_group(), processor.tokenizer.pad_token_id
        shards = StepShards(dataset, micro_batch_size=d.micro_batch_size, packing=d.packing,
                            pad_id=pad_id,
                            position_fn=partial(rope_index_for_sample, hf_config=model.hf_config))
        requests = StepRequests(sampler, range(start + 1, total + 1), d.global_batch_size,
                                ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())
        steps = iter(step_loader(shards, requests, num_workers=d.num_workers,
                                 prefetch_steps=d.prefetch_steps))   # workers start encoding now

        def one_step(step: int) -> StepResult:
            shard = next(steps)
            batches, seq_length, totals = step_micro_batches(
                shard, micro_batch_size=d.micro_batch_size, pad_id=pad_id, group=dp_group)
            monitor.update(totals, shard)
            if monitor.exceeded():
                monitor.check(gather_reasons(monitor.reasons, dp_group))
            if totals.tokens:
                metrics = trainer.train_step(batches, sft_forward, seq_length)
            else:  # every row of the global batch was unusable: nothing to average
                log.warning("step %d: no usable row in the global batch, step skipped", step)
                metrics = {"skipped": 1.0}
            metrics["rows_skipped"] = float(monitor.skipped)
            position.at(shard.sampler_state)
            return StepResult(metrics, totals.seen - totals.skipped, totals.tokens)

        metrics = session.train_loop(
            one_step, start=start, total=total, checkpoints=checkpoints, desc="sft",
            show=("loss", "lr"), eval_interval=cfg.eval.interval,
            evaluate=session.policy_evaluator(processor, model, model.hf_config))
        read = dataset.layouts           # the files' layouts, with the rows read and skipped
        read.seen, read.skipped = monitor.seen, gather_reasons(monitor.reasons, dp_group)
        log.info("SFT data: %s", read.summary())
        session.plot(["loss", "lr", "grad_norm"], "sft_curves.png", "SFT")
        return metrics


def cli(args, overrides) -> None:
    from prism_megatron.config import load_config

    run(load_config(args.config, overrides))
