"""Where does a technique start to pay? Ratios against a peer over model size, and the crossover.

A technique's efficiency is a ratio to its peer on the same model, device and settings (int4-wo
TPOT / bf16 TPOT, LoRA s/step / full s/step). Below a size the technique's fixed costs (adapter
kernels, dequantisation, launches) dominate and the ratio is above 1; above it the technique's
saving (bytes, FLOPs) dominates. :func:`crossover` finds that size from measured points;
:func:`ratios` builds the points from records; :func:`fig_scaling` draws one panel per metric
with the crossover marked, or says "no crossover up to N B".

The pairs the study sweeps are :data:`PAIRS` (issue 26): each names the technique's and the
peer's params, the metrics whose ratio matters, and the column that names the model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.ticker import FuncFormatter

from effllm_helpers.axes import spec as A
from effllm_helpers.report import figures as F
from effllm_helpers.report import scoring as E

SIZE_METRIC = "params_total"  # the x of every scaling figure: the peer model's parameter count


@dataclass(frozen=True)
class SameAs:
    """A selector value equal to another column of the same run (a dense model whose FFN
    multiplier equals that run's own expert count, whatever the preset sets it to)."""

    column: str


@dataclass(frozen=True)
class Pair:
    """A technique and its peer: the runs each selects (param column -> value) on one axis."""

    name: str
    axis: str
    technique: Mapping[str, Any]
    peer: Mapping[str, Any]
    metrics: tuple[str, ...]
    model_key: str  # the params column that names the model (one x per value)


_INFER = ("tpot_s", "tpot_s_bs16", "amu_gb", "j_per_token", "weight_bytes")
_TUNE = ("al_s", "peak_gb", "j_per_token")
PAIRS: tuple[Pair, ...] = (
    *(Pair(f"{p} vs bf16", A.INFERENCE, {"p.precision": p}, {"p.precision": "bf16"}, _INFER,
           "p.model") for p in ("int4-wo", "int8-wo", "fp8-e4m3", "int4-nf4", "int4-gemlite")),
    *(Pair(f"{m} vs full", A.FINETUNING, {"p.method": m, "p.quant": "none"},
           {"p.method": "full", "p.quant": "none"}, _TUNE, "p.base_model")
      for m in ("lora", "dora", "rslora", "freeze")),
    Pair("qlora vs full", A.FINETUNING, {"p.method": "lora", "p.quant": "nf4"},
         {"p.method": "full", "p.quant": "none"}, _TUNE, "p.base_model"),
    Pair("moe vs dense (same active)", A.ARCHITECTURE, {"p.model.ffn": "moe"},
         {"p.model.ffn": "dense", "p.model.d_ff_mult": SameAs("p.model.top_k")},
         ("peak_gb", "al_s", "flops_per_token_train"), "p.model.size"),
    *(Pair(f"{a} vs mha", A.ARCHITECTURE, {"p.model.attention": a},
           {"p.model.attention": "mha"}, ("kv_bytes_per_token_measured", "peak_gb", "al_s"),
           "p.model.size") for a in ("mqa", "gqa", "mla")),
)
# a column a pair names but a record lacks holds its unset value (p.quant is absent in
# fine-tuning records written before QLoRA existed)
UNSET = {"p.quant": "none"}


@dataclass(frozen=True)
class Crossover:
    """Where a ratio crosses 1, from points sorted by size; ``size`` is None when it does not."""

    size: float | None
    pays_below: bool | None  # the ratio is < 1 (the technique pays) above the crossover
    text: str
    max_size: float

    @property
    def short(self) -> str:
        """The verdict in a few words, for a legend."""
        if self.size is not None:
            return f"crosses at ~{_billions(self.size)}"
        if self.text.startswith("pays"):
            return "pays at every size"
        return f"no crossover up to {_billions(self.max_size)}" if self.max_size else "no data"


def _billions(n: float) -> str:
    return f"{n / 1e9:.2g} B" if n >= 1e8 else f"{n / 1e6:.3g} M"


def crossover(points: Sequence[tuple[float, float]], threshold: float = 1.0) -> Crossover:
    """The size at which ``ratio`` crosses ``threshold``, interpolated in log-size between the
    two measured points around it (the first crossing; more are said in the text).

    Why log-size: the sweeps step sizes geometrically (0.5, 1.5, 3, 7 B), and a fixed cost
    shrinks against a per-parameter one roughly as 1/size.
    """
    pts = sorted((float(s), float(r)) for s, r in points
                 if s and s > 0 and r is not None and math.isfinite(r) and r > 0)
    if not pts:
        return Crossover(None, None, "no points", 0.0)
    top = pts[-1][0]
    side = [r < threshold for _, r in pts]
    flips = [i for i in range(len(pts) - 1) if side[i] != side[i + 1]]
    if not flips:
        sizes = (f"{_billions(pts[0][0])} to {_billions(top)}" if len(pts) > 1
                 else f"{_billions(top)}, the one size measured")
        if side[0]:
            return Crossover(None, None, f"pays at every size measured ({sizes})", top)
        return Crossover(None, None, f"no crossover up to {_billions(top)} (the technique "
                         f"costs more at every size measured: {sizes})", top)
    i = flips[0]
    (s0, r0), (s1, r1) = pts[i], pts[i + 1]
    f = (threshold - r0) / (r1 - r0)
    size = math.exp(math.log(s0) + f * (math.log(s1) - math.log(s0)))
    pays_above = side[i + 1]
    more = f"; crosses {len(flips)} times" if len(flips) > 1 else ""
    text = (f"{'pays' if pays_above else 'stops paying'} from ~{_billions(size)}"
            f" (between {_billions(s0)} and {_billions(s1)}){more}")
    return Crossover(size, pays_above, text, top)


def _select(wide: pd.DataFrame, spec: Mapping[str, Any]) -> pd.DataFrame:
    mask = pd.Series(True, index=wide.index)
    for col, val in spec.items():
        have = wide[col] if col in wide else pd.Series(None, index=wide.index, dtype=object)
        have = have.where(have.notna(), UNSET.get(col))
        if isinstance(val, SameAs):
            other = wide[val.column] if val.column in wide else None
            mask &= (pd.to_numeric(have, errors="coerce") == pd.to_numeric(other, errors="coerce")
                     ) if other is not None else False
        else:
            mask &= have.astype(str) == str(val)
    return wide[mask]


def ratios(tidy: pd.DataFrame, pair: Pair) -> pd.DataFrame:
    """One row per (device, model, metric): the technique's mean over the peer's mean, at the
    peer's parameter count. Empty when the records hold no matched pair."""
    cols = ["pair", "device", "model", "size", "metric", "technique", "peer", "ratio", "runs"]
    wide = E.ok_rows(E.wide_table(tidy, pair.axis)) if tidy is not None else pd.DataFrame()
    if wide.empty or pair.model_key not in wide:
        return pd.DataFrame(columns=cols)
    tech, peer = _select(wide, pair.technique), _select(wide, pair.peer)
    rows = []
    for (dev, model), p in peer.groupby(["device", pair.model_key], dropna=False):
        t = tech[(tech["device"] == dev) & (tech[pair.model_key] == model)]
        size = pd.to_numeric(p.get(SIZE_METRIC), errors="coerce").mean()
        if t.empty or not size > 0:
            continue
        for m in pair.metrics:
            if m not in wide:
                continue
            tv = pd.to_numeric(t[m], errors="coerce").mean()
            pv = pd.to_numeric(p[m], errors="coerce").mean()
            if not (tv > 0 and pv > 0):
                continue
            rows.append({"pair": pair.name, "device": dev, "model": model, "size": float(size),
                         "metric": m, "technique": float(tv), "peer": float(pv),
                         "ratio": float(tv / pv),
                         "runs": ",".join(map(str, list(t["run_id"]) + list(p["run_id"])))})
    return pd.DataFrame(rows, columns=cols).sort_values(["device", "metric", "size"],
                                                         ignore_index=True)


def table(tidy: pd.DataFrame, pairs: Sequence[Pair] = PAIRS) -> pd.DataFrame:
    """Every pair's crossover per (device, metric): the table the summary notebook shows."""
    out = []
    for pair in pairs:
        r = ratios(tidy, pair)
        for (dev, m), g in r.groupby(["device", "metric"]):
            c = crossover(list(zip(g["size"], g["ratio"], strict=True)))
            out.append({"pair": pair.name, "axis": pair.axis, "device": dev, "metric": m,
                        "sizes": len(g), "ratio_at_largest": float(g["ratio"].iloc[-1]),
                        "crossover_params": c.size, "verdict": c.text})
    return pd.DataFrame(out, columns=["pair", "axis", "device", "metric", "sizes",
                                      "ratio_at_largest", "crossover_params", "verdict"])


def fig_scaling(tidy: pd.DataFrame, out_dir: str | Path, axis: str,
                pairs: Sequence[Pair] = PAIRS) -> F.Drawn:
    """``scaling_<axis>``: one panel per metric, a line per technique (ratio to its peer against
    the peer's parameter count, both log), the ratio-1 line, and each crossover marked."""
    mine = [p for p in pairs if p.axis == axis]
    data = pd.concat([ratios(tidy, p) for p in mine] or [pd.DataFrame()], ignore_index=True)
    name = f"scaling_{axis}"
    title = f"Where does a technique pay? {axis}: ratio to its peer vs model size"
    if data.empty:
        return F._done(name, F._no_data_figure(title, f"no {axis} runs with a technique and its "
                                                      "peer on the same model"), out_dir)
    metrics = [m for p in mine for m in p.metrics if m in set(data["metric"])]
    metrics = list(dict.fromkeys(metrics))
    ncol = min(3, len(metrics))
    nrow = -(-len(metrics) // ncol)
    fig, axs = F._new(5.0 * ncol, 4.6 * nrow, nrow, ncol)
    colours = F._palette(list(dict.fromkeys(data["pair"])))
    plain = FuncFormatter(lambda v, _: f"{v:g}")  # mathtext is off on our figures (plain_text)
    for ax, m in zip(axs.flat, metrics, strict=False):
        sub = data[data["metric"] == m]
        for (pname, _dev), g in sub.groupby(["pair", "device"], sort=False):
            c = crossover(list(zip(g["size"], g["ratio"], strict=True)))
            ax.plot(g["size"] / 1e9, g["ratio"], "o-", color=colours[pname],
                    label=f"{pname}: {c.short}")
            if c.size is not None:
                ax.axvline(c.size / 1e9, color=colours[pname], ls=":", lw=1)
        ax.axhline(1.0, color="0.3", lw=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(plain)
            axis.set_minor_formatter(plain)
        ax.tick_params(which="minor", labelsize=6)
        ax.set_xlabel("model parameters (B, log)")
        ax.set_ylabel("technique / peer (log)")
        ax.set_title(F.LABEL.get(m, m), fontsize=10)
        ax.legend(fontsize=6.5, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)
    for ax in list(axs.flat)[len(metrics):]:
        ax.set_visible(False)
    devs = ", ".join(map(str, dict.fromkeys(data["device"])))
    fig.suptitle(f"{title} ({devs}); below 1 = the technique pays; dotted = crossover",
                 fontsize=11)
    return F._done(name, fig, out_dir)


def draw(tidy: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """The scaling figure of every axis with pairs (those without data say so)."""
    axes = list(dict.fromkeys(p.axis for p in PAIRS))
    return [path for a in axes for path in fig_scaling(tidy, out_dir, a).paths]
