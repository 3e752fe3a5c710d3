"""Where things live on disk: the repo, the cache of built artefacts, the outputs tree."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def cache_dir(*parts: str) -> Path:
    """``$EFFLLM_CACHE`` or ``<repo>/.cache``: tokenizers and embedded models built on first use."""
    root = Path(os.environ.get("EFFLLM_CACHE", REPO_ROOT / ".cache"))
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def outputs_dir(*parts: str) -> Path:
    """``$EFFLLM_OUTPUTS`` or ``<repo>/outputs``."""
    root = Path(os.environ.get("EFFLLM_OUTPUTS", REPO_ROOT / "outputs"))
    return root.joinpath(*parts)
