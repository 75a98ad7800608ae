"""What the discriminator reads: token-level segments, the four sequences, warm-up pairs, and the
warm-up loss's treatment of format-invalid students. No megatron needed."""

import json

import pytest
import torch

from prism_megatron.data.rows import tagged_teacher
from prism_megatron.data.sharegpt import BadRow
from prism_megatron.models.discriminator.routing import CAPTION
from prism_megatron.data.segments import (
    CLOSING_TAGS, caption_boundary, pair_segments,
    pair_sequences, response_segments)

RESPONSE = "<caption>- A 2x2 grid.\n- 3 red cells</caption>\n<think>3 + 1 = 4.</think>\n<answer>4</answer>"


@pytest.fixture(scope="module", params=["tiny", "tiny-qwenvocab"])
def processor(request, make_tiny_model):
    """The local tokenizer (tags are single tokens) and Qwen's real one (tags are split, and the
    token closing </caption> in a response also carries the newline: '>\\n')."""
    from prism_megatron.data.encode import load_processor

    return load_processor(make_tiny_model(request.param))


def rollout_ids(tokenizer, text: str) -> list[int]:
    """A sampled response as the rollout hands it over: ids ending in EOS and padding."""
    ids = tokenizer(text + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    return ids + [tokenizer.pad_token_id] * 3


def test_scored_token_is_the_closing_tag_and_the_same_for_teacher_and_student(processor, synthetic_data_dir):
    """Spec §9.2: all four sequences end with their segment's closing tag, teacher and student
    end in the same token id and start with the same tag tokens, students carry no EOS — so the
    last token (where the score is read) cannot tell teacher from student."""
    from prism_megatron.data.encode import encode_prompt
    from prism_megatron.data.images import load_images
    from prism_megatron.data.pairs import prompt_messages

    tok = processor.tokenizer
    row = json.loads((synthetic_data_dir / "align.jsonl").read_text().splitlines()[0])
    messages = prompt_messages(row)
    prompt = encode_prompt(processor, messages, load_images(row, synthetic_data_dir, 1))
    teacher = pair_segments(row["teacher_caption"], row["teacher_cot"], tok)
    student = response_segments(rollout_ids(tok, RESPONSE), tok)
    assert teacher.valid and student.valid
    seqs = pair_sequences(prompt, teacher, student)
    for kind, tag in CLOSING_TAGS.items():
        t, s = seqs[("teacher", kind)], seqs[("student", kind)]
        assert t.input_ids[t.score_index] == s.input_ids[s.score_index]           # same token id
        for seq in (t, s):
            segment = seq.input_ids[seq.prompt_length:].tolist()
            assert torch.equal(seq.input_ids[:seq.prompt_length], prompt.input_ids)
            assert tok.decode(segment).endswith(tag)                               # closing tag
            assert tok.eos_token_id not in segment and tok.pad_token_id not in segment
            assert seq.score_index == len(seq.input_ids) - 1
        opening = "<caption>" if kind == CAPTION else "<think>"
        n_open = len(tok(opening, add_special_tokens=False)["input_ids"])
        assert (t.input_ids[t.prompt_length:t.prompt_length + n_open].tolist()
                == s.input_ids[s.prompt_length:s.prompt_length + n_open].tolist())


def test_caption_boundary_is_the_first_token_covering_the_caption(processor):
    """Spec §2.3: smallest k with the caption block inside decode(r[:k]); a token straddling
    </caption> and the next text belongs to the caption."""
    tok = processor.tokenizer
    ids = rollout_ids(tok, RESPONSE)
    caption = RESPONSE[:RESPONSE.index("</caption>") + len("</caption>")]
    k = caption_boundary(ids, caption, tok)
    assert caption in tok.decode(ids[:k]) and caption not in tok.decode(ids[:k - 1])
    assert response_segments(ids, tok).caption_end == k
    assert caption_boundary(ids, "<caption>never said</caption>", tok) is None


def test_invalid_responses_get_the_fallback_split(processor):
    tok = processor.tokenizer
    for text in (RESPONSE + " trailing words", RESPONSE.replace("</answer>", ""), "", "<caption>"):
        seg = response_segments(rollout_ids(tok, text), tok)
        assert not seg.valid
        assert len(seg.caption) >= 1 and len(seg.reasoning) >= 1   # still runs through the model


def test_teacher_tags_are_added_and_malformed_teachers_rejected():
    # pair_segments tags teachers with the one tagging rule, data.rows.tagged_teacher
    cot = "<think>t</think>\n<answer>4</answer>"
    assert tagged_teacher(" red grid ", cot, None)[0] == "<caption>red grid</caption>"
    assert tagged_teacher("<caption>x</caption>", cot, None)[0] == "<caption>x</caption>"
    assert tagged_teacher("c", "2 + 2 = 4", "4")[1] == "<think>2 + 2 = 4</think>\n<answer>4</answer>"
    with pytest.raises(BadRow, match="untagged_teacher_without_answer"):
        tagged_teacher("c", "2 + 2 = 4", None)
    with pytest.raises(BadRow, match="invalid_teacher"):
        tagged_teacher("<caption>unclosed", cot, None)


def test_synthetic_pairs_share_the_prompt_and_differ_in_style(synthetic_data_dir, tmp_path, tiny_model_dir):
    from prism_megatron.data.encode import load_processor
    from prism_megatron.data.pairs import load_pairs, write_synthetic_pairs

    paths = write_synthetic_pairs(synthetic_data_dir, tmp_path, seed=0)
    rows = [json.loads(x) for x in paths["train"].read_text().splitlines()]
    align = {json.loads(x)["id"]: json.loads(x) for x in
             (synthetic_data_dir / "align.jsonl").read_text().splitlines()}
    heldout_ids = {json.loads(x)["id"] for x in paths["heldout"].read_text().splitlines()}
    assert heldout_ids and all(i.startswith("test-") for i in heldout_ids)
    for row in rows:
        assert row["student_caption"].startswith("<caption>") and row["teacher_cot"].startswith("<think>")
        assert row["student_caption"] != row["teacher_caption"]
        if row["id"] in align:  # the align split's own teacher texts are reproduced exactly
            assert row["teacher_caption"] == align[row["id"]]["teacher_caption"]
            assert row["messages"] == align[row["id"]]["messages"]
    samples, stats = load_pairs([str(paths["heldout"])], load_processor(tiny_model_dir))
    assert len(samples) == len(heldout_ids) and stats.skipped_total == 0
    assert all(s.teacher.valid and s.student.valid for s in samples)


def test_format_invalid_students_are_out_of_the_pairwise_term():
    """The warm-up loss function: the gradient w.r.t. an invalid student's scores is zero, valid
    pairs still train, and the loss weight is the number of valid pairs."""
    from prism_megatron.rl.pair_stats import PairStats
    from prism_megatron.rl.discriminator import pair_loss_fn

    n, seq = 3, 5
    batch = {"real": torch.ones(n, dtype=torch.bool),
             "student_valid": torch.tensor([True, False, True]),
             "score_index": torch.tensor([4, 2, 3] * 4), "valid_global": 2}
    values = torch.randn(4 * n, seq, requires_grad=True)
    loss, weight, _ = pair_loss_fn(batch, PairStats())(values)
    loss.backward()
    grad = values.grad[torch.arange(4 * n), batch["score_index"]].view(4, n)  # rows: tc sc tr sr
    assert int(weight) == 2
    assert torch.all(grad[:, 1] == 0)              # invalid student: neither its scores nor its teacher's
    assert torch.all(grad[:, [0, 2]] != 0)
    # No valid pair anywhere: the fallback term (teacher scores only), weighted by the real pairs.
    batch.update(student_valid=torch.zeros(n, dtype=torch.bool), valid_global=0)
    values.grad = None
    loss, weight, _ = pair_loss_fn(batch, PairStats())(values)
    loss.backward()
    grad = values.grad[torch.arange(4 * n), batch["score_index"]].view(4, n)
    assert int(weight) == n and torch.all(grad[[1, 3]] == 0) and torch.all(grad[[0, 2]] != 0)


def test_policy_samples_become_students_of_the_same_prompt(synthetic_data_dir, tiny_model_dir):
    """The policy-sample builder (any rollout engine; a stub here): one pair row per sample, the
    teacher fields of the prompt's row, the sample split into segments (invalid ones kept)."""
    from prism_megatron.data.encode import load_processor
    from prism_megatron.pipeline.pairs import policy_pair_rows
    from prism_megatron.rollout import Sample

    texts = [RESPONSE, "no tags at all"]

    class StubEngine:
        def generate(self, prompts, params, n=1):
            assert all(p.pixel_values is not None and p.input_ids for p in prompts)
            return [[Sample(token_ids=[1], logprobs=[0.0], text=texts[j % 2], finish_reason="stop")
                     for j in range(n)] for _ in prompts]

    rows = [json.loads(x) for x in (synthetic_data_dir / "align.jsonl").read_text().splitlines()[:3]]
    out = policy_pair_rows(rows, synthetic_data_dir, StubEngine(), load_processor(tiny_model_dir),
                           params=None, n=2)
    assert len(out) == 6 and [r["id"] for r in out[:2]] == [f"{rows[0]['id']}-s0", f"{rows[0]['id']}-s1"]
    assert out[0]["teacher_caption"] == rows[0]["teacher_caption"]
    assert out[0]["student_caption"].endswith("</caption>") and out[0]["student_cot"].endswith("</answer>")
    assert out[1]["student_caption"] + out[1]["student_cot"] == "no tags at all"
