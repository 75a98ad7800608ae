"""Rollout engines: n samples per multimodal prompt from the current policy, and weight sync.

    engine = make_engine(cfg.rollout, hf_dir)            # "local" (CPU) or "sglang"
    engine = make_rank_engine(cfg.rollout, hf_dir, sender=is_sender())   # servers on every node
    samples = engine.generate(prompts, sampling_params(cfg.rollout, seed=step), n=cfg.rollout.n)
    sync_weights(model, engine, hf_config, bucket_mb=cfg.rollout.weight_bucket_mb,
                 mode=cfg.rollout.weight_sync)    # auto | tensor | distributed | disk

Around training (``rollout.release_memory_between_phases``; every rank, engine None off the
sender): ``phase_train(engine)`` before the optimizer steps, ``phase_generate(engine, lambda:
sync_weights(...))`` before the next generation (resume weights -> sync -> resume KV cache).

Modules: ``base`` (interface, params, log-prob convention), ``local`` (CPU engine), ``serve``
(the CPU engine behind SGLang's HTTP API), ``sglang`` (the HTTP client / server manager),
``weight_sync`` (Megatron -> HF-named buckets through the conversion mapping), ``groups`` (the
weight-update process group with the servers and its flattened buckets). docs/rollout.md has
the weight-sync modes and the placement of servers.
"""

from __future__ import annotations

from pathlib import Path

from prism_megatron.rollout.base import (
    RolloutEngine, RolloutError, RolloutPrompt, RolloutRequestError, RolloutServerError, Sample,
    SamplingParams, WeightUpdateError, derive_seed, phase_generate, phase_train)

__all__ = ["RolloutEngine", "RolloutError", "RolloutPrompt", "RolloutRequestError",
           "RolloutServerError", "Sample", "SamplingParams", "WeightUpdateError", "derive_seed",
           "make_engine", "make_rank_engine", "phase_generate", "phase_train", "sampling_params"]


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
    else launch ``rollout.servers_per_node`` (or ``rollout.num_servers``) managed servers (``rollout.server``: sglang on GPUs, or
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
                            # one process = one node: its servers_per_node, else num_servers
                            num_servers=common.pop("num_servers", getattr(
                                rollout_cfg, "servers_per_node", 0) or rollout_cfg.num_servers),
                            mem_fraction=rollout_cfg.sglang_mem_fraction,
                            launch_timeout_s=rollout_cfg.launch_timeout_s, **common)
    raise RolloutError(f"rollout.engine={engine!r} is not one of ['local', 'sglang']")


_NODE_SERVERS: list = []     # a node owner's managed servers (stopped at exit, atexit)


def make_rank_engine(rollout_cfg, hf_dir: str | Path, data_cfg=None, *, sender: bool,
                     **kwargs) -> RolloutEngine | None:
    """This rank's engine: the dispatching engine on the sender rank, None elsewhere.

    ``rollout.servers_per_node`` > 0 (managed SGLang servers): every node's local rank 0
    (``LOCAL_RANK`` 0) launches and owns that node's ``servers_per_node`` servers (``sglang_tp``
    GPUs each, from GPU 0 of its node), reachable at the node's address towards the trainer's
    master; their URLs are gathered (node order) and the sender attaches to all of them (and
    stops its own node's at shutdown). Collective over the world in that case; a launch that
    fails on one node fails every rank. Otherwise only the sender builds ``make_engine``'s.
    """
    spn = getattr(rollout_cfg, "servers_per_node", 0)
    if not (spn and rollout_cfg.engine == "sglang" and not rollout_cfg.urls):
        return make_engine(rollout_cfg, hf_dir, data_cfg, **kwargs) if sender else None
    import os

    import torch.distributed as dist

    from prism_megatron.rollout.groups import address_towards
    from prism_megatron.rollout.sglang import SGLangEngine

    local, mine = None, {"urls": [], "error": None}
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        master = f"http://{os.environ.get('MASTER_ADDR', '127.0.0.1')}:1"
        try:
            local = make_engine(rollout_cfg, hf_dir, data_cfg, num_servers=spn,
                                host=address_towards([master]), **kwargs)
            mine["urls"] = [s.url for s in local.servers]
        except RolloutError as e:
            mine["error"] = f"{os.uname().nodename}: {e}"
    parts = [mine]
    if dist.is_initialized():
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, mine)
    errors = [p["error"] for p in parts if p["error"]]
    if errors:
        if local is not None:
            local.shutdown()
        raise RolloutError("launching the rollout servers failed: " + " | ".join(errors))
    urls = [u for p in parts for u in p["urls"]]
    if not sender:
        if local is not None:
            _NODE_SERVERS.append(local)
        return None
    common = {k: v for k, v in kwargs.items() if k not in ("min_pixels", "max_pixels")}
    return SGLangEngine(urls=urls, owned=[local] if local is not None else [],
                        image_token_id=_image_token(hf_dir),
                        request_timeout_s=rollout_cfg.request_timeout_s,
                        max_retries=rollout_cfg.max_retries,
                        release_memory_between_phases=rollout_cfg.release_memory_between_phases,
                        weights_cpu_backup=rollout_cfg.weights_cpu_backup,
                        deterministic=rollout_cfg.deterministic, **common)


def _image_token(hf_dir) -> int | None:
    from prism_megatron.rollout.sglang import _config_image_token

    return _config_image_token(Path(hf_dir)) if hf_dir else None
