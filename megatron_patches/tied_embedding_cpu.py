"""The last pipeline stage's copy of tied word embeddings, on CPU."""

from __future__ import annotations

from megatron_patches.source_rewrite import rewrite_function


def place_tied_embedding_copy_on_current_device() -> None:
    """With tied input/output embeddings and pipeline parallelism, megatron keeps a copy of the
    embedding on the last stage and initialises it from the first stage with an all-reduce over
    the embedding group, after ``weight.data = weight.data.cuda()`` in
    ``LanguageModule.setup_embeddings_and_output_layer`` — which fails on a host without CUDA.
    The copy is moved to ``torch.cuda.current_device()`` instead, which this module's redirected
    torch resolves to the CPU. megatron-core 0.16.1; can go when megatron stops hard-coding
    ``.cuda()`` there."""
    from megatron.core.models.common.language_module.language_module import LanguageModule

    rewrite_function(LanguageModule, "setup_embeddings_and_output_layer",
                     [("weight.data = weight.data.cuda()",
                       "weight.data = weight.data.to(torch.cuda.current_device())")])
