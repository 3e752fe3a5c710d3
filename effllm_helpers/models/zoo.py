"""Model zoo: one (ModelSpec, SizeSpec) -> one randomly initialised Hugging Face causal LM.

Why Hugging Face classes: peft, bitsandbytes, accelerate, lm-eval and ``save_pretrained`` then
work on every variant alike. Mapping (``family`` / ``attention`` / ``positional`` / ``ffn``):

=========================  ==================  =========================================
spec                       class               notes
=========================  ==================  =========================================
transformer mha|mqa|gqa,   LlamaForCausalLM    KV heads = n_heads / 1 / size.n_kv_heads
rope, dense
transformer mha|mqa|gqa,   EffllmDecoder-      our Llama-identical decoder, only the
sinusoidal|learned|        ForCausalLM         positional scheme differs (the paper compares
relative|none, dense                           positional encodings on the GQA model)
transformer nsa, any       EffllmDecoder-      NSA over GQA projections (size.n_kv_heads)
positional but relative    ForCausalLM
transformer mla, rope      DeepseekV3ForCausal kv_lora_rank = d_model // mla_latent_ratio,
(dense or moe)             LM                  no q low-rank; qk_nope = qk_rope = head_dim/2
                                               (qk head dim = head_dim, 128 at paper sizes),
                                               v_head_dim = head_dim; dense:
                                               first_k_dense_replace = n_layers
transformer mha|mqa|gqa,   MixtralForCausalLM  n_experts experts of size d_ff, top_k routed
rope, moe
pythia                     GPTNeoXForCausalLM  Pythia layout (parallel residual, 25 % rotary)
rwkv                       RwkvForCausalLM     attention/FFN widths d_model / d_ff; WKV on
                                               fla's kernel where chosen (models/rwkv.py)
mamba                      models.mamba.build_mamba(size, vocab_size)
=========================  ==================  =========================================

Kernels: ``spec.kernel`` (``auto``/``reference``/``fla``) becomes ``config.kernel``; NSA, RWKV
and Mamba pick fla's Triton kernels or the PyTorch reference by it (:mod:`.kernels`).

Load balancing: the Mixtral MoE trains with its router load-balancing loss (coefficient
``MOE_AUX_LOSS_COEF``, added to ``out.loss``, so its training-loss curve carries it; validation
perplexity is computed from the logits alone); without it a few experts take most tokens within a
few hundred steps. The DeepSeek-V3 MoE (MLA + MoE only) has no auxiliary loss here and its
bias-based balancing is not updated by transformers' training code, so it can collapse.

MoE choice: Mixtral over Qwen2-MoE because Mixtral *is* Llama with the MLP swapped for a top-k
routed set of SwiGLU experts (no shared expert, no QKV bias, same norms), so dense-vs-MoE
differences come from the FFN alone. Expert width = ``d_ff`` (the dense model's FFN), so a top-2
MoE activates 2x the dense FFN parameters per token; :func:`count_params` reports that as
``active``. DeepSeek-V3 MoE (for MLA) is configured the same way: ``n_experts`` routed experts of
``d_ff``, top-``top_k``, no shared expert, one routing group, ``routed_scaling_factor`` 1.

Known upstream limit: transformers' RWKV (5.17-5.24) mis-broadcasts its token-shift state in
cached decoding when batch > 1 (``RwkvSelfAttention.extract_key_value`` / ``RwkvFeedForward``:
a [B, H] state against [B, 1, H] input), so batched cached ``generate`` is wrong for RWKV; batch 1
and uncached forwards are exact.

Combinations that have no sensible model raise ``ValueError`` with the reason (MLA with a
non-RoPE positional scheme, MoE with a non-RoPE scheme or with NSA, NSA with ALiBi).
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn
from transformers import (
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    PreTrainedModel,
    RwkvConfig,
    RwkvForCausalLM,
)

from .. import catalog
from ..config import ModelSpec, SizeSpec
from .decoder import EffllmConfig, EffllmDecoderForCausalLM

__all__ = ["build", "count_params", "kv_heads", "mla_fields", "moe_fields", "ROPE_THETA"]

ROPE_THETA = 10000.0  # one theta for every RoPE model, so variants differ only where intended
MOE_AUX_LOSS_COEF = 0.02  # Mixtral router load-balancing loss weight (Mixtral/Switch use 0.01-0.02)


def _rope(theta: float = ROPE_THETA) -> dict[str, Any]:
    return {"rope_type": "default", "rope_theta": theta}


def kv_heads(attention: str, size: SizeSpec | Any) -> int:
    """K/V heads by the catalog's rule for the variant; an unknown variant raises. ``size`` is
    anything with ``n_heads`` and ``n_kv_heads`` (a size, the DiT's params)."""
    rule = catalog.attention(attention).kv_heads
    return {"all": size.n_heads, "one": 1, "grouped": size.n_kv_heads}[rule]


def _common(size: SizeSpec, vocab_size: int, max_seq_len: int) -> dict[str, Any]:
    """Config fields every decoder-only HF model shares under these names."""
    return {"vocab_size": vocab_size, "hidden_size": size.d_model,
            "num_hidden_layers": size.n_layers, "num_attention_heads": size.n_heads,
            "max_position_embeddings": max_seq_len, "tie_word_embeddings": False,
            "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}


def mla_fields(d_model: int, n_heads: int, latent_ratio: int) -> dict[str, Any]:
    """The one MLA shape (DeepSeek-V3's ``DeepseekV3Attention``), for the text model and the
    DiT alike: K and V from a shared latent of ``d_model // latent_ratio`` (normed), no query
    low-rank, and half of each query/key head decoupled for RoPE (``qk_rope_head_dim``)."""
    head_dim = d_model // n_heads
    if head_dim % 4:
        raise ValueError(f"MLA needs head_dim divisible by 4 (got {head_dim})")
    return {"num_key_value_heads": n_heads, "kv_lora_rank": max(1, d_model // latent_ratio),
            "q_lora_rank": None, "qk_rope_head_dim": head_dim // 2,
            "qk_nope_head_dim": head_dim // 2, "v_head_dim": head_dim, "rope_interleave": True,
            "attention_bias": False}


def moe_fields(n_experts: int, top_k: int) -> dict[str, Any]:
    """The one MoE (Mixtral's top-k router over SwiGLU experts) with its load-balancing loss,
    for the text model and the DiT alike."""
    return {"num_local_experts": n_experts, "num_experts_per_tok": top_k,
            "output_router_logits": True, "router_aux_loss_coef": MOE_AUX_LOSS_COEF}


def _transformer(spec: ModelSpec, size: SizeSpec, vocab_size: int,
                 max_seq_len: int) -> PreTrainedModel:
    common = _common(size, vocab_size, max_seq_len)
    head_dim = size.d_model // size.n_heads
    variant = catalog.attention(spec.attention)
    if variant.builder == "deepseek_v3":
        if spec.positional != "rope":
            raise ValueError("MLA is DeepSeek's decoupled-RoPE attention; only positional='rope' "
                             f"is supported (got {spec.positional!r})")
        moe = spec.ffn == "moe"
        cfg = DeepseekV3Config(
            **common, **mla_fields(size.d_model, size.n_heads, spec.mla_latent_ratio),
            intermediate_size=size.d_ff, moe_intermediate_size=size.d_ff,
            n_routed_experts=spec.n_experts, num_experts_per_tok=spec.top_k,
            n_shared_experts=0, n_group=1, topk_group=1, norm_topk_prob=True,
            routed_scaling_factor=1.0, first_k_dense_replace=0 if moe else size.n_layers,
            rope_parameters=_rope())
        with warnings.catch_warnings():  # the empty shared expert (n_shared_experts=0) warns
            warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
            return DeepseekV3ForCausalLM(cfg)

    if spec.ffn == "moe":
        if variant.builder != "llama" or spec.positional != "rope":
            raise ValueError("MoE is built on Mixtral (RoPE, dense attention); got attention="
                             f"{spec.attention!r}, positional={spec.positional!r}")
        cfg = MixtralConfig(**common, intermediate_size=size.d_ff,
                            num_key_value_heads=kv_heads(spec.attention, size),
                            head_dim=head_dim, **moe_fields(spec.n_experts, spec.top_k),
                            rms_norm_eps=1e-6, rope_parameters=_rope())
        return MixtralForCausalLM(cfg)

    if variant.builder == "llama" and spec.positional == "rope":
        cfg = LlamaConfig(**common, intermediate_size=size.d_ff,
                          num_key_value_heads=kv_heads(spec.attention, size),
                          rope_parameters=_rope(), rms_norm_eps=1e-6)
        return LlamaForCausalLM(cfg)

    cfg = EffllmConfig(**common, intermediate_size=size.d_ff,
                       num_key_value_heads=kv_heads(spec.attention, size),
                       positional=spec.positional, attention=spec.attention,
                       rope_theta=ROPE_THETA, nsa_window=spec.nsa_window,
                       nsa_block=spec.nsa_block, nsa_stride=spec.nsa_stride,
                       nsa_selected=spec.nsa_selected, kernel=spec.kernel)
    return EffllmDecoderForCausalLM(cfg)


def build(spec: ModelSpec | dict[str, Any], size: SizeSpec | dict[str, Any], vocab_size: int,
          max_seq_len: int) -> PreTrainedModel:
    """A freshly initialised causal LM for ``spec`` at ``size`` (see the module table)."""
    spec = spec if isinstance(spec, ModelSpec) else ModelSpec.model_validate(spec)
    size = size if isinstance(size, SizeSpec) else SizeSpec.model_validate(size)
    if spec.family == "transformer":
        return _transformer(spec, size, vocab_size, max_seq_len)
    if spec.family == "pythia":
        cfg = GPTNeoXConfig(**_common(size, vocab_size, max_seq_len),
                            intermediate_size=size.d_ff, hidden_act="gelu",
                            use_parallel_residual=True,
                            rope_parameters={**_rope(), "partial_rotary_factor": 0.25})
        return GPTNeoXForCausalLM(cfg)
    if spec.family == "rwkv":
        cfg = RwkvConfig(vocab_size=vocab_size, context_length=max_seq_len,
                         hidden_size=size.d_model, num_hidden_layers=size.n_layers,
                         attention_hidden_size=size.d_model, intermediate_size=size.d_ff,
                         tie_word_embeddings=False, bos_token_id=None, eos_token_id=None)
        from .rwkv import use_kernels

        return use_kernels(RwkvForCausalLM(cfg), spec.kernel)
    if spec.family == "mamba":
        from .mamba import build_mamba  # written separately; imported only when asked for

        return build_mamba(size, vocab_size, kernel=spec.kernel)
    raise ValueError(f"unknown family {spec.family!r}")


def _is_expert_param(name: str) -> bool:
    """Parameters of routed experts (fused 3-D tensors in transformers 5, or per-expert lists)."""
    parts = name.split(".")
    return "experts" in parts and "shared_experts" not in parts


def _moe_blocks(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``<block>.experts.`` -> (top_k, n_experts) of each MoE block found among the modules (a
    ``top_k`` beside an ``experts`` module that knows its count): the count of a model whose
    config names no experts, such as the DiT with the house's MoE in its blocks."""
    found: dict[str, tuple[int, int]] = {}
    for name, module in model.named_modules():
        k, n = getattr(module, "top_k", None), getattr(getattr(module, "experts", None),
                                                       "num_experts", None)
        if isinstance(k, int) and isinstance(n, int):
            found[f"{name}.experts." if name else "experts."] = (k, n)
    return found


def count_params(model: nn.Module) -> dict[str, int]:
    """Total, active-per-token and trainable parameter counts: the one count every axis uses.

    ``active`` counts every parameter except routed experts, of which only ``top_k / n_experts``
    of each MoE layer's expert weights are used per token (the router and any shared expert are
    always active); where the config names no experts, the MoE blocks among the modules say it.
    Dense models: active == total. Shared tensors count once, and a bitsandbytes
    4-bit weight (``Params4bit``, packed two values per byte) counts its unpacked values, as
    ``PeftModel.get_nb_trainable_parameters`` does, so peft and non-peft methods count alike.
    """
    cfg = getattr(model, "config", None)
    n_exp = (getattr(cfg, "num_local_experts", None) or getattr(cfg, "n_routed_experts", None)
             or getattr(cfg, "num_experts", None))
    top_k = getattr(cfg, "num_experts_per_tok", None)
    routed = {} if n_exp and top_k else _moe_blocks(model)
    total = active = trainable = 0
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel()
        if p.__class__.__name__ == "Params4bit":
            n *= 2 * p.element_size()
        total += n
        trainable += n if p.requires_grad else 0
        block = next((kn for prefix, kn in routed.items() if name.startswith(prefix)), None)
        if n_exp and top_k and _is_expert_param(name):
            active += n * top_k // n_exp
        elif block is not None:
            active += n * block[0] // block[1]
        else:
            active += n
    return {"total": total, "active": active, "trainable": trainable}
