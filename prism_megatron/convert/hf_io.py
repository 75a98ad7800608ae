"""HF checkpoints: config loading, a streaming safetensors reader and a sharded writer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open

from prism_megatron.weights.errors import ConversionError

INDEX_NAME = "model.safetensors.index.json"
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
           "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
           "F8_E5M2": torch.float8_e5m2}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
# Files that are weights (never copied as "side files" of a checkpoint).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".msgpack", ".h5")
_WEIGHT_INDEXES = (INDEX_NAME, "pytorch_model.bin.index.json")


def read_config_dict(config_dir: str | Path) -> dict:
    path = Path(config_dir) / "config.json"
    if not path.is_file():
        raise ConversionError(f"no config.json in {config_dir}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path} is not valid JSON: {e}") from None


def check_safetensors_file(path: str | Path) -> None:
    """Reads only the header: a file whose header is unreadable or whose data end lies beyond
    the file's size (an interrupted download or copy) -> one ConversionError naming the file.
    Cheap (no tensor is read), so stages call it before building anything."""
    path = Path(path)
    size = path.stat().st_size
    fix = "copy or download it again"
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{size} bytes, shorter than a safetensors header")
            n = int.from_bytes(head, "little")
            if n <= 0 or 8 + n > size:
                raise ValueError(f"header claims {n} bytes but the file has {size}")
            header = json.loads(f.read(n))
    except (ValueError, UnicodeDecodeError) as e:   # json.JSONDecodeError is a ValueError
        raise ConversionError(f"{path} is not a readable safetensors file ({e}): {fix}") from None
    end = max((v["data_offsets"][1] for k, v in header.items()
               if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v), default=0)
    if 8 + n + end > size:
        raise ConversionError(f"{path} is truncated: its header describes {8 + n + end} bytes but "
                              f"the file has {size}: {fix}")


def load_hf_config(config_dir: str | Path):
    """transformers' config object for ``config_dir`` (model_type checked first, so an unknown
    family gets our message rather than transformers')."""
    from transformers import AutoConfig

    from prism_megatron.convert.families import get_family

    get_family(read_config_dict(config_dir).get("model_type"))
    return AutoConfig.from_pretrained(str(config_dir))


class HFReader:
    """Reads tensors one at a time from a directory of safetensors files (sharded or not).

    Tensors are memory-mapped by safetensors and copied out only when asked for, so a
    conversion never holds more than the tensors it is working on.
    """

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        index = self.dir / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise ConversionError(f"{index} is not a valid safetensors index ({e!r})") from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.dir.glob("*.safetensors"))
            if not files:
                raise ConversionError(f"no *.safetensors files in {hf_dir}")
            weight_map = None
        self._handles = {}
        self._where: dict[str, str] = {}
        for name in files:
            if not (self.dir / name).is_file():
                raise ConversionError(f"{INDEX_NAME} names {name}, which is missing in {hf_dir}")
            check_safetensors_file(self.dir / name)
            try:
                handle = safe_open(str(self.dir / name), framework="pt")
            except Exception as e:  # noqa: BLE001 - safetensors' own error type is not public API
                raise ConversionError(f"{self.dir / name} cannot be opened as safetensors "
                                      f"({e}): copy or download it again") from None
            self._handles[name] = handle
            for key in handle.keys():
                self._where[key] = name
        if weight_map is not None:
            absent = set(weight_map) - set(self._where)
            if absent:
                raise ConversionError(f"{INDEX_NAME} lists tensors absent from the shards: "
                                      + ", ".join(sorted(absent)[:20]))

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self._where[name]].get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        return _DTYPES[self._handles[self._where[name]].get_slice(name).get_dtype()]

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> torch.Tensor:
        try:
            return self._handles[self._where[name]].get_tensor(name)
        except Exception as e:  # noqa: BLE001 - a damaged file found while reading a tensor
            raise ConversionError(f"{self.dir / self._where[name]}: tensor {name} cannot be "
                                  f"read ({e}): copy or download the file again") from None

    def file_of(self, name: str) -> str:
        return self._where[name]

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def parse_size(text: str | int) -> int:
    """``"5GB"``, ``"500MB"``, ``"1048576"`` -> bytes."""
    if isinstance(text, int):
        return text
    s = text.strip().upper()
    for unit, mult in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9),
                       ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


class HFShardWriter:
    """Streams tensors into ``model-XXXXX-of-YYYYY.safetensors`` + ``model.safetensors.index.json``.

    The caller gives the plan up front — every ``(name, shape, dtype)`` in the order it will
    ``add`` them — so each shard's header is written before its data and every tensor goes to
    disk as soon as it arrives: export memory is one tensor, not one 5 GB shard. The files are
    plain safetensors (8-byte header length, JSON header padded to 8 bytes, one hole-free data
    buffer). Shards hold at most ``max_shard_bytes`` (a bigger tensor gets a shard of its own).
    """

    def __init__(self, out_dir: str | Path, plan: list[tuple[str, tuple, torch.dtype]],
                 max_shard_bytes: int = 5 * 10**9):
        self.dir = Path(out_dir)
        names = [n for n, _, _ in plan]
        if len(set(names)) != len(names):
            raise ConversionError("export plan names a tensor twice")
        self._shards: list[list[tuple[str, tuple, torch.dtype, int]]] = [[]]
        size = 0
        for name, shape, dtype in plan:
            nbytes = _numel(shape) * dtype.itemsize
            if self._shards[-1] and size + nbytes > max_shard_bytes:
                self._shards.append([])
                size = 0
            self._shards[-1].append((name, tuple(shape), dtype, nbytes))
            size += nbytes
        self.total_bytes = sum(e[3] for shard in self._shards for e in shard)
        n = len(self._shards)
        self.files = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._queue = [(i, e) for i, shard in enumerate(self._shards) for e in shard]
        self._pos = 0
        self._file = None
        self._open_shard = -1

    def _start_shard(self, i: int) -> None:
        if self._file:
            self._file.close()
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, dtype, nbytes in self._shards[i]:
            if dtype not in _DTYPE_NAMES:
                raise ConversionError(f"{name}: dtype {dtype} cannot be stored in safetensors")
            header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self._file = open(self.dir / self.files[i], "wb")
        self._file.write(len(blob).to_bytes(8, "little") + blob)
        self._open_shard = i

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self._pos >= len(self._queue):
            raise ConversionError(f"tensor {name} is not in the export plan")
        shard, (want, shape, dtype, nbytes) = self._queue[self._pos]
        if name != want or tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ConversionError(f"export produced {name} {tuple(tensor.shape)} {tensor.dtype}, "
                                  f"expected {want} {shape} {dtype} next")
        if shard != self._open_shard:
            self._start_shard(shard)
        if nbytes:
            data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
            self._file.write(memoryview(data.numpy()))
        self._pos += 1

    def close(self) -> list[str]:
        if self._pos != len(self._queue):
            missing = [e[0] for _, e in self._queue[self._pos:]]
            raise ConversionError(f"export ended before writing {len(missing)} planned "
                                  f"tensors: {', '.join(missing[:10])}")
        if self._file:
            self._file.close()
        for i in range(len(self._shards)):
            if i > self._open_shard:  # an empty plan still gets its (empty) shard file
                self._start_shard(i)
                self._file.close()
        weight_map = {name: self.files[i] for i, shard in enumerate(self._shards)
                      for name, *_ in shard}
        index = {"metadata": {"total_size": self.total_bytes},
                 "weight_map": dict(sorted(weight_map.items()))}
        (self.dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return self.files


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def copy_side_files(src_dir: str | Path, dst_dir: str | Path) -> list[str]:
    """Copy config, tokenizer, processor, chat template and generation config files — every
    top-level file of ``src_dir`` that is not a weight file or a weight index."""
    copied = []
    for path in sorted(Path(src_dir).iterdir()):
        if not path.is_file() or path.name.startswith("."):
            continue
        if path.name.endswith(_WEIGHT_SUFFIXES) or path.name in _WEIGHT_INDEXES:
            continue
        shutil.copy2(path, Path(dst_dir) / path.name)
        copied.append(path.name)
    return copied
