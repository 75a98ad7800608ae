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
from prism_megatron.data.encode import load_processor
from prism_megatron.data.rl import load_rl_prompts
from prism_megatron.distributed import destroy_distributed, init_distributed, is_main_rank
from prism_megatron.models.discriminator.pairs import PairSample
from prism_megatron.models.discriminator.segments import pair_segments
from prism_megatron.rollout.base import Sample
from prism_megatron.stages import align
from prism_megatron.stages.policy_worker import PolicyWorker

TEXTS = [   # valid, invalid, valid, invalid: odd indices are never valid
    "<caption>- a grid of coloured cells\n- red and blue cells</caption>\n"
    "<think>Count the red cells: there are 2.</think>\n<answer>{a}</answer>",
    "<think>no caption here</think>\n<answer>{a}</answer>",
    "<caption>grid</caption><think>{a}</think><answer>{a}</answer>",
    "<caption>grid</caption><think>x</think><answer>{a}</answer> and more text",
]


def flat_weights(module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in module.parameters()])


def main(config: str, out: str) -> None:
    cfg = load_config(config)
    init_distributed(seed=cfg.seed)
    try:
        processor = load_processor(cfg.model.hf_dir)
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
        worker = PolicyWorker(cfg, processor, total_steps=2)
        disc = align.Discriminator(cfg, total_steps=2, pad_id=tok.pad_token_id)
        disc.resume(0)
        batch = {"prompts": prompts, "samples": samples, "group": group}
        vision = align.vision_token_ids(worker.hf_config)
        caption, reasoning, valid, segments = align.score_students(
            disc, batch, tok, vision, tok.pad_token_id)
        single = torch.stack([torch.cat(align.score_students(
            disc, {"prompts": prompts, "samples": [s], "group": [g]}, tok, vision,
            tok.pad_token_id)[:2]) for s, g in zip(samples, group)])
        a = cfg.algorithm
        advantages = prism_advantages(caption, reasoning, valid, group,
                                      caption_weight=a.caption_weight,
                                      reasoning_weight=a.reasoning_weight,
                                      format_penalty=a.format_penalty).float()
        policy_before = flat_weights(worker.model)
        policy_metrics = worker.train(prompts, samples, group, advantages)
        policy_moved = float((flat_weights(worker.model) - policy_before).abs().max())
        teachers = [pair_segments(p.teacher["teacher_caption"], p.teacher["teacher_cot"], tok,
                                  p.answer) for p in prompts]
        pairs = [PairSample(str(i), prompts[g].encoded, teachers[g],
                            align._student(segments[i], valid[i])) for i, g in enumerate(group)]
        kwargs = dict(micro=2, pad_id=tok.pad_token_id, score_reg=cfg.discriminator.score_reg,
                      score_clip=cfg.discriminator.score_clip)
        disc_before = flat_weights(disc.model)
        disc_metrics = align.discriminator_update(disc.trainer, disc.model, pairs, **kwargs)
        disc_moved = float((flat_weights(disc.model) - disc_before).abs().max())
        invalid = [PairSample(p.id, p.prompt, p.teacher, align._student(p.student, False))
                   for p in pairs]
        fallback = align.discriminator_update(disc.trainer, disc.model, invalid, **kwargs)
        if is_main_rank():
            torch.save({"caption": caption, "reasoning": reasoning, "valid": valid,
                        "single": single, "group": group, "advantages": advantages,
                        "policy": policy_metrics, "policy_moved": policy_moved,
                        "disc": disc_metrics, "disc_moved": disc_moved, "fallback": fallback}, out)
        worker.shutdown()
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:])
