"""Trainer -> rollout engine weight sync: Megatron parameters as HF-named tensors, in buckets.

The names and the TP merge rules come from the one conversion mapping
(``prism_megatron/models/<family>/mapping.py`` through ``prism_megatron.convert``): this module
only walks the table, gathers and moves tensors, it has no name table of its own.

Data flow (call ``sync_weights`` on EVERY rank; it is a collective):

* each tensor of the table, in table order, is handled by the pipeline stage that owns it;
  tensor-parallel shards are all-gathered on the TP group and merged by the mapping's rule into
  HF tensors (QKV split, SwiGLU split, vocab padding stripped);
* stages other than the first send their HF tensors to the first stage's TP rank 0 (point to
  point on the pipeline group), which is the only rank that talks to the engine;
* that rank packs tensors into buckets of at most ``bucket_mb`` (one larger tensor travels
  alone) and pushes each bucket to the engine (``update_weights``) or writes it as a safetensors
  shard of a directory that the engine then reloads (``update_weights_from_disk``).

Memory: besides the model, at most one bucket plus the gathered shards and HF tensors of one
parameter exist at a time; no second copy of the model is built. (Transports add transient
copies of that one bucket: the CPU server's base64 safetensors body, or a safetensors file.) Data-parallel replicas other
than the first only take part in the final barrier (they hold the same weights).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from prism_megatron.models import unwrap_model
from prism_megatron.rollout.base import RolloutError

log = logging.getLogger(__name__)

_HEADER = 8   # int64 header of a pipeline transfer: dtype code, ndim, up to 6 dims
_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32,
           torch.uint8, torch.int8, torch.bool]


@dataclass
class SyncStats:
    tensors: int = 0
    bytes: int = 0
    buckets: int = 0
    max_bucket_bytes: int = 0
    seconds: float = 0.0

    def __str__(self) -> str:
        return (f"{self.tensors} tensors, {self.bytes / 2**20:.1f} MiB in {self.buckets} bucket(s) "
                f"(largest {self.max_bucket_bytes / 2**20:.1f} MiB), {self.seconds:.2f}s")


@dataclass(frozen=True)
class _Groups:
    """This rank's place in megatron's parallel layout (all trivial without torch.distributed)."""

    tp_group: object
    pp_group: object
    tp_rank: int
    pp_rank: int
    pp_size: int
    dp_rank: int
    pp_first_global: int

    @property
    def sender(self) -> bool:
        """The one rank that gets every HF tensor and talks to the engine."""
        return self.dp_rank == 0 and self.tp_rank == 0 and self.pp_rank == 0

    @classmethod
    def current(cls) -> "_Groups":
        if not dist.is_initialized():
            return cls(None, None, 0, 0, 1, 0, 0)
        from megatron.core import parallel_state as ps

        pp_group = ps.get_pipeline_model_parallel_group()
        return cls(ps.get_tensor_model_parallel_group(), pp_group,
                   ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
                   ps.get_pipeline_model_parallel_world_size(), ps.get_data_parallel_rank(),
                   dist.get_process_group_ranks(pp_group)[0])


def is_sender() -> bool:
    """Whether this rank receives the HF tensors (and should own the engine client)."""
    return _Groups.current().sender


class _Plan:
    """The mapping table expanded for this model and this rank's pipeline stage."""

    def __init__(self, model, hf_config, groups: _Groups):
        from prism_megatron.weights.layout import PipelineLayout
        from prism_megatron.convert.families import get_family
        from prism_megatron.weights.table import expand, fill

        family = get_family(getattr(hf_config, "model_type", None))
        self.info = family.describe(hf_config)
        self.dims = self.info.dims(padded_vocab_size=0)   # export: padding rows are stripped
        tied = self.info.tie_word_embeddings
        self.entries = [e for e in expand(family.rules, self.info) if not (e.rule.tied_to and tied)]
        self.params = {n: p for n, p in unwrap_model(model).named_parameters()}
        pipelined = self.info.pipelined_index
        # Decoder layers on this stage: distinct indices after e.g. "language_model.decoder.layers."
        prefix = next(e.rule.megatron for e in self.entries if e.placeholder == pipelined).split("{")[0]
        local_layers = len({n[len(prefix):].split(".")[0] for n in self.params
                            if n.startswith(prefix) and n[len(prefix):].split(".")[0].isdigit()})
        counts = [local_layers] * groups.pp_size
        if groups.pp_size > 1:
            dist.all_gather_object(counts, local_layers, group=groups.pp_group)
        self.layout = PipelineLayout(tuple(counts), pipelined)
        self._fill = fill

    def stage(self, entry) -> int:
        return self.layout.stage_of(entry)

    def local_names(self, entry) -> list[str]:
        """The entry's canonical name and aliases as this stage's module names them."""
        if entry.placeholder is None:
            return [entry.rule.megatron, *entry.rule.aliases]
        index = entry.index
        if entry.placeholder == self.layout.pipelined:
            index -= self.layout.offset(self.stage(entry))
        return [self._fill(p, entry.placeholder, index) for p in (entry.rule.megatron, *entry.rule.aliases)]

    def check(self, pp_rank: int, tied: bool) -> str:
        """'' or what does not fit between this stage's parameters and the mapping table."""
        used, missing = set(), []
        for e in self.entries:
            if self.stage(e) != pp_rank:
                continue
            found = [n for n in self.local_names(e) if n in self.params]
            used.update(found)
            if not found:
                missing.append(self.local_names(e)[0])
        # Megatron's last-stage copy of a tied embedding has no HF tensor of its own.
        extra = sorted(n for n in self.params if n not in used
                       and not (tied and n.endswith("output_layer.weight")))
        problems = []
        if missing:
            problems.append(f"stage {pp_rank} lacks {len(missing)} mapped parameter(s): "
                            f"{', '.join(missing[:6])}")
        if extra:
            problems.append(f"stage {pp_rank} has {len(extra)} parameter(s) the mapping does not "
                            f"export (the engine would keep stale values): {', '.join(extra[:6])}")
        return "; ".join(problems)


def iter_hf_tensors(model, hf_config) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, tensor)`` for the whole model on the sender rank; collective.

    Every rank of the model must iterate it to the end (other ranks yield nothing).
    """
    groups = _Groups.current()
    if groups.dp_rank != 0:
        return
    plan = _Plan(model, hf_config, groups)
    problem = plan.check(groups.pp_rank, plan.info.tie_word_embeddings)
    problems = [problem]
    if dist.is_initialized():   # every rank of this model replica fails together, none hangs
        from megatron.core import parallel_state as ps

        group = ps.get_model_parallel_group()
        problems = [None] * dist.get_world_size(group)
        dist.all_gather_object(problems, problem, group=group)
    problems = [p for p in problems if p]
    if problems:
        raise RolloutError("the Megatron model does not match the conversion mapping: "
                           + " | ".join(dict.fromkeys(problems)))
    device = next(iter(plan.params.values())).device
    for entry in plan.entries:
        stage = plan.stage(entry)
        if stage == groups.pp_rank:
            name = next(n for n in plan.local_names(entry) if n in plan.params)
            hf = _merge(entry, plan.params[name].detach(), plan.dims, groups)
            if hf is None:
                continue
            if stage == 0:
                yield from zip(entry.hf, hf)
            else:
                for t in hf:
                    _send(t, groups)
        elif groups.pp_rank == 0 and groups.tp_rank == 0:
            for hf_name in entry.hf:
                yield hf_name, _recv(stage, groups, device)


def _merge(entry, local: torch.Tensor, dims, groups: _Groups) -> list[torch.Tensor] | None:
    """HF tensors of one parameter on TP rank 0 (None on the other TP ranks)."""
    if entry.rule.kind == "replicated" or groups.tp_group is None or \
            dist.get_world_size(groups.tp_group) == 1:
        shards = [local]
    else:
        shards = [torch.empty_like(local) for _ in range(dist.get_world_size(groups.tp_group))]
        dist.all_gather(shards, local.contiguous(), group=groups.tp_group)
    if groups.tp_rank != 0:
        return None
    return entry.rule.merge_to_hf(shards, dims)


def _send(t: torch.Tensor, groups: _Groups) -> None:
    if groups.tp_rank != 0:
        return
    header = torch.zeros(_HEADER, dtype=torch.long, device=t.device)
    header[0], header[1] = _DTYPES.index(t.dtype), t.dim()
    header[2:2 + t.dim()] = torch.tensor(t.shape)
    dist.send(header, dst=groups.pp_first_global, group=groups.pp_group)
    dist.send(t.contiguous(), dst=groups.pp_first_global, group=groups.pp_group)


def _recv(stage: int, groups: _Groups, device) -> torch.Tensor:
    src = dist.get_process_group_ranks(groups.pp_group)[stage]
    header = torch.empty(_HEADER, dtype=torch.long, device=device)
    dist.recv(header, src=src, group=groups.pp_group)
    ndim = int(header[1])
    t = torch.empty(header[2:2 + ndim].tolist(), dtype=_DTYPES[int(header[0])], device=device)
    dist.recv(t, src=src, group=groups.pp_group)
    return t


def iter_buckets(named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
                 ) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group tensors into lists of at most ``bucket_bytes`` (a larger tensor goes alone)."""
    bucket, size = [], 0
    for name, t in named:
        nbytes = t.numel() * t.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += nbytes
    if bucket:
        yield bucket


def sync_weights(model, engine, hf_config, *, bucket_mb: float = 512, mode: str = "tensor",
                 disk_dir: str | Path | None = None, hf_dir: str | Path | None = None
                 ) -> SyncStats | None:
    """Push the trainer's current weights to ``engine``; call on every rank (collective).

    ``engine`` is only used on the sender rank (``is_sender()``); pass None elsewhere.
    ``mode="tensor"``: one ``engine.update_weights(bucket)`` per bucket. ``mode="disk"``: the
    buckets become safetensors shards of ``disk_dir`` (with an index and ``hf_dir``'s config /
    tokenizer files, so any HF loader or SGLang reads it), then ``engine.update_weights_from_disk``.
    Returns the stats on the sender rank, None elsewhere.
    """
    if mode not in ("tensor", "disk"):
        raise RolloutError(f"weight sync mode {mode!r} is not one of ['tensor', 'disk']")
    if mode == "disk" and disk_dir is None:
        raise RolloutError("weight sync mode 'disk' needs disk_dir")
    groups = _Groups.current()
    sender = groups.sender
    if sender and engine is None:
        raise RolloutError("sync_weights: the sender rank (dp0/tp0/pp0) needs the engine")
    stats, t0 = SyncStats(), time.time()
    out = Path(disk_dir) if disk_dir is not None else None
    weight_map: dict[str, str] = {}
    if sender and out is not None:
        _prepare_dir(out, hf_dir)
    # one weight-update session spans every bucket (SGLang runs its post-load hooks at the end)
    opener = getattr(engine, "weight_update_session", None) if sender and mode == "tensor" else None
    session = opener() if opener is not None else nullcontext()
    with session:
        for bucket in iter_buckets(iter_hf_tensors(model, hf_config), int(bucket_mb * 2**20)):
            nbytes = sum(t.numel() * t.element_size() for _, t in bucket)
            stats.tensors += len(bucket)
            stats.bytes += nbytes
            stats.buckets += 1
            stats.max_bucket_bytes = max(stats.max_bucket_bytes, nbytes)
            if mode == "tensor":
                engine.update_weights(bucket)
            else:
                weight_map.update(_write_shard(out, stats.buckets, bucket))
            if stats.buckets % 20 == 0:
                log.info("weight sync: %d buckets, %.1f MiB so far", stats.buckets,
                         stats.bytes / 2**20)
    if sender and mode == "disk":
        index = {"metadata": {"total_size": stats.bytes}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
        engine.update_weights_from_disk(out)
    if dist.is_initialized():
        dist.barrier()   # nobody runs ahead (e.g. into the next rollout) before the engine has them
    if not sender:
        return None
    stats.seconds = time.time() - t0
    log.info("weight sync (%s): %s", mode, stats)
    return stats


def _prepare_dir(out: Path, hf_dir: str | Path | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for old in list(out.glob("*.safetensors")) + list(out.glob("*.safetensors.index.json")):
        old.unlink()
    if hf_dir is not None:   # config, tokenizer, processor: a complete HF directory
        for f in Path(hf_dir).iterdir():
            if f.is_file() and not f.name.endswith((".safetensors", ".index.json", ".bin", ".pt")):
                shutil.copy2(f, out / f.name)


def _write_shard(out: Path, k: int, bucket) -> dict[str, str]:
    from safetensors.torch import save_file

    name = f"model-sync-{k:05d}.safetensors"
    tensors = {n: t.detach().to("cpu").contiguous().clone() for n, t in bucket}
    save_file(tensors, str(out / name), metadata={"format": "pt"})
    return {n: name for n in tensors}
