"""Runs one lmms-eval evaluation in its own process: ``python -m prism_megatron.eval.lmms_driver
SPEC.json OUT.json``, started by ``prism_megatron.eval.lmms`` (never imported by it).

It runs under the interpreter that has lmms-eval installed (``eval.lmms_python``; by default the
one running ``prism``), so it imports nothing from the trainer. lmms-eval's judge clients read
their endpoint from the environment when a task's ``utils`` module is first imported, and
HallusionBench wants the full ``.../chat/completions`` URL where the other tasks want the ``/v1``
base, so the caller starts one process per judge environment.

SPEC (JSON): ``base_url`` / ``model`` / ``num_concurrent`` / ``timeout`` (the ``openai`` chat
backend's model_args), ``limit``, ``seed`` and ``runs``, one ``simple_evaluate`` each: ``name``,
``tasks`` (lmms-eval task configs ``{"task": name, ...overrides}``, e.g. a local ``dataset_path``
with ``dataset_kwargs: {load_from_disk: true}``), ``gen_kwargs`` (``k=v,...``, over the tasks'
yaml), ``system_prompt`` (the default system message, or null), ``output_path``. OUT (JSON): per
run name, ``results`` (lmms-eval's results table) and ``samples`` (per task: doc id, target,
filtered response), or ``error``.
"""

from __future__ import annotations

import argparse
import json
import sys


def _with_system(doc_to_messages, text: str):
    """The task's own messages with the response-format prompt as the DEFAULT system message:
    a task that brings its own system message keeps it (as the reference's eval chat template
    does, spec §7)."""

    def wrapped(doc, **kwargs):
        messages = list(doc_to_messages(doc, **kwargs))
        if any(m.get("role") == "system" for m in messages):
            return messages
        return [{"role": "system", "content": [{"type": "text", "text": text}]}] + messages

    return wrapped


def _leaves(task_dict: dict):
    for name, obj in task_dict.items():
        if isinstance(obj, dict):
            yield from _leaves(obj)
        elif isinstance(obj, tuple):
            if obj[1] is not None:
                yield name, obj[1]
        else:
            yield name, obj


def _run(manager, spec: dict, run: dict) -> dict:
    from lmms_eval.evaluator import simple_evaluate

    # get_task_dict builds dict configs (ours carry the dataset overrides) as simple tasks only;
    # the chat backend needs message tasks, which this loader builds (lmms-eval 0.7.3)
    task_dict = {}
    for config in run["tasks"]:
        task_dict.update(manager._load_individual_task_or_group(dict(config), task_type="chat"))
    tasks = []
    for _, task in _leaves(task_dict):
        if run.get("system_prompt"):
            task.doc_to_messages = _with_system(task.doc_to_messages, run["system_prompt"])
        tasks.append(task)
    model_args = (f"model={spec['model']},base_url={spec['base_url']},api_key=EMPTY,"
                  f"num_concurrent={spec['num_concurrent']},timeout={spec['timeout']},"
                  f"max_retries=1,retry_backoff_s=0,prefix_aware_queue=False")
    out = simple_evaluate(model="openai", model_args=model_args, tasks=tasks,
                          gen_kwargs=run.get("gen_kwargs") or None, limit=spec.get("limit"),
                          log_samples=True, random_seed=spec["seed"],
                          numpy_random_seed=spec["seed"], torch_random_seed=spec["seed"],
                          task_manager=manager, verbosity="WARNING",
                          # the aggregations that write judge caches (HallusionBench) read
                          # args.output_path; documents are scored without their images
                          cli_args=argparse.Namespace(output_path=run["output_path"],
                                                      process_with_media=False))
    samples = {task: [{"doc_id": s.get("doc_id"), "target": s.get("target"),
                       "response": (s.get("filtered_resps") or [""])[0]} for s in rows]
               for task, rows in (out.get("samples") or {}).items()}
    return {"results": out["results"], "samples": samples}


def main(argv: list[str]) -> int:
    spec_path, out_path = argv
    with open(spec_path) as f:
        spec = json.load(f)

    from lmms_eval.tasks import TaskManager

    manager = TaskManager("WARNING", model_name="openai")
    outputs = {}
    for run in spec["runs"]:
        try:
            outputs[run["name"]] = _run(manager, spec, run)
        except Exception as e:  # noqa: BLE001 - reported per benchmark, the others still run
            import traceback

            traceback.print_exc()
            outputs[run["name"]] = {"error": f"{type(e).__name__}: {e}"}
        with open(out_path, "w") as f:
            json.dump(outputs, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
