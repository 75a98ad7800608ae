"""Worker for the discriminator's multi-process tests (CPU, gloo).

    torchrun --nproc_per_node N tests/dist/disc_worker.py ep --ckpt C --hf H --pairs P --ep E --out O
        Forward/backward of a fixed 16-sequence batch (4 pairs) in both routing modes (and with
        the allgather token dispatcher) at expert parallelism E. With one process the two halves of the batch run as two micro-batches,
        with two each rank runs one half (data parallel), so EP2 sees exactly EP1's tokens.
        Writes O.rank<r>.pt: scores and gradients (dense ones summed over data-parallel ranks,
        expert ones under their GLOBAL expert index).
    torchrun --nproc_per_node 2 tests/dist/disc_worker.py ep,nodeadlock ...
        Then two warm-up Trainer steps at DP2 (x EP2): rank 0's micro-batch has no valid pair
        (then no rank has one); writes O.nodeadlock.rank<r>.json.
"""

import argparse
import dataclasses
import json
import re

import torch
import torch.distributed as dist


def setup(args, ep: int):
    from megatron.core import parallel_state as ps

    from prism_megatron.data.encode import load_processor
    from prism_megatron.distributed import init_distributed
    from prism_megatron.data.pairs import load_pairs

    if not ps.model_parallel_is_initialized() or ps.get_expert_model_parallel_world_size() != ep:
        init_distributed(tp=args.tp, pp=1, ep=ep, seed=0)
    processor = load_processor(args.hf)
    pairs, _ = load_pairs([args.pairs], processor)
    return processor, pairs[:4]


def build(args, routing: str, dispatcher: str = "alltoall"):
    from prism_megatron.models.discriminator.model import (
        build_discriminator_from_config, load_discriminator, read_info)

    hf, info = read_info(args.ckpt)
    model, config = build_discriminator_from_config(
        hf, num_experts=info["num_experts"], top_k=info["top_k"], expert_routing=routing,
        padded_vocab_size=info["padded_vocab_size"], dispatcher=dispatcher)
    load_discriminator(model, args.ckpt)
    return model, config


def global_name(name: str, ep_rank: int, local_experts: int) -> str:
    match = re.search(r"local_experts\.(\d+)\.", name)
    if not match:
        return name
    index = ep_rank * local_experts + int(match.group(1))
    return name[:match.start(1)] + str(index) + name[match.end(1):]


def run_ep(args):
    from megatron.core import parallel_state as ps

    from prism_megatron.data.segments import collate_sequences, pair_sequences
    from prism_megatron.rl.scoring import read_scores

    processor, pairs = setup(args, args.ep)
    seqs = [s for p in pairs for s in pair_sequences(p.prompt, p.teacher, p.student).values()]
    halves = [seqs[:8], seqs[8:]]
    # some padding in every row; a multiple of 4 so that TP2/TP4 sequence parallelism splits it
    length = -(-(max(len(s.input_ids) for s in seqs) + 3) // 4) * 4
    rank, dp = dist.get_rank(), ps.get_data_parallel_world_size()
    mine = [0, 1] if dp == 1 else [ps.get_data_parallel_rank()]
    weights = torch.linspace(-1.0, 1.5, 16).view(2, 8)
    result = {}
    for variant in ("learned", "segment", "learned-allgather"):
        routing, _, dispatcher = variant.partition("-")
        model, config = build(args, routing, dispatcher or "alltoall")
        model.train()
        model.set_aux_loss(0.01)
        model.set_step_aux_scale(1.0)
        scores = []
        for half in mine:
            batch = collate_sequences(halves[half], pad_id=processor.tokenizer.pad_token_id,
                                      position_fn=model.position_fn, length=length)
            values = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                           attention_mask=batch["attention_mask"], kind=batch["kind"],
                           valid_tokens=batch["valid_tokens"], pixel_values=batch["pixel_values"],
                           image_grid_thw=batch["image_grid_thw"])
            s = read_scores(values, batch["score_index"])
            (s * weights[half]).sum().backward()
            scores.append(s.detach())
        local_experts = config.num_moe_experts // ps.get_expert_model_parallel_world_size()
        grads = {}
        for name, param in model.named_parameters():
            grad = param.grad.detach().clone()
            if "local_experts" not in name:
                dist.all_reduce(grad, group=ps.get_data_parallel_group())
            grads[global_name(name, ps.get_expert_model_parallel_rank(), local_experts)] = (
                tp_full_grad(name, param, grad, config))
        result[variant] = {"scores": torch.cat(scores), "grads": grads,
                           "load": tp_summed(model.take_load()),
                           "dp_rank": ps.get_data_parallel_rank(),
                           "tp_rank": ps.get_tensor_model_parallel_rank()}
    torch.save(result, f"{args.out}.rank{rank}.pt")


def tp_full_grad(name, param, grad, config):
    """The TP1 gradient of ``param`` from this rank's: partial sums of the sequence-parallel
    norms / routers and the q/k norms all-reduced over TP (megatron's finalize_model_grads),
    tensor-parallel shards gathered (SwiGLU fc1 shards hold [gate_r; up_r])."""
    from megatron.core import parallel_state as ps

    if ps.get_tensor_model_parallel_world_size() == 1:
        return grad
    if getattr(param, "sequence_parallel", False) or "q_layernorm" in name or "k_layernorm" in name:
        dist.all_reduce(grad, group=ps.get_tensor_model_parallel_group())
    if not getattr(param, "tensor_model_parallel", False):
        return grad
    expert = "local_experts" in name
    group = (ps.get_expert_tensor_parallel_group() if expert
             else ps.get_tensor_model_parallel_group())
    shards = [torch.empty_like(grad) for _ in range(dist.get_world_size(group))]
    dist.all_gather(shards, grad.contiguous(), group=group)
    dim = param.partition_dim
    if "linear_fc1" in name and name.startswith("language_model") and config.gated_linear_unit:
        halves = [s.chunk(2, dim=dim) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=dim)
    return torch.cat(shards, dim=dim)


def tp_summed(load):
    """Expert load: with sequence parallelism each TP rank routed its own slice of the tokens."""
    from megatron.core import parallel_state as ps

    if ps.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(load, group=ps.get_tensor_model_parallel_group())
    return load


def run_nodeadlock(args):
    from megatron.core import parallel_state as ps

    from prism_megatron.config import CheckpointConfig, OptimizerConfig, ParallelConfig
    from prism_megatron.rl.pair_stats import PairStats
    from prism_megatron.rl.discriminator import pair_forward, pair_loss_fn, plan_pairs
    from prism_megatron.trainer import Trainer

    processor, pairs = setup(args, args.ep)   # with ep=2 the forwards also all-to-all

    def invalid(p):
        return dataclasses.replace(p, student=dataclasses.replace(p.student, valid=False))

    # Global batch [0, 1, 2, 3] is dealt out strided: rank 0 gets pairs 0 and 2, rank 1 gets 1, 3.
    cases = {"rank0_without_valid_pairs": [invalid(pairs[0]), pairs[1], invalid(pairs[2]), pairs[3]],
             "no_valid_pairs_anywhere": [invalid(p) for p in pairs]}
    model, config = build(args, "learned")
    model.set_aux_loss(0.01)
    trainer = Trainer(model, config, OptimizerConfig(lr=1e-4, warmup_ratio=0.0),
                      ParallelConfig(tp=args.tp, ep=args.ep), CheckpointConfig(), total_steps=4)
    out = {"rank": dist.get_rank()}
    for name, case in cases.items():
        plan = plan_pairs(case, [0, 1, 2, 3], dp_rank=ps.get_data_parallel_rank(),
                         dp_size=ps.get_data_parallel_world_size(), micro=2,
                         pad_id=processor.tokenizer.pad_token_id, position_fn=model.position_fn)
        stats = PairStats()
        model.set_step_aux_scale(1.0)
        metrics = trainer.train_step(plan.batches, pair_forward(lambda b: pair_loss_fn(b, stats)),
                                     plan.seq_length)
        pair = stats.reduce()
        out[name] = {"loss": metrics["loss"], "grad_norm": metrics["grad_norm"],
                     "valid_local": int(plan.batches[0]["student_valid"].sum()),
                     "valid_global": plan.batches[0]["valid_global"], "pairs": pair["pairs"]}
    with open(f"{args.out}.nodeadlock.rank{dist.get_rank()}.json", "w") as f:
        json.dump(out, f)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("modes", help="comma-separated: ep, nodeadlock")
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--hf", required=True)
    parser.add_argument("--pairs", required=True)
    parser.add_argument("--ep", type=int, default=1)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    from prism_megatron.distributed import destroy_distributed

    try:
        for mode in args.modes.split(","):
            {"ep": run_ep, "nodeadlock": run_nodeadlock}[mode](args)
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
