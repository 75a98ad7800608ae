"""Megatron checkpoint (legacy or torch_dist, any TP/PP) -> HF safetensors directory."""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from prism_megatron.weights import ckpt_layout as lay
from prism_megatron.weights.errors import ConversionError, name_list
from prism_megatron.convert.fsutil import atomic_output_dir, check_output
from prism_megatron.convert.hf_io import HFShardWriter, copy_side_files, load_hf_config, parse_size
from prism_megatron.convert.families import get_family
from prism_megatron.weights.table import NameIndex, check_table_covers, expand, hf_reference_shapes


def open_megatron_checkpoint(megatron_dir: str | Path, hf_config_dir: str | Path | None = None):
    """``(reader, config, family, info, entries)`` for a Megatron checkpoint. The HF config comes
    from ``hf_config_dir`` when given, else from the copy the converter stored in the checkpoint."""
    ckpt = lay.resolve_checkpoint_dir(megatron_dir)
    config_dir = Path(hf_config_dir) if hf_config_dir else lay.checkpoint_root(ckpt) / lay.HF_CONFIG_DIR
    if not (config_dir / "config.json").is_file():
        raise ConversionError(f"no HF config.json in {config_dir}; pass --hf-config-dir with the "
                              f"original HF model's config")
    config = load_hf_config(config_dir)
    family = get_family(config.model_type)
    info = family.describe(config)
    entries = expand(family.rules, info)
    index = NameIndex(family.rules)
    if lay.detect_format(ckpt) == "legacy":
        from prism_megatron.weights.legacy import LegacyReader

        reader = LegacyReader(ckpt, index, info.pipelined_index)
    else:
        from prism_megatron.convert.torch_dist import TorchDistReader

        reader = TorchDistReader(ckpt, index, info)
    return reader, config, family, info, entries


def check_megatron_names(reader, info, entries) -> None:
    tied = info.tie_word_embeddings
    expected = {e.megatron for e in entries if not (e.rule.tied_to and tied)}
    # The last stage's copy of a tied embedding is expected with PP>1 and simply not exported.
    ignorable = {e.megatron for e in entries if e.rule.tied_to} if tied else set()
    present = set(reader.names())
    missing = expected - present
    unexpected = sorted(present - expected - ignorable) + list(reader.unexpected)
    problems = []
    if missing:
        problems.append(f"missing tensors: {name_list(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {name_list(unexpected)}")
    if getattr(reader, "incomplete", None):
        problems.append(f"tensors missing on some ranks: {name_list(reader.incomplete)}")
    if problems:
        raise ConversionError(f"{reader.dir} does not match the HF config's model — "
                              + "; ".join(problems))


def convert_megatron_to_hf(megatron_dir: str | Path, out: str | Path, *,
                           hf_config_dir: str | Path | None = None,
                           max_shard_size: str | int = "5GB", force: bool = False,
                           progress: bool = True) -> list[str]:
    """Convert; returns the safetensors shard names written."""
    check_output(out, force)
    reader, config, family, info, entries = open_megatron_checkpoint(megatron_dir, hf_config_dir)
    try:
        return _export(reader, config, family, info, entries, out, hf_config_dir,
                       max_shard_size, force, progress)
    finally:
        reader.close()


def _export(reader, config, family, info, entries, out, hf_config_dir, max_shard_size, force,
            progress) -> list[str]:
    check_megatron_names(reader, info, entries)
    reference = hf_reference_shapes(family, config)
    check_table_covers(family, entries, info, reference)
    by_name = {e.megatron: e for e in entries}
    dims = info.dims(padded_vocab_size=0)  # export strips padding, whatever TP padded to
    tied = info.tie_word_embeddings
    # Planned in the order the reader yields, so the writer can stream (see HFShardWriter).
    plan = [(h, reference[h], reader.dtype(name)) for name in reader.names()
            if not (by_name[name].rule.tied_to and tied) for h in by_name[name].hf]
    with atomic_output_dir(out, force) as tmp:
        writer = HFShardWriter(tmp, plan, parse_size(max_shard_size))
        total = len(reader.names())
        for name, shards in tqdm(reader.tensors(), total=total, desc="megatron->hf",
                                 unit="tensor", disable=not progress):
            entry = by_name[name]
            if entry.rule.tied_to and tied:
                continue
            try:
                hf_tensors = entry.rule.merge_to_hf(shards, dims)
            except RuntimeError as e:  # a reshape that does not fit the config's geometry
                raise ConversionError(
                    f"shape mismatch: {name} has TP shards of shape {tuple(shards[0].shape)}, "
                    f"which do not fit the HF config ({e})") from None
            for hf_name, t in zip(entry.hf, hf_tensors):
                if tuple(t.shape) != reference[hf_name]:
                    raise ConversionError(
                        f"shape mismatch: {name} gives {hf_name} of shape {tuple(t.shape)}, "
                        f"config.json implies {reference[hf_name]}")
                writer.add(hf_name, t)
        files = writer.close()
        if hf_config_dir:
            copy_side_files(hf_config_dir, tmp)
        else:
            copy_side_files(lay.checkpoint_root(reader.dir) / lay.HF_CONFIG_DIR, tmp)
    return files
