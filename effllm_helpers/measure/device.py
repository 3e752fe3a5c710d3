"""Device facts and the thin adapters every measurement goes through (NVML, torch.cuda).

Why adapters: NVML and CUDA are absent on CPU machines and in CI, so each access is lazy and
returns a reason instead of raising; tests replace these few functions (or the ``pynvml``
module's functions) to exercise the GPU logic without a GPU.
"""

from __future__ import annotations

import os
import platform
import threading
from typing import Any

import torch

_NVML_LOCK = threading.Lock()
_NVML_STATE: dict[str, Any] = {}


# ---------------------------------------------------------------- NVML
def get_nvml() -> tuple[Any | None, str | None]:
    """``(pynvml, None)`` once NVML is initialised, else ``(None, reason)``; cached per process."""
    with _NVML_LOCK:
        if "module" in _NVML_STATE:
            return _NVML_STATE["module"], _NVML_STATE["reason"]
        try:
            import pynvml  # nvidia-ml-py
        except ImportError as exc:  # pragma: no cover - it is a declared dependency
            mod, reason = None, f"pynvml (nvidia-ml-py) not importable: {exc}"
        else:
            try:
                pynvml.nvmlInit()
                mod, reason = pynvml, None
            except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
                mod, reason = None, f"NVML init failed: {exc}"
        _NVML_STATE["module"], _NVML_STATE["reason"] = mod, reason
        return mod, reason


def reset_nvml_cache() -> None:
    """Forget the cached NVML state (tests install a fake NVML and call this)."""
    with _NVML_LOCK:
        _NVML_STATE.clear()


def _decode(s: Any) -> str:
    return s.decode() if isinstance(s, bytes) else str(s)


def nvml_indices(cuda_indices: list[int], env: dict[str, str] | None = None) -> list[int]:
    """NVML indices of the given CUDA (torch) device indices, honouring CUDA_VISIBLE_DEVICES.

    NVML ignores CUDA_VISIBLE_DEVICES and numbers all GPUs in PCI order. We match by UUID when
    torch knows the device's UUID (exact); otherwise we parse CUDA_VISIBLE_DEVICES, whose entries
    are integers (NVML order assumed, i.e. CUDA_DEVICE_ORDER=PCI_BUS_ID) or UUID prefixes.
    """
    nv, reason = get_nvml()
    if nv is None:
        raise RuntimeError(reason)
    count = nv.nvmlDeviceGetCount()
    uuids = [_decode(nv.nvmlDeviceGetUUID(nv.nvmlDeviceGetHandleByIndex(i))) for i in range(count)]
    out: list[int] = []
    env = dict(os.environ) if env is None else env
    cvd = env.get("CUDA_VISIBLE_DEVICES")
    entries = [e.strip() for e in cvd.split(",") if e.strip()] if cvd else None
    for ci in cuda_indices:
        tu = cuda_uuid(ci)
        if tu:
            want = tu.removeprefix("GPU-")
            match = [i for i, u in enumerate(uuids) if u.removeprefix("GPU-") == want]
            if match:
                out.append(match[0])
                continue
        if entries is None:
            idx = ci
        else:
            if ci >= len(entries):
                raise ValueError(f"CUDA device {ci} not in CUDA_VISIBLE_DEVICES={cvd!r}")
            e = entries[ci]
            if e.lstrip("-").isdigit():
                idx = int(e)
            else:
                match = [i for i, u in enumerate(uuids) if u.startswith(e) or
                         u.removeprefix("GPU-").startswith(e.removeprefix("GPU-"))]
                if len(match) != 1:
                    raise ValueError(f"CUDA_VISIBLE_DEVICES entry {e!r} matches {len(match)} "
                                     "NVML devices (MIG instances are not supported)")
                idx = match[0]
        if not 0 <= idx < count:
            raise ValueError(f"NVML index {idx} out of range (NVML sees {count} GPUs)")
        out.append(idx)
    return out


def nvml_handles(indices: list[int]) -> list[Any]:
    nv, reason = get_nvml()
    if nv is None:
        raise RuntimeError(reason)
    return [nv.nvmlDeviceGetHandleByIndex(i) for i in indices]


# ---------------------------------------------------------------- torch.cuda adapters
def cuda_available() -> bool:
    return torch.cuda.is_available()


def cuda_sync(indices: list[int]) -> None:
    for i in indices:
        torch.cuda.synchronize(i)


def cuda_event() -> Any:
    """A timing event recorded now on the current stream (resolved later, no sync here)."""
    ev = torch.cuda.Event(enable_timing=True)
    ev.record()
    return ev


def cuda_reset_peaks(indices: list[int]) -> None:
    for i in indices:
        torch.cuda.reset_peak_memory_stats(i)


def cuda_peaks(indices: list[int]) -> tuple[int, int]:
    """(max allocated, max reserved) bytes summed over the devices since the last reset."""
    alloc = sum(torch.cuda.max_memory_allocated(i) for i in indices)
    res = sum(torch.cuda.max_memory_reserved(i) for i in indices)
    return alloc, res


def cuda_allocated(indices: list[int]) -> int:
    """Bytes the torch allocator holds now, summed over the devices (tensors, not its cache)."""
    return sum(int(torch.cuda.memory_allocated(i)) for i in indices)


def cuda_uuid(index: int) -> str | None:
    try:
        if not torch.cuda.is_available():
            return None
        u = getattr(torch.cuda.get_device_properties(index), "uuid", None)
        return str(u) if u is not None else None
    except Exception:
        return None


def cuda_device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def cuda_total_memory(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).total_memory)


# ---------------------------------------------------------------- device resolution and facts
def resolve(device: str | torch.device) -> torch.device:
    """A torch.device; bare "cuda" means the current CUDA device."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        try:
            idx = torch.cuda.current_device() if cuda_available() else 0
        except Exception:
            idx = 0
        dev = torch.device("cuda", idx)
    return dev


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (Linux) or platform."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def device_facts(device: str | torch.device = "cpu", gpu_indices: list[int] | None = None
                 ) -> dict[str, Any]:
    """What a record's provenance needs about the hardware; unknown facts are None + a note."""
    import psutil

    dev = resolve(device)
    facts: dict[str, Any] = {
        "device_type": dev.type,
        "cpu_model": cpu_model(),
        "n_cpus": usable_cpus(),
        "ram_bytes": int(psutil.virtual_memory().total),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    if dev.type != "cuda":
        facts["device_name"] = facts["cpu_model"]
        facts["total_memory_bytes"] = facts["ram_bytes"]
        return facts
    idx = gpu_indices or [dev.index or 0]
    facts["cuda_indices"] = idx
    try:
        facts["device_name"] = cuda_device_name(idx[0])
        facts["total_memory_bytes"] = sum(cuda_total_memory(i) for i in idx)
    except Exception as exc:
        facts["device_name"] = None
        facts["device_note"] = f"torch.cuda: {exc}"
    nv, reason = get_nvml()
    if nv is None:
        facts["nvml_note"] = reason
        return facts
    try:
        nidx = nvml_indices(idx)
        handles = nvml_handles(nidx)
        facts["nvml_indices"] = nidx
        facts["driver_version"] = _decode(nv.nvmlSystemGetDriverVersion())
        facts["device_name"] = facts.get("device_name") or _decode(nv.nvmlDeviceGetName(handles[0]))
        limits = []
        for h in handles:
            try:
                limits.append(nv.nvmlDeviceGetEnforcedPowerLimit(h) / 1000.0)
            except Exception:
                limits.append(None)
        facts["power_limit_w"] = limits
    except Exception as exc:
        facts["nvml_note"] = f"NVML query failed: {exc}"
    return facts


def device_slug(name: str) -> str:
    """A folder-safe name, e.g. "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    out = "".join(c.lower() if c.isalnum() else "-" for c in name)
    while "--" in out:
        out = out.replace("--", "-")
    return out.strip("-") or "unknown"
