"""Check the Meter's memory increment and contention fields on a device (CUDA or CPU).

Why: the CUDA path of ``amu_increment_gb`` (torch allocator bytes sampled by the Meter's thread,
minus those at ``memory.mark_baseline()``) cannot run in CI. This marks the baseline, holds a
known tensor under a Meter and prints JSON: the increment should be the tensor's size (plus the
small matmul buffers), and ``load_1m``/``cpu_share``/``machine_cpu_busy``/``torch_threads``
should be present with units.

    python benchmarks/meter_increment.py --device cuda --gb 2
    python benchmarks/meter_increment.py --device cpu --gb 0.2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from effllm_helpers.measure import Meter  # noqa: E402
from effllm_helpers.measure import memory as mem  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--gb", type=float, default=1.0, help="size of the held tensor (GB)")
    ap.add_argument("--seconds", type=float, default=1.0, help="how long it is held")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    if args.gb <= 0 or args.seconds <= 0:
        ap.error("--gb and --seconds must be positive")

    base = mem.mark_baseline()
    n = int(args.gb * 1e9 / 4)
    with Meter(args.device, flops_per_token=2.0 * 256**2, sample_interval_s=0.05) as m:
        held = torch.ones(n, dtype=torch.float32, device=args.device)  # touched: resident
        a = torch.randn(256, 256, device=args.device)
        t_end = time.perf_counter() + args.seconds
        while time.perf_counter() < t_end:
            a @ a
            m.step(tokens=256)
        del held
    out = m.metrics()
    keys = ("amu_gb", "peak_gb", "amu_increment_gb", "peak_increment_gb", "load_1m", "cpu_share",
            "machine_cpu_busy", "torch_threads", "mfu")
    report = {"device": args.device, "held_gb": n * 4 / 1e9,
              "baseline": {k: v for k, v in base.items() if k != "t"},
              "metrics": {k: out.get(k) for k in keys},
              "increment_minus_held_gb": (None if out["peak_increment_gb"]["value"] is None else
                                          out["peak_increment_gb"]["value"] - n * 4 / 1e9)}
    text = json.dumps(report, indent=1, default=str)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
