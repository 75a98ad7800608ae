"""The paper's benchmarks (spec §7), read from local copies in their published file formats.

Users download the files themselves (Hugging Face datasets or the authors' repositories); each
loader turns one file into ``BenchmarkItem``s: the question with ``IMAGE_PLACEHOLDER`` where each
image goes, the images in that order, and the gold answer in the form the verifiable scorer
understands (multiple choice: the option letter, yes/no: "Yes"/"No"). The items then go through
the same generation and scoring loop as held-out sets (``heldout.generate_and_score``), so
``accuracy`` here means what it means in training.

Formats (name: file; fields read):

* mathvista: testmini JSON dict keyed by pid, or the HF parquet / JSONL; question, choices,
  answer (multi_choice: the option text, mapped to its letter), question_type, query (the
  published prompt, used when present), decoded_image / image.
* mathverse: testmini JSON list (or JSONL / parquet); sample_index, problem_version, question,
  query_cot / query_wo (preferred in that order), image, answer, question_type.
* mathvision: testmini JSONL / parquet; id, question (with ``<image1>``), options (may be empty:
  free-form), decoded_image / image, answer, level, subject.
* wemath: testmini JSON list; ID, question, option ("A. ...; B. ..."), answer (letter),
  image_path, key.
* mmmu: validation parquet / JSONL (one subject or all concatenated); id, question and options
  with ``<image k>`` references, options (Python-literal list string), answer,
  image_1..image_7, question_type (multiple-choice | open).
* mmmu_pro: the standard configs (id, question, options, answer, image_1..) or the vision config
  (id, image, options, answer; the question is inside the image).
* hallusionbench: HallusionBench.json list (or the image-split parquet); category, subcategory,
  set_id, figure_id, question_id, question, gt_answer ("1"/"0" -> "Yes"/"No"), filename /
  image, visual_input ("0": no image).

Images may be embedded (``{"bytes", "path"}`` structs as HF parquet stores them, raw bytes,
base64 / data URIs) or paths relative to the file's directory (or its ``images/`` folder). They
are checked when the file is loaded and decoded a batch at a time when prompts are built.

A row that cannot be used is skipped and counted; a file with more than ``max_bad_fraction`` of
such rows fails with a ``BenchmarkError`` that names the file and the first bad rows.
"""

from __future__ import annotations

import ast
import json
import logging
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from PIL import Image

from prism_megatron.data.encode import encode_prompt
from prism_megatron.data.images import ImageError, check_image, resolve_image
from prism_megatron.data.images import decode_image as decode_any
from prism_megatron.data.sharegpt import BadRow, row_messages
from prism_megatron.data.template import IMAGE_PLACEHOLDER, SYSTEM_PROMPT
from prism_megatron.errors import PrismError
from prism_megatron.rollout.base import RolloutPrompt

log = logging.getLogger("prism.eval")

LETTERS = string.ascii_uppercase
_IMAGE_REF = re.compile(r"<image\s*(\d+)>")   # MMMU "<image 1>", MathVision "<image1>"


class BenchmarkError(PrismError):
    """A benchmark name, file or too many of its rows that cannot be used."""


@dataclass
class BenchmarkItem:
    """One benchmark question, ready to be prompted like a held-out row."""

    benchmark: str
    id: str
    question: str                     # with one IMAGE_PLACEHOLDER per image, in order
    images: list[Any]                 # bytes | Path | PIL.Image, in placeholder order
    answer: str                       # gold answer as the scorer reads it
    choices: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def messages(self) -> list[dict]:
        """System prompt (the PRISM format) + the question, as typed chat content parts."""
        return row_messages({"messages": [{"role": "system", "content": SYSTEM_PROMPT},
                                          {"role": "user", "content": self.question}]})

    def open_images(self) -> list[Image.Image]:
        return [decode_image(source, self.id) for source in self.images]

    def to_prompt(self, processor) -> tuple[RolloutPrompt, str]:
        images = self.open_images()
        encoded = encode_prompt(processor, self.messages(), images)
        return RolloutPrompt.from_encoded(encoded, images), self.answer


@dataclass
class BenchmarkSet:
    """The usable items of one file, and the rows that were skipped (1-based row, reason)."""

    name: str
    path: Path
    items: list[BenchmarkItem]
    seen: int
    skipped: list[tuple[int, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return iter(self.items)

    def __getitem__(self, index):
        return self.items[index]


# --------------------------------------------------------------------------- rows and images


def read_rows(path: Path) -> list[dict | BadRow]:
    """Rows of a .json (list, or dict keyed by id as MathVista's), .jsonl or .parquet file; an
    unparsable JSONL line becomes a ``BadRow`` in its place so it is counted, not fatal."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        if suffix == ".jsonl":
            rows: list[dict | BadRow] = []
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        rows.append(BadRow("bad_json", str(exc)))
            return rows
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict):       # MathVista testmini.json: {"1": {...}, ...}
                return [{"pid": key, **row} if isinstance(row, dict) else BadRow("not_an_object")
                        for key, row in data.items()]
            if isinstance(data, list):
                return data
            raise BenchmarkError(f"{path}: expected a JSON list or object, "
                                 f"got {type(data).__name__}")
    except (OSError, ValueError) as exc:   # includes JSONDecodeError and pyarrow's ArrowInvalid
        raise BenchmarkError(f"cannot read {path}: {exc}") from None
    raise BenchmarkError(f"{path}: unsupported file type {suffix!r} (use .json, .jsonl, .parquet)")


def image_source(value: Any, base_dir: Path) -> bytes | Path | Image.Image:
    """A checked, not yet decoded image from any of the published encodings (the one decoder,
    ``data/images.py``): paths relative to the file's directory or its ``images/`` folder."""
    source = resolve_image(value, base_dirs=(base_dir, base_dir / "images"))
    check_image(source)
    return source


def decode_image(source: bytes | Path | Image.Image, owner: str = "") -> Image.Image:
    try:
        return decode_any(source, where=f"item {owner}" if owner else "")
    except ImageError as exc:
        raise BenchmarkError(f"cannot decode an image of item {owner}: {exc}") from None


# ------------------------------------------------------------------------ shared conversions


def field_of(row: dict, *names: str, required: bool = True) -> Any:
    """The first present, non-empty field among ``names`` (published formats vary by copy)."""
    for name in names:
        value = row.get(name)
        if value is not None and value != "":
            return value
    if required:
        raise BadRow("missing_field", "/".join(names))
    return None


def item_id(row: dict, *names: str) -> str:
    """The row's own id ("" when absent: the loader then uses the row number)."""
    value = field_of(row, *names, required=False)
    return "" if value is None else str(value)


def parse_options(value: Any) -> list[str]:
    """Options as a list: a list, or MMMU's Python-literal list string "['a', 'b']"."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise BadRow("bad_options", value[:60]) from None
    if not isinstance(value, (list, tuple)):
        raise BadRow("bad_options", repr(value)[:60])
    return [str(option) for option in value]


def with_choices(question: str, choices: list[str]) -> str:
    lines = "\n".join(f"({LETTERS[i]}) {choice}" for i, choice in enumerate(choices))
    return f"{question.rstrip()}\nChoices:\n{lines}"


def answer_letter(answer: Any, choices: list[str], *, answer_is_text: bool) -> str:
    """The gold option letter. MathVista stores the option text, the others the letter; the
    other reading is the fallback (a choice text may itself look like a letter)."""
    text = str(answer).strip()
    letter = re.fullmatch(r"\(?([A-Za-z])\)?[.:]?", text)

    def by_letter():
        if letter and LETTERS.index(letter.group(1).upper()) < len(choices):
            return letter.group(1).upper()
        return None

    def by_text():
        for index, choice in enumerate(choices):
            if choice.strip() == text:
                return LETTERS[index]
        return None

    found = (by_text() or by_letter()) if answer_is_text else (by_letter() or by_text())
    if found is None:
        raise BadRow("answer_not_in_choices", text[:60])
    return found


def is_choice_question(question_type: Any) -> bool:
    return "choice" in str(question_type or "").lower()


def prepend_images(text: str, count: int) -> str:
    return IMAGE_PLACEHOLDER * count + text


def single_image_question(text: str, image) -> tuple[str, list]:
    """One image: its first ``<imageN>`` reference becomes the placeholder (others are dropped);
    without a reference the image goes first."""
    if _IMAGE_REF.search(text):
        text = _IMAGE_REF.sub(IMAGE_PLACEHOLDER, text, count=1)
        return _IMAGE_REF.sub("", text), [image]
    return prepend_images(text, 1), [image]


def numbered_images_question(text: str, row: dict, base_dir: Path) -> tuple[str, list]:
    """MMMU: every ``<image k>`` becomes a placeholder and brings ``image_k``, in text order; with
    no reference at all, the row's images go first in numeric order."""
    images: list = []

    def swap(match: re.Match) -> str:
        images.append(image_source(row.get(f"image_{match.group(1)}"), base_dir))
        return IMAGE_PLACEHOLDER

    text = _IMAGE_REF.sub(swap, text)
    if not images:
        present = [row[f"image_{k}"] for k in range(1, 8) if row.get(f"image_{k}") is not None]
        images = [image_source(value, base_dir) for value in present]
        text = prepend_images(text, len(images))
    return text, images


# ---------------------------------------------------------------------------- the benchmarks


def mathvista(row: dict, base: Path) -> BenchmarkItem:
    question = field_of(row, "question")
    choices = parse_options(row.get("choices"))
    multi = is_choice_question(row.get("question_type"))   # multi_choice | free_form
    if multi and not choices:
        raise BadRow("no_choices")
    answer = (answer_letter(field_of(row, "answer"), choices, answer_is_text=True) if multi
              else str(field_of(row, "answer")))
    # ``query`` is the published prompt (hint + question + choices); else build the same parts
    text = row.get("query") or (with_choices(question, choices) if multi else question)
    image = image_source(field_of(row, "decoded_image", "image"), base)
    return BenchmarkItem("mathvista", item_id(row, "pid"),
                         prepend_images(text, 1), [image], answer, choices if multi else None,
                         {"question_type": row.get("question_type"),
                          "answer_type": row.get("answer_type")})


def mathverse(row: dict, base: Path) -> BenchmarkItem:
    text = field_of(row, "query_cot", "query_wo", "question")
    multi = is_choice_question(row.get("question_type"))
    answer = str(field_of(row, "answer")).strip()
    if multi:
        letter = re.fullmatch(r"\(?([A-Za-z])\)?[.:]?(\s.*)?", answer, re.DOTALL)
        if not letter:
            raise BadRow("answer_not_a_letter", answer[:60])
        answer = letter.group(1).upper()
    image = image_source(field_of(row, "image"), base)
    return BenchmarkItem("mathverse", item_id(row, "sample_index"),
                         prepend_images(text, 1), [image], answer, None,
                         {"problem_version": row.get("problem_version"),
                          "question_type": row.get("question_type")})


def mathvision(row: dict, base: Path) -> BenchmarkItem:
    question = field_of(row, "question")
    choices = parse_options(row.get("options"))
    answer = field_of(row, "answer")
    answer = answer_letter(answer, choices, answer_is_text=False) if choices else str(answer)
    image = image_source(field_of(row, "decoded_image", "image"), base)
    text, images = single_image_question(with_choices(question, choices) if choices else question,
                                         image)
    return BenchmarkItem("mathvision", item_id(row, "id"), text,
                         images, answer, choices or None,
                         {"level": row.get("level"), "subject": row.get("subject")})


def wemath(row: dict, base: Path) -> BenchmarkItem:
    question, option = field_of(row, "question"), str(field_of(row, "option"))
    choices = [part.strip() for part in re.split(r";\s*(?=[A-Z]\.)", option)]
    answer = answer_letter(field_of(row, "answer"), choices, answer_is_text=False)
    image = image_source(field_of(row, "image_path", "image"), base)
    return BenchmarkItem("wemath", item_id(row, "ID"),
                         prepend_images(f"{question.rstrip()}\nOptions: {option}", 1), [image],
                         answer, choices, {"key": row.get("key")})


def mmmu(row: dict, base: Path, name: str = "mmmu", always_choice: bool = False) -> BenchmarkItem:
    question = field_of(row, "question")
    choices = parse_options(row.get("options"))
    multi = always_choice or is_choice_question(row.get("question_type"))
    answer = field_of(row, "answer")
    meta = {"question_type": row.get("question_type"), "subject": row.get("subject")}
    if multi:
        if not choices:
            raise BadRow("no_choices")
        answer = answer_letter(answer, choices, answer_is_text=False)
        question = with_choices(question, choices)
    else:   # open questions may list several accepted answers: "['24/7', '3.429']"
        accepted = parse_options(answer) if str(answer).lstrip().startswith("[") else [answer]
        if not accepted:
            raise BadRow("missing_field", "answer")
        answer, meta["accepted_answers"] = str(accepted[0]), [str(a) for a in accepted]
    text, images = numbered_images_question(question, row, base)
    return BenchmarkItem(name, item_id(row, "id"), text, images,
                         str(answer), choices if multi else None, meta)


MMMU_PRO_VISION_PROMPT = "Answer the multiple-choice question shown in the image."


def mmmu_pro(row: dict, base: Path) -> BenchmarkItem:
    if row.get("question") is None and row.get("image") is not None:   # the "vision" config
        choices = parse_options(row.get("options"))
        answer = answer_letter(field_of(row, "answer"), choices, answer_is_text=False)
        return BenchmarkItem("mmmu_pro", item_id(row, "id"),
                             prepend_images(MMMU_PRO_VISION_PROMPT, 1),
                             [image_source(row["image"], base)], answer, choices,
                             {"config": "vision", "subject": row.get("subject")})
    return mmmu(row, base, name="mmmu_pro", always_choice=True)


HALLUSION_KEYS = ("category", "subcategory", "set_id", "figure_id", "question_id")


def hallusionbench(row: dict, base: Path) -> BenchmarkItem:
    meta = {key: str(field_of(row, key)) for key in HALLUSION_KEYS}
    meta["visual_input"] = str(row.get("visual_input", "1"))
    gold = str(field_of(row, "gt_answer")).strip()
    if gold not in ("0", "1"):
        raise BadRow("bad_gt_answer", gold[:20])
    question = field_of(row, "question")
    images = []
    if meta["visual_input"] != "0":
        images = [image_source(field_of(row, "image", "filename"), base)]
    return BenchmarkItem("hallusionbench", "_".join(meta[key] for key in HALLUSION_KEYS),
                         prepend_images(question, len(images)), images,
                         "Yes" if gold == "1" else "No", None, meta)


def _all_correct_share(groups: dict) -> float:
    return sum(all(v) for v in groups.values()) / len(groups) if groups else 0.0


def hallusion_metrics(items: list[BenchmarkItem], correct: list[float]) -> dict[str, float]:
    """HallusionBench's three accuracies for one prediction per question (``correct`` 0/1):

    * aAcc: all questions;
    * qAcc: a question (category, subcategory, set_id, question_id) counts when it is answered
      correctly for every figure it is asked about;
    * fAcc: a figure (category, subcategory, set_id, figure_id) counts when all its questions are
      answered correctly; questions without a figure (visual_input "0", and the benchmark's
      rule for VS figure_id "0") are not part of any figure.
    """
    questions: dict[tuple, list[bool]] = {}
    figures: dict[tuple, list[bool]] = {}
    for item, ok in zip(items, correct):
        m = item.meta
        questions.setdefault((m["category"], m["subcategory"], m["set_id"], m["question_id"]),
                             []).append(ok > 0)
        no_figure = m["visual_input"] == "0" or (m["category"] == "VS" and m["figure_id"] == "0")
        if not no_figure:
            figures.setdefault((m["category"], m["subcategory"], m["set_id"], m["figure_id"]),
                               []).append(ok > 0)
    return {"aAcc": sum(c > 0 for c in correct) / len(correct) if correct else 0.0,
            "qAcc": _all_correct_share(questions), "fAcc": _all_correct_share(figures)}


# ------------------------------------------------------------------------------ the registry


@dataclass(frozen=True)
class Benchmark:
    convert: Callable[[dict, Path], BenchmarkItem]
    # (items, correct per item for one sample index) -> extra metrics; None = accuracy only
    metrics: Callable[[list[BenchmarkItem], list[float]], dict[str, float]] | None = None


BENCHMARKS: dict[str, Benchmark] = {
    "mathvista": Benchmark(mathvista),
    "mathverse": Benchmark(mathverse),
    "mathvision": Benchmark(mathvision),
    "wemath": Benchmark(wemath),
    "mmmu": Benchmark(mmmu),
    "mmmu_pro": Benchmark(mmmu_pro),
    "hallusionbench": Benchmark(hallusionbench, hallusion_metrics),
}


def get_benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise BenchmarkError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


def load_benchmark(name: str, path: str | Path, limit: int | None = None, *,
                   max_bad_fraction: float = 0.01) -> BenchmarkSet:
    """The first ``limit`` usable items (all when None/0) of a benchmark file."""
    benchmark, path = get_benchmark(name), Path(path)
    if not path.is_file():
        raise BenchmarkError(f"{name}: file {path} does not exist")
    items, skipped, seen = [], [], 0
    for index, row in enumerate(read_rows(path), start=1):
        if limit and len(items) >= limit:
            break
        seen += 1
        try:
            if isinstance(row, BadRow):
                raise row
            if not isinstance(row, dict):
                raise BadRow("not_an_object")
            item = benchmark.convert(row, path.parent)
            if item.question.count(IMAGE_PLACEHOLDER) != len(item.images):
                raise BadRow("placeholder_mismatch")
            item.id = item.id or str(index)
            items.append(item)
        except BadRow as exc:
            skipped.append((index, str(exc)))
    bad = "; ".join(f"row {i}: {reason}" for i, reason in skipped[:3])
    if skipped and len(skipped) > max_bad_fraction * seen:
        raise BenchmarkError(f"{name}: {len(skipped)} of {seen} rows of {path} are unusable "
                             f"({bad}{'; ...' if len(skipped) > 3 else ''}); at most "
                             f"{max_bad_fraction:.0%} may be skipped")
    if not items:
        raise BenchmarkError(f"{name}: no usable rows in {path}")
    if skipped:
        log.warning("%s: skipped %d of %d rows of %s (%s)", name, len(skipped), seen, path, bad)
    return BenchmarkSet(name, path, items, seen, skipped)
