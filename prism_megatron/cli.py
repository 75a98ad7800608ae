"""``prism`` command line: one entry point for every stage and tool.

    prism <command> [CONFIG.yaml] [key=value ...]        # stages take a config + overrides
    torchrun --nproc_per_node N -m prism_megatron.cli <command> ...

Run ``prism --help`` for the commands and ``prism <command> --help`` for one.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass

from prism_megatron.config import load_config, to_yaml
from prism_megatron.errors import PrismError


class UserError(PrismError):
    """An error the user can fix (bad input, config or environment): printed without a trace."""


@dataclass(frozen=True)
class Command:
    target: str          # "module:function"; the function takes (args, overrides)
    help: str
    takes_config: bool = True


COMMANDS: dict[str, Command] = {
    "config": Command("prism_megatron.cli:show_config",
                      "print the resolved configuration (defaults <- CONFIG <- key=value)"),
    "sft": Command("prism_megatron.stages.sft:cli",
                   "stage 1: supervised fine-tuning of the policy (TP/PP/DP, resumable)"),
    "warmup": Command("prism_megatron.stages.discriminator_warmup:cli",
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
    "demo": Command("prism_megatron.demo:cli",
                    "run the tiny CPU pipeline end to end and print its results",
                    takes_config=False),
}


def show_config(args, overrides) -> None:
    print(to_yaml(load_config(args.config, overrides)), end="")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prism", description="PRISM post-training on megatron-core: "
        "SFT -> distribution alignment -> RLVR for Qwen3-VL.",
        epilog="Stages take a YAML config (see examples/) and key=value overrides, e.g. "
               "`prism config examples/tiny/sft.yaml parallel.tp=2`.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help)
        if command.takes_config:
            p.add_argument("config", nargs="?", help="YAML config file")
            p.add_argument("overrides", nargs="*", metavar="key=value",
                           help="config overrides, e.g. optimizer.lr=1e-6")
        else:
            p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of the command")
    return parser


def _split_config(args) -> list[str]:
    """``prism sft a=b`` (no file) puts the first override in the config slot."""
    overrides = list(getattr(args, "overrides", []) or [])
    if getattr(args, "config", None) and "=" in args.config:
        overrides.insert(0, args.config)
        args.config = None
    return overrides


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    command = COMMANDS[args.command]
    module, func = command.target.split(":")
    handler = getattr(importlib.import_module(module), func)
    try:
        if command.takes_config:
            handler(args, _split_config(args))
        else:
            handler(args.rest)
    except (PrismError, FileNotFoundError, FileExistsError) as exc:
        print(f"prism {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
