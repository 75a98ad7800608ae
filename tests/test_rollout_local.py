"""The CPU rollout engine (prism_megatron.rollout.local) against transformers' own generation."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "dist"))

from rollout_common import (  # noqa: E402
    encoded_prompts, hf_greedy, sharpen_model, teacher_forced_logprobs)

from prism_megatron.rollout import RolloutPrompt, SamplingParams, WeightUpdateError  # noqa: E402
from prism_megatron.rollout.base import derive_seed  # noqa: E402
from prism_megatron.rollout.local import GenRequest, LocalEngine  # noqa: E402
from prism_megatron.rollout.sampler import filter_probs  # noqa: E402


@pytest.fixture(scope="module")
def sharp_dir(make_tiny_model, tmp_path_factory) -> Path:
    return sharpen_model(make_tiny_model("tiny", 0), tmp_path_factory.mktemp("sharp") / "m")


@pytest.fixture(scope="module")
def engine(sharp_dir) -> LocalEngine:
    return LocalEngine(sharp_dir)


@pytest.fixture(scope="module")
def mild_engine(make_tiny_model, tmp_path_factory) -> LocalEngine:
    """Weights x4: peaked but not extreme logits, so fp32 cache-vs-full-forward noise stays
    well under 1e-5 even at temperature 0.7 (x10 logits reach ~1e-5 on their own)."""
    return LocalEngine(sharpen_model(make_tiny_model("tiny", 0),
                                     tmp_path_factory.mktemp("mild") / "m", factor=4.0))


@pytest.fixture(scope="module")
def prompts(engine):
    encs = encoded_prompts(engine.processor)
    return encs, [RolloutPrompt.from_encoded(e, imgs) for e, imgs in encs]


def test_greedy_equals_transformers_generate(engine, prompts):
    """Batched, left-padded, with 0/1/2 images: token-identical to model.generate greedy."""
    encs, rollout_prompts = prompts
    assert len({len(p.input_ids) for p in rollout_prompts}) == 3
    out = engine.generate(rollout_prompts, SamplingParams(temperature=0, max_new_tokens=16))
    for (enc, _), samples in zip(encs, out):
        reference = hf_greedy(engine.model, enc, 16)
        assert samples[0].token_ids == reference
        assert len(set(reference)) > 3            # the sharpened model does not just repeat
        assert samples[0].finish_reason == "length" and len(samples[0]) == 16
        assert samples[0].prompt_tokens == len(enc.input_ids)


@pytest.mark.slow  # over 20 s (measured with --durations)
def test_raw_images_and_collapsed_pads_give_the_same_result(engine, prompts):
    """Images given raw (processed by the engine) and one pad per image: same as precomputed."""
    from prism_megatron.rollout.images import collapse_image_pads

    encs, rollout_prompts = prompts
    raw = [RolloutPrompt(collapse_image_pads(e.input_ids.tolist(), engine.image_token_id), imgs)
           for e, imgs in encs]
    params = SamplingParams(temperature=0, max_new_tokens=6)
    assert [s[0].token_ids for s in engine.generate(raw, params)] == \
        [s[0].token_ids for s in engine.generate(rollout_prompts, params)]


@pytest.mark.slow  # over 20 s (measured with --durations)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_equal_teacher_forced_forward(mild_engine, prompts, temperature):
    engine = mild_engine
    encs, rollout_prompts = prompts
    out = engine.generate(rollout_prompts, SamplingParams(temperature=temperature,
                                                          max_new_tokens=12, seed=5), n=2)
    for (enc, _), samples in zip(encs, out):
        for s in samples:
            ref = teacher_forced_logprobs(engine.model, enc, s.token_ids, temperature)
            assert torch.allclose(torch.tensor(s.logprobs), ref, atol=1e-5, rtol=0), \
                (torch.tensor(s.logprobs) - ref).abs().max()


def test_greedy_logprobs_are_untempered(engine, prompts):
    encs, rollout_prompts = prompts
    s = engine.generate(rollout_prompts[:1], SamplingParams(temperature=0, max_new_tokens=5))[0][0]
    ref = teacher_forced_logprobs(engine.model, encs[0][0], s.token_ids, 1.0)
    assert torch.allclose(torch.tensor(s.logprobs), ref, atol=1e-5, rtol=0)


@pytest.mark.slow  # over 20 s (measured with --durations)
def test_n_samples_and_seeds(engine, prompts):
    _, rollout_prompts = prompts
    params = SamplingParams(temperature=1.0, max_new_tokens=8, seed=11)
    a = engine.generate(rollout_prompts, params, n=3)
    b = engine.generate(rollout_prompts, params, n=3)
    assert [len(x) for x in a] == [3, 3, 3]
    assert [[s.token_ids for s in x] for x in a] == [[s.token_ids for s in x] for x in b]
    assert len({tuple(s.token_ids) for s in a[0]}) == 3          # samples of a prompt differ
    c = engine.generate(rollout_prompts, params.with_(seed=12), n=3)
    assert [[s.token_ids for s in x] for x in a] != [[s.token_ids for s in x] for x in c]
    # A sample depends on its own seed only, not on the rest of the batch.
    alone = engine.run([GenRequest(rollout_prompts[1], params, [derive_seed(11, 1, 0)])])[0][0]
    assert alone.token_ids == a[1][0].token_ids


def test_unseeded_sampling_follows_torch_manual_seed(engine, prompts):
    _, rollout_prompts = prompts
    params = SamplingParams(temperature=1.0, max_new_tokens=6)
    torch.manual_seed(0)
    a = engine.generate(rollout_prompts[:1], params, n=2)
    torch.manual_seed(0)
    b = engine.generate(rollout_prompts[:1], params, n=2)
    assert [s.token_ids for s in a[0]] == [s.token_ids for s in b[0]]


def test_max_new_tokens_and_extra_stop_tokens(engine, prompts):
    _, rollout_prompts = prompts
    greedy = engine.generate(rollout_prompts[:1], SamplingParams(temperature=0, max_new_tokens=10))
    tokens = greedy[0][0].token_ids
    k = next(i for i in range(2, 10) if tokens[i] not in tokens[:i])
    stopped = engine.generate(rollout_prompts[:1], SamplingParams(
        temperature=0, max_new_tokens=10, stop_token_ids=(tokens[k],)))[0][0]
    assert stopped.token_ids == tokens[:k + 1] and stopped.finish_reason == "stop"
    short = engine.generate(rollout_prompts, SamplingParams(temperature=1.0, max_new_tokens=3,
                                                            seed=1), n=2)
    assert all(len(s) <= 3 for x in short for s in x)
    assert all(s.finish_reason == "length" for x in short for s in x if len(s) == 3 and
               s.token_ids[-1] not in engine.stop_ids)


def test_stop_at_im_end_like_transformers(make_tiny_model, tmp_path):
    """A model that really emits <|im_end|>: same tokens as transformers (which stops at eos),
    the stop token is returned (as SGLang does) and left out of the text."""
    from safetensors.torch import load_file, save_file

    from prism_megatron.data.encode import load_processor

    model_dir = sharpen_model(make_tiny_model("tiny-untied", 0), tmp_path / "untied")
    processor = load_processor(model_dir)
    im_end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    probe = LocalEngine(model_dir)
    (enc, imgs), = encoded_prompts(processor)[:1]
    prompt = RolloutPrompt.from_encoded(enc, imgs)
    greedy = probe.generate([prompt], SamplingParams(temperature=0, max_new_tokens=8))[0][0]
    # Make <|im_end|>'s output row a scaled copy of the 4th greedy token's: it wins by step 4.
    weights = load_file(str(model_dir / "model.safetensors"))
    weights["lm_head.weight"][im_end] = 1.5 * weights["lm_head.weight"][greedy.token_ids[3]]
    save_file(weights, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    engine = LocalEngine(model_dir)
    sample = engine.generate([prompt], SamplingParams(temperature=0, max_new_tokens=12))[0][0]
    assert sample.finish_reason == "stop" and sample.token_ids[-1] == im_end
    assert sample.token_ids == hf_greedy(engine.model, enc, 12)
    assert "<|im_end|>" not in sample.text
    assert sample.text == processor.tokenizer.decode(sample.token_ids[:-1], skip_special_tokens=True)
    assert im_end in engine.stop_ids and set(engine.model.generation_config.eos_token_id) <= set(engine.stop_ids)
    ignoring = engine.generate([prompt], SamplingParams(temperature=0, max_new_tokens=12,
                                                        ignore_eos=True))[0][0]
    assert len(ignoring) == 12 and ignoring.finish_reason == "length"


def test_top_k_top_p_filters():
    probs = torch.tensor([0.1, 0.4, 0.2, 0.3])
    assert filter_probs(probs, 2, 1.0).tolist() == pytest.approx([0, 0.4, 0, 0.3])
    # nucleus: keep while the mass before a token is <= top_p (0.4 then 0.7 > 0.6 stops)
    assert filter_probs(probs, -1, 0.6).tolist() == pytest.approx([0, 0.4, 0, 0.3])
    assert filter_probs(probs, -1, 0.3).tolist() == pytest.approx([0, 0.4, 0, 0])


def test_top_k_1_is_greedy(engine, prompts):
    _, rollout_prompts = prompts
    greedy = engine.generate(rollout_prompts, SamplingParams(temperature=0, max_new_tokens=6))
    topk1 = engine.generate(rollout_prompts, SamplingParams(temperature=0.8, top_k=1,
                                                            max_new_tokens=6, seed=3))
    assert [s[0].token_ids for s in greedy] == [s[0].token_ids for s in topk1]


def test_bad_sampling_params_are_rejected():
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_k=0), dict(max_new_tokens=0)):
        with pytest.raises(ValueError, match="bad sampling params"):
            SamplingParams(**bad)


def test_weight_updates_validate_and_load(make_tiny_model, sharp_dir, prompts, tmp_path):
    engine = LocalEngine(sharp_dir)
    _, rollout_prompts = prompts
    params = SamplingParams(temperature=0, max_new_tokens=8)
    before = engine.generate(rollout_prompts, params)
    name = "model.language_model.layers.0.mlp.down_proj.weight"
    original = engine.model.state_dict()[name].clone()
    with pytest.raises(WeightUpdateError, match="unknown tensor name.*no_such.weight"):
        engine.update_weights([(name, original * 0), ("model.no_such.weight", torch.zeros(2))])
    with pytest.raises(WeightUpdateError, match="shape mismatch"):
        engine.update_weights([(name, torch.zeros(3, 3))])
    assert torch.equal(engine.model.state_dict()[name], original)    # nothing was loaded
    # From disk: another checkpoint of the same architecture.
    other = sharpen_model(make_tiny_model("tiny", 1), tmp_path / "other")
    engine.update_weights_from_disk(other)
    reference = LocalEngine(other)
    after = engine.generate(rollout_prompts, params)
    assert [s[0].token_ids for s in after] == [s[0].token_ids for s in reference.generate(rollout_prompts, params)]
    assert [s[0].token_ids for s in after] != [s[0].token_ids for s in before]
    # From named tensors (a bucket), back to the first model.
    from safetensors.torch import load_file

    engine.update_weights(load_file(str(sharp_dir / "model.safetensors")))
    assert [s[0].token_ids for s in engine.generate(rollout_prompts, params)] == \
        [s[0].token_ids for s in before]
    with pytest.raises(WeightUpdateError, match="lacks"):
        partial = tmp_path / "partial"
        partial.mkdir()
        from safetensors.torch import save_file

        save_file({name: original}, str(partial / "model.safetensors"))
        engine.update_weights_from_disk(partial)
