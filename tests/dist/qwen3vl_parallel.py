"""Worker: Qwen3-VL logits and gradient parity with transformers at one TP/PP layout (gloo, CPU).

    torchrun --nproc_per_node T*P tests/dist/qwen3vl_parallel.py --tp T --pp P \
        --model [LABEL=]HF_DIR[@n0,n1,...] ... [--save-ckpt DIR]

For every model (``@`` gives an uneven pipeline split) and input case (no image, one image, two
images of different sizes) the Megatron stages run through megatron's pipeline schedule; the last
stage compares its logits with transformers'. One backward of the LM loss (case "two") then
compares every parameter's gradient on every rank with the matching slice of transformers'
gradients. Rank 0 prints one JSON line. ``--save-ckpt`` writes the first model's weights as a
dist_checkpointing checkpoint (for the resharding test).
"""

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qwen3vl_common as C  # noqa: E402

CASES = ("none", "one", "two")


def run_schedule(model, inputs, labels=None, loss_mask=None, forward_only=True, gather=True):
    """One micro-batch through megatron's schedule; returns the last stage's logits or loss."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        out = model(batch["input_ids"], pixel_values=batch.get("pixel_values"),
                    image_grid_thw=batch.get("image_grid_thw"), labels=labels,
                    runtime_gather_output=gather)
        if labels is None:
            return out, None

        def loss_func(per_token):
            loss = (per_token * loss_mask).sum() / loss_mask.sum()
            return loss, {"loss": loss.detach()}

        return out, loss_func

    batch, seq = inputs["input_ids"].shape
    result = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([inputs]), model=[model],
        num_microbatches=1, seq_length=seq, micro_batch_size=batch, forward_only=forward_only)
    return result[0] if result else None


def hf_grads(hf_model, inputs):
    hf_model.zero_grad()
    C.hf_forward(hf_model, inputs, labels=inputs["input_ids"]).loss.backward()
    grads = {n: p.grad for n, p in hf_model.named_parameters() if p.grad is not None}
    return C.hf_to_megatron(grads, hf_model.config)


def grad_parity(model, hf_model, inputs):
    """Max |grad diff| / max |grad| over this rank's parameters, and how many were compared."""
    from megatron.core import parallel_state as ps

    labels, loss_mask = C.next_token_labels(inputs["input_ids"])
    model.zero_grad()
    run_schedule(model, inputs, labels, loss_mask, forward_only=False)
    # What megatron's finalize_model_grads does (it needs a DDP-wrapped model): sum the q/k-norm
    # gradients over TP (each rank normalises only its own heads) and the tied embedding copies.
    for name, param in model.named_parameters():
        if "q_layernorm" in name or "k_layernorm" in name:
            dist.all_reduce(param.grad, group=ps.get_tensor_model_parallel_group())
    if model.share_embeddings_and_output_weights and ps.get_pipeline_model_parallel_world_size() > 1:
        weight = model.shared_embedding_or_output_weight()
        dist.all_reduce(weight.grad, group=ps.get_embedding_group())
    offset, count = C.stage_layout(model)
    expected = C.shard_for_rank(
        hf_grads(hf_model, inputs), tp=ps.get_tensor_model_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(), layer_offset=offset, num_local_layers=count,
        pre_process=model.pre_process, post_process=model.post_process,
        padded_vocab=model.padded_vocab_size, tied=bool(hf_model.config.tie_word_embeddings))
    worst, compared = 0.0, 0
    for name, param in model.named_parameters():
        ref = expected[name]
        rel = ((param.grad - ref).abs().max() / ref.abs().max().clamp(min=1e-12)).item()
        if os.environ.get("QWEN3VL_DEBUG") and rel > 1e-4:
            print(f"rank {dist.get_rank()} {name}: rel grad diff {rel:.3g}", flush=True)
        worst = max(worst, rel)
        compared += 1
    return worst, compared


@torch.no_grad()
def vocab_parallel_check(model, hf_model):
    """Un-gathered logits: this rank's vocabulary slice, padding columns at the dtype's minimum."""
    from megatron.core import parallel_state as ps

    inputs = C.make_inputs(hf_model.config, "one")
    shard = run_schedule(model, inputs, gather=False)
    if not ps.is_pipeline_last_stage():
        return None
    width = shard.shape[-1]
    assert width * ps.get_tensor_model_parallel_world_size() == model.padded_vocab_size
    start = ps.get_tensor_model_parallel_rank() * width
    ref = C.hf_forward(hf_model, inputs).logits[..., start:start + width]
    real = ref.shape[-1]
    assert (shard[..., real:] == torch.finfo(shard.dtype).min).all()
    return (shard[..., :real] - ref).abs().max().item()


def check_model(spec: str, args, results: list, save_ckpt: str | None):
    from megatron.core import parallel_state as ps

    from prism_megatron.config import ParallelConfig
    from prism_megatron.models.qwen3_vl.model import build_qwen3vl_model

    label, _, spec = spec.rpartition("=")
    hf_dir, _, split = spec.partition("@")
    pp_layers = [int(n) for n in split.split(",")] if split else None
    hf_model = C.load_hf_model(hf_dir)
    model, _ = build_qwen3vl_model(hf_dir, ParallelConfig(tp=args.tp, pp=args.pp, pp_layers=pp_layers))
    C.load_hf_weights(model, hf_model)
    model.eval()
    name = (label or os.path.basename(hf_dir.rstrip("/"))) + (f"@{split}" if split else "")
    row = {"model": name, "carry_deepstack": model.carry_deepstack}
    for case in CASES:
        inputs = C.make_inputs(hf_model.config, case)
        with torch.no_grad():
            logits = run_schedule(model, inputs)
            if ps.is_pipeline_last_stage():
                ref = C.hf_forward(hf_model, inputs).logits
                assert logits.shape == ref.shape, (logits.shape, ref.shape)
                row[case] = (logits - ref).abs().max().item()
    if ps.get_tensor_model_parallel_world_size() > 1:
        row["vocab_parallel"] = vocab_parallel_check(model, hf_model)
    row["grad_rel"], row["grads_compared"] = grad_parity(model, hf_model, C.make_inputs(hf_model.config, "two"))
    results.append(row)
    if save_ckpt:
        from megatron.core import dist_checkpointing

        os.makedirs(save_ckpt, exist_ok=True)
        dist_checkpointing.save(model.sharded_state_dict(), save_ckpt, sharded_strategy=("torch_dist", 1))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--model", action="append", required=True)
    p.add_argument("--save-ckpt")
    args = p.parse_args()
    torch.set_num_threads(1)

    from prism_megatron.distributed import destroy_distributed, init_distributed

    init_distributed(tp=args.tp, pp=args.pp, seed=1234)
    results = []
    for i, spec in enumerate(args.model):
        check_model(spec, args, results, args.save_ckpt if i == 0 else None)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps({"tp": args.tp, "pp": args.pp, "ranks": gathered}))
    destroy_distributed()


if __name__ == "__main__":
    main()
