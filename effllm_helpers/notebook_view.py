"""What the axis notebooks show: their knobs, what a long cell is doing, metric tables, plots.

Why: a notebook is where a researcher meets the study, so it must say what it is doing (a long
build with no word is indistinguishable from a hang), show every metric with its unit, method
and — for a null — the reason the record holds, and hide the metrics that do not belong to its
axis. The logic lives here so the notebooks stay a parameters cell plus calls.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from .axes.spec import SPECS, of_params
from .config import ArchitectureParams, FinetuneParams, InferenceParams, deep_merge, set_dotted
from .paths import outputs_dir

# metrics that are measured on another axis's workload and never describe this one (training
# throughputs on an inference run, decode latencies on a pretraining run)
FOREIGN_METRICS: dict[str, frozenset[str]] = {n: s.foreign_metrics for n, s in SPECS.items()}
TABLE_COLUMNS = ["kind", "value", "unit", "method", "reason"]
_BATCH_SUFFIX = re.compile(r"_bs\d+$")


def belongs_to(axis: str, name: str) -> bool:
    """Whether metric ``name`` (``it_bs4`` counts as ``it``) describes a run of ``axis``."""
    return _BATCH_SUFFIX.sub("", name) not in FOREIGN_METRICS.get(axis, frozenset())


def _sections(obj: Any) -> tuple[str | None, dict[str, Any], dict[str, Any]]:
    if isinstance(obj, Mapping):
        return obj.get("axis"), dict(obj.get("metrics") or {}), dict(obj.get("quality") or {})
    return None, dict(getattr(obj, "metrics", {}) or {}), dict(getattr(obj, "quality", {}) or {})


def metrics_table(record_or_result: Any, axis: str | None = None) -> pd.DataFrame:
    """One row per metric of a record (dict) or an axis result: kind (quality first), value,
    unit, method and, for a null value, the reason the record gives. Metrics foreign to
    ``axis`` (default: the record's own) are left out."""
    rec_axis, metrics, quality = _sections(record_or_result)
    axis = axis or rec_axis
    rows = []
    for kind, section in (("quality", quality), ("metric", metrics)):
        for name, m in section.items():
            if not isinstance(m, Mapping) or (axis and not belongs_to(axis, name)):
                continue
            value = m.get("value")
            rows.append({"name": name, "kind": kind, "value": value, "unit": m.get("unit") or "",
                         "method": m.get("method") or "",
                         "reason": "" if value is not None else (m.get("reason") or "")})
    frame = pd.DataFrame(rows, columns=["name", *TABLE_COLUMNS])
    return frame.set_index("name")


def show(frame: pd.DataFrame) -> Any:
    """``frame`` as notebook HTML with nulls written as "null" and reasons never cut short
    (pandas shortens long cells to 50 characters, which hides the reason for a null)."""
    from IPython.display import HTML

    def cell(v: Any) -> Any:
        if v is None or (isinstance(v, float) and v != v):
            return "null"
        return f"{v:.6g}" if isinstance(v, float) else v

    with pd.option_context("display.max_colwidth", None):
        return HTML(frame.map(cell).to_html())


# ---------------------------------------------------------------- parameters cell
def with_knobs(params: dict[str, Any] | None, knobs: Mapping[str, Any]) -> dict[str, Any] | None:
    """``params`` with the notebook's plain-variable knobs (dotted keys) layered on top.

    A knob left at ``None`` changes nothing, so a sweep's injected ``params`` pass through as
    they are; a knob that is set edits them (or the preset, when ``params`` is None).
    """
    layer: dict[str, Any] = {}
    for key, value in knobs.items():
        if value is not None:
            set_dotted(layer, key, copy.deepcopy(value))
    if not layer:
        return params
    return deep_merge(params or {}, layer)


def cpu_precision_default(params: dict[str, Any] | None, cuda: bool | None = None
                          ) -> dict[str, Any] | None:
    """On a machine without CUDA, fp32 when neither ``params`` nor a knob names a precision:
    bf16/fp16 are emulated on a CPU and their timings say nothing about the technique."""
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    if cuda or (params and "precision" in params):
        return params
    return deep_merge(params or {}, {"precision": "fp32"})


def embedded_build_note(model: str, profile: str) -> str | None:
    """A one-line explanation to print before a cell that may build an embedded model, or None
    when the model is a real one or already cached."""
    from .models import embedded

    parsed = embedded.parse(model, profile)
    if parsed is None:
        return None
    profile, stage = parsed
    try:
        cached = _embedded_cached(profile, stage)
    except Exception:  # noqa: BLE001 - the note is a courtesy; never fail a run over it
        cached = False
    if cached:
        return None
    steps = f"pretraining {embedded.BASE_STEPS[profile]} steps"
    if stage == "sft":
        steps += f", then SFT {embedded.SFT_STEPS[profile]} steps"
    return (f"building the embedded {profile} model ({steps}; cached after the first time "
            "under .cache/models) …")


def _embedded_cached(profile: str, stage: str) -> bool:
    from .models import embedded
    from .paths import cache_dir

    base_key = embedded._key(embedded._arch_params(profile).model_dump(mode="json"))
    path = cache_dir("models") / f"embedded-{profile}-base-{base_key}"
    if stage == "sft":
        recipe = embedded._sft_params(Path("<base>"), profile).model_dump(mode="json")
        path = cache_dir("models") / f"embedded-{profile}-sft-{base_key}-{embedded._key(recipe)}"
    return (path / "config.json").is_file()


def announce(axis: str, p: Any) -> None:
    """Print what the long cell is about to do: the embedded-model build note when one will be
    built first (fine-tuning and inference), then the axis's one-line description."""
    model = SPECS[axis].model_key if axis in SPECS else None
    note = embedded_build_note(getattr(p, model), p.embedded_profile) if model else None
    if note:
        print(note, flush=True)
    print(describe(axis, p), flush=True)


def describe(axis: str, p: Any) -> str:
    """What the axis's long cell is about to do, in one line (printed before it starts).

    Told apart by the params' class (the spec binds each axis to one), not the axis's name."""
    if isinstance(p, ArchitectureParams):
        m = p.model
        return (f"pretraining {m.family}/{m.attention}/{m.positional}/{m.ffn} at size {m.size} "
                f"for {p.train.steps} steps (batch {p.train.batch_size}) on '{p.data.corpus}', "
                "then measuring; the train bar shows progress …")
    if isinstance(p, FinetuneParams):
        quant = f" on a {p.quant} base" if p.quant != "none" else ""
        return (f"fine-tuning {p.base_model} with {p.method} (rank {p.rank}){quant} on "
                f"'{p.task}' for {p.train.steps} steps; the train bar shows progress …")
    if isinstance(p, InferenceParams):
        import torch

        base = p.baseline_precision
        if base == "bf16" and not torch.cuda.is_available():
            base = "fp32 (bf16 is emulated on a CPU)"
        return (f"serving {p.model} at {p.precision}: decode benchmark at batch sizes "
                f"{list(p.batch_sizes)} ({p.gen_tokens} tokens after a {p.prompt_len}-token "
                f"prompt), then quality and MCR against {base} …")
    return f"running {axis} …"


# ---------------------------------------------------------------- inference per batch size
PLOTTED = (("ttft_s", "TTFT (s)"), ("tpot_s", "TPOT (s)"), ("it", "IT (tokens/s)"))


def baseline_rows(model: str, precision: str, runs: str | Path | None = None
                  ) -> list[dict[str, Any]]:
    """Per-batch rows of the newest ok inference record of ``model`` at ``precision`` under
    ``runs`` (default ``outputs/runs``): measured numbers from an earlier run, never estimates."""
    root = Path(runs) if runs is not None else outputs_dir("runs")
    best: tuple[str, list[dict[str, Any]]] | None = None
    for f in root.rglob("record.json") if root.is_dir() else []:
        try:
            rec = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        p = rec.get("params") or {}
        if (rec.get("axis") == of_params(InferenceParams).name and rec.get("status") == "ok"
                and p.get("model") == model and p.get("precision") == precision
                and (rec.get("extra") or {}).get("per_batch")):
            when = str(rec.get("finished_at") or "")
            if best is None or when > best[0]:
                best = (when, rec["extra"]["per_batch"])
    return best[1] if best else []


def per_batch_plot(rows: Sequence[Mapping[str, Any]], label: str,
                   baseline: Sequence[Mapping[str, Any]] = (), baseline_label: str = "baseline"):
    """TTFT, TPOT and IT against batch size for this run and, when given, its baseline."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 3.2), layout="constrained")
    axes = fig.subplots(1, len(PLOTTED))
    for ax, (key, title) in zip(axes, PLOTTED, strict=True):
        for data, lab, style in ((rows, label, "o-"), (baseline, baseline_label, "s--")):
            pts = sorted((r["batch_size"], r.get(key)) for r in data if r.get(key) is not None)
            if pts:
                ax.plot([b for b, _ in pts], [v for _, v in pts], style, label=lab)
        ax.set_title(title)
        ax.set_xlabel("batch size")
        ax.set_xticks(sorted({r["batch_size"] for r in [*rows, *baseline]}))
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center",
                    transform=ax.transAxes, color="#888")
    return fig
