"""Worker: train the tiny GPT through prism_megatron.trainer.Trainer (AdamW, warmup + cosine),
checkpointing and resuming.

    torchrun ... gpt_resume.py --init-ckpt DIR --save-dir S [--save-at K] [--resume] [--tp T]
Rank 0 prints one JSON line {"losses": {step: loss}} for the steps this process ran.
"""

import argparse
import json

import torch

from gpt_parallel import batches, build


def forward(batch, model):
    from prism_megatron.trainer import token_loss_fn

    tokens, labels = batch["input_ids"], batch["labels"]
    position_ids = torch.arange(tokens.shape[1]).expand_as(tokens)
    return model(tokens, position_ids, None, labels=labels), token_loss_fn(batch["loss_mask"])


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

    from prism_megatron.config import CheckpointConfig, OptimizerConfig, ParallelConfig
    from prism_megatron.distributed import destroy_distributed, init_distributed
    from prism_megatron.trainer import Trainer

    init_distributed(tp=args.tp, pp=args.pp, seed=1234)
    config, model = build((args.tp, args.pp))
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), args.init_ckpt))
    trainer = Trainer(model, config, OptimizerConfig(lr=3e-3, warmup_ratio=0.2),
                      ParallelConfig(tp=args.tp, pp=args.pp,
                                     distributed_optimizer=args.distributed_optimizer),
                      CheckpointConfig(save_dir=args.save_dir, keep_last=2,
                                       resume="auto" if args.resume else "never"),
                      total_steps=args.steps)
    start = trainer.maybe_resume().get("step", 0)
    data = batches(args.steps, 2, 2, 16)
    for _ in range(start * 2):   # the data stream is a pure function of the step
        next(data)
    losses = {}
    for step in range(start, args.steps):
        micro = []
        for _ in range(2):
            tokens, labels = next(data)
            micro.append({"input_ids": tokens, "labels": labels,
                          "loss_mask": torch.ones_like(labels, dtype=torch.float)})
        losses[step + 1] = trainer.train_step(micro, forward, seq_length=16)["loss"]
        if step + 1 == args.save_at:
            trainer.save(step + 1)
    if torch.distributed.get_rank() == 0:
        print(json.dumps({"losses": losses}))
    destroy_distributed()


if __name__ == "__main__":
    main()
