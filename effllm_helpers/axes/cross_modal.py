"""Axis 4 — do the text techniques transfer to images? (paper's cross-modal part, Tables 9–11).

``run(params)`` is what ``notebooks/04_cross_modal.ipynb`` calls. Two experiments:

* ``dit``: a class-conditional DiT (``models/vision.py``: DDPM training, DDIM sampling) with the
  catalog's MHA/MQA/GQA/MLA attention and the text MoE (with its load-balancing loss) or a
  dense feed-forward, trained with the shared loop under the Meter; a second Meter times
  sampling (images/s, s/image, J/image). Sample quality (``evaluate_images.py``) is the
  Fréchet distance in the feature space of a small CNN classifier trained on the same data
  (not FID) and that classifier's accuracy on the samples; ``quality_backend: fid`` adds true
  FID where torchmetrics and its weights are present, else a recorded skip.
* ``peft``: a fine-tuning method (``techniques/finetuning.prepare``, the one door of every
  model type) adapting a base pretrained on the plain images to a shifted task (inverted or
  rotated images) on three targets: a ViT classifier, a tiny LLaVA-style VLM answering "which
  digit is this?" (exact match), and the DiT; quality before/after and trainable parameters as
  on axis 2. Every method of a study adapts the same cached base.

Images are sequences of patch tokens here: the loop's "tokens" are patch tokens (text tokens for
the VLM), its "samples" are images (``data.images.image_batches``).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import train
from ..config import CrossModalParams, FinetuneParams
from ..data.images import ImageData, balanced_labels, image_batches, load_images, shifted
from ..data.vqa import vlm_batches, vqa_task
from ..errors import DivergedError
from ..evaluate_images import (
    class_accuracy,
    classifier_frechet,
    diffusion_eval_loss,
    feature_classifier,
    true_fid,
    vit_quality,
    vlm_quality,
)
from ..models.flops import dit_flops_per_token
from ..models.vision import (
    OUTPUT_LAYERS,
    Diffusion,
    ViTClassifier,
    build_dit,
    build_vit,
    build_vlm,
    moe_impls,
    n_patches,
)
from ..models.zoo import count_params, kv_heads
from ..paths import build_once
from ..results import metric, missing
from .spec import AxisResult, of_module


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def finetune_params(p: CrossModalParams) -> FinetuneParams:
    """The registry's knobs from this axis' params (the registry takes axis-2 params)."""
    return FinetuneParams(method=p.method, rank=p.rank, alpha=p.alpha, dropout=p.dropout,
                          target_modules=p.target_modules, freeze_last_k=p.freeze_last_k,
                          train=p.train.model_dump())


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
    return cache_dir(of_module(__name__).name, "bases") / f"{p.target}-{digest}.pt"


def pretrained_base(model: nn.Module, p: CrossModalParams, data: ImageData, batches: Any,
                    batch_size: int, seed: int) -> dict[str, Any]:
    """``model`` pretrained by ``train.pretrain``, or loaded from the cache of an earlier run
    with the same base (built once under the shared lock, so parallel workers of one study
    wait for one build). Every method of a study then adapts the same checkpoint, as PEFT
    methods adapt one released model (on a GPU, per-run pretraining gave each method its own
    base: ViT accuracy before adaptation 0.06-0.13 across the methods of one H200 sweep)."""
    path = base_path(p, data, batch_size, seed)

    def build(tmp: Path) -> None:
        train.pretrain(model, batches, p.pretrain_steps, p.pretrain_lr)
        torch.save(model.state_dict(), tmp)

    cached = not build_once(path, build)
    if cached:
        device = next(model.parameters()).device
        model.load_state_dict(torch.load(path, map_location=device, weights_only=True))
        model.eval()
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
    counts = count_params(model)
    total = counts["total"]
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
    y_fake = balanced_labels(p.n_samples, data.n_classes)
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
        "experiment": "dit", "attention": p.attention, "kv_heads": kv_heads(p.attention, p),
        "ffn": p.ffn if p.ffn == "dense" else f"moe {p.n_experts}x top-{p.top_k}",
        # what ran the experts in each phase (transformers' experts implementation)
        "moe_impl": moe_impls(dit),
        "params_total": total, "params_active": counts["active"],
        "flops_per_token_train": dit_flops_per_token(dit, tokens, training=True),
        "patch_tokens_per_image": tokens, "images_trained": res.samples,
        "data": data.fingerprint, "classifier": clf_info, "image_size": p.image_size,
    }
    return AxisResult(metrics=metrics, quality=quality, curves=res.curves, model=facts,
                      samples=samples[:20])


def _sample_measured(model: Diffusion, p: CrossModalParams, data: ImageData, seed: int,
                     dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, dict[str, Any]]:
    """Generate ``n_samples`` images under a Meter (one warm-up batch first, unmeasured), the
    DiT under ``dtype`` autocast (its training precision): the Meter's metrics prefixed
    ``sample_``, plus images/s, s/image and J/image."""
    from ..measure import Meter

    device = next(model.parameters()).device
    shape = (data.channels, p.image_size, p.image_size)
    labels = balanced_labels(p.n_samples, data.n_classes).to(device)
    gen = torch.Generator().manual_seed(seed + 77)

    def amp() -> Any:
        return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    with amp():
        model.sample(labels[: min(4, p.n_samples)], p.sample_steps, shape, gen)  # warm-up
    fwd = dit_flops_per_token(model.dit, n_patches(p), training=False)
    out = []
    with Meter(device, n_params=count_params(model)["active"], flops_per_token=fwd,
               warmup_steps=0,
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
    fp = finetune_params(p)
    if p.target == "vit":
        base = build_vit(p, data.channels, data.n_classes).to(device)
        base_info = pretrained_base(ViTClassifier(base), p, data, image_batches(
            data.train_x, ty, pre_bs, tokens + 1, seed), pre_bs, seed)
        acc0, loss0 = vit_quality(base, vx, vy)
        prepared = ft.prepare(base, fp, task_type=None, output_layers=OUTPUT_LAYERS)
        model = prepared.model
        wrapped: nn.Module = ViTClassifier(model)
        batches = image_batches(tx, ty, p.train.batch_size, tokens + 1, seed)
    elif p.target == "vlm":
        base = build_vlm(p, data.channels, data.classes).to(device)
        plain = vqa_task(data.train_x, ty, data.classes, tokens)
        base_info = pretrained_base(base, p, data, vlm_batches(plain, pre_bs, seed), pre_bs,
                                    seed)
        task_val = vqa_task(vx, vy, data.classes, tokens)
        acc0, loss0 = vlm_quality(base, task_val)
        prepared = ft.prepare(base, fp)
        model = wrapped = prepared.model
        batches = vlm_batches(vqa_task(tx, ty, data.classes, tokens), p.train.batch_size,
                              seed)
    else:  # dit
        dit = build_dit(p, data.channels, data.n_classes)
        base = Diffusion(dit, p.diffusion_steps).to(device)
        base_info = pretrained_base(base, p, data, image_batches(data.train_x, ty, pre_bs,
                                                                  tokens, seed), pre_bs, seed)
        acc0, loss0 = None, diffusion_eval_loss(base, vx, vy)
        prepared = ft.prepare(dit, fp, task_type=None, output_layers=OUTPUT_LAYERS)
        model = base.dit = prepared.model
        wrapped = base
        batches = image_batches(tx, ty, p.train.batch_size, tokens, seed)
    info, notes = prepared.config, list(prepared.notes)
    if "lora_plus_ratio" in info:  # the shared loop builds its own optimizer
        notes.append("lora_plus: LoRA+ learning-rate groups are not applied on this axis")
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
        raise DivergedError(f"final training loss is {loss}")
    return result
