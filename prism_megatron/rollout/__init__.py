"""Rollout engines: n samples per multimodal prompt from the current policy, and weight sync.

    engine = make_engine(cfg.rollout, hf_dir)            # "local" (CPU) or "sglang"
    samples = engine.generate(prompts, sampling_params(cfg.rollout, seed=step), n=cfg.rollout.n)
    sync_weights(model, engine, hf_config, bucket_mb=cfg.rollout.weight_bucket_mb)   # weight_sync

Around training (``rollout.release_memory_between_phases``; every rank, engine None off the
sender): ``phase_train(engine)`` before the optimizer steps, ``phase_generate(engine, lambda:
sync_weights(...))`` before the next generation (resume weights -> sync -> resume KV cache).

Modules: ``base`` (interface, params, log-prob convention), ``local`` (CPU engine), ``serve``
(the CPU engine behind SGLang's HTTP API), ``sglang`` (the HTTP client / server manager),
``weight_sync`` (Megatron -> HF-named buckets through the conversion mapping).
"""

from __future__ import annotations

from pathlib import Path

from prism_megatron.rollout.base import (
    RolloutEngine, RolloutError, RolloutPrompt, RolloutRequestError, RolloutServerError, Sample,
    SamplingParams, WeightUpdateError, derive_seed, phase_generate, phase_train)

__all__ = ["RolloutEngine", "RolloutError", "RolloutPrompt", "RolloutRequestError",
           "RolloutServerError", "Sample", "SamplingParams", "WeightUpdateError", "derive_seed",
           "make_engine", "phase_generate", "phase_train", "sampling_params"]


def sampling_params(rollout_cfg, *, seed: int | None = None, max_new_tokens: int | None = None,
                    **overrides) -> SamplingParams:
    """The config's sampling settings (spec §1.2-1.4: T 1.0, top_p 1.0, top_k -1, stop at eos)."""
    return SamplingParams(temperature=rollout_cfg.temperature, top_p=rollout_cfg.top_p,
                          top_k=rollout_cfg.top_k,
                          max_new_tokens=max_new_tokens or rollout_cfg.max_new_tokens,
                          seed=seed, **overrides)


def make_engine(rollout_cfg, hf_dir: str | Path, data_cfg=None, **kwargs) -> RolloutEngine:
    """The engine ``rollout.engine`` names, for the policy checkpoint ``hf_dir``.

    ``data_cfg`` (the stage's ``data`` section) gives the pixel budget, so the engine expands
    each image into the same number of tokens as the trainer's processor.

    ``local``: the CPU engine in this process. ``sglang``: attach to ``rollout.urls`` if given,
    else launch ``rollout.num_servers`` managed servers (``rollout.server``: sglang on GPUs, or
    the CPU ``prism`` server). ``kwargs`` go to the engine's constructor.
    """
    engine = rollout_cfg.engine
    if data_cfg is not None:
        kwargs = {"min_pixels": data_cfg.min_pixels, "max_pixels": data_cfg.max_pixels, **kwargs}
    if engine == "local":
        from prism_megatron.rollout.local import LocalEngine

        return LocalEngine(hf_dir, **kwargs)
    if engine == "sglang":
        from prism_megatron.rollout.sglang import SGLangEngine

        common = dict(request_timeout_s=rollout_cfg.request_timeout_s,
                      max_retries=rollout_cfg.max_retries,
                      restart_on_failure=rollout_cfg.restart_on_failure,
                      release_memory_between_phases=rollout_cfg.release_memory_between_phases,
                      weights_cpu_backup=rollout_cfg.weights_cpu_backup,
                      deterministic=rollout_cfg.deterministic, tp=rollout_cfg.sglang_tp)
        common.update(kwargs)
        if rollout_cfg.urls:
            common.setdefault("image_token_id", _image_token(hf_dir))
            return SGLangEngine(urls=list(rollout_cfg.urls), **common)
        return SGLangEngine(model_path=hf_dir, server=rollout_cfg.server,
                            num_servers=rollout_cfg.num_servers,
                            mem_fraction=rollout_cfg.sglang_mem_fraction,
                            launch_timeout_s=rollout_cfg.launch_timeout_s, **common)
    raise RolloutError(f"rollout.engine={engine!r} is not one of ['local', 'sglang']")


def _image_token(hf_dir) -> int | None:
    from prism_megatron.rollout.sglang import _config_image_token

    return _config_image_token(Path(hf_dir)) if hf_dir else None
