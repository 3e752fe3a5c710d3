"""generation_flops: model FLOPs of one greedy request against what HF ``generate`` executes.

Every zoo variant at the ci size, batch 1, P=16 prompt tokens, N=8 new tokens, run under
FlopCounterMode with SDPA forced onto its math backend (CPU's fused kernel is invisible to the
counter) and MoE experts run eagerly (only routed tokens hit an expert). Where the executed work
legitimately differs from the model FLOPs, ``method`` names the difference and the variant is
checked against its own executed-FLOP formula.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from effllm_helpers.config import ModelSpec, SizeSpec
from effllm_helpers.models import build
from effllm_helpers.models.flops import (
    flops_breakdown,
    generation_flops,
    hf_deepseek_v3_caches_latent,
    nsa_executed_attention_flops,
)

pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")

VOCAB, P, N = 256, 16, 8
SIZE = SizeSpec(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=64)
NSA = {"attention": "nsa", "nsa_window": 8, "nsa_block": 8, "nsa_stride": 4, "nsa_selected": 2}
DENSE = {
    "mha": {"attention": "mha"}, "mqa": {"attention": "mqa"}, "gqa": {"attention": "gqa"},
    "gqa_sinusoidal": {"attention": "gqa", "positional": "sinusoidal"},
    "gqa_relative": {"attention": "gqa", "positional": "relative"},
    "moe": {"attention": "gqa", "ffn": "moe"}, "pythia": {"family": "pythia"},
}


def _generate_counted(overrides: dict) -> tuple[torch.nn.Module, float]:
    """Frozen weights: since transformers 5.25 (with the ``kernels`` package) Mamba's causal conv
    is a hub-kernel module called with the conv's Parameters as arguments, and the counter's
    module tracker cannot hook a leaf that requires grad inside ``generate``; inference needs no
    grad, and the count is the same."""
    torch.manual_seed(0)
    model = build(ModelSpec(**overrides), SIZE, VOCAB, 64).eval().requires_grad_(False)
    if overrides.get("ffn") == "moe":
        model.set_experts_implementation("eager")
    ids = torch.randint(0, VOCAB, (1, P))
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as fc:
        out = model.generate(ids, max_new_tokens=N, min_new_tokens=N, do_sample=False)
    assert out.shape == (1, P + N)
    return model, float(fc.get_total_flops())


def _close(measured: float, predicted: float, tol: float = 0.05) -> bool:
    return abs(measured - predicted) <= tol * predicted


@pytest.mark.parametrize("name", list(DENSE))
def test_dense_and_moe_generation_matches_flop_counter(name: str) -> None:
    """Model FLOPs = executed FLOPs up to the masked half of the prefill score matrix."""
    model, counted = _generate_counted(DENSE[name])
    g = generation_flops(model.config, P, N)
    assert _close(counted, g["total"]), (counted, g)
    assert g["total"] == g["prefill"] + g["decode"]
    assert "executed differs" not in g["method"]


def test_head_once_in_prefill_and_contexts_grow() -> None:
    cfg = build(ModelSpec(attention="gqa"), SIZE, VOCAB, 64).config
    bd1 = flops_breakdown(cfg, 1, causal_discount=False)
    body, head = bd1["matmul"], bd1["lm_head"]
    attn_per_key = bd1["attention"]
    g = generation_flops(cfg, P, N)
    assert g["prefill"] == pytest.approx(P * body + head + attn_per_key * P * (P + 1) / 2)
    keys = sum(P + i for i in range(1, N))
    assert g["decode"] == pytest.approx((N - 1) * (body + head) + attn_per_key * keys)
    assert generation_flops(cfg, P, 1)["decode"] == 0


@pytest.mark.parametrize("overrides", [{"attention": "mla"}, {"attention": "mla", "ffn": "moe"}],
                         ids=["mla", "mla_moe"])
def test_mla_generation_executed_adds_latent_decompression(overrides: dict) -> None:
    """HF DeepSeek-V3 re-expands every cached latent through kv_b_proj at each decode step."""
    model, counted = _generate_counted(overrides)
    cfg = model.config
    g = generation_flops(cfg, P, N)
    extra = 0.0
    if hf_deepseek_v3_caches_latent():
        assert "decompresses the latent KV cache" in g["method"]
        per_pos = 2.0 * cfg.kv_lora_rank * cfg.num_attention_heads * (
            cfg.qk_nope_head_dim + cfg.v_head_dim)
        extra = cfg.num_hidden_layers * per_pos * sum(P + i - 1 for i in range(1, N))
        assert counted > 1.05 * g["total"]  # the difference is real, not noise
    assert _close(counted, g["total"] + extra), (counted, g["total"], extra)


def test_nsa_generation_executed_is_dense_masked() -> None:
    model, counted = _generate_counted({**NSA, "positional": "rope"})
    cfg = model.config
    g = generation_flops(cfg, P, N)
    assert "pytorch_dense_masked_reference" in g["method"]
    bd = flops_breakdown(cfg, 1)
    body, head = bd["matmul"], bd["lm_head"]
    executed = (P * body + head + nsa_executed_attention_flops(cfg, P, P)
                + sum(body + head + nsa_executed_attention_flops(cfg, 1, P + i)
                      for i in range(1, N)))
    assert _close(counted, executed), (counted, executed, g["total"])
    assert not _close(counted, g["total"])  # sparse model FLOPs are not what runs


def test_mamba_generation_counts_head_once_and_visible_scan() -> None:
    """The counter sees Mamba's linears, the prefill conv and the scan's C.h contraction; the
    decode conv and the rest of the scan are elementwise (in the model FLOPs, not counted)."""
    model, counted = _generate_counted({"family": "mamba"})
    cfg = model.config
    g = generation_flops(cfg, P, N)
    assert "elementwise" in g["method"]
    bd = flops_breakdown(cfg, 1)
    step = bd["matmul"] + bd["recurrence_matmul"]
    visible = P * (step + bd["conv"]) + bd["lm_head"] + (N - 1) * (step + bd["lm_head"])
    assert _close(counted, visible), (counted, visible)
    elementwise = (P + N - 1) * (bd["recurrence"] - bd["recurrence_matmul"]) + (N - 1) * bd["conv"]
    assert g["total"] == pytest.approx(visible + elementwise)


def test_rwkv_generation_matmuls_match_flop_counter() -> None:
    model, counted = _generate_counted({"family": "rwkv"})
    g = generation_flops(model.config, P, N)
    wkv = (P + N - 1) * flops_breakdown(model.config, 1)["recurrence"]
    assert "elementwise" in g["method"]
    assert _close(counted, g["total"] - wkv), (counted, g["total"], wkv)


def test_rwkv_batched_decode_executes_batch_times_the_model_flops_and_says_so() -> None:
    """transformers' cached RWKV step at batch B runs B x B rows: the executed FLOPs per
    sequence grow with B while the model's do not; the method string names the gap."""
    torch.manual_seed(0)
    model = build(ModelSpec(family="rwkv"), SIZE, VOCAB, 64).eval().requires_grad_(False)

    def step_flops(batch: int) -> float:
        with torch.no_grad():
            state = model(torch.randint(0, VOCAB, (batch, 4)), use_cache=True).state
            with FlopCounterMode(display=False) as fc:
                model(torch.randint(0, VOCAB, (batch, 1)), state=state, use_cache=True)
        return fc.get_total_flops() / batch

    assert step_flops(4) == pytest.approx(4 * step_flops(1))
    assert "B x these FLOPs per sequence" in generation_flops(model.config, P, N)["method"]
