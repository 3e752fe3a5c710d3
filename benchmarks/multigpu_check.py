"""Two-GPU validation of one study point on several processes (run on an nvidia-h200-x2).

1. DDP pretraining of the gpu preset's large size on 1 and 2 GPUs: scaling efficiency =
   tokens/s(2) / (2 x tokens/s(1)) (goal >= 0.9);
2. FSDP (FULL_SHARD, bf16) pretraining of the paper preset's 1.5 B size (``medium``) on 2 GPUs:
   MFU per GPU (goal >= 0.35);
3. energy: the record's sum over GPUs against its per-GPU counters.

Each point runs through ``launch.run_point`` exactly as a notebook would, on the stdlib corpus
(no hub on the GPU host). Nothing here may touch CUDA before a launch (the launcher forks).

    python benchmarks/multigpu_check.py --out outputs/reference/nvidia-h200-x2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def point(preset: str, size: str, processes: int, strategy: str, steps: int,
          grad_accum: int | None = None) -> dict[str, Any]:
    from effllm_helpers import config, launch
    from effllm_helpers.axes import architecture

    train: dict[str, Any] = {"steps": steps, "eval_every": 10 * steps}
    if grad_accum is not None:
        train["grad_accum"] = grad_accum
    over = {"model": {"size": size}, "data": {"corpus": "stdlib"}, "save_model": False,
            "train": train, "measure": {"warmup_steps": 5}}
    if processes > 1:
        over["launch"] = {"processes": processes, "strategy": strategy}
    p = config.notebook_params("architecture", preset, over)
    t0 = time.perf_counter()
    res = launch.run_point(architecture.run, p, seed=0)
    m = res.metrics

    def v(k: str) -> Any:
        return (m.get(k) or {}).get("value")

    energy = m.get("energy_j") or {}
    per = energy.get("per_device")
    return {"preset": preset, "size": size, "processes": processes, "strategy": strategy,
            "steps": steps, "wall_s": time.perf_counter() - t0,
            "tokens_per_s": v("tokens_per_s"), "mfu": v("mfu"), "energy_j": v("energy_j"),
            "energy_per_device_j": per,
            "energy_sum_matches_per_device": (abs(sum(per) - energy["value"]) < 1e-6 * max(
                1.0, energy["value"]) if per and energy.get("value") is not None else None),
            "peak_gb": m.get("peak_gb"), "world_size": m.get("world_size"), "metrics": m}


POINTS = {"ddp1": ("gpu", "large", 1, "ddp"), "ddp2": ("gpu", "large", 2, "ddp"),
          "fsdp": ("paper", "medium", 2, "fsdp")}


def run_isolated(name: str, steps: int, grad_accum: int | None, timeout_s: float,
                 log: Path) -> dict[str, Any]:
    """One point in its own Python process: the single-process point initialises CUDA, after
    which this process could no longer fork launched ranks (see ``launch._check_devices``).
    Its output goes to ``log`` as it runs, so a point cut short still shows where it was."""
    with tempfile.TemporaryDirectory() as tmp:
        res = Path(tmp) / "point.json"
        cmd = [sys.executable, __file__, "--point", name, "--steps", str(steps),
               "--point-out", str(res)]
        if grad_accum is not None:
            cmd += ["--grad-accum", str(grad_accum)]
        with log.open("w") as fh:
            try:
                proc = subprocess.run(cmd, timeout=timeout_s, stdout=fh, stderr=subprocess.STDOUT,
                                      text=True)
            except subprocess.TimeoutExpired:
                return {"error": f"timed out after {timeout_s:.0f} s (output: {log.name})"}
        if res.exists():
            return json.loads(res.read_text())
        return {"error": f"exit {proc.returncode}: {log.read_text()[-1500:]}"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="outputs/reference/nvidia-h200-x2")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--fsdp-steps", type=int, default=15)
    ap.add_argument("--fsdp-grad-accum", type=int, default=1,
                    help="the paper preset accumulates 16 micro-batches; 1 keeps a step short")
    ap.add_argument("--point-timeout", type=float, default=420,
                    help="seconds per point (the FSDP point needs > 200: spawn, a 152k-vocabulary "
                         "tokenizer, compile, then a gathered evaluation)")
    ap.add_argument("--skip", default="", help="comma list of ddp1,ddp2,fsdp")
    ap.add_argument("--name", default="multigpu_check.json",
                    help="file name under --out (a partial run, e.g. --skip ddp1,ddp2, should not "
                         "overwrite a whole run's file)")
    ap.add_argument("--point", choices=sorted(POINTS), help=argparse.SUPPRESS)
    ap.add_argument("--point-out", help=argparse.SUPPRESS)
    ap.add_argument("--grad-accum", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.point:  # the child: one point, its JSON to --point-out
        try:
            res = point(*POINTS[args.point], steps=args.steps, grad_accum=args.grad_accum)
        except Exception as exc:  # the parent keeps the other points; the JSON says what failed
            res = {"error": f"{type(exc).__name__}: {exc}"}
        Path(args.point_out).write_text(json.dumps(res, default=str))
        return 0
    skip = set(filter(None, args.skip.split(",")))
    out: dict[str, Any] = {}
    dest = Path(args.out)
    dest.mkdir(parents=True, exist_ok=True)
    for name in POINTS:
        if name in skip:
            continue
        fsdp = name == "fsdp"
        out[name] = run_isolated(name, args.fsdp_steps if fsdp else args.steps,
                                 args.fsdp_grad_accum if fsdp else None, args.point_timeout,
                                 dest / f"{name}.log")
        print(name, {k: out[name].get(k) for k in ("tokens_per_s", "mfu", "energy_j", "wall_s",
                                                   "error")}, flush=True)
        # written after every point, so a call cut short keeps what finished
        (dest / args.name).write_text(json.dumps(out, indent=1, default=str))
    t1 = (out.get("ddp1") or {}).get("tokens_per_s")
    t2 = (out.get("ddp2") or {}).get("tokens_per_s")
    out["ddp_scaling_efficiency"] = t2 / (2 * t1) if t1 and t2 else None
    (dest / args.name).write_text(json.dumps(out, indent=1, default=str))
    print("scaling efficiency", out["ddp_scaling_efficiency"], "->", dest / args.name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
