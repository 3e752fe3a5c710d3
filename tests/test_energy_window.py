"""The NVML energy counter over short windows (a fast decode engine serves a request in ~30 ms)."""

from __future__ import annotations

from effllm_helpers.measure.energy import gpu_window_energy


def test_a_counter_that_did_not_tick_falls_back_to_integrated_power() -> None:
    # an H200 at 100 W for 0.2 s: 20 J, though the counter read the same value at both marks
    joules, methods, notes = gpu_window_energy([5_000], [5_000], [([0.0, 0.2], [100.0, 100.0])])
    assert joules == 20.0
    assert methods == ["nvml_power_integrated"]
    assert "did not advance" in notes[0]


def test_a_counter_that_did_not_tick_and_no_power_samples_is_unknown_not_zero() -> None:
    joules, _, notes = gpu_window_energy([5_000], [5_000], [([0.1], [100.0])])
    assert joules is None
    assert "fewer than 2 power samples" in notes[-1]


def test_a_counter_that_ticked_is_used_as_it_is() -> None:
    joules, methods, _ = gpu_window_energy([5_000], [7_500], [([], [])])
    assert joules == 2.5 and methods == ["nvml_energy_counter"]
