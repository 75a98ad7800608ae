"""The policy under RL training, shared by alignment and RLVR.

It owns the Megatron policy (TP/PP/DP) and its optimizer, the optional frozen reference model
(KL), the rollout engine (on the sender rank only; the other ranks get the samples broadcast) and
the trainer -> engine weight sync. Given a step's samples and their per-response advantages it
recomputes the old log-probs, watches the train/rollout mismatch and runs the PPO updates.
"""

from __future__ import annotations

import logging
import math
import time
from functools import partial

import torch

from prism_megatron.rollout.base import RolloutServerError, derive_seed
from prism_megatron.stages import policy_rl as rl

log = logging.getLogger("prism.policy")


def minibatch_count(algorithm) -> int:
    per = algorithm.mini_batch_prompts or algorithm.prompts_per_step
    return math.ceil(algorithm.prompts_per_step / per)


class PolicyWorker:
    def __init__(self, cfg, processor, total_steps: int):
        from prism_megatron.models.qwen3_vl.model import build_qwen3vl_model, load_initial_weights
        from prism_megatron.rollout import make_engine
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
        self.settings = rl.LossSettings.from_config(cfg.algorithm, cfg.rollout.temperature)
        self.plan = partial(rl.plan_batches, micro_batch_size=cfg.data.micro_batch_size,
                            pad_id=processor.tokenizer.pad_token_id, hf_config=model.hf_config)
        self.engine = (make_engine(cfg.rollout, cfg.model.hf_dir, cfg.data) if is_sender()
                       else None)
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

    def sync(self) -> float:
        """Push the trainer's weights to the engine (collective); returns the seconds taken."""
        from prism_megatron.rollout.weight_sync import sync_weights

        start = time.perf_counter()
        r = self.cfg.rollout
        sync_weights(self.model, self.engine, self.hf_config, bucket_mb=r.weight_bucket_mb,
                     mode=r.weight_sync, disk_dir=f"{self.cfg.logging.run_dir}/weight_sync",
                     hf_dir=self.cfg.model.hf_dir)
        return time.perf_counter() - start

    def sampling_params(self, step: int, round_: int = 0):
        from prism_megatron.rollout import sampling_params

        # A seed per (run, step, round): a resumed run draws exactly the samples it would have.
        return sampling_params(self.cfg.rollout, seed=derive_seed(self.cfg.seed, step, round_))

    def generate(self, prompts, step: int, round_: int = 0) -> list:
        return rl.generate(self.engine, prompts, self.sampling_params(step, round_),
                           self.cfg.rollout.n)

    def train(self, prompts, samples, group: list[int], advantages: torch.Tensor) -> dict:
        """Old log-probs, mismatch, then ``ppo_epochs`` x mini-batches optimizer steps."""
        a = self.cfg.algorithm
        n = self.cfg.rollout.n
        seqs = rl.sequences(prompts, samples, group)
        per = (a.mini_batch_prompts or a.prompts_per_step) * n
        plans = [self.plan(seqs, list(range(k, min(k + per, len(seqs)))))
                 for k in range(0, len(seqs), per)]
        timings, start = {}, time.perf_counter()
        old, entropy = {}, {}
        for plan in plans:
            for i, (lp, ent) in rl.compute_log_probs(self.model, plan, temperature=self.settings
                                                     .temperature, entropy=True).items():
                old[i], entropy[i] = lp, ent
        reference = {}
        if self.reference is not None:
            for plan in plans:
                reference.update({i: lp for i, (lp, _) in rl.compute_log_probs(
                    self.reference, plan, temperature=self.settings.temperature).items()})
        rollout_lp = {i: torch.tensor(s.logprobs, dtype=torch.float32)
                      for i, s in enumerate(samples)}
        timings["time/logprob_s"] = time.perf_counter() - start
        gathered_old = rl.gather_samples(old)
        gathered_entropy = rl.gather_samples(entropy)
        metrics = rl.mismatch(gathered_old, rollout_lp)
        ents = [e for e in gathered_entropy.values() if e is not None and len(e)]
        metrics["entropy"] = float(torch.cat(ents).mean()) if ents else 0.0

        start = time.perf_counter()
        per_update = []
        for _ in range(a.ppo_epochs):
            for plan in plans:
                per_update.append(rl.update(self.trainer, plan, self.settings, old_log_probs=old,
                                            advantages=advantages, rollout_log_probs=rollout_lp,
                                            ref_log_probs=reference or None))
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


# ------------------------------------------------------------------------------ stage scaffolding
# What the RL stages (rlvr, align) share around their step loop.

def open_policy(cfg, processor, num_prompts: int, stack):
    """The step count, the policy worker (shut down when ``stack`` closes) and the prompt
    sampler of a stage over ``num_prompts`` prompts."""
    from prism_megatron.data.sampler import ResumableSampler

    total = cfg.train_steps or max(1, num_prompts // cfg.algorithm.prompts_per_step) \
        * cfg.data.epochs
    worker = PolicyWorker(cfg, processor, total)
    stack.callback(worker.shutdown)
    return worker, ResumableSampler(num_prompts, seed=cfg.seed, shuffle=cfg.data.shuffle), total


def resume_policy(worker: PolicyWorker, sampler) -> int:
    """Restore the policy (optimizer, schedule, RNG) and the sampler from the latest checkpoint,
    then push the weights to the engine (it loaded ``model.hf_dir``). Returns the step reached."""
    resumed = worker.trainer.maybe_resume()
    if resumed:
        sampler.load_state_dict(resumed["sampler"])
    worker.sync()
    return resumed.get("step", 0)


def save_due(cfg, step: int, total: int) -> bool:
    return bool(cfg.checkpoint.enabled and cfg.checkpoint.save_dir) and (
        step % cfg.checkpoint.save_interval == 0 or step == total)


def trained_tokens(prompts, samples, group: list[int]) -> int:
    """Real (unpadded) tokens of a step's ``[prompt ; response]`` sequences, all ranks."""
    return sum(len(prompts[g].encoded.input_ids) + len(s.token_ids)
               for s, g in zip(samples, group))
