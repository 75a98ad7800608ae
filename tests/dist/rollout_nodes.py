"""Worker for tests/test_rollout_placement.py: rollout servers on every node.

    torchrun --nnodes 2 --node_rank K --nproc_per_node 1 ... tests/dist/rollout_nodes.py \\
        --model DIR --out result.json

Two torchrun launches on one host stand in for two nodes (each rank is its node's local rank
0). With ``rollout.servers_per_node=1`` each node owner launches one CPU server, the URLs are
gathered, and rank 0 (the sender) dispatches prompts of very different lengths across both
servers by expected tokens, then pushes weights to both with the distributed sync. Rank 0
writes the dispatch, the samples and the servers it saw.
"""

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--policy", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import torch
    import torch.distributed as dist

    from prism_megatron.config import RolloutConfig
    from prism_megatron.distributed import destroy_distributed, init_distributed
    from prism_megatron.rollout import RolloutPrompt, SamplingParams, make_rank_engine
    from prism_megatron.rollout.weight_sync import is_sender, sync_weights
    from rollout_common import fake_megatron_model

    torch.set_num_threads(1)
    init_distributed()                      # TP1/PP1: two data-parallel replicas
    cfg = RolloutConfig(engine="sglang", server="prism", servers_per_node=1,
                        request_timeout_s=300)
    engine = make_rank_engine(cfg, args.model, sender=is_sender(),
                              extra_server_args=["--num-threads", "1"])
    trainer, config = fake_megatron_model(Path(args.policy))
    result = {}
    if engine is not None:
        # one long prompt and five short ones: by count the long one's server would also get
        # two short ones; by expected tokens it gets the long one alone
        prompts = [RolloutPrompt(list(range(5, 125)))] + [
            RolloutPrompt(list(range(5 + k, 15 + k))) for k in range(5)]
        params = SamplingParams(temperature=1.0, max_new_tokens=4, seed=7, ignore_eos=True)
        samples = engine.generate(prompts, params, n=2)
        result.update(urls=[s.url for s in engine.servers], dispatch=engine.last_dispatch,
                      tokens=[[s.token_ids for s in group] for group in samples],
                      prompts=[p.input_ids for p in prompts])
    stats = sync_weights(trainer, engine, config, mode="distributed", check_tensors=2)
    if engine is not None:
        result.update(sync_bytes=stats.bytes, checked=stats.checked,
                      held=[t[:2].tolist() for t in engine.get_weights_by_name(
                          "model.language_model.layers.0.mlp.up_proj.weight", 2)])
        engine.shutdown()
        Path(args.out).write_text(json.dumps(result))
    dist.barrier()
    destroy_distributed()


if __name__ == "__main__":
    main()
