"""The image models of axis 4: a class-conditional DiT, a ViT classifier, a tiny LLaVA VLM.

The DiT is diffusers' ``DiTTransformer2DModel`` given the text models' own floors, so "the same
attention variants and MoE on a DiT" holds by construction:

* attention: the catalog's variant (:mod:`effllm_helpers.catalog`). MHA/MQA/GQA keep diffusers'
  projections with the catalog's K/V-head rule (:func:`.zoo.kv_heads`); MLA is the text MLA's
  module and shape (transformers' ``DeepseekV3Attention`` built from :func:`.zoo.mla_fields`,
  the same ``mla_latent_ratio``), its decoupled RoPE half left unrotated because the DiT's
  positions are added to its patch embeddings, and no causal mask. A variant without a DiT
  form (NSA) raises.
* MoE: the text MoE (:func:`.zoo.moe_fields`: Mixtral's top-k router over SwiGLU experts of the
  dense feed-forward's width) in place of each block's feed-forward, and its load-balancing
  loss (Switch/Mixtral, ``router_aux_loss_coef``) added to the DiT's training loss, as the
  text MoE adds it to ``out.loss``. The held-out loss stays the plain noise-prediction MSE,
  as the text MoE's validation perplexity comes from the logits alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from .. import catalog
from ..config import CrossModalParams
from ..data.vqa import vlm_vocab
from .zoo import kv_heads, mla_fields, moe_fields

# what transformers gives a Mixtral model by default (``get_correct_experts_implementation``):
# the DiT's experts run as the text MoE's do
EXPERTS_IMPLEMENTATION = "grouped_mm"
# the catalog's attention mechanisms (its FLOP rules) that have a DiT form here
DIT_FLOPS_RULES = ("dense", "mla")
# the layers after the blocks that ``freeze`` trains with the last blocks (ViT, DiT)
OUTPUT_LAYERS = ("classifier", "proj_out_1", "proj_out_2")


@dataclass
class LossOutput(ModelOutput):
    loss: torch.Tensor | None = None


def n_patches(p: CrossModalParams) -> int:
    """Patch tokens per image."""
    return (p.image_size // p.patch) ** 2


# ---------------------------------------------------------------- attention
class GroupedKVProcessor:
    """A diffusers attention processor for MQA/GQA: the K/V projections are smaller and each
    of ``kv_heads`` K/V heads serves ``heads / kv_heads`` query heads."""

    def __init__(self, kv_heads: int) -> None:
        self.kv_heads = kv_heads

    def __call__(self, attn: Any, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
        src = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        b, n, _ = hidden_states.shape
        q, k, v = attn.to_q(hidden_states), attn.to_k(src), attn.to_v(src)
        head_dim = q.shape[-1] // attn.heads
        q = q.view(b, -1, attn.heads, head_dim).transpose(1, 2)
        k = k.view(b, -1, self.kv_heads, head_dim).transpose(1, 2)
        v = v.view(b, -1, self.kv_heads, head_dim).transpose(1, 2)
        rep = attn.heads // self.kv_heads
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
        out = out.transpose(1, 2).reshape(b, n, attn.heads * head_dim).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor


class LatentAttention(nn.Module):
    """The catalog's MLA in a DiT block: the text MLA's ``DeepseekV3Attention`` called with an
    identity rotation (cos 1, sin 0) on its RoPE half and without a causal mask."""

    def __init__(self, d_model: int, n_heads: int, latent_ratio: int) -> None:
        super().__init__()
        from transformers import DeepseekV3Config
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention

        cfg = DeepseekV3Config(hidden_size=d_model, num_attention_heads=n_heads,
                               **mla_fields(d_model, n_heads, latent_ratio))
        cfg._attn_implementation = "sdpa"
        self.mla = DeepseekV3Attention(cfg, layer_idx=0)
        self.mla.is_causal = False  # every patch sees every patch

    def forward(self, hidden_states: torch.Tensor,
                encoder_hidden_states: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, **_: Any) -> torch.Tensor:
        b, s, _ = hidden_states.shape
        cos = hidden_states.new_ones(b, s, self.mla.qk_rope_head_dim)
        return self.mla(hidden_states, (cos, torch.zeros_like(cos)), attention_mask)[0]


def set_attention(dit: nn.Module, p: CrossModalParams) -> None:
    """Give every DiT block the catalog's ``p.attention`` (see the module docstring)."""
    variant = catalog.attention(p.attention)
    if variant.flops not in DIT_FLOPS_RULES:
        takes = [n for n, v in catalog.ATTENTION.items() if v.flops in DIT_FLOPS_RULES]
        raise ValueError(f"{variant.label} has no DiT form here; the DiT takes {', '.join(takes)}")
    kv = kv_heads(p.attention, p)
    if variant.flops == "dense" and kv == p.n_heads:
        return  # MHA: diffusers' own projections and processor
    for block in dit.transformer_blocks:
        attn = block.attn1
        if variant.flops == "mla":
            block.attn1 = LatentAttention(p.d_model, p.n_heads, p.mla_latent_ratio)
            continue
        d, head_dim = attn.to_q.in_features, attn.to_q.out_features // attn.heads
        bias = attn.to_k.bias is not None
        attn.to_k = nn.Linear(d, kv * head_dim, bias=bias)
        attn.to_v = nn.Linear(d, kv * head_dim, bias=bias)
        attn.set_processor(GroupedKVProcessor(kv))


# ---------------------------------------------------------------- MoE feed-forward
def _mixtral_blocks(model: nn.Module) -> list[nn.Module]:
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    return [m for m in model.modules() if isinstance(m, MixtralSparseMoeBlock)]


def set_ffn(dit: nn.Module, p: CrossModalParams) -> None:
    """``moe``: the text MoE in place of each block's feed-forward, experts as wide as it was;
    initialised as transformers initialises a Mixtral's router and experts."""
    if p.ffn == "dense":
        return
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    first = next(m for m in dit.transformer_blocks[0].ff.modules() if isinstance(m, nn.Linear))
    cfg = MixtralConfig(hidden_size=first.in_features, intermediate_size=first.out_features,
                        **moe_fields(p.n_experts, p.top_k))
    cfg._experts_implementation = EXPERTS_IMPLEMENTATION
    for block in dit.transformer_blocks:
        block.ff = MixtralSparseMoeBlock(cfg)
        for weight in block.ff.parameters():
            nn.init.normal_(weight, mean=0.0, std=cfg.initializer_range)


@contextmanager
def router_logits(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """The router logits of every MoE block that runs inside the ``with`` (a hook on each
    router, as transformers' output recorder gathers them for the text MoE)."""
    logits: list[torch.Tensor] = []
    handles = [block.gate.register_forward_hook(lambda _m, _i, out: logits.append(out[0]))
               for block in _mixtral_blocks(model)]
    try:
        yield logits
    finally:
        for handle in handles:
            handle.remove()


def balancing_loss(model: nn.Module, logits: list[torch.Tensor]) -> torch.Tensor | float:
    """``router_aux_loss_coef`` x transformers' ``load_balancing_loss_func`` over ``logits``
    (the text MoE's term); 0 for a dense model."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    blocks = _mixtral_blocks(model)
    if not blocks or not logits:
        return 0.0
    cfg = blocks[0].experts.config
    return cfg.router_aux_loss_coef * load_balancing_loss_func(
        tuple(logits), cfg.num_local_experts, cfg.num_experts_per_tok)


def moe_impls(model: nn.Module) -> dict[str, str] | None:
    """What ran the experts in each phase (transformers' experts implementation; one for all
    phases since it does not depend on the dtype). None for a dense DiT."""
    blocks = _mixtral_blocks(model)
    if not blocks:
        return None
    impl = blocks[0].experts.config._experts_implementation or "eager"
    return {"train": impl, "sampling": impl, "eval_loss": impl}


# ---------------------------------------------------------------- the DiT
def build_dit(p: CrossModalParams, channels: int, n_classes: int) -> nn.Module:
    """A class-conditional DiT of the preset's size with ``p.attention`` and ``p.ffn``."""
    from diffusers import DiTTransformer2DModel

    dit = DiTTransformer2DModel(
        num_attention_heads=p.n_heads, attention_head_dim=p.d_model // p.n_heads,
        in_channels=channels, out_channels=channels, num_layers=p.n_layers,
        sample_size=p.image_size, patch_size=p.patch, num_embeds_ada_norm=n_classes)
    set_attention(dit, p)
    set_ffn(dit, p)
    return dit


class Diffusion(nn.Module):
    """DDPM noise-prediction training around a DiT: ``forward`` returns ``.loss`` (the MSE plus
    the MoE's balancing loss) so the shared loop trains it; ``sample`` runs DDIM with ``steps``
    denoising steps.

    The noise schedule is the cosine one (Nichol & Dhariwal): its last timestep is pure noise
    for any ``train_steps``. diffusers' default linear betas (1e-4..0.02) are sized for 1,000
    steps; at 100 the last timestep keeps sqrt(0.36) of the image, so sampling from pure noise
    started the model on inputs it never saw (tiny preset: sample accuracy 0.17 vs 0.37 with
    the cosine schedule and trailing spacing, same 2,000 steps)."""

    def __init__(self, dit: nn.Module, train_steps: int) -> None:
        super().__init__()
        from diffusers import DDPMScheduler

        self.dit = dit
        self.scheduler = DDPMScheduler(num_train_timesteps=train_steps,
                                       beta_schedule="squaredcos_cap_v2")
        # on the model's device: the scheduler's own add_noise indexes a CPU table, which took
        # the timesteps to the host, a GPU sync in every training step
        self.register_buffer("alphas_cumprod", self.scheduler.alphas_cumprod.clone().float(),
                             persistent=False)

    def add_noise(self, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """q(x_t | x_0) = sqrt(ᾱ_t)·x + sqrt(1 - ᾱ_t)·ε, the scheduler's add_noise on device."""
        a = self.alphas_cumprod[t].to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
        return a.sqrt() * x + (1 - a).sqrt() * noise

    def loss(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor,
             noise: torch.Tensor) -> torch.Tensor:
        """The noise-prediction MSE alone (what the held-out loss reports)."""
        noisy = self.add_noise(x, noise, t)
        pred = self.dit(noisy, timestep=t, class_labels=y).sample
        return F.mse_loss(pred.float(), noise.float())

    def forward(self, pixel_values: torch.Tensor, class_labels: torch.Tensor,
                **_: Any) -> LossOutput:
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (pixel_values.shape[0],),
                          device=pixel_values.device)
        with router_logits(self.dit) as logits:
            mse = self.loss(pixel_values, class_labels, t, torch.randn_like(pixel_values))
        return LossOutput(loss=mse + balancing_loss(self.dit, logits))

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, steps: int, shape: tuple[int, ...],
               generator: torch.Generator | None = None) -> torch.Tensor:
        from diffusers import DDIMScheduler

        # trailing: the first denoising step is the last training timestep (pure noise); the
        # default "leading" spacing starts at T - T/steps (t=90 of 100 at 10 steps)
        sched = DDIMScheduler.from_config(self.scheduler.config, timestep_spacing="trailing")
        sched.set_timesteps(steps)
        device = labels.device
        x = torch.randn((labels.shape[0], *shape), generator=generator).to(device)
        for t in sched.timesteps:
            tt = torch.full((labels.shape[0],), int(t), device=device, dtype=torch.long)
            eps = self.dit(x, timestep=tt, class_labels=labels).sample
            x = sched.step(eps, t, x).prev_sample
        return x.clamp(-1, 1)


# ---------------------------------------------------------------- ViT and VLM
class ViTClassifier(nn.Module):
    """A ViT classifier with the loop's batch signature (the image batch's labels are only a
    token-count placeholder; the class labels are the targets)."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit

    def forward(self, pixel_values: torch.Tensor, class_labels: torch.Tensor,
                **_: Any) -> LossOutput:
        return LossOutput(loss=self.vit(pixel_values=pixel_values, labels=class_labels).loss)


def _vision_config(p: CrossModalParams, channels: int, **extra: Any) -> Any:
    """The ViT of the preset's width, as a classifier or as the VLM's vision tower."""
    from transformers import ViTConfig

    return ViTConfig(image_size=p.image_size, patch_size=p.patch, num_channels=channels,
                     hidden_size=p.d_model, num_hidden_layers=p.n_layers,
                     num_attention_heads=p.n_heads, intermediate_size=2 * p.d_model, **extra)


def build_vit(p: CrossModalParams, channels: int, n_classes: int) -> nn.Module:
    from transformers import ViTForImageClassification

    return ViTForImageClassification(_vision_config(p, channels, num_labels=n_classes))


def build_vlm(p: CrossModalParams, channels: int, classes: list[str]) -> nn.Module:
    """A tiny LLaVA: transformers' ``LlavaForConditionalGeneration`` with a ViT vision tower and a
    Llama language model, each of the preset's width (patch features, CLS dropped, projected)."""
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vocab = vlm_vocab(classes)
    text = LlamaConfig(vocab_size=len(vocab), hidden_size=p.d_model,
                       intermediate_size=2 * p.d_model, num_hidden_layers=p.n_layers,
                       num_attention_heads=p.n_heads, num_key_value_heads=p.n_heads,
                       max_position_embeddings=4 * n_patches(p) + 64,
                       pad_token_id=vocab["<pad>"], bos_token_id=vocab["<s>"],
                       eos_token_id=vocab["</s>"], tie_word_embeddings=False)
    cfg = LlavaConfig(vision_config=_vision_config(p, channels), text_config=text,
                      image_token_index=vocab["<image>"], image_seq_length=n_patches(p),
                      vision_feature_layer=-1, vision_feature_select_strategy="default",
                      projector_hidden_act="gelu")
    return LlavaForConditionalGeneration(cfg)
