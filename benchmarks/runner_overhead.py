"""Per-run overhead of executing through papermill, against calling the same work in-process.

The sweep runs every grid point as ``runner process -> papermill -> kernel -> notebook``. This
script times the smoke study's work both ways and prints the difference per run: runner start,
kernel start, imports inside the kernel, parameter injection, the record write and papermill's
notebook write. Goal (issue 2): at most 3 s per run.

    .venv/bin/python benchmarks/runner_overhead.py --runs 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def in_process(n_runs: int, out: Path) -> list[float]:
    """The notebook's work called directly: params, Meter'd matmul loop, record write."""
    from effllm_helpers import smoke
    from effllm_helpers.run import start_run

    times = []
    for i in range(n_runs):
        t0 = time.perf_counter()
        ctx = start_run("smoke", preset="ci", run_id=f"inproc{i}", output_dir=out / f"in{i}")
        res = smoke.matmul_workload(ctx.params)
        ctx.finish(metrics=res["metrics"], curves=res["curves"])
        times.append(time.perf_counter() - t0)
    return times


def through_papermill(n_runs: int, out: Path) -> list[float]:
    """The same work as sweep runs it: one runner process + papermill + kernel per run."""
    from effllm_helpers import studies, sweep

    study = out / "ovh.yaml"
    study.write_text("study: ovh\naxis: smoke\nnotebook: notebooks/smoke.ipynb\n"
                     f"grid: {{n: [{', '.join(str(32 + i) for i in range(n_runs))}]}}\n")
    times = []
    for run in studies.expand(study, "ci"):
        t0 = time.perf_counter()
        res = sweep.execute_run(run.model_dump(mode="json"), str(out / "pm" / run.run_id))
        times.append(time.perf_counter() - t0)
        if res["status"] != "ok":
            raise SystemExit(f"run failed: {res['reason']}")
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="runs timed each way (default 5)")
    ap.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        in_process(1, out / "warm")  # imports and calibration are paid once in-process
        inp = in_process(args.runs, out)
        pm = through_papermill(args.runs, out)
    res = {
        "runs": args.runs,
        "in_process_s": statistics.median(inp),
        "papermill_s": statistics.median(pm),
        "overhead_per_run_s": statistics.median(pm) - statistics.median(inp),
        "papermill_all_s": pm,
        "goal_s": 3.0,
    }
    print(f"in-process   median {res['in_process_s']:.2f} s/run")
    print(f"papermill    median {res['papermill_s']:.2f} s/run  (all: "
          + ", ".join(f"{t:.2f}" for t in pm) + ")")
    print(f"overhead     {res['overhead_per_run_s']:.2f} s/run  (goal <= 3 s)")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
