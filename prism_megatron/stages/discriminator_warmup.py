"""Discriminator warm-up: pairwise teacher-vs-student training of the MoE discriminator
(spec §3.6).

    prism warmup CONFIG [key=value ...]
    torchrun --nproc_per_node N -m prism_megatron.cli warmup CONFIG [key=value ...]

Inputs: ``discriminator.megatron_dir`` (an upcycled checkpoint, tools/upcycle_discriminator.py),
``model.hf_dir`` (the policy's processor: the discriminator reads the policy's tokens),
``data.train_files`` / ``data.eval_files`` (pair files, see models/discriminator/pairs.py).
The layout is ``discriminator.{ep,pp}`` (x data parallel = the rest of the world; MoE with tp > 1
is refused), the routing ``discriminator.expert_routing`` (learned | segment).

Every step takes ``data.global_batch_size`` pairs; each data-parallel rank splits its share into
micro-batches of ``data.micro_batch_size`` pairs, one forward each over the pair's four sequences
(teacher/student x caption/reasoning). Loss per micro-batch: the mean over comparison pairs of
``softplus(-(s_T - s_S))`` (spec §3.6; ``algorithms.losses.discriminator_loss`` with the score
regulariser and clipping off, as the spec's warm-up has neither) plus
``discriminator.warmup_aux_loss_coef`` x the load-balancing loss. Format-invalid students are out
of the pairwise term; the global valid count of each micro-batch is all-reduced BEFORE the step,
so a rank whose micro-batch has no valid pair still runs the same forwards/backward as the others
and the fallback branch is chosen identically everywhere.

Reports held-out pairwise accuracy (teacher scored above student) for caption and reasoning and
the expert load per expert per segment type; ``warmup_report.json`` and ``warmup_curves.png`` go to
``logging.run_dir``.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from prism_megatron.algorithms.losses import discriminator_loss
from prism_megatron.config import ConfigError, ParallelConfig, PrismConfig
from prism_megatron.metrics import plot_curves
from prism_megatron.models.discriminator.batching import (
    collate_sequences, padded_length, read_scores)
from prism_megatron.models.discriminator.pairs import PairSample
from prism_megatron.models.discriminator.segments import CAPTION, REASONING, build_sequence
from prism_megatron.models.discriminator.stats import (
    PairStats, load_metrics, load_table, reduce_load)

log = logging.getLogger("prism.warmup")
ROLE_ORDER = (("teacher", CAPTION), ("student", CAPTION), ("teacher", REASONING),
              ("student", REASONING))   # row blocks of a micro-batch: tc, sc, tr, sr


@dataclass
class StepPlan:
    batches: list[dict]
    seq_length: int


def rank_share(indices: list[int], dp_rank: int, dp_size: int, micro: int) -> list[int | None]:
    """This rank's pairs of a global batch, padded with None (filler) to a whole number of
    micro-batches that is equal on every rank (collectives inside the forward need it)."""
    per_rank = math.ceil(math.ceil(len(indices) / dp_size) / micro) * micro
    mine = indices[dp_rank::dp_size]
    return mine + [None] * (per_rank - len(mine))


def micro_batch(pairs: list[PairSample], chosen: list[int | None], *, pad_id: int, position_fn,
                length: int) -> dict:
    """Rows: [teacher caption x n, student caption x n, teacher reasoning x n, student reasoning
    x n]. A filler slot (None) repeats a real pair with weight 0 and counts as invalid."""
    filler = next((i for i in chosen if i is not None), 0)
    real = torch.tensor([i is not None for i in chosen])
    samples = [pairs[filler if i is None else i] for i in chosen]
    seqs = [build_sequence(s.prompt, getattr(s, role).segment(kind), kind)
            for role, kind in ROLE_ORDER for s in samples]
    batch = collate_sequences(seqs, pad_id=pad_id, position_fn=position_fn, length=length)
    batch["real"] = real
    batch["student_valid"] = real & torch.tensor([s.student.valid for s in samples])
    return batch


def sequence_lengths(sample: PairSample) -> list[int]:
    n = len(sample.prompt.input_ids)
    return [n + len(getattr(sample, role).segment(kind)) for role, kind in ROLE_ORDER]


def plan_step(pairs, indices, *, dp_rank, dp_size, micro, pad_id, position_fn) -> StepPlan:
    """Micro-batches of one step, all padded to the step's longest sequence (the pipeline
    schedule exchanges fixed shapes), with each micro-batch's GLOBAL valid-pair count."""
    seq_length = padded_length([max(sequence_lengths(pairs[i])) for i in indices])
    mine = rank_share(indices, dp_rank, dp_size, micro)
    batches = [micro_batch(pairs, mine[k:k + micro], pad_id=pad_id, position_fn=position_fn,
                           length=seq_length) for k in range(0, len(mine), micro)]
    counts = torch.tensor([int(b["student_valid"].sum()) for b in batches], dtype=torch.long)
    if dist.is_initialized():
        from megatron.core import parallel_state as ps

        # One SUM all-reduce per step covering every micro-batch (spec §3.4 asks for one per
        # micro-batch; same numbers, and no collective inside a loss function).
        dist.all_reduce(counts, group=ps.get_data_parallel_group())
    for batch, count in zip(batches, counts.tolist()):
        batch["valid_global"] = count
    return StepPlan(batches, seq_length)


def pair_loss_fn(batch: dict, stats: PairStats):
    """Megatron loss function: (weight x mean pair loss, weight, logs). The weight is the local
    valid-pair count (the real-pair count in the no-valid-pair fallback), so megatron's division
    by the global count makes the step a mean over all comparison pairs."""
    n = batch["real"].numel()
    valid = batch["student_valid"]

    def loss_fn(values: torch.Tensor):
        scores = read_scores(values, batch["score_index"])
        tc, sc, tr, sr = scores.view(4, n)
        # discriminator_loss sums caption + reasoning pair losses per student; / 2 = the mean
        # over comparison pairs of spec §3.6. Warm-up: no regulariser, no clipping.
        loss = 0.5 * discriminator_loss(tc, sc, tr, sr, valid, score_reg=0.0,
                                        valid_global=batch["valid_global"],
                                        score_clip=float("inf"))
        weight = int(valid.sum()) if batch["valid_global"] > 0 else int(batch["real"].sum())
        stats.add_pairs(tc, sc, tr, sr, valid)
        return weighted(loss, weight, stats)

    return loss_fn


def weighted(loss: torch.Tensor, weight: int, stats: PairStats):
    """A micro-batch's (loss x weight, weight, logs) for megatron, which divides the step's sum
    by the summed weights: the step is the weight-averaged loss."""
    stats.add_loss(loss.item() * weight, weight)
    total = loss * weight
    return total, torch.tensor(weight, dtype=torch.int), {
        "loss": torch.stack([total.detach(), torch.tensor(float(weight))])}


def make_forward(stats: PairStats):
    def forward(batch: dict, model):
        values = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       attention_mask=batch["attention_mask"], kind=batch["kind"],
                       valid_tokens=batch["valid_tokens"], pixel_values=batch.get("pixel_values"),
                       image_grid_thw=batch.get("image_grid_thw"))
        return values, pair_loss_fn(batch, stats)

    return forward


def evaluate(trainer, disc, pairs, *, micro, pad_id, position_fn) -> dict:
    """Held-out pairwise accuracy (teacher > student) per segment + expert load, no update."""
    from megatron.core import parallel_state as ps

    disc.take_load()  # discard the training load since the last report
    stats = PairStats()
    indices = list(range(len(pairs)))
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    chunk = micro * dp_size * 8
    for start in range(0, len(indices), chunk):
        plan = plan_step(pairs, indices[start:start + chunk], dp_rank=dp_rank, dp_size=dp_size,
                         micro=micro, pad_id=pad_id, position_fn=position_fn)
        trainer.eval_step(plan.batches, make_forward(stats), plan.seq_length)
    metrics = stats.reduce()
    load = reduce_load(disc.take_load(), disc.config.sequence_parallel)
    return {**metrics, **load_metrics(load), "_load_table": load_table(load)}


def _layout(cfg: PrismConfig) -> ParallelConfig:
    d = cfg.discriminator
    return ParallelConfig(tp=d.tp, pp=d.pp, ep=d.ep,
                          distributed_optimizer=cfg.parallel.distributed_optimizer)


def run(cfg: PrismConfig) -> dict:
    """Train; returns the final held-out metrics (rank-independent)."""
    from megatron.core import parallel_state as ps

    from prism_megatron.data.encode import load_processor
    from prism_megatron.data.sampler import ResumableSampler
    from prism_megatron.models.discriminator.model import (
        build_discriminator, check_moe_layout, load_discriminator, read_info)
    from prism_megatron.models.discriminator.pairs import load_pairs
    from prism_megatron.preflight import check_paths
    from prism_megatron.runtime import stage_session
    from prism_megatron.trainer import Trainer

    d = cfg.discriminator
    if not d.megatron_dir:
        raise ConfigError("discriminator.megatron_dir is empty: point it at an upcycled "
                          "checkpoint (tools/upcycle_discriminator.py)")
    if not cfg.model.hf_dir:
        raise ConfigError("model.hf_dir is empty: the policy's HF directory (its processor and "
                          "tokenizer are what the discriminator reads)")
    if not cfg.data.train_files or not cfg.data.eval_files:
        raise ConfigError("data.train_files and data.eval_files must name pair files "
                          "(held-out accuracy is measured on data.eval_files)")
    # Clear errors for a wrong directory or layout before any process group exists.
    _, info = read_info(d.megatron_dir)
    if (d.num_experts, d.top_k) != (info["num_experts"], info["top_k"]):
        raise ConfigError(f"discriminator.num_experts/top_k = {d.num_experts}/{d.top_k} but "
                          f"{d.megatron_dir} holds a {info['num_experts']}-expert "
                          f"top-{info['top_k']} model")
    check_moe_layout(info["num_experts"], info["top_k"], d.expert_routing, tp=d.tp, ep=d.ep,
                     dispatcher=d.dispatcher)
    if not Path(cfg.model.hf_dir).is_dir():
        raise FileNotFoundError(f"model.hf_dir={cfg.model.hf_dir} does not exist")
    check_paths(cfg, "warmup")   # config.json, weight files, data files: before any work
    layout = _layout(cfg)
    with stage_session(cfg, "warmup", tp=layout.tp, pp=layout.pp, ep=layout.ep,
                       layout_key="discriminator.tp/pp/ep") as session:
        processor = load_processor(cfg.model.hf_dir, cfg.data.min_pixels, cfg.data.max_pixels)
        max_length = cfg.data.max_prompt_length + cfg.data.max_response_length
        train, train_stats = load_pairs(cfg.data.train_files, processor, max_length=max_length,
                                        max_skip_fraction=cfg.data.max_skip_fraction,
                                        data_cfg=cfg.data)
        heldout, eval_stats = load_pairs(cfg.data.eval_files, processor, max_length=max_length,
                                         max_skip_fraction=cfg.data.max_skip_fraction,
                                         data_cfg=cfg.data)
        log.info("pairs: train %s; held-out %s", train_stats.summary(), eval_stats.summary())
        log.info("format-invalid students: train %d/%d, held-out %d/%d",
                 sum(not p.student.valid for p in train), len(train),
                 sum(not p.student.valid for p in heldout), len(heldout))
        steps_per_epoch = max(1, len(train) // cfg.data.global_batch_size)
        total_steps = cfg.train_steps or steps_per_epoch * cfg.data.epochs

        disc, tconfig = build_discriminator(d.megatron_dir, d, cfg.model)
        disc.set_aux_loss(d.warmup_aux_loss_coef)
        trainer = Trainer(disc, tconfig, cfg.optimizer, layout, cfg.checkpoint, total_steps,
                          bf16=cfg.model.dtype == "bf16")
        sampler = ResumableSampler(len(train), seed=cfg.seed, shuffle=cfg.data.shuffle)
        if session.checkpointing:
            describe_save_dir(d.megatron_dir, cfg.checkpoint.save_dir)
        resumed = trainer.maybe_resume()
        if resumed:
            sampler.load_state_dict(resumed["sampler"])
        else:
            load_discriminator(disc, d.megatron_dir)
        start = resumed.get("step", 0)
        session.begin(start, total_steps)

        pad_id = processor.tokenizer.pad_token_id
        position_fn = disc.position_fn
        micro = cfg.data.micro_batch_size
        dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        stats = PairStats()
        forward = make_forward(stats)
        eval_every = d.eval_interval
        final, before = {}, {}
        if start == 0:  # the untrained discriminator's held-out accuracy, for the report
            before = evaluate(trainer, disc, heldout, micro=micro, pad_id=pad_id,
                              position_fn=position_fn)
        with session.metrics_logger(total_steps, start, desc="warmup",
                                    show=("loss", "acc_caption", "acc_reasoning")) as logger:
            for step in range(start + 1, total_steps + 1):
                logger.tick()
                indices = sampler.next_indices(cfg.data.global_batch_size)
                plan = plan_step(train, indices, dp_rank=dp_rank, dp_size=dp_size, micro=micro, pad_id=pad_id,
                                 position_fn=position_fn)
                disc.set_step_aux_scale(sum(_weight(b) for b in plan.batches) / len(plan.batches))
                out = trainer.train_step(plan.batches, forward, plan.seq_length)
                pair = stats.reduce()
                aux = disc.take_aux()
                load = load_metrics(reduce_load(disc.take_load(), tconfig.sequence_parallel))
                metrics = {"loss": out["loss"], "acc_caption": pair["acc_caption"],
                           "acc_reasoning": pair["acc_reasoning"], "aux_loss": aux,
                           "grad_norm": out["grad_norm"], "lr": out["lr"], **load}
                if step == total_steps or (eval_every and step % eval_every == 0):
                    held = evaluate(trainer, disc, heldout, micro=micro, pad_id=pad_id,
                                    position_fn=position_fn)
                    metrics.update({f"heldout/{k}": v for k, v in held.items()
                                    if not k.startswith("_")})
                    final = held if step == total_steps else final
                logger.log(step, metrics, samples=len(indices),
                           tokens=sum(sum(sequence_lengths(train[i])) for i in indices))
                session.after_step(
                    step, due=step % cfg.checkpoint.save_interval == 0 or step == total_steps,
                    save=lambda: trainer.save(step, {"sampler": sampler.state_dict()}))
        if not final:  # resumed at the end: report without training
            final = evaluate(trainer, disc, heldout, micro=micro, pad_id=pad_id,
                             position_fn=position_fn)
        _write_report(cfg, final, before, total_steps)
        return final


def describe_save_dir(megatron_dir: str, save_dir: str) -> None:
    """Copy the discriminator's description (dense hf_config/ + prism_discriminator.json) into
    the warm-up's save_dir, so that directory is itself a discriminator checkpoint (what the
    alignment stage and the HF export read)."""
    import shutil

    from prism_megatron.convert import ckpt_layout as lay
    from prism_megatron.distributed import is_main_rank
    from prism_megatron.models.discriminator.model import INFO_FILE

    root = lay.checkpoint_root(lay.resolve_checkpoint_dir(megatron_dir))
    out = Path(save_dir)
    if not is_main_rank() or root.resolve() == out.resolve():
        return
    out.mkdir(parents=True, exist_ok=True)
    shutil.copytree(root / lay.HF_CONFIG_DIR, out / lay.HF_CONFIG_DIR, dirs_exist_ok=True)
    shutil.copy2(root / INFO_FILE, out / INFO_FILE)


def _weight(batch: dict) -> float:
    """The loss weight of a micro-batch (see pair_loss_fn), known before the forward."""
    return float(batch["student_valid"].sum() if batch["valid_global"] > 0 else batch["real"].sum())


def _write_report(cfg: PrismConfig, final: dict, before: dict, steps: int) -> None:
    from prism_megatron.distributed import is_main_rank

    if not is_main_rank():
        return
    run_dir = Path(cfg.logging.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    def accuracies(metrics: dict) -> dict:
        return {k: v for k, v in metrics.items() if not k.startswith(("_", "load"))}

    report = {"steps": steps, "expert_routing": cfg.discriminator.expert_routing,
              "heldout": accuracies(final), "expert_load": final.get("_load_table", {})}
    if before:  # a resumed run keeps the first run's number
        report["heldout_before_training"] = accuracies(before)
    elif (run_dir / "warmup_report.json").is_file():
        previous = json.loads((run_dir / "warmup_report.json").read_text())
        if "heldout_before_training" in previous:
            report["heldout_before_training"] = previous["heldout_before_training"]
    (run_dir / "warmup_report.json").write_text(json.dumps(report, indent=2) + "\n")
    log.info("held-out pairwise accuracy: caption %.3f, reasoning %.3f (%d pairs)",
             final["acc_caption"], final["acc_reasoning"], final["pairs"])
    if cfg.logging.plots:
        plot_curves(cfg.logging.run_dir, ["loss", "acc_caption", "acc_reasoning", "aux_loss",
                                          "heldout/acc_caption", "heldout/acc_reasoning"],
                    "warmup_curves.png", "discriminator warm-up")


def cli(args, overrides) -> None:
    from prism_megatron.config import load_config

    run(load_config(args.config, overrides))
