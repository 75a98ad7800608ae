"""Validate every request the SGLang client builds against SGLang's own types (a subprocess).

    PYTHONPATH=<sglang-types dir>:<repo> python tests/dist/rollout_sglang_conformance.py MODEL_DIR

Run by tests/test_sglang_conformance.py with SGLang 0.5.23 installed without its GPU
dependencies into a test-only directory, so importing SGLang never touches the test process.
The client's HTTP layer is replaced by a recorder; each recorded body is validated the way
SGLang's FastAPI routes validate it (pydantic on the route's request type), its keys are checked
against the type's declared fields (pydantic ignores unknown keys, a typo would pass), and every
launch command is parsed with SGLang's own ServerArgs argument parser. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from pathlib import Path

import torch


def main(model_dir: str) -> int:
    import pydantic
    from sglang.srt.managers import io_struct as io
    from sglang.srt.sampling.sampling_params import SamplingParams as SGLSamplingParams
    from sglang.srt.server_args import ServerArgs
    from sglang.srt.utils import MultiprocessingSerializer

    from prism_megatron.rollout import RolloutPrompt, SamplingParams
    from prism_megatron.rollout.sglang import SERVER_MODULES, SGLangEngine

    routes = {
        "/generate": io.GenerateReqInput,
        "/update_weights_from_tensor": io.UpdateWeightsFromTensorReqInput,
        "/update_weights_from_disk": io.UpdateWeightFromDiskReqInput,
        "/begin_weight_update": io.BeginWeightUpdateReqInput,
        "/end_weight_update": io.EndWeightUpdateReqInput,
        "/release_memory_occupation": io.ReleaseMemoryOccupationReqInput,
        "/resume_memory_occupation": io.ResumeMemoryOccupationReqInput,
        "/flush_cache": io.FlushCacheReqInput,
        "/init_weights_update_group": io.InitWeightsUpdateGroupReqInput,
        "/update_weights_from_distributed": io.UpdateWeightsFromDistributedReqInput,
        "/get_weights_by_name": io.GetWeightsByNameReqInput,
    }
    sent: list[tuple[str, object]] = []

    def record(self, url, payload, timeout, method="POST"):
        path = "/" + url.split("/", 3)[3]
        sent.append((path, payload))
        if path in ("/server_info", "/get_server_info"):
            return {"tp_size": 2, "version": "0.5.23"}
        if path == "/get_weights_by_name":
            return [[0.5, -0.5]] * payload["truncate_size"]
        if path == "/generate":
            n = len(payload["input_ids"])
            return [{"text": "x", "output_ids": [7], "meta_info": {
                "finish_reason": {"type": "length", "length": 1},
                "output_token_logprobs": [[-0.5, 7, None]], "prompt_tokens": 5}}] * n
        return {"success": True, "message": "Success"}

    SGLangEngine._http = record
    engine = SGLangEngine(urls=["http://127.0.0.1:1"], model_path=None, wire_format="sglang",
                          release_memory_between_phases=True)
    assert engine.tp == 2, engine.tp   # adopted from /server_info
    engine.image_token_id = json.loads((Path(model_dir) / "config.json").read_text())[
        "image_token_id"]
    from PIL import Image

    img = Image.new("RGB", (32, 32), (200, 10, 10))
    pad = engine.image_token_id
    prompts = [RolloutPrompt([1, 2, pad, pad, pad, 3], [img]), RolloutPrompt([4, 5, 6])]
    engine.generate(prompts, SamplingParams(temperature=1.0, top_p=0.9, top_k=20,
                                            max_new_tokens=8, stop_token_ids=(9,), seed=3), n=2)
    engine.generate(prompts[1:], SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True))
    tensors = [("model.language_model.embed_tokens.weight", torch.randn(4, 3)),
               ("lm_head.weight", torch.randn(4, 3))]
    engine.update_weights(tensors)
    engine.update_weights_from_disk(model_dir)
    # the distributed path's three routes, as weight_sync's stage sender calls them
    from prism_megatron.rollout.groups import dtype_name, flatten

    bucket = [("model.language_model.norm.weight", torch.randn(6)),
              ("lm_head.weight", torch.randn(4, 3).to(torch.bfloat16))]
    engine.init_weights_update_group(0, master_address="10.0.0.1", master_port=29600,
                                     rank_offset=1, world_size=3, group_name="prism-pp0",
                                     backend="nccl")
    with engine.weight_update_session():
        engine.update_weights_from_distributed(0, [n for n, _ in bucket],
                                               [dtype_name(t.dtype) for _, t in bucket],
                                               [list(t.shape) for _, t in bucket], "prism-pp0")
    engine.get_weights_by_name("lm_head.weight", 4)
    engine.flush_cache()
    engine.release_memory()
    engine.resume_memory(["weights"])
    engine.resume_memory(["kv_cache"])

    problems, checked = [], {}
    for path, body in sent:
        if path in ("/server_info", "/get_server_info"):
            continue
        kind = routes.get(path)
        if kind is None:
            problems.append(f"{path}: not a route this check knows")
            continue
        declared = set(getattr(kind, "__struct_fields__", None) or kind.__dataclass_fields__)
        extra = sorted(set(body) - declared)
        if extra:
            problems.append(f"{path}: keys {extra} are not fields of {kind.__name__}")
        try:
            obj = pydantic.TypeAdapter(kind).validate_python(body)
        except pydantic.ValidationError as e:
            problems.append(f"{path}: {kind.__name__} rejects the body: {e}")
            continue
        if path == "/generate":
            obj.normalize_batch_and_arguments()
            for sp in body["sampling_params"]:
                SGLSamplingParams(**sp).verify(vocab_size=1000)
            for ids in body["input_ids"]:   # one pad per image (SGLang >= 0.5.20)
                if ids.count(pad) > 1:
                    problems.append(f"/generate: an expanded image-pad run {ids}")
        if path == "/update_weights_from_tensor":
            if len(obj.serialized_named_tensors) != engine.tp:
                problems.append(f"{len(obj.serialized_named_tensors)} tensor payloads for tp 2")
            got = MultiprocessingSerializer.deserialize(obj.serialized_named_tensors[1])
            if [n for n, _ in got] != [n for n, _ in tensors] or not all(
                    torch.equal(a, b) for (_, a), (_, b) in zip(got, tensors)):
                problems.append("the tensor payload does not round-trip through SGLang")
        if path == "/update_weights_from_distributed":
            if any(not isinstance(getattr(torch, d, None), torch.dtype) for d in obj.dtypes):
                problems.append(f"dtypes {obj.dtypes} are not torch dtype names")
            if obj.load_format != "flattened_bucket" or obj.group_name != "prism-pp0":
                problems.append(f"load_format {obj.load_format!r}, group {obj.group_name!r}")
            # SGLang's receiver rebuilds the bucket with its own FlattenedTensorBucket: the
            # trainer's broadcast buffer must be byte for byte that bucket's flattened tensor
            from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket

            theirs = FlattenedTensorBucket(named_tensors=bucket).get_flattened_tensor()
            if not torch.equal(theirs.view(torch.uint8).reshape(-1), flatten([t for _, t in bucket])):
                problems.append("the flattened bucket differs from SGLang's FlattenedTensorBucket")
        checked[path] = checked.get(path, 0) + 1
    order = [p for p, _ in sent if "weight_update" in p or p.startswith("/update_weights_from_")]
    if order != ["/begin_weight_update", "/update_weights_from_tensor", "/end_weight_update",
                 "/update_weights_from_disk", "/begin_weight_update", "/update_weights_from_distributed",
                 "/end_weight_update"]:
        problems.append(f"session order {order}")

    # launch commands, parsed by SGLang's own parser
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    launched = 0
    for deterministic, backup, pixels in ((False, False, None), (True, True, 589824)):
        probe = SGLangEngine.__new__(SGLangEngine)
        probe.model_path, probe.tp, probe.mem_fraction = model_dir, 2, 0.6
        probe.host = "127.0.0.1"
        probe.release_between_phases, probe.weights_cpu_backup = True, backup
        probe.deterministic, probe.env, probe.request_timeout_s = deterministic, None, 60.0
        probe.min_pixels, probe.max_pixels = pixels, pixels
        cmd = probe._default_command("sglang", [])(1, 30001)
        module = cmd.index(SERVER_MODULES["sglang"])
        try:
            args = parser.parse_args(cmd[module + 1:])
        except SystemExit:
            problems.append(f"SGLang's parser refuses {cmd[module + 1:]}")
            continue
        expect = {"tp_size": 2, "base_gpu_id": 2, "mem_fraction_static": 0.6, "port": 30001,
                  "enable_memory_saver": True, "enable_weights_cpu_backup": backup,
                  "enable_deterministic_inference": deterministic}
        for key, value in expect.items():
            if getattr(args, key) != value:
                problems.append(f"launch: {key}={getattr(args, key)!r}, expected {value!r}")
        if pixels and args.mm_process_config["image"]["size"]["longest_edge"] != pixels:
            problems.append(f"launch: mm_process_config {args.mm_process_config}")
        launched += 1
    print(json.dumps({"checked": checked, "launch_commands": launched, "problems": problems}))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
