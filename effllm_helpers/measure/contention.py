"""Contention: how busy the machine was while a run was measured, and how many threads it used.

Why: latency, throughput and MFU on a shared CPU depend on what else runs. A record that says the
1-min load exceeded the cores, or that the machine was busier than the run itself, tells a
reader the numbers are contended. (The sweep side, C // N threads for each of N runs on C cores,
is in ``sweep/locking.py`` and ``run.py``, which must not import torch.)
"""

from __future__ import annotations

import os
import time

from effllm_helpers.runenv import THREADS_ENV  # noqa: F401 - the Meter records it beside the count


def machine_cores() -> int:
    """Logical CPUs of the whole machine: the load average counts runnable tasks machine-wide."""
    return os.cpu_count() or 1


def load_1m() -> float | None:
    """The 1-minute load average (runnable + uninterruptible tasks), None where not available."""
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):  # pragma: no cover - non-Unix
        return None


def cpu_times() -> tuple[float, float] | None:
    """(busy, total) CPU seconds of the whole machine so far (idle and iowait count as not busy)."""
    try:
        import psutil

        t = psutil.cpu_times()
    except Exception:  # pragma: no cover - psutil is a dependency; /proc unreadable
        return None
    total = float(sum(t))
    idle = float(t.idle) + float(getattr(t, "iowait", 0.0))
    return total - idle, total


def busy_fraction(t0: tuple[float, float] | None, t1: tuple[float, float] | None
                  ) -> float | None:
    """Machine-wide busy share between two :func:`cpu_times` readings (None: no delta)."""
    if t0 is None or t1 is None or t1[1] <= t0[1]:
        return None
    return min(1.0, max(0.0, (t1[0] - t0[0]) / (t1[1] - t0[1])))


def free_cores(window_s: float = 0.25) -> int | None:
    """Cores no other process is using now: the machine's cores less those busy over a short
    window while this process sleeps (a core counts from 0.75 of it busy, so background noise
    does not take one). None where the machine's CPU times cannot be read."""
    t0 = cpu_times()
    time.sleep(window_s)
    busy = busy_fraction(t0, cpu_times())
    if busy is None:
        return None
    cores = machine_cores()
    return max(1, cores - int(busy * cores + 0.25))


def busy_message(loads: list[float | None], cores: int) -> str | None:
    """The warning text when any 1-min load reading exceeds the cores, else None."""
    seen = [x for x in loads if x is not None]
    if not seen or max(seen) <= cores:
        return None
    return (f"machine busy: 1-min load average {max(seen):.2f} > {cores} cores during the "
            "measured window; latency, throughput, MFU and energy are contended")
