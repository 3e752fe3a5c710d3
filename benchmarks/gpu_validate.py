"""Validate the Meter on an NVIDIA H100/H200: energy counter vs power, MFU, overhead.

(a) Energy: over a steady bf16 matmul load (default 10 s, after a warm-up so the power reading's
    averaging window has settled), compare the NVML total-energy counter delta with sampled
    power integrated over time (20 ms sampling). On H100/H200 ``nvmlDeviceGetPowerUsage`` is a
    ~1 s moving average, so it lags load changes; we also sample the instantaneous power field
    (NVML_FI_DEV_POWER_INSTANT) where the driver offers it. Goal: agreement within 5 %.
(b) MFU: the Meter's MFU for a large bf16 matmul-dominated workload (datasheet peak), set
    against the measured matmul peak on the same GPU: MFU_table = achieved / datasheet peak,
    while achieved / measured peak is close to 1 for a pure matmul; the gap between the two is
    the datasheet peak this card does not reach at its clocks and power limit.
(c) Overhead: the same interleaved with/without comparison as measure_overhead.py, on the GPU.

Writes <out>/gpu_validate.json and <out>/gpu_validate.txt (default
outputs/reference/<device-slug>/), both naming the command line that produced them.
Without a GPU it prints why and exits with status 2.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from measure_overhead import positive_int  # noqa: E402 - the sibling script's argparse type

from effllm_helpers.measure import Meter  # noqa: E402
from effllm_helpers.measure import compute as comp  # noqa: E402
from effllm_helpers.measure import device as dev  # noqa: E402
from effllm_helpers.measure import energy as en  # noqa: E402
from effllm_helpers.measure.sampler import Sampler, integrate, time_average  # noqa: E402
from effllm_helpers.paths import outputs_dir  # noqa: E402
from effllm_helpers.results import atomic_write_json, now_iso  # noqa: E402


def instant_power_probe(nv: Any, handle: Any) -> Any | None:
    """A probe reading NVML_FI_DEV_POWER_INSTANT (W), or None if the driver lacks the field."""
    field = getattr(nv, "NVML_FI_DEV_POWER_INSTANT", None)
    if field is None:
        return None

    def read() -> float | None:
        v = nv.nvmlDeviceGetFieldValues(handle, [field])[0]
        if v.nvmlReturn != 0:
            return None
        val = v.value
        raw = {0: val.dVal, 1: val.uiVal, 2: val.ulVal, 3: val.ullVal, 4: val.sllVal,
               5: val.siVal, 6: val.usVal}.get(int(v.valueType), val.uiVal)
        return float(raw) / 1000.0  # mW

    try:
        return read if read() is not None else None
    except Exception:
        return None


def matmul_load(n: int, dtype: torch.dtype, device: str) -> tuple[Any, float]:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    def step(k: int = 1) -> None:
        for _ in range(k):
            torch.mm(a, b)

    return step, 2.0 * n**3


def part_a(device: str, n: int, seconds: float, warmup_s: float, interval: float
           ) -> dict[str, Any]:
    nv, reason = dev.get_nvml()
    if nv is None:
        return {"ok": False, "reason": reason}
    idx = dev.resolve(device).index or 0
    handle = dev.nvml_handles(dev.nvml_indices([idx]))[0]
    counter = en.NvmlEnergyCounter(nv, [handle])
    if not counter.available[0]:
        return {"ok": False, "reason": counter.reasons[0]}
    step, _ = matmul_load(n, torch.bfloat16, device)
    t_end = time.perf_counter() + warmup_s
    while time.perf_counter() < t_end:  # let clocks, temperature and the power average settle
        step(4)
        torch.cuda.synchronize()
    probes: dict[str, Any] = {"power_avg_w": en.PowerProbe(nv, handle)}
    inst = instant_power_probe(nv, handle)
    if inst is not None:
        probes["power_instant_w"] = inst
    s = Sampler(probes, interval)
    torch.cuda.synchronize()
    t0s = s.sample_now()
    e0 = counter.read_mj()[0]
    t0 = time.perf_counter()
    s.start()
    try:
        t_end = t0 + seconds
        while time.perf_counter() < t_end:
            step(4)
            torch.cuda.synchronize()
        e1 = counter.read_mj()[0]
        t1 = time.perf_counter()
        t1s = s.sample_now()
    finally:
        s.stop()
    assert e0 is not None and e1 is not None
    d = en.counter_delta(e0, e1)
    counter_j = None if d is None else d / 1000.0
    out: dict[str, Any] = {"ok": counter_j is not None, "seconds": t1 - t0, "n": n,
                           "interval_s": interval, "counter_j": counter_j,
                           "counter_w": None if counter_j is None else counter_j / (t1 - t0),
                           "goal_rel_diff": 0.05}
    for name in probes:
        ts, ws = s.window(name, t0s, t1s)
        j = integrate(ts, ws)
        out[f"{name}_integrated_j"] = j
        out[f"{name}_mean"] = time_average(ts, ws)
        out[f"{name}_n_samples"] = len(ws)
        if j and counter_j:
            out[f"{name}_rel_diff"] = j / counter_j - 1.0
    if "power_instant_w" not in probes:
        out["instant_power_note"] = "NVML_FI_DEV_POWER_INSTANT not available on this driver"
    rd = out.get("power_avg_w_rel_diff")
    out["within_goal"] = rd is not None and abs(rd) <= 0.05
    return out


def part_b(device: str, n: int, steps: int) -> dict[str, Any]:
    step, flops_per_mm = matmul_load(n, torch.bfloat16, device)
    k = 8  # matmuls per step
    # a "token" here is one output row of an n×n matmul: 2·n² FLOPs
    with Meter(device, flops_per_token=2.0 * n * n, dtype="bf16", warmup_steps=3,
               sample_interval_s=0.1) as m:
        for _ in range(steps + 3):
            step(k)
            m.step(tokens=n * k, samples=1)
    mets = m.metrics()
    mfu = mets["mfu"]
    measured_peak = comp.calibrate_matmul(device, "bf16", n=n)
    name = dev.cuda_device_name(dev.resolve(device).index or 0)
    table = comp.table_peak_flops(name, "bf16")
    achieved = mfu.get("achieved_flops")
    out = {"n": n, "steps": steps, "matmuls_per_step": k, "mfu": mfu,
           "pcu": mets["pcu"], "aec_w": mets["aec_w"], "energy_j": mets["energy_j"],
           "achieved_tflops": None if achieved is None else achieved / 1e12,
           "measured_matmul_peak_tflops": measured_peak / 1e12,
           "table_peak_tflops": None if table is None else table / 1e12,
           "table_row": comp.table_key(name)}
    if achieved is not None:
        out["achieved_over_measured_peak"] = achieved / measured_peak
    if table:
        out["measured_peak_over_table"] = measured_peak / table
    return out


def part_c(device: str, n: int, steps: int, rounds: int) -> dict[str, Any]:
    from measure_overhead import measure_overhead

    return measure_overhead(device=device, dim=n, matmuls=2, steps=steps, rounds=rounds,
                            interval=0.1, dtype="bf16")


def summary_text(res: dict[str, Any]) -> str:
    a, b, c = res.get("a_energy", {}), res.get("b_mfu", {}), res.get("c_overhead", {})
    lines = [f"gpu_validate on {res['device']['device_name']} ({res['finished_at']})",
             f"command: {res['command']}", "",
             "(a) energy: NVML counter vs integrated sampled power"]
    if not a.get("ok"):
        lines.append(f"    not measured: {a.get('reason')}")
    else:
        lines.append(f"    {a['seconds']:.2f} s steady bf16 {a['n']}^3 matmuls; counter "
                     f"{a['counter_j']:.1f} J = {a['counter_w']:.1f} W")
        for name in ("power_avg_w", "power_instant_w"):
            if f"{name}_integrated_j" in a and a[f"{name}_integrated_j"] is not None:
                lines.append(f"    {name}: {a[f'{name}_integrated_j']:.1f} J "
                             f"({a.get(f'{name}_n_samples')} samples @ {a['interval_s']} s), "
                             f"rel. diff {a.get(f'{name}_rel_diff', float('nan')):+.2%}")
        lines.append(f"    goal |diff| <= 5 %: {'met' if a['within_goal'] else 'NOT met'}"
                     f"{'; ' + a['instant_power_note'] if 'instant_power_note' in a else ''}")
    lines += ["", "(b) MFU of a bf16 matmul-dominated workload"]
    if "mfu" not in b:
        lines.append(f"    not measured: {b.get('reason')}")
    else:
        mfu = b["mfu"]
        lines.append(f"    Meter MFU = {mfu.get('value')} ({mfu.get('method')}); achieved "
                     f"{b['achieved_tflops']} TF/s")
        lines.append(f"    datasheet dense bf16 peak ({b['table_row']}): {b['table_peak_tflops']} "
                     f"TF/s; measured {b['n']}^3 matmul peak: "
                     f"{b['measured_matmul_peak_tflops']:.1f} TF/s")
        if "achieved_over_measured_peak" in b:
            lines.append(f"    achieved / measured matmul peak = "
                         f"{b['achieved_over_measured_peak']:.3f}: the Meter's FLOP accounting "
                         "is right when this is ~1 for a pure matmul load")
        if "measured_peak_over_table" in b:
            lines.append(f"    measured / datasheet peak = {b['measured_peak_over_table']:.3f}: "
                         "the part of the datasheet figure this card does not reach (clocks "
                         "under the power limit); MFU against the table is bounded by it")
    lines += ["", "(c) Meter overhead (interleaved with/without, median)"]
    if "ratio_median" not in c:
        lines.append(f"    not measured: {c.get('reason')}")
    else:
        met = "met" if c["ratio_median"] <= c["goal"] else "NOT met"
        lines.append(f"    ratio {c['ratio_median']:.4f} (paired {c['ratio_paired_median']:.4f}, "
                     f"process CPU {c['cpu_ratio_median']:.4f}); goal <= {c['goal']}: {met}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--out", default=None,
                   help="output folder (default outputs/reference/<device-slug>/)")
    p.add_argument("--n", type=positive_int, default=8192, help="matmul size")
    p.add_argument("--seconds", type=float, default=10.0, help="(a) steady-load seconds")
    p.add_argument("--warmup-s", type=float, default=3.0, help="(a) settle time before")
    p.add_argument("--interval", type=float, default=0.02, help="(a) power sample interval")
    p.add_argument("--mfu-steps", type=positive_int, default=30, help="(b) measured steps")
    p.add_argument("--overhead-steps", type=positive_int, default=8000,
                   help="(c) steps per round (~3.5 s at n=4096: a measured phase, not a blip)")
    p.add_argument("--overhead-rounds", type=positive_int, default=3, help="(c) pairs of rounds")
    p.add_argument("--overhead-n", type=positive_int, default=4096, help="(c) matmul size")
    p.add_argument("--skip", default="", help="comma list of parts to skip: a,b,c")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_validate: no CUDA GPU is available on this machine (torch.cuda.is_available() "
              "is False); run it on an H100/H200.", file=sys.stderr)
        return 2
    skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    facts = dev.device_facts(a.device)
    name = facts.get("device_name") or "unknown-gpu"
    out_dir = Path(a.out) if a.out else outputs_dir("reference", dev.device_slug(name))
    res: dict[str, Any] = {"command": shlex.join([sys.executable, *sys.argv]), "device": facts,
                           "started_at": now_iso(), "args": vars(a)}
    for part, fn in (("a_energy", lambda: part_a(a.device, a.n, a.seconds, a.warmup_s,
                                                 a.interval)),
                     ("b_mfu", lambda: part_b(a.device, a.n, a.mfu_steps)),
                     ("c_overhead", lambda: part_c(a.device, a.overhead_n, a.overhead_steps,
                                                   a.overhead_rounds))):
        if part[0] in skip:
            res[part] = {"ok": False, "reason": "skipped by --skip"}
            continue
        print(f"gpu_validate: running {part} ...", flush=True)
        try:
            res[part] = fn()
        except Exception as exc:  # keep the other parts' results
            res[part] = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                         "reason": f"{type(exc).__name__}: {exc}"}
    res["finished_at"] = now_iso()
    atomic_write_json(out_dir / "gpu_validate.json", res)
    text = summary_text(res)
    (out_dir / "gpu_validate.txt").write_text(text)
    print(text)
    print(f"wrote {out_dir / 'gpu_validate.json'} and gpu_validate.txt")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
