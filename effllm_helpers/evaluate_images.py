"""Image quality beside the text quality of ``evaluate.py``: what axis 4 scores its models by.

Sample quality is the *Fréchet distance in the feature space of a small CNN classifier trained
on the same data* (:func:`classifier_frechet`: not FID, whose Inception weights cannot be
downloaded here) plus that classifier's accuracy on the samples (whether class conditioning
works); :func:`true_fid` adds real FID where torchmetrics and its weights are present. The
classifier is trained once per image source (seed 0, so every run shares one yardstick) and
cached through the shared locked builder. The DiT's held-out loss, the ViT's accuracy and the
VLM's exact match are here too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data.images import ImageData
from .data.vqa import VQA
from .models.vision import Diffusion
from .paths import build_once, cache_dir
from .results import metric, missing
from .train import fit

CLASSIFIER_VERSION = 1  # bump when the feature CNN or its training changes (new cache entry)


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


def classifier_path(data: ImageData, steps: int) -> Path:
    name = f"{data.fingerprint.replace(':', '_').replace('/', '_')}-s{steps}-v{CLASSIFIER_VERSION}"
    return cache_dir("cross_modal", "classifier") / f"{name[-150:]}.pt"


def _train_classifier(data: ImageData, steps: int) -> FeatureCNN:
    """AdamW at 3e-3 on noisy training images (batches of 64), seed 0 for weights and draws."""
    gen = torch.Generator().manual_seed(0)

    def batches(step: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        idx = torch.randint(0, data.train_x.shape[0], (64,), generator=gen)
        x = data.train_x[idx] + 0.1 * torch.randn(data.train_x[idx].shape, generator=gen)
        return {"x": x, "y": data.train_y[idx]}

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = FeatureCNN(data.channels, data.n_classes)
        fit(model, batches, steps, torch.optim.AdamW(model.parameters(), lr=3e-3),
            loss_of=lambda m, b: F.cross_entropy(m(b["x"]), b["y"]))
    return model


def feature_classifier(data: ImageData, steps: int) -> tuple[FeatureCNN, dict[str, Any]]:
    """The feature CNN for ``data`` with its val accuracy: built once under the cache dir by the
    data's fingerprint (parallel runs wait for one build), then loaded."""
    path = classifier_path(data, steps)

    def build(tmp: Path) -> None:
        model = _train_classifier(data, steps)
        torch.save({"state": model.state_dict(),
                    "val_accuracy": class_accuracy(model, data.val_x, data.val_y)}, tmp)

    built = build_once(path, build)
    blob = torch.load(path, map_location="cpu", weights_only=True)
    model = FeatureCNN(data.channels, data.n_classes)
    model.load_state_dict(blob["state"])
    return model.eval(), {"val_accuracy": float(blob["val_accuracy"]), "cached": not built}


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


@torch.no_grad()
def vit_quality(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) on ``x``."""
    device = next(model.parameters()).device
    logits = torch.cat([model(pixel_values=x[s:s + 128].to(device)).logits.float().cpu()
                        for s in range(0, x.shape[0], 128)])
    return float((logits.argmax(-1) == y).float().mean()), float(F.cross_entropy(logits, y))


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
