"""Meter across ranks: one record per run from every device's Meter (sums, max, MFU)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from effllm_helpers.launch import free_port
from effllm_helpers.measure.meter import aggregate_ranks, gather_rank_metrics
from effllm_helpers.results import metric, missing

PEAK = 1e12


def fake_rank(rank: int) -> dict:
    """A rank's Meter metrics with distinct numbers, so each aggregate is checkable."""
    dur = 10.0 + rank  # rank 1 is the slower one
    tokens, samples, flops = 1000 * (rank + 1), 10 * (rank + 1), 6e9 * (rank + 1)
    energy = 500.0 + 100 * rank
    return {
        "duration_s": metric(dur, "s", "perf_counter"),
        "amu_gb": metric(20.0 + 5 * rank, "GB", "nvml_memory_sampled"),
        "peak_gb": metric(30.0 + rank, "GB", "nvml_memory_sampled"),
        "pcu": metric(0.5 + 0.2 * rank, "fraction", "nvml_utilization_sampled"),
        "al_s": metric(0.1 + 0.05 * rank, "s", "cuda_events"),
        "energy_j": metric(energy, "J", "nvml_energy_counter"),
        "aec_w": metric(energy / dur, "W", "nvml_energy_counter"),
        "j_per_token": metric(energy / tokens, "J/token", "nvml_energy_counter"),
        "tokens_per_s": metric(tokens / dur, "tokens/s", "count/duration", count=tokens),
        "samples_per_s": metric(samples / dur, "samples/s", "count/duration", count=samples),
        "tt": metric(tokens / dur / 100, "tokens/s/param", "count/duration/params",
                     n_params=100),
        "mfu": metric(flops / dur / PEAK, "fraction", "analytic_flops/datasheet",
                      achieved_flops=flops / dur, peak_flops=PEAK),
        "load_1m": metric(1.0 + rank, "tasks", "os.getloadavg_1m_max_of_start_stop"),
    }


def test_energy_is_the_sum_of_every_device():
    out = aggregate_ranks([fake_rank(0), fake_rank(1)], "ddp")
    assert out["energy_j"]["value"] == pytest.approx(1100.0)
    assert out["energy_j"]["per_device"] == [500.0, 600.0]
    assert out["aec_w"]["value"] == pytest.approx(1100.0 / 11.0)  # over the longest duration
    assert out["j_per_token"]["value"] == pytest.approx(1100.0 / 3000)


def test_memory_is_per_device_max_with_the_sum():
    out = aggregate_ranks([fake_rank(0), fake_rank(1)], "fsdp")
    assert out["amu_gb"]["value"] == 25.0 and out["amu_gb"]["sum_gb"] == 45.0
    assert out["peak_gb"]["per_device"] == [30.0, 31.0]
    assert out["amu_gb"]["world_size"] == 2 and out["amu_gb"]["strategy"] == "fsdp"


def test_tokens_and_flops_sum_and_mfu_is_over_world_times_peak():
    out = aggregate_ranks([fake_rank(0), fake_rank(1)], "ddp")
    assert out["duration_s"]["value"] == 11.0
    assert out["tokens_per_s"]["value"] == pytest.approx(3000 / 11.0)
    assert out["tokens_per_s"]["count"] == 3000
    assert out["tt"]["value"] == pytest.approx(3000 / 11.0 / 100)
    assert out["samples_per_s"]["value"] == pytest.approx(30 / 11.0)
    assert out["mfu"]["value"] == pytest.approx((6e9 + 12e9) / 11.0 / (2 * PEAK))
    assert out["mfu"]["total_flops"] == pytest.approx(18e9)


def test_pcu_is_the_mean_and_the_rest_is_rank0_with_per_device():
    out = aggregate_ranks([fake_rank(0), fake_rank(1)], "ddp")
    assert out["pcu"]["value"] == pytest.approx(0.6)
    assert out["al_s"]["value"] == pytest.approx(0.15)  # the slowest rank
    assert out["load_1m"]["value"] == 1.0 and out["load_1m"]["per_device"] == [1.0, 2.0]


def test_a_metric_null_on_one_rank_is_null_with_that_ranks_reason():
    r1 = fake_rank(1)
    r1["energy_j"] = missing("J", "NVML unavailable", "nvml_energy_counter")
    out = aggregate_ranks([fake_rank(0), r1], "ddp")
    assert out["energy_j"]["value"] is None
    assert "rank 1: NVML unavailable" in out["energy_j"]["reason"]
    assert out["aec_w"]["value"] is None and out["aec_w"]["reason"]


def test_one_rank_is_returned_unchanged():
    r0 = fake_rank(0)
    assert aggregate_ranks([r0]) is r0
    assert gather_rank_metrics(r0) is r0  # no process group


def _gather_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        combined = gather_rank_metrics(fake_rank(rank), "ddp")
        torch.save(combined, os.path.join(out_dir, f"r{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_gather_over_two_gloo_processes_combines_every_rank(tmp_path):
    mp.spawn(_gather_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "r0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "r1.pt", weights_only=False)
    assert r0 == r1  # every rank holds the same record
    assert r0["energy_j"]["value"] == pytest.approx(1100.0)
    assert r0["mfu"]["value"] == pytest.approx(18e9 / 11.0 / (2 * PEAK))
