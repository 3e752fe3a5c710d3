"""What a sweep has to do: the run folders' layout, which runs a record already settles (ok,
skipped, failed) and which are to execute, the outcomes, and the dry-run listing."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import results, studies
from ..run import NOTEBOOK_SAVED
from .locking import run_lock

RUN_SPEC = "run.json"
RUN_NOTEBOOK = "run.ipynb"


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


def finished_ok(rec: dict[str, Any] | None, run_id: str) -> bool:
    """A finished ok run: its record says ok and does not say its notebook went unsaved (a runner
    killed between the notebook's last cell and papermill's save leaves ``notebook_saved:
    false``; records from before the flag have none and stay finished)."""
    return bool(rec and rec.get("run_id") == run_id and rec.get("status") == "ok"
                and rec.get(NOTEBOOK_SAVED) is not False)


def _has_ok_record(rdir: Path, run_id: str) -> bool:
    return finished_ok(results.read_record(rdir), run_id)


def record_busy(rec: dict[str, Any] | None) -> str | None:
    """The busy-machine warning a record's metrics carry (``metrics.load_1m.busy``), or None."""
    load = ((rec or {}).get("metrics") or {}).get("load_1m")
    if isinstance(load, dict) and load.get("busy"):
        return str(load.get("warning") or "machine busy")
    return None


# ---------------------------------------------------------------- listing
def dry_run_table(runs: Iterable[studies.Run], output_dir: Path) -> str:
    lines = []
    for run in runs:
        rec = results.read_record(run_dir_for(output_dir, run))
        state = rec.get("status") if rec else "todo"
        point = ", ".join(f"{k}={v}" for k, v in run.point.items())
        lines.append(f"{run.run_id}  {state:8s}  seed={run.seed}  {point}")
    return "\n".join(lines)
