"""Where things live on disk: the repo, the cache of built artefacts, the outputs tree, and the
one way to build a cached artefact once when parallel sweep workers all ask for it."""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created) for the ``with`` block: processes that build
    the same artefact queue here instead of each building it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build_once(out: Path, build: Callable[[Path], None],
               ready: Callable[[Path], bool] = Path.exists) -> bool:
    """Make ``out`` exist, building it at most once across processes: under a lock beside it,
    ``build`` writes a temporary file or folder that is then renamed onto ``out``, so no reader
    ever sees half of it. Returns True when this call built it, False when it was there (or
    another process built it while this one waited)."""
    if ready(out):
        return False
    with file_lock(out.with_suffix(".lock")):
        if ready(out):  # another worker built it meanwhile
            return False
        tmp = out.with_name(out.name + ".tmp")
        if tmp.is_dir():
            shutil.rmtree(tmp)
        else:
            tmp.unlink(missing_ok=True)
        build(tmp)
        os.replace(tmp, out)
    return True
