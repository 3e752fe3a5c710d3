"""CPU MFU denominator: a per-machine peak on disk (max over sizes), and MFU never above 1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from effllm_helpers.measure import compute as comp
from effllm_helpers.measure.meter import Meter


@pytest.fixture(autouse=True)
def calib_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh per-test peak file and process cache, and a tiny budget (no long timing)."""
    monkeypatch.setenv(comp.CALIB_DIR_ENV, str(tmp_path / "calib"))
    monkeypatch.setenv(comp.CALIB_BUDGET_ENV, "0.05")
    monkeypatch.setattr(comp, "_CALIB_CACHE", {})
    return tmp_path / "calib"


def fake_timer(rates: dict[int, float | None], calls: list[float]):
    def timer(tdt: torch.dtype, sizes: tuple[int, ...], budget_s: float) -> dict:
        calls.append(budget_s)
        return {n: rates.get(n) for n in sizes}
    return timer


def test_cpu_peak_is_the_max_over_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    rates = {256: 1e9, 512: 3e9, 1024: 2e9, 2048: None}  # 2048 did not fit the budget
    monkeypatch.setattr(comp, "_time_cpu_matmuls", fake_timer(rates, []))
    cal = comp.cpu_calibration("fp32")
    assert cal["flops"] == 3e9 and cal["source"] == "measured"
    assert cal["by_size"] == {"256": 1e9, "512": 3e9, "1024": 2e9, "2048": None}
    assert comp.calibrate_matmul("cpu", "fp32") == 3e9


def test_second_calibration_reads_the_file_without_timing(monkeypatch: pytest.MonkeyPatch,
                                                          calib_dir: Path) -> None:
    calls: list[float] = []
    monkeypatch.setattr(comp, "_time_cpu_matmuls", fake_timer({512: 7e9}, calls))
    assert comp.calibrate_matmul("cpu", "fp32") == 7e9
    assert len(calls) == 1
    comp._CALIB_CACHE.clear()  # a new process: only the file remains

    def no_timing(*a: object) -> dict:
        raise AssertionError("the peak should come from the file")
    monkeypatch.setattr(comp, "_time_cpu_matmuls", no_timing)
    assert comp.calibrate_matmul("cpu", "fp32") == 7e9
    cal = comp.cpu_calibration("fp32")
    assert cal["source"] == "file" and Path(cal["file"]).parent == calib_dir


def test_file_is_keyed_by_cpu_dtype_threads_and_torch(monkeypatch: pytest.MonkeyPatch,
                                                       calib_dir: Path) -> None:
    monkeypatch.setattr(comp, "_time_cpu_matmuls", fake_timer({512: 7e9}, []))
    comp.calibrate_matmul("cpu", "bf16")
    (key, entry), = json.loads((calib_dir / comp.CALIB_FILE).read_text()).items()
    assert comp.dev.cpu_model() in key and "bf16" in key
    assert f"threads={torch.get_num_threads()}" in key and torch.__version__ in key
    assert entry["threads"] == torch.get_num_threads() and entry["flops"] == 7e9


def test_budget_comes_from_the_argument_then_the_environment(monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    calls: list[float] = []
    monkeypatch.setattr(comp, "_time_cpu_matmuls", fake_timer({64: 1e9, 32: 1e9}, calls))
    comp.calibrate_matmul("cpu", "fp32", n=64)  # env: 0.05 s
    comp.calibrate_matmul("cpu", "fp32", n=32, budget_s=0.01)
    assert calls == [0.05, 0.01]
    monkeypatch.delenv(comp.CALIB_BUDGET_ENV)
    assert comp._calib_budget(None) == comp.CPU_CALIB_BUDGET_S >= 2.0


def test_a_size_that_cannot_fit_the_budget_is_skipped() -> None:
    rates = comp._time_cpu_matmuls(torch.float32, (32, 4096), 0.01)  # 137 GFLOP per 4096 matmul
    assert rates[32] and rates[32] > 0
    assert rates[4096] is None


def test_real_tiny_calibration_is_written_and_reused(calib_dir: Path) -> None:
    f = comp.calibrate_matmul("cpu", "fp32", n=64, budget_s=0.02)
    assert 1e6 < f < 1e14
    comp._CALIB_CACHE.clear()
    assert comp.calibrate_matmul("cpu", "fp32", n=64, budget_s=0.02) == f  # from the file


def test_mfu_never_exceeds_one_with_a_low_calibrated_peak(monkeypatch: pytest.MonkeyPatch,
                                                          calib_dir: Path) -> None:
    monkeypatch.setattr(comp, "_time_cpu_matmuls", fake_timer({n: 1e3 for n in
                                                               comp.CPU_CALIB_SIZES}, []))
    n = 64
    a = torch.randn(n, n)
    with Meter("cpu", flops_per_token=2.0 * n * n, sample_interval_s=0.05) as m:
        for _ in range(5):
            a @ a
            m.step(tokens=n)
    mfu = m.metrics()["mfu"]
    assert mfu["value"] is None and mfu["peak_raised"] is True
    assert "beat the calibrated peak" in mfu["reason"]
    assert mfu["calibrated_peak_flops"] == 1e3 and mfu["achieved_flops"] > 1e3
    # the machine's peak is now the rate this run reached: the next run is held against it
    comp._CALIB_CACHE.clear()
    assert comp.calibrate_matmul("cpu", "fp32") == pytest.approx(mfu["achieved_flops"])


def test_mfu_above_a_datasheet_or_user_peak_is_null_with_the_rate_kept() -> None:
    m = comp.mfu_metric(6e9, 1000, 1.0, 1e12, "peak_table")
    assert m["value"] is None and "exceeds" in m["reason"]
    assert m["achieved_flops"] == 6e12 and m["peak_flops"] == 1e12
    with Meter("cpu", flops_per_token=1e6, peak_flops=1.0, sample_interval_s=0.05) as mt:
        mt.step(tokens=10)
    assert mt.metrics()["mfu"]["value"] is None
