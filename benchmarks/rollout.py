"""CPU rollout engine throughput vs transformers' ``generate`` on the same model and batch.

    python benchmarks/rollout.py [--preset tiny] [--prompts 8] [--n 4] [--max-new-tokens 64]

Both sides sample (temperature 1.0) ``n`` responses for each prompt (a mix of image and text
prompts built by the project's prompt encoder, so lengths differ and need left padding), with
eos ignored so that every response has exactly ``max_new_tokens`` tokens; transformers gets the
whole batch in one ``generate`` call with ``num_return_sequences=n``. Runs alternate between the
two; each side's best of ``--repeats`` is reported as generated tokens per second, both per
wall-clock second and per CPU second of this process (the latter is what to compare on a shared
machine: other jobs inflate wall time, not our CPU time; with ``--threads 1`` it is exact).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_inputs(processor, count: int):
    from prism_megatron.testing.prompts import encoded_prompts, prompt_specs

    encs = encoded_prompts(processor)
    specs = prompt_specs()
    pick = [i % len(specs) for i in range(count)]
    return [encs[i] for i in pick], [specs[i] for i in pick]


def run_engine(engine, prompts, n, max_new):
    from prism_megatron.rollout import SamplingParams

    params = SamplingParams(temperature=1.0, max_new_tokens=max_new, ignore_eos=True, seed=0)
    t0, c0 = time.perf_counter(), time.process_time()
    out = engine.generate(prompts, params, n=n)
    elapsed = (time.perf_counter() - t0, time.process_time() - c0)
    return sum(len(s) for samples in out for s in samples), elapsed


def run_hf(model, processor, specs, n, max_new):
    texts = [processor.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
             for m, _ in specs]
    images = [img for _, imgs in specs for img in imgs] or None
    processor.tokenizer.padding_side = "left"
    batch = processor(text=texts, images=images, padding=True, return_tensors="pt")
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        out = model.generate(**batch, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                             num_return_sequences=n, max_new_tokens=max_new,
                             min_new_tokens=max_new)
    elapsed = (time.perf_counter() - t0, time.process_time() - c0)
    return (out.shape[1] - batch["input_ids"].shape[1]) * out.shape[0], elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: CPU time is exact on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from prism_megatron.testing.tiny import write_tiny_model
    from prism_megatron.rollout import RolloutPrompt
    from prism_megatron.rollout.local import LocalEngine

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_tiny_model(Path(tmp) / "m", preset=args.preset, seed=0, log=lambda *_: None)
        engine = LocalEngine(model_dir)
        encs, specs = build_inputs(engine.processor, args.prompts)
        prompts = [RolloutPrompt.from_encoded(e, imgs) for e, imgs in encs]
        lengths = sorted(len(p.input_ids) for p in prompts)
        print(f"model: {args.preset}; batch: {args.prompts} prompts (lengths {lengths[0]}..{lengths[-1]}) "
              f"x n={args.n}, {args.max_new_tokens} new tokens each; torch threads {args.threads}")
        run_engine(engine, prompts[:2], 1, 4)                     # warm-up both paths
        run_hf(engine.model, engine.processor, specs[:2], 1, 4)
        ours, theirs = [], []
        for r in range(args.repeats):
            tokens, t_ours = run_engine(engine, prompts, args.n, args.max_new_tokens)
            tokens_hf, t_hf = run_hf(engine.model, engine.processor, specs, args.n,
                                     args.max_new_tokens)
            ours.append((tokens / t_ours[0], tokens / t_ours[1]))
            theirs.append((tokens_hf / t_hf[0], tokens_hf / t_hf[1]))
            print(f"  run {r + 1}: engine {tokens} tokens in {t_ours[0]:.2f}s wall / "
                  f"{t_ours[1]:.2f}s cpu; transformers {tokens_hf} tokens in {t_hf[0]:.2f}s wall / "
                  f"{t_hf[1]:.2f}s cpu")
        for k, label in ((0, "wall-clock"), (1, "CPU-time")):
            a, b = max(x[k] for x in ours), max(x[k] for x in theirs)
            print(f"{label:>10} tokens/s (best of {args.repeats}): CPU engine {a:.0f}, "
                  f"transformers generate {b:.0f}, ratio {a / b:.2f}x")

if __name__ == "__main__":
    main()
