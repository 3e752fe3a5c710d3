"""Energy (AEC): NVML's total-energy counter on GPU, RAPL on CPU, integrated power as fallback.

Why the counter first: power readings are a windowed average sampled a fraction of the time
(on A100/H100 ``nvmlDeviceGetPowerUsage`` is a ~1 s average), so integrating them misses short
bursts; the energy counter (mJ since driver load) is exact over any window. Integrated sampled
power is kept as a cross-check and as the fallback where the counter is missing (pre-Volta) or
went backwards (driver reload). CPU energy comes only from RAPL when readable; no estimate ever
fills a measured field (anything estimated must be named ``estimate_*``).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from effllm_helpers.measure.sampler import integrate

NVML_COUNTER_MODULUS = 2**64  # nvmlDeviceGetTotalEnergyConsumption is an unsigned 64-bit mJ count
# The shortest GPU window whose energy we call measured: in the committed pretrain_mfu records
# the counter and integrated power agree over windows of 4 s and more and disagree far beyond
# any other error over 1-2 s (the H100 and H200 pages' energy-window rows): the power reading
# is a ~1 s average that lags the load, and the counter advances in steps. Shorter windows keep
# their value but say so (``short_window``); benchmarks lengthen theirs to this
COUNTER_MIN_WINDOW_S = 4.0
RAPL_ROOT = "/sys/class/powercap"


# ---------------------------------------------------------------- GPU: NVML counter
def counter_delta(start: int, end: int, modulus: int = NVML_COUNTER_MODULUS) -> int | None:
    """end - start for a wrapping unsigned counter; None when it went backwards (a reset).

    A decrease from the top quarter of the range to the bottom quarter is a wrap; any other
    decrease means the counter restarted and the window cannot be measured by it.
    """
    if end >= start:
        return end - start
    if start >= modulus * 3 // 4 and end < modulus // 4:
        return end + modulus - start
    return None


class NvmlEnergyCounter:
    """Reads the total-energy counter (mJ) of several NVML devices; ``available`` per device."""

    def __init__(self, nvml: Any, handles: list[Any]) -> None:
        self.nv = nvml
        self.handles = handles
        self.reasons: list[str | None] = []
        for h in handles:
            try:
                nvml.nvmlDeviceGetTotalEnergyConsumption(h)
                self.reasons.append(None)
            except Exception as exc:  # NVMLError_NotSupported on pre-Volta GPUs
                self.reasons.append(f"nvmlDeviceGetTotalEnergyConsumption: {exc}")

    @property
    def available(self) -> list[bool]:
        return [r is None for r in self.reasons]

    def read_mj(self) -> list[int | None]:
        out: list[int | None] = []
        for h, r in zip(self.handles, self.reasons, strict=True):
            if r is not None:
                out.append(None)
                continue
            try:
                out.append(int(self.nv.nvmlDeviceGetTotalEnergyConsumption(h)))
            except Exception:
                out.append(None)
        return out


class PowerProbe:
    """Callable probe: instantaneous-ish power (W) of one NVML device (for the sampler)."""

    def __init__(self, nvml: Any, handle: Any) -> None:
        self.nv = nvml
        self.handle = handle

    def __call__(self) -> float:
        return self.nv.nvmlDeviceGetPowerUsage(self.handle) / 1000.0


def gpu_window_energy(start_mj: list[int | None], end_mj: list[int | None],
                      power: list[tuple[list[float], list[float]]]
                      ) -> tuple[float | None, list[str], list[str]]:
    """Joules over a window, summed over devices: counter delta where valid, else integrated power.

    ``power[i]`` is device i's sampled (times, watts) inside the window. Returns
    (joules or None, methods used, notes).
    """
    total = 0.0
    methods: list[str] = []
    notes: list[str] = []
    for i, (a, b) in enumerate(zip(start_mj, end_mj, strict=True)):
        d = None if a is None or b is None else counter_delta(a, b)
        if d:  # a device in use always draws power: a zero delta means no tick yet
            total += d / 1000.0
            if "nvml_energy_counter" not in methods:
                methods.append("nvml_energy_counter")
            continue
        if d == 0:
            notes.append(f"device {i}: energy counter did not advance in the window (shorter "
                         "than its update period); used integrated power")
        elif a is not None and b is not None:
            notes.append(f"device {i}: energy counter went backwards ({a} -> {b} mJ); "
                         "used integrated power")
        else:
            notes.append(f"device {i}: no energy counter; used integrated power")
        ts, ws = power[i] if i < len(power) else ([], [])
        j = integrate(ts, ws)
        if j is None:
            notes.append(f"device {i}: fewer than 2 power samples")
            return None, methods, notes
        total += j
        if "nvml_power_integrated" not in methods:
            methods.append("nvml_power_integrated")
    return total, methods, notes


def short_window_note(window_s: float, min_s: float | None = None) -> dict[str, Any]:
    """Fields for a GPU energy metric measured over ``window_s``: none when the window lasts at
    least ``min_s`` (default :data:`COUNTER_MIN_WINDOW_S`), else ``short_window`` and a note
    saying how far to trust it."""
    min_s = COUNTER_MIN_WINDOW_S if min_s is None else min_s
    if window_s >= min_s:
        return {}
    return {"short_window": True, "min_window_s": min_s,
            "window_note": (f"measured over {window_s:.2f} s, under the {min_s:g} s the energy "
                            "counter needs to agree with integrated power: compare with care; "
                            "lengthen the window (more steps, measure.min_duration_s)")}


# ---------------------------------------------------------------- CPU: RAPL
class RaplCounter:
    """Package energy from Linux powercap (intel-rapl:N/energy_uj), wrap-safe and accumulating.

    The counters wrap at ``max_energy_range_uj`` (~262 kJ, minutes at full load), so a long run
    must be polled more often than it wraps: the Meter's sampler calls ``poll()`` each interval.
    Zones are chosen by their ``name`` file: the top-level ``package-*`` zones are summed
    (sub-zones such as core/dram are inside them); ``psys`` (the whole platform, which already
    contains the packages) is used alone only where no package zone exists -- adding it to the
    packages would count their energy twice. ``zone_names`` records the zones used.
    """

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(RAPL_ROOT if root is None else root)
        self.zones: list[tuple[Path, int]] = []
        self.zone_names: list[str] = []
        self.reason: str | None = None
        self._last: list[int] = []
        self._acc_uj = 0
        self._lock = threading.Lock()
        if not self.root.is_dir():
            self.reason = f"no RAPL: {self.root} does not exist on this machine"
            return
        cands = sorted(p for p in self.root.iterdir()
                       if p.name.startswith("intel-rapl:") and p.name.count(":") == 1)
        if not cands:
            self.reason = f"no RAPL package zones (intel-rapl:N) under {self.root}"
            return
        named: list[tuple[Path, str]] = []
        for z in cands:
            try:
                named.append((z, (z / "name").read_text().strip()))
            except OSError:
                continue
        chosen = [(z, nm) for z, nm in named if nm.startswith("package-")]
        if not chosen:
            chosen = [(z, nm) for z, nm in named if nm == "psys"][:1]
        if not chosen:
            found = ", ".join(f"{z.name}={nm}" for z, nm in named) or "no readable name files"
            self.reason = f"no RAPL package-* or psys zone under {self.root} ({found})"
            return
        try:
            for z, nm in chosen:
                rng = int((z / "max_energy_range_uj").read_text())
                self._last.append(int((z / "energy_uj").read_text()))
                self.zones.append((z, rng))
                self.zone_names.append(nm)
        except (OSError, ValueError) as exc:
            self.zones, self._last, self.zone_names = [], [], []
            self.reason = f"RAPL not readable ({exc}); energy_uj is often root-only"

    @property
    def available(self) -> bool:
        return self.reason is None

    def poll(self) -> float | None:
        """Cumulative joules since construction (None if RAPL is unavailable)."""
        if not self.available:
            return None
        with self._lock:
            for i, (z, rng) in enumerate(self.zones):
                now = int((z / "energy_uj").read_text())
                last = self._last[i]
                self._acc_uj += now - last if now >= last else now + rng - last
                self._last[i] = now
            return self._acc_uj / 1e6
