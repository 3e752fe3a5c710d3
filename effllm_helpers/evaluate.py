"""Quality beside the efficiency metrics: perplexity, task accuracy, measured KV-cache bytes.

The lm-evaluation-harness bridge lives in ``lm_eval_bridge.py``; this module has what the
embedded studies need and can compute offline.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch

from .results import metric, missing

# held-out tokens a final perplexity scores at most by default (the architecture axis takes its
# own ``eval_tokens``): the whole stdlib validation split at the ci preset (~41k tokens)
PPL_MAX_TOKENS = 65_536

# bootstrap over items: enough resamples for a stable 2.5/97.5 percentile, seeded so a record is
# reproducible bit for bit
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0


def bootstrap_ci(values: Iterable[float], weights: Iterable[float] | None = None,
                 n_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                 ) -> tuple[float, float] | None:
    """95 % percentile interval of a (weighted) mean, resampling items with replacement.

    Why items, not repeats: one run scores a fixed item set once, so the spread that decides
    whether two techniques differ is the sampling error of that set. With ``weights`` the
    statistic is ``sum(w*v)/sum(w)`` per resample (token-weighted loss: ``values`` are per-item
    mean losses and ``weights`` their token counts). None for fewer than two items.
    """
    v = np.asarray(list(values), dtype=float)
    w = np.ones_like(v) if weights is None else np.asarray(list(weights), dtype=float)
    if len(v) < 2 or len(w) != len(v):
        return None
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(v), size=(n_resamples, len(v)))
    ws = w[idx]
    stats = (ws * v[idx]).sum(axis=1) / np.where(ws.sum(axis=1) > 0, ws.sum(axis=1), np.nan)
    lo, hi = np.nanpercentile(stats, [2.5, 97.5])
    return float(lo), float(hi)


def ci_fields(point: float, interval: tuple[float, float] | None, n: int,
              unit_of_resampling: str) -> dict[str, Any]:
    """Extra metric fields for a bootstrap interval.

    ``interval`` is ``[lo, hi]`` (bootstrap percentiles, may be asymmetric); ``ci95`` is the
    larger distance from the point to either end, the half-width every consumer of ``ci95``
    (figures' error bars, ties in ranks, recommend) already reads.
    """
    if interval is None:
        return {"ci_method": "bootstrap_items", "ci95_reason": f"fewer than 2 {unit_of_resampling}"}
    lo, hi = interval
    return {"ci95": max(point - lo, hi - point, 0.0), "interval": [lo, hi],
            "ci_method": "bootstrap_items", "ci_items": n, "ci_unit": unit_of_resampling,
            "ci_resamples": BOOTSTRAP_RESAMPLES, "ci_seed": BOOTSTRAP_SEED}


def spread_blocks(blocks: torch.Tensor, max_tokens: int | None) -> torch.Tensor:
    """At most ``max_tokens`` of ``blocks``, as evenly spaced whole blocks over all of them.

    Why spaced, not the first ones: held-out text is in document order, and the first few
    thousand tokens can be one or two documents whose perplexity is not the split's.
    """
    n, seq = blocks.shape[0], blocks.shape[-1]
    if max_tokens is None or n * seq <= max_tokens:
        return blocks
    keep = max(1, max_tokens // seq)
    idx = torch.linspace(0, n - 1, keep).round().long().unique()
    return blocks[idx]


@torch.no_grad()
def perplexity(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 8,
               max_batches: int | None = None, max_tokens: int | None = None) -> dict[str, Any]:
    """Token-weighted mean next-token loss over packed blocks, and its exp (perplexity).

    ``max_batches`` keeps the first batches (a cheap curve point during training);
    ``max_tokens`` keeps evenly spaced blocks (a final score over the whole split). Both
    metrics record ``n`` (= ``n_tokens``, the targets scored) and ``heldout_tokens``, the targets
    the given blocks hold, so a capped score says how much of the split it saw.
    """
    if blocks.numel() == 0:
        return {"loss": missing("nats/token", "no validation blocks"),
                "ppl": missing("", "no validation blocks")}
    available = blocks.shape[0] * (blocks.shape[1] - 1)
    blocks = spread_blocks(blocks, max_tokens)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    per_block: list[float] = []  # summed loss of each block: the bootstrap's items
    vocab = None
    for i, start in enumerate(range(0, blocks.shape[0], batch_size)):
        if max_batches is not None and i >= max_batches:
            break
        ids = blocks[start:start + batch_size].to(device)
        logits = model(input_ids=ids).logits.float()
        vocab = logits.shape[-1]
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
            reduction="none").view(ids.shape[0], -1).sum(dim=1)
        per_block.extend(float(x) for x in loss)
        total += float(loss.sum())
        count += ids[:, 1:].numel()
    model.train(was_training)
    mean = total / count
    block_tokens = blocks.shape[1] - 1
    loss_ci = bootstrap_ci([b / block_tokens for b in per_block])  # equal-length blocks:
    # token weights are all equal, so the token-weighted mean is the mean of block means
    scope = {"n": count, "n_tokens": count, "heldout_tokens": available,
             "selection": "all" if count == available else
             ("first_batches" if max_batches is not None else "evenly_spaced_blocks")}
    n_blocks = len(per_block)
    ppl_ci = None if loss_ci is None or loss_ci[1] >= 700 else \
        (math.exp(loss_ci[0]), math.exp(loss_ci[1]))
    if mean < 700:
        ppl = metric(math.exp(mean), "", "exp(heldout_cross_entropy)", **scope,
                     **ci_fields(math.exp(mean), ppl_ci, n_blocks, "blocks"),
                     **uniform_flag(math.exp(mean), vocab))
    else:
        ppl = missing("", f"perplexity overflows a float (loss {mean:.1f} nats/token)",
                      "exp(heldout_cross_entropy)")
    out = {"loss": metric(mean, "nats/token", "heldout_cross_entropy", **scope,
                          **ci_fields(mean, loss_ci, n_blocks, "blocks")), "ppl": ppl}
    if vocab:
        out["uniform_ppl"] = metric(vocab, "", "vocab_size (perplexity of a uniform guess)")
    return out


def uniform_flag(ppl: float, vocab: int | None) -> dict[str, Any]:
    """A ``flag`` when ``ppl`` is worse than guessing uniformly over the vocabulary.

    Why: such a model has learned less than nothing about the text (it is confidently wrong);
    ranking it on quality against others would rank noise, so scores leave it out on quality.
    """
    if vocab and ppl > vocab:
        return {"flag": "worse_than_uniform",
                "note": f"perplexity {ppl:.0f} > vocabulary size {vocab} (uniform guess): "
                        "not ranked on quality"}
    return {}


@torch.no_grad()
def generate_answers(model: torch.nn.Module, tokenizer: Any, prompts: list[str],
                     max_new_tokens: int = 32, batch_size: int = 16) -> list[str]:
    """Greedy completions for ``prompts`` (left-padded batches), decoded without the prompt."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outs: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            enc = tokenizer(chunk, return_tensors="pt", padding=True).to(device)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
            new = gen[:, enc["input_ids"].shape[1]:]
            outs.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outs


def accuracy(predictions: Iterable[str], items: Iterable[dict[str, Any]],
             scorer: Callable[[str, dict[str, Any]], bool],
             method: str = "exact_match") -> dict[str, Any]:
    """Accuracy under ``scorer`` with its sample count; ``method`` names how answers are read."""
    hits = [bool(scorer(p, it)) for p, it in zip(predictions, items, strict=True)]
    if not hits:
        return missing("fraction", "no evaluation items")
    acc = sum(hits) / len(hits)
    return metric(acc, "fraction", method, n=len(hits),
                  **ci_fields(acc, bootstrap_ci([float(h) for h in hits]), len(hits), "items"))


def task_accuracy(model: torch.nn.Module, tokenizer: Any, task: Any, style: str,
                  max_new_tokens: int) -> tuple[dict[str, Any], list[str]]:
    """Greedy answers to ``task.eval`` (a :class:`~effllm_helpers.data.TaskData`) in prompt
    format ``style``, scored by the task's scorer for that format; the metric records the
    format and the answer extraction (``prompt_format``, ``extraction``). A chat generation
    gets at least ``CHAT_MIN_NEW_TOKENS`` (an instruct model reasons before its answer)."""
    from .data.tasks import CHAT_MIN_NEW_TOKENS, PLAIN_EXTRACTION

    if style == "chat":
        max_new_tokens = max(max_new_tokens, CHAT_MIN_NEW_TOKENS)
    preds = generate_answers(model, tokenizer, task.prompts(tokenizer, style),
                             max_new_tokens=max_new_tokens)
    scorer, extraction = task.scoring(style)
    acc = accuracy(preds, task.eval, scorer,
                   method="exact_match" if extraction == PLAIN_EXTRACTION else extraction)
    if acc.get("value") is not None:
        acc.update(prompt_format=style, extraction=extraction, max_new_tokens=max_new_tokens)
    return acc, preds


# ---------------------------------------------------------------- KV cache, measured
def _tensor_bytes(obj: Any, seen: set[int] | None = None) -> int:
    """Bytes of every distinct tensor reachable from a cache object (lists, layers, attrs)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_tensor_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, torch.nn.Module | type):
        return sum(_tensor_bytes(v, seen) for v in vars(obj).values())
    return 0


@torch.no_grad()
def measured_kv_bytes_per_token(model: torch.nn.Module, vocab_size: int, t1: int = 16,
                                t2: int = 48, dtype: torch.dtype | None = None
                                ) -> dict[str, Any]:
    """Measure the cache a forward pass leaves behind at two lengths; the slope is bytes/token.

    The difference removes what does not grow with length (a recurrent state, a pre-allocated
    buffer), so Mamba/RWKV read ~0 and attention models their per-token K/V (or latent) bytes.
    ``dtype`` is the serving dtype to measure in (a cast copy; the model is left as it is): an
    fp32 master copy trained under bf16 autocast would otherwise cache 4-byte elements.
    """
    if dtype is not None and next(model.parameters()).dtype != dtype:
        import copy

        model = copy.deepcopy(model).to(dtype)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sizes = []
    try:
        for t in (t1, t2):
            ids = torch.randint(0, vocab_size, (1, t), device=device)
            out = model(input_ids=ids, use_cache=True)
            cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
            if cache is None:
                cache = getattr(out, "cache_params", None) or getattr(out, "state", None)
            if cache is None:
                return missing("B/token", "the model returned no cache object")
            sizes.append(_tensor_bytes(cache))
    finally:
        model.train(was_training)
    per_token = (sizes[1] - sizes[0]) / (t2 - t1)
    return metric(per_token, "B/token", "cache_tensor_bytes_slope", constant_bytes=sizes[0]
                  - per_token * t1, dtype=str(next(model.parameters()).dtype).split(".")[-1])


@torch.no_grad()
def item_losses(model: torch.nn.Module, tensors: dict[str, torch.Tensor], batch_size: int,
                max_batches: int | None = None) -> tuple[list[float], list[int]]:
    """Summed response-token loss and scored-token count of each SFT row (labels -100 elsewhere),
    in row order: the items a bootstrap over eval items resamples."""
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    sums: list[float] = []
    counts: list[int] = []
    n = tensors["input_ids"].shape[0]
    for i, start in enumerate(range(0, n, batch_size)):
        if max_batches is not None and i >= max_batches:
            break
        batch = {k: v[start:start + batch_size].to(device) for k, v in tensors.items()}
        logits = model(input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
            reduction="none").view(labels.shape)
        sums.extend(float(x) for x in loss.sum(dim=1))
        counts.extend(int(x) for x in (labels != -100).sum(dim=1))
    model.train(was)
    return sums, counts


def eval_loss(model: torch.nn.Module, tensors: dict[str, torch.Tensor], batch_size: int,
              max_batches: int | None = None) -> float:
    """Mean response-token loss over SFT tensors (labels -100 elsewhere), token-weighted."""
    sums, counts = item_losses(model, tensors, batch_size, max_batches)
    return sum(sums) / max(1, sum(counts))


def eval_loss_metric(model: torch.nn.Module, tensors: dict[str, torch.Tensor],
                     batch_size: int) -> dict[str, Any]:
    """:func:`eval_loss` over every row as a metric, with its bootstrap interval over eval items
    (each resample's token-weighted mean, as the point estimate is)."""
    sums, counts = item_losses(model, tensors, batch_size)
    scored = [(s / c, c) for s, c in zip(sums, counts, strict=True) if c > 0]
    if not scored:
        return missing("nats/token", f"no response tokens within max_len in any of the "
                                     f"{len(sums)} eval rows", "response_token_cross_entropy")
    mean = sum(sums) / sum(counts)
    interval = bootstrap_ci([m for m, _ in scored], weights=[c for _, c in scored])
    return metric(mean, "nats/token", "response_token_cross_entropy", n=len(scored),
                  n_tokens=sum(counts), **ci_fields(mean, interval, len(scored), "items"))
