"""How far does bf16 alone move a model? The yardstick for fla's bf16 agreement (issue 28.4-5).

On an H200, ``kernels_check.py`` compared fla under bf16 autocast with our reference, also under
bf16, and failed NSA and Mamba (the H200 page). Both fixed bounds assumed that the reference
itself barely moves under bf16. This script measures how far it does move: one model and the
same tokens in fp32 and under bf16 autocast, reference kernels only, logits
``max|bf16 - fp32| / max|fp32|`` (``kernels_check.logits_rel_err``). A dense GQA model of the
same size is the control: its bf16 error is rounding alone.

* **NSA** (``--variants nsa``): the block choice is what moves. Per layer it reports the share
  of (query, KV head) rows whose chosen blocks differ between the two runs (layer 0 sees the
  same input in both), and the share of fp32 rows whose choice flips when the importance scores
  move by bf16's relative resolution (2^-8, random signs): the near-ties.
* **Mamba** (``--variants mamba``): per layer, the hidden state's ``max|bf16 - fp32| /
  max|fp32|``: the scan runs in fp32, so what grows is the bf16 rounding of the projections
  that feed it, carried through the layers.

With CUDA and fla it also runs each variant's fla kernel under bf16 and compares it with the
fp32 reference, beside the bf16 reference: fla is as exact as bf16 allows where its distance
is within 1.5x the bf16 reference's (two bf16 runs round differently).

    python benchmarks/bf16_agreement.py --device cpu --out outputs/reference/cpu-tiny/bf16-agreement
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
sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels_check import SLACK, logits_rel_err  # noqa: E402 - the check this one calibrates

BF16_EPS = 2.0 ** -8  # bf16 keeps 8 significant bits: its relative resolution
VARIANTS = {  # name -> ModelSpec fields; gqa is the control
    "gqa": {"family": "transformer", "attention": "gqa", "positional": "rope"},
    "nsa": {"family": "transformer", "attention": "nsa", "positional": "rope"},
    "mamba": {"family": "mamba"},
}


def build(preset: str, size: str, device: Any, variant: str) -> tuple[Any, Any]:
    """The preset's model of ``variant`` on its reference kernel (NSA with stride = block and
    fla's forced-block rule, as kernels_check compares it), and the params."""
    import torch

    from effllm_helpers import config
    from effllm_helpers.axes.architecture import effective_size
    from effllm_helpers.models import build as zoo_build
    from effllm_helpers.models import kernels

    p = config.notebook_params("architecture", preset, {"model": {"size": size}})
    spec = p.model.model_copy(update={**VARIANTS[variant], "nsa_stride": p.model.nsa_block})
    torch.manual_seed(0)
    s = effective_size(p)
    model = zoo_build(spec, s, vocab_size=p.data.vocab_size,
                      max_seq_len=max(p.data.seq_len, s.max_seq_len)).to(device).eval()
    kernels.switch(model, "reference", "first_previous_current" if variant == "nsa" else None)
    return model, p


def run(model: Any, ids: Any, bf16: bool) -> tuple[Any, list[Any], list[dict[str, Any]]]:
    """Logits and hidden states (fp32; none where the model does not return them: our NSA
    decoder) and, per NSA layer, the chosen blocks and their near-tie share."""
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
            out = model(input_ids=ids, output_hidden_states=True)
    finally:
        nsa.select_blocks = choose
    hidden = [h.float() for h in (getattr(out, "hidden_states", None) or ())]
    return out.logits.float(), hidden, layers


def measure(variant: str, args: argparse.Namespace, dev: Any) -> dict[str, Any]:
    """One variant: the reference in fp32 and bf16 (and fla under bf16 where it runs)."""
    import torch

    model, p = build(args.preset, args.size, dev, variant)
    ids = torch.randint(0, p.data.vocab_size, (args.batch, p.data.seq_len),
                        generator=torch.Generator().manual_seed(1)).to(dev)
    ref32, h32, l32 = run(model, ids, bf16=False)
    ref16, h16, l16 = run(model, ids, bf16=True)
    res: dict[str, Any] = {
        "params": sum(x.numel() for x in model.parameters()),
        "reference_bf16_vs_fp32_logits_rel_err": logits_rel_err(ref16, ref32),
        "hidden_bf16_vs_fp32_rel_err": [logits_rel_err(b, a)
                                        for a, b in zip(h32, h16, strict=True)],
    }
    if l32:
        res["nsa_layers"] = [{"layer": i, "rows_chosen_differently_bf16": float(
                                 (a["chosen"] != b["chosen"]).any(-1).float().mean()),
                              "near_tie_rows_fp32": a["near_tie_rows"]}
                             for i, (a, b) in enumerate(zip(l32, l16, strict=True))]
    if dev.type == "cuda" and variant != "gqa":
        from effllm_helpers.models import kernels

        if kernels.fla_missing():
            res["fla"] = f"not run: {kernels.fla_missing()}"
        else:
            kernels.switch(model, "fla")
            fla16, _, _ = run(model, ids, bf16=True)
            res["fla_bf16_vs_reference_fp32_logits_rel_err"] = logits_rel_err(fla16, ref32)
            res["fla_bf16_vs_reference_bf16_logits_rel_err"] = logits_rel_err(fla16, ref16)
            res["fla_as_exact_as_bf16_allows"] = (
                res["fla_bf16_vs_reference_fp32_logits_rel_err"]
                <= SLACK * res["reference_bf16_vs_fp32_logits_rel_err"])
    return res


def lines_of(out: dict[str, Any]) -> list[str]:
    lines = [f"reference kernels at {out['preset']}:{out['size']}, seq {out['seq_len']} x "
             f"{out['batch']} on {out['device']}; logits max|bf16 - fp32| / max|fp32|"]
    for name, res in out["variants"].items():
        hidden = " ".join(f"{x:.3f}" for x in res["hidden_bf16_vs_fp32_rel_err"])
        lines.append(f"{name}: {res['reference_bf16_vs_fp32_logits_rel_err']:.4f}"
                     + (f"; hidden states by layer {hidden}" if hidden else ""))
        for row in res.get("nsa_layers", []):
            lines.append(f"  layer {row['layer']}: rows choosing other blocks in bf16 "
                         f"{row['rows_chosen_differently_bf16']:.4f}; near-ties in fp32 "
                         f"{row['near_tie_rows_fp32']:.4f}")
        for k in ("fla_bf16_vs_reference_fp32_logits_rel_err",
                  "fla_bf16_vs_reference_bf16_logits_rel_err", "fla_as_exact_as_bf16_allows",
                  "fla"):
            if k in res:
                lines.append(f"  {k}: {res[k]}")
    lines.append(f"command: {out['command']}")
    return lines


def variant_list(text: str) -> list[str]:
    """``--variants``: known names, at least one."""
    names = [v.strip() for v in text.split(",") if v.strip()]
    if not names or any(v not in VARIANTS for v in names):
        raise argparse.ArgumentTypeError(f"{text!r}: allowed {', '.join(VARIANTS)}")
    return names


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="gpu")
    ap.add_argument("--size", default="small")
    ap.add_argument("--batch", type=int, default=2, help="sequences (kernels_check: 2)")
    ap.add_argument("--variants", type=variant_list, default="gqa,nsa,mamba",
                    help=f"comma list of {', '.join(VARIANTS)} (gqa: the control)")
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto")
    ap.add_argument("--out", type=Path, default=None,
                    help="folder for bf16_agreement.json/.txt")
    args = ap.parse_args()
    names = args.variants

    import torch

    from effllm_helpers import config

    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                       if args.device == "auto" else args.device)
    t0 = time.perf_counter()
    p = config.notebook_params("architecture", args.preset, {"model": {"size": args.size}})
    out: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__, "preset": args.preset, "size": args.size,
        "seq_len": p.data.seq_len, "batch": args.batch,
        "nsa": {k: getattr(p.model, k) for k in ("nsa_block", "nsa_window", "nsa_selected")},
        "variants": {v: measure(v, args, dev) for v in names},
        "command": " ".join(sys.argv),
    }
    out["wall_s"] = time.perf_counter() - t0
    lines = lines_of(out)
    print("\n".join(lines))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bf16_agreement.json").write_text(json.dumps(out, indent=1) + "\n")
        (args.out / "bf16_agreement.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
