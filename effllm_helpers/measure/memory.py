"""Memory probes for AMU: NVML used memory on GPU, the process tree's RSS on CPU.

Why per-process where possible: on a shared GPU the device total includes other users' memory.
NVML lists per-process usage, but inside containers it reports host PIDs (ours never match) or
no number at all; then we fall back to the device's used memory and say so (``scope``).
"""

from __future__ import annotations

import importlib
import os
import time
from collections.abc import Sequence
from typing import Any

import psutil


def process_tree(proc: psutil.Process | None = None) -> list[psutil.Process]:
    proc = proc or psutil.Process(os.getpid())
    try:
        return [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return [proc]


class ProcessTree:
    """This process and its descendants, re-listed at most every ``refresh_s`` seconds.

    Why cached: listing children scans all of /proc (~1-3 ms), too costly to do every 100 ms
    sample on a small machine; reading one process's RSS or CPU times is ~10 µs.
    """

    def __init__(self, pid: int | None = None, refresh_s: float = 2.0) -> None:
        self.root = psutil.Process(pid or os.getpid())
        self.refresh_s = refresh_s
        self._procs: list[psutil.Process] = [self.root]
        self._next_listing = -float("inf")

    def procs(self, refresh: bool = False) -> list[psutil.Process]:
        """The cached tree; re-listed when stale, at most ~1 % of one core (listing cost × 100)."""
        now = time.monotonic()
        if refresh or now >= self._next_listing:
            self._procs = process_tree(self.root)
            cost = time.monotonic() - now
            self._next_listing = now + max(self.refresh_s, 100.0 * cost)
        return self._procs

    def pids(self) -> set[int]:
        return {p.pid for p in self.procs()}

    def rss_bytes(self) -> float:
        total = 0
        for p in self.procs():
            try:
                total += p.memory_info().rss
            except psutil.Error:  # a child exited since the listing
                continue
        return float(total)

    def children_cpu_seconds(self, refresh: bool = False) -> float:
        total = 0.0
        for p in self.procs(refresh)[1:]:
            try:
                ct = p.cpu_times()
                total += ct.user + ct.system
            except psutil.Error:
                continue
        return total


# ---------------------------------------------------------------- pre-load baseline
# Why: a CPU run's RSS includes the interpreter, torch and whatever earlier code cached (~0.5 GB
# before any model), which swamps the difference between fp32 and int4 weights. The axes mark
# the baseline before they load a model; the Meter reports the increment over it beside the
# total. Without a mark, the RSS when this module was imported (interpreter + torch) is used.
_BASELINE: dict[str, Any] = {}


def _cuda_allocated() -> dict[int, int] | None:
    """Bytes the torch CUDA allocator holds now per device, without initialising CUDA (an
    uninitialised CUDA holds nothing); None without CUDA."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        n = torch.cuda.device_count()
        if not torch.cuda.is_initialized():
            return dict.fromkeys(range(n), 0)
        return {i: int(torch.cuda.memory_allocated(i)) for i in range(n)}
    except Exception:
        return None


def import_libraries(names: Sequence[str]) -> dict[str, str]:
    """Import each named module that is installed: name -> "imported" or why not.

    Any exception counts as "not importable" (a GPU library may refuse a machine without one)."""
    out: dict[str, str] = {}
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - whatever stops the import, it is not loaded
            out[name] = f"not imported: {type(exc).__name__}: {str(exc)[:120]}"
        else:
            out[name] = "imported"
    return out


def mark_baseline(libraries: Sequence[str] = ()) -> dict[str, Any]:
    """Record this process tree's memory now, before a model is loaded (each call replaces the
    last); the Meter's ``amu_increment_gb`` is measured above it.

    ``libraries`` are imported first: a library that one technique imports while loading
    (bitsandbytes: ~50 MB of RSS on a CPU) would otherwise count as that technique's memory,
    and int4 would read more than fp32. The baseline records which were imported."""
    imported = import_libraries(libraries)
    _BASELINE.clear()
    _BASELINE.update(rss_bytes=ProcessTree().rss_bytes(), cuda_allocated_bytes=_cuda_allocated(),
                     kind="preload", t=time.time(), libraries=imported)
    return dict(_BASELINE)


def baseline() -> dict[str, Any]:
    """The last :func:`mark_baseline`, else the import-time one (``kind``: preload | import)."""
    return dict(_BASELINE or _IMPORT_BASELINE)


def ram_total_bytes() -> int:
    return int(psutil.virtual_memory().total)


class GpuMemoryProbe:
    """Callable probe: bytes in use on the given NVML devices, per process when NVML tells.

    ``scopes`` collects which scope each sample used ("process" or "device") so the metric can
    say what it measured.
    """

    def __init__(self, nvml: Any, handles: list[Any], tree: ProcessTree | None = None) -> None:
        self.nv = nvml
        self.handles = handles
        self.tree = tree or ProcessTree()
        self.scopes: set[str] = set()

    def __call__(self) -> float:
        pids = self.tree.pids()
        total = 0
        scope = "process"
        per_proc: list[int] = []
        for h in self.handles:
            used = None
            try:
                procs = self.nv.nvmlDeviceGetComputeRunningProcesses(h)
                mine = [p.usedGpuMemory for p in procs if p.pid in pids]
                if mine and all(m is not None for m in mine):
                    used = int(sum(mine))
            except Exception:
                used = None
            per_proc.append(-1 if used is None else used)
        if any(u < 0 for u in per_proc):
            scope = "device"
            total = sum(int(self.nv.nvmlDeviceGetMemoryInfo(h).used) for h in self.handles)
        else:
            total = sum(per_proc)
        self.scopes.add(scope)
        return float(total)

    def total_bytes(self) -> int:
        return sum(int(self.nv.nvmlDeviceGetMemoryInfo(h).total) for h in self.handles)


_IMPORT_BASELINE: dict[str, Any] = {"rss_bytes": ProcessTree().rss_bytes(),
                                    "cuda_allocated_bytes": None, "kind": "import",
                                    "t": time.time()}
