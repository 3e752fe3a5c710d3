"""Who runs what: the per-run lock (an ``flock`` on ``<run_dir>/.lock``, held by the sweep that
executes the run), the presence files by which the live sweeps on this machine count each other's
runs, and the thread pools a run gets among the runs sharing the machine."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..runenv import THREADS_ENV

RUN_LOCK = ".lock"  # flock'ed by the sweep that executes the run, for the run's whole life
ELSEWHERE = "running elsewhere: another sweep holds this run's lock"


@contextmanager
def run_lock(rdir: Path) -> Iterator[bool]:
    """Try to own a run folder: yields True while this process holds ``<rdir>/.lock``.

    Two sweeps on one output folder would otherwise both execute every run, and the second
    runner would delete the first one's finished record. The lock is an ``flock``, so the kernel
    drops it when its holder dies (a SIGKILLed sweep never leaves a stale lock behind).
    """
    rdir.mkdir(parents=True, exist_ok=True)
    fd = os.open(rdir / RUN_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # releases the flock


def lock_held_elsewhere(rdir: Path) -> bool:
    """Whether another open file (the sweep's) holds ``<rdir>/.lock``: a runner asks before
    sealing, so a run whose sweep was killed is never sealed ok by a runner that outlived it."""
    try:
        fd = os.open(rdir / RUN_LOCK, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also releases the lock we may just have taken
    return False


# ---------------------------------------------------------------- sweeps on this machine
RUNTIME_ENV = "EFFLLM_RUNTIME_DIR"  # where sweeps say they are running (default: a tmp folder)
PRESENCE_SUFFIX = ".sweep"


def runtime_dir() -> Path:
    """The folder of this user's live sweeps' presence files (one per sweep, flock'ed)."""
    import tempfile

    given = os.environ.get(RUNTIME_ENV)
    return Path(given) if given else Path(tempfile.gettempdir()) / f"effllm-{os.getuid()}"


@contextmanager
def sweep_presence(slots: int) -> Iterator[Path | None]:
    """Say, for as long as the block runs, that this sweep runs ``slots`` runs at once here.

    The file is flock'ed (the kernel drops it with a killed sweep, so a stale file is known as
    such) and appears under its final name only once locked and written. None when the folder
    cannot be used: the count is then this sweep's own."""
    import uuid

    folder = runtime_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = folder / f".{os.getpid()}-{uuid.uuid4().hex}.tmp"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError:
        yield None
        return
    path = tmp.with_name(tmp.name[1:-4] + PRESENCE_SUFFIX)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, str(int(slots)).encode())
        os.replace(tmp, path)
        yield path
    finally:
        for f in (tmp, path):
            f.unlink(missing_ok=True)
        os.close(fd)


def other_sweeps_runs(own: Path | None) -> int:
    """Runs the other live sweeps of this user run at once on this machine (their presence
    files); a file nobody holds is a killed sweep's and is removed."""
    total = 0
    for path in runtime_dir().glob(f"*{PRESENCE_SUFFIX}"):
        if path == own:
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:  # held: a live sweep
                raw = os.read(fd, 32).decode(errors="replace").strip()
                total += int(raw) if raw.isdigit() else 1
            else:
                path.unlink(missing_ok=True)
        finally:
            os.close(fd)
    return total


# ---------------------------------------------------------------- threads per run
CONCURRENT_ENV = "EFFLLM_CONCURRENT_RUNS"  # how many runs the sweep executes at once


def threads_per_run(workers: int, cores: int) -> int:
    """Torch threads for each of ``workers`` concurrent runs on ``cores`` CPUs (at least 1)."""
    return max(1, int(cores) // max(1, int(workers)))


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def run_thread_env(concurrent: int | None, cores: int | None = None,
                   env: dict[str, str] | None = None) -> dict[str, str]:
    """Thread-pool environment (OpenMP, MKL, ours) for one of ``concurrent`` runs sharing this
    machine's cores; empty when the number of runs sharing the machine is unknown.

    A count the user exported as ``EFFLLM_THREADS`` wins: a sweep only knows its own workers,
    so two sweeps on one host (one per GPU) would each take every core. On a 32-core H200 host
    that doubled the loop's host time of launch-bound runs."""
    given = (os.environ if env is None else env).get(THREADS_ENV, "")
    if given.isdigit() and int(given) >= 1:
        n = given
    elif not concurrent:
        return {}
    else:
        n = str(threads_per_run(concurrent, usable_cpus() if cores is None else cores))
    return {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, THREADS_ENV: n}
