"""``prism eval`` with ``eval.harness: lmms-eval``: the paper's benchmarks through lmms-eval.

Every prompt, answer parser, judge call and metric is lmms-eval's own (the pinned release of
requirements-eval.txt); this module only serves the policy, selects the data and collects the
numbers. The policy runs behind an OpenAI-compatible ``/v1/chat/completions``: SGLang's on GPUs,
the CPU server's (``python -m prism_megatron.rollout.serve``) elsewhere. lmms-eval's ``openai``
chat model backend talks to it, in a separate process (``prism_megatron.eval.lmms_driver``, under
``eval.lmms_python``): one for HallusionBench, one for the rest (their judge clients differ).

    benchmark       lmms-eval task(s)                               score (reported, 0-100)
    mathvista       mathvista_testmini_{cot,solution,format}        llm_as_judge_eval, mean of variants
    mathvision      mathvision_testmini                             mathvision_standard_eval
    mathverse       mathverse_testmini                              gpt_eval_score
    wemath          wemath_testmini_reasoning                       wemath_strict (+ loose, acc, format)
    mmmu            mmmu_val                                        mmmu_acc (per-subject aggregation)
    mmmu_pro        mmmu_pro_vision + mmmu_pro_standard             mmmu_acc, mean of the two settings
    hallusionbench  hallusion_bench_image                           aAcc (+ qAcc, fAcc)

Offline data (spec §7 evaluation runs with local copies): ``eval.datasets`` maps an lmms-eval
task name to a local directory, either a ``DatasetDict.save_to_disk`` directory (has
``dataset_dict.json``) or a directory of parquet files (files whose name contains the task's split
are used, else all); or ``eval.datasets_cache`` is an HF datasets cache that already holds the
downloads (``HF_DATASETS_OFFLINE=1``). A task with neither is refused before anything starts.

The judge (``eval.judge_url``, an OpenAI-compatible ``/v1`` base, e.g. a Qwen2.5-32B-Instruct
SGLang/vLLM server as in the paper): lmms-eval's tasks call it where they call GPT -- MathVista's
answer extraction when the rules do not match, MathVerse's scoring, HallusionBench's per-answer
verdict. Tasks that need it refuse to start without it.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from prism_megatron.config import ConfigError, EvalTaskConfig, PrismConfig
from prism_megatron.errors import PrismError

log = logging.getLogger("prism.eval")

REPO_ROOT = Path(__file__).resolve().parents[2]


class HarnessError(PrismError):
    """lmms-eval could not run a benchmark (missing install, dataset, server, judge)."""


@dataclass(frozen=True)
class LmmsTask:
    lmms_tasks: tuple[str, ...]   # lmms-eval task names; the score is their mean
    split: str                    # the split the task yaml evaluates (local parquet layout)
    metrics: tuple[str, ...]      # lmms-eval metric keys reported
    score: str                    # the headline metric
    percent: bool                 # lmms-eval already reports it in percent (else a fraction)
    judge: bool                   # the task calls an LLM judge


TASKS: dict[str, LmmsTask] = {
    "mathvista": LmmsTask(("mathvista_testmini_cot", "mathvista_testmini_solution",
                           "mathvista_testmini_format"), "testmini", ("llm_as_judge_eval",),
                          "llm_as_judge_eval", True, True),
    "mathvision": LmmsTask(("mathvision_testmini",), "testmini", ("mathvision_standard_eval",),
                           "mathvision_standard_eval", True, False),
    "mathverse": LmmsTask(("mathverse_testmini",), "testmini", ("gpt_eval_score",),
                          "gpt_eval_score", False, True),
    "wemath": LmmsTask(("wemath_testmini_reasoning",), "testmini",
                       ("wemath_strict", "wemath_loose", "acc_score", "format_score"),
                       "wemath_strict", True, False),
    "mmmu": LmmsTask(("mmmu_val",), "validation", ("mmmu_acc",), "mmmu_acc", False, False),
    "mmmu_pro": LmmsTask(("mmmu_pro_vision", "mmmu_pro_standard"), "test", ("mmmu_acc",),
                         "mmmu_acc", False, False),
    "hallusionbench": LmmsTask(("hallusion_bench_image",), "image", ("aAcc", "qAcc", "fAcc"),
                               "aAcc", True, True),
}
# metrics lmms-eval reports as fractions even where the task's score is in percent
_FRACTION_METRICS = {"acc_score", "format_score"}


def _number(value) -> float | None:
    """lmms-eval's metric value as a float ("99.81%" strings included; None stays None)."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, str):
        text = value.strip()
        try:
            return float(text[:-1]) if text.endswith("%") else float(text)
        except ValueError:
            return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def percent(task: LmmsTask, metric: str, value) -> float | None:
    number = _number(value)
    if number is None:
        return None
    if isinstance(value, str) and value.strip().endswith("%"):
        return number
    return number if task.percent and metric not in _FRACTION_METRICS else 100.0 * number


def plan(cfg: PrismConfig) -> list[tuple[str, LmmsTask, EvalTaskConfig, list[str]]]:
    """(benchmark, table entry, settings, lmms-eval task names), checked before anything starts."""
    e = cfg.eval
    if not e.tasks:
        raise ConfigError("eval.harness=lmms-eval needs eval.tasks (e.g. examples/eval_paper.yaml)")
    for name in e.tasks:
        if name not in TASKS:
            raise ConfigError(f"eval.tasks.{name}: unknown benchmark; known: {sorted(TASKS)}")
    out = []
    for name, settings in e.tasks.items():
        task = TASKS[name]
        names = list(settings.lmms_tasks) or list(task.lmms_tasks)
        unknown = [t for t in names if t not in task.lmms_tasks]
        if unknown:
            raise ConfigError(f"eval.tasks.{name}.lmms_tasks: {unknown} are not {name} tasks; "
                              f"choose from {list(task.lmms_tasks)}")
        if task.judge and not e.judge_url:
            raise ConfigError(f"eval.tasks.{name}: lmms-eval's {name} calls an LLM judge; set "
                              f"eval.judge_url to an OpenAI-compatible server (/v1 base)")
        if settings.max_new_tokens < 0:
            raise ConfigError(f"eval.tasks.{name}.max_new_tokens={settings.max_new_tokens} must "
                              f"be >= 0 (0: the task's own)")
        for t in names:
            dataset_source(t, task.split, cfg)
        out.append((name, task, settings, names))
    unknown = sorted(set(e.datasets) - {t for _, _, _, names in out for t in names})
    if unknown:
        raise ConfigError(f"eval.datasets: {unknown} are not lmms-eval tasks this run evaluates")
    return out


def dataset_source(lmms_task: str, split: str, cfg: PrismConfig) -> dict:
    """The task-config overrides that make lmms-eval read the local copy of ``lmms_task``."""
    e = cfg.eval
    path = e.datasets.get(lmms_task)
    if path:
        root = Path(path)
        if (root / "dataset_dict.json").is_file():
            return {"dataset_path": str(root.resolve()), "dataset_kwargs": {"load_from_disk": True}}
        files = sorted(str(p.resolve()) for p in root.rglob("*.parquet")) if root.is_dir() else []
        if not files:
            raise ConfigError(f"eval.datasets.{lmms_task}={path}: not a local dataset (neither a "
                              f"save_to_disk directory with dataset_dict.json nor parquet files)")
        chosen = [f for f in files if split in Path(f).name] or files
        # the parquet builder has one config, so the yaml's dataset_name must go
        return {"dataset_path": "parquet", "dataset_name": None,
                "dataset_kwargs": {"data_files": {split: chosen}}}
    if e.datasets_cache:
        if not Path(e.datasets_cache).is_dir():
            raise ConfigError(f"eval.datasets_cache={e.datasets_cache} is not a directory")
        return {}
    raise ConfigError(f"lmms-eval task {lmms_task}: no local dataset; set "
                      f"eval.datasets.{lmms_task} to its downloaded copy (save_to_disk or parquet "
                      f"directory) or eval.datasets_cache to an HF datasets cache holding it")


def gen_kwargs(settings: EvalTaskConfig, seed: int) -> str:
    """lmms-eval's ``--gen_kwargs``: what the preset sets over the task yaml."""
    items = {"max_new_tokens": settings.max_new_tokens or None,
             "temperature": settings.temperature, "top_p": settings.top_p, "seed": seed}
    return ",".join(f"{k}={v}" for k, v in items.items() if v is not None)


TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def judge_env(cfg: PrismConfig, benchmark: str) -> dict[str, str]:
    """How lmms-eval's judge clients find the judge: its llm_judge provider takes the /v1 base,
    HallusionBench's own client the full chat/completions URL (both from OPENAI_API_URL)."""
    e = cfg.eval
    env = {"API_TYPE": "openai", "MODEL_VERSION": e.judge_model,
           "OPENAI_API_KEY": os.environ.get("OPENAI_API_KEY", "EMPTY")}
    if e.judge_url:
        base = e.judge_url.rstrip("/")
        env["OPENAI_API_URL"] = base + "/chat/completions" if benchmark == "hallusionbench" else base
    return env


def lmms_python(cfg: PrismConfig) -> str:
    python = cfg.eval.lmms_python or sys.executable
    probe = subprocess.run([python, "-c", "import lmms_eval"], capture_output=True, text=True)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        raise HarnessError(f"eval.harness=lmms-eval: {python} cannot import lmms_eval ({last}); "
                           f"pip install -r requirements-eval.txt or set eval.lmms_python")
    return python


def _failure_line(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln or "error" in ln:
            return ln[:400]
    return lines[-1][:400] if lines else "no output"


def _run_spec(cfg: PrismConfig, name: str, task: LmmsTask,
              settings: EvalTaskConfig, names: list[str], work: Path) -> dict:
    e = cfg.eval
    work.mkdir(parents=True, exist_ok=True)
    return {"name": name,
            "tasks": [{"task": t, **dataset_source(t, task.split, cfg)} for t in names],
            "gen_kwargs": gen_kwargs(settings, cfg.seed),
            "system_prompt": e.system_prompt if settings.system_prompt else None,
            "output_path": str(work)}


def run_group(cfg: PrismConfig, python: str, base_url: str, planned: list, work: Path,
              benchmark_dirs: Path) -> dict[str, dict]:
    """Benchmarks that share one judge environment, in one lmms-eval process (its start-up,
    indexing every task yaml, dominates small runs)."""
    e = cfg.eval
    work.mkdir(parents=True, exist_ok=True)
    spec = {"base_url": base_url, "model": "policy", "num_concurrent": e.concurrency,
            "timeout": e.request_timeout_s, "limit": e.limit or None, "seed": cfg.seed,
            "runs": [_run_spec(cfg, name, task, settings, names, benchmark_dirs / name)
                     for name, task, settings, names in planned]}
    (work / "spec.json").write_text(json.dumps(spec, indent=1))
    # lmms-eval (accelerate) joins a torch.distributed job when RANK / WORLD_SIZE are set: the
    # harness process is a job of its own, whatever this process was launched under.
    env = {**{k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV},
           **judge_env(cfg, planned[0][0]),
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "LMMS_EVAL_DATASETS_CACHE": e.datasets_cache or str(work / "hf_datasets_cache"),
           "WANDB_MODE": "disabled"}
    if e.datasets_cache:
        env["HF_DATASETS_CACHE"] = e.datasets_cache
    t0 = time.time()
    log_path, out_path = work / "lmms_eval.log", work / "out.json"
    with open(log_path, "w") as logf:
        proc = subprocess.run([python, "-m", "prism_megatron.eval.lmms_driver",
                               str(work / "spec.json"), str(out_path)],
                              stdout=logf, stderr=subprocess.PIPE, text=True, env=env)
        logf.write(proc.stderr)
    outputs = json.loads(out_path.read_text()) if out_path.is_file() else {}
    results = {}
    for name, task, _, names in planned:
        out = outputs.get(name)
        if out is None or "error" in out:
            why = out["error"] if out else _failure_line(proc.stderr)
            raise HarnessError(f"lmms-eval {name} ({', '.join(names)}) failed: {why[:400]} "
                               f"(log: {log_path})")
        results[name] = collect(name, task, names, out, log_path)
    log.info("lmms-eval %s: %.0f s", ", ".join(results), time.time() - t0)
    return results


def collect(name: str, task: LmmsTask, names: list[str], out: dict, log_path: Path) -> dict:
    """One benchmark's numbers from lmms-eval's results table (in percent)."""
    per_task, scores = {}, []
    for t in names:
        row = out["results"].get(t, {})
        metrics = {m: percent(task, m, row.get(f"{m},none")) for m in task.metrics}
        if metrics[task.score] is None:
            raise HarnessError(f"lmms-eval {t}: no {task.score} in its results (log: {log_path})")
        per_task[t] = metrics
        scores.append(metrics[task.score])
    metrics = ({m: sum(per_task[t][m] for t in names) / len(names) for m in task.metrics}
               if len(names) > 1 else per_task[names[0]])
    samples = out.get("samples", {})
    log.info("%s: %s %.2f", name, task.score, sum(scores) / len(scores))
    return {"score": sum(scores) / len(scores), "metric": task.score, "metrics": metrics,
            "tasks": per_task, "raw": {t: out["results"].get(t, {}) for t in names},
            "samples": samples, "prompts": sum(len(v) for v in samples.values())}


def _health(url: str, timeout: float = 5.0) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


def start_server(cfg: PrismConfig):
    """(``/v1`` base URL, engine to shut down or None): ``eval.server_url`` if set, else one
    launched server for ``model.hf_dir`` -- SGLang on GPUs (``rollout.engine: sglang``), the CPU
    server otherwise. For data parallelism over several servers, put sglang-router in front of
    them and give its URL as ``eval.server_url``."""
    e = cfg.eval
    if e.server_url:
        base = e.server_url.rstrip("/")
        root = base[:-3] if base.endswith("/v1") else base
        if not _health(root):
            raise HarnessError(f"eval.server_url={e.server_url}: no server answers {root}/health")
        return (base if base.endswith("/v1") else base + "/v1"), None
    from prism_megatron.rollout.sglang import SGLangEngine

    server = cfg.rollout.server if cfg.rollout.engine == "sglang" else "prism"
    engine = SGLangEngine(model_path=cfg.model.hf_dir, server=server, num_servers=1,
                          tp=cfg.rollout.sglang_tp, request_timeout_s=e.request_timeout_s,
                          min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels,
                          log_dir=Path(cfg.logging.run_dir) / "eval_server")
    return engine.servers[0].url + "/v1", engine


def markdown_table(checkpoints: dict[str, dict]) -> str:
    names = []
    for row in checkpoints.values():
        names += [n for n in row["benchmarks"] if n not in names]
    lines = ["| checkpoint | " + " | ".join(names) + " | average |",
             "|---" * (len(names) + 2) + "|"]
    for ckpt, row in checkpoints.items():
        cells = [f"{row['benchmarks'][n]['score']:.2f}" if n in row["benchmarks"] else "-"
                 for n in names]
        lines.append(f"| {ckpt} | " + " | ".join(cells) + f" | {row['average']:.2f} |")
    details = []
    for ckpt, row in checkpoints.items():
        for n, b in row["benchmarks"].items():
            extra = ", ".join(f"{k} {v:.2f}" for k, v in b["metrics"].items() if v is not None)
            details.append(f"- {ckpt} {n}: {extra}")
    return "\n".join(lines) + "\n\n" + "\n".join(details) + "\n"


def run(cfg: PrismConfig) -> dict:
    """Evaluate ``model.hf_dir`` on ``eval.tasks``; results of earlier checkpoints evaluated into
    the same ``logging.run_dir`` stay in ``eval_results.{json,md}`` (one row per checkpoint)."""
    hf_dir = Path(cfg.model.hf_dir) if cfg.model.hf_dir else None
    if not cfg.eval.server_url and (hf_dir is None or not (hf_dir / "config.json").is_file()):
        raise ConfigError(f"model.hf_dir={cfg.model.hf_dir!r} is not an HF checkpoint directory; "
                          "export a Megatron checkpoint with tools/convert_megatron_to_hf.py")
    planned = plan(cfg)
    python = lmms_python(cfg)
    run_dir = Path(cfg.logging.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    base_url, engine = start_server(cfg)
    groups: dict[str, list] = {}
    for item in planned:
        groups.setdefault(json.dumps(judge_env(cfg, item[0]), sort_keys=True), []).append(item)
    found = {}
    try:
        for k, group in enumerate(groups.values()):
            found.update(run_group(cfg, python, base_url, group, run_dir / "lmms_eval" / f"run{k}",
                                   run_dir / "lmms_eval"))
    finally:
        if engine is not None:
            engine.shutdown()
    benchmarks = {name: found[name] for name, _, _, _ in planned}   # the config's order
    with open(run_dir / "eval_samples.jsonl", "w") as f:
        for name, b in benchmarks.items():
            for t, rows in b.pop("samples").items():
                for r in rows:
                    f.write(json.dumps({"benchmark": name, "task": t, **r}, default=str) + "\n")
    checkpoint = cfg.model.hf_dir or cfg.eval.server_url
    row = {"benchmarks": benchmarks,
           "average": sum(b["score"] for b in benchmarks.values()) / len(benchmarks)}
    path = run_dir / "eval_results.json"
    report = json.loads(path.read_text()) if path.is_file() else {}
    if report.get("harness") != "lmms-eval":
        report = {"harness": "lmms-eval", "checkpoints": {}}
    report["checkpoints"][checkpoint] = row
    path.write_text(json.dumps(report, indent=2) + "\n")
    table = markdown_table(report["checkpoints"])
    (run_dir / "eval_results.md").write_text(table)
    print(table, end="")
    return report
