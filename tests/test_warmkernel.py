"""Warm kernels: forked from a sweep's zygote, still isolated, killed with their run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nbformat
import psutil
import pytest

from effllm_helpers import sweep, warmkernel

pytestmark = pytest.mark.slow
SMOKE = ("effllm_helpers.smoke",)


def _study(tmp_path: Path, grid: str) -> Path:
    path = tmp_path / "wk.yaml"
    path.write_text("study: wk\naxis: smoke\nnotebook: notebooks/smoke.ipynb\n"
                    f"grid:\n{textwrap.indent(grid, '  ')}\ntimeout_s: 120\n")
    return path


def _records(out: Path) -> dict[str, dict]:
    return {json.loads(p.read_text())["params"]["fail"]: json.loads(p.read_text())
            for p in (out / "runs" / "wk").glob("*/record.json")}


def test_a_sweep_forks_its_kernels_from_the_zygote_and_saves_each_notebook(tmp_path):
    res = sweep.sweep(_study(tmp_path, "n: [16, 24]"), "ci", tmp_path / "out", progress=False)
    assert [o.status for o in res.outcomes] == ["ok", "ok"]
    for rdir in (tmp_path / "out" / "runs" / "wk").iterdir():
        rec = json.loads((rdir / "record.json").read_text())
        assert rec["provenance"]["kernel_start"] == "zygote" and rec["notebook_saved"] is True
        assert (rdir / "run.ipynb").stat().st_size > 0


def test_a_killed_kernel_fails_its_run_alone_and_the_next_run_is_still_warm(tmp_path):
    res = sweep.sweep(_study(tmp_path, "fail: [crash, none]"), "ci", tmp_path / "out",
                      progress=False)
    by_fail = {o.run.params["fail"]: o for o in res.outcomes}
    assert by_fail["crash"].status == "failed"
    assert "DeadKernelError" in by_fail["crash"].reason  # nbclient saw the kernel die
    recs = _records(tmp_path / "out")
    assert recs["crash"]["status"] == "failed"
    assert recs["none"]["status"] == "ok"
    assert recs["none"]["provenance"]["kernel_start"] == "zygote"


def test_one_run_starts_a_cold_kernel(tmp_path):
    sweep.sweep(_study(tmp_path, "n: [16]"), "ci", tmp_path / "out", progress=False)
    (rec,) = _records(tmp_path / "out").values()
    assert rec["provenance"]["kernel_start"] == "cold"


def test_warm_kernels_can_be_turned_off(tmp_path, monkeypatch):
    monkeypatch.setenv(warmkernel.DISABLE_ENV, "0")
    sweep.sweep(_study(tmp_path, "n: [16, 24]"), "ci", tmp_path / "out", progress=False)
    assert {r["provenance"]["kernel_start"] for r in _records(tmp_path / "out").values()} == {
        "cold"}


def test_a_sweep_forks_from_a_shared_zygote_named_in_the_environment(tmp_path, monkeypatch):
    """make study starts one zygote for all its sweeps and names it in $EFFLLM_ZYGOTE."""
    z = warmkernel.Zygote(modules=SMOKE)
    try:
        assert z.ensure() and z.wait_ready(), z.refused
        monkeypatch.setenv(warmkernel.SOCKET_ENV, z.path)
        sweep.sweep(_study(tmp_path, "n: [16]"), "ci", tmp_path / "out", progress=False)
    finally:
        z.stop()
    (rec,) = _records(tmp_path / "out").values()
    assert rec["provenance"]["kernel_start"] == "zygote"  # one run, yet warm: the shared one


def _notebook(tmp_path: Path, *sources: str) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(s) for s in sources]
    path = tmp_path / "probe.ipynb"
    nbformat.write(nb, path)
    return path


@pytest.fixture()
def zygote(tmp_path):
    z = warmkernel.Zygote(modules=SMOKE)
    path = z.ensure()
    assert path and z.wait_ready(), z.refused
    yield z
    z.stop()


def _papermill(nb: Path, out: Path, sock: str, **env: str) -> subprocess.Popen:
    code = ("import sys, papermill as pm; from effllm_helpers import warmkernel; "
            "pm.execute_notebook(sys.argv[1], sys.argv[2], kernel_name='python3', "
            "progress_bar=False, cwd=sys.argv[3], "
            "kernel_manager_class=warmkernel.manager_class())")
    return subprocess.Popen([sys.executable, "-c", code, str(nb), str(out), str(nb.parent)],
                            env=dict(os.environ, **{warmkernel.SOCKET_ENV: sock}, **env),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_for(path: Path, timeout_s: float = 60) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        time.sleep(0.05)
    raise AssertionError(f"{path} never written")


def test_a_kernel_sees_its_runs_cwd_and_environment_not_the_zygotes(tmp_path, zygote):
    probe = tmp_path / "probe.json"
    nb = _notebook(tmp_path, "import json, os, sys\n"
                   f"json.dump({{'cwd': os.getcwd(), 'ppid': os.getppid(), "
                   f"'start': os.environ.get('{warmkernel.KERNEL_ENV}'), "
                   f"'probe': os.environ.get('EFFLLM_TEST_PROBE')}}, open({str(probe)!r}, 'w'))")
    proc = _papermill(nb, tmp_path / "out.ipynb", zygote.path, EFFLLM_TEST_PROBE="run-1")
    assert proc.wait(120) == 0
    seen = json.loads(probe.read_text())
    assert seen["ppid"] == zygote.proc.pid and seen["start"] == "zygote"
    assert seen["cwd"] == str(tmp_path) != os.getcwd() and seen["probe"] == "run-1"


def test_a_killed_shim_takes_its_kernel_along(tmp_path, zygote):
    """A sweep's timeout kills the runner's process tree, which reaches the shim, not the
    kernel (a child of the zygote): the zygote must kill the kernel itself."""
    pidfile = tmp_path / "pid"
    nb = _notebook(tmp_path, f"import os, time\nopen({str(pidfile)!r}, 'w').write("
                   "str(os.getpid()))\ntime.sleep(120)")
    proc = _papermill(nb, tmp_path / "out.ipynb", zygote.path)
    kernel = int(_wait_for(pidfile))
    shims = [p for p in psutil.Process(proc.pid).children(recursive=True)
             if "shim" in " ".join(p.cmdline())]
    assert len(shims) == 1
    shims[0].kill()
    deadline = time.monotonic() + 10
    while psutil.pid_exists(kernel) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not psutil.pid_exists(kernel)
    proc.kill()
    proc.wait()


def test_without_a_zygote_the_shim_starts_a_cold_kernel(tmp_path):
    probe = tmp_path / "probe.txt"
    nb = _notebook(tmp_path, f"import os\nopen({str(probe)!r}, 'w').write("
                   f"str(os.environ.get('{warmkernel.KERNEL_ENV}')))")
    proc = _papermill(nb, tmp_path / "out.ipynb", str(tmp_path / "no-such.sock"))
    assert proc.wait(120) == 0 and probe.read_text() == "None"


def _zygote_importing(tmp_path: Path, source: str) -> warmkernel.Zygote:
    (tmp_path / "wk_probe_mod.py").write_text(source)
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    return warmkernel.Zygote(env=env, modules=["wk_probe_mod"])


def test_a_zygote_whose_imports_start_a_thread_refuses_and_is_not_restarted(tmp_path):
    z = _zygote_importing(tmp_path, "import threading, time\n"
                          "threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n")
    try:
        assert z.ensure() and not z.wait_ready(60)
        assert "Python thread" in z.refused
        assert z.ensure() is None and z.starts == 1
    finally:
        z.stop()


def test_a_zygote_that_keeps_dying_is_given_up(tmp_path):
    z = _zygote_importing(tmp_path, "import os\nos._exit(5)\n")
    try:
        while z.ensure():
            assert not z.wait_ready(60)
        assert z.starts == warmkernel.Zygote.MAX_STARTS and "died 3 times" in z.refused
    finally:
        z.stop()


def test_preload_lists_only_the_axes_a_sweep_runs():
    mods = warmkernel.preload_for({"smoke"})
    assert "effllm_helpers.smoke" in mods and "peft" not in mods
    ft = warmkernel.preload_for({"finetuning"})
    assert {"peft", "effllm_helpers.axes.finetuning"} <= set(ft)
    assert "effllm_helpers.axes.inference" not in ft
