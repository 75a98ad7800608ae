"""Rule rewards through ``shard_map`` on every rank: each response is scored once in the world.

    torchrun --nproc_per_node N tests/dist/shard_map_worker.py OUT_PREFIX
"""

import json
import sys

import torch.distributed as dist

from prism_megatron.distributed import shard_map
from prism_megatron.rewards import verifiable


def main(out: str) -> None:
    dist.init_process_group("gloo")
    calls = []
    real = verifiable.score_responses

    def counted(responses, truths, **kw):
        calls.extend(responses)
        return real(responses, truths, **kw)

    texts = [f"<caption>c</caption><think>t</think><answer>{k}</answer>" for k in range(7)]
    results = shard_map(lambda part: counted([t for t, _ in part], [a for _, a in part]),
                        [(t, "3") for t in texts])
    with open(f"{out}.rank{dist.get_rank()}.json", "w") as f:
        json.dump({"calls": calls, "accuracy": [r.accuracy for r in results]}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
