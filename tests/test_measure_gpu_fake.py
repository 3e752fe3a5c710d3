"""GPU paths of the Meter against a fake NVML and fake torch.cuda adapters (no GPU needed)."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pynvml
import pytest

from effllm_helpers.measure import compute as comp
from effllm_helpers.measure import device as dev
from effllm_helpers.measure import energy as en
from effllm_helpers.measure.meter import GPU_KEYS, METRIC_KEYS, Meter
from effllm_helpers.results import validate_metric


class FakeGpu:
    def __init__(self, i: int) -> None:
        self.uuid = f"GPU-{i:08d}-0000-0000-0000-000000000000"
        self.energy_mj = 1_000_000
        self.energy_supported = True
        self.power_mw = 300_000
        self.util = 80
        self.used = 10 * 10**9
        self.total = 80 * 10**9
        self.procs: list = []


class FakeNvml:
    def __init__(self, n: int) -> None:
        self.gpus = [FakeGpu(i) for i in range(n)]
        self.energy_reads = 0

    def install(self, mp: pytest.MonkeyPatch) -> None:
        def energy(h: FakeGpu) -> int:
            if not h.energy_supported:
                raise pynvml.NVMLError_NotSupported()
            self.energy_reads += 1
            return h.energy_mj

        fns = {
            "nvmlInit": lambda: None,
            "nvmlDeviceGetCount": lambda: len(self.gpus),
            "nvmlDeviceGetHandleByIndex": lambda i: self.gpus[i],
            "nvmlDeviceGetUUID": lambda h: h.uuid,
            "nvmlDeviceGetName": lambda h: "NVIDIA H100 80GB HBM3",
            "nvmlSystemGetDriverVersion": lambda: "570.00",
            "nvmlDeviceGetEnforcedPowerLimit": lambda h: 700_000,
            "nvmlDeviceGetTotalEnergyConsumption": energy,
            "nvmlDeviceGetPowerUsage": lambda h: h.power_mw,
            "nvmlDeviceGetUtilizationRates": lambda h: SimpleNamespace(gpu=h.util, memory=0),
            "nvmlDeviceGetMemoryInfo": lambda h: SimpleNamespace(used=h.used, total=h.total,
                                                                 free=h.total - h.used),
            "nvmlDeviceGetComputeRunningProcesses": lambda h: h.procs,
        }
        for name, fn in fns.items():
            mp.setattr(pynvml, name, fn)
        dev.reset_nvml_cache()


class FakeEvent:
    def __init__(self) -> None:
        self.t = time.perf_counter()

    def elapsed_time(self, other: FakeEvent) -> float:
        return (other.t - self.t) * 1000.0


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch):
    """Install a fake 4-GPU NVML and fake CUDA adapters; yields the fake NVML."""
    nv = FakeNvml(4)
    nv.install(monkeypatch)
    calls = SimpleNamespace(sync=0, reset=0)

    def sync(idx: list[int]) -> None:
        calls.sync += 1

    def reset(idx: list[int]) -> None:
        calls.reset += 1

    monkeypatch.setattr(dev, "cuda_available", lambda: True)
    monkeypatch.setattr(dev, "cuda_sync", sync)
    monkeypatch.setattr(dev, "cuda_event", FakeEvent)
    monkeypatch.setattr(dev, "cuda_reset_peaks", reset)
    monkeypatch.setattr(dev, "cuda_peaks", lambda idx: (2 * 10**9 * len(idx), 3 * 10**9 * len(idx)))
    monkeypatch.setattr(dev, "cuda_device_name", lambda i: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(dev, "cuda_total_memory", lambda i: 80 * 10**9)
    monkeypatch.setattr(dev, "cuda_uuid", lambda i: None)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    nv.calls = calls
    yield nv
    dev.reset_nvml_cache()


def one_window(g: FakeGpu) -> dict:
    """A ~0.05 s measured window of 1000 tokens in which the counter advances 12,345 mJ."""
    with Meter("cuda:0", sample_interval_s=0.01) as m:
        time.sleep(0.05)
        m.step(tokens=1000)
        g.energy_mj += 12_345
    return m.metrics()


def test_counter_delta_gives_exact_joules_and_watts(fake_gpu: FakeNvml) -> None:
    out = one_window(fake_gpu.gpus[0])
    assert out["energy_j"]["value"] == pytest.approx(12.345, abs=1e-12)
    assert out["energy_j"]["method"] == "nvml_energy_counter"
    assert out["aec_w"]["value"] == pytest.approx(12.345 / out["duration_s"]["value"], rel=1e-12)
    assert out["j_per_token"]["value"] == pytest.approx(12.345 / 1000, rel=1e-12)


def test_energy_over_a_window_shorter_than_the_counter_needs_is_kept_but_flagged(
        fake_gpu: FakeNvml) -> None:
    out = one_window(fake_gpu.gpus[0])  # ~0.05 s, under 4 s
    assert out["energy_j"]["value"] == pytest.approx(12.345, abs=1e-12)
    for key in ("energy_j", "aec_w", "j_per_token"):
        assert out[key]["short_window"] is True, key
        assert "lengthen the window" in out[key]["window_note"]
    assert out["energy_j"]["min_window_s"] == en.COUNTER_MIN_WINDOW_S


def test_energy_over_a_long_enough_window_carries_no_flag(fake_gpu: FakeNvml,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(en, "COUNTER_MIN_WINDOW_S", 0.02)
    out = one_window(fake_gpu.gpus[0])
    assert not any("short_window" in out[k] for k in ("energy_j", "aec_w", "j_per_token"))


def test_the_short_window_rule_names_the_window_and_the_bound() -> None:
    assert en.short_window_note(4.0, 4.0) == {}
    note = en.short_window_note(0.79, 4.0)
    assert note["short_window"] is True and note["min_window_s"] == 4.0
    assert "0.79 s" in note["window_note"]


def test_counter_wrap_is_handled(fake_gpu: FakeNvml) -> None:
    g = fake_gpu.gpus[0]
    g.energy_mj = 2**64 - 500
    with Meter("cuda:0", sample_interval_s=0.01) as m:
        m.step(tokens=1)
        g.energy_mj = 1500
    assert m.metrics()["energy_j"]["value"] == pytest.approx(2.0, abs=1e-12)


def test_counter_decrease_falls_back_to_integrated_power(fake_gpu: FakeNvml) -> None:
    g = fake_gpu.gpus[0]
    g.energy_mj = 10_000_000
    g.power_mw = 200_000
    t_out = time.perf_counter()
    with Meter("cuda:0", sample_interval_s=0.01) as m:
        time.sleep(0.1)
        m.step(tokens=1)
        g.energy_mj = 5_000  # driver reload: counter restarted
    t_out = time.perf_counter() - t_out
    out = m.metrics()
    assert out["energy_j"]["method"] == "nvml_power_integrated"
    assert "backwards" in out["energy_j"]["notes"]
    # 200 W over the sampled span, which holds the measured window and lies inside the block
    # (a loaded machine widens the gap between them, so bound it by wall time, not by 10%)
    dur = out["duration_s"]["value"]
    assert 200.0 * dur * (1 - 1e-9) <= out["energy_j"]["value"] <= 200.0 * t_out


def test_missing_counter_uses_integrated_power(fake_gpu: FakeNvml) -> None:
    g = fake_gpu.gpus[0]
    g.energy_supported = False
    g.power_mw = 250_000
    t_out = time.perf_counter()
    with Meter("cuda:0", sample_interval_s=0.01) as m:
        time.sleep(0.1)
        m.step(tokens=10)
    t_out = time.perf_counter() - t_out
    out = m.metrics()
    assert out["energy_j"]["method"] == "nvml_power_integrated"
    dur = out["duration_s"]["value"]  # sampled span: the window and the marks' reads around it
    assert 250.0 * dur * (1 - 1e-9) <= out["energy_j"]["value"] <= 250.0 * t_out


def test_several_gpus_sum_over_visible_devices_only(fake_gpu: FakeNvml,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    with Meter("cuda:0", gpu_indices=[0, 1], sample_interval_s=0.01) as m:
        m.step(tokens=10)
        fake_gpu.gpus[0].energy_mj += 99_000  # not ours: must not be counted
        fake_gpu.gpus[2].energy_mj += 1_000
        fake_gpu.gpus[3].energy_mj += 2_000
    out = m.metrics()
    assert m.nvml_indices == [2, 3]
    assert out["energy_j"]["value"] == pytest.approx(3.0, abs=1e-12)
    assert out["energy_j"]["n_devices"] == 2


def test_visible_devices_by_uuid_prefix(fake_gpu: FakeNvml, monkeypatch: pytest.MonkeyPatch
                                        ) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-00000003,GPU-00000001")
    assert dev.nvml_indices([0, 1]) == [3, 1]


def test_sampler_thread_dies_after_exit_even_when_body_raises(fake_gpu: FakeNvml) -> None:
    m = Meter("cuda:0", sample_interval_s=0.01)
    with pytest.raises(ValueError, match="boom"):
        with m:
            m.step(tokens=1)
            time.sleep(0.03)
            raise ValueError("boom")
    assert m.sampler is not None and m.sampler.thread is not None
    assert not m.sampler.thread.is_alive()
    assert m.error == "ValueError: boom"
    assert fake_gpu.calls.sync == 2  # start and stop marks only, never per step


def test_gpu_metrics_all_keys_with_memory_util_and_torch_peaks(fake_gpu: FakeNvml) -> None:
    g = fake_gpu.gpus[0]
    with Meter("cuda:0", n_params=100, sample_interval_s=0.01) as m:
        for _ in range(3):
            time.sleep(0.01)
            m.step(tokens=50, samples=2)
    out = m.metrics()
    assert set(out) == set(METRIC_KEYS) | set(GPU_KEYS)
    for k, v in out.items():
        validate_metric(k, v)
    assert out["amu_gb"]["value"] == pytest.approx(g.used / 1e9)
    assert out["amu_gb"]["scope"] == "device"  # no per-process entry for our pid
    assert out["amu_frac"]["value"] == pytest.approx(g.used / g.total)
    assert out["pcu"]["value"] == pytest.approx(0.80)
    assert out["pcu"]["method"] == "nvml_utilization_sampled"
    assert out["torch_max_allocated_gb"]["value"] == pytest.approx(2.0)
    assert out["torch_max_reserved_gb"]["value"] == pytest.approx(3.0)
    assert out["al_s"]["method"] == "cuda_events" and out["al_s"]["n"] == 3
    assert fake_gpu.calls.reset == 1


def test_gpu_memory_per_process_when_nvml_lists_our_pid(fake_gpu: FakeNvml) -> None:
    import os

    g = fake_gpu.gpus[0]
    g.procs = [SimpleNamespace(pid=os.getpid(), usedGpuMemory=4 * 10**9),
               SimpleNamespace(pid=999_999_999, usedGpuMemory=50 * 10**9)]
    with Meter("cuda:0", sample_interval_s=0.01) as m:
        m.step(tokens=1)
    out = m.metrics()
    assert out["amu_gb"]["scope"] == "process"
    assert out["amu_gb"]["value"] == pytest.approx(4.0)


def test_mfu_uses_h100_table_peak(fake_gpu: FakeNvml) -> None:
    with Meter("cuda:0", flops_per_token=1e9, dtype="bf16", sample_interval_s=0.05) as m:
        time.sleep(0.02)
        m.step(tokens=1000)
    out = m.metrics()
    dur = out["duration_s"]["value"]
    assert out["mfu"]["method"] == "analytic_flops/peak_table"
    assert out["mfu"]["peak_flops"] == pytest.approx(989.4e12)
    assert out["mfu"]["value"] == pytest.approx(1e12 / dur / 989.4e12, rel=1e-9)


def test_energy_so_far_mid_run(fake_gpu: FakeNvml) -> None:
    g = fake_gpu.gpus[0]
    with Meter("cuda:0", warmup_steps=1, sample_interval_s=0.05) as m:
        g.energy_mj += 500
        m.step(tokens=1)  # warm-up: counted in energy so far (curves), not in the metrics
        g.energy_mj += 1500
        assert m.energy_j_so_far() == pytest.approx(2.0)
        m.step(tokens=1)
    assert m.metrics()["energy_j"]["value"] == pytest.approx(1.5)


def test_no_nvml_gives_null_with_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail() -> None:
        raise pynvml.NVMLError_LibraryNotFound()

    monkeypatch.setattr(pynvml, "nvmlInit", fail)
    dev.reset_nvml_cache()
    monkeypatch.setattr(dev, "cuda_available", lambda: True)
    monkeypatch.setattr(dev, "cuda_sync", lambda idx: None)
    monkeypatch.setattr(dev, "cuda_event", FakeEvent)
    monkeypatch.setattr(dev, "cuda_reset_peaks", lambda idx: None)
    monkeypatch.setattr(dev, "cuda_peaks", lambda idx: (1, 1))
    monkeypatch.setattr(dev, "cuda_total_memory", lambda i: 80 * 10**9)
    try:
        with Meter("cuda:0", sample_interval_s=0.01) as m:
            m.step(tokens=1)
        out = m.metrics()
    finally:
        dev.reset_nvml_cache()
    for k in ("energy_j", "aec_w", "amu_gb", "pcu"):
        assert out[k]["value"] is None and "NVML init failed" in out[k]["reason"]
    assert out["tokens_per_s"]["value"] is not None


def test_gpu_window_energy_mixes_counter_and_power() -> None:
    j, methods, notes = en.gpu_window_energy(
        [1000, None], [3000, None], [([0.0, 1.0], [100.0, 100.0]), ([0.0, 2.0], [50.0, 150.0])])
    assert j == pytest.approx(2.0 + 200.0)
    assert methods == ["nvml_energy_counter", "nvml_power_integrated"]
    assert notes and "no energy counter" in notes[0]


def test_device_facts_from_fake_nvml(fake_gpu: FakeNvml) -> None:
    facts = dev.device_facts("cuda:0")
    assert facts["driver_version"] == "570.00"
    assert facts["power_limit_w"] == [700.0]
    assert facts["device_name"] == "NVIDIA H100 80GB HBM3"
    assert comp.table_key(facts["device_name"]) == "H100 SXM"


@pytest.mark.parametrize(("tf32", "row", "peak"), [(False, "fp32", 67.0e12),
                                                   (True, "tf32", 494.7e12)])
def test_fp32_peak_follows_tf32_setting(fake_gpu: FakeNvml, tf32: bool, row: str,
                                        peak: float) -> None:
    import torch

    prev, prev_allow = (torch.get_float32_matmul_precision(),
                        torch.backends.cuda.matmul.allow_tf32)
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    try:
        assert torch.backends.cuda.matmul.allow_tf32 is tf32
        assert comp.tf32_matmul_enabled() is tf32
        p, method, notes = comp.peak_flops("cuda:0", "fp32")
    finally:
        torch.set_float32_matmul_precision(prev)
        torch.backends.cuda.matmul.allow_tf32 = prev_allow
    assert method == "peak_table" and p == pytest.approx(peak)
    assert notes.get("peak_dtype", "fp32") == row and ("tf32_note" in notes) is tf32


def test_fp32_peak_with_allow_tf32_flag(fake_gpu: FakeNvml, monkeypatch: pytest.MonkeyPatch
                                        ) -> None:
    monkeypatch.setattr(comp, "tf32_matmul_enabled", lambda: True)
    with Meter("cuda:0", flops_per_token=1e9, dtype="fp32", sample_interval_s=0.05) as m:
        time.sleep(0.05)  # 1e12 FLOP in >= 50 ms stays below the peak (MFU above 1 is null)
        m.step(tokens=1000)
    mfu = m.metrics()["mfu"]
    assert mfu["peak_flops"] == pytest.approx(494.7e12) and mfu["peak_dtype"] == "tf32"
    monkeypatch.setattr(dev, "cuda_device_name", lambda i: "Tesla V100-SXM2-16GB")
    p, _, notes = comp.peak_flops("cuda:0", "fp32")  # no TF32 cores before Ampere
    assert p == pytest.approx(15.7e12) and notes["peak_dtype"] == "fp32"


def test_gpu_increment_is_allocator_bytes_above_the_preload_mark(
        fake_gpu: FakeNvml, monkeypatch: pytest.MonkeyPatch) -> None:
    from effllm_helpers.measure import memory as mem

    monkeypatch.setattr(mem, "_BASELINE", {"rss_bytes": 1.0, "kind": "preload",
                                           "cuda_allocated_bytes": {0: 10**9, 1: 7 * 10**9}})
    monkeypatch.setattr(dev, "cuda_allocated", lambda idx: 5 * 10**9)
    with Meter("cuda:0", sample_interval_s=0.01) as m:
        time.sleep(0.03)
        m.step(tokens=1)
    out = m.metrics()
    inc = out["amu_increment_gb"]
    assert inc["value"] == pytest.approx(4.0) and inc["baseline_gb"] == pytest.approx(1.0)
    assert inc["method"] == "torch_cuda_memory_allocated_sampled_minus_preload_baseline"
    assert out["peak_increment_gb"]["value"] == pytest.approx(4.0)
    assert "baseline_gb" not in out["amu_gb"]  # NVML's total is kept as it was
