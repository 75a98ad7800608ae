"""``prism study``: PRISM's mechanism in miniature, under a protocol fixed before the test split.

    prism study                           # -> study_out/ (about 2 hours on 2 CPU cores)
    prism study --seeds 0,1,2,3,4 --variants prism,frozen,dense --ablation-until align

The miniature is the demo's (same tiny model and synthetic data, ``demo.pipeline_config``) with a
4x longer SFT (``STEPS``): after the demo's 100 steps the policy's captions are at chance
(perception precision 0.167, one colour in six), so there is no perception for the alignment to
move; after 400 they are not (0.53).

Four phases, each resumable (every stage is a ``prism pipeline`` stage with its done.json marker):

1. **Validation split.** The last ``--val-rows`` rows of ``rl.jsonl`` become
   ``data/study_val.jsonl``; RLVR trains on the others (``data/study_rl_train.jsonl``). The
   alignment prompts and SFT data are untouched; ``test.jsonl`` is read only in phase 3.
2. **Sweep on the validation split.** Every configuration of the grid (``--grid``: alignment
   steps, the policy's and the discriminator's alignment learning rates) runs SFT -> PRISM ->
   RLVR on the sweep seeds and is scored by validation accuracy after RLVR (mean over the sweep
   seeds; a tie goes to the earlier configuration). Every configuration tried is appended to
   ``study/sweep.jsonl`` (settings, seed, validation metrics, seconds). The choice is written to
   ``study/protocol.json`` before phase 3 starts, and a rerun keeps it (``--reselect`` to redo
   the choice, which is then logged as a new protocol).
3. **The protocol on the test split**, per seed (``--seeds``, at least 5 for the paired test):
   the baseline SFT -> RLVR, and SFT -> PRISM -> RLVR for every variant (``VARIANTS``: the
   discriminator's routing, which segment scores the policy is trained on, frozen vs online
   judge), all with the protocol's settings. Per seed: the discriminator is upcycled (seeded
   noise) and warmed up again, then alignment and RLVR sample with the seed; the conversion, the
   SFT run and the warm-up pairs are shared by all seeds (``<out>/runs``), so seeds
   do not vary SFT.
4. **Style ceiling**: SFT on the teacher demonstrations only and on the public ones only (same
   steps as the shared SFT), so it is known whether the teacher's style helps this model at all.

Then per policy: accuracy, perception / reasoning fidelity (``eval.fidelity``) and teacher-NLL
(``eval.teacher_nll``) on ``test.jsonl``, mean ± std over seeds; per variant the paired per-seed
differences against the baseline (after RLVR) and against SFT (after alignment), with the exact
two-sided sign-flip permutation test of the mean difference (``paired_test``). Written to
``study/results.{md,json}``; docs/metrics.md defines the metrics.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from prism_megatron import demo
from prism_megatron.errors import PrismError


@dataclass(frozen=True)
class Variant:
    """An alignment variant: how its discriminator is built and trained, and what the policy is
    rewarded on. ``warmup_of`` reuses another variant's per-seed warm-up (same discriminator)."""

    label: str
    num_experts: int = 4
    top_k: int = 2
    disc: tuple[str, ...] = ()        # overrides for both the warm-up and the alignment
    align: tuple[str, ...] = ()       # overrides for the alignment only
    warmup_of: str = ""


VARIANTS = {
    "prism": Variant("PRISM: MoE 4x top-2, learned routing, both segments, online judge"),
    "segment": Variant("segment-dedicated experts: 2 perception + 2 reasoning, a token uses "
                       "both of its segment's", disc=("discriminator.expert_routing=segment",)),
    "dense": Variant("dense judge (1 expert)", num_experts=1, top_k=1),
    "caption_only": Variant("caption signal only", warmup_of="prism", align=(
        "algorithm.caption_weight=1.0", "algorithm.reasoning_weight=0.0")),
    "reasoning_only": Variant("reasoning signal only", warmup_of="prism", align=(
        "algorithm.caption_weight=0.0", "algorithm.reasoning_weight=1.0")),
    "frozen": Variant("frozen judge (the warmed discriminator, not updated)", warmup_of="prism",
                      align=("discriminator.frozen=true",)),
}

# What the sweep can set, and the stage override each one becomes.
GRID_KEYS = {"align_steps": "train_steps", "align_lr": "optimizer.lr",
             "disc_lr": "discriminator.lr"}
DEFAULT_GRID = "align_lr=1e-4,3e-4 disc_lr=1e-4,1e-5"
STEPS = {**demo.DEFAULT_STEPS, "sft": 400}


def parse_grid(text: str) -> list[dict]:
    """``"align_steps=8,16 disc_lr=1e-4"`` -> the configurations of the cartesian product."""
    axes = []
    for item in text.split():
        key, _, values = item.partition("=")
        if key not in GRID_KEYS or not values:
            raise PrismError(f"--grid {item!r}: expected KEY=V1[,V2...] with KEY one of "
                             f"{sorted(GRID_KEYS)}")
        try:
            parsed = [int(v) if key == "align_steps" else float(v) for v in values.split(",")]
        except ValueError:
            raise PrismError(f"--grid {item!r}: values must be numbers") from None
        axes.append([(key, v) for v in parsed])
    return [dict(combo) for combo in itertools.product(*axes)]


def config_name(settings: dict) -> str:
    return "_".join(f"{k}{v:g}" if isinstance(v, float) else f"{k}{v}"
                    for k, v in sorted(settings.items()))


def align_overrides(settings: dict) -> list[str]:
    return [f"{GRID_KEYS[k]}={v}" for k, v in sorted(settings.items())]


# ------------------------------------------------------------------------------ statistics

def paired_test(diffs: list[float]) -> dict:
    """Mean paired difference, its std (sample), t statistic and the exact two-sided p-value of
    the sign-flip permutation test (under H0 each seed's difference is as likely to have either
    sign: p = share of the 2^n sign patterns whose |mean| is at least the observed one)."""
    n = len(diffs)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "t": None, "p_sign_flip": None}
    mean = statistics.fmean(diffs)
    std = statistics.stdev(diffs) if n > 1 else 0.0
    t = mean / (std / math.sqrt(n)) if n > 1 and std > 0 else None
    observed = abs(mean) - 1e-12
    hits = sum(abs(statistics.fmean([s * d for s, d in zip(signs, diffs)])) >= observed
               for signs in itertools.product((1, -1), repeat=n))
    return {"n": n, "mean": mean, "std": std, "t": t, "p_sign_flip": hits / 2 ** n}


# ------------------------------------------------------------------------------ the runs

@dataclass
class Study:
    out: Path
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    sweep_seeds: tuple[int, ...] = (100,)
    variants: tuple[str, ...] = tuple(VARIANTS)
    grid: list[dict] = field(default_factory=lambda: parse_grid(DEFAULT_GRID))
    steps: dict = field(default_factory=lambda: dict(STEPS))
    eval_limit: int = 64
    val_rows: int = 64
    jobs: int = 2
    reselect: bool = False
    style_ceiling: bool = True
    ablation_seeds: tuple[int, ...] | None = None   # the variants but prism; None: ``seeds``
    ablation_until: str = "rlvr"      # "align": the ablations stop after the alignment

    def __post_init__(self):
        self.out = Path(self.out).resolve()
        self.root = self.out / "study"

    # -- data ----------------------------------------------------------------------------
    def split_rl(self, data: Path) -> tuple[Path, Path]:
        """(train, validation) files carved from ``rl.jsonl``, beside it (its image paths are
        relative to that directory)."""
        train, val = data / "study_rl_train.jsonl", data / "study_val.jsonl"
        lines = [line for line in (data / "rl.jsonl").read_text().splitlines() if line.strip()]
        if len(lines) <= self.val_rows:
            raise PrismError(f"{data / 'rl.jsonl'} has {len(lines)} rows: not enough for "
                             f"--val-rows {self.val_rows} plus training prompts")
        if not val.is_file():
            train.write_text("\n".join(lines[:-self.val_rows]) + "\n")
            val.write_text("\n".join(lines[-self.val_rows:]) + "\n")
        return train, val

    # -- pipelines -----------------------------------------------------------------------
    def chain(self, work: Path, seed: int, stages: list[str], *, test: Path, rl: Path,
              variant: Variant | None = None, settings: dict | None = None, warm_dir: Path | None
              = None, sft_files: list[str] | None = None):
        """A pipeline config for one chain: convert / SFT / pairs from ``<out>/runs``, the rest
        in ``work`` (or the warm-up of ``warm_dir``)."""
        cfg = demo.pipeline_config(self.out, self.model, self.data, seed, self.steps,
                                   self.eval_limit)
        cfg.work_dir, cfg.stages, cfg.threads = str(work), stages, self.threads
        shared = {s: str(self.out / "runs") for s in ("convert", "sft", "pairs")}
        if sft_files is not None:
            shared.pop("sft")
            cfg.data.sft_files = sft_files
        if warm_dir is not None:
            shared.update(upcycle=str(warm_dir), warmup=str(warm_dir))
        cfg.shared = {s: d for s, d in shared.items() if s not in stages}
        cfg.data.rl_file, cfg.data.test_files = str(rl), [str(test)]
        if variant is not None:
            cfg.upcycle.num_experts, cfg.upcycle.top_k = variant.num_experts, variant.top_k
            cfg.warmup.overrides = [*cfg.warmup.overrides, *variant.disc]
            cfg.align.overrides = [*cfg.align.overrides, *variant.disc, *variant.align]
        if settings:
            cfg.align.overrides = [*cfg.align.overrides, *align_overrides(settings)]
        return cfg

    def run_chains(self, chains: list, teacher_nll: bool = True) -> dict[str, dict]:
        """Run pipeline configs ``jobs`` at a time, in waves so that a chain reusing another's
        warm-up starts after it (``(name, cfg, wave)``); returns each chain's results."""
        from prism_megatron.pipeline import Pipeline
        from prism_megatron.pipeline.runner import stop_running

        def run(name, cfg):
            def log(line: str) -> None:
                words = line.split()
                if len(words) > 2 and words[1] in cfg.stages and words[2] in ("running", "done"):
                    print(f"[{name}] {line}", flush=True)

            Pipeline(cfg, log=log).run_stages()

        for wave in sorted({w for _, _, w in chains}):
            todo = [(n, c) for n, c, w in chains if w == wave]
            with ThreadPoolExecutor(max_workers=max(1, self.jobs)) as pool:
                futures = [pool.submit(run, n, c) for n, c in todo]
                try:
                    for f in futures:
                        f.result()
                except BaseException:
                    for f in futures:
                        f.cancel()
                    stop_running()
                    raise
        pipes = {n: Pipeline(c, log=lambda line: None) for n, c, _ in chains}
        if teacher_nll:   # on the test split only: the sweep never measures it
            demo.run_teacher_nll(self.out, self.model, self.data, list(pipes.values()),
                                 self.eval_limit)
        return {n: p.run() for n, p in pipes.items()}

    def prepare(self) -> None:
        self.threads = max(1, (os.cpu_count() or 1) // self.jobs) if self.jobs > 1 else 0
        self.model = demo.make_model(self.out, "tiny", 0)
        self.data = demo.make_data(self.out, 0)
        self.rl_train, self.val = self.split_rl(self.data)
        self.test = self.data / "test.jsonl"
        self.root.mkdir(parents=True, exist_ok=True)
        print("== shared stages: convert -> sft -> pairs")
        from prism_megatron.pipeline import Pipeline

        cfg = demo.pipeline_config(self.out, self.model, self.data, None, self.steps,
                                   self.eval_limit)
        cfg.until = "pairs"
        Pipeline(cfg).run_stages()

    # -- phase 2 -------------------------------------------------------------------------
    def sweep(self) -> dict:
        path = self.root / "protocol.json"
        if path.is_file() and not self.reselect:
            protocol = json.loads(path.read_text())
            print(f"== protocol fixed earlier ({path}): {protocol['chosen']}")
            return protocol
        print(f"== sweep on the validation split ({self.val.name}, {self.val_rows} rows): "
              f"{len(self.grid)} configurations x seeds {list(self.sweep_seeds)}")
        prism = VARIANTS["prism"]
        chains = []
        for seed in self.sweep_seeds:
            warm = self.root / "sweep" / f"warm_seed{seed}"
            chains.append((f"sweep warm-up {seed}", self.chain(
                warm, seed, ["upcycle", "warmup"], test=self.val, rl=self.rl_train,
                variant=prism), 0))
            chains.append((f"sweep baseline {seed}", self.chain(
                self.root / "sweep" / f"baseline_seed{seed}", seed, ["baseline_rlvr"],
                test=self.val, rl=self.rl_train), 0))
            for settings in self.grid:
                name = config_name(settings)
                chains.append((f"sweep {name} {seed}", self.chain(
                    self.root / "sweep" / name / f"seed{seed}", seed, ["align", "prism_rlvr"],
                    test=self.val, rl=self.rl_train, variant=prism, settings=settings,
                    warm_dir=warm), 1))
        results = self.run_chains(chains, teacher_nll=False)
        log_path = self.root / "sweep.jsonl"
        scored = []
        with open(log_path, "a") as log:
            for settings in self.grid:
                name = config_name(settings)
                values = []
                for seed in self.sweep_seeds:
                    r = results[f"sweep {name} {seed}"]
                    row = {k: _row(r, k) for k in ("align", "prism_rlvr")}
                    acc = row["prism_rlvr"].get("study_val/accuracy")
                    values.append(acc)
                    log.write(json.dumps({"time": time.strftime("%Y-%m-%d %H:%M:%S"),
                                          "config": name, "settings": settings, "seed": seed,
                                          "split": self.val.name, "steps": self.steps,
                                          "val": {k: _val_metrics(v) for k, v in row.items()},
                                          "seconds": {k: r["stages"].get(k, {}).get("seconds")
                                                      for k in ("align", "prism_rlvr")}})
                              + "\n")
                ok = [v for v in values if v is not None]
                scored.append((statistics.fmean(ok) if ok else -1.0, name, settings, values))
        baseline = [_row(results[f"sweep baseline {s}"], "baseline_rlvr").get(
            "study_val/accuracy") for s in self.sweep_seeds]
        best = max(scored, key=lambda item: item[0])   # first of equals: max keeps the first
        protocol = {"chosen": best[1], "settings": best[2],
                    "rule": "highest validation accuracy after SFT -> PRISM -> RLVR (mean over "
                            "the sweep seeds); ties: the earlier configuration in the grid",
                    "validation": {name: values for _, name, _, values in scored},
                    "validation_baseline_rlvr": baseline, "sweep_seeds": list(self.sweep_seeds),
                    "fixed": time.strftime("%Y-%m-%d %H:%M:%S")}
        path.write_text(json.dumps(protocol, indent=1) + "\n")
        print(f"   chosen: {best[1]} (validation accuracy {best[0]:.3f}; baseline "
              f"{_fmt_list(baseline)}); every configuration: {log_path}")
        return protocol

    # -- phase 3 and 4 -------------------------------------------------------------------
    def protocol_runs(self, protocol: dict) -> dict[str, dict]:
        settings = protocol["settings"]
        chains = []
        for seed in self.seeds:
            base = self.root / "test" / f"seed{seed}"
            chains.append((f"baseline {seed}", self.chain(
                base / "baseline", seed, ["baseline_rlvr"], test=self.test, rl=self.rl_train), 0))
            ablations = self.seeds if self.ablation_seeds is None else self.ablation_seeds
            for name in self.variants:
                if name != "prism" and seed not in ablations:
                    continue
                v = VARIANTS[name]
                own = not v.warmup_of
                until = "rlvr" if name == "prism" else self.ablation_until
                stages = (["upcycle", "warmup"] if own else []) + ["align"] + (
                    ["prism_rlvr"] if until == "rlvr" else [])
                chains.append((f"{name} {seed}", self.chain(
                    base / name, seed, stages, test=self.test, rl=self.rl_train, variant=v,
                    settings=settings, warm_dir=None if own else base / v.warmup_of),
                    0 if own else 1))
        if self.style_ceiling:
            for kind in ("teacher", "public"):
                chains.append((f"sft_{kind}_only", self.chain(
                    self.root / "style" / f"sft_{kind}_only", 0, ["sft"], test=self.test,
                    rl=self.rl_train, sft_files=[str(self.data / f"sft_{kind}.jsonl")]), 0))
        return self.run_chains(chains)

    def run(self) -> dict:
        start = time.time()
        for name in self.variants:
            w = VARIANTS[name].warmup_of
            if w and w not in self.variants:
                raise PrismError(f"variant {name} reuses the warm-up of {w}: add it to --variants")
        print(f"== PRISM mechanism study -> {self.root}\n   seeds {list(self.seeds)}; variants "
              f"{list(self.variants)}; steps {self.steps}; grid {len(self.grid)} configurations")
        self.prepare()
        protocol = self.sweep()
        print(f"== the protocol on {self.test.name}: {protocol['chosen']}; seeds "
              f"{list(self.seeds)}")
        results = self.protocol_runs(protocol)
        report = summarize(results, self.seeds, self.variants, protocol, self.steps)
        report["seconds"] = round(time.time() - start)
        (self.root / "results.json").write_text(json.dumps(
            {**report, "per_chain": results}, indent=1) + "\n")
        text = report_markdown(report)
        (self.root / "results.md").write_text(text)
        print("\n" + text)
        print(f"results: {self.root / 'results.md'}, {self.root / 'results.json'}; sweep log "
              f"{self.root / 'sweep.jsonl'}; study finished in {time.time() - start:.0f}s")
        return report


# ------------------------------------------------------------------------------ the report

HELDOUT, REPORTED = demo.HELDOUT, demo.METRICS   # the demo's per-policy metrics
PAIRED = ("accuracy", "perception precision", "reasoning precision", "teacher-NLL caption",
          "teacher-NLL reasoning")                  # the paired table's rows


def _row(result: dict | None, key: str) -> dict:
    """A policy's row of a chain's results ({} when the chain or the row was not run)."""
    return next((r for r in (result or {}).get("rows", []) if r["key"] == key), {})


def _val_metrics(row: dict) -> dict:
    return {k.split("/", 1)[1]: v for k, v in row.items() if k.startswith("study_val/")}


def _fmt_list(values) -> str:
    return " / ".join("—" if v is None else f"{v:.3f}" for v in values)


def _mean_std(values: list) -> dict:
    ok = [v for v in values if v is not None]
    return {"values": values, "mean": statistics.fmean(ok) if ok else None,
            "std": statistics.pstdev(ok) if len(ok) > 1 else 0.0 if ok else None}


def summarize(results: dict, seeds, variants, protocol: dict, steps: dict) -> dict:
    """Per policy and metric: values per seed, mean, std; per variant: paired differences."""
    policies = {"sft": ("SFT (shared)", lambda s: _row(results[f"baseline {s}"], "sft")),
                "baseline_rlvr": ("SFT -> RLVR",
                                  lambda s: _row(results[f"baseline {s}"], "baseline_rlvr"))}
    for name in variants:
        policies[f"{name}/align"] = (f"SFT -> {name} (alignment only)",
                                     lambda s, n=name: _row(results.get(f"{n} {s}"), "align"))
        policies[f"{name}/rlvr"] = (f"SFT -> {name} -> RLVR",
                                    lambda s, n=name: _row(results.get(f"{n} {s}"), "prism_rlvr"))
    table = {key: {"label": label, **{m: _mean_std([get(s).get(m) for s in seeds])
                                      for m, _ in REPORTED}}
             for key, (label, get) in policies.items()}
    paired = {}
    for name in variants:
        for after, against in (("rlvr", "baseline_rlvr"), ("align", "sft")):
            out = {}
            for metric, _ in REPORTED:
                a = table[f"{name}/{after}"][metric]["values"]
                b = table[against][metric]["values"]
                per_seed = {s: (x - y if x is not None and y is not None else None)
                            for s, x, y in zip(seeds, a, b)}
                out[metric] = {"per_seed": per_seed, **paired_test(
                    [d for d in per_seed.values() if d is not None])}
            paired[f"{name}/{after} - {against}"] = out
    style = {}
    for kind in ("teacher", "public"):
        r = results.get(f"sft_{kind}_only")
        if r:
            style[f"sft_{kind}_only"] = {m: _row(r, "sft").get(m) for m, _ in REPORTED}
    return {"protocol": protocol, "seeds": list(seeds), "variants": list(variants),
            "labels": {n: VARIANTS[n].label for n in variants}, "steps": steps,
            "policies": table, "paired": paired, "style_ceiling": style}


def _pm(stats: dict) -> str:
    return "—" if stats["mean"] is None else f"{stats['mean']:.3f} ± {stats['std']:.3f}"


def report_markdown(report: dict) -> str:
    seeds, heads = report["seeds"], [label for _, label in REPORTED]
    p = report["protocol"]
    lines = [f"protocol (chosen on the validation split, before the test split was read): "
             f"{p['chosen']} — {p['rule']}", "",
             f"| policy ({HELDOUT}.jsonl, mean ± std over {len(seeds)} seeds) | "
             + " | ".join(heads) + " |", "|---" * (1 + len(heads)) + "|"]
    for row in report["policies"].values():
        lines.append(f"| {row['label']} | " + " | ".join(_pm(row[m]) for m, _ in REPORTED) + " |")
    lines += ["", f"| paired difference (per seed {', '.join(map(str, seeds))}) | metric | "
              "mean ± std | per seed | t | p (sign-flip, exact) |", "|---|---|---|---|---|---|"]
    for name, by_metric in report["paired"].items():
        for metric, label in (m for m in REPORTED if m[1] in PAIRED):
            d = by_metric[metric]
            if d["mean"] is None:
                continue
            per = " / ".join("—" if v is None else f"{v:+.3f}" for v in d["per_seed"].values())
            t = "—" if d["t"] is None else f"{d['t']:+.2f}"
            lines.append(f"| {name} | {label} | {d['mean']:+.3f} ± {d['std']:.3f} | {per} | {t} | "
                         f"{d['p_sign_flip']:.3f} |")
    if report["style_ceiling"]:
        lines += ["", "| style ceiling: SFT on one source only (seed 0) | " + " | ".join(heads)
                  + " |", "|---" * (1 + len(heads)) + "|"]
        for name, row in report["style_ceiling"].items():
            lines.append(f"| {name} | " + " | ".join(
                "—" if row.get(m) is None else f"{row[m]:.3f}" for m, _ in REPORTED) + " |")
    lines += ["", "variants: " + "; ".join(f"{n} = {label}" for n, label in
                                            report["labels"].items())]
    return "\n".join(lines) + "\n"


def cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="prism study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("study_out"),
                        help="output directory: model/, data/, runs/ (the shared conversion, SFT "
                             "and warm-up pairs) and study/ (everything else)")
    parser.add_argument("--seeds", default="0,1,2,3,4", help="test-split seeds (comma-separated)")
    parser.add_argument("--sweep-seeds", default="100", help="validation sweep seeds")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"alignment variants, from {', '.join(VARIANTS)}")
    parser.add_argument("--grid", default=DEFAULT_GRID,
                        help=f"sweep grid, KEY=V1,V2 ... with KEY in {', '.join(GRID_KEYS)} "
                             "(a grid value overrides --align-steps)")
    parser.add_argument("--val-rows", type=int, default=64, help="rl.jsonl rows held out")
    parser.add_argument("--eval-limit", type=int, default=64, help="held-out prompts per eval")
    parser.add_argument("--ablation-seeds", default="",
                        help="seeds of the variants other than prism (default: --seeds)")
    parser.add_argument("--ablation-until", choices=("align", "rlvr"), default="rlvr",
                        help="align: the ablation variants stop after the alignment")
    parser.add_argument("--jobs", type=int, default=2, help="stage chains run at once")
    parser.add_argument("--reselect", action="store_true",
                        help="redo the sweep's choice even if protocol.json exists")
    parser.add_argument("--no-style-ceiling", action="store_true",
                        help="skip the teacher-only / public-only SFT runs")
    for stage, default in STEPS.items():
        parser.add_argument(f"--{stage}-steps", type=int, default=default)
    args = parser.parse_args(argv)

    def ints(text: str, flag: str) -> tuple[int, ...]:
        try:
            return tuple(int(s) for s in text.split(","))
        except ValueError:
            parser.error(f"{flag} {text!r}: expected comma-separated integers")

    variants = tuple(v for v in args.variants.split(",") if v)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    steps = {stage: getattr(args, f"{stage}_steps") for stage in STEPS}
    Study(args.out, seeds=ints(args.seeds, "--seeds"),
          sweep_seeds=ints(args.sweep_seeds, "--sweep-seeds"), variants=variants,
          grid=parse_grid(args.grid), steps=steps, eval_limit=args.eval_limit,
          val_rows=args.val_rows, jobs=args.jobs, reselect=args.reselect,
          ablation_seeds=ints(args.ablation_seeds, "--ablation-seeds") if args.ablation_seeds
          else None, ablation_until=args.ablation_until,
          style_ceiling=not args.no_style_ceiling).run()


if __name__ == "__main__":
    import sys

    from prism_megatron.errors import run_cli

    sys.exit(run_cli(cli, name="prism study"))
