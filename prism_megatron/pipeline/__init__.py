"""``prism pipeline CONFIG [key=value ...]``: the whole recipe and its baseline, resumable.

    convert (HF -> Megatron) -> sft -> pairs (the SFT policy's own samples vs the teacher demos)
    -> upcycle (dense base -> MoE discriminator) -> warmup -> align -> prism_rlvr
    and, from the same SFT checkpoint, baseline_rlvr (SFT -> RLVR without alignment)
    -> results.json / results.md / rlvr_comparison.png in the work directory.

Why subprocesses: every stage runs exactly the command a user would type
(``python -m prism_megatron.cli <stage> <yaml> key=value ...``, under ``torch.distributed.run``
when a stage has more than one process), so a pipeline result is reproducible stage by stage, a
crash in one stage cannot leave torch.distributed or megatron state behind for the next, and this
process never imports torch. Its output is teed to ``<work>/<stage>/stage.log``.

Why markers: a stage is done when ``<work>/<stage>/done.json`` exists; the pipeline writes it
after the subprocess succeeded (with the command and the stage's first/last metrics rows). Done
stages are skipped. A stage without a marker is simply started again: the training stages resume
from their own latest checkpoint (``checkpoint.resume=auto``), the tool steps (conversion,
pairs, upcycling) write their outputs atomically and start over. So a killed pipeline continues at
the stage and the step it had reached. ``shared`` (stage -> work directory) reads finished
stages from other work directories (``make demo`` shares SFT and the discriminator between its seeds).
"""

from __future__ import annotations

from prism_megatron.config import ConfigError
from prism_megatron.pipeline.config import (
    STAGES, PairsSpec, PipelineConfig, PipelineData, StageSpec, UpcycleSpec, load_pipeline_config)
from prism_megatron.pipeline.results import plot_rlvr_comparison, results_markdown
from prism_megatron.pipeline.runner import Pipeline

__all__ = ["STAGES", "PairsSpec", "Pipeline", "PipelineConfig", "PipelineData", "StageSpec",
           "UpcycleSpec", "cli", "load_pipeline_config", "plot_rlvr_comparison", "results_markdown"]


def cli(args, overrides) -> None:
    if not args.config:
        raise ConfigError("prism pipeline needs a config file, e.g. examples/tiny/pipeline.yaml")
    cfg = load_pipeline_config(args.config, overrides)
    results = Pipeline(cfg).run()
    print("\n" + results_markdown(results), end="")
