"""Byte-level BPE trained on a corpus's train split, cached on disk; packing text into LM blocks.

Why our own tokenizer: the embedded corpus is offline and small, and a vocabulary fitted to it
(a few thousand tokens) keeps tiny models' embedding tables from dominating their parameters.
Byte-level BPE (GPT-2 style) can encode any text, so the same tokenizer also serves the task
suites and the probe.

Training text is capped at :data:`TOKENIZER_TRAIN_BYTES` (the first 8 MB of the train split in
the corpus's own deterministic order; the whole stdlib train split is ~11 MB). That keeps
training to a few seconds on two cores, and merges learnt from 8 MB differ little from those of
11 MB at a 4K vocabulary.

Cache layout (under :func:`effllm_helpers.paths.cache_dir`)::

    tokenizers/<train-sha[:12]>-<vocab>/   save_pretrained files + effllm_meta.json
    tokens/<train-sha[:12]>-<vocab>-<split>-<split-sha[:12]>.npy   the flat token stream

The key is the *train* split's sha because the tokenizer depends on the train text only. The
token cache holds the flat stream (documents + eos), not blocks: any seq_len is a reshape of it,
so a sweep over seq_len re-uses one encoding.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from effllm_helpers.config import DataSpec
from effllm_helpers.data.corpus import Corpus, load_corpus
from effllm_helpers.paths import cache_dir

EOS = "<|endoftext|>"
SPECIAL_TOKENS = [EOS]  # eos = bos = pad; the SFT template is plain text, needing no specials
TOKENIZER_TRAIN_BYTES = 8_000_000
FORMAT_VERSION = 1
_ENCODE_CHUNK_DOCS = 256


def _training_texts(texts: Sequence[str], max_bytes: int) -> tuple[list[str], int]:
    """The first ``max_bytes`` of ``texts`` in order (the last document cut), and bytes used."""
    out: list[str] = []
    used = 0
    for text in texts:
        data = text.encode("utf-8", errors="surrogatepass")
        if used + len(data) >= max_bytes:
            out.append(data[: max_bytes - used].decode("utf-8", errors="ignore"))
            used = max_bytes
            break
        out.append(text)
        used += len(data)
    return out, used


def _train_tokenizer(texts: Sequence[str], vocab_size: int) -> Tokenizer:
    """Fit a byte-level BPE (the part tests monkeypatch to prove a cache hit trains nothing)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  min_frequency=2, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS,
                                   pad_token=EOS, padding_side="right")


def tokenizer_key(corpus: Corpus, vocab_size: int) -> str:
    """Cache folder name of the tokenizer for this corpus and vocabulary size."""
    return f"{corpus.fingerprint['train']['sha256'][:12]}-{vocab_size}"


def _meta(corpus: Corpus, vocab_size: int, used: int | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"format_version": FORMAT_VERSION, "vocab_size": vocab_size,
                            "train_sha256": corpus.fingerprint["train"]["sha256"],
                            "train_bytes_cap": TOKENIZER_TRAIN_BYTES, "source": corpus.name}
    if used is not None:
        meta["train_bytes_used"] = used
    return meta


def _cached_ok(path: Path, want: dict[str, Any]) -> bool:
    meta_file = path / "effllm_meta.json"
    if not (path / "tokenizer.json").is_file() or not meta_file.is_file():
        return False
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return all(meta.get(k) == v for k, v in want.items())


def get_tokenizer(corpus: Corpus, vocab_size: int) -> PreTrainedTokenizerFast:
    """The corpus's byte-level BPE tokenizer: loaded from the cache, or trained once and saved.

    Writes go to a temporary folder renamed into place, so parallel sweep workers never read a
    half-written tokenizer.
    """
    root = cache_dir("tokenizers")
    path = root / tokenizer_key(corpus, vocab_size)
    want = _meta(corpus, vocab_size)
    if not _cached_ok(path, want):
        texts, used = _training_texts(corpus.train, TOKENIZER_TRAIN_BYTES)
        tok = _wrap(_train_tokenizer(texts, vocab_size))
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=root))
        try:
            tok.save_pretrained(str(tmp))
            (tmp / "effllm_meta.json").write_text(json.dumps(_meta(corpus, vocab_size, used)))
            if path.exists():
                shutil.rmtree(path, ignore_errors=True)
            try:
                os.rename(tmp, path)
            except OSError:  # another worker won the race; its copy is as good as ours
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return PreTrainedTokenizerFast.from_pretrained(str(path))


# ---------------------------------------------------------------- packing
def _encode_stream(texts: Sequence[str], tokenizer: PreTrainedTokenizerFast,
                   max_tokens: int | None = None) -> np.ndarray:
    """Documents encoded in batches and joined as ``doc eos doc eos ...`` (int64, 1-D)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer has no eos token; packing needs one between documents")
    backend = tokenizer.backend_tokenizer
    # a padded call through the transformers wrapper (e.g. batched generation) leaves padding
    # switched on in the backend; packing must see the raw tokens, so switch it off meanwhile
    padding, truncation = backend.padding, backend.truncation
    backend.no_padding()
    backend.no_truncation()
    parts: list[np.ndarray] = []
    total = 0
    try:
        for start in range(0, len(texts), _ENCODE_CHUNK_DOCS):
            chunk = list(texts[start:start + _ENCODE_CHUNK_DOCS])
            for enc in backend.encode_batch(chunk, add_special_tokens=False):
                ids = np.asarray(enc.ids + [eos], dtype=np.int64)
                parts.append(ids)
                total += len(ids)
            if max_tokens is not None and total >= max_tokens:
                break
    finally:
        if padding:
            backend.enable_padding(**padding)
        if truncation:
            backend.enable_truncation(**truncation)
    if not parts:
        return np.zeros(0, dtype=np.int64)
    stream = np.concatenate(parts)
    return stream[:max_tokens] if max_tokens is not None else stream


def _blocks(stream: np.ndarray, seq_len: int, max_tokens: int | None) -> torch.Tensor:
    if max_tokens is not None:
        stream = stream[:max_tokens]
    n = len(stream) // seq_len
    return torch.from_numpy(np.ascontiguousarray(stream[: n * seq_len],
                                                 dtype=np.int64)).view(n, seq_len)


def pack(texts: Sequence[str], tokenizer: PreTrainedTokenizerFast, seq_len: int,
         max_tokens: int | None = None) -> torch.Tensor:
    """Concatenate documents with eos between them and cut into ``[N, seq_len]`` blocks.

    The ragged tail is dropped. ``max_tokens`` stops encoding once that many tokens exist, so a
    short run does not tokenize the whole corpus.
    """
    if seq_len <= 0:
        raise ValueError("seq_len must be positive")
    return _blocks(_encode_stream(texts, tokenizer, max_tokens), seq_len, max_tokens)


def token_blocks(spec: DataSpec | dict[str, Any], split: str = "train",
                 max_tokens: int | None = None) -> tuple[PreTrainedTokenizerFast, torch.Tensor]:
    """Tokenizer and ``[N, spec.seq_len]`` blocks of one split, with the encoding cached on disk."""
    if isinstance(spec, dict):
        spec = DataSpec.model_validate(spec)
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    corpus = load_corpus(spec)
    tok = get_tokenizer(corpus, spec.vocab_size)
    split_sha = corpus.fingerprint[split]["sha256"][:12]
    path = cache_dir("tokens") / f"{tokenizer_key(corpus, spec.vocab_size)}-{split}-{split_sha}.npy"
    stream: np.ndarray | None = None
    if path.is_file():
        try:
            stream = np.load(path)
        except (OSError, ValueError):
            stream = None
    if stream is None:
        stream = _encode_stream(getattr(corpus, split), tok)
        dtype = np.uint16 if len(tok) <= np.iinfo(np.uint16).max + 1 else np.int32
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".npy", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                np.save(fh, stream.astype(dtype))
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return tok, _blocks(stream.astype(np.int64), spec.seq_len, max_tokens)
