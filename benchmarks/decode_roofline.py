"""bf16 batch-1 decode speed of the gpu-preset model against the memory-bandwidth bound (issue 6).

At batch 1 every generated token reads all weights and the KV cache once, so the bound is
``tokens/s <= copy bandwidth / (weight bytes + KV bytes read per token)``. The bandwidth is
measured here (a large device-to-device copy moves 2x its size), not taken from a datasheet.
Variants (greedy, exactly N new tokens, first token excluded from the rate):

* ``dynamic_eager`` - Hugging Face ``generate`` with its default dynamic cache, eager kernels;
* ``hf_static_compiled`` - ``generate`` with ``cache_implementation="static"``, which lets
  transformers compile the decode step itself;
* ``static_graph`` - the library's decode engine (``effllm_helpers.decode``, what the inference
  axis serves with on CUDA): a greedy loop over a static KV cache, the eager one-token step
  captured in a CUDA graph, one replay per token;
* ``static_graph_compiled_k`` - the same engine with the step compiled by ``torch.compile``
  (inductor kernels, no cudagraph trees) and K tokens captured into one graph (the next token is
  written on the device), so the host launches one graph per K tokens. Its inductor options
  include coordinate-descent tuning, which lowers each batch-1 projection to a tuned Triton
  reduction (the library's default, ``tune_gemv``);
* ``static_graph_compiled_k_cublas`` - the same without that option: the projections stay cuBLAS
  GEMMs (what the engine did before; the peer that shows what the tuning buys).
* ``static_graph_compiled_k_fused`` - ``static_graph_compiled_k`` after q/k/v and gate/up are
  fused into one matmul each (``effllm_helpers.models.fused``; the inference axis's
  ``fuse_projections``): four weight products per layer and token instead of seven. The fusion
  rewrites the model in place, so this variant always runs last.

Reference runs before the engine moved into the library called the last two
``own_loop_cuda_graphs`` (compiled, reduce-overhead) and ``own_loop_graph_k``; ``--replot``
still draws them.

Besides the gpu-preset model (``--sizes``' first entry), ``--sizes`` can add larger models of the
same family (random weights: speed does not depend on them) to show where batch-1 decode stops
being launch bound. Writes decode_roofline.{json,txt,png,pdf}; the figure is a roofline: tokens/s
against bytes read per token, with the bandwidth bound as a line.

    python benchmarks/decode_roofline.py --sizes gpu:medium paper:small paper:medium
Goal: >= 60 % of the bound for the gpu-preset model.
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

VARIANTS = ("dynamic_eager", "hf_static_compiled", "static_graph", "static_graph_compiled_k",
            "static_graph_compiled_k_cublas", "static_graph_compiled_k_fused")
LEGACY_VARIANTS = ("own_loop_cuda_graphs", "own_loop_graph_k")  # names in older json files


def copy_bandwidth(n_bytes: int = 2 << 30, reps: int = 20) -> float:
    """Best bytes/s of a device-to-device copy (read + write counted)."""
    import torch

    src = torch.empty(n_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n_bytes / best


def _sync(dev: Any) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize()


def time_generate(model, prompt, new_tokens: int, repeats: int, **kw) -> tuple[float, list[int]]:
    """Median decode tokens/s (first token excluded) over ``repeats`` greedy generations, and
    the generated tokens."""
    from effllm_helpers.measure import timed_generate

    rates, toks = [], []
    for i in range(repeats + 2):  # two warm-ups: compile / graph capture happen there
        _sync(prompt.device)
        out, timer = timed_generate(model, input_ids=prompt, max_new_tokens=new_tokens,
                                    min_new_tokens=new_tokens, do_sample=False, **kw)
        toks = out[0, prompt.shape[1]:].tolist()
        if i >= 2 and timer.tpot_s:
            rates.append(1.0 / timer.tpot_s)
    rates.sort()
    return rates[len(rates) // 2], toks


def kernel_profile(fn, n_tokens: int, dest: Path) -> dict[str, Any]:
    """Run ``fn`` once under ``torch.profiler`` and write the kernels that took the time.

    Writes ``dest`` (a table sorted by device time) and returns the totals: kernels launched per
    generated token and the device time they account for. This is what says whether batch-1
    decode is bound by the weights' bytes or by the count of kernels (CUDA-graph replays are
    traced too)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        fn()
    events = prof.key_averages()
    dev = [e for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    sort = "device_time_total" if dev else "cpu_time_total"
    dest.write_text(events.table(sort_by=sort, row_limit=40) + "\n")
    launches = sum(e.count for e in dev)
    busy_us = sum(getattr(e, "device_time_total", 0.0) for e in dev)
    return {"table": dest.name, "kernels": launches,
            "kernels_per_token": launches / n_tokens if n_tokens else None,
            "kernel_time_us_per_token": busy_us / n_tokens if n_tokens else None}


def engine_loop(model, prompt, new_tokens: int, repeats: int, *, use_graph: bool | None = None,
                compile_step: bool = False, steps_per_graph: int = 1, tune_gemv: bool = True,
                profile_to: Path | None = None) -> tuple[float, list[int]]:
    """Median decode tokens/s (1 / TPOT, first token excluded) of the library's ``static_graph``
    engine (:class:`effllm_helpers.decode.StaticGraphDecoder`), and its tokens.

    The decoder (static cache, buffers, CUDA graph) is built once and serves every request; two
    warm-up requests run first."""
    from effllm_helpers.decode import StaticGraphDecoder

    dec = StaticGraphDecoder(model, prompt.shape[0], prompt.shape[1], new_tokens,
                             use_graph=use_graph, compile_step=compile_step,
                             steps_per_graph=steps_per_graph, tune_gemv=tune_gemv)
    if dec.fallback_reason and prompt.device.type == "cuda" and use_graph is not False:
        raise RuntimeError(dec.fallback_reason)  # report it: this variant is about the graph
    rates, toks = [], []
    for i in range(repeats + 2):
        out, timing = dec.decode(prompt)
        if i >= 2 and timing.tpot_s:
            rates.append(1.0 / timing.tpot_s)
        toks = out[0].tolist()
    rates.sort()
    if profile_to is not None:  # after the timed requests: the profiler's cost is not timed
        stats = kernel_profile(lambda: dec.decode(prompt), new_tokens * prompt.shape[0],
                               profile_to)
        profile_to.with_suffix(".json").write_text(json.dumps(stats, indent=1) + "\n")
        print(f"  profile: {stats}", flush=True)
    return (rates[len(rates) // 2] if rates else 0.0), toks


def own_loop(model, prompt, new_tokens: int, repeats: int, mode: str | None = "graph"
             ) -> tuple[float, list[int]]:
    """The engine with one eager step per CUDA graph (``mode=None``: no graph, the CPU check)."""
    return engine_loop(model, prompt, new_tokens, repeats, use_graph=mode is not None)


def fused_engine_loop(model, prompt, args: argparse.Namespace, label: str,
                      fusions: dict[str, Any]) -> tuple[float, list[int]]:
    """``static_graph_compiled_k`` on the model after its projections are fused (in place)."""
    from effllm_helpers.models.fused import fuse_projections

    fusion = fuse_projections(model, check_ids=prompt[:, :16])
    fusions["fused_projections"] = fusion.record()
    if not fusion.applied:
        raise RuntimeError(f"projections not fused: {fusion.reason}")
    return engine_loop(model, prompt, args.new_tokens, args.repeats, compile_step=True,
                       steps_per_graph=args.k,
                       profile_to=(args.out or Path(".")) / f"decode_profile-fused-"
                       f"{label.replace(':', '_')}.txt" if args.profile else None)


def agreement(a: list[int], b: list[int]) -> float:
    """Fraction of leading tokens two greedy decodes share (bf16 kernels may flip near-ties)."""
    n = min(len(a), len(b))
    same = 0
    while same < n and a[same] == b[same]:
        same += 1
    return same / n if n else 0.0


def bytes_read_per_token(model) -> tuple[int, int, float]:
    """(weight bytes, weight bytes read per token, KV bytes per token of context)."""
    from effllm_helpers import models
    from effllm_helpers.measure import weight_bytes

    wbytes = weight_bytes(model)["total"]
    # the input embedding is a lookup of one row per token, not a full read
    emb = model.get_input_embeddings().weight
    read = wbytes - emb.numel() * emb.element_size() + emb.shape[1] * emb.element_size()
    kv_tok = models.kv_cache_bytes_per_token(model.config, dtype_bytes=2)
    return wbytes, read, kv_tok


def measure_size(label: str, variants: list[str], args: argparse.Namespace, bw: float
                 ) -> dict[str, Any]:
    """Build one model (random weights, bf16, on the GPU) and time every variant on it."""
    import torch

    from effllm_helpers import config, models

    preset, size_name = label.split(":")
    size = config.notebook_params("architecture", preset, None).sizes[size_name]
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = models.build({"attention": "gqa", "positional": "rope", "ffn": "dense"}, size,
                             vocab_size=args.vocab, max_seq_len=2048)
    model = model.to(torch.bfloat16).eval()
    prompt = torch.randint(0, args.vocab, (1, args.prompt_len), device="cuda")
    wbytes, read, kv_tok = bytes_read_per_token(model)
    mean_ctx = args.prompt_len + args.new_tokens / 2
    per_token = read + kv_tok * mean_ctx
    bound = bw / per_token
    runners = {
        "dynamic_eager": lambda: time_generate(model, prompt, args.new_tokens, args.repeats),
        "hf_static_compiled": lambda: time_generate(model, prompt, args.new_tokens, args.repeats,
                                                    cache_implementation="static"),
        "static_graph": lambda: engine_loop(model, prompt, args.new_tokens, args.repeats),
        "static_graph_compiled_k": lambda: engine_loop(
            model, prompt, args.new_tokens, args.repeats, compile_step=True,
            steps_per_graph=args.k,
            profile_to=(args.out or Path(".")) / f"decode_profile-{label.replace(':', '_')}.txt"
            if args.profile else None),
        "static_graph_compiled_k_cublas": lambda: engine_loop(
            model, prompt, args.new_tokens, args.repeats, compile_step=True,
            steps_per_graph=args.k, tune_gemv=False),
        "static_graph_compiled_k_fused": lambda: fused_engine_loop(model, prompt, args, label,
                                                                   fusions),
    }
    fusions: dict[str, Any] = {}
    # the fusion rewrites the model in place: whatever else runs, runs before it
    variants = sorted(variants, key=lambda v: v == "static_graph_compiled_k_fused")
    rates: dict[str, float | None] = {}
    errors: dict[str, str] = {}
    tokens: dict[str, list[int]] = {}
    seconds: dict[str, float] = {}
    for name in variants:
        t0 = time.time()
        try:
            with torch.inference_mode():
                rates[name], tokens[name] = runners[name]()
        except Exception as exc:  # report, don't hide: the figure says what failed
            rates[name] = None
            errors[name] = f"{type(exc).__name__}: {exc}"[:600]
        seconds[name] = round(time.time() - t0, 1)
        torch._dynamo.reset()  # each variant compiles on its own
        print(f"  {label} {name}: {rates[name]} tok/s ({seconds[name]} s)", flush=True)
    ref = tokens.get("dynamic_eager")
    entry = {
        "label": label, "preset": preset, "size": size_name,
        "model": {"d_model": size.d_model, "n_layers": size.n_layers, "n_heads": size.n_heads,
                  "n_kv_heads": size.n_kv_heads, "d_ff": size.d_ff, "vocab": args.vocab,
                  "params": sum(t.numel() for t in model.parameters())},
        "weight_bytes": wbytes, "weight_bytes_read_per_token": read,
        "kv_bytes_per_token": kv_tok, "mean_context": mean_ctx, "bytes_per_token": per_token,
        "bound_tokens_per_s": bound, "step_time_us_at_bound": 1e6 / bound,
        "tokens_per_s": rates, "fraction_of_bound": {
            k: (v / bound if v else None) for k, v in rates.items()},
        "errors": errors, "wall_s": seconds, **fusions,
        "greedy_agreement_with_dynamic_eager": (
            {k: agreement(ref, v) for k, v in tokens.items() if k != "dynamic_eager"}
            if ref else None),
    }
    return entry  # the model goes with this frame; main() empties the CUDA cache


def draw(entries: list[dict[str, Any]], bw: float, device: str, dest: Path) -> None:
    """The roofline figure: measured tokens/s vs bytes read per token, and the bandwidth bound."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    xs = np.array([e["bytes_per_token"] for e in entries])
    grid = np.geomspace(xs.min() / 2, xs.max() * 2, 50)
    ax.plot(grid / 1e6, bw / grid, "k-", lw=1.5, label=f"bound: {bw / 1e12:.2f} TB/s copy")
    ax.plot(grid / 1e6, 0.6 * bw / grid, "k:", lw=1, label="60 % of the bound (goal)")
    markers = dict(zip(VARIANTS + LEGACY_VARIANTS, "osD^<Pvx", strict=True))
    for v in VARIANTS + LEGACY_VARIANTS:
        pts = [(e["bytes_per_token"] / 1e6, e["tokens_per_s"][v]) for e in entries
               if e["tokens_per_s"].get(v)]
        if pts:
            ax.plot(*zip(*pts, strict=True), markers[v], ls="none", ms=7, label=v)
    for e in entries:
        p = e["model"]["params"]
        ptxt = f"{p / 1e9:.2f}B" if p >= 1e9 else f"{p / 1e6:.0f}M"
        ax.annotate(f"{e['label']}\n{ptxt}",
                    (e["bytes_per_token"] / 1e6, e["bound_tokens_per_s"]),
                    textcoords="offset points", xytext=(4, 6), fontsize=7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("bytes read per generated token (MB, bf16 weights + KV)")
    ax.set_ylabel("decode tokens/s (batch 1)")
    ax.set_title(f"Batch-1 decode roofline - {device}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")  # above the bound: no measured point there
    fig.tight_layout()
    for ext in ("png", "pdf"):
        fig.savefig(dest / f"decode_roofline.{ext}", dpi=150)
    plt.close(fig)


def write(entries: list[dict[str, Any]], bw: float, name: str, args: argparse.Namespace,
          dest: Path, command: str | None = None, torch_version: str | None = None
          ) -> list[str]:
    """decode_roofline.{json,txt,png,pdf} for the sizes measured so far; the text lines."""
    first = entries[0]
    best = max((v for v in first["tokens_per_s"].values() if v), default=0.0)
    out = {"command": command or " ".join(sys.argv), "device": name, "torch": torch_version,
           "copy_bandwidth_Bps": bw, "prompt_len": args.prompt_len,
           "new_tokens": args.new_tokens, "repeats": args.repeats, "k": args.k,
           "best_fraction_of_bound": best / first["bound_tokens_per_s"], "sizes": entries}
    (dest / "decode_roofline.json").write_text(json.dumps(out, indent=1))
    lines = [f"decode_roofline on {name}: GQA + RoPE, bf16, batch 1, prompt {args.prompt_len}, "
             f"{args.new_tokens} new tokens; copy bandwidth {bw / 1e12:.2f} TB/s"]
    for e in entries:
        m = e["model"]
        lines.append(f"[{e['label']}] d={m['d_model']} L={m['n_layers']} "
                     f"({m['params'] / 1e6:.0f}M params): "
                     f"{e['bytes_per_token'] / 1e6:.1f} MB/token "
                     f"-> bound {e['bound_tokens_per_s']:,.0f} tokens/s "
                     f"({e['step_time_us_at_bound']:.0f} us/token)")
        for k, v in e["tokens_per_s"].items():
            if v:
                agree = (e["greedy_agreement_with_dynamic_eager"] or {}).get(k)
                lines.append(f"  {k:22s} {v:9,.0f} tokens/s = {v / e['bound_tokens_per_s']:6.1%}"
                             f" of the bound ({1e6 / v:6.0f} us/token)"
                             + (f"; greedy tokens agree with eager for {agree:.0%}"
                                if agree is not None else ""))
            else:
                lines.append(f"  {k:22s} failed: {e['errors'].get(k)}")
    lines.append(f"best on {first['label']}: {out['best_fraction_of_bound']:.1%} of the bound")
    lines.append(f"command: {out['command']}")
    (dest / "decode_roofline.txt").write_text("\n".join(lines) + "\n")
    draw(entries, bw, name, dest)
    return lines


def replot(files: list[Path], dest: Path) -> None:
    """Rewrite json/txt/figure from earlier runs' json files (same device), sizes in order."""
    runs = [json.loads(Path(f).read_text()) for f in files]
    devices = {r["device"] for r in runs}
    if len(devices) > 1:
        raise SystemExit(f"--replot: the files come from different devices {sorted(devices)}")
    first = runs[0]
    entries = [e for r in runs for e in r["sizes"]]
    for r in runs:  # each entry keeps the bandwidth its own run measured
        for e in r["sizes"]:
            e.setdefault("copy_bandwidth_Bps", r["copy_bandwidth_Bps"])
    args = argparse.Namespace(prompt_len=first["prompt_len"], new_tokens=first["new_tokens"],
                              repeats=first["repeats"], k=first["k"])
    dest.mkdir(parents=True, exist_ok=True)
    cmds = [r["command"] for r in runs]
    lines = write(entries, first["copy_bandwidth_Bps"], first["device"], args, dest,
                  command=" ; ".join(cmds) + f" ; merged by: {' '.join(sys.argv)}",
                  torch_version=first.get("torch"))
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["gpu:medium"],
                    help="PRESET:SIZE models to time; the first is the one the goal is about "
                         "(default gpu:medium)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS,
                    help="variants timed on the first size (default: all)")
    ap.add_argument("--extra-variants", nargs="+", choices=VARIANTS,
                    default=["dynamic_eager", "static_graph", "static_graph_compiled_k"],
                    help="variants timed on the other sizes")
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=257)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--k", type=int, default=16,
                    help="tokens per captured graph (static_graph_compiled_k)")
    ap.add_argument("--out", type=Path, default=None,
                    help="folder for the json/txt/figure (default outputs/reference/<device>)")
    ap.add_argument("--profile", action="store_true",
                    help="also profile one request of static_graph_compiled_k per size: "
                         "decode_profile-<size>.txt (kernels by device time) and .json "
                         "(kernels and kernel time per token)")
    ap.add_argument("--replot", type=Path, nargs="+", default=None, metavar="JSON",
                    help="no GPU: merge the sizes of earlier decode_roofline.json files (the "
                         "first file's first size stays the headline) and rewrite the outputs "
                         "in --out")
    args = ap.parse_args()
    if args.replot:
        replot(args.replot, args.out or Path("."))
        return

    from effllm_helpers import config

    for label in args.sizes:  # checked before any GPU work
        preset, _, size = label.partition(":")
        if preset not in config.available_presets():
            ap.error(f"--sizes {label!r}: preset {preset!r} unknown; allowed: "
                     f"{', '.join(config.available_presets())} (as PRESET:SIZE)")
        sizes = config.notebook_params("architecture", preset, None).sizes
        if size not in sizes:
            ap.error(f"--sizes {label!r}: size {size!r} not in the {preset} preset; allowed: "
                     f"{', '.join(sizes)}")

    import torch

    from effllm_helpers.measure.device import device_slug

    if not torch.cuda.is_available():
        raise SystemExit("decode_roofline.py needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = True
    bw = copy_bandwidth()
    name = torch.cuda.get_device_name(0)
    dest = args.out or ROOT / "outputs" / "reference" / device_slug(name)
    dest.mkdir(parents=True, exist_ok=True)
    args.out = dest  # the profiles land beside the figure
    entries: list[dict[str, Any]] = []
    for i, label in enumerate(args.sizes):
        entries.append(measure_size(label, args.variants if i == 0 else args.extra_variants,
                                    args, bw))
        torch.cuda.empty_cache()
        # written after each size, so a time box loses little
        lines = write(entries, bw, name, args, dest, torch_version=torch.__version__)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
