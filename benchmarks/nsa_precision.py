"""How far does bf16 rounding alone move NSA? Block choices that flip on near-ties (issue 28.4).

On an H200, fla's NSA under bf16 autocast differed from our reference, also under bf16, by 0.106
(logits, max|diff| / max|ref|), over ``kernels_check.py``'s 0.05 bound. NSA attends, per query
and KV head, to the n blocks of highest importance. Where two blocks score within rounding of
each other, two bf16 computations (fla's, the reference's) may choose differently, and their
outputs then differ by a whole block's attention. This script measures that on the reference
alone, with one model and the same tokens in fp32 and under bf16 autocast:

* logits ``max|bf16 - fp32| / max|fp32|`` (kernels_check's metric);
* per layer, the fraction of (query, KV head) rows whose chosen blocks differ between the two
  runs (layer 0 sees the same input in both; later layers also inherit earlier differences);
* per layer, in the fp32 run, the fraction of rows whose choice flips when the importance
  scores are moved by bf16's relative resolution (2^-8, random signs): the near-ties.

With CUDA and fla it also runs fla under bf16 and compares both bf16 runs with the fp32
reference: fla is as exact as bf16 allows where its distance is within 1.5x the bf16
reference's (two bf16 runs flip different near-ties). The same model with GQA attention is the
control: its bf16 error is rounding alone, with no choice to flip.

    python benchmarks/nsa_precision.py --device cpu --out outputs/reference/cpu-tiny/nsa-precision
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BF16_EPS = 2.0 ** -8  # bf16 keeps 8 significant bits: its relative resolution
SLACK = 1.5  # fla passes within this factor of the bf16 reference's own distance from fp32


def rel_err(a: Any, ref: Any) -> float:
    """kernels_check's logits metric: max|a - ref| / max|ref|."""
    return float((a - ref).abs().max() / ref.abs().max())


def build(preset: str, size: str, device: Any, attention: str = "nsa") -> tuple[Any, Any]:
    """The gpu preset's NSA model (stride = block, as fla requires), on the reference kernel
    with fla's forced-block rule; and the params. ``attention="gqa"`` builds the control: the
    same model with no block choice, whose bf16 error is rounding alone."""
    import torch

    from effllm_helpers import config
    from effllm_helpers.axes.architecture import effective_size
    from effllm_helpers.models import build as zoo_build

    p = config.notebook_params("architecture", preset, {"model": {"size": size}})
    spec = p.model.model_copy(update={"family": "transformer", "attention": attention,
                                      "positional": "rope", "nsa_stride": p.model.nsa_block})
    torch.manual_seed(0)
    s = effective_size(p)
    model = zoo_build(spec, s, vocab_size=p.data.vocab_size,
                      max_seq_len=max(p.data.seq_len, s.max_seq_len)).to(device).eval()
    set_kernel(model, "reference", "first_previous_current")
    return model, p


def set_kernel(model: Any, kernel: str, forced: str | None) -> None:
    from effllm_helpers.models import kernels

    for m in model.modules():
        if isinstance(m, kernels.KernelDispatch):
            m.kernel, m._choices = kernel, {}
            if hasattr(m, "forced"):
                m.forced = forced


def run(model: Any, ids: Any, bf16: bool) -> tuple[Any, list[dict[str, Any]]]:
    """Logits (fp32) and, per NSA layer, the chosen blocks and their near-tie fraction."""
    import torch

    from effllm_helpers.models import nsa

    layers: list[dict[str, Any]] = []
    choose = nsa.select_blocks
    gen = torch.Generator(device=ids.device).manual_seed(0)

    def watch(importance: Any, q_pos: Any, **kw: Any) -> Any:
        chosen = choose(importance, q_pos, **kw)
        noise = torch.randint(0, 2, importance.shape, generator=gen, device=importance.device)
        nudged = importance * (1 + BF16_EPS * (2 * noise - 1))
        flips = (choose(nudged, q_pos, **kw) != chosen).any(-1)
        layers.append({"chosen": chosen.cpu(), "near_tie_rows": float(flips.float().mean())})
        return chosen

    nsa.select_blocks = watch
    try:
        with torch.no_grad(), torch.autocast(ids.device.type, dtype=torch.bfloat16,
                                             enabled=bf16):
            logits = model(input_ids=ids).logits.float()
    finally:
        nsa.select_blocks = choose
    return logits, layers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="gpu")
    ap.add_argument("--size", default="small")
    ap.add_argument("--batch", type=int, default=2, help="sequences (kernels_check: 2)")
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto")
    ap.add_argument("--out", type=Path, default=None, help="folder for nsa_precision.json/.txt")
    args = ap.parse_args()

    import torch

    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                       if args.device == "auto" else args.device)
    t0 = time.perf_counter()
    model, p = build(args.preset, args.size, dev)
    seq_len = p.data.seq_len
    ids = torch.randint(0, p.data.vocab_size, (args.batch, seq_len),
                        generator=torch.Generator().manual_seed(1)).to(dev)
    ref32, l32 = run(model, ids, bf16=False)
    ref16, l16 = run(model, ids, bf16=True)
    gqa, _ = build(args.preset, args.size, dev, attention="gqa")  # the control
    gqa32, _ = run(gqa, ids, bf16=False)
    gqa16, _ = run(gqa, ids, bf16=True)
    del gqa
    out: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__, "preset": args.preset, "size": args.size,
        "seq_len": seq_len, "batch": args.batch,
        "nsa": {k: getattr(p.model, k) for k in ("nsa_block", "nsa_window", "nsa_selected")},
        "reference_bf16_vs_fp32_logits_rel_err": rel_err(ref16, ref32),
        "gqa_control_bf16_vs_fp32_logits_rel_err": rel_err(gqa16, gqa32),
        "layers": [{"layer": i, "rows_chosen_differently_bf16": float(
                        (a["chosen"] != b["chosen"]).any(-1).float().mean()),
                    "near_tie_rows_fp32": a["near_tie_rows"]}
                   for i, (a, b) in enumerate(zip(l32, l16, strict=True))],
        "command": " ".join(sys.argv),
    }
    if dev.type == "cuda":
        from effllm_helpers.models import kernels

        if kernels.fla_missing():
            out["fla"] = f"not run: {kernels.fla_missing()}"
        else:
            set_kernel(model, "fla", None)
            fla16, _ = run(model, ids, bf16=True)
            out["fla_bf16_vs_reference_fp32_logits_rel_err"] = rel_err(fla16, ref32)
            out["fla_bf16_vs_reference_bf16_logits_rel_err"] = rel_err(fla16, ref16)
            # two bf16 runs flip different near-ties: 1.5x the reference's own distance
            out["fla_as_exact_as_bf16_allows"] = (
                out["fla_bf16_vs_reference_fp32_logits_rel_err"]
                <= SLACK * out["reference_bf16_vs_fp32_logits_rel_err"])
    out["wall_s"] = time.perf_counter() - t0
    lines = [f"NSA reference at {args.preset}:{args.size}, seq {seq_len} x {args.batch} "
             f"on {out['device']}",
             f"logits, reference bf16 vs fp32: {out['reference_bf16_vs_fp32_logits_rel_err']:.4f}"
             " (max|diff| / max|ref|); the GQA control (no block choice): "
             f"{out['gqa_control_bf16_vs_fp32_logits_rel_err']:.4f}"]
    for row in out["layers"]:
        lines.append(f"  layer {row['layer']}: rows choosing other blocks in bf16 "
                     f"{row['rows_chosen_differently_bf16']:.4f}; near-ties in fp32 "
                     f"{row['near_tie_rows_fp32']:.4f}")
    for k in ("fla_bf16_vs_reference_fp32_logits_rel_err",
              "fla_bf16_vs_reference_bf16_logits_rel_err", "fla_as_exact_as_bf16_allows", "fla"):
        if k in out:
            lines.append(f"{k}: {out[k]}")
    lines.append(f"command: {out['command']}")
    print("\n".join(lines))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "nsa_precision.json").write_text(json.dumps(out, indent=1) + "\n")
        (args.out / "nsa_precision.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
