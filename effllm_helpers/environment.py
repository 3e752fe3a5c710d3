"""The locked environment: which pinned package set a run was made under, and how to refresh it.

Why: a study of "what does technique X cost on my machine" must let a reader rebuild the software
that made a record; an unpinned ``pip install`` takes whatever the index has that day, and a new
transformers release can change a measured number (or break a metric) silently. So:

* ``requirements/lock-cpu.txt`` pins every package of the CPU environment (``make setup``
  installs through it, ``environment.yml`` names it); ``requirements/lock-cuda.txt`` is the same
  set with PyPI's CUDA build of the same torch and the ``gpu`` extra, for a CUDA host.
* every record's provenance says which lock it was made under (its sha256) and whether the
  installed packages match it (``environment_state``); ``effllm compare`` flags two result sets
  made under different locks.
* ``make lock`` regenerates both files on purpose (``python -m effllm_helpers.environment``);
  ``make test-latest`` runs the suite against the newest releases to show drift before it bites.

Stdlib plus ``packaging`` only: the lock is written from a bare venv.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import hashlib
import importlib.metadata as md
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from .paths import REPO_ROOT

LOCK_DIR = REPO_ROOT / "requirements"
CPU_LOCK = LOCK_DIR / "lock-cpu.txt"
CUDA_LOCK = LOCK_DIR / "lock-cuda.txt"
LOCK_ENV = "EFFLLM_LOCK"  # a lock file to compare against instead of the host's default
OWN_PACKAGE = "effllm"
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)\s*$")


def canonical(name: str) -> str:
    """PEP 503 name: ``Jinja2`` and ``jinja2``, ``typing_extensions`` and ``typing-extensions``
    are one package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def public_version(version: str) -> str:
    """The version without its local label: the CPU wheel ``2.13.0+cpu`` is the locked 2.13.0."""
    return version.split("+", 1)[0]


def read_lock(path: str | Path) -> dict[str, str]:
    """``{canonical name: version}`` of a lock file (``name==version`` lines, ``#`` comments).

    Raises ValueError naming the line for anything else, and for a package pinned twice."""
    pins: dict[str, str] = {}
    for n, raw in enumerate(Path(path).read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = _PIN.match(line)
        if not m:
            raise ValueError(f"{path}:{n}: {raw.strip()!r} is not a 'name==version' pin")
        name = canonical(m.group(1))
        if name in pins:
            raise ValueError(f"{path}:{n}: {m.group(1)} is pinned twice")
        pins[name] = m.group(2)
    return pins


def lock_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def installed_versions() -> dict[str, str]:
    """``{canonical name: version}`` of every distribution this interpreter sees."""
    out: dict[str, str] = {}
    for dist in md.distributions():
        name = dist.metadata["Name"]
        if name:
            out.setdefault(canonical(name), dist.version)
    return out


def lock_differences(pins: dict[str, str], installed: dict[str, str]) -> dict[str, dict]:
    """Locked packages whose installed version differs (``installed: None`` = missing)."""
    diff = {}
    for name, locked in sorted(pins.items()):
        have = installed.get(name)
        if have is None or public_version(have) != public_version(locked):
            diff[name] = {"locked": locked, "installed": have}
    return diff


def host_lock() -> Path:
    """The lock this host should match: ``$EFFLLM_LOCK``, else the CUDA lock when the installed
    torch is a CUDA build, else the CPU lock."""
    if os.environ.get(LOCK_ENV):
        return Path(os.environ[LOCK_ENV])
    try:
        import torch

        cuda = bool(torch.version.cuda)
    except ImportError:
        cuda = False
    return CUDA_LOCK if cuda else CPU_LOCK


@functools.cache
def environment_state() -> dict[str, Any]:
    """What a record's provenance says about the package set it ran under.

    ``status``: ``locked`` (every pinned package installed at its pin), ``unlocked`` (``differs``
    lists each package whose installed version is not the pin, at most 40) or ``no lock`` (the
    lock file is not beside this checkout, e.g. a wheel install).
    """
    path = host_lock()
    try:
        rel = str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        rel = str(path)
    if not path.is_file():
        return {"lock": rel, "lock_sha256": None, "status": "no lock", "differs": {}}
    diff = lock_differences(read_lock(path), installed_versions())
    return {"lock": rel, "lock_sha256": lock_sha256(path),
            "status": "unlocked" if diff else "locked", "n_differ": len(diff),
            "differs": dict(list(diff.items())[:40])}


def lock_label(env: dict[str, Any] | None) -> str | None:
    """Short label of a record's environment for tables: ``<sha12>`` when locked,
    ``unlocked:<sha12>`` when packages differ from that lock, None when unknown."""
    if not env or not env.get("lock_sha256"):
        return None
    sha = str(env["lock_sha256"])[:12]
    return sha if env.get("status") == "locked" else f"unlocked:{sha}"


# ------------------------------------------------------------------ writing the locks (make lock)
def _header(kind: str, install: str) -> str:
    today = _dt.date.today().isoformat()
    py = ".".join(platform.python_version_tuple()[:2])
    return (f"# effllm {kind} lock: every package pinned. Written by `make lock` on {today} "
            f"with Python {py} ({platform.machine()}).\n"
            f"# Install through it: {install}\n"
            "# Refresh on purpose only (`make lock`, then `make test`): see README 'Set-up'.\n")


def _write(path: Path, header: str, pins: dict[str, str]) -> None:
    body = "".join(f"{name}=={ver}\n" for name, ver in sorted(pins.items()))
    tmp = path.with_suffix(".tmp")
    tmp.write_text(header + body)
    tmp.replace(path)


def freeze(out: Path = CPU_LOCK) -> dict[str, str]:
    """Pin what this interpreter has installed (run in a fresh venv after an unconstrained
    ``pip install -e .[dev]``); the project itself and local labels (``+cpu``) are left out."""
    text = subprocess.run([sys.executable, "-m", "pip", "freeze", "--all", "--exclude-editable"],
                          check=True, capture_output=True, text=True).stdout
    pins = {}
    for line in text.splitlines():
        m = _PIN.match(line.strip())
        if m and canonical(m.group(1)) != OWN_PACKAGE:
            pins[canonical(m.group(1))] = public_version(m.group(2))
    _write(out, _header("CPU", "pip install -c requirements/lock-cpu.txt -e '.[dev]'"), pins)
    return pins


def cuda_lock(out: Path = CUDA_LOCK, cpu_lock: Path = CPU_LOCK) -> dict[str, str]:
    """The CPU lock plus what a CUDA host adds: PyPI's build of the same torch (its nvidia-*
    and triton wheels) and the ``gpu`` extra, resolved by pip against the CPU pins without
    installing anything. ``--isolated`` keeps this machine's local wheel folders out of it."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "--isolated", "--dry-run", "--quiet",
               "--ignore-installed", "--report", str(report), "-c", str(cpu_lock),
               f"{REPO_ROOT}[dev,gpu]"]
        if os.environ.get("PIP_CERT"):
            cmd[4:4] = ["--cert", os.environ["PIP_CERT"]]
        subprocess.run(cmd, check=True)
        items = json.loads(report.read_text())["install"]
    pins = read_lock(cpu_lock)
    for item in items:
        name = canonical(item["metadata"]["name"])
        if name != OWN_PACKAGE:
            pins[name] = public_version(item["metadata"]["version"])
    install = "pip install -c requirements/lock-cuda.txt -e '.[dev,gpu]' (on a CUDA host)"
    _write(out, _header("CUDA", install), pins)
    return pins


def _main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m effllm_helpers.environment",
                                 description="Write or check the pinned package sets.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("freeze", help="pin this venv's packages into the CPU lock")
    f.add_argument("out", nargs="?", type=Path, default=CPU_LOCK)
    c = sub.add_parser("cuda", help="resolve the CUDA lock from the CPU lock (no install)")
    c.add_argument("out", nargs="?", type=Path, default=CUDA_LOCK)
    d = sub.add_parser("drift", help="list the installed packages that differ from a lock")
    d.add_argument("lock", nargs="?", type=Path, default=CPU_LOCK)
    args = ap.parse_args(argv)
    if args.cmd == "freeze":
        print(f"{args.out}: {len(freeze(args.out))} packages pinned")
    elif args.cmd == "cuda":
        print(f"{args.out}: {len(cuda_lock(args.out))} packages pinned")
    else:
        diff = lock_differences(read_lock(args.lock), installed_versions())
        print(f"{len(diff)} package(s) differ from {args.lock}"
              + (":" if diff else " (the newest releases are the locked ones)"))
        for name, v in diff.items():
            print(f"  {name}: locked {v['locked']}, installed {v['installed']}")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
