"""The embedded default models: tiny models trained here by axes 1–2's own code, cached.

There is no model hub at run time, so "the default model" of fine-tuning and inference is one we
train ourselves on first use: a GQA + RoPE Llama pretrained on the ``stdlib`` corpus
(stage ``base``), and that model fully fine-tuned on the built-in ``arithmetic`` suite (stage
``sft``), which gives inference a model that can score on a task. Both are ordinary
``save_pretrained`` folders (with their tokenizer) under ``cache_dir("models")``, keyed by the
params that made them, and built under a file lock so parallel sweep workers build once.

Profiles name the preset whose ``small`` architecture size is used: ``ci`` (seconds to build, for
tests), ``tiny`` (the default; about a minute on a 2-core CPU), ``gpu`` (about 100M params).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..paths import cache_dir

STAGES = ("base", "sft")
# extra pretraining steps over the preset's budget: the base model should have learned something
BASE_STEPS = {"tiny": 300, "ci": 30, "gpu": 800}
SFT_STEPS = {"tiny": 120, "ci": 10, "gpu": 200}


def parse(name: str, profile: str = "tiny") -> tuple[str, str] | None:
    """``embedded[:profile][@stage]`` -> (profile, stage); None for a real model id or path.

    Without ``:profile`` the caller's ``profile`` (the params' ``embedded_profile``, which the
    presets set) applies.
    """
    if name != "embedded" and not name.startswith(("embedded:", "embedded@")):
        return None
    rest = name[len("embedded"):]
    stage = "base"
    if "@" in rest:
        rest, stage = rest.split("@", 1)
    profile = rest[1:] if rest.startswith(":") else profile
    if profile not in BASE_STEPS:
        raise ValueError(f"unknown embedded profile {profile!r}; allowed: {', '.join(BASE_STEPS)}")
    if stage not in STAGES:
        raise ValueError(f"unknown embedded stage {stage!r}; allowed: {', '.join(STAGES)}")
    return profile, stage


def _arch_params(profile: str) -> Any:
    from ..config import load_preset, notebook_params

    overlay = load_preset(profile, "architecture")
    overlay = {**overlay, "train": {**overlay.get("train", {}), "steps": BASE_STEPS[profile]},
               "model": {**overlay.get("model", {}), "attention": "gqa", "positional": "rope",
                         "ffn": "dense", "family": "transformer", "size": "small"},
               "probe_train_fraction": 0.0, "save_model": True}
    return notebook_params("architecture", None, overlay)


def _key(obj: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


@contextmanager
def _lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def resolve(name: str, profile: str = "tiny", progress: bool = False) -> str:
    """A loadable model path for ``name``: real ids/paths pass through, embedded ones are built."""
    parsed = parse(name, profile)
    if parsed is None:
        return name
    profile, stage = parsed
    return str(embedded_path(profile, stage, progress=progress))


def embedded_path(profile: str = "tiny", stage: str = "base", progress: bool = False) -> Path:
    """Folder of the embedded model, training it (and its parent stage) when missing."""
    arch = _arch_params(profile)
    base_key = _key(arch.model_dump(mode="json"))
    base = cache_dir("models") / f"embedded-{profile}-base-{base_key}"
    if stage == "base":
        _build_once(base, lambda tmp: _pretrain(arch, tmp, progress))
        return base
    base_path = embedded_path(profile, "base", progress)
    sft = cache_dir("models") / f"embedded-{profile}-sft-{base_key}-{SFT_STEPS[profile]}"
    _build_once(sft, lambda tmp: _finetune(base_path, profile, tmp, progress))
    return sft


def _build_once(path: Path, build) -> None:
    if (path / "config.json").is_file():
        return
    with _lock(path.with_suffix(".lock")):
        if (path / "config.json").is_file():  # another worker built it meanwhile
            return
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        build(tmp)
        tmp.rename(path)
        _release_memory()


def _release_memory() -> None:
    """Give the build's cached allocations back, so the run that triggered the build does not
    report them in its own memory metrics (NVML sees the allocator's cache as in use)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _pretrain(arch: Any, out: Path, progress: bool) -> None:
    from ..axes import architecture

    architecture.run(arch, seed=0, save_dir=out, progress=progress)


def _finetune(base: Path, profile: str, out: Path, progress: bool) -> None:
    from ..axes import finetuning
    from ..config import load_preset, notebook_params

    overlay = load_preset(profile, "finetuning")
    overlay = {**overlay, "base_model": str(base), "method": "full", "task": "arithmetic",
               "embedded_profile": profile,
               "train": {**overlay.get("train", {}), "steps": SFT_STEPS[profile]}}
    p = notebook_params("finetuning", None, overlay)
    finetuning.run(p, seed=0, save_dir=out, progress=progress, evaluate_tasks=False)
