"""Every user error of a `prism` command or a tool is one stderr line and exit status 2 (issue 19,
item 8): config ranges, missing/corrupt model directories, config.json without the model's keys,
truncated weights, resuming with other data; `--debug` adds the traceback, a bug keeps it, rank 0
alone reports a shared error. And the newcomer commands (item 10): --version, demo options,
`prism config` on a pipeline YAML, stage --help."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

import prism_megatron.stages.align  # noqa: F401 - import noise (megatron notes) before capsys
import prism_megatron.stages.warmup  # noqa: F401
import prism_megatron.stages.rlvr  # noqa: F401
import prism_megatron.stages.sft  # noqa: F401
from dist_utils import REPO, torchrun_command
from prism_megatron.cli import SECTIONS, main
from prism_megatron.config import PrismConfig
from prism_megatron.errors import PrismError, run_cli

SFT = str(REPO / "examples" / "tiny" / "sft.yaml")
RLVR = str(REPO / "examples" / "tiny" / "rlvr_grpo.yaml")


def one_error_line(capsys, argv) -> str:
    """Run ``prism ARGV`` in-process; assert exit 2, one stderr line, no traceback."""
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, (code, err)
    return lines[0]


@pytest.fixture
def data_files(synthetic_data_dir):
    return [f"data.train_files=[{synthetic_data_dir / 'sft_public.jsonl'}]",
            f"data.eval_files=[{synthetic_data_dir / 'test.jsonl'}]"]


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(tiny_model_dir, dst)
    return dst


# ------------------------------------------------------------------------------ config ranges

@pytest.mark.parametrize("argv, line", [
    (["sft", SFT, "optimizer.lr=-1"], "prism sft: error: optimizer.lr=-1.0 must be > 0"),
    (["rlvr", RLVR, "rollout.top_p=2"], "prism rlvr: error: rollout.top_p=2.0 must be in (0, 1]"),
    (["sft", SFT, "train_steps=-5"], "prism sft: error: train_steps=-5 must be >= 0"),
    (["sft", SFT, "rollout.temperature=-0.5"],
     "prism sft: error: rollout.temperature=-0.5 must be >= 0"),
    (["sft", SFT, "optimizer.adam_beta2=1.0"],
     "prism sft: error: optimizer.adam_beta2=1.0 must be in [0, 1)"),
    (["sft", SFT, "optimizer.warmup_ratio=1.5"],
     "prism sft: error: optimizer.warmup_ratio=1.5 must be in [0, 1]"),
    (["sft", SFT, "data.max_skip_fraction=2"],
     "prism sft: error: data.max_skip_fraction=2.0 must be in [0, 1]"),
    (["sft", SFT, "rollout.sglang_mem_fraction=1"],
     "prism sft: error: rollout.sglang_mem_fraction=1.0 must be in (0, 1)"),
    (["sft", SFT, "checkpoint.save_interval=0"],
     "prism sft: error: checkpoint.save_interval=0 must be >= 1"),
    (["sft", SFT, "eval.top_p=0"], "prism sft: error: eval.top_p=0.0 must be in (0, 1]"),
    (["sft", SFT, "optimizer.min_lr=1"],
     "prism sft: error: optimizer.min_lr=1.0 is above optimizer.lr=0.003: the schedule decays "
     "from lr to min_lr"),
])
def test_config_ranges_are_one_line(capsys, argv, line):
    assert one_error_line(capsys, argv) == line


def test_adam_eps_zero_is_allowed():
    from prism_megatron.config import load_config

    assert load_config(SFT, ["optimizer.adam_eps=0"]).optimizer.adam_eps == 0.0


# ------------------------------------------------------------------------------ paths, before work

def test_missing_model_dir_is_one_line_and_offline(capsys, monkeypatch, tmp_path, data_files):
    import transformers

    def no_hub(*args, **kwargs):
        raise AssertionError("the model hub / transformers was asked for a missing directory")

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", no_hub)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", no_hub)
    line = one_error_line(capsys, ["sft", SFT, f"model.hf_dir={tmp_path / 'nope'}", *data_files])
    assert line.startswith(f"prism sft: error: model.hf_dir: model directory {tmp_path / 'nope'} "
                           f"does not exist (prism runs offline")


def test_prism_sets_offline_mode_and_restores_the_environment(monkeypatch):
    import prism_megatron.cli as cli

    seen = {}
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(cli, "show_config", lambda args, overrides: seen.update(
        hub=os.environ.get("HF_HUB_OFFLINE"), tf=os.environ.get("TRANSFORMERS_OFFLINE")))
    assert main(["config"]) == 0
    assert seen == {"hub": "1", "tf": "1"}
    assert "HF_HUB_OFFLINE" not in os.environ
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")    # a user who wants the hub keeps it
    assert main(["config"]) == 0 and seen["hub"] == "0"


def test_load_processor_never_asks_the_hub_for_a_missing_dir(monkeypatch, tmp_path):
    import transformers

    from prism_megatron.data.encode import load_processor

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained",
                        lambda *a, **k: pytest.fail("hub lookup"))
    with pytest.raises(PrismError, match="does not exist: model.hf_dir must be a local"):
        load_processor(tmp_path / "missing")


def test_corrupt_config_json_names_the_file(capsys, model_copy, tmp_path, data_files):
    (model_copy / "config.json").write_text('{"model_type": "qwen3_vl", ')
    line = one_error_line(capsys, ["sft", SFT, f"model.hf_dir={model_copy}",
                                   f"model.megatron_dir={tmp_path}", *data_files])
    assert line.startswith(f"prism sft: error: model.hf_dir: {model_copy / 'config.json'} is not "
                           f"valid JSON (Expecting property name enclosed in double quotes")


def test_config_json_missing_keys_are_named(capsys, model_copy, tmp_path, data_files):
    config = json.loads((model_copy / "config.json").read_text())
    del config["tie_word_embeddings"], config["text_config"]["head_dim"]
    del config["vision_config"]["num_heads"]
    (model_copy / "config.json").write_text(json.dumps(config))
    line = one_error_line(capsys, ["sft", SFT, f"model.hf_dir={model_copy}",
                                   f"model.megatron_dir={tmp_path}", *data_files])
    assert line == (f"prism sft: error: model.hf_dir: {model_copy / 'config.json'} lacks keys the "
                    f"model is built from: tie_word_embeddings, text_config.head_dim, "
                    f"vision_config.num_heads (a released Qwen3-VL config.json has them)")
    # The model build reads the same rule (no silent transformers defaults).
    from prism_megatron.models.qwen3_vl.config import Qwen3VLConfigError, load_hf_config

    with pytest.raises(Qwen3VLConfigError, match="lacks keys .*text_config.head_dim"):
        load_hf_config(model_copy)


def test_missing_megatron_dir_is_reported_before_any_data(capsys, tiny_model_dir, tmp_path):
    # The data files do not exist either: the model inputs are checked first, so the error is
    # about megatron_dir and no data file was opened.
    data = [f"data.train_files=[{tmp_path / 'absent.jsonl'}]"]
    line = one_error_line(capsys, ["sft", SFT, f"model.hf_dir={tiny_model_dir}",
                                   "model.megatron_dir=''", *data])
    assert line.startswith("prism sft: error: model.megatron_dir is empty: set it to the "
                           "converted policy checkpoint")
    line = one_error_line(capsys, ["sft", SFT, f"model.hf_dir={tiny_model_dir}",
                                   f"model.megatron_dir={tmp_path / 'ckpt'}", *data])
    assert line.startswith(f"prism sft: error: model.megatron_dir={tmp_path / 'ckpt'} does not "
                           f"exist")
    line = one_error_line(capsys, ["sft", SFT, f"model.hf_dir={tiny_model_dir}",
                                   f"model.megatron_dir={tmp_path}", *data])
    assert line == f"prism sft: error: data.train_files: {tmp_path / 'absent.jsonl'} does not exist"


def test_tp_and_pp_are_checked_against_config_json(capsys, tiny_model_dir, tmp_path, data_files):
    base = ["sft", SFT, f"model.hf_dir={tiny_model_dir}", f"model.megatron_dir={tmp_path}",
            *data_files]
    assert one_error_line(capsys, base + ["parallel.tp=8"]) == (
        f"prism sft: error: parallel.tp=8 does not divide the text attention heads of "
        f"{tiny_model_dir / 'config.json'} (4 query heads, 2 key/value heads)")
    assert one_error_line(capsys, base + ["parallel.pp=3"]).startswith(
        "prism sft: error: parallel.pp=3: 4 decoder layers do not split evenly over 3 pipeline "
        "stages")


def test_rlvr_checks_paths_before_starting(capsys, tiny_model_dir, tmp_path, synthetic_data_dir):
    line = one_error_line(capsys, ["rlvr", RLVR, f"model.hf_dir={tiny_model_dir}",
                                   f"model.megatron_dir={tmp_path / 'none'}",
                                   f"data.train_files=[{synthetic_data_dir / 'rl.jsonl'}]"])
    assert line.startswith(f"prism rlvr: error: model.megatron_dir={tmp_path / 'none'} does not "
                           f"exist")


def test_truncated_safetensors_names_the_file(capsys, model_copy, tmp_path, data_files):
    weights = model_copy / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size // 2)
    line = one_error_line(capsys, ["sft", SFT, f"model.hf_dir={model_copy}",
                                   f"model.megatron_dir={tmp_path}", *data_files])
    assert line.startswith(f"prism sft: error: model.hf_dir: {weights} is truncated: its header "
                           f"describes {size} bytes but the file has {size // 2}")
    # The converter reads weights through the same check (it used to say "this is a bug").
    from prism_megatron.weights.errors import ConversionError
    from prism_megatron.convert.hf_io import HFReader

    with pytest.raises(ConversionError, match=f"{weights} is truncated"):
        HFReader(model_copy)


def test_truncated_safetensors_in_the_converter_tool(model_copy, tmp_path):
    weights = model_copy / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(100)
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "convert_hf_to_megatron.py"),
                           "--hf-dir", str(model_copy), "--out", str(tmp_path / "o"), "--quiet"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[-1].startswith(f"error: {weights} is not a readable safetensors file (header "
                                f"claims"), proc.stderr


def test_resume_with_different_data_is_one_line(capsys):
    from prism_megatron.data.sampler import ResumableSampler, SamplerStateError

    saved = ResumableSampler(96, seed=0).state_dict()

    def resume(argv):
        ResumableSampler(80, seed=0).load_state_dict(saved)

    assert run_cli(resume, [], name="prism sft") == 2
    assert capsys.readouterr().err == (
        "prism sft: error: cannot resume: the checkpoint's data order is for 96 rows with seed 0, "
        "but this run's data has 80 rows with seed 0; resume with the same data.train_files and "
        "seed, or train into a new checkpoint.save_dir\n")
    with pytest.raises(SamplerStateError):
        ResumableSampler(96, seed=1).load_state_dict(saved)


@pytest.mark.slow   # converts the tiny model and trains one step (in-process)
def test_resuming_sft_with_other_data_is_one_line(capsys, tiny_model_dir, synthetic_data_dir,
                                                  tmp_path):
    from prism_megatron.convert.hf_to_megatron import convert_hf_to_megatron

    convert_hf_to_megatron(tiny_model_dir, tmp_path / "megatron", fmt="torch_dist", progress=False)
    common = [f"model.hf_dir={tiny_model_dir}", f"model.megatron_dir={tmp_path / 'megatron'}",
              "data.global_batch_size=4", "data.micro_batch_size=4", "data.eval_files=[]",
              f"checkpoint.save_dir={tmp_path / 'ckpt'}", "checkpoint.save_interval=1",
              f"logging.run_dir={tmp_path / 'run'}", "logging.tensorboard=false",
              "logging.plots=false"]
    first = f"data.train_files=[{synthetic_data_dir / 'sft_public.jsonl'}]"      # 64 rows
    other = f"data.train_files=[{synthetic_data_dir / 'sft_teacher.jsonl'}]"     # 32 rows
    assert main(["sft", SFT, *common, first, "train_steps=1"]) == 0
    capsys.readouterr()
    assert main(["sft", SFT, *common, other, "train_steps=2"]) == 2
    err = capsys.readouterr().err      # the run's own progress and log lines, then the error
    assert "Traceback" not in err and err.count("error:") == 1
    assert err.strip().splitlines()[-1] == ("prism sft: error: cannot resume: the checkpoint's data order is for 64 rows "
                    "with seed 0, but this run's data has 32 rows with seed 0; resume with the "
                    "same data.train_files and seed, or train into a new checkpoint.save_dir")


# ------------------------------------------------------------------------------ the boundary

def test_debug_shows_the_traceback(capsys):
    assert main(["--debug", "sft", SFT, "optimizer.lr=-1"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "ConfigError" in err
    assert err.strip().splitlines()[-1] == "prism sft: error: optimizer.lr=-1.0 must be > 0"
    assert "PRISM_DEBUG" not in os.environ   # restored for the next in-process caller


def test_bug_keeps_its_traceback_and_says_so(capsys):
    def broken(argv):
        return {}["missing"]

    assert run_cli(broken, [], name="prism sft") == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "KeyError" in err
    assert err.strip().splitlines()[-1] == (
        "prism sft: internal error: KeyError: 'missing' -- this is a bug in prism-megatron, not "
        "in your input; please report it with the traceback above")


def test_keyboard_interrupt_exits_130_quietly(capsys):
    def interrupted(argv):
        raise KeyboardInterrupt

    assert run_cli(interrupted, [], name="prism sft") == 130
    assert capsys.readouterr().err == "prism sft: interrupted\n"


def test_other_ranks_stay_silent_before_distributed_init(capsys, monkeypatch):
    def fails(argv):
        raise PrismError("same on every rank")

    monkeypatch.setenv("RANK", "1")
    assert run_cli(fails, [], name="prism sft") == 2
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert run_cli(fails, [], name="prism sft") == 2
    assert capsys.readouterr().err == "prism sft: error: same on every rank\n"


class FakeStore:
    """The torch.distributed store as ``errors._should_print`` uses it (set / wait / get)."""

    def __init__(self, rank0_message=None):
        self.data = {} if rank0_message is None else {"prism_error/0": rank0_message.encode()}

    def set(self, key, value):
        self.data[key] = value.encode()

    def wait(self, keys, timeout):
        if not all(k in self.data for k in keys):
            raise RuntimeError("timed out")

    def get(self, key):
        return self.data[key]


@pytest.mark.parametrize("rank0, printed", [
    ("same on every rank", ""),                                          # rank 0 says it
    ("rank 0 failed otherwise", "[rank 1] prism sft: error: same on every rank\n"),
    (None, "[rank 1] prism sft: error: same on every rank\n"),           # rank 0 did not fail
])
def test_other_ranks_print_only_a_different_error_after_init(capsys, monkeypatch, rank0, printed):
    import torch.distributed as dist

    store = FakeStore(rank0)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist.distributed_c10d, "_get_default_store", lambda: store)

    def fails(argv):
        raise PrismError("same on every rank")

    assert run_cli(fails, [], name="prism sft") == 2
    assert capsys.readouterr().err == printed
    assert store.data["prism_error/1"] == b"same on every rank"


def test_user_os_errors_are_one_line(capsys):
    def missing(argv):
        open("/nonexistent/prism/file.jsonl")

    assert run_cli(missing, [], name="prism eval") == 2
    assert capsys.readouterr().err == ("prism eval: error: [Errno 2] No such file or directory: "
                                       "'/nonexistent/prism/file.jsonl'\n")


# ------------------------------------------------------------------------------ real entry points

def test_real_entry_point_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "prism_megatron.cli", "rlvr", RLVR,
                           "rollout.top_p=2"], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2
    assert proc.stderr == "prism rlvr: error: rollout.top_p=2.0 must be in (0, 1]\n"


def test_real_entry_point_missing_model_dir_is_the_only_line(tmp_path):
    """From a directory without demo_out/: the stage's first output is its one error line (no
    hub retries, no megatron start-up notes before it)."""
    proc = subprocess.run([sys.executable, "-m", "prism_megatron.cli", "sft", SFT],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("prism sft: error: model.hf_dir: model directory demo_out/model "
                                  "does not exist (prism runs offline")
    assert proc.stderr.count("\n") == 1, proc.stderr


@pytest.mark.slow
@pytest.mark.dist
def test_torchrun_prints_a_shared_error_once(tmp_path):
    cmd, env = torchrun_command(2, ["-m", "prism_megatron.cli", "sft", SFT, "optimizer.lr=-1"])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode != 0
    assert proc.stderr.count("prism sft: error: optimizer.lr=-1.0 must be > 0") == 1, proc.stderr


# ------------------------------------------------------------------------------ newcomer commands

def test_version(capsys):
    from prism_megatron import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() in (f"prism-megatron {__version__}",
                                               "prism-megatron 0.1.0")


def test_demo_takes_its_options(capsys, monkeypatch):
    import prism_megatron.demo as demo

    seen = {}
    monkeypatch.setattr(demo, "run", lambda out, preset, seeds, steps, limit, jobs: seen.update(
        out=str(out), seeds=seeds, sft=steps["sft"], jobs=jobs))
    assert main(["demo", "--out", "X", "--seeds", "0,1", "--sft-steps", "7", "--jobs", "1"]) == 0
    assert seen == {"out": "X", "seeds": (0, 1), "sft": 7, "jobs": 1}
    assert main(["demo", "--help"]) == 0
    assert "--out OUT" in capsys.readouterr().out
    assert main(["demo", "--outt", "X"]) == 2
    assert "unrecognized arguments: --outt" in capsys.readouterr().err


def test_config_prints_a_pipeline_yaml(capsys):
    assert main(["config", str(REPO / "examples" / "tiny" / "pipeline.yaml"), "until=sft"]) == 0
    out = capsys.readouterr().out
    assert "work_dir: demo_out/pipeline\n" in out and "until: sft\n" in out
    assert "config: examples/tiny/sft.yaml\n" in out


def test_stage_help_lists_every_config_section(capsys):
    assert set(SECTIONS) == {f for f in PrismConfig.__dataclass_fields__}
    assert main(["rlvr", "--help"]) == 0
    out = capsys.readouterr().out
    for section in SECTIONS:
        assert f"\n  {section} " in out, section
    assert "prism config examples/tiny/rlvr_grpo.yaml" in out
