"""Study files: reading one, expanding its grid into runs, and the CLI's ``--set``/``--only``.

A *study file* (``params/<axis>/<study>.yaml``) names its notebook, a ``base`` config, a ``grid``
(cartesian product over dotted keys), seeds and metric weights. Each grid point is resolved over
the axis schema and a preset by :func:`effllm_helpers.config.resolve_params` (schema defaults <
study.base < preset[axis] < grid point (+ seed)) and validated before anything runs. The schemas,
presets and the YAML reader live in ``config.py``; this module is what ``effllm validate``,
``effllm sweep`` and the sweep runner call.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .axes.spec import SPECS
from .config import (
    AXES,
    REPO_ROOT,
    FinetuneParams,
    NonNegInt,
    ParamsError,
    Strict,
    _allowed_keys,
    available_presets,
    check_params_model,
    check_plain_text,
    file_problem,
    format_validation_error,
    load_preset,
    load_yaml,
    preset_path,
    quoted,
    resolve_params,
    set_dotted,
    short,
    short_text,
    shown_path,
)

# the axes a study file may name, in the specs' order
AxisName = Literal[tuple(SPECS)]  # type: ignore[valid-type]

# metric names the efficiency score may weight (see report.scoring)
WEIGHTABLE = ("quality", "amu_gb", "pcu", "mfu", "al_s", "tt", "st", "it", "aec_w", "mcr",
              "energy_j", "j_per_token", "peak_gb", "tokens_per_s")



# ---------------------------------------------------------------- study file
MAX_SEED = 2**32 - 1  # what numpy accepts (torch takes more)

class StudyFile(Strict):
    """A study: one notebook, a base config and a grid.

    A grid key is a dotted params key with a list of values, or a free label whose values are
    *variants*: mappings of dotted keys set together (with an optional ``name``), for comparisons
    that are not a cartesian product (e.g. dense vs MoE at matched active or total params).
    """

    # it names a folder: safe characters, and short enough for any filesystem
    study: Annotated[str, Field(pattern=r"^[A-Za-z0-9_\-]+$", max_length=100)]
    axis: AxisName
    notebook: str
    description: str = ""
    base: dict[str, Any] = {}
    grid: dict[str, list[Any]] = {}
    seeds: list[NonNegInt] = [0]
    weights: dict[str, Annotated[float, Field(ge=0)]] = {}
    # the one metric the axis's quality is ranked on (scores and rank tables read it)
    quality: Annotated[str, Field(pattern=r"^[a-z_]+$", max_length=40)] | None = None
    timeout_s: Annotated[float, Field(gt=0, le=30 * 86400, allow_inf_nan=False)] | None = 1800
    # the study's own adjustment of a named preset, applied over it (e.g. the domain study's item
    # count at the gpu preset, which its finite task pool caps): base < preset < this < grid
    per_preset: dict[str, dict[str, Any]] = {}

    @field_validator("grid")
    @classmethod
    def _grid_lists(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        if not v:
            raise ValueError("grid is empty: give at least one key with a list of choices")
        for key, choices in v.items():
            if not choices:
                raise ValueError(f"grid key {key!r} has no choices")
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("needs at least one seed")
        if max(v) > MAX_SEED:
            raise ValueError(f"seeds must be in 0..{MAX_SEED} (torch and numpy seed range)")
        return v

    @field_validator("weights")
    @classmethod
    def _weights(cls, v: dict[str, float]) -> dict[str, float]:
        for k in v:
            if k not in WEIGHTABLE:
                raise ValueError(f"unknown metric {k!r} in weights; "
                                 f"allowed: {', '.join(WEIGHTABLE)}")
        return v

    @model_validator(mode="after")
    def _quality_of_axis(self) -> StudyFile:
        allowed = SPECS[self.axis].quality_choices
        if self.quality is not None and allowed and self.quality not in allowed:
            raise ValueError(f"quality {self.quality!r} is not a quality metric of the "
                             f"{self.axis} axis; allowed: {', '.join(allowed)}")
        return self


class Run(BaseModel):
    """One resolved run of a sweep."""

    model_config = ConfigDict(frozen=True)
    run_id: str
    study: str
    axis: str
    notebook: str
    seed: int
    point: dict[str, Any]  # the grid choices of this run (for labels)
    params: dict[str, Any]  # fully resolved and validated axis params
    weights: dict[str, float]
    timeout_s: float | None
    preset: str | None = None  # the preset's name (or file) that resolved ``params``
    quality: str | None = None  # the study file's ``quality:`` (None: the axis's default)



def scoring_facts(run: Run | dict[str, Any]) -> dict[str, Any] | None:
    """What a run's record says its study ranks on: the quality metric (the study file's
    ``quality:``, else the axis's default) and the study's ``weights`` ({} = equal).

    Why in the record: a report over another machine's records must rank them as their study
    said, not as the study file in this checkout says today. None for a run that is no study's
    (an interactive notebook run), whose record then carries no scoring.
    """
    r = run.model_dump() if isinstance(run, Run) else run
    if "weights" not in r or r.get("axis") not in SPECS:
        return None
    return {"quality": r.get("quality") or SPECS[r["axis"]].quality,
            "weights": {str(k): float(v) for k, v in (r.get("weights") or {}).items()}}


_MISSING = object()


def _get_dotted(d: dict[str, Any], key: str) -> Any:
    cur: Any = d
    for part in key.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return _MISSING
        cur = cur[part]
    return cur


def _check_dotted_key(model: type[BaseModel], key: str, source: str) -> None:
    """A grid key must name a field of the axis schema (nested through sub-models)."""
    if model is FinetuneParams and key == "model":
        key = "base_model"  # the alias inference uses
    cur: type[BaseModel] = model
    for i, part in enumerate(key.split(".")):
        fields = cur.model_fields
        if part not in fields:
            where = ".".join(key.split(".")[:i]) or "<top>"
            raise ParamsError(f"{source}: grid.{short_text(key)}: unknown key {quoted(part)} under "
                              f"{short_text(where)}; "
                              f"allowed: {', '.join(sorted(fields))}")
        ann = fields[part].annotation
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return  # a leaf or a dict-valued field (e.g. sizes.<name>): deeper keys are free-form
        cur = ann



# ---------------------------------------------------------------- study loading and expansion
def run_id_for(study: str, axis: str, notebook: str, params: dict[str, Any], seed: int) -> str:
    """Stable hash of what defines a run; same inputs, same id, on any machine."""
    blob = json.dumps({"study": study, "axis": axis, "notebook": notebook, "params": params,
                       "seed": seed}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def load_study(path: str | Path, trusted_notebook: bool = False) -> StudyFile:
    """Read and validate a study file. Its ``notebook`` must be one of the repo's axis notebooks
    (``NOTEBOOK_AXES``): a sweep executes it, so a study file naming any path (a README, a file
    in /etc) would run it as code. ``trusted_notebook`` allows a notebook of your own."""
    path = Path(path)
    data = load_yaml(path)
    try:
        study = StudyFile.model_validate(data)
    except ValidationError as exc:
        msg = format_validation_error(str(path), exc)
        if any(e["type"] == "extra_forbidden" for e in exc.errors()):
            msg += f"\n  (allowed top-level keys: {', '.join(_allowed_keys(StudyFile))})"
        raise ParamsError(msg) from None
    nb = notebook_path(study.notebook)
    problem = file_problem(nb)
    if problem == "no such file":
        raise ParamsError(f"{path}: notebook: no such notebook {quoted(study.notebook)} "
                          f"(looked at {short_text(str(nb))})")
    if problem:  # e.g. a name too long for the filesystem, a FIFO, a folder
        raise ParamsError(f"{path}: notebook: {quoted(study.notebook)}: {problem}")
    expected = NOTEBOOK_AXES.get(_repo_relative(nb))
    if expected is None and not trusted_notebook:
        allowed = [n for n, a in NOTEBOOK_AXES.items() if a == study.axis]
        raise ParamsError(f"{path}: notebook: {quoted(study.notebook)} is not one of the "
                          f"project's notebooks; allowed for {study.axis}: "
                          f"{', '.join(allowed) or '(none)'} (or pass --trusted-notebook to run "
                          "a notebook of your own)")
    if expected is not None and expected != study.axis:
        allowed = [n for n, a in NOTEBOOK_AXES.items() if a == study.axis]
        raise ParamsError(f"{path}: notebook: {study.notebook!r} is the {expected} notebook, "
                          f"not one for axis {study.axis!r}; allowed for {study.axis}: "
                          f"{', '.join(allowed) or '(any notebook of your own)'}")
    return study


# the repo's notebooks and the axis each one runs (a study's notebook must match its axis)
NOTEBOOK_AXES = {s.notebook: s.name for s in SPECS.values()}


def _repo_relative(nb: Path) -> str | None:
    try:
        return nb.resolve().relative_to(REPO_ROOT.resolve()).as_posix()
    except ValueError:
        return None


def notebook_path(nb: str) -> Path:
    p = Path(nb)
    return p if p.is_absolute() else REPO_ROOT / p


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["train.steps=100", "train.compile=false"]`` -> a nested layer (values read as YAML)."""
    layer: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ParamsError(f"--set {quoted(item)}: expected KEY=VALUE, e.g. train.steps=100")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ParamsError(f"--set {quoted(item)}: value is not valid YAML: "
                              f"{short_text(str(exc), 400)}") from None
        check_plain_text({key.strip(): value}, "--set")
        set_dotted(layer, key.strip(), value)
    return layer


def parse_only(items: list[str] | None) -> dict[str, list[str]]:
    """``["precision=int8,int4-nf4"]`` -> ``{"precision": ["int8", "int4-nf4"]}`` (``--only``)."""
    only: dict[str, list[str]] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        values = [v.strip() for v in raw.split(",") if v.strip()]
        if not sep or not key.strip() or not values:
            raise ParamsError(f"--only {quoted(item)}: expected GRIDKEY=VALUE[,VALUE...], "
                              "e.g. --only precision=int8,int4-nf4")
        check_plain_text({key.strip(): values}, "--only")
        only.setdefault(key.strip(), []).extend(values)
    return only


def select(runs: list[Run], only: dict[str, list[str]], grid: dict[str, list[Any]]) -> list[Run]:
    """The runs whose grid choices match ``only`` (every key, any of its values).

    Unlike ``--set``, selecting keeps the run ids, so a partial sweep merges with a full one.
    Values compare as text (a variant by its name), and each must be a choice of that grid key.
    """
    for key, values in only.items():
        if key not in grid:
            raise ParamsError(f"--only {key}: not a grid key of this study; allowed: "
                              f"{', '.join(grid) or '(the study has no grid)'}")
        allowed = [str(c.get("name", json.dumps(c, sort_keys=True))) if isinstance(c, dict)
                   else str(c) for c in grid[key]]
        for v in values:
            if v not in allowed:
                raise ParamsError(f"--only {short_text(key)}={quoted(v)}: not in the grid; "
                                  f"allowed: {', '.join(allowed)}")
    return [r for r in runs if all(str(r.point[k]) in vs for k, vs in only.items())]


def check_task_size(axis: str, params: dict[str, Any], source: str) -> None:
    """A built-in task with a finite pool (``docname``: the functions this interpreter's
    standard library documents) must hold ``n_train + n_eval`` items: refused before any
    compute, not a minute into every run."""
    if "task" not in SPECS[axis].local_data or params.get("task") != "docname":
        return
    from .data.tasks import docname_pool

    have = len(docname_pool())
    want = int(params["n_train"]) + int(params["n_eval"])
    if want > have:
        raise ParamsError(
            f"{source}: n_train + n_eval = {params['n_train']} + {params['n_eval']} = {want} "
            f"docname items, but this Python's standard library gives {have}; allowed: at most "
            f"{have} in all (e.g. --set n_train={max(1, have - int(params['n_eval']))})")


def expand(path: str | Path, preset: str | Path | None = None,
           overrides: dict[str, Any] | None = None,
           only: dict[str, list[str]] | None = None,
           trusted_notebook: bool = False, seeds: list[int] | None = None) -> list[Run]:
    """Validate a study file under a preset and expand its grid into runs (no compute).

    ``overrides`` (from ``--set``) apply last, over the grid point; ``only`` (from ``--only``)
    keeps the grid points that match it (see ``select``); ``seeds`` (from ``--seeds``) replace
    the study's seeds (a seed's run id does not depend on the others, so records are shared).
    """
    path = Path(path)
    study = load_study(path, trusted_notebook)
    schema = AXES[study.axis]
    check_run_count(study, seeds, str(path))
    check_grid_conflicts(study.grid, str(path))
    for key, choices in study.grid.items():
        if all(isinstance(c, dict) for c in choices):
            for c in choices:
                for dk in c:
                    if dk != "name":
                        _check_dotted_key(schema, dk, str(path))
        elif any(isinstance(c, dict) for c in choices):
            raise ParamsError(f"{path}: grid.{key}: mixes variants (mappings) and plain values")
        else:
            _check_dotted_key(schema, key, str(path))
    overlay = load_preset(preset, study.axis)
    unknown = sorted(set(study.per_preset) - set(available_presets()))
    if unknown:
        raise ParamsError(f"{path}: per_preset: unknown preset {quoted(unknown[0])}; allowed: "
                          f"{', '.join(available_presets())}")
    adjust = study.per_preset.get(preset, {}) if isinstance(preset, str) else {}
    if adjust:
        resolve_params(study.axis, adjust, source=f"{path} [per_preset.{preset}]")
    # each layer must be valid on its own, so a bad base value is reported even when a preset
    # happens to override it
    resolve_params(study.axis, study.base, source=f"{path} [base]")
    if overlay:
        resolve_params(study.axis, overlay, source=f"{preset_path(preset)} [{study.axis}]")
    if overrides:
        resolve_params(study.axis, overrides, source="--set")
    keys = list(study.grid)
    runs: list[Run] = []
    seen: set[str] = set()
    for combo in itertools.product(*(study.grid[k] for k in keys)):
        point: dict[str, Any] = {}
        grid_layer: dict[str, Any] = {}
        for k, v in zip(keys, combo, strict=True):
            if isinstance(v, dict):  # a named variant: several dotted keys set together
                point[k] = v.get("name", json.dumps(v, sort_keys=True))
                for dk, dv in v.items():
                    if dk != "name":
                        set_dotted(grid_layer, dk, dv)
            else:
                point[k] = v
                set_dotted(grid_layer, k, v)
        for k in point:  # an --set override of a grid key wins, and the label says so
            v = _get_dotted(overrides or {}, k)
            if v is not _MISSING:
                point[k] = v
        label = short_text(", ".join(f"{short_text(k, 60)}={short(v, 60)}"
                                     for k, v in point.items()), 300)
        params = resolve_params(study.axis, study.base, overlay, adjust, grid_layer,
                                overrides or {}, source=f"{path} [grid point {label}]")
        check_params_model(SPECS[study.axis].model_key, params, f"{path} [grid point {label}]")
        check_task_size(study.axis, params, f"{path} [grid point {label}]")
        check_data_paths(study.axis, params, notebook_path(study.notebook).parent,
                         f"{path} [grid point {label}]")
        for seed in seeds or study.seeds:
            rid = run_id_for(study.study, study.axis, study.notebook, params, seed)
            if rid in seen:
                continue
            seen.add(rid)
            runs.append(Run(run_id=rid, study=study.study, axis=study.axis,
                            notebook=study.notebook, seed=seed, point=point, params=params,
                            weights=study.weights, quality=study.quality,
                            timeout_s=study.timeout_s,
                            preset=None if preset is None else str(preset)))
    if only:
        runs = select(runs, only, study.grid)
    if not runs:
        sel = " ".join(f"--only {k}={','.join(v)}" for k, v in (only or {}).items())
        raise ParamsError(f"{path}: {sel} selects no runs" + (
            " (an --set of a grid key replaces its choices, so --only cannot match them)"
            if overrides else ""))
    return runs


# a study is a few to a few hundred runs; past this its grid is a typo or a bomb (6 keys of 12
# values are 3 million runs, which validation would resolve one by one)
MAX_RUNS_PER_STUDY = 2_000


def check_run_count(study: StudyFile, seeds: list[int] | None, source: str) -> int:
    """Refuse a study whose grid times seeds passes ``MAX_RUNS_PER_STUDY``, from the lengths
    alone: nothing is expanded (``--only`` selects after expansion, so it does not count)."""
    n_seeds = len(seeds or study.seeds)
    total = math.prod(len(v) for v in study.grid.values()) * n_seeds
    if total > MAX_RUNS_PER_STUDY:
        sizes = " x ".join(f"{short_text(k, 40)}: {len(v)}" for k, v in study.grid.items())
        raise ParamsError(f"{source}: grid: {sizes} x {n_seeds} seed(s) = {total} runs; allowed: "
                          f"at most {MAX_RUNS_PER_STUDY} runs per study (split it into "
                          "several studies)")
    return total


def grid_sets(key: str, choices: list[Any]) -> set[str]:
    """The dotted params keys a grid key sets: itself, or its variants' keys."""
    if choices and all(isinstance(c, dict) for c in choices):
        return {dk for c in choices for dk in c if dk != "name"}
    return {key}


def check_grid_conflicts(grid: dict[str, list[Any]], source: str) -> None:
    """Refuse two grid keys that set the same params key (or one inside the other): the later
    silently wins, so a run that measured n=64 would be labelled (and --only-selected) n=32."""
    owners: dict[str, str] = {}
    for key, choices in grid.items():
        for dk in grid_sets(key, choices):
            for other, owner in owners.items():
                if owner != key and (other == dk or other.startswith(dk + ".")
                                     or dk.startswith(other + ".")):
                    raise ParamsError(
                        f"{source}: grid.{short_text(key, 60)} sets {quoted(dk, 60)}, which "
                        f"grid.{short_text(owner, 60)} sets too ({quoted(other, 60)}); allowed: "
                        "each params key set by one grid key (drop it from one of them)")
            owners[dk] = key


def check_data_paths(axis: str, params: dict[str, Any], base: Path, source: str) -> None:
    """The local data a run will read exists (no compute): a ``text:``/``jsonl:`` corpus, a
    ``jsonl:`` task, a ``folder:`` image set. Relative paths are read from the notebook's
    folder, where the run's kernel starts; ``hf:`` sources are left to the run (a hub name)."""
    specs = [(key, str(v)) for key in SPECS[axis].local_data
             if (v := _get_dotted(params, key)) is not _MISSING and not isinstance(v, dict)]
    for key, spec in specs:
        kind, sep, arg = spec.partition(":")
        if not sep or kind not in ("text", "jsonl", "folder"):
            continue
        target = Path(arg).expanduser()
        target = target if target.is_absolute() else base / target
        problem = file_problem(target)
        if kind == "jsonl" and problem is None:
            continue
        if kind != "jsonl" and problem in (None, "a folder, not a file"):
            if kind == "folder" and problem is None:
                problem = "a file, not a folder of class subfolders"
            else:
                continue
        raise ParamsError(f"{source}: {key}: {quoted(spec, 120)}: {problem} (looked at "
                          f"{shown_path(target)}; a relative path is read from the notebook's "
                          "folder)")


def parse_seeds(text: str | None) -> list[int] | None:
    """``--seeds 0,1,2`` -> ``[0, 1, 2]`` (None when not given); distinct non-negative ints."""
    if text is None:
        return None
    try:
        seeds = [int(x) for x in text.split(",")]
    except ValueError:
        seeds = []
    if (not seeds or min(seeds) < 0 or max(seeds) > MAX_SEED or len(set(seeds)) != len(seeds)
            or len(seeds) > 1000):
        raise ParamsError(f"--seeds {quoted(short_text(text, 60))}: give distinct integers in "
                          f"0..{MAX_SEED} separated by commas, e.g. --seeds 0,1,2")
    return seeds


def check_timeout(value: float | None, source: str = "--timeout") -> float | None:
    """A per-run limit must be a finite number of seconds > 0 (``inf``/``nan`` are rejected)."""
    if value is not None and not (math.isfinite(value) and 0 < value <= 30 * 86400):
        raise ParamsError(f"{source}: must be a finite number of seconds > 0 and at most 30 "
                          f"days (got {value})")
    return value
