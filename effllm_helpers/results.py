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
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

SCHEMA_VERSION = 1
RECORD_NAME = "record.json"
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
) -> dict[str, Any]:
    """Assemble a record in the versioned layout (see DESIGN.md, "Runs, sweeps and records")."""
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
    return rec


def validate_record(rec: Mapping[str, Any]) -> None:
    """Check the layout; raise ValueError naming the first problem."""
    for key in ("schema_version", "run_id", "study", "status", "params", "metrics", "quality"):
        if key not in rec:
            raise ValueError(f"record lacks {key!r}")
    if rec["schema_version"] != SCHEMA_VERSION:
        raise ValueError(f"record schema_version {rec['schema_version']} != {SCHEMA_VERSION}")
    if rec["status"] not in ("ok", "failed", "skipped"):
        raise ValueError(f"record status {rec['status']!r} not in ok|failed|skipped")
    if rec["status"] != "ok" and not (rec.get("error") or {}).get("reason"):
        raise ValueError(f"a {rec['status']} record needs error.reason")
    for section in ("metrics", "quality"):
        for name, val in rec[section].items():
            validate_metric(f"{section}.{name}", val)


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write JSON to a temp file in the same folder, fsync, then rename: readers never see half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
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


def read_record(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The record at ``path`` (a file or a run folder), or None if absent or unreadable."""
    path = Path(path)
    if path.is_dir():
        path = path / RECORD_NAME
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return rec if isinstance(rec, dict) else None  # e.g. a list or a bare number: not a record


def iter_records(root: str | os.PathLike[str]) -> Iterable[tuple[Path, dict[str, Any]]]:
    """Every readable record under ``root``, in a stable order."""
    for path in sorted(Path(root).rglob(RECORD_NAME)):
        rec = read_record(path)
        if rec is not None:
            yield path, rec


# ---------------------------------------------------------------- tidy table
def _flatten(prefix: str, obj: Any, out: dict[str, Any]) -> None:
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(obj, list | tuple):
        out[prefix] = json.dumps(obj)
    else:
        out[prefix] = obj


def tidy_rows(rec: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per (run, metric): the long format the summary notebook and figures read.

    Columns: run identity, ``p.<param>`` for every resolved param, device, then
    ``section`` (metrics|quality|model), ``metric``, ``value``, ``unit``, ``method``, ``reason``,
    ``n``, ``std``, ``ci95``.
    """
    base: dict[str, Any] = {
        "run_id": rec.get("run_id"),
        "study": rec.get("study"),
        "axis": rec.get("axis"),
        "status": rec.get("status"),
        "device": (rec.get("provenance") or {}).get("device_name"),
        "finished_at": rec.get("finished_at"),
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


def collect(root: str | os.PathLike[str]):  # -> pandas.DataFrame
    """All records under ``root`` as one tidy long DataFrame (one row per run and metric)."""
    import pandas as pd

    rows = [row for _, rec in iter_records(root) for row in tidy_rows(rec)]
    df = pd.DataFrame(rows)
    if df.empty:
        df = pd.DataFrame(columns=["run_id", "study", "axis", "status", "device", "section",
                                   "metric", "value", "unit", "method", "reason"])
    return df


def run_counts(df):  # -> pandas.DataFrame
    """Runs per (axis, study, status): what a summary shows first."""
    if df.empty:
        return df.head(0)
    return (df.groupby(["axis", "study", "status"])["run_id"].nunique().rename("runs")
            .reset_index())


def write_tidy(df, out_dir: str | os.PathLike[str], name: str = "results") -> tuple[Path, Path]:
    """Write the tidy table as parquet and CSV (both atomically)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in ("parquet", "csv"):
        final = out_dir / f"{name}.{ext}"
        tmp = out_dir / f".{name}.{ext}.tmp"
        df2 = df.copy()
        for col in df2.columns:  # mixed-type param columns do not fit an arrow column
            if df2[col].dtype == object:
                df2[col] = df2[col].map(lambda v: v if v is None or isinstance(v, str) else
                                        json.dumps(v))
        if ext == "parquet":
            df2.to_parquet(tmp, index=False)
        else:
            df2.to_csv(tmp, index=False)
        os.replace(tmp, final)
        paths.append(final)
    return paths[0], paths[1]
