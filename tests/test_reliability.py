"""Reliability: hostile or broken inputs, kills and concurrent sweeps end in clear messages and
intact records, never a hang, a traceback or a lost result."""

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
from typer.testing import CliRunner

from effllm_helpers import config, results, studies
from effllm_helpers.cli import app

SMOKE = "study: sm\naxis: smoke\nnotebook: notebooks/smoke.ipynb\n"


def write(tmp_path: Path, text: str, name: str = "study.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def cli(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line_refusal(res) -> str:
    """The CLI refused with exit 2 and a short message, not a traceback."""
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    assert "Traceback" not in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)
    return res.output


# ---------------------------------------------------------------- 1. billion laughs
LAUGHS = SMOKE + 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n"
    for p, n in zip("abcdefgh", "bcdefghi", strict=True))


def test_nested_aliases_are_refused_fast_with_a_clear_message(tmp_path):
    path = write(tmp_path, LAUGHS + "grid: {n: *i}\n")
    assert len(path.read_bytes()) < 500
    t0 = time.monotonic()
    with pytest.raises(config.ParamsError, match="expands to more than .* values"):
        studies.expand(path)
    assert time.monotonic() - t0 < 10  # generous: it takes well under a second


def test_validate_refuses_nested_aliases_in_a_message_not_a_hang(tmp_path):
    path = write(tmp_path, LAUGHS + "grid: {n: [1]}\nbase: {x: *i}\n")
    out = one_line_refusal(cli("validate", path))
    assert "expands to more than" in out and len(out) < 400


def test_recursive_alias_is_refused(tmp_path):
    path = write(tmp_path, SMOKE + "grid: &g {n: [1], m: *g}\n")
    with pytest.raises(config.ParamsError):
        studies.expand(path)


@pytest.mark.parametrize("grid", [f"{{n: [1], {'x' * 1000}: [2]}}",  # YAML's longest plain key
                                  f"{{n: [1], fail: [{'x' * 200_000}]}}"])
def test_a_huge_bad_value_gives_a_short_message(tmp_path, grid):
    path = write(tmp_path, SMOKE + f"grid: {grid}\n")
    with pytest.raises(config.ParamsError) as info:
        studies.expand(path)
    assert "grid" in str(info.value) and len(str(info.value)) < 1000


def test_deep_nesting_is_refused_with_a_message(tmp_path):
    path = write(tmp_path, SMOKE + "grid: {n: [1]}\nbase: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(config.ParamsError, match="nested"):
        studies.expand(path)


# ---------------------------------------------------------------- 2. concurrent sweeps
def _records(out: Path, name: str = "sm") -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text())
            for p in sorted((out / "runs" / name).glob("*/record.json"))}


def _counts(summary: str, name: str = "sm") -> dict[str, int]:
    """``sm: 2 ok, 1 elsewhere`` (the summary's last line) -> {"ok": 2, "elsewhere": 1}."""
    line = [ln for ln in summary.splitlines() if ln.startswith(f"{name}: ")][-1]
    return {k: int(n) for n, k in (part.split(" ", 1) for part in line[len(name) + 2:]
                                   .split(", "))}


@pytest.mark.slow
def test_two_sweeps_on_one_folder_execute_each_run_once(tmp_path):
    path = write(tmp_path, SMOKE + "grid: {n: [16, 20, 24], sleep_s: [0.3]}\ntimeout_s: 120\n")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "effllm_helpers.cli", "sweep", str(path), "-p", "ci", "-o",
           str(out), "--no-progress"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    counts = [_counts(o) for o in outputs]
    executed = sum(c.get("ok", 0) for c in counts)
    assert executed == 3, outputs  # every run ran once, in one of the two sweeps
    recs = _records(out)
    assert len(recs) == 3 and all(r["status"] == "ok" for r in recs.values())
    assert all(set(c) <= {"ok", "cached", "elsewhere"} for c in counts), counts


# ---------------------------------------------------------------- 3. embedded builder lifetime
PARENT = """
import sys, time
from effllm_helpers.models import embedded
child = embedded.spawn_child([sys.executable, "-c", "import time; time.sleep(120)"])
print(child.pid, flush=True)
time.sleep(120)
"""


@pytest.mark.slow
def test_embedded_builder_child_dies_with_a_killed_parent():
    import psutil

    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parent.parent)
    child = psutil.Process(int(parent.stdout.readline()))
    try:
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and child.is_running() \
                and child.status() != psutil.STATUS_ZOMBIE:
            time.sleep(0.1)
        assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
    finally:
        if child.is_running():
            child.kill()


# ---------------------------------------------------------------- 4. inf, nan, int64
ARCH = "study: a\naxis: architecture\nnotebook: notebooks/01_architecture.ipynb\n"


@pytest.mark.parametrize(("text", "where", "value"), [
    (SMOKE + "grid: {n: [16]}\nweights: {al_s: .inf}\n", "weights.al_s", "Infinity"),
    (SMOKE + "grid: {sleep_s: [.inf]}\n", "sleep_s", "Infinity"),
    (SMOKE + "grid: {sleep_s: [.nan]}\n", "sleep_s", "NaN"),
    (ARCH + "grid: {train.weight_decay: [.inf]}\n", "train.weight_decay", "Infinity"),
    (SMOKE + "grid: {n: [9223372036854775808]}\n", "n", "9223372036854775808"),
    (SMOKE + "grid: {n: [16]}\nseeds: [18446744073709551616]\n", "seeds",
     "18446744073709551616"),
], ids=["weight", "sleep_s", "sleep_nan", "weight_decay", "int64_param", "int64_seed"])
def test_non_finite_and_out_of_range_numbers_are_refused(tmp_path, text, where, value):
    with pytest.raises(config.ParamsError) as info:
        studies.expand(write(tmp_path, text), "ci")
    msg = str(info.value)
    assert where in msg and value in msg, msg
    assert "finite number" in msg or "int64" in msg, msg


# ---------------------------------------------------------------- 5. output folders and names
def _bad_outputs(tmp_path: Path) -> dict[str, Path]:
    afile = tmp_path / "afile"
    afile.write_text("x")
    return {"under a file": afile / "out", "in /proc": Path("/proc/effllm-out"),
            "a file": afile, "name too long": tmp_path / ("o" * 300)}


@pytest.mark.parametrize("case", ["under a file", "in /proc", "a file", "name too long"])
@pytest.mark.parametrize("command", ["sweep", "collect"])
def test_unusable_output_folder_is_a_one_line_message(tmp_path, case, command):
    out = _bad_outputs(tmp_path)[case]
    study = write(tmp_path, SMOKE + "grid: {n: [16]}\n")
    args = [command, study, "-p", "ci"] if command == "sweep" else [command]
    msg = one_line_refusal(cli(*args, "-o", out))
    assert "--output-dir" in msg and len(msg.strip().splitlines()) == 1, msg


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permissions")
def test_read_only_output_folder_is_a_one_line_message(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    study = write(tmp_path, SMOKE + "grid: {n: [16]}\n")
    msg = one_line_refusal(cli("sweep", study, "-p", "ci", "-o", ro / "out"))
    assert "cannot create or write" in msg


def test_long_study_name_is_refused_by_the_cli(tmp_path):
    study = write(tmp_path, SMOKE.replace("study: sm", "study: " + "s" * 300) + "grid: {n: [1]}\n")
    msg = one_line_refusal(cli("sweep", study, "-p", "ci", "-o", tmp_path / "out"))
    assert "study" in msg and "100 characters" in msg
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- 6. what may run as code
@pytest.mark.parametrize("notebook", ["README.md", "/etc/hostname", "notebooks/../README.md"])
def test_a_study_may_only_name_the_projects_notebooks(tmp_path, notebook):
    text = SMOKE.replace("notebooks/smoke.ipynb", notebook) + "grid: {n: [16]}\n"
    path = write(tmp_path, text)
    with pytest.raises(config.ParamsError, match="not one of the project's notebooks"):
        studies.expand(path, "ci")
    msg = one_line_refusal(cli("sweep", path, "-p", "ci", "-o", tmp_path / "out"))
    assert "--trusted-notebook" in msg and not (tmp_path / "out").exists()


def test_trusted_notebook_flag_allows_a_notebook_of_your_own(tmp_path):
    own = tmp_path / "mine.ipynb"
    own.write_text("{}")
    path = write(tmp_path, SMOKE.replace("notebooks/smoke.ipynb", str(own)) + "grid: {n: [1]}\n")
    res = cli("validate", path, "--trusted-notebook")
    assert res.exit_code == 0 and "ok, 1 runs" in res.output, res.output


@pytest.mark.parametrize("preset", ["../../x", "/etc/hostname", "presets/ci", "ci.yaml"])
def test_preset_is_a_name_not_a_path(tmp_path, preset):
    path = write(tmp_path, SMOKE + "grid: {n: [16]}\n")
    msg = one_line_refusal(cli("validate", path, "-p", preset))
    assert "--preset-file" in msg and "ci" in msg


def test_preset_file_gives_an_explicit_preset(tmp_path):
    preset = write(tmp_path, "smoke: {steps: 3}\n", "mine.yaml")
    path = write(tmp_path, SMOKE + "grid: {n: [16]}\n")
    (run,) = studies.expand(path, Path(preset))
    assert run.params["steps"] == 3
    assert cli("validate", path, "--preset-file", preset).exit_code == 0
    one_line_refusal(cli("validate", path, "-p", "ci", "--preset-file", preset))


# ---------------------------------------------------------------- 7. malformed records
def _good(run_id: str = "good0000") -> dict:
    return results.new_record(run_id=run_id, study="s", axis="smoke", params={"n": 1},
                              metrics={"al_s": results.metric(0.5, "s", "timer")})


def _bad_records(root: Path) -> dict[str, str]:
    """A folder of broken records; returns name -> the words its warning must contain."""
    def put(name: str, text: str) -> None:
        (root / name).mkdir(parents=True)
        (root / name / "record.json").write_text(text)

    put("a_good", json.dumps(_good()))
    put("future", json.dumps(_good("fut") | {"schema_version": 99}))
    put("status", json.dumps(_good("st") | {"status": "exploded"}))
    put("z_dup", json.dumps(_good()))
    put("bigint", json.dumps(_good("big")).replace("0.5", "1" + "0" * 400))
    put("hugeint", json.dumps(_good("huge")).replace("0.5", "1" + "0" * 5000))
    put("prov", json.dumps(_good("prov") | {"provenance": "laptop"}))
    put("deep", '{"a": ' * 100_000 + "1" + "}" * 100_000)
    put("inf", json.dumps(_good("inf")).replace("0.5", "Infinity"))
    put("garbage", "{not json")
    put("list", "[1, 2]")
    (root / "fifo").mkdir()
    os.mkfifo(root / "fifo" / "record.json")
    (root / "adir" / "record.json").mkdir(parents=True)
    return {"future": "schema_version", "status": "status", "z_dup": "duplicate run_id",
            "bigint": "finite", "hugeint": "JSON", "prov": "provenance", "deep": "nested",
            "inf": "Infinity", "garbage": "JSON", "list": "object", "fifo": "regular file",
            "adir": "regular file"}


def test_collect_skips_malformed_records_with_a_warning_each(tmp_path):
    expected = _bad_records(tmp_path / "runs")
    problems: list = []
    t0 = time.monotonic()
    df = results.collect(tmp_path / "runs", problems)
    assert time.monotonic() - t0 < 30  # the FIFO is not opened for reading
    assert set(df.run_id) == {"good0000"} and len(df) == 1
    why = {p.parent.name: reason for p, reason in problems}
    assert set(why) == set(expected), why
    for name, words in expected.items():
        assert words in why[name], (name, why[name])


def test_collect_cli_counts_skips_and_fails_under_strict(tmp_path):
    _bad_records(tmp_path / "runs")
    res = cli("collect", "-o", tmp_path)
    assert res.exit_code == 0, res.output
    assert "1 runs, 1 rows, 12 records skipped" in res.output
    assert res.output.count("warning: skipped") == 12 and "Traceback" not in res.output
    assert cli("collect", "-o", tmp_path, "--strict").exit_code == 1


# ---------------------------------------------------------------- 8. small ones
def test_yaml_merge_keys_are_accepted_and_duplicates_still_refused(tmp_path):
    text = SMOKE + "x-base: &b {n: 16, steps: 3}\nbase: {<<: *b, steps: 4}\ngrid: {n: [16]}\n"
    loaded = config.load_yaml(write(tmp_path, text))
    assert loaded["base"] == {"n": 16, "steps": 4}
    with pytest.raises(config.ParamsError, match="duplicate key"):
        config.load_yaml(write(tmp_path, SMOKE + "base: {<<: {n: 1}, m: 1, m: 2}\n", "d.yaml"))


@pytest.mark.parametrize(("ename", "evalue"), [
    ("RuntimeError", "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: "
                     "can't allocate memory: you tried to allocate 1099511627776 bytes."),
    ("MemoryError", ""),
])
def test_cpu_out_of_memory_is_classified_oom(ename, evalue):
    from effllm_helpers.run import classify_failure

    assert classify_failure(ename, evalue) == "oom"


def test_records_are_world_readable(tmp_path):
    path = results.write_record(tmp_path, _good())
    assert path.stat().st_mode & 0o777 == 0o644


def test_csv_export_neutralises_formulas_but_parquet_keeps_the_text(tmp_path):
    import pandas as pd

    rec = _good() | {"params": {"model": "=HYPERLINK(\"http://x\")", "n": -3}}
    pq, csv = results.write_tidy(pd.DataFrame(results.tidy_rows(rec)), tmp_path)
    text = csv.read_text()
    assert "'=HYPERLINK" in text and ",-3," in text
    assert pd.read_parquet(pq)["p.model"].iloc[0].startswith("=HYPERLINK")


def test_timeout_past_what_a_wait_accepts_and_overlong_notebook_path_are_refused(tmp_path):
    big = write(tmp_path, SMOKE + "grid: {n: [16]}\ntimeout_s: 1.0e+21\n")
    with pytest.raises(config.ParamsError, match="timeout_s"):
        studies.expand(big, "ci")
    long_nb = write(tmp_path, SMOKE.replace("notebooks/smoke.ipynb", "x" * 5000)
                    + "grid: {n: [16]}\n", "nb.yaml")
    with pytest.raises(config.ParamsError, match="notebook"):
        studies.expand(long_nb, "ci")


def test_more_docname_items_than_the_stdlib_holds_are_refused_before_compute():
    """The domain study at the gpu preset asked 8,192 + 256 items of a ~4,900-item pool."""
    from effllm_helpers.data.tasks import docname_pool

    have = len(docname_pool())
    with pytest.raises(config.ParamsError, match=rf"standard library gives {have}; allowed: at "
                                                 rf"most {have}"):
        studies.expand(config.REPO_ROOT / "params/finetuning/domain.yaml", "ci",
                       overrides={"n_train": have, "n_eval": 16})
    assert studies.expand(config.REPO_ROOT / "params/finetuning/domain.yaml", "ci",
                          overrides={"n_train": have - 16, "n_eval": 16})
