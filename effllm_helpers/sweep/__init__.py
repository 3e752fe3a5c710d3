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

Layout of the package, one module per job: ``planning`` (the run folders, which runs are settled
and which to execute, outcomes, the dry-run listing), ``locking`` (the per-run lock, the presence
files by which the sweeps on this machine count each other's runs, threads per run), ``runner``
(one run: the runner process that executes the notebook through papermill and seals its record,
the timeout and the kill) and ``driver`` (the sweep: workers, Dask, progress, the summary table).
``python -m effllm_helpers.sweep exec <run_dir>`` runs one run folder (``__main__``).
"""

from __future__ import annotations

from .driver import (
    HEADLINE_COLUMNS,
    DaskConnectError,
    _cuda_count,
    _warn_shared_devices,
    gpu_slots,
    launch_processes,
    record_headline,
    summary_table,
    sweep,
    warm_data_caches,
)
from .locking import (
    CONCURRENT_ENV,
    ELSEWHERE,
    PRESENCE_SUFFIX,
    RUN_LOCK,
    RUNTIME_ENV,
    lock_held_elsewhere,
    other_sweeps_runs,
    run_lock,
    run_thread_env,
    runtime_dir,
    sweep_presence,
    threads_per_run,
    usable_cpus,
)
from .planning import (
    RUN_NOTEBOOK,
    RUN_SPEC,
    Outcome,
    SweepResult,
    _has_ok_record,
    dry_run_table,
    finished_ok,
    plan,
    record_busy,
    run_dir_for,
)
from .runner import (
    _kill_group,
    _pdeathsig,
    execute_run,
    interrupt_all,
    kill_process_tree,
    notebook_state,
    runner_main,
    seal_record,
    timeout_message,
)

# the names the CLI, the tests and the benchmarks use of the sweep
__all__ = [
    "dry_run_table", "finished_ok", "_has_ok_record", "Outcome", "plan", "record_busy",
    "run_dir_for", "RUN_NOTEBOOK", "RUN_SPEC", "SweepResult", "CONCURRENT_ENV", "ELSEWHERE",
    "lock_held_elsewhere", "other_sweeps_runs", "PRESENCE_SUFFIX", "RUN_LOCK", "run_lock",
    "run_thread_env", "runtime_dir", "RUNTIME_ENV", "sweep_presence", "threads_per_run",
    "usable_cpus", "execute_run", "interrupt_all", "_kill_group", "kill_process_tree",
    "notebook_state", "_pdeathsig", "runner_main", "seal_record", "timeout_message", "_cuda_count",
    "DaskConnectError", "gpu_slots", "HEADLINE_COLUMNS", "launch_processes", "record_headline",
    "summary_table", "sweep", "warm_data_caches", "_warn_shared_devices",
]
