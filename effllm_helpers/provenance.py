"""Provenance of a run: code version, packages, interpreter, device and host.

A number in a record is only worth what we know about where it came from, so every record carries
this block (DESIGN.md, "Runs, sweeps and records").
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

from .paths import REPO_ROOT

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


@functools.cache
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_facts() -> dict[str, Any]:
    """Accelerator facts: name, driver, power limit, memory (CPU when there is no GPU)."""
    facts: dict[str, Any] = {"cuda": None, "device_name": f"cpu: {cpu_model()}",
                             "gpu_count": 0, "driver": None, "power_limit_w": None}
    try:
        import torch
    except ImportError:
        return facts
    facts["cuda"] = torch.version.cuda
    if not torch.cuda.is_available():
        return facts
    facts["gpu_count"] = torch.cuda.device_count()
    facts["device_name"] = torch.cuda.get_device_name(0)
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            facts["driver"] = pynvml.nvmlSystemGetDriverVersion()
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            index = int(visible.split(",")[0]) if visible and visible.split(",")[0].isdigit() else 0
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            facts["power_limit_w"] = pynvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000.0
        finally:
            pynvml.nvmlShutdown()
    except Exception as exc:  # NVML missing or refused: the facts say so
        facts["nvml_error"] = f"{type(exc).__name__}: {exc}"
    return facts


def provenance() -> dict[str, Any]:
    """Everything a reviewer needs to know where a record came from."""
    return {
        **git_state(),
        "packages": package_versions(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "host": socket.gethostname(),
        **device_facts(),
    }
