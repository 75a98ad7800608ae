"""The sequence-parallelism patches (megatron_patches/torch_norm_sequence_parallel.py,
gloo_uneven_collectives.py). Their end-to-end effect, the MoE discriminator at TP2 and TP2 x EP2
equal to TP1, is tested in tests/test_discriminator_dist.py."""

from types import SimpleNamespace

import torch


def norm_config(**overrides):
    fields = dict(layernorm_zero_centered_gamma=False, persist_layer_norm=False,
                  sequence_parallel=False, memory_efficient_layer_norm=False,
                  normalization="RMSNorm")
    return SimpleNamespace(**{**fields, **overrides})


def test_torch_norms_build_under_sequence_parallel_and_mark_their_weights():
    import megatron_patches
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    megatron_patches.apply_all(force=True)
    config = norm_config(sequence_parallel=True)
    norm = WrappedTorchNorm(config, 8, eps=1e-6)
    assert isinstance(norm, torch.nn.RMSNorm) and norm.eps == 1e-6
    assert [p.sequence_parallel for p in norm.parameters()] == [True]  # TP all-reduce of grads
    assert config.sequence_parallel is True                              # the caller's config
    plain = WrappedTorchNorm(norm_config(), 8)
    assert not hasattr(plain.weight, "sequence_parallel")
    # a norm is per token: a sequence slice gives that slice of the full output
    x = torch.randn(6, 2, 8)
    assert torch.equal(norm(x[3:]), norm(x)[3:])


def test_uneven_collectives_keep_megatrons_path_for_even_and_single_rank_groups():
    import megatron_patches
    from megatron.core.tensor_parallel import mappings

    megatron_patches.apply_all(force=True)
    assert mappings._gather_along_first_dim.__prism_patched__
    one = SimpleNamespace(size=lambda: 1)
    x = torch.randn(3, 4)
    assert mappings._gather_along_first_dim(x, one, [3]) is x
    assert mappings._reduce_scatter_along_first_dim(x, one, [3]) is x
