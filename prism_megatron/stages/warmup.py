"""Discriminator warm-up: pairwise teacher-vs-student training of the MoE discriminator
(spec §3.6).

    prism warmup CONFIG [key=value ...]
    torchrun --nproc_per_node N -m prism_megatron.cli warmup CONFIG [key=value ...]

Inputs: ``discriminator.megatron_dir`` (an upcycled checkpoint, tools/upcycle_discriminator.py),
``model.hf_dir`` (the policy's processor: the discriminator reads the policy's tokens),
``data.train_files`` / ``data.eval_files`` (pair files, see data/pairs.py).
The layout is ``discriminator.{ep,pp}`` (x data parallel = the rest of the world; MoE with tp > 1
is refused), the routing ``discriminator.expert_routing`` (learned | segment).

Every step takes ``data.global_batch_size`` pairs; each data-parallel rank splits its share into
micro-batches of ``data.micro_batch_size`` pairs, one forward each over the pair's four sequences
(teacher/student x caption/reasoning). Loss: the mean over comparison pairs of
``softplus(-(s_T - s_S))`` (spec §3.6, no regulariser or clipping) plus
``discriminator.warmup_aux_loss_coef`` x the load-balancing loss; format-invalid students are out
of the pairwise term (batching and loss: rl/discriminator.py).

Reports held-out pairwise accuracy (teacher scored above student) for caption and reasoning and
the expert load per expert per segment type; ``warmup_report.json`` and ``warmup_curves.png`` go to
``logging.run_dir``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from prism_megatron.config import ConfigError, PrismConfig
from prism_megatron.data.pairs import load_pairs
from prism_megatron.data.sampler import ResumableSampler
from prism_megatron.distributed import is_main_rank
from prism_megatron.rl.discriminator import (
    Discriminator, check_discriminator, discriminator_layout, sequence_lengths)
from prism_megatron.runtime import Checkpoints, StepResult, stage_session

log = logging.getLogger("prism.warmup")


def check_config(cfg: PrismConfig) -> None:
    if not cfg.discriminator.megatron_dir:
        raise ConfigError("discriminator.megatron_dir is empty: point it at an upcycled "
                          "checkpoint (tools/upcycle_discriminator.py)")
    if not cfg.model.hf_dir:
        raise ConfigError("model.hf_dir is empty: the policy's HF directory (its processor and "
                          "tokenizer are what the discriminator reads)")
    if not cfg.data.train_files or not cfg.data.eval_files:
        raise ConfigError("data.train_files and data.eval_files must name pair files "
                          "(held-out accuracy is measured on data.eval_files)")


def run(cfg: PrismConfig) -> dict:
    """Train; returns the final held-out metrics (rank-independent)."""
    from prism_megatron.preflight import check_paths

    check_config(cfg)
    check_discriminator(cfg, tp=cfg.discriminator.tp)   # clear errors before any process group
    if not Path(cfg.model.hf_dir).is_dir():
        raise FileNotFoundError(f"model.hf_dir={cfg.model.hf_dir} does not exist")
    check_paths(cfg, "warmup")   # config.json, weight files, data files: before any work
    d, layout = cfg.data, discriminator_layout(cfg)
    with stage_session(cfg, "warmup", tp=layout.tp, pp=layout.pp, ep=layout.ep,
                       layout_key="discriminator.tp/pp/ep") as session:
        processor = session.processor()
        kwargs = dict(max_length=d.max_prompt_length + d.max_response_length,
                      max_skip_fraction=d.max_skip_fraction, data_cfg=d)
        train, train_stats = load_pairs(d.train_files, processor, **kwargs)
        heldout, eval_stats = load_pairs(d.eval_files, processor, **kwargs)
        log.info("pairs: train %s; held-out %s", train_stats.summary(), eval_stats.summary())
        log.info("format-invalid students: train %d/%d, held-out %d/%d",
                 sum(not p.student.valid for p in train), len(train),
                 sum(not p.student.valid for p in heldout), len(heldout))
        total = session.total_steps(len(train), d.global_batch_size)
        disc = Discriminator.for_warmup(cfg, total, processor.tokenizer.pad_token_id)
        sampler = ResumableSampler(len(train), seed=cfg.seed, shuffle=d.shuffle)
        checkpoints = Checkpoints(cfg, disc.trainer, state={"sampler": sampler},
                                  initial=disc.load_initial)
        start = checkpoints.resume()
        before = disc.evaluate(heldout) if start == 0 else {}   # the untrained discriminator
        final = {}

        def evaluate() -> dict:
            final.update(disc.evaluate(heldout))
            return {f"heldout/{k}": v for k, v in final.items() if not k.startswith("_")}

        def one_step(step: int) -> StepResult:
            indices = sampler.next_indices(d.global_batch_size)
            return StepResult(disc.warmup_step(train, indices), len(indices),
                              sum(sum(sequence_lengths(train[i])) for i in indices))

        session.train_loop(one_step, start=start, total=total, checkpoints=checkpoints,
                           desc="warmup", show=("loss", "acc_caption", "acc_reasoning"),
                           evaluate=evaluate, eval_interval=cfg.discriminator.eval_interval,
                           log_before=False)
        if not final:  # resumed at the end: report without training
            final.update(disc.evaluate(heldout))
        write_report(cfg, final, before, total)
        session.plot(["loss", "acc_caption", "acc_reasoning", "aux_loss", "heldout/acc_caption",
                      "heldout/acc_reasoning"], "warmup_curves.png", "discriminator warm-up")
        return final


def write_report(cfg: PrismConfig, final: dict, before: dict, steps: int) -> None:
    """``run_dir/warmup_report.json``: held-out accuracies (before and after), expert load."""
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


def cli(args, overrides) -> None:
    from prism_megatron.config import load_config

    run(load_config(args.config, overrides))
