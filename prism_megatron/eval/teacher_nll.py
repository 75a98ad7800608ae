"""Distance to the teacher distribution, independent of the discriminator: the mean per-token NLL
of held-out demonstrations under a policy (an HF Qwen3-VL directory), per segment.

The demonstrations are rebuilt from the held-out rows' ``meta`` (the synthetic task's
``test.jsonl``, whose grids occur in no training split): the *teacher* demonstration is exactly
what ``data/synthetic.py`` writes for the ``sft_teacher``/``align`` splits (dense caption,
step-by-step reasoning, the true answer), the *public* one what it writes for ``sft_public`` (thin
caption, skipped steps, sometimes a miscount; drawn from a stream seeded by the row id, so the same
text for every policy). Each demonstration is encoded as an SFT sample (``encode_conversation``:
prompt ids + response ids + end-of-turn) and scored teacher-forced; response tokens are split at the
spec §2.3 boundary: a token that starts before the end of ``</caption>`` is a caption token, the
rest of the response text is reasoning (think + answer), and the end-of-turn token counts only in
``all``. Means are over tokens (micro), not over rows.

Memory: rows are left-padded so every response ends at the last position, and the model keeps
only the logits of the last ``max response + 1`` positions (``logits_to_keep``): a batch costs
``rows x response tokens x vocab`` floats, not ``x sequence``, at 4B/8B vocabularies too.

Command line (the demo runs it once for all its policies): ``python -m
prism_megatron.eval.teacher_nll --rows test.jsonl --limit 64 --policy DIR --out FILE.json``
(``--policy``/``--out`` repeated; a Megatron checkpoint directory is exported to HF first, next to
its ``--out``, with ``--hf-config`` giving the processor and config.)
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from prism_megatron.data.synthetic import public_response, solve, teacher_caption, teacher_think
from prism_megatron.rewards.response import format_response
from prism_megatron.eval.fidelity import question_from_meta
from prism_megatron.rewards.response import split_segments

__all__ = ["Demo", "demonstrations", "segment_masks", "teacher_nll", "teacher_nll_for_dir"]

KINDS = ("teacher", "public")
SEGMENTS = ("caption", "reasoning", "all")


@dataclass(frozen=True)
class Demo:
    """One held-out prompt with its two demonstrations."""

    id: str
    messages: list            # prompt turns (system prompt rule applied)
    images: list              # decoded images
    teacher: str
    public: str


def demonstrations(path, limit: int | None = None, data_cfg=None) -> list[Demo]:
    """The first ``limit`` rows of ``path`` that have a synthetic ``meta`` and readable images."""
    from prism_megatron.data.rows import open_tables, prompt_messages, row_images
    from prism_megatron.data.sharegpt import BadRow, DataError

    table = open_tables([path], data_cfg)[0]
    demos: list[Demo] = []
    for i in range(len(table)):
        meta = table.raw(i).get("meta")
        if not isinstance(meta, dict) or "grid" not in meta:
            continue
        try:
            row = table[i]
            messages, images = prompt_messages(row), row_images(row)
        except BadRow:
            continue
        grid, question = question_from_meta(meta)
        answer = solve(question, {c: sum(x == c for r in grid for x in r)
                                  for c in ("red", "green", "blue", "yellow")})
        teacher = format_response(teacher_caption(grid), teacher_think(question, grid), answer)
        public, _ = public_response(random.Random(f"prism-teacher-nll:{row.id}"), question, grid)
        demos.append(Demo(row.id, messages, images, teacher, public))
        if limit and len(demos) >= limit:
            break
    if not demos:
        raise DataError(f"{path}: no rows with a synthetic-task meta (grid + question) to build "
                        "demonstrations from")
    return demos


def segment_masks(tokenizer, text: str, response_ids: Sequence[int]) -> dict[str, list[bool]]:
    """Which response tokens (``text`` + end-of-turn, as ``encode_conversation`` tokenises it) are
    caption / reasoning / any."""
    end_of_turn = tokenizer.eos_token or "<|im_end|>"
    enc = tokenizer(text + end_of_turn, add_special_tokens=False, return_offsets_mapping=True)
    if list(enc["input_ids"]) != list(response_ids):
        raise ValueError("response tokens differ from the SFT encoding's; cannot place segments")
    cut = split_segments(text).caption_end
    starts = [start for start, _ in enc["offset_mapping"]]
    n = len(starts)
    caption = [s < cut for s in starts]
    reasoning = [not caption[i] and starts[i] < len(text) for i in range(n)]
    if n:       # the end-of-turn token: only in "all"
        reasoning[-1] = False
    return {"caption": caption, "reasoning": reasoning, "all": [True] * n}


def _encode(processor, demo: Demo, text: str):
    from prism_megatron.data.encode import encode_conversation

    messages = [*demo.messages, {"role": "assistant", "content": text}]
    encoded = encode_conversation(processor, messages, demo.images, max_prompt_length=1 << 30,
                                  max_response_length=1 << 30)
    response = encoded.input_ids[encoded.trainable].tolist()
    return encoded, segment_masks(processor.tokenizer, text, response)


def teacher_nll(model, processor, demos: Sequence[Demo], *, batch_size: int = 8) -> dict:
    """``{kind: {segment: mean NLL, segment + "_tokens": count}}`` for kind in teacher/public."""
    import torch

    pad = processor.tokenizer.pad_token_id or 0
    image_token = model.config.image_token_id
    device = next(model.parameters()).device
    out = {}
    for kind in KINDS:
        sums = {s: 0.0 for s in SEGMENTS}
        counts = {s: 0 for s in SEGMENTS}
        for start in range(0, len(demos), batch_size):
            chunk = [_encode(processor, d, getattr(d, kind))
                     for d in demos[start:start + batch_size]]
            width = max(len(e.input_ids) for e, _ in chunk)
            keep = max(int(e.trainable.sum()) for e, _ in chunk) + 1
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            attn = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, (e, _) in enumerate(chunk):   # left padding: every response ends at the end
                ids[i, width - len(e.input_ids):] = e.input_ids
                attn[i, width - len(e.input_ids):] = 1
            pixels = [e.pixel_values for e, _ in chunk if e.pixel_values is not None]
            grids = [e.image_grid_thw for e, _ in chunk if e.image_grid_thw is not None]
            kwargs = {}
            if grids:
                kwargs = {"pixel_values": torch.cat(pixels).to(device, model.dtype),
                          "image_grid_thw": torch.cat(grids).to(device),
                          "mm_token_type_ids": (ids == image_token).int().to(device)}
            with torch.no_grad():
                logits = model(input_ids=ids.to(device), attention_mask=attn.to(device),
                               logits_to_keep=keep, **kwargs).logits
            for i, (e, masks) in enumerate(chunk):
                n = int(e.trainable.sum())
                # logits[:, j] predict token width - keep + j + 1: the last n+1 rows predict the
                # response's n tokens (the last logit, after end-of-turn, is unused)
                row_logits = logits[i, keep - 1 - n:keep - 1].float()
                targets = ids[i, width - n:].to(device)
                nll = -torch.log_softmax(row_logits, -1).gather(-1, targets[:, None])[:, 0]
                for s in SEGMENTS:
                    mask = torch.tensor(masks[s], device=device)
                    sums[s] += float(nll[mask].sum())
                    counts[s] += int(mask.sum())
        out[kind] = {**{s: sums[s] / counts[s] if counts[s] else None for s in SEGMENTS},
                     **{f"{s}_tokens": counts[s] for s in SEGMENTS}}
    return out


def teacher_nll_for_dir(hf_dir, demos: Sequence[Demo], *, batch_size: int = 8,
                        device: str = "cpu", processor=None) -> dict:
    """:func:`teacher_nll` of the policy in an HF directory (transformers' Qwen3-VL, fp32)."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    from prism_megatron.data.encode import load_processor

    processor = processor or load_processor(hf_dir)
    model = Qwen3VLForConditionalGeneration.from_pretrained(str(hf_dir), dtype=torch.float32)
    model = model.to(device).eval()
    try:
        return teacher_nll(model, processor, demos, batch_size=batch_size)
    finally:
        del model


def _policy_hf(policy: Path, out: Path, hf_config: str | None) -> Path:
    """An HF directory for ``policy``: itself, or its Megatron checkpoint exported beside ``out``."""
    if (policy / "config.json").is_file():
        return policy
    from prism_megatron.convert.megatron_to_hf import convert_megatron_to_hf

    target = out.parent / f"{out.stem}_hf"
    convert_megatron_to_hf(policy, target, hf_config_dir=hf_config, force=True, progress=False)
    return target


def cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m prism_megatron.eval.teacher_nll",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", required=True, help="held-out rows with synthetic meta")
    parser.add_argument("--limit", type=int, default=64)
    parser.add_argument("--hf-config", default=None,
                        help="HF dir with the processor/config (for Megatron checkpoints)")
    parser.add_argument("--policy", action="append", required=True,
                        help="HF dir or Megatron checkpoint dir (repeat)")
    parser.add_argument("--out", action="append", required=True, help="JSON file per --policy")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    if len(args.policy) != len(args.out):
        parser.error(f"{len(args.policy)} --policy but {len(args.out)} --out")
    from prism_megatron.data.encode import load_processor

    processor = load_processor(args.hf_config or args.policy[0])
    demos = demonstrations(args.rows, args.limit)
    for policy, out in zip(args.policy, args.out):
        out = Path(out)
        hf = _policy_hf(Path(policy), out, args.hf_config)
        result = teacher_nll_for_dir(hf, demos, batch_size=args.batch_size, processor=processor)
        result.update(policy=str(policy), rows=len(demos), source=str(args.rows))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        t = result["teacher"]
        print(f"{policy}: teacher NLL caption {t['caption']:.3f} reasoning {t['reasoning']:.3f}; "
              f"public all {result['public']['all']:.3f} ({len(demos)} rows) -> {out}", flush=True)


if __name__ == "__main__":
    import sys

    from prism_megatron.errors import run_cli

    sys.exit(run_cli(cli, name="teacher_nll"))
