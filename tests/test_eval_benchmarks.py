"""Benchmark loaders (each published format), HallusionBench metrics, errors, and `prism eval`.

Every file here is a few hand-written rows in the benchmark's published layout, with tiny PNGs
(embedded and as paths), so the expected questions, letters and image orders are exact.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from prism_megatron.cli import main
from prism_megatron.data.template import format_response
from prism_megatron.eval.benchmarks import (MMMU_PRO_VISION_PROMPT, BenchmarkError,
                                            hallusion_metrics, load_benchmark)
from prism_megatron.eval.heldout import answer_accuracy
from prism_megatron.rewards.verifiable import score_response
from prism_megatron.rollout.base import Sample

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "grey": (90, 90, 90)}


def png(colour: str = "red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), COLOURS[colour]).save(buffer, format="PNG")
    return buffer.getvalue()


def save_png(path: Path, colour: str = "red") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png(colour))
    return path


def colour_of(item, index: int) -> str:
    pixel = item.open_images()[index].getpixel((0, 0))
    return next(name for name, rgb in COLOURS.items() if rgb == pixel)


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_parquet(path: Path, rows) -> Path:
    columns = list(dict.fromkeys(key for row in rows for key in row))   # rows may differ
    pq.write_table(pa.Table.from_pylist([{k: row.get(k) for k in columns} for row in rows]), path)
    return path


# ------------------------------------------------------------------------------------- loaders

MATHVISTA = {
    "1": {"question": "Which bar is tallest?", "choices": ["3", "4", "5"], "answer": "4",
          "question_type": "multi_choice", "answer_type": "text", "image": "images/1.png",
          "query": "Hint: answer with the option letter.\nQuestion: Which bar is tallest?\n"
                   "Choices:\n(A) 3\n(B) 4\n(C) 5"},
    "2": {"question": "What is x?", "choices": None, "answer": "1.5", "question_type": "free_form",
          "answer_type": "float", "image": "images/2.png"},
    "3": {"question": "Which one?", "choices": ["cat", "dog"], "answer": "cat",
          "question_type": "multi_choice", "answer_type": "text", "image": "images/1.png"},
}


def check_mathvista(loaded):
    assert [i.id for i in loaded] == ["1", "2", "3"]
    assert [i.answer for i in loaded] == ["B", "1.5", "A"]
    assert loaded[0].question == "<image>" + MATHVISTA["1"]["query"]
    assert loaded[1].question == "<image>What is x?" and loaded[1].choices is None
    assert loaded[2].question == "<image>Which one?\nChoices:\n(A) cat\n(B) dog"
    assert loaded[2].choices == ["cat", "dog"]
    assert [len(i.images) for i in loaded] == [1, 1, 1]
    assert [colour_of(i, 0) for i in loaded] == ["red", "green", "red"]


def test_mathvista_json_dict_with_image_paths(tmp_path):
    save_png(tmp_path / "images/1.png", "red"), save_png(tmp_path / "images/2.png", "green")
    check_mathvista(load_benchmark("mathvista", write_json(tmp_path / "testmini.json", MATHVISTA)))


def test_mathvista_parquet_with_embedded_images(tmp_path):
    colours = {"1": "red", "2": "green", "3": "red"}
    rows = [{"pid": pid, **{k: v for k, v in row.items() if k != "image"},
             "image": f"images/{pid}.png",   # not on disk: decoded_image has the bytes
             "decoded_image": {"bytes": png(colours[pid]), "path": f"{pid}.png"}}
            for pid, row in MATHVISTA.items()]
    loaded = load_benchmark("mathvista", write_parquet(tmp_path / "testmini.parquet", rows))
    check_mathvista(loaded)
    assert all(isinstance(i.images[0], bytes) for i in loaded)


def test_mathverse_json_list(tmp_path):
    save_png(tmp_path / "images_version_1-4/image_1.png")
    rows = [{"sample_index": "1", "problem_version": "Text Dominant",
             "question_type": "multi-choice",
             "question": "Q1\nChoices:\nA:1\nB:2", "image": "images_version_1-4/image_1.png",
             "answer": "B", "query_wo": "Directly answer. Q1", "query_cot": "Reason first. Q1"},
            {"sample_index": "2", "problem_version": "Vision Only", "question_type": "free-form",
             "question": "", "image": "images_version_1-4/image_1.png", "answer": "5",
             "query_wo": "According to the question shown in the image, answer.",
             "query_cot": ""}]
    loaded = load_benchmark("mathverse", write_json(tmp_path / "testmini.json", rows))
    assert [i.question for i in loaded] == [
        "<image>Reason first. Q1", "<image>According to the question shown in the image, answer."]
    assert [i.answer for i in loaded] == ["B", "5"]
    assert loaded[1].meta["problem_version"] == "Vision Only"


def test_mathvision_jsonl_path_and_base64(tmp_path):
    save_png(tmp_path / "images/1.jpg", "blue")
    data_uri = "data:image/png;base64," + base64.b64encode(png("green")).decode()
    rows = [{"id": "1", "question": "Which shape?\n<image1>", "options": ["1", "2", "3", "4", "5"],
             "image": "images/1.jpg", "answer": "C", "level": 2, "subject": "metric geometry"},
            {"id": "2", "question": "How many dots?", "options": [], "image": data_uri,
             "answer": "7", "level": 1, "subject": "counting"}]
    loaded = load_benchmark("mathvision", write_jsonl(tmp_path / "testmini.jsonl", rows))
    assert loaded[0].question == ("Which shape?\n<image>\nChoices:\n(A) 1\n(B) 2\n(C) 3\n(D) 4\n"
                                  "(E) 5")
    assert loaded[1].question == "<image>How many dots?" and loaded[1].choices is None
    assert [i.answer for i in loaded] == ["C", "7"]
    assert [colour_of(i, 0) for i in loaded] == ["blue", "green"]
    assert loaded[0].meta == {"level": 2, "subject": "metric geometry"}


def test_wemath_json_with_images_folder(tmp_path):
    save_png(tmp_path / "images/3steps_1.png")
    rows = [{"ID": "3steps_1", "question": "What is the area?", "option": "A. 1; B. 2; C. 3",
             "answer": "C", "image_path": "3steps_1.png", "key": "3steps"}]
    (item,) = load_benchmark("wemath", write_json(tmp_path / "testmini.json", rows))
    assert item.question == "<image>What is the area?\nOptions: A. 1; B. 2; C. 3"
    assert item.choices == ["A. 1", "B. 2", "C. 3"] and item.answer == "C"
    assert item.meta["key"] == "3steps" and item.id == "3steps_1"


def mmmu_rows(image):
    return [
        {"id": "validation_Art_1", "question": "Look at <image 1> and <image 2>. Which?",
         "options": "['x', '<image 3>', 'z']", "answer": "B", "question_type": "multiple-choice",
         "image_1": image("red", 1), "image_2": image("green", 2), "image_3": image("blue", 3),
         "image_4": None, "image_5": None, "image_6": None, "image_7": None},
        {"id": "validation_Art_2", "question": "<image 1> How many hours?", "options": "[]",
         "answer": "['24/7', '3.429']", "question_type": "open",
         "image_1": image("grey", 4), "image_2": None, "image_3": None, "image_4": None,
         "image_5": None, "image_6": None, "image_7": None},
    ]


def check_mmmu(loaded):
    first, second = loaded
    assert first.question == ("Look at <image> and <image>. Which?\nChoices:\n(A) x\n"
                              "(B) <image>\n(C) z")
    assert [colour_of(first, k) for k in range(3)] == ["red", "green", "blue"]
    assert first.answer == "B" and first.choices == ["x", "<image 3>", "z"]
    assert second.question == "<image> How many hours?" and len(second.images) == 1
    assert second.answer == "24/7" and second.meta["accepted_answers"] == ["24/7", "3.429"]


def test_mmmu_parquet_embedded(tmp_path):
    rows = mmmu_rows(lambda colour, k: {"bytes": png(colour), "path": f"{k}.png"})
    check_mmmu(load_benchmark("mmmu", write_parquet(tmp_path / "validation.parquet", rows)))


def test_mmmu_jsonl_paths(tmp_path):
    rows = mmmu_rows(lambda colour, k: str(save_png(tmp_path / f"img/{k}.png", colour)
                                           .relative_to(tmp_path)))
    check_mmmu(load_benchmark("mmmu", write_jsonl(tmp_path / "validation.jsonl", rows)))


def test_mmmu_pro_standard_and_vision(tmp_path):
    rows = [{"id": "s1", "question": "<image 1> Pick one.", "options": "['a', 'b', 'c', 'd']",
             "answer": "D", "image_1": {"bytes": png(), "path": None}, "subject": "Art"},
            {"id": "v1", "image": {"bytes": png("green"), "path": None},
             "options": "['a', 'b', 'c']", "answer": "A", "subject": "Art"}]
    standard, vision = load_benchmark("mmmu_pro", write_parquet(tmp_path / "pro.parquet", rows))
    assert standard.question == "<image> Pick one.\nChoices:\n(A) a\n(B) b\n(C) c\n(D) d"
    assert standard.answer == "D"
    assert vision.question == "<image>" + MMMU_PRO_VISION_PROMPT and vision.answer == "A"
    assert vision.choices == ["a", "b", "c"] and colour_of(vision, 0) == "green"


# (category, subcategory, set, figure, question, visual_input, gt)
HALLUSION = [("VD", "illusion", "0", "0", "0", "1", "1"),
             ("VD", "illusion", "0", "0", "1", "1", "0"),
             ("VD", "illusion", "0", "1", "0", "1", "0"),
             ("VD", "illusion", "0", "1", "1", "1", "1"),
             ("VS", "chart", "1", "0", "0", "0", "1"),
             ("VS", "chart", "1", "1", "0", "1", "0"),
             ("VS", "chart", "1", "1", "1", "1", "1")]


def hallusion_file(tmp_path) -> Path:
    rows = []
    for category, sub, set_id, figure, question, visual, gold in HALLUSION:
        filename = None
        if visual != "0":
            name = f"hallusion_bench/{category}/{sub}/{set_id}_{figure}.png"
            save_png(tmp_path / name)
            filename = "./" + name
        rows.append({"category": category, "subcategory": sub, "visual_input": visual,
                     "set_id": set_id, "figure_id": figure, "sample_note": "",
                     "question_id": question, "question": f"Is claim {question} true?",
                     "gt_answer_details": "", "gt_answer": gold, "filename": filename})
    return write_json(tmp_path / "HallusionBench.json", rows)


def test_hallusionbench_json(tmp_path):
    loaded = load_benchmark("hallusionbench", hallusion_file(tmp_path))
    assert [i.answer for i in loaded] == ["Yes", "No", "No", "Yes", "Yes", "No", "Yes"]
    assert [len(i.images) for i in loaded] == [1, 1, 1, 1, 0, 1, 1]
    assert loaded[4].question == "Is claim 0 true?"
    assert loaded[0].question == "<image>Is claim 0 true?" and loaded[0].id == "VD_illusion_0_0_0"


def test_hallusion_metrics_by_hand(tmp_path):
    items = load_benchmark("hallusionbench", hallusion_file(tmp_path)).items
    correct = [1, 1, 0, 1, 1, 1, 0]
    # qAcc groups (cat, sub, set, question): VD q0 [1,0] no, VD q1 [1,1] yes, VS q0 [1,1] yes,
    # VS q1 [0] no -> 2/4. fAcc (figures; VS figure 0 has none): VD f0 [1,1] yes, VD f1 [0,1] no,
    # VS f1 [1,0] no -> 1/3.
    assert hallusion_metrics(items, correct) == pytest.approx(
        {"aAcc": 5 / 7, "qAcc": 0.5, "fAcc": 1 / 3})
    assert hallusion_metrics(items, [1] * 7) == {"aAcc": 1.0, "qAcc": 1.0, "fAcc": 1.0}


# -------------------------------------------------------------------------------- bad inputs


def test_unknown_name_missing_and_unreadable_files(tmp_path):
    with pytest.raises(BenchmarkError, match="unknown benchmark 'mathvistaa'.*mathvista"):
        load_benchmark("mathvistaa", tmp_path / "x.json")
    with pytest.raises(BenchmarkError, match="does not exist"):
        load_benchmark("mmmu", tmp_path / "missing.parquet")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(BenchmarkError, match="cannot read .*broken.json"):
        load_benchmark("wemath", tmp_path / "broken.json")
    (tmp_path / "rows.csv").write_text("a,b\n")
    with pytest.raises(BenchmarkError, match="unsupported file type"):
        load_benchmark("wemath", tmp_path / "rows.csv")


def test_bad_rows_are_counted_then_fatal(tmp_path):
    save_png(tmp_path / "ok.png")
    good = {"id": "g", "question": "Q", "options": ["1", "2"], "image": "ok.png", "answer": "B"}
    rows = [good, {**good, "image": "gone.png"}, {**good, "answer": "F"}, good, good, good]
    path = write_jsonl(tmp_path / "mv.jsonl", rows)
    with path.open("a") as f:
        f.write("{truncated\n")
    with pytest.raises(BenchmarkError, match=r"3 of 7 rows .*mv.jsonl .*row 2: missing_image.*"
                                             r"row 3: answer_not_in_choices.*row 7: bad_json"):
        load_benchmark("mathvision", path)
    loaded = load_benchmark("mathvision", path, max_bad_fraction=0.5)
    assert len(loaded) == 4 and loaded.seen == 7 and [r for r, _ in loaded.skipped] == [2, 3, 7]
    assert len(load_benchmark("mathvision", path, limit=1, max_bad_fraction=0.0)) == 1


# ------------------------------------------------------------------------------ `prism eval`


def eval_args(tmp_path, model_dir, *extra):
    return ["eval", f"model.hf_dir={model_dir}", f"logging.run_dir={tmp_path / 'run'}",
            "eval.max_new_tokens=4", "eval.batch_size=2", *extra]


def test_prism_eval_local_engine_numbers_match_its_samples(tmp_path, tiny_model_dir,
                                                          synthetic_data_dir):
    """The real CPU engine on the tiny model: a held-out file and two benchmark files."""
    rows = [{"pid": str(k), **row, "image": None,
             "decoded_image": {"bytes": png("red"), "path": None}}
            for k, row in MATHVISTA.items()]
    mathvista = write_parquet(tmp_path / "mathvista.parquet", rows)
    code = main(eval_args(tmp_path, tiny_model_dir, "eval.limit=2",
                          f"data.eval_files=[{synthetic_data_dir / 'test.jsonl'}]",
                          f"eval.benchmarks.mathvista={mathvista}",
                          f"eval.benchmarks.hallusionbench={hallusion_file(tmp_path)}"))
    assert code == 0
    run = tmp_path / "run"
    report = json.loads((run / "eval_results.json").read_text())
    samples = [json.loads(line) for line in (run / "eval_samples.jsonl").read_text().splitlines()]
    assert list(report["sets"]) == ["test", "mathvista", "hallusionbench"]
    for name, result in report["sets"].items():
        mine = [s for s in samples if s["set"] == name]
        scores = [score_response(s["text"], s["answer"]) for s in mine]
        assert result["prompts"] == result["samples"] == len(mine) == 2
        assert result["accuracy"] == sum(r.accuracy for r in scores) / 2
        assert result["format_rate"] == sum(r.format_ok for r in scores) / 2
        assert result["answer_accuracy"] == sum(answer_accuracy(s["text"], s["answer"])
                                                for s in mine) / 2
        assert 0 < result["mean_response_tokens"] <= 4
    assert [s["answer"] for s in samples if s["set"] == "mathvista"] == ["B", "1.5"]
    assert set(report["sets"]["hallusionbench"]["extra"]) == {"aAcc", "qAcc", "fAcc"}
    table = (run / "eval_results.md").read_text()
    assert table.startswith("| set | prompts | accuracy | answer accuracy | format rate |")
    assert "| mathvista | 2 |" in table


class ScriptedEngine:
    """Answers HallusionBench: sample 0 in the PRISM format (right or wrong per ``right``),
    sample 1 the bare gold word (right answer, no format)."""

    def __init__(self, golds, right):
        self.golds, self.right, self.next = golds, right, 0

    def generate(self, prompts, params, n=1):
        groups = []
        for _ in prompts:
            gold, ok = self.golds[self.next], self.right[self.next]
            said = gold if ok else {"Yes": "No", "No": "Yes"}[gold]
            groups.append([Sample([1, 2, 3], [0.0] * 3, format_response("img", "r", said), "stop"),
                           Sample([1], [0.0], gold, "stop")][:n])
            self.next += 1
        return groups

    def shutdown(self):
        pass


def test_prism_eval_pass_at_n_and_hallusion_metrics(tmp_path, tiny_model_dir, monkeypatch):
    golds = ["Yes", "No", "No", "Yes", "Yes", "No", "Yes"]
    engine = ScriptedEngine(golds, [1, 1, 0, 1, 1, 1, 0])
    monkeypatch.setattr("prism_megatron.eval.cli.make_engine", lambda *a, **k: engine)
    code = main(eval_args(tmp_path, tiny_model_dir, "eval.n=2", "eval.temperature=1.0",
                          f"eval.benchmarks.hallusionbench={hallusion_file(tmp_path)}"))
    assert code == 0
    result = json.loads((tmp_path / "run/eval_results.json").read_text())["sets"]["hallusionbench"]
    assert result["prompts"] == 7 and result["samples"] == 14
    assert result["accuracy"] == pytest.approx(5 / 14)           # only formatted samples count
    assert result["answer_accuracy"] == pytest.approx(12 / 14)   # 5 formatted + 7 bare golds
    assert result["format_rate"] == 0.5 and result["pass_at_n"] == pytest.approx(5 / 7)
    assert result["mean_response_tokens"] == 2.0
    # judged on answers: sample 0 gives the hand-computed values above, sample 1 is all right
    assert result["extra"] == pytest.approx({"aAcc": (5 / 7 + 1) / 2, "qAcc": 0.75,
                                             "fAcc": (1 / 3 + 1) / 2})


def test_prism_eval_user_errors(tmp_path, tiny_model_dir, capsys):
    assert main(eval_args(tmp_path, tmp_path / "nope")) == 2
    assert "model.hf_dir" in capsys.readouterr().err
    assert main(eval_args(tmp_path, tiny_model_dir)) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
    assert main(eval_args(tmp_path, tiny_model_dir, "eval.benchmarks.mathvistaa=x.json")) == 2
    assert "unknown benchmark 'mathvistaa'" in capsys.readouterr().err
    assert main(eval_args(tmp_path, tiny_model_dir, "eval.n=4",
                          f"eval.benchmarks.mmmu={tmp_path}")) == 2
    assert "eval.temperature > 0" in capsys.readouterr().err
    assert main(eval_args(tmp_path, tiny_model_dir, "eval.benchmarks.mmmu=gone.parquet")) == 2
    assert "gone.parquet does not exist" in capsys.readouterr().err
