"""Image sources for the cross-modal axis, all offline: labelled images as ``[-1, 1]`` tensors.

``digits`` is scikit-learn's ``load_digits`` (1,797 real 8x8 handwritten digits, shipped inside
the package, so nothing is downloaded); ``folder:<path>`` reads ImageFolder-style class
subfolders of images; ``hf:<name or save_to_disk path>`` reads a ``datasets`` dataset with
``image`` and ``label`` columns (CIFAR-10, ImageNet subsets for users who have them). Every source
is resized bilinearly to ``image_size`` and split deterministically, so the same source and seed
give the same train/val images on any machine. The axis' batches (:func:`image_batches`), its
adaptation shift and the labels the DiT is asked to draw are here too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from effllm_helpers.data.packing import dict_batches
from effllm_helpers.paths import cache_dir

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


@dataclass
class ImageData:
    """Train/val images ``[N, C, H, W]`` in ``[-1, 1]`` with integer labels and class names."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    classes: list[str]
    source: str
    fingerprint: str

    @property
    def channels(self) -> int:
        return int(self.train_x.shape[1])

    @property
    def n_classes(self) -> int:
        return len(self.classes)


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """``[N, C, h, w]`` in [0, 1] -> ``[N, C, size, size]`` in [-1, 1] (bilinear)."""
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x.clamp(0, 1) * 2 - 1).contiguous()


def _digits() -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The digits, kept in the effllm cache after the first load: a machine that has the cache
    (e.g. a GPU host given ``$EFFLLM_CACHE``) needs no scikit-learn and SciPy to read them."""
    path = cache_dir("images") / "sklearn-digits.npz"
    if path.exists():
        with np.load(path) as d:
            images, target, names = d["images"], d["target"], d["target_names"]
    else:
        from sklearn.datasets import load_digits

        d = load_digits()
        images, target, names = d.images, d.target, d.target_names
        tmp = path.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, images=images, target=target, target_names=names)
        tmp.replace(path)
    x = torch.tensor(images, dtype=torch.float32).unsqueeze(1) / 16.0  # pixel values 0..16
    return x, torch.tensor(target, dtype=torch.long), [str(c) for c in names]


def _pil_to_tensor(img, channels: int) -> torch.Tensor:
    img = img.convert("L" if channels == 1 else "RGB")
    arr = np.asarray(img, dtype=np.float32) / 255.0
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return torch.from_numpy(arr.copy())


def _stack(images: list, size: int) -> torch.Tensor:
    """PIL images -> one tensor; grey when every image is grey, else RGB; each resized."""
    channels = 1 if all(im.mode in ("L", "1", "I", "I;16") for im in images) else 3
    out = [F.interpolate(_pil_to_tensor(im, channels)[None], size=(size, size), mode="bilinear",
                         align_corners=False)[0] for im in images]
    return torch.stack(out)


def _folder(path: str, size: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    from PIL import Image

    root = Path(path).expanduser()
    classes = sorted(d.name for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
    if not classes:
        raise ValueError(f"folder:{path}: expected class subfolders of images, found none")
    images, labels = [], []
    for i, c in enumerate(classes):
        for f in sorted((root / c).iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                with Image.open(f) as im:
                    images.append(im.copy())
                labels.append(i)
    if not images:
        raise ValueError(f"folder:{path}: no images ({', '.join(IMAGE_SUFFIXES)}) in "
                         f"{len(classes)} class folders")
    return _stack(images, size), torch.tensor(labels), classes


def _hf(name: str, size: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    import datasets

    if Path(name).expanduser().exists():
        ds = datasets.load_from_disk(str(Path(name).expanduser()))
    else:
        ds = datasets.load_dataset(name)
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    img_col = next((c for c in ("image", "img") if c in ds.column_names), None)
    lab_col = next((c for c in ("label", "labels", "fine_label") if c in ds.column_names), None)
    if img_col is None or lab_col is None:
        raise ValueError(f"hf:{name}: needs an image and a label column; has {ds.column_names}")
    feat = ds.features.get(lab_col)
    labels = torch.tensor(ds[lab_col], dtype=torch.long)
    classes = list(getattr(feat, "names", None) or [str(i) for i in range(int(labels.max()) + 1)])
    return _stack(list(ds[img_col]), size), labels, classes


def load_images(source: str, image_size: int, val_fraction: float = 0.1,
                seed: int = 0) -> ImageData:
    """The labelled images of ``source`` resized to ``image_size``, split train/val by a seeded
    permutation (the split depends only on the source and ``seed``)."""
    kind, _, arg = source.partition(":")
    if source == "digits":
        x, y, classes = _digits()
        x = _resize(x, image_size)
    elif kind == "folder" and arg:
        x, y, classes = _folder(arg, image_size)
        x = _resize(x, image_size)
    elif kind == "hf" and arg:
        x, y, classes = _hf(arg, image_size)
        x = _resize(x, image_size)
    else:
        raise ValueError(f"unknown image source {source!r}; allowed: digits, folder:<path>, "
                         "hf:<name or save_to_disk path>")
    n = x.shape[0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(round(n * val_fraction)))
    if n - n_val < 1:
        raise ValueError(f"{source}: {n} images are too few to split")
    val, tr = order[:n_val], order[n_val:]
    digest = hashlib.sha256(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest()[:16]
    return ImageData(train_x=x[tr], train_y=y[tr], val_x=x[val], val_y=y[val], classes=classes,
                     source=source, fingerprint=f"{source}@{image_size}px:{digest}")


def image_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, n_tokens: int,
                  seed: int = 0) -> Callable[[int, int, int], dict[str, torch.Tensor]]:
    """Shuffled image batches for ``train.train``: ``pixel_values``, ``class_labels``, and a
    placeholder ``labels``/``attention_mask``/``input_ids`` so the loop counts ``n_tokens`` per
    image (it counts targets from ``labels``: ``n_tokens + 1`` columns)."""
    inner = dict_batches({"pixel_values": x, "class_labels": y}, batch_size, seed)

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


def balanced_labels(n: int, n_classes: int) -> torch.Tensor:
    """``n`` class labels, every class in turn (the labels the DiT is asked to draw)."""
    return torch.arange(n) % n_classes
