"""The discriminator's value head: one realness score per token (spec §3.2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class ValueHead(torch.nn.Sequential):
    """``Dropout(p) -> Linear(H -> 1, no bias)``, weight ~ N(0, 0.02).

    A Sequential so the weight is ``v_head.1.weight``, the name reference checkpoints use.
    ``p`` defaults to 0 (spec §9.4: the reference's active 0.1 made training-mode scores
    stochastic). The product is taken in fp32 whatever the parameter dtype: scores are compared
    across sequences, so they should not carry bf16 rounding of the reduction.
    """

    def __init__(self, hidden_size: int, dropout: float = 0.0, init_std: float = 0.02,
                 dtype: torch.dtype = torch.float32):
        linear = torch.nn.Linear(hidden_size, 1, bias=False)
        torch.nn.init.normal_(linear.weight, mean=0.0, std=init_std)
        super().__init__(torch.nn.Dropout(dropout), linear.to(dtype))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., H] -> [...] (fp32)."""
        dropped = self[0](hidden)
        return F.linear(dropped.float(), self[1].weight.float()).squeeze(-1)
