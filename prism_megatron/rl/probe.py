"""Teacher-NLL probe of the alignment stage: how far the policy is from the teacher, per step,
without the discriminator.

``eval.probe_rows`` = K > 0 fixes the first K alignment prompts. Each one's teacher
demonstration (its tagged ``teacher_caption``, a newline, its tagged ``teacher_cot``: the
response the policy is meant to produce, the layout of ``rewards.response.format_response``) is
tokenised as generation and SFT tokenise a response (``text + end-of-turn``, after the prompt's
own encoding) and scored teacher-forced by the Megatron policy, forward-only, through the same
micro-batches and log-prob pass as the policy's update (``rl.batch.plan_micro_batches``,
``rl.logprobs.compute_log_probs``), at temperature 1: the model's own distribution, not the
sampling one. Response tokens are split as ``eval.teacher_nll.segment_masks`` splits them (a
token that starts before the end of ``</caption>`` is caption, the rest of the text is reasoning,
the end-of-turn token is in neither), so ``probe/nll_*`` at step 0 equals
``eval.teacher_nll.teacher_nll`` of the same demonstrations under the equivalent HF model.

Means are over tokens. The log-probs live on the last pipeline stage (identical on its tensor-
parallel ranks) and each data-parallel rank holds its share of the rows: the sums and token
counts of the last stage's tensor-parallel rank 0 are all-reduced over the world.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from prism_megatron.eval.teacher_nll import segment_masks
from prism_megatron.rl.batch import MicroBatches, RolloutBatch, plan_micro_batches
from prism_megatron.rl.logprobs import compute_log_probs
from prism_megatron.rollout.base import Sample

KEY = "probe_log_probs"


def teacher_text(prompt) -> str:
    """The teacher demonstration of an alignment prompt, as one response."""
    return f"{prompt.teacher['teacher_caption']}\n{prompt.teacher['teacher_cot']}"


class TeacherProbe:
    def __init__(self, prompts: Sequence, tokenizer, hf_config, *, micro_batch_size: int,
                 max_tokens: int = 0):
        end_of_turn = tokenizer.eos_token or "<|im_end|>"
        samples, self.masks = [], []
        for prompt in prompts:
            text = teacher_text(prompt)
            ids = list(tokenizer(text + end_of_turn, add_special_tokens=False)["input_ids"])
            masks = segment_masks(tokenizer, text, ids)
            self.masks.append((torch.tensor(masks["caption"]), torch.tensor(masks["reasoning"])))
            samples.append(Sample(ids, [0.0] * len(ids), text, "stop"))
        self.batch = RolloutBatch(list(prompts), samples, list(range(len(samples))))
        self.pad_id = tokenizer.pad_token_id
        self.hf_config = hf_config
        self.micro_batch_size, self.max_tokens = micro_batch_size, max_tokens
        self._micro: MicroBatches | None = None

    def __len__(self) -> int:
        return len(self.batch)

    def micro_batches(self) -> MicroBatches:
        """This rank's share of the probe rows (planned once; the log-prob pass overwrites its
        key every step)."""
        from megatron.core import parallel_state as ps

        if self._micro is None:
            self._micro = plan_micro_batches(
                self.batch, list(range(len(self.batch))), micro_batch_size=self.micro_batch_size,
                pad_id=self.pad_id, hf_config=self.hf_config,
                dp_rank=ps.get_data_parallel_rank(), dp_size=ps.get_data_parallel_world_size(),
                max_tokens=self.max_tokens)
        return self._micro

    def nll(self, model) -> dict[str, float]:
        """``probe/nll_caption``, ``probe/nll_reasoning`` (and their token counts) under
        ``model`` (collective over the world; the same numbers on every rank)."""
        from megatron.core import parallel_state as ps

        micro = self.micro_batches()
        compute_log_probs(model, micro, key=KEY, temperature=1.0)
        # caption NLL, caption tokens, reasoning NLL, reasoning tokens
        sums = torch.zeros(4, dtype=torch.float64)
        if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0:
            for i, log_probs in micro.per_sample(KEY).items():
                caption, reasoning = self.masks[i]
                log_probs = log_probs.double()
                sums += torch.stack([-log_probs[caption].sum(), caption.sum().double(),
                                     -log_probs[reasoning].sum(), reasoning.sum().double()])
        if dist.is_initialized():
            dist.all_reduce(sums)
        return {"probe/nll_caption": float(sums[0] / sums[1].clamp(min=1)),
                "probe/nll_reasoning": float(sums[2] / sums[3].clamp(min=1)),
                "probe/tokens_caption": float(sums[1]), "probe/tokens_reasoning": float(sums[3])}


def make_probe(cfg, dataset: Sequence, tokenizer, hf_config) -> TeacherProbe | None:
    """The probe of ``eval.probe_rows`` (the first rows of the alignment prompts), or None."""
    rows = cfg.eval.probe_rows
    if not rows:
        return None
    return TeacherProbe(list(dataset[:rows]), tokenizer, hf_config,
                        micro_batch_size=cfg.data.micro_batch_size,
                        max_tokens=cfg.data.max_tokens_per_micro_batch)
