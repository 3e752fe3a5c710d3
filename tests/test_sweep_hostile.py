"""Concurrency and orphans (issue 29's held-out run): parallel sweeps on one machine count each
other, a runner that outlives its sweep does not seal its run, and the warm-up child dies with
the sweep."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from effllm_helpers import results, studies, sweep

HOLD = ("import sys, time\nfrom effllm_helpers import sweep\n"
        "with sweep.sweep_presence(3):\n    print('ready', flush=True)\n    time.sleep(600)\n")


@pytest.fixture()
def runtime(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv(sweep.RUNTIME_ENV, str(tmp_path / "rt"))
    return tmp_path / "rt"


def test_sweeps_count_each_other_while_alive(runtime):
    with sweep.sweep_presence(2) as a, sweep.sweep_presence(3) as b:
        assert sweep.other_sweeps_runs(a) == 3 and sweep.other_sweeps_runs(b) == 2
    assert sweep.other_sweeps_runs(None) == 0 and not list(runtime.iterdir())


def test_a_killed_sweep_stops_counting(runtime):
    proc = subprocess.Popen([sys.executable, "-c", HOLD], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parent.parent)
    try:
        assert proc.stdout.readline().strip() == "ready"
        assert sweep.other_sweeps_runs(None) == 3
    finally:
        proc.kill()
        proc.wait()
    assert sweep.other_sweeps_runs(None) == 0  # its file is stale: removed, not counted
    assert not list(runtime.glob("*.sweep"))


def test_lock_held_elsewhere_sees_the_sweeps_lock(tmp_path):
    assert not sweep.lock_held_elsewhere(tmp_path)
    with sweep.run_lock(tmp_path) as mine:
        assert mine and sweep.lock_held_elsewhere(tmp_path)
    assert not sweep.lock_held_elsewhere(tmp_path)


def _unsealed_run(tmp_path: Path, monkeypatch) -> Path:
    import papermill as pm

    run = studies.expand("params/smoke/smoke.yaml", "ci")[0]
    rdir = tmp_path / run.run_id
    rdir.mkdir()
    (rdir / sweep.RUN_SPEC).write_text(json.dumps(run.model_dump(mode="json")))
    rec = results.new_record(run_id=run.run_id, study=run.study, axis=run.axis,
                             params=run.params)

    def fake_notebook(*args, **kwargs) -> None:  # the notebook's last cell writes its record
        results.write_record(rdir, {**rec, results.NOTEBOOK_SAVED: False})
        (rdir / sweep.RUN_NOTEBOOK).write_text(json.dumps({"cells": []}))

    monkeypatch.setattr(pm, "execute_notebook", fake_notebook)
    return rdir


def test_runner_does_not_seal_a_run_whose_sweep_is_gone(tmp_path, monkeypatch):
    rdir = _unsealed_run(tmp_path, monkeypatch)
    assert sweep.runner_main(str(rdir)) == 3
    assert results.read_record(rdir)[results.NOTEBOOK_SAVED] is False


def test_runner_seals_while_its_sweep_holds_the_lock(tmp_path, monkeypatch):
    rdir = _unsealed_run(tmp_path, monkeypatch)
    with sweep.run_lock(rdir):
        assert sweep.runner_main(str(rdir)) == 0
    assert results.read_record(rdir)[results.NOTEBOOK_SAVED] is True


def test_warm_up_child_is_asked_to_die_with_the_sweep(monkeypatch):
    calls: list[dict] = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(kw))
    sweep.warm_data_caches(studies.expand("params/architecture/attention.yaml", "ci"))
    assert calls and calls[0]["preexec_fn"] is sweep._pdeathsig


def test_pdeathsig_kills_a_child_when_its_parent_dies(tmp_path):
    # parent python starts a sleeping child with the sweep's preexec, prints its pid, exits
    code = ("import subprocess, sys\nfrom effllm_helpers import sweep\n"
            "p = subprocess.Popen(['sleep', '60'], preexec_fn=sweep._pdeathsig)\n"
            "print(p.pid, flush=True)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent.parent, timeout=60)
    pid = int(out.stdout.split()[0])
    deadline = time.monotonic() + 10  # generous: the kernel signals it at once
    while time.monotonic() < deadline and _running(pid):
        time.sleep(0.1)
    assert not _running(pid)


def _running(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
