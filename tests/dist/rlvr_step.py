"""One RLVR step on a fixed rollout batch, at the layout torchrun gives (tp from argv).

    torchrun --nproc_per_node N tests/dist/rlvr_step.py CONFIG.yaml OUT.pt

Rank 0 writes the recomputed old log-probs of every sample, the engine's log-probs, the metrics
of the update and the updated weights (HF names, gathered over TP/PP), so layouts can be compared.
"""

import sys

import torch

from prism_megatron.algorithms.advantages import grpo_advantages
from prism_megatron.config import load_config
from prism_megatron.data.rl import load_rl_prompts
from prism_megatron.rl import logprobs as rl
from prism_megatron.rl.policy import Policy
from prism_megatron.rollout.weight_sync import is_sender, iter_hf_tensors
from prism_megatron.runtime import stage_session


def main(config: str, out: str) -> None:
    cfg = load_config(config)
    with stage_session(cfg, "rlvr", tp=cfg.parallel.tp, pp=cfg.parallel.pp) as session:
        processor = session.processor()
        dataset, _ = load_rl_prompts(cfg.data.train_files, processor,
                                     max_prompt_length=cfg.data.max_prompt_length, progress=False)
        worker = Policy(cfg, processor, total_steps=1)
        prompts = dataset[:cfg.algorithm.prompts_per_step]
        batch = worker.generate(prompts, step=1)
        samples = batch.samples
        # Fixed pseudo-rewards: a random policy earns none, and the update must move weights.
        rewards = torch.randn(len(samples), generator=torch.Generator().manual_seed(0))
        advantages = grpo_advantages(rewards, batch.group).float()
        batch.advantages = advantages
        plan = worker.micro_batches(batch, list(range(len(samples))))
        rl.compute_log_probs(worker.model, plan)
        old = rl.gather_samples(plan.per_sample("old_log_probs"))
        before = {name: t.clone() for name, t in iter_hf_tensors(worker.model, worker.hf_config)}
        metrics = worker.train(batch)
        weights = {name: t.clone() for name, t in iter_hf_tensors(worker.model, worker.hf_config)}
        rl.compute_log_probs(worker.model, plan)
        new = rl.gather_samples(plan.per_sample("old_log_probs"))
        if is_sender():
            torch.save({"old": [old[i] for i in range(len(samples))],
                        "new": [new[i] for i in range(len(samples))],
                        "rollout": [torch.tensor(s.logprobs) for s in samples],
                        "advantages": advantages, "metrics": metrics, "before": before,
                        "weights": weights}, out)
        worker.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
