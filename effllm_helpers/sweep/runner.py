"""One run: the parent side starts a runner process per run (forked from a papermill forkserver,
in its own session, dying with its parent), waits with a timeout and kills the whole tree; the
runner side executes the notebook through papermill, records a failure, and seals the record
(``notebook_saved``) once papermill has saved the notebook. ``python -m effllm_helpers.sweep exec
<run_dir>`` is the runner as a fresh interpreter (``__main__``)."""

from __future__ import annotations

import argparse
import ctypes
import json
import multiprocessing
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .. import results, studies, warmkernel
from ..run import NOTEBOOK_SAVED, PRESET_ENV, SWEEP_RUN_ENV, classify_failure, failure_record
from ..runenv import BATCH_ENV
from .locking import CONCURRENT_ENV, ELSEWHERE, lock_held_elsewhere, run_lock, run_thread_env
from .planning import RUN_NOTEBOOK, RUN_SPEC, _has_ok_record, record_busy


# ---------------------------------------------------------------- sealing the record
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


# ---------------------------------------------------------------- the timeout's message
def timeout_message(limit_s: float | None) -> str:
    """Why a run was killed, and how to give it more time (the default limit is not obvious)."""
    return (f"run exceeded its {limit_s:g} s limit; raise it with --timeout SECONDS on the "
            "command line or timeout_s: SECONDS in the study file (a real model's fine-tuning "
            "on a CPU can take longer than the 1800 s default)")


# ---------------------------------------------------------------- runner entry point
def _main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m effllm_helpers.sweep",
                                 description="internal: execute one run folder (used by sweep)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("exec", help="execute the run described by <run_dir>/run.json")
    ex.add_argument("run_dir")
    args = ap.parse_args(argv)
    return runner_main(args.run_dir)
