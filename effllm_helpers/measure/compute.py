"""Compute utilisation: the paper's PCU (time-averaged utilisation) and MFU against a peak.

Why both: the paper's PCU is NVML's "GPU busy" percentage, which reads ~100 % for any kernel
that keeps one SM busy; MFU (analytic model FLOP/s over the device's peak) is what a reviewer
means by compute utilisation. Peaks come from vendor datasheets (dense, no 2:4 sparsity); for a
device or dtype not in the table (and every CPU) we measure large matmuls instead and say so
(method ``calibrated_matmul``) -- a measured peak is attainable, a datasheet peak is not, so
MFU against it reads higher. A CPU peak is measured once per machine (several sizes, a few
seconds, the max) and kept on disk, so runs on other days share one denominator; MFU never
exceeds 1 (see :func:`mfu_metric`).

The load a CPU calibration ran under is recorded with it: on a busy machine (other processes
took the cores, or ours did not get them) the peak is too low, so it is used for that process
only, flagged, and not kept; ``effllm calibrate`` re-measures on purpose. A CPU has one
reference peak, the fp32 matmul peak, for every precision (method
``calibrated_matmul_fp32_reference``): a per-dtype peak made MFU incomparable across
precisions (fp16 matmuls run ~30x slower than fp32 on a CPU, so fp16 decode read 24x fp32's
MFU while decoding slower). A GPU keeps the datasheet peak of the dtype it computes in.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from effllm_helpers import catalog, results
from effllm_helpers.measure import contention as cont
from effllm_helpers.measure import device as dev
from effllm_helpers.results import metric, missing

# Dense peak TFLOP/s by device and compute dtype, from NVIDIA datasheets/whitepapers
# (the "with sparsity" figures halved). fp32 = CUDA-core FP32 (torch's default "highest"
# float32 matmul precision); tf32 = tensor cores when allow_tf32 / precision "high".
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100 SXM": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4, "fp8": 1978.9,
                 "int8": 1978.9},
    "H100 PCIe": {"fp32": 51.2, "tf32": 378.0, "bf16": 756.0, "fp16": 756.0, "fp8": 1513.0,
                  "int8": 1513.0},
    "H100 NVL": {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5, "fp16": 835.5, "fp8": 1670.5},
    "H200": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4, "fp8": 1978.9,
             "int8": 1978.9},
    "H200 NVL": {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5, "fp16": 835.5, "fp8": 1670.5},
    "GH200": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4, "fp8": 1978.9},
    "A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0, "int8": 624.0},
    "L40S": {"fp32": 91.6, "tf32": 183.0, "bf16": 362.05, "fp16": 362.05, "fp8": 733.0},
    "L4": {"fp32": 30.3, "tf32": 60.0, "bf16": 121.0, "fp16": 121.0, "fp8": 242.5},
    "A10": {"fp32": 31.2, "tf32": 62.5, "bf16": 125.0, "fp16": 125.0},
    "RTX 4090": {"fp32": 82.6, "tf32": 82.6, "bf16": 165.2, "fp16": 165.2},  # fp32 accumulate
    "V100 SXM2": {"fp32": 15.7, "fp16": 125.0},
    "V100 PCIe": {"fp32": 14.0, "fp16": 112.0},
}

# Most specific first: device names as NVML / torch print them ("NVIDIA H100 80GB HBM3").
_NAME_PATTERNS: list[tuple[str, str]] = [
    (r"GH200", "GH200"),
    (r"H200\s*NVL", "H200 NVL"),
    (r"H200", "H200"),
    (r"H100\s*PCIE", "H100 PCIe"),
    (r"H100\s*NVL", "H100 NVL"),
    (r"H100", "H100 SXM"),
    (r"A100", "A100"),
    (r"L40S", "L40S"),
    (r"\bL4\b", "L4"),
    (r"\bA10\b", "A10"),
    (r"RTX\s*4090", "RTX 4090"),
    (r"V100[-\s]*SXM", "V100 SXM2"),
    (r"V100[-\s]*PCIE", "V100 PCIe"),
]

DTYPE_ALIASES = {
    "float32": "fp32", "float": "fp32", "fp32": "fp32", "tf32": "tf32",
    "bfloat16": "bf16", "bf16": "bf16", "float16": "fp16", "half": "fp16", "fp16": "fp16",
    "fp8": "fp8", "float8": "fp8", "int8": "int8",
}
# the catalog's dtypes, and tf32 (fp32 tensors, TF32 matmuls)
_TORCH_DTYPES = {**{k: catalog.torch_dtype(k) for k in catalog.DTYPES}, "tf32": torch.float32}


def canonical_dtype(dtype: str | torch.dtype) -> str:
    """Our dtype key ("bf16", "fp32", ...) for a name or torch dtype (the *compute* dtype)."""
    name = str(dtype).removeprefix("torch.").lower()
    if name not in DTYPE_ALIASES:
        raise ValueError(f"unknown compute dtype {dtype!r}; known: {sorted(set(DTYPE_ALIASES))}")
    return DTYPE_ALIASES[name]


def table_key(device_name: str) -> str | None:
    """The PEAK_TFLOPS row for a device name, or None if we have no datasheet figure."""
    up = device_name.upper()
    for pat, key in _NAME_PATTERNS:
        if re.search(pat, up):
            return key
    return None


def table_peak_flops(device_name: str, dtype: str) -> float | None:
    """Datasheet dense peak in FLOP/s for one device, or None if unknown."""
    key = table_key(device_name)
    if key is None:
        return None
    tf = PEAK_TFLOPS.get(key, {}).get(canonical_dtype(dtype))
    return None if tf is None else tf * 1e12


# ---------------------------------------------------------------- calibration
# CUDA: one large matmul, cached per process (a GPU's peak is stable and quick to re-measure).
# CPU: the best of several sizes over a few seconds, cached on disk per machine, because a
# short single-size timing on a CPU swings with contention and cache state (9.6-98.8 GFLOP/s
# seen for one machine), and MFU against a low peak exceeds 1.
_CALIB_CACHE: dict[tuple[Any, ...], float] = {}
_CALIB_INFO: dict[tuple[Any, ...], dict[str, Any]] = {}  # the CPU entry behind each cached peak
_CALIB_LOCK = threading.Lock()

CPU_CALIB_SIZES: tuple[int, ...] = (256, 512, 1024, 2048)  # model-sized GEMMs, not toy ones
CPU_CALIB_BUDGET_S = 4.0
CALIB_DIR_ENV = "EFFLLM_CALIB_DIR"  # where the per-machine CPU peak file lives
CALIB_BUDGET_ENV = "EFFLLM_CALIB_BUDGET_S"  # total seconds for one CPU calibration
CALIB_FILE = "cpu_peak_flops.json"
# a calibration is busy (not kept) when, over its window, other processes used more than this
# share of the machine's CPU time, or our process got less than this share of its threads' time
CALIB_MAX_OTHER_BUSY = 0.25
CALIB_MIN_OWN_SHARE = 0.8
CALIB_MIN_WINDOW_S = 0.5  # a shorter window (a test's budget) is too short to judge the load
# the one peak every precision is held against on a CPU (see the module docstring)
CPU_REFERENCE_DTYPE = "fp32"
CPU_REFERENCE_METHOD = "calibrated_matmul_fp32_reference"


def calib_dir() -> Path:
    """``$EFFLLM_CALIB_DIR`` or ``~/.cache/effllm``: per machine, not per checkout."""
    raw = os.environ.get(CALIB_DIR_ENV)
    return Path(raw) if raw else Path.home() / ".cache" / "effllm"


def cpu_calib_key(dtype: str, sizes: tuple[int, ...], threads: int | None = None) -> str:
    """Disk-cache key: what a CPU peak depends on (cpu model, dtype, torch threads, torch)."""
    threads = torch.get_num_threads() if threads is None else threads
    return (f"{dev.cpu_model()}|{canonical_dtype(dtype)}|threads={threads}|"
            f"torch={torch.__version__}|sizes={','.join(map(str, sizes))}")


def _calib_budget(budget_s: float | None) -> float:
    if budget_s is not None:
        return float(budget_s)
    raw = os.environ.get(CALIB_BUDGET_ENV)
    return float(raw) if raw else CPU_CALIB_BUDGET_S


def _read_calib_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _update_calib_file(key: str, entry: dict[str, Any], path: Path | None = None,
                       replace: bool = False) -> None:
    """Merge ``entry`` under ``key``, keeping the higher peak (another process may have written
    one meanwhile) unless ``replace`` (a re-calibration on purpose); a lock file serialises
    writers, a rename keeps readers whole."""
    path = path or calib_dir() / CALIB_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)
        except (ImportError, OSError):  # pragma: no cover - non-POSIX: last writer wins
            pass
        data = _read_calib_file(path)
        old = data.get(key)
        if not replace and isinstance(old, dict) \
                and float(old.get("flops", 0)) >= float(entry["flops"]):
            return
        data[key] = entry
        results.atomic_write_json(path, data)


def _time_cpu_matmuls(tdt: torch.dtype, sizes: tuple[int, ...], budget_s: float
                      ) -> dict[int, float | None]:
    """Best FLOP/s per size, the budget split evenly; a size whose one matmul would overrun
    the budget (estimated from the best rate so far) is skipped (None)."""
    rates: dict[int, float | None] = {}
    per_size = budget_s / len(sizes)
    t_stop = time.perf_counter() + budget_s
    best_rate = 0.0
    for i, n in enumerate(sorted(sizes)):
        flop = 2.0 * n**3
        if i and best_rate and time.perf_counter() + 2 * flop / best_rate > t_stop:
            rates[n] = None
            continue
        a = torch.randn(n, n, dtype=tdt)
        b = torch.randn(n, n, dtype=tdt)
        a @ b  # warm-up (thread pool, packing)
        best_dt = float("inf")
        t_end = time.perf_counter() + per_size
        reps = 0
        while reps < 2 or time.perf_counter() < t_end:
            t0 = time.perf_counter()
            a @ b
            best_dt = min(best_dt, time.perf_counter() - t0)
            reps += 1
            if reps > 10_000 or (reps >= 1 and time.perf_counter() > t_stop):
                break
        rates[n] = flop / best_dt
        best_rate = max(best_rate, rates[n] or 0.0)
    return rates


def _load_snapshot() -> dict[str, Any]:
    """What the load judgement of a calibration window needs at one instant."""
    return {"t": time.perf_counter(), "own_cpu_s": process_cpu_seconds(),
            "machine": cont.cpu_times(), "load_1m": cont.load_1m()}


def judge_load(start: dict[str, Any], stop: dict[str, Any], threads: int,
               cores: int | None = None) -> dict[str, Any]:
    """The load a calibration window ran under, and ``busy`` (why its peak is too low) or None.

    ``own_share``: our CPU seconds over wall x torch threads (below
    :data:`CALIB_MIN_OWN_SHARE` our threads waited for cores); ``other_busy``: the machine's
    busy CPU seconds not ours over wall x cores (above :data:`CALIB_MAX_OTHER_BUSY` another
    process competed). A window shorter than :data:`CALIB_MIN_WINDOW_S` is not judged."""
    cores = cores or cont.machine_cores()
    wall = stop["t"] - start["t"]
    own = stop["own_cpu_s"] - start["own_cpu_s"]
    out: dict[str, Any] = {"window_s": wall, "load_1m_start": start.get("load_1m"),
                           "load_1m_stop": stop.get("load_1m"), "machine_cores": cores,
                           "own_share": None, "other_busy": None, "busy": None}
    if wall < CALIB_MIN_WINDOW_S:
        out["judged"] = f"not judged: a {wall:.2f} s window is too short"
        return out
    out["own_share"] = own / (wall * max(1, threads))
    m0, m1 = start.get("machine"), stop.get("machine")
    if m0 is not None and m1 is not None and m1[1] > m0[1]:
        # machine CPU seconds are summed over cores: busy seconds not ours over wall x cores
        out["other_busy"] = max(0.0, (m1[0] - m0[0]) * wall / (m1[1] - m0[1]) * cores - own
                                ) / (wall * cores)
    why = []
    if out["own_share"] < CALIB_MIN_OWN_SHARE:
        why.append(f"our {threads} thread(s) got {out['own_share']:.0%} of their time "
                   f"(< {CALIB_MIN_OWN_SHARE:.0%})")
    if out["other_busy"] is not None and out["other_busy"] > CALIB_MAX_OTHER_BUSY:
        why.append(f"other processes used {out['other_busy']:.0%} of the machine's CPU "
                   f"(> {CALIB_MAX_OTHER_BUSY:.0%})")
    if why:
        out["busy"] = "calibrated on a busy machine: " + "; ".join(why)
    return out


def cpu_calibration(dtype: str = "fp32", sizes: tuple[int, ...] | None = None,
                    budget_s: float | None = None, *, force: bool = False) -> dict[str, Any]:
    """This machine's CPU matmul peak: the max FLOP/s over ``sizes`` at torch's current thread
    count, read from the per-machine file when there, else measured (``budget_s`` seconds in
    all; ``$EFFLLM_CALIB_BUDGET_S``) with the load it ran under (:func:`judge_load`), and saved
    unless the machine was busy (``busy`` says why; the peak then holds for this process only).
    ``force`` re-measures and replaces the file's entry even when lower (``effllm calibrate``).
    Returns the entry (``flops``, ``by_size``, ``threads``, ``load``, ``busy``, ``source``:
    "file" | "measured")."""
    key_dtype = canonical_dtype(dtype)
    tdt = _TORCH_DTYPES.get(key_dtype)
    if tdt is None:
        raise ValueError(f"cannot calibrate a matmul in {key_dtype}")
    sizes = tuple(sizes or CPU_CALIB_SIZES)
    key = cpu_calib_key(key_dtype, sizes)
    path = calib_dir() / CALIB_FILE
    entry = _read_calib_file(path).get(key)
    if not force and isinstance(entry, dict) and float(entry.get("flops") or 0) > 0:
        return {**entry, "source": "file", "file": str(path), "key": key}
    budget = _calib_budget(budget_s)
    threads = torch.get_num_threads()
    start = _load_snapshot()
    rates = _time_cpu_matmuls(tdt, sizes, budget)
    load = judge_load(start, _load_snapshot(), threads)
    entry = {"flops": max(r for r in rates.values() if r), "by_size": {str(k): v for k, v in
                                                                       rates.items()},
             "threads": threads, "budget_s": budget, "load_1m": load["load_1m_start"],
             "load": load, "busy": load["busy"], "measured_at": results.now_iso()}
    if load["busy"]:
        entry["not_saved"] = "a peak measured on a busy machine is not kept"
    else:
        try:
            _update_calib_file(key, entry, path, replace=force)
        except OSError as exc:  # read-only home: the peak still holds for this process
            entry["cache_error"] = f"{type(exc).__name__}: {exc}"
    return {**entry, "source": "measured", "file": str(path), "key": key}


def raise_cpu_peak(dtype: str, achieved: float, sizes: tuple[int, ...] | None = None) -> None:
    """Record that this machine ran faster than its calibrated peak: the peak is a max over
    every rate seen, so the file (and this process' cache) take the achieved rate."""
    sizes = tuple(sizes or CPU_CALIB_SIZES)
    key = cpu_calib_key(dtype, sizes)
    entry = {"flops": achieved, "threads": torch.get_num_threads(), "raised_by_run": True,
             "load_1m": _load_1m(), "measured_at": results.now_iso()}
    with _CALIB_LOCK:
        pkey = ("cpu", canonical_dtype(dtype), sizes, torch.get_num_threads())
        _CALIB_CACHE[pkey] = achieved
        _CALIB_INFO[pkey] = entry
    try:
        _update_calib_file(key, entry)
    except OSError:
        pass


def _load_1m() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # pragma: no cover - non-Unix
        return None


def calibrate_matmul(device: str | torch.device = "cpu", dtype: str = "fp32", n: int | None = None,
                     budget_s: float | None = None) -> float:
    """Best FLOP/s of square matmuls on ``device``.

    CPU: the max over ``CPU_CALIB_SIZES`` (or the one size ``n``), cached on disk per machine
    (see :func:`cpu_calibration`) and per process. GPU: n=8192 timed with CUDA events, cached
    per process. Only ``cpu`` and ``cuda`` devices can be calibrated (ValueError otherwise).
    """
    d = dev.resolve(device)
    if d.type not in ("cpu", "cuda"):
        raise ValueError(f"cannot calibrate a matmul on device {str(d)!r}: only cpu and cuda")
    key_dtype = canonical_dtype(dtype)
    if d.type == "cpu":
        sizes = (n,) if n else CPU_CALIB_SIZES
        pkey: tuple[Any, ...] = ("cpu", key_dtype, sizes, torch.get_num_threads())
        with _CALIB_LOCK:
            if pkey in _CALIB_CACHE:
                return _CALIB_CACHE[pkey]
        entry = cpu_calibration(key_dtype, sizes, budget_s)
        best = float(entry["flops"])
        with _CALIB_LOCK:
            _CALIB_CACHE[pkey] = best
            _CALIB_INFO[pkey] = entry
        return best
    n = n or 8192
    key = (str(d), key_dtype, n)
    with _CALIB_LOCK:
        if key in _CALIB_CACHE:
            return _CALIB_CACHE[key]
    tdt = _TORCH_DTYPES.get(key_dtype)
    if tdt is None:
        raise ValueError(f"cannot calibrate a matmul in {key_dtype}")
    a = torch.randn(n, n, device=d, dtype=tdt)
    b = torch.randn(n, n, device=d, dtype=tdt)
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = key_dtype == "tf32"
    try:
        for _ in range(3):
            a @ b
        torch.cuda.synchronize(d)
        reps = 10
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(reps):
            a @ b
        e.record()
        torch.cuda.synchronize(d)
        best = 2.0 * n**3 * reps / (s.elapsed_time(e) / 1000.0)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    with _CALIB_LOCK:
        _CALIB_CACHE[key] = best
    return best


def tf32_matmul_enabled() -> bool:
    """Whether torch runs float32 CUDA matmuls on TF32 tensor cores (allow_tf32 / precision)."""
    return bool(torch.backends.cuda.matmul.allow_tf32
                or torch.get_float32_matmul_precision() != "highest")


def peak_flops(device: str | torch.device, dtype: str, n_devices: int = 1
               ) -> tuple[float, str, dict[str, Any]]:
    """(peak FLOP/s over ``n_devices`` identical devices, method, notes).

    Method ``peak_table`` when the datasheet knows the device and dtype, else
    ``calibrated_matmul`` (a measured large matmul on this machine). An fp32 workload on CUDA
    with TF32 matmuls enabled runs on tensor cores, so it is held against the ``tf32`` peak
    (``notes["peak_dtype"]`` says which row was used).
    """
    d = dev.resolve(device)
    notes: dict[str, Any] = {}
    peak_dtype = canonical_dtype(dtype)
    if d.type == "cuda" and peak_dtype == "fp32" and tf32_matmul_enabled():
        peak_dtype = "tf32"
        notes["peak_dtype"] = "tf32"
        notes["tf32_note"] = ("fp32 compute with TF32 matmuls enabled (allow_tf32 or "
                              "float32_matmul_precision != 'highest'): tf32 peak used")
    if d.type == "cuda":
        name = dev.cuda_device_name(d.index or 0)
        notes["device_name"] = name
        row = PEAK_TFLOPS.get(table_key(name) or "", {})
        if peak_dtype == "tf32" and row and "tf32" not in row:  # pre-Ampere: no TF32 cores
            peak_dtype = "fp32"
            notes["peak_dtype"] = "fp32"
            notes["tf32_note"] = f"TF32 enabled but {name!r} has no TF32 tensor cores: fp32 peak"
        per = table_peak_flops(name, peak_dtype)
        if per is not None:
            notes["table_row"] = table_key(name)
            return per * n_devices, "peak_table", notes
        notes["table_miss"] = f"no datasheet peak for {name!r} in {peak_dtype}"
    else:
        return cpu_peak_flops(peak_dtype, n_devices)
    per = calibrate_matmul(d, peak_dtype)
    return per * n_devices, "calibrated_matmul", notes


def cpu_peak_flops(dtype: str, n_devices: int = 1) -> tuple[float, str, dict[str, Any]]:
    """The CPU's one reference peak (fp32 matmuls) whatever ``dtype`` computes, with the
    calibration's load, and a ``flag`` when it was measured on a busy machine or its load was
    never recorded (see the module docstring)."""
    threads = torch.get_num_threads()
    per = calibrate_matmul("cpu", CPU_REFERENCE_DTYPE)
    notes: dict[str, Any] = {
        "device_name": dev.cpu_model(), "torch_threads": threads,
        "compute_dtype": canonical_dtype(dtype), "peak_dtype": CPU_REFERENCE_DTYPE,
        "peak_note": (f"one reference peak per CPU for every precision: max {CPU_REFERENCE_DTYPE}"
                      f" matmul FLOP/s over n={list(CPU_CALIB_SIZES)} at {threads} torch "
                      f"threads, cached per machine in {calib_dir() / CALIB_FILE}; a run "
                      "faster than it raises it")}
    with _CALIB_LOCK:
        entry = _CALIB_INFO.get(("cpu", CPU_REFERENCE_DTYPE, CPU_CALIB_SIZES, threads), {})
    if entry.get("raised_by_run"):
        pass  # a rate a run reached: the load of a calibration does not apply
    elif entry.get("busy"):
        notes["calibration_load"] = entry.get("load")
        notes["flag"] = (f"{entry['busy']}: the peak is low and MFU high; run `effllm "
                         "calibrate` on an idle machine")
    elif entry and "load" not in entry:
        notes["flag"] = ("the load this peak was calibrated under was not recorded (an older "
                         "entry): `effllm calibrate --force` re-measures it")
    elif entry:
        notes["calibration_load"] = entry["load"]
    return per * n_devices, CPU_REFERENCE_METHOD, notes


def mfu_metric(flops_per_token: float | None, tokens: float, duration_s: float | None,
               peak: float | None, peak_method: str,
               on_exceed: Callable[[float], None] | None = None, **notes: Any) -> dict[str, Any]:
    """MFU = flops_per_token · tokens / duration / peak (a fraction), never above 1.

    A rate above the peak means the peak is wrong. A *calibrated* peak is a max over measured
    rates, so with ``on_exceed`` the achieved rate becomes the peak for later runs
    (``peak_raised``) and this run's MFU is null with the reason (against its own rate it would
    be a tautological 1); any other peak (datasheet, user) gives null with the reason.
    ``achieved_flops`` is kept either way, to compare runs on FLOP/s.
    """
    method = f"analytic_flops/{peak_method}"
    if flops_per_token is None:
        return missing("fraction", "no flops_per_token given (analytic FLOPs unknown)", method)
    if not tokens:
        return missing("fraction", "no tokens counted in the measured phase", method)
    if not duration_s or duration_s <= 0:
        return missing("fraction", "no measured duration", method)
    if not peak:
        return missing("fraction", "no peak FLOP/s available", method)
    achieved = flops_per_token * tokens / duration_s
    if achieved > peak:
        if on_exceed is not None and peak_method.startswith("calibrated_matmul"):
            on_exceed(achieved)  # later runs are held against this rate
            out = missing("fraction", f"achieved {achieved:.4g} FLOP/s beat the calibrated peak "
                          f"{peak:.4g} FLOP/s: the peak was raised to it for later runs; this "
                          "run's MFU against its own rate (1) would say nothing", method)
            out.update(achieved_flops=achieved, calibrated_peak_flops=peak, peak_raised=True)
            return out
        out = missing("fraction", f"achieved {achieved:.4g} FLOP/s exceeds the {peak_method} "
                      f"peak {peak:.4g} FLOP/s (MFU would be {achieved / peak:.2f}): the "
                      "analytic FLOPs or the peak is wrong", method)
        out.update(achieved_flops=achieved, peak_flops=peak)
        return out
    return metric(achieved / peak, "fraction", method, achieved_flops=achieved, peak_flops=peak,
                  **notes)


# ---------------------------------------------------------------- PCU probes
class GpuUtilProbe:
    """Callable probe: NVML "GPU busy" percent averaged over the given devices."""

    def __init__(self, nvml: Any, handles: list[Any]) -> None:
        self.nv = nvml
        self.handles = handles

    def __call__(self) -> float:
        vals = [float(self.nv.nvmlDeviceGetUtilizationRates(h).gpu) for h in self.handles]
        return sum(vals) / len(vals)


def process_cpu_seconds(tree: Any = None, refresh: bool = True) -> float:
    """CPU seconds (user+system) used so far by this process tree: itself, its reaped children
    and its live descendants (``tree``: a memory.ProcessTree; None = this process alone). A delta
    of this over wall time is the exact time integral of CPU utilisation, which a sampled
    cpu_percent only approximates.
    """
    import os

    t = os.times()
    total = t.user + t.system + t.children_user + t.children_system
    if tree is not None:
        total += tree.children_cpu_seconds(refresh=refresh)
    return total
