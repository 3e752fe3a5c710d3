"""MFU of our pretraining loop on the dense GQA model at the gpu preset (issue 4, goal >= 40 %).

It runs the study's own loop (``effllm_helpers.train.train``: accelerate, bf16 autocast, fused
AdamW, optional torch.compile) on random tokens — MFU does not depend on the data — and reads MFU
from the Meter: analytic model FLOPs/token (``models.flops``, causal attention counted as done)
times tokens/s over the device's dense bf16 peak (peak table, or a measured matmul calibration).
It also reports MFU against the *measured* bf16 matmul peak, which is what the loop could reach.

The measured window is the sweeps' own (the Meter inside ``train.train``: after the warm-up
steps, evaluations paused). Two things used to differ from a sweep and are now the same: the
window lasts at least ``--min-window-s`` (4 s, the energy counter's; 40 steps of a gpu-preset
model are a fraction of a sweep's 200), and the matmul peak is calibrated after the loops, so
the timed loop does not start on a card heated by seconds of 8192^3 matmuls (issue 28: the
sweep read a higher MFU than this benchmark on the same model).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def seconds(text: str) -> float:
    """``--min-window-s``: a non-negative number of seconds (0: never re-run)."""
    try:
        x = float(text)
    except ValueError:
        x = -1.0
    if not x >= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: seconds, 0 or more")
    return x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="gpu", help="preset whose sizes are used (default gpu)")
    ap.add_argument("--size", default="medium", help="size name in the preset (default medium)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--grad-accum", type=int, default=1,
                    help="micro-batches per optimizer step (default 1: the optimizer's cost is "
                         "counted in full; the paper preset itself accumulates 16)")
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--steps", type=int, default=40, help="measured steps (after warm-up)")
    ap.add_argument("--min-window-s", type=seconds, default=None,
                    help="shortest measured window (default: the energy counter's, "
                         "measure/energy.py COUNTER_MIN_WINDOW_S = 4 s); a shorter one is "
                         "re-run with proportionally more steps, so MFU and energy share one "
                         "window the counter can measure")
    ap.add_argument("--warmup", type=int, default=8, help="steps excluded (compile happens here)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--impls", default="hf",
                    help="comma list of implementations, run in this order: hf, liger")
    ap.add_argument("--out", type=Path, default=None,
                    help="folder for pretrain_mfu.json/.txt (default outputs/reference/<device>)")
    args = ap.parse_args()
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    unknown = [i for i in impls if i not in IMPLS]
    if unknown or not impls:
        ap.error(f"--impls {args.impls!r}: allowed {', '.join(IMPLS)}")
    if "liger" in impls and impls[-1] != "liger":
        ap.error("--impls: liger patches transformers for the whole process, so it must be last")

    import torch

    from effllm_helpers import config
    from effllm_helpers.measure import calibrate_matmul
    from effllm_helpers.measure.device import device_slug

    if not torch.cuda.is_available():
        raise SystemExit("pretrain_mfu.py needs a CUDA GPU (MFU on a CPU is not the question)")
    torch.backends.cuda.matmul.allow_tf32 = True
    p = config.notebook_params("architecture", args.preset, None)
    if args.size not in p.sizes:
        ap.error(f"--size {args.size!r} not in the {args.preset} preset; allowed: "
                 f"{', '.join(p.sizes)}")
    size = p.sizes[args.size]
    name = torch.cuda.get_device_name(0)
    runs = []
    for impl in impls:
        try:
            out = run_one(impl, args, p, size)
        except Exception as exc:  # keep the peers' figures; say what failed
            out = {"impl": impl, "error": f"{type(exc).__name__}: {exc}"}
        out["command"] = " ".join(sys.argv)
        out["device"] = name
        runs.append(out)
        torch.cuda.empty_cache()
    # the matmul peak is measured after the loops, not before: seconds of 8192^3 matmuls leave
    # the card hot and power-capped, and the loop a sweep times starts from a card that is not
    peak_meas = calibrate_matmul("cuda", "bf16")
    lines: list[str] = []
    for out in runs:
        if "error" not in out:
            out["measured_matmul_peak_flops"] = peak_meas
            out["mfu_vs_measured_matmul_peak"] = (out["flops_per_token_train"]
                                                  * out["tokens_per_s"] / peak_meas)
        lines += summary(out, name, args)
    dest = args.out or ROOT / "outputs" / "reference" / device_slug(name)
    dest.mkdir(parents=True, exist_ok=True)
    body = runs[0] if len(runs) == 1 else {"runs": runs}
    (dest / "pretrain_mfu.json").write_text(json.dumps(body, indent=1, default=str))
    (dest / "pretrain_mfu.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


IMPLS = ("hf", "liger")


def run_one(impl: str, args: argparse.Namespace, p: Any, size: Any) -> dict[str, Any]:
    """One implementation: build the dense GQA model, train it with the study's loop, read the
    Meter."""
    import torch

    from effllm_helpers import models, train

    kernels = "transformers Llama modules"
    if impl == "liger":
        import liger_kernel
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True,
                                    fused_linear_cross_entropy=True, cross_entropy=False)
        kernels = (f"liger-kernel {getattr(liger_kernel, '__version__', '?')}: RMSNorm, RoPE, "
                   "SwiGLU, fused linear cross-entropy")
        if args.compile:
            kernels += liger_loss_outside_compile()
    with torch.device("cuda"):  # initialised on the GPU: a 1B+ model builds in seconds
        model = models.build({"attention": "gqa", "positional": "rope", "ffn": "dense"}, size,
                             vocab_size=args.vocab, max_seq_len=args.seq_len)
    counts = models.count_params(model)
    fpt = models.flops_per_token(model.config, args.seq_len, training=True)
    fpt_full = models.flops.flops_per_token(model.config, args.seq_len, training=True,
                                            causal_discount=False)
    spec = p.train.model_copy(update={"steps": args.warmup + args.steps,
                                      "batch_size": args.batch_size, "dtype": "bf16",
                                      "grad_accum": args.grad_accum,
                                      "compile": args.compile, "warmup_steps": 2,
                                      "eval_every": 10**9})
    meas = p.measure.model_copy(update={"warmup_steps": args.warmup})
    blocks = torch.randint(0, args.vocab, (args.batch_size * args.grad_accum * 64, args.seq_len))
    t0 = time.time()
    res = train.train(model, train.block_batches(blocks, args.batch_size), spec, meas,
                      n_params=counts["total"], flops_per_token=fpt, progress=False,
                      log_every=10)
    steps, window = args.steps, res.metrics["duration_s"]["value"]
    first_window = window
    if window is not None and window < min_window_s(args):
        # the same loop again (compiled graphs are reused), long enough for the counter
        steps = math.ceil(args.steps * 1.2 * min_window_s(args) / window)
        res = train.train(model, train.block_batches(blocks, args.batch_size),
                          spec.model_copy(update={"steps": args.warmup + steps}), meas,
                          n_params=counts["total"], flops_per_token=fpt, progress=False,
                          log_every=10)
    wall = time.time() - t0
    m = res.metrics
    tok_s = m["tokens_per_s"]["value"]
    peak_used = m["mfu"]["peak_flops"]
    return {
        "impl": impl, "kernels": kernels, "preset": args.preset, "size": args.size,
        "model": {"d_model": size.d_model, "n_layers": size.n_layers, "n_heads": size.n_heads,
                  "n_kv_heads": size.n_kv_heads, "d_ff": size.d_ff, "vocab": args.vocab,
                  "seq_len": args.seq_len, "params": counts["total"]},
        "batch_size": args.batch_size, "grad_accum": args.grad_accum, "compile": args.compile,
        "measured_steps": steps, "window_s": m["duration_s"]["value"],
        **({"window_extended_from": {"steps": args.steps, "window_s": first_window}}
           if steps != args.steps else {}),
        "flops_per_token_train": fpt, "flops_per_token_train_no_causal_discount": fpt_full,
        "tokens_per_s": tok_s,
        "step_s": m["al_s"]["value"],
        "mfu": m["mfu"],
        "pcu_nvml": m["pcu"],
        "peak_flops_used": peak_used,
        "mfu_no_causal_discount": fpt_full * tok_s / peak_used,
        "aec_w": m["aec_w"], "energy_j": m["energy_j"], "amu_gb": m["amu_gb"],
        "peak_gb": m["peak_gb"], "final_loss": res.final_loss, "wall_s_incl_compile": wall,
    }


def min_window_s(args: argparse.Namespace) -> float:
    """The shortest measured window: ``--min-window-s`` or the energy counter's."""
    from effllm_helpers.measure.energy import COUNTER_MIN_WINDOW_S

    return COUNTER_MIN_WINDOW_S if args.min_window_s is None else args.min_window_s


def liger_loss_outside_compile() -> str:
    """Keep liger's fused linear cross-entropy out of dynamo's graph; say so for the record.

    Traced by torch.compile (torch 2.11), its chunked ``addmm(..., out_dtype=fp32)`` fails in
    fake-tensor propagation, so the whole liger run failed on an H200. The loss is an autograd
    Function that launches its own Triton kernels: run eagerly between the compiled decoder and
    the optimizer, it is what liger's users get (their trainers compile the model, not the loss).
    """
    import liger_kernel.transformers.model.llama as liger_llama
    import torch

    liger_llama.LigerForCausalLMLoss = torch.compiler.disable(liger_llama.LigerForCausalLMLoss)
    return " (the fused loss runs outside the compiled graph: torch.compiler.disable)"


def summary(out: dict[str, Any], name: str, args: argparse.Namespace) -> list[str]:
    """Readable lines of one implementation's result."""
    if "error" in out:
        return [f"[{out['impl']}] failed: {out['error']}"]
    mm, m = out["model"], out["mfu"]
    return [
        f"[{out['impl']}] pretrain_mfu on {name}: dense GQA d={mm['d_model']} L={mm['n_layers']} "
        f"({mm['params'] / 1e6:.1f}M params), batch {args.batch_size}x{args.seq_len}"
        f"{f' x{args.grad_accum} accumulated' if args.grad_accum > 1 else ''}, bf16, "
        f"fused AdamW, compile={args.compile}; {out['kernels']}",
        f"tokens/s {out['tokens_per_s']:,.0f}   optimizer step {out['step_s'] * 1e3:.1f} ms"
        + ("   window unmeasured" if out["window_s"] is None else
           f"   window {out['window_s']:.1f} s over {out['measured_steps']} steps")
        + (f" (re-run: {out['window_extended_from']['window_s']:.1f} s over "
           f"{out['window_extended_from']['steps']} was under the energy counter's minimum)"
           if "window_extended_from" in out else ""),
        f"MFU (analytic FLOPs, causal attention counted as done) = {m['value']:.3f} "
        f"[{m['method']}]",
        f"MFU counting full attention (PaLM-style)              = "
        f"{out['mfu_no_causal_discount']:.3f}",
        f"peak used {out['peak_flops_used'] / 1e12:.0f} TF/s; measured bf16 8192^3 matmul "
        f"{out['measured_matmul_peak_flops'] / 1e12:.0f} TF/s -> MFU vs measured "
        f"{out['mfu_vs_measured_matmul_peak']:.3f}",
        f"NVML utilisation (paper PCU) {out['pcu_nvml']['value']}",
        f"power {out['aec_w']['value']} W, energy {out['energy_j']['value']} J",
        f"command: {out['command']}",
    ]


if __name__ == "__main__":
    main()
