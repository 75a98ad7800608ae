"""`prism eval` on held-out files (the builtin harness): the numbers in its report equal what
the scorer gives on the samples it wrote, pass@n, and its one-line user errors. The paper's
benchmarks run through lmms-eval (tests/test_eval_lmms.py)."""

from __future__ import annotations

import json

import pytest

from prism_megatron.cli import main
from prism_megatron.eval.heldout import answer_accuracy
from prism_megatron.rewards.response import format_response
from prism_megatron.rewards.verifiable import score_response
from prism_megatron.rollout.base import Sample


def heldout_file(tmp_path, golds):
    """A sharegpt JSONL held-out file, one text question per gold answer."""
    path = tmp_path / "yesno.jsonl"
    with open(path, "w") as f:
        for k, gold in enumerate(golds):
            f.write(json.dumps({"id": f"q{k}", "answer": gold, "messages": [
                {"role": "user", "content": f"Is statement {k} true? Answer Yes or No."}]}) + "\n")
    return path


def eval_args(tmp_path, model_dir, *extra):
    return ["eval", f"model.hf_dir={model_dir}", f"logging.run_dir={tmp_path / 'run'}",
            "eval.max_new_tokens=4", "eval.batch_size=2", *extra]


def test_prism_eval_local_engine_numbers_match_its_samples(tmp_path, tiny_model_dir,
                                                          synthetic_data_dir):
    """The real CPU engine on the tiny model: two held-out files (with images, and text)."""
    yesno = heldout_file(tmp_path, ["Yes", "No"])
    code = main(eval_args(tmp_path, tiny_model_dir, "eval.limit=2",
                          f"data.eval_files=[{synthetic_data_dir / 'test.jsonl'},{yesno}]"))
    assert code == 0
    run = tmp_path / "run"
    report = json.loads((run / "eval_results.json").read_text())
    samples = [json.loads(line) for line in (run / "eval_samples.jsonl").read_text().splitlines()]
    assert list(report["sets"]) == ["test", "yesno"]
    for name, result in report["sets"].items():
        mine = [s for s in samples if s["set"] == name]
        scores = [score_response(s["text"], s["answer"]) for s in mine]
        assert result["prompts"] == result["samples"] == len(mine) == 2
        assert result["accuracy"] == sum(r.accuracy for r in scores) / 2
        assert result["format_rate"] == sum(r.format_ok for r in scores) / 2
        assert result["answer_accuracy"] == sum(answer_accuracy(s["text"], s["answer"])
                                                for s in mine) / 2
        assert 0 < result["mean_response_tokens"] <= 4
    assert [s["answer"] for s in samples if s["set"] == "yesno"] == ["Yes", "No"]
    assert "eval/test/perception_coverage" in report["sets"]["test"]["fidelity"]
    assert report["sets"]["yesno"]["fidelity"] == {}        # no synthetic meta: no fidelity
    table = (run / "eval_results.md").read_text()
    assert table.startswith("| set | prompts | accuracy | answer accuracy | format rate |")
    assert "| yesno | 2 |" in table


class ScriptedEngine:
    """Answers yes/no questions: sample 0 in the PRISM format (right or wrong per ``right``),
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


def test_prism_eval_pass_at_n_and_answer_accuracy(tmp_path, tiny_model_dir, monkeypatch):
    golds = ["Yes", "No", "No", "Yes", "Yes", "No", "Yes"]
    engine = ScriptedEngine(golds, [1, 1, 0, 1, 1, 1, 0])
    monkeypatch.setattr("prism_megatron.eval.cli.make_engine", lambda *a, **k: engine)
    code = main(eval_args(tmp_path, tiny_model_dir, "eval.n=2", "eval.temperature=1.0",
                          f"data.eval_files=[{heldout_file(tmp_path, golds)}]"))
    assert code == 0
    result = json.loads((tmp_path / "run/eval_results.json").read_text())["sets"]["yesno"]
    assert result["prompts"] == 7 and result["samples"] == 14
    assert result["accuracy"] == pytest.approx(5 / 14)           # only formatted samples count
    assert result["answer_accuracy"] == pytest.approx(12 / 14)   # 5 formatted + 7 bare golds
    assert result["format_rate"] == 0.5 and result["pass_at_n"] == pytest.approx(5 / 7)
    assert result["mean_response_tokens"] == 2.0


def test_prism_eval_user_errors(tmp_path, tiny_model_dir, capsys):
    assert main(eval_args(tmp_path, tmp_path / "nope")) == 2
    assert "model.hf_dir" in capsys.readouterr().err
    assert main(eval_args(tmp_path, tiny_model_dir)) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
    assert main(eval_args(tmp_path, tiny_model_dir, "eval.n=4",
                          f"data.eval_files=[{heldout_file(tmp_path, ['Yes'])}]")) == 2
    assert "eval.temperature > 0" in capsys.readouterr().err
    assert main(eval_args(tmp_path, tiny_model_dir, "data.eval_files=[gone.jsonl]")) == 2
    assert "gone.jsonl" in capsys.readouterr().err
