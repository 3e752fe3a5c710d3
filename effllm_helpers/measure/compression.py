"""Model compression rate (MCR, paper Eq. 9) from the real bytes of the weights.

Why real bytes: the paper's int4 rows use the nominal 16/4 = 4.0, but embeddings, norms and
layers left unquantised, plus the quantisation constants (absmax, codebooks), make the true size
ratio lower. We count every parameter and buffer storage once (tied weights share storage) and
the tensors bitsandbytes keeps beside packed weights (``quant_state``: absmax, code, nested
state2; int8 ``SCB``), and we record the nominal bit-ratio version beside it. A torchao weight is a
tensor subclass with no storage of its own: we count the plain tensors it is made of (packed
int4 data with its scales and zeros, int8 data with scales and zero points, float8 data with
its scales), in ``params``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from effllm_helpers import catalog
from effllm_helpers.results import metric, missing

BASELINE_DTYPE = "bf16"


def _tensors_in(obj: Any, depth: int = 0) -> list[torch.Tensor]:
    """Tensors held by a bitsandbytes quant state (or similar plain object), recursively."""
    if obj is None or depth > 3:
        return []
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, list | tuple):
        return [t for o in obj for t in _tensors_in(o, depth + 1)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors_in(o, depth + 1)]
    if hasattr(obj, "__dict__"):
        return [t for o in vars(obj).values() for t in _tensors_in(o, depth + 1)]
    return []


def _storage_key_and_bytes(t: torch.Tensor) -> tuple[tuple[Any, ...], int]:
    if t.device.type == "meta":
        return ("meta", id(t)), t.numel() * t.element_size()
    try:
        st = t.untyped_storage()
        return (str(t.device), st.data_ptr()), int(st.nbytes())
    except (RuntimeError, NotImplementedError):  # tensor subclasses without a storage
        return ("obj", id(t)), t.numel() * t.element_size()


def _plain_tensors(t: torch.Tensor, depth: int = 0) -> list[torch.Tensor]:
    """The plain tensors that hold a tensor's data: itself, or a wrapper subclass's inner tensors.

    Wrapper subclasses (torchao's quantised weights) report their logical shape and dtype but own
    no storage; ``__tensor_flatten__`` names the tensors that really hold the bytes.
    """
    if depth > 4 or not is_traceable_wrapper_subclass(t):
        return [t]
    names, _ = t.__tensor_flatten__()
    inner = [getattr(t, n, None) for n in names]
    return [x for i in inner if isinstance(i, torch.Tensor) for x in _plain_tensors(i, depth + 1)]


def weight_bytes(model: torch.nn.Module, include_buffers: bool = True) -> dict[str, int]:
    """Bytes the model's weights really occupy: {"total", "params", "buffers", "quant_state"}.

    Each underlying storage is counted once, so tied embeddings and views are not doubled;
    tensor subclasses count the storages of their inner tensors.
    """
    seen: set[tuple[Any, ...]] = set()
    out = {"params": 0, "buffers": 0, "quant_state": 0}

    def add(t: torch.Tensor, bucket: str) -> None:
        for plain in _plain_tensors(t):
            key, nbytes = _storage_key_and_bytes(plain)
            if key in seen:
                continue
            seen.add(key)
            out[bucket] += nbytes

    for p in model.parameters():
        add(p, "params")
        for attr in ("quant_state", "SCB", "CB"):
            for t in _tensors_in(getattr(p, attr, None)):
                add(t, "quant_state")
    if include_buffers:
        for b in model.buffers():
            add(b, "buffers")
    for module in model.modules():  # bnb Linear8bitLt moves SCB/CB from the weight to .state
        state = getattr(module, "state", None)
        for attr in ("SCB", "CB"):
            for t in _tensors_in(getattr(state, attr, None)):
                add(t, "quant_state")
    out["total"] = out["params"] + out["buffers"] + out["quant_state"]
    return out


def _ratio(size_ratio: float | None, perf_orig: float | None, perf_comp: float | None,
           method: str, why_no_size: str, **sizes: Any) -> dict[str, Any]:
    """size_ratio x perf_comp / perf_orig, or null with the reason (shared by both MCRs)."""
    if size_ratio is None:
        return missing("ratio", why_no_size, method)
    if perf_orig is None or perf_comp is None:
        return missing("ratio", "baseline or compressed performance not measured", method)
    if perf_orig <= 0:
        return missing("ratio", f"baseline performance {perf_orig} <= 0: ratio undefined", method)
    perf_ratio = perf_comp / perf_orig
    return metric(size_ratio * perf_ratio, "ratio", method, size_ratio=size_ratio,
                  perf_ratio=perf_ratio, **sizes)


def mcr(size_orig: float, size_comp: float, perf_orig: float | None, perf_comp: float | None
        ) -> dict[str, Any]:
    """MCR = (size_orig / size_comp) × (perf_comp / perf_orig), real bytes (method real_bytes)."""
    ok = bool(size_comp) and size_comp > 0 and bool(size_orig) and size_orig > 0
    return _ratio(size_orig / size_comp if ok else None, perf_orig, perf_comp, "real_bytes",
                  "sizes must be positive", size_orig_bytes=size_orig, size_comp_bytes=size_comp)


def mcr_nominal(bits_comp: int | str, perf_orig: float | None, perf_comp: float | None,
                bits_orig: int | str = BASELINE_DTYPE) -> dict[str, Any]:
    """The paper's version: size ratio = bits_orig / bits_comp (e.g. 16/4 = 4.0)."""
    bo = catalog.bits(bits_orig) if isinstance(bits_orig, str) else int(bits_orig)
    bc = catalog.bits(bits_comp) if isinstance(bits_comp, str) else int(bits_comp)
    return _ratio(bo / bc, perf_orig, perf_comp, "nominal_bits", "", bits_orig=bo,
                  bits_comp=bc)


def compression_metrics(size_comp: int, perf_comp: float | None, size_orig: int | None,
                        perf_orig: float | None, bits_comp: int | str,
                        bits_orig: int | str = BASELINE_DTYPE) -> dict[str, dict[str, Any]]:
    """``size_bytes``, ``mcr`` (real bytes) and ``mcr_nominal`` for one compressed run.

    ``size_orig``/``perf_orig`` come from the baseline run (default bf16) of the same model.
    """
    out = {"size_bytes": metric(size_comp, "B", "weight_storage_bytes")}
    if size_orig is None:
        out["mcr"] = missing("ratio", "no baseline size (run the baseline precision first)",
                             "real_bytes")
    else:
        out["mcr"] = mcr(size_orig, size_comp, perf_orig, perf_comp)
    out["mcr_nominal"] = mcr_nominal(bits_comp, perf_orig, perf_comp, bits_orig)
    return out
