"""Fused projections for decode: q, k and v as one matmul, gate and up as one.

At batch 1 every projection of a decoder layer is a matrix-vector product, and a Llama-style layer
launches seven of them per token (q, k, v, o, gate, up, down). Each has a fixed launch and tail
cost, so engines that approach the memory-bandwidth bound (vLLM, gpt-fast, llama.cpp) load q/k/v
and gate/up as one concatenated weight each: four products per layer instead of seven, and the
same bytes read.

transformers' attention and MLP modules call ``q_proj``, ``k_proj`` and ``v_proj`` (``gate_proj``
and ``up_proj``) one after the other on the same input. :func:`fuse_projections` keeps their
forward code and replaces the modules: the first one called (:class:`FusedLead`) runs the one
concatenated ``nn.Linear`` and hands its siblings (:class:`FusedPart`) their slices. The fused
weight is an ordinary ``nn.Linear``, so torchao's ``quantize_`` quantises it like any other (its
int4 groups run along the input dimension, so the fused rows quantise exactly as the separate
ones did). The rewrite is checked by one forward before and after; a model whose modules are
called in another order, or whose logits move, is restored and the reason recorded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

# sibling projections that read the same input, in the order transformers calls them
GROUPS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class _Slices:
    """The fused output's slices, from the lead to its siblings (one per fused group)."""

    def __init__(self) -> None:
        self.parts: tuple[torch.Tensor, ...] = ()


class FusedLead(nn.Module):
    """Runs the group's one concatenated linear; returns its own slice, keeps the others."""

    def __init__(self, linears: list[nn.Linear], slices: _Slices) -> None:
        super().__init__()
        first = linears[0]
        bias = first.bias is not None
        self.sizes = [lin.out_features for lin in linears]
        self.fused = nn.Linear(first.in_features, sum(self.sizes), bias=bias,
                               device=first.weight.device, dtype=first.weight.dtype)
        with torch.no_grad():
            self.fused.weight.copy_(torch.cat([lin.weight for lin in linears]))
            if bias:
                self.fused.bias.copy_(torch.cat([lin.bias for lin in linears]))
        self.in_features, self.out_features = first.in_features, first.out_features
        self.slices = slices

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, *rest = self.fused(x).split(self.sizes, dim=-1)
        self.slices.parts = tuple(rest)
        return first


class FusedPart(nn.Module):
    """A sibling projection: its slice of the lead's output (the lead must run first)."""

    def __init__(self, slices: _Slices, index: int, in_features: int, out_features: int
                 ) -> None:
        super().__init__()
        self.slices, self.index = slices, index
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.slices.parts[self.index]


@dataclass
class Fusion:
    """What :func:`fuse_projections` did, for the record."""

    applied: bool
    groups: int = 0
    linears_before: int = 0
    linears_after: int = 0
    reason: str | None = None
    max_abs_diff: float | None = None
    _undo: list[tuple[nn.Module, str, nn.Module]] = field(default_factory=list, repr=False)

    def record(self) -> dict[str, Any]:
        return {"applied": self.applied, "groups": self.groups,
                "linears_per_model": [self.linears_before, self.linears_after],
                "reason": self.reason, "check_max_abs_diff": self.max_abs_diff}


def _plain_linear(m: Any) -> bool:
    """An unquantised ``nn.Linear`` (bitsandbytes' and quantised-weight layers are left alone)."""
    return (type(m) is nn.Linear and type(m.weight) in (torch.Tensor, nn.Parameter)
            and m.weight.dtype.is_floating_point)


def _count_linears(model: nn.Module) -> int:
    return sum(isinstance(m, nn.Linear) for m in model.modules())


def _rewrite(model: nn.Module) -> Fusion:
    fusion = Fusion(applied=False, linears_before=_count_linears(model))
    for parent in list(model.modules()):
        for names in GROUPS:
            mods = [getattr(parent, n, None) for n in names]
            if not all(_plain_linear(m) for m in mods):
                continue
            first = mods[0]
            if any(m.in_features != first.in_features or (m.bias is None) != (first.bias is None)
                   or m.weight.dtype != first.weight.dtype
                   or m.weight.device != first.weight.device for m in mods):
                continue
            slices = _Slices()
            lead = FusedLead(mods, slices)
            parts = [FusedPart(slices, i, m.in_features, m.out_features)
                     for i, m in enumerate(mods[1:])]
            for name, new, old in zip(names, [lead, *parts], mods, strict=True):
                fusion._undo.append((parent, name, old))
                setattr(parent, name, new)
            fusion.groups += 1
    fusion.linears_after = _count_linears(model)
    return fusion


def _restore(fusion: Fusion) -> None:
    for parent, name, old in reversed(fusion._undo):
        setattr(parent, name, old)
    fusion._undo.clear()


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    try:
        out = model(input_ids=ids, use_cache=False)
    except TypeError:  # a forward without use_cache
        out = model(input_ids=ids)
    return out.logits.float()


@torch.no_grad()
def fuse_projections(model: nn.Module, check_ids: torch.Tensor | None = None) -> Fusion:
    """Fuse q/k/v and gate/up of every layer in place; returns what was done.

    ``check_ids`` (a small ``[batch, len]`` id tensor on the model's device; default 8 tokens)
    is run through the model before and after: the rewrite stays only if the logits agree to
    the dtype's rounding (fp32 1e-4, half precisions 2e-2 of the logits' scale).
    """
    if check_ids is None:
        dev = next(model.parameters()).device
        vocab = int(getattr(model.config, "vocab_size", 2))
        check_ids = torch.arange(8, device=dev).remainder(vocab).unsqueeze(0)
    was_training = model.training
    model.eval()
    try:
        before = _logits(model, check_ids)
        fusion = _rewrite(model)
        if not fusion.groups:
            fusion.reason = "no sibling q/k/v or gate/up projections of plain nn.Linear"
            return fusion
        try:
            after = _logits(model, check_ids)
        except Exception as exc:  # e.g. a sibling called before its lead
            _restore(fusion)
            fusion.groups, fusion.linears_after = 0, fusion.linears_before
            fusion.reason = f"fused forward failed, unfused: {type(exc).__name__}: {exc}"[:300]
            return fusion
        diff = float((after - before).abs().max())
        dtype = next(model.parameters()).dtype
        tol = (1e-4 if dtype == torch.float32 else 2e-2) * max(1.0, float(before.abs().max()))
        fusion.max_abs_diff = diff
        if not diff <= tol:
            _restore(fusion)
            fusion.groups, fusion.linears_after = 0, fusion.linears_before
            fusion.reason = f"fused logits differ by {diff:.3g} (> {tol:.3g}): unfused"
            return fusion
        fusion.applied = True
        fusion._undo.clear()  # the separate weights go; only the fused ones stay
        return fusion
    finally:
        model.train(was_training)
