"""The one measuring API every axis uses: ``with Meter(...) as m: ... m.step(tokens=...)``.

Why this shape: the six metrics must be measured the same way in pretraining, fine-tuning and
inference, after warm-up, between synchronised start/stop marks, at a cost the workload does not
notice. Per step the Meter only appends a float (CPU) or records a CUDA event (GPU, resolved at
the end, no sync); memory, utilisation and power are read by a background sampler thread; energy
comes from counters read only at the marks.

Usage::

    with Meter("cuda", n_params=N, flops_per_token=F, dtype="bf16", warmup_steps=2) as m:
        for batch in loader:
            loss = train_step(batch)
            m.step(tokens=batch.numel(), samples=len(batch))
            log(loss, joules=m.energy_j_so_far())
    record["metrics"].update(m.metrics())

Semantics: the first ``warmup_steps`` calls to ``step()`` end the warm-up; the measured phase
starts right after the ``warmup_steps``-th call (or at ``__enter__`` when it is 0) and ends at
``__exit__``. Iteration i's latency is the time between consecutive step marks (on GPU, CUDA
events on the current stream of the current device, resolved after the stop mark's sync). Tokens and
samples are those of the measured steps, summed over all devices the run uses.

``pause()`` / ``resume()`` (or ``with m.paused():``) leave work inside the window out of every
metric, e.g. an evaluation between training steps: its wall time, CPU time, energy and sampled
memory/utilisation are subtracted, and its interval is not an AL step. (Intermediate
evaluations were 8.6-12.2 % of the H200 attention runs' windows, lowering their rates and MFU
and moving PCU, memory and AEC.)
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from effllm_helpers import catalog
from effllm_helpers.measure import compute as comp
from effllm_helpers.measure import contention as cont
from effllm_helpers.measure import device as dev
from effllm_helpers.measure import energy as en
from effllm_helpers.measure import memory as mem
from effllm_helpers.measure.latency import latency_metric
from effllm_helpers.measure.sampler import Sampler, time_average
from effllm_helpers.results import metric, missing

GB = 1e9  # decimal GB, as the paper's tables

METRIC_KEYS = ("amu_gb", "amu_frac", "peak_gb", "amu_increment_gb", "peak_increment_gb", "pcu",
               "mfu", "al_s", "tt", "st", "it", "tokens_per_s", "samples_per_s", "aec_w",
               "energy_j", "j_per_token", "duration_s", "load_1m", "cpu_share",
               "machine_cpu_busy", "torch_threads")
GPU_KEYS = ("torch_max_allocated_gb", "torch_max_reserved_gb")
# the unit of each metric the Meter writes, as the catalog names it (one home for units)
UNITS = {k: catalog.METRICS[k].unit for k in (*METRIC_KEYS, *GPU_KEYS)}


class Meter:
    """Measures the six metrics over the body of a ``with`` block (see the module docstring).

    ``n_params`` (alias ``params``): parameter count for TT/ST (per the paper: total params).
    ``flops_per_token``: analytic model FLOPs per counted token (training: ~6N + attention).
    ``dtype``: compute dtype for the peak (fp32, tf32, bf16, fp16, fp8, int8).
    ``gpu_indices``: CUDA (torch) indices the run uses; default the device's own index.
    ``peak_flops``: override the peak FLOP/s (method ``user_peak``), e.g. a measured one.
    """

    def __init__(self, device: str | torch.device = "cpu", n_params: int | None = None,
                 flops_per_token: float | None = None, dtype: str = "fp32",
                 warmup_steps: int = 0, sample_interval_s: float = 0.1,
                 gpu_indices: list[int] | None = None, *, params: int | None = None,
                 peak_flops: float | None = None) -> None:
        if params is not None and n_params is not None and params != n_params:
            raise ValueError("give n_params or params, not both")
        self.device = dev.resolve(device)
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"Meter({device!r}): only 'cpu' and 'cuda' devices are measured; "
                             f"{self.device.type} has no probes here")
        self.is_gpu = self.device.type == "cuda"
        if self.is_gpu and not dev.cuda_available():
            raise RuntimeError(f"Meter({device!r}): CUDA is not available on this machine")
        self.n_params = n_params if n_params is not None else params
        self.flops_per_token = flops_per_token
        self.dtype = comp.canonical_dtype(dtype)
        self.warmup_steps = int(warmup_steps)
        self.sample_interval_s = float(sample_interval_s)
        self.cuda_indices = list(gpu_indices) if gpu_indices else (
            [self.device.index or 0] if self.is_gpu else [])
        self.peak_override = peak_flops
        self.notes: dict[str, str] = {}
        self.sampler: Sampler | None = None
        self.error: str | None = None
        self._reset_counters()

    def _reset_counters(self) -> None:
        self._active = False
        self._measuring = False
        self._done = False
        self._n_calls = 0
        self._tokens = 0
        self._flop_tokens = 0
        self._samples = 0
        self._generated: int | None = None
        self._marks: list[Any] = []  # perf_counter floats (CPU) or CUDA events (GPU)
        self._pause: dict[str, Any] | None = None  # the pause in progress
        self._pauses: list[dict[str, Any]] = []  # ended pauses: their clocks at both ends
        self._pause_intervals: set[int] = set()  # indices of mark intervals that were pauses
        self._t_enter = self._t0 = self._t1 = self._ts0 = self._ts1 = 0.0
        self._nvml: Any = None
        self._counter: en.NvmlEnergyCounter | None = None
        self._rapl: en.RaplCounter | None = None
        self._mem_probe: mem.GpuMemoryProbe | None = None
        self._total_mem: int | None = None
        self._e_enter: Any = None
        self._e0: Any = None
        self._e1: Any = None
        self._cpu0 = self._cpu1 = 0.0
        self._load0: float | None = None
        self._load1: float | None = None
        self._mach0: tuple[float, float] | None = None
        self._mach1: tuple[float, float] | None = None
        self._threads = 0
        self._busy: str | None = None
        self._baseline = mem.baseline()
        self._torch_peaks: tuple[int, int] | None = None
        self._tree = mem.ProcessTree()

    # ------------------------------------------------------------------ setup
    def _setup_gpu(self) -> dict[str, Any]:
        probes: dict[str, Any] = {}
        try:
            self._total_mem = sum(dev.cuda_total_memory(i) for i in self.cuda_indices)
        except Exception as exc:
            self.notes["total_memory"] = f"torch.cuda total memory: {exc}"
        nv, reason = dev.get_nvml()
        if nv is None:
            self.notes["nvml"] = str(reason)
            return probes
        try:
            nidx = dev.nvml_indices(self.cuda_indices)
            handles = dev.nvml_handles(nidx)
        except Exception as exc:
            self.notes["nvml"] = f"cannot map CUDA devices to NVML: {exc}"
            return probes
        self._nvml = nv
        self.nvml_indices = nidx
        self._mem_probe = mem.GpuMemoryProbe(nv, handles, self._tree)
        try:
            self._total_mem = self._mem_probe.total_bytes()
        except Exception as exc:
            self.notes.setdefault("total_memory", f"NVML memory info: {exc}")
        probes["mem"] = self._mem_probe
        probes["alloc"] = lambda: dev.cuda_allocated(self.cuda_indices)
        probes["util"] = comp.GpuUtilProbe(nv, handles)
        for i, h in enumerate(handles):
            probes[f"power/{i}"] = en.PowerProbe(nv, h)
        self._counter = en.NvmlEnergyCounter(nv, handles)
        return probes

    def _setup_cpu(self) -> dict[str, Any]:
        self._total_mem = mem.ram_total_bytes()
        probes: dict[str, Any] = {"rss": self._tree.rss_bytes}
        self._rapl = en.RaplCounter()
        if self._rapl.available:
            probes["rapl_j"] = self._rapl.poll
            self.notes["rapl_zones"] = ", ".join(self._rapl.zone_names)
        else:
            self.notes["rapl"] = str(self._rapl.reason)
        return probes

    def _read_energy(self) -> Any:
        if self._counter is not None:
            return self._counter.read_mj()
        if self._rapl is not None and self._rapl.available:
            return self._rapl.poll()
        return None

    def __enter__(self) -> Meter:
        if self._active:
            raise RuntimeError("Meter is not re-entrant")
        self._reset_counters()
        self.notes = {}
        self.error = None
        probes = self._setup_gpu() if self.is_gpu else self._setup_cpu()
        self.sampler = Sampler(probes, self.sample_interval_s)
        self._t_enter = time.perf_counter()
        self._e_enter = self._read_energy()
        self.sampler.sample_now()
        self.sampler.start()
        self._active = True
        if self.warmup_steps <= 0:
            self._start_mark()
        return self

    # ------------------------------------------------------------------ marks
    def _sync(self) -> None:
        if self.is_gpu:
            dev.cuda_sync(self.cuda_indices)

    def _start_mark(self) -> None:
        self._sync()
        if self.is_gpu:
            dev.cuda_reset_peaks(self.cuda_indices)
        assert self.sampler is not None
        self._ts0 = self.sampler.sample_now()
        self._cpu0 = comp.process_cpu_seconds(self._tree, refresh=False)
        self._load0, self._mach0 = cont.load_1m(), cont.cpu_times()
        self._threads = torch.get_num_threads()
        self._e0 = self._read_energy()
        self._t0 = time.perf_counter()
        self._marks = [dev.cuda_event() if self.is_gpu else self._t0]
        self._measuring = True

    def _stop_mark(self) -> None:
        self._sync()
        self._t1 = time.perf_counter()
        self._e1 = self._read_energy()
        self._cpu1 = comp.process_cpu_seconds(self._tree, refresh=False)
        assert self.sampler is not None
        self._ts1 = self.sampler.sample_now()
        if self.is_gpu:
            self._torch_peaks = dev.cuda_peaks(self.cuda_indices)
        self._measuring = False
        self._load1, self._mach1 = cont.load_1m(), cont.cpu_times()
        self._busy = cont.busy_message([self._load0, self._load1], cont.machine_cores())
        if self._busy:
            self.notes["contention"] = self._busy
            warnings.warn(self._busy, RuntimeWarning, stacklevel=3)

    def step(self, tokens: int = 0, samples: int = 0, generated_tokens: int | None = None,
             flop_tokens: int | None = None) -> None:
        """Mark the end of one iteration (O(1): one timestamp or one CUDA event).

        ``tokens``: tokens that count for the study (TT, J/token); ``samples``: sequences (ST);
        ``generated_tokens``: new tokens of a generation step or request (IT);
        ``flop_tokens``: tokens the model actually ran on, for MFU (default ``tokens``) - a
        fine-tuning step also runs the unsupervised prompt, a generation also the prefill.
        """
        if self._measuring:
            if self._pause is not None:
                raise RuntimeError("Meter.step() while paused: resume() first")
            self._marks.append(dev.cuda_event() if self.is_gpu else time.perf_counter())
            self._tokens += tokens
            self._flop_tokens += tokens if flop_tokens is None else flop_tokens
            self._samples += samples
            if generated_tokens is not None:
                self._generated = (self._generated or 0) + generated_tokens
            return
        if not self._active:
            raise RuntimeError("Meter.step() outside the with block")
        if self._t1 > self._t0:
            raise RuntimeError("Meter.step() after stop(): the measured phase has ended")
        self._n_calls += 1
        if self._n_calls >= self.warmup_steps:
            self._start_mark()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        try:
            if exc is not None:
                self.error = f"{exc_type.__name__}: {exc}"
            if self._measuring:
                try:
                    self._stop_mark()
                except Exception as stop_exc:  # e.g. a CUDA error surfacing at the sync
                    self._measuring = False
                    self.error = self.error or f"stop mark failed: {stop_exc}"
                    if exc is None:
                        raise
        finally:
            self._active = False
            self._done = True
            if self.sampler is not None:
                self.sampler.stop()
        return False

    def stop(self) -> None:
        """End the measured phase now (what follows inside the block is not measured), e.g.
        before a final evaluation; ``__exit__`` then only closes the sampler."""
        if not self._active:
            raise RuntimeError("Meter.stop() outside the with block")
        if self._measuring:
            self.resume()
            self._stop_mark()

    def _clocks(self) -> dict[str, Any]:
        """Every clock a metric is a delta of, read now (after a device sync)."""
        self._sync()
        assert self.sampler is not None
        return {"t": time.perf_counter(), "e": self._read_energy(),
                "cpu": comp.process_cpu_seconds(self._tree, refresh=False),
                "ts": self.sampler.sample_now()}

    def pause(self) -> None:
        """Leave what follows out of the measurement until :meth:`resume`: its wall time, CPU
        time, energy and samples are subtracted from every metric and its interval is no AL
        step. A no-op outside the measured phase (warm-up measures nothing) or when paused."""
        if not self._active:
            raise RuntimeError("Meter.pause() outside the with block")
        if self._measuring and self._pause is None:
            self._pause = self._clocks()

    def resume(self) -> None:
        """End a :meth:`pause`; the next step's latency starts here. A no-op when not paused."""
        if self._pause is None:
            return
        start, self._pause = self._pause, None
        self._pauses.append({"start": start, "end": self._clocks()})
        self._marks.append(dev.cuda_event() if self.is_gpu else time.perf_counter())
        self._pause_intervals.add(len(self._marks) - 2)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """``with meter.paused(): evaluate()``: :meth:`pause` then :meth:`resume`."""
        self.pause()
        try:
            yield
        finally:
            self.resume()

    def _paused_delta(self, key: str) -> float:
        """The summed change of one clock (``t``, ``cpu``, ``e`` on a CPU) over ended pauses."""
        return float(sum(p["end"][key] - p["start"][key] for p in self._pauses
                         if p["end"][key] is not None and p["start"][key] is not None))

    # ------------------------------------------------------------------ mid-run
    def elapsed_s(self) -> float:
        """Seconds since ``__enter__`` (warm-up included), for curves."""
        return time.perf_counter() - self._t_enter

    def energy_j_so_far(self) -> float | None:
        """Joules since ``__enter__`` (warm-up included), or None when energy is unmeasurable.

        No device sync: queued kernels are not yet counted (the lag is one step at most).
        """
        if not (self._active or self._done):
            return None
        now = self._read_energy()
        if self._counter is not None:
            assert self.sampler is not None
            t = time.perf_counter()
            power = [self.sampler.window(f"power/{i}", self._t_enter, t)
                     for i in range(len(self._counter.handles))]
            j, _, _ = en.gpu_window_energy(self._e_enter, now, power)
            return j
        if now is None or self._e_enter is None:
            return None
        return float(now - self._e_enter)

    # ------------------------------------------------------------------ results
    @property
    def measuring(self) -> bool:
        """Whether the measured phase is on (warm-up over, not stopped), paused or not."""
        return self._measuring

    @property
    def measured_steps(self) -> int:
        return max(0, len(self._marks) - 1 - len(self._pause_intervals))

    def latencies_s(self) -> list[float]:
        """Per-iteration seconds of the measured steps (CUDA events resolved here)."""
        if len(self._marks) < 2:
            return []
        pairs = [(a, b) for i, (a, b) in enumerate(zip(self._marks, self._marks[1:],
                                                       strict=False))
                 if i not in self._pause_intervals]
        if self.is_gpu:
            return [a.elapsed_time(b) / 1000.0 for a, b in pairs]
        return [b - a for a, b in pairs]

    def info(self) -> dict[str, Any]:
        """Non-metric facts for the record (steps, sampler errors, notes)."""
        s = self.sampler
        return {"warmup_steps": self.warmup_steps, "measured_steps": self.measured_steps,
                "tokens": self._tokens, "flop_tokens": self._flop_tokens,
                "samples": self._samples,
                "generated_tokens": self._generated, "sample_interval_s": self.sample_interval_s,
                "n_samples": len(s.times) if s else 0,
                "sampler_errors": dict(s.errors) if s else {},
                "notes": dict(self.notes), "error": self.error, "device": str(self.device),
                "cuda_indices": self.cuda_indices}

    def metrics(self) -> dict[str, dict[str, Any]]:
        """Every metric key, each a value with unit and method or null with a reason."""
        if self._active:
            raise RuntimeError("metrics() is available after the with block ends")
        keys = METRIC_KEYS + (GPU_KEYS if self.is_gpu else ())
        if not self._done:
            return {k: missing(UNITS[k], "the Meter was never run") for k in keys}
        if self._t1 <= self._t0:
            reason = (f"the measured phase never started: {self._n_calls} step() calls <= "
                      f"warmup_steps={self.warmup_steps}")
            return {k: missing(UNITS[k], reason) for k in keys}
        out: dict[str, dict[str, Any]] = {}
        paused = self._paused_delta("t")
        dur = self._t1 - self._t0 - paused
        extra = ({"paused_s": paused, "n_pauses": len(self._pauses),
                  "window_s": self._t1 - self._t0} if self._pauses else {})
        out["duration_s"] = metric(dur, "s", ("perf_counter_synchronised" if self.is_gpu
                                              else "perf_counter")
                                   + ("_minus_pauses" if self._pauses else ""), **extra)
        out.update(self._memory_metrics())
        out.update(self._compute_metrics(dur))
        out.update(self._throughput_metrics(dur))
        out.update(self._energy_metrics(dur))
        out.update(self._contention_metrics(dur))
        return {k: out[k] for k in keys}

    def _series(self, name: str) -> tuple[list[float], list[float]]:
        """Every sample of ``name`` in the measured window, pauses included (energy integrals
        subtract the pauses' own)."""
        assert self.sampler is not None
        if name not in self.sampler.series:
            return [], []
        return self.sampler.window(name, self._ts0, self._ts1)

    def _active_samples(self, name: str) -> tuple[float | None, list[float]]:
        """(time average, samples) of ``name`` over the measured window without its pauses:
        the average of each stretch between pauses, weighted by its length."""
        assert self.sampler is not None
        if name not in self.sampler.series:
            return None, []
        bounds = [self._ts0, *(x for p in self._pauses for x in (p["start"]["ts"],
                                                                  p["end"]["ts"])), self._ts1]
        area = span = 0.0
        values: list[float] = []
        for a, b in zip(bounds[::2], bounds[1::2], strict=True):
            ts, vs = self.sampler.window(name, a, b)
            avg = time_average(ts, vs)
            if avg is None:
                continue
            values += vs
            w = ts[-1] - ts[0] if len(ts) > 1 else 0.0
            area, span = area + avg * w, span + w
        if not values:
            return None, []
        return (area / span if span > 0 else sum(values) / len(values)), values

    def _memory_metrics(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        name, method = ("mem", "nvml_memory_sampled") if self.is_gpu else (
            "rss", "psutil_rss_sampled")
        avg, vs = self._active_samples(name)
        extra: dict[str, Any] = {"n_samples": len(vs), "interval_s": self.sample_interval_s}
        if self.is_gpu and self._mem_probe is not None:
            scopes = sorted(self._mem_probe.scopes)
            extra["scope"] = scopes[0] if len(scopes) == 1 else "mixed" if scopes else None
        if avg is None:
            reason = self.notes.get("nvml") or (self.sampler.errors.get(name) if self.sampler
                                                else None) or "no memory samples"
            out["amu_gb"] = missing("GB", reason, method)
            out["peak_gb"] = missing("GB", reason, method)
            out["amu_frac"] = missing("fraction", reason, method)
        else:
            base = None if self.is_gpu else self._baseline.get("rss_bytes")
            if base is not None:
                extra["baseline_gb"] = base / GB
                extra["baseline_kind"] = self._baseline.get("kind")
            out["amu_gb"] = metric(avg / GB, "GB", method, **extra)
            out["peak_gb"] = metric(max(vs) / GB, "GB", method, **extra)
            if self._total_mem:
                out["amu_frac"] = metric(avg / self._total_mem, "fraction", method,
                                         total_gb=self._total_mem / GB, **extra)
            else:
                out["amu_frac"] = missing("fraction", self.notes.get(
                    "total_memory", "device total memory unknown"), method)
        out.update(self._increment_metrics())
        if self.is_gpu:
            if self._torch_peaks is None:
                for k in GPU_KEYS:
                    out[k] = missing("GB", "torch allocator peaks not read",
                                     "torch_cuda_max_memory")
            else:
                out["torch_max_allocated_gb"] = metric(self._torch_peaks[0] / GB, "GB",
                                                       "torch_cuda_max_memory")
                out["torch_max_reserved_gb"] = metric(self._torch_peaks[1] / GB, "GB",
                                                      "torch_cuda_max_memory")
        return out

    def _increment_metrics(self) -> dict[str, dict[str, Any]]:
        """AMU and peak above the pre-load baseline: what the run added (the model, its
        activations, caches), without the interpreter and torch. CPU: sampled RSS minus the
        RSS at ``memory.mark_baseline()``; GPU: torch allocator bytes minus those at the mark."""
        kind = self._baseline.get("kind", "import")
        what = "preload" if kind == "preload" else "import_time"
        if self.is_gpu:
            name = "alloc"
            method = f"torch_cuda_memory_allocated_sampled_minus_{what}_baseline"
            per = self._baseline.get("cuda_allocated_bytes") or {}
            base = float(sum(per.get(i, 0) for i in self.cuda_indices))
        else:
            name = "rss"
            method = f"psutil_rss_sampled_minus_{what}_baseline"
            base = self._baseline.get("rss_bytes")
        avg, vs = self._active_samples(name)
        if avg is None or base is None:
            reason = ((self.sampler.errors.get(name) if self.sampler else None)
                      or ("no memory samples" if avg is None else "no baseline"))
            return {k: missing("GB", reason, method)
                    for k in ("amu_increment_gb", "peak_increment_gb")}
        extra = {"baseline_gb": base / GB, "n_samples": len(vs)}
        if self._baseline.get("libraries"):
            extra["imported_before_baseline"] = self._baseline["libraries"]
        if kind != "preload":
            extra["note"] = ("no memory.mark_baseline() before the model was loaded: baseline "
                             "is the RSS when effllm_helpers.measure was imported")
        out = {}
        for key, v in (("amu_increment_gb", avg), ("peak_increment_gb", max(vs))):
            # below the baseline: memory held at the mark was freed later (another process's
            # baseline, a cache dropped), so the difference is not what the run added
            out[key] = (metric((v - base) / GB, "GB", method, **extra) if v >= base else
                        missing("GB", f"{name} fell {(base - v) / GB:.3f} GB below its baseline: "
                                "memory held at the mark was freed later", method))
        return out

    def _contention_metrics(self, dur: float) -> dict[str, dict[str, Any]]:
        """How busy the machine was around the measured window (see ``measure.contention``)."""
        out: dict[str, dict[str, Any]] = {}
        cores = cont.machine_cores()
        loads = [x for x in (self._load0, self._load1) if x is not None]
        if loads:
            out["load_1m"] = metric(max(loads), "tasks", "os.getloadavg_1m_max_of_start_stop",
                                    start=self._load0, stop=self._load1, machine_cores=cores,
                                    busy=bool(self._busy), warning=self._busy)
        else:
            out["load_1m"] = missing("tasks", "os.getloadavg() unavailable", "os.getloadavg")
        ncpu = dev.usable_cpus()
        out["cpu_share"] = metric(self._cpu_seconds() / (dur * ncpu), "fraction",
                                  "process_tree_cpu_time/wall/cores", n_cpus=ncpu)
        frac = cont.busy_fraction(self._mach0, self._mach1)
        out["machine_cpu_busy"] = (
            metric(frac, "fraction", "psutil_cpu_times_delta", machine_cores=cores)
            if frac is not None else
            missing("fraction", "no machine CPU-time delta over the window",
                    "psutil_cpu_times_delta"))
        out["torch_threads"] = metric(self._threads, "threads", "torch.get_num_threads",
                                      env=os.environ.get(cont.THREADS_ENV))
        return out

    def _compute_metrics(self, dur: float) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        if self.is_gpu:
            avg, vs = self._active_samples("util")
            if avg is None:
                out["pcu"] = missing("fraction", self.notes.get("nvml") or "no utilisation samples",
                                     "nvml_utilization_sampled")
            else:
                out["pcu"] = metric(avg / 100.0, "fraction", "nvml_utilization_sampled",
                                    n_samples=len(vs), what="NVML utilization.gpu (time busy)")
        else:
            ncpu = dev.usable_cpus()
            out["pcu"] = metric(self._cpu_seconds() / (dur * ncpu), "fraction",
                                "process_cpu_time", n_cpus=ncpu)
        steps_reason = self._no_steps_reason()
        if self.flops_per_token is None:
            out["mfu"] = missing("fraction", "no flops_per_token given (analytic FLOPs unknown)",
                                 "analytic_flops")
        elif steps_reason:
            out["mfu"] = missing("fraction", steps_reason, "analytic_flops")
        else:
            try:
                on_exceed = None
                if self.peak_override is not None:
                    peak, pm, notes = float(self.peak_override), "user_peak", {}
                else:
                    peak, pm, notes = comp.peak_flops(self.device, self.dtype,
                                                      n_devices=max(1, len(self.cuda_indices)))
                    if not self.is_gpu:
                        peak_dtype = notes.get("peak_dtype", self.dtype)

                        def on_exceed(achieved: float) -> None:
                            comp.raise_cpu_peak(peak_dtype, achieved)
                out["mfu"] = comp.mfu_metric(self.flops_per_token, self._flop_tokens, dur, peak,
                                             pm, on_exceed, dtype=self.dtype, **notes)
            except Exception as exc:
                out["mfu"] = missing("fraction", f"no peak FLOP/s: {exc}", "analytic_flops")
        return out

    def _paused_gpu_energy(self, n: int) -> float:
        """Joules the GPUs drew during the pauses (counter deltas, else integrated power)."""
        assert self.sampler is not None
        total = 0.0
        for p in self._pauses:
            a, b = p["start"]["ts"], p["end"]["ts"]
            power = [self.sampler.window(f"power/{i}", a, b) for i in range(n)]
            j, _, _ = en.gpu_window_energy(p["start"]["e"], p["end"]["e"], power)
            total += j or 0.0
        return total

    def _cpu_seconds(self) -> float:
        """CPU seconds of the process tree over the measured window, pauses excluded."""
        return self._cpu1 - self._cpu0 - self._paused_delta("cpu")

    def _no_steps_reason(self) -> str | None:
        if self.measured_steps == 0:
            return "no step() calls in the measured phase (after warm-up)"
        return None

    def _throughput_metrics(self, dur: float) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        steps_reason = self._no_steps_reason()
        lat_method = "cuda_events" if self.is_gpu else "perf_counter"
        out["al_s"] = (missing("s", steps_reason, lat_method) if steps_reason
                       else latency_metric(self.latencies_s(), lat_method))
        m = "count/duration"

        def rate(count: int | None, unit: str, what: str) -> dict[str, Any]:
            if steps_reason:
                return missing(unit, steps_reason, m)
            if not count:
                return missing(unit, f"no {what} counted (pass step({what}=...))", m)
            return metric(count / dur, unit, m, count=count)

        out["tokens_per_s"] = rate(self._tokens, "tokens/s", "tokens")
        out["samples_per_s"] = rate(self._samples, "samples/s", "samples")
        for key, base, unit in (("tt", "tokens_per_s", "tokens/s/param"),
                                ("st", "samples_per_s", "samples/s/param")):
            v = out[base]["value"]
            if v is None:
                out[key] = missing(unit, out[base]["reason"], m + "/params")
            elif not self.n_params:
                out[key] = missing(unit, "n_params not given", m + "/params")
            else:
                out[key] = metric(v / self.n_params, unit, m + "/params", n_params=self.n_params)
        out["it"] = rate(self._generated, "tokens/s", "generated_tokens")
        return out

    def _energy_metrics(self, dur: float) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        joules: float | None = None
        extra: dict[str, Any] = {}
        method = "nvml_energy_counter" if self.is_gpu else "rapl_energy_counter"
        reason = None
        if self.is_gpu:
            if self._counter is None:
                reason = self.notes.get("nvml", "NVML unavailable")
            else:
                n = len(self._counter.handles)
                power = [self._series(f"power/{i}") for i in range(n)]
                joules, methods, notes = en.gpu_window_energy(self._e0, self._e1, power)
                if joules is not None and self._pauses:
                    joules -= self._paused_gpu_energy(n)
                method = "+".join(methods) if methods else "nvml_power_integrated"
                if notes:
                    extra["notes"] = "; ".join(notes)
                if joules is None:
                    reason = "; ".join(notes) or "no energy source"
                integ = [en.integrate(*p) for p in power]
                if all(j is not None for j in integ):
                    pj = float(sum(j for j in integ if j is not None))
                    extra["power_integrated_j"] = pj
                    if joules and methods == ["nvml_energy_counter"] and pj > 0:
                        extra["counter_over_power"] = joules / pj
                extra["n_devices"] = n
                extra.update(en.short_window_note(dur))
        else:
            if self._rapl is None or not self._rapl.available:
                reason = self.notes.get("rapl", "RAPL unavailable")
            elif self._e0 is None or self._e1 is None:
                reason = "RAPL read failed"
            else:
                joules = float(self._e1 - self._e0) - self._paused_delta("e")
        if self._pauses:
            method += "_minus_pauses"
        if joules is None:
            out["energy_j"] = missing("J", str(reason), method)
            out["aec_w"] = missing("W", str(reason), method)
            out["j_per_token"] = missing("J/token", str(reason), method)
            return out
        if self._pauses:
            extra["paused_s"] = self._paused_delta("t")
        out["energy_j"] = metric(joules, "J", method, **extra)
        short = {k: v for k, v in extra.items() if k in ("short_window", "window_note")}
        out["aec_w"] = metric(joules / dur, "W", method, **short)
        count = self._tokens or self._generated
        if count:
            out["j_per_token"] = metric(joules / count, "J/token", method,
                                        tokens="tokens" if self._tokens else "generated_tokens",
                                        **short)
        else:
            out["j_per_token"] = missing("J/token", "no tokens counted", method)
        return out


# ---------------------------------------------------------------- several processes
# how each metric combines over ranks (one rank = one device): energy and counts add up, memory
# is per device (max, with the sum beside it), a step ends when the slowest rank ends
SUM_KEYS = ("energy_j",)
MAX_KEYS = ("amu_gb", "peak_gb", "amu_frac", "amu_increment_gb", "peak_increment_gb",
            "torch_max_allocated_gb", "torch_max_reserved_gb", "al_s", "duration_s")
MEAN_KEYS = ("pcu",)
RATES = {"tokens_per_s": "tokens/s", "samples_per_s": "samples/s", "it": "tokens/s"}


def gather_rank_metrics(metrics: dict[str, dict[str, Any]],
                        strategy: str = "ddp") -> dict[str, dict[str, Any]]:
    """This rank's Meter metrics combined with every other rank's (``aggregate_ranks``).

    Every rank must call it (it is a collective when ``torch.distributed`` is initialised with
    more than one process); each gets the same combined dict. A single process gets its own
    metrics back unchanged, so one-device records keep their shape.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return metrics
    per_rank: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, metrics)
    return aggregate_ranks(per_rank, strategy)


def aggregate_ranks(per_rank: list[dict[str, dict[str, Any]]],
                    strategy: str = "ddp") -> dict[str, dict[str, Any]]:
    """One record's metrics from the per-rank (per-device) Meter metrics of one run.

    * energy: the sum of every rank's counter (each rank reads its own GPU), J/token and AEC
      from that sum;
    * memory: the largest device (value) with ``sum_gb`` over devices; AL and duration: the
      slowest rank (ranks meet at every gradient all-reduce);
    * tokens, samples, FLOPs: summed over ranks, rates over the longest duration, TT/ST per
      parameter of the (whole) model;
    * MFU = total FLOPs / duration / (world x per-device peak);
    * PCU: the mean over devices; anything else: rank 0's value.

    Each metric keeps ``per_device`` (rank order), ``world_size`` and ``strategy``; a metric
    null on any rank is null here, with that rank's reason.
    """
    world = len(per_rank)
    if world == 1:
        return per_rank[0]
    base = per_rank[0]
    ctx = {"world_size": world, "strategy": strategy}
    out: dict[str, dict[str, Any]] = {}

    def null_reason(key: str) -> str | None:
        for r, m in enumerate(per_rank):
            if (m.get(key) or {}).get("value") is None:
                return f"rank {r}: {(m.get(key) or {}).get('reason', 'not measured')}"
        return None

    def values(key: str) -> list[float | None]:
        return [(m.get(key) or {}).get("value") for m in per_rank]

    def combined(key: str, value: float | None, how: str, **extra: Any) -> dict[str, Any]:
        src = base[key]
        method = f"{how}_over_ranks({src.get('method')})"
        reason = null_reason(key)
        if reason or value is None:
            out_m = missing(src["unit"], reason or "not measurable over ranks", method)
            out_m.update(per_device=values(key), **ctx)
            return out_m
        return metric(value, src["unit"], method, per_device=values(key), **ctx, **extra)

    for key in base:
        vals = values(key)
        ok = all(v is not None for v in vals)
        if key in SUM_KEYS:
            out[key] = combined(key, sum(vals) if ok else None, "sum")
        elif key in MAX_KEYS:
            extra = {"sum_gb": sum(vals)} if ok and base[key].get("unit") == "GB" else {}
            out[key] = combined(key, max(vals) if ok else None, "max", **extra)
        elif key in MEAN_KEYS:
            out[key] = combined(key, sum(vals) / world if ok else None, "mean")
        else:
            m = dict(base[key])
            m.update(per_device=vals, **ctx, aggregate="rank0")
            out[key] = m
    dur = out.get("duration_s", {}).get("value")
    for key, unit in RATES.items():
        if key not in base:
            continue
        counts = [(m.get(key) or {}).get("count") for m in per_rank]
        if dur and all(c is not None for c in counts):
            out[key] = metric(sum(counts) / dur, unit, "sum_count_over_ranks/max_duration",
                              count=sum(counts), per_device=values(key), **ctx)
        else:
            out[key] = combined(key, None, "sum_count")
    for key, rate in (("tt", "tokens_per_s"), ("st", "samples_per_s")):
        n_params = (base.get(key) or {}).get("n_params")
        if key in base and rate in out:
            v = out[rate]["value"]
            out[key] = (metric(v / n_params, base[key]["unit"], "sum_count_over_ranks/max_duration"
                               "/params", n_params=n_params, per_device=values(key), **ctx)
                        if v is not None and n_params else combined(key, None, "sum"))
    energy = out.get("energy_j", {}).get("value")
    if "aec_w" in base:
        out["aec_w"] = (metric(energy / dur, "W", "sum_energy_over_ranks/max_duration",
                               per_device=values("aec_w"), **ctx)
                        if energy is not None and dur else combined("aec_w", None, "sum"))
    if "j_per_token" in base:
        count = (out.get("tokens_per_s") or {}).get("count") or (out.get("it") or {}).get("count")
        out["j_per_token"] = (metric(energy / count, "J/token", "sum_energy/sum_tokens_over_ranks",
                                     tokens=count, per_device=values("j_per_token"), **ctx)
                              if energy is not None and count
                              else combined("j_per_token", None, "sum"))
    if "mfu" in base:
        out["mfu"] = _mfu_over_ranks(per_rank, dur, ctx)
    return out


def _mfu_over_ranks(per_rank: list[dict[str, dict[str, Any]]], dur: float | None,
                    ctx: dict[str, Any]) -> dict[str, Any]:
    """MFU of the whole run: every rank's FLOPs (achieved FLOP/s x its duration) over the
    longest duration and world x the per-device peak."""
    base = per_rank[0]["mfu"]
    method = f"sum_flops_over_ranks/(world*peak)({base.get('method')})"
    flops, peaks = [], []
    for r, m in enumerate(per_rank):
        mf, d = m.get("mfu") or {}, (m.get("duration_s") or {}).get("value")
        if mf.get("achieved_flops") is None or mf.get("peak_flops") is None or not d:
            out = missing("fraction", f"rank {r}: {mf.get('reason', 'no achieved FLOP/s')}",
                          method)
            out.update(per_device=[(x.get("mfu") or {}).get("value") for x in per_rank], **ctx)
            return out
        flops.append(mf["achieved_flops"] * d)
        peaks.append(mf["peak_flops"])
    if not dur:
        return missing("fraction", "no measured duration", method)
    peak = peaks[0]
    total = sum(flops)
    return metric(total / dur / (len(per_rank) * peak), "fraction", method,
                  total_flops=total, achieved_flops=total / dur, peak_flops_per_device=peak,
                  per_device=[(x.get("mfu") or {}).get("value") for x in per_rank], **ctx)


def world_size_metric(world: int, strategy: str) -> dict[str, Any]:
    """The record's statement of how many processes (devices) one run used, and how."""
    return metric(world, "processes", "torch.distributed.get_world_size", strategy=strategy)
