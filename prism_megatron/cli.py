"""``prism`` command line: one entry point for every stage and tool.

    prism <command> [CONFIG.yaml] [key=value ...]        # stages take a config + overrides
    torchrun --nproc_per_node N -m prism_megatron.cli <command> ...

Run ``prism --help`` for the commands and ``prism <command> --help`` for one. Every command runs
inside ``prism_megatron.errors.run_cli``: a user error is one line and exit status 2, ``--debug``
(anywhere on the line, or ``PRISM_DEBUG=1``) adds the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import textwrap
from dataclasses import dataclass, fields
from pathlib import Path

from prism_megatron.errors import PrismError, run_cli


class UserError(PrismError):
    """An error the user can fix (bad input, config or environment): printed without a trace."""


@dataclass(frozen=True)
class Command:
    target: str          # "module:function"; the function takes (args, overrides)
    help: str
    takes_config: bool = True


COMMANDS: dict[str, Command] = {
    "config": Command("prism_megatron.cli:show_config",
                      "print the resolved configuration (defaults <- CONFIG <- key=value) of a "
                      "stage or of a pipeline YAML"),
    "sft": Command("prism_megatron.stages.sft:cli",
                   "stage 1: supervised fine-tuning of the policy (TP/PP/DP, resumable)"),
    "warmup": Command("prism_megatron.stages.warmup:cli",
                      "discriminator warm-up: pairwise teacher-vs-student training of the MoE "
                      "discriminator (EP/DP/PP, resumable)"),
    "align": Command("prism_megatron.stages.align:cli",
                     "stage 2: PRISM distribution alignment (policy + MoE discriminator, "
                     "adversarial on-policy distillation, resumable)"),
    "rlvr": Command("prism_megatron.stages.rlvr:cli",
                    "stage 3: RL with verifiable rewards (grpo | dapo | gspo; TP/PP/DP, "
                    "resumable)"),
    "eval": Command("prism_megatron.eval.cli:cli",
                    "evaluate a policy on held-out sets and benchmark files (greedy or pass@k)"),
    "pipeline": Command("prism_megatron.pipeline:cli",
                        "run SFT -> warm-up -> alignment -> RLVR -> eval (and the SFT -> RLVR "
                        "baseline), each stage resumable, and write a results table"),
    "data": Command("prism_megatron.data.inspect:cli",
                    "data tools: `prism data inspect FILE... [--stage sft|rl|align|warmup]` "
                    "(layout, usable/skipped rows, token lengths)", takes_config=False),
    "plan": Command("prism_megatron.plan:cli",
                    "per-GPU memory plan of a stage before launch: `prism plan CONFIG [key=value "
                    "...] --gpus-per-node N --nodes M --gpu-memory GB` (table + one JSON line; "
                    "exit 2 when it does not fit)", takes_config=False),
    "demo": Command("prism_megatron.demo:cli",
                    "run the tiny CPU pipeline end to end and print its results "
                    "(`prism demo --help` for its options)",
                    takes_config=False),
    "study": Command("prism_megatron.study:cli",
                     "the miniature's mechanism study: a validation sweep, then baseline, PRISM "
                     "and its ablations over >= 5 seeds with paired tests (`prism study --help`)",
                     takes_config=False),
}

STAGE_COMMANDS = ("sft", "warmup", "align", "rlvr", "eval")
EXAMPLES = {"sft": "examples/tiny/sft.yaml", "warmup": "examples/tiny/warmup.yaml",
            "align": "examples/tiny/align.yaml", "rlvr": "examples/tiny/rlvr_grpo.yaml",
            "eval": "examples/eval.yaml"}

# One line per section of the stage config (prism_megatron/config.py); shown by `<stage> --help`.
SECTIONS = {
    "seed": "global seed (data order, rollouts, initialisation)",
    "train_steps": "optimizer steps; 0 = derived from the data and data.epochs",
    "model": "hf_dir (config.json, tokenizer, processor), megatron_dir (checkpoint to start "
             "from), spec, dtype, fp8, recompute (+ recompute_granularity full|selective), "
             "freeze_vision",
    "parallel": "tp, pp, ep, pp_layers (uneven pipeline split), distributed_optimizer",
    "optimizer": "lr, min_lr, schedule (cosine|constant|linear), warmup, weight_decay, Adam, "
                 "clip_grad, memory levers: cpu_offload, offload_fraction, main_grads_dtype "
                 "(`prism plan` shows their effect)",
    "data": "train_files, eval_files, max_prompt/response_length, pixels, global/micro batch "
            "size, packing, epochs, max_skip_fraction",
    "rollout": "generation engine (local|sglang), n samples per prompt, temperature, top_p, "
               "top_k, max_new_tokens, server and weight-sync options",
    "rewards": "verifiable reward weights (accuracy, format), DAPO overlong shaping",
    "algorithm": "grpo|dapo|gspo|prism, clipping, loss aggregation, ppo_epochs, KL/entropy, "
                 "dynamic sampling, prompts_per_step, PRISM advantage weights",
    "discriminator": "MoE discriminator: megatron_dir, experts/top_k, routing, lr, score "
                     "clip/regulariser, aux loss, tp/ep/pp",
    "eval": "held-out generation: max_new_tokens, limit, temperature, top_p, n (pass@n), "
            "batch_size, benchmark files",
    "checkpoint": "save_dir, save_interval, keep_last, resume (auto|none|<path>), format",
    "logging": "run_dir, log_interval, tensorboard, plots",
}


def version() -> str:
    """The installed distribution's version, else the package's own."""
    try:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as dist_version

        return dist_version("prism-megatron")
    except PackageNotFoundError:
        from prism_megatron import __version__

        return __version__


def is_pipeline_yaml(path: str | None) -> bool:
    """A YAML whose top-level keys belong to the pipeline's schema and not to a stage's."""
    if not path or not Path(path).is_file():
        return False
    from omegaconf import OmegaConf

    from prism_megatron.config import PrismConfig
    from prism_megatron.pipeline.config import PipelineConfig

    try:
        keys = set(OmegaConf.load(path).keys())
    except Exception:  # noqa: BLE001 - unreadable YAML: load_config reports it as a stage config
        return False
    only_pipeline = ({f.name for f in fields(PipelineConfig)}
                     - {f.name for f in fields(PrismConfig)})
    return bool(keys & only_pipeline)


def show_config(args, overrides) -> None:
    from omegaconf import OmegaConf

    from prism_megatron.config import load_config, to_yaml

    if is_pipeline_yaml(args.config):
        from prism_megatron.pipeline.config import load_pipeline_config

        cfg = load_pipeline_config(args.config, overrides)
        print(OmegaConf.to_yaml(OmegaConf.structured(cfg)), end="")
        return
    print(to_yaml(load_config(args.config, overrides)), end="")


def _stage_epilog(name: str) -> str:
    width = max(map(len, SECTIONS))
    lines = ["config sections (YAML keys or key=value overrides):"]
    for key, text in SECTIONS.items():
        lines += textwrap.wrap(text, 96, initial_indent=f"  {key:<{width}}  ",
                               subsequent_indent=" " * (width + 4))
    lines += ["", f"`prism config CONFIG [key=value ...]` prints every key with its value; e.g.",
              f"  prism config {EXAMPLES[name]}  (examples/ has configs for every stage)"]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prism", description="PRISM post-training on megatron-core: "
        "SFT -> distribution alignment -> RLVR for Qwen3-VL.",
        epilog="Stages take a YAML config (see examples/) and key=value overrides, e.g. "
               "`prism config examples/tiny/sft.yaml parallel.tp=2`.")
    parser.add_argument("--version", action="version", version=f"prism-megatron {version()}")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error (also PRISM_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in COMMANDS.items():
        extra = {}
        if name in STAGE_COMMANDS:
            extra = dict(epilog=_stage_epilog(name),
                         formatter_class=argparse.RawDescriptionHelpFormatter)
        p = sub.add_parser(name, help=command.help, description=command.help, **extra)
        if command.takes_config:
            p.add_argument("config", nargs="?", help="YAML config file")
            p.add_argument("overrides", nargs="*", metavar="key=value",
                           help="config overrides, e.g. optimizer.lr=1e-6")
    return parser


def _split_config(args) -> list[str]:
    """``prism sft a=b`` (no file) puts the first override in the config slot."""
    overrides = list(getattr(args, "overrides", []) or [])
    if getattr(args, "config", None) and "=" in args.config:
        overrides.insert(0, args.config)
        args.config = None
    return overrides


def _command_name(argv: list[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def _dispatch(argv: list[str]) -> int:
    name = _command_name(argv)
    if name in COMMANDS and not COMMANDS[name].takes_config:
        # Commands with their own parser (``prism demo --out X``) get the rest of the line.
        rest = argv[argv.index(name) + 1:]
        module, func = COMMANDS[name].target.split(":")
        getattr(importlib.import_module(module), func)(rest)
        return 0
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    module, func = COMMANDS[args.command].target.split(":")
    getattr(importlib.import_module(module), func)(args, _split_config(args))
    return 0


def quiet_optional_package_notes() -> None:
    """megatron-core and torch announce, once per process, that optional GPU packages (Transformer
    Engine, Apex, CUDA) are absent: a dozen lines before a CPU run's first own line or its one
    error line. The README documents them as optional; ``--debug`` shows the notes."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex).* not installed.*")
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    saved = {k: os.environ.get(k) for k in ("PRISM_DEBUG", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    # Offline unless the user asked otherwise: a missing model directory is one error line, not
    # minutes of model-hub retries. Stage subprocesses and torchrun workers inherit both.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if debug:
        os.environ["PRISM_DEBUG"] = "1"
    else:
        quiet_optional_package_notes()
    name = _command_name(argv)
    try:
        return run_cli(_dispatch, argv, name=f"prism {name}" if name in COMMANDS else "prism")
    finally:
        for key, value in saved.items():   # in-process callers (tests) get their environment back
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


if __name__ == "__main__":
    sys.exit(main())
