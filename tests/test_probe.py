"""The alignment stage's teacher-NLL probe (``rl/probe.py``): on the tiny model, the Megatron
policy's NLL of the first alignment prompts' teacher demonstrations equals the HF evaluator's
(``eval/teacher_nll.py``, transformers) on the same demonstrations, caption and reasoning
tokens apart, in one process and at DP2 / TP2 / PP2."""

import importlib.util

import pytest
import torch
import yaml

from dist_utils import REPO, run_torchrun

WORKER = REPO / "tests" / "dist" / "probe_nll.py"
ROWS = 4


def worker():
    spec = importlib.util.spec_from_file_location("probe_nll_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def probe_config(rl_assets, tmp_path_factory):
    model, data, megatron = rl_assets
    root = tmp_path_factory.mktemp("probe")
    cfg = {"model": {"hf_dir": str(model), "megatron_dir": str(megatron)},
           "data": {"train_files": [str(data / "align.jsonl")], "micro_batch_size": 3},
           "eval": {"probe_rows": ROWS}}
    (root / "probe.yaml").write_text(yaml.safe_dump(cfg))
    return root


@pytest.fixture(scope="module")
def hf_reference(rl_assets):
    """teacher_nll (HF, fp32) of the same demonstrations: the first ROWS align rows' prompts
    with their teacher caption + reasoning as the response."""
    from prism_megatron.data.encode import load_processor
    from prism_megatron.data.rl import load_rl_prompts
    from prism_megatron.data.rows import open_tables, prompt_messages, row_images
    from prism_megatron.eval.teacher_nll import Demo, teacher_nll_for_dir
    from prism_megatron.rl.probe import teacher_text

    model, data, _ = rl_assets
    processor = load_processor(model)
    prompts, _ = load_rl_prompts([data / "align.jsonl"], processor, max_prompt_length=512,
                                 require=("teacher_caption", "teacher_cot"), progress=False)
    table = open_tables([data / "align.jsonl"])[0]
    demos = []
    for i, prompt in enumerate(prompts[:ROWS]):
        row = table[i]
        assert row.id == prompt.id       # no row skipped: row i is prompt i
        demos.append(Demo(row.id, prompt_messages(row), row_images(row), teacher_text(prompt),
                          teacher_text(prompt)))
    return teacher_nll_for_dir(model, demos, batch_size=2, processor=processor)["teacher"]


def check(metrics, reference):
    assert metrics["probe/tokens_caption"] == reference["caption_tokens"]
    assert metrics["probe/tokens_reasoning"] == reference["reasoning_tokens"]
    assert metrics["probe/nll_caption"] == pytest.approx(reference["caption"], abs=1e-4)
    assert metrics["probe/nll_reasoning"] == pytest.approx(reference["reasoning"], abs=1e-4)


def test_probe_nll_equals_the_hf_teacher_nll(probe_config, hf_reference):
    from prism_megatron.config import load_config
    from prism_megatron.distributed import destroy_distributed, init_distributed

    cfg = load_config(str(probe_config / "probe.yaml"))
    init_distributed(tp=1, pp=1, seed=0)
    try:
        metrics = worker().probe_nll(cfg)
    finally:
        destroy_distributed()
    # a random tiny model: about log(vocab) per token, far from 0
    assert metrics["probe/nll_caption"] > 1.0 and metrics["probe/tokens_caption"] > 20
    check(metrics, hf_reference)


@pytest.mark.slow  # multi-process (torchrun)
@pytest.mark.dist
@pytest.mark.parametrize("layout", ["dp", "tp", "pp"])
def test_probe_nll_is_layout_independent(probe_config, hf_reference, layout):
    """DP2 (3-row micro-batches: one rank gets a filler row), TP2 (vocabulary-sharded log-probs
    on both ranks of the last stage: counted once), PP2 (log-probs on the last stage only)."""
    config = probe_config / f"probe_{layout}.yaml"
    cfg = yaml.safe_load((probe_config / "probe.yaml").read_text())
    if layout != "dp":
        cfg["parallel"] = {layout: 2}
    config.write_text(yaml.safe_dump(cfg))
    out = probe_config / f"{layout}.pt"
    run_torchrun(WORKER, 2, config, out, timeout=600)
    check(torch.load(out), hf_reference)
