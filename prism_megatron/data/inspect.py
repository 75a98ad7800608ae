"""``prism data inspect FILE...``: what a data file holds and whether a stage can use it.

Per file: the detected layout, rows read, usable rows, skipped rows by reason, images per row
and, with ``--hf-dir``, token-length percentiles of prompts and responses (the processor of that
checkpoint, with the ``--min-pixels/--max-pixels`` budget). The rows are checked the way the
stage's loader checks them (``--stage sft|rl|align|warmup``; without it only the row itself and
its images). The last stdout line is one JSON object summed over the files:
``{"rows": R, "usable": U, "skipped": {...}, "layout": "...", "stage": "..."}``. A file the stage
cannot use (unreadable, no usable rows, more than ``--max-skip-fraction`` skipped) makes the
command exit 2 with one line naming it.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np

from prism_megatron.data.rows import (
    Row, RowOptions, RowSource, dataset_info_source, open_tables, pair_texts, prompt_messages,
    row_images, tagged_teacher)
from prism_megatron.data.sharegpt import BadRow, DataError, SkipStats
from prism_megatron.rewards.response import SYSTEM_PROMPT

STAGES = ("any", "sft", "rl", "align", "warmup")


def check_row(row: Row, stage: str, processor=None, *, max_prompt_length: int = 2048,
              max_response_length: int = 8192) -> tuple[int | None, int | None]:
    """Checks one row as ``stage`` would; returns (prompt tokens, response tokens) when a
    processor is given, else (None, None). ``BadRow`` when the stage could not use it."""
    images = row_images(row)
    response_text = None
    if stage == "sft":
        if not any(m["role"] == "assistant" for m in row.messages):
            raise BadRow("no_assistant", row.where)
        if processor is not None:
            from prism_megatron.data.encode import encode_conversation

            encoded = encode_conversation(processor, row.messages, images,
                                          max_prompt_length=max_prompt_length,
                                          max_response_length=10**9)
            return encoded.prompt_length, len(encoded.input_ids) - encoded.prompt_length
        return None, None
    if stage == "rl" and row.answer is None:
        raise BadRow("missing_answer", row.where)
    if stage == "align":
        for name in ("teacher_caption", "teacher_cot"):
            if getattr(row, name) is None:
                raise BadRow("missing_" + name, row.where)
        caption, cot = tagged_teacher(row.teacher_caption, row.teacher_cot, row.answer, row.where)
        response_text = f"{caption}\n{cot}"
    if stage == "warmup":
        response_text, _ = pair_texts(row)
    if stage == "rl":
        response_text = row.answer
    messages = prompt_messages(row)
    if processor is None:
        return None, None
    from prism_megatron.data.encode import encode_prompt

    prompt = len(encode_prompt(processor, messages, images).input_ids)
    if prompt > max_prompt_length:
        raise BadRow("prompt_too_long", f"{row.where}: {prompt} tokens")
    response = None if response_text is None else len(
        processor.tokenizer(response_text, add_special_tokens=False)["input_ids"])
    return prompt, response


def _percentiles(values: list[int]) -> str:
    if not values:
        return "n/a"
    p = np.percentile(np.asarray(values), [50, 90, 99])
    return f"p50 {p[0]:.0f}, p90 {p[1]:.0f}, p99 {p[2]:.0f}, max {max(values)}"


def inspect_source(source: str | RowSource, stage: str, processor=None, *,
                   max_prompt_length: int = 2048, out=None) -> SkipStats:
    """Reads every row of one source and prints its report; returns its counts."""
    out = out or sys.stdout
    stats = SkipStats()
    table = open_tables([source], None, stats)[0]
    prompt_lengths, response_lengths, images = [], [], []
    for i in range(len(table)):
        stats.seen += 1
        try:
            row = table[i]
            p, r = check_row(row, stage, processor, max_prompt_length=max_prompt_length)
        except BadRow as bad:
            stats.skipped[bad.reason] += 1
            continue
        images.append(len(row.images))
        if p is not None:
            prompt_lengths.append(p)
        if r is not None:
            response_lengths.append(r)
    reasons = ", ".join(f"{k}={v}" for k, v in sorted(stats.skipped.items())) or "none"
    print(f"{table.source}: layout {table.layout}; {stats.seen} rows read, {stats.usable} "
          f"usable for stage {stage}; skipped: {reasons}", file=out)
    if images:
        print(f"  images per row: min {min(images)}, mean {np.mean(images):.2f}, "
              f"max {max(images)}", file=out)
    if processor is None:
        print("  token lengths: skipped (give --hf-dir for the processor)", file=out)
    else:
        print(f"  prompt tokens: {_percentiles(prompt_lengths)}", file=out)
        print(f"  response tokens: {_percentiles(response_lengths)}", file=out)
    return stats


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prism data", description="Data tools.")
    sub = parser.add_subparsers(dest="tool", metavar="TOOL", required=True)
    p = sub.add_parser("inspect", help="layout, usable/skipped rows, token lengths of data files",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="*", metavar="FILE", help="JSONL / JSON / parquet data files")
    p.add_argument("--stage", choices=STAGES, default="any",
                   help="check the rows as this stage's loader does (default: the row and its "
                        "images only)")
    p.add_argument("--image-root", default="", help="base of relative image paths "
                   "(data.image_root)")
    p.add_argument("--media-dir", default="", help="LLaMA-Factory media_dir (data.media_dir)")
    p.add_argument("--dataset-info", default="", help="a LLaMA-Factory dataset_info.json")
    p.add_argument("--dataset", action="append", default=[],
                   help="dataset name in --dataset-info (repeatable)")
    p.add_argument("--hf-dir", default="", help="HF checkpoint whose processor measures tokens")
    p.add_argument("--min-pixels", type=int, default=None, help="pixel budget (data.min_pixels)")
    p.add_argument("--max-pixels", type=int, default=None, help="pixel budget (data.max_pixels)")
    p.add_argument("--max-prompt-length", type=int, default=2048)
    p.add_argument("--max-skip-fraction", type=float, default=0.01,
                   help="more skipped rows than this makes a file unusable (exit 2)")
    p.add_argument("--system-prompt", default=SYSTEM_PROMPT,
                   help="default system prompt for rows without one (data.system_prompt)")
    return parser


def run(args: argparse.Namespace, out=None) -> dict[str, Any]:
    out = out or sys.stdout
    options = RowOptions(system_prompt=args.system_prompt, image_root=args.image_root,
                         media_dir=args.media_dir)
    sources: list[Any] = [RowSource(f, options) for f in args.files]
    if args.dataset and not args.dataset_info:
        raise DataError("--dataset needs --dataset-info (the dataset_info.json that has it)")
    sources += [dataset_info_source(args.dataset_info, name, options) for name in args.dataset]
    if not sources:
        raise DataError("nothing to inspect: give FILE... or --dataset-info PATH --dataset NAME")
    processor = None
    if args.hf_dir:
        from prism_megatron.data.encode import load_processor

        processor = load_processor(args.hf_dir, args.min_pixels, args.max_pixels)
    total, problems = SkipStats(), []
    for source in sources:
        stats = SkipStats()
        try:
            stats = inspect_source(source, args.stage, processor,
                                   max_prompt_length=args.max_prompt_length, out=out)
            stats.check(args.max_skip_fraction, f"{source} for stage {args.stage}")
        except DataError as exc:
            problems.append(str(exc))
            print(f"{source}: {exc}", file=out)
        total.merge(stats)
    summary = dict(total.as_dict(), stage=args.stage)
    print(json.dumps(summary), file=out)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise DataError(problems[0] + more)
    return summary


def cli(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    run(args)
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return cli(sys.argv[1:] if argv is None else argv)
    except DataError as exc:
        print(f"prism data: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
