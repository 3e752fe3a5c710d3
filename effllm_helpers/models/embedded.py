"""The embedded default models: tiny models trained by axes 1–2's own code, cached.

There is no model hub at run time, so "the default model" of fine-tuning and inference is one we
train ourselves on first use: a GQA + RoPE Llama pretrained on the ``stdlib`` corpus
(stage ``base``), and that model fully fine-tuned on the built-in ``arithmetic`` suite (stage
``sft``), which gives inference a model that can score on a task. Both are ordinary
``save_pretrained`` folders (with their tokenizer) under ``cache_dir("models")``, keyed by the
params that made them, and built under a file lock so parallel sweep workers build once.

This module only names the models and their recipes; the training itself runs in a child process
(``python -m effllm_helpers.axes.build_embedded``), so models never import the study axes.

Profiles name the preset whose ``small`` architecture size is used: ``ci`` (seconds to build, for
tests), ``tiny`` (the default; about a minute on a 2-core CPU), ``gpu`` (about 100M params).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ..paths import build_once, cache_dir
from .sources import has_config

STAGES = ("base", "sft")
BUILDER = "effllm_helpers.axes.build_embedded"  # the child's module: it trains with the axes' code
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


def resolve(name: str, profile: str = "tiny", progress: bool = False) -> str:
    """A loadable model path for ``name``: real ids/paths pass through, embedded ones are built,
    ``gguf:<file>`` is dequantised once and ``random:<shape>`` built once into cached folders
    (see :mod:`.sources`)."""
    from . import sources

    if sources.is_gguf(name):
        return str(sources.gguf_folder(name))
    if sources.is_random(name):
        return str(sources.random_folder(name))
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
        _build_once(base, "base", profile, None, progress)
        return base
    base_path = embedded_path(profile, "base", progress)
    # keyed by the whole fine-tuning recipe, so a changed preset never reuses a stale model
    recipe = _sft_params(Path("<base>"), profile).model_dump(mode="json")
    sft = cache_dir("models") / f"embedded-{profile}-sft-{base_key}-{_key(recipe)}"
    _build_once(sft, "sft", profile, base_path, progress)
    return sft


def _build_once(path: Path, stage: str, profile: str, base: Path | None, progress: bool) -> None:
    build_once(path, lambda tmp: _build_in_child(stage, profile, tmp, base, progress),
               ready=has_config)


def _build_in_child(stage: str, profile: str, out: Path, base: Path | None,
                    progress: bool) -> None:
    """Train a stage in a child process, streaming its output.

    Why a child: the run that asked for the model measures its own process. Training in it
    would leave the training kernels' CUDA context and the allocator's residue in that run's
    NVML/RSS memory (about 1 GB on an H100), which ``empty_cache`` cannot give back.
    """
    import collections
    import os
    import sys

    cmd = [sys.executable, "-m", BUILDER, stage, profile, str(out)]
    if base is not None:
        cmd += ["--base", str(base)]
    if progress:
        cmd.append("--progress")
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])  # importable even from notebooks/ as cwd
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    tail: collections.deque[str] = collections.deque(maxlen=40)
    proc = spawn_child(cmd, env)
    assert proc.stdout is not None
    for chunk in iter(lambda: proc.stdout.read1(4096), b""):
        text = chunk.decode(errors="replace")
        tail.append(text)
        if progress:
            sys.stderr.write(text)
            sys.stderr.flush()
    if proc.wait() != 0:
        raise RuntimeError(f"building the embedded {profile!r} {stage!r} model failed (exit "
                           f"{proc.returncode}); its output ends:\n{''.join(tail)[-3000:]}")


def spawn_child(cmd: list[str], env: dict[str, str] | None = None):  # -> subprocess.Popen
    """Start ``cmd`` with its output piped to us, as a child that dies with this process.

    A build takes minutes; if the run that asked for it is killed (a SIGKILLed sweep, a timeout),
    the child would otherwise train on for tens of seconds, holding the CPU/GPU the next run
    measures. Linux's parent-death signal kills it the moment we go.
    """
    import os
    import subprocess

    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            preexec_fn=_die_with(os.getpid()))


def _die_with(parent: int):
    """A pre-exec hook: SIGKILL this child when ``parent`` dies (also if it died already)."""
    import ctypes
    import os
    import signal
    import sys

    try:
        libc = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None
    except OSError:
        libc = None

    def hook() -> None:
        if libc is not None:
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent went before the signal was armed
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


def _sft_params(base: Path, profile: str) -> Any:
    from ..config import load_preset, notebook_params

    overlay = load_preset(profile, "finetuning")
    overlay = {**overlay, "base_model": str(base), "method": "full", "task": "arithmetic",
               "embedded_profile": profile,
               "train": {**overlay.get("train", {}), "steps": SFT_STEPS[profile]}}
    return notebook_params("finetuning", None, overlay)
