"""Run records: the schema every notebook writes, atomic writes, and collection into one tidy table.

A record is plain JSON so that it outlives this package's versions; ``SCHEMA_VERSION`` says which
layout it follows. Every metric is a *metric value*: ``{"value", "unit", "method"}`` plus optional
``reason`` (why ``value`` is null), ``n``, ``std``, ``ci95`` and percentiles. Nothing here invents a
number: a value that could not be measured stays ``None`` with its reason.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import stat
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from .environment import lock_label

SCHEMA_VERSION = 1
RECORD_NAME = "record.json"
# false while the sweep's runner has not yet checked that papermill saved the run's notebook
NOTEBOOK_SAVED = "notebook_saved"
# the study's quality metric and weights, as the sweep ran it (``studies.scoring_facts``)
SCORING = "scoring"
# the tidy table's columns that carry them (the weights as sorted JSON text, "{}" = equal)
SCORING_QUALITY, SCORING_WEIGHTS = "scoring.quality", "scoring.weights"
Status = Literal["ok", "failed", "skipped"]


# ---------------------------------------------------------------- metric values
def metric(value: float | int | None, unit: str, method: str, **extra: Any) -> dict[str, Any]:
    """A measured (or formula-derived) value with its unit and the method that produced it."""
    if value is not None:
        value = float(value)
        if not math.isfinite(value):
            return missing(unit, f"non-finite value ({value}) from {method}", method=method)
    out: dict[str, Any] = {"value": value, "unit": unit, "method": method}
    out.update({k: v for k, v in extra.items() if v is not None})
    return out


def missing(unit: str, reason: str, method: str | None = None) -> dict[str, Any]:
    """A metric this machine cannot measure: null with the reason, never a guess."""
    return {"value": None, "unit": unit, "method": method, "reason": reason}


def is_metric(obj: Any) -> bool:
    return isinstance(obj, Mapping) and "value" in obj and "unit" in obj and "method" in obj


def validate_metric(name: str, obj: Any) -> None:
    """Raise ValueError unless ``obj`` is a well-formed metric value (null needs a reason)."""
    if not is_metric(obj):
        raise ValueError(f"metric {name!r} must be a mapping with value, unit and method: {obj!r}")
    if obj["value"] is None and not obj.get("reason"):
        raise ValueError(f"metric {name!r} is null without a reason")
    if obj["value"] is not None and not obj.get("method"):
        raise ValueError(f"metric {name!r} has a value but no method")
    v = obj["value"]
    if v is not None:
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ValueError(f"metric {name!r} value must be a number or null, "
                             f"got {type(v).__name__}")
        try:
            finite = math.isfinite(float(v))
        except OverflowError:
            finite = False
        if not finite:
            raise ValueError(f"metric {name!r} value is not a finite float")
        if abs(float(v)) > MAX_METRIC_ABS:
            raise ValueError(f"metric {name!r} value {float(v):.3g} is out of range; allowed: "
                             f"|value| <= {MAX_METRIC_ABS:g} (ratios of it would overflow)")
        if v < 0 and name.rpartition(".")[2] in _catalog_metrics():
            raise ValueError(f"metric {name!r} value {v!r} is negative; allowed: >= 0 (a time, "
                             "memory, energy, rate, loss or score)")


# a metric value past this is a corrupt record, not a measurement: its ratios and products
# overflow float64 and rank it first or crash the comparison
MAX_METRIC_ABS = 1e30


def _catalog_metrics() -> set[str]:
    """The catalog's metrics, all non-negative by what they measure (a -5 s latency is corrupt,
    and would rank first). Imported late: the catalog is the floor above this module."""
    from .catalog import METRICS

    return set(METRICS)


def check_model_facts(model: Mapping[str, Any]) -> None:
    """A record's numeric model facts (parameter counts, sizes) fit a finite float: a fact of
    10**400 parses as a JSON integer and crashes every table that reads it as a number."""
    for name, val in model.items():
        if isinstance(val, int | float) and not isinstance(val, bool):
            try:
                ok = math.isfinite(float(val)) and abs(float(val)) <= MAX_METRIC_ABS
            except OverflowError:
                ok = False
            if not ok:
                raise ValueError(f"model fact {name!r} is out of range; allowed: a finite number "
                                 f"with |value| <= {MAX_METRIC_ABS:g}")


# ---------------------------------------------------------------- record
def now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def new_record(
    *,
    run_id: str,
    study: str,
    axis: str,
    params: Mapping[str, Any],
    status: Status = "ok",
    error: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    quality: Mapping[str, Any] | None = None,
    curves: Mapping[str, Any] | None = None,
    model: Mapping[str, Any] | None = None,
    provenance: Mapping[str, Any] | None = None,
    started_at: str | None = None,
    extra: Mapping[str, Any] | None = None,
    scoring: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble a record in the versioned layout (``SCHEMA_VERSION``, checked by ``validate``).

    ``scoring``: the study's quality metric and weights (``studies.scoring_facts``), so that a
    report ranks the run as its study said, whatever checkout reads it."""
    rec: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "run_id": run_id,
        "study": study,
        "axis": axis,
        "status": status,
        "error": dict(error) if error else None,
        "params": dict(params),
        "metrics": dict(metrics or {}),
        "quality": dict(quality or {}),
        "curves": dict(curves or {}),
        "model": dict(model or {}),
        "provenance": dict(provenance or {}),
        "started_at": started_at,
        "finished_at": now_iso(),
    }
    if extra:
        rec["extra"] = dict(extra)
    if scoring:
        rec[SCORING] = {"quality": scoring.get("quality"),
                        "weights": dict(scoring.get("weights") or {})}
    return rec


def validate_record(rec: Mapping[str, Any]) -> None:
    """Check the layout; raise ValueError naming the first problem."""
    for key in ("schema_version", "run_id", "study", "status", "params", "metrics", "quality"):
        if key not in rec:
            raise ValueError(f"record lacks {key!r}")
    version = rec["schema_version"]
    if isinstance(version, bool) or version != SCHEMA_VERSION:
        raise ValueError(f"record schema_version {_short(version)} != {SCHEMA_VERSION}")
    if rec["status"] not in ("ok", "failed", "skipped"):
        raise ValueError(f"record status {_short(rec['status'])} not in ok|failed|skipped")
    for key in ("run_id", "study"):
        if not isinstance(rec[key], str) or not rec[key]:
            raise ValueError(f"record {key} must be a non-empty string, got {_short(rec[key])}")
    for key in ("params", "metrics", "quality", "curves", "model", "provenance", "extra",
                "error", SCORING):
        val = rec.get(key)
        if not (isinstance(val, Mapping) or (val is None and key not in REQUIRED_MAPPINGS)):
            raise ValueError(f"record {key} must be a mapping, got {type(val).__name__}")
    if rec["status"] != "ok" and not (rec.get("error") or {}).get("reason"):
        raise ValueError(f"a {rec['status']} record needs error.reason")
    for section in ("metrics", "quality"):
        for name, val in rec[section].items():
            validate_metric(f"{section}.{name}", val)
    check_model_facts(rec.get("model") or {})
    check_scoring(rec.get(SCORING))


def check_scoring(scoring: Mapping[str, Any] | None) -> None:
    """The record's study scoring, when it has one: a metric name and non-negative weights."""
    if scoring is None:
        return
    q = scoring.get("quality")
    if q is not None and not isinstance(q, str):
        raise ValueError(f"record scoring.quality must be a metric name, got {_short(q)}")
    weights = scoring.get("weights")
    if not isinstance(weights, Mapping):
        raise ValueError(f"record scoring.weights must be a mapping, got {_short(weights)}")
    for k, v in weights.items():
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
            raise ValueError(f"record scoring.weights.{_short(k)} must be a number >= 0, "
                             f"got {_short(v)}")


REQUIRED_MAPPINGS = ("params", "metrics", "quality")


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value) if not isinstance(value, dict | list) else type(value).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write JSON to a temp file in the same folder, fsync, then rename: readers never see half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; records are read by other users' reports
        with os.fdopen(fd, "w") as fh:
            json.dump(obj, fh, indent=1, sort_keys=False, default=_json_default)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "model_dump"):
        return obj.model_dump()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_record(output_dir: str | os.PathLike[str], rec: Mapping[str, Any]) -> Path:
    """Validate and atomically write ``record.json`` into ``output_dir``."""
    validate_record(rec)
    return atomic_write_json(Path(output_dir) / RECORD_NAME, rec)


MAX_RECORD_BYTES = 64 * 2**20  # a record is kilobytes; curves make it at most a few MB


class RecordError(ValueError):
    """A record file that cannot be used: the message says why."""


def _reject_constant(name: str) -> Any:
    raise RecordError(f"non-finite number {name} (JSON has no such value)")


def load_record(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON object in a record file, or RecordError saying why not.

    Only a regular file is opened for reading (a FIFO named record.json would block forever),
    ``NaN``/``Infinity`` (which Python's json writes and reads, unlike JSON) are refused, and so
    are oversized or too deeply nested documents.
    """
    try:  # a record is a file of its run folder, never a link (to another run's, or a loop)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        if os.path.islink(path):
            raise RecordError("a symbolic link, not a record file") from None
        raise RecordError(f"cannot open: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RecordError("not a regular file")
        if st.st_size > MAX_RECORD_BYTES:
            raise RecordError(f"{st.st_size} bytes, more than {MAX_RECORD_BYTES}")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read(MAX_RECORD_BYTES + 1)
    except OSError as exc:
        raise RecordError(f"cannot read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    try:
        rec = json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise RecordError("not UTF-8") from None
    except RecursionError:
        raise RecordError("nested too deeply") from None
    except RecordError:
        raise
    except ValueError as exc:  # malformed JSON, or an integer too long to parse
        raise RecordError(f"not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(rec, dict):  # e.g. a list or a bare number: not a record
        raise RecordError(f"not a JSON object but {type(rec).__name__}")
    return rec


def read_record(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The record at ``path`` (a file or a run folder), or None if absent or unreadable."""
    path = Path(path)
    if path.is_dir():
        path = path / RECORD_NAME
    try:
        return load_record(path)
    except RecordError:
        return None


def record_paths(root: str | os.PathLike[str]) -> list[Path]:
    """Every file entry named ``record.json`` under ``root``, sorted, links included (a link
    that loops or points elsewhere is then reported by :func:`load_record`, where ``rglob``
    passed over it silently); linked folders are not followed."""
    found = [Path(d) / RECORD_NAME for d, dirs, files in os.walk(root)
             if RECORD_NAME in files or RECORD_NAME in dirs]
    return sorted(found)


def iter_records(root: str | os.PathLike[str],
                 problems: list[tuple[Path, str]] | None = None,
                 ) -> Iterable[tuple[Path, dict[str, Any]]]:
    """Every valid record under ``root``, in a stable order.

    A file that is unreadable, malformed, of another schema version, or a second record of a
    run id already seen is skipped; ``(path, reason)`` is appended to ``problems`` for it.
    """
    seen: dict[str, Path] = {}
    for path in record_paths(root):
        try:
            rec = load_record(path)
            validate_record(rec)
        except RecursionError:
            reason = "nested too deeply"
        except (RecordError, ValueError, TypeError) as exc:
            reason = str(exc)[:300]
        else:
            first = seen.setdefault(rec["run_id"], path)
            if rec.get(NOTEBOOK_SAVED) is False:
                reason = ("unsealed: its notebook was not saved after the last cell (the run "
                          "was killed before sealing); the next sweep redoes it")
                if first == path:
                    del seen[rec["run_id"]]
            elif first == path:
                yield path, rec
                continue
            else:
                reason = f"duplicate run_id {rec['run_id']!r} (kept {first})"
        if problems is not None:
            problems.append((path, reason))


# ---------------------------------------------------------------- tidy table
def _flatten(prefix: str, obj: Any, out: dict[str, Any]) -> None:
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(obj, list | tuple):
        out[prefix] = json.dumps(obj)
    else:
        out[prefix] = obj


def _scoring_columns(scoring: Any) -> dict[str, Any]:
    if not isinstance(scoring, Mapping):
        return {SCORING_QUALITY: None, SCORING_WEIGHTS: None}
    return {SCORING_QUALITY: scoring.get("quality"),
            SCORING_WEIGHTS: json.dumps(dict(scoring.get("weights") or {}), sort_keys=True)}


def tidy_rows(rec: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per (run, metric): the long format the summary notebook and figures read.

    Columns: run identity, ``p.<param>`` for every resolved param, device, preset, lock (see
    ``environment.lock_label``), the study's scoring (``scoring.quality``, ``scoring.weights``
    as JSON text; null for a record made before records held it), then
    ``section`` (metrics|quality|model), ``metric``, ``value``, ``unit``, ``method``, ``reason``,
    ``n``, ``std``, ``ci95``.
    """
    base: dict[str, Any] = {
        "run_id": rec.get("run_id"),
        "study": rec.get("study"),
        "axis": rec.get("axis"),
        "status": rec.get("status"),
        "device": (rec.get("provenance") or {}).get("device_name"),
        "preset": (rec.get("provenance") or {}).get("preset"),
        "lock": lock_label((rec.get("provenance") or {}).get("environment")),
        "finished_at": rec.get("finished_at"),
        **_scoring_columns(rec.get(SCORING)),
    }
    flat: dict[str, Any] = {}
    _flatten("", rec.get("params") or {}, flat)
    base.update({f"p.{k}": v for k, v in flat.items()})
    rows: list[dict[str, Any]] = []
    for section in ("metrics", "quality"):
        for name, val in (rec.get(section) or {}).items():
            if not is_metric(val):
                continue
            rows.append(
                base
                | {
                    "section": section,
                    "metric": name,
                    "value": val.get("value"),
                    "unit": val.get("unit"),
                    "method": val.get("method"),
                    "reason": val.get("reason"),
                    "n": val.get("n"),
                    "std": val.get("std"),
                    "ci95": val.get("ci95"),
                }
            )
    for name, val in (rec.get("model") or {}).items():
        if isinstance(val, int | float) and not isinstance(val, bool):
            rows.append(base | {"section": "model", "metric": name, "value": float(val),
                                "unit": None, "method": "model_facts", "reason": None,
                                "n": None, "std": None, "ci95": None})
    if not rows:  # failed runs still appear, so the table shows what is missing and why
        reason = (rec.get("error") or {}).get("reason")
        rows.append(base | {"section": "status", "metric": "status", "value": None, "unit": None,
                            "method": None, "reason": reason, "n": None, "std": None,
                            "ci95": None})
    return rows


def collect(root: str | os.PathLike[str],
            problems: list[tuple[Path, str]] | None = None):  # -> pandas.DataFrame
    """All valid records under ``root`` as one tidy long DataFrame (one row per run and metric).

    Skipped files go to ``problems`` when given, else each is a warning naming file and reason.
    """
    import pandas as pd

    own = problems is None
    problems = [] if own else problems
    rows = [row for _, rec in iter_records(root, problems) for row in tidy_rows(rec)]
    if own:
        for path, reason in problems:
            warnings.warn(f"skipped record {path}: {reason}", stacklevel=2)
    df = pd.DataFrame(rows)
    if df.empty:
        df = pd.DataFrame(columns=["run_id", "study", "axis", "status", "device", "section",
                                   "metric", "value", "unit", "method", "reason"])
    return df


FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(v: Any) -> Any:
    """A text cell a spreadsheet would run as a formula (``=``, ``+``, ``-``, ``@``..., also
    after leading spaces) with a leading ``'``; anything else as it is."""
    if isinstance(v, str) and v.lstrip(" ").startswith(FORMULA_START):
        return "'" + v
    return v


def csv_safe(df):  # -> pandas.DataFrame
    """Every text cell and column name through :func:`csv_cell`: a model name or a reason from a
    record must not execute when the CSV opens. Numbers stay numbers; the parquet table keeps
    the raw text."""
    from pandas.api.types import is_numeric_dtype

    out = df.copy()
    for col in out.columns:
        if not is_numeric_dtype(out[col]):
            out[col] = out[col].map(csv_cell)
    out.columns = [csv_cell(c) for c in out.columns]
    return out


def run_counts(df):  # -> pandas.DataFrame
    """Runs per (axis, study, status): what a summary shows first."""
    if df.empty:
        return df.head(0)
    return (df.groupby(["axis", "study", "status"])["run_id"].nunique().rename("runs")
            .reset_index())


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temp path of its own beside ``path``, renamed over ``path`` once the block wrote it.

    The name is unique (``mkstemp``): two ``collect``/``report`` writing into one folder each
    rename their own file, where a fixed ``.name.tmp`` had one rename the other's away."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o644)
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_csv(df, path: str | os.PathLike[str]) -> Path:  # df: pandas.DataFrame
    """The one CSV writer of the workbook: formula-looking text escaped (``csv_safe``), written
    atomically. Every CSV a spreadsheet may open (results, leaderboards, compare) goes here."""
    with atomic_path(path) as tmp:
        csv_safe(df).to_csv(tmp, index=False)
    return Path(path)


def write_tidy(df, out_dir: str | os.PathLike[str], name: str = "results") -> tuple[Path, Path]:
    """Write the tidy table as parquet and CSV (both atomically)."""
    out_dir = Path(out_dir)
    df2 = df.copy()
    for col in df2.columns:  # mixed-type param columns do not fit an arrow column
        if df2[col].dtype == object:
            df2[col] = df2[col].map(lambda v: v if v is None or isinstance(v, str) else
                                    json.dumps(v))
    pq = out_dir / f"{name}.parquet"
    with atomic_path(pq) as tmp:
        df2.to_parquet(tmp, index=False)
    return pq, write_csv(df2, out_dir / f"{name}.csv")
