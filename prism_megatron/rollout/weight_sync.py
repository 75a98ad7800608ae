"""Trainer -> rollout engine weight sync: Megatron parameters as HF-named tensors, in buckets.

The names and the TP merge rules come from the one conversion mapping
(``prism_megatron/models/<family>/mapping.py`` through ``prism_megatron.convert``): this module
only walks the table, gathers and moves tensors, it has no name table of its own. The plan (the
table expanded for this model, each entry's stage and local parameter) is built and checked on
the first sync and reused until the layout changes (``plan_for``).

Data flow (call ``sync_weights`` on EVERY rank; it is a collective):

* each tensor of the table, in table order, is handled by the pipeline stage that owns it;
  tensor-parallel shards are all-gathered on the TP group (within the stage) and merged by the
  mapping's rule into HF tensors (QKV split, SwiGLU split, vocab padding stripped);
* ``tensor`` / ``disk``: stages other than the first send their HF tensors to the first stage's
  TP rank 0 (point to point on the pipeline group), the only rank that talks to the engine; it
  packs buckets of at most ``bucket_mb`` (one larger tensor travels alone) and pushes each
  (``update_weights``: CUDA-IPC handles to SGLang, base64 safetensors to the CPU server) or
  writes it as a safetensors shard of a directory the engine then reloads;
* ``distributed`` (SGLang servers anywhere): every stage's tp0 rank of data-parallel replica 0
  is a sender of its OWN stage's buckets. Once per server and sender it opens a process group
  with all servers' TP ranks (``/init_weights_update_group``, ``groups.join_group``; NCCL on
  GPUs, gloo on CPU); per bucket each server is asked to receive (``/update_weights_from_
  distributed``, SGLang's ``flattened_bucket``) while the sender broadcasts the flattened bytes.
  Rank 0 opens one weight-update session around all stages' buckets; at PP > 1 a lock in a TCP
  store hosted by rank 0 lets one stage broadcast at a time (two stages' buckets reaching two
  servers in different orders would deadlock; slime takes the same lock). So the busiest rank
  moves its stage's share of the model, never the whole model (at PP1 that share is all of it).
* ``auto``: the engine's ``preferred_weight_sync()`` on rank 0: ``tensor`` for the in-process
  engine and servers on this node, ``distributed`` for servers reached at another host.

After a sync, ``check_tensors`` tensors per sending rank (spread over its send order) are read
back (``get_weights_by_name``: the first ``CHECK_ROWS`` rows, every server) and compared with what
was sent; a difference raises ``WeightUpdateError``. Each sending rank logs its tensors, bytes,
buckets, seconds and GB/s.

Memory: besides the model, at most one bucket plus the gathered shards and HF tensors of one
parameter exist at a time; no second copy of the model is built. (Transports add transient
copies of that one bucket: the flattened broadcast buffer, the CPU server's base64 body, or a
safetensors file.) Data-parallel replicas other than the first only take part in the final
barrier (they hold the same weights).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import weakref
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from prism_megatron.distributed import free_port
from prism_megatron.models import unwrap_model
from prism_megatron.rollout.base import RolloutError

log = logging.getLogger(__name__)

_HEADER = 8   # int64 header of a pipeline transfer: dtype code, ndim, up to 6 dims
_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32,
           torch.uint8, torch.int8, torch.bool]


@dataclass
class SyncStats:
    """What one rank sent in one sync."""

    mode: str = ""
    rank: int = 0
    tensors: int = 0
    bytes: int = 0
    buckets: int = 0
    max_bucket_bytes: int = 0
    seconds: float = 0.0
    checked: int = 0            # tensors read back from the engine and compared

    def __str__(self) -> str:
        rate = self.bytes / self.seconds / 1e9 if self.seconds else 0.0
        return (f"{self.tensors} tensors, {self.bytes / 2**20:.1f} MiB in {self.buckets} bucket(s) "
                f"(largest {self.max_bucket_bytes / 2**20:.1f} MiB), {self.seconds:.2f}s "
                f"({rate:.3f} GB/s), {self.checked} spot-checked")


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
    tp_size: int = 1

    @property
    def sender(self) -> bool:
        """The one rank that gets every HF tensor and talks to the engine."""
        return self.dp_rank == 0 and self.tp_rank == 0 and self.pp_rank == 0

    @property
    def stage_sender(self) -> bool:
        """The rank that sends its pipeline stage's tensors in the distributed mode (tp0 of
        data-parallel replica 0; the senders of all stages form that replica's tp0 PP group)."""
        return self.dp_rank == 0 and self.tp_rank == 0

    @classmethod
    def current(cls) -> "_Groups":
        if not dist.is_initialized():
            return cls(None, None, 0, 0, 1, 0, 0)
        from megatron.core import parallel_state as ps

        pp_group = ps.get_pipeline_model_parallel_group()
        return cls(ps.get_tensor_model_parallel_group(), pp_group,
                   ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
                   ps.get_pipeline_model_parallel_world_size(), ps.get_data_parallel_rank(),
                   dist.get_process_group_ranks(pp_group)[0],
                   ps.get_tensor_model_parallel_world_size())


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
        self.hf_config = hf_config
        self.items: list = []      # (entry, stage, this stage's parameter or None), table order
        self.builds = 1

    def resolve(self, pp_rank: int) -> None:
        """Each entry's stage and, on its own stage, the parameter (once per plan)."""
        self.items = []
        for e in self.entries:
            stage = self.stage(e)
            param = None
            if stage == pp_rank:
                param = self.params[next(n for n in self.local_names(e) if n in self.params)]
            self.items.append((e, stage, param))

    def hf_names(self, stage: int | None = None) -> list[str]:
        """The HF names in send order: of one stage, or of the whole model (None)."""
        return [h for e, st, _ in self.items if stage is None or st == stage for h in e.hf]

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


_PLANS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _layout_key(module, groups: _Groups) -> tuple:
    # a replaced Parameter object (not just new .data) also rebuilds: the plan holds them
    return (groups.pp_size, groups.tp_size,
            tuple((n, tuple(p.shape), id(p)) for n, p in module.named_parameters()))


def plan_for(model, hf_config, groups: _Groups | None = None) -> "_Plan":
    """The mapping plan of ``model`` on this rank: built (and checked against the mapping) on
    the first sync, reused while the layout (parameter names and shapes, TP/PP sizes) stays the
    same, rebuilt on every rank of the replica as soon as one rank sees a change. Collective
    over the model-parallel group of data-parallel replica 0."""
    groups = groups or _Groups.current()
    module = unwrap_model(model)
    key = _layout_key(module, groups)
    cached = _PLANS.get(module)
    stale = cached is None or cached[0] != key or cached[1].hf_config is not hf_config
    if dist.is_initialized():   # all ranks rebuild together (the build is collective)
        from megatron.core import parallel_state as ps

        group = ps.get_model_parallel_group()
        flags = [None] * dist.get_world_size(group)
        dist.all_gather_object(flags, stale, group=group)
        stale = any(flags)
    if not stale:
        return cached[1]
    plan = _Plan(module, hf_config, groups)
    problem = plan.check(groups.pp_rank, plan.info.tie_word_embeddings)
    problems = [problem]
    if dist.is_initialized():   # every rank of this model replica fails together, none hangs
        problems = [None] * dist.get_world_size(group)
        dist.all_gather_object(problems, problem, group=group)
    problems = [p for p in problems if p]
    if problems:
        raise RolloutError("the Megatron model does not match the conversion mapping: "
                           + " | ".join(dict.fromkeys(problems)))
    plan.resolve(groups.pp_rank)
    plan.builds = (cached[1].builds if cached else 0) + 1
    _PLANS[module] = (key, plan)
    return plan


def iter_hf_tensors(model, hf_config, *, local: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, tensor)`` on the sender rank; collective.

    ``local=False``: the whole model on dp0/tp0/pp0 (the other stages send theirs to it).
    ``local=True``: each pipeline stage's own tensors on that stage's tp0 (nothing crosses
    stages). Every rank of the model must iterate it to the end (other ranks yield nothing).
    """
    groups = _Groups.current()
    if groups.dp_rank != 0:
        return
    yield from _iter(plan_for(model, hf_config, groups), groups, local)


def _iter(plan: "_Plan", groups: _Groups, local: bool) -> Iterator[tuple[str, torch.Tensor]]:
    device = next(iter(plan.params.values())).device
    for entry, stage, param in plan.items:
        if stage == groups.pp_rank:
            hf = _merge(entry, param.detach(), plan.dims, groups)
            if hf is None:
                continue
            if stage == 0 or local:
                yield from zip(entry.hf, hf)
            else:
                for t in hf:
                    _send(t, groups)
        elif not local and groups.pp_rank == 0 and groups.tp_rank == 0:
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


MODES = ("tensor", "distributed", "disk")     # and "auto": the engine's preferred_weight_sync()
CHECK_ROWS = 4      # rows of each spot-checked tensor that the engine reports (truncate_size)


def sync_weights(model, engine, hf_config, *, bucket_mb: float = 512, mode: str = "tensor",
                 disk_dir: str | Path | None = None, hf_dir: str | Path | None = None,
                 check_tensors: int = 0) -> SyncStats | None:
    """Push the trainer's current weights to ``engine``; call on every rank (collective).

    ``engine`` is only used on the sender rank (``is_sender()``); pass None elsewhere.
    ``mode="tensor"``: one ``engine.update_weights(bucket)`` per bucket. ``mode="disk"``: the
    buckets become safetensors shards of ``disk_dir`` (with an index and ``hf_dir``'s config /
    tokenizer files, so any HF loader or SGLang reads it), then ``engine.update_weights_from_disk``.
    ``mode="distributed"`` (SGLang servers): every pipeline stage's tp0 rank broadcasts its own
    stage's buckets into a process group it shares with the servers (see the module doc).
    ``check_tensors`` > 0: afterwards that many tensors per sending rank are read back from the
    engine (``get_weights_by_name``) and compared with what was sent; a difference raises
    ``WeightUpdateError``. Returns the stats on the sending rank(s), None elsewhere.
    """
    if mode == "auto":
        mode = resolve_mode(engine)
    if mode not in MODES:
        raise RolloutError(f"weight sync mode {mode!r} is not one of {['auto', *MODES]}")
    if mode == "disk" and disk_dir is None:
        raise RolloutError("weight sync mode 'disk' needs disk_dir")
    groups = _Groups.current()
    sender = groups.sender
    if sender and engine is None:
        raise RolloutError("sync_weights: the sender rank (dp0/tp0/pp0) needs the engine")
    if mode == "distributed":
        return _sync_distributed(model, engine, hf_config, groups, int(bucket_mb * 2**20),
                                 check_tensors)
    stats, t0 = SyncStats(mode=mode, rank=_rank()), time.time()
    out = Path(disk_dir) if disk_dir is not None else None
    weight_map: dict[str, str] = {}
    plan = plan_for(model, hf_config, groups) if groups.dp_rank == 0 else None
    picks = _pick(plan.hf_names(), check_tensors) if sender else set()
    samples: dict[str, torch.Tensor] = {}
    if sender and out is not None:
        _prepare_dir(out, hf_dir)
    # one weight-update session spans every bucket (SGLang runs its post-load hooks at the end)
    opener = getattr(engine, "weight_update_session", None) if sender and mode == "tensor" else None
    session = opener() if opener is not None else nullcontext()
    with session:
        tensors = _iter(plan, groups, local=False) if plan is not None else iter(())
        for bucket in iter_buckets(tensors, int(bucket_mb * 2**20)):
            _count(stats, bucket, picks, samples)
            if mode == "tensor":
                engine.update_weights(bucket)
            else:
                weight_map.update(_write_shard(out, stats.buckets, bucket))
    if sender and mode == "disk":
        index = {"metadata": {"total_size": stats.bytes}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
        engine.update_weights_from_disk(out)
    if sender:
        stats.checked = spot_check(engine, samples)
    if dist.is_initialized():
        dist.barrier()   # nobody runs ahead (e.g. into the next rollout) before the engine has them
    if not sender:
        return None
    stats.seconds = time.time() - t0
    log.info("weight sync (%s): rank %d sent %s", mode, stats.rank, stats)
    return stats


def resolve_mode(engine) -> str:
    """``auto`` -> the sender's engine's ``preferred_weight_sync()``, the same on every rank
    (broadcast from rank 0, the sender; collective)."""
    box = [engine.preferred_weight_sync() if engine is not None else None]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    if box[0] is None:
        raise RolloutError("rollout.weight_sync=auto: rank 0 has no engine to choose by")
    return box[0]


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _count(stats: SyncStats, bucket, picks: set[str], samples: dict) -> None:
    nbytes = sum(t.numel() * t.element_size() for _, t in bucket)
    stats.tensors += len(bucket)
    stats.bytes += nbytes
    stats.buckets += 1
    stats.max_bucket_bytes = max(stats.max_bucket_bytes, nbytes)
    for name, t in bucket:
        if name in picks:
            samples[name] = t.detach()[:CHECK_ROWS].to("cpu", torch.float32).clone()
    if stats.buckets % 20 == 0:
        log.info("weight sync: %d buckets, %.1f MiB so far", stats.buckets, stats.bytes / 2**20)


def _pick(names: list[str], k: int) -> set[str]:
    """``k`` names spread over the send order (first and last included from k=2)."""
    if k <= 0 or not names:
        return set()
    if k == 1:
        return {names[len(names) // 2]}
    return {names[round(i * (len(names) - 1) / (k - 1))] for i in range(k)}


_UNREADABLE: list[str] = []   # names a real SGLang server could not report (warned once)


def spot_check(engine, samples: dict[str, torch.Tensor]) -> int:
    """Compare the engine's copy of each sampled tensor (its first ``CHECK_ROWS`` rows, every
    server) with the trainer's; raises ``WeightUpdateError`` on a difference. Returns the count."""
    from prism_megatron.rollout.base import WeightReadbackUnsupported, WeightUpdateError

    urls = [s.url for s in getattr(engine, "servers", [])]
    for name, want in samples.items():
        try:
            got = engine.get_weights_by_name(name, CHECK_ROWS)
        except WeightReadbackUnsupported as e:
            if not _UNREADABLE:
                log.warning("weight spot check skipped: the server cannot report %s (%s); "
                            "SGLang implements get_weights_by_name only for some models", name, e)
            _UNREADABLE.append(name)
            return 0
        except RolloutError as e:
            raise WeightUpdateError(
                f"weight spot check: cannot read {name} back from the rollout engine ({e}); "
                f"rollout.weight_check_tensors=0 turns the check off for a server whose model "
                f"does not implement get_weights_by_name") from None
        for k, have in enumerate(got):
            have = torch.as_tensor(have, dtype=torch.float32)
            where = urls[k] if k < len(urls) else type(engine).__name__
            if have.shape != want.shape or not torch.allclose(have, want, rtol=1e-3, atol=1e-6):
                diff = ((have - want).abs().max().item() if have.shape == want.shape
                        else f"shape {tuple(have.shape)} vs {tuple(want.shape)}")
                raise WeightUpdateError(
                    f"weight spot check failed after the sync: {where} holds {name} different "
                    f"from the trainer's (first {CHECK_ROWS} rows, max |diff| {diff}); the engine "
                    f"did not load what was sent (a name its loader skipped, a wrong merge, or "
                    f"released weights that were not resumed)")
    return len(samples)


# ----------------------------------------------------------------------------- distributed
_SENDERS: dict[tuple, "_StageSender"] = {}
_LOCK_KEY = "prism-weight-sync-lock"


def _sync_distributed(model, engine, hf_config, groups: _Groups, bucket_bytes: int,
                      check_tensors: int) -> SyncStats | None:
    stats, t0 = SyncStats(mode="distributed", rank=_rank()), time.time()
    if groups.dp_rank != 0:
        if dist.is_initialized():
            dist.barrier()
        return None
    if groups.sender and not hasattr(engine, "update_weights_from_distributed"):
        raise RolloutError(f"rollout.weight_sync=distributed needs SGLang servers "
                           f"(rollout.engine=sglang), not {type(engine).__name__}")
    plan = plan_for(model, hf_config, groups)
    sender = _connect(engine, groups, plan) if groups.stage_sender else None
    picks = _pick(plan.hf_names(groups.pp_rank), check_tensors) if sender else set()
    samples: dict[str, torch.Tensor] = {}
    many = groups.pp_size > 1 and sender is not None
    session = engine.weight_update_session() if groups.sender else nullcontext()
    with session:
        if many:   # the session is open on every server before any stage sends
            dist.barrier(group=groups.pp_group)
        for bucket in iter_buckets(_iter(plan, groups, local=True), bucket_bytes):
            _count(stats, bucket, picks, samples)
            sender.send(bucket)
        if many:   # every stage has sent before the session ends (post-load hooks)
            dist.barrier(group=groups.pp_group)
    if groups.sender:
        engine.flush_cache()
    if many:
        dist.barrier(group=groups.pp_group)   # the session is closed: read the weights back
    if sender is not None:
        stats.checked = spot_check(sender.client, samples)
    if dist.is_initialized():
        dist.barrier()
    if sender is None:
        return None
    stats.seconds = time.time() - t0
    log.info("weight sync (distributed): rank %d (stage %d) sent %s", stats.rank, groups.pp_rank,
             stats)
    return stats


def _connect(engine, groups: _Groups, plan) -> "_StageSender":
    """This stage's sender, connected once to every server (reused while the servers and the
    layout stay the same); collective over the stage senders (replica 0's tp0 PP group)."""
    info = None
    if groups.sender:
        lock = None
        if groups.pp_size > 1:
            lock = _lock_store(engine)
        info = {"urls": [s.url for s in engine.servers], "tp": int(engine.tp),
                "timeout_s": float(engine.request_timeout_s), "lock": lock}
    if groups.pp_size > 1:
        box = [info]
        dist.broadcast_object_list(box, src=groups.pp_first_global, group=groups.pp_group)
        info = box[0]
    backend = "nccl" if next(iter(plan.params.values())).is_cuda else "gloo"
    lock = tuple(info["lock"]) if info["lock"] else None
    key = (tuple(info["urls"]), info["tp"], groups.pp_rank, backend, lock)
    sender = _SENDERS.get(key)
    if sender is not None and not sender.broken:
        return sender
    if groups.sender:
        client = engine
    else:
        from prism_megatron.rollout.sglang import SGLangEngine

        client = SGLangEngine(urls=info["urls"], wire_format="sglang",
                              request_timeout_s=info["timeout_s"])
    sender = _StageSender(client, info, groups.pp_rank, backend, free_port(any_host=True))
    _SENDERS[key] = sender
    return sender


_LOCK_STORE: list = []


def _lock_store(engine) -> tuple[str, int]:
    """(address, port) of the TCP store that serialises the stages' buckets (rank 0 hosts it)."""
    import os

    if not _LOCK_STORE:
        port = free_port(any_host=True)
        store = dist.TCPStore("0.0.0.0", port, is_master=True, wait_for_workers=False)
        _LOCK_STORE.append((store, (os.environ.get("MASTER_ADDR", "127.0.0.1"), port)))
    return _LOCK_STORE[0][1]


class _StageSender:
    """One pipeline stage's sender: its client, its process group with every server's TP ranks
    (``rank_offset = 1 + i * tp``) and, at PP > 1, the lock that lets one stage at a time
    broadcast (two stages' buckets interleaved differently on two servers would deadlock)."""

    def __init__(self, client, info: dict, stage: int, backend: str, port: int):
        from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

        from prism_megatron.rollout.groups import address_towards, join_group

        self.client, self.broken = client, False
        self.timeout_s = info["timeout_s"]
        urls, tp = info["urls"], info["tp"]
        self.name = f"prism-weight-sync-pp{stage}-{port}"
        self.pool = ThreadPoolExecutor(max(1, len(urls)), thread_name_prefix="weight-sync")
        self.servers = len(urls)
        world = 1 + len(urls) * tp
        address = address_towards(urls)
        t0 = time.time()
        calls = [self.pool.submit(client.init_weights_update_group, i, master_address=address,
                                  master_port=port, rank_offset=1 + i * tp, world_size=world,
                                  group_name=self.name, backend=backend)
                 for i in range(len(urls))]
        joiner = ThreadPoolExecutor(1).submit(join_group, backend, address, port, 0, world,
                                              self.name, self.timeout_s)
        done, _ = wait([*calls, joiner], timeout=self.timeout_s, return_when=FIRST_EXCEPTION)
        for f in [*calls, joiner]:
            if f in done and f.exception() is not None:
                raise f.exception()
        if len(done) < len(calls) + 1:
            raise RolloutError(f"the weight-update group {self.name} did not form within "
                               f"{self.timeout_s:.0f}s (servers {urls}, master {address}:{port})")
        self.group = joiner.result()
        self.lock = None
        if info["lock"] is not None:
            self.lock = dist.TCPStore(info["lock"][0], info["lock"][1], is_master=False)
        self.me = f"{stage}-{port}".encode()
        log.info("weight sync: stage %d joined group %s with %d server(s) (world %d, %s) in "
                 "%.1fs", stage, self.name, len(urls), world, backend, time.time() - t0)

    def send(self, bucket: list[tuple[str, torch.Tensor]]) -> None:
        """Broadcast one flattened bucket while every server's ``update_weights_from_distributed``
        call receives it; a server that refuses the call fails the sync at once (no hang)."""
        from prism_megatron.rollout.groups import broadcast, dtype_name, flatten

        names = [n for n, _ in bucket]
        dtypes = [dtype_name(t.dtype) for _, t in bucket]
        shapes = [list(t.shape) for _, t in bucket]
        flat = flatten([t for _, t in bucket])
        with self._turn():
            calls = [self.pool.submit(self.client.update_weights_from_distributed, i, names,
                                      dtypes, shapes, self.name) for i in range(self.servers)]
            work = broadcast(self.group, flat)
            deadline = time.monotonic() + self.timeout_s
            while not work.is_completed():
                for f in calls:
                    if f.done() and f.exception() is not None:
                        self.broken = True   # a half-received group is not reused
                        raise f.exception()
                if time.monotonic() > deadline:
                    self.broken = True
                    raise RolloutError(f"weight sync: the broadcast on {self.name} did not "
                                       f"finish within {self.timeout_s:.0f}s")
                time.sleep(0.0005)
            work.wait()
            for f in calls:
                f.result()

    def _turn(self):
        from contextlib import contextmanager

        @contextmanager
        def turn():
            if self.lock is None:
                yield
                return
            while self.lock.compare_set(_LOCK_KEY, "", self.me) != self.me:
                time.sleep(0.001)
            try:
                yield
            finally:
                self.lock.set(_LOCK_KEY, "")

        return turn()


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
