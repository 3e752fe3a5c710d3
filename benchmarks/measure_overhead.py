"""How much does the Meter slow a workload down? Same loop with and without it, interleaved.

Why interleaved: a loaded or thermally drifting machine changes speed over minutes; alternating
"with" and "without" rounds (order flipped every pair) and comparing medians cancels that drift.
Goal: ratio <= 1.03 on CPU, <= 1.01 on GPU. The Meter's one-time costs (__enter__/__exit__,
thread start/stop, NVML reads at the marks) are inside the timed region; metrics() (post-run
processing, incl. a cached matmul calibration) is reported separately.

    python benchmarks/measure_overhead.py                 # CPU, < 60 s
    python benchmarks/measure_overhead.py --device cuda --dim 4096 --steps 200
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from effllm_helpers.measure import Meter  # noqa: E402


def make_workload(device: str, dim: int, dtype: torch.dtype, matmuls: int):
    """A step of ``matmuls`` dim×dim matmuls; returns (step function, FLOPs per token, tokens)."""
    a = torch.randn(dim, dim, device=device, dtype=dtype)
    b = torch.randn(dim, dim, device=device, dtype=dtype)

    def step() -> None:
        x = a
        for _ in range(matmuls):
            x = torch.mm(x, b)
            x = x / dim**0.5  # keep values finite

    return step, 2.0 * dim * dim, dim * matmuls


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_round(step: Any, steps: int, device: str, meter: bool, fpt: float, tokens: int,
              interval: float, dtype_name: str) -> tuple[float, float, float]:
    """(wall s, process CPU s, s spent in metrics() afterwards) of one round.

    Process CPU time (all threads, the sampler's included) is the steadier signal on a shared
    machine, where other tenants move wall time by more than the overhead we look for.
    """
    sync(device)
    c0 = time.process_time()
    t0 = time.perf_counter()
    if meter:
        with Meter(device, flops_per_token=fpt, dtype=dtype_name,
                   sample_interval_s=interval) as m:
            for _ in range(steps):
                step()
                m.step(tokens=tokens, samples=1)
        sync(device)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        t1 = time.perf_counter()
        m.metrics()
        return wall, cpu, time.perf_counter() - t1
    for _ in range(steps):
        step()
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0, 0.0


def measure_overhead(device: str = "cpu", dim: int = 128, matmuls: int = 2, steps: int = 3000,
                     rounds: int = 8, interval: float = 0.1, dtype: str = "fp32"
                     ) -> dict[str, Any]:
    """Interleaved with/without rounds; returns timings and the median ratio."""
    tdt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    step, fpt, tokens = make_workload(device, dim, tdt, matmuls)
    for _ in range(max(3, steps // 10)):  # warm caches, thread pools, kernels
        step()
    run_round(step, 5, device, True, fpt, tokens, interval, dtype)  # NVML init, calibration
    with_s: list[float] = []
    without_s: list[float] = []
    with_cpu: list[float] = []
    without_cpu: list[float] = []
    post_s: list[float] = []
    for r in range(rounds):
        order = (True, False) if r % 2 == 0 else (False, True)
        for use in order:
            wall, cpu, post = run_round(step, steps, device, use, fpt, tokens, interval, dtype)
            (with_s if use else without_s).append(wall)
            (with_cpu if use else without_cpu).append(cpu)
            if use:
                post_s.append(post)
    ratio = statistics.median(with_s) / statistics.median(without_s)
    paired = [w / wo for w, wo in zip(with_s, without_s, strict=True)]
    return {
        "device": device, "dim": dim, "matmuls_per_step": matmuls, "steps": steps,
        "rounds": rounds, "interval_s": interval, "dtype": dtype,
        "median_with_s": statistics.median(with_s), "median_without_s":
            statistics.median(without_s),
        "ratio_median": ratio, "ratio_paired_median": statistics.median(paired),
        "ratio_min": min(with_s) / min(without_s),
        "cpu_ratio_median": statistics.median(with_cpu) / statistics.median(without_cpu),
        "per_step_without_s": statistics.median(without_s) / steps,
        "metrics_post_s_median": statistics.median(post_s),
        "with_s": with_s, "without_s": without_s,
        "goal": 1.01 if device.startswith("cuda") else 1.03,
    }


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (0 steps or rounds would leave nothing to time)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (>= 1), got {v}")
    return v


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dim", type=positive_int, default=128, help="matmul size")
    p.add_argument("--matmuls", type=positive_int, default=2, help="matmuls per step")
    p.add_argument("--steps", type=positive_int, default=3000, help="steps per round")
    p.add_argument("--rounds", type=positive_int, default=8, help="pairs of rounds (with, without)")
    p.add_argument("--interval", type=float, default=0.1, help="Meter sample interval (s)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1 keeps OpenMP barriers out of the noise on small "
                        "shared machines; 0 = torch's default)")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    a = p.parse_args(argv)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print("measure_overhead: --device cuda asked for, but CUDA is not available here",
              file=sys.stderr)
        return 2
    res = measure_overhead(a.device, a.dim, a.matmuls, a.steps, a.rounds, a.interval, a.dtype)
    if a.json:
        print(json.dumps(res, indent=1))
    print(f"device={res['device']} threads={torch.get_num_threads()} "
          f"steps/round={res['steps']} rounds={res['rounds']} "
          f"step≈{res['per_step_without_s'] * 1e3:.2f} ms")
    print(f"median with Meter {res['median_with_s']:.4f} s, without {res['median_without_s']:.4f} s"
          f", metrics() {res['metrics_post_s_median'] * 1e3:.1f} ms")
    ok = "OK" if res["ratio_median"] <= res["goal"] else "ABOVE GOAL"
    print(f"overhead ratio (median with / median without) = {res['ratio_median']:.4f} "
          f"(paired median {res['ratio_paired_median']:.4f}, min/min {res['ratio_min']:.4f}; "
          f"goal <= {res['goal']}) {ok}")
    print(f"process CPU-time ratio (median) = {res['cpu_ratio_median']:.4f} "
          "(steadier than wall time on a shared machine)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
