"""A background sampler: probes read every ``interval_s`` by one daemon thread.

Why a thread that waits on an Event: the training loop must not pay for sampling (no per-step
work), and stopping must be immediate (``Event.set`` wakes the wait) so the thread is dead when
the ``with`` block ends, even when the body raised.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

Probe = Callable[[], float | None]


class Sampler:
    """Reads each probe every ``interval_s`` seconds into time-stamped series.

    A probe returns a float (or None when it has nothing); an exception is recorded once in
    ``errors`` and the sample is None. ``sample_now()`` takes an extra sample from the caller's
    thread (used at the start and stop marks so every window has samples at both ends).
    """

    def __init__(self, probes: Mapping[str, Probe], interval_s: float = 0.1,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be > 0")
        self.probes = dict(probes)
        self.interval_s = float(interval_s)
        self.clock = clock
        self.times: list[float] = []
        self.series: dict[str, list[float | None]] = {k: [] for k in self.probes}
        self.errors: dict[str, str] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -------------------------------------------------------------- lifecycle
    def start(self) -> Sampler:
        if self._thread is not None:
            raise RuntimeError("sampler already started")
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="effllm-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Wake and join the thread; raises if it does not die (it must never outlive a Meter)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():  # pragma: no cover - a probe hung
                raise RuntimeError(f"sampler thread did not stop within {timeout} s")

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    def __enter__(self) -> Sampler:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample_now()

    # -------------------------------------------------------------- sampling
    def sample_now(self) -> float:
        vals: dict[str, float | None] = {}
        for name, probe in self.probes.items():
            try:
                v = probe()
                vals[name] = None if v is None else float(v)
            except Exception as exc:
                vals[name] = None
                self.errors.setdefault(name, f"{type(exc).__name__}: {exc}")
        t = self.clock()
        with self._lock:
            self.times.append(t)
            for name, v in vals.items():
                self.series[name].append(v)
        return t

    def window(self, name: str, t0: float = float("-inf"), t1: float = float("inf")
               ) -> tuple[list[float], list[float]]:
        """(times, values) of ``name`` with t0 <= t <= t1, None values dropped (a snapshot)."""
        with self._lock:
            ts = list(self.times)
            vs = list(self.series[name])
        pairs = [(t, v) for t, v in zip(ts, vs, strict=False) if t0 <= t <= t1 and v is not None]
        return [p[0] for p in pairs], [p[1] for p in pairs]


# ---------------------------------------------------------------- aggregation
def integrate(times: list[float], values: list[float]) -> float | None:
    """Trapezoid integral of a sampled series (e.g. W over s -> J); None with < 2 samples."""
    if len(times) < 2:
        return None
    total = 0.0
    for i in range(1, len(times)):
        total += 0.5 * (values[i] + values[i - 1]) * (times[i] - times[i - 1])
    return total


def time_average(times: list[float], values: list[float]) -> float | None:
    """Time-weighted mean of a sampled series (the paper's (1/T)∫x dt); one sample -> itself."""
    if not values:
        return None
    if len(values) == 1 or times[-1] <= times[0]:
        return sum(values) / len(values)
    area = integrate(times, values)
    assert area is not None
    return area / (times[-1] - times[0])
