"""A Mamba (S6) language model that trains at usable speed on a CPU.

Why: transformers' pure-PyTorch Mamba path runs the selective scan as a Python loop under
autograd, ~100x slower than a dense transformer of the same width on a 2-core CPU, which makes
the attention-free arm of the architecture study impractical without the CUDA kernels.

What: :class:`EffllmMambaForCausalLM` is a :class:`transformers.MambaForCausalLM` (same modules,
same parameter names, same initialisation) whose mixers run a hand-differentiated selective
scan for every full-sequence forward without a cache (training, perplexity). The scan is a
``torch.autograd.Function`` whose forward and backward are each one fused in-place update per
time step on an L2-resident ``[batch, d_inner, d_state]`` slice (no autograd graph per step),
with everything else done in a few large vectorised ops. It is the exact recurrence
``h_t = exp(dt_t*A) * h_{t-1} + dt_t*B_t*x_t`` in fp32, so it is as stable as the reference
(no ``exp(-cumsum)`` factorisation that could overflow). Decoding with a cache (prefill and
one-token steps) delegates to the reference mixer, which is fine at inference lengths.

On CUDA, where :mod:`.kernels` chooses fla (``model.kernel`` ``auto``/``fla``), the same scan
runs on ``fla.ops.gla.fused_recurrent_gla`` (:func:`selective_scan_fla`): Mamba-1's S6 is a
gated linear attention with one head per inner channel ``d`` (``d_inner`` heads), key dimension
``d_state`` and value dimension 1: ``q = C_t``, ``k = B_t`` (shared by all heads), ``v =
dt_t[d] x_t[d]``, per-key log-decay ``gk = dt_t[d] A[d, :]``, scale 1, gives exactly
``h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t`` and ``y_t = C_t . h_t``, in fp32, with fla's own
backward (gradients for q, k, v and gk). The price of the mapping: fla wants per-head q/k/gk, so
``C``, ``B`` and the decay are materialised as ``[b, L, d_inner, d_state]`` (fp32) tensors, which
mamba_ssm's selective-scan kernel avoids (we cannot build mamba_ssm offline). fla's chunked GLA
(``chunk_gla``) would need value tiles of >= 16 channels and so does not fit a value width of 1.

The model has its own ``model_type`` (``effllm_mamba``) registered with ``AutoConfig`` and
``AutoModelForCausalLM`` on import of this module, so ``save_pretrained`` / ``from_pretrained``
round-trip to the fast class; the weights are plain Mamba weights and also load into
``MambaForCausalLM``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, MambaConfig, MambaForCausalLM
from transformers.models.mamba.modeling_mamba import MambaMixer

from effllm_helpers.config import SizeSpec
from effllm_helpers.models import kernels

__all__ = [
    "EffllmMambaConfig",
    "EffllmMambaForCausalLM",
    "FastMambaMixer",
    "build_mamba",
    "selective_scan",
    "selective_scan_fla",
    "selective_scan_reference",
]

# what the reference (our chunked scan) is called in records
REFERENCE = "effllm selective_scan (pytorch chunked scan)"


# ---------------------------------------------------------------------------- the scan
def _chunk_len(x: torch.Tensor, d_state: int) -> int:
    """Time steps per chunk so one ``[b, T, d, n]`` block stays cache-sized (CPU) or large (GPU)."""
    bsz, seq, d = x.shape
    budget = 2**24 if x.is_cuda else 2**19
    return max(1, min(seq, budget // max(1, bsz * d * d_state)))


def _chunk_states(dtx: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                  h0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Decays and states ``[b, T, d, n]`` of one chunk, starting from state ``h0``."""
    decay = torch.exp(dt.unsqueeze(-1) * A)
    states = dtx.unsqueeze(-1) * B.unsqueeze(2)  # u_t, overwritten in place by h_t
    states[:, 0].addcmul_(decay[:, 0], h0)
    for t in range(1, states.shape[1]):
        states[:, t].addcmul_(decay[:, t], states[:, t - 1])
    return decay, states


class _SelectiveScan(torch.autograd.Function):
    """y_t = C_t . h_t with h_t = exp(dt_t A) h_{t-1} + (dt_t x_t) B_t, h_{-1} = 0 (fp32).

    Shapes: x, dt ``[b, L, d]``; A ``[d, n]``; B, C ``[b, L, n]``; returns y ``[b, L, d]``.
    Time is cut into chunks whose ``[b, T, d, n]`` blocks fit in cache; inside a chunk the
    recurrence is one in-place ``addcmul_`` per step. Only the state entering each chunk is
    saved (``b * L/T * d * n`` floats, not ``b*L*d*n``); the backward recomputes a chunk's
    states and runs the adjoint ``g_t = C_t dy_t + exp(dt_{t+1} A) g_{t+1}`` in reverse.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                C: torch.Tensor, chunk_len: int | None = None) -> torch.Tensor:
        bsz, seq, d = x.shape
        n = A.shape[-1]
        step = chunk_len or _chunk_len(x, n)
        dtx = dt * x
        y = x.new_empty(bsz, seq, d)
        h = x.new_zeros(bsz, d, n)
        starts = []
        for c0 in range(0, seq, step):
            c1 = min(seq, c0 + step)
            starts.append(h)
            _, states = _chunk_states(dtx[:, c0:c1], dt[:, c0:c1], A, B[:, c0:c1], h)
            y[:, c0:c1] = torch.matmul(states, C[:, c0:c1].unsqueeze(-1)).squeeze(-1)
            h = states[:, -1].clone()
        ctx.step = step
        ctx.save_for_backward(x, dt, A, B, C, torch.stack(starts, dim=1))
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x, dt, A, B, C, starts = ctx.saved_tensors
        bsz, seq, d = x.shape
        step = ctx.step
        dtx = dt * x
        dx, ddt = torch.empty_like(x), torch.empty_like(dt)
        dB, dC = torch.empty_like(B), torch.empty_like(C)
        dA = torch.zeros_like(A)
        carry = None  # exp(dt_{c1} A) * g_{c1}: adjoint flowing into the chunk's last state
        for k, c0 in reversed(list(enumerate(range(0, seq, step)))):
            c1 = min(seq, c0 + step)
            sl = slice(c0, c1)
            h0 = starts[:, k]
            decay, states = _chunk_states(dtx[:, sl], dt[:, sl], A, B[:, sl], h0)
            dy_c = dy[:, sl]
            # dC_t = sum_d dy_t[d] h_t[d, :]
            dC[:, sl] = torch.matmul(dy_c.unsqueeze(2), states).squeeze(2)
            g = dy_c.unsqueeze(-1) * C[:, sl].unsqueeze(2)  # adjoint states, in place
            if carry is not None:
                g[:, -1] += carry
            for t in range(c1 - c0 - 2, -1, -1):
                g[:, t].addcmul_(decay[:, t + 1], g[:, t + 1])
            carry = decay[:, 0] * g[:, 0]
            # u_t = dtx_t B_t  ->  d(dtx)_t = g_t B_t ; dB_t = dtx_t g_t
            d_dtx = torch.matmul(g, B[:, sl].unsqueeze(-1)).squeeze(-1)
            dB[:, sl] = torch.matmul(dtx[:, sl].unsqueeze(2), g).squeeze(2)
            # log-decay l_t = dt_t A:  dl_t = g_t * h_{t-1} * decay_t
            g[:, 1:].mul_(states[:, :-1])
            g[:, 0].mul_(h0)
            dl = g.mul_(decay)
            dA += (dl * dt[:, sl].unsqueeze(-1)).sum((0, 1))
            ddt[:, sl] = d_dtx * x[:, sl] + dl.mul_(A).sum(-1)
            dx[:, sl] = d_dtx * dt[:, sl]
        return dx, ddt, dA, dB, dC, None


def selective_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                   C: torch.Tensor, chunk_len: int | None = None) -> torch.Tensor:
    """Fast exact selective scan (see :class:`_SelectiveScan`) in fp32 (fp64 stays fp64).

    ``chunk_len`` (time steps per chunk) only trades speed for memory; the result is the same.
    """
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return _SelectiveScan.apply(x.to(dtype).contiguous(), dt.to(dtype).contiguous(),
                                A.to(dtype), B.to(dtype).contiguous(), C.to(dtype).contiguous(),
                                chunk_len)


def selective_scan_fla(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                       C: torch.Tensor) -> torch.Tensor:
    """:func:`selective_scan` on fla's ``fused_recurrent_gla`` (CUDA; see the module docstring)."""
    from fla.ops.gla import fused_recurrent_gla

    bsz, seq, d = x.shape
    n = A.shape[-1]
    x, dt, A, B, C = (t.float() for t in (x, dt, A, B, C))
    q = C[:, :, None, :].expand(bsz, seq, d, n)
    k = B[:, :, None, :].expand(bsz, seq, d, n)
    gk = dt[..., None] * A  # [b, L, d, n] log-decay
    y, _ = fused_recurrent_gla(q, k, (dt * x)[..., None], gk=gk, scale=1.0)
    return y[..., 0]


def selective_scan_reference(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
                             B: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """Plain autograd loop of the same recurrence; slow, used by tests as ground truth."""
    h = x.new_zeros(x.shape[0], x.shape[2], A.shape[-1])
    ys = []
    for t in range(x.shape[1]):
        h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * x[:, t])[..., None] * B[:, t, None]
        ys.append((h * C[:, t, None]).sum(-1))
    return torch.stack(ys, dim=1)


# ---------------------------------------------------------------------------- the mixer
def _cache_arg(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The cache a block passed to its mixer, whatever transformers version named it."""
    for key in ("cache", "cache_params"):
        if kwargs.get(key) is not None:
            return kwargs[key]
    return args[0] if args else None


def _mask(h: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Zero padded positions (what the reference does before in_proj and after the conv)."""
    if attention_mask is None:
        return h
    return (h * attention_mask[:, :, None]).to(h.dtype)


class FastMambaMixer(kernels.KernelDispatch, MambaMixer):
    """A :class:`MambaMixer` with the fast scan for cache-free full-sequence forwards.

    Same parameters as the parent (instances are re-classed, not rebuilt), so weights,
    initialisation and checkpoints are unchanged; any call that carries a cache goes to the
    parent's reference implementation.
    """

    def _decide(self, device: str) -> kernels.Choice:
        return kernels.choose("mamba", self.kernel, device, REFERENCE)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if _cache_arg(args, kwargs) is not None:
            return super().forward(hidden_states, *args, **kwargs)
        return self.fast_forward(hidden_states, kwargs.get("attention_mask"))

    def fast_forward(self, hidden_states: torch.Tensor,
                     attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """in_proj -> causal depthwise conv + act -> x_proj/dt_proj -> scan -> gate -> out_proj."""
        dtype = hidden_states.dtype
        seq = hidden_states.shape[1]
        xz = self.in_proj(_mask(hidden_states, attention_mask))
        x, z = xz.chunk(2, dim=-1)
        x = self.conv1d(x.transpose(1, 2).to(self.conv1d.weight.dtype))[..., :seq]
        x = _mask(self.act(x).transpose(1, 2).to(dtype), attention_mask)  # [b, L, d_inner]
        dt_low, B, C = torch.split(self.x_proj(x), [self.time_step_rank, self.ssm_state_size,
                                                    self.ssm_state_size], dim=-1)
        dt = F.softplus(F.linear(dt_low, self.dt_proj.weight).float()
                        + self.dt_proj.bias.float())
        A = -torch.exp(self.A_log.float())
        if self.choice(x.device).use_fla:
            y = kernels.compile_opaque(selective_scan_fla)(x, dt, A, B, C)
        else:
            y = selective_scan(x, dt, A, B, C)
        y = (y + x.float() * self.D.float()) * F.silu(z.float())
        return self.out_proj(y.to(dtype))


# ---------------------------------------------------------------------------- the model
class EffllmMambaConfig(MambaConfig):
    """MambaConfig under our own model_type, so Auto* classes load the fast model."""

    model_type = "effllm_mamba"


class EffllmMambaForCausalLM(MambaForCausalLM):
    """MambaForCausalLM whose mixers use :class:`FastMambaMixer`.

    A plain ``model(input_ids)`` call (``use_cache`` not given) runs without a cache so that it
    takes the fast path also in eval mode; ``generate`` passes ``use_cache`` and keeps the
    reference recurrent decoding.
    """

    config_class = EffllmMambaConfig

    def __init__(self, config: MambaConfig) -> None:
        super().__init__(config)
        for layer in self.backbone.layers:
            layer.mixer.__class__ = FastMambaMixer
            layer.mixer.kernel = getattr(config, "kernel", "auto")
            layer.mixer._choices = {}

    def forward(self, *args: Any, logits_to_keep: int | torch.Tensor = 0, **kwargs: Any) -> Any:
        """``logits_to_keep`` is named so ``generate`` sees it and computes the LM head on the
        prompt's last position only (what :func:`~effllm_helpers.models.flops.generation_flops`
        counts), instead of on every prompt position."""
        kwargs["logits_to_keep"] = logits_to_keep
        if (kwargs.get("use_cache") is None and kwargs.get("cache") is None
                and kwargs.get("cache_params") is None):
            kwargs["use_cache"] = False
        return super().forward(*args, **kwargs)


AutoConfig.register(EffllmMambaConfig.model_type, EffllmMambaConfig, exist_ok=True)
AutoModelForCausalLM.register(EffllmMambaConfig, EffllmMambaForCausalLM, exist_ok=True)


def mamba_config(size: SizeSpec | dict[str, Any], vocab_size: int,
                 **overrides: Any) -> EffllmMambaConfig:
    """Config from a size preset: hidden = d_model, layers = n_layers, expand 2, state 16.

    ``n_heads``, ``n_kv_heads`` and ``d_ff`` have no Mamba meaning and are ignored; the
    inner width is ``expand * d_model`` as in the Mamba paper. Embeddings are untied, like every
    other family of the zoo, so parameter counts compare.
    """
    spec = size if isinstance(size, SizeSpec) else SizeSpec.model_validate(size)
    kwargs: dict[str, Any] = {"vocab_size": vocab_size, "hidden_size": spec.d_model,
                              "num_hidden_layers": spec.n_layers, "state_size": 16,
                              "expand": 2, "conv_kernel": 4, "use_cache": True,
                              "tie_word_embeddings": False}
    kwargs.update(overrides)
    return EffllmMambaConfig(**kwargs)


def build_mamba(size: SizeSpec | dict[str, Any], vocab_size: int,
                **overrides: Any) -> EffllmMambaForCausalLM:
    """A randomly initialised fast Mamba LM for a size preset (see :func:`mamba_config`)."""
    return EffllmMambaForCausalLM(mamba_config(size, vocab_size, **overrides))
