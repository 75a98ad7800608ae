"""The alignment stage's teacher-NLL probe (``rl/probe.py``) on the policy checkpoint, at any
TP/PP/DP (CPU, gloo):

    torchrun --nproc_per_node N tests/dist/probe_nll.py CONFIG.yaml OUT.pt

Rank 0 writes the probe's metrics.
"""

import sys

import torch

from prism_megatron.config import load_config


def probe_nll(cfg) -> dict:
    """``probe/*`` of the first ``eval.probe_rows`` alignment prompts under ``model.megatron_dir``
    (in a distributed context at ``parallel.tp`` / ``parallel.pp``)."""
    from prism_megatron.data.encode import load_processor
    from prism_megatron.data.rl import load_rl_prompts
    from prism_megatron.models.qwen3_vl.model import build_qwen3vl_model, load_initial_weights
    from prism_megatron.rl.probe import make_probe

    processor = load_processor(cfg.model.hf_dir)
    dataset, _ = load_rl_prompts(cfg.data.train_files, processor, max_prompt_length=512,
                                 require=("teacher_caption", "teacher_cot"), progress=False)
    model, _ = build_qwen3vl_model(cfg.model, cfg.parallel)
    load_initial_weights(model, cfg.model)
    probe = make_probe(cfg, dataset, processor.tokenizer, model.hf_config)
    return probe.nll(model)


def main(config: str, out: str) -> None:
    from prism_megatron.distributed import destroy_distributed, init_distributed, is_main_rank

    cfg = load_config(config)
    init_distributed(tp=cfg.parallel.tp, pp=cfg.parallel.pp, seed=0)
    try:
        metrics = probe_nll(cfg)
        if is_main_rank():
            torch.save(metrics, out)
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:])
