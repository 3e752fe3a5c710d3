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


# ---------------------------------------------------------------- load at calibration (29.3)
def snap(t: float, own: float, busy: float, total: float, load: float = 0.5) -> dict:
    return {"t": t, "own_cpu_s": own, "machine": (busy, total), "load_1m": load}


def busy_window() -> list[dict]:
    """4 s on a 2-core machine: our 2 threads got 2 of their 8 CPU s, others took 5."""
    return [snap(0.0, 0.0, 0.0, 0.0, load=3.1), snap(4.0, 2.0, 7.0, 8.0, load=3.4)]


def quiet_window() -> list[dict]:
    return [snap(0.0, 0.0, 0.0, 0.0), snap(4.0, 7.8, 7.9, 8.0)]


def on_two_cores(monkeypatch: pytest.MonkeyPatch, snaps: list[dict], rate: float) -> None:
    """A calibration on 2 cores and 2 threads whose timing gives ``rate`` over ``snaps``."""
    monkeypatch.setattr(comp, "_time_cpu_matmuls", fake_timer({512: rate}, []))
    monkeypatch.setattr(comp, "_load_snapshot", lambda: snaps.pop(0))
    monkeypatch.setattr(comp.cont, "machine_cores", lambda: 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)


def test_judge_load_names_why_a_window_was_busy() -> None:
    load = comp.judge_load(*busy_window(), threads=2, cores=2)
    assert load["own_share"] == pytest.approx(0.25)
    assert load["other_busy"] == pytest.approx(5 / 8)
    assert "busy machine" in load["busy"] and "25%" in load["busy"]
    assert comp.judge_load(*quiet_window(), threads=2, cores=2)["busy"] is None


def test_a_calibration_on_a_busy_machine_is_used_flagged_and_not_kept(
        monkeypatch: pytest.MonkeyPatch, calib_dir: Path) -> None:
    on_two_cores(monkeypatch, busy_window(), 4e10)
    peak, method, notes = comp.peak_flops("cpu", "fp32")
    assert peak == 4e10 and method == comp.CPU_REFERENCE_METHOD
    assert "busy machine" in notes["flag"] and notes["calibration_load"]["own_share"] == 0.25
    assert not (calib_dir / comp.CALIB_FILE).exists()


def test_a_quiet_calibration_is_kept_with_its_load(monkeypatch: pytest.MonkeyPatch,
                                                   calib_dir: Path) -> None:
    on_two_cores(monkeypatch, quiet_window(), 3e11)
    comp.cpu_calibration("fp32")
    (entry,) = json.loads((calib_dir / comp.CALIB_FILE).read_text()).values()
    assert entry["busy"] is None and entry["load"]["window_s"] == 4.0
    assert entry["load"]["own_share"] > comp.CALIB_MIN_OWN_SHARE


def test_an_entry_without_its_load_is_flagged(calib_dir: Path) -> None:
    key = comp.cpu_calib_key("fp32", comp.CPU_CALIB_SIZES)
    comp._update_calib_file(key, {"flops": 3.1e11, "threads": torch.get_num_threads()})
    _, _, notes = comp.peak_flops("cpu", "fp32")
    assert "not recorded" in notes["flag"] and "--force" in notes["flag"]


def test_force_replaces_a_higher_kept_peak(monkeypatch: pytest.MonkeyPatch,
                                           calib_dir: Path) -> None:
    key = comp.cpu_calib_key("fp32", comp.CPU_CALIB_SIZES)
    comp._update_calib_file(key, {"flops": 9e11, "threads": torch.get_num_threads()})
    monkeypatch.setattr(comp, "_time_cpu_matmuls", fake_timer({512: 3e11}, []))
    assert comp.cpu_calibration("fp32")["flops"] == 9e11  # kept: read, not measured
    assert comp.cpu_calibration("fp32", force=True)["flops"] == 3e11
    assert json.loads((calib_dir / comp.CALIB_FILE).read_text())[key]["flops"] == 3e11


def test_the_calibrate_command_refuses_a_busy_peak(monkeypatch: pytest.MonkeyPatch,
                                                   calib_dir: Path) -> None:
    from typer.testing import CliRunner

    from effllm_helpers.cli import app

    on_two_cores(monkeypatch, busy_window(), 4e10)
    res = CliRunner().invoke(app, ["calibrate", "--force"])
    assert res.exit_code == 1 and "busy machine" in res.output
    assert not (calib_dir / comp.CALIB_FILE).exists()


# ---------------------------------------------------------------- one peak per CPU (29.4)
def test_every_precision_is_held_against_the_cpu_fp32_peak(monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    by_dtype = {torch.float32: 2.9e11, torch.float16: 9.7e9, torch.bfloat16: 3e10}
    monkeypatch.setattr(comp, "_time_cpu_matmuls",
                        lambda tdt, sizes, budget: {n: by_dtype[tdt] for n in sizes})
    for dtype in ("fp32", "fp16", "bf16"):
        peak, method, notes = comp.peak_flops("cpu", dtype)
        assert peak == 2.9e11 and method == "calibrated_matmul_fp32_reference"
        assert notes["peak_dtype"] == "fp32" and notes["compute_dtype"] == dtype
