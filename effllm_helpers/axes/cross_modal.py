"""Axis 4 — do the text techniques transfer to images? (paper's cross-modal part, Tables 9–11).

``run(params)`` is what ``notebooks/04_cross_modal.ipynb`` calls. Two experiments:

* ``dit``: a class-conditional DiT (diffusers' ``DiTTransformer2DModel``, DDPM training, DDIM
  sampling) with MHA/MQA/GQA/MLA attention (our own diffusers attention processor) and a dense or
  top-k MoE feed-forward, trained with the shared loop under the Meter; a second Meter times
  sampling (images/s, s/image, J/image). Sample quality is the *Fréchet distance in the feature
  space of a small CNN classifier trained on the same data* (``frechet_classifier_distance``: not
  FID, whose Inception weights cannot be downloaded here), plus that classifier's accuracy on the
  samples, i.e. whether class conditioning works. ``quality_backend: fid`` adds true FID through
  torchmetrics where the user has it and its weights, else a recorded skip.
* ``peft``: the fine-tuning registry's methods (LoRA, DoRA, LoHA, LoKr, Freeze, Full, ...) adapting
  a base pretrained on the plain images to a shifted task (inverted or rotated images) on three
  targets: a ViT classifier, a tiny LLaVA-style VLM answering "which digit is this?" (exact
  match), and the DiT; quality before/after and trainable parameters as on axis 2.

Images are sequences of patch tokens here: the loop's "tokens" are patch tokens (text tokens for
the VLM), its "samples" are images. ``train.train`` counts tokens from a ``labels`` tensor; image
batches carry a placeholder one of ``n_tokens + 1`` columns so it counts ``n_tokens`` per image.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from .. import train
from ..config import CrossModalParams, FinetuneParams
from ..data.images import ImageData, load_images
from ..models.kernels import kernel_dtype
from ..models.zoo import count_params
from ..results import metric, missing
from .spec import AxisResult

CLASSIFIER_VERSION = 1  # bump when the feature CNN or its training changes (new cache entry)



@dataclass
class LossOutput(ModelOutput):
    loss: torch.Tensor | None = None


# ---------------------------------------------------------------- attention variants
def kv_heads(p: CrossModalParams) -> int:
    """K/V heads per variant; an unknown name raises instead of falling back."""
    table = {"mha": p.n_heads, "mqa": 1, "gqa": p.n_kv_heads, "mla": p.n_heads}
    if p.attention not in table:
        raise ValueError(f"unknown attention {p.attention!r}; known: {', '.join(table)}")
    return table[p.attention]


class VariantAttnProcessor:
    """A diffusers attention processor for MQA/GQA (``kv_heads`` < heads: the K/V projections are
    smaller and each K/V head serves ``heads / kv_heads`` query heads) and MLA (K and V are
    up-projected from one shared low-rank latent ``attn.to_kv_latent``). MHA is kv_heads = heads.
    """

    def __init__(self, kv_heads: int, latent: bool = False) -> None:
        self.kv_heads = kv_heads
        self.latent = latent

    def __call__(self, attn: Any, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
        src = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        b, n, _ = hidden_states.shape
        q = attn.to_q(hidden_states)
        kv_in = attn.to_kv_latent(src) if self.latent else src
        k, v = attn.to_k(kv_in), attn.to_v(kv_in)
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


def set_attention(dit: nn.Module, p: CrossModalParams) -> None:
    """Give every DiT block ``p.attention``: smaller K/V projections (MQA/GQA) or a latent one
    (MLA), and our processor. MHA keeps diffusers' own projections and processor."""
    if p.attention == "mha":
        return
    kv = kv_heads(p)
    for block in dit.transformer_blocks:
        attn = block.attn1
        d = attn.to_q.in_features
        head_dim = attn.to_q.out_features // attn.heads
        bias = attn.to_k.bias is not None
        if p.attention == "mla":
            latent = d // p.mla_latent_ratio
            attn.to_kv_latent = nn.Linear(d, latent, bias=bias)
            attn.to_k = nn.Linear(latent, attn.heads * head_dim, bias=bias)
            attn.to_v = nn.Linear(latent, attn.heads * head_dim, bias=bias)
        else:
            attn.to_k = nn.Linear(d, kv * head_dim, bias=bias)
            attn.to_v = nn.Linear(d, kv * head_dim, bias=bias)
        attn.set_processor(VariantAttnProcessor(kv, latent=p.attention == "mla"))


# ---------------------------------------------------------------- MoE feed-forward
class MoEFeedForward(nn.Module):
    """Top-k of ``n_experts`` GELU MLPs, replacing a DiT block's feed-forward. Each token runs
    only its k experts, weighted by the renormalised router softmax (Switch/Mixtral style).

    Two implementations of the same function (``impl``; ``auto`` picks, ``last_impl`` says
    what ran):

    * ``grouped_mm``: the token-expert pairs sorted by expert and both expert GEMMs as one
      ``torch.nn.functional.grouped_mm`` each, with no host sync. ``auto`` uses it on CUDA
      under bf16 (the dtype its kernel takes) when the widths meet its 16-byte strides.
    * ``loop``: a Python loop over experts with ``nonzero()``, one host sync per expert and
      layer; on an H200 it was a good part of the MoE DiT's 3x step time.
    """

    IMPLS = ("auto", "loop", "grouped_mm")

    def __init__(self, dim: int, hidden: int, n_experts: int, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.impl = "auto"
        self.last_impl = ""
        self.router = nn.Linear(dim, n_experts, bias=False)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"),
                          nn.Linear(hidden, dim)) for _ in range(n_experts))

    def choose(self, x: torch.Tensor) -> str:
        return self.impl_for(x.device, kernel_dtype(x))

    def impl_for(self, device: torch.device | str, dtype: torch.dtype) -> str:
        """The implementation a forward on ``device`` with kernel dtype ``dtype`` runs (the one
        rule both the forward and the record use)."""
        if self.impl not in self.IMPLS:
            raise ValueError(f"MoEFeedForward.impl {self.impl!r}: allowed {', '.join(self.IMPLS)}")
        if self.impl != "auto":
            return self.impl
        dim, hidden = self.experts[0][0].in_features, self.experts[0][0].out_features
        ok = (torch.device(device).type == "cuda" and hasattr(F, "grouped_mm")
              and dtype == torch.bfloat16 and dim % 8 == 0 and hidden % 8 == 0)
        return "grouped_mm" if ok else "loop"

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        weights, idx = self.router(x).softmax(-1).topk(self.top_k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        self.last_impl = self.choose(x)
        out = (self._grouped(x, weights, idx) if self.last_impl == "grouped_mm"
               else self._loop(x, weights, idx))
        return out.reshape(shape)

    def _loop(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, slot = (idx == e).nonzero(as_tuple=True)
            if tok.numel():
                out.index_add_(0, tok, expert(x[tok]) * weights[tok, slot, None].to(x.dtype))
        return out

    def _grouped(self, x: torch.Tensor, weights: torch.Tensor,
                 idx: torch.Tensor) -> torch.Tensor:
        dt = kernel_dtype(x)  # grouped_mm is not autocast-aware: cast by hand
        flat = idx.reshape(-1)
        order = flat.argsort(stable=True)
        tok, eid = order // self.top_k, flat[order]
        # tokens per expert on the device (bincount would read its max on the host)
        counts = torch.zeros(len(self.experts), dtype=torch.long, device=x.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat))
        offs = counts.cumsum(0).to(torch.int32)
        up = [e[0] for e in self.experts]
        down = [e[2] for e in self.experts]
        w1 = torch.stack([m.weight for m in up]).to(dt).transpose(1, 2)  # (E, d, h)
        w2 = torch.stack([m.weight for m in down]).to(dt).transpose(1, 2)  # (E, h, d)
        h = F.grouped_mm(x[tok].to(dt), w1, offs=offs)
        h = h + torch.stack([m.bias for m in up]).to(dt)[eid]
        h = F.gelu(h, approximate="tanh")
        y = F.grouped_mm(h, w2, offs=offs) + torch.stack([m.bias for m in down]).to(dt)[eid]
        y = y * weights.reshape(-1)[order, None].to(dt)
        return torch.zeros_like(x).index_add_(0, tok, y.to(x.dtype))


def moe_impls(dit: nn.Module, device: torch.device,
              dtype: torch.dtype) -> dict[str, str] | None:
    """Which expert implementation each phase ran: training and sampling run under ``dtype``'s
    autocast, the held-out loss in fp32. None for a dense DiT."""
    moe = next((m for m in dit.modules() if isinstance(m, MoEFeedForward)), None)
    if moe is None:
        return None
    amp = dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32
    return {"train": moe.impl_for(device, amp), "sampling": moe.impl_for(device, amp),
            "eval_loss": moe.impl_for(device, torch.float32)}


def set_ffn(dit: nn.Module, p: CrossModalParams) -> None:
    if p.ffn == "dense":
        return
    for block in dit.transformer_blocks:
        dense = block.ff
        first = next(m for m in dense.modules() if isinstance(m, nn.Linear))
        block.ff = MoEFeedForward(first.in_features, first.out_features, p.n_experts, p.top_k)


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
    """DDPM noise-prediction training around a DiT: ``forward`` returns ``.loss`` so the shared
    loop trains it; ``sample`` runs DDIM with ``steps`` denoising steps.

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
        noisy = self.add_noise(x, noise, t)
        pred = self.dit(noisy, timestep=t, class_labels=y).sample
        return F.mse_loss(pred.float(), noise.float())

    def forward(self, pixel_values: torch.Tensor, class_labels: torch.Tensor,
                **_: Any) -> LossOutput:
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (pixel_values.shape[0],),
                          device=pixel_values.device)
        return LossOutput(loss=self.loss(pixel_values, class_labels, t,
                                         torch.randn_like(pixel_values)))

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


@torch.no_grad()
def diffusion_eval_loss(model: Diffusion, x: torch.Tensor, y: torch.Tensor,
                        batch_size: int = 64) -> float:
    """Noise-prediction MSE on held-out images at fixed timesteps and noise (seeded), so before
    and after, and run and run, compare on the same draws."""
    gen = torch.Generator().manual_seed(1234)
    device = next(model.parameters()).device
    t_all = torch.randint(0, model.scheduler.config.num_train_timesteps, (x.shape[0],),
                          generator=gen)
    noise_all = torch.randn(x.shape, generator=gen)
    total = 0.0
    for s in range(0, x.shape[0], batch_size):
        sl = slice(s, s + batch_size)
        loss = model.loss(x[sl].to(device), y[sl].to(device), t_all[sl].to(device),
                          noise_all[sl].to(device))
        total += float(loss) * x[sl].shape[0]
    return total / x.shape[0]


def active_params(model: nn.Module) -> int:
    """Parameters a token runs through: an MoE layer counts top_k of its experts."""
    total = sum(q.numel() for q in model.parameters())
    for m in model.modules():
        if isinstance(m, MoEFeedForward):
            per = sum(q.numel() for q in m.experts[0].parameters())
            total -= (len(m.experts) - m.top_k) * per
    return total


# DiT weights that run once per image, not per patch token: each block's adaLN-Zero
# conditioning (its own timestep MLP and the 6·d modulation) and the final shift/scale
PER_IMAGE = ("norm1.emb.", "norm1.linear", "proj_out_1")


def dit_flops_per_token(dit: nn.Module, n_tokens: int, training: bool) -> float:
    """FLOPs per patch token: 2 per active matmul weight a token runs through (embedding
    tables, norms and biases excluded), the attention scores and mixing 4·L·S·d, and the
    per-image conditioning weights (:data:`PER_IMAGE`) spread over the image's S tokens;
    training is 3x forward. Counting the conditioning per token overstated the work 1.4-2x
    against ``FlopCounterMode`` (tests/test_cross_modal.py pins agreement within 5 %)."""
    per_token = per_image = 0
    for name, m in dit.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d)):
            continue
        n = m.weight.numel()
        if any(part in name for part in PER_IMAGE):
            per_image += n
        else:
            per_token += n
    for m in dit.modules():  # an MoE token runs top_k of its experts
        if isinstance(m, MoEFeedForward):
            per = sum(e.weight.numel() for e in m.experts[0].modules() if isinstance(e, nn.Linear))
            per_token -= (len(m.experts) - m.top_k) * per
    cfg = dit.config
    d = cfg.num_attention_heads * cfg.attention_head_dim
    fwd = 2 * per_token + 4 * cfg.num_layers * n_tokens * d + 2 * per_image / n_tokens
    return float(3 * fwd if training else fwd)


# ---------------------------------------------------------------- feature classifier (quality)
class FeatureCNN(nn.Module):
    """The yardstick for sample quality: a small CNN; its penultimate layer is the feature
    space of the Fréchet distance, its logits say whether a sample shows the asked-for class."""

    def __init__(self, channels: int, n_classes: int, width: int = 32) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.GELU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.GELU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(2 * width, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _classifier_path(data: ImageData, steps: int) -> Path:
    from ..paths import cache_dir

    name = f"{data.fingerprint.replace(':', '_').replace('/', '_')}-s{steps}-v{CLASSIFIER_VERSION}"
    return cache_dir("cross_modal", "classifier") / f"{name[-150:]}.pt"


def feature_classifier(data: ImageData, steps: int) -> tuple[FeatureCNN, dict[str, Any]]:
    """The feature CNN for ``data``: trained once (seed 0, so every run shares one yardstick)
    and cached under the cache dir by the data's fingerprint; returns it with its val accuracy."""
    path = _classifier_path(data, steps)
    model = FeatureCNN(data.channels, data.n_classes)
    if path.is_file():
        blob = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(blob["state"])
        return model.eval(), {"val_accuracy": float(blob["val_accuracy"]), "cached": True}
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = FeatureCNN(data.channels, data.n_classes)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for _ in range(steps):
            idx = torch.randint(0, data.train_x.shape[0], (64,), generator=gen)
            x = data.train_x[idx] + 0.1 * torch.randn(data.train_x[idx].shape, generator=gen)
            loss = F.cross_entropy(model(x), data.train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    acc = class_accuracy(model, data.val_x, data.val_y)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"state": model.state_dict(), "val_accuracy": acc}, tmp)
    os.replace(tmp, path)  # atomic: concurrent runs never read a half-written file
    return model, {"val_accuracy": acc, "cached": False}


@torch.no_grad()
def class_accuracy(model: FeatureCNN, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x.cpu().float()).argmax(-1) == y.cpu()).float().mean())


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature rows ``a`` and ``b``:
    ``|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2})``, the trace term computed from the
    eigenvalues of the symmetric ``S_a^{1/2} S_b S_a^{1/2}`` (stable, exactly 0 for a == b)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu = a.mean(0) - b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(sa)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.linalg.eigvalsh(root_a @ sb @ root_a)
    tr_cross = np.sqrt(np.clip(cross, 0, None)).sum()
    return float(max(0.0, mu @ mu + np.trace(sa) + np.trace(sb) - 2 * tr_cross))


@torch.no_grad()
def classifier_frechet(model: FeatureCNN, real: torch.Tensor, fake: torch.Tensor) -> float:
    fr = model.features(real.cpu().float()).numpy()
    ff = model.features(fake.cpu().float()).numpy()
    return frechet_distance(fr, ff)


def true_fid(real: torch.Tensor, fake: torch.Tensor) -> dict[str, Any]:
    """FID with torchmetrics' Inception features where installed with its weights; else null
    with the reason (never a substitute under the FID name)."""
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance

        fid = FrechetInceptionDistance(feature=2048, normalize=True)

        def rgb(x: torch.Tensor) -> torch.Tensor:
            x = (x.cpu().float() + 1) / 2
            x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
            return F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)

        fid.update(rgb(real), real=True)
        fid.update(rgb(fake), real=False)
        return metric(float(fid.compute()), "FID", "torchmetrics_inception_v3_2048",
                      n_real=int(real.shape[0]), n_fake=int(fake.shape[0]))
    except Exception as exc:  # noqa: BLE001 - missing package, weights or network: a skip
        return missing("FID", f"true FID unavailable here ({type(exc).__name__}: "
                              f"{str(exc)[:200]}); see frechet_classifier_distance",
                       "torchmetrics_inception_v3_2048")


# ---------------------------------------------------------------- batches
def n_patches(p: CrossModalParams) -> int:
    return (p.image_size // p.patch) ** 2


def image_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, n_tokens: int,
                  seed: int = 0) -> Any:
    """Shuffled image batches for ``train.train``: ``pixel_values``, ``class_labels``, and a
    placeholder ``labels``/``attention_mask``/``input_ids`` so the loop counts ``n_tokens`` per
    image."""
    inner = train.dict_batches({"pixel_values": x, "class_labels": y}, batch_size, seed)

    def next_batch(micro_step: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        b = inner(micro_step, rank, world)
        n = b["class_labels"].shape[0]
        b["labels"] = torch.zeros(n, n_tokens + 1, dtype=torch.long)
        b["attention_mask"] = torch.ones(n, n_tokens, dtype=torch.long)
        b["input_ids"] = b["labels"]  # the loop reads it unconditionally; the models ignore it
        return b

    return next_batch


def shifted(x: torch.Tensor, shift: str) -> torch.Tensor:
    """The adaptation task's images: inverted (negative) or rotated by 90 degrees."""
    if shift == "invert":
        return -x
    if shift == "rotate":
        return torch.rot90(x, 1, dims=(2, 3)).contiguous()
    raise ValueError(f"unknown shift {shift!r}; known: invert, rotate")


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _pretrain(model: nn.Module, batches: Any, steps: int, lr: float) -> float:
    """Unmeasured base training (the 'pretrained checkpoint' that PEFT then adapts): AdamW with
    the shared loop's schedule (10% linear warm-up, cosine decay) and gradient clipping at 1.
    Without them a ViT at constant 3e-3 stayed at chance (0.11 plain-digit accuracy after 300
    steps at the gpu preset's width; 0.94 at 1e-3 with warm-up and clipping)."""
    device = next(model.parameters()).device
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, train.lr_lambda(max(1, steps // 10), steps))
    model.train()
    loss = torch.zeros(())
    for step in range(steps):
        b = {k: v.to(device) for k, v in batches(step, 0, 1).items()}
        loss = model(**b).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
    model.eval()
    return float(loss.detach())


BASE_VERSION = 1  # bump when a base's architecture or pretraining changes (new cache entry)
# keys that only shape the adaptation or the scoring, not the pretrained base
ADAPTATION_ONLY = frozenset({
    "experiment", "method", "rank", "alpha", "dropout", "target_modules", "freeze_last_k",
    "shift", "n_eval", "train", "dit_train", "measure", "n_samples", "sample_batch",
    "sample_steps", "quality_backend", "classifier_steps"})


def base_path(p: CrossModalParams, data: ImageData, batch_size: int, seed: int) -> Path:
    """Where the pretrained base of ``p.target`` is cached: one file per everything that shapes
    it (architecture, data, pretraining steps, rate, batch and seed), whatever the method."""
    from ..paths import cache_dir

    key = {k: v for k, v in p.model_dump(mode="json").items() if k not in ADAPTATION_ONLY}
    key.update(data=data.fingerprint, pretrain_batch=batch_size, seed=seed,
               version=BASE_VERSION)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir("cross_modal", "bases") / f"{p.target}-{digest}.pt"


def pretrained_base(model: nn.Module, p: CrossModalParams, data: ImageData, batches: Any,
                    batch_size: int, seed: int) -> dict[str, Any]:
    """``model`` pretrained by :func:`_pretrain`, or loaded from the cache of an earlier run
    with the same base. Every method of a study then adapts the same checkpoint, as PEFT
    methods adapt one released model (on a GPU, per-run pretraining gave each method its own
    base: ViT accuracy before adaptation 0.06-0.13 across the methods of one H200 sweep)."""
    path = base_path(p, data, batch_size, seed)
    if path.is_file():
        device = next(model.parameters()).device
        model.load_state_dict(torch.load(path, map_location=device, weights_only=True))
        model.eval()
        cached = True
    else:
        _pretrain(model, batches, p.pretrain_steps, p.pretrain_lr)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, path)  # atomic: a concurrent run never reads half a file
        cached = False
    torch.manual_seed(seed + 1)  # the adaptation draws the same numbers either way
    return {"cached": cached, "file": path.name, "steps": p.pretrain_steps,
            "lr": p.pretrain_lr, "batch_size": batch_size}


# ---------------------------------------------------------------- experiment: DiT
def run_dit(p: CrossModalParams, seed: int = 0, progress: bool = True) -> AxisResult:
    """Train the DiT variant under the Meter, sample under a second Meter, score the samples."""

    device = _device()
    data = load_images(p.data, p.image_size, p.val_fraction, seed=0)
    torch.manual_seed(seed)
    dit = build_dit(p, data.channels, data.n_classes)
    model = Diffusion(dit, p.diffusion_steps).to(device)
    clf, clf_info = feature_classifier(data, p.classifier_steps)
    total = sum(q.numel() for q in model.parameters())
    tokens = n_patches(p)
    loss_before = diffusion_eval_loss(model, data.val_x, data.val_y)

    def eval_fn(m: nn.Module) -> dict[str, float]:
        return {"val_loss": diffusion_eval_loss(m, data.val_x, data.val_y)}

    spec = p.dit_train or p.train
    res = train.train(model, image_batches(data.train_x, data.train_y, spec.batch_size,
                                           tokens, seed),
                      spec, p.measure, n_params=total,
                      flops_per_token=dit_flops_per_token(dit, tokens, training=True),
                      evaluate=eval_fn, progress=progress)
    model.eval()
    metrics = dict(res.metrics)
    metrics["mcr"] = missing("x", "no compression on this run: the DiT is served at its "
                                  "training precision")
    # served at its training precision: bf16 autocast on a GPU, as it trained
    dtype = train.resolve_dtype(spec.dtype, next(model.parameters()).device)
    samples, sample_metrics = _sample_measured(model, p, data, seed, dtype)
    metrics.update(sample_metrics)
    y_fake = _balanced_labels(p.n_samples, data.n_classes)
    quality: dict[str, Any] = {
        "frechet_classifier_distance": metric(
            classifier_frechet(clf, data.val_x, samples), "frechet(cnn features)",
            "frechet_distance_small_cnn_classifier_features_not_fid",
            n_real=int(data.val_x.shape[0]), n_fake=int(samples.shape[0]),
            classifier_val_accuracy=clf_info["val_accuracy"]),
        "sample_class_accuracy": metric(class_accuracy(clf, samples, y_fake), "fraction",
                                        "feature_cnn_argmax_vs_conditioning_label",
                                        n=int(samples.shape[0]), chance=1 / data.n_classes),
        "val_loss": metric(diffusion_eval_loss(model, data.val_x, data.val_y), "mse",
                           "ddpm_noise_prediction_fixed_draws", n=int(data.val_x.shape[0])),
        "val_loss_before": metric(loss_before, "mse", "ddpm_noise_prediction_fixed_draws"),
        "train_loss": metric(res.final_loss, "mse", "last_train_step"),
        "reference_frechet_classifier_distance": metric(
            classifier_frechet(clf, data.val_x, data.train_x[: p.n_samples]),
            "frechet(cnn features)", "real_train_images_vs_val_same_n",
            note="the floor at this sample count: real images against real images"),
    }
    if p.quality_backend == "fid":
        quality["fid"] = true_fid(data.val_x, samples)
    facts = {
        "experiment": "dit", "attention": p.attention, "kv_heads": kv_heads(p),
        "ffn": p.ffn if p.ffn == "dense" else f"moe {p.n_experts}x top-{p.top_k}",
        # what ran the experts per phase (MoEFeedForward.impl_for, the forward's own rule; the
        # last forward alone would name the fp32 loss evaluation's path)
        "moe_impl": moe_impls(dit, next(model.parameters()).device, dtype),
        "params_total": total, "params_active": active_params(model),
        "flops_per_token_train": dit_flops_per_token(dit, tokens, training=True),
        "patch_tokens_per_image": tokens, "images_trained": res.samples,
        "data": data.fingerprint, "classifier": clf_info, "image_size": p.image_size,
    }
    return AxisResult(metrics=metrics, quality=quality, curves=res.curves, model=facts,
                      samples=samples[:20])


def _balanced_labels(n: int, n_classes: int) -> torch.Tensor:
    return torch.arange(n) % n_classes


def _sample_measured(model: Diffusion, p: CrossModalParams, data: ImageData, seed: int,
                     dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, dict[str, Any]]:
    """Generate ``n_samples`` images under a Meter (one warm-up batch first, unmeasured), the
    DiT under ``dtype`` autocast (its training precision): the Meter's metrics prefixed
    ``sample_``, plus images/s, s/image and J/image."""
    from ..measure import Meter

    device = next(model.parameters()).device
    shape = (data.channels, p.image_size, p.image_size)
    labels = _balanced_labels(p.n_samples, data.n_classes).to(device)
    gen = torch.Generator().manual_seed(seed + 77)

    def amp() -> Any:
        return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    with amp():
        model.sample(labels[: min(4, p.n_samples)], p.sample_steps, shape, gen)  # warm-up
    fwd = dit_flops_per_token(model.dit, n_patches(p), training=False)
    out = []
    with Meter(device, n_params=active_params(model), flops_per_token=fwd, warmup_steps=0,
               dtype=train.DTYPE_NAMES.get(dtype, "fp32"),
               sample_interval_s=p.measure.sample_interval_s) as meter:
        for s in range(0, p.n_samples, p.sample_batch):
            lab = labels[s:s + p.sample_batch]
            with amp():
                out.append(model.sample(lab, p.sample_steps, shape, gen).float().cpu())
            meter.step(samples=int(lab.shape[0]),
                       flop_tokens=int(lab.shape[0]) * n_patches(p) * p.sample_steps)
    raw = meter.metrics()
    metrics = {f"sample_{k}": v for k, v in raw.items()
               if k not in ("tt", "st", "it", "tokens_per_s", "j_per_token")}
    ips = raw["samples_per_s"]["value"]
    how = f"meter_{p.n_samples}_images_{p.sample_steps}_ddim_steps"
    metrics["sample_images_per_s"] = metric(ips, "images/s", how)
    metrics["sample_s_per_image"] = (metric(1 / ips, "s/image", how) if ips
                                     else missing("s/image", "no sampling rate measured", how))
    joules = raw["energy_j"]["value"]
    metrics["sample_j_per_image"] = (
        metric(joules / p.n_samples, "J/image", how) if joules is not None
        else missing("J/image", raw["energy_j"].get("reason") or "energy not measured", how))
    return torch.cat(out), metrics


# ---------------------------------------------------------------- experiment: PEFT transfer
class ViTClassifier(nn.Module):
    """A ViT classifier with the loop's batch signature (the image batch's labels are only a
    token-count placeholder; the class labels are the targets)."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit

    def forward(self, pixel_values: torch.Tensor, class_labels: torch.Tensor,
                **_: Any) -> LossOutput:
        return LossOutput(loss=self.vit(pixel_values=pixel_values, labels=class_labels).loss)


def build_vit(p: CrossModalParams, channels: int, n_classes: int) -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=p.image_size, patch_size=p.patch, num_channels=channels,
                    hidden_size=p.d_model, num_hidden_layers=p.n_layers,
                    num_attention_heads=p.n_heads, intermediate_size=2 * p.d_model,
                    num_labels=n_classes)
    return ViTForImageClassification(cfg)


@torch.no_grad()
def vit_quality(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) on ``x``."""
    device = next(model.parameters()).device
    logits = torch.cat([model(pixel_values=x[s:s + 128].to(device)).logits.float().cpu()
                        for s in range(0, x.shape[0], 128)])
    return float((logits.argmax(-1) == y).float().mean()), float(F.cross_entropy(logits, y))


# the VLM's word-level vocabulary: special tokens, the question's words, then class names
VLM_SPECIAL = ("<pad>", "<s>", "</s>", "<image>")
VLM_QUESTION = ("which", "class", "is", "this", "?", "answer:")


@dataclass
class VQA:
    """A digit VQA task: token ids, labels (answer + eos only) and the answer token per item."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor
    answers: torch.Tensor
    prompt_len: int


def vlm_vocab(classes: list[str]) -> dict[str, int]:
    words = [*VLM_SPECIAL, *VLM_QUESTION, *(f"cls:{c}" for c in classes)]
    return {w: i for i, w in enumerate(words)}


def vqa_task(x: torch.Tensor, y: torch.Tensor, classes: list[str], n_image_tokens: int) -> VQA:
    """``<s> <image>*n which class is this ? answer: <class> </s>``, loss on the last two."""
    vocab = vlm_vocab(classes)
    prompt = ([vocab["<s>"]] + [vocab["<image>"]] * n_image_tokens
              + [vocab[w] for w in VLM_QUESTION])
    answers = torch.tensor([vocab[f"cls:{classes[int(c)]}"] for c in y])
    n = y.shape[0]
    ids = torch.cat([torch.tensor(prompt).expand(n, -1), answers[:, None],
                     torch.full((n, 1), vocab["</s>"])], dim=1)
    labels = torch.full_like(ids, -100)
    labels[:, len(prompt):] = ids[:, len(prompt):]
    return VQA(ids, torch.ones_like(ids), labels, x, answers, len(prompt))


def build_vlm(p: CrossModalParams, channels: int, classes: list[str]) -> nn.Module:
    """A tiny LLaVA: transformers' ``LlavaForConditionalGeneration`` with a ViT vision tower and a
    Llama language model, each of the preset's width (patch features, CLS dropped, projected)."""
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, ViTConfig

    vocab = vlm_vocab(classes)
    vision = ViTConfig(image_size=p.image_size, patch_size=p.patch, num_channels=channels,
                       hidden_size=p.d_model, num_hidden_layers=p.n_layers,
                       num_attention_heads=p.n_heads, intermediate_size=2 * p.d_model)
    text = LlamaConfig(vocab_size=len(vocab), hidden_size=p.d_model,
                       intermediate_size=2 * p.d_model, num_hidden_layers=p.n_layers,
                       num_attention_heads=p.n_heads, num_key_value_heads=p.n_heads,
                       max_position_embeddings=4 * n_patches(p) + 64,
                       pad_token_id=vocab["<pad>"], bos_token_id=vocab["<s>"],
                       eos_token_id=vocab["</s>"], tie_word_embeddings=False)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=vocab["<image>"],
                      image_seq_length=n_patches(p), vision_feature_layer=-1,
                      vision_feature_select_strategy="default", projector_hidden_act="gelu")
    return LlavaForConditionalGeneration(cfg)


def vlm_batches(task: VQA, batch_size: int, seed: int) -> Any:
    return train.dict_batches({"input_ids": task.input_ids, "attention_mask": task.attention_mask,
                               "labels": task.labels, "pixel_values": task.pixel_values},
                              batch_size, seed)


@torch.no_grad()
def vlm_quality(model: nn.Module, task: VQA) -> tuple[float, float]:
    """(exact match of the greedy answer token, mean answer-token cross-entropy)."""
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    hits, loss_sum = 0, 0.0
    k = task.prompt_len
    for s in range(0, task.input_ids.shape[0], 64):
        sl = slice(s, s + 64)
        logits = model(input_ids=task.input_ids[sl, :k].to(device),
                       pixel_values=task.pixel_values[sl].to(device)).logits[:, -1].float().cpu()
        hits += int((logits.argmax(-1) == task.answers[sl]).sum())
        loss_sum += float(F.cross_entropy(logits, task.answers[sl], reduction="sum"))
    model.train(was)
    n = task.input_ids.shape[0]
    return hits / n, loss_sum / n


def finetune_params(p: CrossModalParams) -> FinetuneParams:
    """The registry's knobs from this axis' params (the registry takes axis-2 params)."""
    return FinetuneParams(method=p.method, rank=p.rank, alpha=p.alpha, dropout=p.dropout,
                          target_modules=p.target_modules, freeze_last_k=p.freeze_last_k,
                          train=p.train.model_dump())


def attach_method(model: nn.Module, p: CrossModalParams) -> tuple[nn.Module, dict[str, Any]]:
    """Apply ``p.method`` to a vision model (ViT, DiT) that is not a causal LM.

    peft methods use the registry's own config for the method (rank/alpha/dropout mapped as on
    axis 2) with no task type, so peft wraps the model without a language-model head; ``full``
    trains everything; ``freeze`` trains the last ``freeze_last_k`` blocks and the output layers.
    """
    from peft import get_peft_model

    from ..techniques import finetuning as ft

    fp = finetune_params(p)
    spec = ft.method_spec(p.method)
    info: dict[str, Any] = {"method": spec.name, "kind": spec.kind}
    if spec.kind == "full":
        for q in model.parameters():
            q.requires_grad_(True)
        return model, info
    if spec.kind == "freeze":
        name, blocks = ft.find_blocks(model)
        for q in model.parameters():
            q.requires_grad_(False)
        for block in list(blocks)[-p.freeze_last_k:]:
            for q in block.parameters():
                q.requires_grad_(True)
        for mod_name, mod in model.named_modules():  # the output layers after the blocks
            if mod_name.split(".")[-1] in ("classifier", "proj_out_1", "proj_out_2"):
                for q in mod.parameters():
                    q.requires_grad_(True)
        info.update(blocks=name, trained_blocks=p.freeze_last_k)
        return model, info
    notes: list[str] = []
    cfg = (spec.config(fp, model) if spec.name in ft.REGISTRY  # type: ignore[misc]
           else ft._generic_config(spec.name, fp, notes))
    cfg.task_type = None  # a plain PeftModel: forward passes straight through to the model
    if spec.optimizer == "loraplus":
        info["note"] = "lora_plus: LoRA+ learning-rate groups are not applied on this axis"
    peft_model = get_peft_model(model, cfg)
    info["notes"] = notes
    return peft_model, info


def run_peft(p: CrossModalParams, seed: int = 0, progress: bool = True) -> AxisResult:
    """Pretrain the target on the plain images (unmeasured), then adapt it with ``p.method`` to
    the shifted images under the Meter; quality before and after on the shifted val split."""
    from ..techniques import finetuning as ft

    device = _device()
    data = load_images(p.data, p.image_size, p.val_fraction, seed=0)
    torch.manual_seed(seed)
    tx, ty = shifted(data.train_x, p.shift), data.train_y
    vx, vy = shifted(data.val_x, p.shift)[: p.n_eval], data.val_y[: p.n_eval]
    tokens = n_patches(p)
    pre_bs = max(p.train.batch_size, 16)
    notes: list[str] = []
    if p.target == "vit":
        base = build_vit(p, data.channels, data.n_classes).to(device)
        base_info = pretrained_base(ViTClassifier(base), p, data, image_batches(
            data.train_x, ty, pre_bs, tokens + 1, seed), pre_bs, seed)
        acc0, loss0 = vit_quality(base, vx, vy)
        model, info = attach_method(base, p)
        wrapped: nn.Module = ViTClassifier(model)
        batches = image_batches(tx, ty, p.train.batch_size, tokens + 1, seed)
    elif p.target == "vlm":
        base = build_vlm(p, data.channels, data.classes).to(device)
        plain = vqa_task(data.train_x, ty, data.classes, tokens)
        base_info = pretrained_base(base, p, data, vlm_batches(plain, pre_bs, seed), pre_bs,
                                    seed)
        task_val = vqa_task(vx, vy, data.classes, tokens)
        acc0, loss0 = vlm_quality(base, task_val)
        prepared = ft.prepare(base, finetune_params(p))
        model = wrapped = prepared.model
        info = prepared.config
        notes += prepared.notes
        batches = vlm_batches(vqa_task(tx, ty, data.classes, tokens), p.train.batch_size,
                              seed)
    else:  # dit
        dit = build_dit(p, data.channels, data.n_classes)
        base = Diffusion(dit, p.diffusion_steps).to(device)
        base_info = pretrained_base(base, p, data, image_batches(data.train_x, ty, pre_bs,
                                                                  tokens, seed), pre_bs, seed)
        acc0, loss0 = None, diffusion_eval_loss(base, vx, vy)
        model, info = attach_method(dit, p)
        base.dit = model
        wrapped = base
        batches = image_batches(tx, ty, p.train.batch_size, tokens, seed)
    counts = count_params(wrapped)  # a technique that cannot run here raised SkipRun above
    trainable, total = counts["trainable"], counts["total"]
    res = train.train(wrapped, batches, p.train, p.measure, n_params=total, progress=progress)
    wrapped.eval()
    if p.target == "vit":
        acc1, loss1 = vit_quality(model, vx, vy)
    elif p.target == "vlm":
        acc1, loss1 = vlm_quality(model, task_val)
    else:
        acc1, loss1 = None, diffusion_eval_loss(wrapped, vx, vy)
    loss_unit = "mse" if p.target == "dit" else "nats"
    loss_how = ("ddpm_noise_prediction_fixed_draws" if p.target == "dit"
                else "answer_token_cross_entropy" if p.target == "vlm"
                else "class_cross_entropy")
    quality: dict[str, Any] = {
        "eval_loss": metric(loss1, loss_unit, loss_how, n=int(vx.shape[0])),
        "eval_loss_before": metric(loss0, loss_unit, loss_how, n=int(vx.shape[0])),
        "train_loss": metric(res.final_loss, loss_unit, "last_train_step"),
    }
    acc_how = "greedy_answer_exact_match" if p.target == "vlm" else "argmax_class"
    if acc1 is not None:
        quality["accuracy"] = metric(acc1, "fraction", acc_how, n=int(vx.shape[0]),
                                     chance=1 / data.n_classes)
        quality["accuracy_before"] = metric(acc0, "fraction", acc_how, n=int(vx.shape[0]))
    metrics = dict(res.metrics)
    metrics["mcr"] = missing("x", "no compression on this run: fine-tuning at full precision")
    facts = {
        "experiment": "peft", "target": p.target, "shift": p.shift,
        "params_total": total, "params_trainable": trainable,
        "trainable_fraction": trainable / total, "method_config": _jsonable(info),
        "patch_tokens_per_image": tokens, "images_trained": res.samples,
        "data": data.fingerprint, "base": base_info,
    }
    return AxisResult(metrics=metrics, quality=quality, curves=res.curves, model=facts,
                      notes=notes)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set):
        return [_jsonable(v) for v in obj]
    return obj if isinstance(obj, str | int | float | bool | type(None)) else str(obj)


def run(p: CrossModalParams, seed: int = 0, progress: bool = True) -> AxisResult:
    """One cross-modal run: the DiT study or one PEFT transfer, as ``p.experiment`` says."""
    from ..measure.memory import mark_baseline  # AMU increment: memory above this point

    mark_baseline()
    result = run_dit(p, seed, progress) if p.experiment == "dit" else run_peft(p, seed, progress)
    loss = result.quality["train_loss"]["value"]
    if loss is None or not math.isfinite(loss):
        raise RuntimeError("final training loss is not finite")
    return result
