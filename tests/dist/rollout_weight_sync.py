"""Worker for tests/test_rollout_weight_sync.py: Megatron trainer -> rollout engine weight sync.

    torchrun --nproc_per_node 2 tests/dist/rollout_weight_sync.py --engine-hf A --policy-hf B \\
        --layouts 1x1:tensor,2x1:tensor,1x2:disk --work DIR --out result.json

For each TPxPP layout (the world is reused: 1x1 on two ranks is TP1 with two data-parallel
replicas): build the Megatron Qwen3-VL with B's weights (the trainer), a CPU engine with A's on
rank 0 (for ``distributed``: the CPU server as a real process, reset to A first), sample
responses (fixed seed), and compare the engine's log-probs with the trainer's recomputed ones
before and after ``sync_weights``; distributed layouts sync twice (the group and the plan are
reused). Rank 0 writes ``{layout: {"before": max|diff|, "after": max|diff|, "buckets": ...,
"max_bucket_bytes": ..., "bytes_per_rank": [...], "model_bytes": ...}}``.
"""

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE))

BUCKET_MB = 0.25


def megatron_logprobs(model, config, enc, responses):
    """The trainer's log-probs of each response (rank 0; None elsewhere): one forward of
    prompt + response through megatron's pipeline schedule, log-softmax on the last stage."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    out = []
    for response in responses:
        ids = torch.cat([enc.input_ids, torch.tensor(response, dtype=torch.long)])[None]
        batch = {"input_ids": ids}
        if enc.pixel_values is not None:
            batch.update(pixel_values=enc.pixel_values, image_grid_thw=enc.image_grid_thw)
        start = enc.input_ids.shape[0] - 1
        captured = {}

        def forward_step(data_iterator, model):
            output = model(**next(data_iterator))

            def collect(logits):
                logp = torch.log_softmax(logits[0, start:-1].float(), dim=-1)
                captured["lp"] = logp.gather(1, torch.tensor(response)[:, None])[:, 0]
                return logits.new_zeros(()), {}

            return output, collect

        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([batch]), model=[model],
            num_microbatches=1, seq_length=ids.shape[1], micro_batch_size=1, forward_only=True)
        lp = captured.get("lp", torch.empty(len(response)))
        if ps.get_pipeline_model_parallel_world_size() > 1:   # last stage -> first stage
            dist.broadcast(lp.contiguous(), src=ps.get_pipeline_model_parallel_last_rank(),
                           group=ps.get_pipeline_model_parallel_group())
        out.append(lp if dist.get_rank() == 0 else None)
    return out


def run_layout(args, tp, pp, mode, hf_b, processor, work: Path, server=None):
    import torch
    import torch.distributed as dist

    from prism_megatron.convert.verify import build_megatron
    from prism_megatron.distributed import init_distributed
    from prism_megatron.rollout import RolloutPrompt, SamplingParams
    from prism_megatron.rollout.local import LocalEngine
    from prism_megatron.rollout.weight_sync import is_sender, sync_weights
    from qwen3vl_common import load_hf_weights
    from rollout_common import encoded_prompts

    init_distributed(tp=tp, pp=pp)
    model, config = build_megatron(args.policy_hf)
    load_hf_weights(model, hf_b)
    if mode == "distributed":
        engine = server if is_sender() else None
        if engine is not None:
            engine.update_weights_from_disk(args.engine_hf)   # back to A
    else:
        engine = LocalEngine(args.engine_hf) if is_sender() else None
    encs = encoded_prompts(processor)[:2]         # one image prompt, one text prompt
    params = SamplingParams(temperature=1.0, max_new_tokens=10, seed=3)

    def gap() -> float | None:
        samples = [engine.generate([RolloutPrompt.from_encoded(e, imgs)], params, n=2)[0]
                   if engine else None for e, imgs in encs]
        box = [samples]
        dist.broadcast_object_list(box, src=0)     # every rank runs the trainer's forward
        worst = 0.0
        for (enc, _), per_prompt in zip(encs, box[0]):
            ref = megatron_logprobs(model, config, enc, [s.token_ids for s in per_prompt])
            if dist.get_rank() == 0:
                for s, r in zip(per_prompt, ref):
                    worst = max(worst, float((torch.tensor(s.logprobs) - r).abs().max()))
        return worst

    before = gap()

    def sync():
        return sync_weights(model, engine, hf_b.config, bucket_mb=BUCKET_MB, mode=mode,
                            disk_dir=work / f"sync-{tp}x{pp}", hf_dir=args.policy_hf,
                            check_tensors=3)

    stats = sync()
    after = gap()
    result = {"before": before, "after": after, "mode": mode}
    if mode == "distributed":
        from prism_megatron.rollout import weight_sync

        senders = len(weight_sync._SENDERS)
        again = sync()
        builds = weight_sync.plan_for(model, hf_b.config).builds
        per_rank = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, {"bytes": stats.bytes if stats else 0,
                                          "tensors": stats.tensors if stats else 0,
                                          "checked": stats.checked if stats else 0,
                                          "again": again.bytes if again else 0,
                                          "reused": len(weight_sync._SENDERS) == senders,
                                          "builds": builds})
        result.update(bytes_per_rank=[r["bytes"] for r in per_rank],
                      again_per_rank=[r["again"] for r in per_rank],
                      tensors_per_rank=[r["tensors"] for r in per_rank],
                      checked_per_rank=[r["checked"] for r in per_rank],
                      groups_reused=all(r["reused"] for r in per_rank),
                      plan_builds=max(r["builds"] for r in per_rank),
                      after_second=gap())
    if dist.get_rank() == 0:
        result.update(buckets=stats.buckets, tensors=stats.tensors,
                      max_bucket_bytes=stats.max_bucket_bytes,
                      model_bytes=sum(p.numel() * p.element_size() for p in hf_b.parameters()))
        return result
    return None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine-hf", required=True)
    parser.add_argument("--policy-hf", required=True)
    parser.add_argument("--layouts", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import torch
    import torch.distributed as dist

    from prism_megatron.data.encode import load_processor
    from prism_megatron.distributed import destroy_distributed
    from qwen3vl_common import load_hf_model

    torch.set_num_threads(1)
    hf_b = load_hf_model(args.policy_hf)
    processor = load_processor(args.policy_hf)
    results = {}
    server = None
    if "distributed" in args.layouts and os.environ.get("RANK", "0") == "0":   # one CPU server
        from prism_megatron.rollout.sglang import SGLangEngine

        server = SGLangEngine(model_path=args.engine_hf, server="prism", request_timeout_s=300,
                              extra_server_args=["--num-threads", "1"])
    try:
        with tempfile.TemporaryDirectory() as work:
            for item in args.layouts.split(","):
                layout, mode = item.split(":")
                tp, pp = map(int, layout.split("x"))
                results[layout] = run_layout(args, tp, pp, mode, hf_b, processor, Path(work),
                                             server)
                dist.barrier()
    finally:
        if server is not None:
            server.shutdown()
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(results))
    destroy_distributed()


if __name__ == "__main__":
    main()
