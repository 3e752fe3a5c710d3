"""Which implementation runs a variant's core op: fla's Triton kernels on CUDA, else our reference.

``model.kernel`` (``auto`` | ``reference`` | ``fla``) is copied onto the model config as
``config.kernel`` by the zoo. Each op (``nsa``, ``rwkv``, ``mamba``) asks :func:`choose` at call
time with the device its tensors live on, and the architecture record asks the same function with
the run's device, so the record names what ran:

* ``reference``: the PyTorch path, always.
* ``auto``: fla on CUDA when ``fla`` (fla-core, Triton) imports, the model's settings are
  expressible by the kernel and the GPU check has not found the kernel disagreeing with the
  reference (:data:`AUTO_UNVALIDATED`); otherwise the reference, with the reason (``cpu``,
  ``fla not installed: ...``, ``nsa_stride != nsa_block``...).
* ``fla``: fla or a :class:`KernelUnavailable` error saying why not (never a silent fallback).

fla ops used (fla-core 0.6): ``fla.ops.nsa.parallel_nsa`` with ``fla.ops.attn.parallel_attn`` for
the window branch (see :mod:`.nsa`), ``fla.ops.rwkv4.fused_recurrent_rwkv4`` (see :mod:`.rwkv`),
``fla.ops.gla.fused_recurrent_gla`` for Mamba-1's selective scan (see :mod:`.mamba`). Their calls
are excluded from ``torch.compile`` graphs (:func:`compile_opaque`): fla's autograd Functions
launch Triton kernels that dynamo need not trace.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["AUTO_UNVALIDATED", "COMPILE_UNSAFE", "FLA_OPS", "KERNELS", "Choice", "KernelDispatch",
           "KernelUnavailable", "choose", "compile_blocker", "compile_opaque", "fla_missing",
           "kernel_dtype", "prepare", "record", "switch"]

KERNELS = ("auto", "reference", "fla")

# what the fla path runs, per op (names for records)
FLA_OPS = {
    "nsa": "fla.parallel_nsa+fla.parallel_attn(window)",
    "rwkv": "fla.fused_recurrent_rwkv4",
    "mamba": "fla.fused_recurrent_gla (mamba S6 as GLA)",
}


# fla paths whose training step must run uncompiled. RWKV-4: on an H200 (torch 2.11, fla-core
# 0.6.0) the compiled step's backward failed with "CompiledFunctionBackward returned an invalid
# gradient ... got [512] but expected shape compatible with [1, 1, 512]" (a time_mix parameter),
# not reproduced on CPU with a stand-in kernel under torch 2.13; eager fla is what runs
COMPILE_UNSAFE = {
    FLA_OPS["rwkv"]: "torch.compile's backward around fla's RWKV-4 kernel returned a wrongly "
                     "shaped gradient on an H200 (torch 2.11, fla-core 0.6.0); the step runs "
                     "eagerly",
}


# fla paths that ``auto`` does not pick: a GPU check (benchmarks/kernels_check.py) found them
# disagreeing with our reference beyond tolerance. ``model.kernel: fla`` still runs them (to
# investigate); ``auto`` runs the reference and the record says why.
AUTO_UNVALIDATED = {
    "mamba": "fla's S6-as-GLA path disagreed with the reference on an H200 (kernels_check, bf16 "
             "autocast: logits rel. error 0.37, gradients 0.26; fla-core 0.6.0), so auto runs "
             "the reference; model.kernel: fla forces fla",
}


class KernelUnavailable(RuntimeError):
    """``model.kernel: fla`` was asked for where fla cannot run."""


@dataclass(frozen=True)
class Choice:
    """The implementation one op runs: ``fla`` or not, its record name and, if it is the
    reference, why fla was not used (``None`` when the reference was asked for)."""

    use_fla: bool
    implementation: str
    reason: str | None = None


@functools.cache
def fla_missing() -> str | None:
    """``None`` when fla's ops import (fla-core and Triton present), else why not."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton not installed ({exc})"
    try:
        from fla.ops.attn import parallel_attn  # noqa: F401
        from fla.ops.gla import fused_recurrent_gla  # noqa: F401
        from fla.ops.nsa import parallel_nsa  # noqa: F401
        from fla.ops.rwkv4 import fused_recurrent_rwkv4  # noqa: F401
    except Exception as exc:  # ImportError, or a Triton/driver error raised at import
        return f"fla not installed or not importable ({type(exc).__name__}: {exc})"
    return None


def _device_type(device: Any) -> str:
    return torch.device(device).type


def choose(op: str, requested: str | None, device: Any, reference: str,
           unsupported: str | None = None) -> Choice:
    """The implementation of ``op`` for ``requested`` (``config.kernel``; ``None`` = ``auto``) on
    ``device``. ``reference``: the reference's record name; ``unsupported``: why this model's
    settings cannot run on the fla kernel (``None`` if they can)."""
    requested = requested or "auto"
    if requested not in KERNELS:
        raise ValueError(f"model.kernel {requested!r} is not one of {KERNELS}")
    if requested == "reference":
        return Choice(False, reference, None)
    reason = None
    if _device_type(device) != "cuda":
        reason = f"{_device_type(device)}: fla's kernels are Triton on CUDA"
    elif unsupported:
        reason = unsupported
    else:
        reason = fla_missing()
    if reason is None and requested == "auto" and op in AUTO_UNVALIDATED:
        reason = AUTO_UNVALIDATED[op]
    if reason is None:
        return Choice(True, FLA_OPS[op], None)
    if requested == "fla":
        raise KernelUnavailable(f"model.kernel=fla for {op}: {reason}")
    return Choice(False, reference, reason)


def compile_opaque(fn: Any) -> Any:
    """``fn`` excluded from ``torch.compile`` (a graph break around an fla call)."""
    disable = getattr(getattr(torch, "compiler", None), "disable", None)
    return disable(fn) if disable is not None else fn


def kernel_dtype(x: torch.Tensor) -> torch.dtype:
    """The one dtype a kernel that is not autocast-aware should get for ``x``'s device
    (fla's Triton kernels, ``grouped_mm``): autocast's when it is on (its operands may otherwise
    mix fp32 and bf16, which such kernels refuse)."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def record(choice: Choice, requested: str | None) -> dict[str, Any]:
    """Record fields for one choice: what ran, what was asked, and why not fla (if so)."""
    out: dict[str, Any] = {"implementation": choice.implementation,
                           "kernel_requested": requested or "auto"}
    if choice.reason is not None:
        out["implementation_reason"] = choice.reason
    return out


class KernelDispatch:
    """Mixin for a module whose core op runs on fla or on our reference: :meth:`choice` decides
    once per device type (``_decide``) and keeps it in ``_choices``, so a compiled forward reads
    a decision instead of tracing one. Setting ``kernel`` and ``_choices = {}`` re-decides."""

    kernel: str = "auto"
    _choices: dict[str, Choice]

    def choice(self, device: Any) -> Choice:
        """The implementation on ``device``, decided once per device type."""
        dev = _device_type(device)
        if dev not in self._choices:
            self._choices[dev] = self._decide(dev)
        return self._choices[dev]

    def _decide(self, device: str) -> Choice:
        raise NotImplementedError


def switch(model: torch.nn.Module, kernel: str, forced: str | None = None) -> None:
    """Point every dispatching module of ``model`` at ``kernel`` (``auto``, ``fla`` or
    ``reference``), and NSA's at the ``forced`` block rule; each re-decides at its next forward.
    How the kernel checks run one model on both implementations."""
    for m in model.modules():
        if isinstance(m, KernelDispatch):
            m.kernel, m._choices = kernel, {}
            if hasattr(m, "forced"):
                m.forced = forced


def compile_blocker(choices: list[Choice]) -> str | None:
    """Why a model running ``choices`` must train uncompiled (``None`` if it may compile)."""
    for c in choices:
        if c.use_fla and c.implementation in COMPILE_UNSAFE:
            return COMPILE_UNSAFE[c.implementation]
    return None


def prepare(model: torch.nn.Module, device: Any) -> list[Choice]:
    """Decide every kernel-dispatching module's implementation for ``device`` now (each caches
    it), so a compiled forward reads a decision rather than tracing it; returns the choices."""
    dev = torch.device(device)
    return [m.choice(dev) for m in model.modules() if isinstance(m, KernelDispatch)]
