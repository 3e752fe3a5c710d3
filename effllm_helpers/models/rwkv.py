"""RWKV-4's WKV recurrence on fla's Triton kernel (``fla.ops.rwkv4.fused_recurrent_rwkv4``).

transformers' :class:`~transformers.RwkvForCausalLM` runs the WKV recurrence with a CUDA kernel
that it JIT-builds with ninja (often impossible on an offline GPU host), else with a Python loop
over time steps. :func:`use_kernels` re-classes a model's attention modules (same parameters,
same checkpoints) so that, where :mod:`.kernels` chooses fla, every multi-token forward (training,
perplexity, a prefill, with or without an incoming state) runs fla's fused recurrent kernel;
one-token cached steps and the CPU keep transformers' own path.

Same maths: fla's kernel is the RWKV-4 WKV of transformers' ``rwkv_linear_attention_cpu``
(``w = -exp(time_decay)``, bonus ``u = time_first``, state ``(num, den, max)`` with the running
max for stability; a fresh state is ``(0, 0, -1e38)``), accumulated in fp32 in both.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.models.rwkv import modeling_rwkv
from transformers.models.rwkv.modeling_rwkv import RwkvSelfAttention

from . import kernels

__all__ = ["KernelRwkvSelfAttention", "fla_wkv", "reference_name", "use_kernels"]


def reference_name(device: Any) -> str:
    """What transformers runs for the WKV on ``device`` (its JIT CUDA kernel, if it loaded)."""
    if torch.device(device).type == "cuda" and modeling_rwkv.rwkv_cuda_kernel is not None:
        return "transformers.rwkv_linear_attention (JIT wkv CUDA kernel)"
    return "transformers.rwkv_linear_attention_cpu (pytorch loop over time)"


def fla_wkv(time_decay: torch.Tensor, time_first: torch.Tensor, key: torch.Tensor,
            value: torch.Tensor, layer_state: tuple[torch.Tensor, ...] | None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """WKV of ``key``/``value`` [B, T, C] from ``layer_state`` (num, den, max, each [B, C]; a
    fresh state if ``None``) on fla: returns the output [B, T, C] and the final state [B, 3, C]."""
    from fla.ops.rwkv4 import fused_recurrent_rwkv4

    bsz, _, chans = key.shape
    if layer_state is None:
        state = key.new_zeros(bsz, 3, 1, chans, dtype=torch.float32)
        state[:, 2] = -1e38
    else:
        state = torch.stack([s.float() for s in layer_state], dim=1).unsqueeze(2)
    # fp32 like transformers' reference: fla allocates its saved (num, den, max) state in the
    # inputs' dtype, and a bf16 running max would skew the backward's exponentials
    wkv, state_out = fused_recurrent_rwkv4(time_decay, time_first, key.float().contiguous(),
                                           value.float().contiguous(), state.contiguous())
    return wkv, state_out[:, :, 0]


class KernelRwkvSelfAttention(kernels.KernelDispatch, RwkvSelfAttention):
    """:class:`RwkvSelfAttention` whose multi-token forwards use fla where chosen."""

    def _decide(self, device: str) -> kernels.Choice:
        return kernels.choose("rwkv", self.kernel, device, reference_name(device))

    def forward(self, hidden: torch.Tensor, state: Any = None, use_cache: bool = False) -> Any:
        if hidden.size(1) == 1 or not self.choice(hidden.device).use_fla:
            return super().forward(hidden, state=state, use_cache=use_cache)
        receptance, key, value, state = self.extract_key_value(hidden, state=state)
        layer_state = (tuple(s[:, :, self.layer_id] for s in state[2:])
                       if state is not None else None)
        wkv, new_state = kernels.compile_opaque(fla_wkv)(self.time_decay, self.time_first, key,
                                                         value, layer_state)
        if state is not None:
            for i in range(3):
                state[2 + i][:, :, self.layer_id] = new_state[:, i].to(state[2 + i].dtype)
        return self.output(receptance * wkv.to(receptance.dtype)), state


def use_kernels(model: Any, kernel: str = "auto") -> Any:
    """Give an RWKV model's attention modules the kernel dispatch (in place; returns the model).

    ``config.kernel`` records the request (it round-trips with ``save_pretrained``)."""
    model.config.kernel = kernel
    for module in model.modules():
        if isinstance(module, RwkvSelfAttention):
            module.__class__ = KernelRwkvSelfAttention
            module.kernel, module._choices = kernel, {}
    return model
