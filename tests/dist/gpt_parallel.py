"""Worker: a tiny megatron-core GPT trains a few steps at a given TP/PP on CPU (gloo).

    torchrun --nproc_per_node N tests/dist/gpt_parallel.py --tp T --pp P --ckpt DIR [--init]

With --init (one process) it writes the initial weights as a dist_checkpointing checkpoint;
otherwise it loads them (megatron reshards to this TP/PP), trains, and rank 0 prints one JSON
line with the per-step losses.
"""

import argparse
import json
from pathlib import Path
import torch
import torch.nn.functional as F


def build(tp_pp_config):
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=4, hidden_size=32, num_attention_heads=4, num_query_groups=2,
        ffn_hidden_size=64, gated_linear_unit=True, activation_func=F.silu,
        normalization="RMSNorm", qk_layernorm=True, add_bias_linear=False, hidden_dropout=0.0,
        attention_dropout=0.0, use_cpu_initialization=True, pipeline_dtype=torch.float32,
        tensor_model_parallel_size=tp_pp_config[0], pipeline_model_parallel_size=tp_pp_config[1])
    model = GPTModel(config, get_gpt_layer_local_spec(qk_layernorm=True), vocab_size=128,
                     max_sequence_length=16, share_embeddings_and_output_weights=False,
                     position_embedding_type="rope",
                     pre_process=ps.is_pipeline_first_stage(),
                     post_process=ps.is_pipeline_last_stage())
    return config, model


def batches(steps, micro_batches, micro_batch_size, seq):
    """The same few sequences every step, so the loss has something to go down on."""
    gen = torch.Generator().manual_seed(7)
    fixed = [torch.randint(0, 128, (micro_batch_size, seq + 1), generator=gen)
             for _ in range(micro_batches)]
    for _ in range(steps):
        for tokens in fixed:
            yield tokens[:, :-1], tokens[:, 1:]


def forward_step(data_iterator, model):
    tokens, labels = next(data_iterator)
    position_ids = torch.arange(tokens.shape[1]).expand_as(tokens)
    losses = model(tokens, position_ids, None, labels=labels)

    def loss_func(per_token):
        loss = per_token.float().mean()
        return loss, {"loss": loss.detach().clone()}  # the schedule divides loss in place

    return losses, loss_func


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--init", action="store_true")
    args = p.parse_args()

    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from prism_megatron.distributed import destroy_distributed, init_distributed

    init_distributed(tp=args.tp, pp=args.pp, seed=1234)
    config, model = build((args.tp, args.pp))
    if args.init:
        Path(args.ckpt).mkdir(parents=True, exist_ok=True)
        dist_checkpointing.save(model.sharded_state_dict(), args.ckpt,
                                sharded_strategy=("torch_dist", 1))
        destroy_distributed()
        return
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), args.ckpt))

    ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=False)
    ddp_model = DistributedDataParallel(config, ddp_config, model)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="sgd", lr=0.5, sgd_momentum=0.0, clip_grad=1.0, use_distributed_optimizer=False),
        [ddp_model])
    config.finalize_model_grads_func = finalize_model_grads
    forward_backward = get_forward_backward_func()
    micro_batches, mbs, seq = 2, 2, 16
    data = batches(args.steps, micro_batches, mbs, seq)
    losses, norms = [], []
    for _ in range(args.steps):
        ddp_model.zero_grad_buffer()
        optimizer.zero_grad()
        out = forward_backward(forward_step_func=forward_step, data_iterator=data,
                               model=[ddp_model], num_microbatches=micro_batches,
                               seq_length=seq, micro_batch_size=mbs, forward_only=False)
        _, grad_norm, _ = optimizer.step()
        norms.append(grad_norm)
        loss = torch.tensor(0.0)
        if ps.is_pipeline_last_stage():
            loss = torch.stack([o["loss"] for o in out]).mean()
        # The last stage holds the loss: share it so rank 0 can print it.
        torch.distributed.all_reduce(loss, group=ps.get_pipeline_model_parallel_group())
        losses.append(loss.item())
    if torch.distributed.get_rank() == 0:
        print(json.dumps({"tp": args.tp, "pp": args.pp, "losses": losses, "grad_norms": norms}))
    destroy_distributed()


if __name__ == "__main__":
    main()
