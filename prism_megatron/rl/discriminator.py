"""The discriminator under training: model, trainer (its own optimizer), scorer, pairwise
update, held-out evaluation and resume; one component for the warm-up and the alignment stage.

Pairs: a micro-batch of ``k`` comparison pairs is one forward over ``4k`` rows, in blocks
(teacher caption, student caption, teacher reasoning, student reasoning), each row
``[prompt ; segment]`` read at its segment's closing tag. Every step's micro-batches are padded
to the step's longest sequence and are as many on every data-parallel rank (filler slots repeat a
real pair with weight 0); each micro-batch's GLOBAL valid-pair count is all-reduced once per step,
BEFORE the forwards, so the no-valid-pair fallback is chosen identically everywhere.

Losses (``algorithms.losses.discriminator_loss``): the warm-up's is half its sum, i.e. the mean
over comparison pairs of ``softplus(-(s_T - s_S))`` with no regulariser and no clipping (spec
§3.6); the alignment's adds the score regulariser over all real rows and the clipping (spec
§3.4). Each micro-batch's loss is weighted for megatron, which divides the step's sum by the
summed weights: by valid pairs in the warm-up (real pairs in its fallback), by real rows online.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from prism_megatron.algorithms.losses import discriminator_loss
from prism_megatron.config import ConfigError, OptimizerConfig, ParallelConfig, PrismConfig
from prism_megatron.data.collate import padded_length, rank_share
from prism_megatron.data.pairs import PairSample
from prism_megatron.data.segments import CAPTION, REASONING, build_sequence, collate_sequences
from prism_megatron.rl.batch import RolloutBatch
from prism_megatron.rl.pair_stats import PairStats, load_metrics, load_table, reduce_load
from prism_megatron.rl.scoring import Scorer, discriminator_forward, read_scores

log = logging.getLogger("prism.discriminator")
DISCRIMINATOR_DIR = "discriminator"      # the alignment stage's discriminator checkpoints
ROLE_ORDER = (("teacher", CAPTION), ("student", CAPTION), ("teacher", REASONING),
              ("student", REASONING))   # row blocks of a micro-batch: tc, sc, tr, sr


# ------------------------------------------------------------------------------ pair batches

@dataclass
class PairPlan:
    batches: list[dict]
    seq_length: int


def sequence_lengths(sample: PairSample) -> list[int]:
    n = len(sample.prompt.input_ids)
    return [n + len(getattr(sample, role).segment(kind)) for role, kind in ROLE_ORDER]


def micro_batch(pairs: list[PairSample], chosen: list[int | None], *, pad_id: int, position_fn,
                length: int) -> dict:
    """Rows: [teacher caption x k, student caption x k, teacher reasoning x k, student reasoning
    x k]. A filler slot (None) repeats a real pair with weight 0 and counts as invalid."""
    filler = next((i for i in chosen if i is not None), 0)
    real = torch.tensor([i is not None for i in chosen])
    samples = [pairs[filler if i is None else i] for i in chosen]
    seqs = [build_sequence(s.prompt, getattr(s, role).segment(kind), kind)
            for role, kind in ROLE_ORDER for s in samples]
    batch = collate_sequences(seqs, pad_id=pad_id, position_fn=position_fn, length=length)
    batch["real"] = real
    batch["student_valid"] = real & torch.tensor([s.student.valid for s in samples])
    return batch


def share_valid_counts(batches: list[dict]) -> list[dict]:
    """Each micro-batch's GLOBAL valid-student count (``valid_global``): one SUM all-reduce per
    step over data-parallel ranks covering every micro-batch (spec §3.4 asks for one per
    micro-batch; same numbers, and no collective inside a loss function)."""
    counts = torch.tensor([int(b["student_valid"].sum()) for b in batches], dtype=torch.long)
    if dist.is_initialized():
        from megatron.core import parallel_state as ps

        dist.all_reduce(counts, group=ps.get_data_parallel_group())
    for batch, count in zip(batches, counts.tolist()):
        batch["valid_global"] = count
    return batches


def plan_pairs(pairs, indices, *, dp_rank, dp_size, micro, pad_id, position_fn) -> PairPlan:
    """This rank's micro-batches of the pairs ``indices`` (see the module docstring)."""
    seq_length = padded_length(max(max(sequence_lengths(pairs[i])) for i in indices))
    mine = rank_share(indices, dp_rank, dp_size, micro)
    batches = [micro_batch(pairs, mine[k:k + micro], pad_id=pad_id, position_fn=position_fn,
                           length=seq_length) for k in range(0, len(mine), micro)]
    return PairPlan(share_valid_counts(batches), seq_length)


def plan_groups(pairs: list[PairSample], group: list[int], *, dp_rank: int, dp_size: int,
                groups_per_micro: int, pad_id: int, position_fn) -> PairPlan:
    """Micro-batches of whole prompt groups whose students share their prompt's teacher: rows
    [teacher caption x m, teacher reasoning x m, student caption x k, student reasoning x k]
    for m groups and their k students, so a teacher segment is forwarded once per prompt
    (2 + 2n sequences per prompt instead of 4n). ``batch["teacher_of"]`` maps each student to
    its teacher row. Every group must have the same number of students (fixed micro-batch
    shapes for the pipeline schedule)."""
    members: dict[int, list[int]] = {}
    for i, g in enumerate(group):
        members.setdefault(g, []).append(i)
    order = sorted(members)
    sizes = {len(v) for v in members.values()}
    if len(sizes) != 1:
        raise ValueError(f"groups of unequal sizes {sorted(sizes)}: shared-teacher batches need "
                         "the same number of students per prompt")
    seq_length = padded_length(max(max(sequence_lengths(p)) for p in pairs))
    mine = rank_share(order, dp_rank, dp_size, groups_per_micro)
    batches = []
    for k in range(0, len(mine), groups_per_micro):
        chosen = mine[k:k + groups_per_micro]
        filler = next((g for g in chosen if g is not None), order[0])
        groups = [filler if g is None else g for g in chosen]
        students = [i for g in groups for i in members[g]]
        real = torch.tensor([c is not None for c in chosen for _ in members[filler]])
        heads = [pairs[members[g][0]] for g in groups]
        seqs = ([build_sequence(p.prompt, p.teacher.segment(CAPTION), CAPTION) for p in heads]
                + [build_sequence(p.prompt, p.teacher.segment(REASONING), REASONING)
                   for p in heads]
                + [build_sequence(pairs[i].prompt, pairs[i].student.segment(kind), kind)
                   for kind in (CAPTION, REASONING) for i in students])
        batch = collate_sequences(seqs, pad_id=pad_id, position_fn=position_fn,
                                  length=seq_length)
        batch["groups"] = len(groups)
        batch["teacher_of"] = torch.tensor([r for r, g in enumerate(groups)
                                            for _ in members[g]])
        batch["real"] = real
        batch["student_valid"] = real & torch.tensor([pairs[i].student.valid for i in students])
        batches.append(batch)
    return PairPlan(share_valid_counts(batches), seq_length)


def weighted(loss: torch.Tensor, weight: int, stats: PairStats):
    """A micro-batch's (loss x weight, weight, logs) for megatron."""
    stats.add_loss(loss.item() * weight, weight)
    total = loss * weight
    return total, torch.tensor(weight, dtype=torch.int), {
        "loss": torch.stack([total.detach(), torch.tensor(float(weight))])}


def warmup_weight(batch: dict) -> int:
    """The warm-up loss weight of a micro-batch, known before the forward."""
    return int(batch["student_valid"].sum() if batch["valid_global"] > 0 else batch["real"].sum())


def pair_loss_fn(batch: dict, stats: PairStats):
    """Warm-up (spec §3.6): the mean over comparison pairs; no regulariser, no clipping."""
    valid = batch["student_valid"]

    def loss_fn(values: torch.Tensor):
        tc, sc, tr, sr = pair_scores(values, batch)
        # discriminator_loss sums caption + reasoning pair losses per student; / 2 = the mean
        # over comparison pairs.
        loss = 0.5 * discriminator_loss(tc, sc, tr, sr, valid, score_reg=0.0,
                                        valid_global=batch["valid_global"],
                                        score_clip=float("inf"))
        stats.add_pairs(tc, sc, tr, sr, valid)
        return weighted(loss, warmup_weight(batch), stats)

    return loss_fn


def pair_scores(values: torch.Tensor, batch: dict) -> tuple[torch.Tensor, ...]:
    """(teacher caption, student caption, teacher reasoning, student reasoning) scores, one per
    comparison pair, from a ``plan_pairs`` micro-batch (rows tc, sc, tr, sr) or a ``plan_groups``
    one (rows tc, tr per prompt, then sc, sr per student; a student's pair reads its prompt's
    teacher through ``teacher_of``, so the loss and its gradients are the per-pair ones)."""
    scores = read_scores(values, batch["score_index"])
    if "teacher_of" not in batch:
        return tuple(scores.view(4, batch["real"].numel()))
    m, k, teacher_of = batch["groups"], batch["real"].numel(), batch["teacher_of"]
    return (scores[:m][teacher_of], scores[2 * m:2 * m + k], scores[m:2 * m][teacher_of],
            scores[2 * m + k:])


def online_loss_fn(batch: dict, stats: PairStats, score_reg: float, score_clip: float):
    """Alignment (spec §3.4): the pairwise term over valid students (or the teacher-only
    fallback when NO rank has a valid student) plus the score regulariser over all real rows,
    weighted by the real-row count."""
    real, valid = batch["real"], batch["student_valid"]

    def loss_fn(values: torch.Tensor):
        tc, sc, tr, sr = pair_scores(values, batch)
        rows = int(real.sum())
        if rows == 0:   # an all-filler micro-batch: same graph, no contribution
            loss = values.sum() * 0
        else:
            loss = discriminator_loss(tc[real], sc[real], tr[real], sr[real], valid[real],
                                      score_reg=score_reg, valid_global=batch["valid_global"],
                                      score_clip=score_clip)
        stats.add_pairs(tc, sc, tr, sr, valid)
        return weighted(loss, rows, stats)

    return loss_fn


def pair_forward(make_loss_fn):
    """megatron ``forward(batch, model)`` with the loss ``make_loss_fn(batch)``."""
    def forward(batch: dict, model):
        return discriminator_forward(batch, model), make_loss_fn(batch)

    return forward


# ------------------------------------------------------------------------------ the component

def discriminator_layout(cfg: PrismConfig) -> ParallelConfig:
    d = cfg.discriminator
    return ParallelConfig(tp=d.tp, pp=d.pp, ep=d.ep,
                          distributed_optimizer=cfg.parallel.distributed_optimizer)


def check_discriminator(cfg: PrismConfig, tp: int) -> None:
    """The discriminator checkpoint exists and matches the config (before any process group)."""
    from prism_megatron.models.discriminator.model import check_moe_layout, read_info

    d = cfg.discriminator
    _, info = read_info(d.megatron_dir)
    if (d.num_experts, d.top_k) != (info["num_experts"], info["top_k"]):
        raise ConfigError(f"discriminator.num_experts/top_k = {d.num_experts}/{d.top_k} but "
                          f"{d.megatron_dir} holds a {info['num_experts']}-expert "
                          f"top-{info['top_k']} model")
    check_moe_layout(info["num_experts"], info["top_k"], d.expert_routing, tp=tp, ep=d.ep,
                     dispatcher=d.dispatcher)


class Discriminator:
    """Model + trainer + scorer of the MoE discriminator. ``for_warmup``: trained alone on the
    warm-up's optimizer and checkpoints; ``for_alignment``: beside the policy, with its own
    optimizer (``discriminator.lr``) and checkpoints under ``<checkpoint.save_dir>/discriminator``
    saved at the policy's steps."""

    def __init__(self, cfg: PrismConfig, total_steps: int, pad_id: int, *,
                 optimizer: OptimizerConfig | None, layout: ParallelConfig, save_dir: str,
                 aux_loss_coef: float):
        """``optimizer`` None: a frozen discriminator, built without a trainer (no DDP gradient
        buffer, no optimizer state: at 2B scale that is several GB per rank), scored and
        evaluated forward-only, never saved (its weights are ``discriminator.megatron_dir``'s)."""
        from prism_megatron.models.discriminator.model import build_discriminator
        from prism_megatron.trainer import Trainer

        d = cfg.discriminator
        self.cfg, self.pad_id = cfg, pad_id
        self.model, tconfig = build_discriminator(d.megatron_dir, d, cfg.model)
        self.model.set_aux_loss(aux_loss_coef)
        self.trainer = None
        if optimizer is None:
            self.model.requires_grad_(False)
            # as the Trainer sets it: megatron then leaves the logged (loss x weight) sums as
            # they are instead of dividing them in place by tokens and micro-batches
            tconfig.calculate_per_token_loss = True
            scored = self.model
        else:
            self.trainer = Trainer(self.model, tconfig, optimizer, layout,
                                   dataclasses.replace(cfg.checkpoint, save_dir=save_dir),
                                   total_steps, bf16=cfg.model.dtype == "bf16")
            if self.trainer.saving:   # the saved directory is itself a discriminator checkpoint
                describe_save_dir(d.megatron_dir, save_dir)
            scored = self.trainer.model
        self.position_fn = self.model.position_fn
        self.scorer = Scorer(scored, pad_id, score_clip=d.score_clip)

    @property
    def frozen(self) -> bool:
        return self.trainer is None

    @classmethod
    def for_warmup(cls, cfg: PrismConfig, total_steps: int, pad_id: int) -> "Discriminator":
        if cfg.discriminator.frozen:
            raise ConfigError("discriminator.frozen=true is an alignment-stage ablation; the "
                              "warm-up trains the discriminator (set it to false)")
        save_dir = cfg.checkpoint.save_dir if cfg.checkpoint.enabled else ""
        return cls(cfg, total_steps, pad_id, optimizer=cfg.optimizer, layout=discriminator_layout(cfg),
                   save_dir=save_dir, aux_loss_coef=cfg.discriminator.warmup_aux_loss_coef)

    @classmethod
    def for_alignment(cls, cfg: PrismConfig, total_steps: int, pad_id: int) -> "Discriminator":
        """Beside the policy with its own optimizer, or (``discriminator.frozen``) without."""
        d = cfg.discriminator
        if d.frozen:
            return cls(cfg, total_steps, pad_id, optimizer=None, layout=discriminator_layout(cfg),
                       save_dir="", aux_loss_coef=d.aux_loss_coef)
        o = cfg.optimizer   # the memory levers are the policy's (a co-located pair, one plan)
        optimizer = OptimizerConfig(lr=d.lr, weight_decay=0.01, schedule="constant",
                                    warmup_ratio=0.0, clip_grad=o.clip_grad,
                                    cpu_offload=o.cpu_offload, offload_fraction=o.offload_fraction,
                                    main_grads_dtype=o.main_grads_dtype)
        saving = cfg.checkpoint.enabled and cfg.checkpoint.save_dir
        return cls(cfg, total_steps, pad_id, optimizer=optimizer, layout=discriminator_layout(cfg),
                   save_dir=f"{cfg.checkpoint.save_dir}/{DISCRIMINATOR_DIR}" if saving else "",
                   aux_loss_coef=d.aux_loss_coef)

    # ---- weights ----------------------------------------------------------------------
    def load_initial(self) -> None:
        """The weights of ``discriminator.megatron_dir`` (upcycled, or a warm-up's)."""
        from prism_megatron.models.discriminator.model import load_discriminator

        load_discriminator(self.model, self.cfg.discriminator.megatron_dir)

    def save(self, step: int):
        """The trainer's checkpoint at ``step``; nothing for a frozen discriminator."""
        return None if self.frozen else self.trainer.save(step)

    def resume_at(self, step: int) -> None:
        """The discriminator saved at the policy's step (saved before the policy's, so it exists
        whenever the policy's does), or the initial weights at step 0. A frozen one always
        loads the initial weights: they are its weights at every step."""
        from prism_megatron.checkpoint import load_checkpoint

        if step == 0 or self.frozen:
            self.load_initial()
            return
        path = Path(self.trainer.checkpoint.save_dir) / f"step_{step:07d}"
        if not path.is_dir():
            raise ConfigError(f"policy checkpoint at step {step} but no discriminator "
                              f"checkpoint {path}: keep checkpoint.keep_last >= 2")
        load_checkpoint(path, [self.trainer.model], self.trainer.optimizer, self.trainer.scheduler)

    # ---- scoring, training, evaluation ------------------------------------------------
    def plan(self, pairs: list[PairSample], indices: list[int]) -> PairPlan:
        from megatron.core import parallel_state as ps

        return plan_pairs(pairs, indices, dp_rank=ps.get_data_parallel_rank(),
                          dp_size=ps.get_data_parallel_world_size(),
                          micro=self.cfg.data.micro_batch_size, pad_id=self.pad_id,
                          position_fn=self.position_fn)

    def load(self, prefix: str = "load") -> dict[str, float]:
        """Expert load per segment type since the last call (collective)."""
        return load_metrics(reduce_load(self.model.take_load(), self.model.config.sequence_parallel),
                            prefix)

    def warmup_step(self, pairs: list[PairSample], indices: list[int]) -> dict:
        """One warm-up optimizer step on the pairs ``indices``."""
        stats = PairStats()
        plan = self.plan(pairs, indices)
        self.model.set_step_aux_scale(sum(warmup_weight(b) for b in plan.batches)
                                      / len(plan.batches))
        out = self.trainer.train_step(plan.batches, pair_forward(
            lambda b: pair_loss_fn(b, stats)), plan.seq_length)
        pair = stats.reduce()
        return {"loss": out["loss"], "acc_caption": pair["acc_caption"],
                "acc_reasoning": pair["acc_reasoning"], "aux_loss": self.model.take_aux(),
                "grad_norm": out["grad_norm"], "lr": out["lr"], **self.load()}

    def score(self, batch: RolloutBatch, tokenizer, vision_ids: set[int]) -> None:
        """Spec §3.3 scoring pass (no grad, before the update): sets the batch's caption /
        reasoning scores, format validity and segments; invalid responses score 0."""
        tokens, clean = student_tokens(batch.samples, vision_ids, self.pad_id)
        prompts = [batch.prompt_of(i).encoded for i in range(len(batch))]
        scores = self.scorer.score_responses(prompts, tokens, tokenizer)
        valid = scores.format_valid & torch.tensor(clean)
        zero = torch.zeros_like(scores.caption)
        batch.caption = torch.where(valid, scores.caption, zero)
        batch.reasoning = torch.where(valid, scores.reasoning, zero)
        batch.valid = valid
        batch.segments = scores.segments

    def online_step(self, pairs: list[PairSample], group: list[int]) -> dict[str, float]:
        """One alignment optimizer step on this step's (teacher, student) pairs, the students of
        a prompt (``group``) sharing its teacher's forward; ``data.micro_batch_size`` students
        (rounded to whole prompts) per micro-batch."""
        from megatron.core import parallel_state as ps

        d = self.cfg.discriminator
        stats = PairStats()
        n = len(group) // max(1, len(set(group)))
        plan = plan_groups(pairs, group, dp_rank=ps.get_data_parallel_rank(),
                           dp_size=ps.get_data_parallel_world_size(),
                           groups_per_micro=max(1, self.cfg.data.micro_batch_size // n),
                           pad_id=self.pad_id, position_fn=self.position_fn)
        forward = pair_forward(lambda b: online_loss_fn(b, stats, d.score_reg, d.score_clip))
        if self.frozen:   # the same pairs and statistics, forward-only, no update
            out = self.eval_step(plan.batches, forward, plan.seq_length)
        else:   # discriminator.aux_loss_coef x the load-balancing loss, on the rows' loss weight
            self.model.set_step_aux_scale(sum(int(b["real"].sum()) for b in plan.batches)
                                          / len(plan.batches))
            out = self.trainer.train_step(plan.batches, forward, plan.seq_length)
        pair = stats.reduce()
        grad_norm = {} if self.frozen else {"disc/grad_norm": out["grad_norm"],
                                            "disc/aux_loss": self.model.take_aux()}
        return {"disc/loss": out["loss"], **grad_norm,
                "disc/acc_caption": pair["acc_caption"],
                "disc/acc_reasoning": pair["acc_reasoning"],
                "disc/gap_caption": pair["margin_caption"],
                "disc/gap_reasoning": pair["margin_reasoning"], "disc/pairs": pair["pairs"],
                "disc/sequences_per_prompt": 2.0 + 2.0 * n, **self.load("disc/load")}

    def eval_step(self, batches: list[dict], forward, seq_length: int) -> dict:
        """A no-gradient pass; the global mean of the loss_fn's ``loss`` logs (with or without
        a trainer)."""
        from prism_megatron.schedule import forward_only
        from prism_megatron.trainer import reduce_losses

        return reduce_losses(forward_only(self.scorer.model, batches, forward, seq_length))

    def evaluate(self, pairs: list[PairSample]) -> dict:
        """Held-out pairwise accuracy (teacher > student) per segment + expert load, no update."""
        from megatron.core import parallel_state as ps

        self.model.take_load()   # discard the training load since the last report
        stats = PairStats()
        chunk = self.cfg.data.micro_batch_size * ps.get_data_parallel_world_size() * 8
        for start in range(0, len(pairs), chunk):
            plan = self.plan(pairs, list(range(start, min(start + chunk, len(pairs)))))
            self.eval_step(plan.batches, pair_forward(lambda b: pair_loss_fn(b, stats)),
                           plan.seq_length)
        load = reduce_load(self.model.take_load(), self.model.config.sequence_parallel)
        return {**stats.reduce(), **load_metrics(load), "_load_table": load_table(load)}


def vision_token_ids(hf_config) -> set[int]:
    names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    return {getattr(hf_config, n) for n in names if getattr(hf_config, n, None) is not None}


def student_tokens(samples, vision_ids: set[int], pad_id: int) -> tuple[list[list[int]], list[bool]]:
    """Response ids for the discriminator, and whether each is free of vision special tokens.
    A sampled image/video token has no image behind it: the response counts as malformed, and
    the token is replaced by the pad id so the discriminator's forward stays well-defined."""
    tokens, clean = [], []
    for s in samples:
        bad = any(t in vision_ids for t in s.token_ids)
        tokens.append([pad_id if t in vision_ids else t for t in s.token_ids])
        clean.append(not bad)
    return tokens, clean


def student_segments(segments, valid) -> object:
    """The scored segments, marked invalid when the response was (e.g. a sampled vision token)."""
    if bool(valid) or not segments.valid:
        return segments
    return dataclasses.replace(segments, valid=False)


def online_pairs(batch: RolloutBatch, teachers: list, step: int) -> list[PairSample]:
    """Each scored student against its prompt's teacher segments (``teachers[g]`` for group g)."""
    return [PairSample(f"{step}-{i}", batch.prompt_of(i).encoded, teachers[g],
                       student_segments(batch.segments[i], batch.valid[i]))
            for i, g in enumerate(batch.group)]


def describe_save_dir(megatron_dir: str, save_dir: str) -> None:
    """Copy the discriminator's description (dense hf_config/ + prism_discriminator.json) into
    ``save_dir``, so that directory is itself a discriminator checkpoint (what the alignment
    stage and the HF export read)."""
    import shutil

    from prism_megatron.weights import ckpt_layout as lay
    from prism_megatron.distributed import is_main_rank
    from prism_megatron.models.discriminator.model import INFO_FILE

    root = lay.checkpoint_root(lay.resolve_checkpoint_dir(megatron_dir))
    out = Path(save_dir)
    if not is_main_rank() or root.resolve() == out.resolve():
        return
    out.mkdir(parents=True, exist_ok=True)
    shutil.copytree(root / lay.HF_CONFIG_DIR, out / lay.HF_CONFIG_DIR, dirs_exist_ok=True)
    shutil.copy2(root / INFO_FILE, out / INFO_FILE)
