"""fla's Mamba path against our reference on a CPU, through Triton's interpreter (issue 14).

On an H200 (fifth session) fla's S6-as-GLA path disagreed with our reference by 0.37 (bf16
logits), so ``model.kernel: auto`` stopped choosing it. This check runs the *same* glue and the
same fla kernels (forward and backward) on CPU tensors with ``TRITON_INTERPRET=1``, on the ci
preset's small Mamba: if it agrees here, the fault is in what only a GPU does (the compiled
kernel, its scale), not in our mapping. Needs ``pip install triton fla-core einops`` on the CPU
host (not part of the CPU environment). Two shims make the interpreter run fla: one autotune
config per kernel (the interpreter has no benchmarker), and integer arguments left as Python ints
(fla loops ``for _ in range(0, T)``).

    TRITON_INTERPRET=1 python benchmarks/fla_interpreter_check.py

Fifth session, on this CPU (triton 3.6.0, fla-core 0.6.0): fp32 logits 2.2e-07, worst gradient
1.7e-06; bf16 autocast 4.8e-03 / 6.5e-03: both within the kernels check's bounds.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def interpreter_shims() -> None:
    import triton
    import triton.runtime.interpreter as interp

    autotune = triton.autotune
    triton.autotune = lambda configs, key, **kw: autotune(configs[:1], key, **kw)
    cvt = interp._implicit_cvt
    interp._implicit_cvt = lambda a: (a if isinstance(a, int) and not isinstance(a, bool)
                                      else cvt(a))


def run_once(model: Any, ids: Any, dtype: str) -> tuple[Any, dict[str, Any]]:
    """kernels_check.run_once with CPU autocast."""
    import torch

    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach().float(), {n: q.grad.detach().float().clone()
                                         for n, q in model.named_parameters()
                                         if q.grad is not None}


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("run with TRITON_INTERPRET=1 (Triton's CPU interpreter)")
    interpreter_shims()
    import kernels_check as kc
    import torch

    from effllm_helpers import config
    from effllm_helpers.axes.architecture import effective_size
    from effllm_helpers.models import build, kernels

    kernels._device_type = lambda device: "cuda"  # let the dispatch pick fla for CPU tensors
    kc.run_once = run_once
    p = config.notebook_params("architecture", "ci", {"model": {"size": "small",
                                                                "family": "mamba"}})
    torch.manual_seed(0)
    model = build(p.model, effective_size(p), vocab_size=256, max_seq_len=64)
    ids = torch.randint(0, 256, (1, 32))
    report = {dt: kc.compare(model, ids, dt, None, kc.TOL) for dt in ("fp32", "bf16")}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
