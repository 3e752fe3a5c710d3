"""int4 weight-only inference through GemLite's Triton kernels (precision ``int4-gemlite``).

Why a second int4 weight-only path beside torchao's: torchao's tinygemm kernel
(``_weight_int4pack_mm``) was written for A100 and on an H200 a batch-1 decode step with it was
1.9x *slower* than bf16 (``outputs/reference/nvidia-h200/quant_kernels.json``), so the study would
have told users that int4 buys no latency. GemLite (mobiusml/dropbox, used by HQQ, SGLang and
vLLM's HQQ path) ships Triton GEMV kernels for batch-1 decode (``GEMV_REVSPLITK``) and GEMMs for
prefill, picked per shape and autotuned once per shape on first use.

The quantiser is ours and deliberately plain, so the figure is about the kernel, not about a
clever rounding: round-to-nearest asymmetric int4 in groups of ``g`` input weights,

    scale = (max - min) / 15,  zero = -min / scale,  q = clamp(round(w / scale + zero), 0, 15),
    w ~= (q - zero) * scale,

the same grid as torchao's int4 weight-only and HQQ without its optimisation step. The LM head
stays in bf16, as with the other quantised precisions. GemLite's kernels are CUDA-only; on a CPU
the precision is a recorded skip.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from effllm_helpers.errors import UnsupportedTechnique
from effllm_helpers.techniques.probe import probe_input, reference_linear, relative_error

GROUP_SIZES: tuple[int, ...] = (128, 64, 32)  # int4 group sizes (torchao's too), largest first


def quantize_groups(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor,
                                                               torch.Tensor]:
    """Asymmetric round-to-nearest int4 of a ``(out, in)`` weight in groups along ``in``.

    Returns ``(q uint8 (out, in) in 0..15, scale (out, in/g), zero (out, in/g))`` with
    ``w ~= (q - zero) * scale`` per group; scale and zero in ``w``'s dtype."""
    out_f, in_f = w.shape
    if in_f % group_size:
        raise ValueError(f"input width {in_f} is not a multiple of the group size {group_size}")
    g = w.detach().float().reshape(out_f, in_f // group_size, group_size)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(torch.finfo(torch.float32).tiny)
    zero = -lo / scale
    q = torch.round(g / scale[..., None] + zero[..., None]).clamp_(0, 15)
    return q.to(torch.uint8).reshape(out_f, in_f), scale.to(w.dtype), zero.to(w.dtype)


def dequantize_groups(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The weight a quantised group stands for: ``(q - zero) * scale`` (the kernel's maths)."""
    out_f, in_f = q.shape
    groups = scale.shape[1]
    w = (q.float().reshape(out_f, groups, in_f // groups) - zero.float()[..., None])
    return (w * scale.float()[..., None]).reshape(out_f, in_f)


def group_size_for(in_features: list[int]) -> int:
    """The largest group size that divides every input width (GemLite needs one per layer)."""
    for g in GROUP_SIZES:
        if all(d % g == 0 for d in in_features):
            return g
    raise ValueError(f"no int4 group size in {GROUP_SIZES} divides the input widths "
                     f"{sorted(set(in_features))}")


def import_gemlite() -> Any:
    """Import GemLite quietly (it logs which tuned-config file it loaded at import)."""
    import logging

    quiet = logging.getLogger("gemlite")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        import gemlite
    finally:
        quiet.setLevel(level)
    return gemlite


def gemlite_linear(linear: nn.Linear, group_size: int) -> nn.Module:
    """A GemLite A16W4 layer holding ``linear``'s weight quantised by :func:`quantize_groups`."""
    gemlite = import_gemlite()
    from gemlite.helper import A16Wn

    w = linear.weight.data
    q, scale, zero = quantize_groups(w, group_size)
    bias = linear.bias.data if linear.bias is not None else None
    layer = A16Wn(device=w.device, dtype=w.dtype).from_weights(
        q, scale, zero, W_nbits=4, group_size=group_size, bias=bias)
    layer.effllm_kernel = f"gemlite {gemlite.__version__} A16W4 g{group_size}"
    return layer


def gemlite_quantize(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """Swap every ``nn.Linear`` but the LM head for a GemLite int4 layer, in place."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    targets = [(n, m) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and m is not head]
    if not targets:
        raise UnsupportedTechnique("int4-gemlite: the model has no linear layer besides the LM "
                                   "head to quantise")
    try:
        group = group_size_for([m.in_features for _, m in targets])
    except ValueError as exc:  # GemLite has one group size per layer and no unquantised rest
        raise UnsupportedTechnique(f"int4-gemlite: {exc}") from exc
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, gemlite_linear(module, group))
    torch.cuda.empty_cache()
    return model, ["LM head (output embeddings) not quantised, as with bitsandbytes",
                   f"int4 group size {group}, round-to-nearest asymmetric (our quantiser), "
                   "packed by GemLite; kernels autotuned per shape at the first call (warm-up)"]


def is_gemlite(module: nn.Module) -> bool:
    return type(module).__module__.split(".")[0] == "gemlite"


def kernel_name(module: nn.Module) -> str:
    return getattr(module, "effllm_kernel", f"gemlite.{type(module).__name__}")


@functools.lru_cache(maxsize=8)
def probe_gemlite(device: str) -> str | None:
    """Why ``int4-gemlite`` cannot run on ``device``, or None (runs one small layer)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return (f"GemLite's int4 kernels are Triton CUDA kernels; there is no {dev.type} path "
                "(install gemlite on a CUDA host: pip install -e .[gpu])")
    try:
        import_gemlite()
    except Exception as exc:  # not installed, or a Triton that does not fit
        return f"gemlite cannot be imported: {type(exc).__name__}: {str(exc)[:300]}"
    try:
        ref = reference_linear(256, 128).to(device=dev, dtype=torch.bfloat16)
        layer = gemlite_linear(ref, 64)
        x = probe_input(2, 256, dev, torch.bfloat16)
        with torch.no_grad():
            rel = relative_error(layer(x), ref(x))
        if not rel < 0.2:
            return f"gemlite int4 layer on {dev} is wrong (relative error {rel:.3g})"
    except Exception as exc:
        return f"gemlite cannot run int4 on {dev}: {type(exc).__name__}: {str(exc)[:300]}"
    return None
