"""Do fla's kernels compute our NSA / RWKV-4 / Mamba, and how fast do they train? (issue 14)

For each variant at the gpu preset's small size (``--preset``, ``--size``; NSA with
``nsa_stride = nsa_block``, the only compression fla's ``parallel_nsa`` has, see
``effllm_helpers/models/nsa.py``) it builds one model and runs it twice, switching only the
kernel (``model.kernel`` fla vs reference; NSA's reference with fla's forced-block rule):

* **agreement**, on ``--check-batch`` sequences of ``seq_len`` random tokens, in fp32
  (``TRITON_F32_DEFAULT=ieee``, so Triton's fp32 dots are not TF32) and under bf16 autocast:
  logits ``max|fla - ref| / max|ref|`` and, after ``loss.backward()``, the worst parameter's
  gradient ``||g_fla - g_ref|| / ||g_ref||``. Passes within ``TOL`` (NSA's top-k may pick
  another block on a near-tie, hence looser NSA bounds);
* **a training step** (forward + backward under bf16 autocast, eager, batch ``--batch-size``),
  CUDA events after warm-up (the first calls autotune Triton): median ms and peak memory, for
  the fla path, the reference, and GQA (Llama) at the same size as the peer. NSA's goal:
  fla step time <= 1.5x GQA's.

Every item is independent: an error is recorded (type, message, traceback tail) and the rest
runs. transformers' RWKV JIT CUDA kernel is not built here (its ninja build is switched off), so
the RWKV reference is transformers' PyTorch loop, what an offline GPU host runs.

    PYTHONPATH=. python3 benchmarks/kernels_check.py --out outputs/reference/nvidia-h200
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")  # before Triton compiles anything
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VARIANTS = {  # name -> ModelSpec fields (the preset's NSA hyper-parameters apply)
    "nsa": {"family": "transformer", "attention": "nsa", "positional": "rope"},
    "rwkv": {"family": "rwkv"},
    "mamba": {"family": "mamba"},
}
# parameters the fla path does not use by design, so their gradients are not compared: fla's NSA
# pools compressed blocks by a plain mean, ours learns the pooling (pool_logits, zero-initialised
# = mean, so the forward agrees at init; the fla path gives it a zero gradient)
NOT_ON_FLA = {"nsa": ("pool_logits",)}
# (logits, grads) relative-error bounds per dtype; NSA's selection may flip on near-ties
TOL = {"fp32": (1e-3, 1e-2), "bf16": (3e-2, 1e-1)}
NSA_TOL = {"fp32": (1e-2, 5e-2), "bf16": (5e-2, 2e-1)}
# bf16 also against the fp32 reference: fla passes within this factor of the bf16 reference's
# own distance from it; the references themselves move under bf16 (benchmarks/bf16_agreement.py)
SLACK = 1.5


def _error(exc: BaseException) -> dict[str, str]:
    return {"error": f"{type(exc).__name__}: {exc}",
            "traceback": "".join(traceback.format_exception(exc)[-6:])}


def logits_rel_err(a: Any, ref: Any) -> float:
    """The agreement metric of logits: max|a - ref| / max|ref|."""
    return float((a - ref).abs().max() / ref.abs().max())


def run_once(model: Any, ids: Any, dtype: str) -> tuple[Any, dict[str, Any]]:
    """Logits and parameter gradients of one forward/backward (labels = inputs)."""
    import torch

    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == "bf16"):
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters()
             if p.grad is not None}
    return out.logits.detach().float(), grads


def compare(model: Any, ids: Any, dtype: str, forced: str | None, tol: dict,
            skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """fla vs reference on the same weights and tokens (gradients of parameters whose name
    contains one of ``skip`` are listed, not compared)."""
    from effllm_helpers.models import kernels

    kernels.switch(model, "fla")
    impl = {c.implementation for c in kernels.prepare(model, ids.device)}
    fla_logits, fla_grads = run_once(model, ids, dtype)
    kernels.switch(model, "reference", forced)
    ref_impl = {c.implementation for c in kernels.prepare(model, ids.device)}
    ref_logits, ref_grads = run_once(model, ids, dtype)
    logit_err = logits_rel_err(fla_logits, ref_logits)
    skipped = sorted(n for n in ref_grads if any(k in n for k in skip))
    grad_errs = {n: float((fla_grads[n] - g).norm() / g.norm().clamp_min(1e-30))
                 for n, g in ref_grads.items() if n in fla_grads and n not in skipped}
    missing = sorted(set(ref_grads) - set(fla_grads))
    worst = max(grad_errs, key=grad_errs.get)
    lt, gt = tol[dtype]
    out = {"fla": sorted(impl), "reference": sorted(ref_impl),
           "logits_rel_max_err": logit_err, "grad_rel_err_worst": grad_errs[worst],
           "grad_worst_param": worst, "grads_missing_on_fla": missing,
           "grads_not_compared": skipped,
           "tolerance": {"logits": lt, "grads": gt},
           "ok": logit_err <= lt and grad_errs[worst] <= gt}
    if dtype == "bf16":
        # the yardstick a fixed bound lacks: how far bf16 moves the reference itself
        # (benchmarks/bf16_agreement.py); fla passes within SLACK x that distance from fp32
        ref32, _ = run_once(model, ids, "fp32")
        fla_d, ref_d = (logits_rel_err(x, ref32) for x in (fla_logits, ref_logits))
        out["vs_fp32_reference"] = {"fla_bf16_logits_rel_err": fla_d,
                                    "reference_bf16_logits_rel_err": ref_d,
                                    "ok": fla_d <= SLACK * ref_d}
    return out


def time_step(model: Any, ids: Any, warmup: int, steps: int) -> dict[str, Any]:
    """Median fwd+bwd ms (bf16 autocast, CUDA events) and peak memory."""
    import torch

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return {"median_ms": statistics.median(times), "min_ms": min(times), "steps": steps,
            "warmup": warmup, "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}


def build(p: Any, fields: dict[str, Any], vocab: int, seq_len: int) -> Any:
    import torch

    from effllm_helpers.axes.architecture import effective_size
    from effllm_helpers.models import build as zoo_build

    torch.manual_seed(0)
    spec = p.model.model_copy(update=fields)
    size = effective_size(p)
    return zoo_build(spec, size, vocab_size=vocab,
                     max_seq_len=max(seq_len, size.max_seq_len)).cuda()


PHASES = ("agreement_fp32", "agreement_bf16", "step_fla", "step_reference")


def check_variant(name: str, p: Any, args: argparse.Namespace, vocab: int, seq_len: int,
                  batch: int, save: Any = None) -> dict[str, Any]:
    """The variant's phases (``--phases``, in :data:`PHASES` order), each timed in
    ``phase_s``; ``save(res)`` after each, so a run cut by a time box keeps what finished (on an
    H200 the NSA item alone outlasted a 250 s box: fla autotunes its kernels per dtype)."""
    import torch

    from effllm_helpers.models import kernels

    phases = [ph for ph in PHASES if ph in {x.strip() for x in args.phases.split(",")}]
    save = save or (lambda _res: None)

    fields = dict(VARIANTS[name])
    if name == "nsa":
        fields["nsa_stride"] = p.model.nsa_block
    res: dict[str, Any] = {"model": {k: str(v) for k, v in fields.items()}}
    try:
        model = build(p, fields, vocab, seq_len)
    except Exception as exc:
        return {**res, "build": _error(exc)}
    res["params"] = sum(x.numel() for x in model.parameters())
    res["phase_s"] = {}
    forced = "first_previous_current" if name == "nsa" else None
    tol = NSA_TOL if name == "nsa" else TOL
    gen = torch.Generator().manual_seed(1)
    check_ids = torch.randint(0, vocab, (args.check_batch, seq_len), generator=gen).cuda()
    ids = torch.randint(0, vocab, (batch, seq_len), generator=gen).cuda()
    for phase in phases:
        t = time.perf_counter()
        kind, _, arg = phase.partition("_")
        try:
            if kind == "agreement":
                res[phase] = compare(model, check_ids, arg, forced, tol, NOT_ON_FLA.get(name, ()))
            else:
                warmup, steps = (args.warmup, args.steps) if arg == "fla" else (1, args.ref_steps)
                kernels.switch(model, arg, forced if arg == "reference" else None)
                res[phase] = time_step(model, ids, warmup, steps)
        except Exception as exc:
            res[phase] = _error(exc)
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        res["phase_s"][phase] = time.perf_counter() - t
        save(res)
    return res


def _write(report: dict[str, Any], out: Path | None, t0: float) -> None:
    report["summary"] = summarise(report["items"])
    report["wall_s"] = time.perf_counter() - t0
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / "kernels_check.json.tmp"
        tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
        tmp.replace(out / "kernels_check.json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--out", type=Path, default=None, help="folder for kernels_check.json")
    ap.add_argument("--preset", default="gpu")
    ap.add_argument("--size", default="small")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
    ap.add_argument("--check-batch", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--ref-steps", type=int, default=2)
    ap.add_argument("--only", default="gqa,nsa,mamba,rwkv")
    ap.add_argument("--phases", default=",".join(PHASES),
                    help="comma list, run in this order whatever the list's: " + ", ".join(PHASES))
    ap.add_argument("--budget-s", type=float, default=200.0,
                    help="start no new item after this many seconds (recorded as skipped)")
    args = ap.parse_args()
    bad = [ph for ph in args.phases.split(",") if ph.strip() and ph.strip() not in PHASES]
    if bad:
        ap.error(f"--phases {','.join(bad)}: allowed {', '.join(PHASES)}")
    t0 = time.perf_counter()

    import torch
    from transformers.models.rwkv import modeling_rwkv

    from effllm_helpers import config
    from effllm_helpers.models import kernels

    modeling_rwkv.is_ninja_available = lambda: False  # no JIT build: the reference is the loop
    p = config.notebook_params("architecture", args.preset, {"model": {"size": args.size}})
    seq_len, vocab = p.data.seq_len, p.data.vocab_size
    batch = args.batch_size or p.train.batch_size
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "torch": torch.__version__, "fla_missing": kernels.fla_missing(),
        "preset": args.preset, "size": args.size, "size_spec": p.sizes[args.size].model_dump(),
        "seq_len": seq_len, "vocab": vocab, "batch": batch, "check_batch": args.check_batch,
        "nsa": {k: getattr(p.model, k) for k in ("nsa_block", "nsa_selected", "nsa_window")},
        "step": "forward+backward, bf16 autocast, eager (no torch.compile), CUDA events",
        "items": {},
    }
    try:
        import fla

        report["fla_version"] = getattr(fla, "__version__", "?")
    except Exception as exc:
        report["fla_version"] = f"not importable: {exc}"
    if not torch.cuda.is_available():
        report["error"] = "no CUDA device: this check compares CUDA kernels"
    else:
        for name in [n.strip() for n in args.only.split(",") if n.strip()]:
            if time.perf_counter() - t0 > args.budget_s:
                report["items"][name] = {"skipped": f"time budget {args.budget_s:.0f}s spent"}
                continue
            t_item = time.perf_counter()
            try:
                if name == "gqa":
                    model = build(p, {"family": "transformer", "attention": "gqa",
                                      "positional": "rope"}, vocab, seq_len)
                    ids = torch.randint(0, vocab, (batch, seq_len)).cuda()
                    report["items"][name] = {"step_reference": time_step(
                        model, ids, args.warmup, args.steps)}
                else:
                    def save(res: dict[str, Any], name: str = name) -> None:
                        report["items"][name] = res
                        _write(report, args.out, t0)

                    report["items"][name] = check_variant(name, p, args, vocab, seq_len, batch,
                                                          save)
            except Exception as exc:
                report["items"][name] = _error(exc)
            report["items"][name]["wall_s"] = time.perf_counter() - t_item
            model = None
            torch.cuda.empty_cache()
            print(f"{name}: done in {time.perf_counter() - t_item:.0f}s", flush=True)
            _write(report, args.out, t0)  # after every item: a killed run keeps what finished
    _write(report, args.out, t0)
    for line in report["summary"]:
        print(line)
    print(f"wall {report['wall_s']:.0f}s" + (f"; wrote {args.out / 'kernels_check.json'}"
                                             if args.out else ""))


def summarise(items: dict[str, Any]) -> list[str]:
    """One line per item: agreement, step times, and NSA's goal against GQA."""
    def ms(item: dict, key: str) -> float | None:
        return (item.get(key) or {}).get("median_ms")

    lines = []
    gqa_ms = ms(items.get("gqa", {}), "step_reference")
    for name, item in items.items():
        parts = [name]
        for dtype in ("fp32", "bf16"):
            a = item.get(f"agreement_{dtype}")
            if a:
                parts.append(f"{dtype}: " + (a["error"] if "error" in a else
                             f"{'ok' if a['ok'] else 'FAIL'} logits {a['logits_rel_max_err']:.1e} "
                             f"grads {a['grad_rel_err_worst']:.1e}"))
                v = a.get("vs_fp32_reference")
                if v:
                    parts.append(f"vs fp32 reference: fla {v['fla_bf16_logits_rel_err']:.1e}, "
                                 f"bf16 reference {v['reference_bf16_logits_rel_err']:.1e} "
                                 f"({'ok' if v['ok'] else 'FAIL'} within {SLACK}x)")
        for key in ("step_fla", "step_reference"):
            step = item.get(key)
            if step:
                parts.append(f"{key} " + (step["error"] if "error" in step else
                                          f"{step['median_ms']:.1f} ms"))
        if name == "nsa" and gqa_ms and ms(item, "step_fla"):
            ratio = ms(item, "step_fla") / gqa_ms
            verdict = "met" if ratio <= 1.5 else "not met"
            parts.append(f"fla/GQA {ratio:.2f}x (goal <= 1.5x: {verdict})")
        for key in ("error", "skipped"):
            if key in item:
                parts.append(f"{key}: {item[key]}")
        if "build" in item:
            parts.append(f"build: {item['build']['error']}")
        lines.append(" | ".join(parts))
    return lines


if __name__ == "__main__":
    main()
