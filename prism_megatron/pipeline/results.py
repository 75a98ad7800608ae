"""The results table (Markdown + JSON) of a pipeline's policies, and the RLVR comparison plot.

Per policy: the held-out accuracy and format rate, the ground-truth fidelity metrics
(``eval.fidelity``: logged by the held-out evaluator as ``eval/<file>/<key>``) and the teacher-NLL
(``eval.teacher_nll``: ``<stage dir>/teacher_nll_<first|last>.json``, written by whoever ran it,
e.g. the demo; see ``teacher_nll_jobs``). A number that was not measured is ``None`` / "—".
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from prism_megatron.eval.fidelity import FIDELITY_KEYS

if TYPE_CHECKING:
    from prism_megatron.pipeline.config import PipelineConfig
    from prism_megatron.pipeline.runner import Pipeline

ROWS = (("base", "base model (before SFT)", "both", "sft", "first"),
        ("sft", "SFT", "both", "sft", "last"),
        ("baseline_rlvr", "SFT -> RLVR", "baseline", "baseline_rlvr", "last"),
        ("align", "SFT -> PRISM (alignment only)", "PRISM", "align", "last"),
        ("prism_rlvr", "SFT -> PRISM -> RLVR", "PRISM", "prism_rlvr", "last"))


# teacher-NLL numbers of a row: (row key, demonstration kind, segment)
NLL_KEYS = (("nll/teacher/caption", "teacher", "caption"),
            ("nll/teacher/reasoning", "teacher", "reasoning"),
            ("nll/public/all", "public", "all"))
EVAL_KEYS = ("accuracy", "format_rate", "response_tokens", *FIDELITY_KEYS)


def teacher_nll_path(pipe: Pipeline, stage: str, which: str) -> Path:
    return pipe.dir(stage) / f"teacher_nll_{which}.json"


def teacher_nll_jobs(pipe: Pipeline) -> list[tuple[str, Path]]:
    """(policy, output file) of every policy whose teacher-NLL is missing or older than the
    stage that produced it: the base model is the pipeline's ``hf_dir`` (an HF directory), the
    others are the stages' Megatron checkpoints (``eval.teacher_nll`` exports them)."""
    jobs = []
    for _, _, _, stage, which in ROWS:
        done = pipe.dir(stage) / "done.json"
        if not done.is_file():
            continue
        out = teacher_nll_path(pipe, stage, which)
        if out.is_file() and os.path.getmtime(out) >= os.path.getmtime(done):
            continue
        jobs.append((str(Path(pipe.cfg.hf_dir).resolve()) if which == "first"
                     else pipe.ckpt(stage), out))
    return jobs


def _teacher_nll(pipe: Pipeline, stage: str, which: str) -> dict:
    path = teacher_nll_path(pipe, stage, which)
    data = json.loads(path.read_text()) if path.is_file() else {}
    return {key: (data.get(kind) or {}).get(segment) for key, kind, segment in NLL_KEYS}


def _benchmarks(pipe: Pipeline, stage: str) -> dict:
    """{benchmark: score (0-100), "average": ...} of a stage's benchmark evaluation, or {}."""
    path = pipe.dir(stage) / "benchmarks" / "eval_results.json"
    if not path.is_file():
        return {}
    rows = list(json.loads(path.read_text()).get("checkpoints", {}).values())
    if not rows:
        return {}
    row = rows[-1]
    return {**{name: b["score"] for name, b in row["benchmarks"].items()},
            "average": row["average"]}


def benchmarks_markdown(results: dict) -> list[str]:
    """The paper's benchmarks per policy (no lines when none was evaluated)."""
    names = []
    for r in results["rows"]:
        names += [n for n in r.get("benchmarks", {}) if n not in names and n != "average"]
    if not names:
        return []
    lines = ["", "| policy | " + " | ".join(names) + " | average |", "|" + "---|" * (2 + len(names))]
    for r in results["rows"]:
        b = r.get("benchmarks") or {}
        if b:
            lines.append(f"| {r['label']} | " + " | ".join(
                f"{b[n]:.2f}" if n in b else "—" for n in names) + f" | {b['average']:.2f} |")
    return lines


def heldout_names(cfg: PipelineConfig) -> list[str]:
    return [Path(p).stem for p in cfg.data.test_files]


def collect_results(pipe: Pipeline) -> dict:
    """Held-out accuracy, format rate, fidelity and teacher-NLL of every policy the pipeline
    produced (None: not run / not measured)."""
    names = heldout_names(pipe.cfg)
    rows = []
    for key, label, pipeline, stage, which in ROWS:
        marker = pipe.marker(stage) or {}
        metrics = marker.get(which) or {}
        row = {"key": key, "label": label, "pipeline": pipeline, "stage": stage,
               "step": metrics.get("step")}
        for name in names:
            for m in EVAL_KEYS:
                row[f"{name}/{m}"] = metrics.get(f"eval/{name}/{m}")
        row.update(_teacher_nll(pipe, stage, which))
        row["benchmarks"] = _benchmarks(pipe, stage) if which == "last" else {}
        rows.append(row)
    warm = pipe.dir("warmup") / "warmup_report.json"
    return {"work_dir": str(pipe.work), "seed": pipe.cfg.seed, "heldout": names, "rows": rows,
            "accuracy": {r["key"]: r[f"{names[0]}/accuracy"] for r in rows},
            "discriminator_heldout": json.loads(warm.read_text()).get("heldout")
            if warm.is_file() else None,
            "stages": pipe.status}


def results_markdown(results: dict) -> str:
    names = results["heldout"]
    head = "| policy | pipeline | step | " + " | ".join(
        f"{n} accuracy | {n} format" for n in names) + " |"
    lines = [head, "|" + "---|" * (3 + 2 * len(names))]
    for r in results["rows"]:
        cells = [f"{r[f'{n}/{m}']:.3f}" if r[f"{n}/{m}"] is not None else "—"
                 for n in names for m in ("accuracy", "format_rate")]
        step = "—" if r["step"] is None else str(r["step"])
        lines.append(f"| {r['label']} | {r['pipeline']} | {step} | " + " | ".join(cells) + " |")
    lines += fidelity_markdown(results)
    lines += benchmarks_markdown(results)
    disc = results.get("discriminator_heldout")
    if disc:
        lines.append(f"\ndiscriminator after warm-up: held-out pairwise accuracy caption "
                     f"{disc.get('acc_caption', float('nan')):.3f}, reasoning "
                     f"{disc.get('acc_reasoning', float('nan')):.3f} "
                     f"({disc.get('pairs', 0):.0f} pairs with a format-valid student)")
    return "\n".join(lines) + "\n"


FIDELITY_COLUMNS = (("perception_precision", "perception precision"),
                    ("perception_coverage", "perception coverage"),
                    ("reasoning_precision", "reasoning precision"),
                    ("answer_follows", "answer follows chain"))
NLL_COLUMNS = (("nll/teacher/caption", "teacher-NLL caption"),
               ("nll/teacher/reasoning", "teacher-NLL reasoning"),
               ("nll/public/all", "public-NLL"))


def fidelity_markdown(results: dict) -> list[str]:
    """The fidelity / teacher-NLL table of the first held-out file (no lines if none measured)."""
    name = results["heldout"][0] if results["heldout"] else None
    keys = [(f"{name}/{k}", label) for k, label in FIDELITY_COLUMNS] + list(NLL_COLUMNS)
    if name is None or all(r.get(k) is None for r in results["rows"] for k, _ in keys):
        return []
    lines = ["", f"| policy | {name} accuracy | " + " | ".join(label for _, label in keys) + " |",
             "|" + "---|" * (2 + len(keys))]
    for r in results["rows"]:
        cells = ["—" if r.get(k) is None else f"{r[k]:.3f}" for k in (f"{name}/accuracy",
                                                                       *(k for k, _ in keys))]
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    return lines


def write_results(pipe: Pipeline) -> dict:
    results = collect_results(pipe)
    (pipe.work / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (pipe.work / "results.md").write_text(results_markdown(results))
    runs = {label: [pipe.dir(stage)] for stage, label in
            (("baseline_rlvr", "SFT -> RLVR"), ("prism_rlvr", "SFT -> PRISM -> RLVR"))}
    plot_rlvr_comparison(runs, pipe.work / "rlvr_comparison.png")
    return results


def plot_rlvr_comparison(runs: dict[str, list[Path]], out: Path,
                         keys=("reward", "accuracy", "format_rate")) -> Path | None:
    """One panel per training metric: every run thin, the mean over a pipeline's runs bold."""
    from prism_megatron.metrics import read_history

    histories = {label: [h for h in (read_history(d) for d in dirs) if len(h) > 1]
                 for label, dirs in runs.items()}
    if not any(histories.values()):
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.3), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for colour, (label, hs) in zip(("tab:blue", "tab:red"), histories.items()):
            curves = [{r["step"]: r[key] for r in h if key in r} for h in hs]
            for c in curves:
                ax.plot(list(c), list(c.values()), color=colour, alpha=0.25, lw=0.8)
            steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
            if steps:
                ax.plot(steps, [sum(c[s] for c in curves) / len(curves) for s in steps],
                        color=colour, lw=2, label=f"{label} (n={len(curves)})")
        ax.set_title(f"RLVR train {key}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
