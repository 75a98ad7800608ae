"""Checks every stage runs first, before distributed init, data encoding or a model build.

``check_paths(cfg, stage)`` turns the mistakes that used to surface minutes into a run (a missing
or corrupt model directory, a missing ``model.megatron_dir`` found after the data was encoded, a
TP size that does not divide the attention heads found while building the model) into one
ConfigError line, in the order a user would fix them: model directories, the model's
config.json and layout, then the data files. It reads JSON and file headers only.
"""

from __future__ import annotations

from pathlib import Path

from prism_megatron.config import ConfigError, PrismConfig

# What each stage starts from (besides model.hf_dir, which all of them need).
STAGE_INPUTS = {
    "sft": ("model.megatron_dir",),
    "rlvr": ("model.megatron_dir",),
    "align": ("model.megatron_dir", "discriminator.megatron_dir"),
    "warmup": ("discriminator.megatron_dir",),
    "eval": (),
}
HINTS = {
    "model.megatron_dir": "the converted policy checkpoint to start from (tools/"
                          "convert_hf_to_megatron.py --hf-dir HF --out DIR --format torch_dist) or "
                          "an earlier stage's checkpoint.save_dir",
    "discriminator.megatron_dir": "an upcycled discriminator (tools/upcycle_discriminator.py) or "
                                  "the warm-up stage's checkpoint.save_dir",
}


def check_paths(cfg: PrismConfig, stage: str) -> dict:
    """Raise ConfigError for the first missing/unreadable input of ``stage``; returns the policy's
    config.json dict."""
    from prism_megatron.models.qwen3_vl.config import Qwen3VLConfigError, read_config_json

    if stage not in STAGE_INPUTS:
        raise ValueError(f"unknown stage {stage!r}")
    try:
        hf = read_config_json(cfg.model.hf_dir)
    except Qwen3VLConfigError as exc:
        raise ConfigError(f"model.hf_dir: {exc}") from None
    check_weight_files(cfg.model.hf_dir)
    for key in STAGE_INPUTS[stage]:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if not value:
            raise ConfigError(f"{key} is empty: set it to {HINTS[key]}")
        if not Path(value).is_dir():
            raise ConfigError(f"{key}={value} does not exist: it must be {HINTS[key]}")
    if stage != "warmup":     # the warm-up trains the discriminator, whose layout it checks itself
        check_layout(hf, tp=cfg.parallel.tp, pp=cfg.parallel.pp, pp_layers=cfg.parallel.pp_layers,
                     source=Path(cfg.model.hf_dir) / "config.json")
    if stage in ("sft", "warmup") and cfg.data.micro_batch_size > cfg.data.global_batch_size:
        raise ConfigError(f"data.micro_batch_size={cfg.data.micro_batch_size} is larger than "
                          f"data.global_batch_size={cfg.data.global_batch_size}")
    if stage == "eval":
        return hf
    check_rollout(cfg.rollout)
    d = cfg.data
    if d.dataset_info and not Path(d.dataset_info).is_file():
        raise ConfigError(f"data.dataset_info: {d.dataset_info} does not exist")
    if d.dataset_info and not d.datasets:
        raise ConfigError(f"data.dataset_info={d.dataset_info} names no dataset: set data.datasets")
    if not d.train_files and not d.dataset_info:
        raise ConfigError("data.train_files is empty: give at least one JSONL/parquet file (or "
                          "data.dataset_info + data.datasets)")
    for key in ("train_files", "eval_files"):
        for path in getattr(cfg.data, key):
            if not Path(path).exists():
                raise ConfigError(f"data.{key}: {path} does not exist")
    return hf


def check_rollout(rollout) -> None:
    """The rollout settings that only work together (raised before any server is launched)."""
    if rollout.weight_sync == "distributed" and rollout.engine != "sglang":
        raise ConfigError("rollout.weight_sync=distributed broadcasts into the SGLang servers' "
                          "process group: it needs rollout.engine=sglang (auto picks tensor for "
                          "the local engine)")
    if rollout.servers_per_node and (rollout.engine != "sglang" or rollout.urls):
        raise ConfigError("rollout.servers_per_node launches managed SGLang servers on every "
                          "node: it needs rollout.engine=sglang and no rollout.urls")


def check_weight_files(hf_dir: str | Path) -> None:
    """Every ``*.safetensors`` of ``hf_dir`` has an intact header and its full length."""
    from prism_megatron.weights.errors import ConversionError
    from prism_megatron.convert.hf_io import check_safetensors_file

    for path in sorted(Path(hf_dir).glob("*.safetensors")):
        try:
            check_safetensors_file(path)
        except ConversionError as exc:
            raise ConfigError(f"model.hf_dir: {exc}") from None


def check_layout(hf: dict, *, tp: int, pp: int, pp_layers=None, source="config.json") -> None:
    """TP against the text and vision attention heads, PP against the decoder layers, from the
    config.json dict (the rules the model build applies, minutes earlier)."""
    from prism_megatron.weights.errors import ConversionError
    from prism_megatron.weights.layout import stage_layer_counts

    text, vision = hf["text_config"], hf["vision_config"]
    heads, groups = text["num_attention_heads"], text["num_key_value_heads"]
    if heads % tp or (groups % tp and tp % groups):
        raise ConfigError(f"parallel.tp={tp} does not divide the text attention heads of {source} "
                          f"({heads} query heads, {groups} key/value heads)")
    if vision["num_heads"] % tp:
        raise ConfigError(f"parallel.tp={tp} does not divide the vision attention heads of "
                          f"{source} ({vision['num_heads']})")
    try:
        stage_layer_counts(text["num_hidden_layers"], pp, list(pp_layers) if pp_layers else None)
    except ConversionError as exc:
        raise ConfigError(f"parallel.pp={pp}: {exc}") from None
