"""Fine-tuning methods at a real size on packed rows (issue 25's GPU reference and its goals).

Each method runs the study's own code (``axes.finetuning.run``: packing chosen by the model
probe, accelerate + bf16 autocast, optional torch.compile, the Meter) on a ``random:<shape>``
base, in a process of its own (so one method's memory and compiled graphs never reach the next),
and writes its record-like JSON as soon as it finishes (a time box keeps what finished). Quality
of random weights is null by design; the efficiency columns are the point.

    python benchmarks/finetune_scale.py --shape qwen2.5-1.5b \
        --methods full,lora,dora,rslora,freeze --rows 8 --max-len 1024 --steps 30 --compile \
        --out outputs/reference/<device>/finetune-1.5b
    python benchmarks/finetune_scale.py ... --methods lora --quant nf4   # QLoRA (bitsandbytes)

Goals (issue 25): LoRA s/step <= 0.8x full's, LoRA peak memory <= 0.6x full's, full MFU >= 0.35,
padding <= 5 % of computed positions.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

KEYS = ("al_s", "peak_gb", "torch_max_allocated_gb", "torch_max_reserved_gb", "amu_gb", "mfu",
        "tokens_per_s", "samples_per_s", "padding_frac", "computed_positions", "real_tokens",
        "loss_tokens", "compile_s", "aec_w", "j_per_token")


def one(args: argparse.Namespace, method: str, quant: str) -> dict[str, Any]:
    """Run one method in this process; the row of the table."""
    import torch

    from effllm_helpers import config
    from effllm_helpers.axes import finetuning
    from effllm_helpers.models import sources

    hidden = sources.random_config(f"random:{args.shape}").hidden_size
    # about --rows packed rows of --max-len tokens per step: as many examples as fit a row at
    # the longest example length, so first-fit decreasing fills --rows rows to a similar width
    from effllm_helpers import data

    tok = sources._workbook_tokenizer()
    task = data.load_task(args.task, 512, 16, seed=0)
    lens = [len(p) + len(r) for p, r in data.sft_rows(task.train, tok, args.max_len)]
    per_row = max(1, args.max_len // max(lens))
    over = {"base_model": f"random:{args.shape}", "method": method, "quant": quant,
            "task": args.task, "max_len": args.max_len, "packing": args.packing,
            "train": {"steps": args.steps, "batch_size": int(per_row * args.rows),
                      "compile": args.compile, "eval_every": 10_000},
            "measure": {"warmup_steps": args.warmup}}
    if args.lora_dropout is not None:
        over["dropout"] = args.lora_dropout
    p = config.notebook_params("finetuning", "gpu", over)
    t0 = time.perf_counter()
    res = finetuning.run(p, progress=False)
    row: dict[str, Any] = {"method": method + ("" if quant == "none" else f"+{quant}"),
                           "shape": args.shape, "params": res.model["params_total"],
                           "trainable": res.model["params_trainable"],
                           "examples_per_step": p.train.batch_size,
                           "packing": res.model["packing"], "wall_s": time.perf_counter() - t0,
                           "wall_phases_s": res.model.get("wall_phases_s"),
                           "device": torch.cuda.get_device_name(0) if torch.cuda.is_available()
                           else "cpu", "hidden_size": hidden}
    row["dropout"] = p.dropout
    # energy over a window shorter than the counter needs (measure/energy.py): more --steps
    row["energy_short_window"] = bool((res.metrics.get("j_per_token") or {}).get("short_window"))
    for k in KEYS:
        m = res.metrics.get(k) or {}
        row[k] = m.get("value")
        if m.get("value") is None and m.get("reason"):
            row[f"{k}_reason"] = m["reason"]
    return row


def table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'method':<12}{'s/step':>8}{'peak GB':>9}{'alloc GB':>9}{'MFU':>7}{'pad':>7}"
            f"{'tok/s':>10}")
    lines = [head]
    def f(r: dict[str, Any], k: str, fmt: str) -> str:
        return "-" if r.get(k) is None else format(r[k], fmt)

    for r in rows:
        lines.append(f"{r['method']:<12}{f(r, 'al_s', '.3f'):>8}{f(r, 'peak_gb', '.1f'):>9}"
                     f"{f(r, 'mfu', '.3f'):>7}{f(r, 'padding_frac', '.3f'):>7}"
                     f"{f(r, 'tokens_per_s', '.0f'):>10}")
    return "\n".join(lines)


def goals(rows: list[dict[str, Any]]) -> list[str]:
    by = {r["method"]: r for r in rows}
    full, lora = by.get("full"), by.get("lora")
    out = []
    if full and lora and full.get("al_s") and lora.get("al_s"):
        out.append(f"LoRA s/step / full = {lora['al_s'] / full['al_s']:.2f} (goal <= 0.8)")
    # NVML's process peak holds the allocator's cache; the tensors' own peak is the technique's
    for key, what in (("peak_gb", "NVML process"), ("torch_max_allocated_gb", "allocated")):
        if full and lora and full.get(key) and lora.get(key):
            out.append(f"LoRA peak / full peak ({what}) = {lora[key] / full[key]:.2f} "
                       "(goal <= 0.6)")
    if full and full.get("mfu") is not None:
        out.append(f"full MFU = {full['mfu']:.3f} (goal >= 0.35)")
    pads = [r["padding_frac"] for r in rows if r.get("padding_frac") is not None]
    if pads:
        out.append(f"padding max = {max(pads):.3f} of computed positions (goal <= 0.05)")
    return out


def fraction(text: str) -> float:
    """``--lora-dropout``: a probability in [0, 1)."""
    try:
        x = float(text)
    except ValueError:
        x = -1.0
    if not 0.0 <= x < 1.0:
        raise argparse.ArgumentTypeError(f"{text!r}: a dropout probability in [0, 1)")
    return x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen2.5-1.5b",
                    help="a random:<shape> name, or a config.json path")
    ap.add_argument("--methods", default="full,lora,dora,rslora,freeze")
    ap.add_argument("--quant", default="none", help="none | nf4 | fp4 (QLoRA base)")
    ap.add_argument("--task", default="arithmetic:easy")
    ap.add_argument("--rows", type=int, default=8, help="packed rows per step (default 8)")
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--packing", default="auto")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--lora-dropout", type=fraction, default=None,
                    help="adapter dropout (default: the gpu preset's 0.1, the paper's). peft "
                         "applies it to each adapted layer's input separately and keeps each "
                         "mask for the backward: 0 measures LoRA without that traffic")
    ap.add_argument("--warmup", type=int, default=5, help="Meter warm-up steps")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("outputs/finetune_scale"))
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run this method here
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.one:
        row = one(args, args.one, args.quant)
        (args.out / f"{row['method']}.json").write_text(json.dumps(row, indent=1, default=str))
        return
    rows = []
    for method in args.methods.split(","):
        cmd = [sys.executable, __file__, "--one", method, *sys.argv[1:]]
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, check=False).returncode
        name = method + ("" if args.quant == "none" else f"+{args.quant}")
        path = args.out / f"{name}.json"
        if rc == 0 and path.is_file():
            rows.append(json.loads(path.read_text()))
            print(f"{name}: ok in {time.perf_counter() - t0:.0f} s", flush=True)
        else:
            print(f"{name}: failed (exit {rc})", flush=True)
    every = sorted(args.out.glob("*.json"))
    rows = [json.loads(p.read_text()) for p in every if p.name != "summary.json"]
    print(table(rows))
    for line in goals(rows):
        print(line)
    (args.out / "summary.json").write_text(json.dumps({"rows": rows, "goals": goals(rows),
                                                       "argv": sys.argv[1:]}, indent=1,
                                                      default=str))


if __name__ == "__main__":
    main()
