"""Memory levers on CPU: activation recompute (full, selective) and bf16 main grads give the losses
of their off state; optimizer CPU offload and grouped GEMM are refused where megatron cannot run
them (CPU, local spec) with the fix in the message."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from prism_megatron.config import CheckpointConfig, ConfigError, OptimizerConfig, ParallelConfig

STEPS = 3
SEQ, BATCH, MICRO = 64, 2, 2


@pytest.fixture(scope="module")
def megatron_1proc():
    from prism_megatron.distributed import destroy_distributed, init_distributed

    init_distributed(tp=1, pp=1, ep=1, seed=1234)
    yield
    destroy_distributed()


def _batches(vocab: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(MICRO):
        ids = torch.randint(0, vocab, (BATCH, SEQ), generator=g)
        mask = torch.ones(BATCH, SEQ)
        mask[:, : SEQ // 4] = 0           # "prompt" tokens carry no loss
        out.append({"input_ids": ids, "position_ids": torch.arange(SEQ)[None, None].expand(
            3, BATCH, SEQ), "labels": torch.roll(ids, -1, dims=1), "loss_mask": mask})
    return out


def _forward(batch, model):
    from prism_megatron.trainer import token_loss_fn

    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                attention_mask=None, labels=batch["labels"])
    return out, token_loss_fn(batch["loss_mask"])


def _train(hf_dir, initial: dict, *, dtype="fp32", recompute=None, main_grads="fp32"):
    """Losses of STEPS optimizer steps from the same initial weights; returns (losses, trainer)."""
    from prism_megatron.models.qwen3_vl.model import build_qwen3vl_model
    from prism_megatron.trainer import Trainer

    model_cfg = SimpleNamespace(hf_dir=str(hf_dir), spec="local", dtype=dtype,
                                recompute=recompute is not None,
                                recompute_granularity=recompute or "full")
    model, config = build_qwen3vl_model(model_cfg)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(initial[name])           # (cast to bf16 for the bf16 runs)
    trainer = Trainer(model, config, OptimizerConfig(lr=1e-3, warmup_ratio=0.0,
                                                     main_grads_dtype=main_grads),
                      ParallelConfig(), CheckpointConfig(enabled=False), STEPS,
                      bf16=dtype == "bf16")
    batches = _batches(model.vocab_size)
    losses = [trainer.train_step(batches, _forward, SEQ)["loss"] for _ in range(STEPS)]
    return losses, trainer


@pytest.fixture(scope="module")
def initial(megatron_1proc, tiny_model_dir):
    from prism_megatron.models.qwen3_vl.model import build_qwen3vl_model

    model, _ = build_qwen3vl_model(str(tiny_model_dir))
    return {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.mark.slow   # 3 model builds x 3 steps (~40 s on 2 cores)
def test_recompute_full_and_selective_give_the_baseline_losses(megatron_1proc, tiny_model_dir,
                                                               initial):
    baseline, _ = _train(tiny_model_dir, initial)
    assert baseline[-1] < baseline[0]            # it trains
    for granularity in ("full", "selective"):
        losses, trainer = _train(tiny_model_dir, initial, recompute=granularity)
        assert trainer.config.recompute_granularity == granularity
        assert losses == pytest.approx(baseline, abs=1e-6), granularity


@pytest.mark.slow
def test_bf16_main_grads_follow_fp32_main_grads(megatron_1proc, tiny_model_dir, initial):
    fp32, ref = _train(tiny_model_dir, initial, dtype="bf16")
    bf16, lever = _train(tiny_model_dir, initial, dtype="bf16", main_grads="bf16")
    assert [b.grad_dtype for b in ref.model.buffers] == [torch.float32]
    assert [b.grad_dtype for b in lever.model.buffers] == [torch.bfloat16]
    # two micro-batches accumulate in bf16 instead of fp32: the same losses up to bf16 rounding
    assert bf16 == pytest.approx(fp32, abs=2e-2)


def test_cpu_offload_is_refused_on_cpu_and_configured_on_cuda(monkeypatch):
    from prism_megatron.optim import check_offload, megatron_optimizer_config

    cfg = OptimizerConfig(cpu_offload=True, offload_fraction=0.5)
    dist_opt = ParallelConfig(distributed_optimizer=True)
    with pytest.raises(ConfigError, match=r"^optimizer.cpu_offload=true needs CUDA: "):
        megatron_optimizer_config(cfg, dist_opt)
    with pytest.raises(ConfigError, match="set parallel.distributed_optimizer=true"):
        check_offload(cfg, ParallelConfig(), cuda=True)
    import megatron.core.optimizer.optimizer_config as moc

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(moc, "is_te_min_version", lambda *a, **k: True)   # TE comes with CUDA
    mcfg = megatron_optimizer_config(cfg, dist_opt, bf16=True)
    assert (mcfg.optimizer_cpu_offload, mcfg.optimizer_offload_fraction,
            mcfg.use_precision_aware_optimizer, mcfg.use_distributed_optimizer) == (
        True, 0.5, True, True)
    assert megatron_optimizer_config(OptimizerConfig(), dist_opt).optimizer_cpu_offload is False


def test_offload_settings_are_validated():
    from prism_megatron.config import load_config

    with pytest.raises(ConfigError, match=r"optimizer.offload_fraction=1.5 must be in \[0, 1\]"):
        load_config(None, ["optimizer.offload_fraction=1.5"])
    with pytest.raises(ConfigError, match=r"optimizer.main_grads_dtype='fp16' is not one of"):
        load_config(None, ["optimizer.main_grads_dtype=fp16"])
    with pytest.raises(ConfigError, match=r"model.recompute_granularity='block' is not one of"):
        load_config(None, ["model.recompute_granularity=block"])


def test_grouped_gemm_needs_the_te_spec(megatron_1proc, tiny_model_dir):
    from prism_megatron.models.discriminator.model import (
        build_discriminator_from_config, moe_config_fields)
    from prism_megatron.models.qwen3_vl.config import load_hf_config

    with pytest.raises(ConfigError, match=r"^discriminator.moe_grouped_gemm=true needs "
                                          r"model.spec=transformer_engine"):
        build_discriminator_from_config(load_hf_config(tiny_model_dir), num_experts=4, top_k=2,
                                        spec="local", grouped_gemm=True)
    fields = moe_config_fields(4, 2, 256, ep=1, dispatcher="alltoall", grouped_gemm=True)
    assert fields["moe_grouped_gemm"] is True
