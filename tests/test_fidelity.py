"""Ground-truth fidelity metrics (eval/fidelity.py) on hand-written captions and chains, teacher-NLL
against a hand computation, and the demo's fidelity report on canned results."""

from __future__ import annotations

import json
import math

import pytest

from prism_megatron.eval.fidelity import (
    eval_metrics, heldout_metrics, score_fidelity, summarize_fidelity)

# counts: red 2, green 1, blue 1, yellow 0, blank 2; facts = shape + 6 cells + 4 present colours
GRID = [["red", "blank", "green"], ["red", "blue", "blank"]]
SUM = {"grid": GRID, "question": {"kind": "sum", "colours": ["red", "green"], "k": 0,
                                  "options": []}}


def response(caption: str, think: str, answer: str) -> str:
    return f"<caption>{caption}</caption>\n<think>{think}</think>\n<answer>{answer}</answer>"


RIGHT = response(
    "- Style: a 2x3 grid of solid colour cells\n- Row 1: red, blank, green\n"
    "- Row 2: red, blue, blank\n- 2 red cells\n- 1 green cell\n- 1 blue cell\n- 2 blank cells",
    "The question is about the red and green cells.\nThere are 2 red cells.\n"
    "There is 1 green cell.\n2 + 1 = 3.", "3")
PARTLY = response(
    "- Style: a 2x3 grid\n- Row 1: red, green, green\n- Row 2: red, blue, blank\n"
    "- 3 red cells\n- 1 green cell",
    "There are 3 red cells.\nThere is 1 green cell.\n3 + 1 = 4.", "4")
INVENTED = response(
    "- Style: a 3x3 grid\n- Row 1: red, blank, green, purple\n- Row 3: yellow\n- 2 red cells",
    "2 + 1 = 4.", "3")


def test_right_caption_and_chain():
    f = score_fidelity(RIGHT, SUM, "3")
    assert (f.claims, f.claims_true, f.invented, f.facts, f.facts_stated) == (11, 11, 0, 11, 11)
    assert (f.steps, f.steps_correct, f.needed, f.needed_stated) == (3, 3, 2, 2)
    assert (f.conclusion, f.answer_follows, f.accuracy, f.format_ok) == ("3", True, 1.0, True)
    assert (f.perception_precision, f.perception_coverage, f.reasoning_precision) == (1.0, 1.0, 1.0)


def test_partly_right_caption_and_chain():
    f = score_fidelity(PARTLY, SUM, "3")
    # shape true; row 1: red ok, green (is blank) wrong, green ok; row 2 all ok; 3 red wrong, 1 green ok
    assert (f.claims, f.claims_true, f.invented, f.facts_stated) == (9, 7, 0, 7)
    assert f.perception_precision == pytest.approx(7 / 9)
    assert f.perception_coverage == pytest.approx(7 / 11)
    # red miscounted, green right; "3 + 1 = 4" is sound arithmetic on a wrong operand
    assert (f.steps, f.steps_correct, f.needed_stated) == (3, 1, 1)
    assert (f.conclusion, f.answer_follows, f.accuracy) == ("4", True, 0.0)
    assert f.reasoning_coverage == 0.5


def test_invented_cells_and_a_conclusion_the_answer_ignores():
    f = score_fidelity(INVENTED, SUM, "3")
    # shape wrong; row 1: 3 right + a 4th cell (invented, and not a colour); row 3 does not exist
    assert (f.claims, f.claims_true, f.invented, f.facts_stated) == (7, 4, 2, 4)
    assert f.perception_invented == pytest.approx(2 / 7)
    # right operands, wrong sum; the answer (right) is not what the chain concluded
    assert (f.steps, f.steps_correct, f.needed_stated) == (1, 0, 2)
    assert (f.conclusion, f.answer_follows, f.accuracy) == ("4", False, 1.0)


def test_question_kinds_and_no_steps():
    compare = {"grid": GRID, "question": {"kind": "compare", "colours": ["red", "blue"], "k": 0,
                                          "options": ["blue", "equal", "red"]}}
    f = score_fidelity(response("A grid.", "2 > 1, so the answer is red.", "C"), compare)
    assert (f.claims, f.steps, f.steps_correct, f.conclusion, f.answer_follows) == \
        (0, 1, 1, "C", True)
    assert (f.perception_precision, f.perception_coverage) == (None, 0.0)
    wrong = score_fidelity(response("A grid.", "1 > 2, so the answer is red.", "C"), compare)
    assert (wrong.steps_correct, wrong.conclusion, wrong.answer_follows) == (0, "C", True)
    times = {"grid": GRID, "question": {"kind": "times", "colours": ["green"], "k": 3,
                                        "options": []}}
    f = score_fidelity(response("Coloured squares: red, purple, yellow.", "1 x 3 = 3.", "3"), times)
    assert (f.claims, f.claims_true, f.invented) == (3, 1, 1)          # purple invented, yellow false
    assert (f.steps, f.steps_correct, f.conclusion, f.accuracy) == (1, 1, "3", 1.0)
    most = {"grid": GRID, "question": {"kind": "most", "colours": [], "k": 0,
                                       "options": ["green", "red", "yellow", "blue"]}}
    f = score_fidelity(response("x", "The largest count is 2, for red.", "B"), most)
    assert (f.steps, f.steps_correct, f.conclusion, f.answer_follows, f.needed) == \
        (1, 1, "B", True, 4)
    parity = {"grid": GRID, "question": {"kind": "parity", "colours": ["blue"], "k": 0,
                                         "options": ["odd", "even"]}}
    f = score_fidelity(response("x", "1 is even.", "B"), parity)
    assert (f.steps, f.steps_correct, f.conclusion, f.answer_follows) == (1, 0, "B", True)
    bare = score_fidelity(response("A grid of coloured cells.", "The answer is 2.", "4"), SUM)
    assert (bare.claims, bare.steps, bare.conclusion, bare.answer_follows) == (0, 0, "2", False)
    said = score_fidelity(response("x", "The answer is red.", "C"), compare)   # an option's text
    assert (said.steps, said.conclusion, said.answer_follows) == (0, "C", True)
    counted = score_fidelity(response("x", "There are 2 red cells. There is 1 green cell.", "3"),
                             SUM)       # no final step: the question solved on the stated counts
    assert (counted.steps, counted.steps_correct, counted.conclusion, counted.answer_follows) == \
        (2, 2, "3", True)
    silent = score_fidelity(response("x", "Let me look.", "3"), SUM)
    assert (silent.steps, silent.conclusion, silent.answer_follows) == (0, None, None)


def test_invalid_format_has_no_claims():
    f = score_fidelity("<caption>- 2 red cells</caption> the answer is 3", SUM, "3")
    assert (f.format_ok, f.claims, f.steps, f.accuracy, f.facts, f.needed) == \
        (False, 0, 0, 0.0, 11, 2)


def test_summary_and_eval_metrics():
    texts = [RIGHT, PARTLY, INVENTED, "no format"]
    scores = [score_fidelity(t, SUM, "3") for t in texts]
    s = summarize_fidelity(scores)
    assert s["accuracy"] == 0.5 and s["format_rate"] == 0.75 and s["responses"] == 4.0
    assert s["perception_precision"] == pytest.approx((1 + 7 / 9 + 4 / 7) / 3)
    assert s["perception_coverage"] == pytest.approx((1 + 7 / 11 + 4 / 11 + 0) / 4)
    assert s["reasoning_precision"] == pytest.approx((1 + 1 / 3 + 0) / 3)
    assert s["answer_follows"] == pytest.approx(2 / 3)
    metrics = eval_metrics("test", texts + [RIGHT], [SUM] * 4 + [None], ["3"] * 5)
    assert metrics["eval/test/perception_coverage"] == s["perception_coverage"]
    assert sorted(metrics) == sorted(f"eval/test/{k}" for k in (
        "perception_precision", "perception_coverage", "perception_invented",
        "reasoning_precision", "reasoning_coverage", "answer_follows"))
    assert eval_metrics("test", [RIGHT], [None]) == {}
    with pytest.raises(ValueError, match="2 texts, 1 metas"):
        eval_metrics("test", [RIGHT, RIGHT], [SUM])
    # the held-out evaluator's groups (n samples per prompt): every sample counts once
    from prism_megatron.eval.heldout import score_sample

    groups = [[score_sample(RIGHT, 5, "3"), score_sample(PARTLY, 5, "3")],
              [score_sample(INVENTED, 5, "3"), score_sample("no format", 5, "3")]]
    assert heldout_metrics("test", groups, [SUM, SUM], ["3", "3"]) == metrics


# ------------------------------------------------------------------------------ teacher-NLL

def test_teacher_nll_matches_a_hand_computation(tiny_model_dir, synthetic_data_dir, tmp_path):
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    from prism_megatron.data.encode import encode_conversation, load_processor
    from prism_megatron.eval.teacher_nll import cli, demonstrations, teacher_nll

    processor = load_processor(tiny_model_dir)
    model = Qwen3VLForConditionalGeneration.from_pretrained(
        str(tiny_model_dir), dtype=torch.float32).eval()
    demos = demonstrations(synthetic_data_dir / "test.jsonl", limit=3)
    assert [d.id for d in demos] == ["test-00000", "test-00001", "test-00002"]
    assert demos[0].teacher.startswith("<caption>- Style: a ")
    got = teacher_nll(model, processor, demos, batch_size=2)     # one padded batch of 2, one of 1

    tok = processor.tokenizer
    for kind in ("teacher", "public"):
        sums = {"caption": 0.0, "reasoning": 0.0, "all": 0.0}
        counts = dict.fromkeys(sums, 0)
        for demo in demos:
            text = getattr(demo, kind)
            e = encode_conversation(processor, [*demo.messages, {"role": "assistant",
                                                                 "content": text}],
                                    demo.images, max_prompt_length=10**6,
                                    max_response_length=10**6)
            ids = e.input_ids[None]
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                               pixel_values=e.pixel_values, image_grid_thw=e.image_grid_thw,
                               mm_token_type_ids=(ids == model.config.image_token_id).int()
                               ).logits[0]
            logp = torch.log_softmax(logits[:-1].double(), -1)
            token_nll = -logp[torch.arange(len(ids[0]) - 1), ids[0, 1:]]
            start = e.prompt_length
            resp = e.input_ids[start:].tolist()
            nll = token_nll[start - 1:]
            # spec §2.3 boundary: the first k whose decoded prefix covers "</caption>"
            cut = text.index("</caption>") + len("</caption>")
            k = next(k for k in range(1, len(resp) + 1) if len(tok.decode(resp[:k])) >= cut)
            sums["caption"] += float(nll[:k].sum())
            sums["reasoning"] += float(nll[k:-1].sum())
            sums["all"] += float(nll.sum())
            counts["caption"] += k
            counts["reasoning"] += len(resp) - 1 - k
            counts["all"] += len(resp)
        for seg in sums:
            assert got[kind][f"{seg}_tokens"] == counts[seg], (kind, seg)
            assert got[kind][seg] == pytest.approx(sums[seg] / counts[seg], abs=1e-4), (kind, seg)
    assert got["teacher"]["caption_tokens"] > got["public"]["caption_tokens"] > 0

    out = tmp_path / "nll.json"        # the command line the demo runs, on an HF directory
    cli(["--rows", str(synthetic_data_dir / "test.jsonl"), "--limit", "3", "--batch-size", "3",
         "--policy", str(tiny_model_dir), "--out", str(out)])
    written = json.loads(out.read_text())
    assert (written["rows"], written["policy"]) == (3, str(tiny_model_dir))
    for kind in ("teacher", "public"):
        assert written[kind]["all_tokens"] == got[kind]["all_tokens"]
        assert written[kind]["all"] == pytest.approx(got[kind]["all"], abs=1e-5)


# ---------------------------------------------------------------- results and demo reporting

def _canned_pipeline(tmp_path):
    """A pipeline whose stages 'finished' with canned metrics (no stage is run)."""
    from prism_megatron.pipeline import Pipeline, PipelineConfig, PipelineData

    cfg = PipelineConfig(work_dir=str(tmp_path / "work"), hf_dir=str(tmp_path / "model"),
                         data=PipelineData(test_files=[str(tmp_path / "test.jsonl")]))
    pipe = Pipeline(cfg, log=lambda line: None)
    accuracy = {"sft": (0.1, 0.25), "align": (None, 0.3), "baseline_rlvr": (None, 0.35)}
    for stage, (first, last) in accuracy.items():
        d = pipe.dir(stage)
        d.mkdir(parents=True)
        marker = {"last": {"step": 5, "eval/test/accuracy": last,
                           "eval/test/perception_precision": last + 0.5}}
        if first is not None:
            marker["first"] = {"step": 0, "eval/test/accuracy": first}
        (d / "done.json").write_text(json.dumps(marker))
    return pipe


def test_results_collect_fidelity_and_teacher_nll(tmp_path):
    import os

    from prism_megatron.pipeline.results import (
        collect_results, results_markdown, teacher_nll_jobs, teacher_nll_path)

    pipe = _canned_pipeline(tmp_path)
    jobs = teacher_nll_jobs(pipe)
    assert jobs == [(str(tmp_path / "model"), pipe.dir("sft") / "teacher_nll_first.json"),
                    (pipe.ckpt("sft"), pipe.dir("sft") / "teacher_nll_last.json"),
                    (pipe.ckpt("baseline_rlvr"), pipe.dir("baseline_rlvr") / "teacher_nll_last.json"),
                    (pipe.ckpt("align"), pipe.dir("align") / "teacher_nll_last.json")]
    nll = {"teacher": {"caption": 2.5, "reasoning": 1.25}, "public": {"all": 3.0}}
    out = teacher_nll_path(pipe, "align", "last")
    out.write_text(json.dumps(nll))
    assert len(teacher_nll_jobs(pipe)) == 3                 # align's is measured
    done = pipe.dir("align") / "done.json"
    os.utime(done, (os.path.getmtime(out) + 10,) * 2)       # the stage ran again since
    assert len(teacher_nll_jobs(pipe)) == 4
    rows = {r["key"]: r for r in collect_results(pipe)["rows"]}
    assert rows["align"]["nll/teacher/caption"] == 2.5 and rows["align"]["nll/public/all"] == 3.0
    assert rows["sft"]["nll/teacher/caption"] is None
    assert rows["align"]["test/perception_precision"] == 0.8
    assert rows["base"]["test/perception_precision"] is None and rows["base"]["test/accuracy"] == 0.1
    text = results_markdown(collect_results(pipe))
    assert "| SFT -> PRISM (alignment only) | 0.300 | 0.800 | — | — | — | 2.500 | 1.250 | 3.000 |" \
        in text
    assert "| base model (before SFT) | 0.100 | — | — | — | — | — | — | — |" in text


def _canned_seed(seed: int) -> dict:
    base = {"base": 0.0, "sft": 0.2, "baseline_rlvr": 0.3, "align": 0.25, "prism_rlvr": 0.4}
    rows = []
    for key, acc in base.items():
        acc = acc + 0.1 * seed if key in ("align", "prism_rlvr", "baseline_rlvr") else acc
        rows.append({"key": key, "test/accuracy": acc, "test/format_rate": 1.0,
                     "test/perception_precision": acc / 2, "test/perception_coverage": None,
                     "test/reasoning_precision": 0.5, "test/answer_follows": 1.0,
                     "nll/teacher/caption": 4.0 - acc, "nll/teacher/reasoning": 3.0,
                     "nll/public/all": None if key == "prism_rlvr" and seed else 5.0})
    return {"rows": rows, "accuracy": {r["key"]: r["test/accuracy"] for r in rows}}


def test_demo_reports_fidelity_and_paired_differences():
    from prism_megatron.demo import aggregate, fidelity, fidelity_table, paired, paired_table

    per_seed = {0: _canned_seed(0), 1: _canned_seed(1)}
    fid = fidelity(per_seed)
    acc = fid["prism_rlvr"]["test/accuracy"]
    assert acc["values"] == [0.4, 0.5] and acc["mean"] == pytest.approx(0.45)
    assert acc["std"] == pytest.approx(0.05)
    assert fid["sft"]["nll/teacher/caption"] == {"values": [3.8, 3.8], "mean": 3.8, "std": 0.0}
    assert fid["sft"]["test/perception_coverage"]["mean"] is None
    diffs = paired(per_seed)
    d = diffs["prism_rlvr - baseline_rlvr"]["test/accuracy"]
    assert d["per_seed"] == {0: pytest.approx(0.1), 1: pytest.approx(0.1)}
    assert d["mean"] == pytest.approx(0.1) and d["std"] == pytest.approx(0.0)
    assert diffs["align - sft"]["nll/teacher/caption"]["per_seed"] == \
        {0: pytest.approx(-0.05), 1: pytest.approx(-0.15)}
    public = diffs["prism_rlvr - baseline_rlvr"]["nll/public/all"]
    assert public["per_seed"] == {0: 0.0, 1: None} and public["std"] == 0.0
    text = fidelity_table(fid, [0, 1])
    assert "| after SFT -> PRISM -> RLVR | 0.450 ± 0.050 | 0.225 ± 0.025 | — | 0.500 ± 0.000 | " \
           "1.000 ± 0.000 | 3.550 ± 0.050 | 3.000 ± 0.000 | 5.000 ± 0.000 |" in text
    lines = paired_table(diffs, [0, 1]).splitlines()
    assert lines[2] == ("| accuracy | 0.100 ± 0.000 | +0.100 / +0.100 | 0.100 ± 0.050 | "
                        "+0.050 / +0.150 |")
    assert lines[-1] == "| public-NLL | 0.000 ± 0.000 | +0.000 / — | 0.000 ± 0.000 | +0.000 / +0.000 |"
    assert aggregate(per_seed)["prism_rlvr"]["mean"] == pytest.approx(0.45)
