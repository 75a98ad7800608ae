"""`python benchmarks/gpu_check.py --cpu`: the GPU check's sequence on the local spec, so it keeps
running between GPU sessions; GPU-only items say that they were skipped and why."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow   # one subprocess, ~30 s of checks on an idle 2-core machine
def test_gpu_check_cpu_sequence(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--cpu",
                           "--out", str(out)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(out.read_text())
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == summary
    checks = summary["checks"]
    assert (summary["mode"], summary["spec"], summary["failed"], summary["mismatch"]) == (
        "cpu", "local", [], [])
    assert list(checks) == ["te_vs_local_logits", "bf16_vs_fp8_step", "packed_vs_unpacked",
                            "moe_discriminator", "mfu", "sglang"]
    logits = checks["te_vs_local_logits"]
    assert logits["tiny"]["compared"] == "local/bf16 vs local/fp32"
    assert logits["tiny"]["argmax_agree"] == 1.0 and logits["tiny"]["max_abs_diff"] < 0.05
    assert checks["bf16_vs_fp8_step"]["fp8"].startswith("skipped on --cpu")
    assert checks["bf16_vs_fp8_step"]["abs_diff"] < 0.05
    packed = checks["packed_vs_unpacked"]
    assert max(packed["rel_diff"]) < 1e-5 and len(packed["packed_loss_sums"]) == 3
    assert packed["layout"] == "mask" and packed["thd"].startswith("skipped on --cpu: THD")
    moe = checks["moe_discriminator"]
    assert moe["sequential"]["grads_finite"] is True
    assert moe["grouped_gemm"] == "skipped on --cpu: TE grouped GEMM needs a GPU"
    mfu = checks["mfu"]
    # tiny: 12 L h^2 [(1 + g/a + s/h) q/h + 3/2 f/h + V/(2 L h)], L 4, h 128, q 512, g/a 1/2,
    # s 128, f 256, V 640 (padded)
    assert mfu["model_flops_per_token"] == 12 * 4 * 128 ** 2 * (
        (1 + 0.5 + 1) * 4 + 1.5 * 2 + 640 / (2 * 4 * 128))
    assert mfu["mfu"] is None and mfu["achieved_tflops"] > 0
    assert (checks["sglang"]["status"], checks["sglang"]["reason"]) == (
        "skipped", "skipped on --cpu: sglang needs a GPU")
