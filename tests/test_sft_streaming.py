"""SFT streaming: lazy row tables, each data-parallel rank encodes only its share, shapes agree
across ranks, bad rows counted against the threshold, workers match in-process encoding, and the
sampler state carried by each step reproduces the following steps."""

import json
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

import prism_megatron.data.sft as sft
from prism_megatron.data.encode import load_processor
from prism_megatron.data.sampler import ResumableSampler
from prism_megatron.data.sft import (EncodeLimits, SFTDataset, SkipMonitor,
                                     StepRequests, StepShards, StepTotals, TooManyBadRows,
                                     pad_step, step_loader)
from prism_megatron.data.sharegpt import BadRow
from prism_megatron.errors import PrismError

LIMITS = EncodeLimits(max_prompt_length=512, max_response_length=128)
GBS, MICRO = 8, 2


def arange_positions(ids, grid):
    return torch.arange(len(ids)).expand(3, -1)


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return load_processor(tiny_model_dir)


@pytest.fixture(scope="module")
def teacher_file(make_synthetic_data):
    return str(make_synthetic_data(0) / "sft_teacher.jsonl")


def make_shards(dataset, processor, packing=False):
    return StepShards(dataset, micro_batch_size=MICRO, packing=packing,
                      pad_id=processor.tokenizer.pad_token_id, position_fn=arange_positions)


def rank_steps(dataset, processor, steps, dp_rank, dp_size, sampler_state=None, packing=False,
               num_workers=0):
    sampler = ResumableSampler(len(dataset), seed=0)
    if sampler_state:
        sampler.load_state_dict(sampler_state)
    requests = StepRequests(sampler, steps, GBS, dp_rank, dp_size)
    loader = step_loader(make_shards(dataset, processor, packing), requests,
                         num_workers=num_workers, prefetch_steps=2)
    return list(loader)


def spy_encodes(monkeypatch):
    """Record every (file, row) handed to encode_row."""
    calls = []
    real = sft.encode_row

    def counting(table, index, processor, limits):
        calls.append((str(table.path), index))
        return real(table, index, processor, limits)

    monkeypatch.setattr(sft, "encode_row", counting)
    return calls


def test_empty_and_missing_files_are_one_line_errors(tmp_path):
    from prism_megatron.errors import PrismError

    (tmp_path / "empty.jsonl").write_bytes(b"")
    with pytest.raises(PrismError, match="has no rows"):
        SFTDataset([str(tmp_path / "empty.jsonl")], None, LIMITS)
    with pytest.raises(PrismError, match="nope.jsonl"):
        SFTDataset([str(tmp_path / "nope.jsonl")], None, LIMITS)


def test_start_up_reads_and_encodes_no_row(tmp_path, processor, monkeypatch):
    row = json.dumps({"messages": [{"role": "user", "content": "Q"},
                                   {"role": "assistant", "content": "A"}]})
    path = tmp_path / "big.jsonl"
    path.write_text((row + "\n") * 100_000)
    calls, parsed, loads = spy_encodes(monkeypatch), [], json.loads
    monkeypatch.setattr(json, "loads", lambda *a, **k: parsed.append(1) or loads(*a, **k))
    dataset = SFTDataset([str(path), str(path)], processor, LIMITS)
    assert len(dataset) == 200_000 and calls == []
    assert len(parsed) <= 64  # at most a fixed probe of rows per file, never all of them
    assert dataset.locate(100_000) == (1, 0) and dataset.locate(199_999) == (1, 99_999)


def test_each_rank_encodes_only_its_share_and_shapes_agree(teacher_file, processor, monkeypatch):
    dataset = SFTDataset([teacher_file], processor, LIMITS)
    calls = spy_encodes(monkeypatch)
    single = rank_steps(dataset, processor, range(1, 3), 0, 1)
    assert len(calls) == 2 * GBS
    shares, encoded = [], []
    for rank in (0, 1):
        calls.clear()
        shares.append(rank_steps(dataset, processor, range(1, 3), rank, 2))
        encoded.append(list(calls))
    assert [len(e) for e in encoded] == [GBS, GBS]  # 4 rows a step, 2 steps
    assert not set(encoded[0]) & set(encoded[1])
    pad = processor.tokenizer.pad_token_id
    rows = lambda bs: sorted(tuple(r[r != pad].tolist()) for b in bs for r in b["input_ids"]
                             if (r != pad).any())
    for step in range(2):
        shards = [shares[r][step] for r in (0, 1)]
        totals = StepTotals.from_vectors(torch.stack([s.vector() for s in shards]))
        reference = StepTotals.from_vectors(single[step].vector()[None])
        assert (totals.seq_length, totals.seen, totals.skipped, totals.tokens) == (
            reference.seq_length, GBS, 0, reference.tokens)
        assert (totals.micro_batches, reference.micro_batches) == (2, 4)
        batches = [pad_step(s, totals, micro_batch_size=MICRO, pad_id=pad) for s in shards]
        assert [len(b) for b in batches] == [2, 2]
        assert {b["input_ids"].shape for r in batches for b in r} == {(MICRO, totals.seq_length)}
        # The two ranks' rows are the single rank's rows, each exactly once.
        dp1 = pad_step(single[step], reference, micro_batch_size=MICRO, pad_id=pad)
        assert len(rows(dp1)) == GBS and rows(batches[0] + batches[1]) == rows(dp1)


def test_workers_give_the_same_batches_and_resume_from_a_step_state(teacher_file, processor):
    dataset = SFTDataset([teacher_file], processor, LIMITS)
    inline = rank_steps(dataset, processor, range(1, 7), 1, 2, packing=True)
    workers = rank_steps(dataset, processor, range(1, 7), 1, 2, packing=True, num_workers=2)
    assert [s.step for s in workers] == list(range(1, 7))  # 6 steps cross an epoch (32 rows)
    resumed = rank_steps(dataset, processor, range(4, 7), 1, 2, packing=True,
                         sampler_state=inline[2].sampler_state)
    for a, b in list(zip(inline, workers)) + list(zip(inline[3:], resumed)):
        assert (a.step, a.seq_length, a.tokens, a.sampler_state) == \
            (b.step, b.seq_length, b.tokens, b.sampler_state)
        assert len(a.batches) == len(b.batches) >= 1
        for x, y in zip(a.batches, b.batches):
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_bad_rows_are_skipped_counted_and_stop_the_run(tmp_path, processor):
    good = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}
    image = {"messages": [{"role": "user", "content": "<image>Q"},
                          {"role": "assistant", "content": "A"}], "images": ["missing.png"]}
    lines = [json.dumps(good)] * 13 + [json.dumps({"messages": []}), json.dumps(image), "{oops"]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(lines) + "\n")
    dataset = SFTDataset([str(path)], processor, LIMITS)
    assert len(dataset) == 16
    monitor = SkipMonitor(max_skip_fraction=0.1, min_rows=16)
    steps = [rank_steps(dataset, processor, range(1, 3), rank, 2) for rank in (0, 1)]
    for step in range(2):
        shards = [steps[r][step] for r in (0, 1)]
        totals = StepTotals.from_vectors(torch.stack([s.vector() for s in shards]))
        for shard in shards:
            assert shard.tokens == sum(int(b["loss_mask"].sum()) for b in shard.batches)
        monitor.update(totals, shards[0])
        monitor.reasons.update(shards[1].skipped)  # both "ranks" in one monitor
        if step == 0:
            assert not monitor.exceeded() and monitor.seen == 8
    assert (monitor.seen, monitor.skipped) == (16, 3)
    assert monitor.reasons == Counter(no_messages=1, missing_image=1, bad_json=1)
    with pytest.raises(TooManyBadRows) as err:
        monitor.check()
    assert isinstance(err.value, PrismError) and "\n" not in str(err.value)
    assert str(err.value) == (
        "too many unusable SFT rows: 3 of the first 16 rows read from data.train_files were "
        "skipped (18.8% > data.max_skip_fraction=0.1; by reason: bad_json=1, missing_image=1, "
        "no_messages=1); fix or remove those rows, or raise data.max_skip_fraction")
    lenient = SkipMonitor(max_skip_fraction=0.2, min_rows=16, seen=16, skipped=3)
    lenient.check()
    early = SkipMonitor(max_skip_fraction=0.1, min_rows=17, seen=16, skipped=3)
    early.check()  # too few rows read to judge


def test_a_share_of_only_bad_rows_still_runs_the_agreed_micro_batches(tmp_path, processor):
    good = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join([json.dumps(good), "{oops"] * 4) + "\n")
    dataset = SFTDataset([str(path)], processor, LIMITS)
    requests = [next(iter(StepRequests(ResumableSampler(8, seed=0, shuffle=False), range(1, 2),
                                       GBS, rank, 2))) for rank in (0, 1)]
    assert [r.indices for r in requests] == [(0, 2, 4, 6), (1, 3, 5, 7)]
    shards = [make_shards(dataset, processor)[r] for r in requests]
    assert [len(s.batches) for s in shards] == [2, 0]  # rank 1 drew the 4 bad lines
    totals = StepTotals.from_vectors(torch.stack([s.vector() for s in shards]))
    assert (totals.micro_batches, totals.seen, totals.skipped) == (2, 8, 4)
    pad = processor.tokenizer.pad_token_id
    empty = pad_step(shards[1], totals, micro_batch_size=MICRO, pad_id=pad)
    assert len(empty) == 2 and all(b["loss_mask"].sum() == 0 for b in empty)
    assert empty[0]["input_ids"].shape == (MICRO, totals.seq_length)


def test_packing_fills_rows_within_the_share(tmp_path, processor):
    def row(answer):
        return json.dumps({"messages": [{"role": "user", "content": "Q"},
                                        {"role": "assistant", "content": answer}]})

    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join([row("A " * 60)] + [row("A")] * 7) + "\n")
    no_system = SimpleNamespace(system_prompt="")   # rows this short pack only without one
    dataset = SFTDataset([str(path)], processor, LIMITS, no_system)
    shard = make_shards(dataset, processor, packing=True)[
        next(iter(StepRequests(ResumableSampler(8, seed=0), range(1, 2), GBS, 0, 1)))]
    long = len(dataset.encode(0).input_ids)
    segments = sorted(int(r.max()) for b in shard.batches for r in b["segment_ids"])
    assert sum(segments) == 8 and segments[0] <= 1 and segments[-1] > 1  # short rows share rows
    assert shard.seq_length == -(-long // 8) * 8 and len(shard.batches) < GBS // MICRO


@pytest.mark.dist
@pytest.mark.slow
def test_dp2_stage_skips_bad_rows_like_dp1_and_stops_at_the_threshold(tmp_path, tiny_model_dir,
                                                                       make_synthetic_data):
    """`prism sft` on 2 data-parallel ranks: the bad rows fall unevenly on the ranks, the losses
    equal one rank's, the skips are summed over the ranks, and too many end the run in one line."""
    import subprocess

    import yaml

    from dist_utils import REPO, run_torchrun, torchrun_command
    from prism_megatron.convert.hf_to_megatron import convert_hf_to_megatron
    from prism_megatron.metrics import read_history

    data = make_synthetic_data(0)
    rows = [json.loads(line) for line in (data / "sft_teacher.jsonl").read_text().splitlines()]
    for row in rows:
        row["images"] = [str(data / image) for image in row["images"]]
    good = [json.dumps(row) for row in rows[:12]]
    bad = ["{oops", json.dumps(dict(rows[12], images=["missing.png"])), json.dumps({"messages": []}),
           json.dumps({"messages": [rows[13]["messages"][0], {"role": "assistant", "content": " "}]})]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(good[:6] + bad + good[6:]) + "\n")
    megatron = tmp_path / "megatron"
    convert_hf_to_megatron(tiny_model_dir, megatron, tp=1, pp=1, fmt="torch_dist")

    def config(name, max_skip_fraction):
        cfg = {"seed": 0, "train_steps": 2,
               "model": {"hf_dir": str(tiny_model_dir), "megatron_dir": str(megatron)},
               "data": {"train_files": [str(path)], "max_prompt_length": 512,
                        "max_response_length": 64, "global_batch_size": 8, "micro_batch_size": 2,
                        "max_skip_fraction": max_skip_fraction},
               "checkpoint": {"enabled": False},
               "logging": {"run_dir": str(tmp_path / name), "tensorboard": False, "plots": False}}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        return str(tmp_path / f"{name}.yaml")

    histories = {}
    for name, nproc in (("dp1", 1), ("dp2", 2)):
        run_torchrun("-m", nproc, "prism_megatron.cli", "sft", config(name, 0.3))
        histories[name] = [r for r in read_history(tmp_path / name) if "loss" in r]
    assert [r["rows_skipped"] for r in histories["dp2"]] == [r["rows_skipped"] for r in
                                                             histories["dp1"]]
    assert histories["dp2"][-1]["rows_skipped"] == 4  # 16 rows read, 4 of them bad
    assert [r["loss"] for r in histories["dp2"]] == pytest.approx(
        [r["loss"] for r in histories["dp1"]], abs=1e-5)
    assert [r["tokens"] for r in histories["dp2"]] == [r["tokens"] for r in histories["dp1"]]

    cmd, env = torchrun_command(2, ["-m", "prism_megatron.cli", "sft", config("strict", 0.2)])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("prism sft: error:")]
    assert lines and set(lines) == {
        "prism sft: error: too many unusable SFT rows: 4 of the first 16 rows read from "
        "data.train_files were skipped (25.0% > data.max_skip_fraction=0.2; by reason: "
        "bad_json=1, empty_assistant=1, missing_image=1, no_messages=1); fix or remove "
        "those rows, or raise data.max_skip_fraction"}
    # The ranks exit with status 2 and no traceback (torchrun's launcher then prints its own).
    ranks = proc.stderr.split("torch/distributed/elastic/multiprocessing/api.py")[0]
    assert "Traceback" not in ranks and "failed (exitcode: 2)" in proc.stderr
