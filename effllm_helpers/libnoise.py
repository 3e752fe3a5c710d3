"""Known library messages: each said once, in one line, with what it means for the numbers.

Why: torchao's C-extension load failures, bitsandbytes' ``kernels`` hub fallback and its
per-call ``MatMul8bitLt`` cast notice filled a notebook's output with hundreds of red lines, in
which a real warning could not be seen. Nothing is silenced wholesale: a message not listed in
:data:`KNOWN` passes through untouched, and a listed one is shown the first time, rewritten to
one line that says what it means here; its repeats are dropped.

:func:`install` (idempotent) is called where a run starts (``run.start_run``) and before the
quantisation libraries are imported (``techniques.precision``). :func:`import_bitsandbytes`
imports bitsandbytes with the Hugging Face Hub offline: on a CPU with AVX512-BF16 its CPU
backend asks the ``kernels`` package for a Hub kernel at import, and ``kernels`` reads
``huggingface_hub.constants.HF_HUB_OFFLINE`` to stay on the local cache (no network).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

WARNINGS = "warnings"  # the source of a message sent through warnings.warn


@dataclass(frozen=True)
class Known:
    """A library message we know: where it comes from, how to recognise it, what it means."""

    source: str  # the emitting logger's exact name, or WARNINGS
    pattern: str  # regular expression searched in the message
    meaning: str  # what it means for the numbers, in one line


KNOWN: tuple[Known, ...] = (
    Known("torchao", r"Failed to load .*torchao/_C",
          "torchao: a CUDA C-extension (cutlass/mxfp8 kernels) does not load on this build; no "
          "precision measured here calls it, so no number is affected"),
    Known("bitsandbytes.backends.cpu.ops",
          r"Failed to load CPU gemm_4bit_forward from kernels-community",
          "bitsandbytes: the optional fused CPU 4-bit matmul (a Hub kernel, not fetched: we stay "
          "offline) is not used; 4-bit on CPU runs bitsandbytes' built-in dequantise + matmul, "
          "and its CPU latency is that path's"),
    Known("kernels._internals.hf_hub", r"Skipping publisher trust check for 'kernels-community/",
          "kernels: the Hub is offline (by design), so the Hub kernel bitsandbytes asks for is "
          "looked for in the local cache only; nothing is downloaded"),
    Known("torch.utils._pytree", r"is an Enum subclass and is now natively supported",
          "torch: a library (torchao) registers an enum the older way, a deprecation notice "
          "about torch.compile's bookkeeping; no number is affected"),
    Known("bitsandbytes.autograd._functions", r"MatMul8bitLt: inputs will be cast from",
          "bitsandbytes int8: LLM.int8 casts the matmul inputs to float16 (as on CUDA); "
          "expected, the int8 numbers include that cast"),
    Known(WARNINGS, r"MatMul8bitLt: inputs will be cast from",  # older bitsandbytes
          "bitsandbytes int8: LLM.int8 casts the matmul inputs to float16 (as on CUDA); "
          "expected, the int8 numbers include that cast"),
)

_SAID: set[Known] = set()
_LOCK = threading.Lock()
_INSTALLED: dict[str, Any] = {}


def classify(source: str, message: str) -> Known | None:
    """The known entry ``message`` from ``source`` is, or None."""
    for known in KNOWN:
        if known.source == source and re.search(known.pattern, message):
            return known
    return None


def one_line(known: Known, message: str) -> str:
    """The line shown instead of a known message: its first line, cut, then its meaning."""
    first = message.strip().splitlines()[0] if message.strip() else ""
    first = first if len(first) <= 120 else first[:117] + "..."
    return f"[known, said once] {first} -> {known.meaning}"


def _first_time(known: Known) -> bool:
    with _LOCK:
        if known in _SAID:
            return False
        _SAID.add(known)
        return True


class _OnceFilter(logging.Filter):
    """On one library logger: a known record is rewritten to its one line the first time and
    dropped after; any other record passes as it is."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is the library's: let logging report it
            return True
        known = classify(record.name, message)
        if known is None:
            return True
        if not _first_time(known):
            return False
        record.msg, record.args = one_line(known, message), ()
        return True


def _showwarning(message: Any, category: type[Warning], filename: str, lineno: int,
                 file: Any = None, line: str | None = None) -> None:
    known = classify(WARNINGS, str(message))
    show = _INSTALLED["showwarning"]
    if known is None:
        show(message, category, filename, lineno, file, line)
    elif _first_time(known):
        show(one_line(known, str(message)), category, filename, lineno, file, line)


def install() -> None:
    """Put the once-filter on every known library logger and around ``warnings.showwarning``
    (idempotent). Repeats are dropped by us, so the warnings filters are left as they are."""
    with _LOCK:
        for source in {k.source for k in KNOWN} - {WARNINGS}:
            logger = logging.getLogger(source)
            if not any(isinstance(f, _OnceFilter) for f in logger.filters):
                logger.addFilter(_OnceFilter())
        if warnings.showwarning is not _showwarning:
            _INSTALLED["showwarning"] = warnings.showwarning
            warnings.showwarning = _showwarning


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Hugging Face Hub offline while inside (env var and the imported constant), restored
    after: what ``kernels`` reads before fetching a Hub kernel."""
    import huggingface_hub.constants as hub  # no network on import

    old_env, old_flag = os.environ.get("HF_HUB_OFFLINE"), hub.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"] = "1"
    hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = old_flag
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env


def import_bitsandbytes() -> Any:
    """``import bitsandbytes`` without its Hub fetch (see the module doc), known messages once."""
    install()
    if "bitsandbytes" in sys.modules:
        return sys.modules["bitsandbytes"]
    with hub_offline():
        import bitsandbytes

    return bitsandbytes


__all__ = ["KNOWN", "Known", "classify", "hub_offline", "import_bitsandbytes", "install",
           "one_line"]
