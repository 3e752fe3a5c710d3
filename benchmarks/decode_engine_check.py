"""CUDA self-check of the decode engines (``effllm_helpers.decode``) in one call.

Builds a ~100M-parameter random Llama (the gpu preset's medium size) on the GPU and serves the
same greedy request with ``hf_generate`` (``generate`` + streamer) and ``static_graph`` (static
cache, CUDA graph):

* exactness in fp32 (TF32 off): both engines must produce identical tokens, at batch 1 and 4 -
  bf16 kernels of different shapes flip near-ties of a random model, so bf16 is only compared;
* speed in bf16: median TPOT of each engine at batch 1 and the speedup.

Prints JSON (and writes it with ``--out``); exit status 0 when the tokens match and the graph
was captured, 1 otherwise, 2 without a GPU.

    python benchmarks/decode_engine_check.py --out decode_engine_check.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _model(dtype: Any, vocab: int) -> Any:
    import torch

    from effllm_helpers import config, models

    size = config.notebook_params("architecture", "gpu", None).sizes["medium"]
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = models.build({"attention": "gqa", "positional": "rope", "ffn": "dense"}, size,
                             vocab_size=vocab, max_seq_len=2048)
    return model.to(dtype).eval()


def _hf(model: Any, prompt: Any, n: int, repeats: int) -> tuple[list[list[int]], float]:
    """Tokens and median TPOT of hf_generate."""
    from effllm_helpers.measure import timed_generate

    tpots, toks = [], []
    for i in range(repeats + 2):
        out, timer = timed_generate(model, input_ids=prompt, max_new_tokens=n, min_new_tokens=n,
                                    do_sample=False)
        toks = out[:, prompt.shape[1]:].tolist()
        if i >= 2 and timer.tpot_s:
            tpots.append(timer.tpot_s)
    return toks, statistics.median(tpots)


def _static(model: Any, prompt: Any, n: int, repeats: int, **kw: Any
            ) -> tuple[list[list[int]], float, dict[str, Any]]:
    """Tokens, median TPOT (CUDA events) and description of the static_graph engine."""
    from effllm_helpers.decode import StaticGraphDecoder

    dec = StaticGraphDecoder(model, prompt.shape[0], prompt.shape[1], n, **kw)
    tpots, toks = [], []
    for i in range(repeats + 2):
        out, timing = dec.decode(prompt)
        toks = out.tolist()
        if i >= 2 and timing.tpot_s:
            tpots.append(timing.tpot_s)
    return toks, statistics.median(tpots), dec.describe()


def check(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    res: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                           "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                           "exact_fp32": {}, "speed_bf16": {}}
    with torch.inference_mode():
        model = _model(torch.float32, args.vocab)
        for b in (1, 4):
            prompt = torch.randint(0, args.vocab, (b, args.prompt_len), device="cuda")
            hf, _ = _hf(model, prompt, args.new_tokens, 1)
            ours, _, desc = _static(model, prompt, args.new_tokens, 1)
            res["exact_fp32"][f"bs{b}"] = {"identical": hf == ours, "mode": desc["mode"],
                                           "fallback_reason": desc["fallback_reason"]}
        del model
        torch.cuda.empty_cache()
        model = _model(torch.bfloat16, args.vocab)
        prompt = torch.randint(0, args.vocab, (1, args.prompt_len), device="cuda")
        hf, hf_tpot = _hf(model, prompt, args.new_tokens, args.repeats)
        ours, tpot, desc = _static(model, prompt, args.new_tokens, args.repeats)
        same = next((i for i, (a, c) in enumerate(zip(hf[0], ours[0], strict=True)) if a != c),
                    len(hf[0]))
        res["speed_bf16"] = {"hf_generate_tpot_s": hf_tpot, "static_graph_tpot_s": tpot,
                             "speedup": hf_tpot / tpot, "static_graph": desc,
                             "leading_tokens_agreeing": same}
        if args.compiled:
            torch._dynamo.reset()
            _, ctpot, cdesc = _static(model, prompt, args.new_tokens, args.repeats,
                                      compile_step=True, steps_per_graph=args.k)
            res["speed_bf16"].update({"static_graph_compiled_k_tpot_s": ctpot,
                                      "compiled_speedup": hf_tpot / ctpot,
                                      "static_graph_compiled_k": cdesc})
    res["ok"] = (all(v["identical"] and v["mode"] == "cuda_graph"
                     for v in res["exact_fp32"].values())
                 and res["speed_bf16"]["static_graph"]["mode"] == "cuda_graph")
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--compiled", action="store_true",
                    help="also time the torch.compile'd step with --k tokens per graph")
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("decode_engine_check: no CUDA GPU", file=sys.stderr)
        return 2
    res = check(args)
    text = json.dumps(res, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
