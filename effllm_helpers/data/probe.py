"""Multi-query associative recall (MQAR): a cheap probe of how much a model recalls in context.

Why: perplexity on a small corpus moves little between attention variants, while the ability to
look a key up in the context and copy its value is exactly what MQA/GQA/MLA/NSA trade away
(Zoology, Arora et al. 2023). A sample is ``k1 v1 k2 v2 ... kn vn`` followed by ``n_queries``
keys from the context, each followed by its value (so later queries see the earlier answers,
as in teacher forcing). The model is right at a query when the argmax of its next-token logits
at that key is the key's value.

Keys and values are disjoint sets of token ids that exist in the tokenizer as single tokens:
ASCII letters for keys, digits and punctuation for values (any byte-level BPE has them), or any
list of ids split in two halves. Accuracy of a uniform guess among the values is ``probe.chance``.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

KEY_CHARS = string.ascii_letters
VALUE_CHARS = string.digits + "!#$%&*+-/<=>?@^~|;:"


@dataclass
class Probe:
    """MQAR samples: ``input_ids [S, 2*(n_pairs+n_queries)]``, the query positions and targets."""

    input_ids: torch.Tensor
    query_positions: torch.Tensor  # [S, n_queries]; logits here predict the value
    targets: torch.Tensor  # [S, n_queries]
    key_ids: list[int]
    value_ids: list[int]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def chance(self) -> float:
        """Accuracy of guessing uniformly among the value ids."""
        return 1.0 / len(self.value_ids)


def _single_token_ids(tokenizer: Any, chars: str) -> list[int]:
    out: list[int] = []
    for ch in chars:
        ids = tokenizer.encode(ch, add_special_tokens=False)
        if len(ids) == 1 and ids[0] not in out and ids[0] not in tokenizer.all_special_ids:
            out.append(int(ids[0]))
    return out


def probe_vocab(source: Any) -> tuple[list[int], list[int]]:
    """(key ids, value ids) from a tokenizer (single-token characters) or a list of ids."""
    if hasattr(source, "encode"):
        keys = _single_token_ids(source, KEY_CHARS)
        values = [i for i in _single_token_ids(source, VALUE_CHARS) if i not in set(keys)]
    else:
        ids = list(dict.fromkeys(int(i) for i in source))
        half = len(ids) // 2
        keys, values = ids[:half], ids[half:]
    if len(keys) < 2 or len(values) < 2:
        raise ValueError(f"probe needs >= 2 key and value ids, got {len(keys)} and {len(values)}")
    return keys, values


def make_probe(source: Any, n_pairs: int = 16, n_queries: int = 8, n_samples: int = 256,
               seed: int = 0) -> Probe:
    """Build ``n_samples`` MQAR sequences from a tokenizer or a sequence of token ids.

    Keys within a sample are distinct (so each query has one right answer); values are drawn
    with replacement; queries are distinct keys of the sample in random order.
    """
    keys, values = probe_vocab(source)
    if n_pairs > len(keys):
        raise ValueError(f"n_pairs={n_pairs} but only {len(keys)} distinct key ids")
    if not 1 <= n_queries <= n_pairs:
        raise ValueError("need 1 <= n_queries <= n_pairs")
    rng = np.random.default_rng(seed)
    key_arr, val_arr = np.asarray(keys), np.asarray(values)
    length = 2 * (n_pairs + n_queries)
    ids = np.zeros((n_samples, length), dtype=np.int64)
    qpos = np.zeros((n_samples, n_queries), dtype=np.int64)
    tgt = np.zeros((n_samples, n_queries), dtype=np.int64)
    for s in range(n_samples):
        k = rng.choice(key_arr, size=n_pairs, replace=False)
        v = rng.choice(val_arr, size=n_pairs, replace=True)
        ids[s, 0:2 * n_pairs:2] = k
        ids[s, 1:2 * n_pairs:2] = v
        q = rng.choice(n_pairs, size=n_queries, replace=False)
        pos = 2 * n_pairs + 2 * np.arange(n_queries)
        ids[s, pos] = k[q]
        ids[s, pos + 1] = v[q]
        qpos[s] = pos
        tgt[s] = v[q]
    meta = {"n_pairs": n_pairs, "n_queries": n_queries, "n_samples": n_samples, "seed": seed,
            "seq_len": length}
    return Probe(torch.from_numpy(ids), torch.from_numpy(qpos), torch.from_numpy(tgt),
                 list(map(int, keys)), list(map(int, values)), meta)


def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, tuple | list):
        return out[0]
    raise TypeError(f"cannot find logits in model output of type {type(out).__name__}")


@torch.no_grad()
def probe_accuracy(model: torch.nn.Module, probe: Probe, device: str | torch.device = "cpu",
                   batch_size: int = 64) -> float:
    """Fraction of queries whose greedy next token is the right value (batched, no grad)."""
    was_training = getattr(model, "training", False)
    model.eval()
    correct = 0
    total = 0
    try:
        for start in range(0, probe.input_ids.shape[0], batch_size):
            ids = probe.input_ids[start:start + batch_size].to(device)
            pos = probe.query_positions[start:start + batch_size].to(device)
            tgt = probe.targets[start:start + batch_size].to(device)
            logits = _logits(model(input_ids=ids))
            at_q = torch.gather(logits, 1, pos.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
            correct += int((at_q.argmax(-1) == tgt).sum().item())
            total += tgt.numel()
    finally:
        if was_training:
            model.train()
    return correct / total if total else float("nan")


def probe_ids_in_range(vocab_size: int, n: int = 128, offset: int = 1) -> Sequence[int]:
    """A simple id list for models without a tokenizer: ``n`` ids from ``offset`` (avoids id 0)."""
    if offset + n > vocab_size:
        raise ValueError(f"vocab_size {vocab_size} too small for {n} probe ids")
    return range(offset, offset + n)
