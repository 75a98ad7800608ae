"""The results table (Markdown + JSON) of a pipeline's policies, and the RLVR comparison plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prism_megatron.pipeline.config import PipelineConfig
    from prism_megatron.pipeline.runner import Pipeline

ROWS = (("base", "base model (before SFT)", "both", "sft", "first"),
        ("sft", "SFT", "both", "sft", "last"),
        ("baseline_rlvr", "SFT -> RLVR", "baseline", "baseline_rlvr", "last"),
        ("align", "SFT -> PRISM (alignment only)", "PRISM", "align", "last"),
        ("prism_rlvr", "SFT -> PRISM -> RLVR", "PRISM", "prism_rlvr", "last"))


def heldout_names(cfg: PipelineConfig) -> list[str]:
    return [Path(p).stem for p in cfg.data.test_files]


def collect_results(pipe: Pipeline) -> dict:
    """Held-out accuracy / format rate of every policy the pipeline produced (None: not run)."""
    names = heldout_names(pipe.cfg)
    rows = []
    for key, label, pipeline, stage, which in ROWS:
        marker = pipe.marker(stage) or {}
        metrics = marker.get(which) or {}
        row = {"key": key, "label": label, "pipeline": pipeline, "stage": stage,
               "step": metrics.get("step")}
        for name in names:
            for m in ("accuracy", "format_rate", "response_tokens"):
                row[f"{name}/{m}"] = metrics.get(f"eval/{name}/{m}")
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
    disc = results.get("discriminator_heldout")
    if disc:
        lines.append(f"\ndiscriminator after warm-up: held-out pairwise accuracy caption "
                     f"{disc.get('acc_caption', float('nan')):.3f}, reasoning "
                     f"{disc.get('acc_reasoning', float('nan')):.3f} "
                     f"({disc.get('pairs', 0):.0f} pairs with a format-valid student)")
    return "\n".join(lines) + "\n"


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
