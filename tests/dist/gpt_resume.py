"""Worker: train the tiny GPT with AdamW + cosine schedule, checkpointing and resuming.

    torchrun ... gpt_resume.py --init-ckpt DIR --save-dir S --steps N [--save-at K] [--resume]
Rank 0 prints one JSON line {"losses": {step: loss}} for the steps this process ran.
"""

import argparse
import json

import torch

from gpt_parallel import batches, build, forward_step


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--init-ckpt", required=True)
    p.add_argument("--save-dir", required=True)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--save-at", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--distributed-optimizer", action="store_true")
    args = p.parse_args()

    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from prism_megatron.checkpoint import find_latest, load_checkpoint, save_checkpoint
    from prism_megatron.config import OptimizerConfig, ParallelConfig
    from prism_megatron.distributed import destroy_distributed, init_distributed
    from prism_megatron.optim import build_optimizer, wrap_ddp

    init_distributed(tp=args.tp, pp=args.pp, seed=1234)
    config, model = build((args.tp, args.pp))
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), args.init_ckpt))
    parallel = ParallelConfig(tp=args.tp, pp=args.pp,
                              distributed_optimizer=args.distributed_optimizer)
    ddp_model = wrap_ddp(model, config, parallel)
    optimizer, scheduler = build_optimizer(
        [ddp_model], OptimizerConfig(lr=3e-3, warmup_ratio=0.2), parallel, total_steps=args.steps)
    config.finalize_model_grads_func = finalize_model_grads
    start = 0
    if args.resume:
        start = load_checkpoint(find_latest(args.save_dir), [ddp_model], optimizer,
                                scheduler)["step"]
    data = batches(args.steps, 2, 2, 16)
    for _ in range(start * 2):   # the data stream is a pure function of the step
        next(data)
    losses = {}
    for step in range(start, args.steps):
        ddp_model.zero_grad_buffer()
        optimizer.zero_grad()
        out = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=data, model=[ddp_model],
            num_microbatches=2, seq_length=16, micro_batch_size=2, forward_only=False)
        optimizer.step()
        scheduler.step(increment=1)
        loss = torch.tensor(0.0)
        if ps.is_pipeline_last_stage():
            loss = torch.stack([o["loss"] for o in out]).mean()
        torch.distributed.all_reduce(loss, group=ps.get_pipeline_model_parallel_group())
        losses[step + 1] = loss.item()
        if step + 1 == args.save_at:
            save_checkpoint(args.save_dir, step + 1, [ddp_model], optimizer, scheduler,
                            keep_last=2)
    if torch.distributed.get_rank() == 0:
        print(json.dumps({"losses": losses}))
    destroy_distributed()


if __name__ == "__main__":
    main()
