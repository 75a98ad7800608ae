"""Stage 1: multimodal SFT of the policy on Megatron (TP/PP/DP).

    prism sft CONFIG [key=value ...]
    torchrun --nproc_per_node N -m prism_megatron.cli sft CONFIG [key=value ...]

Each step takes ``data.global_batch_size`` samples from a resumable sampler; every data-parallel
rank takes its share and splits it into micro-batches of ``data.micro_batch_size`` rows (padded,
or packed when ``data.packing``), run through megatron's pipeline schedule. The loss is the
token mean over the whole global batch (see trainer.py).
"""

from __future__ import annotations

import logging
import math
from functools import partial

from prism_megatron.config import PrismConfig
from prism_megatron.data.collate import collate, pack_greedy, segment_attention_mask
from prism_megatron.data.encode import load_processor
from prism_megatron.data.sampler import ResumableSampler
from prism_megatron.data.rows import row_sources
from prism_megatron.data.sft import load_sft_samples
from prism_megatron.eval.heldout import PolicyEvaluator
from prism_megatron.metrics import plot_curves
from prism_megatron.trainer import Trainer, token_loss_fn

log = logging.getLogger("prism.sft")


def step_micro_batches(samples, indices, *, dp_rank: int, dp_size: int, micro_batch_size: int,
                       packing: bool, pad_id: int, position_fn) -> tuple[list[dict], int]:
    """This rank's micro-batches for one global batch, all padded to one sequence length (the
    pipeline schedule exchanges fixed shapes), and that length."""
    lengths = [len(samples[i].input_ids) for i in indices]
    if packing:
        capacity = max(lengths)
        rows = [[indices[j] for j in row] for row in pack_greedy(lengths, capacity)]
    else:
        rows = [[i] for i in indices]
    seq_length = math.ceil(max(sum(len(samples[i].input_ids) for i in r) for r in rows) / 8) * 8
    # Every rank must run the same number of micro-batches: pad the row list with empty rows.
    per_rank = math.ceil(len(rows) / dp_size)
    per_rank = math.ceil(per_rank / micro_batch_size) * micro_batch_size
    mine = rows[dp_rank::dp_size] + [[]] * (per_rank - len(rows[dp_rank::dp_size]))
    batches = [collate(samples, mine[k:k + micro_batch_size], pad_id=pad_id,
                       position_fn=position_fn, length=seq_length)
               for k in range(0, per_rank, micro_batch_size)]
    return batches, seq_length


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
        samples, stats = load_sft_samples(
            row_sources(cfg.data), processor, max_prompt_length=cfg.data.max_prompt_length,
            max_response_length=cfg.data.max_response_length,
            max_skip_fraction=cfg.data.max_skip_fraction, progress=ps.get_data_parallel_rank() == 0)
        log.info("data: %s", stats.summary())
        steps_per_epoch = max(1, len(samples) // cfg.data.global_batch_size)
        total_steps = cfg.train_steps or steps_per_epoch * cfg.data.epochs
        model, transformer_config = build_qwen3vl_model(cfg.model, cfg.parallel)
        load_initial_weights(model, cfg.model)
        trainer = Trainer(model, transformer_config, cfg.optimizer, cfg.parallel, cfg.checkpoint,
                          total_steps, bf16=cfg.model.dtype == "bf16")
        sampler = ResumableSampler(len(samples), seed=cfg.seed, shuffle=cfg.data.shuffle)
        resumed = trainer.maybe_resume()
        if resumed:
            sampler.load_state_dict(resumed["sampler"])
        start = resumed.get("step", 0)
        session.begin(start, total_steps)
        position_fn = partial(rope_index_for_sample, hf_config=model.hf_config)
        make_batches = partial(
            step_micro_batches, samples, dp_rank=ps.get_data_parallel_rank(),
            dp_size=ps.get_data_parallel_world_size(), micro_batch_size=cfg.data.micro_batch_size,
            packing=cfg.data.packing, pad_id=processor.tokenizer.pad_token_id,
            position_fn=position_fn)
        evaluator = PolicyEvaluator(cfg, processor)
        session.stack.callback(evaluator.shutdown)
        metrics = {}
        with session.metrics_logger(total_steps, start, desc="sft", show=("loss", "lr")) as logger:
            if start == 0 and evaluator.files:
                before = evaluator(model, model.hf_config)
                logger.log(0, before)
                log.info("before SFT: %s", before)
            for step in range(start + 1, total_steps + 1):
                logger.tick()
                indices = sampler.next_indices(cfg.data.global_batch_size)
                batches, seq_length = make_batches(indices)
                metrics = trainer.train_step(batches, sft_forward, seq_length)
                if step == total_steps and evaluator.files:
                    metrics.update(evaluator(model, model.hf_config))
                    log.info("after SFT: %s", {k: v for k, v in metrics.items() if "eval" in k})
                logger.log(step, metrics, samples=len(indices),
                           tokens=sum(len(samples[i].input_ids) for i in indices))
                session.after_step(
                    step, due=step % cfg.checkpoint.save_interval == 0 or step == total_steps,
                    save=lambda: trainer.save(step, {"sampler": sampler.state_dict()}))
        if cfg.logging.plots:
            plot_curves(cfg.logging.run_dir, ["loss", "lr", "grad_norm"], "sft_curves.png", "SFT")
        return metrics


def cli(args, overrides) -> None:
    from prism_megatron.config import load_config

    run(load_config(args.config, overrides))
