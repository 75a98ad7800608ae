"""The policy under RL training, shared by alignment and RLVR.

``Policy`` owns the Megatron policy (TP/PP/DP) and its trainer, the optional frozen reference
model (KL), the rollout engine (on the sender rank only; the other ranks get the samples
broadcast) and the trainer -> engine weight sync. One step:

    batch = policy.generate(prompts, step)      # RolloutBatch: prompts, samples, group
    ...                                         # rewards or discriminator scores -> advantages
    metrics = policy.train(batch)               # engine memory released; old log-probs,
                                                # mismatch, ppo_epochs x updates
    policy.sync()                               # engine weights resumed -> sync -> KV resumed
"""

from __future__ import annotations

import logging
import math
import time

import torch
import torch.distributed as dist

from prism_megatron.config import ConfigError
from prism_megatron.rl import logprobs as lp
from prism_megatron.rl.batch import MicroBatches, RolloutBatch, plan_micro_batches
from prism_megatron.rollout.base import (
    RolloutServerError, derive_seed, phase_generate, phase_train)

log = logging.getLogger("prism.policy")


def minibatch_count(algorithm) -> int:
    per = algorithm.mini_batch_prompts or algorithm.prompts_per_step
    return math.ceil(algorithm.prompts_per_step / per)


def check_rl_config(cfg, algorithms: tuple[str, ...]) -> None:
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
    if cfg.data.max_tokens_per_micro_batch and cfg.model.spec == "transformer_engine":
        raise ConfigError("data.max_tokens_per_micro_batch packs sequences with a block attention "
                          "mask, which Transformer Engine's causal layers ignore (samples would "
                          "attend to each other): use model.spec=local, or 0 (padded micro-batches)")
    for key in ("model.hf_dir", "model.megatron_dir"):
        section, name = key.split(".")
        if not getattr(getattr(cfg, section), name):
            raise ConfigError(f"{key} is empty (the policy to train: HF dir for the processor and "
                              "engine, Megatron checkpoint for the trainer)")


class Policy:
    def __init__(self, cfg, processor, total_steps: int):
        from prism_megatron.models.qwen3_vl.model import build_qwen3vl_model, load_initial_weights
        from prism_megatron.rollout import make_rank_engine
        from prism_megatron.rollout.weight_sync import is_sender
        from prism_megatron.trainer import Trainer

        self.cfg, self.processor = cfg, processor
        model, tconfig = build_qwen3vl_model(cfg.model, cfg.parallel)
        load_initial_weights(model, cfg.model)
        self.hf_config = model.hf_config
        updates = cfg.algorithm.ppo_epochs * minibatch_count(cfg.algorithm)
        self.trainer = Trainer(model, tconfig, cfg.optimizer, cfg.parallel, cfg.checkpoint,
                               total_steps * updates, bf16=cfg.model.dtype == "bf16")
        self.reference = None
        if cfg.algorithm.kl_coef > 0:   # PRISM runs without (spec §1.3, §6); built only when asked
            self.reference, _ = build_qwen3vl_model(cfg.model, cfg.parallel)
            load_initial_weights(self.reference, cfg.model)
            self.reference.requires_grad_(False)
        self.settings = lp.LossSettings.from_config(cfg.algorithm, cfg.rollout.temperature)
        # the sender's engine (None elsewhere); with rollout.servers_per_node every node's
        # local rank 0 launches its node's servers first (collective)
        self.engine = make_rank_engine(cfg.rollout, cfg.model.hf_dir, cfg.data, sender=is_sender())
        if self.engine is not None:
            status = self.engine.health()
            if not status.get("ok"):
                self.engine.shutdown()
                bad = [f"{s['url']}: {s.get('error', 'not ok')}" for s in status.get("servers", [])
                       if not s.get("ok")]
                raise RolloutServerError("the rollout engine does not answer: "
                                         + ("; ".join(bad) or str(status)))

    @property
    def model(self):
        return self.trainer.model

    # ---- rollouts ---------------------------------------------------------------------
    def sampling_params(self, step: int, round_: int = 0):
        from prism_megatron.rollout import sampling_params

        # A seed per (run, step, round): a resumed run asks for exactly the samples it would have.
        return sampling_params(self.cfg.rollout, seed=derive_seed(self.cfg.seed, step, round_))

    def generate(self, prompts, step: int, round_: int = 0) -> RolloutBatch:
        """``rollout.n`` samples per prompt on every rank: the engine lives on the sender rank,
        which broadcasts what it drew."""
        box = [None]
        if self.engine is not None:
            box[0] = self.engine.generate([p.rollout_prompt() for p in prompts],
                                          self.sampling_params(step, round_), n=self.cfg.rollout.n)
        if dist.is_initialized():
            dist.broadcast_object_list(box, src=0)
        return RolloutBatch.from_groups(prompts, box[0])

    def sync(self) -> float:
        """Push the trainer's weights to the engine (collective) and make it ready to generate:
        weights resumed -> sync -> KV cache resumed (``rollout.release_memory_between_phases``;
        see ``rollout.base.phase_generate``). Returns the seconds taken."""
        from prism_megatron.rollout.weight_sync import sync_weights

        start = time.perf_counter()
        r = self.cfg.rollout
        phase_generate(self.engine, lambda: sync_weights(
            self.model, self.engine, self.hf_config, bucket_mb=r.weight_bucket_mb,
            mode=r.weight_sync, disk_dir=f"{self.cfg.logging.run_dir}/weight_sync",
            hf_dir=self.cfg.model.hf_dir, check_tensors=r.weight_check_tensors))
        return time.perf_counter() - start

    # ---- training ---------------------------------------------------------------------
    def micro_batches(self, batch: RolloutBatch, indices: list[int]) -> MicroBatches:
        from megatron.core import parallel_state as ps

        d = self.cfg.data
        return plan_micro_batches(
            batch, indices, micro_batch_size=d.micro_batch_size,
            pad_id=self.processor.tokenizer.pad_token_id, hf_config=self.hf_config,
            dp_rank=ps.get_data_parallel_rank(), dp_size=ps.get_data_parallel_world_size(),
            max_tokens=d.max_tokens_per_micro_batch)

    def train(self, batch: RolloutBatch) -> dict:
        """Old (and reference) log-probs, mismatch, then ``ppo_epochs`` x mini-batch optimizer
        steps on ``batch`` (its advantages set)."""
        a = self.cfg.algorithm
        phase_train(self.engine)   # the engine frees its weights + KV cache (when configured)
        micros = [self.micro_batches(batch, indices) for indices in
                  batch.minibatches(a.mini_batch_prompts or a.prompts_per_step)]
        timings, start = {}, time.perf_counter()
        t = self.settings.temperature
        for micro in micros:
            lp.compute_log_probs(self.model, micro, temperature=t, entropy=True)
            if self.reference is not None:
                lp.compute_log_probs(self.reference, micro, key="ref_log_probs", temperature=t)
        timings["time/logprob_s"] = time.perf_counter() - start
        metrics = lp.log_prob_metrics(micros)
        real, computed = (sum(x) for x in zip(*(m.efficiency() for m in micros)))
        metrics["perf/padding_efficiency"] = padding_efficiency(real, computed)

        start = time.perf_counter()
        per_update = [lp.update(self.trainer, micro, self.settings)
                      for _ in range(a.ppo_epochs) for micro in micros]
        timings["time/update_s"] = time.perf_counter() - start
        first = per_update[0]
        for key in ("loss", "grad_norm", "lr", "clip_frac", "clip_frac_dual", "approx_kl", "kl"):
            if key in first:
                metrics[key] = sum(u[key] for u in per_update) / len(per_update)
        metrics.update(ratio_first_mean=first["ratio_mean"], ratio_first_max=first["ratio_max"],
                       skipped_updates=sum(u["skipped"] for u in per_update),
                       skipped_steps=per_update[-1]["skipped_steps"])
        return {**metrics, **timings}

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()


def padding_efficiency(real: int, computed: int) -> float:
    """Real tokens / computed positions over the data-parallel world (this rank's counts summed)."""
    counts = torch.tensor([real, computed], dtype=torch.float64)
    if dist.is_initialized():
        from megatron.core import parallel_state as ps

        dist.all_reduce(counts, group=ps.get_data_parallel_group())
    return float(counts[0] / counts[1].clamp(min=1))


def response_metrics(batch: RolloutBatch) -> dict[str, float]:
    """Length statistics of a step's responses."""
    lengths = batch.response_lengths()
    return {"response_len_mean": float(lengths.mean()), "response_len_max": float(lengths.max()),
            "response_clipped": sum(s.finish_reason == "length" for s in batch.samples)
            / len(batch)}
