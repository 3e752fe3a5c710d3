"""Batch execution of a study: validate, expand, run each point through papermill, resume.

Layout of one run: ``<output_dir>/runs/<study>/<run_id>/{run.json, run.ipynb, record.json}``.

How a run is executed, and why:

* the sweep (parent) starts one *runner* process per run, forked from a forkserver that has
  papermill imported, in its own session, so a per-run timeout can kill the runner, papermill and
  the kernel together;
* the runner asks for its own death when its parent goes (``PR_SET_PDEATHSIG``; the forkserver
  exits with the sweep), and ipykernel exits when its parent goes, so a killed sweep leaves no
  orphan computing in the background;
* the notebook writes an ``ok`` record as its very last step, atomically; the runner writes a
  ``failed`` record (reason + traceback tail) if the notebook raised or wrote nothing; the parent
  writes one on timeout. A record that says ``ok`` therefore always belongs to a finished run, and
  a killed sweep loses only the runs in flight, which the next invocation redoes;
* papermill saves ``run.ipynb`` only after that last cell, so in a sweep the record first says
  ``notebook_saved: false`` and the runner rewrites it true once papermill has returned and the
  saved notebook shows no cell still running; a record left false is redone, not cached.

Workers: ``--workers N`` runs N runners at once, each pinned to one GPU (``CUDA_VISIBLE_DEVICES``)
when there are GPUs, or to a group of ``launch.processes`` GPUs when the runs launch several;
``--dask ADDRESS|local`` submits the same runner calls to a dask.distributed cluster (several
machines, e.g. dask-jobqueue on SLURM; output_dir must be on a shared filesystem).
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import json
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import results, studies, warmkernel
from .axes.spec import SPECS
from .paths import outputs_dir
from .run import NOTEBOOK_SAVED, PRESET_ENV, SWEEP_RUN_ENV, classify_failure, failure_record
from .runenv import BATCH_ENV, THREADS_ENV

RUN_SPEC = "run.json"
RUN_NOTEBOOK = "run.ipynb"
RUN_LOCK = ".lock"  # flock'ed by the sweep that executes the run, for the run's whole life
ELSEWHERE = "running elsewhere: another sweep holds this run's lock"


@dataclass
class Outcome:
    run: studies.Run
    status: str  # ok | failed | skipped | cached | cached-failed | elsewhere
    seconds: float = 0.0
    reason: str | None = None
    busy: str | None = None  # the record's busy-machine warning (measured under contention)


@dataclass
class SweepResult:
    study: str
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status in ("failed", "cached-failed")]

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


def run_dir_for(output_dir: Path, run: studies.Run) -> Path:
    return output_dir / "runs" / run.study / run.run_id


# ---------------------------------------------------------------- planning
def plan(runs: list[studies.Run], output_dir: Path,
         retry_failed: bool = False) -> tuple[list[studies.Run], list[Outcome]]:
    """Split runs into those to execute and those whose record already settles them."""
    todo: list[studies.Run] = []
    settled: list[Outcome] = []
    for run in runs:
        _clean_stale_temps(run_dir_for(output_dir, run))
        rec = results.read_record(run_dir_for(output_dir, run))
        if finished_ok(rec, run.run_id):
            settled.append(Outcome(run, "cached", busy=record_busy(rec)))
        elif rec and rec.get("status") == "skipped" and not retry_failed:
            settled.append(Outcome(run, "skipped", reason=(rec.get("error") or {}).get("reason")))
        elif rec and rec.get("status") == "failed" and not retry_failed:
            settled.append(Outcome(run, "cached-failed",
                                   reason=(rec.get("error") or {}).get("reason")))
        else:
            todo.append(run)
    return todo, settled


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


def _clean_stale_temps(rdir: Path) -> None:
    """Remove half-written ``.record.json.*.tmp`` left by a killed writer, if no one runs here."""
    if not rdir.is_dir():
        return
    temps = list(rdir.glob(f".{results.RECORD_NAME}.*.tmp"))
    if not temps:
        return
    with run_lock(rdir) as mine:
        if mine:
            for tmp in temps:
                tmp.unlink(missing_ok=True)


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


def finished_ok(rec: dict[str, Any] | None, run_id: str) -> bool:
    """A finished ok run: its record says ok and does not say its notebook went unsaved (a runner
    killed between the notebook's last cell and papermill's save leaves ``notebook_saved:
    false``; records from before the flag have none and stay finished)."""
    return bool(rec and rec.get("run_id") == run_id and rec.get("status") == "ok"
                and rec.get(NOTEBOOK_SAVED) is not False)


def _has_ok_record(rdir: Path, run_id: str) -> bool:
    return finished_ok(results.read_record(rdir), run_id)


def notebook_state(path: Path) -> str | None:
    """None when ``path`` is a saved, finished papermill notebook, else why not (absent,
    unreadable, or a cell still marked running/pending as an unsaved notebook shows)."""
    try:
        nb = json.loads(path.read_text())
        cells = nb["cells"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"notebook unreadable: {type(exc).__name__}"
    for i, cell in enumerate(cells):
        status = ((cell.get("metadata") or {}).get("papermill") or {}).get("status")
        if status in ("running", "pending"):
            return f"cell {i} still {status}"
    return None


def seal_record(rdir: Path, run_id: str,
                scoring: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """After papermill has returned (so it has saved ``run.ipynb``), rewrite the run's record
    atomically with ``notebook_saved``: true only if the saved notebook shows no cell still
    running. The notebook writes its record in its last cell, before papermill saves, so only
    the runner can say the two agree. ``scoring`` (``studies.scoring_facts``) is the study's
    quality metric and weights, which the notebook does not know: the runner adds them here."""
    rec = results.read_record(rdir)
    if rec is None or rec.get("run_id") != run_id:
        return rec
    why = notebook_state(rdir / RUN_NOTEBOOK)
    rec = {**rec, NOTEBOOK_SAVED: why is None}
    if scoring:
        rec[results.SCORING] = scoring
    if why is not None:
        rec["notebook_problem"] = why
    results.write_record(rdir, rec)
    return rec


# ---------------------------------------------------------------- one run (parent side)
try:  # loaded once here, not between fork and exec
    _LIBC: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)
except OSError:  # not Linux/glibc: no parent-death signal, the kernel's own poller remains
    _LIBC = None

_FORKSERVER = None
_LIVE: set[Any] = set()  # runner processes in flight, killed together on an interrupt
_LIVE_LOCK = threading.Lock()
_INTERRUPTED = threading.Event()


def _runner_context():
    """A forkserver that has papermill imported already: a run then starts in milliseconds
    instead of paying papermill's ~1.5 s import in a fresh interpreter (benchmarks/
    runner_overhead.py). The server is single-threaded, so forking from it is safe."""
    global _FORKSERVER
    if _FORKSERVER is None:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["papermill", "effllm_helpers.sweep"])
        _FORKSERVER = ctx
    return _FORKSERVER


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


def record_busy(rec: dict[str, Any] | None) -> str | None:
    """The busy-machine warning a record's metrics carry (``metrics.load_1m.busy``), or None."""
    load = ((rec or {}).get("metrics") or {}).get("load_1m")
    if isinstance(load, dict) and load.get("busy"):
        return str(load.get("warning") or "machine busy")
    return None


def _runner_entry(run_dir: str, gpu: str | None, concurrent: int | None = 1,
                  zygote: str | None = None) -> None:
    """First thing in a runner process: own session (so a timeout kills runner + kernel as one
    group), die with our parent, CUDA pinning, the warm-kernel zygote to ask (or none), output
    to runner.log; then papermill."""
    os.setsid()
    _pdeathsig()
    os.environ.pop(warmkernel.SOCKET_ENV, None)
    if zygote:
        os.environ[warmkernel.SOCKET_ENV] = zygote
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    if concurrent is not None:
        os.environ[CONCURRENT_ENV] = str(concurrent)
    os.environ.update(run_thread_env(concurrent))
    os.environ[BATCH_ENV] = "1"  # text progress in the executed notebook, not a dead widget
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    fd = os.open(os.path.join(run_dir, "runner.log"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.exit(runner_main(run_dir))


class _PopenRunner:
    """The runner as a fresh interpreter, where a forkserver is not allowed (inside a daemonic
    process such as a Dask worker); same interface as multiprocessing.Process."""

    def __init__(self, rdir: Path, gpu: str | None, concurrent: int | None = 1) -> None:
        import subprocess

        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if concurrent is not None:
            env[CONCURRENT_ENV] = str(concurrent)
        env.update(run_thread_env(concurrent))
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        with open(rdir / "runner.log", "w") as log:
            self._p = subprocess.Popen(
                [sys.executable, "-m", "effllm_helpers.sweep", "exec", str(rdir)], env=env,
                stdout=log, stderr=log, start_new_session=True, preexec_fn=_pdeathsig)
        self.pid = self._p.pid

    def join(self, timeout: float | None = None) -> None:
        import subprocess

        try:
            self._p.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def is_alive(self) -> bool:
        return self._p.poll() is None

    def kill(self) -> None:
        self._p.kill()

    @property
    def exitcode(self) -> int | None:
        return self._p.returncode


def _pdeathsig() -> None:
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _start_runner(rdir: Path, gpu: str | None, concurrent: int | None = 1,
                  zygote: str | None = None):
    if multiprocessing.current_process().daemon:
        return _PopenRunner(rdir, gpu, concurrent)
    proc = _runner_context().Process(target=_runner_entry,
                                     args=(str(rdir), gpu, concurrent, zygote), daemon=False)
    proc.start()
    return proc


def execute_run(run_dict: dict[str, Any], run_dir: str, gpu: str | None = None,
                concurrent: int | None = 1, zygote: str | None = None) -> dict[str, Any]:
    """Execute one run in a runner process; return ``{status, seconds, reason}``.

    Plain-data in and out, so the same function runs in a local thread or on a Dask worker.
    ``concurrent`` (the sweep's worker count; None if unknown) reaches the record as
    ``extra.concurrent_runs``; ``zygote`` is the socket of a warm-kernel zygote
    (``warmkernel``), None for a cold kernel.
    """
    run = studies.Run.model_validate(run_dict)
    rdir = Path(run_dir).resolve()
    with run_lock(rdir) as mine:
        if not mine:
            return {"status": "elsewhere", "seconds": 0.0, "reason": ELSEWHERE}
        if _has_ok_record(rdir, run.run_id):  # finished by another sweep since we planned
            return {"status": "cached", "seconds": 0.0, "reason": None}
        return _execute_locked(run, rdir, gpu, concurrent, zygote)


def _execute_locked(run: studies.Run, rdir: Path, gpu: str | None,
                    concurrent: int | None, zygote: str | None = None) -> dict[str, Any]:
    results.atomic_write_json(rdir / RUN_SPEC, run.model_dump(mode="json"))
    t0 = time.monotonic()
    proc = _start_runner(rdir, gpu, concurrent, zygote)
    with _LIVE_LOCK:
        _LIVE.add(proc)
    try:
        proc.join(timeout=run.timeout_s)
        if proc.is_alive():
            _kill_group(proc)
            if not _INTERRUPTED.is_set():
                rec = failure_record(run.model_dump(), "timeout", timeout_message(run.timeout_s))
                results.write_record(rdir, rec)
    except BaseException:  # interrupted sweep: take the run down with us, record nothing
        _kill_group(proc)
        raise
    finally:
        with _LIVE_LOCK:
            _LIVE.discard(proc)
    seconds = time.monotonic() - t0
    if _INTERRUPTED.is_set():  # killed by the interrupt: no record, the rerun redoes it
        return {"status": "interrupted", "seconds": seconds, "reason": "sweep interrupted"}
    rec = results.read_record(rdir)
    if rec is None or rec.get("run_id") != run.run_id:
        tail = _tail(rdir / "runner.log")
        rec = failure_record(run.model_dump(), "exception",
                             f"runner exited with code {proc.exitcode} and wrote no record",
                             tail)
        results.write_record(rdir, rec)
    return {"status": rec["status"], "seconds": seconds,
            "reason": (rec.get("error") or {}).get("reason"), "busy": record_busy(rec)}


def interrupt_all() -> None:
    """Stop every run in flight without recording them (they are redone on the next sweep)."""
    _INTERRUPTED.set()
    with _LIVE_LOCK:
        procs = list(_LIVE)
    for proc in procs:
        _kill_group(proc)


def _kill_group(proc) -> None:
    """Kill the runner's whole session (runner, papermill) and its descendants in other sessions:
    jupyter_client starts the kernel with ``start_new_session=True``, so killing the group alone
    would orphan a kernel that can keep the GPU busy while the next run starts."""
    if not kill_process_tree(proc.pid):
        proc.kill()
    proc.join()


def kill_process_tree(pid: int) -> bool:
    """SIGKILL the session led by ``pid`` and every descendant of ``pid`` (also those in other
    sessions), and wait for the descendants; False when there was no such session to kill."""
    import psutil

    try:  # before the kill: once the leader is gone its children are reparented and lost
        kids = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        kids = []
    killed = True
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        killed = False
    for kid in kids:
        try:
            kid.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(kids, timeout=10)
    return killed


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# ---------------------------------------------------------------- one run (runner side)
def runner_main(run_dir: str) -> int:
    """Inside the runner process: papermill the notebook, record a failure if it raised."""
    import papermill as pm

    rdir = Path(run_dir).resolve()
    spec = json.loads((rdir / RUN_SPEC).read_text())
    run = studies.Run.model_validate(spec)
    if _has_ok_record(rdir, run.run_id):  # never redo (nor delete) a finished run
        return 0
    (rdir / results.RECORD_NAME).unlink(missing_ok=True)  # a retried run starts clean
    started = results.now_iso()
    os.environ[SWEEP_RUN_ENV] = run.run_id  # the kernel inherits it: see run.SWEEP_RUN_ENV
    os.environ.pop(PRESET_ENV, None)
    if run.preset:
        os.environ[PRESET_ENV] = run.preset
    nb = studies.notebook_path(run.notebook)
    parameters = {"params": run.params, "preset": None, "study": run.study,
                  "run_id": run.run_id, "seed": run.seed, "output_dir": str(rdir),
                  "point": run.point}
    try:
        pm.execute_notebook(str(nb), str(rdir / RUN_NOTEBOOK), parameters=parameters,
                            cwd=str(nb.parent), progress_bar=False, kernel_name="python3",
                            log_output=False,
                            kernel_manager_class=warmkernel.manager_class())
    except pm.PapermillExecutionError as exc:
        kind = classify_failure(exc.ename, exc.evalue)
        tb = "\n".join(exc.traceback) if exc.traceback else ""
        tb = _strip_ansi(tb)
        rec = results.read_record(rdir)
        if kind == "skipped" or (rec and rec.get("status") == "skipped"):
            if not rec:
                results.write_record(rdir, failure_record(spec, "skipped", exc.evalue, tb,
                                                          started))
            return 0
        results.write_record(rdir, failure_record(spec, kind, f"{exc.ename}: {exc.evalue}", tb,
                                                  started))
        return 1
    except Exception as exc:  # kernel died, notebook unreadable, ...
        import traceback

        kind = classify_failure(type(exc).__name__, str(exc))
        results.write_record(rdir, failure_record(spec, kind, f"{type(exc).__name__}: {exc}",
                                                  traceback.format_exc(), started))
        return 1
    if not lock_held_elsewhere(rdir):  # our sweep is gone: leave the record unsealed (redone)
        print("the sweep that started this run has gone; its record is left unsealed",
              file=sys.stderr, flush=True)
        return 3
    rec = seal_record(rdir, run.run_id, studies.scoring_facts(run))
    if rec is None:
        results.write_record(rdir, failure_record(spec, "exception",
                                                  "the notebook finished without writing its "
                                                  "record (does it call ctx.finish?)", "",
                                                  started))
        return 1
    return 0


def _strip_ansi(text: str) -> str:
    import re

    return re.sub(r"\x1b\[[0-9;]*m", "", text)


# ---------------------------------------------------------------- the sweep
def gpu_slots(workers: int, per_run: int = 1) -> list[str | None]:
    """One slot per worker: the GPU ids to pin it to (``CUDA_VISIBLE_DEVICES``), or None on a
    machine without GPUs. ``per_run`` > 1 (a params ``launch.processes``) gives each slot a
    disjoint group of that many GPUs, e.g. ``"0,1"`` and ``"2,3"``."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        gpus = [g.strip() for g in visible.split(",") if g.strip()]
    else:
        gpus = [str(i) for i in range(_cuda_count())]
    if not gpus:
        return [None] * workers
    per_run = max(1, int(per_run))
    if per_run > len(gpus):
        raise ValueError(f"a run launches {per_run} processes but only {len(gpus)} GPU(s) are "
                         "visible")
    groups = [",".join(gpus[i:i + per_run]) for i in range(0, len(gpus) - per_run + 1, per_run)]
    return [groups[i % len(groups)] for i in range(workers)]


def launch_processes(runs: Iterable[studies.Run]) -> int:
    """The most processes any of ``runs`` launches (params ``launch.processes``; 1 without)."""
    return max([int((r.params.get("launch") or {}).get("processes", 1)) for r in runs] or [1])


def _cuda_count() -> int:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return 0


def sweep(study_path: str | Path, preset: str | Path | None = None,
          output_dir: str | Path | None = None,
          workers: int = 1, dask: str | None = None, retry_failed: bool = False,
          timeout_s: float | None = None, progress: bool = True,
          on_outcome: Callable[[Outcome], None] | None = None,
          overrides: dict[str, Any] | None = None,
          only: dict[str, list[str]] | None = None,
          trusted_notebook: bool = False, seeds: list[int] | None = None) -> SweepResult:
    """Run every point of a study that has no ok record yet; never stop at a failed run."""
    # validation, before any compute
    runs = studies.expand(study_path, preset, overrides, only, trusted_notebook, seeds)
    studies.check_timeout(timeout_s)
    if timeout_s is not None:
        runs = [r.model_copy(update={"timeout_s": timeout_s}) for r in runs]
    # absolute: the notebook runs with its own folder as cwd and must write where we look
    out = (Path(output_dir) if output_dir else outputs_dir()).resolve()
    _INTERRUPTED.clear()
    todo, settled = plan(runs, out, retry_failed)
    result = SweepResult(study=runs[0].study if runs else "?", outcomes=list(settled))
    if not todo:
        return result
    _warn_shared_devices(workers, dask)
    # local runs fork their kernels from a zygote that imports while the data caches warm (or
    # from one that serves several sweeps, e.g. make study's, named in $EFFLLM_ZYGOTE); for one
    # run a zygote of its own would only pay the same imports once more
    zygote = _sweep_zygote(todo, workers) if not dask else None
    try:
        if isinstance(zygote, warmkernel.Zygote):
            zygote.ensure()
        if not dask or dask == "local":  # remote workers fill their own caches
            warm_data_caches(todo)
        bar = _progress(len(todo), result.study, progress)
        try:
            if dask:
                _run_dask(todo, out, dask, workers, result, bar, on_outcome)
            else:
                slots = len(gpu_slots(max(1, workers), launch_processes(todo)))
                with sweep_presence(slots) as own:
                    _run_local(todo, out, workers, result, bar, on_outcome, zygote, own)
        finally:
            bar.close()
    finally:
        if isinstance(zygote, warmkernel.Zygote):
            zygote.stop()
    order = {r.run_id: i for i, r in enumerate(runs)}
    result.outcomes.sort(key=lambda o: order[o.run.run_id])
    return result


def warm_data_caches(runs: Iterable[studies.Run], timeout_s: float = 3600) -> list[str]:
    """Build the tokenizers and token caches the pretraining runs will read, in a child process
    before any run starts, so no run trains a tokenizer inside its measured process (its memory
    stayed in that run's AMU). Returns the data specs warmed; a failure is left to the runs."""
    import subprocess

    keys = {r.run_id: SPECS[r.axis].warm_data for r in runs}
    specs = sorted({json.dumps(r.params[k], sort_keys=True) for r in runs
                    if (k := keys[r.run_id]) and isinstance(r.params.get(k), dict)})
    if specs:
        # dies with the sweep (PR_SET_PDEATHSIG): a killed sweep leaves no warm-up behind
        subprocess.run([sys.executable, "-m", "effllm_helpers.data.warm", *specs],
                       check=False, timeout=timeout_s, stdout=subprocess.DEVNULL,
                       preexec_fn=_pdeathsig)
    return specs


def _warn_shared_devices(workers: int, dask: str | None) -> None:
    """More local workers than GPUs puts two measured runs on one device: say so up front."""
    if workers <= 1 or (dask and dask != "local"):
        return
    slots = gpu_slots(workers)
    devices = len({s for s in slots if s is not None})
    if devices >= workers:
        return
    where = f"{devices} visible GPU(s)" if devices else "no GPU (CPU only)"
    print(f"warning: --workers {workers} with {where}: runs will share a device and their "
          "energy/memory metrics will mix (each record notes extra.concurrent_runs)",
          file=sys.stderr, flush=True)


def _progress(total: int, study: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"sweep {study}", unit="run", disable=not enabled,
                dynamic_ncols=True)


def _record(result: SweepResult, outcome: Outcome, bar, on_outcome) -> None:
    result.outcomes.append(outcome)
    bar.update(1)
    bar.set_postfix_str(f"last={outcome.run.run_id}:{outcome.status} "
                        f"failed={len(result.failed)}")
    if on_outcome:
        on_outcome(outcome)


def _zygote_env(todo: list[studies.Run], workers: int) -> dict[str, str]:
    """The environment the zygote imports under: what a runner's kernel would see, less the
    per-run variables (run id, preset, GPU pinning), which each kernel receives at its fork."""
    slots = gpu_slots(max(1, workers), launch_processes(todo))
    env = dict(os.environ, PYTHONUNBUFFERED="1", **{BATCH_ENV: "1"})
    env.update(run_thread_env(len(slots)))
    return env


def _sweep_zygote(todo: list[studies.Run], workers: int) -> warmkernel.Zygote | str | None:
    """The zygote this sweep's kernels fork from: a shared one already listening at
    ``$EFFLLM_ZYGOTE`` (its path), else one of our own for two or more runs, else None."""
    if not warmkernel.enabled():
        return None
    shared = os.environ.get(warmkernel.SOCKET_ENV)
    if shared and warmkernel.is_listening(shared):
        return shared
    if len(todo) < 2:
        return None
    return warmkernel.Zygote(env=_zygote_env(todo, workers),
                            modules=warmkernel.preload_for({r.axis for r in todo}))


def _zygote_socket(zygote: warmkernel.Zygote | str | None) -> str | None:
    """The zygote's socket once it listens (ours restarted if it died since the last run);
    None when warm kernels are off, refused or did not come up (the run then starts a cold
    kernel, as it does when a shared zygote has gone)."""
    if zygote is None:
        return None
    if isinstance(zygote, str):
        return zygote if warmkernel.is_listening(zygote) else None
    had = zygote.refused
    path = zygote.ensure()
    if path and zygote.wait_ready():
        return path
    if zygote.refused and not had:  # said once, not before every run
        print(f"warning: {zygote.refused}; kernels start cold", file=sys.stderr, flush=True)
    return None


def _run_local(todo: list[studies.Run], out: Path, workers: int, result: SweepResult, bar,
               on_outcome, zygote: warmkernel.Zygote | str | None = None,
               presence: Path | None = None) -> None:
    """Run ``todo`` on ``workers`` local slots. Each run is told the runs on this machine at
    its start: this sweep's slots plus the other live sweeps' (``presence`` is ours)."""
    slots = gpu_slots(max(1, workers), launch_processes(todo))
    free = list(range(len(slots)))
    pending: dict[Future, tuple[studies.Run, int]] = {}
    queue = list(todo)
    with ThreadPoolExecutor(max_workers=len(slots)) as pool:
        try:
            while queue or pending:
                while queue and free:
                    run, slot = queue.pop(0), free.pop(0)
                    fut = pool.submit(execute_run, run.model_dump(mode="json"),
                                      str(run_dir_for(out, run)), slots[slot],
                                      len(slots) + other_sweeps_runs(presence),
                                      _zygote_socket(zygote))
                    pending[fut] = (run, slot)
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    run, slot = pending.pop(fut)
                    free.append(slot)
                    try:
                        res = fut.result()
                        outcome = Outcome(run, res["status"], res["seconds"], res["reason"],
                                          res.get("busy"))
                    except Exception as exc:  # failed on our side: record it, carry on
                        outcome = _sweep_side_failure(out, run, exc)
                    _record(result, outcome, bar, on_outcome)
        except KeyboardInterrupt:
            queue.clear()
            interrupt_all()
            raise


def _sweep_side_failure(out: Path, run: studies.Run, exc: BaseException,
                        what: str = "sweep failed to execute the run") -> Outcome:
    """A run that failed outside its notebook (sweep or worker side): a failed record, not an
    aborted sweep."""
    import traceback

    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    if _has_ok_record(run_dir_for(out, run), run.run_id):  # someone else finished it
        return Outcome(run, "cached")
    rec = failure_record(run.model_dump(), "exception", f"{what}: {type(exc).__name__}: {exc}",
                         tb)
    results.write_record(run_dir_for(out, run), rec)
    return Outcome(run, "failed", 0.0, rec["error"]["reason"])


class DaskConnectError(RuntimeError):
    """The --dask address is malformed or no scheduler answers there."""


def _run_dask(todo: list[studies.Run], out: Path, address: str, workers: int,
              result: SweepResult, bar, on_outcome) -> None:
    from dask.distributed import Client, LocalCluster, as_completed

    cluster = None
    if address == "local":
        cluster = LocalCluster(n_workers=max(1, workers), threads_per_worker=1, processes=True,
                               dashboard_address=None)
        client = Client(cluster)
    else:
        try:
            client = Client(address)
        except Exception as exc:
            raise DaskConnectError(f"--dask {address!r}: cannot connect to a Dask scheduler "
                                   f"({type(exc).__name__}: {exc}); give tcp://host:port of a "
                                   "running scheduler, or 'local'") from None
    try:
        slots = (gpu_slots(max(1, workers), launch_processes(todo)) if address == "local"
                 else [None])
        futures = {}
        for i, run in enumerate(todo):
            fut = client.submit(execute_run, run.model_dump(mode="json"),
                                str(run_dir_for(out, run)), slots[i % len(slots)],
                                max(1, workers) if address == "local" else None, pure=False,
                                key=f"effllm-{run.run_id}")
            futures[fut] = run
        for fut in as_completed(futures):
            run = futures[fut]
            try:
                res = fut.result()
                outcome = Outcome(run, res["status"], res["seconds"], res["reason"],
                                  res.get("busy"))
            except Exception as exc:  # the worker itself died: record it, carry on
                outcome = _sweep_side_failure(out, run, exc, "dask worker failed")
            _record(result, outcome, bar, on_outcome)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


# ---------------------------------------------------------------- reporting
def timeout_message(limit_s: float | None) -> str:
    """Why a run was killed, and how to give it more time (the default limit is not obvious)."""
    return (f"run exceeded its {limit_s:g} s limit; raise it with --timeout SECONDS on the "
            "command line or timeout_s: SECONDS in the study file (a real model's fine-tuning "
            "on a CPU can take longer than the 1800 s default)")


# what the closing summary shows of a record, first found wins in each column
HEADLINE_COLUMNS: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("quality", (("quality", "accuracy"), ("quality", "task_acc"), ("quality", "ppl"),
                 ("quality", "val_ppl"), ("quality", "eval_loss"), ("quality", "val_loss"))),
    ("amu_gb", (("metrics", "amu_gb"),)),
    ("tpot/step_s", (("metrics", "tpot_s"), ("metrics", "al_s"))),
    ("energy", (("metrics", "j_per_token"), ("metrics", "aec_w"))),
)


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def record_headline(rec: dict[str, Any] | None) -> dict[str, str]:
    """The headline cells of a record: quality, memory, TPOT or step time, energy.

    Each cell is ``value unit`` with the metric's name where the column can hold several
    (``acc 0.42``, ``tpot_s 0.012 s``); ``-`` when the record has none with a value.
    """
    rec = rec or {}
    # the study's quality metric first (the one its scores rank on, as the record says, else
    # the axis's default), then any other
    own = (rec.get(results.SCORING) or {}).get("quality") or getattr(
        SPECS.get(str(rec.get("axis"))), "quality", None)
    out: dict[str, str] = {}
    for col, keys in HEADLINE_COLUMNS:
        cell = "-"
        if col == "quality" and own:
            keys = (("quality", own), *keys)
        for section, key in keys:
            m = (rec.get(section) or {}).get(key)
            if isinstance(m, dict) and isinstance(m.get("value"), int | float) \
                    and not isinstance(m.get("value"), bool):
                unit = m.get("unit") or ""
                cell = f"{key}={_fmt(float(m['value']))}" + (f" {unit}" if unit else "")
                break
        out[col] = cell
    return out


def summary_table(result: SweepResult, output_dir: Path | None = None) -> str:
    """A plain-text table: one line per run with its headline metrics, then the counts.

    The headline cells (quality, AMU, TPOT or step time, energy) come from the runs' records
    under ``output_dir``; without it (or for a run with no record) they are ``-``.
    """
    heads = [col for col, _ in HEADLINE_COLUMNS]
    rows = [("run_id", "point", "status", "secs", *heads, "reason")]
    for o in result.outcomes:
        point = ", ".join(f"{k}={v}" for k, v in o.run.point.items())
        if o.run.seed:
            point += f" seed={o.run.seed}"
        rec = results.read_record(run_dir_for(output_dir, o.run)) if output_dir else None
        head = record_headline(rec) if rec and rec.get("status") == "ok" else {}
        rows.append((o.run.run_id, point, o.status, f"{o.seconds:.1f}" if o.seconds else "-",
                     *(head.get(c, "-") for c in heads), (o.reason or "")[:70]))
    n = len(rows[0]) - 1
    widths = [max(len(r[i]) for r in rows) for i in range(n)]
    lines = ["  ".join(r[i].ljust(widths[i]) for i in range(n)).rstrip() + "  " + r[n]
             for r in rows]
    counts: dict[str, int] = {}
    for o in result.outcomes:
        counts[o.status] = counts.get(o.status, 0) + 1
    lines.append(f"{result.study}: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    busy = [o for o in result.outcomes if o.busy]
    if busy:
        lines.append(f"warning: {len(busy)} run(s) were measured on a busy machine (1-min load "
                     "above the cores; their latency/throughput/MFU/energy are contended): "
                     + ", ".join(o.run.run_id for o in busy))
        lines.append(f"  e.g. {busy[0].run.run_id}: {busy[0].busy}")
    return "\n".join(lines)


def dry_run_table(runs: Iterable[studies.Run], output_dir: Path) -> str:
    lines = []
    for run in runs:
        rec = results.read_record(run_dir_for(output_dir, run))
        state = rec.get("status") if rec else "todo"
        point = ", ".join(f"{k}={v}" for k, v in run.point.items())
        lines.append(f"{run.run_id}  {state:8s}  seed={run.seed}  {point}")
    return "\n".join(lines)


# ---------------------------------------------------------------- runner entry point
def _main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m effllm_helpers.sweep",
                                 description="internal: execute one run folder (used by sweep)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("exec", help="execute the run described by <run_dir>/run.json")
    ex.add_argument("run_dir")
    args = ap.parse_args(argv)
    return runner_main(args.run_dir)


if __name__ == "__main__":
    sys.exit(_main())
