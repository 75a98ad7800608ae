"""Worker for tests/test_weight_sync_distributed.py: a full RLVR step with the distributed sync.

    torchrun --nproc_per_node 2 tests/dist/weight_sync_rlvr.py CONFIG.yaml OUT.json

The policy's engine is the CPU server (a real process, ``rollout.engine=sglang``,
``server=prism``) and ``rollout.weight_sync=distributed``. One step: generate, train on fixed
pseudo-rewards, then (a) samples drawn by the engine before the sync (stale weights) and (b)
after ``Policy.sync`` are scored by the updated trainer. Rank 0 writes both gaps, the bytes
every rank sent in the sync and the spot checks.
"""

import json
import sys

import torch
import torch.distributed as dist

from prism_megatron.algorithms.advantages import grpo_advantages
from prism_megatron.config import load_config
from prism_megatron.data.rl import load_rl_prompts
from prism_megatron.rl import logprobs as rl
from prism_megatron.rl.policy import Policy
from prism_megatron.rollout import weight_sync
from prism_megatron.runtime import stage_session


def gap(worker, batch) -> float:
    """max |engine log-prob - trainer log-prob| over the batch's samples (every rank)."""
    plan = worker.micro_batches(batch, list(range(len(batch.samples))))
    rl.compute_log_probs(worker.model, plan)
    trainer = rl.gather_samples(plan.per_sample("old_log_probs"))
    return max(float((torch.tensor(s.logprobs) - trainer[i]).abs().max())
               for i, s in enumerate(batch.samples))


def main(config: str, out: str) -> None:
    cfg = load_config(config)
    sent = []
    real = weight_sync.sync_weights

    def recording(*args, **kwargs):
        stats = real(*args, **kwargs)
        sent.append({"bytes": stats.bytes if stats else 0,
                     "checked": stats.checked if stats else 0,
                     "mode": stats.mode if stats else None})
        return stats

    weight_sync.sync_weights = recording
    with stage_session(cfg, "rlvr", tp=cfg.parallel.tp, pp=cfg.parallel.pp) as session:
        processor = session.processor()
        dataset, _ = load_rl_prompts(cfg.data.train_files, processor,
                                     max_prompt_length=cfg.data.max_prompt_length, progress=False)
        worker = Policy(cfg, processor, total_steps=1)
        prompts = dataset[:cfg.algorithm.prompts_per_step]
        batch = worker.generate(prompts, step=1)
        first = gap(worker, batch)                      # engine and trainer start equal
        rewards = torch.randn(len(batch.samples), generator=torch.Generator().manual_seed(0))
        batch.advantages = grpo_advantages(rewards, batch.group).float()
        metrics = worker.train(batch)
        stale = gap(worker, worker.generate(prompts, step=2))
        worker.sync()
        synced = gap(worker, worker.generate(prompts, step=3))
        per_rank = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, sent[-1])
        if dist.get_rank() == 0:
            total = sum(t.numel() * t.element_size() for _, t in
                        weight_sync.iter_hf_tensors(worker.model, worker.hf_config))
        else:
            list(weight_sync.iter_hf_tensors(worker.model, worker.hf_config))
        if dist.get_rank() == 0:
            with open(out, "w") as f:
                json.dump({"first": first, "stale": stale, "synced": synced,
                           "grad_norm": metrics["grad_norm"], "per_rank": per_rank,
                           "model_bytes": total}, f)
        worker.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
