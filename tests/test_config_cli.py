"""Configs: defaults <- YAML <- key=value, with errors that name the key; the prism CLI."""

import subprocess
import sys

import pytest

from dist_utils import REPO
from prism_megatron.cli import main
from prism_megatron.config import ConfigError, PrismConfig, load_config


def test_yaml_then_overrides_win(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optimizer:\n  lr: 3.0e-6\nparallel:\n  tp: 2\n")
    cfg = load_config(path, ["parallel.tp=4", "algorithm.name=gspo", "data.train_files=[a,b]"])
    assert isinstance(cfg, PrismConfig)
    assert cfg.optimizer.lr == 3e-6 and cfg.parallel.tp == 4
    assert cfg.algorithm.name == "gspo" and cfg.data.train_files == ["a", "b"]
    assert cfg.algorithm.clip_high == 0.2 and cfg.rewards.accuracy_weight == 0.8  # PRISM defaults


@pytest.mark.parametrize("overrides,message", [
    (["parallel.tpp=2"], "parallel.tpp"),
    (["parallel.tp=two"], "parallel.tp"),
    (["algorithm.name=ppo"], "algorithm.name='ppo'"),
    (["algorithm.loss_agg=mean"], "algorithm.loss_agg"),
    (["rollout.n=0"], "rollout.n=0"),
    (["lr"], "key=value"),
])
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_config(None, overrides)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_cli_prints_resolved_config_and_reports_errors_without_traceback(capsys):
    assert main(["config", "optimizer.lr=2e-6"]) == 0
    assert "lr: 2.0e-06" in capsys.readouterr().out
    assert main(["config", "model.dtyp=bf16"]) == 2
    err = capsys.readouterr().err
    assert "model.dtyp" in err and "Traceback" not in err


@pytest.mark.parametrize("path", sorted((REPO / "examples").glob("*/*.yaml")),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_example_config_is_valid(path):
    if path.name == "pipeline.yaml":     # `prism pipeline`'s own config, not a stage's
        from prism_megatron.pipeline import load_pipeline_config

        cfg = load_pipeline_config(str(path))
        for spec in (cfg.sft, cfg.warmup, cfg.align, cfg.rlvr):   # and the stage YAMLs it names
            load_config(REPO / spec.config)
    else:
        load_config(path)


def test_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "prism_megatron.cli", "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert all(name in out for name in ("config", "demo", "sft"))
