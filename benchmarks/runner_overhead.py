"""Per-run overhead of executing through papermill, against calling the same work in-process.

The sweep runs every grid point as ``runner process -> papermill -> kernel -> notebook``. This
script times the smoke study's work both ways and prints the difference per run: runner start,
kernel start, imports inside the kernel, parameter injection, the record write and papermill's
notebook write. The smoke notebook imports torch and pandas only; an axis notebook also
imports transformers, peft and our axes, which a cold kernel pays on every run (timed here as
``axis_imports_s``, in a fresh interpreter) and a warm kernel never (its zygote has them).

Kernels are timed cold (a fresh interpreter per run, as before warm kernels) and warm (forked
from the sweep's zygote, ``effllm_helpers.warmkernel``). Goal (issue 30): at most 2 s per run.

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


def through_papermill(n_runs: int, out: Path, warm: bool) -> list[float]:
    """The same work as sweep runs it: one runner process + papermill + kernel per run, the
    kernel forked from a zygote (``warm``, its start-up not counted: a sweep pays it once,
    overlapped with warming the data caches) or started cold."""
    from effllm_helpers import studies, sweep, warmkernel

    study = out / "ovh.yaml"
    study.write_text("study: ovh\naxis: smoke\nnotebook: notebooks/smoke.ipynb\n"
                     f"grid: {{n: [{', '.join(str(32 + i) for i in range(n_runs))}]}}\n")
    zygote = warmkernel.Zygote() if warm else None
    sock = zygote.ensure() if zygote else None
    if zygote and not zygote.wait_ready():
        raise SystemExit(f"the zygote did not come up: {zygote.refused}")
    times = []
    try:
        for run in studies.expand(study, "ci"):
            t0 = time.perf_counter()
            res = sweep.execute_run(run.model_dump(mode="json"),
                                    str(out / ("warm" if warm else "cold") / run.run_id),
                                    zygote=sock)
            times.append(time.perf_counter() - t0)
            if res["status"] != "ok":
                raise SystemExit(f"run failed: {res['reason']}")
    finally:
        if zygote:
            zygote.stop()
    return times


def axis_imports(repeats: int = 3) -> float:
    """Seconds a fresh interpreter spends importing what the axis notebooks import, beyond the
    smoke notebook's torch and pandas (median of ``repeats``)."""
    import subprocess

    from effllm_helpers.warmkernel import PRELOAD

    def timed(mods: list[str]) -> float:
        code = "import time; t = time.perf_counter(); " + "; ".join(
            f"import {m}" for m in mods) + "; print(time.perf_counter() - t)"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True, cwd=ROOT)
        return float(out.stdout.strip().splitlines()[-1])

    base = ["torch", "pandas"]
    return statistics.median(timed(list(PRELOAD)) - timed(base) for _ in range(repeats))


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
        cold = through_papermill(args.runs, out, warm=False)
        warm = through_papermill(args.runs, out, warm=True)
    res: dict = {"runs": args.runs, "in_process_s": statistics.median(inp), "goal_s": 2.0}
    print(f"in-process        median {res['in_process_s']:.2f} s/run")
    for name, times in (("cold", cold), ("warm", warm)):
        med = statistics.median(times)
        res[f"papermill_{name}_s"] = med
        res[f"overhead_{name}_s"] = med - res["in_process_s"]
        res[f"papermill_{name}_all_s"] = times
        print(f"papermill, {name}   median {med:.2f} s/run  (all: "
              + ", ".join(f"{t:.2f}" for t in times) + ")")
    res["axis_imports_s"] = axis_imports()
    res["overhead_cold_axis_s"] = res["overhead_cold_s"] + res["axis_imports_s"]
    print(f"axis imports      {res['axis_imports_s']:.2f} s (transformers, peft, our axes: "
          "paid by every cold axis run, by no warm one)")
    print(f"overhead, cold    {res['overhead_cold_s']:.2f} s/run smoke, "
          f"{res['overhead_cold_axis_s']:.2f} s/run axis notebook  (goal <= 2 s)")
    print(f"overhead, warm    {res['overhead_warm_s']:.2f} s/run  (goal <= 2 s)")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
