"""Native Sparse Attention (NSA, Yuan et al. 2025) in plain, vectorised PyTorch.

Why our own: transformers has no NSA, and the study needs one that is *correct* and readable more
than fast. Every query attends through three branches whose outputs are blended by learned
per-head sigmoid gates (``gates[..., 0/1/2]`` = compressed / selected / window):

1. **Compressed**: keys and values are pooled over blocks of ``block`` tokens taken every
   ``stride`` tokens (learned pooling: a softmax over the positions inside a block, initialised to
   a plain mean). A compressed block is visible to the query at position ``t`` only when it lies
   fully in the past (its last token ``<= t``).
2. **Selected**: the sequence is cut into non-overlapping selection blocks of ``block`` tokens.
   Their importance is the compressed branch's attention probability mass that overlaps each
   block (summed over the query heads of a GQA group, so a group shares its choice, as in the
   paper). The block holding ``t`` is always chosen; the other ``n_selected - 1`` are the top
   scorers among blocks that start at or before ``t``. The chosen blocks' tokens are attended
   with the usual causal mask.
3. **Window**: the last ``window`` tokens up to and including ``t``.

Tokens attended per query (what analytic FLOPs should count, for a context of length ``S``):
``n_cmp(S) + n_selected * block + window`` with ``n_cmp(S) = (S - block) // stride + 1`` (0 when
``S < block``), each term capped by ``S`` at short contexts. This module computes the selected and
window branches with dense boolean masks (O(T * S) memory), so measured speed is that of a
reference implementation, not of the paper's fused kernel.

Everything works on absolute positions (``q_pos``: the index of each query in the key sequence),
so the same code runs a full sequence (training) and a cached decode step (generation).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["IMPLEMENTATION", "NativeSparseAttention", "attended_tokens", "n_compressed_blocks",
           "nsa_attention"]

# What kind of NSA this is, for records: the selected and window branches run SDPA over *all*
# keys under boolean masks, so the work executed (and its speed) is that of a dense masked
# reference, not of the paper's block-sparse kernel; see
# ``effllm_helpers.models.flops.nsa_executed_attention_flops`` for the executed count.
IMPLEMENTATION = "pytorch_dense_masked_reference"


def n_compressed_blocks(seq_len: int, block: int, stride: int) -> int:
    """Number of compressed blocks (start ``j * stride``, length ``block``) inside ``seq_len``."""
    return 0 if seq_len < block else (seq_len - block) // stride + 1


def attended_tokens(seq_len: int, block: int, stride: int, n_selected: int, window: int) -> int:
    """Tokens a query at the end of a ``seq_len`` context attends to (for analytic FLOPs)."""
    selected = min(n_selected * block, seq_len)
    return n_compressed_blocks(seq_len, block, stride) + selected + min(window, seq_len)


def _overlap_matrix(n_cmp: int, n_sel: int, block: int, stride: int,
                    device: torch.device) -> torch.Tensor:
    """``M[j, b]`` = fraction of compressed block ``j`` that lies inside selection block ``b``."""
    c_start = torch.arange(n_cmp, device=device)[:, None] * stride
    s_start = torch.arange(n_sel, device=device)[None, :] * block
    overlap = (torch.minimum(c_start + block, s_start + block)
               - torch.maximum(c_start, s_start)).clamp(min=0)
    return overlap.float() / block


def nsa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                  gates: torch.Tensor, pool_logits: torch.Tensor, *, block: int, stride: int,
                  n_selected: int, window: int) -> torch.Tensor:
    """NSA output for queries ``q`` [B, H, T, D] over keys/values ``k, v`` [B, Hkv, S, D].

    ``q_pos`` [T]: absolute index of each query among the keys (``S - T + arange(T)`` for a
    cached step). ``gates`` [B, H, T, 3] in [0, 1]; ``pool_logits`` [Hkv, block]. Returns
    [B, H, T, D].
    """
    bsz, n_heads, q_len, head_dim = q.shape
    n_kv, s_len = k.shape[1], k.shape[2]
    group = n_heads // n_kv
    scale = head_dim ** -0.5
    dev = q.device
    qg = q.view(bsz, n_kv, group, q_len, head_dim)
    k_idx = torch.arange(s_len, device=dev)
    causal = k_idx[None, :] <= q_pos[:, None]  # [T, S]

    # 1. compressed branch (manual attention: its probabilities also score the selection)
    n_cmp = n_compressed_blocks(s_len, block, stride)
    if n_cmp > 0:
        w = pool_logits.float().softmax(-1).to(k.dtype)  # [Hkv, block]
        k_cmp = torch.einsum("bhndl,hl->bhnd", k.unfold(2, block, stride), w)
        v_cmp = torch.einsum("bhndl,hl->bhnd", v.unfold(2, block, stride), w)
        cmp_end = torch.arange(n_cmp, device=dev) * stride + block - 1
        vis_cmp = cmp_end[None, :] <= q_pos[:, None]  # [T, n_cmp]
        scores = torch.einsum("bhgtd,bhnd->bhgtn", qg, k_cmp) * scale
        # finite "minus infinity" of the scores' own dtype (fp16 overflows at -1e30): keeps the
        # softmax NaN-free on rows with nothing visible
        probs = (scores.masked_fill(~vis_cmp, torch.finfo(scores.dtype).min).softmax(-1)
                 * vis_cmp)
        o_cmp = torch.einsum("bhgtn,bhnd->bhgtd", probs, v_cmp)
    else:
        probs = qg.new_zeros(bsz, n_kv, group, q_len, 0)
        o_cmp = torch.zeros_like(qg)

    # 2. selected branch: top-n blocks per (query, KV group), chosen without gradient
    n_sel = math.ceil(s_len / block)
    with torch.no_grad():
        sel_idx = torch.arange(n_sel, device=dev)
        if n_cmp > 0:
            overlap = _overlap_matrix(n_cmp, n_sel, block, stride, dev)
            importance = probs.float().sum(2) @ overlap  # [B, Hkv, T, n_sel]
        else:
            importance = torch.zeros(bsz, n_kv, q_len, n_sel, device=dev)
        visible = (sel_idx[None, :] * block) <= q_pos[:, None]  # [T, n_sel]
        current = sel_idx[None, :] == (q_pos[:, None] // block)
        rank = importance.masked_fill(~visible, -1.0).masked_fill(current, math.inf)
        top = rank.topk(min(n_selected, n_sel), dim=-1)
        chosen = torch.zeros_like(rank, dtype=torch.bool).scatter_(-1, top.indices,
                                                                   top.values >= 0)
        sel_mask = chosen.repeat_interleave(block, dim=-1)[..., :s_len] & causal
    kg = k[:, :, None].expand(bsz, n_kv, group, s_len, head_dim)
    vg = v[:, :, None].expand(bsz, n_kv, group, s_len, head_dim)
    o_sel = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=sel_mask[:, :, None])

    # 3. sliding window branch
    win_mask = causal & (k_idx[None, :] > q_pos[:, None] - window)
    o_win = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=win_mask)

    g = gates.to(q.dtype).view(bsz, n_kv, group, q_len, 3, 1)
    out = g[..., 0, :] * o_cmp + g[..., 1, :] * o_sel + g[..., 2, :] * o_win
    return out.reshape(bsz, n_heads, q_len, head_dim)


class NativeSparseAttention(nn.Module):
    """The learned parts of NSA (gates and compression pooling) around :func:`nsa_attention`."""

    def __init__(self, hidden_size: int, n_heads: int, n_kv_heads: int, *, block: int,
                 stride: int, n_selected: int, window: int) -> None:
        super().__init__()
        self.n_heads, self.block, self.stride = n_heads, block, stride
        self.n_selected, self.window = n_selected, window
        self.gate = nn.Linear(hidden_size, n_heads * 3)  # per-head gates from the token itself
        self.pool_logits = nn.Parameter(torch.zeros(n_kv_heads, block))  # zeros = mean pooling

    def forward(self, hidden_states: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor, q_pos: torch.Tensor) -> torch.Tensor:
        """``hidden_states`` [B, T, d] (gate input); q/k/v as in :func:`nsa_attention`."""
        bsz, q_len, _ = hidden_states.shape
        gates = torch.sigmoid(self.gate(hidden_states)).view(bsz, q_len, self.n_heads, 3)
        return nsa_attention(q, k, v, q_pos, gates.transpose(1, 2), self.pool_logits,
                             block=self.block, stride=self.stride, n_selected=self.n_selected,
                             window=self.window)
