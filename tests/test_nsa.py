"""Native Sparse Attention semantics: branches reduce to causal attention, causality, decoding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from effllm_helpers.models.nsa import (
    NativeSparseAttention,
    attended_tokens,
    nsa_attention,
    select_blocks,
)

B, H, HKV, S, D = 2, 4, 2, 40, 8
BLOCK, STRIDE = 8, 4


def _qkv(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, S, D, generator=g), torch.randn(B, HKV, S, D, generator=g),
            torch.randn(B, HKV, S, D, generator=g))


def _gates(which: int | None, seed: int = 1) -> torch.Tensor:
    """One-hot gates forcing one branch, or random gates when ``which`` is None."""
    if which is None:
        return torch.rand(B, H, S, 3, generator=torch.Generator().manual_seed(seed))
    g = torch.zeros(B, H, S, 3)
    g[..., which] = 1.0
    return g


def _causal_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    rep = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1),
                                          v.repeat_interleave(rep, 1), is_causal=True)


def _nsa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gates: torch.Tensor, *,
         n_selected: int = 2, window: int = S, q_pos: torch.Tensor | None = None,
         pool: torch.Tensor | None = None) -> torch.Tensor:
    """NSA at the test's block/stride; queries default to the last positions of the keys."""
    q_pos = torch.arange(k.shape[2] - q.shape[2], k.shape[2]) if q_pos is None else q_pos
    pool = torch.zeros(HKV, BLOCK) if pool is None else pool
    return nsa_attention(q, k, v, q_pos, gates, pool, block=BLOCK, stride=STRIDE,
                         n_selected=n_selected, window=window)


def test_window_branch_covering_sequence_equals_causal_attention() -> None:
    q, k, v = _qkv()
    out = _nsa(q, k, v, _gates(2), window=S)
    torch.testing.assert_close(out, _causal_reference(q, k, v), atol=1e-5, rtol=1e-5)


def test_window_gate_forced_through_module_equals_causal_attention() -> None:
    """Gates are sigmoid(linear): a huge bias forces the window branch exactly."""
    q, k, v = _qkv()
    mod = NativeSparseAttention(16, H, HKV, block=BLOCK, stride=STRIDE, n_selected=2, window=S)
    with torch.no_grad():
        mod.gate.weight.zero_()
        mod.gate.bias.copy_(torch.tensor([-1e4, -1e4, 1e4]).repeat(H))
    out = mod(torch.randn(B, S, 16), q, k, v, torch.arange(S))
    torch.testing.assert_close(out, _causal_reference(q, k, v), atol=1e-5, rtol=1e-5)


def test_selection_of_every_block_equals_causal_attention() -> None:
    q, k, v = _qkv()
    out = _nsa(q, k, v, _gates(1), n_selected=S // BLOCK)
    torch.testing.assert_close(out, _causal_reference(q, k, v), atol=1e-5, rtol=1e-5)


def test_single_selected_block_is_the_current_block() -> None:
    q, k, v = _qkv()
    out = _nsa(q, k, v, _gates(1), n_selected=1)
    t = 21  # inside block [16, 24)
    rep = H // HKV
    kk, vv = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    ref = F.scaled_dot_product_attention(q[:, :, t:t + 1], kk[:, :, 16:t + 1], vv[:, :, 16:t + 1])
    torch.testing.assert_close(out[:, :, t:t + 1], ref, atol=1e-5, rtol=1e-5)


def test_compressed_branch_sees_only_complete_blocks() -> None:
    q, k, v = _qkv()
    out = _nsa(q, k, v, _gates(0))
    assert out[:, :, :BLOCK - 1].abs().max() == 0  # no block has ended yet
    assert out[:, :, BLOCK - 1:].abs().min(dim=-1).values.gt(0).all()


@pytest.mark.parametrize("t", [0, 7, 8, 19, 31])
def test_no_output_depends_on_future_tokens(t: int) -> None:
    q, k, v = _qkv()
    gates = _gates(None)
    pool = torch.randn(HKV, BLOCK)
    base = _nsa(q, k, v, gates, window=6, pool=pool)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for x in (q2, k2, v2):
        x[:, :, t + 1:] += 5 * torch.randn_like(x[:, :, t + 1:])
    g2 = gates.clone()
    g2[:, :, t + 1:] = torch.rand_like(g2[:, :, t + 1:])
    pert = _nsa(q2, k2, v2, g2, window=6, pool=pool)
    torch.testing.assert_close(pert[:, :, :t + 1], base[:, :, :t + 1], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(pert[:, :, t + 1:], base[:, :, t + 1:])


def test_decode_step_matches_full_sequence() -> None:
    """A cached step (one query at the end) computes the full pass's last row."""
    q, k, v = _qkv()
    gates = _gates(None)
    full = _nsa(q, k, v, gates, window=6)
    for t in (5, 23, S - 1):
        step = _nsa(q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1], gates[:, :, t:t + 1],
                    window=6)
        torch.testing.assert_close(step, full[:, :, t:t + 1], atol=1e-5, rtol=1e-5)


def test_gradients_reach_queries_keys_values_gates_and_pooling() -> None:
    q, k, v = (x.requires_grad_() for x in _qkv())
    gates = _gates(None).requires_grad_()
    pool = torch.randn(HKV, BLOCK, requires_grad=True)
    _nsa(q, k, v, gates, window=6, pool=pool).square().sum().backward()
    for x in (q, k, v, gates, pool):
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_attended_tokens_counts_compressed_selected_and_window() -> None:
    # paper setting at 8K: 255 compressed blocks + 4 * 64 selected + 128 window
    assert attended_tokens(8192, 64, 32, 4, 128) == 255 + 256 + 128
    assert attended_tokens(40, 64, 32, 4, 128) == 0 + 40 + 40  # short context: capped by S


def test_half_precision_scores_stay_finite() -> None:
    """The masked-out compressed scores use the dtype's own minimum (fp16 overflows at -1e30)."""
    q, k, v = (t.half() for t in _qkv())
    out = _nsa(q, k, v, _gates(None).half(), pool=torch.zeros(HKV, BLOCK).half())
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


def test_implementation_is_named_dense_masked_reference() -> None:
    from effllm_helpers.models import nsa

    assert nsa.IMPLEMENTATION == "pytorch_dense_masked_reference"


def test_executed_flops_match_flop_counter_on_a_tiny_forward() -> None:
    """The dense masked reference runs more than NSA's sparse model FLOPs; the executed count
    is what FlopCounterMode sees on a full-sequence forward (SDPA on its math backend)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from effllm_helpers.models.decoder import EffllmConfig, EffllmDecoderForCausalLM
    from effllm_helpers.models.flops import executed_flops_per_token, flops_per_token

    seq = 48
    cfg = EffllmConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64,
                       attention="nsa", nsa_window=8, nsa_block=8, nsa_stride=4, nsa_selected=2)
    model = EffllmDecoderForCausalLM(cfg).eval()
    ids = torch.randint(0, 256, (1, seq), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as fc:
        model(input_ids=ids)
    executed = executed_flops_per_token(cfg, seq) * seq
    assert abs(fc.get_total_flops() - executed) <= 0.01 * executed
    assert executed > 1.03 * flops_per_token(cfg, seq, training=False) * seq


def test_block_choice_takes_the_most_important_visible_blocks_and_the_forced_ones() -> None:
    # one row per query position 0..7, four blocks of 2; block 3 the most important but
    # visible only from position 6; the current block is forced whatever its score
    importance = torch.tensor([0.5, 0.1, 0.3, 0.9]).expand(1, 1, 8, 4)
    chosen = select_blocks(importance, torch.arange(8), block=2, n_selected=2)
    assert chosen.sum(-1).max() <= 2
    assert chosen[0, 0, 5].tolist() == [True, False, True, False]  # own block 2 + block 0
    assert chosen[0, 0, 7].tolist() == [True, False, False, True]  # own block 3 + block 0
    assert not chosen[0, 0, 1, 1:].any()  # nothing beyond the query's own block
