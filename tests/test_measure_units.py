"""Pieces of measure/: sampler, stats, latency/TTFT/TPOT, compute table and calibration, device."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from effllm_helpers.measure import compute as comp
from effllm_helpers.measure import device as dev
from effllm_helpers.measure.latency import (
    GenerationTimer,
    generation_metrics,
    latency_metric,
    percentile,
)
from effllm_helpers.measure.sampler import Sampler, integrate, time_average
from effllm_helpers.measure.stats import summarize, t_ppf


# ---------------------------------------------------------------- sampler
def test_sampler_samples_and_stops_its_thread() -> None:
    counter = iter(range(10**6))
    s = Sampler({"x": lambda: float(next(counter))}, interval_s=0.01).start()
    deadline = time.monotonic() + 30  # wait for samples, not a fixed time a busy machine stretches
    while len(s.times) < 3 and time.monotonic() < deadline:
        time.sleep(0.005)
    s.stop()
    assert not s.alive
    n = len(s.times)
    assert n >= 3
    time.sleep(0.03)
    assert len(s.times) == n  # nothing sampled after stop
    assert "effllm-sampler" not in [t.name for t in threading.enumerate()]


def test_sampler_stop_is_immediate_with_a_long_interval() -> None:
    s = Sampler({"x": lambda: 1.0}, interval_s=30.0).start()
    t0 = time.perf_counter()
    s.stop()
    # far below the 30 s interval it must not wait for, with room for a loaded machine
    assert time.perf_counter() - t0 < 5 and not s.alive


def test_sampler_records_probe_errors_as_none() -> None:
    def bad() -> float:
        raise OSError("gone")

    s = Sampler({"bad": bad, "ok": lambda: 2.0}, interval_s=1.0)
    s.sample_now()
    assert s.series["bad"] == [None] and s.series["ok"] == [2.0]
    assert "gone" in s.errors["bad"]
    assert s.window("bad") == ([], [])


def test_integrate_and_time_average_are_time_weighted() -> None:
    ts, vs = [0.0, 1.0, 3.0], [10.0, 10.0, 40.0]
    assert integrate(ts, vs) == pytest.approx(10.0 + 50.0)
    assert time_average(ts, vs) == pytest.approx(60.0 / 3.0)
    assert integrate([0.0], [5.0]) is None and time_average([0.0], [5.0]) == 5.0


# ---------------------------------------------------------------- stats
@pytest.mark.parametrize(("df", "q"), [(1, 12.7062), (2, 4.3027), (4, 2.7764), (10, 2.2281),
                                       (30, 2.0423)])
def test_t_quantiles_match_tables(df: int, q: float) -> None:
    assert t_ppf(0.975, df) == pytest.approx(q, abs=1e-4)


def test_summarize_mean_std_ci() -> None:
    s = summarize([1.0, 2.0, 3.0, 4.0, None])
    assert s["mean"] == 2.5 and s["n"] == 4 and s["n_dropped"] == 1
    assert s["std"] == pytest.approx(1.2909944, rel=1e-6)
    assert s["ci95"] == pytest.approx(3.1824463 * 1.2909944 / 2.0, rel=1e-6)


def test_summarize_one_value_has_null_ci_with_reason() -> None:
    s = summarize([7.0])
    assert s["mean"] == 7.0 and s["ci95"] is None and s["std"] is None
    assert "n=1" in s["ci95_reason"]


# ---------------------------------------------------------------- latency
def test_percentile_linear_interpolation() -> None:
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile(list(range(11)), 90) == pytest.approx(9.0)
    assert percentile([5.0], 99) == 5.0


def test_latency_metric_fields() -> None:
    m = latency_metric([0.1] * 9 + [1.0], "perf_counter")
    assert m["value"] == pytest.approx(0.19) and m["p50"] == pytest.approx(0.1)
    assert m["p99"] == pytest.approx(0.919) and m["n"] == 10
    assert latency_metric([], "perf_counter")["value"] is None


def test_latency_metric_carries_ci95() -> None:
    m = latency_metric([1.0, 2.0, 3.0, 4.0], "perf_counter")
    assert m["ci95"] == pytest.approx(3.1824463 * 1.2909944 / 2.0, rel=1e-6)
    assert "ci95_reason" not in m
    one = latency_metric([0.5], "perf_counter")
    assert "ci95" not in one and "n=1" in one["ci95_reason"]


class _Clock:
    def __init__(self, times: list[float]) -> None:
        self.times = iter(times)

    def __call__(self) -> float:
        return next(self.times)


class _Ids:
    def __init__(self, n: int) -> None:
        self.n = n

    def numel(self) -> int:
        return self.n


def test_generation_timer_ttft_and_tpot_exclude_first_token() -> None:
    # start 0; prompt put at 1; tokens at 3, 4, 5, 6; end 7
    t = GenerationTimer(clock=_Clock([0.0, 1.0, 3.0, 4.0, 5.0, 6.0, 7.0])).start()
    t.put(_Ids(8))
    for _ in range(4):
        t.put(_Ids(2))  # batch of 2
    t.end()
    assert t.ttft_s == 3.0
    assert t.tpot_s == pytest.approx((6.0 - 3.0) / 3)  # first token excluded
    assert t.n_steps == 4 and t.n_generated == 8 and t.e2e_s == 7.0


def test_generation_timer_one_token_has_no_tpot() -> None:
    t = GenerationTimer(clock=_Clock([0.0, 1.0, 2.0])).start()
    t.put(_Ids(3))
    t.put(_Ids(1))
    assert t.ttft_s == 2.0 and t.tpot_s is None
    out = generation_metrics([t])
    assert out["ttft_s"]["value"] == 2.0 and out["tpot_s"]["value"] is None


def test_generation_metrics_percentiles_over_requests() -> None:
    timers = []
    for k in range(1, 5):  # ttft k, tpot 0.5
        t = GenerationTimer(clock=_Clock([0.0, 0.0, k, k + 0.5, k + 1.0])).start()
        for _ in range(4):
            t.put(_Ids(1))
        timers.append(t)
    out = generation_metrics(timers)
    assert out["ttft_s"]["value"] == 2.5 and out["ttft_s"]["p50"] == 2.5
    assert out["tpot_s"]["value"] == pytest.approx(0.5) and "first token" in out["tpot_s"]["note"]


@pytest.mark.slow
def test_generation_timer_with_hf_generate() -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from effllm_helpers.measure.latency import timed_generate

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (1, 5))
    out, timer = timed_generate(model, input_ids=ids, max_new_tokens=6, min_new_tokens=6,
                                do_sample=False, pad_token_id=0)
    assert out.shape[1] - ids.shape[1] == timer.n_steps == 6
    assert timer.ttft_s is not None and timer.ttft_s > 0
    assert timer.tpot_s is not None and 0 < timer.tpot_s < timer.e2e_s


# ---------------------------------------------------------------- compute
@pytest.mark.parametrize(("name", "key"), [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100 PCIe", "H100 PCIe"),
    ("NVIDIA H100 NVL", "H100 NVL"), ("NVIDIA H200", "H200"), ("NVIDIA GH200 480GB", "GH200"),
    ("NVIDIA A100-SXM4-80GB", "A100"), ("NVIDIA L40S", "L40S"), ("NVIDIA L4", "L4"),
    ("NVIDIA GeForce RTX 4090", "RTX 4090"), ("NVIDIA A10", "A10"), ("Tesla V100-SXM2-16GB",
                                                                      "V100 SXM2"),
    ("NVIDIA GeForce GTX 1080", None)])
def test_peak_table_matches_device_names(name: str, key: str | None) -> None:
    assert comp.table_key(name) == key


def test_table_peak_is_dense_bf16() -> None:
    assert comp.table_peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == pytest.approx(989.4e12)
    assert comp.table_peak_flops("NVIDIA A100-SXM4-40GB", "torch.float16") == pytest.approx(312e12)
    assert comp.table_peak_flops("NVIDIA A10", "fp8") is None  # not in the datasheet row
    with pytest.raises(ValueError):
        comp.canonical_dtype("int3")


def test_calibration_rejects_other_devices() -> None:
    with pytest.raises(ValueError, match="only cpu and cuda"):
        comp.calibrate_matmul("meta", "fp32")


def test_mfu_metric_formula_and_nulls() -> None:
    m = comp.mfu_metric(6e9, 1000, 2.0, 1e13, "peak_table")
    assert m["value"] == pytest.approx(6e12 / 2.0 / 1e13)
    assert m["method"] == "analytic_flops/peak_table"
    assert comp.mfu_metric(None, 1000, 2.0, 1e13, "peak_table")["value"] is None
    assert comp.mfu_metric(6e9, 0, 2.0, 1e13, "peak_table")["value"] is None


# ---------------------------------------------------------------- device
def test_device_facts_cpu() -> None:
    f = dev.device_facts("cpu")
    assert f["device_type"] == "cpu" and f["ram_bytes"] > 0 and f["n_cpus"] >= 1
    assert f["device_name"] == f["cpu_model"] and f["cpu_model"]


def test_device_slug() -> None:
    assert dev.device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert dev.device_slug("") == "unknown"


def test_the_test_session_calibrates_in_a_temp_folder_on_a_small_budget() -> None:
    # tests/conftest.py: never the user's per-machine cache, never its 4 s budget
    assert comp.calib_dir() != Path.home() / ".cache" / "effllm"
    assert comp.calib_dir().name.startswith("effllm-test-calib-")
    assert comp._calib_budget(None) <= 0.5
