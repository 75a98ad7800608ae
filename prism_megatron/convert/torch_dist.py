"""megatron-core ``dist_checkpointing`` (torch_dist) checkpoints.

Writing uses megatron's own model as the template: the Megatron model is built at TP=1/PP=1 in
this process, its parameters are filled from the HF tensors (streamed one rule at a time, so the
model itself is the only full copy in memory), and ``model.sharded_state_dict()`` is saved. The
keys, the stacking of TransformerBlock layers, the TE-style norm names, the SwiGLU fc1 factory and
the ``_extra_state`` objects are therefore exactly what the training model asks for when it loads
— at any TP/PP, since dist_checkpointing reshards on load. The padded vocabulary follows --tp;
megatron loads embeddings with ``allow_shape_mismatch`` so another TP's padding works too.

Reading needs no model: tensor metadata gives global shapes, and each global tensor is the full
TP=1 layout (a stacked layer parameter is split back into per-layer tensors).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterator

import torch
from tqdm import tqdm

from prism_megatron.weights.errors import ConversionError, name_list
from prism_megatron.weights.legacy import CHECKPOINT_VERSION, is_extra_state
from prism_megatron.weights.rules import Dims
from prism_megatron.weights.table import ModelInfo, NameIndex, fill, placeholder_of

SAVE_STRATEGY = ("torch_dist", 1)  # the bare string trips an assertion in megatron-core 0.16
_IGNORED_PREFIXES = ("optimizer.", "rng_state", "rerun_state_machine")


def ensure_process_group() -> bool:
    """dist_checkpointing needs torch.distributed; outside torchrun start a 1-process gloo group
    (with megatron's parallel state at TP=PP=1). Returns whether this call created it."""
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    from prism_megatron.distributed import init_distributed

    init_distributed(tp=1, pp=1)
    return True


def release_process_group(created: bool) -> None:
    if created:
        from prism_megatron.distributed import destroy_distributed

        destroy_distributed()


# --- writing ----------------------------------------------------------------------------------

def model_targets(model, index: NameIndex, pipelined: str, layer_offset: int = 0) -> dict:
    """``{canonical global Megatron name: parameter}`` of a built model (unmapped parameters are
    an error: the mapping table and the model disagree)."""
    targets, unknown = {}, []
    params = {n for n, _ in model.named_parameters()}
    for key, t in model.state_dict(keep_vars=True).items():
        if is_extra_state(key):
            continue
        hit = index.lookup(key)
        if hit is None:
            if key in params:
                unknown.append(key)
            continue  # a persistent buffer that is not a weight
        rule, i = hit
        ph = placeholder_of(rule.megatron)
        targets[fill(rule.megatron, ph, i + layer_offset if ph == pipelined else i)] = t
    if unknown:
        raise ConversionError("the Megatron model has parameters the mapping table does not "
                              f"know: {name_list(unknown)}")
    return targets


@torch.no_grad()
def fill_model_from_hf(model, src, dims: Dims, progress: bool = True) -> None:
    """Copy every HF tensor (through the mapping) into a TP=1/PP=1 Megatron model."""
    from prism_megatron.weights.table import NameIndex

    targets = model_targets(model, NameIndex(src.family.rules), src.info.pipelined_index)
    tied = src.info.tie_word_embeddings
    wanted = [e for e in src.entries if not (e.rule.tied_to and tied)]
    missing = [e.megatron for e in wanted if e.megatron not in targets]
    if missing:
        raise ConversionError(f"the Megatron model lacks tensors the mapping produces: "
                              f"{name_list(missing)}")
    for entry in tqdm(wanted, desc="hf->torch_dist", unit="tensor", disable=not progress):
        full = src.full_tensor(entry, dims)
        target = targets[entry.megatron]
        if tuple(target.shape) != tuple(full.shape):
            raise ConversionError(f"shape mismatch: {entry.megatron} is {tuple(full.shape)} from "
                                  f"HF but {tuple(target.shape)} in the Megatron model")
        target.data.copy_(full)


def save_torch_dist(model, ckpt_dir: Path, iteration: int = 0) -> None:
    """Save like Megatron-LM: model tensors under "model", version and iteration beside them."""
    from megatron.core import dist_checkpointing

    state = {"model": model.sharded_state_dict(), "checkpoint_version": CHECKPOINT_VERSION,
             "iteration": iteration}
    dist_checkpointing.save(state, str(ckpt_dir), sharded_strategy=SAVE_STRATEGY)


def write_torch_dist(ckpt_dir: Path, src, dims: Dims, iteration: int, progress: bool) -> None:
    if src.family.build_megatron_model is None:
        raise ConversionError(f"{src.family.model_type} has no Megatron model yet; "
                              f"torch_dist needs one (use --format legacy)")
    created = ensure_process_group()
    try:
        import torch.distributed as dist

        if dist.get_world_size() != 1:
            raise ConversionError("torch_dist conversion runs in one process (it is "
                                  "reshardable: no need for torchrun)")
        dtype = _hf_dtype(src)
        model = src.family.build_megatron_model(src.config, dims.padded_vocab_size, dtype)
        fill_model_from_hf(model, src, dims, progress)
        save_torch_dist(model, ckpt_dir, iteration)
        del model
    finally:
        release_process_group(created)


def _hf_dtype(src) -> torch.dtype:
    """The dtype of the HF weights (the Megatron model is built in it, so nothing is cast)."""
    dtypes = {src.reader.dtype(h) for e in src.entries for h in e.hf if h in src.reader}
    if len(dtypes) != 1:
        raise ConversionError(f"torch_dist needs one weight dtype, the HF files mix {dtypes}")
    return dtypes.pop()


# --- reading ----------------------------------------------------------------------------------

class TorchDistReader:
    """Full Megatron tensors (canonical global names) from a dist_checkpointing directory."""

    def __init__(self, ckpt_dir: Path, index: NameIndex, info: ModelInfo,
                 batch_bytes: int = 2 * 2**30):
        from megatron.core import dist_checkpointing

        self.dir = ckpt_dir
        self.index = index
        self.batch_bytes = batch_bytes
        self._created = ensure_process_group()
        self.meta = dist_checkpointing.load_tensors_metadata(str(ckpt_dir))
        self.unexpected: list[str] = []
        self._plan: dict[str, list[tuple[str, int | None]]] = {}  # key -> [(name, layer)]
        self._key_of: dict[str, str] = {}
        seen = {}
        for key, sh in self.meta.items():
            if key.startswith(_IGNORED_PREFIXES):
                continue
            plan = self._resolve(key, sh)
            if plan is None:
                self.unexpected.append(key)
                continue
            for name, _ in plan:
                self._key_of[name] = key
                if name in seen:
                    raise ConversionError(f"{name} is stored twice in {ckpt_dir} (keys "
                                          f"{seen[name]} and {key})")
                seen[name] = key
            self._plan[key] = plan

    def _resolve(self, key: str, sh) -> list[tuple[str, int | None]] | None:
        hit = self.index.lookup(key)
        if hit is not None:  # not stacked (or stored per layer: non-homogeneous layers)
            rule, i = hit
            return [(fill(rule.megatron, placeholder_of(rule.megatron), i), None)]
        rule = self.index.lookup_stacked(key)
        if rule is None:
            return None
        ph = placeholder_of(rule.megatron)
        return [(fill(rule.megatron, ph, i), i) for i in range(sh.global_shape[0])]

    def names(self) -> list[str]:
        """Canonical names, in the order ``tensors()`` yields them."""
        return [n for plan in self._plan.values() for n, _ in plan]

    def dtype(self, name: str) -> torch.dtype:
        return self.meta[self._key_of[name]].dtype

    def tensors(self) -> Iterator[tuple[str, list[torch.Tensor]]]:
        """``(canonical name, [full tensor])``: a global tensor is one TP=1 "shard"."""
        from megatron.core import dist_checkpointing

        batch, size = [], 0
        keys = list(self._plan)
        for n, key in enumerate(keys):
            sh = self.meta[key]
            batch.append(key)
            size += _numel(sh.global_shape) * sh.dtype.itemsize
            if size < self.batch_bytes and n + 1 < len(keys):
                continue
            with warnings.catch_warnings():  # torch.distributed.checkpoint deprecation notes
                warnings.simplefilter("ignore")
                loaded = dist_checkpointing.load({k: self.meta[k] for k in batch},
                                                 str(self.dir), validate_access_integrity=False)
            for k in batch:
                full = loaded.pop(k)
                for name, layer in self._plan[k]:
                    yield name, [full if layer is None else full[layer].clone()]
            batch, size = [], 0
            del loaded

    def close(self) -> None:
        release_process_group(self._created)
        self._created = False


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
