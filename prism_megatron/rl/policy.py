"""The policy under RL training, shared by alignment and RLVR.

``Policy`` owns the Megatron policy (TP/PP/DP) and its trainer, the optional frozen reference
model (KL), the rollout engine (on the sender rank only; the other ranks get the samples
broadcast, or scattered: each data-parallel rank only those it trains on) and the trainer ->
engine weight sync. One step:

    batch = policy.generate(prompts, step)      # RolloutBatch: prompts, samples, group
    ...                                         # rewards or discriminator scores -> advantages
    metrics = policy.train(batch)               # engine memory released; old log-probs,
                                                # mismatch, ppo_epochs x updates
    policy.sync()                               # engine weights resumed -> sync -> KV resumed

``generate`` is ``receive(launch(...))``: ``launch`` starts the engine in a background thread
(sender rank), ``receive`` waits for it and hands every rank the batch. One-step-off-policy
(``algorithm.off_policy_steps=1``, stages/rlvr.py) launches step t+1 before ``train`` of step t
and receives it before the sync (the engine never generates while its weights change).
"""

from __future__ import annotations

import logging
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.distributed as dist

from prism_megatron.config import ConfigError
from prism_megatron.rl import logprobs as lp
from prism_megatron.rl.batch import (
    MicroBatches, RemoteSample, RolloutBatch, is_local, plan_micro_batches, sample_owners)
from prism_megatron.rl.timing import StepTimer
from prism_megatron.rollout.base import (
    RolloutServerError, derive_seed, phase_generate, phase_train)

log = logging.getLogger("prism.policy")
LAUNCH_GRACE_S = 0.05


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
    if a.off_policy_steps:
        if a.tis_cap is None:
            raise ConfigError("algorithm.off_policy_steps=1 trains on samples of the previous "
                              "policy: set algorithm.tis_cap (e.g. 2.0), the truncated importance "
                              "weight by the recorded behaviour log-probs that corrects for it")
        if a.dynamic_sampling:
            raise ConfigError("algorithm.off_policy_steps=1 with algorithm.dynamic_sampling is not "
                              "supported (the rounds of a step depend on its rewards, so the next "
                              "step cannot be generated ahead): use one of them")
        if cfg.rollout.release_memory_between_phases:
            raise ConfigError("algorithm.off_policy_steps=1 generates while the policy trains, so "
                              "the engine cannot release its memory for training: set "
                              "rollout.release_memory_between_phases=false")
    for key in ("model.hf_dir", "model.megatron_dir"):
        section, name = key.split(".")
        if not getattr(getattr(cfg, section), name):
            raise ConfigError(f"{key} is empty (the policy to train: HF dir for the processor and "
                              "engine, Megatron checkpoint for the trainer)")


@dataclass
class Pending:
    """A generation in flight (``Policy.launch``): its prompts, step, the policy version that
    generates it, and the sender's future of (groups, seconds)."""

    prompts: list
    step: int
    version: int
    future: Future | None


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
        self._pool: ThreadPoolExecutor | None = None     # the background generation (sender)
        self._dp_ranks: list[int] | None = None
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

    def generate(self, prompts, step: int, round_: int = 0, *, version: int = -1,
                 scatter: bool = False) -> RolloutBatch:
        """``rollout.n`` samples per prompt: the engine lives on the sender rank, which
        broadcasts what it drew, or with ``scatter`` sends each rank only the samples it trains
        on (``receive``)."""
        return self.receive(self.launch(prompts, step, round_, version=version, grace=False),
                            scatter=scatter)[0]

    def launch(self, prompts, step: int, round_: int = 0, *, version: int = -1,
               grace: bool = True) -> "Pending":
        """Start generating in the background (sender rank; the engine is another process or
        its own model copy, so the trainer can run meanwhile). ``version``: the trained steps
        of the weights the engine holds, recorded per sample. Never sync while one is pending.
        ``grace``: sleep briefly so the requests leave together (not needed when the caller
        waits for the result at once, as ``generate`` does)."""
        future = None
        if self.engine is not None:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout")
            params = self.sampling_params(step, round_)
            texts = [p.rollout_prompt() for p in prompts]

            def work():
                start = time.perf_counter()
                out = self.engine.generate(texts, params, n=self.cfg.rollout.n)
                return out, time.perf_counter() - start

            future = self._pool.submit(work)
            if grace:
                # Let the client's request threads send before this thread takes the GIL back for
                # training: a server that batches the requests arriving together (the CPU
                # server's 5 ms window) would otherwise get them staggered, one batch each.
                time.sleep(LAUNCH_GRACE_S)
        return Pending(list(prompts), step, version, future)

    def receive(self, pending: "Pending", *, scatter: bool = False
                ) -> tuple[RolloutBatch, float, float]:
        """(batch, generation seconds, seconds waited here for it): the sender waits for its
        generation, then every rank gets the samples (collective): all of them, or with
        ``scatter`` the tokens of those its data-parallel rank trains on (TP/PP peers get the
        same) and a ``RemoteSample`` (lengths only) for the others. Scatter only when this
        batch is trained as it is (not when groups are selected from it afterwards)."""
        start = time.perf_counter()
        result = pending.future.result() if pending.future is not None else None
        if dist.is_initialized() and dist.get_world_size() > 1:
            if scatter:
                owners = None
                if result is not None:
                    owners = self.owners(RolloutBatch.from_groups(pending.prompts, result[0]))
                result = scatter_samples(result, owners, self.dp_ranks())
            else:
                box = [result]
                dist.broadcast_object_list(box, src=0)
                result = box[0]
        waited = time.perf_counter() - start
        groups, seconds = result
        batch = RolloutBatch.from_groups(pending.prompts, groups)
        batch.behaviour_step = torch.full((len(batch),), pending.version, dtype=torch.long)
        return batch, seconds, waited

    def owners(self, batch: RolloutBatch) -> list[int]:
        """The data-parallel rank that trains on each sample (``micro_batches``' assignment)."""
        from megatron.core import parallel_state as ps

        a, d = self.cfg.algorithm, self.cfg.data
        return sample_owners(batch,
                             prompts_per_minibatch=a.mini_batch_prompts or a.prompts_per_step,
                             dp_size=ps.get_data_parallel_world_size(),
                             micro_batch_size=d.micro_batch_size,
                             max_tokens=d.max_tokens_per_micro_batch)

    def dp_ranks(self) -> list[int]:
        """The data-parallel rank of every global rank (collective once, then cached)."""
        from megatron.core import parallel_state as ps

        if self._dp_ranks is None:
            self._dp_ranks = [None] * dist.get_world_size()
            dist.all_gather_object(self._dp_ranks, ps.get_data_parallel_rank())
        return self._dp_ranks

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

    def train(self, batch: RolloutBatch, timer: StepTimer | None = None) -> dict:
        """Old (and reference) log-probs, mismatch, then ``ppo_epochs`` x mini-batch optimizer
        steps on ``batch`` (its advantages set). The ``logprob`` and ``update`` phases go into
        ``timer`` (with the step's real tokens; into the returned metrics without one)."""
        a = self.cfg.algorithm
        own = timer is None
        timer = timer or StepTimer()
        phase_train(self.engine)   # the engine frees its weights + KV cache (when configured)
        micros = [self.micro_batches(batch, indices) for indices in
                  batch.minibatches(a.mini_batch_prompts or a.prompts_per_step)]
        t = self.settings.temperature
        tokens = batch.tokens()
        with timer.phase("logprob", tokens=tokens * (2 if self.reference is not None else 1)):
            for micro in micros:
                lp.compute_log_probs(self.model, micro, temperature=t, entropy=True)
                if self.reference is not None:
                    lp.compute_log_probs(self.reference, micro, key="ref_log_probs",
                                         temperature=t)
        metrics = lp.log_prob_metrics(micros)
        real, computed = (sum(x) for x in zip(*(m.efficiency() for m in micros)))
        metrics["perf/padding_efficiency"] = padding_efficiency(real, computed)

        with timer.phase("update", tokens=tokens * a.ppo_epochs):
            per_update = [lp.update(self.trainer, micro, self.settings)
                          for _ in range(a.ppo_epochs) for micro in micros]
        first = per_update[0]
        for key in ("loss", "grad_norm", "lr", "clip_frac", "clip_frac_dual", "approx_kl", "kl"):
            if key in first:
                metrics[key] = sum(u[key] for u in per_update) / len(per_update)
        metrics.update(ratio_first_mean=first["ratio_mean"], ratio_first_max=first["ratio_max"],
                       skipped_updates=sum(u["skipped"] for u in per_update),
                       skipped_steps=per_update[-1]["skipped_steps"])
        if own:
            metrics.update({k: v for k, v in timer.metrics().items()
                            if k.startswith(("time/logprob", "time/update", "perf/logprob",
                                             "perf/update"))})
        return metrics

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        if self.engine is not None:
            self.engine.shutdown()


def scatter_samples(result, owners: list[int] | None, dp_ranks: list[int]):
    """Rank 0's ``(groups, extra)`` -> every rank's: the samples whose owner (a data-parallel
    rank, per sample in group-major order) is that rank's ``dp_ranks`` entry, a
    ``RemoteSample`` in place of each other one. Collective; only rank 0 passes ``result``."""
    inputs = None
    if dist.get_rank() == 0:
        groups, extra = result
        flat = [s for group in groups for s in group]
        remote = [RemoteSample(len(s), s.finish_reason, len(s.logprobs) == len(s.token_ids))
                  for s in flat]
        inputs = []
        for dp in dp_ranks:
            mine = iter(s if owners[k] == dp else remote[k] for k, s in enumerate(flat))
            inputs.append(([[next(mine) for _ in group] for group in groups], extra))
    out = [None]
    dist.scatter_object_list(out, inputs, src=0)
    return out[0]


def samples_received(batch: RolloutBatch) -> dict[str, float]:
    """Fewest and most samples (with tokens) a rank holds of this batch."""
    count = sum(is_local(s) for s in batch.samples)
    low, high = torch.tensor([-count], dtype=torch.float64), torch.tensor([count],
                                                                         dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(low, op=dist.ReduceOp.MAX)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
    return {"perf/samples_received_min": -float(low[0]),
            "perf/samples_received_max": float(high[0])}


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
