"""One alignment step on a fixed, hand-written rollout batch (CPU, gloo, any data parallelism).

    torchrun --nproc_per_node N tests/dist/align_step.py CONFIG.yaml OUT.pt

Two prompts x four responses: teacher-like (valid), no caption (invalid), terse (valid), text after
</answer> (invalid). Responses at odd indices are all invalid, so with two data-parallel ranks
rank 1 has no valid student. Then a second discriminator step where no rank has one (fallback).
Rank 0 writes scores, validity, advantages, metrics and how far each model moved.
"""

import sys

import torch

from prism_megatron.algorithms.advantages import prism_advantages
from prism_megatron.config import load_config
from prism_megatron.data.rl import load_rl_prompts
from prism_megatron.distributed import is_main_rank
from prism_megatron.data.pairs import PairSample
from prism_megatron.data.segments import pair_segments
from prism_megatron.rl.batch import RolloutBatch
from prism_megatron.rl.discriminator import (
    Discriminator, online_pairs, student_segments, vision_token_ids)
from prism_megatron.rl.policy import Policy
from prism_megatron.rollout.base import Sample
from prism_megatron.runtime import stage_session

TEXTS = [   # valid, invalid, valid, invalid: odd indices are never valid
    "<caption>- a grid of coloured cells\n- red and blue cells</caption>\n"
    "<think>Count the red cells: there are 2.</think>\n<answer>{a}</answer>",
    "<think>no caption here</think>\n<answer>{a}</answer>",
    "<caption>grid</caption><think>{a}</think><answer>{a}</answer>",
    "<caption>grid</caption><think>x</think><answer>{a}</answer> and more text",
]


def flat_weights(module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in module.parameters()])


def fixed_rollout(cfg, processor):
    """(prompts, samples, group): the first two alignment prompts, each with the four TEXTS."""
    tok = processor.tokenizer
    dataset, _ = load_rl_prompts(cfg.data.train_files, processor, max_prompt_length=512,
                                 require=("teacher_caption", "teacher_cot"), progress=False)
    prompts = dataset[:2]
    samples, group = [], []
    for g, prompt in enumerate(prompts):
        for text in TEXTS:
            ids = tok(text.format(a=prompt.answer) + "<|im_end|>",
                      add_special_tokens=False)["input_ids"]
            samples.append(Sample(ids, [0.0] * len(ids), text, "stop"))
            group.append(g)
    return prompts, samples, group


def main(config: str, out: str) -> None:
    cfg = load_config(config)
    with stage_session(cfg, "align", tp=1, pp=1) as session:
        processor = session.processor()
        tok = processor.tokenizer
        prompts, samples, group = fixed_rollout(cfg, processor)
        worker = Policy(cfg, processor, total_steps=2)
        disc = Discriminator.for_alignment(cfg, total_steps=2, pad_id=tok.pad_token_id)
        disc.resume_at(0)
        batch = RolloutBatch(prompts, samples, group)
        vision = vision_token_ids(worker.hf_config)
        disc.score(batch, tok, vision)
        caption, reasoning, valid = batch.caption, batch.reasoning, batch.valid

        def scored_alone(i):
            one = RolloutBatch(prompts, [samples[i]], [group[i]])
            disc.score(one, tok, vision)
            return torch.cat([one.caption, one.reasoning])

        single = torch.stack([scored_alone(i) for i in range(len(samples))])
        a = cfg.algorithm
        advantages = prism_advantages(caption, reasoning, valid, group,
                                      caption_weight=a.caption_weight,
                                      reasoning_weight=a.reasoning_weight,
                                      format_penalty=a.format_penalty).float()
        batch.advantages = advantages
        policy_before = flat_weights(worker.model)
        policy_metrics = worker.train(batch)
        policy_moved = float((flat_weights(worker.model) - policy_before).abs().max())
        teachers = [pair_segments(p.teacher["teacher_caption"], p.teacher["teacher_cot"], tok,
                                  p.answer) for p in prompts]
        pairs = online_pairs(batch, teachers, step=0)
        disc_before = flat_weights(disc.model)
        disc_metrics = disc.online_step(pairs, group)
        disc_moved = float((flat_weights(disc.model) - disc_before).abs().max())
        invalid = [PairSample(p.id, p.prompt, p.teacher, student_segments(p.student, False))
                   for p in pairs]
        fallback = disc.online_step(invalid, group)
        if is_main_rank():
            torch.save({"caption": caption, "reasoning": reasoning, "valid": valid,
                        "single": single, "group": group, "advantages": advantages,
                        "policy": policy_metrics, "policy_moved": policy_moved,
                        "disc": disc_metrics, "disc_moved": disc_moved, "fallback": fallback}, out)
        worker.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
