"""A synthetic, verifiable visual-reasoning task small enough for a tiny Qwen3-VL on CPU.

Images are grids of solid-colour cells, each cell exactly 32x32 px: with Qwen3-VL's 16 px patches and
2x2 patch merging every cell is exactly one image token, so perception is easy for a 2-layer ViT.
Questions combine what the image shows with a small reasoning step (count, add, subtract, multiply,
compare, parity, arg-max), with numeric or multiple-choice answers. Everything needed to recompute an
answer (the grid and the question parameters) is kept in each row's ``meta``.

Splits (sharegpt multimodal JSONL, image paths relative to the split file):

* ``sft_public``  many demos, terse and noisy: thin captions, skipped steps, ~10% wrong answers;
* ``sft_teacher`` fewer demos, dense bullet captions + step-by-step reasoning, always correct;
* ``align``       prompts + ``teacher_caption`` / ``teacher_cot`` (with their tags, spec §9.2);
* ``rl``          prompts + ``answer``;
* ``test``        held-out prompts + ``answer``; its grids never occur in any other split.

Generation is a pure function of (seed, sizes): each split draws from its own seeded stream, so e.g.
the test split does not change when the training sizes do, and files are byte-identical across runs.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from prism_megatron.data.template import IMAGE_PLACEHOLDER
from prism_megatron.rewards.response import SYSTEM_PROMPT, format_response

CELL_PX = 32
COLOURS = ("red", "green", "blue", "yellow")        # question-worthy colours
BLANK = "blank"
PALETTE = {"red": (220, 40, 40), "green": (40, 170, 70), "blue": (40, 80, 220),
           "yellow": (240, 210, 40), BLANK: (255, 255, 255)}
CODES = {"red": "r", "green": "g", "blue": "b", "yellow": "y", BLANK: "w"}
GRID_SHAPES = ((2, 2), (2, 3), (3, 2), (3, 3))        # (rows, cols): 64x64 ... 96x96 px images
SPLITS = ("sft_public", "sft_teacher", "align", "rl", "test")
# Generation order: the held-out split claims its grids first so no other split can reuse them.
GENERATION_ORDER = ("test", "rl", "align", "sft_teacher", "sft_public")
DEFAULT_SIZES = {"sft_public": 2000, "sft_teacher": 300, "align": 200, "rl": 400, "test": 200}
PUBLIC_WRONG_RATE = 0.10
LETTERS = "ABCD"

Grid = tuple[tuple[str, ...], ...]


# --------------------------------------------------------------------------------------- grids

def random_grid(rng: random.Random) -> Grid:
    """A grid whose cells are blank ~30% of the time, otherwise one of the four colours."""
    rows, cols = rng.choice(GRID_SHAPES)
    cell = lambda: BLANK if rng.random() < 0.3 else rng.choice(COLOURS)  # noqa: E731
    return tuple(tuple(cell() for _ in range(cols)) for _ in range(rows))


def grid_key(grid: Grid) -> str:
    """Stable short name of a grid, e.g. ``2x3-rgb-wwy``; also its image file stem."""
    return f"{len(grid)}x{len(grid[0])}-" + "-".join("".join(CODES[c] for c in row) for row in grid)


def render_grid(grid: Grid) -> Image.Image:
    """Paint the grid: every cell a solid CELL_PX x CELL_PX square, aligned to the merged-patch lattice."""
    img = Image.new("RGB", (CELL_PX * len(grid[0]), CELL_PX * len(grid)))
    for r, row in enumerate(grid):
        for c, colour in enumerate(row):
            img.paste(PALETTE[colour], (c * CELL_PX, r * CELL_PX, (c + 1) * CELL_PX, (r + 1) * CELL_PX))
    return img


def count(grid: Grid, colour: str) -> int:
    return sum(cell == colour for row in grid for cell in row)


def cells(n: int) -> str:
    return f"{n} cell" if n == 1 else f"{n} cells"


# ----------------------------------------------------------------------------------- questions

@dataclass(frozen=True)
class Question:
    """A question about a grid: ``kind`` plus the parameters needed to ask and to solve it."""
    kind: str
    colours: tuple[str, ...] = ()
    k: int = 0
    options: tuple[str, ...] = ()      # MCQ option texts, in display order

    def text(self, grid: Grid) -> str:
        a, b = (self.colours + ("", ""))[:2]
        if self.kind == "sum":
            q = f"How many {a} cells are there plus how many {b} cells?"
        elif self.kind == "diff":
            q = f"What is the number of {a} cells minus the number of {b} cells?"
        elif self.kind == "times":
            q = f"What is the number of {a} cells times {self.k}?"
        elif self.kind == "coloured":
            q = "How many cells are not blank?"
        elif self.kind == "compare":
            q = f"Are there more {a} or {b} cells?"
        elif self.kind == "parity":
            q = f"Is the number of {a} cells odd or even?"
        elif self.kind == "most":
            q = "Which colour covers the most cells?"
        else:
            raise ValueError(f"unknown question kind {self.kind!r}")
        if self.options:
            q += "".join(f"\n({LETTERS[i]}) {opt}" for i, opt in enumerate(self.options))
        return q

    def to_meta(self) -> dict:
        return {"kind": self.kind, "colours": list(self.colours), "k": self.k, "options": list(self.options)}


def solve(question: Question, counts: dict[str, int]) -> str:
    """The answer string from per-colour counts (the true ones, or a miscounted set for noisy demos)."""
    a, b = (question.colours + ("", ""))[:2]
    kind = question.kind
    if kind == "sum":
        return str(counts[a] + counts[b])
    if kind == "diff":
        return str(counts[a] - counts[b])
    if kind == "times":
        return str(counts[a] * question.k)
    if kind == "coloured":
        return str(sum(counts[c] for c in COLOURS))
    if kind == "compare":
        choice = a if counts[a] > counts[b] else b if counts[b] > counts[a] else "equal"
    elif kind == "parity":
        choice = "odd" if counts[a] % 2 else "even"
    elif kind == "most":
        choice = max(COLOURS, key=lambda c: counts[c])
    else:
        raise ValueError(f"unknown question kind {kind!r}")
    return LETTERS[question.options.index(choice)]


def random_question(rng: random.Random, grid: Grid) -> Question:
    """Pick a template; colours are biased towards ones present in the image so counts are not all 0."""
    present = [c for c in COLOURS if count(grid, c)]

    def colour_pair() -> tuple[str, str]:
        pool = present if len(present) >= 2 and rng.random() < 0.8 else list(COLOURS)
        return tuple(rng.sample(pool, 2))

    counts = {c: count(grid, c) for c in COLOURS}
    top = max(counts.values())
    kinds = ["sum", "diff", "times", "coloured", "compare", "parity"]
    if top > 0 and sum(v == top for v in counts.values()) == 1:
        kinds.append("most")        # only ask for the arg-max when it is unique
    kind = rng.choice(kinds)
    if kind in ("sum", "diff"):
        return Question(kind, colour_pair())
    if kind == "times":
        return Question(kind, colour_pair()[:1], k=rng.randint(2, 4))
    if kind == "coloured":
        return Question(kind)
    if kind == "compare":
        pair = colour_pair()
        return Question(kind, pair, options=tuple(rng.sample([*pair, "equal"], 3)))
    if kind == "parity":
        return Question(kind, colour_pair()[:1], options=("odd", "even"))
    return Question(kind, options=tuple(rng.sample(COLOURS, 4)))


# ----------------------------------------------------------------------------------- responses

def _counting_steps(question: Question, counts: dict[str, int]) -> list[str]:
    colours = list(COLOURS) if question.kind in ("coloured", "most") else list(question.colours)
    return [f"There {'is' if counts[c] == 1 else 'are'} {cells(counts[c]).replace('cell', c + ' cell')}."
            for c in colours]


def _final_step(question: Question, counts: dict[str, int], answer: str) -> str:
    a, b = (question.colours + ("", ""))[:2]
    kind = question.kind
    if kind == "sum":
        return f"{counts[a]} + {counts[b]} = {answer}."
    if kind == "diff":
        return f"{counts[a]} - {counts[b]} = {answer}."
    if kind == "times":
        return f"{counts[a]} x {question.k} = {answer}."
    if kind == "coloured":
        return " + ".join(str(counts[c]) for c in COLOURS) + f" = {answer}."
    option = question.options[LETTERS.index(answer)]
    if kind == "compare":
        rel = ">" if counts[a] > counts[b] else "<" if counts[a] < counts[b] else "="
        return f"{counts[a]} {rel} {counts[b]}, so the answer is {option}."
    if kind == "parity":
        return f"{counts[a]} is {option}."
    return f"The largest count is {counts[option]}, for {option}."


def teacher_caption(grid: Grid) -> str:
    """Dense perception: style line, every row, then every colour's count (blank included)."""
    lines = [f"- Style: a {len(grid)}x{len(grid[0])} grid of solid colour cells"]
    lines += [f"- Row {i + 1}: " + ", ".join(row) for i, row in enumerate(grid)]
    lines += [f"- {cells(count(grid, c)).replace('cell', c + ' cell')}"
              for c in (*COLOURS, BLANK) if count(grid, c)]
    return "\n".join(lines)


def teacher_think(question: Question, grid: Grid) -> str:
    counts = {c: count(grid, c) for c in COLOURS}
    answer = solve(question, counts)
    topic = " and ".join(question.colours) + " cells" if question.colours else "colour counts"
    steps = [f"The question is about the {topic}.", *_counting_steps(question, counts)]
    steps.append(_final_step(question, counts, answer))
    return "\n".join(steps)


def public_response(rng: random.Random, question: Question, grid: Grid) -> tuple[str, str]:
    """(response, its answer): a thin caption and a skipped-steps reasoning; sometimes a miscount."""
    counts = {c: count(grid, c) for c in COLOURS}
    if rng.random() < PUBLIC_WRONG_RATE:
        truth = solve(question, counts)
        for _ in range(20):                 # miscount one colour until the answer changes
            wrong = dict(counts)
            c = rng.choice(question.colours or COLOURS)
            wrong[c] = max(0, wrong[c] + rng.choice((-1, 1)))
            if solve(question, wrong) != truth:
                counts = wrong
                break
    answer = solve(question, counts)
    present = [c for c in COLOURS if count(grid, c)]
    caption = rng.choice([
        "A grid of coloured cells.",
        f"A {len(grid)}x{len(grid[0])} colour grid.",
        "Coloured squares: " + (", ".join(present) or "none") + ".",
    ])
    think = _final_step(question, counts, answer) if rng.random() < 0.7 else f"The answer is {answer}."
    return format_response(caption, think, answer), answer


# ---------------------------------------------------------------------------------------- rows

def _prompt_messages(question: Question, grid: Grid) -> list[dict]:
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": IMAGE_PLACEHOLDER + question.text(grid)}]


def make_row(split: str, index: int, grid: Grid, question: Question, rng: random.Random) -> dict:
    """One JSONL row of ``split``; the image path is ``images/<grid_key>.png``."""
    answer = solve(question, {c: count(grid, c) for c in COLOURS})
    messages = _prompt_messages(question, grid)
    caption = teacher_caption(grid)
    cot = f"<think>{teacher_think(question, grid)}</think>\n<answer>{answer}</answer>"
    row: dict = {"id": f"{split}-{index:05d}", "messages": messages}
    if split == "sft_teacher":
        messages.append({"role": "assistant", "content": f"<caption>{caption}</caption>\n{cot}"})
    elif split == "sft_public":
        response, _ = public_response(rng, question, grid)
        messages.append({"role": "assistant", "content": response})
    elif split == "align":
        row["teacher_caption"] = f"<caption>{caption}</caption>"
        row["teacher_cot"] = cot
    row["images"] = [f"images/{grid_key(grid)}.png"]
    row["answer"] = answer
    row["meta"] = {"grid": [list(r) for r in grid], "question": question.to_meta()}
    return row


def generate_rows(seed: int, sizes: dict[str, int] | None = None) -> dict[str, list[dict]]:
    """All splits as lists of rows (no I/O). Test grids are exclusive; (grid, question) pairs unique."""
    sizes = {**DEFAULT_SIZES, **(sizes or {})}
    unknown = set(sizes) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split(s) {sorted(unknown)}; expected {SPLITS}")
    test_grids: set[Grid] = set()
    seen: set[tuple[Grid, Question]] = set()
    out: dict[str, list[dict]] = {}
    for split in GENERATION_ORDER:
        rng = random.Random(f"prism-synthetic:{seed}:{split}")
        rows: list[dict] = []
        attempts = 0
        while len(rows) < sizes[split]:
            attempts += 1
            if attempts > 50 * sizes[split] + 1000:
                raise RuntimeError(f"could not draw {sizes[split]} unique {split} items")
            grid = random_grid(rng)
            question = random_question(rng, grid)
            if (grid, question) in seen or (split != "test" and grid in test_grids):
                continue
            seen.add((grid, question))
            if split == "test":
                test_grids.add(grid)
            rows.append(make_row(split, len(rows), grid, question, rng))
        out[split] = rows
    return {split: out[split] for split in SPLITS}


def corpus(seed: int = 0, n: int = 400) -> Iterator[str]:
    """Text of the task (system prompt, questions, teacher and public responses) for tokenizer training."""
    rows = generate_rows(seed, {"sft_public": n, "sft_teacher": n, "align": 0, "rl": 0, "test": 0})
    for split in ("sft_teacher", "sft_public"):
        for row in rows[split]:
            # Every message, the system prompt included, as often as it occurs in training data, so
            # BPE merges what the model actually reads.
            for message in row["messages"]:
                yield message["content"].replace(IMAGE_PLACEHOLDER, "")


def write_dataset(out_dir: str | Path, seed: int, sizes: dict[str, int] | None = None,
                  log=print) -> dict:
    """Write the five JSONL splits, ``images/`` and ``manifest.json`` under ``out_dir``; return the manifest."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = generate_rows(seed, sizes)
    grids: dict[str, list[list[str]]] = {}
    for split, split_rows in rows.items():
        with open(out / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for row in split_rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                grids.setdefault(Path(row["images"][0]).stem, row["meta"]["grid"])
        log(f"  {split:12s} {len(split_rows):6d} rows -> {out / (split + '.jsonl')}")
    for name in sorted(grids):
        path = out / "images" / f"{name}.png"
        if not path.exists():
            render_grid(tuple(map(tuple, grids[name]))).save(path, format="PNG", optimize=False)
    log(f"  images       {len(grids):6d} png -> {out / 'images'}")
    manifest = {
        "task": "prism-synthetic-colour-grid", "version": 1, "seed": seed,
        "counts": {split: len(r) for split, r in rows.items()}, "num_images": len(grids),
        "files": {split: f"{split}.jsonl" for split in SPLITS}, "cell_px": CELL_PX,
        "grid_shapes": [list(s) for s in GRID_SHAPES], "colours": [*COLOURS, BLANK],
        "system_prompt": SYSTEM_PROMPT,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest
