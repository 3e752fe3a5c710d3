"""The Meter's phase boundaries: stop() ends the measured window; MFU counts the tokens run."""

from __future__ import annotations

import time

import pytest

from effllm_helpers.measure.meter import Meter


def test_stop_leaves_what_follows_out_of_every_rate() -> None:
    t_in = time.perf_counter()  # the window opens inside enter, after this
    with Meter("cpu", sample_interval_s=0.05) as m:
        for _ in range(4):
            time.sleep(0.02)
            m.step(tokens=10)
        m.stop()
        t_in = time.perf_counter() - t_in
        time.sleep(0.3)  # a final evaluation, say
    out = m.metrics()
    # against the wall time around enter..stop() (a loaded machine stretches both alike): the
    # 0.3 s after stop() would break it
    assert out["duration_s"]["value"] <= t_in
    assert out["tokens_per_s"]["value"] >= 40 / t_in


def test_step_after_stop_is_an_error() -> None:
    with Meter("cpu") as m:
        m.step(tokens=1)
        m.stop()
        with pytest.raises(RuntimeError, match="after stop"):
            m.step(tokens=1)


def test_mfu_counts_flop_tokens_and_throughput_counts_tokens() -> None:
    with Meter("cpu", flops_per_token=1e6, peak_flops=1e10, sample_interval_s=0.05) as m:
        for _ in range(4):
            time.sleep(0.02)
            m.step(tokens=10, flop_tokens=40)  # e.g. 10 supervised of 40 tokens run
    out = m.metrics()
    assert out["mfu"]["value"] == pytest.approx(
        160 * 1e6 / out["duration_s"]["value"] / 1e10, rel=1e-6)
    assert out["tokens_per_s"]["value"] == pytest.approx(40 / out["duration_s"]["value"])


def test_meter_rejects_devices_it_has_no_probes_for() -> None:
    with pytest.raises(ValueError, match="only 'cpu' and 'cuda'"):
        Meter("meta")


def test_a_pause_is_in_no_metric() -> None:
    """What runs while paused (an evaluation between training steps) leaves the duration, the
    rates, the CPU time and AL; only the steps' own time remains."""
    t_all = time.perf_counter()
    with Meter("cpu", sample_interval_s=0.05) as m:
        for i in range(4):
            time.sleep(0.01)
            m.step(tokens=10)
            if i == 1:
                with m.paused():
                    time.sleep(0.5)
    t_all = time.perf_counter() - t_all
    out = m.metrics()
    dur = out["duration_s"]
    assert dur["n_pauses"] == 1 and dur["paused_s"] >= 0.5
    assert dur["value"] == pytest.approx(dur["window_s"] - dur["paused_s"])
    assert dur["value"] <= t_all - 0.5
    assert out["tokens_per_s"]["value"] == pytest.approx(40 / dur["value"])
    assert out["al_s"]["n"] == 4 and m.measured_steps == 4  # the pause is no step
    assert max(m.latencies_s()) < 0.5


def test_step_while_paused_is_an_error_and_a_warm_up_pause_does_nothing() -> None:
    with Meter("cpu", warmup_steps=1) as m:
        with m.paused():  # warm-up: nothing is measured yet
            pass
        m.step(tokens=1)  # ends the warm-up
        m.pause()
        with pytest.raises(RuntimeError, match="while paused"):
            m.step(tokens=1)
        m.resume()
        m.step(tokens=1)
    assert m.metrics()["duration_s"]["n_pauses"] == 1  # the warm-up one was not a pause
