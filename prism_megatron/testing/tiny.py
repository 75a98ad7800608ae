"""Random, tiny Qwen3-VL checkpoints written offline, for tests and the CPU demo.

A tiny directory has exactly the layout of a released Qwen3-VL-4B/8B directory (config.json,
model.safetensors, generation_config.json, tokenizer files, preprocessor/video-preprocessor configs,
chat template), so every loader is exercised on the same code path a real checkpoint takes:
``AutoProcessor.from_pretrained(dir)`` and ``Qwen3VLForConditionalGeneration.from_pretrained(dir)``.

The presets (names are a contract other tests and configs use) vary the features the Megatron model
and the HF<->Megatron converter must handle: GQA, tied/untied embeddings, DeepStack injection into
one or several text layers, explicit ``head_dim`` (q width != hidden size), default and non-default
``mrope_section``, and the real 151k Qwen vocabulary. All have even head counts and >= 2 layers so
TP2 and PP2 split them.

Determinism: the same preset and seed give a byte-identical ``model.safetensors``; the tokenizer of
the local-vocabulary presets depends on neither (it is trained on the synthetic corpus, seed 0).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from prism_megatron.data import synthetic
from prism_megatron.data.template import QWEN3_VL_CHAT_TEMPLATE
from prism_megatron.testing.tokenizer import (
    EOS_TOKEN, PAD_TOKEN, QWEN_CONFIG_VOCAB_SIZE, build_local_tokenizer, build_qwen_tokenizer,
)

# Image processing as Qwen3-VL (16 px patches, 2 frames per temporal patch, 2x2 merging -> one LLM
# token per 32x32 px), with pixel bounds sized for the synthetic grids: 64x64 -> 4 tokens,
# 96x64 -> 6, 96x96 -> 9; larger inputs are scaled down to at most 64 tokens.
PATCH_SIZE, TEMPORAL_PATCH_SIZE, MERGE_SIZE = 16, 2, 2
TOKEN_PX = PATCH_SIZE * MERGE_SIZE
MIN_PIXELS = 4 * TOKEN_PX * TOKEN_PX
MAX_PIXELS = 64 * TOKEN_PX * TOKEN_PX
IMAGE_MEAN = IMAGE_STD = [0.5, 0.5, 0.5]    # Qwen3-VL's normalisation
INFO_FILE = "prism_tiny_model.json"         # provenance only; no loader reads it


@dataclass(frozen=True)
class TinyPreset:
    """Shape of one tiny Qwen3-VL. ``tokenizer`` is ``local`` (small BPE) or ``qwen`` (real vocab)."""
    name: str
    description: str
    tokenizer: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mrope_section: tuple[int, int, int]
    tie_word_embeddings: bool
    vision_depth: int
    vision_hidden_size: int
    vision_intermediate_size: int
    vision_heads: int
    deepstack_visual_indexes: tuple[int, ...]
    num_position_embeddings: int = 64       # 8x8 learned grid, bilinearly resampled per image
    rope_theta: float = 5_000_000.0
    max_position_embeddings: int = 4096
    local_bpe_size: int = 768               # BPE ranks of the local tokenizer (before added tokens)

    def validate(self) -> None:
        """Fail early on shapes that Qwen3-VL or TP2/PP2 cannot take."""
        problems = []
        if sum(self.mrope_section) != self.head_dim // 2:
            problems.append(f"mrope_section {self.mrope_section} must sum to head_dim/2 = {self.head_dim // 2}")
        if self.num_heads % self.num_kv_heads:
            problems.append("num_heads must be a multiple of num_kv_heads")
        if self.num_heads % 2 or self.num_kv_heads % 2 or self.num_layers < 2:
            problems.append("need even head/kv-head counts and >= 2 layers (TP2 / PP2)")
        if self.vision_hidden_size % self.vision_heads or (self.vision_hidden_size // self.vision_heads) % 4:
            problems.append("vision head dim must be a multiple of 4 (axial 2-D rope)")
        if any(not 0 <= i < self.vision_depth for i in self.deepstack_visual_indexes):
            problems.append("deepstack_visual_indexes must name vision layers")
        if len(self.deepstack_visual_indexes) > self.num_layers:
            problems.append("more DeepStack features than text layers to inject them into")
        if int(self.num_position_embeddings ** 0.5) ** 2 != self.num_position_embeddings:
            problems.append("num_position_embeddings must be a square")
        if self.tokenizer not in ("local", "qwen"):
            problems.append(f"unknown tokenizer kind {self.tokenizer!r}")
        if problems:
            raise ValueError(f"preset {self.name!r}: " + "; ".join(problems))


_VISION = dict(vision_depth=3, vision_hidden_size=64, vision_intermediate_size=128, vision_heads=2)

PRESETS: dict[str, TinyPreset] = {p.name: p for p in (
    TinyPreset("tiny", "default demo model: local BPE, GQA 4/2, tied, DeepStack into 2 of 4 layers, "
               "Qwen's real head_dim 128 and mrope_section [24, 20, 20]",
               tokenizer="local", hidden_size=128, intermediate_size=256, num_layers=4, num_heads=4,
               num_kv_heads=2, head_dim=128, mrope_section=(24, 20, 20), tie_word_embeddings=True,
               deepstack_visual_indexes=(0, 1), **_VISION),
    TinyPreset("tiny-untied", "separate lm_head; q width 4x32 != hidden 96; one DeepStack layer",
               tokenizer="local", hidden_size=96, intermediate_size=192, num_layers=2, num_heads=4,
               num_kv_heads=2, head_dim=32, mrope_section=(6, 5, 5), tie_word_embeddings=False,
               deepstack_visual_indexes=(1,), **{**_VISION, "vision_depth": 2}),
    TinyPreset("tiny-mrope", "uneven non-default mrope_section [16, 8, 8]; GQA 8/2; DeepStack into both "
               "text layers (crosses a PP2 stage boundary)",
               tokenizer="local", hidden_size=128, intermediate_size=256, num_layers=2, num_heads=8,
               num_kv_heads=2, head_dim=64, mrope_section=(16, 8, 8), tie_word_embeddings=True,
               deepstack_visual_indexes=(0, 2), **_VISION),
    TinyPreset("tiny-qwenvocab", "Qwen's real 151,936-row vocabulary and token ids; hidden 32 keeps "
               "the embedding ~19 MB",
               tokenizer="qwen", hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
               num_kv_heads=2, head_dim=16, mrope_section=(4, 2, 2), tie_word_embeddings=True,
               deepstack_visual_indexes=(0,), vision_depth=2, vision_hidden_size=32,
               vision_intermediate_size=64, vision_heads=2),
)}
DEFAULT_PRESET = "tiny"


def get_preset(name: str) -> TinyPreset:
    if name not in PRESETS:
        raise KeyError(f"unknown tiny preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


# --------------------------------------------------------------------------------- components

def build_tokenizer(preset: TinyPreset):
    """The preset's tokenizer: the real Qwen vocabulary or a BPE trained on the synthetic task."""
    if preset.tokenizer == "qwen":
        return build_qwen_tokenizer()
    return build_local_tokenizer(synthetic.corpus(seed=0), bpe_size=preset.local_bpe_size)


def build_processor(tokenizer):
    """Qwen3VLProcessor = tokenizer + image processor + (mandatory) video processor + chat template."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    common = dict(patch_size=PATCH_SIZE, temporal_patch_size=TEMPORAL_PATCH_SIZE, merge_size=MERGE_SIZE,
                  image_mean=IMAGE_MEAN, image_std=IMAGE_STD)
    image_processor = Qwen2VLImageProcessor(
        size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}, **common)
    video_processor = Qwen3VLVideoProcessor(
        size={"shortest_edge": MIN_PIXELS, "longest_edge": 8 * MAX_PIXELS}, **common)
    return Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                            video_processor=video_processor, chat_template=QWEN3_VL_CHAT_TEMPLATE)


def vocab_size_for(preset: TinyPreset, tokenizer) -> int:
    """Embedding rows: Qwen's padded 151936 for the real vocab, else len(tokenizer) rounded up to 64
    (like the released checkpoints, the tail rows have no token)."""
    if preset.tokenizer == "qwen":
        return QWEN_CONFIG_VOCAB_SIZE
    return -(-len(tokenizer) // 64) * 64


def build_config(preset: TinyPreset, tokenizer):
    """A Qwen3VLConfig with the preset's shapes and the tokenizer's special-token ids."""
    from transformers import Qwen3VLConfig

    preset.validate()
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in (
        ("image", "<|image_pad|>"), ("video", "<|video_pad|>"), ("vstart", "<|vision_start|>"),
        ("vend", "<|vision_end|>"), ("eos", EOS_TOKEN), ("pad", PAD_TOKEN))}
    text_config = dict(
        vocab_size=vocab_size_for(preset, tokenizer), hidden_size=preset.hidden_size,
        intermediate_size=preset.intermediate_size, num_hidden_layers=preset.num_layers,
        num_attention_heads=preset.num_heads, num_key_value_heads=preset.num_kv_heads,
        head_dim=preset.head_dim, hidden_act="silu", max_position_embeddings=preset.max_position_embeddings,
        rms_norm_eps=1e-6, attention_bias=False, initializer_range=0.02,
        rope_parameters={"rope_type": "default", "rope_theta": preset.rope_theta,
                         "mrope_section": list(preset.mrope_section), "mrope_interleaved": True},
        bos_token_id=ids["pad"], eos_token_id=ids["eos"], pad_token_id=ids["pad"],
        tie_word_embeddings=preset.tie_word_embeddings, dtype="float32",
    )
    vision_config = dict(
        depth=preset.vision_depth, hidden_size=preset.vision_hidden_size,
        intermediate_size=preset.vision_intermediate_size, num_heads=preset.vision_heads,
        hidden_act="gelu_pytorch_tanh", in_channels=3, patch_size=PATCH_SIZE,
        spatial_merge_size=MERGE_SIZE, temporal_patch_size=TEMPORAL_PATCH_SIZE,
        out_hidden_size=preset.hidden_size, num_position_embeddings=preset.num_position_embeddings,
        deepstack_visual_indexes=list(preset.deepstack_visual_indexes), initializer_range=0.02,
    )
    config = Qwen3VLConfig(
        text_config=text_config, vision_config=vision_config, image_token_id=ids["image"],
        video_token_id=ids["video"], vision_start_token_id=ids["vstart"], vision_end_token_id=ids["vend"],
        tie_word_embeddings=preset.tie_word_embeddings, architectures=["Qwen3VLForConditionalGeneration"],
        dtype="float32",
    )
    return config


def build_model(config, seed: int):
    """Randomly initialised fp32 model; the global RNG is restored afterwards."""
    from transformers import Qwen3VLForConditionalGeneration

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3VLForConditionalGeneration(config)
    model.generation_config.update(
        bos_token_id=config.text_config.bos_token_id,
        eos_token_id=[config.text_config.eos_token_id, config.text_config.pad_token_id],
        pad_token_id=config.text_config.pad_token_id, do_sample=False)
    return model.eval()


def count_params(model) -> dict[str, int]:
    """Parameter counts (tied weights counted once) for the CLI summary and the report."""
    seen, counts = set(), {"vision": 0, "language": 0, "lm_head": 0}
    for name, p in model.named_parameters(remove_duplicate=True):
        if id(p) in seen:
            continue
        seen.add(id(p))
        part = "vision" if ".visual." in f".{name}" else "lm_head" if name.startswith("lm_head") else "language"
        counts[part] += p.numel()
    counts["total"] = sum(counts.values())
    return counts


# ------------------------------------------------------------------------------------- writer

def save_processor(processor, out_dir: Path) -> None:
    """Save the processor in the file layout of the released Qwen3-VL repos.

    ``preprocessor_config.json`` + ``video_preprocessor_config.json`` (each naming its processor
    class, as the released files do) + tokenizer files + chat template, rather than the single
    ``processor_config.json`` transformers 5 would write, so tiny and real directories take the same
    AutoProcessor path and tools that read the legacy files directly see them.
    """
    processor.image_processor.save_pretrained(out_dir)
    processor.video_processor.save_pretrained(out_dir)
    processor.tokenizer.save_pretrained(out_dir)
    for name in ("preprocessor_config.json", "video_preprocessor_config.json"):
        path = Path(out_dir) / name
        data = json.loads(path.read_text(encoding="utf-8"))
        data["processor_class"] = type(processor).__name__
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _looks_like_model_dir(path: Path) -> bool:
    return not any(path.iterdir()) or (path / "config.json").is_file()


def write_tiny_model(out_dir: str | Path, preset: str = DEFAULT_PRESET, seed: int = 0,
                     force: bool = False, log=print) -> Path:
    """Write a tiny Qwen3-VL HF directory at ``out_dir``; return its path.

    Everything is written into a temporary sibling first and moved into place at the end, so an
    interrupted run never leaves a half-written model behind. With ``force`` an existing model
    directory (one holding config.json) is replaced; anything else is refused.
    """
    spec = get_preset(preset)
    spec.validate()
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not force:
            raise FileExistsError(f"{out} exists and is not empty (use force=True / --force to replace)")
        if not _looks_like_model_dir(out):
            raise FileExistsError(f"refusing to replace {out}: it does not look like a model directory")
    out.parent.mkdir(parents=True, exist_ok=True)

    log(f"[tiny-qwen3vl] preset={spec.name} seed={seed}: building tokenizer ({spec.tokenizer})")
    tokenizer = build_tokenizer(spec)
    processor = build_processor(tokenizer)
    config = build_config(spec, tokenizer)
    log(f"[tiny-qwen3vl] tokenizer: {len(tokenizer)} tokens, embedding rows {config.text_config.vocab_size}")
    model = build_model(config, seed)
    params = count_params(model)
    log(f"[tiny-qwen3vl] model: {params['total']:,} parameters "
        f"(vision {params['vision']:,}, language {params['language']:,}, lm_head {params['lm_head']:,})")

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        save_processor(processor, tmp)
        info = {"preset": asdict(spec), "seed": seed, "parameters": params,
                "tokenizer_size": len(tokenizer), "note": "random weights; for tests and demos only"}
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        tmp.chmod(0o755)
        for f in tmp.iterdir():
            f.chmod(0o644)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size_mb = sum(f.stat().st_size for f in out.iterdir()) / 2**20
    log(f"[tiny-qwen3vl] wrote {out} ({size_mb:.1f} MB): " + ", ".join(sorted(p.name for p in out.iterdir())))
    return out
