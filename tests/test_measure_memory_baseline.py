"""AMU above the pre-load baseline: the increment excludes the interpreter and torch."""

from __future__ import annotations

import time

import pytest
import torch

from effllm_helpers.measure import memory as mem
from effllm_helpers.measure.meter import Meter


def test_held_allocation_after_the_baseline_shows_in_the_increment() -> None:
    marked = mem.mark_baseline()
    with Meter("cpu", sample_interval_s=0.01) as m:
        block = torch.ones(50_000_000, dtype=torch.float32)  # 200 MB, touched
        target = len(m.sampler.times) + 2  # samples while it is held, however loaded the machine
        deadline = time.monotonic() + 30
        while len(m.sampler.times) < target and time.monotonic() < deadline:
            time.sleep(0.005)
        m.step()
        del block
    out = m.metrics()
    inc, peak_inc = out["amu_increment_gb"], out["peak_increment_gb"]
    assert inc["method"] == "psutil_rss_sampled_minus_preload_baseline"
    assert peak_inc["value"] * 1e9 > 150e6
    # the baseline (interpreter + torch, > 50 MB) is in the total and not in the increment
    assert inc["baseline_gb"] * 1e9 == pytest.approx(marked["rss_bytes"])
    assert marked["rss_bytes"] > 50e6
    assert out["amu_gb"]["baseline_gb"] == inc["baseline_gb"]
    assert out["amu_gb"]["value"] - inc["value"] == pytest.approx(inc["baseline_gb"])
    assert out["peak_gb"]["value"] - peak_inc["value"] == pytest.approx(inc["baseline_gb"])


def test_memory_loaded_before_the_baseline_is_excluded() -> None:
    held = torch.ones(50_000_000, dtype=torch.float32)  # loaded before the mark: baseline
    mem.mark_baseline()
    with Meter("cpu", sample_interval_s=0.01) as m:
        time.sleep(0.05)
        m.step()
    out = m.metrics()
    del held
    assert out["amu_gb"]["value"] * 1e9 > 200e6
    assert out["amu_increment_gb"]["value"] * 1e9 < 100e6


def test_without_a_mark_the_import_baseline_is_used_and_said(monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    monkeypatch.setattr(mem, "_BASELINE", {})
    with Meter("cpu", sample_interval_s=0.05) as m:
        m.step()
    inc = m.metrics()["amu_increment_gb"]
    assert inc["method"] == "psutil_rss_sampled_minus_import_time_baseline"
    assert "mark_baseline" in inc["note"]


def test_memory_freed_below_the_baseline_is_a_null_increment_with_the_reason(
        monkeypatch: pytest.MonkeyPatch) -> None:
    marked = mem.mark_baseline()
    # a baseline that held 1 TB more than the run ever uses (freed after the mark)
    monkeypatch.setitem(mem._BASELINE, "rss_bytes", marked["rss_bytes"] + 1e12)
    with Meter("cpu", sample_interval_s=0.01) as m:
        time.sleep(0.05)
        m.step()
    inc = m.metrics()["amu_increment_gb"]
    assert inc["value"] is None
    assert "below its baseline" in inc["reason"]
