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
