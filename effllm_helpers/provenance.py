"""Provenance of a run: code version, packages, interpreter, device and host.

A number in a record is only worth what we know about where it came from, so every record carries
this block (written by ``results.new_record``).
"""

from __future__ import annotations

import functools
import importlib.metadata as md
import os
import platform
import socket
import subprocess
import sys
from typing import Any

from .environment import environment_state
from .paths import REPO_ROOT
from .warmkernel import KERNEL_ENV

PACKAGES = ("effllm", "torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets",
            "tokenizers", "papermill", "pydantic", "nvidia-ml-py", "numpy", "pandas")


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


@functools.cache
def git_state() -> dict[str, Any]:
    """Commit sha and whether tracked code differs from it (outputs/ does not count)."""
    sha = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!outputs")
    return {"git_sha": sha, "git_dirty": None if status is None else bool(status)}


@functools.cache
def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def provenance(preset: str | None = None) -> dict[str, Any]:
    """Everything a reviewer needs to know where a record came from: code, the preset that
    resolved its params, the locked package set (``environment``), interpreter, device, host."""
    return {
        **git_state(),
        "preset": preset,
        # how the kernel started: forked from a sweep's warm zygote, or a fresh interpreter
        "kernel_start": os.environ.get(KERNEL_ENV, "cold"),
        "environment": environment_state(),
        "packages": package_versions(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "host": socket.gethostname(),
        **_device_facts(),
    }


def _device_facts() -> dict[str, Any]:
    """The measure package's device facts for the device a run uses (GPU 0 of those visible)."""
    import torch

    from .measure.device import device_facts

    return device_facts("cuda" if torch.cuda.is_available() else "cpu")
