"""Project hygiene the README promises: env files agree, notebooks are clean, every CLI helps."""

from __future__ import annotations

import json
import re
import tomllib

import pytest
import yaml
from packaging.requirements import Requirement
from typer.testing import CliRunner

from effllm_helpers import config, environment, studies
from effllm_helpers.cli import app

ROOT = config.REPO_ROOT


def _norm(req: str) -> str:
    return re.sub(r"\s+", "", req).lower()


def _pyproject_requirements(*extras: str) -> list[Requirement]:
    py = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = py["dependencies"] + [r for e in extras for r in py["optional-dependencies"][e]]
    return [Requirement(r) for r in reqs]


@pytest.mark.parametrize(("lock", "extras"), [(environment.CPU_LOCK, ("dev",)),
                                              (environment.CUDA_LOCK, ("dev", "gpu"))],
                         ids=["cpu", "cuda"])
def test_lock_pins_every_pyproject_dependency_inside_its_range(lock, extras):
    """A dependency added or re-ranged in pyproject.toml without `make lock` fails here."""
    pins = environment.read_lock(lock)
    for req in _pyproject_requirements(*extras):
        name = environment.canonical(req.name)
        assert name in pins, f"{lock.name} does not pin {req.name}: run `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"{lock.name} pins {name}=={pins[name]}, outside pyproject's {req}: run `make lock`")


def test_cuda_lock_is_the_cpu_lock_plus_the_cuda_packages():
    cpu, cuda = (environment.read_lock(p) for p in (environment.CPU_LOCK, environment.CUDA_LOCK))
    assert {n: v for n, v in cuda.items() if n in cpu} == cpu
    assert {"triton", "fla-core", "liger-kernel", "gemlite"} <= set(cuda) - set(cpu)


def test_environment_yml_installs_the_cpu_lock_with_its_python():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert pip == ["-c requirements/lock-cpu.txt", "-e .[dev]"]
    locked_py = re.search(r"with Python (\d+\.\d+)", environment.CPU_LOCK.read_text()).group(1)
    assert f"python={locked_py}" in env["dependencies"]


def test_make_setup_installs_through_the_cpu_lock():
    make = (ROOT / "Makefile").read_text()
    assert re.search(r"^LOCK\s+\?= requirements/lock-cpu\.txt$", make, re.M)
    assert '-m pip install -q -c $(LOCK) -e ".[dev]"' in make
    assert "$(STAMP): pyproject.toml $(LOCK)" in make  # a new lock reinstalls


def test_torch_is_pinned():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "torch==2.13.0" in deps


NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[n.name for n in NOTEBOOKS])
def test_notebook_is_stored_clean_with_a_parameters_cell(nb):
    data = json.loads(nb.read_text())
    code = [c for c in data["cells"] if c["cell_type"] == "code"]
    assert "parameters" in code[0].get("metadata", {}).get("tags", [])
    for cell in code:
        assert not cell.get("outputs") and cell.get("execution_count") is None


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[n.name for n in NOTEBOOKS])
def test_notebook_is_in_sync_with_its_percent_script(nb):
    """The .py twin (jupytext percent format, in notebooks/py/ so the file browser shows one
    notebook per study) is what diffs show; it must say the same thing."""
    import jupytext

    assert not nb.with_suffix(".py").exists()  # no twin beside the notebook
    script = jupytext.read(nb.parent / "py" / f"{nb.stem}.py")
    stored = json.loads(nb.read_text())
    assert [c.source for c in script.cells] == ["".join(c["source"]) if isinstance(
        c["source"], list) else c["source"] for c in stored["cells"]]
    assert stored["metadata"]["kernelspec"]["name"] == "python3"


def test_every_study_notebook_exists():
    for f in ROOT.glob("params/**/*.yaml"):
        if f.parent.name != "presets":
            assert studies.notebook_path(config.load_yaml(f)["notebook"]).is_file(), f


@pytest.mark.parametrize("cmd", [[], ["sweep"], ["validate"], ["collect"], ["report"]])
def test_every_subcommand_has_help_describing_its_options(cmd):
    out = CliRunner().invoke(app, [*cmd, "--help"])
    assert out.exit_code == 0, out.output
    text = out.output
    if cmd == ["sweep"]:
        for opt in ("--preset", "--output-dir", "--workers", "--dask", "--retry-failed",
                    "--dry-run", "--timeout"):
            assert opt in text


def test_cli_validate_reports_bad_params_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("study: x\naxis: smoke\nnotebook: notebooks/smoke.ipynb\ngrid: {n: [0]}\n")
    out = CliRunner().invoke(app, ["validate", str(bad)])
    assert out.exit_code == 2
    assert "n: Input should be greater than 0" in out.output
    assert "Traceback" not in out.output


def test_cli_dry_run_lists_runs(tmp_path):
    out = CliRunner().invoke(app, ["sweep", "params/smoke/smoke.yaml", "-p", "ci", "--dry-run",
                                   "-o", str(tmp_path)])
    assert out.exit_code == 0, out.output
    assert "2 runs" in out.output and "todo" in out.output


def test_cli_sweeps_several_study_files_and_validates_all_first(tmp_path):
    args = ["sweep", "params/smoke/smoke.yaml", "params/inference.yaml", "-p", "ci",
            "-o", str(tmp_path)]
    out = CliRunner().invoke(app, [*args, "--dry-run"])
    assert out.exit_code == 0, out.output
    assert "precision=" in out.output and "n=" in out.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("study: x\naxis: smoke\nnotebook: notebooks/smoke.ipynb\ngrid: {n: [0]}\n")
    out = CliRunner().invoke(app, ["sweep", "params/smoke/smoke.yaml", str(bad), "-p", "ci",
                                   "-o", str(tmp_path / "o"), "--no-progress"])
    assert out.exit_code == 2 and "n: Input should be greater than 0" in out.output
    assert not (tmp_path / "o" / "runs").exists()  # the good first file did not run either


def test_cli_only_selects_grid_points_and_rejects_unknown_values(tmp_path):
    args = ["sweep", "params/inference.yaml", "-p", "ci", "--dry-run", "-o", str(tmp_path)]
    out = CliRunner().invoke(app, [*args, "--only", "precision=int8,int4-nf4"])
    assert out.exit_code == 0, out.output
    assert "2 runs" in out.output and "precision=int8" in out.output
    bad = CliRunner().invoke(app, [*args, "--only", "precision=int3"])
    assert bad.exit_code == 2 and "allowed: fp32, bf16" in bad.output


@pytest.mark.parametrize("cmd", [["collect"], ["report"]])
def test_missing_results_folder_is_a_clear_error(cmd, tmp_path):
    out = CliRunner().invoke(app, [*cmd, "--results", str(tmp_path / "nope"), "-o",
                                   str(tmp_path)])
    assert out.exit_code == 2
    assert "--results: no such folder" in out.output and "Traceback" not in out.output


def test_output_dir_help_names_the_real_default():
    out = CliRunner().invoke(app, ["sweep", "--help"], terminal_width=200)
    text = " ".join(out.output.split())
    assert "./outputs" not in text
    assert "EFFLLM_OUTPUTS" in text and "<repo>/outputs" in text


@pytest.mark.parametrize("cmd", [["sweep", "params/smoke/smoke.yaml", "-p", "ci", "--dry-run"],
                                 ["collect"], ["report"]])
def test_output_dir_that_is_a_file_is_a_clear_error(cmd, tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    out = CliRunner().invoke(app, [*cmd, "-o", str(f)])
    assert out.exit_code == 2, out.output
    assert "is an existing file, not a folder" in out.output and "Traceback" not in out.output


@pytest.mark.parametrize("cmd", ["validate", "sweep"])
def test_selecting_no_runs_is_a_params_error(cmd, tmp_path):
    args = [cmd, "params/inference.yaml", "-p", "ci", "--only", "precision=int8",
            "--set", "precision=bf16"]
    if cmd == "sweep":
        args += ["-o", str(tmp_path), "--no-progress"]
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 2, out.output
    assert "--only precision=int8 selects no runs" in out.output
    assert not (tmp_path / "runs").exists()


def test_infinite_timeout_is_a_params_error(tmp_path):
    out = CliRunner().invoke(app, ["sweep", "params/smoke/smoke.yaml", "-p", "ci", "-o",
                                   str(tmp_path), "--timeout", "inf", "--no-progress"])
    assert out.exit_code == 2, out.output
    assert "--timeout: must be a finite number" in out.output and "Traceback" not in out.output


def test_bad_dask_address_is_a_clear_error(tmp_path):
    out = CliRunner().invoke(app, ["sweep", "params/smoke/smoke.yaml", "-p", "ci", "-o",
                                   str(tmp_path), "--dask", "bogus", "--no-progress"])
    assert out.exit_code == 2, out.output
    assert "--dask 'bogus': cannot connect to a Dask scheduler" in out.output
    assert "Traceback" not in out.output


def test_the_whole_tree_is_ruff_clean_notebooks_included() -> None:
    # `make lint`: a moved module once left every notebook's imports unsorted unnoticed
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed (the dev extra)")
    proc = subprocess.run([ruff, "check", "--no-cache", "."], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:]
