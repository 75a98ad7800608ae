"""``prism eval CONFIG [key=value ...]``: evaluate a policy on held-out sets, or on the paper's
benchmarks through lmms-eval.

    prism eval examples/eval.yaml                     # held-out files (builtin)
    prism eval examples/eval_paper.yaml model.hf_dir=runs/rlvr/hf   # the paper's benchmarks

The policy is ``model.hf_dir``, an HF checkpoint directory. A trained Megatron checkpoint is
exported to one first:

    python tools/convert_megatron_to_hf.py --megatron-dir RUN/ckpt --hf-config-dir BASE_HF_DIR \\
        --out RUN/hf          # BASE_HF_DIR: the model it started from (tokenizer, processor)

Generation uses the engine ``rollout`` configures (``local``: CPU; ``sglang``: servers) with the
``eval`` sampling settings (greedy by default; ``eval.n > 1`` with a temperature gives pass@n),
``eval.batch_size`` prompts per request and ``eval.limit`` rows per set. Every file of
``data.eval_files`` (any layout data/rows.py reads, with an answer) is scored twice:
``accuracy`` (format-gated, the RLVR reward's) and ``answer_accuracy`` (the paper's judging
pattern, no format gate), plus the fidelity metrics on the synthetic task's rows. Writes ``eval_results.json``, ``eval_results.md`` (the table it
prints) and ``eval_samples.jsonl`` (every response and its scores) into ``logging.run_dir``.

``eval.harness: lmms-eval`` runs the paper's benchmarks through lmms-eval itself (its prompts,
parsers and metrics; ``prism_megatron.eval.lmms``; preset ``examples/eval_paper.yaml``, recipe
docs/evaluation.md).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prism_megatron.config import ConfigError, PrismConfig, load_config
from prism_megatron.data.encode import load_processor
from prism_megatron.errors import PrismError
from prism_megatron.eval.fidelity import heldout_metrics
from prism_megatron.eval.heldout import (EvalResult, ScoredSample, generate_and_score,
                                         load_eval_prompts, summarize)
from prism_megatron.metrics import setup_logging
from prism_megatron.rollout import make_engine
from prism_megatron.rollout.base import SamplingParams

log = logging.getLogger("prism.eval")

# One line for `prism eval --help` (the command table lives in prism_megatron/cli.py).
HELP = ("evaluate an HF policy dir (model.hf_dir; export a Megatron checkpoint with "
        "tools/convert_megatron_to_hf.py --megatron-dir CKPT --hf-config-dir BASE --out HF) on "
        "data.eval_files (greedy or pass@n), or the paper's benchmarks through lmms-eval with "
        "eval.harness=lmms-eval (examples/eval_paper.yaml)")


@dataclass
class EvalSet:
    """One held-out file to evaluate."""

    name: str
    path: Path
    items: list[Any]             # (RolloutPrompt, ground truth)
    metas: list[Any]             # the rows' meta (synthetic task: the fidelity metrics)

    @property
    def answers(self) -> list[str]:
        return [answer for _, answer in self.items]


def plan(cfg: PrismConfig) -> list[tuple[str, Path]]:
    """(name, path) of every held-out file, checked before any model is loaded."""
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
    sets = [(Path(p).stem, Path(p)) for p in cfg.data.eval_files]
    if not sets:
        raise ConfigError("nothing to evaluate: set data.eval_files (held-out files), or "
                          "eval.harness=lmms-eval for the paper's benchmarks")
    names = [name for name, _ in sets]
    if len(set(names)) != len(names):
        raise ConfigError(f"two evaluation sets share a name: {names}")
    for name, path in sets:
        if not path.is_file():
            raise ConfigError(f"evaluation set {name}: file {path} does not exist")
    return sets


def load_set(name: str, path: Path, processor, cfg: PrismConfig) -> EvalSet:
    metas: list = []
    items = load_eval_prompts(path, processor, cfg.eval.limit or None, cfg.data, metas)
    if not items:
        raise PrismError(f"evaluation set {name}: no usable rows in {path}")
    return EvalSet(name, path, items, metas)


def write_samples(out, eval_set: EvalSet, scored: list[list[ScoredSample]]) -> None:
    """One JSON line per response: what was generated and how it was scored."""
    for item_id, (answer, group) in enumerate(zip(eval_set.answers, scored)):
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
    return "\n".join(lines) + "\n"


def run(cfg: PrismConfig, *, progress: bool = True) -> dict:
    from prism_megatron.preflight import check_paths

    if cfg.eval.harness == "lmms-eval":
        from prism_megatron.eval import lmms

        return lmms.run(cfg)
    if cfg.eval.harness != "builtin":
        raise ConfigError(f"eval.harness={cfg.eval.harness!r}: use builtin or lmms-eval")
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
            for name, path in planned:
                eval_set = load_set(name, path, processor, cfg)
                scored = generate_and_score(engine, eval_set.items, lambda item: item, params,
                                            n=e.n, batch_size=e.batch_size, desc=f"eval {name}",
                                            progress=progress)
                result: EvalResult = summarize(scored)
                results[name] = {"path": str(path), **result.as_dict(),
                                 "fidelity": heldout_metrics(name, scored, eval_set.metas,
                                                             eval_set.answers)}
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
