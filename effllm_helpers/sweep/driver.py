"""The sweep itself: expand and plan a study, warm the data caches and the kernel zygote, run the
runs on local workers pinned to GPUs or on a Dask cluster, show progress, and the closing
summary table of each run's headline metrics."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from .. import results, studies, warmkernel
from ..axes.spec import SPECS
from ..paths import outputs_dir
from ..run import failure_record
from ..runenv import BATCH_ENV
from .locking import other_sweeps_runs, run_thread_env, sweep_presence
from .planning import Outcome, SweepResult, _has_ok_record, plan, run_dir_for
from .runner import _INTERRUPTED, _pdeathsig, execute_run, interrupt_all


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
