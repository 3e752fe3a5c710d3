"""Do the torchao precisions run their fast kernels on this GPU, and are they accurate? (issue 14)

Builds a random-weight Llama in bf16 (``--size``: ``100m`` or ``1b``, TinyLlama's shape), then for
each precision loads it through the project's own door (``techniques.precision.
load_for_inference``, so probes, skips and kernel names are the ones the study records) and:

* compares the logits of a 64-token forward with the bf16 model's: max |diff| / max |bf16 logit|,
  the relative Frobenius error and top-1 agreement;
* times a batch-1 decode step: a one-token forward over a static KV cache after a 64-token
  prefill, CUDA events around each step (median / p10 / p90 ms), eager and, with ``--compile``,
  ``torch.compile(mode="reduce-overhead")`` (CUDA graphs; int8 weight-only only fuses its
  dequantisation into the matmul when compiled);
* with ``--engine``, times batch-1 TPOT through the study's own decode engine
  (``decode.StaticGraphDecoder``: static cache, compiled step with GEMV tuning, K tokens per CUDA
  graph), which is what the inference axis serves with on CUDA;
* records the kernels per linear layer and the real weight bytes.

Random weights: speed does not depend on them, and the error of a round-to-nearest quantiser on
Gaussian weights is a fair if not a trained-model figure. Prints JSON and writes it to ``--out``.

    python benchmarks/quant_kernels_check.py --size 1b --compile --out quant_kernels.json
    python benchmarks/quant_kernels_check.py --size 3b --engine --precisions bf16,int4-gemlite
    python benchmarks/quant_kernels_check.py --device cpu --size ci   # logic check, no GPU
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SIZES: dict[str, dict[str, int]] = {
    "ci": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, vocab_size=1024),
    "100m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=12, num_key_value_heads=4, vocab_size=32000),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
               num_attention_heads=32, num_key_value_heads=4, vocab_size=32000),
    # the paper preset's large size (2.84 B with its 16k vocabulary; 3.3 B with this one)
    "3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
               num_attention_heads=16, num_key_value_heads=2, vocab_size=32000),
}
PRECISIONS = ("bf16", "int8-wo", "int4-wo", "int4-gemlite", "fp8-e4m3")


def build(size: str, device: str) -> Any:
    """A random-weight bf16 Llama of ``size`` on ``device`` (seeded)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**SIZES[size], max_position_embeddings=1024, tie_word_embeddings=False)
    with torch.device(device):  # initialised where it runs: a 3 B model builds in seconds
        return LlamaForCausalLM(cfg).to(dtype=torch.bfloat16).eval()


def logit_errors(out: Any, ref: Any) -> dict[str, float]:
    """How far a quantised model's logits are from the bf16 model's."""
    o, r = out.float(), ref.float()
    return {"max_rel_err": float((o - r).abs().max() / r.abs().max()),
            "fro_rel_err": float((o - r).norm() / r.norm()),
            "top1_agree": float((o.argmax(-1) == r.argmax(-1)).float().mean())}


class Clock:
    """Wall time of one step: CUDA events on a GPU, perf_counter elsewhere."""

    def __init__(self, device: str) -> None:
        import torch

        self.cuda = device.startswith("cuda")
        self.torch = torch

    def time(self, fn: Any) -> float:
        """Seconds ``fn()`` takes (device work included)."""
        if not self.cuda:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
        start = self.torch.cuda.Event(enable_timing=True)
        end = self.torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3


def decode_step_ms(model: Any, device: str, prompt_len: int, warmup: int, steps: int,
                   compile_mode: str | None) -> dict[str, Any]:
    """Median/p10/p90 ms of a batch-1 one-token forward over a static KV cache."""
    import torch
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=prompt_len + warmup + steps + 8)
    # transformers 5 calls the cache argument ``cache``; 4.x called it ``past_key_values``
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    gen = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (1, prompt_len), generator=gen).to(device)
    fwd = model.forward
    if compile_mode:
        fwd = torch.compile(model.forward, mode=compile_mode)
    clock = Clock(device)
    times = []
    with torch.inference_mode():
        out = model(input_ids=prompt, use_cache=True, **{key: cache})
        tok = out.logits[:, -1:].argmax(-1)
        for i in range(warmup + steps):
            step_tok = tok.clone()  # a fresh input each step (CUDA graphs copy it in)

            def step(t: Any = step_tok) -> None:
                nonlocal tok
                tok = fwd(input_ids=t, use_cache=True, **{key: cache}).logits[:, -1:].argmax(-1)

            dt = clock.time(step)
            if i >= warmup:
                times.append(dt * 1e3)
    q = statistics.quantiles(times, n=10) if len(times) > 1 else [times[0]] * 9
    return {"median_ms": statistics.median(times), "p10_ms": q[0], "p90_ms": q[-1],
            "steps": steps, "warmup": warmup, "prompt_len": prompt_len,
            "compile_mode": compile_mode}


def engine_tpot_ms(model: Any, device: str, prompt_len: int, gen_tokens: int, k: int,
                   repeats: int = 3) -> dict[str, Any]:
    """Median batch-1 TPOT (ms) of ``repeats`` requests through the library's decode engine."""
    import torch

    from effllm_helpers.decode import StaticGraphDecoder

    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=gen).to(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        dec = StaticGraphDecoder(model, 1, prompt_len, gen_tokens, compile_step=True,
                                 steps_per_graph=k)
        build_s = time.perf_counter() - t0
        tpots = []
        for i in range(repeats + 1):  # the first request warms the allocator and clocks
            _, timing = dec.decode(prompt)
            if i and timing.tpot_s:
                tpots.append(timing.tpot_s * 1e3)
    return {"tpot_ms": statistics.median(tpots), "tpot_ms_all": tpots, "build_s": build_s,
            "gen_tokens": gen_tokens, "prompt_len": prompt_len, **dec.describe()}


def check(precision: str, base: Any, ids: Any, ref: Any, args: argparse.Namespace
          ) -> dict[str, Any]:
    """One precision: load (or the reason it cannot), logits error, decode-step latency."""
    import torch

    from effllm_helpers.config import InferenceParams
    from effllm_helpers.errors import UnsupportedTechnique
    from effllm_helpers.techniques import precision as pr

    t0 = time.perf_counter()
    try:
        loaded = pr.load_for_inference(copy.deepcopy(base), InferenceParams(precision=precision),
                                       args.device)
    except UnsupportedTechnique as exc:
        return {"status": "skipped", "reason": str(exc)}
    res: dict[str, Any] = {"status": "ok", "load_s": time.perf_counter() - t0,
                           "kernels": loaded.kernels, "weight_bytes": loaded.weight_bytes,
                           "notes": loaded.notes}
    try:
        with torch.inference_mode():
            res["logits"] = logit_errors(loaded.model(input_ids=ids).logits, ref)
        if args.engine:
            try:
                res["engine"] = engine_tpot_ms(loaded.model, args.device, args.prompt_len,
                                               args.gen_tokens, args.k)
            except Exception as exc:
                res["engine"] = {"error": f"{type(exc).__name__}: {str(exc)[:500]}"}
            print(f"[{precision}] engine: {res['engine'].get('tpot_ms', res['engine'])}",
                  file=sys.stderr, flush=True)
        if args.skip_step:
            return res
        res["decode_step"] = {"eager": decode_step_ms(loaded.model, args.device, args.prompt_len,
                                                      args.warmup, args.steps, None)}
        if args.compile:
            try:
                res["decode_step"]["compiled"] = decode_step_ms(
                    loaded.model, args.device, args.prompt_len, args.warmup, args.steps,
                    "reduce-overhead")
            except Exception as exc:  # a compile failure is a finding, not a crash
                res["decode_step"]["compiled"] = {"error": f"{type(exc).__name__}: "
                                                           f"{str(exc)[:500]}"}
    except Exception as exc:
        res.update(status="error", error=f"{type(exc).__name__}: {str(exc)[:500]}")
    finally:
        del loaded
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return res


def environment(device: str) -> dict[str, Any]:
    """Versions and the device, so a result can be traced to what produced it."""
    import torch

    from effllm_helpers.techniques import precision as pr

    env: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                           "device": device}
    try:
        ao = pr.import_torchao()
        from torchao.utils import _is_mslk_available

        env.update(torchao=ao.__version__, mslk=bool(_is_mslk_available()))
    except Exception as exc:
        env["torchao"] = f"unavailable: {type(exc).__name__}: {exc}"
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(device)
        env["capability"] = list(torch.cuda.get_device_capability(device))
    return env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="1b")
    ap.add_argument("--precisions", default=",".join(PRECISIONS),
                    help="comma-separated; any precision of the registry (bnb ones too)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--compile", action="store_true",
                    help="also time the step under torch.compile(mode='reduce-overhead')")
    ap.add_argument("--engine", action="store_true",
                    help="also time TPOT through the library's decode engine (CUDA graphs, "
                         "compiled step with GEMV tuning)")
    ap.add_argument("--gen-tokens", type=int, default=129, help="tokens per engine request")
    ap.add_argument("--k", type=int, default=16, help="tokens per CUDA graph in the engine")
    ap.add_argument("--skip-step", action="store_true",
                    help="with --engine: leave out the one-step timings")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args()
    for name in ("prompt_len", "warmup", "steps", "gen_tokens", "k"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")

    import torch

    from effllm_helpers.techniques import precision as pr

    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    unknown = [p for p in precisions if p not in pr.REGISTRY]
    if unknown:
        ap.error(f"unknown precision(s) {unknown}; allowed: {', '.join(pr.REGISTRY)}")
    base = build(args.size, args.device)
    n_params = sum(p.numel() for p in base.parameters())
    ids = torch.randint(0, base.config.vocab_size, (1, 64),
                        generator=torch.Generator().manual_seed(2)).to(args.device)
    with torch.inference_mode():
        ref = base(input_ids=ids).logits
    report: dict[str, Any] = {"env": environment(args.device), "command": " ".join(sys.argv),
                              "model": {"size": args.size, "params": n_params,
                                        **SIZES[args.size]}, "results": {}}
    for p in precisions:  # written after each precision: a time box keeps what finished
        report["results"][p] = check(p, base, ids, ref, args)
        text = json.dumps(report, indent=2, default=str)
        if args.out:
            args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
