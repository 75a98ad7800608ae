"""``prism eval CONFIG [key=value ...]``: evaluate a policy on held-out sets and benchmarks.

    prism eval examples/eval.yaml
    prism eval examples/eval.yaml model.hf_dir=runs/rlvr/hf \\
        eval.benchmarks.mathvista=MathVista/testmini.json

The policy is ``model.hf_dir``, an HF checkpoint directory. A trained Megatron checkpoint is
exported to one first:

    python tools/convert_megatron_to_hf.py --megatron-dir RUN/ckpt --hf-config-dir BASE_HF_DIR \\
        --out RUN/hf          # BASE_HF_DIR: the model it started from (tokenizer, processor)

Generation uses the engine ``rollout`` configures (``local``: CPU; ``sglang``: servers) with the
``eval`` sampling settings (greedy by default; ``eval.n > 1`` with a temperature gives pass@n),
``eval.batch_size`` prompts per request and ``eval.limit`` rows per set. Every file of
``data.eval_files`` (sharegpt JSONL with ``answer``) and every ``eval.benchmarks`` entry
(name -> local file, names in ``prism_megatron.eval.benchmarks.BENCHMARKS``) is scored twice:
``accuracy`` (format-gated, the RLVR reward's) and ``answer_accuracy`` (the paper's judging
pattern, no format gate). Writes ``eval_results.json``, ``eval_results.md`` (the table it
prints) and ``eval_samples.jsonl`` (every response and its scores) into ``logging.run_dir``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from prism_megatron.config import ConfigError, PrismConfig, load_config
from prism_megatron.data.encode import load_processor
from prism_megatron.errors import PrismError
from prism_megatron.eval.benchmarks import get_benchmark, load_benchmark
from prism_megatron.eval.heldout import (EvalResult, ScoredSample, generate_and_score,
                                         load_eval_prompts, summarize)
from prism_megatron.metrics import setup_logging
from prism_megatron.rollout import make_engine
from prism_megatron.rollout.base import SamplingParams

log = logging.getLogger("prism.eval")

# One line for `prism eval --help` (the command table lives in prism_megatron/cli.py).
HELP = ("evaluate an HF policy dir (model.hf_dir; export a Megatron checkpoint with "
        "tools/convert_megatron_to_hf.py --megatron-dir CKPT --hf-config-dir BASE --out HF) on "
        "data.eval_files and eval.benchmarks (greedy or pass@n)")


@dataclass
class EvalSet:
    """One thing to evaluate: where it came from and how its prompts are made."""

    name: str
    kind: str                    # heldout | benchmark
    path: Path
    items: list[Any]
    ids: list[str]
    answers: list[str]
    to_prompt: Callable          # item -> (RolloutPrompt, ground truth)
    metrics: Callable | None = None   # (items, correct per item) -> extra metrics
    skipped: int = 0


def plan(cfg: PrismConfig) -> list[tuple[str, str, Path]]:
    """(name, kind, path) of every set, checked before any model is loaded."""
    hf_dir = Path(cfg.model.hf_dir) if cfg.model.hf_dir else None
    if hf_dir is None or not (hf_dir / "config.json").is_file():
        raise ConfigError(f"model.hf_dir={cfg.model.hf_dir!r} is not an HF checkpoint directory; "
                          "export a Megatron checkpoint with tools/convert_megatron_to_hf.py")
    e = cfg.eval
    if e.n < 1 or e.batch_size < 1 or e.max_new_tokens < 1:
        raise ConfigError("eval.n, eval.batch_size and eval.max_new_tokens must be >= 1")
    if e.n > 1 and e.temperature == 0:
        raise ConfigError(f"eval.n={e.n} needs eval.temperature > 0 (greedy samples are "
                          "identical)")
    sets = [(Path(p).stem, "heldout", Path(p)) for p in cfg.data.eval_files]
    for name, path in e.benchmarks.items():
        get_benchmark(name)
        sets.append((name, "benchmark", Path(path)))
    if not sets:
        raise ConfigError("nothing to evaluate: set data.eval_files and/or eval.benchmarks")
    names = [name for name, _, _ in sets]
    if len(set(names)) != len(names):
        raise ConfigError(f"two evaluation sets share a name: {names}")
    for name, _, path in sets:
        if not path.is_file():
            raise ConfigError(f"evaluation set {name}: file {path} does not exist")
    return sets


def load_set(name: str, kind: str, path: Path, processor, cfg: PrismConfig) -> EvalSet:
    limit = cfg.eval.limit or None
    if kind == "heldout":
        items = load_eval_prompts(path, processor, limit, cfg.data)
        if not items:
            raise PrismError(f"evaluation set {name}: no usable rows in {path}")
        return EvalSet(name, kind, path, items, [str(i) for i in range(len(items))],
                       [answer for _, answer in items], lambda item: item)
    loaded = load_benchmark(name, path, limit, max_bad_fraction=cfg.data.max_skip_fraction)
    return EvalSet(name, kind, path, loaded.items, [item.id for item in loaded],
                   [item.answer for item in loaded], lambda item: item.to_prompt(processor),
                   get_benchmark(name).metrics,
                   len(loaded.skipped))


def extra_metrics(eval_set: EvalSet, scored: list[list[ScoredSample]]) -> dict[str, float]:
    """A benchmark's own metrics on the paper's judging (answer accuracy), averaged over the
    sample index when there are several samples per prompt."""
    if eval_set.metrics is None:
        return {}
    n = len(scored[0])
    runs = [eval_set.metrics(eval_set.items, [group[j].answer_accuracy for group in scored])
            for j in range(n)]
    return {key: sum(run[key] for run in runs) / n for key in runs[0]}


def write_samples(out, eval_set: EvalSet, scored: list[list[ScoredSample]]) -> None:
    """One JSON line per response: what was generated and how it was scored."""
    for item_id, answer, group in zip(eval_set.ids, eval_set.answers, scored):
        for index, s in enumerate(group):
            out.write(json.dumps({"set": eval_set.name, "id": item_id, "answer": answer,
                                  "sample": index, "text": s.text, "tokens": s.tokens,
                                  "accuracy": s.accuracy, "answer_accuracy": s.answer_accuracy,
                                  "format_ok": s.format_ok}) + "\n")


def markdown_table(sets: dict[str, dict]) -> str:
    lines = ["| set | prompts | accuracy | answer accuracy | format rate | pass@n | mean tokens |",
             "|---|---|---|---|---|---|---|"]
    for name, r in sets.items():
        lines.append(f"| {name} | {r['prompts']} | {r['accuracy']:.3f} | "
                     f"{r['answer_accuracy']:.3f} | {r['format_rate']:.3f} | "
                     f"{r['pass_at_n']:.3f} | {r['mean_response_tokens']:.1f} |")
    for name, r in sets.items():
        if r.get("extra"):
            extras = ", ".join(f"{k} {v:.3f}" for k, v in r["extra"].items())
            lines.append(f"\n{name} (answer-level judging): {extras}")
    return "\n".join(lines) + "\n"


def run(cfg: PrismConfig, *, progress: bool = True) -> dict:
    from prism_megatron.preflight import check_paths

    check_paths(cfg, "eval")
    planned = plan(cfg)
    e = cfg.eval
    try:
        params = SamplingParams(temperature=e.temperature, top_p=e.top_p,
                                max_new_tokens=e.max_new_tokens, seed=cfg.seed)
    except ValueError as exc:
        raise ConfigError(f"eval: {exc}") from None
    processor = load_processor(cfg.model.hf_dir, cfg.data.min_pixels, cfg.data.max_pixels)
    run_dir = Path(cfg.logging.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    engine = make_engine(cfg.rollout, cfg.model.hf_dir, cfg.data)
    try:
        with open(run_dir / "eval_samples.jsonl", "w") as samples_file:
            for name, kind, path in planned:
                eval_set = load_set(name, kind, path, processor, cfg)
                scored = generate_and_score(engine, eval_set.items, eval_set.to_prompt, params,
                                            n=e.n, batch_size=e.batch_size, desc=f"eval {name}",
                                            progress=progress)
                result: EvalResult = summarize(scored)
                results[name] = {"kind": kind, "path": str(path), **result.as_dict(),
                                 "skipped_rows": eval_set.skipped,
                                 "extra": extra_metrics(eval_set, scored)}
                write_samples(samples_file, eval_set, scored)
                log.info("%s: accuracy %.3f, answer accuracy %.3f (%d prompts)", name,
                         result.accuracy, result.answer_accuracy, result.prompts)
    finally:
        engine.shutdown()
    report = {"model": cfg.model.hf_dir, "engine": cfg.rollout.engine,
              "sampling": {"temperature": e.temperature, "top_p": e.top_p, "n": e.n,
                           "max_new_tokens": e.max_new_tokens, "seed": cfg.seed,
                           "limit": e.limit},
              "sets": results}
    (run_dir / "eval_results.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown_table(results)
    (run_dir / "eval_results.md").write_text(table)
    print(table, end="")
    return report


def cli(args, overrides) -> None:
    setup_logging()
    run(load_config(args.config, overrides))
