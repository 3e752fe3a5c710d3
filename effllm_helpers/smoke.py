"""The smoke workload: a timed matmul loop that exercises params -> papermill -> Meter -> record.

It proves the pipe before (and beside) the axis notebooks, and it is what the sweep tests and
``benchmarks/runner_overhead.py`` execute, so it can also fail on purpose (exception, NaN, OOM,
a killed kernel).
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import torch

from .config import SmokeParams
from .errors import check_finite


def matmul_workload(p: SmokeParams, device: str = "cpu") -> dict[str, Any]:
    """Run ``p.steps`` (+ warm-up) n x n matmuls under a Meter; return metrics and a loss curve."""
    from .measure import Meter

    n = p.n
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    flops_per_step = 2.0 * n**3
    losses: list[float] = []
    with Meter(device, n_params=n * n, flops_per_token=flops_per_step / n, dtype="fp32",
               warmup_steps=p.measure.warmup_steps,
               sample_interval_s=p.measure.sample_interval_s) as meter:
        for step in range(p.measure.warmup_steps + p.steps):
            c = a @ b
            loss = float(c.float().mean())
            if p.fail == "nan" and step == 1:
                loss = float("nan")
            if p.fail == "exception" and step == 1:
                raise RuntimeError("smoke: failing on purpose (fail=exception)")
            if p.fail == "oom" and step == 1:
                raise torch.OutOfMemoryError("smoke: simulated CUDA out of memory (fail=oom)")
            if p.fail == "crash" and step == 1:
                os.kill(os.getpid(), signal.SIGKILL)
            check_finite(loss, step)
            losses.append(loss)
            if p.sleep_s:
                time.sleep(p.sleep_s)
            meter.step(tokens=n, samples=1)
    return {"metrics": meter.metrics(),
            "curves": {"loss_vs_step": {"x": list(range(len(losses))), "y": losses,
                                        "x_unit": "step", "y_unit": "mean(c)"}}}
