"""GPU check: what only a GPU can tell, in one run of a few minutes, as one JSON summary.

    python benchmarks/gpu_check.py            # one CUDA GPU, Transformer Engine installed
    python benchmarks/gpu_check.py --cpu      # the same sequence on the local spec (CI)

Checks (each reports ``status``: ok | mismatch | skipped | failed, and its numbers):

* ``te_vs_local_logits``: TE spec vs local spec logits, bf16, same weights: the tiny Qwen3-VL
  (with an image) and a ~300M text shape.
* ``bf16_vs_fp8_step``: the loss of one train step (forward + backward) in BF16 and in FP8
  (TE, hybrid delayed scaling) from the same weights; the grads are finite.
* ``packed_vs_unpacked``: three samples packed in two rows (given as ``segment_ids``: THD packed
  sequences on the TE spec, the block-diagonal mask on the local one; per-sample positions) vs
  one sample alone: per-sample summed losses must agree (1e-2 in bf16). ``layout`` says which ran.
* ``moe_discriminator``: the MoE discriminator forward + backward (TE grouped GEMM on GPU), and
  grouped vs sequential experts on the same weights.
* ``mfu``: a Qwen3-VL-4B-shaped text decoder truncated to a few layers, bf16 forward + backward
  at 4096 tokens; model FLOPs per token as Megatron-LM's ``num_floating_point_operations``
  counts them (12 x (QKV/O + KV + attention + MLP + logits), no causal discount), MFU against
  the device's dense BF16 peak.
* ``sglang``: when sglang is importable, one generate (with log-probs) of the tiny model, one
  weight sync (update_weights_from_tensor) and the log-prob parity against transformers.

``--cpu`` runs the same sequence with the local spec in fp32/bf16 on the tiny shapes; items that
need CUDA/TE say ``skipped`` with the reason. Exit status 1 when a check failed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

# Dense BF16 tensor-core peaks (no sparsity), FLOP/s
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12,
             "L40S": 362e12, "B200": 2250e12, "GH200": 989e12}
SHAPE_300M = dict(hidden=1024, ffn=3072, layers=12, heads=16, kv_heads=8, head_dim=64)


def qwen3vl_config(base_dir: Path | None = None, *, hidden, ffn, layers, heads, kv_heads,
                   head_dim, vocab=151936, tied=True):
    """A Qwen3VLConfig of a given text shape (the tiny vision tower; ids from the tiny model)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(base_dir))
    t = config.text_config
    t.hidden_size, t.intermediate_size, t.num_hidden_layers = hidden, ffn, layers
    t.num_attention_heads, t.num_key_value_heads, t.head_dim = heads, kv_heads, head_dim
    t.vocab_size = vocab
    section = head_dim // 2
    t.rope_parameters = {**(t.rope_parameters or {}), "mrope_section": [
        section - 2 * (section * 5 // 16), section * 5 // 16, section * 5 // 16]}
    config.vision_config.out_hidden_size = hidden
    config.tie_word_embeddings = tied
    return config


def megatron_flops_per_token(hf, seq: int, layers: int | None = None) -> float:
    """Megatron-LM ``num_floating_point_operations`` / (batch x seq) for a dense GQA SwiGLU
    decoder: 12 L h^2 [ (1 + g/a + s/h) q/h + 3/2 * 2 f/h ... ] with the gated MLP counted as
    3 matrices, plus the logits."""
    t = hf.text_config
    L = layers or t.num_hidden_layers
    h, a, g = t.hidden_size, t.num_attention_heads, t.num_key_value_heads
    q = t.head_dim * a
    gated = 3 / 2
    vocab = -(-t.vocab_size // 128) * 128
    return 12 * L * h * h * ((1 + g / a + seq / h) * q / h + (t.intermediate_size / h) * gated
                             + vocab / (2 * L * h))


class Checker:
    def __init__(self, cpu: bool):
        self.cpu = cpu
        self.device = torch.device("cpu" if cpu else "cuda")
        self.spec = "local" if cpu else "transformer_engine"
        self.results: dict[str, dict] = {}
        self.tmp = Path(tempfile.mkdtemp(prefix="prism-gpu-check-"))
        from prism_megatron.testing.tiny import write_tiny_model

        self.tiny = write_tiny_model(self.tmp / "tiny", preset="tiny", seed=0, log=lambda *a: None)

    # ---- helpers ---------------------------------------------------------------------------
    def run(self, name: str, fn) -> None:
        started = time.perf_counter()
        try:
            out = fn()
        except Exception as exc:  # noqa: BLE001 - a check reports, the next one runs
            out = {"status": "failed", "error": f"{type(exc).__name__}: {str(exc)[:300]}",
                   "where": traceback.format_exc().strip().splitlines()[-3][:200]}
        out["seconds"] = round(time.perf_counter() - started, 2)
        self.results[name] = out
        print(f"[gpu_check] {name}: {out['status']} ({out['seconds']} s)", file=sys.stderr)

    def build(self, source, spec, dtype, **kw):
        from prism_megatron.models.qwen3_vl.model import build_qwen3vl_model

        torch.manual_seed(0)
        model, config = build_qwen3vl_model(source, spec=spec, dtype=dtype, **kw)
        return model.to(self.device), config

    @staticmethod
    def copy_weights(dst, src) -> None:
        """Same model, other spec: TE fuses the pre-norms into the next linear."""
        names = dict(src.named_parameters())
        with torch.no_grad():
            for name, p in dst.named_parameters():
                other = (name.replace("self_attention.linear_qkv.layer_norm_", "input_layernorm.")
                         .replace("mlp.linear_fc1.layer_norm_", "pre_mlp_layernorm."))
                if other not in names:
                    other = (name.replace("input_layernorm.", "self_attention.linear_qkv.layer_norm_")
                             .replace("pre_mlp_layernorm.", "mlp.linear_fc1.layer_norm_"))
                p.copy_(names[other])

    def text_batch(self, vocab: int, batch: int, seq: int):
        g = torch.Generator().manual_seed(1)
        # ordinary text ids: below the tiny vocabulary's special tokens (image pad 548, ...)
        ids = torch.randint(10, min(vocab, 500), (batch, seq), generator=g)
        pos = torch.arange(seq)[None, None].expand(3, batch, seq).contiguous()
        return ids.to(self.device), pos.to(self.device)

    def image_inputs(self, hf):
        """One 64x64 image (4 merged tokens) inside a short prompt."""
        v = hf.vision_config
        grid = torch.tensor([[1, 4, 4]])
        pixels = torch.randn(16, 3 * v.temporal_patch_size * v.patch_size ** 2,
                             generator=torch.Generator().manual_seed(2))
        ids = [hf.vision_start_token_id] + [hf.image_token_id] * 4 + [hf.vision_end_token_id]
        ids = torch.tensor([ids + list(range(10, 40))])
        return ids.to(self.device), pixels.to(self.device), grid.to(self.device)

    # ---- checks ----------------------------------------------------------------------------
    def te_vs_local(self) -> dict:
        from prism_megatron.models.qwen3_vl.config import load_hf_config

        hf = load_hf_config(self.tiny)
        cases = {"tiny": (hf, True)}
        if not self.cpu:
            cases["300M"] = (qwen3vl_config(self.tiny, **SHAPE_300M), False)
        out = {"status": "ok"}
        other_spec, other_dtype = (("local", "fp32") if self.cpu else ("local", "bf16"))
        for label, (config, image) in cases.items():
            ref, _ = self.build(config, other_spec, other_dtype)
            test, _ = self.build(config, self.spec, "bf16")
            self.copy_weights(test, ref)
            if image:
                ids, pixels, grid = self.image_inputs(config)
                kw = dict(pixel_values=pixels, image_grid_thw=grid)
            else:
                ids, pos = self.text_batch(config.text_config.vocab_size, 2, 256)
                kw = dict(position_ids=pos)
            with torch.no_grad():
                a = ref.eval()(input_ids=ids, **kw).float()
                b = test.eval()(input_ids=ids, **kw).float()
            diff = (a - b).abs().max().item()
            scale = a.abs().max().item()
            agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
            out[label] = {"max_abs_diff": diff, "max_abs_logit": scale, "argmax_agree": agree,
                          "compared": f"{self.spec}/bf16 vs {other_spec}/{other_dtype}"}
            if diff > 0.05 * max(scale, 1.0) or agree < 0.98:
                out["status"] = "mismatch"
            del ref, test
        if self.cpu:
            out["note"] = "skipped on --cpu: Transformer Engine; compared local bf16 vs fp32"
            out.setdefault("300M", "skipped on --cpu (time)")
        return out

    def train_loss(self, model, ids, pos):
        model.train()
        loss = model(input_ids=ids, position_ids=pos, labels=torch.roll(ids, -1, 1)).float().mean()
        loss.backward()
        finite = all(torch.isfinite(p.grad).all().item() for p in model.parameters()
                     if p.grad is not None)
        return loss.item(), finite

    def bf16_vs_fp8(self) -> dict:
        from prism_megatron.models.qwen3_vl.config import load_hf_config

        if self.cpu:
            hf = load_hf_config(self.tiny)
            ref, _ = self.build(hf, "local", "fp32")
            test, _ = self.build(hf, "local", "bf16")
            self.copy_weights(test, ref)
            ids, pos = self.text_batch(hf.text_config.vocab_size, 1, 64)
            (a, fa), (b, fb) = self.train_loss(ref, ids, pos), self.train_loss(test, ids, pos)
            return {"status": "ok" if fa and fb and abs(a - b) < 0.05 else "mismatch",
                    "loss_fp32": a, "loss_bf16": b, "abs_diff": abs(a - b),
                    "fp8": "skipped on --cpu: FP8 needs Transformer Engine on a GPU"}
        config = qwen3vl_config(self.tiny, **SHAPE_300M)
        bf16, _ = self.build(config, self.spec, "bf16")
        fp8, _ = self.build(config, self.spec, "bf16", fp8="hybrid")
        self.copy_weights(fp8, bf16)
        ids, pos = self.text_batch(config.text_config.vocab_size, 2, 512)
        (a, fa), (b, fb) = self.train_loss(bf16, ids, pos), self.train_loss(fp8, ids, pos)
        rel = abs(a - b) / abs(a)
        return {"status": "ok" if fa and fb and rel < 0.02 else "mismatch", "loss_bf16": a,
                "loss_fp8": b, "abs_diff": abs(a - b), "rel_diff": rel,
                "grads_finite": [fa, fb], "shape": "300M text, s=512, b=2"}

    def packed_vs_unpacked(self) -> dict:
        """Two rows, three samples (one row with a padding tail) passed as ``segment_ids``: the
        model runs THD packed sequences on the TE spec, the block mask on the local one."""
        from prism_megatron.models.qwen3_vl.config import load_hf_config

        hf = load_hf_config(self.tiny)
        dtype = "fp32" if self.cpu else "bf16"
        model, _ = self.build(hf, self.spec, dtype)
        model.eval()
        rows, width = ((48, 80), (96,)), 128
        g = torch.Generator().manual_seed(3)
        samples = [[torch.randint(10, 500, (n,), generator=g) for n in row] for row in rows]
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        segments, labels = torch.zeros_like(ids), torch.zeros_like(ids)
        positions = torch.zeros(3, len(rows), width, dtype=torch.long)
        spans = []
        for r, row in enumerate(samples):
            start = 0
            for k, s in enumerate(row):
                end = start + len(s)
                ids[r, start:end], labels[r, start:end] = s, torch.roll(s, -1)
                segments[r, start:end], positions[:, r, start:end] = k + 1, torch.arange(len(s))
                spans.append((r, start, end))
                start = end
        dev = self.device
        with torch.no_grad():
            per_token = model(input_ids=ids.to(dev), position_ids=positions.to(dev),
                              segment_ids=segments.to(dev), labels=labels.to(dev)).float()
            packed_sums = [per_token[r, a:b].sum().item() for r, a, b in spans]
            single = []
            for s in (s for row in samples for s in row):
                n = len(s)
                pos = torch.arange(n)[None, None].expand(3, 1, n).contiguous()
                out = model(input_ids=s[None].to(dev), position_ids=pos.to(dev),
                            labels=torch.roll(s, -1)[None].to(dev)).float()
                single.append(out.sum().item())
        diffs = [abs(a - b) / abs(b) for a, b in zip(packed_sums, single)]
        status = "ok" if max(diffs) < (1e-5 if self.cpu else 1e-2) else "mismatch"
        out = {"status": status, "dtype": dtype, "layout": model.packed_layout,
               "packed_loss_sums": packed_sums, "unpacked_loss_sums": single, "rel_diff": diffs}
        if self.cpu:
            out["thd"] = ("skipped on --cpu: THD packed attention needs Transformer Engine; "
                          "the local spec ran the block mask")
        return out

    def moe_discriminator(self) -> dict:
        from prism_megatron.models.discriminator.model import build_discriminator_from_config
        from prism_megatron.models.discriminator.routing import CAPTION
        from prism_megatron.models.qwen3_vl.config import load_hf_config

        hf = load_hf_config(self.tiny)
        dtype = "fp32" if self.cpu else "bf16"

        def make(grouped: bool):
            torch.manual_seed(0)
            model, _ = build_discriminator_from_config(hf, num_experts=4, top_k=2, spec=self.spec,
                                                       dtype=dtype, grouped_gemm=grouped)
            return model.to(self.device)

        def fwd_bwd(model):
            ids, pos = self.text_batch(500, 2, 96)
            kind = torch.full((2,), CAPTION, dtype=torch.long, device=self.device)
            valid = torch.ones(2, 96, dtype=torch.bool, device=self.device)
            model.train()
            values = model(ids, pos, kind=kind, valid_tokens=valid)
            values.float().sum().backward()
            grads = [p.grad for n, p in model.named_parameters() if "experts" in n]
            return values.detach().float(), bool(grads) and all(
                g is not None and torch.isfinite(g).all().item() for g in grads)

        out = {"status": "ok"}
        sequential = make(False)
        seq_values, seq_ok = fwd_bwd(sequential)
        out["sequential"] = {"grads_finite": seq_ok, "values_mean": seq_values.mean().item()}
        if self.cpu:
            out["grouped_gemm"] = "skipped on --cpu: TE grouped GEMM needs a GPU"
            out["status"] = "ok" if seq_ok else "mismatch"
            return out
        grouped = make(True)
        src = dict(sequential.named_parameters())
        import re

        with torch.no_grad():
            for name, p in grouped.named_parameters():
                m = re.search(r"experts\.linear_fc(\d)\.weight(\d+)$", name)
                other = (name[:m.start()] + f"experts.local_experts.{m.group(2)}.linear_fc"
                         f"{m.group(1)}.weight") if m else name
                p.copy_(src[other])
        grp_values, grp_ok = fwd_bwd(grouped)
        diff = (grp_values - seq_values).abs().max().item()
        out["grouped_gemm"] = {"grads_finite": grp_ok, "max_abs_diff_vs_sequential": diff}
        out["status"] = "ok" if seq_ok and grp_ok and diff < 5e-2 else "mismatch"
        return out

    def mfu(self) -> dict:
        from prism_megatron.models.qwen3_vl.config import load_hf_config
        from prism_megatron.plan import PUBLISHED_SHAPES

        if self.cpu:
            config, seq, steps, dtype = load_hf_config(self.tiny), 128, 1, "fp32"
            label = "tiny (CPU, fp32)"
        else:
            t = PUBLISHED_SHAPES["qwen3-vl-4b"]["text_config"]
            config = qwen3vl_config(self.tiny, hidden=t["hidden_size"], ffn=t["intermediate_size"],
                                    layers=4, heads=t["num_attention_heads"],
                                    kv_heads=t["num_key_value_heads"], head_dim=t["head_dim"])
            seq, steps, dtype = 4096, 5, "bf16"
            label = "Qwen3-VL-4B text shape, 4 of 36 layers"
        model, _ = self.build(config, self.spec, dtype)
        ids, pos = self.text_batch(config.text_config.vocab_size, 1, seq)
        labels = torch.roll(ids, -1, 1)
        model.train()

        def step():
            model.zero_grad(set_to_none=True)
            model(input_ids=ids, position_ids=pos, labels=labels).float().mean().backward()

        step()
        if not self.cpu:
            model.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        for _ in range(steps):
            step()
        if not self.cpu:
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - started) / steps
        flops_token = megatron_flops_per_token(config, seq)
        achieved = flops_token * seq / seconds
        out = {"status": "ok", "shape": label, "dtype": dtype, "seq": seq, "step_s": seconds,
               "model_flops_per_token": flops_token, "achieved_tflops": achieved / 1e12}
        name = "cpu" if self.cpu else torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
        out.update(device=name, peak_tflops=peak / 1e12 if peak else None,
                   mfu=achieved / peak if peak else None)
        if not self.cpu:
            # the planner's activation terms for this run (TE: fused attention) vs the measured
            # peak above the weights (activations, then the grads as backward produces them)
            from prism_megatron import plan as P

            shape = P.read_shape(config.to_dict())
            a = P.ActivationSpec(seq, 1, 2, fused_attention=True)
            planned = (P.text_activation_bytes(shape, a, shape.layers)
                       + P.head_activation_bytes(shape, a)
                       + seq * P.padded_vocab(shape.vocab, 1) * 2
                       + P.model_params(shape) * 2) / 1e9
            out.update(max_memory_allocated_gb=torch.cuda.max_memory_allocated() / 1e9,
                       peak_above_weights_gb=(torch.cuda.max_memory_allocated() - base) / 1e9,
                       planned_activations_logits_grads_gb=planned)
        return out

    def sglang(self) -> dict:
        if self.cpu or importlib.util.find_spec("sglang") is None:
            return {"status": "skipped", "reason": "sglang is not installed" if not self.cpu
                    else "skipped on --cpu: sglang needs a GPU"}
        import sglang
        from transformers import Qwen3VLForConditionalGeneration

        engine = sglang.Engine(model_path=str(self.tiny), mem_fraction_static=0.2,
                               log_level="error")
        try:
            prompt = list(range(10, 40))
            sampling = {"temperature": 0.0, "max_new_tokens": 16}
            first = engine.generate(input_ids=prompt, sampling_params=sampling,
                                    return_logprob=True)
            tokens = [t[1] for t in first["meta_info"]["output_token_logprobs"]]
            sg_logprobs = [t[0] for t in first["meta_info"]["output_token_logprobs"]]
            hf_model = Qwen3VLForConditionalGeneration.from_pretrained(
                str(self.tiny), torch_dtype=torch.bfloat16).to(self.device).eval()
            engine.update_weights_from_tensor(
                [(n, p.detach()) for n, p in hf_model.named_parameters()])
            second = engine.generate(input_ids=prompt, sampling_params=sampling,
                                     return_logprob=True)
            tokens_after = [t[1] for t in second["meta_info"]["output_token_logprobs"]]
            full = torch.tensor([prompt + tokens], device=self.device)
            with torch.no_grad():
                logits = hf_model(input_ids=full).logits.float()
            lp = torch.log_softmax(logits[0, len(prompt) - 1:-1], -1)
            hf_logprobs = lp.gather(-1, full[0, len(prompt):, None])[:, 0].tolist()
            diff = max(abs(a - b) for a, b in zip(sg_logprobs, hf_logprobs))
            return {"status": "ok" if diff < 0.1 and tokens == tokens_after else "mismatch",
                    "generated": len(tokens), "same_tokens_after_sync": tokens == tokens_after,
                    "max_abs_logprob_diff_vs_transformers": diff}
        finally:
            engine.shutdown()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="local spec on CPU (CI)")
    p.add_argument("--out", help="also write the JSON summary here")
    args = p.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; run with --cpu for the CPU sequence", file=sys.stderr)
        return 2
    torch.set_num_threads(min(4, os.cpu_count() or 1)) if args.cpu else None
    from prism_megatron import quiet_startup_warnings
    from prism_megatron.distributed import destroy_distributed, init_distributed

    quiet_startup_warnings()
    init_distributed(tp=1, pp=1, ep=1, seed=1234)
    started = time.perf_counter()
    try:
        checker = Checker(args.cpu)
        for name in ("te_vs_local_logits", "bf16_vs_fp8_step", "packed_vs_unpacked",
                     "moe_discriminator", "mfu", "sglang"):
            fn = {"te_vs_local_logits": checker.te_vs_local, "bf16_vs_fp8_step": checker.bf16_vs_fp8,
                  "packed_vs_unpacked": checker.packed_vs_unpacked,
                  "moe_discriminator": checker.moe_discriminator, "mfu": checker.mfu,
                  "sglang": checker.sglang}[name]
            checker.run(name, fn)
            if not args.cpu:
                torch.cuda.empty_cache()
    finally:
        destroy_distributed()
    results = checker.results
    summary = {"mode": "cpu" if args.cpu else "gpu", "spec": checker.spec,
               "device": "cpu" if args.cpu else torch.cuda.get_device_name(),
               "torch": torch.__version__, "te": _version("transformer_engine"),
               "megatron_core": _version("megatron.core"),
               "seconds": round(time.perf_counter() - started, 1),
               "failed": [k for k, v in results.items() if v["status"] == "failed"],
               "mismatch": [k for k, v in results.items() if v["status"] == "mismatch"],
               "checks": results}
    text = json.dumps(summary, default=float)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 1 if summary["failed"] else 0


def _version(module: str):
    try:
        mod = __import__(module, fromlist=["__version__"])
        return getattr(mod, "__version__", "?")
    except Exception:  # noqa: BLE001
        return None


if __name__ == "__main__":
    sys.exit(main())
