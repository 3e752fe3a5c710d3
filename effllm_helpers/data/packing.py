"""Fine-tuning batches without wasted positions: padding, length grouping and packing.

Why: padding every row to the longest row of the whole set made one long item set the width of
every batch, so the fine-tuning axis timed padding, not the method. Three layouts of the same
examples (``packing`` in the fine-tuning params):

* ``none``: every row padded to the longest row of the set (the layout before this module);
* ``group``: length-grouped batches (HF's ``group_by_length`` recipe: shuffle, sort within
  megabatches of 16 batches, shuffle the batches), each padded to its own longest row;
* ``pack``: the step's examples concatenated into as few rows of at most ``max_len`` tokens as
  first-fit decreasing gives, position ids restarting at 0 for each example and no attention
  mask, so transformers builds a block-diagonal causal mask from the position ids (or a varlen
  kernel uses them): no token attends across examples. The first token of each example has no
  label, so no example's loss reads its neighbour. ``none`` and ``pack`` train on the same
  examples in the same steps (the same sampler), so the loss is the same up to rounding.

Whether a model keeps packed examples apart is *checked*, not assumed (:func:`probe`): a
recurrent model (Mamba, RWKV) or a custom attention that ignores position ids would mix them.

Each batch carries its counts under ``_``-keys that the training loop pops before the forward
(:data:`META_KEYS`): computed positions, real (attended) tokens and examples.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch

PackingMode = Literal["none", "group", "pack"]
MODES: tuple[str, ...] = ("none", "group", "pack")
Batch = dict[str, torch.Tensor]
Row = tuple[list[int], list[int]]  # (prompt ids, response ids): labels only on the response
META_KEYS = ("_real_tokens", "_examples")
GROUP_MEGABATCH = 16  # batches sorted together by length in `group` mode


def _order(n: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def step_indices(order: torch.Tensor, batch_size: int, micro_step: int, rank: int,
             world: int) -> torch.Tensor:
    """The examples of one micro-step, sharded over ranks: consecutive slices of an epoch's
    ``order`` (the one sampler of :func:`dict_batches` and :func:`sft_batches`)."""
    n = order.numel()
    start = ((micro_step * world + rank) * batch_size) % n
    idx = order[start:start + batch_size]
    if len(idx) < batch_size:
        idx = torch.cat([idx, order[: batch_size - len(idx)]])
    return idx


def dict_batches(tensors: dict[str, torch.Tensor], batch_size: int, seed: int = 0
                 ) -> Callable[[int, int, int], Batch]:
    """Batches over aligned tensors (e.g. SFT ``input_ids/attention_mask/labels``, images and
    their labels), sharded."""
    n = next(iter(tensors.values())).shape[0]
    if n == 0:
        raise ValueError("no training examples")
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen)

    def next_batch(micro_step: int, rank: int, world: int) -> Batch:
        idx = step_indices(order, batch_size, micro_step, rank, world)
        return {k: v[idx] for k, v in tensors.items()}

    return next_batch


def padded(rows: Sequence[Row], pad_id: int, width: int | None = None) -> Batch:
    """Right-padded ``input_ids/attention_mask/labels`` (width: the longest row by default)."""
    width = width or max(len(p) + len(r) for p, r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (p, r) in enumerate(rows):
        n = len(p) + len(r)
        ids[i, :n] = torch.tensor(p + r, dtype=torch.long)
        mask[i, :n] = 1
        labels[i, len(p):n] = torch.tensor(r, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "_real_tokens": mask.sum(), "_examples": torch.tensor(len(rows))}


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of example indices, each holding at most ``capacity`` tokens, longest first."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        n = lengths[i]
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(capacity - n)
    return bins


def packed(rows: Sequence[Row], pad_id: int, max_len: int, fixed_width: bool = False) -> Batch:
    """The examples packed into rows of at most ``max_len`` tokens (see the module docstring);
    rows are padded to the longest packed row (to ``max_len`` with ``fixed_width``: a compiled
    step then sees one row width, not a recompile per width), padding on position ids of its
    own."""
    lengths = [len(p) + len(r) for p, r in rows]
    if max(lengths) > max_len:
        raise ValueError(f"an example of {max(lengths)} tokens does not fit max_len {max_len}")
    bins = first_fit_decreasing(lengths, max_len)
    width = max_len if fixed_width else max(sum(lengths[i] for i in b) for b in bins)
    ids = torch.full((len(bins), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(bins), width), dtype=torch.long)
    labels = torch.full((len(bins), width), -100, dtype=torch.long)
    real = 0
    for b, members in enumerate(bins):
        at = 0
        for i in sorted(members):  # the sampler's order within a row
            p, r = rows[i]
            n = len(p) + len(r)
            ids[b, at:at + n] = torch.tensor(p + r, dtype=torch.long)
            pos[b, at:at + n] = torch.arange(n)
            labels[b, at + len(p):at + n] = torch.tensor(r, dtype=torch.long)
            labels[b, at] = -100  # predicted from the previous example's last token
            at += n
        real += at
        pos[b, at:] = torch.arange(width - at)  # padding: a "sequence" of its own, no labels
    return {"input_ids": ids, "position_ids": pos, "labels": labels, "use_cache": False,
            "_real_tokens": torch.tensor(real), "_examples": torch.tensor(len(rows))}


def group_order(lengths: Sequence[int], batch_size: int, seed: int) -> torch.Tensor:
    """An epoch's order in which consecutive ``batch_size`` examples have similar lengths."""
    order = _order(len(lengths), seed)
    mega = GROUP_MEGABATCH * batch_size
    chunks = [sorted(order[i:i + mega].tolist(), key=lambda j: -lengths[j])
              for i in range(0, len(order), mega)]
    batches = [c[i:i + batch_size] for c in chunks for i in range(0, len(c), batch_size)]
    perm = _order(len(batches), seed + 1).tolist()
    return torch.tensor([j for k in perm for j in batches[k]], dtype=torch.long)


def sft_batches(rows: Sequence[Row], batch_size: int, mode: str, pad_id: int, max_len: int,
                seed: int = 0, fixed_width: bool = False) -> Callable[[int, int, int], Batch]:
    """``next_batch(micro_step, rank, world)`` over SFT rows in the given layout (packed rows
    ``max_len`` wide with ``fixed_width``, for a compiled step)."""
    if mode not in MODES:
        raise ValueError(f"packing {mode!r}: allowed {', '.join(MODES)}")
    if not rows:
        raise ValueError("no training examples")
    lengths = [len(p) + len(r) for p, r in rows]
    order = group_order(lengths, batch_size, seed) if mode == "group" else _order(len(rows), seed)
    width = max(lengths)

    def next_batch(micro_step: int, rank: int, world: int) -> Batch:
        idx = step_indices(order, batch_size, micro_step, rank, world)
        batch_rows = [rows[int(i)] for i in idx]
        if mode == "pack":
            return packed(batch_rows, pad_id, max_len, fixed_width)
        return padded(batch_rows, pad_id, width if mode == "none" else None)

    return next_batch


def layout_counts(batch: Batch) -> dict[str, int]:
    """Computed positions, real tokens and loss tokens (targets) of one batch."""
    labels = batch["labels"]
    return {"positions": int(batch["input_ids"].numel()),
            "real_tokens": int(batch["_real_tokens"]) if "_real_tokens" in batch
            else int(batch["input_ids"].numel()),
            "loss_tokens": int((labels[..., 1:] != -100).sum())}


@torch.no_grad()
def probe(model: torch.nn.Module, vocab_size: int, device: Any,
          lengths: tuple[int, int] = (7, 5)) -> float:
    """Largest |logit difference| between two examples run apart and packed into one row,
    relative to the largest |logit|: ~0 when the model keeps packed examples apart, O(1) when
    one attends to (or carries state from) the other."""
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, max(4, vocab_size), (n,), generator=gen) for n in lengths]
    was_training = model.training
    model.eval()
    try:
        apart = [model(input_ids=s[None].to(device), use_cache=False).logits[0].float()
                 for s in seqs]
        ids = torch.cat(seqs)[None].to(device)
        pos = torch.cat([torch.arange(n) for n in lengths])[None].to(device)
        together = model(input_ids=ids, position_ids=pos, use_cache=False).logits[0].float()
    finally:
        model.train(was_training)
    ref = torch.cat(apart)
    scale = float(ref.abs().max().clamp_min(1e-6))
    return float((together - ref).abs().max()) / scale


PROBE_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def choose(requested: str, model: torch.nn.Module, vocab_size: int, device: Any,
           dtype: torch.dtype) -> tuple[str, dict[str, Any]]:
    """The layout to train with and what the record says about it.

    ``auto`` packs when :func:`probe` shows the model keeps packed examples apart, else groups;
    an explicit ``pack`` on a model that mixes them is refused (the loss would be wrong)."""
    info: dict[str, Any] = {"requested": requested}
    if requested in ("none", "group"):
        return requested, info | {"mode": requested}
    tol = PROBE_TOLERANCE.get(dtype, 2e-2)
    if str(device).startswith("cuda"):  # TF32 and split-K kernels round differently by shape;
        tol = max(tol, 5e-3)            # a model that mixes examples is off by O(0.1-1)
    try:
        diff = probe(model, vocab_size, device)
    except (TypeError, ValueError, RuntimeError) as exc:  # forward refuses position_ids, ...
        diff, why = float("inf"), f"{type(exc).__name__}: {exc}"[:300]
    else:
        why = (f"packed logits differ from unpacked by {diff:.2g} (relative) > {tol:g}: the "
               "model attends across (or carries state between) packed examples")
    info |= {"probe_rel_diff": diff if diff != float("inf") else None, "probe_tolerance": tol}
    if diff <= tol:
        return "pack", info | {"mode": "pack", "attention": "block-diagonal causal mask from "
                               "restarting position ids (transformers masking_utils)"}
    if requested == "pack":
        raise ValueError(f"packing 'pack' is unsafe for this model: {why}; use 'group'")
    return "group", info | {"mode": "group", "reason": f"not packed: {why}"}
