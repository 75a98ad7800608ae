"""The synthetic colour-grid task: deterministic, verifiable, correctly formatted, disjoint splits.

Answers are recomputed here from each row's stored grid with an independent solver (not the
generator's), and the stored grid is checked against the PNG pixels, so a row can only pass if the
image, the question, the answer and the demo all agree.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from prism_megatron.data import synthetic
from prism_megatron.rewards.response import FORMAT_PATTERN, SYSTEM_PROMPT

# The format regex exactly as the brief / spec §2.2 states it.
SPEC_FORMAT = re.compile(r"^\s*<caption>.*?</caption>\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$", re.DOTALL)
ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
RGB = {"red": (220, 40, 40), "green": (40, 170, 70), "blue": (40, 80, 220),
       "yellow": (240, 210, 40), "blank": (255, 255, 255)}
SIZES = {"sft_public": 300, "sft_teacher": 60, "align": 30, "rl": 40, "test": 40}


def load_split(root: Path, split: str) -> list[dict]:
    with open(root / f"{split}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def recompute(meta: dict) -> str:
    """Independent solver: the answer from the stored grid and question parameters."""
    n = Counter(cell for row in meta["grid"] for cell in row)
    q = meta["question"]
    kind, cols, options = q["kind"], q["colours"], q["options"]
    if kind == "sum":
        return str(n[cols[0]] + n[cols[1]])
    if kind == "diff":
        return str(n[cols[0]] - n[cols[1]])
    if kind == "times":
        return str(n[cols[0]] * q["k"])
    if kind == "coloured":
        return str(sum(v for c, v in n.items() if c != "blank"))
    if kind == "compare":
        a, b = cols
        pick = "equal" if n[a] == n[b] else (a if n[a] > n[b] else b)
    elif kind == "parity":
        pick = "even" if n[cols[0]] % 2 == 0 else "odd"
    elif kind == "most":
        best = max(n[c] for c in options)
        winners = [c for c in options if n[c] == best]
        assert len(winners) == 1, "an arg-max question needs a unique winner"
        pick = winners[0]
    else:
        raise AssertionError(f"unknown kind {kind}")
    return "ABCD"[options.index(pick)]


@pytest.fixture(scope="module")
def data(make_synthetic_data) -> tuple[Path, dict[str, list[dict]]]:
    root = make_synthetic_data(0, **SIZES)
    return root, {split: load_split(root, split) for split in synthetic.SPLITS}


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic_for_a_seed(tmp_path):
    sizes = {"sft_public": 40, "sft_teacher": 10, "align": 10, "rl": 10, "test": 10}
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out, seed in ((a, 7), (b, 7), (c, 8)):
        synthetic.write_dataset(out, seed, sizes, log=lambda *_: None)
    assert tree_digest(a) == tree_digest(b)
    assert (a / "test.jsonl").read_bytes() != (c / "test.jsonl").read_bytes()


def test_test_split_independent_of_training_sizes():
    small = synthetic.generate_rows(3, {"sft_public": 5, "rl": 5})
    large = synthetic.generate_rows(3, {"sft_public": 50, "rl": 50})
    assert small["test"] == large["test"]


def test_manifest_and_files(data):
    root, rows = data
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["seed"] == 0
    assert manifest["counts"] == {split: len(rows[split]) for split in synthetic.SPLITS} == SIZES
    assert manifest["system_prompt"] == SYSTEM_PROMPT


def test_rows_have_prompt_image_and_answer(data):
    root, rows = data
    sizes_seen = set()
    for split, split_rows in rows.items():
        for row in split_rows:
            msgs = row["messages"]
            assert msgs[0] == {"role": "system", "content": SYSTEM_PROMPT}
            assert msgs[1]["role"] == "user" and msgs[1]["content"].startswith("<image>")
            assert msgs[1]["content"].count("<image>") == len(row["images"]) == 1
            roles = [m["role"] for m in msgs]
            expected = ["system", "user", "assistant"] if split.startswith("sft") else ["system", "user"]
            assert roles == expected, (split, roles)
            assert isinstance(row["answer"], str) and row["answer"]
            image = root / row["images"][0]
            assert image.is_file() and not Path(row["images"][0]).is_absolute()
            with Image.open(image) as img:
                sizes_seen.add(img.size)
    assert len(sizes_seen) >= 2
    assert all(w % 32 == 0 and h % 32 == 0 for w, h in sizes_seen)


def test_answers_recomputed_from_grid_and_pixels(data):
    root, rows = data
    for split_rows in rows.values():
        for row in split_rows:
            meta = row["meta"]
            assert row["answer"] == recompute(meta), row["id"]
            question = row["messages"][1]["content"]
            for colour in meta["question"]["colours"]:
                assert colour in question
            for letter, option in zip("ABCD", meta["question"]["options"]):
                assert f"({letter}) {option}" in question
            with Image.open(root / row["images"][0]) as img:
                img = img.convert("RGB")
                for r, line in enumerate(meta["grid"]):
                    for c, colour in enumerate(line):
                        for dx, dy in ((1, 1), (16, 16), (30, 30)):   # every cell is solid
                            assert img.getpixel((32 * c + dx, 32 * r + dy)) == RGB[colour]
                assert img.size == (32 * len(meta["grid"][0]), 32 * len(meta["grid"]))


def test_response_format(data):
    _, rows = data
    for split in ("sft_public", "sft_teacher"):
        for row in rows[split]:
            text = row["messages"][-1]["content"]
            assert SPEC_FORMAT.match(text) and FORMAT_PATTERN.match(text), text
    for row in rows["align"]:
        cap, cot = row["teacher_caption"], row["teacher_cot"]
        assert re.fullmatch(r"<caption>.*</caption>", cap, re.DOTALL)
        assert re.fullmatch(r"<think>.*?</think>\s*<answer>.*?</answer>", cot, re.DOTALL)
        assert SPEC_FORMAT.match(cap + "\n" + cot)


def test_teacher_demos_dense_and_correct(data):
    _, rows = data
    for row in rows["sft_teacher"]:
        text = row["messages"][-1]["content"]
        assert ANSWER_RE.search(text).group(1) == row["answer"]
        caption = text[text.index("<caption>") + 9:text.index("</caption>")]
        assert all(line.startswith("- ") for line in caption.split("\n"))   # bullet points
        assert caption.count("\n") >= 3
        assert text.count("\n") >= 6                                        # step-by-step
    for row in rows["align"]:
        assert ANSWER_RE.search(row["teacher_cot"]).group(1) == row["answer"]


def test_public_demos_terse_and_sometimes_wrong(data):
    _, rows = data
    public = rows["sft_public"]
    wrong = sum(ANSWER_RE.search(r["messages"][-1]["content"]).group(1) != r["answer"] for r in public)
    assert 0.03 * len(public) <= wrong <= 0.2 * len(public)
    mean_len = lambda rs: sum(len(r["messages"][-1]["content"]) for r in rs) / len(rs)  # noqa: E731
    assert mean_len(public) < 0.5 * mean_len(rows["sft_teacher"])
    assert not any("- Row" in r["messages"][-1]["content"] for r in public)


def test_splits_disjoint(data):
    _, rows = data
    grid = lambda r: json.dumps(r["meta"]["grid"])  # noqa: E731
    test_grids = {grid(r) for r in rows["test"]}
    items, ids = set(), set()
    for split, split_rows in rows.items():
        for row in split_rows:
            if split != "test":
                assert grid(row) not in test_grids, row["id"]
            key = (grid(row), row["messages"][1]["content"])
            assert key not in items, row["id"]
            items.add(key)
            assert row["id"] not in ids
            ids.add(row["id"])


def test_question_and_answer_variety(data):
    _, rows = data
    everything = [r for split_rows in rows.values() for r in split_rows]
    kinds = Counter(r["meta"]["question"]["kind"] for r in everything)
    assert set(kinds) == {"sum", "diff", "times", "coloured", "compare", "parity", "most"}
    answers = Counter(r["answer"] for r in everything)
    assert any(a in answers for a in "ABCD") and any(a.lstrip("-").isdigit() for a in answers)


def load_tool(name: str):
    """Import tools/<name>.py by path (tools/ is a script folder, not a package)."""
    path = Path(__file__).resolve().parents[1] / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli(tmp_path):
    main = load_tool("make_synthetic_data").main
    out = tmp_path / "d"
    args = ["--out", str(out), "--seed", "1", "--n-sft-public", "5", "--n-sft-teacher", "3",
            "--n-align", "2", "--n-rl", "2", "--n-test", "2"]
    assert main(args) == 0
    assert json.loads((out / "manifest.json").read_text())["counts"]["sft_public"] == 5
    assert main(args) == 2                       # refuses to overwrite without --force
    assert main(args + ["--force"]) == 0
