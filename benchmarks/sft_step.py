"""SFT train-step time: the Megatron Qwen3-VL (local spec, one process) against transformers'
Qwen3VLForConditionalGeneration on the same tiny model and the same packed batch.

    python benchmarks/sft_step.py [--preset tiny] [--steps 10] [--batch 8]

Both do forward + backward + AdamW step in fp32 on CPU; prints median step times and the ratio
(megatron / transformers; < 1 means megatron is faster).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def timed(step, n: int) -> float:
    step()  # warm-up
    times = []
    for _ in range(n):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()

    import torch
    from transformers import Qwen3VLForConditionalGeneration

    from prism_megatron.config import CheckpointConfig, OptimizerConfig, ParallelConfig
    from prism_megatron.convert.hf_to_megatron import convert_hf_to_megatron
    from prism_megatron.data.collate import collate_padded
    from prism_megatron.data.encode import load_processor
    from prism_megatron.data.sft import load_sft_samples
    from prism_megatron.data.synthetic import write_dataset
    from prism_megatron.distributed import init_distributed
    from prism_megatron.models.qwen3_vl.model import build_qwen3vl_model, load_initial_weights
    from prism_megatron.models.qwen3_vl.rope import rope_index_for_sample
    from prism_megatron.testing.tiny import write_tiny_model
    from prism_megatron.stages.sft import sft_forward
    from prism_megatron.trainer import Trainer

    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp(prefix="bench-sft-"))
    hf_dir = write_tiny_model(work / "model", preset=args.preset, log=lambda *a: None)
    write_dataset(work / "data", 0, {"sft_public": 0, "sft_teacher": args.batch, "align": 0,
                                     "rl": 0, "test": 0}, log=lambda *a: None)
    convert_hf_to_megatron(hf_dir, work / "megatron", fmt="torch_dist", progress=False)
    processor = load_processor(hf_dir)
    samples, _ = load_sft_samples([str(work / "data" / "sft_teacher.jsonl")], processor,
                                  max_prompt_length=1024, max_response_length=512, progress=False)

    init_distributed(seed=0)
    model, config = build_qwen3vl_model(hf_dir)
    load_initial_weights(model, type("M", (), {"megatron_dir": str(work / "megatron")})())
    batch = collate_padded(samples, pad_id=processor.tokenizer.pad_token_id,
                           position_fn=partial(rope_index_for_sample, hf_config=model.hf_config))
    seq = batch["input_ids"].shape[1]
    trainer = Trainer(model, config, OptimizerConfig(lr=1e-5, warmup_ratio=0.0), ParallelConfig(),
                      CheckpointConfig(), total_steps=args.steps + 2)
    megatron_s = timed(lambda: trainer.train_step([batch], sft_forward, seq), args.steps)

    hf_model = Qwen3VLForConditionalGeneration.from_pretrained(hf_dir).train()
    optimizer = torch.optim.AdamW(hf_model.parameters(), lr=1e-5)
    labels = batch["labels"]
    hf_labels = torch.full_like(labels, -100)
    hf_labels[:, 1:] = labels[:, :-1]   # transformers shifts inside the loss
    image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    hf_inputs = dict(input_ids=batch["input_ids"], attention_mask=(batch["segment_ids"] > 0).long(),
                     pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                     mm_token_type_ids=(batch["input_ids"] == image_token).long(), labels=hf_labels)

    def hf_step():
        optimizer.zero_grad()
        hf_model(**hf_inputs).loss.backward()
        torch.nn.utils.clip_grad_norm_(hf_model.parameters(), 1.0)
        optimizer.step()

    hf_s = timed(hf_step, args.steps)
    tokens = int((batch["segment_ids"] > 0).sum())
    print(f"batch: {args.batch} samples, {tokens} tokens, padded to {seq}; preset {args.preset}")
    print(f"megatron step:     {megatron_s * 1e3:8.1f} ms  ({tokens / megatron_s:,.0f} tokens/s)")
    print(f"transformers step: {hf_s * 1e3:8.1f} ms  ({tokens / hf_s:,.0f} tokens/s)")
    print(f"ratio megatron/transformers step time: {megatron_s / hf_s:.2f}")


if __name__ == "__main__":
    main()
