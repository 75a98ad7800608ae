"""Held-out evaluation: generate with a rollout engine, score with the verifiable scorer.

Rows are sharegpt-style prompts (system + user messages, ``images``) with a ground-truth
``answer``, as in the synthetic task's ``test.jsonl``. Greedy decoding by default; with
``n > 1`` and a temperature, pass@k over the samples is reported too.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from prism_megatron.data.encode import encode_prompt
from prism_megatron.data.sharegpt import BadRow, count_placeholders, load_images, row_messages
from prism_megatron.rewards.verifiable import score_response
from prism_megatron.rollout.base import RolloutPrompt, SamplingParams


@dataclass
class EvalResult:
    accuracy: float          # mean accuracy over all samples (greedy: per prompt)
    pass_at_n: float         # share of prompts with at least one correct sample
    format_rate: float
    mean_response_tokens: float
    prompts: int
    samples: int

    def as_dict(self) -> dict:
        return asdict(self)


def load_eval_prompts(path: str | Path, processor, limit: int | None = None):
    """(RolloutPrompt, ground truth) for every usable row of a JSONL file."""
    path = Path(path)
    items = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        messages = [m for m in row_messages(row) if m["role"] != "assistant"]
        try:
            images = load_images(row, path.parent, count_placeholders(messages))
        except BadRow:
            continue
        encoded = encode_prompt(processor, messages, images)
        items.append((RolloutPrompt.from_encoded(encoded, images), str(row["answer"])))
        if limit and len(items) >= limit:
            break
    return items


def evaluate(engine, processor, path: str | Path, *, max_new_tokens: int = 256, n: int = 1,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             limit: int | None = None, batch_size: int = 32, progress: bool = True) -> EvalResult:
    items = load_eval_prompts(path, processor, limit)
    if not items:
        raise ValueError(f"no usable evaluation rows in {path}")
    params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                            seed=seed)
    correct = formatted = tokens = samples = solved = 0
    for start in tqdm(range(0, len(items), batch_size), desc=f"eval {Path(path).name}",
                      disable=not progress, leave=False):
        chunk = items[start:start + batch_size]
        outputs = engine.generate([prompt for prompt, _ in chunk], params, n=n)
        for (_, answer), group in zip(chunk, outputs):
            results = [score_response(s.text, answer) for s in group]
            correct += sum(r.accuracy for r in results)
            formatted += sum(r.format_ok for r in results)
            tokens += sum(len(s) for s in group)
            samples += len(group)
            solved += any(r.accuracy > 0 for r in results)
    return EvalResult(correct / samples, solved / len(items), formatted / samples,
                      tokens / samples, len(items), samples)


class PolicyEvaluator:
    """Evaluates the Megatron policy under training on ``data.eval_files``.

    Collective: every rank calls it. The first rank keeps a CPU rollout engine, receives the
    current weights through the trainer -> engine weight sync (the same path RL stages use),
    generates and scores; the metrics are shared with all ranks.
    """

    def __init__(self, cfg, processor):
        from prism_megatron.rollout import make_engine
        from prism_megatron.rollout.weight_sync import is_sender

        self.cfg, self.processor = cfg, processor
        self.files = list(cfg.data.eval_files)
        self.engine = None
        if self.files and is_sender():
            from omegaconf import OmegaConf
            local = OmegaConf.structured(cfg.rollout)
            local.engine = "local"   # evaluation of the trainer's weights happens in-process
            self.engine = make_engine(OmegaConf.to_object(local), cfg.model.hf_dir)

    def __call__(self, model, hf_config) -> dict[str, float]:
        import torch.distributed as dist

        from prism_megatron.rollout.weight_sync import sync_weights

        if not self.files:
            return {}
        sync_weights(model, self.engine, hf_config, bucket_mb=self.cfg.rollout.weight_bucket_mb)
        metrics = {}
        if self.engine is not None:
            e = self.cfg.eval
            for path in self.files:
                result = evaluate(self.engine, self.processor, path,
                                  max_new_tokens=e.max_new_tokens, n=e.n,
                                  temperature=e.temperature, limit=e.limit or None,
                                  batch_size=e.batch_size, seed=self.cfg.seed)
                name = Path(path).stem
                metrics.update({f"eval/{name}/accuracy": result.accuracy,
                                f"eval/{name}/format_rate": result.format_rate,
                                f"eval/{name}/response_tokens": result.mean_response_tokens})
        if dist.is_initialized():
            box = [metrics]
            dist.broadcast_object_list(box, src=0)
            metrics = box[0]
        return metrics

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
