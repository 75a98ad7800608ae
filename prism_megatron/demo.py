"""``make demo``: a miniature reproduction of PRISM on CPU (tiny Qwen3-VL, synthetic task).

Two pipelines from one SFT checkpoint, for several seeds, through ``prism_megatron.pipeline``
(every stage a ``prism <stage>`` subprocess, logs in ``<out>/runs/**/stage.log``):

    baseline:  SFT -> RLVR (GRPO)
    PRISM:     SFT -> discriminator (upcycled, warmed on the SFT policy's samples) -> alignment
               -> RLVR (GRPO)

and a table of held-out accuracy (greedy, verifiable scorer, ``test.jsonl``) after SFT, after
SFT->RLVR and after SFT->PRISM->RLVR, mean ± std over the seeds, plus the RLVR curves of both
pipelines (``<out>/rlvr_comparison.png``). A second table gives, per policy, the ground-truth
fidelity of the same held-out generations (``eval.fidelity``: perception precision / coverage,
reasoning precision, answer follows the chain) and the teacher-NLL (``eval.teacher_nll``: mean
per-token NLL of the held-out prompts' teacher demonstrations, caption and reasoning, and of their
public demonstrations), mean ± std over the seeds; a third the paired per-seed differences
(SFT->PRISM->RLVR minus SFT->RLVR, and SFT->PRISM minus SFT). docs/metrics.md defines them all;
``results.json`` holds every number per seed.

What is shared between seeds, and why (to fit ~15 minutes on 2 CPU cores): the conversion, SFT,
the warm-up pairs, the upcycling and the discriminator warm-up run ONCE (seed 0, in
``<out>/runs/``); per seed (``<out>/runs/seed<S>/``) run the alignment and both RLVR runs, which
is where the two pipelines differ. So the "after SFT" row has no spread by construction, and the
seeds measure the variance of alignment + RLVR (rollout sampling, prompt order), not of SFT or of
the discriminator's warm-up. SFT and RLVR run fewer steps than the examples' configs
(``--sft-steps`` etc. change that). The per-seed chains (alignment -> PRISM RLVR; baseline RLVR)
run two at a time with one thread per process (``--jobs``), so the stage wall times printed at the
end are those of a process sharing the machine. Everything is resumable: a rerun skips the
finished stages and an interrupted one continues from its last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SHARED = ("convert", "sft", "pairs", "upcycle", "warmup")
PER_SEED = ("align", "prism_rlvr", "baseline_rlvr")
CHAINS = (("align", "prism_rlvr"), ("baseline_rlvr",))   # independent once SHARED is done
TABLE = (("base", "base model (random init)"), ("sft", "after SFT"),
         ("baseline_rlvr", "after SFT -> RLVR"), ("align", "after SFT -> PRISM (align only)"),
         ("prism_rlvr", "after SFT -> PRISM -> RLVR"))


def make_model(out: Path, preset: str, seed: int) -> Path:
    from prism_megatron.testing.tiny import write_tiny_model

    path = out / "model"
    if not (path / "config.json").is_file():
        write_tiny_model(path, preset=preset, seed=seed)
    return path


def make_data(out: Path, seed: int) -> Path:
    from prism_megatron.data.synthetic import write_dataset

    path = out / "data"
    if not (path / "manifest.json").is_file():
        write_dataset(path, seed)
    return path


def pipeline_config(out: Path, model: Path, data: Path, seed: int, steps: dict, eval_limit: int):
    """The tiny pipeline (examples/tiny/pipeline.yaml's stages) at the demo's step counts."""
    from prism_megatron.pipeline import PairsSpec, PipelineConfig, PipelineData, StageSpec

    quiet = ["logging.tensorboard=false"]
    cfg = PipelineConfig(
        work_dir=str(out / "runs" / (f"seed{seed}" if seed is not None else "")),
        hf_dir=str(model), seed=seed or 0, show_output=False,
        data=PipelineData(sft_files=[str(data / "sft_public.jsonl"),
                                     str(data / "sft_teacher.jsonl")],
                          align_file=str(data / "align.jsonl"), rl_file=str(data / "rl.jsonl"),
                          test_files=[str(data / "test.jsonl")]),
        policy_overrides=[f"eval.limit={eval_limit}", "eval.max_new_tokens=160", *quiet],
        sft=StageSpec("examples/tiny/sft.yaml", [f"train_steps={steps['sft']}",
                                                 "checkpoint.save_interval=25"]),
        pairs=PairsSpec(heldout_rows=32, max_new_tokens=160),
        warmup=StageSpec("examples/tiny/warmup.yaml",
                         [f"train_steps={steps['warmup']}", "discriminator.eval_interval=0",
                          *quiet]),
        align=StageSpec("examples/tiny/align.yaml", [f"train_steps={steps['align']}",
                                                     "checkpoint.save_interval=5"]),
        rlvr=StageSpec("examples/tiny/rlvr_grpo.yaml", [f"train_steps={steps['rlvr']}",
                                                        "checkpoint.save_interval=5"]))
    if seed is None:          # the shared part, run once
        cfg.until = SHARED[-1]
    else:
        cfg.shared, cfg.stages = {s: str(out / "runs") for s in SHARED}, list(PER_SEED)
    return cfg


def run_per_seed(out: Path, model: Path, data: Path, seeds, steps: dict, eval_limit: int,
                 jobs: int) -> dict[int, dict]:
    """The per-seed stages as independent chains (alignment -> PRISM RLVR; baseline RLVR), ``jobs``
    at a time, each stage process with cores/jobs threads: the tiny model's ops are too small for
    two threads to help much (two 15-step RLVR runs on 2 cores: 128 s one after the other with 2
    threads, 110 s side by side with 1). Then one pass per seed writes that seed's results."""
    from prism_megatron.pipeline import Pipeline
    from prism_megatron.pipeline.runner import stop_running

    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else 0

    def chain(seed: int, stages: tuple[str, ...]) -> None:
        cfg = pipeline_config(out, model, data, seed, steps, eval_limit)
        cfg.stages, cfg.threads = list(stages), threads
        def log(line: str) -> None:   # only this chain's stages: the rest is shared or elsewhere
            words = line.split()
            if len(words) > 1 and words[1] in stages:
                print(f"[seed {seed}] {line}", flush=True)

        Pipeline(cfg, log=log).run_stages()

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = [pool.submit(chain, seed, stages) for stages in CHAINS for seed in seeds]
        try:
            for future in futures:
                future.result()
        except BaseException:       # a failed stage or Ctrl-C: stop the others' stages too
            for future in futures:
                future.cancel()
            stop_running()
            raise
    pipes = {seed: Pipeline(pipeline_config(out, model, data, seed, steps, eval_limit),
                            log=lambda line: None) for seed in seeds}
    run_teacher_nll(out, model, data, list(pipes.values()), eval_limit)
    return {seed: pipe.run() for seed, pipe in pipes.items()}


def run_teacher_nll(out: Path, model: Path, data: Path, pipes, eval_limit: int) -> None:
    """Teacher-NLL of every policy not measured yet (shared ones once), in one process: each
    Megatron checkpoint is exported to HF next to its result (``<stage>/teacher_nll_*``)."""
    from prism_megatron.pipeline.results import teacher_nll_jobs
    from prism_megatron.pipeline.runner import run_logged

    jobs = dict((str(o), policy) for pipe in pipes for policy, o in teacher_nll_jobs(pipe))
    if not jobs:
        return
    command = [sys.executable, "-m", "prism_megatron.eval.teacher_nll", "--rows",
               str(data / "test.jsonl"), "--limit", str(eval_limit), "--hf-config", str(model)]
    for o, policy in jobs.items():
        command += ["--policy", policy, "--out", o]
    log = out / "runs" / "teacher_nll.log"
    start = time.time()
    run_logged(command, log, "teacher_nll", show=False)
    print(f"teacher-NLL of {len(jobs)} policies on {eval_limit} held-out prompts in "
          f"{time.time() - start:.0f}s (log: {log})", flush=True)


def aggregate(per_seed: dict[int, dict]) -> dict:
    """Mean ± std over seeds of every table row (None where a row is missing in a seed)."""
    rows = {}
    for key, label in TABLE:
        values = [r["accuracy"].get(key) for r in per_seed.values()]
        formats = [next(x["test/format_rate"] for x in r["rows"] if x["key"] == key)
                   for r in per_seed.values()]
        ok = [v for v in values if v is not None]
        fok = [v for v in formats if v is not None]
        rows[key] = {"label": label, "values": values,
                     "mean": statistics.fmean(ok) if ok else None,
                     "std": statistics.pstdev(ok) if len(ok) > 1 else 0.0 if ok else None,
                     "format_rate_mean": statistics.fmean(fok) if fok else None}
    return rows


HELDOUT = "test"
METRICS = ((f"{HELDOUT}/accuracy", "accuracy"),
           (f"{HELDOUT}/perception_precision", "perception precision"),
           (f"{HELDOUT}/perception_coverage", "perception coverage"),
           (f"{HELDOUT}/reasoning_precision", "reasoning precision"),
           (f"{HELDOUT}/answer_follows", "answer follows chain"),
           ("nll/teacher/caption", "teacher-NLL caption"),
           ("nll/teacher/reasoning", "teacher-NLL reasoning"),
           ("nll/public/all", "public-NLL"))
PAIRS = (("prism_rlvr", "baseline_rlvr", "SFT -> PRISM -> RLVR minus SFT -> RLVR"),
         ("align", "sft", "SFT -> PRISM minus SFT"))


def _stats(values: list) -> dict:
    ok = [v for v in values if v is not None]
    return {"values": values, "mean": statistics.fmean(ok) if ok else None,
            "std": statistics.pstdev(ok) if len(ok) > 1 else 0.0 if ok else None}


def _row(result: dict, key: str) -> dict:
    return next((r for r in result["rows"] if r["key"] == key), {})


def fidelity(per_seed: dict[int, dict]) -> dict:
    """``{policy: {metric: {values (per seed, in seed order), mean, std}}}``."""
    return {key: {metric: _stats([_row(r, key).get(metric) for r in per_seed.values()])
                  for metric, _ in METRICS} for key, _ in TABLE}


def paired(per_seed: dict[int, dict]) -> dict:
    """``{"a - b": {metric: {per_seed: {seed: a - b}, mean, std}}}`` for each pair in PAIRS
    (a seed where either number is missing is left out of the mean)."""
    out = {}
    for a, b, _ in PAIRS:
        by_metric = {}
        for metric, _ in METRICS:
            diffs = {}
            for seed, r in per_seed.items():
                x, y = _row(r, a).get(metric), _row(r, b).get(metric)
                diffs[seed] = None if x is None or y is None else x - y
            by_metric[metric] = {"per_seed": diffs, **{k: v for k, v in _stats(
                list(diffs.values())).items() if k != "values"}}
        out[f"{a} - {b}"] = by_metric
    return out


def _pm(stats: dict) -> str:
    return "—" if stats["mean"] is None else f"{stats['mean']:.3f} ± {stats['std']:.3f}"


def fidelity_table(fid: dict, seeds: list[int]) -> str:
    labels = dict(TABLE)
    lines = [f"| held-out {HELDOUT}.jsonl, mean ± std over {len(seeds)} seeds | "
             + " | ".join(label for _, label in METRICS) + " |", "|---" * (1 + len(METRICS)) + "|"]
    for key, metrics in fid.items():
        lines.append(f"| {labels[key]} | " + " | ".join(_pm(metrics[m]) for m, _ in METRICS) + " |")
    return "\n".join(lines) + "\n"


def paired_table(diffs: dict, seeds: list[int]) -> str:
    heads = [label for _, _, label in PAIRS]
    lines = [f"| paired difference per seed ({', '.join(map(str, seeds))}) | "
             + " | ".join(f"{h}: mean ± std | per seed" for h in heads) + " |",
             "|---" * (1 + 2 * len(PAIRS)) + "|"]
    for metric, label in METRICS:
        cells = []
        for a, b, _ in PAIRS:
            d = diffs[f"{a} - {b}"][metric]
            cells += [_pm(d), " / ".join("—" if v is None else f"{v:+.3f}"
                                         for v in d["per_seed"].values())]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def table(rows: dict, seeds: list[int]) -> str:
    lines = [f"| held-out test.jsonl (greedy) | accuracy, mean ± std over {len(seeds)} seeds | "
             "per seed | format valid (mean) |", "|---|---|---|---|"]
    for row in rows.values():
        if row["mean"] is None:
            lines.append(f"| {row['label']} | not run | | |")
            continue
        per = " / ".join("—" if v is None else f"{v:.3f}" for v in row["values"])
        lines.append(f"| {row['label']} | {row['mean']:.3f} ± {row['std']:.3f} | {per} | "
                     f"{row['format_rate_mean']:.3f} |")
    return "\n".join(lines) + "\n"


def stage_times(per_seed: dict[int, dict]) -> str:
    """Seconds per stage as measured when it ran (shared: once; per seed: the mean)."""
    first = next(iter(per_seed.values()))["stages"]
    shared = ", ".join(f"{s} {first[s]['seconds']:.0f}s" for s in SHARED
                       if first.get(s, {}).get("seconds") is not None)
    means = []
    for stage in PER_SEED:
        secs = [r["stages"][stage]["seconds"] for r in per_seed.values()
                if r["stages"].get(stage, {}).get("seconds") is not None]
        if secs:
            means.append(f"{stage} {statistics.fmean(secs):.0f}s")
    return f"stage wall times: shared {shared}; per seed (mean) {', '.join(means)}\n"


def run(out: Path, preset: str = "tiny", seeds: tuple[int, ...] = (0, 1, 2),
        steps: dict | None = None, eval_limit: int = 64, jobs: int = 2) -> dict:
    from prism_megatron.pipeline import Pipeline, plot_rlvr_comparison

    steps = {**DEFAULT_STEPS, **(steps or {})}
    start = time.time()
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    print(f"== PRISM miniature reproduction -> {out}\n   seeds {list(seeds)}; steps {steps}; "
          f"held-out: {eval_limit} test prompts, greedy")
    model, data = make_model(out, preset, 0), make_data(out, 0)
    legacy = out / "runs" / "sft"
    if (legacy / "metrics.jsonl").is_file() and not (legacy / "stage.log").is_file():
        legacy.rename(legacy.with_name("sft.before-pipeline"))   # the old demo's in-process SFT
        print(f"   moved the previous demo's SFT run aside: {legacy}.before-pipeline")
    print(f"   model {model}, data {data}")
    print("\n== shared by all seeds (seed 0): " + " -> ".join(SHARED))
    Pipeline(pipeline_config(out, model, data, None, steps, eval_limit)).run()
    print(f"\n== per seed, {jobs} at a time: " + "; ".join(" -> ".join(c) for c in CHAINS))
    per_seed = run_per_seed(out, model, data, seeds, steps, eval_limit, jobs)
    rows = aggregate(per_seed)
    fid, diffs = fidelity(per_seed), paired(per_seed)
    text = (table(rows, list(seeds)) + "\n" + fidelity_table(fid, list(seeds)) + "\n"
            + paired_table(diffs, list(seeds)))
    first = per_seed[seeds[0]]
    disc = first.get("discriminator_heldout") or {}
    note = (f"\nshared (run once, so no spread): SFT {steps['sft']} steps, discriminator warm-up "
            f"{steps['warmup']} steps (held-out pairwise accuracy caption "
            f"{disc.get('acc_caption', float('nan')):.2f}, reasoning "
            f"{disc.get('acc_reasoning', float('nan')):.2f}); per seed: alignment "
            f"{steps['align']} steps, RLVR {steps['rlvr']} steps in each pipeline.\n")
    missing = [label for metric, label in METRICS
               if all(fid[key][metric]["mean"] is None for key, _ in TABLE)]
    if missing:
        note += f"not measured in this run: {', '.join(missing)} (docs/metrics.md)\n"
    note += stage_times(per_seed)
    (out / "results.md").write_text(text + note)
    (out / "results.json").write_text(json.dumps({"steps": steps, "seeds": list(seeds),
                                                  "rows": rows, "fidelity": fid, "paired": diffs,
                                                  "per_seed": per_seed}, indent=1))
    plot = plot_rlvr_comparison(
        {"SFT -> RLVR": [out / "runs" / f"seed{s}" / "baseline_rlvr" for s in seeds],
         "SFT -> PRISM -> RLVR": [out / "runs" / f"seed{s}" / "prism_rlvr" for s in seeds]},
        out / "rlvr_comparison.png")
    print("\n" + text + note)
    print(f"results: {out / 'results.md'}, {out / 'results.json'}; RLVR curves: {plot}")
    print(f"demo finished in {time.time() - start:.0f}s")
    return rows


DEFAULT_STEPS = {"sft": 100, "warmup": 20, "align": 8, "rlvr": 15}


def cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="prism demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="output directory")
    parser.add_argument("--preset", default="tiny", help="tiny model preset")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--eval-limit", type=int, default=64, help="held-out prompts")
    parser.add_argument("--jobs", type=int, default=2,
                        help="per-seed stage chains run at once (each with cores/jobs threads)")
    for stage, default in DEFAULT_STEPS.items():
        parser.add_argument(f"--{stage}-steps", type=int, default=default)
    args = parser.parse_args(argv)
    steps = {stage: getattr(args, f"{stage}_steps") for stage in DEFAULT_STEPS}
    try:
        seeds = tuple(int(s) for s in args.seeds.split(","))
    except ValueError:
        parser.error(f"--seeds {args.seeds!r}: expected comma-separated integers, e.g. 0,1,2")
    run(args.out, args.preset, seeds, steps, args.eval_limit, args.jobs)


if __name__ == "__main__":   # `make demo`; `prism demo` runs cli() inside the same error boundary
    import sys

    from prism_megatron.errors import run_cli

    sys.exit(run_cli(cli, name="prism demo"))
