"""The alignment step's per-step observability metrics on a hand-made batch: score spread and
flat groups, and the fidelity of the samples (present only when every prompt has ``meta``)."""

import math
from types import SimpleNamespace

import pytest
import torch

from prism_megatron.algorithms.advantages import prism_advantages
from prism_megatron.rl.batch import RolloutBatch
from prism_megatron.rollout.base import Sample
from prism_megatron.stages.align import student_metrics

META = {"grid": [["yellow", "blank", "blank"], ["blank", "blank", "yellow"],
                 ["blank", "green", "blank"]],
        "question": {"kind": "parity", "colours": ["yellow"], "k": 0, "options": ["odd", "even"]}}
TEACHER = ("<caption>- Style: a 3x3 grid of solid colour cells\n- Row 1: yellow, blank, blank\n"
           "- Row 2: blank, blank, yellow\n- Row 3: blank, green, blank\n- 1 green cell\n"
           "- 2 yellow cells\n- 6 blank cells</caption>\n<think>The question is about the yellow "
           "cells.\nThere are 2 yellow cells.\n2 is even.</think>\n<answer>B</answer>")
WRONG = ("<caption>- a 2x2 grid\n- 5 red cells</caption>\n<think>There are 3 yellow cells.\n"
         "3 is odd.</think>\n<answer>A</answer>")
INVALID = "<think>no caption</think><answer>B</answer>"


def batch_of(texts, metas, caption, reasoning, valid):
    prompts = [SimpleNamespace(meta=m, answer="B") for m in metas]
    samples = [Sample([1] * 3, [0.0] * 3, t, "stop") for t in texts]
    batch = RolloutBatch(prompts, samples, [0, 0, 1, 1])
    batch.caption, batch.reasoning = torch.tensor(caption), torch.tensor(reasoning)
    batch.valid = torch.tensor(valid)
    batch.advantages = prism_advantages(batch.caption, batch.reasoning, batch.valid, batch.group)
    return batch


def test_spread_flat_groups_and_fidelity_of_the_samples():
    batch = batch_of([TEACHER, INVALID, WRONG, TEACHER], [META, META],
                     [1.0, 0.0, 2.0, 2.0], [0.5, 0.0, 1.0, 3.0], [True, False, True, True])
    m = student_metrics(batch)
    # group 0 has one valid member (no spread); group 1: [2, 2] and [1, 3]
    assert m["spread/caption"] == 0.0
    assert m["spread/reasoning"] == pytest.approx(math.sqrt(2))
    assert m["adv/flat_groups"] == 0.0       # group 0 ranks its invalid member last
    # precisions over the valid responses (teacher 1, wrong 0, teacher 1); coverage over all
    # four (the invalid one and the wrong one state no true fact)
    assert m["fidelity/perception_precision"] == pytest.approx(2 / 3)
    assert m["fidelity/reasoning_precision"] == pytest.approx(2 / 3)
    assert m["fidelity/perception_coverage"] == pytest.approx(0.5)
    assert m["fidelity/answer_follows"] == 1.0


def test_no_fidelity_unless_every_prompt_has_meta():
    batch = batch_of([TEACHER, TEACHER, TEACHER, TEACHER], [META, None],
                     [1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0], [True] * 4)
    m = student_metrics(batch)
    assert not any(k.startswith("fidelity/") for k in m)
    assert m["adv/flat_groups"] == 1.0 and m["spread/caption"] == 0.0
