"""bf16 batch-1 decode speed of the gpu-preset model against the memory-bandwidth bound (issue 6).

At batch 1 every generated token reads all weights and the KV cache once, so the bound is
``tokens/s <= copy bandwidth / (weight bytes + KV bytes read per token)``. The bandwidth is
measured here (a large device-to-device copy moves 2x its size), not taken from a datasheet.
Variants timed with Hugging Face ``generate`` (greedy, exactly N new tokens):

* ``dynamic_eager`` - the default dynamic cache, eager kernels;
* ``hf_static_compiled`` - ``cache_implementation="static"``, which lets transformers compile the
  decode step itself;
* ``own_loop_cuda_graphs`` - our greedy loop over a static KV cache with the one-token step
  compiled in ``reduce-overhead`` mode (CUDA graphs): one graph replay per token.

    python benchmarks/decode_roofline.py --size medium --new-tokens 256
Goal: >= 60 % of the bound.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


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


def time_generate(model, prompt, new_tokens: int, repeats: int, **kw) -> float:
    """Median decode tokens/s (first token excluded) over ``repeats`` greedy generations."""
    import torch

    from effllm_helpers.measure import timed_generate

    rates = []
    for i in range(repeats + 2):  # two warm-ups: compile / graph capture happen there
        torch.cuda.synchronize()
        out, timer = timed_generate(model, input_ids=prompt, max_new_tokens=new_tokens,
                                    min_new_tokens=new_tokens, do_sample=False, **kw)
        if i >= 2 and timer.tpot_s:
            rates.append(1.0 / timer.tpot_s)
    rates.sort()
    return rates[len(rates) // 2]


def own_loop(model, prompt, new_tokens: int, repeats: int, mode: str = "reduce-overhead"
             ) -> float:
    """Median decode tokens/s of our own greedy loop: a static KV cache and one compiled
    single-token step (``reduce-overhead`` = CUDA graphs), so a token costs one graph replay."""
    import torch
    from transformers import StaticCache

    dev = prompt.device
    plen = prompt.shape[1]

    def fwd(ids, pos, cache):
        return model(input_ids=ids, past_key_values=cache, cache_position=pos,
                     use_cache=True).logits[:, -1:].argmax(-1)

    step = torch.compile(fwd, mode=mode, dynamic=False)
    rates = []
    for i in range(repeats + 2):
        cache = StaticCache(config=model.config, max_cache_len=plen + new_tokens)
        tok = fwd(prompt, torch.arange(plen, device=dev), cache)
        positions = [torch.tensor([plen + j], device=dev) for j in range(new_tokens - 1)]
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for pos in positions:
            torch.compiler.cudagraph_mark_step_begin()  # the previous replay's output is input
            tok = step(tok, pos, cache).clone()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if i >= 2:
            rates.append((new_tokens - 1) / dt)
    rates.sort()
    return rates[len(rates) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="gpu")
    ap.add_argument("--size", default="medium")
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None,
                    help="folder for the json/txt (default outputs/reference/<device>)")
    args = ap.parse_args()

    import torch

    from effllm_helpers import config, models
    from effllm_helpers.measure import weight_bytes
    from effllm_helpers.measure.device import device_slug

    if not torch.cuda.is_available():
        raise SystemExit("decode_roofline.py needs a CUDA GPU")
    p = config.notebook_params("architecture", args.preset, None)
    size = p.sizes[args.size]
    model = models.build({"attention": "gqa", "positional": "rope", "ffn": "dense"}, size,
                         vocab_size=args.vocab, max_seq_len=2048)
    model = model.to("cuda", torch.bfloat16).eval()
    prompt = torch.randint(0, args.vocab, (1, args.prompt_len), device="cuda")
    wbytes = weight_bytes(model)["total"]
    # the input embedding is a lookup of one row per token, not a full read
    emb = model.get_input_embeddings().weight
    read_weights = wbytes - emb.numel() * emb.element_size() + emb.shape[1] * emb.element_size()
    kv_tok = models.kv_cache_bytes_per_token(model.config, dtype_bytes=2)
    mean_ctx = args.prompt_len + args.new_tokens / 2
    bytes_per_token = read_weights + kv_tok * mean_ctx
    bw = copy_bandwidth()
    bound = bw / bytes_per_token
    variants = {}
    with torch.inference_mode():
        variants["dynamic_eager"] = time_generate(model, prompt, args.new_tokens, args.repeats)
        for name, fn in (("hf_static_compiled", lambda: time_generate(
                             model, prompt, args.new_tokens, args.repeats,
                             cache_implementation="static")),
                         ("own_loop_cuda_graphs", lambda: own_loop(
                             model, prompt, args.new_tokens, args.repeats))):
            try:
                variants[name] = fn()
            except Exception as exc:  # report, don't hide: the figure says what failed
                variants[name] = None
                variants[f"{name}_error"] = f"{type(exc).__name__}: {exc}"[:500]
    name = torch.cuda.get_device_name(0)
    best = max(v for v in variants.values() if isinstance(v, float))
    out = {
        "command": " ".join(sys.argv), "device": name,
        "model": {"d_model": size.d_model, "n_layers": size.n_layers, "vocab": args.vocab,
                  "params": sum(t.numel() for t in model.parameters())},
        "weight_bytes": wbytes, "weight_bytes_read_per_token": read_weights,
        "kv_bytes_per_token": kv_tok, "mean_context": mean_ctx,
        "bytes_per_token": bytes_per_token, "copy_bandwidth_Bps": bw,
        "bound_tokens_per_s": bound, "tokens_per_s": variants,
        "best_fraction_of_bound": best / bound,
        "step_time_us_at_bound": 1e6 / bound,
    }
    dest = args.out or ROOT / "outputs" / "reference" / device_slug(name)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "decode_roofline.json").write_text(json.dumps(out, indent=1))
    lines = [f"decode_roofline on {name}: GQA d={size.d_model} L={size.n_layers} "
             f"({out['model']['params'] / 1e6:.1f}M params) bf16, batch 1, prompt "
             f"{args.prompt_len}, {args.new_tokens} new tokens",
             f"bytes/token {bytes_per_token / 1e6:.1f} MB (weights {read_weights / 1e6:.1f} MB "
             f"+ KV {kv_tok * mean_ctx / 1e6:.2f} MB); copy bandwidth {bw / 1e12:.2f} TB/s",
             f"bound {bound:,.0f} tokens/s ({1e6 / bound:.0f} us/token)"]
    for k, v in variants.items():
        if isinstance(v, float):
            lines.append(f"{k:16s} {v:8,.0f} tokens/s = {v / bound:.1%} of the bound "
                         f"({1e6 / v:.0f} us/token)")
        elif v is not None:
            lines.append(f"{k}: {v}")
    lines.append(f"command: {out['command']}")
    (dest / "decode_roofline.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))



if __name__ == "__main__":
    main()
