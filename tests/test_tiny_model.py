"""Tiny Qwen3-VL checkpoints: load offline through the real-checkpoint path and generate with images.

Every preset is loaded with AutoConfig / AutoProcessor / Qwen3VLForConditionalGeneration exactly as a
released Qwen3-VL-4B/8B directory would be, fed a chat with an image through the chat template and
the processor, and asked to generate. The expected shapes are spelled out here (not read from the
preset table) because the preset names and their features are a contract other tests rely on.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoProcessor, AutoTokenizer, Qwen3VLForConditionalGeneration

from prism_megatron.data import synthetic
from prism_megatron.rewards.response import FORMAT_TAGS, SYSTEM_PROMPT
from prism_megatron.testing.tiny import PRESETS, write_tiny_model

EXPECTED = {
    "tiny": dict(tied=True, layers=4, heads=4, kv=2, head_dim=128, mrope=[24, 20, 20], deepstack=[0, 1]),
    "tiny-untied": dict(tied=False, layers=2, heads=4, kv=2, head_dim=32, mrope=[6, 5, 5], deepstack=[1]),
    "tiny-mrope": dict(tied=True, layers=2, heads=8, kv=2, head_dim=64, mrope=[16, 8, 8], deepstack=[0, 2]),
    "tiny-qwenvocab": dict(tied=True, layers=2, heads=4, kv=2, head_dim=16, mrope=[4, 2, 2], deepstack=[0]),
}
# Qwen3-VL's released token ids (tokenizer_config.json / config.json of Qwen/Qwen3-VL-4B-Instruct).
QWEN_IDS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
            "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|image_pad|>": 151655,
            "<|video_pad|>": 151656, "<think>": 151667, "</think>": 151668}


def chat(grid, question="How many red cells are there?", answer=None):
    messages = [{"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
                {"role": "user", "content": [{"type": "image", "image": synthetic.render_grid(grid)},
                                             {"type": "text", "text": question}]}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


GRID_2x3 = (("red", "blue", "blank"), ("green", "red", "yellow"))   # 96x64 px -> 6 image tokens
GRID_2x2 = (("red", "red"), ("blank", "blue"))                       # 64x64 px -> 4 image tokens


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_preset_table_is_the_contract():
    assert set(PRESETS) == set(EXPECTED)


@pytest.mark.parametrize("preset", sorted(EXPECTED))
def test_config_properties(make_tiny_model, preset):
    path = make_tiny_model(preset)
    want = EXPECTED[preset]
    config = AutoConfig.from_pretrained(path)
    text, vision = config.text_config, config.vision_config
    raw = json.loads((path / "config.json").read_text())
    assert config.model_type == "qwen3_vl"
    assert raw["text_config"]["head_dim"] == want["head_dim"]                 # explicit, not derived
    assert (text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (
        want["layers"], want["heads"], want["kv"])
    assert text.num_key_value_heads < text.num_attention_heads               # GQA
    assert text.num_attention_heads % 2 == 0 and text.num_key_value_heads % 2 == 0   # TP2
    assert text.num_hidden_layers >= 2                                        # PP2
    assert text.rope_parameters["mrope_section"] == want["mrope"]
    assert sum(want["mrope"]) == text.head_dim // 2
    assert config.tie_word_embeddings is want["tied"]
    assert list(vision.deepstack_visual_indexes) == want["deepstack"]
    assert vision.out_hidden_size == text.hidden_size
    assert (vision.patch_size, vision.temporal_patch_size, vision.spatial_merge_size) == (16, 2, 2)

    processor = AutoProcessor.from_pretrained(path)
    tok = processor.tokenizer
    assert text.vocab_size >= len(tok)
    assert config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert config.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>")
    assert config.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert config.vision_end_token_id == tok.convert_tokens_to_ids("<|vision_end|>")
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|endoftext|>")
    gen = json.loads((path / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [tok.eos_token_id, tok.pad_token_id]
    assert gen["pad_token_id"] == tok.pad_token_id

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert ("lm_head.weight" in keys) is not want["tied"]
    assert "model.language_model.embed_tokens.weight" in keys
    assert sum(k.startswith("model.visual.deepstack_merger_list.") and k.endswith("norm.weight")
               for k in keys) == len(want["deepstack"])


@pytest.mark.parametrize("preset", sorted(EXPECTED))
def test_loads_offline_and_generates_with_an_image(make_tiny_model, preset):
    path = make_tiny_model(preset)
    processor = AutoProcessor.from_pretrained(path)
    model = Qwen3VLForConditionalGeneration.from_pretrained(path).eval()
    assert model.dtype == torch.float32
    if EXPECTED[preset]["tied"]:
        assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    else:
        assert not torch.equal(model.lm_head.weight, model.model.language_model.embed_tokens.weight)

    inputs = processor.apply_chat_template(chat(GRID_2x3), add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    assert "mm_token_type_ids" in inputs
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 6]]
    assert (inputs["input_ids"] == model.config.image_token_id).sum().item() == 6    # one per cell
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 4)
    assert torch.equal(out[0, : inputs["input_ids"].shape[1]], inputs["input_ids"][0])


def test_batched_generation_with_two_image_sizes(tiny_model_dir):
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    processor.tokenizer.padding_side = "left"
    model = Qwen3VLForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    inputs = processor.apply_chat_template([chat(GRID_2x3), chat(GRID_2x2)], add_generation_prompt=True,
                                           tokenize=True, return_dict=True, return_tensors="pt", padding=True)
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 6], [1, 4, 4]]
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        single = processor.apply_chat_template(chat(GRID_2x2), add_generation_prompt=True, tokenize=True,
                                               return_dict=True, return_tensors="pt")
        alone = model.generate(**single, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape[0] == 2
    assert torch.equal(out[1, -3:], alone[0, -3:])          # left padding does not change the result


def test_chat_template_renders_qwen3_vl_chatml(tiny_model_dir):
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    messages = chat(GRID_2x2, question="Q?", answer="A.")
    messages[0]["content"] = [{"type": "text", "text": "S"}]
    text = processor.apply_chat_template(messages, tokenize=False)
    assert text == ("<|im_start|>system\nS<|im_end|>\n"
                    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Q?<|im_end|>\n"
                    "<|im_start|>assistant\nA.<|im_end|>\n")
    prompt = processor.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("Q?<|im_end|>\n<|im_start|>assistant\n")
    plain = processor.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert plain == "<|im_start|>user\nhi<|im_end|>\n"       # no default system message


def test_local_tokenizer_keeps_format_tags_and_drops_specials(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert len(tok) <= 1024
    for tag in FORMAT_TAGS:
        ids = tok.encode(tag, add_special_tokens=False)
        assert len(ids) == 1 and tok.decode(ids, skip_special_tokens=True) == tag
    row = synthetic.generate_rows(0, {"sft_teacher": 1, "sft_public": 0, "align": 0, "rl": 0, "test": 0})
    response = row["sft_teacher"][0]["messages"][-1]["content"]
    ids = tok.encode("<|im_start|>assistant\n" + response + "<|im_end|>", add_special_tokens=False)
    assert ids[-1] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "assistant\n" + response
    assert len(ids) < 150                                   # the task vocabulary is compact


def test_qwen_vocab_matches_released_ids(make_tiny_model):
    path = make_tiny_model("tiny-qwenvocab")
    tok = AutoTokenizer.from_pretrained(path)
    config = AutoConfig.from_pretrained(path)
    assert len(tok) == 151669 and config.text_config.vocab_size == 151936
    for token, token_id in QWEN_IDS.items():
        assert tok.convert_tokens_to_ids(token) == token_id
    assert tok.encode("<|im_start|>user\nHello world<|im_end|>", add_special_tokens=False) == [
        151644, 872, 198, 9707, 1879, 151645]
    assert (config.image_token_id, config.video_token_id) == (151655, 151656)
    assert (config.vision_start_token_id, config.vision_end_token_id) == (151652, 151653)
    ids = tok.encode("<think>2 + 1</think>", add_special_tokens=False)
    assert ids[0] == 151667 and ids[-1] == 151668
    assert tok.decode(ids + [151645], skip_special_tokens=True) == "<think>2 + 1</think>"


def test_same_seed_same_bytes(make_tiny_model, tmp_path):
    first = make_tiny_model("tiny", 0)
    again = write_tiny_model(tmp_path / "again", preset="tiny", seed=0, log=lambda *_: None)
    for name in ("model.safetensors", "tokenizer.json", "config.json", "preprocessor_config.json"):
        assert sha256(first / name) == sha256(again / name), name
    other = make_tiny_model("tiny", 1)
    assert sha256(first / "model.safetensors") != sha256(other / "model.safetensors")
    assert sha256(first / "tokenizer.json") == sha256(other / "tokenizer.json")


def test_cli_builds_lists_and_refuses_to_overwrite(tmp_path, capsys):
    path = Path(__file__).resolve().parents[1] / "tools" / "make_tiny_qwen3vl.py"
    spec = importlib.util.spec_from_file_location("_tool_make_tiny_qwen3vl", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["--list"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in EXPECTED)
    out = tmp_path / "m"
    assert tool.main(["--out", str(out), "--preset", "tiny-untied", "--seed", "3"]) == 0
    assert "parameters" in capsys.readouterr().out
    assert (out / "model.safetensors").is_file()
    assert tool.main(["--out", str(out), "--preset", "tiny-untied"]) == 2
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("x")
    assert tool.main(["--out", str(tmp_path / "notes"), "--force"]) == 2      # not a model dir
    assert (tmp_path / "notes" / "keep.txt").exists()
