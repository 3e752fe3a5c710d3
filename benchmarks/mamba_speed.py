"""Time one training step of our fast Mamba against a dense Llama of the same width and depth.

Why: the attention-free arm of the architecture study is only practical on a CPU if a Mamba
step costs about what a transformer step costs; this prints the ratio (goal <= 3.0) so a
regression in ``effllm_helpers.models.mamba`` shows up as a number, not a hunch.

Usage: ``python benchmarks/mamba_speed.py [--batch 8 --seq 256 --d-model 128 --layers 4
--vocab 4096 --steps 5 --warmup 2 --reference]``
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM, MambaForCausalLM, PreTrainedModel

from effllm_helpers.models.mamba import build_mamba


def step_times(model: PreTrainedModel, ids: torch.Tensor, steps: int, warmup: int) -> list[float]:
    """Seconds per fwd+bwd+AdamW step, warm-up steps excluded."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> float:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--d-ff", type=int, default=384)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=5, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--reference", action="store_true",
                    help="also time transformers' reference MambaForCausalLM (slow: ~minutes)")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    size = {"d_model": args.d_model, "n_layers": args.layers, "n_heads": args.heads,
            "n_kv_heads": args.kv_heads, "d_ff": args.d_ff, "max_seq_len": args.seq}
    dense = LlamaForCausalLM(LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.d_model, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        intermediate_size=args.d_ff, max_position_embeddings=args.seq))
    mamba = build_mamba(size, args.vocab)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch} x "
          f"seq {args.seq}, d_model {args.d_model}, layers {args.layers}, vocab {args.vocab}")
    results = {}
    models: list[tuple[str, PreTrainedModel]] = [("dense llama", dense), ("effllm mamba", mamba)]
    if args.reference:
        ref = MambaForCausalLM(mamba.config)
        ref.load_state_dict(mamba.state_dict())
        models.append(("reference mamba", ref))
    for name, model in models:
        n_params = sum(p.numel() for p in model.parameters())
        warm = args.warmup if name != "reference mamba" else 0
        t = step_times(model, ids, args.steps if name != "reference mamba" else 1, warm)
        results[name] = statistics.median(t)
        print(f"{name:16s} params {n_params / 1e6:6.2f}M  median step {results[name]:.3f} s  "
              f"(min {min(t):.3f}, n={len(t)})")
    ratio = results["effllm mamba"] / results["dense llama"]
    print(f"ratio mamba/dense = {ratio:.2f} (goal <= 3.0)")
    if "reference mamba" in results:
        speedup = results["reference mamba"] / results["effllm mamba"]
        print(f"speed-up over reference = {speedup:.1f}x")
    return ratio


if __name__ == "__main__":
    main()
