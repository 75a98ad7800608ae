"""``prism pipeline``: one-line config errors; the whole pipeline at 1-2 steps per stage, killed in
the middle of SFT and resumed there (earlier stages skipped, SFT's metrics continue from its
checkpoint step); results.json/results.md; a rerun runs nothing; dependency skips.

One module-scoped pipeline run (tiny model, small synthetic data) serves the slow tests."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from dist_utils import REPO
from prism_megatron.cli import main
from prism_megatron.metrics import read_history
from prism_megatron.pipeline import STAGES, Pipeline, load_pipeline_config

TINY_POLICY = ["eval.limit=2", "eval.max_new_tokens=8", "logging.tensorboard=false",
               "logging.plots=false"]
TINY_RL = ["train_steps=1", "algorithm.prompts_per_step=2", "rollout.n=2",
           "rollout.max_new_tokens=8"]


def write_config(path, model, data, **changes) -> str:
    cfg = {
        "work_dir": str(path.parent / "work"), "hf_dir": str(model), "seed": 0,
        "show_output": False,
        "data": {"sft_files": [str(data / "sft_public.jsonl"), str(data / "sft_teacher.jsonl")],
                 "align_file": str(data / "align.jsonl"), "rl_file": str(data / "rl.jsonl"),
                 "test_files": [str(data / "test.jsonl")]},
        "policy_overrides": TINY_POLICY,
        "sft": {"config": "examples/tiny/sft.yaml",
                "overrides": ["train_steps=2", "data.global_batch_size=4",
                              "data.micro_batch_size=4", "checkpoint.save_interval=1"]},
        "pairs": {"heldout_rows": 2, "max_rows": 6, "max_new_tokens": 8},
        "warmup": {"config": "examples/tiny/warmup.yaml",
                   "overrides": ["train_steps=1", "data.global_batch_size=2",
                                 "data.micro_batch_size=2", "discriminator.eval_interval=0",
                                 # 8-token students of a 2-step policy are all format-invalid
                                 "data.max_skip_fraction=1.0",
                                 "logging.tensorboard=false", "logging.plots=false"]},
        "align": {"config": "examples/tiny/align.yaml", "overrides": TINY_RL},
        "rlvr": {"config": "examples/tiny/rlvr_grpo.yaml", "overrides": TINY_RL},
    }
    cfg.update(changes)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def run_pipeline(config: str) -> list[str]:
    """The pipeline in this process (its stages are subprocesses); returns its status lines."""
    lines = []
    Pipeline(load_pipeline_config(config), log=lines.append).run()
    return lines


def status(lines: list[str], stage: str) -> str:
    """The status lines of one stage (running ..., done in ...), joined."""
    return "\n".join(line for line in lines if line.split()[1:2] == [stage])


@pytest.mark.parametrize("override, message", [
    ("until=rlvr", "until: unknown stage(s) ['rlvr']"),
    ("stages=[sft,foo]", "stages: unknown stage(s) ['foo']"),
    ("nproc=0", "nproc=0 must be >= 1"),
    ("sft.nproc=two", "sft.nproc"),
    ("data.test_files=[]", "data.test_files is empty"),
    ("data.rl_file=''", "data.rl_file is empty (stage prism_rlvr needs it)"),
    ("rlvr.config=''", "rlvr.config is empty"),
    ("shared={sft: ''}", "shared: no work_dir given for ['sft']"),
    ("shared={sftt: runs}", "shared: unknown stage(s) ['sftt']"),
    ("nonsense=1", "nonsense"),
    ("hf_dir=/nonexistent/model", "hf_dir: /nonexistent/model does not exist"),
])
def test_config_errors_are_one_line(tmp_path, capsys, override, message):
    config = write_config(tmp_path / "p.yaml", tmp_path / "model", tmp_path / "data")
    assert main(["pipeline", config, override]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_missing_stages_are_skipped_with_the_reason(tmp_path, tiny_model_dir,
                                                    synthetic_data_dir):
    """Only prism_rlvr selected in an empty work dir: nothing runs, it says what it needs."""
    config = write_config(tmp_path / "p.yaml", tiny_model_dir, synthetic_data_dir,
                          stages=["prism_rlvr"])
    lines = run_pipeline(config)
    assert "skipped (needs align)" in status(lines, "prism_rlvr")
    for stage in (s for s in STAGES if s != "prism_rlvr"):
        assert "skipped (not selected)" in status(lines, stage)
    results = json.loads((tmp_path / "work" / "results.json").read_text())
    assert all(row["test/accuracy"] is None for row in results["rows"])


@pytest.fixture(scope="module")
def pipeline_run(tiny_model_dir, make_synthetic_data, tmp_path_factory):
    """The pipeline killed (SIGKILL to its process group) once SFT's first checkpoint exists,
    then run again to the end."""
    data = make_synthetic_data(0)
    root = tmp_path_factory.mktemp("pipeline")
    config = write_config(root / "p.yaml", tiny_model_dir, data)
    work = root / "work"
    proc = subprocess.Popen([sys.executable, "-m", "prism_megatron.cli", "pipeline", config],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    latest = work / "sft" / "ckpt" / "latest"
    deadline = time.time() + 400
    while not latest.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    first_output = proc.communicate()[0].decode()
    assert latest.is_file(), first_output
    killed_at = latest.read_text().strip()
    history_at_kill = (work / "sft" / "metrics.jsonl").read_text().splitlines()
    lines = run_pipeline(config)
    return {"work": work, "config": config, "lines": lines, "killed_at": killed_at,
            "history_at_kill": history_at_kill, "first_output": first_output}


@pytest.mark.slow  # the whole pipeline in subprocesses (module fixture)
def test_killed_pipeline_resumes_at_the_stage_and_step_it_reached(pipeline_run):
    work, lines = pipeline_run["work"], pipeline_run["lines"]
    assert pipeline_run["killed_at"] == "step_0000001"
    first = pipeline_run["first_output"].splitlines()
    assert "done in" in status(first, "convert") and "running" in status(first, "sft")
    assert "skipped: done earlier" in status(lines, "convert")
    assert "running, resuming from step_0000001" in status(lines, "sft")
    history = read_history(work / "sft")   # appended on resume; the last row of a step wins
    assert [row["step"] for row in history] == [0, 1, 2]   # not restarted: no second step 0
    raw = [json.loads(x)["step"] for x in (work / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert raw.count(0) == 1
    # The rows up to the checkpoint are the first run's, untouched; the rest came after.
    kept = [x for x in pipeline_run["history_at_kill"] if json.loads(x)["step"] <= 1]
    assert (work / "sft" / "metrics.jsonl").read_text().splitlines()[:2] == kept
    assert (work / "sft" / "stage.log").read_text().count("\n$ ") == 2   # two launches


@pytest.mark.slow  # the whole pipeline in subprocesses (module fixture)
def test_pipeline_writes_results_for_both_pipelines(pipeline_run):
    work, lines = pipeline_run["work"], pipeline_run["lines"]
    for stage in STAGES:
        marker = json.loads((work / stage / "done.json").read_text())
        assert marker["stage"] == stage and marker["command"] and (work / stage / "stage.log").is_file()
    assert json.loads((work / "sft" / "done.json").read_text())["command"][1:4] == [
        "-m", "prism_megatron.cli", "sft"]
    results = json.loads((work / "results.json").read_text())
    assert results["heldout"] == ["test"]
    rows = {row["key"]: row for row in results["rows"]}
    assert list(rows) == ["base", "sft", "baseline_rlvr", "align", "prism_rlvr"]
    for key in ("base", "sft", "baseline_rlvr"):
        assert 0 <= rows[key]["test/accuracy"] <= 1 and 0 <= rows[key]["test/format_rate"] <= 1
        assert results["accuracy"][key] == rows[key]["test/accuracy"]
    assert rows["base"]["step"] == 0 and rows["sft"]["step"] == 2 and rows["baseline_rlvr"]["step"] == 1
    assert set(results["discriminator_heldout"]) >= {"acc_caption", "acc_reasoning"}
    table = (work / "results.md").read_text()
    assert "| SFT -> RLVR | baseline | 1 |" in table and "test accuracy" in table
    assert (work / "rlvr_comparison.png").stat().st_size > 0
    pairs = (work / "pairs" / "pairs_train.jsonl").read_text().splitlines()
    assert len(pairs) == 4 and len((work / "pairs" / "pairs_heldout.jsonl").read_text().splitlines()) == 2
    assert "done in" in status(lines, "align") and "done in" in status(lines, "prism_rlvr")
    for key in ("align", "prism_rlvr"):
        assert 0 <= rows[key]["test/accuracy"] <= 1 and rows[key]["step"] == 1
    align_cmd = json.loads((work / "align" / "done.json").read_text())["command"]
    assert f"discriminator.megatron_dir={work / 'warmup' / 'ckpt'}" in align_cmd
    prism_cmd = json.loads((work / "prism_rlvr" / "done.json").read_text())["command"]
    assert f"model.megatron_dir={work / 'align' / 'ckpt'}" in prism_cmd


@pytest.mark.slow  # the whole pipeline in subprocesses (module fixture)
def test_rerun_skips_every_done_stage(pipeline_run):
    work = pipeline_run["work"]
    logs = {s: (work / s / "stage.log").read_text() for s in STAGES if (work / s).is_dir()}
    lines = run_pipeline(pipeline_run["config"])
    for stage in logs:
        assert "skipped: done earlier" in status(lines, stage)
        assert "NOTE" not in status(lines, stage)          # same commands as when they ran
        assert (work / stage / "stage.log").read_text() == logs[stage]   # nothing launched
    assert (work / "results.md").is_file()


def test_benchmarks_after_each_rl_stage_export_evaluate_and_fill_the_results(tmp_path):
    """``benchmarks: CONFIG``: after align / prism_rlvr / baseline_rlvr the pipeline exports the
    stage's policy to HF and runs ``prism eval CONFIG`` on it (once); the results table gains a
    column per benchmark from the eval's ``eval_results.json``."""
    import json
    import sys

    from prism_megatron.pipeline import Pipeline, PipelineConfig, PipelineData
    from prism_megatron.pipeline.results import collect_results, results_markdown

    cfg = PipelineConfig(work_dir=str(tmp_path / "work"), hf_dir=str(tmp_path / "model"),
                         benchmarks=str(tmp_path / "eval_paper.yaml"),
                         benchmark_overrides=["eval.judge_url=http://judge/v1"],
                         data=PipelineData(test_files=[str(tmp_path / "test.jsonl")]))
    pipe = Pipeline(cfg, log=lambda line: None)
    export, evaluate = pipe.benchmark_commands("prism_rlvr")
    out = pipe.dir("prism_rlvr") / "benchmarks"
    assert export[:5] == [sys.executable, "-m", "prism_megatron.pipeline", "--step", "export"]
    assert json.loads(export[5]) == {"policy": pipe.ckpt("prism_rlvr"),
                                     "hf_dir": str(tmp_path / "model"), "out": str(out / "hf")}
    assert evaluate == [sys.executable, "-m", "prism_megatron.cli", "eval",
                        str(tmp_path / "eval_paper.yaml"), f"model.hf_dir={out / 'hf'}",
                        f"logging.run_dir={out}", "eval.judge_url=http://judge/v1"]
    for stage, scores in (("prism_rlvr", {"mathvista": 60.0, "mmmu": 50.0}),
                          ("baseline_rlvr", {"mathvista": 55.0})):
        (pipe.dir(stage) / "benchmarks").mkdir(parents=True)
        (pipe.dir(stage) / "done.json").write_text(json.dumps({"last": {"step": 3}}))
        (pipe.dir(stage) / "benchmarks" / "eval_results.json").write_text(json.dumps(
            {"harness": "lmms-eval", "checkpoints": {"x": {
                "benchmarks": {k: {"score": v} for k, v in scores.items()},
                "average": sum(scores.values()) / len(scores)}}}))
    rows = {r["key"]: r for r in collect_results(pipe)["rows"]}
    assert rows["prism_rlvr"]["benchmarks"] == {"mathvista": 60.0, "mmmu": 50.0, "average": 55.0}
    assert rows["sft"]["benchmarks"] == {}
    text = results_markdown(collect_results(pipe))
    assert "| policy | mathvista | mmmu | average |" in text
    assert "| SFT -> PRISM -> RLVR | 60.00 | 50.00 | 55.00 |" in text
    assert "| SFT -> RLVR | 55.00 | — | 55.00 |" in text


def test_shared_stages_are_read_from_their_own_work_dirs(tmp_path):
    """``shared`` maps a stage to the work_dir that ran it (the demo and the study share SFT and
    warm-ups between chains): its paths and marker are that dir's, and it is never run here."""
    from prism_megatron.errors import PrismError
    from prism_megatron.pipeline import Pipeline, PipelineConfig

    cfg = PipelineConfig(work_dir=str(tmp_path / "here"), hf_dir="model",
                         shared={"sft": str(tmp_path / "a"), "warmup": str(tmp_path / "b")})
    pipe = Pipeline(cfg, log=lambda line: None)
    assert pipe.dir("sft") == tmp_path / "a" / "sft" and pipe.ckpt("warmup") == \
        str(tmp_path / "b" / "warmup" / "ckpt")
    assert pipe.dir("align") == tmp_path / "here" / "align"
    assert not pipe.will_run("sft") and "model.megatron_dir=" + str(tmp_path / "a" / "sft" / "ckpt") \
        in pipe.command("align")
    with pytest.raises(PrismError, match="shared from .*/a, where it has not finished"):
        pipe.step("sft")
    (tmp_path / "a" / "sft").mkdir(parents=True)
    (tmp_path / "a" / "sft" / "done.json").write_text('{"seconds": 3}')
    pipe.step("sft")
    assert pipe.status["sft"] == {"status": "shared", "seconds": 3}
