"""The notebook side of a run: resolve params, then write the record atomically at the end.

Every axis notebook starts with ``ctx = start_run(...)`` on its parameters cell's values and ends
with ``ctx.finish(...)``; the sweep runner only looks at the ``record.json`` this writes. A run that
raises inside the notebook is recorded as failed by the runner (see ``sweep/runner.py``), with the
reason classified here so both sides agree on the words.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import config, libnoise, results, studies
from .errors import SkipRun
from .paths import outputs_dir
from .provenance import provenance
from .runenv import THREADS_ENV

FAILURE_KINDS = {
    "DivergedError": "diverged",
    "OutOfMemoryError": "oom",
    "MemoryError": "oom",
    "SkipRun": "skipped",
    "UnsupportedTechnique": "skipped",
    "TimeoutError": "timeout",
}


def classify_failure(ename: str, evalue: str = "") -> str:
    """Name the kind of failure: oom, diverged, timeout, skipped or exception."""
    if ename in FAILURE_KINDS:
        return FAILURE_KINDS[ename]
    text = f"{ename} {evalue}".lower()
    if "out of memory" in text or "can't allocate memory" in text:  # torch's CPU allocator
        return "oom"
    return "exception"


def failure_record(run: dict[str, Any], kind: str, message: str, tb: str = "",
                   started_at: str | None = None) -> dict[str, Any]:
    """A failed (or skipped) record, with the reason and the tail of the traceback."""
    status = "skipped" if kind == "skipped" else "failed"
    tail = "\n".join(tb.strip().splitlines()[-25:]) if tb else ""
    return results.new_record(
        run_id=run["run_id"], study=run["study"], axis=run["axis"], params=run["params"],
        status=status, error={"reason": f"{kind}: {message}"[:2000], "kind": kind,
                              "traceback_tail": tail},
        provenance=provenance(run.get("preset") or os.environ.get(PRESET_ENV)),
        started_at=started_at,
        extra={"seed": run.get("seed"), "point": run.get("point", {}), **_concurrency()},
        scoring=studies.scoring_facts(run),
    )


def _concurrency() -> dict[str, int]:
    """``{"concurrent_runs": N}`` when a sweep ran this with N runs at once (set by the runner in
    ``EFFLLM_CONCURRENT_RUNS``): N > 1 on one device means energy/memory metrics mixed."""
    raw = os.environ.get("EFFLLM_CONCURRENT_RUNS")
    try:
        return {"concurrent_runs": int(raw)} if raw else {}
    except ValueError:
        return {}


# A sweep's runner sets this to the run id it executes: the notebook's record then says
# ``notebook_saved: false`` until the runner, after papermill has saved run.ipynb, rewrites it
# true (``sweep.seal_record``). A record left false means the run was killed between the two.
SWEEP_RUN_ENV = "EFFLLM_SWEEP_RUN_ID"
# ... and the name of the preset that resolved the injected params (a sweep injects them with
# ``preset=None``), so the record can say which preset produced them
PRESET_ENV = "EFFLLM_PRESET"
NOTEBOOK_SAVED = results.NOTEBOOK_SAVED


@dataclass
class RunContext:
    """What a notebook knows about the run it is: ids, validated params, where to write."""

    axis: str
    study: str
    run_id: str
    seed: int
    params: Any  # the axis' pydantic params object
    output_dir: Path
    point: dict[str, Any] = field(default_factory=dict)
    preset: str | None = None
    started_at: str = field(default_factory=results.now_iso)

    @property
    def params_dict(self) -> dict[str, Any]:
        return self.params.model_dump(mode="json")

    def finish(self, *, metrics: dict[str, Any], quality: dict[str, Any] | None = None,
               curves: dict[str, Any] | None = None, model: dict[str, Any] | None = None,
               extra: dict[str, Any] | None = None) -> Path:
        """Write the ok record (validated, atomically). Call it as the notebook's last step."""
        rec = results.new_record(
            run_id=self.run_id, study=self.study, axis=self.axis, params=self.params_dict,
            metrics=metrics, quality=quality, curves=curves, model=model,
            provenance=provenance(self.preset), started_at=self.started_at,
            extra={"seed": self.seed, "point": self.point, **_concurrency(), **(extra or {})},
        )
        if os.environ.get(SWEEP_RUN_ENV) == self.run_id:  # papermill saves the notebook after us
            rec[NOTEBOOK_SAVED] = False
        return results.write_record(self.output_dir, rec)

    def attempt(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)``; a SkipRun (this machine cannot run the technique) is written
        as a skipped record before it propagates, so the sweep shows a skip, not a crash."""
        try:
            return fn(*args, **kwargs)
        except SkipRun as exc:
            self.skip(str(exc))
            raise

    def skip(self, reason: str) -> Path:
        """Record that this technique cannot run here (a clear skip, not a crash)."""
        rec = failure_record({"run_id": self.run_id, "study": self.study, "axis": self.axis,
                              "params": self.params_dict, "seed": self.seed, "point": self.point,
                              "preset": self.preset},
                             "skipped", reason, started_at=self.started_at)
        return results.write_record(self.output_dir, rec)


def start_run(axis: str, *, params: dict[str, Any] | None = None, preset: str | None = "tiny",
              study: str | None = None, run_id: str | None = None, seed: int = 0,
              output_dir: str | Path | None = None,
              point: dict[str, Any] | None = None) -> RunContext:
    """Resolve a notebook's parameters cell into a RunContext.

    In a sweep, papermill injects the resolved ``params``, ``run_id`` and ``output_dir``. Run by
    hand, the notebook gets its axis defaults under ``preset`` and an id hashed from them, and
    writes under ``outputs/runs/interactive/``.
    """
    libnoise.install()  # known library messages once, with their meaning, before any import
    p = config.notebook_params(axis, preset, params)
    study = study or f"{axis}_interactive"
    rid = run_id or studies.run_id_for(study, axis, "interactive", p.model_dump(mode="json"), seed)
    out = Path(output_dir) if output_dir else outputs_dir("runs", "interactive", axis, rid)
    out.mkdir(parents=True, exist_ok=True)
    _apply_threads()
    _seed_everything(seed)
    from .measure.memory import mark_baseline

    mark_baseline()  # before the notebook loads a model: the Meter's AMU increment is above it
    return RunContext(axis=axis, study=study, run_id=rid, seed=seed, params=p, output_dir=out,
                      point=point or {}, preset=preset or os.environ.get(PRESET_ENV))


def _apply_threads(env: dict[str, str] | None = None) -> int | None:
    """The run's torch threads: ``$EFFLLM_THREADS`` (the count the sweep chose, cores //
    workers, so runs side by side do not oversubscribe the CPU) or torch's own, capped at the
    cores no other process is using when the run starts.

    Why the cap: OpenMP threads spin-wait for each other, so a thread on a core that another
    process holds stalls every parallel region; beside one busy process a 2-thread run on 2
    cores was an order of magnitude slower than a 1-thread one (the cpu-tiny reference page)."""
    from .measure.contention import free_cores, machine_cores

    raw = (os.environ if env is None else env).get(THREADS_ENV)
    try:
        n = int(raw) if raw else 0
    except ValueError:
        print(f"{THREADS_ENV}={raw!r} is not a whole number of threads; using torch's own count")
        n = 0
    free = free_cores()
    if n < 1 and free is None:
        return None
    import torch

    want = n if n >= 1 else torch.get_num_threads()
    if free is not None and free < want:
        print(f"{machine_cores() - free} of {machine_cores()} cores busy with other processes: "
              f"torch threads {want} -> {free}")
        want = free
    torch.set_num_threads(want)
    return want


def _seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:
        pass

