"""Analytic FLOPs and cache bytes per token for every model variant of the study.

Why analytic: MFU needs "model FLOPs" that do not depend on how a kernel happens to be written
(a dense-masked reference NSA, an eager MoE loop, a fused scan), and KV-cache size is a property
of the architecture that the inference axis compares against measured memory.

Conventions (all per token, read from a Hugging Face config by ``config.model_type``):

- A matmul of an ``m x k`` by ``k x n`` counts ``2 m k n`` FLOPs (multiply + add); bias adds,
  norms, softmax, RoPE, activations and residual adds are not counted, like
  ``torch.utils.flop_counter.FlopCounterMode``. The exceptions are Mamba's scan and RWKV's WKV
  recurrence, which are elementwise by nature and counted one FLOP per elementwise op
  (``exp`` included) so attention-free models are not flattered.
- The LM head is included; the embedding lookup is not (a gather, no FLOPs).
- MoE counts the router and only the ``top_k`` routed experts a token visits (plus shared
  experts), not all experts.
- Attention counts ``QK^T`` and ``AV`` over the keys each query attends. With
  ``causal_discount=True`` (the default, the work a causal kernel must do) a query at position
  ``t`` attends ``t`` keys, i.e. ``(S+1)/2`` on average for dense attention; with ``False`` every
  query attends the whole context ``S``, which is what dense masked kernels execute and what
  FlopCounterMode counts for SDPA/eager attention. NSA attends, at context ``t``,
  ``n_cmp(t) + min(selected*block, t) + min(window, t)`` tokens per query over its three branches
  (``n_cmp(t) = (t-block)//stride + 1``), plus the pooling that builds compressed keys/values.
- ``training=True`` multiplies the forward by 3 (forward + backward, the backward being two
  matmuls per forward matmul), the usual ``6 N`` rule generalised; Mamba's scan backward is
  counted as our implementation runs it (:func:`training_flops_breakdown`).

KV-cache bytes per token: ``2 * layers * kv_heads * head_dim * bytes`` for attention; MLA caches
its latent ``kv_lora_rank + qk_rope_head_dim`` per layer. What transformers' DeepseekV3 code
stores depends on its version (5.17 caches decompressed per-head K and V, 5.24 the latent):
``as_implemented=True`` / :func:`hf_kv_cache_bytes_per_token` follow the installed version, which
is what measured memory shows. Mamba and RWKV cache nothing per token; their constant state
is :func:`recurrent_state_bytes`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .. import catalog

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "flops_breakdown",
    "finetune_flops_per_token",
    "flops_per_token",
    "training_flops_breakdown",
    "executed_flops_per_token",
    "dit_flops_per_token",
    "generation_flops",
    "hf_deepseek_v3_caches_latent",
    "hf_kv_cache_bytes_per_token",
    "kv_cache_bytes_per_token",
    "nsa_attended_tokens",
    "nsa_executed_attention_flops",
    "nsa_fla_executed_attention_flops",
    "recurrent_state_bytes",
]

_LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")
_MAMBA = ("mamba", "effllm_mamba")
SUPPORTED_MODEL_TYPES = (*_LLAMA_LIKE, "effllm_decoder", "mixtral", "qwen2_moe", "deepseek_v3",
                         "gpt_neox", "gpt2", "bloom", *_MAMBA, "rwkv")

# elementwise FLOPs of the recurrences (one per op, exp counted as one)
MAMBA_SCAN_PER_STATE = 7  # dt*A, exp, (dt x)*B, decay*h, +u, *C, sum over states
MAMBA_SCAN_PER_CHANNEL = 8  # dt bias + softplus (2), dt*x, D*x, +, silu(z) (2), *gate
# backward of our scan (models/mamba.py _SelectiveScan.backward, per [t, d, n] element): recompute
# of the chunk's states (dt*A, exp, u, addcmul: 5), dC, d(dt x) and dB contractions (3 x 2),
# g = dy*C (1), adjoint addcmul (2), g*h_{t-1} and *decay (2), dA (mul + sum: 2), dl*A + sum (2)
MAMBA_SCAN_BWD_PER_STATE = 20
MAMBA_SCAN_BWD_CONTRACTIONS = 3  # dC, d(dt x), dB: each the size of the forward's C.h
# per [t, d] channel: the scan's dt*x recompute, d(dt) (2) and dx (1), plus the backward of the
# 8 elementwise forward ops around it at the usual two ops per forward op
MAMBA_SCAN_BWD_PER_CHANNEL = 4 + 2 * MAMBA_SCAN_PER_CHANNEL
RWKV_WKV_PER_CHANNEL = 23  # stable WKV: output (12: add, max, 2 sub, 2 exp, 3 mul, 2 add, div)
#                            + state update (11: add, max, 2 sub, 2 exp, 3 mul, 2 add)


def _model_type(config: Any) -> str:
    mt = getattr(config, "model_type", None)
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"no analytic FLOPs for model_type {mt!r} ({type(config).__name__}); "
                         f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    return mt


def _head_dim(config: Any) -> int:
    hd = getattr(config, "head_dim", None)
    return int(hd) if hd else config.hidden_size // config.num_attention_heads


def _dense_ctx(seq_len: int, causal_discount: bool) -> float:
    """Mean keys per query for causal dense attention over a context of ``seq_len``."""
    return (seq_len + 1) / 2 if causal_discount else float(seq_len)


def nsa_attended_tokens(t: int, block: int, stride: int, n_selected: int, window: int) -> int:
    """Keys a query at context length ``t`` attends over NSA's three branches (capped at ``t``)."""
    n_cmp = 0 if t < block else (t - block) // stride + 1
    return n_cmp + min(n_selected * block, t) + min(window, t)


def _nsa_ctx(config: Any, seq_len: int, causal_discount: bool) -> float:
    args = (config.nsa_block, config.nsa_stride, config.nsa_selected, config.nsa_window)
    if not causal_discount:
        return float(nsa_attended_tokens(seq_len, *args))
    return sum(nsa_attended_tokens(t, *args) for t in range(1, seq_len + 1)) / seq_len


def _swiglu(d: int, ff: int) -> float:
    """gate, up and down projections of a gated MLP."""
    return 3 * 2.0 * d * ff


def _gqa_proj(d: int, n_heads: int, n_kv: int, hd: int) -> float:
    """q, k, v, o projections; MQA/GQA only shrink k and v."""
    return 2.0 * d * hd * (2 * n_heads + 2 * n_kv)


def _mlp_flops(config: Any, mt: str, layer: int) -> float:
    """FFN FLOPs of one layer: dense MLP, or router + top-k experts + shared experts."""
    d = config.hidden_size
    if mt == "mixtral":
        return 2.0 * d * config.num_local_experts + config.num_experts_per_tok * _swiglu(
            d, config.intermediate_size)
    if mt == "qwen2_moe":
        sparse = (layer not in (config.mlp_only_layers or []) and config.num_experts > 0
                  and (layer + 1) % config.decoder_sparse_step == 0)
        if not sparse:
            return _swiglu(d, config.intermediate_size)
        return (2.0 * d * config.num_experts
                + config.num_experts_per_tok * _swiglu(d, config.moe_intermediate_size)
                + _swiglu(d, config.shared_expert_intermediate_size) + 2.0 * d)  # + shared gate
    if mt == "deepseek_v3":
        if layer < config.first_k_dense_replace:
            return _swiglu(d, config.intermediate_size)
        shared = config.moe_intermediate_size * (config.n_shared_experts or 0)
        return (2.0 * d * config.n_routed_experts
                + config.num_experts_per_tok * _swiglu(d, config.moe_intermediate_size)
                + _swiglu(d, shared))
    return _swiglu(d, config.intermediate_size)


def _body_flops(config: Any, mt: str) -> dict[str, float]:
    """Forward FLOPs of one token through the blocks that do not depend on its context length
    (projections, FFN/experts, Mamba's conv and scan, RWKV's WKV), all layers summed."""
    d, n_layers = config.hidden_size, config.num_hidden_layers
    if mt in _MAMBA:
        inner, n, r, k = (config.intermediate_size, config.state_size, int(config.time_step_rank),
                          config.conv_kernel)
        per_layer = 2.0 * d * 2 * inner + 2.0 * inner * (r + 2 * n) + 2.0 * r * inner
        per_layer += 2.0 * inner * d  # out_proj
        return {"matmul": n_layers * per_layer, "conv": n_layers * 2.0 * inner * k,
                "recurrence": n_layers * float(MAMBA_SCAN_PER_STATE * inner * n
                                               + MAMBA_SCAN_PER_CHANNEL * inner),
                "recurrence_matmul": n_layers * 2.0 * inner * n}
    if mt == "rwkv":
        att, ff = config.attention_hidden_size, config.intermediate_size
        time_mix = 3 * 2.0 * d * att + 2.0 * att * d  # key, value, receptance, output
        channel_mix = 2.0 * d * ff + 2.0 * ff * d + 2.0 * d * d  # key, value, receptance
        return {"matmul": n_layers * (time_mix + channel_mix),
                "recurrence": n_layers * float(RWKV_WKV_PER_CHANNEL * att)}
    if mt in ("gpt_neox", "gpt2", "bloom"):
        ff = (config.intermediate_size if mt == "gpt_neox"
              else (getattr(config, "n_inner", None) or 4 * d))
        return {"matmul": n_layers * (2.0 * d * 3 * d + 2.0 * d * d + 2 * 2.0 * d * ff)}

    n_heads = config.num_attention_heads
    mlp = sum(_mlp_flops(config, mt, i) for i in range(n_layers))
    if mt == "deepseek_v3":
        qk_hd = config.qk_nope_head_dim + config.qk_rope_head_dim
        v_hd, r = config.v_head_dim, config.kv_lora_rank
        if config.q_lora_rank:
            q = 2.0 * d * config.q_lora_rank + 2.0 * config.q_lora_rank * n_heads * qk_hd
        else:
            q = 2.0 * d * n_heads * qk_hd
        kv = 2.0 * d * (r + config.qk_rope_head_dim) + 2.0 * r * n_heads * (
            config.qk_nope_head_dim + v_hd)
        o = 2.0 * n_heads * v_hd * d
        return {"matmul": n_layers * (q + kv + o) + mlp}
    # Llama-like (llama, mistral, qwen2, qwen3, mixtral, qwen2_moe, effllm_decoder)
    proj = _gqa_proj(d, n_heads, config.num_key_value_heads, _head_dim(config))
    if _is_nsa(config, mt):
        proj += 2.0 * d * 3 * n_heads  # per-head branch gates
    return {"matmul": n_layers * proj + mlp}


def _is_nsa(config: Any, mt: str) -> bool:
    """Our decoder's attention rule comes from the catalog: an unknown variant raises instead of
    being counted as dense attention."""
    if mt != "effllm_decoder":
        return False
    return catalog.attention(getattr(config, "attention", "gqa")).flops == "nsa"


def _attention_flops(config: Any, mt: str, keys: float) -> float:
    """Attention FLOPs of one query that attends ``keys`` tokens (all layers): ``QK^T`` and
    ``AV``; NSA adds its per-token K/V pooling. ``keys`` is the *attended* count (for NSA, see
    :func:`nsa_attended_tokens`), so callers choose causal, full or per-position contexts."""
    n_layers = config.num_hidden_layers
    if mt in _MAMBA or mt == "rwkv":
        return 0.0
    if mt in ("gpt_neox", "gpt2", "bloom"):
        # heads * head_dim = d, so the score FLOPs depend on d only
        return n_layers * 4.0 * config.hidden_size * keys
    n_heads = config.num_attention_heads
    if mt == "deepseek_v3":
        qk_hd = config.qk_nope_head_dim + config.qk_rope_head_dim
        return n_layers * 2.0 * n_heads * (qk_hd + config.v_head_dim) * keys
    hd = _head_dim(config)
    if _is_nsa(config, mt):
        # pooled K and V: 2 tensors x n_kv heads x block taps per compressed block, one
        # compressed block every `stride` tokens
        pool = 2 * 2.0 * config.num_key_value_heads * hd * config.nsa_block / config.nsa_stride
        return n_layers * (4.0 * n_heads * hd * keys + pool)
    return n_layers * 4.0 * n_heads * hd * keys


def _keys_at(config: Any, mt: str, t: int) -> int:
    """Keys a query at context length ``t`` (itself included) attends."""
    if _is_nsa(config, mt):
        return nsa_attended_tokens(t, config.nsa_block, config.nsa_stride, config.nsa_selected,
                                   config.nsa_window)
    return t


def _lm_head_flops(config: Any) -> float:
    return 2.0 * config.hidden_size * config.vocab_size


def flops_breakdown(config: Any, seq_len: int, *, causal_discount: bool = True) -> dict[str, float]:
    """Forward FLOPs per token by component (all layers summed).

    Keys: ``matmul`` (weight matmuls in the blocks, incl. routers/experts), ``attention``
    (scores and values; NSA also its K/V pooling), ``lm_head``, and for attention-free models
    ``conv`` (Mamba's depthwise conv) and ``recurrence`` (Mamba scan / RWKV WKV, elementwise;
    for Mamba ``recurrence_matmul`` is the part of it that is the ``C . h`` contraction).
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    mt = _model_type(config)
    out = {"matmul": 0.0, "attention": 0.0, "lm_head": _lm_head_flops(config)}
    out.update(_body_flops(config, mt))
    if mt in _MAMBA or mt == "rwkv":
        return out
    if _is_nsa(config, mt):
        keys = _nsa_ctx(config, seq_len, causal_discount)
    else:
        keys = _dense_ctx(seq_len, causal_discount)
    out["attention"] = _attention_flops(config, mt, keys)
    return out


def _body_sum(body: dict[str, float]) -> float:
    return sum(v for k, v in body.items() if k != "recurrence_matmul")  # inside "recurrence"


def generation_flops(config: Any, prompt_len: int, gen_tokens: int) -> dict[str, Any]:
    """Model FLOPs of one greedy request for ONE sequence: prefill runs the body on P prompt
    positions and the LM head once (only the last position's logits are needed); decode runs
    N-1 further forwards of body+head (the first new token comes from the prefill), each at its
    own context length. Returns {"prefill": ..., "decode": ..., "total": ..., "method": str}.

    Prefill position ``t`` (1..P) attends ``t`` keys (causal; NSA its attended tokens at ``t``);
    decode step ``i`` (1..N-1) attends ``P + i``. ``method`` says where what a Hugging Face
    ``generate`` executes differs from these model FLOPs (see :func:`_executed_note`).
    """
    if prompt_len < 1 or gen_tokens < 1:
        raise ValueError(f"prompt_len and gen_tokens must be >= 1, got {prompt_len}, "
                         f"{gen_tokens}")
    mt = _model_type(config)
    body, head = _body_sum(_body_flops(config, mt)), _lm_head_flops(config)
    prefill = prompt_len * body + head + sum(
        _attention_flops(config, mt, _keys_at(config, mt, t)) for t in range(1, prompt_len + 1))
    decode = sum(body + head + _attention_flops(config, mt, _keys_at(config, mt, prompt_len + i))
                 for i in range(1, gen_tokens))
    method = ("model_flops: prefill = body x P + causal attention over 1..P + LM head once; "
              "decode = N-1 x (body + LM head) + attention at context P+i")
    note = _executed_note(config, mt)
    if note:
        method += f"; executed differs: {note}"
    return {"prefill": prefill, "decode": decode, "total": prefill + decode, "method": method}


def _executed_note(config: Any, mt: str) -> str:
    """How the work the study's implementations execute differs from the model FLOPs."""
    if mt == "deepseek_v3" and hf_deepseek_v3_caches_latent():
        return ("HF DeepSeek-V3 decompresses the latent KV cache each step (kv_b_proj over all "
                "P+i cached positions, not only the new one)")
    if _is_nsa(config, mt):
        return ("NSA decodes with a KV cache on the pytorch_dense_masked_reference (also where "
                "fla runs training): its selected and window branches run SDPA over all keys "
                "under masks (see nsa_executed_attention_flops)")
    if mt in _MAMBA:
        return ("Mamba's scan is counted one FLOP per elementwise op; only its C.h contraction "
                "is a matmul")
    if mt == "rwkv":
        return ("RWKV's WKV recurrence is counted one FLOP per elementwise op (no matmul); "
                "transformers' cached RWKV decode at batch B executes B x these FLOPs per "
                "sequence (B x B rows: a sequence's state meets every row of the batch), so "
                "batched-decode MFU counts the model's work, not the executed work")
    return ""


def training_flops_breakdown(config: Any, seq_len: int, *,
                             causal_discount: bool = True) -> dict[str, float]:
    """Forward + backward FLOPs per token by component (keys of :func:`flops_breakdown`).

    Weight matmuls, attention, LM head and conv: forward + two backward matmuls (activation and
    weight gradients) = 3x forward. Mamba's scan is counted as our implementation runs it: its
    backward recomputes the chunk's states and has three contractions of the ``C . h`` size
    (``MAMBA_SCAN_BWD_*``), so ``recurrence_matmul`` is 4x forward, not 3x. RWKV's WKV: 3x.
    """
    fwd = flops_breakdown(config, seq_len, causal_discount=causal_discount)
    out = {k: 3 * v for k, v in fwd.items()}
    if _model_type(config) in _MAMBA:
        inner, n = config.intermediate_size, config.state_size
        bwd = config.num_hidden_layers * float(MAMBA_SCAN_BWD_PER_STATE * inner * n
                                               + MAMBA_SCAN_BWD_PER_CHANNEL * inner)
        out["recurrence"] = fwd["recurrence"] + bwd
        out["recurrence_matmul"] = fwd["recurrence_matmul"] * (1 + MAMBA_SCAN_BWD_CONTRACTIONS)
    return out


def flops_per_token(config: Any, seq_len: int, training: bool = True, *,
                    causal_discount: bool = True) -> float:
    """Analytic FLOPs per token: forward, or forward+backward when ``training`` (3x forward,
    except Mamba's scan, see :func:`training_flops_breakdown`).

    ``seq_len`` is the context length the tokens are processed in (training sequence length).
    See the module docstring for what is counted; ``causal_discount`` chooses whether causally
    masked attention pairs count (``False``) or not (``True``, default).
    """
    if training:
        return _body_sum(training_flops_breakdown(config, seq_len,
                                                  causal_discount=causal_discount))
    return _body_sum(flops_breakdown(config, seq_len, causal_discount=causal_discount))


def nsa_executed_attention_flops(config: Any, q_len: int, s_len: int) -> float:
    """Attention FLOPs our NSA (``models/nsa.py``, a dense masked reference) executes for one
    call of ``q_len`` queries over ``s_len`` keys, all layers, counted like FlopCounterMode.

    Per layer: K and V pooled over every compressed block (``2 x 2 n_kv n_cmp hd block``); the
    compressed branch's scores and values over ``n_cmp`` blocks (``4 H T n_cmp hd``); the
    selection importance ``probs @ overlap`` (``2 n_kv T n_cmp n_sel``); and the selected and
    window branches as SDPA over all ``S`` keys under masks (``2 x 4 H T S hd``). A cached
    decode step (``q_len = 1``) re-pools every compressed block of the context.
    """
    from .nsa import n_compressed_blocks

    h, n_kv, hd = config.num_attention_heads, config.num_key_value_heads, _head_dim(config)
    block, stride = config.nsa_block, config.nsa_stride
    n_cmp = n_compressed_blocks(s_len, block, stride)
    n_sel = -(-s_len // block)
    per_layer = (2 * 2.0 * n_kv * n_cmp * hd * block + 4.0 * h * q_len * n_cmp * hd
                 + 2.0 * n_kv * q_len * n_cmp * n_sel + 2 * 4.0 * h * q_len * s_len * hd)
    return config.num_hidden_layers * per_layer


def nsa_fla_executed_attention_flops(config: Any, seq_len: int) -> float:
    """Attention FLOPs fla's NSA kernels execute on one full ``seq_len`` sequence (no cache),
    all layers: ``parallel_nsa`` (compressed attention, its top-k re-scoring, selected
    attention) over tile-padded query heads (``n_kv x fla_group``, see :mod:`.nsa`) and
    ``parallel_attn``'s window over the real heads. Each query counts only the keys it can see
    (whole tiles skipped, partial tiles counted as what they hold)."""
    from .nsa import fla_group

    h, n_kv, hd = config.num_attention_heads, config.num_key_value_heads, _head_dim(config)
    hp = n_kv * fla_group(h, n_kv)
    block, n_sel, window = config.nsa_block, config.nsa_selected, config.nsa_window
    cmp = sum((t + 1) // block for t in range(seq_len))  # visible compressed blocks
    rescore = sum(t // block for t in range(seq_len))  # top-k candidates
    sel = sum(min(n_sel * block, t + 1) for t in range(seq_len))
    win = sum(min(window, t + 1) for t in range(seq_len))
    pool = 2 * 2.0 * n_kv * seq_len * hd  # mean pooling of K and V
    per_layer = 4.0 * hp * hd * (cmp + sel) + 2.0 * hp * hd * rescore + 4.0 * h * hd * win
    return config.num_hidden_layers * (per_layer + pool)


def executed_flops_per_token(config: Any, seq_len: int, implementation: str | None = None
                             ) -> float:
    """Forward FLOPs per token the study's implementation executes on a full ``seq_len``
    sequence (no cache), where that differs from the model FLOPs of :func:`flops_per_token`.

    NSA: the dense masked reference (:func:`nsa_executed_attention_flops`), 1.03-1.70x its
    sparse model FLOPs; or, when ``implementation`` names fla (``fla.parallel_nsa...``), fla's
    block-sparse kernels over padded heads (:func:`nsa_fla_executed_attention_flops`). Other
    attention models: every query against the whole context (``causal_discount=False``), what
    masked eager/SDPA-math kernels execute.
    """
    mt = _model_type(config)
    if not _is_nsa(config, mt):
        return flops_per_token(config, seq_len, training=False, causal_discount=False)
    body = _body_sum(_body_flops(config, mt)) + _lm_head_flops(config)
    if implementation and implementation.startswith("fla."):
        return body + nsa_fla_executed_attention_flops(config, seq_len) / seq_len
    return body + nsa_executed_attention_flops(config, seq_len, seq_len) / seq_len


def _trainable(module: Any) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _linear_flops(module: Any, input_rg: bool, tokens_per_step: int
                  ) -> tuple[float, float, bool]:
    """(forward, backward, output requires grad) per token of one ``nn.Linear`` or peft LoRA
    layer, given whether its input requires grad (autograd computes an input gradient only then).

    Base weight: forward ``2io``; backward ``2io`` for the input gradient (if needed) and
    ``2io`` for the weight gradient (if trainable). Each LoRA adapter ``x -> A (i->r) -> B
    (r->o)``: forward ``2ir + 2ro``; backward the weight gradients of A and B, the gradient into
    A's output, and into ``x`` if needed. DoRA also, in training with dropout, re-runs the base
    matmul on the dropped-out input (and its input gradient), and once per forward call builds
    ``B A`` by pushing an identity through both (``2 i i r + 2 i r o``, detached, no backward),
    spread over the ``tokens_per_step`` tokens of the call.
    """
    base = getattr(module, "base_layer", module)
    i, o = base.in_features, base.out_features
    w_rg = base.weight.requires_grad
    fwd = 2.0 * i * o
    bwd = 2.0 * i * o * (int(input_rg) + int(w_rg))
    out_rg = input_rg or w_rg
    for name, a in getattr(module, "lora_A", {}).items():
        b, r = module.lora_B[name], module.lora_A[name].out_features
        a_rg, b_rg = a.weight.requires_grad, b.weight.requires_grad
        fwd += 2.0 * i * r + 2.0 * r * o
        a_out_rg = input_rg or a_rg
        bwd += 2.0 * r * o * (int(b_rg) + int(a_out_rg)) + 2.0 * i * r * (int(a_rg)
                                                                            + int(input_rg))
        out_rg = out_rg or a_rg or b_rg or a_out_rg
        if name in getattr(module, "lora_magnitude_vector", {}):
            fwd += (2.0 * i * i * r + 2.0 * i * r * o) / tokens_per_step
            dropout = module.lora_dropout[name]
            if module.training and type(dropout).__name__ != "Identity":
                fwd += 2.0 * i * o
                bwd += 2.0 * i * o * int(input_rg)
            out_rg = out_rg or module.lora_magnitude_vector[name].weight.requires_grad
    return fwd, bwd, out_rg


def mean_keys_per_token(lengths: Sequence[int], causal_discount: bool = True) -> float:
    """Keys a token attends, averaged over every token of examples of these ``lengths`` when
    each example attends only to itself (packed or padded): sum of L x keys(L) over sum of L.

    Why not the keys at the mean length: attention grows with the square of an example's
    length, so (mean L + 1) / 2 understates it whenever lengths differ, and ``max_len``
    overstates it (MFU 2.5-7.2 % high on the reference fine-tuning runs)."""
    lengths = [int(n) for n in lengths if n > 0]
    if not lengths:
        raise ValueError("no example lengths")
    return sum(n * _dense_ctx(n, causal_discount) for n in lengths) / sum(lengths)


def finetune_flops_per_token(model: Any, seq_len: int, tokens_per_step: int, *,
                             causal_discount: bool = True,
                             lengths: Sequence[int] | None = None) -> dict[str, Any]:
    """Forward and backward FLOPs per token of one training step of a (peft-)prepared model.

    Walks a Llama-like model's blocks in execution order and counts, per weight matmul, what
    autograd really runs: input gradients only where something trainable lies upstream (below
    the first trainable layer there is no backward at all), weight gradients only for trainable
    weights, LoRA/DoRA adapter work per :func:`_linear_flops`; attention ``QK^T`` and ``AV``
    backward per which of q, k, v require grad. Full fine-tuning comes out as 3x forward.
    ``tokens_per_step``: tokens in one forward call (batch x sequence), for DoRA's per-call work.
    ``lengths``: the examples' real lengths; attention is then counted at each example's own
    length (:func:`mean_keys_per_token`) instead of at ``seq_len``. Raises ``ValueError`` for
    models that are not Llama-like dense decoders.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config
    mt = _model_type(cfg)
    if mt not in (*_LLAMA_LIKE, "effllm_decoder") or _is_nsa(cfg, mt):
        raise ValueError(f"fine-tuning FLOPs walk Llama-like dense decoders, not {mt!r}")
    layers = base.model.layers
    keys = (mean_keys_per_token(lengths, causal_discount) if lengths
            else _dense_ctx(seq_len, causal_discount))
    attn = _attention_flops(cfg, mt, keys) / len(layers)
    emb = base.get_input_embeddings()
    g = (emb.weight.requires_grad or hasattr(base, "_require_grads_hook")
         or bool(getattr(base, "_require_grads_hooks", None)))
    fwd = bwd = 0.0

    def lin(module: Any, input_rg: bool) -> bool:
        nonlocal fwd, bwd
        f, b, out_rg = _linear_flops(module, input_rg, tokens_per_step)
        fwd, bwd = fwd + f, bwd + b
        return out_rg

    for layer in layers:
        sa, mlp = layer.self_attn, layer.mlp
        x_rg = g or _trainable(layer.input_layernorm)
        q_rg, k_rg, v_rg = (lin(sa.q_proj, x_rg), lin(sa.k_proj, x_rg), lin(sa.v_proj, x_rg))
        fwd += attn
        # QK^T: dQ and dK each half of the forward's score work; AV: dP (if q or k) and dV
        bwd += attn / 2 * (int(q_rg) + int(k_rg) + int(q_rg or k_rg) + int(v_rg))
        g = lin(sa.o_proj, q_rg or k_rg or v_rg) or g
        h_rg = g or _trainable(layer.post_attention_layernorm)
        gate_rg, up_rg = lin(mlp.gate_proj, h_rg), lin(mlp.up_proj, h_rg)
        g = lin(mlp.down_proj, gate_rg or up_rg) or g
    lin(base.get_output_embeddings(), g or _trainable(base.model.norm))
    return {"forward": fwd, "backward": bwd, "total": fwd + bwd, "attention_keys": keys,
            "method": "per-module autograd walk: input grads where upstream is trainable, "
                      "weight grads for trainable weights, LoRA/DoRA adapter matmuls; attention "
                      + ("at each example's own length" if lengths else f"at {seq_len} tokens")}


def hf_deepseek_v3_caches_latent() -> bool:
    """Whether the installed transformers' DeepseekV3 caches MLA's latent (True in 5.24, where
    ``DeepseekV3Attention.expand_kv`` decompresses after the cache) or decompressed K/V."""
    try:
        from transformers.models.deepseek_v3 import modeling_deepseek_v3 as mod
    except ImportError:  # pragma: no cover - transformers without DeepseekV3
        return False
    return hasattr(mod.DeepseekV3Attention, "expand_kv")


def kv_cache_bytes_per_token(config: Any, dtype_bytes: int = 2, *,
                             as_implemented: bool = False) -> int:
    """Bytes of KV cache one token adds, summed over layers (0 for Mamba/RWKV).

    For MLA (``deepseek_v3``) the default is the architecture's latent cache
    (``kv_lora_rank + qk_rope_head_dim`` per layer). ``as_implemented=True`` gives what the
    installed transformers stores: older releases (e.g. 5.17) cache decompressed per-head K
    (``qk_nope + qk_rope``) and V (``v_head_dim``); newer ones (5.24) cache the latent (see
    :func:`hf_deepseek_v3_caches_latent`). NSA caches full K/V like GQA (its compressed K/V are
    rebuilt from them).
    """
    mt = _model_type(config)
    n_layers = config.num_hidden_layers
    if mt in _MAMBA or mt == "rwkv":
        return 0
    if mt == "deepseek_v3":
        if as_implemented and not hf_deepseek_v3_caches_latent():
            qk_hd = config.qk_nope_head_dim + config.qk_rope_head_dim
            per_layer = config.num_attention_heads * (qk_hd + config.v_head_dim)
        else:
            per_layer = config.kv_lora_rank + config.qk_rope_head_dim
        return int(n_layers * per_layer * dtype_bytes)
    if mt in ("gpt_neox", "gpt2", "bloom"):
        return int(2 * n_layers * config.hidden_size * dtype_bytes)
    n_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return int(2 * n_layers * n_kv * _head_dim(config) * dtype_bytes)


def hf_kv_cache_bytes_per_token(config: Any, dtype_bytes: int = 2) -> int:
    """KV bytes per token as the installed transformers stores them (MLA: version-dependent)."""
    return kv_cache_bytes_per_token(config, dtype_bytes, as_implemented=True)


def recurrent_state_bytes(config: Any, dtype_bytes: int = 2) -> int:
    """Constant per-sequence state of attention-free models (0 for attention models).

    Mamba: per layer an SSM state ``d_inner x d_state`` and a conv window ``d_inner x
    conv_kernel`` (as transformers stores it). RWKV: per layer the two token-shift vectors
    (``hidden``) and the WKV numerator, denominator and max (``attention_hidden``).
    """
    mt = _model_type(config)
    n_layers = config.num_hidden_layers
    if mt in _MAMBA:
        inner = config.intermediate_size
        return int(n_layers * inner * (config.state_size + config.conv_kernel) * dtype_bytes)
    if mt == "rwkv":
        return int(n_layers * (2 * config.hidden_size + 3 * config.attention_hidden_size)
                   * dtype_bytes)
    return 0


# ---------------------------------------------------------------- the DiT (axis 4)
# DiT weights that run once per image, not per patch token: each block's adaLN-Zero
# conditioning (its own timestep MLP and the 6·d modulation) and the final shift/scale
DIT_PER_IMAGE = ("norm1.emb.", "norm1.linear", "proj_out_1")


def dit_flops_per_token(dit: Any, n_tokens: int, training: bool) -> float:
    """FLOPs per patch token of a DiT (``models/vision.py``), counted from its modules: 2 per
    matmul weight a token runs through (``nn.Linear``/``nn.Conv2d``; embedding tables, norms and
    biases excluded); an MoE block by the text MoE's rule (router + ``top_k`` SwiGLU experts,
    :func:`_mlp_flops` of its Mixtral config); attention scores and mixing ``4·L·S·d`` (every
    patch attends all ``S``; MLA's query/key and value heads are ``head_dim`` wide, so its
    scores cost the same); and the per-image conditioning weights (:data:`DIT_PER_IMAGE`) spread
    over the image's ``S`` tokens. Training is 3x forward. Counting the conditioning per token
    overstated the work 1.4-2x against ``FlopCounterMode`` (tests pin agreement within 5 %)."""
    from torch import nn

    per_token = per_image = 0.0
    for m in dit.modules():  # an MoE block: its router and top_k experts (not nn.Linear)
        if hasattr(m, "gate") and hasattr(getattr(m, "experts", None), "num_experts"):
            per_token += _mlp_flops(m.experts.config, "mixtral", 0) / 2
    for name, m in dit.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d)):
            continue
        if any(part in name for part in DIT_PER_IMAGE):
            per_image += m.weight.numel()
        else:
            per_token += m.weight.numel()
    cfg = dit.config
    d = cfg.num_attention_heads * cfg.attention_head_dim
    fwd = 2 * per_token + 4 * cfg.num_layers * n_tokens * d + 2 * per_image / n_tokens
    return float(3 * fwd if training else fwd)

