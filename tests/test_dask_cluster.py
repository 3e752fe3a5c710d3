"""A real Dask cluster on the loopback: a scheduler and two worker processes, one killed
mid-sweep; every run still ends with exactly one ok record (resumed on the rerun)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from effllm_helpers import sweep
from effllm_helpers.launch import free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
DASK = str(Path(sys.executable).parent / "dask")
HOST = "127.0.0.1"


def _start(args: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    with open(log, "w") as f:  # own session: the finalizer kills the whole group
        return subprocess.Popen([DASK, *args], stdout=f, stderr=subprocess.STDOUT, env=env,
                                cwd=REPO, start_new_session=True)


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a started process, its session and every descendant (runners, kernels)."""
    sweep.kill_process_tree(proc.pid)
    proc.kill()  # no-op if the session kill already got it
    proc.wait(timeout=10)


@pytest.fixture
def cluster(tmp_path, request):
    """``dask scheduler`` and two ``dask worker`` processes on 127.0.0.1, torn down always."""
    from dask.distributed import Client

    started: list[subprocess.Popen] = []

    def teardown() -> None:
        for proc in reversed(started):
            _kill_tree(proc)

    request.addfinalizer(teardown)
    port = free_port()
    address = f"tcp://{HOST}:{port}"
    started.append(_start(["scheduler", "--host", HOST, "--port", str(port),
                           "--no-dashboard"], tmp_path / "scheduler.log"))
    for i in range(2):
        started.append(_start(["worker", address, "--host", HOST, "--nthreads", "1",
                               "--no-nanny", "--no-dashboard", "--name", f"w{i}"],
                              tmp_path / f"worker{i}.log"))
    deadline = time.monotonic() + 30
    while True:
        try:
            with Client(address, timeout=5) as client:
                client.wait_for_workers(2, timeout=max(1, deadline - time.monotonic()))
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    return address, started[1:]


def _records(out: Path, name: str) -> dict[str, list[dict]]:
    """Every record file per run folder (a duplicate would show as a second file)."""
    found: dict[str, list[dict]] = {}
    for rdir in sorted((out / "runs" / name).iterdir()):
        found[rdir.name] = [json.loads(p.read_text()) for p in rdir.glob("record*.json")]
    return found


def test_a_killed_worker_loses_no_run_and_duplicates_none(tmp_path, cluster):
    address, workers = cluster
    study = tmp_path / "dk.yaml"
    study.write_text(textwrap.dedent("""\
        study: dk
        axis: smoke
        notebook: notebooks/smoke.ipynb
        base: {sleep_s: 0.5}
        grid:
          n: [16, 24, 32]
          steps: [4]
        timeout_s: 120
        """))
    out = tmp_path / "out"
    first: dict = {}
    runner = threading.Thread(target=lambda: first.update(
        res=sweep.sweep(study, "ci", out, dask=address, progress=False)))
    runner.start()
    deadline = time.monotonic() + 40
    while not list((out / "runs" / "dk").glob("*/runner.log")):  # a run is in flight
        assert time.monotonic() < deadline, "no run started on the cluster"
        time.sleep(0.2)
    time.sleep(1.0)
    _kill_tree(workers[0])  # SIGKILL mid-run: its task goes to the other worker or fails
    runner.join(timeout=90)
    assert not runner.is_alive()
    again = sweep.sweep(study, "ci", out, dask=address, retry_failed=True, progress=False)
    recs = _records(out, "dk")
    assert len(recs) == 3
    for run_id, files in recs.items():
        assert len(files) == 1, f"{run_id}: {len(files)} records"
        assert files[0]["status"] == "ok" and files[0]["run_id"] == run_id
    assert {o.status for o in again.outcomes} <= {"ok", "cached"}
    assert not list((out / "runs" / "dk").glob("*/.record.json.*.tmp"))
