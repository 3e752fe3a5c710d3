"""Check compiled pretraining on a GPU: every architecture compiles, compile time stays apart.

For each architecture spec, the architecture axis runs twice at a preset (default ``gpu``, few
steps), eager and with ``train.compile``, and the script reports per run: ``compile_s`` (null
when eager), AL's step count against the measured steps (the compiling steps must be warm-up, and
intermediate evaluations must not be in AL), AL p50/p99, TT and validation perplexity. A spec
whose compiled run fails is recorded with its error, not hidden.

Checks (``ok`` per spec): the compiled run recorded ``compile_s``; AL counts exactly
``steps - warm-up`` latencies in both runs; the compiled AL p99 is below ``compile_s`` (no
recompilation inside the measured window).

Writes <out>/compiled_pretrain_check.json (default outputs/reference/<device-slug>/) and prints
a table. Without a GPU it prints why and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from measure_overhead import positive_int  # noqa: E402 - the sibling script's argparse type

from effllm_helpers import config  # noqa: E402
from effllm_helpers.axes import architecture  # noqa: E402
from effllm_helpers.measure import device as dev  # noqa: E402
from effllm_helpers.paths import outputs_dir  # noqa: E402
from effllm_helpers.results import atomic_write_json, now_iso  # noqa: E402

SPECS = {
    "gqa": {"attention": "gqa"},
    "mha": {"attention": "mha"},
    "mla": {"attention": "mla"},
    "nsa": {"attention": "nsa", "positional": "sinusoidal"},
    "alibi": {"positional": "relative"},
    "moe": {"ffn": "moe"},
    "mamba": {"family": "mamba"},
    "rwkv": {"family": "rwkv"},
    "pythia": {"family": "pythia"},
}


def one_run(preset: str, spec: dict[str, Any], compile_on: bool, steps: int,
            eval_every: int) -> dict[str, Any]:
    p = config.notebook_params("architecture", preset, {
        "model": spec, "save_model": False,
        "train": {"steps": steps, "eval_every": eval_every, "compile": compile_on}})
    t0 = time.perf_counter()
    try:
        res = architecture.run(p, progress=False)
    except Exception as exc:  # a spec that cannot compile is a finding, not a crash
        return {"error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc()[-2000:]}
    m = res.metrics
    warm = m["compile_s"].get("warmup_steps", p.measure.warmup_steps)
    al = m["al_s"]
    return {"wall_s": time.perf_counter() - t0, "steps": steps, "warmup_steps": warm,
            "compile_s": m["compile_s"]["value"], "compile_step_s": m["compile_s"].get("step_s"),
            "al_n": al.get("n"), "al_mean_s": al["value"], "al_p50_s": al.get("p50"),
            "al_p99_s": al.get("p99"), "excluded_eval_intervals": al.get("excluded_eval_intervals"),
            "tokens_per_s": m["tokens_per_s"]["value"], "tt": m["tt"]["value"],
            "mfu": m["mfu"]["value"], "val_ppl": res.quality["val_ppl"]["value"],
            "val_n_tokens": res.quality["val_ppl"].get("n_tokens"),
            "duration_note": m["duration_s"].get("note")}


def check(eager: dict[str, Any], comp: dict[str, Any]) -> dict[str, Any]:
    if "error" in eager or "error" in comp:
        return {"ok": False, "why": "a run failed"}
    why = []
    if comp["compile_s"] is None:
        why.append("compiled run has no compile_s")
    for name, r in (("eager", eager), ("compiled", comp)):
        if r["al_n"] != r["steps"] - r["warmup_steps"]:
            why.append(f"{name}: AL has {r['al_n']} latencies, expected "
                       f"{r['steps'] - r['warmup_steps']}")
    if comp["compile_s"] is not None and comp["al_p99_s"] is not None \
            and comp["al_p99_s"] >= comp["compile_s"]:
        why.append("compiled AL p99 >= compile_s: a recompilation inside the measured window?")
    return {"ok": not why, "why": "; ".join(why),
            "speedup_tokens_per_s": (comp["tokens_per_s"] / eager["tokens_per_s"]
                                     if comp["tokens_per_s"] and eager["tokens_per_s"] else None)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--preset", default="gpu")
    ap.add_argument("--steps", type=positive_int, default=30)
    ap.add_argument("--eval-every", type=positive_int, default=15)
    ap.add_argument("--specs", default=",".join(SPECS), help="comma list of " + ",".join(SPECS))
    ap.add_argument("--out", default=None, help="folder (default outputs/reference/<device>/)")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("compiled_pretrain_check: no CUDA device here", file=sys.stderr)
        return 2
    names = [s.strip() for s in a.specs.split(",") if s.strip()]
    unknown = [s for s in names if s not in SPECS]
    if unknown:
        ap.error(f"unknown spec(s) {unknown}; allowed: {', '.join(SPECS)}")
    rows = {}
    for name in names:
        eager = one_run(a.preset, SPECS[name], False, a.steps, a.eval_every)
        comp = one_run(a.preset, SPECS[name], True, a.steps, a.eval_every)
        rows[name] = {"eager": eager, "compiled": comp, **check(eager, comp)}
        c = rows[name]
        print(f"{name:8s} ok={c['ok']!s:5s} compile_s={comp.get('compile_s')} "
              f"al_p50 eager/compiled={eager.get('al_p50_s')}/{comp.get('al_p50_s')} "
              f"speedup={c.get('speedup_tokens_per_s')} {c['why']}", flush=True)
    gpu = torch.cuda.get_device_name(0)
    out_dir = Path(a.out) if a.out else outputs_dir("reference", dev.device_slug(gpu))
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {"command": shlex.join([sys.executable, *sys.argv]), "when": now_iso(),
           "device": gpu, "torch": torch.__version__,
           "preset": a.preset, "results": rows,
           "all_ok": all(r["ok"] for r in rows.values())}
    atomic_write_json(out_dir / "compiled_pretrain_check.json", doc)
    print(json.dumps({"all_ok": doc["all_ok"], "out": str(out_dir)}))
    return 0 if doc["all_ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
