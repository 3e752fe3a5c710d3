"""Tokenizer training/caching and packing of text into LM blocks."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from effllm_helpers.config import DataSpec
from effllm_helpers.data import EOS, get_tokenizer, load_corpus, pack, token_blocks
from effllm_helpers.data import tokenizer as tokmod

SPEC = DataSpec(max_train_bytes=120_000, vocab_size=384, seq_len=32)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One cache dir for the module, so the tokenizer is trained once."""
    path = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EFFLLM_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def tok(cache: Path) -> PreTrainedTokenizerFast:
    return get_tokenizer(load_corpus(SPEC), SPEC.vocab_size)


def test_tokenizer_vocab_and_special_tokens(tok: PreTrainedTokenizerFast) -> None:
    assert len(tok) == SPEC.vocab_size
    assert tok.eos_token == tok.bos_token == tok.pad_token == EOS
    assert tok.eos_token_id == tok.pad_token_id
    text = "def héllo(x):\n    return x  # ünïcode ✓\n"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_tokenizer_cache_hit_does_not_retrain(tok: PreTrainedTokenizerFast, cache: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*_a: object, **_k: object) -> None:
        raise AssertionError("retrained despite a cached tokenizer")

    monkeypatch.setattr(tokmod, "_train_tokenizer", boom)
    again = get_tokenizer(load_corpus(SPEC), SPEC.vocab_size)
    assert again.get_vocab() == tok.get_vocab()
    assert (cache / "tokenizers" / tokmod.tokenizer_key(load_corpus(SPEC), 384)).is_dir()


def test_tokenizer_other_vocab_trains_anew(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = tokmod._train_tokenizer

    def counting(texts: list[str], vocab_size: int) -> object:
        calls.append(vocab_size)
        return real(texts, vocab_size)

    monkeypatch.setattr(tokmod, "_train_tokenizer", counting)
    corpus = load_corpus(SPEC)
    assert len(get_tokenizer(corpus, 320)) == 320
    get_tokenizer(corpus, 320)
    assert calls == [320]


def test_training_text_cap_keeps_order_and_cuts_last() -> None:
    texts, used = tokmod._training_texts(["aaaa", "bbbb", "cccc"], 6)
    assert texts == ["aaaa", "bb"] and used == 6


def test_pack_shape_and_eos_between_documents(tok: PreTrainedTokenizerFast) -> None:
    docs = ["import os\n", "def f(x):\n    return x\n", "class A:\n    pass\n"] * 5
    seq_len = 8
    blocks = pack(docs, tok, seq_len)
    flat: list[int] = []
    for d in docs:
        flat += tok.encode(d, add_special_tokens=False) + [tok.eos_token_id]
    n = len(flat) // seq_len
    assert blocks.dtype == torch.long and blocks.shape == (n, seq_len)
    assert blocks.flatten().tolist() == flat[: n * seq_len]  # ragged tail dropped
    assert int((blocks == tok.eos_token_id).sum()) == flat[: n * seq_len].count(tok.eos_token_id)
    limited = pack(docs, tok, seq_len, max_tokens=3 * seq_len + 5)
    assert limited.shape == (3, seq_len) and torch.equal(limited, blocks[:3])


def test_token_blocks_are_cached_and_reshaped(tok: PreTrainedTokenizerFast, cache: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    t1, train = token_blocks(SPEC, "train")
    assert train.shape[1] == SPEC.seq_len and train.shape[0] > 10
    assert t1.get_vocab() == tok.get_vocab()
    _, val = token_blocks(SPEC, "val")
    assert val.shape[1] == SPEC.seq_len and val.shape[0] >= 1

    def boom(*_a: object, **_k: object) -> None:
        raise AssertionError("re-tokenized despite a cached stream")

    monkeypatch.setattr(tokmod, "_encode_stream", boom)
    _, again = token_blocks(SPEC, "train")
    assert torch.equal(again, train)
    _, longer = token_blocks(SPEC.model_copy(update={"seq_len": 64}), "train")
    assert longer.shape == (train.numel() // 64, 64)
    assert torch.equal(longer.flatten(), train.flatten()[: longer.numel()])
    _, few = token_blocks(SPEC, "train", max_tokens=5 * SPEC.seq_len)
    assert torch.equal(few, train[:5])


def test_pack_ignores_padding_left_on_by_a_batched_call(tok: PreTrainedTokenizerFast) -> None:
    texts = ["def f(x):\n    return x\n", "a much longer document " * 20, "y = 1\n"]
    before = pack(texts, tok, seq_len=8)
    tok(["short", "a much longer line of text"], padding=True)  # leaves backend padding on
    assert tok.backend_tokenizer.padding is not None
    after = pack(texts, tok, seq_len=8)
    assert torch.equal(before, after)
    assert tok.backend_tokenizer.padding is not None  # the caller's state is restored
