"""One-step-off-policy RLVR (``algorithm.off_policy_steps=1``): the staleness of every sample is
recorded and is exactly one step after the first step, off-policy samples go through the TIS
path (their behaviour log-probs are those of the older weights), a killed run resumes equal to
the uninterrupted one, and the combinations it cannot honour are refused in one line."""

import pytest

from dist_utils import run_torchrun
from prism_megatron.metrics import read_history
from test_rlvr import uninterrupted_and_resumed, write_config

OFF_POLICY = {"name": "grpo", "off_policy_steps": 1, "tis_cap": 2.0, "prompts_per_step": 2}


def history(run_dir):
    return [r for r in read_history(run_dir) if r["step"] >= 1]


@pytest.mark.parametrize("overrides, message", [
    (["algorithm.off_policy_steps=1"], "set algorithm.tis_cap"),
    (["algorithm.off_policy_steps=1", "algorithm.tis_cap=2", "algorithm.name=dapo",
      "algorithm.dynamic_sampling=true"], "dynamic_sampling is not supported"),
    (["algorithm.off_policy_steps=1", "algorithm.tis_cap=2",
      "rollout.release_memory_between_phases=true"], "release_memory_between_phases=false"),
])
def test_off_policy_combinations_it_cannot_honour_are_refused(overrides, message):
    from prism_megatron.config import ConfigError, load_config
    from prism_megatron.rl.policy import check_rl_config

    cfg = load_config(None, ["model.hf_dir=x", "model.megatron_dir=y", *overrides])
    with pytest.raises(ConfigError, match=message):
        check_rl_config(cfg, ("grpo", "dapo", "gspo"))


def test_off_policy_steps_range_and_the_alignment_stage_refuse():
    from prism_megatron.config import ConfigError, load_config
    from prism_megatron.stages.align import check_config

    with pytest.raises(ConfigError, match="off_policy_steps"):
        load_config(None, ["algorithm.off_policy_steps=2"])
    cfg = load_config(None, ["model.hf_dir=x", "model.megatron_dir=y", "algorithm.name=prism",
                             "algorithm.off_policy_steps=1", "algorithm.tis_cap=2"])
    with pytest.raises(ConfigError, match="RLVR only"):
        check_config(cfg)


def test_samples_without_engine_log_probs_are_refused_off_policy():
    from prism_megatron.config import ConfigError
    from prism_megatron.data.rl import RLPrompt
    from prism_megatron.rl.batch import RolloutBatch
    from prism_megatron.rollout.base import Sample
    from prism_megatron.stages.rlvr import check_behaviour_log_probs, staleness_metrics

    batch = RolloutBatch.from_groups([RLPrompt(None, [], answer="1", id="p")],
                                     [[Sample([1, 2], [-0.1, -0.2], "", "stop"),
                                       Sample([3], [], "", "stop")]])
    with pytest.raises(ConfigError, match=r"a 1-token sample came without them"):
        check_behaviour_log_probs(batch)
    import torch

    batch.behaviour_step = torch.tensor([3, 4])
    assert staleness_metrics(batch, step=6) == {"off_policy/staleness_mean": 1.5,
                                                "off_policy/staleness_max": 2.0}


@pytest.mark.slow  # two in-process runs of the tiny model
def test_off_policy_samples_are_exactly_one_step_stale_and_corrected(tmp_path, rl_assets):
    """4 steps: step 1 generates on-policy (nothing older exists), steps 2-4 train on samples of
    the previous weights: every sample's recorded version is step - 2 (mean == max == 1). Those
    samples' engine log-probs differ from the trainer's recomputed ones (the TIS weight's input),
    while step 1's agree; step 1 equals the on-policy run's step 1. (The random tiny model earns
    no reward: the entropy bonus is what moves its weights.)"""
    from prism_megatron.config import load_config
    from prism_megatron.stages import rlvr

    runs = {}
    for name, off in (("on", 0), ("off", 1)):
        cfg = load_config(write_config(tmp_path / name, rl_assets, train_steps=4 if off else 1,
                                       algorithm={**OFF_POLICY, "off_policy_steps": off,
                                                  "entropy_coef": 0.05},
                                       optimizer={"lr": 1e-2}))
        rlvr.run(cfg)
        runs[name] = history(tmp_path / name / "run")
    off = runs["off"]
    assert [r["step"] for r in off] == [1, 2, 3, 4]
    assert [r["off_policy/staleness_mean"] for r in off] == [0.0, 1.0, 1.0, 1.0]
    assert [r["off_policy/staleness_max"] for r in off] == [0.0, 1.0, 1.0, 1.0]
    assert runs["on"][0]["off_policy/staleness_max"] == 0.0
    assert off[0]["logprob_diff_max"] < 1e-4
    for row in off[1:]:
        assert row["logprob_diff_mean"] > 1e-4      # behaviour (older) != recomputed (current)
    for row in off[:3]:                             # steps 1-3 generate the next step meanwhile
        assert row["time/wait_generation_s"] >= 0 and row["perf/rollout_tokens_per_s"] > 0
    assert "time/wait_generation_s" not in off[3]   # the last step generates nothing ahead
    for key in ("reward", "accuracy", "response_len_mean", "loss", "grad_norm"):
        assert off[0][key] == runs["on"][0][key], key
    assert "time/wait_generation_s" not in runs["on"][0]


@pytest.mark.slow  # multi-process (torchrun), a kill and a resume
@pytest.mark.dist
def test_killed_off_policy_run_resumes_equal_to_the_uninterrupted_run(tmp_path, rl_assets):
    """``save_interval`` 2: nothing is generated ahead across step 2, so a run killed after step
    3 and resumed from the step-2 checkpoint regenerates step 3 exactly as the uninterrupted run
    did (same prompts, seeds and weights), and every later step follows: all per-step metrics
    agree (staleness 0, 1, 0, 1 in both)."""
    a, b = uninterrupted_and_resumed(tmp_path, rl_assets,
                                     {"enabled": False, "save_interval": 2},
                                     train_steps=4, algorithm=OFF_POLICY)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    assert [r["off_policy/staleness_max"] for r in a] == [0.0, 1.0, 0.0, 1.0]
    for x, y in zip(a, b):
        for key in ("reward", "accuracy", "response_len_mean", "response_len_max",
                    "off_policy/staleness_mean", "off_policy/staleness_max"):
            assert x[key] == y[key], (x["step"], key)
        for key in ("loss", "grad_norm", "logprob_diff_mean", "entropy", "ratio_first_mean"):
            assert x[key] == pytest.approx(y[key], abs=1e-6), (x["step"], key)


@pytest.mark.slow  # multi-process (torchrun)
@pytest.mark.dist
def test_each_data_parallel_rank_receives_only_the_samples_it_trains_on(tmp_path, rl_assets):
    """DP2: the sender scatters each rank its round-robin share (4 of the 8 samples of a step,
    the rest as lengths only), rewards are scored by the owners and shared as scalars, and the
    run's rewards, losses and updates equal the DP1 run's (where one rank holds all 8)."""
    runs = {}
    for name, nproc in (("dp1", 1), ("dp2", 2)):
        config = write_config(tmp_path / name, rl_assets, train_steps=2,
                              algorithm={**OFF_POLICY, "entropy_coef": 0.05},
                              optimizer={"lr": 1e-2, "adam_eps": 1e-3})
        run_torchrun("-m", nproc, "prism_megatron.cli", "rlvr", config, timeout=600)
        runs[name] = history(tmp_path / name / "run")
    one, two = runs["dp1"], runs["dp2"]
    assert [(r["perf/samples_received_min"], r["perf/samples_received_max"]) for r in one] == \
        [(8.0, 8.0)] * 2
    assert [(r["perf/samples_received_min"], r["perf/samples_received_max"]) for r in two] == \
        [(4.0, 4.0)] * 2
    for x, y in zip(one, two):
        for key in ("reward", "accuracy", "format_rate", "response_len_mean",
                    "off_policy/staleness_max"):
            assert x[key] == y[key], (x["step"], key)
        for key in ("loss", "grad_norm", "entropy", "logprob_diff_mean"):
            assert x[key] == pytest.approx(y[key], abs=1e-5), (x["step"], key)
