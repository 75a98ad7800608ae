"""The stage runtime: the step loop's evaluation and checkpoint cadence, and the checkpoint
manager's resume order (one process, no model: the loop and the manager are plain Python)."""

from __future__ import annotations

import json

import pytest


class FakeTrainer:
    def __init__(self, resumed: dict):
        self.resumed, self.saved = resumed, []

    def maybe_resume(self) -> dict:
        return self.resumed

    def save(self, step, state=None):
        self.saved.append((step, state))
        return f"step_{step}"


class Counter:
    def __init__(self):
        self.value = 0

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = state["value"]


class Companion:
    def __init__(self, log):
        self.log = log

    def save(self, step):
        self.log.append(("companion saved", step))

    def resume_at(self, step):
        self.log.append(("companion resumed", step))


def config(tmp_path, **checkpoint):
    from prism_megatron.config import PrismConfig

    cfg = PrismConfig()
    cfg.checkpoint.save_dir = str(tmp_path / "ckpt")
    cfg.checkpoint.save_interval = 3
    for key, value in checkpoint.items():
        setattr(cfg.checkpoint, key, value)
    cfg.logging.run_dir = str(tmp_path / "run")
    cfg.logging.tensorboard = False
    (tmp_path / "run").mkdir(parents=True)
    return cfg


def test_train_loop_evaluates_before_every_interval_and_at_the_end_and_saves_when_due(tmp_path):
    from prism_megatron.runtime import Checkpoints, StageSession, StepResult

    cfg = config(tmp_path)
    session = StageSession(cfg, "sft", info=None)
    trainer = FakeTrainer({})
    counter = Counter()
    checkpoints = Checkpoints(cfg, trainer, state={"counter": counter})
    evaluated, stepped = [], []

    def one_step(step):
        stepped.append(step)
        counter.value = step * 10
        return StepResult({"loss": 1.0 / step}, samples=2, tokens=8)

    def evaluate():
        evaluated.append(len(stepped))
        return {"eval/x/accuracy": float(len(stepped))}

    last = session.train_loop(one_step, start=0, total=7, checkpoints=checkpoints, desc="t",
                              show=("loss",), evaluate=evaluate, eval_interval=2)
    assert stepped == [1, 2, 3, 4, 5, 6, 7]
    assert evaluated == [0, 2, 4, 6, 7]            # before training, every 2 steps, the end
    assert last == {"loss": pytest.approx(1 / 7), "eval/x/accuracy": 7.0}
    assert [(s, st) for s, st in trainer.saved] == [(3, {"counter": {"value": 30}}),
                                                    (6, {"counter": {"value": 60}}),
                                                    (7, {"counter": {"value": 70}})]
    logged = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in logged] == [0, 1, 2, 3, 4, 5, 6, 7]


def test_a_resumed_loop_neither_reevaluates_the_start_nor_repeats_steps(tmp_path):
    from prism_megatron.runtime import Checkpoints, StageSession, StepResult

    cfg = config(tmp_path)
    session = StageSession(cfg, "sft", info=None)
    evaluated, stepped = [], []
    session.train_loop(lambda s: stepped.append(s) or StepResult({"loss": 0.0}), start=5,
                       total=7, checkpoints=Checkpoints(cfg, FakeTrainer({})), desc="t",
                       show=(), evaluate=lambda: evaluated.append(1) or {})
    assert stepped == [6, 7] and evaluated == [1]     # only the final evaluation


def test_checkpoints_restore_state_then_companions_and_save_companions_first(tmp_path):
    from prism_megatron.runtime import Checkpoints

    log = []
    counter = Counter()
    trainer = FakeTrainer({"step": 4, "counter": {"value": 40}})
    initial = []
    checkpoints = Checkpoints(config(tmp_path), trainer, state={"counter": counter},
                              companions=(Companion(log),), initial=lambda: initial.append(1))
    assert checkpoints.resume() == 4
    assert counter.value == 40 and log == [("companion resumed", 4)] and initial == []
    assert checkpoints.due(6, 10) and checkpoints.due(10, 10) and not checkpoints.due(5, 10)
    checkpoints.save(6)
    assert log[-1] == ("companion saved", 6) and trainer.saved == [(6, {"counter": {"value": 40}})]

    fresh = Checkpoints(config(tmp_path / "b"), FakeTrainer({}), state={"counter": Counter()},
                        companions=(Companion(log),), initial=lambda: initial.append(1))
    assert fresh.resume() == 0 and initial == [1] and log[-1] == ("companion resumed", 0)
    off = Checkpoints(config(tmp_path / "c", enabled=False), FakeTrainer({}))
    assert not off.due(3, 10)
