"""One reader per published data layout, behind one interface: ``open_rows(path) -> RowTable``.

Layouts (detected from a file's columns, reported by ``RowTable.layout``):

* ``sharegpt-messages``:      ``{"messages": [{"role", "content"}], "images": [...]}``
* ``sharegpt-conversations``: ``{"conversations": [{"from", "value"}], "images": [...]}``
* ``llamafactory``:           a dataset registered in a LLaMA-Factory ``dataset_info.json``
  (``formatting: sharegpt``; ``columns`` renames messages/images/system/tools, ``tags`` renames
  the turn keys and role values; images resolved against ``media_dir``, default the dataset dir)
* ``verl-rlhf``:              verl ``RLHFDataset`` rows: ``prompt`` = chat messages with
  ``<image>`` placeholders in string content, ``images`` = HF Image structs (embedded bytes),
  ``data_source``, ``reward_model: {ground_truth, style}``, ``extra_info``, and for the alignment
  file ``teacher_caption`` / ``teacher_cot``
* ``warmup-pairs``:           ``{prompt|question, image, teacher_caption, teacher_cot,
  student_caption, student_cot}`` (image paths relative to ``data.image_root`` or the file)

Every layout becomes the same ``Row`` (normalised chat messages, raw image values, answer,
teacher/student texts, ...). Storage stays on disk: parquet and JSON-array files are read through
``datasets`` (memory-mapped Arrow), JSONL through an index of line offsets (16 bytes a row), so
``len(table)`` and ``table[i]`` are cheap at millions of rows and a broken line is one counted bad
row (``bad_json``, naming ``file:line``) instead of a failed load. A file that cannot be read at
all (not the parquet it claims to be, UTF-16, unknown layout) is one ``DataError`` line naming it.

Encoding: rows must be UTF-8 (a UTF-8 BOM is accepted). A UTF-16 file (BOM or NUL bytes) is
refused as a whole with the ``iconv`` command that fixes it; a line that is not valid UTF-8 (e.g.
a Latin-1 file) is a counted ``bad_encoding`` row. Nothing is transcoded by guessing: Latin-1
decodes any byte string, so a guess would silently turn text into mojibake.

The system prompt rule (spec §2.1) lives here once (``apply_system_prompt``): a row's own system
message is used as is; ``data.system_prompt`` (default: the project's format prompt,
``rewards.response.SYSTEM_PROMPT``) is added only to rows without one.

Messages come out of a row in one place, ``normalise``; ``prompt_messages`` (a ``Row``'s prompt
turns: RL prompts, warm-up pairs, held-out evaluation, ``prism data inspect``) and
``row_messages`` (a stored dict's messages, e.g. a benchmark item) are built on it.
"""

from __future__ import annotations

import base64
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from prism_megatron.data.images import load_fitted
from prism_megatron.data.sharegpt import (
    ROLE_ALIASES, BadRow, DataError, SkipStats, _content_parts, count_placeholders)
from prism_megatron.data.template import IMAGE_PLACEHOLDER
from prism_megatron.rewards.response import SYSTEM_PROMPT, format_response, split_segments

log = logging.getLogger(__name__)

LAYOUTS = ("sharegpt-messages", "sharegpt-conversations", "llamafactory", "verl-rlhf",
           "warmup-pairs")
PAIR_FIELDS = ("teacher_caption", "teacher_cot", "student_caption", "student_cot")
_TEXT_FIELDS = PAIR_FIELDS + ("teacher_response", "student_response")
_REASONING_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
_CAPTION_TAGS = ("<caption>", "</caption>")


# ----------------------------------------------------------------------------- options/sources

@dataclass(frozen=True)
class RowOptions:
    """How rows are read; from ``DataConfig`` (``RowOptions.from_cfg``)."""

    system_prompt: str | None = SYSTEM_PROMPT   # default for rows without one; "" = none
    image_root: str = ""                        # base dir of warm-up pair / relative images
    media_dir: str = ""                         # LLaMA-Factory media_dir (default dataset dir)
    # The stage's pixel budget (data.min_pixels / max_pixels / max_image_side): images are
    # resized to fit it here, so trainer, engines and eval see the same pixels.
    min_pixels: int | None = None
    max_pixels: int | None = None
    max_image_side: int | None = None

    @classmethod
    def from_cfg(cls, data_cfg: Any = None, **overrides) -> "RowOptions":
        values = {}
        if data_cfg is not None:
            values = {"system_prompt": getattr(data_cfg, "system_prompt", SYSTEM_PROMPT),
                      "image_root": getattr(data_cfg, "image_root", "") or "",
                      "media_dir": getattr(data_cfg, "media_dir", "") or "",
                      "min_pixels": getattr(data_cfg, "min_pixels", None),
                      "max_pixels": getattr(data_cfg, "max_pixels", None),
                      "max_image_side": getattr(data_cfg, "max_image_side", None)}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


class RowSource(os.PathLike):
    """A data file plus how to read it. ``os.fspath(source)`` is the data file, so code that
    only wants the file's name or directory can treat it as a path."""

    def __init__(self, path: str | Path, options: RowOptions = RowOptions(),
                 dataset: str | None = None, info_path: str | Path | None = None,
                 entry: dict | None = None):
        self.path, self.options, self.dataset = Path(path), options, dataset
        self.info_path, self.entry = (Path(info_path) if info_path else None), entry

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return f"{self.info_path}:{self.dataset}" if self.dataset else str(self.path)

    __repr__ = __str__


def dataset_info_source(info_path: str | Path, name: str,
                        options: RowOptions = RowOptions()) -> RowSource:
    """The data file of dataset ``name`` in a LLaMA-Factory ``dataset_info.json``."""
    info_path = Path(info_path)
    if info_path.is_dir():
        info_path = info_path / "dataset_info.json"
    if not info_path.is_file():
        raise DataError(f"data.dataset_info={info_path} does not exist")
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{info_path} is not valid JSON: {exc}") from None
    if name not in info:
        raise DataError(f"dataset {name!r} is not in {info_path} (it has: "
                        f"{', '.join(sorted(info)) or 'nothing'})")
    entry = info[name]
    if not isinstance(entry, dict) or not entry.get("file_name"):
        hub = next((k for k in ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url",
                                "cloud_file_name") if isinstance(entry, dict) and entry.get(k)),
                   None)
        how = f"it uses {hub}; download it and give a local file_name" if hub else \
            "it has no file_name"
        raise DataError(f"dataset {name!r} in {info_path}: {how}")
    if entry.get("formatting", "alpaca") != "sharegpt":
        raise DataError(f"dataset {name!r} in {info_path}: formatting "
                        f"{entry.get('formatting', 'alpaca')!r} is not supported (only "
                        "'sharegpt', the multimodal conversation format)")
    if entry.get("ranking"):
        raise DataError(f"dataset {name!r} in {info_path} is a ranking (preference) dataset; "
                        "SFT needs conversations")
    path = info_path.parent / entry["file_name"]
    if path.is_dir():
        raise DataError(f"dataset {name!r} in {info_path}: file_name {entry['file_name']} is a "
                        "directory; register each file")
    return RowSource(path, options, name, info_path, entry)


def row_sources(data_cfg: Any, which: str = "train") -> list[RowSource]:
    """The sources of ``data.train_files`` (+ ``data.datasets`` of ``data.dataset_info``) or of
    ``data.eval_files`` (``which="eval"``), each carrying the config's row options."""
    options = RowOptions.from_cfg(data_cfg)
    files = data_cfg.train_files if which == "train" else data_cfg.eval_files
    sources = [f if isinstance(f, RowSource) else RowSource(f, options) for f in files]
    names = list(getattr(data_cfg, "datasets", None) or [])
    info = getattr(data_cfg, "dataset_info", "") or ""
    if which == "train" and names:
        if not info:
            raise DataError("data.datasets is set but data.dataset_info is empty: point it at "
                            "the LLaMA-Factory dataset_info.json that registers "
                            f"{', '.join(names)}")
        sources += [dataset_info_source(info, name, options) for name in names]
    elif which == "train" and info:
        raise DataError(f"data.dataset_info={info} is set but data.datasets is empty: name the "
                        "datasets to train on")
    return sources


# ----------------------------------------------------------------------------- the row

@dataclass
class Row:
    """One normalised row. ``messages`` are HF chat messages (user/system content as typed
    parts, ``{"type": "image"}`` where a placeholder was; assistant content a string), the
    system prompt rule already applied; ``images`` are the raw values (paths, HF structs,
    bytes, data URIs), decoded by ``row_images``."""

    messages: list[dict]
    images: list[Any]
    answer: str | None = None
    teacher_caption: str | None = None
    teacher_cot: str | None = None
    student_caption: str | None = None
    student_cot: str | None = None
    teacher_response: str | None = None
    student_response: str | None = None
    data_source: str | None = None
    id: str = ""
    base_dirs: tuple[Path, ...] = ()
    where: str = ""
    tools: Any = None
    layout: str = ""
    budget: tuple[int | None, int | None, int | None] = (None, None, None)  # min/max px, side


def apply_system_prompt(messages: list[dict], system_prompt: str | None) -> list[dict]:
    """Spec §2.1 and the data rule: a row's own system message wins; the default is added only
    to rows without one (``None``/"" adds nothing)."""
    if messages and messages[0]["role"] == "system":
        return messages
    if system_prompt:
        return [{"role": "system", "content": _content_parts(system_prompt)}, *messages]
    return messages


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        value = value[0] if len(value) == 1 else json.dumps(list(value), ensure_ascii=False)
    text = str(value)
    return text if text.strip() else None


def _nested(raw: dict, key: str, sub: str) -> Any:
    value = raw.get(key)
    return value.get(sub) if isinstance(value, dict) else None


def _answer(raw: dict) -> str | None:
    """``answer``, else verl's ``reward_model.ground_truth``, else ``extra_info.answer``."""
    for value in (raw.get("answer"), _nested(raw, "reward_model", "ground_truth"),
                  _nested(raw, "extra_info", "answer")):
        text = _text(value)
        if text is not None:
            return text
    return None


def _images(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (str, bytes, bytearray, dict)):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if v is not None]
    raise BadRow("bad_images", f"{where}: images is a {type(value).__name__}, not a list")


def _parts(content: Any, where: str) -> list[dict]:
    """Non-assistant content (string with placeholders or a list of typed parts) -> parts."""
    if isinstance(content, str):
        return _content_parts(content)
    if isinstance(content, (list, tuple)):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts += _content_parts(part)
            elif isinstance(part, dict) and (part.get("type") == "image" or "image" in part):
                parts.append({"type": "image"})
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                parts += _content_parts(part["text"])
            else:
                raise BadRow("bad_turn", f"{where}: content part {repr(part)[:60]}")
        return parts
    raise BadRow("bad_turn", f"{where}: content is a {type(content).__name__}")


def _assistant_text(content: Any, where: str) -> str:
    if isinstance(content, (list, tuple)):
        content = "".join(p.get("text") or "" for p in content if isinstance(p, dict))
    if not isinstance(content, str):
        raise BadRow("bad_turn", f"{where}: assistant content is a {type(content).__name__}")
    if not content.strip():
        raise BadRow("empty_assistant", where)
    return content


def _turns(turns: Any, where: str, key: str) -> list:
    if isinstance(turns, str):
        raise BadRow("bad_messages", f"{where}: {key} is a string, not a list of turns")
    if not isinstance(turns, (list, tuple)) or not turns:
        raise BadRow("no_messages", f"{where}: no {key}")
    return list(turns)


def _messages(turns: list, where: str, *, role_key=("role", "from"),
              content_key=("content", "value"), roles: dict = ROLE_ALIASES) -> list[dict]:
    messages = []
    for turn in turns:
        if not isinstance(turn, dict):
            raise BadRow("bad_turn", f"{where}: turn {repr(turn)[:60]}")
        role = roles.get(next((turn[k] for k in role_key if turn.get(k) is not None), ""))
        content = next((turn[k] for k in content_key if turn.get(k) is not None), None)
        if role is None or content is None:
            raise BadRow("bad_turn", f"{where}: turn {repr(turn)[:60]}")
        messages.append({"role": role, "content": _assistant_text(content, where)
                         if role == "assistant" else _parts(content, where)})
    return messages


def _with_system_column(messages: list[dict], system: Any) -> list[dict]:
    if isinstance(system, str) and system.strip() and not (messages and
                                                           messages[0]["role"] == "system"):
        return [{"role": "system", "content": _content_parts(system)}, *messages]
    return messages


def _fields(raw: dict) -> dict:
    out = {"answer": _answer(raw), "data_source": _text(raw.get("data_source"))}
    for name in _TEXT_FIELDS:
        value = raw.get(name)
        if value is None:
            value = _nested(raw, "extra_info", name)
        out[name] = value if isinstance(value, str) else None
    index = raw.get("id", _nested(raw, "extra_info", "index"))
    out["id"] = "" if index is None else str(index)
    return out


# --------------------------------------------------------------------- normalisers per layout

def _sharegpt_row(raw: dict, where: str, key: str) -> tuple[list, list]:
    messages = _messages(_turns(raw.get(key), where, key), where)
    return _with_system_column(messages, raw.get("system")), _images(raw.get("images"), where)


def _verl_row(raw: dict, where: str) -> tuple[list, list]:
    messages = _messages(_turns(raw.get("prompt"), where, "prompt"), where)
    return messages, _images(raw.get("images"), where)


def _pair_row(raw: dict, where: str) -> tuple[list, list]:
    for key in ("messages", "conversations"):
        if raw.get(key) is not None:
            return _sharegpt_row(raw, where, key)
    if isinstance(raw.get("prompt"), (list, tuple)):
        return _verl_row(raw, where)
    question = raw.get("prompt") if raw.get("prompt") is not None else raw.get("question")
    if not isinstance(question, str) or not question.strip():
        raise BadRow("no_prompt", f"{where}: no prompt/question text")
    images = _images(raw.get("images") if raw.get("images") is not None else raw.get("image"),
                     where)
    missing = len(images) - question.count(IMAGE_PLACEHOLDER)
    text = IMAGE_PLACEHOLDER * max(missing, 0) + question
    return _with_system_column([{"role": "user", "content": _content_parts(text)}],
                               raw.get("system")), images


def _llamafactory_row(raw: dict, where: str, entry: dict) -> tuple[list, list]:
    """LLaMA-Factory sharegpt semantics: ``columns`` (messages default ``conversations``,
    images/system/tools only when mapped), ``tags`` (role/content keys and role values); a
    leading system turn is the system prompt unless a system column is mapped; the remaining
    turns must alternate user/observation and assistant/function_call."""
    columns, tags = entry.get("columns") or {}, entry.get("tags") or {}
    role_key, content_key = tags.get("role_tag", "from"), tags.get("content_tag", "value")
    user, assistant = tags.get("user_tag", "human"), tags.get("assistant_tag", "gpt")
    observation = tags.get("observation_tag", "observation")
    function, system_tag = tags.get("function_tag", "function_call"), tags.get("system_tag",
                                                                              "system")
    roles = {user: "user", assistant: "assistant", observation: "tool", function: "assistant",
             system_tag: "system"}
    key = columns.get("messages", "conversations")
    turns = _turns(raw.get(key), where, key)
    system = raw.get(columns["system"]) if columns.get("system") else None
    if system is None and isinstance(turns[0], dict) and turns[0].get(role_key) == system_tag:
        system, turns = turns[0].get(content_key), turns[1:]
    for i, turn in enumerate(turns):
        allowed = (user, observation) if i % 2 == 0 else (assistant, function)
        if not isinstance(turn, dict) or turn.get(role_key) not in allowed:
            raise BadRow("bad_turn_order", f"{where}: turn {i} is not one of {list(allowed)}")
    messages = _messages(turns, where, role_key=(role_key,), content_key=(content_key,),
                         roles=roles)
    images = _images(raw.get(columns["images"]), where) if columns.get("images") else []
    return _with_system_column(messages, system), images


# ----------------------------------------------------------------------------- storage

class _JsonlIndex:
    """Offsets of the non-blank lines of a JSONL file; rows are read on demand (per process:
    a forked DataLoader worker opens its own handle)."""

    CHUNK = 1 << 24

    def __init__(self, path: Path):
        self.path = path
        starts, ends, numbers = [], [], []
        with open(path, "rb") as f:
            head = f.read(4)
            if head[:2] in (b"\xff\xfe", b"\xfe\xff") or (len(head) >= 2 and b"\x00" in head):
                raise DataError(f"{path} is UTF-16 text; rows must be UTF-8 (convert it: iconv "
                                f"-f UTF-16 -t UTF-8 {path.name} > {path.stem}.utf8{path.suffix})")
            f.seek(0)
            offset, line_start, line_no = 0, 0, 0
            while chunk := f.read(self.CHUNK):
                array = np.frombuffer(chunk, np.uint8)
                newlines = np.flatnonzero(array == 10) + offset
                begins = np.concatenate(([line_start], newlines[:-1] + 1)) if len(newlines) \
                    else np.array([], np.int64)
                self._add(starts, ends, numbers, begins, newlines, line_no, array, offset)
                line_no += len(newlines)
                if len(newlines):
                    line_start = int(newlines[-1]) + 1
                offset += len(chunk)
            if offset > line_start:                      # last line without a newline
                self._add(starts, ends, numbers, np.array([line_start]), np.array([offset]),
                          line_no)
        cat = (lambda parts: np.concatenate(parts).astype(np.int64) if parts
               else np.zeros(0, np.int64))
        self.starts, self.ends, self.lines = cat(starts), cat(ends), cat(numbers)
        self._handle, self._pid = None, None

    @staticmethod
    def _add(starts, ends, numbers, begins, stops, first_line, chunk=None, offset=0):
        lengths = stops - begins
        keep = lengths > 0
        if chunk is not None:   # a line of just "\r" (CRLF files) is blank too
            ones = np.flatnonzero((lengths == 1) & (begins >= offset))
            keep[ones] = chunk[begins[ones] - offset] != 13
        starts.append(begins[keep])
        ends.append(stops[keep])
        numbers.append(np.arange(first_line + 1, first_line + 1 + len(begins))[keep])

    def __len__(self) -> int:
        return len(self.starts)

    def where(self, i: int) -> str:
        return f"{self.path}:{int(self.lines[i])}"

    def __getitem__(self, i: int) -> dict:
        if self._pid != os.getpid():
            self._handle, self._pid = open(self.path, "rb"), os.getpid()
        self._handle.seek(int(self.starts[i]))
        data = self._handle.read(int(self.ends[i] - self.starts[i]))
        if i == 0 and data.startswith(b"\xef\xbb\xbf"):
            data = data[3:]
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadRow("bad_encoding", f"{self.where(i)}: not UTF-8 ({exc.reason} at byte "
                                         f"{exc.start})") from None
        if not text.strip():
            raise BadRow("blank_line", self.where(i))
        try:
            row = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BadRow("bad_json", f"{self.where(i)}: {exc.msg} at column {exc.colno}") from None
        if not isinstance(row, dict):
            raise BadRow("not_an_object", f"{self.where(i)}: a JSON {type(row).__name__}")
        return row

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_handle", "_pid")} | {
            "_handle": None, "_pid": None}


class _ArrowRows:
    """Parquet / JSON-array rows in a memory-mapped ``datasets`` Arrow table, read raw (HF
    Image features are not decoded: the image decoder gets the struct)."""

    def __init__(self, path: Path, kind: str):
        import datasets

        self.path = path
        datasets.disable_progress_bars()
        if kind == "parquet":
            with open(path, "rb") as f:
                head = f.read(4)
                f.seek(max(0, path.stat().st_size - 4))
                tail = f.read(4)
            if head != b"PAR1" or tail != b"PAR1":
                raise DataError(f"{path} is not a parquet file (no PAR1 magic bytes); give "
                                ".jsonl/.json for JSON rows")
        try:
            ds = datasets.load_dataset(kind, data_files=str(path), split="train")
        except Exception as exc:   # noqa: BLE001 - any reader failure is this file's problem
            if kind == "json":
                ds = self._python_json(path)
            else:
                detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise DataError(f"{path} cannot be read as {kind}: {detail[:200]}") from None
        self.ds = ds.with_format("arrow") if hasattr(ds, "with_format") else ds

    @staticmethod
    def _python_json(path: Path):
        """A JSON array whose rows Arrow cannot unify (e.g. a field that is a list in one row and
        a number in another): rows kept as Python objects, each checked when read."""
        try:
            rows = json.loads(path.read_text(encoding="utf-8-sig"))
        except UnicodeDecodeError as exc:
            raise DataError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                            "convert it to UTF-8") from None
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno} column "
                            f"{exc.colno}") from None
        if isinstance(rows, dict):
            rows = [rows]
        if not isinstance(rows, list):
            raise DataError(f"{path} holds a JSON {type(rows).__name__}, not a list of rows")
        return rows

    def __len__(self) -> int:
        return len(self.ds)

    def where(self, i: int) -> str:
        return f"{self.path}[row {i}]"

    def __getitem__(self, i: int) -> dict:
        row = self.ds[i]
        if not isinstance(row, dict):
            if hasattr(row, "to_pylist"):
                row = row.to_pylist()[0]
            else:
                raise BadRow("not_an_object", f"{self.where(i)}: a JSON {type(row).__name__}")
        return row


def _storage(path: Path):
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _ArrowRows(path, "parquet")
    if suffix not in (".jsonl", ".json", ".ndjson"):
        raise DataError(f"{path}: unsupported data file type {suffix!r} (use .jsonl, .json or "
                        ".parquet)")
    if suffix == ".json":
        with open(path, "rb") as f:
            head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
        if head.startswith(b"["):
            return _ArrowRows(path, "json")
    return _JsonlIndex(path)


# ----------------------------------------------------------------------------- the table

def detect_layout(sample: dict, columns: Sequence[str] = ()) -> str | None:
    """The layout a row's columns (and the type of ``prompt``) say it has, or None."""
    keys = set(sample) | set(columns)
    if keys & {"student_caption", "student_cot", "student_response"}:
        return "warmup-pairs"
    if isinstance(sample.get("prompt"), (list, tuple)):
        return "verl-rlhf"
    if "messages" in keys:
        return "sharegpt-messages"
    if "conversations" in keys:
        return "sharegpt-conversations"
    if isinstance(sample.get("prompt"), str) or isinstance(sample.get("question"), str):
        return "warmup-pairs"
    return None


def normalise(raw: dict, *, where: str = "", base_dirs: Sequence[str | Path] = (),
              system_prompt: str | None = SYSTEM_PROMPT, layout: str | None = None,
              entry: dict | None = None) -> Row:
    """One stored row (any layout; ``entry`` = its LLaMA-Factory dataset_info entry) -> ``Row``,
    or ``BadRow``. The layout is re-detected per row (files may mix sharegpt keys)."""
    if not isinstance(raw, dict):
        raise BadRow("not_an_object", f"{where}: a {type(raw).__name__}")
    if "__bad_row__" in raw:                 # handed on by read_rows
        reason, detail = raw["__bad_row__"]
        raise BadRow(reason, detail)
    if entry is not None:
        messages, images = _llamafactory_row(raw, where, entry)
        tools = raw.get((entry.get("columns") or {}).get("tools") or "\0")
        layout = "llamafactory"
    else:
        kind = detect_layout(raw) or layout
        if kind == "verl-rlhf":
            messages, images = _verl_row(raw, where)
        elif kind == "warmup-pairs":
            messages, images = _pair_row(raw, where)
        elif kind in ("sharegpt-messages", "sharegpt-conversations"):
            key = "messages" if raw.get("messages") is not None or \
                kind == "sharegpt-messages" else "conversations"
            messages, images = _sharegpt_row(raw, where, key)
        else:
            raise BadRow("unknown_layout", f"{where}: columns {sorted(raw)[:8]}")
        tools = raw.get("tools")
    return Row(apply_system_prompt(messages, system_prompt), images,
               base_dirs=tuple(Path(d) for d in base_dirs), where=where, tools=tools,
               layout=layout or "", **_fields(raw))


class RowTable:
    """``len(table)`` rows; ``table[i]`` is a ``Row`` or raises ``BadRow`` (counted by the
    caller); ``table.raw(i)`` the stored dict. Cheap to index at any size."""

    def __init__(self, source: RowSource):
        self.source, self.path, self.options = source, source.path, source.options
        self.rows = _storage(source.path)
        self.base_dirs = self._base_dirs()
        if source.entry is not None:
            self.layout = "llamafactory"
        elif len(self.rows) == 0:
            self.layout = "empty"
        else:
            self.layout = self._detect()

    def _base_dirs(self) -> tuple[Path, ...]:
        o, dirs = self.options, []
        if self.source.entry is not None:
            dirs.append(Path(o.media_dir) if o.media_dir else self.source.info_path.parent)
        elif o.media_dir:
            dirs.append(Path(o.media_dir))
        if o.image_root:
            dirs.append(Path(o.image_root))
        dirs.append(self.path.parent)
        return tuple(dict.fromkeys(dirs))

    def _detect(self) -> str:
        columns = getattr(getattr(self.rows, "ds", None), "column_names", None) or []
        for i in range(min(len(self.rows), 32)):
            try:
                sample = self.rows[i]
            except BadRow:
                continue
            layout = detect_layout(sample, columns)
            if layout is None:
                raise DataError(
                    f"{self.path}: cannot tell the row layout from its columns "
                    f"{sorted(sample)[:12]}; expected messages, conversations, a verl prompt "
                    "list, or prompt/question with teacher/student fields (or register the file "
                    "in a LLaMA-Factory dataset_info.json: data.dataset_info + data.datasets)")
            return layout
        return "unreadable"

    def __len__(self) -> int:
        return len(self.rows)

    def where(self, i: int) -> str:
        return self.rows.where(i)

    def raw(self, i: int) -> dict:
        return self.rows[i]

    def __getitem__(self, i: int) -> Row:
        row = normalise(self.rows[i], where=self.where(i), base_dirs=self.base_dirs,
                        system_prompt=self.options.system_prompt, layout=self.layout,
                        entry=self.source.entry)
        row.id = row.id or f"{self.path.stem}-{i}"
        o = self.options
        row.budget = (o.min_pixels, o.max_pixels, o.max_image_side)
        return row

    def __iter__(self) -> Iterator[Row]:
        raise TypeError("iterate with range(len(table)) and count BadRow per index")


def open_rows(path: str | Path | RowSource, *, data_cfg: Any = None, dataset: str | None = None,
              **options) -> RowTable:
    """A ``RowTable`` over one file (or dataset ``dataset`` of a ``dataset_info.json``)."""
    if isinstance(path, RowSource):
        return RowTable(path)
    opts = RowOptions.from_cfg(data_cfg, **options)
    if dataset is not None or Path(path).name == "dataset_info.json":
        if dataset is None:
            raise DataError(f"{path} is a dataset_info.json: name the dataset (data.datasets / "
                            "--dataset)")
        return RowTable(dataset_info_source(path, dataset, opts))
    return RowTable(RowSource(path, opts))


def open_tables(sources: Sequence[str | Path | RowSource], data_cfg: Any = None,
                stats: SkipStats | None = None) -> list[RowTable]:
    """Tables of every source; ``stats`` (if given) records their layouts. An empty file is one
    line naming it."""
    tables = []
    for source in sources:
        table = open_rows(source, data_cfg=data_cfg)
        if len(table) == 0:
            raise DataError(f"{table.source} has no rows (the file is empty)")
        if stats is not None:
            stats.add_layout(table.layout)
        tables.append(table)
    return tables


# ----------------------------------------------------------------------------- per-row helpers

def row_images(row: Row) -> list:
    """The row's images decoded (RGB), one per ``<image>`` placeholder, or ``BadRow``."""
    expected = count_placeholders(row.messages)
    if len(row.images) != expected:
        raise BadRow("image_count_mismatch",
                     f"{row.where}: {expected} placeholders, {len(row.images)} images")
    min_pixels, max_pixels, max_side = row.budget
    return [load_fitted(v, base_dirs=row.base_dirs, where=row.where, min_pixels=min_pixels,
                        max_pixels=max_pixels, max_side=max_side) for v in row.images]


def row_messages(raw: dict) -> list[dict]:
    """A stored row's chat messages with typed content parts, as ``normalise`` reads them (any
    layout; no default system prompt added); ``BadRow`` when it has none usable."""
    return normalise(raw, system_prompt=None).messages


def prompt_messages(row: Row) -> list[dict]:
    """The prompt turns (assistant turns dropped); ``BadRow`` without a user turn."""
    messages = [m for m in row.messages if m["role"] != "assistant"]
    if not any(m["role"] == "user" for m in messages):
        raise BadRow("no_user_turn", row.where)
    return messages


def row_example(table: RowTable, i: int) -> tuple[list[dict], list]:
    """SFT: (chat messages with typed parts, decoded RGB images) of row ``i``, or ``BadRow``.
    The per-row function of the streaming SFT loader."""
    row = table[i]
    if not any(m["role"] == "assistant" for m in row.messages):
        raise BadRow("no_assistant", row.where)
    return row.messages, row_images(row)


def _has_any(text: str, tags: Sequence[str]) -> bool:
    return any(tag in text for tag in tags)


def tagged_teacher(caption: str, cot: str, answer: str | None, where: str = "") -> tuple[str, str]:
    """Teacher caption / reasoning texts with their tags (spec §9.2 data preparation): an
    untagged caption is wrapped; an untagged cot becomes ``<think>cot</think>`` + the row's
    answer (``answer`` or ``reward_model.ground_truth``); a cot with ``<think>`` but no
    ``<answer>`` gets the answer block. The joined text must then pass the spec §2.2 format
    check, else ``BadRow``."""
    caption, cot = caption.strip(), cot.strip()
    if not _has_any(caption, _CAPTION_TAGS):
        caption = f"<caption>{caption}</caption>"
    if not _has_any(cot, _REASONING_TAGS):
        if answer is None:
            raise BadRow("untagged_teacher_without_answer",
                         f"{where}: teacher_cot has no <think>/<answer> tags and the row has no "
                         "answer (answer / reward_model.ground_truth) to close it with")
        cot = format_response("", cot, answer.strip()).split("\n", 1)[1]
    elif not _has_any(cot, ("<answer>", "</answer>")) and answer is not None:
        cot = f"{cot}\n<answer>{answer.strip()}</answer>"
    segments = split_segments(f"{caption}\n{cot}")
    if not segments.valid:
        raise BadRow("invalid_teacher", f"{where}: {caption[:40]!r} / {cot[:40]!r}")
    return segments.caption, segments.reasoning


def tagged_student(caption: str, cot: str) -> str:
    """A student response from separate caption / cot fields. A caption with no tags at all is
    wrapped (the fields are known to be the caption); the cot is kept as written, because the
    student's own answer is unknown: an untagged or malformed student stays format-invalid."""
    caption = caption.strip()
    if not _has_any(caption, _CAPTION_TAGS):
        caption = f"<caption>{caption}</caption>"
    return f"{caption}\n{cot.strip()}"


def pair_texts(row: Row) -> tuple[str, str]:
    """(teacher response, student response) of a warm-up pair row, teacher tags ensured."""
    if all(isinstance(getattr(row, f), str) and getattr(row, f).strip() for f in PAIR_FIELDS):
        caption, cot = tagged_teacher(row.teacher_caption, row.teacher_cot, row.answer, row.where)
        return f"{caption}\n{cot}", tagged_student(row.student_caption, row.student_cot)
    if row.teacher_response is not None and row.student_response is not None:
        return row.teacher_response, row.student_response
    raise BadRow("missing_pair_fields", row.where)


# ----------------------------------------------------------------------------- sharegpt dicts

def _resolve_image(value: Any, base_dirs: Sequence[Path]) -> Any:
    """An image value for a self-contained sharegpt dict: relative paths made absolute (first
    base dir that has the file), embedded bytes as a data URI, anything else as is."""
    if isinstance(value, dict):
        if value.get("bytes"):
            value = bytes(value["bytes"])
        elif value.get("path"):
            value = value["path"]
    if isinstance(value, (bytes, bytearray)):
        return "data:image;base64," + base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, str) and not value.startswith(("http://", "https://", "data:")):
        path = Path(value)
        if not path.is_absolute():
            for base in base_dirs:
                if (base / path).is_file():
                    return str((base / path).resolve())
    return value


def _flat(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(IMAGE_PLACEHOLDER if p["type"] == "image" else p["text"] for p in content)


def sharegpt_dict(row: Row) -> dict:
    """A row as a plain ``{"messages", "images", ...}`` dict (string contents with
    placeholders, self-contained image values) that the sharegpt row functions read."""
    out = {"messages": [{"role": m["role"], "content": _flat(m["content"])}
                        for m in row.messages],
           "images": [_resolve_image(v, row.base_dirs) for v in row.images],
           "id": row.id}
    for name in ("answer", "data_source") + _TEXT_FIELDS:
        if getattr(row, name) is not None:
            out[name] = getattr(row, name)
    return out


def read_rows(path: str | Path | RowSource, data_cfg: Any = None) -> Iterator[dict]:
    """Rows of one file in any layout as sharegpt dicts (``sharegpt_dict``); a bad row comes
    as ``{"__bad_row__": (reason, detail)}``, which ``row_messages`` raises as that ``BadRow``.
    An empty or unreadable file is a ``DataError`` naming it."""
    stats = SkipStats()
    table = open_tables([path], data_cfg, stats)[0]
    log.info("%s: %d rows, layout %s", table.source, len(table), table.layout)
    for i in range(len(table)):
        try:
            yield sharegpt_dict(table[i])
        except BadRow as bad:
            stats.skip(bad)          # logs the first few with their file:line
            yield {"__bad_row__": (bad.reason, bad.detail)}


__all__ = ["LAYOUTS", "BadRow", "DataError", "Row", "RowOptions", "RowSource", "RowTable",
           "SkipStats", "apply_system_prompt", "dataset_info_source", "detect_layout",
           "open_rows", "open_tables", "pair_texts", "prompt_messages", "read_rows", "row_messages",
           "row_example", "row_images", "row_sources", "sharegpt_dict", "tagged_student",
           "tagged_teacher"]
