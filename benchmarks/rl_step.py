"""RL step costs on the tiny Qwen3-VL, side by side in one run (one process, CPU):

1. the policy's log-prob pass + update on a long-tailed response-length mix (generated here:
   most responses short, a few up to the maximum, as RL rollouts are), padded micro-batches
   (``data.micro_batch_size`` sequences each) vs token-budget packing
   (``data.max_tokens_per_micro_batch``): padding efficiency (real tokens / computed positions)
   and seconds, with the packed/padded time ratio;
2. the discriminator update of an alignment step: sequences forwarded per prompt and seconds,
   teachers shared per prompt (what the stage runs) vs the per-pair formulation (the test
   oracle);
3. RLVR wall time of ``--rlvr-steps`` steps (the sum of the logged step times, start-up
   excluded) with ``algorithm.off_policy_steps`` 1 vs 0, the engine the CPU server
   (``rollout/serve.py``) in its own process, each process on one thread, runs in ABBA order:
   the ratio, and where the steps' time went (generation, log-prob + update, waiting on the
   in-flight generation). The overlap needs a free core for the server: on a loaded machine the
   ratio says little (the load average is printed with it).

    python benchmarks/rl_step.py [--prompts 8] [--n 8] [--max-response 256] [--repeats 3]
                                 [--rlvr-steps 6]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def long_tailed_lengths(count: int, maximum: int, seed: int) -> list[int]:
    """Mostly short responses, a tail up to ``maximum`` (a log-uniform mix)."""
    rng = random.Random(seed)
    return [max(4, min(maximum, int(8 * (maximum / 8) ** rng.random() ** 2))) for _ in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=8, help="samples per prompt")
    parser.add_argument("--max-response", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rlvr-steps", type=int, default=6, help="0: skip the RLVR runs")
    args = parser.parse_args()

    import torch

    from prism_megatron.config import load_config
    from prism_megatron.convert.hf_to_megatron import convert_hf_to_megatron
    from prism_megatron.convert.upcycle import upcycle
    from prism_megatron.data.encode import load_processor
    from prism_megatron.data.pairs import PairSample
    from prism_megatron.data.rl import load_rl_prompts
    from prism_megatron.data.segments import pair_segments, text_segments
    from prism_megatron.data.synthetic import write_dataset
    from prism_megatron.distributed import init_distributed
    from prism_megatron.models.qwen3_vl.model import build_qwen3vl_model, load_initial_weights
    from prism_megatron.rl import logprobs as lp
    from prism_megatron.rl.batch import RolloutBatch, plan_micro_batches
    from prism_megatron.rl.discriminator import (
        Discriminator, online_loss_fn, pair_forward, plan_groups, plan_pairs)
    from prism_megatron.rl.pair_stats import PairStats
    from prism_megatron.rollout.base import Sample
    from prism_megatron.testing.tiny import write_tiny_model
    from prism_megatron.trainer import Trainer

    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp(prefix="bench-rl-"))
    hf_dir = write_tiny_model(work / "model", preset="tiny", log=lambda *a: None)
    write_dataset(work / "data", 0, {"sft_public": 0, "sft_teacher": 0, "align": args.prompts,
                                     "rl": 0, "test": 0}, log=lambda *a: None)
    convert_hf_to_megatron(hf_dir, work / "megatron", fmt="torch_dist", progress=False)
    upcycle(hf_dir, work / "disc", noise_std=0.01, progress=False, log=lambda *a: None)
    cfg = load_config(None, [f"model.hf_dir={hf_dir}", f"model.megatron_dir={work / 'megatron'}",
                             f"discriminator.megatron_dir={work / 'disc'}",
                             f"data.micro_batch_size={args.micro_batch}", "checkpoint.enabled=false",
                             "algorithm.name=prism", f"rollout.n={args.n}"])
    processor = load_processor(hf_dir)
    tok = processor.tokenizer
    prompts, _ = load_rl_prompts([str(work / "data" / "align.jsonl")], processor,
                                 max_prompt_length=1024, require=("teacher_caption", "teacher_cot"),
                                 progress=False)
    init_distributed(seed=0)

    # ---- 1. policy: padded vs packed micro-batches -------------------------------------
    lengths = long_tailed_lengths(len(prompts) * args.n, args.max_response, seed=0)
    rng = random.Random(1)
    vocab = sorted(set(tok("count the red blue green cells in the grid then compare the totals "
                           "and answer with the letter of the right option", add_special_tokens=False)
                       ["input_ids"]))
    groups = [[Sample([rng.choice(vocab) for _ in range(lengths[g * args.n + j])],
                      [0.0] * lengths[g * args.n + j], "", "stop") for j in range(args.n)]
              for g in range(len(prompts))]
    batch = RolloutBatch.from_groups(prompts, groups)
    batch.advantages = torch.randn(len(batch), generator=torch.Generator().manual_seed(0))
    model, tconfig = build_qwen3vl_model(cfg.model, cfg.parallel)
    load_initial_weights(model, cfg.model)
    trainer = Trainer(model, tconfig, cfg.optimizer, cfg.parallel, cfg.checkpoint, total_steps=100)
    settings = lp.LossSettings.from_config(cfg.algorithm, 1.0)
    prompt_tokens = sum(len(p.encoded.input_ids) for p in prompts) / len(prompts)
    real_tokens = batch.tokens()
    budget = 2 * max(len(batch.sequence(i).input_ids) for i in range(len(batch)))
    print(f"policy: {len(batch)} sequences, prompt ~{prompt_tokens:.0f} tokens, responses "
          f"{min(lengths)}..{max(lengths)} (median {statistics.median(lengths):.0f}) tokens")
    results = {}
    for name, max_tokens in (("padded", 0), ("packed", budget)):
        micro = plan_micro_batches(batch, list(range(len(batch))),
                                   micro_batch_size=args.micro_batch, pad_id=tok.pad_token_id,
                                   hf_config=model.hf_config, dp_rank=0, dp_size=1,
                                   max_tokens=max_tokens)
        real, computed = micro.efficiency()

        def step(micro=micro):
            lp.compute_log_probs(trainer.model, micro)
            lp.update(trainer, micro, settings)

        seconds = timed(step, args.repeats)
        results[name] = seconds
        print(f"  {name:7s} micro-batches {len(micro.batches):3d} x {micro.batches[0]['input_ids'].shape}"
              f"  padding efficiency {real / computed:.3f}  log-prob + update {seconds:.2f} s"
              + (f"  (budget {max_tokens} tokens)" if max_tokens else ""))
    assert real == real_tokens
    print(f"  time packed / padded: {results['packed'] / results['padded']:.2f}")

    # ---- 2. discriminator update: shared teachers vs per pair ---------------------------
    del trainer, model
    disc = Discriminator.for_alignment(cfg, total_steps=100, pad_id=tok.pad_token_id)
    disc.load_initial()
    text = "<caption>a grid of cells</caption>\n<think>count them</think>\n<answer>{a}</answer>"
    pairs, group = [], []
    for g, p in enumerate(prompts):
        teacher = pair_segments(p.teacher["teacher_caption"], p.teacher["teacher_cot"], tok, p.answer)
        for j in range(args.n):
            pairs.append(PairSample(f"{g}-{j}", p.encoded, teacher,
                                    text_segments(text.format(a=p.answer), tok)))
            group.append(g)
    d = cfg.discriminator
    per_pair = plan_pairs(pairs, list(range(len(pairs))), dp_rank=0, dp_size=1,
                          micro=args.micro_batch, pad_id=tok.pad_token_id,
                          position_fn=disc.position_fn)
    shared = plan_groups(pairs, group, dp_rank=0, dp_size=1,
                         groups_per_micro=max(1, args.micro_batch // args.n),
                         pad_id=tok.pad_token_id, position_fn=disc.position_fn)
    for name, plan in (("per-pair", per_pair), ("shared", shared)):
        rows = sum(b["input_ids"].shape[0] for b in plan.batches)
        seconds = timed(lambda: disc.trainer.train_step(plan.batches, pair_forward(
            lambda b: online_loss_fn(b, PairStats(), d.score_reg, d.score_clip)), plan.seq_length),
            args.repeats)
        results[name] = seconds
        print(f"discriminator {name:8s}: {rows / len(prompts):.0f} sequences per prompt "
              f"(n = {args.n}), update {seconds:.2f} s")
    print(f"  time shared / per-pair: {results['shared'] / results['per-pair']:.2f}")

    # ---- 3. RLVR: one-step-off-policy vs on-policy, the engine in its own process -------
    if args.rlvr_steps:
        rlvr_overlap(work, hf_dir, args.rlvr_steps)


def rlvr_overlap(work: Path, hf_dir: Path, steps: int) -> None:
    import yaml

    from prism_megatron.data.synthetic import write_dataset
    from prism_megatron.metrics import read_history

    write_dataset(work / "rldata", 0, {"sft_public": 0, "sft_teacher": 0, "align": 0, "rl": 32,
                                       "test": 0}, log=lambda *a: None)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    totals, rows_of = {0: [], 1: []}, {0: [], 1: []}
    for run, off in enumerate((0, 1, 1, 0)):    # ABBA: a drifting machine load hits both alike
        run_dir = work / f"rlvr_{run}_off{off}"
        cfg = {"seed": 0, "train_steps": steps,
               "model": {"hf_dir": str(hf_dir), "megatron_dir": str(work / "megatron")},
               "optimizer": {"lr": 1e-3, "schedule": "constant", "warmup_ratio": 0.0},
               "data": {"train_files": [str(work / "rldata" / "rl.jsonl")],
                        "max_prompt_length": 512, "micro_batch_size": 4},
               "rollout": {"engine": "sglang", "server": "prism", "weight_sync": "tensor",
                           "n": 4, "max_new_tokens": 48},
               "algorithm": {"name": "grpo", "prompts_per_step": 4, "tis_cap": 2.0,
                             "off_policy_steps": off},
               "checkpoint": {"enabled": False, "save_interval": 1000},
               "logging": {"run_dir": str(run_dir), "tensorboard": False, "plots": False}}
        path = work / f"rlvr_{run}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        subprocess.run([sys.executable, "-m", "prism_megatron.cli", "rlvr", str(path)], env=env,
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        rows = [r for r in read_history(run_dir) if r["step"] >= 1]
        totals[off].append(sum(r["time/step_s"] for r in rows))
        rows_of[off] += rows
    for off in (0, 1):
        rows = rows_of[off]
        mean = {k: statistics.mean(r.get(k, 0.0) for r in rows) for k in (
            "time/rollout_s", "time/logprob_s", "time/update_s", "time/sync_s", "time/wait_s",
            "perf/generation_fraction", "off_policy/staleness_mean")}
        print(f"rlvr off_policy_steps={off}: {steps} steps {statistics.mean(totals[off]):.2f} s "
              f"(mean of {len(totals[off])} runs; per step: generation "
              f"{mean['time/rollout_s']:.2f} s, log-prob + update "
              f"{mean['time/logprob_s'] + mean['time/update_s']:.2f} s, sync "
              f"{mean['time/sync_s']:.2f} s, waiting {mean['time/wait_s']:.2f} s; generation "
              f"fraction {mean['perf/generation_fraction']:.2f}, staleness "
              f"{mean['off_policy/staleness_mean']:.2f})")
    ratio = statistics.mean(totals[1]) / statistics.mean(totals[0])
    print(f"  time off-policy / on-policy: {ratio:.2f}  (machine load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
