"""``algorithm.loss_agg=token-mean-micro`` (verl's weighting: the token mean inside each
micro-batch, micro-batches weighted by their share of the mini-batch's sequences) against the
exact ``token-mean``, by hand, through the policy update's loss forward.

Two micro-batches at ratio 1 (per-token loss = -A):
  mb1: sequence a, 3 tokens, A = +1; sequence b, 1 token, A = -1  (4 tokens, 2 sequences)
  mb2: sequence c, 4 tokens, A = +2                               (4 tokens, 1 sequence)
token-mean:       (-3 + 1 - 8) / 8 = -5/4;        d/d logp: -A/8 per token
token-mean-micro: 2/3 x (-2/4) + 1/3 x (-8/4) = -1; d/d logp: -A x (2/3)/4 in mb1, -A x (1/3)/4 in mb2
"""

import pytest
import torch

from prism_megatron.algorithms.losses import aggregate, aggregation_denominator

S, V = 5, 7
# (advantage, response tokens) per sequence, per micro-batch
MICRO = [[(1.0, 3), (-1.0, 1)], [(2.0, 4)]]
EXPECTED = {   # loss, d loss / d logp per sequence (a, b, c)
    "token-mean": (-5 / 4, [-1 / 8, 1 / 8, -2 / 8]),
    "token-mean-micro": (-1.0, [-1 / 6, 1 / 6, -1 / 6]),
}


def tensors(micro):
    advantages = torch.zeros(len(micro), S)
    mask = torch.zeros(len(micro), S, dtype=torch.bool)
    for row, (a, n) in enumerate(micro):
        mask[row, :n] = True
        advantages[row] = a
    return advantages, mask


@pytest.mark.parametrize("mode", ["token-mean", "token-mean-micro"])
def test_aggregate_pieces_give_the_hand_computed_loss_and_gradient(mode):
    """Per micro-batch: aggregate(denominator=1) and its count; megatron divides the sum by the
    summed count (over micro-batches and data-parallel ranks alike)."""
    loss, grads = EXPECTED[mode]
    pieces, counts, leaves = [], [], []
    for micro in MICRO:
        advantages, mask = tensors(micro)
        log_ratio = torch.zeros(len(micro), S, requires_grad=True)   # ratio exp(0) = 1
        leaves.append((log_ratio, mask))
        pieces.append(aggregate(-advantages * log_ratio.exp(), mask, mode, denominator=1.0))
        counts.append(aggregation_denominator(mask, mode))
    total = sum(pieces) / sum(counts)
    assert total.item() == pytest.approx(loss)
    total.backward()
    per_sequence = [grad[m] for ratio, mask in leaves for grad, m in zip(ratio.grad, mask)]
    for grad, expected in zip(per_sequence, grads):   # the same value on each of its tokens
        assert grad.tolist() == pytest.approx([expected] * len(grad))
    # Alone, token-mean-micro is the token mean of its micro-batch.
    advantages, mask = tensors(MICRO[0])
    assert aggregate(-advantages, mask, mode).item() == pytest.approx(-2 / 4)


@pytest.fixture(scope="module")
def megatron_1proc():
    from prism_megatron.distributed import destroy_distributed, init_distributed

    init_distributed(tp=1, pp=1, ep=1, seed=1234)
    yield
    destroy_distributed()


@pytest.mark.parametrize("mode", ["token-mean", "token-mean-micro"])
def test_policy_update_loss_forward_weights_micro_batches(megatron_1proc, mode):
    """make_loss_forward on fixed logits (a stand-in model), summed as megatron's schedule does:
    the loss and the gradient of every response token's log-prob are the hand-computed ones."""
    from prism_megatron.rl.logprobs import LossSettings, StepStats, make_loss_forward

    loss, grads = EXPECTED[mode]
    generator = torch.Generator().manual_seed(0)
    forward = make_loss_forward(LossSettings(agg=mode), V, stats=StepStats())
    total, count, seq = 0, 0, 0
    checks = []
    for micro in MICRO:
        advantages, mask = tensors(micro)
        logits = torch.randn(len(micro), S, V, generator=generator).requires_grad_(True)
        labels = torch.randint(0, V, (len(micro), S), generator=generator)
        old = torch.log_softmax(logits.detach(), -1).gather(-1, labels[..., None])[..., 0]
        batch = {"input_ids": labels, "position_ids": None, "segment_ids": None,
                 "image_mask": None, "labels": labels, "loss_mask": mask.float(),
                 "old_log_probs": old * mask, "advantages": advantages}
        output, loss_fn = forward(batch, lambda **_: logits.clone())
        piece, n, _ = loss_fn(output)
        total, count = total + piece, count + int(n)
        for row in range(len(micro)):
            checks.append((logits, labels, row, mask[row], grads[seq]))
            seq += 1
    total = total / count
    assert total.item() == pytest.approx(loss, rel=1e-6)
    total.backward()
    for logits, labels, row, mask, g in checks:
        # d loss / d logits = g x (one-hot(label) - softmax) on response positions, 0 elsewhere
        probs = torch.softmax(logits.detach()[row], -1)
        expected = g * (torch.nn.functional.one_hot(labels[row], V) - probs) * mask[:, None]
        assert torch.allclose(logits.grad[row], expected, atol=1e-6)
