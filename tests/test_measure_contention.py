"""Contention: threads per run in a sweep, and the load/CPU-share record of every Meter."""

from __future__ import annotations

import os
import time
import warnings

import pytest
import torch

from effllm_helpers import studies, sweep
from effllm_helpers.measure import contention as cont
from effllm_helpers.measure.meter import Meter
from effllm_helpers.run import _apply_threads
from effllm_helpers.runenv import THREADS_ENV


@pytest.mark.parametrize(("workers", "cores", "threads"),
                         [(1, 16, 16), (4, 16, 4), (3, 16, 5), (8, 2, 1), (2, 2, 1)])
def test_each_run_gets_cores_divided_by_workers(workers: int, cores: int, threads: int) -> None:
    assert sweep.threads_per_run(workers, cores) == threads


def test_runner_environment_fixes_every_thread_pool() -> None:
    assert sweep.run_thread_env(4, cores=16, env={}) == {
        "OMP_NUM_THREADS": "4", "MKL_NUM_THREADS": "4", THREADS_ENV: "4"}
    assert sweep.run_thread_env(None, cores=16, env={}) == {}  # remote Dask: sharing unknown


def test_threads_the_user_exported_win_over_the_sweeps_share() -> None:
    # two sweeps on one host, one per GPU: each would otherwise take every core
    given = {THREADS_ENV: "8"}
    assert sweep.run_thread_env(1, cores=32, env=given)[THREADS_ENV] == "8"
    assert sweep.run_thread_env(None, cores=32, env=given)["OMP_NUM_THREADS"] == "8"
    assert sweep.run_thread_env(1, cores=32, env={THREADS_ENV: "0"})[THREADS_ENV] == "32"


def test_run_side_sets_torch_threads_from_the_sweep(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cont, "free_cores", lambda: None)  # the machine's load unknown
    before = torch.get_num_threads()
    try:
        assert _apply_threads({THREADS_ENV: "1"}) == 1
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert _apply_threads({}) is None


def test_a_run_takes_no_more_threads_than_the_cores_others_leave_free(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cont, "free_cores", lambda: 1)  # a busy loop holds one of two cores
    before = torch.get_num_threads()
    try:
        assert _apply_threads({THREADS_ENV: "2"}) == 1
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(("busy", "free"), [(0.5, 1), (0.1, 2), (0.0, 2), (1.0, 1)])
def test_free_cores_counts_a_core_from_three_quarters_busy(
        monkeypatch: pytest.MonkeyPatch, busy: float, free: int) -> None:
    readings = iter([(0.0, 0.0), (busy * 2.0, 2.0)])  # (busy, total) CPU seconds, 2 cores
    monkeypatch.setattr(cont, "cpu_times", lambda: next(readings))
    monkeypatch.setattr(cont, "machine_cores", lambda: 2)
    monkeypatch.setattr(cont.time, "sleep", lambda s: None)
    assert cont.free_cores() == free


@pytest.fixture
def quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))


@pytest.fixture
def busy(monkeypatch: pytest.MonkeyPatch) -> float:
    load = cont.machine_cores() + 3.5
    monkeypatch.setattr(os, "getloadavg", lambda: (load, 0.0, 0.0))
    return load


def test_meter_records_load_cpu_share_and_threads_with_units(quiet: None) -> None:
    with Meter("cpu", sample_interval_s=0.05) as m:
        x = torch.randn(128, 128)
        for _ in range(5):
            x @ x
            m.step(tokens=1)
        time.sleep(0.1)  # /proc/stat counts in 10 ms ticks: let the window hold some
    out = m.metrics()
    units = {k: out[k]["unit"] for k in ("load_1m", "cpu_share", "machine_cpu_busy",
                                         "torch_threads")}
    assert units == {"load_1m": "tasks", "cpu_share": "fraction", "machine_cpu_busy": "fraction",
                     "torch_threads": "threads"}
    assert out["load_1m"]["start"] == out["load_1m"]["stop"] == 0.0
    assert out["load_1m"]["busy"] is False and "warning" not in out["load_1m"]
    assert 0.0 <= out["machine_cpu_busy"]["value"] <= 1.0
    assert out["cpu_share"]["value"] == pytest.approx(out["pcu"]["value"])  # same CPU seconds
    assert out["torch_threads"]["value"] == torch.get_num_threads()


def test_quiet_machine_gives_no_warning(quiet: None) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with Meter("cpu", sample_interval_s=0.05) as m:
            m.step()


def test_load_above_the_cores_warns_and_marks_the_record(busy: float) -> None:
    with pytest.warns(RuntimeWarning, match="machine busy"), \
            Meter("cpu", sample_interval_s=0.05) as m:
        m.step(tokens=1)
    load = m.metrics()["load_1m"]
    assert load["value"] == busy and load["busy"] is True
    assert f"{busy:.2f} > {cont.machine_cores()} cores" in load["warning"]
    assert "machine busy" in m.info()["notes"]["contention"]


def test_busy_fraction_is_the_share_of_non_idle_cpu_time() -> None:
    assert cont.busy_fraction((10.0, 100.0), (40.0, 140.0)) == pytest.approx(0.75)
    assert cont.busy_fraction((10.0, 100.0), (10.0, 100.0)) is None


def run(rid: str) -> studies.Run:
    return studies.Run(run_id=rid, study="s", axis="smoke", notebook="smoke.ipynb", seed=0,
                      point={}, params={}, weights={}, timeout_s=None)


def test_sweep_summary_warns_when_a_record_says_the_machine_was_busy() -> None:
    rec = {"metrics": {"load_1m": {"value": 9.0, "unit": "tasks", "method": "m", "busy": True,
                                   "warning": "machine busy: 1-min load average 9.00 > 2 cores"}}}
    assert sweep.record_busy(rec) == rec["metrics"]["load_1m"]["warning"]
    assert sweep.record_busy({"metrics": {}}) is None
    res = sweep.SweepResult("s", [sweep.Outcome(run("a"), "ok"),
                                  sweep.Outcome(run("b"), "ok", busy=sweep.record_busy(rec))])
    text = sweep.summary_table(res)
    assert "warning: 1 run(s) were measured on a busy machine" in text
    assert "9.00 > 2 cores" in text.splitlines()[-1]
    quiet = sweep.summary_table(sweep.SweepResult("s", [sweep.Outcome(run("a"), "ok")]))
    assert "busy" not in quiet


def test_a_thread_count_that_is_not_a_number_is_named_and_ignored(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(cont, "free_cores", lambda: None)
    assert _apply_threads({THREADS_ENV: "two"}) is None
    assert f"{THREADS_ENV}='two' is not a whole number" in capsys.readouterr().out
