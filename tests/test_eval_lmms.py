"""``prism eval`` with ``eval.harness: lmms-eval`` against the CPU server, end to end.

Tiny local copies (a few rows each, with images) of MathVista, WeMath, MMMU and HallusionBench
in the layouts their lmms-eval tasks load (``save_to_disk`` and parquet directories); the policy
behind ``/v1/chat/completions`` is the tiny model's CPU server with a scripted ``run`` (a fixed
answer per question, found by a marker in the rendered prompt), and the judge is a second such
server. The expected scores are worked out by hand below from those answers with each
benchmark's published rules.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from prism_megatron.config import load_config
from prism_megatron.rollout.base import Sample
from prism_megatron.rollout.local import LocalEngine
from prism_megatron.rollout.serve import make_server

LMMS_PYTHON = str(Path(__file__).resolve().parents[1] / ".venv-eval" / "bin" / "python")


def _lmms_python() -> str:
    import os

    for python in (os.environ.get("PRISM_LMMS_PYTHON"), sys.executable, LMMS_PYTHON):
        if python and Path(python).exists() and subprocess.run(
                [python, "-c", "import lmms_eval"], capture_output=True).returncode == 0:
            return python
    pytest.skip("lmms-eval is not installed (pip install -r requirements-eval.txt)")


class ScriptedEngine(LocalEngine):
    """The CPU engine with canned generations: the answer of the first marker in the prompt."""

    def __init__(self, hf_dir, answers: dict[str, str]):
        super().__init__(hf_dir)
        self.answers = answers
        self.context_length = 1 << 20     # judge prompts are long; nothing is decoded
        self.prompts: list[str] = []

    def run(self, requests):
        out = []
        for r in requests:
            text = self.tokenizer.decode(r.prompt.input_ids)
            self.prompts.append(text)
            hits = [m for m in self.answers if m in text]
            answer = self.answers[hits[0]] if hits else "unscripted"
            ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"]
            out.append([Sample(ids, [0.0] * len(ids), answer, "stop", len(r.prompt.input_ids))
                        for _ in r.seeds])
        return out


def _serve(engine):
    httpd, worker = make_server(engine, "127.0.0.1", 0)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    return httpd, worker, f"http://127.0.0.1:{httpd.server_address[1]}"


def _image(color):
    from PIL import Image

    return Image.new("RGB", (56, 56), color)


def _mathvista(root: Path) -> Path:
    import datasets

    meta = {"split": "testmini", "language": "english", "source": "tiny", "category": "math",
            "task": "figure question answering", "context": "synthetic", "grade": "high school",
            "skills": ["arithmetic reasoning"]}
    rows = [
        dict(pid="1", question="Q-mv-1 How many squares?", choices=None, answer="3",
             question_type="free_form", answer_type="integer"),
        dict(pid="2", question="Q-mv-2 Which animal is shown?", choices=["A cat", "A dog"],
             answer="A dog", question_type="multi_choice", answer_type="text"),
        dict(pid="3", question="Q-mv-3 How many circles?", choices=None, answer="7",
             question_type="free_form", answer_type="integer"),
    ]
    for r, color in zip(rows, ("red", "green", "blue")):
        r.update(image=f"images/{r['pid']}.png", decoded_image=_image(color), unit="",
                 precision=0.0, metadata=meta, query=r["question"], caption="", ocr="")
    features = datasets.Features({
        "pid": datasets.Value("string"), "question": datasets.Value("string"),
        "choices": datasets.Sequence(datasets.Value("string")), "answer": datasets.Value("string"),
        "question_type": datasets.Value("string"), "answer_type": datasets.Value("string"),
        "image": datasets.Value("string"), "decoded_image": datasets.Image(),
        "unit": datasets.Value("string"), "precision": datasets.Value("float64"),
        "metadata": {k: (datasets.Sequence(datasets.Value("string")) if k == "skills"
                         else datasets.Value("string")) for k in meta},
        "query": datasets.Value("string"), "caption": datasets.Value("string"),
        "ocr": datasets.Value("string")})
    out = root / "mathvista"
    datasets.DatasetDict({"testmini": datasets.Dataset.from_list(rows, features=features)}
                         ).save_to_disk(str(out))
    return out


def _wemath(root: Path) -> Path:
    import datasets

    rows = [dict(ID="1", key="2steps_1", question="Q-wm-1 first step?", answer="A"),
            dict(ID="1", key="2steps_2", question="Q-wm-2 second step?", answer="B"),
            dict(ID="1", key="2steps_multi", question="Q-wm-3 whole problem?", answer="C")]
    for i, r in enumerate(rows):
        r.update({"split": "testmini", "knowledge concept": "area", "option": "A. 1; B. 2; C. 3",
                  "question number": i + 1, "knowledge concept description": "area of shapes",
                  "image_path": _image("white")})
    out = root / "wemath"
    out.mkdir()
    # the parquet layout of the hub copy: one file per split
    datasets.Dataset.from_list(rows).cast_column("image_path", datasets.Image()).to_parquet(
        str(out / "testmini-00000-of-00001.parquet"))
    return out


def _mmmu(root: Path) -> Path:
    import datasets

    rows = [dict(id="validation_Art_1", question="Q-mm-1 <image 1> Which style?", answer="B"),
            dict(id="validation_Art_2", question="Q-mm-2 <image 1> Which color?", answer="A"),
            dict(id="validation_Math_1", question="Q-mm-3 <image 1> Which shape?", answer="C")]
    for r in rows:
        r.update(options="['one', 'two', 'three', 'four']", question_type="multiple-choice",
                 image_1=_image("yellow"), **{f"image_{k}": None for k in range(2, 8)},
                 explanation="", img_type="['Diagrams']", topic_difficulty="Easy",
                 subfield="tiny")
    features = datasets.Features({
        **{k: datasets.Value("string") for k in ("id", "question", "answer", "options",
                                                  "question_type", "explanation", "img_type",
                                                  "topic_difficulty", "subfield")},
        **{f"image_{k}": datasets.Image() for k in range(1, 8)}})
    out = root / "mmmu"
    datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows, features=features)}
                         ).save_to_disk(str(out))
    return out


def _hallusion(root: Path) -> Path:
    import datasets

    rows = [dict(category="VD", subcategory="illusion", set_id="0", figure_id="0",
                 question_id="0", question="Q-hb-1 Is the left line longer?", gt_answer="1",
                 gt_answer_details="The left line is longer.", visual_input="1"),
            dict(category="VD", subcategory="illusion", set_id="0", figure_id="1",
                 question_id="0", question="Q-hb-2 Is the left line longer?", gt_answer="1",
                 gt_answer_details="The left line is longer.", visual_input="2"),
            dict(category="VS", subcategory="chart", set_id="1", figure_id="0",
                 question_id="0", question="Q-hb-3 Is the bar red?", gt_answer="1",
                 gt_answer_details="The bar is red.", visual_input="0")]
    for r in rows:
        r.update(image=_image("black"), filename="x.png")
    out = root / "hallusion"
    datasets.DatasetDict({"image": datasets.Dataset.from_list(rows).cast_column(
        "image", datasets.Image())}).save_to_disk(str(out))
    return out


# The policy's answers. MathVista: "3" and "A dog" match by rule; "The answer is 5" needs the
# judge's extraction ("5", wrong) -> 2/3 = 66.67. WeMath: steps 1 right, 2 wrong, multi right
# -> one 2-step problem that is rote memorisation under strict, complete mastery under loose:
# loose (525 - 0) / 525 = 100.00%, strict (525 - 1) / 525 = 99.81%; acc 2/3. MMMU: Art 1 right,
# Art 2 wrong, Math 1 right -> 2/3. HallusionBench (judge verdicts): 1 correct, 2 incorrect,
# 3 correct -> aAcc 2/3, qAcc (pairs VD_illusion_0_0 wrong, VS_chart_1_0 right) 1/2, fAcc
# (figures VD_illusion_0_0 right, VD_illusion_0_1 wrong; VS figure 0 skipped) 1/2.
POLICY = {"Q-mv-1": "3", "Q-mv-2": "A dog", "Q-mv-3": "The answer is 5",
          "Q-wm-1": "<think>a</think><answer>A</answer>",
          "Q-wm-2": "<think>b</think><answer>C</answer>",
          "Q-wm-3": "<think>c</think><answer>C</answer>",
          "Q-mm-1": "B", "Q-mm-2": "C", "Q-mm-3": "C",
          "Q-hb-1": "Yes, it is.", "Q-hb-2": "No.", "Q-hb-3": "Yes."}
# The judge's answers, keyed by what its prompts quote.
JUDGE = {"Question:Q-hb-1": "correct", "Question:Q-hb-2": "incorrect",
         "Question:Q-hb-3": "correct", "Q-mv-3": "5"}
EXPECTED = {
    "mathvista": {"llm_as_judge_eval": 66.67},
    "wemath": {"wemath_loose": 100.0, "wemath_strict": 99.81, "acc_score": 200 / 3,
               "format_score": 100.0},
    "mmmu": {"mmmu_acc": 66.667},
    "hallusionbench": {"aAcc": 200 / 3, "qAcc": 50.0, "fAcc": 50.0},
}


@pytest.mark.slow
def test_lmms_eval_harness_scores(tiny_model_dir, tmp_path, monkeypatch):
    python = _lmms_python()
    # as after an in-process init_distributed (or under torchrun): the harness must not join it
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(key, value)
    data = {"mathvista_testmini_format": _mathvista(tmp_path),
            "wemath_testmini_reasoning": _wemath(tmp_path),
            "mmmu_val": _mmmu(tmp_path), "hallusion_bench_image": _hallusion(tmp_path)}
    policy = ScriptedEngine(tiny_model_dir, POLICY)
    judge = ScriptedEngine(tiny_model_dir, JUDGE)
    servers = [_serve(policy), _serve(judge)]
    try:
        overrides = [f"model.hf_dir={tiny_model_dir}", f"logging.run_dir={tmp_path / 'run'}",
                     "eval.harness=lmms-eval", f"eval.lmms_python={python}",
                     f"eval.server_url={servers[0][2]}/v1", f"eval.judge_url={servers[1][2]}/v1",
                     "eval.concurrency=2",
                     "eval.tasks.mathvista.lmms_tasks=[mathvista_testmini_format]",
                     "eval.tasks.mathvista.temperature=1.0", "eval.tasks.mathvista.top_p=0.7",
                     "eval.tasks.mathvista.max_new_tokens=16",
                     "eval.tasks.wemath.max_new_tokens=16",
                     "eval.tasks.wemath.system_prompt=true",
                     "eval.tasks.mmmu.system_prompt=false",
                     "eval.tasks.hallusionbench.max_new_tokens=8"]
        overrides += [f"eval.datasets.{k}={v}" for k, v in data.items()]
        from prism_megatron.eval.cli import run

        report = run(load_config(None, overrides))
    finally:
        for httpd, worker, _ in servers:
            httpd.shutdown()
            worker.stop(1)
    row = report["checkpoints"][str(tiny_model_dir)]
    for name, expected in EXPECTED.items():
        got = row["benchmarks"][name]["metrics"]
        for metric, value in expected.items():
            assert got[metric] == pytest.approx(value, abs=1e-3), (name, metric, got)
    assert row["average"] == pytest.approx((66.67 + 99.81 + 66.667 + 200 / 3) / 4, abs=1e-3)
    # every policy prompt carried the response-format system prompt except MMMU's (off) and
    # WeMath's (it brings its own system message, which wins)
    from prism_megatron.rewards.response import SYSTEM_PROMPT

    for marker in POLICY:
        prompt = next(p for p in policy.prompts if marker in p)
        assert (SYSTEM_PROMPT in prompt) == marker.startswith(("Q-mv", "Q-hb")), marker
    # the judge saw exactly the 3 HallusionBench verdicts and MathVista's one extraction
    assert sum("Question:Q-hb-" in p for p in judge.prompts) == 3
    assert sum("Q-mv-3" in p for p in judge.prompts) == 1
    run_dir = tmp_path / "run"
    saved = json.loads((run_dir / "eval_results.json").read_text())
    assert saved["checkpoints"][str(tiny_model_dir)]["average"] == row["average"]
    table = (run_dir / "eval_results.md").read_text().splitlines()
    assert table[0] == "| checkpoint | mathvista | wemath | mmmu | hallusionbench | average |"
    assert table[2] == (f"| {tiny_model_dir} | 66.67 | 99.81 | 66.67 | 66.67 | "
                        f"{row['average']:.2f} |")
    samples = [json.loads(x) for x in (run_dir / "eval_samples.jsonl").read_text().splitlines()]
    assert len(samples) == 12
