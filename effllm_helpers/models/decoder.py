"""Our own decoder: a Llama-shaped model whose positional encoding and attention are switchable.

Why it exists: transformers has no NSA, no sinusoidal or NoPE decoder, and its ALiBi model (Bloom)
is MHA-only. The paper compares positional encodings *on the GQA model*, so we need one decoder in
which only the positional scheme changes. This one is the Llama architecture (pre-RMSNorm, SwiGLU
MLP, bias-free projections, untied head, same parameter names ``model.layers.N.self_attn.q_proj``
...) so with ``positional="rope"`` it computes exactly what ``LlamaForCausalLM`` computes (a test
loads one's weights into the other), and peft / bitsandbytes treat both alike.

Config knobs (:class:`EffllmConfig`, ``model_type="effllm_decoder"``):

- ``positional``: ``rope`` (rotary, Llama's non-interleaved layout), ``sinusoidal`` (Vaswani:
  fixed sin/cos table added to the token embeddings, which are scaled by sqrt(d_model) as in the
  original paper), ``learned`` (GPT-2 style trainable absolute table of
  ``max_position_embeddings`` rows), ``relative`` (ALiBi: per-head linear distance penalty with
  Press et al.'s geometric slopes, added to attention scores), ``none`` (NoPE: the causal mask is
  the only source of order).
- ``attention``: ``mha`` / ``mqa`` / ``gqa`` are dense attention (they differ only in
  ``num_key_value_heads``); ``nsa`` is Native Sparse Attention (:mod:`.nsa`) over the same GQA
  projections, with ``nsa_window``, ``nsa_block``, ``nsa_stride``, ``nsa_selected``. Tokens
  attended per query = compressed blocks + ``nsa_selected * nsa_block`` + ``nsa_window``
  (:func:`effllm_helpers.models.nsa.attended_tokens`); its KV cache is the full GQA cache.

Generation uses transformers' ``Cache`` API (``DynamicCache.update`` per layer): the cache holds
post-RoPE keys and values of every layer, ``num_key_value_heads * head_dim`` each per token. The
forward accepts the cache as ``cache`` (transformers >= 5.2x) or ``past_key_values`` (5.17) and
returns it under whichever name the installed ``CausalLMOutputWithPast`` uses.

Limits: NSA does not accept padded batches (an attention mask with zeros raises); ALiBi is not
combined with NSA; positions beyond ``max_position_embeddings`` fail only for ``learned``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .. import catalog
from .nsa import NativeSparseAttention

__all__ = ["EffllmConfig", "EffllmModel", "EffllmDecoderForCausalLM", "POSITIONALS", "is_nsa"]

POSITIONALS = catalog.POSITIONAL  # names this decoder implements: every catalog entry
# the catalog's attention variants with a dense or NSA FLOP rule run here (MLA is DeepSeek's)
DECODER_FLOP_RULES = ("dense", "nsa")


def is_nsa(attention: str) -> bool:
    """Whether a catalog attention variant runs the NSA branches (unknown names raise)."""
    return catalog.attention(attention).flops == "nsa"

# transformers renamed the output's cache field from ``past_key_values`` to ``cache`` after 5.17
_CACHE_FIELD = ("cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__
                else "past_key_values")


class EffllmConfig(PreTrainedConfig):
    """Dimensions and the positional/attention choice of :class:`EffllmDecoderForCausalLM`.

    Attribute names follow Llama's so analytic FLOPs code can read any of our decoders alike.
    """

    model_type = "effllm_decoder"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    vocab_size: int = 4096
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    positional: str = "rope"
    attention: str = "gqa"
    rope_theta: float = 10000.0
    nsa_window: int = 128
    nsa_block: int = 64
    nsa_stride: int = 32
    nsa_selected: int = 4
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    use_cache: bool = True
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.positional not in POSITIONALS:
            raise ValueError(f"positional {self.positional!r} not in {tuple(POSITIONALS)}")
        if catalog.attention(self.attention).flops not in DECODER_FLOP_RULES:
            raise ValueError(f"attention {self.attention!r} is not built by this decoder")
        if is_nsa(self.attention) and self.positional == "relative":
            raise ValueError("NSA with ALiBi (positional='relative') is not implemented")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.positional == "rope" and self.head_dim % 2:
            raise ValueError("RoPE needs an even head_dim")
        super().__post_init__(**kwargs)


# ---------------------------------------------------------------- positional helpers
def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [B, 1, T, head_dim] for rotary embedding (computed in fp32, like Llama)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=position_ids.device,
                                            dtype=torch.float32) / head_dim)
    freqs = position_ids[..., None].float() * inv_freq  # [B, T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [B, H, T, D] by position (halves layout: pairs are (i, i + D/2))."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def sinusoidal_table(position_ids: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Vaswani et al. fixed encodings [B, T, dim]: sin on even, cos on odd channels."""
    inv = 1.0 / 10000 ** (torch.arange(0, dim, 2, device=position_ids.device,
                                       dtype=torch.float32) / dim)
    ang = position_ids[..., None].float() * inv  # [B, T, dim/2]
    return torch.stack((ang.sin(), ang.cos()), dim=-1).flatten(-2)[..., :dim].to(dtype)


def alibi_slopes(n_heads: int, device: torch.device | None = None) -> torch.Tensor:
    """ALiBi head slopes (Press et al. 2022), with their recipe for a non-power-of-2 head count."""
    p = 2 ** math.floor(math.log2(n_heads))
    slopes = [2 ** (-8 * i / p) for i in range(1, p + 1)]
    if p < n_heads:
        slopes += [2 ** (-4 * i / p) for i in range(1, 2 * (n_heads - p), 2)]
    return torch.tensor(slopes, dtype=torch.float32, device=device)


# ---------------------------------------------------------------- blocks
class EffllmRMSNorm(nn.Module):
    """RMSNorm computed in fp32 (as Llama's)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class EffllmMLP(nn.Module):
    """SwiGLU feed-forward (Llama's)."""

    def __init__(self, config: EffllmConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class EffllmAttention(nn.Module):
    """Projections + positional rotation/bias + cache, then dense SDPA or NSA."""

    def __init__(self, config: EffllmConfig, layer_idx: int) -> None:
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.n_heads, self.n_kv = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        d = config.hidden_size
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=False)
        self.nsa = (NativeSparseAttention(d, self.n_heads, self.n_kv, block=config.nsa_block,
                                          stride=config.nsa_stride,
                                          n_selected=config.nsa_selected,
                                          window=config.nsa_window,
                                          kernel=getattr(config, "kernel", "auto"),
                                          head_dim=self.head_dim)
                    if is_nsa(config.attention) else None)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                attn_mask: torch.Tensor | None, is_causal: bool, q_pos: torch.Tensor,
                cache: Cache | None) -> torch.Tensor:
        bsz, q_len, _ = x.shape
        q = self.q_proj(x).view(bsz, q_len, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(bsz, q_len, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(bsz, q_len, self.n_kv, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        if self.nsa is not None:
            out = self.nsa(x, q, k, v, q_pos, cached=cache is not None)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                                 enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(out.transpose(1, 2).reshape(bsz, q_len, -1))


class EffllmDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm residual block: x + attn(norm(x)); x + mlp(norm(x))."""

    def __init__(self, config: EffllmConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = EffllmRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = EffllmAttention(config, layer_idx)
        self.post_attention_layernorm = EffllmRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = EffllmMLP(config)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                attn_mask: torch.Tensor | None, is_causal: bool, q_pos: torch.Tensor,
                cache: Cache | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, attn_mask, is_causal, q_pos, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class EffllmPreTrainedModel(PreTrainedModel):
    """Shared init/registration glue (Llama's init: normal(0, initializer_range), norms at 1)."""

    config_class = EffllmConfig
    config: EffllmConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["EffllmDecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, NativeSparseAttention):
            init.zeros_(module.pool_logits)


class EffllmModel(EffllmPreTrainedModel):
    """Embeddings, positional scheme, decoder layers and final norm (no LM head)."""

    def __init__(self, config: EffllmConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_positions = (nn.Embedding(config.max_position_embeddings, config.hidden_size)
                                if config.positional == "learned" else None)
        self.layers = nn.ModuleList(EffllmDecoderLayer(config, i)
                                    for i in range(config.num_hidden_layers))
        self.norm = EffllmRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def _attention_mask(self, attention_mask: torch.Tensor | None, q_pos: torch.Tensor,
                        s_len: int, dtype: torch.dtype) -> tuple[torch.Tensor | None, bool]:
        """SDPA mask (bool, or float with the ALiBi bias) and is_causal, from cache positions."""
        cfg = self.config
        q_len = q_pos.shape[0]
        padded = attention_mask is not None and not bool(attention_mask.all())
        if padded and is_nsa(cfg.attention):
            raise NotImplementedError("NSA does not support padded batches (attention_mask zeros)")
        if not padded and cfg.positional != "relative":
            if q_len == s_len and q_len > 1:
                return None, True
            if q_len == 1:
                return None, False
        k_idx = torch.arange(s_len, device=q_pos.device)
        allowed = (k_idx[None, :] <= q_pos[:, None])[None, None]  # [1, 1, T, S]
        if padded:
            allowed = allowed & attention_mask[:, None, None, -s_len:].bool()
            allowed = allowed | (k_idx[None, :] == q_pos[:, None])  # a pad query sees itself
        if cfg.positional != "relative":
            return allowed, False
        dist = (q_pos[:, None] - k_idx[None, :]).float()  # [T, S]
        slopes = alibi_slopes(cfg.num_attention_heads, q_pos.device)
        bias = (-slopes[:, None, None] * dist)[None].to(dtype)  # [1, H, T, S]
        return bias.masked_fill(~allowed, float("-inf")), False

    def forward(self, input_ids: torch.LongTensor | None = None,
                attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                **kwargs: Any) -> BaseModelOutputWithPast:
        cfg = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        bsz, q_len = x.shape[:2]
        if use_cache and cache is None:
            cache = DynamicCache(config=cfg)
        past = cache.get_seq_length() if cache is not None else 0
        q_pos = torch.arange(past, past + q_len, device=x.device)  # index among cached keys
        if position_ids is None:
            position_ids = q_pos[None].expand(bsz, -1)

        rope = None
        if cfg.positional == "rope":
            rope = rope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta, x.dtype)
        elif cfg.positional == "sinusoidal":
            x = x * math.sqrt(cfg.hidden_size) + sinusoidal_table(position_ids, cfg.hidden_size,
                                                                  x.dtype)
        elif cfg.positional == "learned":
            x = x + self.embed_positions(position_ids)
        attn_mask, is_causal = self._attention_mask(attention_mask, q_pos, past + q_len, x.dtype)

        for layer in self.layers:
            x = layer(x, rope, attn_mask, is_causal, q_pos, cache if use_cache else None)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(x),
                                       **{_CACHE_FIELD: cache if use_cache else None})


class EffllmDecoderForCausalLM(EffllmPreTrainedModel, GenerationMixin):
    """:class:`EffllmModel` + LM head; a ``PreTrainedModel`` that trains, saves and generates."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: EffllmConfig) -> None:
        super().__init__(config)
        self.model = EffllmModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(self, input_ids: torch.LongTensor | None = None,
                attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: Cache | None = None,
                past_key_values: Cache | None = None, inputs_embeds: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, use_cache: bool | None = None,
                logits_to_keep: int | torch.Tensor = 0, **kwargs: Any) -> CausalLMOutputWithPast:
        """Causal LM forward; ``cache`` and ``past_key_values`` are the same argument."""
        cache = cache if cache is not None else past_key_values
        if use_cache is None:
            use_cache = bool(self.config.use_cache) and (not self.training or cache is not None)
        for k in ("return_dict", "output_attentions", "output_hidden_states", "cache_position"):
            kwargs.pop(k, None)
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=position_ids, cache=cache, inputs_embeds=inputs_embeds,
                            use_cache=use_cache)
        h = hidden.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(h[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels,
                                      vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits,
                                      **{_CACHE_FIELD: getattr(hidden, _CACHE_FIELD)})
