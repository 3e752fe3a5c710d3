"""bf16 batch-1 decode speed of the gpu-preset model against the memory-bandwidth bound (issue 6).

At batch 1 every generated token reads all weights and the KV cache once, so the bound is
``tokens/s <= copy bandwidth / (weight bytes + KV bytes read per token)``. The bandwidth is
measured here (a large device-to-device copy moves 2x its size), not taken from a datasheet.
Variants (greedy, exactly N new tokens, first token excluded from the rate):

* ``dynamic_eager`` - Hugging Face ``generate`` with its default dynamic cache, eager kernels;
* ``hf_static_compiled`` - ``generate`` with ``cache_implementation="static"``, which lets
  transformers compile the decode step itself;
* ``own_loop_cuda_graphs`` - our greedy loop over a static KV cache with the one-token step
  compiled in ``reduce-overhead`` mode (CUDA graphs): one graph replay per token;
* ``own_loop_graph_k`` - the same compiled step (inductor kernels, no cudagraph trees), K tokens
  captured into one CUDA graph by hand (the next token and position are updated on the device),
  so the host launches one graph per K tokens.

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

VARIANTS = ("dynamic_eager", "hf_static_compiled", "own_loop_cuda_graphs", "own_loop_graph_k")


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


def _step_fn(model):
    """One greedy decode step over a static cache: (ids, positions, cache) -> next ids (b, 1)."""

    def fwd(ids, pos, cache):
        return model(input_ids=ids, past_key_values=cache, cache_position=pos,
                     use_cache=True).logits[:, -1:].argmax(-1)

    return fwd


def _static_cache(model, max_len: int):
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=max_len)


def own_loop(model, prompt, new_tokens: int, repeats: int, mode: str | None = "reduce-overhead"
             ) -> tuple[float, list[int]]:
    """Median decode tokens/s of our greedy loop over one static KV cache, and its tokens.

    ``mode="reduce-overhead"`` compiles the one-token step with CUDA graphs, so a token costs one
    graph replay; ``mode=None`` runs the same loop eagerly (what the CPU test checks).
    """
    import torch

    dev, plen = prompt.device, prompt.shape[1]
    fwd = _step_fn(model)
    step = torch.compile(fwd, mode=mode, dynamic=False) if mode else fwd
    cache = _static_cache(model, plen + new_tokens)  # one cache: its buffers keep their address
    positions = [torch.tensor([plen + j], device=dev) for j in range(new_tokens - 1)]
    rates, toks = [], []
    for i in range(repeats + 2):
        cache.reset()
        tok = fwd(prompt, torch.arange(plen, device=dev), cache)
        out = [tok]
        n = len(positions) if i >= 1 else min(8, len(positions))  # short first (compile) pass
        _sync(dev)
        t0 = time.perf_counter()
        for pos in positions[:n]:
            if mode == "reduce-overhead":
                torch.compiler.cudagraph_mark_step_begin()  # the last replay's output is input
            tok = step(tok, pos, cache).clone()
            out.append(tok)
        _sync(dev)
        dt = time.perf_counter() - t0
        if i >= 2:
            rates.append(n / dt)
        toks = torch.cat(out, dim=1)[0].tolist()
    rates.sort()
    return rates[len(rates) // 2], toks


def graph_loop(model, prompt, new_tokens: int, repeats: int, k: int = 16
               ) -> tuple[float, list[int]]:
    """Median decode tokens/s with K compiled decode steps captured into one CUDA graph.

    The graph reads the current token and position from device buffers and writes the next ones
    back, so replays chain with no host work between tokens. Times ``(new_tokens - 1) // k * k``
    tokens after the prefill.
    """
    import torch

    dev, plen = prompt.device, prompt.shape[1]
    fwd = _step_fn(model)
    step = torch.compile(fwd, dynamic=False)
    # the two warm-up passes run 2k steps: the cache must hold them too
    cache = _static_cache(model, plen + max(new_tokens, 2 * k + 1))
    ids = torch.zeros((prompt.shape[0], 1), dtype=torch.long, device=dev)
    pos = torch.zeros(1, dtype=torch.long, device=dev)
    n_graphs = (new_tokens - 1) // k
    if n_graphs < 1:
        raise ValueError(f"new_tokens={new_tokens} leaves no full graph of k={k} steps")
    # room for the two warm-up passes too: an index past the end would be a device-side assert
    hist = torch.zeros((prompt.shape[0], max(n_graphs, 2) * k), dtype=torch.long, device=dev)
    slot = torch.zeros(1, dtype=torch.long, device=dev)

    def k_steps() -> None:
        for _ in range(k):
            nxt = step(ids, pos, cache)
            ids.copy_(nxt)
            hist.index_copy_(1, slot, nxt)
            pos.add_(1)
            slot.add_(1)

    def prefill() -> None:
        cache.reset()
        ids.copy_(fwd(prompt, torch.arange(plen, device=dev), cache))
        pos.fill_(plen)
        slot.zero_()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm up outside the capture
        prefill()
        for _ in range(2):
            k_steps()
    torch.cuda.current_stream().wait_stream(side)
    prefill()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        k_steps()
    rates, toks = [], []
    for i in range(repeats + 1):
        prefill()
        first = ids.clone()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n_graphs):
            graph.replay()
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if i >= 1:
            rates.append(n_graphs * k / dt)
        toks = torch.cat([first, hist[:, :n_graphs * k]], dim=1)[0].tolist()
    rates.sort()
    return rates[len(rates) // 2], toks


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
        "own_loop_cuda_graphs": lambda: own_loop(model, prompt, args.new_tokens, args.repeats),
        "own_loop_graph_k": lambda: graph_loop(model, prompt, args.new_tokens, args.repeats,
                                               k=args.k),
    }
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
        "errors": errors, "wall_s": seconds,
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
    markers = dict(zip(VARIANTS, "osD^", strict=True))
    for v in VARIANTS:
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
                    default=["dynamic_eager", "own_loop_cuda_graphs", "own_loop_graph_k"],
                    help="variants timed on the other sizes")
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=257)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--k", type=int, default=16, help="tokens per captured graph (graph_k)")
    ap.add_argument("--out", type=Path, default=None,
                    help="folder for the json/txt/figure (default outputs/reference/<device>)")
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
