"""The sweep runner end to end on the smoke notebook: records, resume, failure isolation, kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from effllm_helpers import config, results, studies, sweep

pytestmark = pytest.mark.slow


def study(tmp_path: Path, grid: str, extra: str = "", name: str = "sm") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"study: {name}\naxis: smoke\nnotebook: notebooks/smoke.ipynb\n"
                    f"grid:\n{textwrap.indent(grid, '  ')}\ntimeout_s: 120\n{extra}\n")
    return path


def records(out: Path, name: str = "sm") -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text())
            for p in sorted((out / "runs" / name).glob("*/record.json"))}


def sealed(out: Path, name: str = "sm") -> dict[str, dict]:
    """Records of finished runs: the runner has sealed them after papermill saved the notebook."""
    return {rid: rec for rid, rec in records(out, name).items()
            if rec.get("notebook_saved") is not False}


def test_sweep_writes_ok_records_then_skips_them(tmp_path):
    path = study(tmp_path, "n: [16, 24]", "weights: {tt: 3}")
    res = sweep.sweep(path, "ci", tmp_path / "out", progress=False)
    assert [o.status for o in res.outcomes] == ["ok", "ok"] and res.exit_code == 0
    recs = records(tmp_path / "out")
    assert len(recs) == 2
    for rid, rec in recs.items():
        assert rec["run_id"] == rid and rec["status"] == "ok"
        assert rec["metrics"]["al_s"]["unit"] == "s"
        assert (tmp_path / "out" / "runs" / "sm" / rid / "run.ipynb").is_file()
        assert rec["provenance"]["git_sha"] is not None
        assert rec["provenance"]["preset"] == "ci"  # the injected params say not which preset
        assert rec["provenance"]["environment"]["lock"].startswith("requirements/lock-")
        assert rec["scoring"] == {"quality": None, "weights": {"tt": 3.0}}  # the study's
    again = sweep.sweep(path, "ci", tmp_path / "out", progress=False)
    assert [o.status for o in again.outcomes] == ["cached", "cached"]


def test_failures_are_recorded_and_the_sweep_goes_on(tmp_path):
    path = study(tmp_path, "n: [16]\nfail: [none, exception, nan, oom]")
    res = sweep.sweep(path, "ci", tmp_path / "out", progress=False)
    by_fail = {o.run.params["fail"]: o for o in res.outcomes}
    assert by_fail["none"].status == "ok"
    assert by_fail["exception"].status == "failed"
    assert by_fail["exception"].reason.startswith("exception: RuntimeError: smoke: failing")
    assert by_fail["nan"].reason.startswith("diverged: DivergedError: loss is nan")
    assert by_fail["oom"].reason.startswith("oom: OutOfMemoryError")
    assert res.exit_code == 1
    failed = records(tmp_path / "out")[by_fail["exception"].run.run_id]
    assert "failing on purpose" in failed["error"]["traceback_tail"]
    assert failed["provenance"]["preset"] == "ci"
    assert failed["scoring"] == {"quality": None, "weights": {}}
    # failed runs stay failed unless asked to retry
    assert {o.status for o in sweep.sweep(path, "ci", tmp_path / "out",
                                          progress=False).outcomes} == {"cached", "cached-failed"}
    retried = sweep.sweep(path, "ci", tmp_path / "out", retry_failed=True, progress=False)
    assert sorted(o.status for o in retried.outcomes) == ["cached", "failed", "failed", "failed"]


def test_timeout_kills_the_run_and_records_it(tmp_path, monkeypatch):
    import psutil

    # the kernel runs in a session of its own (jupyter_client), so killing the runner's group
    # alone would orphan it: note the runner's descendants just before the kill
    seen: list[psutil.Process] = []
    cmdlines: list[str] = []
    alive: list[psutil.Process] = []
    kill = sweep._kill_group

    def spy(proc):
        seen.extend(psutil.Process(proc.pid).children(recursive=True))
        cmdlines.extend(" ".join(p.cmdline()) for p in seen)
        kill(proc)
        # checked as the kill returns, i.e. before a next run could start on the device
        alive.extend(p for p in seen if p.is_running() and p.status() != psutil.STATUS_ZOMBIE)

    monkeypatch.setattr(sweep.runner, "_kill_group", spy)  # where it is looked up
    path = study(tmp_path, "n: [16]\nsleep_s: [2.0]")
    res = sweep.sweep(path, "ci", tmp_path / "out", timeout_s=4, progress=False)
    (o,) = res.outcomes
    assert o.status == "failed" and o.reason.startswith("timeout:")
    assert o.seconds < 15
    assert any("kernel" in c for c in cmdlines), cmdlines
    assert seen and not alive, f"orphaned by the timeout kill: {alive}"


def test_infinite_timeout_is_a_params_error(tmp_path):
    path = study(tmp_path, "n: [16]")
    with pytest.raises(config.ParamsError, match="--timeout: must be a finite"):
        sweep.sweep(path, "ci", tmp_path / "out", timeout_s=float("inf"), progress=False)
    assert not (tmp_path / "out").exists()


def test_sweep_side_exception_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    def fake(run_dict, run_dir, gpu=None, concurrent=1, zygote=None):
        if run_dict["params"]["n"] == 16:
            raise OverflowError("timeout value is too large")
        return {"status": "ok", "seconds": 0.1, "reason": None}

    monkeypatch.setattr(sweep.driver, "execute_run", fake)
    path = study(tmp_path, "n: [16, 24]", "weights: {tt: 3}")
    res = sweep.sweep(path, "ci", tmp_path / "out", progress=False)
    by_n = {o.run.params["n"]: o for o in res.outcomes}
    assert by_n[24].status == "ok"
    assert by_n[16].status == "failed" and "OverflowError: timeout value" in by_n[16].reason
    rec = records(tmp_path / "out")[by_n[16].run.run_id]
    assert rec["status"] == "failed" and "OverflowError" in rec["error"]["reason"]
    assert res.exit_code == 1


def test_more_workers_than_devices_warns_and_records_concurrency(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(sweep.driver, "_cuda_count", lambda: 0)
    path = study(tmp_path, "n: [16, 24]")
    res = sweep.sweep(path, "ci", tmp_path / "out", workers=2, progress=False)
    assert sorted(o.status for o in res.outcomes) == ["ok", "ok"]
    err = capsys.readouterr().err
    assert "--workers 2 with no GPU (CPU only): runs will share a device" in err
    assert "energy/memory metrics will mix" in err
    assert {r["extra"]["concurrent_runs"] for r in records(tmp_path / "out").values()} == {2}


def test_one_worker_per_device_does_not_warn(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    sweep._warn_shared_devices(2, None)
    sweep._warn_shared_devices(1, None)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    sweep._warn_shared_devices(3, "tcp://host:8786")  # remote workers: not ours to judge
    assert capsys.readouterr().err == ""


def test_dask_local_cluster_runs_the_sweep(tmp_path):
    path = study(tmp_path, "n: [16, 24]")
    res = sweep.sweep(path, "ci", tmp_path / "out", dask="local", workers=2, progress=False)
    assert sorted(o.status for o in res.outcomes) == ["ok", "ok"]
    assert len(records(tmp_path / "out")) == 2


def test_gpu_slots_pin_one_gpu_per_worker(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert sweep.gpu_slots(3) == ["2", "5", "2"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(sweep.driver, "_cuda_count", lambda: 0)
    assert sweep.gpu_slots(2) == [None, None]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_killed_sweep_loses_nothing_and_resumes(tmp_path, sig):
    path = study(tmp_path, "n: [16, 20, 24, 28, 32]\nsleep_s: [0.3]")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "effllm_helpers.cli", "sweep", str(path), "-p", "ci", "-o",
           str(out), "--no-progress"]
    # a background parent (nohup, `&` in a script, some CI runners) may ignore SIGINT, and the
    # ignore would be inherited: give the sweep the default disposition a terminal gives it
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not sealed(out):
        time.sleep(0.1)
    first = sealed(out)
    assert first, "no run finished before the deadline"
    time.sleep(0.5)  # land somewhere inside the next run
    os.killpg(proc.pid, sig) if sig == signal.SIGKILL else proc.send_signal(sig)
    proc.wait(timeout=60)
    time.sleep(1.5)  # any orphan would have written by now
    mid = records(out)
    for rid, rec in mid.items():  # an ok record always belongs to a finished run
        assert rec["status"] == "ok" and rec["metrics"]["al_s"]["value"] > 0, rid
    assert len(mid) < 5, "the kill came too late to test anything"
    # a run killed between its notebook's record and papermill's save is unsealed: redone below
    mtimes = {rid: (out / "runs" / "sm" / rid / "record.json").stat().st_mtime
              for rid in sealed(out)}
    res = sweep.sweep(path, "ci", out, progress=False)
    final = records(out)
    expected = {r.run_id for r in studies.expand(path, "ci")}
    assert set(final) == expected
    assert all(r["status"] == "ok" and r["notebook_saved"] for r in final.values())
    for rid, mtime in mtimes.items():  # finished runs were not redone
        assert (out / "runs" / "sm" / rid / "record.json").stat().st_mtime == mtime
    assert sum(o.status == "cached" for o in res.outcomes) == len(mid)
    leftovers = [p for p in out.rglob("*.tmp")]
    assert not leftovers


def test_results_record_is_valid_for_collect(tmp_path):
    path = study(tmp_path, "n: [16]")
    sweep.sweep(path, "ci", tmp_path / "out", progress=False)
    df = results.collect(tmp_path / "out" / "runs")
    assert {"al_s", "tokens_per_s", "aec_w"} <= set(df.metric)


def test_relative_output_dir_lands_where_the_sweep_looks(tmp_path, monkeypatch):
    # the notebook runs with notebooks/ as its cwd; a relative -o must still be honoured
    path = study(tmp_path, "n: [16]")
    monkeypatch.chdir(tmp_path)
    res = sweep.sweep(path, "ci", Path("rel_out"), progress=False)
    assert [o.status for o in res.outcomes] == ["ok"]
    assert len(records(tmp_path / "rel_out")) == 1


def test_ok_record_is_sealed_after_papermill_saved_the_notebook(tmp_path):
    path = study(tmp_path, "n: [16]")
    res = sweep.sweep(path, "ci", tmp_path / "out", progress=False)
    (rid, rec), = records(tmp_path / "out").items()
    assert res.outcomes[0].status == "ok" and rec["notebook_saved"] is True
    nb = json.loads((tmp_path / "out" / "runs" / "sm" / rid / "run.ipynb").read_text())
    states = {c["metadata"]["papermill"]["status"] for c in nb["cells"]}
    assert states == {"completed"}  # the last cell (the record's writer) is saved as finished


def test_a_record_whose_notebook_was_never_saved_is_redone(tmp_path):
    path = study(tmp_path, "n: [16]")
    sweep.sweep(path, "ci", tmp_path / "out", progress=False)
    (rid, rec), = records(tmp_path / "out").items()
    rdir = tmp_path / "out" / "runs" / "sm" / rid
    results.write_record(rdir, {**rec, "notebook_saved": False})  # killed before the save
    again = sweep.sweep(path, "ci", tmp_path / "out", progress=False)
    assert [o.status for o in again.outcomes] == ["ok"]
    assert records(tmp_path / "out")[rid]["notebook_saved"] is True


def test_seal_flags_a_notebook_left_running(tmp_path):
    rec = results.new_record(run_id="r", study="s", axis="smoke", params={}, metrics={})
    results.write_record(tmp_path, {**rec, "notebook_saved": False})
    cell = {"cell_type": "code", "metadata": {"papermill": {"status": "running"}}}
    (tmp_path / sweep.RUN_NOTEBOOK).write_text(json.dumps({"cells": [cell]}))
    sealed = sweep.seal_record(tmp_path, "r")
    assert sealed is not None and sealed["notebook_saved"] is False
    assert "cell 0 still running" in sealed["notebook_problem"]
    assert not sweep._has_ok_record(tmp_path, "r")


def test_pretraining_data_caches_are_warmed_in_a_child_before_any_run(monkeypatch) -> None:
    # a tokenizer trained inside the first run's process stayed in that run's AMU (issue 17)
    import subprocess

    calls = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(cmd))
    runs = studies.expand("params/architecture/attention.yaml", "ci")
    runs += studies.expand("params/inference.yaml", "ci")
    specs = sweep.warm_data_caches(runs)
    assert len(specs) == 1  # every attention run shares one data spec; inference has none
    assert calls and calls[0][1:3] == ["-m", "effllm_helpers.data.warm"]
    assert calls[0][3:] == specs
