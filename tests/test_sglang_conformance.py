"""The client's requests and launch commands against SGLang 0.5.23's own types and parser.

SGLang is installed without its GPU dependencies (``pip install --no-deps``), plus the few light
packages its request types need at import, into the gitignored ``.cache/sglang-types``
(``SGLANG_TYPES_DIR`` overrides it); the check itself runs in a subprocess
(tests/dist/rollout_sglang_conformance.py) so SGLang's imports never reach this process. The
test is skipped only when pip cannot reach a package index.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SGLANG = "sglang==0.5.23"
# What importing sglang.srt.managers.io_struct and sglang.srt.server_args needs on a CPU
# machine beyond requirements.txt (found by importing until nothing was missing). Only imported,
# never run: the newest releases, not sglang's pins (its openai==2.8.0 pulls in httpx & co.).
LIGHT_DEPS = ["msgspec==0.23.0", "pyzmq==27.3.0", "orjson==3.13.0", "pybase64==1.5.1",
              "starlette==1.10.0", "ipython==9.18.1", "traitlets==5.16.1", "aiohttp==3.14.5",
              "multidict==7.2.1", "attrs==26.1.0", "yarl==1.25.1", "propcache==0.5.4",
              "aiohappyeyeballs==2.7.1", "aiosignal==1.4.0", "frozenlist==1.8.0",
              "apache-tvm-ffi==0.1.15.post2", "sentencepiece==0.2.3",
              "compressed-tensors==0.20.1", "loguru==0.7.3", "gguf==0.19.0", "openai==3.57.0",
              "sniffio==1.3.1", "partial-json-parser==0.2.1.1.post7",
              "httpx2==2.16.2", "httpcore2==2.16.2"]   # openai 3.57 imports httpx2


@pytest.fixture(scope="session")
def sglang_types() -> Path:
    target = Path(os.environ.get("SGLANG_TYPES_DIR", ROOT / ".cache" / "sglang-types"))
    key = hashlib.sha1(" ".join([SGLANG, *LIGHT_DEPS]).encode()).hexdigest()[:12]
    stamp = target / f".installed-{key}"
    if stamp.is_file():
        return target
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                           "--disable-pip-version-check", "--upgrade", "--target", str(target),
                           SGLANG, *LIGHT_DEPS], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        text = proc.stdout + proc.stderr
        unreachable = ("No matching distribution", "Could not find a version",
                       "Failed to establish a new connection", "Temporary failure in name",
                       "Network is unreachable")
        if any(s in text for s in unreachable):
            pytest.skip(f"pip cannot reach a package index for {SGLANG}: {text.strip()[-300:]}")
        raise AssertionError(f"pip install of {SGLANG} into {target} failed:\n{text[-2000:]}")
    stamp.write_text("ok\n")
    return target


@pytest.mark.slow  # a pip install on first run (minutes), ~30 s of SGLang imports after
def test_client_requests_and_launch_args_validate_against_sglang(sglang_types, make_tiny_model):
    model = make_tiny_model("tiny", 0)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(sglang_types), str(ROOT)]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "dist" /
                                               "rollout_sglang_conformance.py"), str(model)],
                          capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"the check printed no result (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    result = json.loads(lines[-1])
    assert result["problems"] == []
    assert result["checked"] == {"/generate": 3, "/begin_weight_update": 2,
                                 "/update_weights_from_tensor": 1, "/end_weight_update": 2,
                                 "/update_weights_from_disk": 1, "/flush_cache": 1,
                                 "/release_memory_occupation": 1,
                                 "/resume_memory_occupation": 2,
                                 "/init_weights_update_group": 1,
                                 "/update_weights_from_distributed": 1,
                                 "/get_weights_by_name": 1}
    assert result["launch_commands"] == 2 and proc.returncode == 0
