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

**The fla kernel** (``model.kernel`` ``auto``/``fla`` on CUDA, :mod:`.kernels`): a full-sequence,
cache-free forward runs :func:`nsa_attention_fla` = ``fla.ops.nsa.parallel_nsa`` (compressed and
selected branches, Triton, block-sparse) + ``fla.ops.attn.parallel_attn(window_size=window)``
(the window branch; fla's own window path needs flash-attn, which we do not assume). fla's NSA is
a narrower model than this reference, so the fla path runs *fla's semantics*, which this module's
reference reproduces with ``forced="first_previous_current"`` (what the GPU check compares):

* compression block = selection block = ``block``, stride = ``block`` (no overlap): fla supports
  only ``nsa_stride == nsa_block`` (otherwise ``auto`` runs this reference, with that reason);
* compression pooling is a plain mean: fla has no learned pooling, so ``pool_logits`` gets no
  gradient on the fla path (it stays at its zero init = the same mean);
* forced blocks: fla always selects the first block, the previous one and the query's own block
  (the NSA paper's "1 initial + 2 local blocks"), all counted in ``n_selected``; this reference
  by default forces only the query's own block. Importance (the group's summed compressed
  attention mass per block) and the candidate set (blocks before the query's own) are the same;
* GQA: fla needs ``n_heads / n_kv_heads`` a power of two >= 16 (a Triton tile: ``tl.dot`` needs
  16 rows). Smaller groups (the presets' 2-4) are zero-padded to 16 query heads per KV head; a
  zero query adds the same ``1/n_visible`` importance to every candidate block, so the selection
  is unchanged, and its output and gradients are dropped. The kernels' work on the padding is
  real: :func:`effllm_helpers.models.flops.nsa_fla_executed_attention_flops` counts it;
* ``n_selected`` and ``block`` must be powers of two with ``block >= 2 * n_selected`` (tile
  shapes of fla's top-k), ``head_dim <= 256``.

Near-ties in block importance may select different blocks in the kernel than in the reference
(different summation order), so kernel-vs-reference outputs agree to a tolerance, not bitwise.
Any call with a KV cache (prefill and decode steps of ``generate``) runs the reference, with
the fla rules where a cache-free forward would have used fla.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels

__all__ = ["IMPLEMENTATION", "FORCED_RULES", "NativeSparseAttention", "attended_tokens",
           "fla_unsupported", "n_compressed_blocks", "nsa_attention", "nsa_attention_fla",
           "select_blocks"]

# What kind of NSA this is, for records: the selected and window branches run SDPA over *all*
# keys under boolean masks, so the work executed (and its speed) is that of a dense masked
# reference, not of the paper's block-sparse kernel; see
# ``effllm_helpers.models.flops.nsa_executed_attention_flops`` for the executed count.
IMPLEMENTATION = "pytorch_dense_masked_reference"

# blocks every query selects whatever their score: this reference's rule, or fla's (the paper's)
FORCED_RULES = ("current", "first_previous_current")


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
                  n_selected: int, window: int, forced: str = "current") -> torch.Tensor:
    """NSA output for queries ``q`` [B, H, T, D] over keys/values ``k, v`` [B, Hkv, S, D].

    ``q_pos`` [T]: absolute index of each query among the keys (``S - T + arange(T)`` for a
    cached step). ``gates`` [B, H, T, 3] in [0, 1]; ``pool_logits`` [Hkv, block]. ``forced``
    (one of :data:`FORCED_RULES`): the blocks always selected. Returns [B, H, T, D].
    """
    if forced not in FORCED_RULES:
        raise ValueError(f"forced {forced!r} not in {FORCED_RULES}")
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
        if n_cmp > 0:
            overlap = _overlap_matrix(n_cmp, n_sel, block, stride, dev)
            importance = probs.float().sum(2) @ overlap  # [B, Hkv, T, n_sel]
        else:
            importance = torch.zeros(bsz, n_kv, q_len, n_sel, device=dev)
        chosen = select_blocks(importance, q_pos, block=block, n_selected=n_selected,
                               forced=forced)
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


def select_blocks(importance: torch.Tensor, q_pos: torch.Tensor, *, block: int,
                  n_selected: int, forced: str = "current") -> torch.Tensor:
    """The selected branch's blocks: [B, Hkv, T, n_sel] booleans, the ``n_selected`` most
    important visible blocks per query and KV group, the ``forced`` ones always among them.

    A module-level function so that a check can watch the choice (``benchmarks/
    nsa_precision.py`` counts how often bf16 rounding flips it on a near-tie)."""
    n_sel = importance.shape[-1]
    sel_idx = torch.arange(n_sel, device=importance.device)
    visible = (sel_idx[None, :] * block) <= q_pos[:, None]  # [T, n_sel]
    own = q_pos[:, None] // block
    current = sel_idx[None, :] == own
    if forced == "first_previous_current":
        current = current | (sel_idx[None, :] == 0) | (sel_idx[None, :] == own - 1)
    rank = importance.masked_fill(~visible, -1.0).masked_fill(current, math.inf)
    top = rank.topk(min(n_selected, n_sel), dim=-1)
    return torch.zeros_like(rank, dtype=torch.bool).scatter_(-1, top.indices, top.values >= 0)


def fla_unsupported(*, n_heads: int, n_kv_heads: int, head_dim: int, block: int, stride: int,
                    n_selected: int) -> str | None:
    """Why fla's ``parallel_nsa`` cannot run this NSA's settings (``None`` if it can)."""
    def pow2(n: int) -> bool:
        return n > 0 and n & (n - 1) == 0

    if stride != block:
        return (f"fla.parallel_nsa compresses non-overlapping blocks: needs nsa_stride == "
                f"nsa_block (got {stride} vs {block})")
    if not (pow2(block) and pow2(n_selected) and block >= 2 * n_selected):
        return (f"fla.parallel_nsa needs nsa_block and nsa_selected powers of two with "
                f"nsa_block >= 2 * nsa_selected (got {block}, {n_selected})")
    if head_dim > 256:
        return f"fla.parallel_nsa needs head_dim <= 256 (got {head_dim})"
    if n_heads % n_kv_heads:
        return "n_heads must be a multiple of n_kv_heads"
    return None


def fla_group(n_heads: int, n_kv_heads: int) -> int:
    """Query heads per KV head fla's NSA kernels run: the group padded to a power of two >= 16."""
    group = n_heads // n_kv_heads
    return max(16, 1 << (group - 1).bit_length())


def nsa_attention_fla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gates: torch.Tensor, *,
                      block: int, n_selected: int, window: int) -> torch.Tensor:
    """:func:`nsa_attention` of a full sequence (``q_pos = arange(T)``) on fla's kernels, with
    fla's semantics (see the module docstring): same shapes as :func:`nsa_attention`."""
    from fla.ops.attn import parallel_attn
    from fla.ops.nsa import parallel_nsa

    bsz, n_heads, q_len, head_dim = q.shape
    n_kv = k.shape[1]
    group, padded = n_heads // n_kv, fla_group(n_heads, n_kv)
    # one dtype for q, k, v: under autocast the projections come out bf16 but RoPE can hand back
    # fp32 queries, and fla's kernels refuse mixed operands (H200: "Both operands must be same
    # dtype. Got fp32 and bf16")
    dt = kernels.kernel_dtype(q)
    q, k, v = q.to(dt), k.to(dt), v.to(dt)
    qt = q.transpose(1, 2)  # [B, T, H, D], fla's layout
    kt, vt = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
    g = gates.transpose(1, 2).to(q.dtype)  # [B, T, H, 3]

    def pad(x: torch.Tensor) -> torch.Tensor:  # [B, T, H, ...] -> [B, T, Hkv * padded, ...]
        x = x.reshape(bsz, q_len, n_kv, group, *x.shape[3:])
        x = F.pad(x, (0, 0) * (x.dim() - 4) + (0, padded - group))
        return x.reshape(bsz, q_len, n_kv * padded, *x.shape[4:])

    def unpad(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(bsz, q_len, n_kv, padded, -1)[:, :, :, :group].reshape(
            bsz, q_len, n_heads, -1)

    g_pad = pad(g[..., :2])
    o_sparse = parallel_nsa(pad(qt).contiguous(), kt, vt, g_cmp=g_pad[..., 0].contiguous(),
                            g_slc=g_pad[..., 1].contiguous(), block_counts=n_selected,
                            block_size=block, window_size=0)
    o_win = parallel_attn(qt.contiguous(), kt, vt, window_size=window)
    out = unpad(o_sparse) + g[..., 2:] * o_win
    return out.transpose(1, 2)


class NativeSparseAttention(kernels.KernelDispatch, nn.Module):
    """The learned parts of NSA (gates and compression pooling) around :func:`nsa_attention`."""

    def __init__(self, hidden_size: int, n_heads: int, n_kv_heads: int, *, block: int,
                 stride: int, n_selected: int, window: int, kernel: str = "auto",
                 head_dim: int | None = None) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.block, self.stride = n_heads, n_kv_heads, block, stride
        self.n_selected, self.window, self.kernel = n_selected, window, kernel
        self.head_dim = head_dim or hidden_size // n_heads
        self._choices: dict[str, kernels.Choice] = {}  # device type -> decision (choice())
        # the reference's forced-block rule: None = fla's where fla is chosen, else "current";
        # the GPU check sets fla's rule to compare the reference with the kernel
        self.forced: str | None = None
        self.gate = nn.Linear(hidden_size, n_heads * 3)  # per-head gates from the token itself
        self.pool_logits = nn.Parameter(torch.zeros(n_kv_heads, block))  # zeros = mean pooling

    def forward(self, hidden_states: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor, q_pos: torch.Tensor, cached: bool = False) -> torch.Tensor:
        """``hidden_states`` [B, T, d] (gate input); q/k/v as in :func:`nsa_attention`;
        ``cached``: the call carries a KV cache (then the reference runs, see the module doc)."""
        bsz, q_len, _ = hidden_states.shape
        gates = torch.sigmoid(self.gate(hidden_states)).view(bsz, q_len, self.n_heads, 3)
        choice = self.choice(q.device)
        if choice.use_fla and not cached and q_len == k.shape[2]:
            out = _fla_call(q, k, v, gates.transpose(1, 2), block=self.block,
                            n_selected=self.n_selected, window=self.window)
            # fla pools by a plain mean, so pool_logits is unused; tie it in with a zero weight
            # so it still gets a (zero) gradient: DDP stops on a parameter without one
            return out + 0.0 * self.pool_logits.sum().to(out.dtype)
        forced = self.forced or ("first_previous_current" if choice.use_fla else "current")
        return nsa_attention(q, k, v, q_pos, gates.transpose(1, 2), self.pool_logits,
                             block=self.block, stride=self.stride, n_selected=self.n_selected,
                             window=self.window, forced=forced)

    def _decide(self, device: str) -> kernels.Choice:
        return nsa_choice(self.kernel, device, n_heads=self.n_heads, n_kv_heads=self.n_kv_heads,
                          head_dim=self.head_dim, block=self.block, stride=self.stride,
                          n_selected=self.n_selected)


def nsa_choice(kernel: str | None, device: Any, **shape: int) -> Any:
    """Which NSA implementation runs for ``kernel`` on ``device`` (see :mod:`.kernels`)."""
    return kernels.choose("nsa", kernel, device, IMPLEMENTATION, fla_unsupported(**shape))


def _fla_call(*args: Any, **kwargs: Any) -> torch.Tensor:
    return kernels.compile_opaque(nsa_attention_fla)(*args, **kwargs)
