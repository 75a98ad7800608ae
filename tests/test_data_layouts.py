"""Every published data layout read natively (issue: sharegpt, LLaMA-Factory, verl, warm-up pairs),
bad input as counted rows or one line naming the file, the system-prompt rule, ``prism data
inspect`` and the geo3k preparation tool. Files are built here with pyarrow / json."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from prism_megatron.data.rows import (
    apply_system_prompt, open_rows, pair_texts, row_example, row_images, row_sources,
    tagged_teacher)
from prism_megatron.data.sharegpt import BadRow, DataError, SkipStats
from prism_megatron.rewards.response import SYSTEM_PROMPT

RESPONSE = "<caption>- 2 red cells</caption>\n<think>2 + 1 = 3</think>\n<answer>3</answer>"
OWN_SYSTEM = "You are a geometry tutor."


def png(colour=(255, 0, 0), size=(32, 32)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def count_rows(table, check=lambda row: row_images(row)) -> SkipStats:
    stats = SkipStats()
    for i in range(len(table)):
        stats.seen += 1
        try:
            check(table[i])
        except BadRow as bad:
            stats.skip(bad)
    return stats


# ----------------------------------------------------------------------------- fixtures (files)

def write_sharegpt_jsonl(root):
    (root / "img").mkdir(exist_ok=True)
    (root / "img" / "red.png").write_bytes(png())
    good = {"messages": [{"role": "user", "content": "<image>How many?"},
                         {"role": "assistant", "content": RESPONSE}], "images": ["img/red.png"]}
    lines = [json.dumps(good), json.dumps(good), "", '{"messages": [1, 2', json.dumps(good),
             json.dumps(dict(good, messages="<image>How many?")),
             json.dumps(dict(good, images=7)),
             json.dumps(dict(good, images=["img/none.png"]))]
    path = root / "sft.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_verl_parquet(root, rows=4):
    """verl RLHFDataset rows with embedded images; the last row has no ground truth and an
    untagged teacher cot (unusable for alignment and RLVR)."""
    records = []
    for k in range(rows):
        records.append({
            "data_source": "mm_gad",
            "prompt": [{"role": "system", "content": OWN_SYSTEM},
                       {"role": "user", "content": f"<image>What is x in figure {k}?"}],
            "images": [{"bytes": png((10 * k, 0, 0)), "path": f"fig{k}.png"}],
            "ability": "math",
            "reward_model": {"ground_truth": str(k + 1), "style": "rule"},
            "extra_info": {"index": k, "split": "train"},
            "teacher_caption": f"- a triangle with side {k}",
            "teacher_cot": f"The side is {k}, so x = {k + 1}."})
    records[-1]["reward_model"] = {"ground_truth": None, "style": "rule"}
    path = root / "align.parquet"
    pq.write_table(pa.Table.from_pylist(records), path)
    return path


def write_llamafactory(root):
    """A dataset_info.json with renamed columns and tags, a system column and media_dir-relative
    images; one row breaks the user/assistant alternation."""
    media = root / "media"
    media.mkdir(exist_ok=True)
    (media / "a.png").write_bytes(png((0, 255, 0)))
    rows = [{"chat": [{"speaker": "me", "text": "<image>Describe it."},
                      {"speaker": "bot", "text": RESPONSE}],
             "pics": ["a.png"], "sys": OWN_SYSTEM} for _ in range(3)]
    rows.append({"chat": [{"speaker": "bot", "text": RESPONSE}], "pics": [], "sys": ""})
    (root / "lf").mkdir(exist_ok=True)
    (root / "lf" / "mm.json").write_text(json.dumps(rows))
    info = {"mm_demo": {"file_name": "mm.json", "formatting": "sharegpt",
                        "columns": {"messages": "chat", "images": "pics", "system": "sys"},
                        "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "me",
                                 "assistant_tag": "bot"}},
            "remote": {"hf_hub_url": "someone/data"}}
    (root / "lf" / "dataset_info.json").write_text(json.dumps(info))
    return root / "lf" / "dataset_info.json", media


def write_pairs(root):
    images = root / "pair_images"
    images.mkdir(exist_ok=True)
    (images / "p.png").write_bytes(png((0, 0, 255)))
    row = {"question": "How many blue cells?", "image": "p.png",
           "teacher_caption": "- one blue cell", "teacher_cot": "There is one.",
           "student_caption": "- blue", "student_cot": "<think>one</think>\n<answer>1</answer>",
           "answer": "1"}
    rows = [row] * 4 + [dict(row, answer=None)]
    path = root / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, images


# ----------------------------------------------------------------------------- readers

def test_sharegpt_jsonl_counts_every_bad_line_by_reason(tmp_path, caplog):
    table = open_rows(write_sharegpt_jsonl(tmp_path))
    assert table.layout == "sharegpt-messages" and len(table) == 7   # the blank line is no row
    stats = count_rows(table)
    assert stats.seen == 7 and stats.usable == 3
    assert dict(stats.skipped) == {"bad_json": 1, "bad_messages": 1, "bad_images": 1,
                                   "missing_image": 1}
    assert f"{tmp_path / 'sft.jsonl'}:4" in caplog.text        # file:line of the broken line
    messages, images = row_example(table, 0)
    assert messages[0] == {"role": "system", "content": [{"type": "text",
                                                          "text": SYSTEM_PROMPT}]}
    assert images[0].size == (32, 32)


def test_conversations_parquet_and_layout_detection(tmp_path):
    row = {"conversations": [{"from": "human", "value": "<image>Q"},
                             {"from": "gpt", "value": RESPONSE}],
           "images": [{"bytes": png(), "path": None}]}
    pq.write_table(pa.Table.from_pylist([row, row]), tmp_path / "c.parquet")
    table = open_rows(tmp_path / "c.parquet")
    assert table.layout == "sharegpt-conversations" and len(table) == 2
    messages, images = row_example(table, 1)
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert messages[2]["content"] == RESPONSE and len(images) == 1


def test_verl_parquet_embedded_images_answer_and_teacher(tmp_path):
    table = open_rows(write_verl_parquet(tmp_path))
    assert table.layout == "verl-rlhf" and len(table) == 4
    row = table[1]
    assert row.answer == "2" and row.data_source == "mm_gad" and row.id == "1"
    assert row.messages[0]["content"] == [{"type": "text", "text": OWN_SYSTEM}]  # own system
    assert row_images(row)[0].getpixel((0, 0)) == (10, 0, 0)
    assert table[3].answer is None
    caption, cot = tagged_teacher(row.teacher_caption, row.teacher_cot, row.answer)
    assert caption == "<caption>- a triangle with side 1</caption>"
    assert cot == "<think>The side is 1, so x = 2.</think>\n<answer>2</answer>"
    with pytest.raises(BadRow, match="untagged_teacher_without_answer"):
        tagged_teacher(table[3].teacher_caption, table[3].teacher_cot, table[3].answer)


def test_llamafactory_dataset_info_columns_tags_system_and_media_dir(tmp_path):
    info, media = write_llamafactory(tmp_path)
    table = open_rows(info, dataset="mm_demo", media_dir=str(media))
    assert table.layout == "llamafactory" and len(table) == 4
    stats = count_rows(table, lambda row: row_example(table, int(row.id.rsplit("-", 1)[1])))
    assert stats.usable == 3 and dict(stats.skipped) == {"bad_turn_order": 1}
    messages, images = row_example(table, 0)
    assert messages[0]["content"] == [{"type": "text", "text": OWN_SYSTEM}]
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert images[0].getpixel((0, 0)) == (0, 255, 0)
    with pytest.raises(DataError, match="uses hf_hub_url; download it"):
        open_rows(info, dataset="remote")
    with pytest.raises(DataError, match="'nope' is not in"):
        open_rows(info, dataset="nope")

    class Data:   # a DataConfig stand-in: train_files + the registry
        train_files, eval_files = [], []
        dataset_info, datasets, media_dir = str(info), ["mm_demo"], str(media)
        image_root, system_prompt = "", SYSTEM_PROMPT

    (source,) = row_sources(Data)
    assert str(source) == f"{info}:mm_demo" and source.path == info.parent / "mm.json"


def test_warmup_pairs_with_image_root(tmp_path):
    path, images = write_pairs(tmp_path)
    table = open_rows(path, image_root=str(images))
    assert table.layout == "warmup-pairs" and len(table) == 5
    stats = count_rows(table, lambda row: (pair_texts(row), row_images(row)))
    assert stats.usable == 4 and dict(stats.skipped) == {"untagged_teacher_without_answer": 1}
    teacher, student = pair_texts(table[0])
    assert teacher == ("<caption>- one blue cell</caption>\n<think>There is one.</think>\n"
                       "<answer>1</answer>")
    assert student == "<caption>- blue</caption>\n<think>one</think>\n<answer>1</answer>"
    assert [p["type"] for p in table[0].messages[1]["content"]] == ["image", "text"]
    with pytest.raises(BadRow, match="missing_image"):   # without image_root: next to the file
        row_images(open_rows(path)[0])


def test_system_prompt_rule():
    own = [{"role": "system", "content": [{"type": "text", "text": OWN_SYSTEM}]},
           {"role": "user", "content": [{"type": "text", "text": "Q"}]}]
    assert apply_system_prompt(own, "default") is own
    added = apply_system_prompt(own[1:], "default")
    assert added[0] == {"role": "system", "content": [{"type": "text", "text": "default"}]}
    assert apply_system_prompt(own[1:], "") == own[1:]


# ----------------------------------------------------------------------------- bad files

def test_bad_files_are_one_line_naming_the_file(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match=r"empty.jsonl has no rows \(the file is empty\)"):
        list(__import__("prism_megatron.data.rows", fromlist=["x"]).read_rows(
            tmp_path / "empty.jsonl"))
    (tmp_path / "u16.jsonl").write_bytes(json.dumps({"messages": []}).encode("utf-16"))
    with pytest.raises(DataError, match="u16.jsonl is UTF-16 text; rows must be UTF-8"):
        open_rows(tmp_path / "u16.jsonl")
    (tmp_path / "fake.parquet").write_text('{"messages": []}\n')
    with pytest.raises(DataError, match="fake.parquet is not a parquet file"):
        open_rows(tmp_path / "fake.parquet")
    (tmp_path / "odd.jsonl").write_text('{"x": 1}\n')
    with pytest.raises(DataError, match="cannot tell the row layout"):
        open_rows(tmp_path / "odd.jsonl")
    (tmp_path / "broken.json").write_text('[{"messages": [}]')
    with pytest.raises(DataError, match="broken.json is not valid JSON"):
        open_rows(tmp_path / "broken.json")


def test_latin1_lines_are_counted_bad_encoding_rows(tmp_path):
    good = json.dumps({"messages": [{"role": "user", "content": "caf\u00e9"},
                                    {"role": "assistant", "content": RESPONSE}]},
                      ensure_ascii=False)
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(good.encode("utf-8") + b"\n" + good.encode("latin-1") + b"\n")
    table = open_rows(path)
    stats = count_rows(table)
    assert dict(stats.skipped) == {"bad_encoding": 1} and stats.usable == 1
    with pytest.raises(BadRow, match=f"{path}:2: not UTF-8"):
        table[1]


def test_skip_threshold_is_a_one_line_prism_error():
    from prism_megatron.errors import PrismError

    stats = SkipStats(seen=10)
    stats.skipped["bad_json"] = 2
    stats.add_layout("sharegpt-messages")
    with pytest.raises(PrismError, match=r"too many unusable rows in f.jsonl \(layout "
                       r"sharegpt-messages: 8/10 rows usable; skipped: bad_json=2\)"):
        stats.check(0.1, "f.jsonl")
    with pytest.raises(PrismError, match="no usable rows"):
        SkipStats(seen=0).check(0.1)


# ----------------------------------------------------------------------------- loaders

@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    from prism_megatron.data.encode import load_processor

    return load_processor(tiny_model_dir)


def test_rl_prompts_from_verl_parquet(tmp_path, processor):
    from prism_megatron.data.rl import load_rl_prompts

    path = write_verl_parquet(tmp_path)
    prompts, stats = load_rl_prompts([str(path)], processor, max_prompt_length=4096,
                                     max_skip_fraction=0.5, progress=False)
    assert [p.answer for p in prompts] == ["1", "2", "3"]
    assert dict(stats.skipped) == {"missing_answer": 1} and stats.layout == "verl-rlhf"
    aligned, stats = load_rl_prompts([str(path)], processor, max_prompt_length=4096,
                                     require=("teacher_caption", "teacher_cot"),
                                     max_skip_fraction=0.5, progress=False)
    assert dict(stats.skipped) == {"untagged_teacher_without_answer": 1}
    assert aligned[0].teacher["teacher_cot"] == "<think>The side is 0, so x = 1.</think>\n" \
                                               "<answer>1</answer>"
    with pytest.raises(DataError, match="too many unusable rows"):
        load_rl_prompts([str(path)], processor, max_prompt_length=4096, progress=False)


def test_sft_rows_from_llamafactory_through_read_rows(tmp_path, processor):
    from prism_megatron.data.sft import load_sft_samples

    info, media = write_llamafactory(tmp_path)

    class Data:
        train_files, eval_files = [], []
        dataset_info, datasets, media_dir = str(info), ["mm_demo"], str(media)
        image_root, system_prompt = "", SYSTEM_PROMPT

    samples, stats = load_sft_samples(row_sources(Data), processor, max_prompt_length=512,
                                      max_response_length=256, max_skip_fraction=0.5,
                                      progress=False)
    assert len(samples) == 3 and dict(stats.skipped) == {"bad_turn_order": 1}


def test_eval_prompts_from_a_geo3k_style_verl_file(tmp_path, processor):
    from prism_megatron.eval.heldout import load_eval_prompts

    items = load_eval_prompts(write_verl_parquet(tmp_path), processor)
    assert [answer for _, answer in items] == ["1", "2", "3"]


def test_pairs_refuse_when_students_are_invalid(tmp_path, processor):
    from prism_megatron.data.pairs import load_pairs

    path, images = write_pairs(tmp_path)

    class Data:
        image_root, media_dir, system_prompt = str(images), "", SYSTEM_PROMPT

    samples, stats = load_pairs([str(path)], processor, max_skip_fraction=0.25, data_cfg=Data)
    assert len(samples) == 4 and dict(stats.skipped) == {"untagged_teacher_without_answer": 1}
    rows = [json.loads(x) for x in path.read_text().splitlines()][:4]
    rows[0]["student_cot"] = "one"           # untagged student cot: format-invalid
    bad = tmp_path / "bad_students.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"1/4 pairs in .*bad_students.jsonl have no "
                                        "format-valid student"):
        load_pairs([str(bad)], processor, max_skip_fraction=0.2, data_cfg=Data)


# ----------------------------------------------------------------------------- tools

def test_prism_data_inspect_prints_one_json_line(tmp_path, capsys):
    from prism_megatron.cli import main

    path = write_verl_parquet(tmp_path)
    assert main(["data", "inspect", str(path), "--stage", "rl",
                 "--max-skip-fraction", "0.5"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert "layout verl-rlhf; 4 rows read, 3 usable for stage rl" in out[0]
    assert json.loads(out[-1]) == {"rows": 4, "usable": 3, "skipped": {"missing_answer": 1},
                                   "layout": "verl-rlhf", "stage": "rl"}
    assert main(["data", "inspect", str(path), "--stage", "sft"]) == 2
    captured = capsys.readouterr()
    assert json.loads(captured.out.strip().splitlines()[-1])["skipped"] == {"no_assistant": 4}
    assert captured.err.count("\n") == 1 and "no usable rows" in captured.err


def test_prism_data_inspect_token_lengths_with_hf_dir(tmp_path, tiny_model_dir, capsys):
    from prism_megatron.data.inspect import main

    pairs, images = write_pairs(tmp_path)
    assert main(["inspect", str(pairs), "--stage", "warmup", "--image-root", str(images),
                 "--hf-dir", str(tiny_model_dir), "--max-skip-fraction", "0.3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1] == "  images per row: min 1, mean 1.00, max 1"
    assert out[2].startswith("  prompt tokens: p50 ") and out[3].startswith("  response tokens")
    assert json.loads(out[-1])["usable"] == 4


def write_fake_geometry3k(root):
    data = root / "geometry3k" / "data"
    data.mkdir(parents=True)
    for split, n in (("train", 3), ("test", 2)):
        rows = [{"images": [{"bytes": png((k, k, k)), "path": None}],
                 "problem": f"<image>Find x. ({k})", "answer": str(10 + k)} for k in range(n)]
        pq.write_table(pa.Table.from_pylist(rows), data / f"{split}-00000-of-00001.parquet")
    return root / "geometry3k"


def test_prepare_geo3k_round_trip(tmp_path, processor):
    from prism_megatron.data.rl import load_rl_prompts

    src = write_fake_geometry3k(tmp_path)
    proc = subprocess.run([sys.executable, "tools/prepare_geo3k.py", "--src", str(src), "--out",
                           str(tmp_path / "geo3k"), "--system-prompt", OWN_SYSTEM],
                          capture_output=True, text=True, cwd=str(__import__("pathlib").Path(
                              __file__).parents[1]))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"train: 3 rows -> {tmp_path / 'geo3k' / 'train.parquet'}",
                                        f"test: 2 rows -> {tmp_path / 'geo3k' / 'test.parquet'}"]
    table = open_rows(tmp_path / "geo3k" / "test.parquet")
    assert table.layout == "verl-rlhf" and table[1].data_source == "hiyouga/geometry3k"
    assert table[1].messages[0]["content"][0]["text"] == OWN_SYSTEM
    prompts, stats = load_rl_prompts([str(tmp_path / "geo3k" / "train.parquet")], processor,
                                     max_prompt_length=4096, progress=False)
    assert [p.answer for p in prompts] == ["10", "11", "12"] and stats.skipped_total == 0
    bad = subprocess.run([sys.executable, "tools/prepare_geo3k.py", "--src",
                          str(tmp_path / "nothing"), "--out", str(tmp_path / "o")],
                         capture_output=True, text=True,
                         cwd=str(__import__("pathlib").Path(__file__).parents[1]))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "no parquet files" in bad.stderr


# ----------------------------------------------------------------------------- the real stages

def run_stage(command: str, cfg: dict, tmp_path) -> str:
    """``prism COMMAND`` under torchrun (1 process); its whole output (logs included)."""
    import yaml

    from dist_utils import REPO, torchrun_command

    path = tmp_path / f"{command}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd, env = torchrun_command(1, ["-m", "prism_megatron.cli", command, str(path)])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=REPO)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    return output


@pytest.fixture(scope="module")
def stage_assets(tiny_model_dir, tmp_path_factory):
    from prism_megatron.convert.hf_to_megatron import convert_hf_to_megatron
    from prism_megatron.convert.upcycle import upcycle

    root = tmp_path_factory.mktemp("layout-stages")
    convert_hf_to_megatron(tiny_model_dir, root / "policy", fmt="torch_dist", progress=False)
    upcycle(tiny_model_dir, root / "disc", noise_std=0.01, progress=False, log=lambda *a: None)
    return root


def base_config(tmp_path, model, megatron, **data) -> dict:
    return {"seed": 0, "train_steps": 1,
            "model": {"hf_dir": str(model), "megatron_dir": str(megatron)},
            "optimizer": {"lr": 1e-3, "schedule": "constant", "warmup_ratio": 0.0},
            "data": {"max_prompt_length": 1024, "micro_batch_size": 2, **data},
            "checkpoint": {"enabled": False},
            "logging": {"run_dir": str(tmp_path / "run"), "tensorboard": False, "plots": False}}


@pytest.mark.slow
def test_sft_two_steps_from_a_llamafactory_dataset(tmp_path, tiny_model_dir, stage_assets):
    info, media = write_llamafactory(tmp_path)
    cfg = base_config(tmp_path, tiny_model_dir, stage_assets / "policy", dataset_info=str(info),
                      datasets=["mm_demo"], media_dir=str(media), max_response_length=128,
                      global_batch_size=2, max_skip_fraction=0.3)
    cfg["train_steps"] = 2
    output = run_stage("sft", cfg, tmp_path)
    assert "3/4 rows usable; skipped: bad_turn_order=1" in output
    history = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history if "loss" in h] == [1, 2]


@pytest.mark.slow
def test_rlvr_one_step_from_a_verl_parquet(tmp_path, tiny_model_dir, stage_assets):
    cfg = base_config(tmp_path, tiny_model_dir, stage_assets / "policy",
                      train_files=[str(write_verl_parquet(tmp_path))], max_skip_fraction=0.3)
    cfg.update(rollout={"engine": "local", "n": 2, "max_new_tokens": 8},
               algorithm={"name": "grpo", "prompts_per_step": 2})
    output = run_stage("rlvr", cfg, tmp_path)
    assert "RL prompts: layout verl-rlhf: 3/4 rows usable; skipped: missing_answer=1" in output
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") >= 1


@pytest.mark.slow
def test_align_one_step_from_a_verl_parquet(tmp_path, tiny_model_dir, stage_assets):
    cfg = base_config(tmp_path, tiny_model_dir, stage_assets / "policy",
                      train_files=[str(write_verl_parquet(tmp_path))], max_skip_fraction=0.3)
    cfg.update(rollout={"engine": "local", "n": 2, "max_new_tokens": 8},
               algorithm={"name": "prism", "prompts_per_step": 2},
               discriminator={"megatron_dir": str(stage_assets / "disc"), "lr": 1e-3})
    output = run_stage("align", cfg, tmp_path)
    assert ("RL prompts: layout verl-rlhf: 3/4 rows usable; skipped: "
            "untagged_teacher_without_answer=1") in output
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") >= 1


@pytest.mark.slow
def test_warmup_two_steps_from_pairs_with_image_root(tmp_path, tiny_model_dir, stage_assets):
    pairs, images = write_pairs(tmp_path)
    cfg = base_config(tmp_path, tiny_model_dir, "", train_files=[str(pairs)],
                      eval_files=[str(pairs)], image_root=str(images), max_response_length=256,
                      global_batch_size=2, max_skip_fraction=0.25)
    cfg["train_steps"] = 2
    cfg["model"] = {"hf_dir": str(tiny_model_dir)}
    cfg["discriminator"] = {"megatron_dir": str(stage_assets / "disc"), "eval_interval": 0}
    output = run_stage("warmup", cfg, tmp_path)
    summary = "layout warmup-pairs: 4/5 rows usable; skipped: untagged_teacher_without_answer=1"
    assert f"pairs: train {summary}; held-out {summary}" in output
    history = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history if "loss" in h] == [1, 2]


def test_prism_eval_on_a_geo3k_style_verl_file(tmp_path, tiny_model_dir, capsys):
    import yaml

    from prism_megatron.cli import main

    src = write_fake_geometry3k(tmp_path)
    from prism_megatron.data.geo3k import prepare_geo3k

    test = prepare_geo3k(src, tmp_path / "geo3k")["test"][0]
    cfg = {"model": {"hf_dir": str(tiny_model_dir)}, "data": {"eval_files": [str(test)]},
           "rollout": {"engine": "local"}, "eval": {"max_new_tokens": 4, "batch_size": 2},
           "logging": {"run_dir": str(tmp_path / "run"), "tensorboard": False}}
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["eval", str(tmp_path / "eval.yaml")]) == 0
    results = json.loads((tmp_path / "run" / "eval_results.json").read_text())
    assert json.dumps(results).count('"prompts": 2') == 1, results


def test_prism_data_inspect_a_llamafactory_dataset(tmp_path, capsys):
    from prism_megatron.data.inspect import main

    info, media = write_llamafactory(tmp_path)
    assert main(["inspect", "--dataset-info", str(info), "--dataset", "mm_demo", "--media-dir",
                 str(media), "--stage", "sft", "--max-skip-fraction", "0.3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (f"{info}:mm_demo: layout llamafactory; 4 rows read, 3 usable for stage sft; "
                      "skipped: bad_turn_order=1")
    assert json.loads(out[-1]) == {"rows": 4, "usable": 3, "skipped": {"bad_turn_order": 1},
                                   "layout": "llamafactory", "stage": "sft"}
    assert main(["inspect", "--dataset", "mm_demo"]) == 2
    assert capsys.readouterr().err == ("prism data: error: --dataset needs --dataset-info (the "
                                       "dataset_info.json that has it)\n")
