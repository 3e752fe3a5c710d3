"""Analytic FLOPs/KV bytes against torch's FlopCounterMode and against hand counts.

Tiny models (hidden 64, 2 layers, vocab 256, seq 64) built from Hugging Face configs. Attention
runs ``eager`` (CPU SDPA's fused kernel is invisible to FlopCounterMode) and MoE experts run
``eager`` (a loop over the experts that were hit, on their routed tokens only), so the counter
sees exactly the matmuls the formulas describe. The counter executes full (masked) attention
matrices, so comparisons use ``causal_discount=False``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
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
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    RwkvConfig,
    RwkvForCausalLM,
)

from effllm_helpers.models.flops import (
    MAMBA_SCAN_PER_CHANNEL,
    MAMBA_SCAN_PER_STATE,
    RWKV_WKV_PER_CHANNEL,
    flops_breakdown,
    flops_per_token,
    hf_deepseek_v3_caches_latent,
    hf_kv_cache_bytes_per_token,
    kv_cache_bytes_per_token,
    nsa_attended_tokens,
    recurrent_state_bytes,
)
from effllm_helpers.models.mamba import mamba_config

SEQ, VOCAB = 64, 256
COMMON = {"vocab_size": VOCAB, "hidden_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 4, "intermediate_size": 128, "max_position_embeddings": 128}
EAGER = {"attn_implementation": "eager"}
MLA = {"num_key_value_heads": 4, "kv_lora_rank": 8, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
       "v_head_dim": 16, "n_routed_experts": 4, "num_experts_per_tok": 2,
       "moe_intermediate_size": 32, "n_shared_experts": 1, "n_group": 1, "topk_group": 1,
       "experts_implementation": "eager", **EAGER}


def _llama(kv: int) -> PreTrainedModel:
    return LlamaForCausalLM(LlamaConfig(**COMMON, num_key_value_heads=kv, **EAGER))


HF_VARIANTS: dict[str, Any] = {
    "llama_mha": lambda: _llama(4),
    "llama_gqa": lambda: _llama(2),
    "llama_mqa": lambda: _llama(1),
    "mla_dense": lambda: DeepseekV3ForCausalLM(DeepseekV3Config(
        **COMMON, q_lora_rank=None, first_k_dense_replace=2, **MLA)),
    "mla_moe_qlora_shared": lambda: DeepseekV3ForCausalLM(DeepseekV3Config(
        **COMMON, q_lora_rank=16, first_k_dense_replace=1, **MLA)),
    "mixtral": lambda: MixtralForCausalLM(MixtralConfig(
        **COMMON, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        experts_implementation="eager", **EAGER)),
    "qwen2_moe": lambda: Qwen2MoeForCausalLM(Qwen2MoeConfig(
        **COMMON, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=32, shared_expert_intermediate_size=64,
        experts_implementation="eager", **EAGER)),
    "gpt_neox": lambda: GPTNeoXForCausalLM(GPTNeoXConfig(**COMMON, **EAGER)),
}


def _counted(model: PreTrainedModel) -> tuple[dict[str, float], dict[str, float]]:
    """FlopCounterMode totals per op per token: (forward, backward)."""
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (1, SEQ))
    model.train()
    with FlopCounterMode(display=False) as fwd:
        out = model(input_ids=ids, labels=ids)
    with FlopCounterMode(display=False) as bwd:
        out.loss.backward()
    return ({str(k): v / SEQ for k, v in fwd.get_flop_counts()["Global"].items()},
            {str(k): v / SEQ for k, v in bwd.get_flop_counts()["Global"].items()})


def _close(measured: float, predicted: float, tol: float = 0.05) -> bool:
    return abs(measured - predicted) <= tol * predicted


@pytest.mark.parametrize("name", list(HF_VARIANTS))
def test_matches_flop_counter_forward_and_backward(name: str) -> None:
    model = HF_VARIANTS[name]()
    fwd, bwd = _counted(model)
    pred_fwd = flops_per_token(model.config, SEQ, training=False, causal_discount=False)
    pred_train = flops_per_token(model.config, SEQ, training=True, causal_discount=False)
    # the analytic count is exact for these: a missing term fails at any tolerance above 1e-6
    assert _close(sum(fwd.values()), pred_fwd, 1e-6), (sum(fwd.values()), pred_fwd)
    assert _close(sum(fwd.values()) + sum(bwd.values()), pred_train, 1e-6)


def test_mamba_visible_parts_match_flop_counter() -> None:
    """The counter sees Mamba's linears, conv and the scan's C.h contraction, not its
    elementwise recurrence; it also over-counts grouped (depthwise) conv backward, so the
    backward check leaves convolution_backward out."""
    from effllm_helpers.models.mamba import EffllmMambaForCausalLM

    model = EffllmMambaForCausalLM(mamba_config(
        {"d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 128}, VOCAB))
    fwd, bwd = _counted(model)
    bd = flops_breakdown(model.config, SEQ)
    visible = bd["matmul"] + bd["lm_head"] + bd["conv"] + bd["recurrence_matmul"]
    assert _close(sum(fwd.values()), visible)
    # our scan's backward has three contractions of the C.h size (dC, d(dt x), dB)
    bwd_no_conv = sum(v for k, v in bwd.items() if "convolution" not in k)
    assert _close(bwd_no_conv, 2 * (bd["matmul"] + bd["lm_head"]) + 3 * bd["recurrence_matmul"])


def test_mamba_elementwise_scan_hand_count() -> None:
    cfg = mamba_config({"d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                        "d_ff": 128}, VOCAB)
    inner, n = 128, 16
    assert cfg.intermediate_size == inner and cfg.state_size == n
    bd = flops_breakdown(cfg, SEQ)
    assert bd["recurrence"] == 2 * (MAMBA_SCAN_PER_STATE * inner * n
                                    + MAMBA_SCAN_PER_CHANNEL * inner)
    assert bd["conv"] == 2 * 2 * inner * cfg.conv_kernel
    r = cfg.time_step_rank
    assert bd["matmul"] == 2 * 2 * (64 * 2 * inner + inner * (r + 2 * n) + r * inner + inner * 64)


def test_rwkv_matmuls_match_flop_counter_and_wkv_is_hand_counted() -> None:
    model = RwkvForCausalLM(RwkvConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                       attention_hidden_size=64, intermediate_size=128,
                                       context_length=128))
    fwd, bwd = _counted(model)
    bd = flops_breakdown(model.config, SEQ)
    assert _close(sum(fwd.values()), bd["matmul"] + bd["lm_head"])
    assert _close(sum(bwd.values()), 2 * (bd["matmul"] + bd["lm_head"]))
    assert bd["recurrence"] == 2 * RWKV_WKV_PER_CHANNEL * 64


def test_effllm_decoder_gqa_projections_match_flop_counter() -> None:
    """Our decoder uses SDPA, whose CPU kernel FlopCounterMode cannot see: compare the rest."""
    decoder = pytest.importorskip("effllm_helpers.models.decoder")
    model = decoder.EffllmDecoderForCausalLM(decoder.EffllmConfig(
        **COMMON, num_key_value_heads=2, attention="gqa"))
    fwd, _ = _counted(model)
    bd = flops_breakdown(model.config, SEQ)
    assert _close(sum(fwd.values()), bd["matmul"] + bd["lm_head"])
    llama = flops_breakdown(_llama(2).config, SEQ)
    assert bd == llama  # same architecture as Llama GQA, same FLOPs


def test_nsa_attended_tokens_hand_count() -> None:
    """NSA is checked by hand: its reference implementation runs dense masked attention."""
    # block 64, stride 32, 4 selected, window 128 (the paper's setting)
    assert nsa_attended_tokens(8192, 64, 32, 4, 128) == 255 + 256 + 128
    assert nsa_attended_tokens(100, 64, 32, 4, 128) == 2 + 100 + 100  # capped by context
    assert nsa_attended_tokens(10, 64, 32, 4, 128) == 0 + 10 + 10
    decoder = pytest.importorskip("effllm_helpers.models.decoder")
    cfg = decoder.EffllmConfig(**COMMON, num_key_value_heads=2, attention="nsa", nsa_window=16,
                               nsa_block=16, nsa_stride=8, nsa_selected=2)
    full = flops_breakdown(cfg, SEQ, causal_discount=False)["attention"]
    hd, pool = 16, 2 * 2 * 2 * 16 * 16 / 8  # K and V, 2 kv heads, block taps / stride
    assert full == 2 * (4 * 4 * hd * (7 + 32 + 16) + pool)  # n_cmp(64) = 7
    nsa_mod = pytest.importorskip("effllm_helpers.models.nsa")
    assert nsa_mod.attended_tokens(SEQ, 16, 8, 2, 16) == nsa_attended_tokens(SEQ, 16, 8, 2, 16)
    causal = flops_breakdown(cfg, SEQ)["attention"]
    mean_ctx = sum(nsa_attended_tokens(t, 16, 8, 2, 16) for t in range(1, SEQ + 1)) / SEQ
    assert causal == pytest.approx(2 * (4 * 4 * hd * mean_ctx + pool))
    gqa = flops_breakdown(decoder.EffllmConfig(**COMMON, num_key_value_heads=2), SEQ)
    assert flops_breakdown(cfg, SEQ)["matmul"] - gqa["matmul"] == 2 * 2 * 64 * 3 * 4  # gates


def test_causal_discount_halves_dense_attention() -> None:
    cfg = _llama(2).config
    full = flops_breakdown(cfg, SEQ, causal_discount=False)["attention"]
    causal = flops_breakdown(cfg, SEQ)["attention"]
    assert causal == pytest.approx(full * (SEQ + 1) / (2 * SEQ))


def test_mqa_gqa_same_scores_fewer_kv_projections() -> None:
    mha, mqa = flops_breakdown(_llama(4).config, SEQ), flops_breakdown(_llama(1).config, SEQ)
    assert mha["attention"] == mqa["attention"]
    # per layer k and v shrink from 4 heads to 1 head of 16 dims: 2 * 2 * 64 * 16 * 3 each
    assert mha["matmul"] - mqa["matmul"] == 2 * (2 * 2 * 64 * 16 * 3)


def test_training_is_three_forwards() -> None:
    cfg = _llama(2).config
    assert flops_per_token(cfg, SEQ) == 3 * flops_per_token(cfg, SEQ, training=False)


def test_kv_cache_bytes_dense_and_mla() -> None:
    assert kv_cache_bytes_per_token(_llama(2).config) == 2 * 2 * 2 * 16 * 2
    assert kv_cache_bytes_per_token(_llama(4).config, dtype_bytes=4) == 2 * 2 * 4 * 16 * 4
    mla = HF_VARIANTS["mla_dense"]().config
    assert kv_cache_bytes_per_token(mla) == 2 * (8 + 8) * 2  # latent + rope key
    decompressed = 2 * 4 * (16 + 16) * 2  # per-head K (nope + rope) and V
    assert hf_kv_cache_bytes_per_token(mla) == (
        kv_cache_bytes_per_token(mla) if hf_deepseek_v3_caches_latent() else decompressed)


@pytest.mark.parametrize("name", ["llama_gqa", "mla_dense"])
def test_hf_kv_cache_bytes_match_allocated_cache(name: str) -> None:
    """What the installed transformers really allocates (cache tensors) per token, in fp32."""
    model = HF_VARIANTS[name]().eval()
    with torch.no_grad():
        cache = model(torch.randint(0, VOCAB, (1, 10)), use_cache=True).past_key_values
    total = sum(t.numel() * t.element_size() for layer in cache.layers
                for t in (layer.keys, layer.values))
    assert total / 10 == hf_kv_cache_bytes_per_token(model.config, dtype_bytes=4)


def test_recurrent_models_have_state_not_kv() -> None:
    mcfg = mamba_config({"d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                         "d_ff": 128}, VOCAB)
    rcfg = RwkvConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                      attention_hidden_size=64, intermediate_size=128)
    assert kv_cache_bytes_per_token(mcfg) == 0 and kv_cache_bytes_per_token(rcfg) == 0
    assert recurrent_state_bytes(mcfg, 4) == 2 * 128 * (16 + 4) * 4
    assert recurrent_state_bytes(rcfg, 2) == 2 * (2 * 64 + 3 * 64) * 2
    assert recurrent_state_bytes(_llama(2).config) == 0


def test_unknown_model_type_is_a_clear_error() -> None:
    class Odd:
        model_type = "t5"

    with pytest.raises(ValueError, match="model_type 't5'"):
        flops_per_token(Odd(), SEQ)
    with pytest.raises(ValueError, match="supported"):
        kv_cache_bytes_per_token(Odd())


def test_mamba_training_counts_our_scan_backward_not_three_forwards() -> None:
    """Our scan's backward recomputes the states and runs three C.h-sized contractions, so
    Mamba training is more than 3x forward by exactly the hand-counted scan backward."""
    from effllm_helpers.models.flops import MAMBA_SCAN_BWD_PER_CHANNEL, MAMBA_SCAN_BWD_PER_STATE

    cfg = mamba_config({"d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                        "d_ff": 128}, VOCAB)
    inner, n = 128, 16
    fwd = flops_per_token(cfg, SEQ, training=False)
    scan_fwd = MAMBA_SCAN_PER_STATE * inner * n + MAMBA_SCAN_PER_CHANNEL * inner
    scan_bwd = MAMBA_SCAN_BWD_PER_STATE * inner * n + MAMBA_SCAN_BWD_PER_CHANNEL * inner
    assert flops_per_token(cfg, SEQ) == pytest.approx(3 * fwd + 2 * (scan_bwd - 2 * scan_fwd))
    assert flops_per_token(cfg, SEQ) > 3 * fwd


def test_mamba_training_contractions_match_flop_counter_within_2pct() -> None:
    """Forward + backward of the fast Mamba as FlopCounterMode sees it (linears, conv, the
    scan's contractions) equals the training breakdown's contraction part. The counter
    over-counts grouped-conv backward, so that op is replaced by its analytic 2x forward."""
    from effllm_helpers.models.flops import training_flops_breakdown
    from effllm_helpers.models.mamba import EffllmMambaForCausalLM

    model = EffllmMambaForCausalLM(mamba_config(
        {"d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 128}, VOCAB))
    fwd, bwd = _counted(model)
    bd = flops_breakdown(model.config, SEQ)
    counted = (sum(fwd.values()) + sum(v for k, v in bwd.items() if "convolution" not in k)
               + 2 * bd["conv"])
    tb = training_flops_breakdown(model.config, SEQ)
    predicted = tb["matmul"] + tb["lm_head"] + tb["conv"] + tb["recurrence_matmul"]
    assert _close(counted, predicted, 0.02), (counted, predicted)
    assert tb["recurrence_matmul"] == 4 * bd["recurrence_matmul"]
