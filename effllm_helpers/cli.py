"""The ``effllm`` command: validate params, run sweeps, collect results, build the report."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from . import config, results, studies, warmkernel
from .axes.spec import DEFAULT_AXIS, SPECS, STUDY_AXES
from .paths import outputs_dir
from .runenv import TASK_FILES_ENV

app = typer.Typer(
    add_completion=False, no_args_is_help=True,
    help="effllm: measure what LLM efficiency techniques cost and buy, on your own hardware "
         "(EfficientLLM, arXiv 2505.13840).",
)

StudyArg = Annotated[Path, typer.Argument(help="Study params file, e.g. params/smoke/smoke.yaml.")]
PresetOpt = Annotated[str | None, typer.Option(
    "--preset", "-p",
    help="Size/budget preset overlaid on the study: ci, tiny, gpu or paper "
         "(params/presets/<name>.yaml). Omit for the schema defaults.")]
PresetFileOpt = Annotated[Path | None, typer.Option(
    "--preset-file", help="A preset of your own, as a YAML file laid out like "
                          "params/presets/*.yaml (instead of --preset).")]
TrustedOpt = Annotated[bool, typer.Option(
    "--trusted-notebook", help="Allow a study whose notebook: is not one of the project's axis "
                               "notebooks (it will be executed as code).")]
SetOpt = Annotated[list[str] | None, typer.Option(
    "--set", "-s", help="Override a params key for every run, KEY=VALUE with a dotted key and a "
                        "YAML value, e.g. --set train.steps=100 --set train.compile=false. "
                        "Applied last (over the preset and the grid); changes the run ids.")]
OnlyOpt = Annotated[list[str] | None, typer.Option(
    "--only", help="Run only the grid points whose choice of a grid key is one of these, "
                   "GRIDKEY=VALUE[,VALUE...], e.g. --only precision=int8,int4-nf4 (repeat for "
                   "several keys). Keeps the run ids, so the records merge with a full sweep.")]
TaskFilesOpt = Annotated[bool, typer.Option(
    "--allow-task-files", help="Allow params lm_eval_tasks to name lm-eval task YAML files (a "
                               "task file's !function imports and runs Python beside it, in "
                               "the run's kernel); without it only task names of lm-eval's "
                               f"registry are accepted. Same as {TASK_FILES_ENV}=1.")]
OutOpt = Annotated[Path | None, typer.Option(
    "--output-dir", "-o", help="Root for runs/, results/ and figures/ (default: $EFFLLM_OUTPUTS, "
                               "else <repo>/outputs).")]


def _fail(msg: str, code: int = 2) -> None:
    typer.secho(config.printable(msg), fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _echo(text: str) -> None:
    """Print: control characters escaped (a key or a path from a file must not drive the
    terminal) and lone surrogates escaped (a strict UTF-8 terminal raises on them)."""
    typer.echo(config.printable(text))


def _allow_task_files(allowed: bool) -> None:
    """``--allow-task-files``: said in the environment, which the runs' kernels inherit."""
    if allowed:
        os.environ[TASK_FILES_ENV] = "1"


def _output_root(path: Path | None, writable: bool = True, option: str = "--output-dir") -> Path:
    """The output root (``-o`` or the default), checked before any work: an existing file there,
    or a folder that cannot be created or written (under a file, in ``/proc``, read-only), is a
    one-line error, not a traceback after the first run."""
    out = Path(path) if path else outputs_dir()
    shown = config.short_text(repr(str(out)), 200)
    try:
        is_file = out.exists() and not out.is_dir()
    except OSError as exc:  # e.g. a name too long for the filesystem
        _fail(f"{option}: unusable folder {shown} ({exc.strerror or type(exc).__name__})")
    if is_file:
        _fail(f"{option}: {shown} is an existing file, not a folder (give a folder for "
              "runs/, results/ and figures/)")
    if writable:
        import tempfile

        try:
            out.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=out, prefix=".effllm-probe-"):
                pass
        except OSError as exc:
            _fail(f"{option}: cannot create or write folder {shown} "
                  f"({exc.strerror or type(exc).__name__})")
    return out


def _preset(name: str | None, path: Path | None) -> str | Path | None:
    """``--preset NAME`` or ``--preset-file PATH``, not both; an empty name is no preset
    silently, so it is refused."""
    if name is not None and not name.strip():
        _fail(f"--preset {name!r}: empty; allowed: {', '.join(config.available_presets())} "
              "(or leave --preset out for the schema defaults)")
    if name and path:
        _fail("--preset and --preset-file: give one of them")
    return path if path else name


StrictOpt = Annotated[bool, typer.Option(
    "--strict", help="Exit 1 if any record file was skipped (unreadable, malformed, another "
                     "schema version, a duplicate run id).")]


def _warn_skipped(problems: list[tuple[Path, str]]) -> None:
    for path, reason in problems:
        typer.secho(config.printable(f"warning: skipped {path}: {reason}"),
                    fg=typer.colors.YELLOW, err=True)


def _results_folder(path: Path) -> Path:
    """A folder to read records from; a missing one is an error, not an empty report."""
    if not Path(path).is_dir():
        _fail(f"--results: no such folder {str(path)!r} (give the folder that holds the "
              "runs' record.json files, e.g. outputs/runs or outputs/reference/<device>)")
    return Path(path)


@app.command()
def validate(study: StudyArg, preset: PresetOpt = None, set_: SetOpt = None,
             only: OnlyOpt = None, preset_file: PresetFileOpt = None,
             trusted_notebook: TrustedOpt = False, allow_task_files: TaskFilesOpt = False
             ) -> None:
    """Validate a study file under a preset and print how many runs it expands to (no compute)."""
    _allow_task_files(allow_task_files)
    try:
        runs = studies.expand(study, _preset(preset, preset_file), studies.parse_overrides(set_),
                             studies.parse_only(only), trusted_notebook)
    except config.ParamsError as exc:
        _fail(str(exc))
    _echo(f"{config.shown_path(study)}: ok, {len(runs)} runs")


MAX_WORKERS = 256  # runs at once on one machine or cluster; more is a typo, not a plan
StudiesArg = Annotated[list[Path], typer.Argument(
    help="One or more study params files (e.g. params/cross_modal/*.yaml), swept in order.")]


@app.command()
def sweep(
    study_files: StudiesArg,
    preset: PresetOpt = None,
    output_dir: OutOpt = None,
    workers: Annotated[int, typer.Option(
        "--workers", "-w", min=1, max=MAX_WORKERS,
        help="Runs executed at once, as separate processes; each is pinned to one GPU "
             "(CUDA_VISIBLE_DEVICES) when the machine has GPUs.")] = 1,
    dask: Annotated[str | None, typer.Option(
        help="Submit runs to a dask.distributed cluster: a scheduler address "
             "(tcp://host:8786, e.g. from dask-jobqueue on SLURM) or 'local' for a LocalCluster "
             "with --workers processes. The output dir must be on a shared filesystem.")] = None,
    retry_failed: Annotated[bool, typer.Option(
        "--retry-failed", help="Also re-run runs whose record says failed or skipped "
                               "(by default only missing runs are executed).")] = False,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="List the runs with their ids and state, then exit.")] = False,
    timeout: Annotated[float | None, typer.Option(
        "--timeout", min=1, help="Per-run wall-clock limit in seconds (overrides the study's "
                                 "timeout_s); a run past it is killed and recorded as failed.")
    ] = None,
    no_progress: Annotated[bool, typer.Option(
        "--no-progress", help="Hide the progress bar (e.g. in logs).")] = False,
    set_: SetOpt = None,
    only: OnlyOpt = None,
    preset_file: PresetFileOpt = None,
    trusted_notebook: TrustedOpt = False,
    allow_task_files: TaskFilesOpt = False,
    seeds: Annotated[str | None, typer.Option(
        "--seeds", help="Comma-separated seeds replacing the study's (e.g. 0,1,2): repeats "
                        "whose spread the figures and ranks read.")] = None,
) -> None:
    """Run every grid point of one or more studies through their notebook (papermill), resuming
    where they left.

    Every study file is validated before the first run. Runs that already have an ok record are
    skipped; failures are recorded with their reason and the sweep goes on. Exits 1 if any run
    failed, 2 on invalid params.
    """
    from . import sweep as sw

    _allow_task_files(allow_task_files)
    out = _output_root(output_dir, writable=False)
    expanded = []
    try:
        studies.check_timeout(timeout)
        overrides = studies.parse_overrides(set_)
        selected = studies.parse_only(only)
        preset = _preset(preset, preset_file)
        seed_list = studies.parse_seeds(seeds)
        for study in study_files:
            expanded.append(studies.expand(study, preset, overrides, selected,
                                           trusted_notebook, seed_list))
    except config.ParamsError as exc:
        _fail(str(exc))
    if not dry_run:  # valid params first, so a typo does not leave an empty folder behind
        _output_root(out)
    if dry_run:
        for runs in expanded:
            _echo(sw.dry_run_table(runs, out))
        _echo(f"{sum(len(r) for r in expanded)} runs")
        return
    exit_code = 0
    for study in study_files:
        try:
            res = sw.sweep(study, preset, out, workers=workers, dask=dask,
                           retry_failed=retry_failed, timeout_s=timeout,
                           progress=not no_progress, overrides=overrides, only=selected,
                           trusted_notebook=trusted_notebook, seeds=seed_list)
        except KeyboardInterrupt:
            typer.secho("\ninterrupted: finished runs keep their records; rerun to complete "
                        "the rest", fg=typer.colors.YELLOW, err=True)
            raise typer.Exit(130) from None
        except (config.ParamsError, sw.DaskConnectError) as exc:
            _fail(str(exc))
        _echo(sw.summary_table(res, out))
        _echo(f"records under {out / 'runs' / res.study}")
        exit_code = max(exit_code, res.exit_code)
    raise typer.Exit(exit_code)


@app.command()
def collect(
    results_dir: Annotated[Path | None, typer.Option(
        "--results", "-r", help="Folder searched (recursively) for record.json files "
                                "(default: <output-dir>/runs).")] = None,
    output_dir: OutOpt = None,
    strict: StrictOpt = False,
) -> None:
    """Gather every record into one tidy long table: results/results.{parquet,csv}.

    Invalid record files are skipped with a warning naming the file and the reason.
    """
    out = _output_root(output_dir)
    src = _results_folder(results_dir or out / "runs")
    problems: list[tuple[Path, str]] = []
    df = results.collect(src, problems)
    _warn_skipped(problems)
    pq, csv = results.write_tidy(df, out / "results")
    n_runs = df["run_id"].nunique() if len(df) else 0
    _echo(f"{n_runs} runs, {len(df)} rows, {len(problems)} records skipped -> {pq} and "
               f"{csv}")
    if strict and problems:
        raise typer.Exit(1)


@app.command()
def report(
    results_dir: Annotated[Path | None, typer.Option(
        "--results", "-r", help="Folder with records (searched recursively), e.g. "
                                "outputs/reference/<device>; default <output-dir>/runs.")] = None,
    output: Annotated[Path | None, typer.Option(
        "--output", help="Where figures/, results/ and leaderboard.html go "
                         "(default: the output dir).")] = None,
    output_dir: OutOpt = None,
    strict: StrictOpt = False,
) -> None:
    """Execute notebooks/00_summary.ipynb: figures (PNG+PDF), rankings and the HTML leaderboard.

    Nothing is re-run: it reads the records that exist.
    """
    import papermill as pm

    out = _output_root(output_dir, writable=output is None)
    dest = _output_root(output, option="--output") if output else out
    src = _results_folder(results_dir or out / "runs")
    nb = config.REPO_ROOT / "notebooks" / "00_summary.ipynb"
    if not nb.is_file():
        _fail(f"summary notebook missing: {nb}")
    problems: list[tuple[Path, str]] = []
    for _ in results.iter_records(src, problems):
        pass
    _warn_skipped(problems)
    dest.mkdir(parents=True, exist_ok=True)
    pm.execute_notebook(str(nb), str(dest / "summary.ipynb"), cwd=str(nb.parent),
                        parameters={"results_dir": str(Path(src).resolve()),
                                    "output_dir": str(Path(dest).resolve())},
                        progress_bar=False, kernel_name="python3",
                        # forked from $EFFLLM_ZYGOTE when one serves (make study), else cold
                        kernel_manager_class=warmkernel.manager_class())
    _echo(f"report written under {dest} ({len(problems)} records skipped)")
    if strict and problems:
        raise typer.Exit(1)


AxisOpt = Annotated[str, typer.Option(
    "--axis", "-a", help="Study axis whose techniques compete: "
                         f"{', '.join(STUDY_AXES)}.")]


@app.command()
def recommend(
    results_dir: Annotated[Path, typer.Option(
        "--results", "-r", help="A records folder (searched recursively), a report folder with "
                                "results/results.csv, or a results .csv/.parquet table.")],
    axis: AxisOpt = DEFAULT_AXIS,
    max_memory_gb: Annotated[float | None, typer.Option(
        "--max-memory-gb", help="Memory (AMU, amu_gb) at most this many GB.")] = None,
    max_latency_ms: Annotated[float | None, typer.Option(
        "--max-latency-ms", help="Latency (AL, al_s: a request / a step) at most this many ms.")
    ] = None,
    max_tpot_ms: Annotated[float | None, typer.Option(
        "--max-tpot-ms", help="Time per output token (tpot_s) at most this many ms; the latency "
                              "objective is then TPOT.")] = None,
    max_energy_j_per_token: Annotated[float | None, typer.Option(
        "--max-energy-j-per-token", help="Energy (j_per_token) at most this many J a token.")
    ] = None,
    min_quality: Annotated[float | None, typer.Option(
        "--min-quality", help="Quality at least this good, in the quality metric's unit: >= for "
                              "accuracy, <= for perplexity/loss (the output names the metric).")
    ] = None,
    quality: Annotated[str | None, typer.Option(
        "--quality", help="Quality metric to use (default: the study's quality metric as its "
                          "records carry it, else the axis's: "
                          + ", ".join(f"{n}: {s.quality}" for n, s in SPECS.items()
                                      if s.study) + ").")
    ] = None,
    device: Annotated[str | None, typer.Option("--device", help="Only this device name.")
                      ] = None,
    size: Annotated[str | None, typer.Option(
        "--size", help="Only this model size, the value of the axis's size column ("
                       + "; ".join(f"{n}: {s.size_column}" for n, s in SPECS.items()
                                   if s.study) + ").")] = None,
) -> None:
    """Which technique should I use? The best quality under your constraints, per device and size.

    Drops runs that break a constraint (a null metric under a constraint is 'unknown' and
    excluded), keeps the Pareto front over quality, memory, latency and energy, picks the best
    quality (ties within ci95 broken by memory, latency, energy) and says why. Exits 1 when
    nothing satisfies the constraints, naming the closest run and what it misses by.
    """
    from .report import recommend as rec

    try:
        tidy = rec.load_tidy(results_dir)
        choices = rec.recommend(tidy, axis, max_memory_gb=max_memory_gb,
                                max_latency_ms=max_latency_ms, max_tpot_ms=max_tpot_ms,
                                max_energy_j_per_token=max_energy_j_per_token,
                                min_quality=min_quality, device=device, size=size,
                                quality=quality)
    except rec.RecommendError as exc:
        _fail(str(exc))
    for ch in choices:
        _echo(rec.format_choice(ch) + "\n")
    if not any(ch.feasible for ch in choices):
        raise typer.Exit(1)


@app.command()
def compare(
    a: Annotated[Path, typer.Argument(help="Result set A: records folder or results table.")],
    b: Annotated[Path, typer.Argument(help="Result set B, compared as B / A.")],
    out_dir: Annotated[Path | None, typer.Option(
        "--out", help="Where compare.csv and compare_ratios.{png,pdf} go (default: "
                      "<output-dir>/compare).")] = None,
    metric: Annotated[list[str] | None, typer.Option(
        "--metric", "-m", help="Metric to compare (repeatable; default: the axis's quality and "
                               "headline metrics).")] = None,
    axis: Annotated[str | None, typer.Option(
        "--axis", "-a", help=f"Only this axis ({', '.join(STUDY_AXES)}; default: all).")] = None,
    device_a: Annotated[str | None, typer.Option("--device-a", help="Only A's runs on this "
                                                                    "device.")] = None,
    device_b: Annotated[str | None, typer.Option("--device-b", help="Only B's runs on this "
                                                                    "device.")] = None,
    size_a: Annotated[str | None, typer.Option(
        "--size-a", help="Compare two sizes: A's size (with --size-b; the size then leaves the "
                         "match).")] = None,
    size_b: Annotated[str | None, typer.Option("--size-b", help="B's size.")] = None,
    output_dir: OutOpt = None,
) -> None:
    """Two result sets side by side: ratios B/A per technique with intervals, ranking changes.

    Techniques are matched by axis, study, model size and technique label. Writes compare.csv
    and a log-scale ratio figure (PNG + PDF); '*' marks a technique whose rank changed.
    """
    from .report import compare as cmp

    if (size_a is None) != (size_b is None):
        _fail("give both --size-a and --size-b (or neither)")
    try:
        tidy_a, tidy_b = cmp.load_tidy(a), cmp.load_tidy(b)
        table = cmp.compare(tidy_a, tidy_b, metric, device_a=device_a, device_b=device_b,
                            size_a=size_a, size_b=size_b, axis=axis)
    except cmp.RecommendError as exc:
        _fail(str(exc))
    dest = Path(out_dir) if out_dir else _output_root(output_dir) / "compare"
    short = ["/".join(Path(x).resolve().parts[-2:]) for x in (a, b)]
    paths = cmp.write_compare(table, dest, title=f"B / A: B = {short[1]}, A = {short[0]}")
    _echo(cmp.format_table(table))
    for line in cmp.lock_warnings(table):
        _echo(f"warning: {line}")
    if axis is None:
        for line in cmp.one_sided_axes(tidy_a, tidy_b):
            _echo(f"note: {line}")
    for line in cmp.changed_orders(table):
        _echo(f"ranking changed: {line}")
    _echo("written: " + ", ".join(str(p) for p in paths))


@app.command()
def calibrate(
    force: Annotated[bool, typer.Option(
        "--force", help="Re-measure and replace the kept peak even when it is higher (e.g. one "
                        "calibrated under a load that was not recorded).")] = False,
    budget_s: Annotated[float | None, typer.Option(
        "--budget-s", help="Seconds for the timing (default $EFFLLM_CALIB_BUDGET_S or 4).")] = None,
) -> None:
    """Measure this machine's CPU matmul peak (MFU's denominator on a CPU) on purpose.

    Run it on an idle machine: the load is measured with the peak, and a peak measured on a
    busy machine is not kept (exit code 1). Without --force an existing peak is only shown.
    """
    from .measure import compute as comp

    cal = comp.cpu_calibration(comp.CPU_REFERENCE_DTYPE, budget_s=budget_s, force=force)
    load = cal.get("load") or {}
    typer.echo(f"{cal['key']}: {cal['flops'] / 1e9:.1f} GFLOP/s ({cal['source']}, "
               f"{cal.get('measured_at', '?')})")
    if load:
        share = load.get("own_share")
        other = load.get("other_busy")
        typer.echo(f"load: 1-min {load.get('load_1m_start')}, own threads' share "
                   f"{'n/a' if share is None else f'{share:.0%}'}, other processes "
                   f"{'n/a' if other is None else f'{other:.0%}'}")
    if cal.get("busy"):
        _fail(f"{cal['busy']}: not kept; rerun on an idle machine", code=1)
    if cal["source"] == "file":
        typer.echo(f"kept in {cal['file']}; --force re-measures it")
    else:
        typer.echo(f"written to {cal['file']}")


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
