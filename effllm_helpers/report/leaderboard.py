"""Rankings per axis with the efficiency score: CSV files and one self-contained HTML leaderboard.

Why: the summary must be browsable without a notebook server or network, so the HTML page
carries its own CSS and JS (no external assets): click a header to sort, pick an axis, size
or device to filter. One axis is shown at a time by default, with only its own metric columns
(the board is otherwise ~30 columns wide and mostly empty); every header says in a tooltip what
it measures, its unit, which direction is better and how it was measured; the per-axis CSVs are
linked; the current view exports as a LaTeX or Markdown table for a paper. Scores are computed
within comparison sets (:data:`effllm_helpers.report.scoring.COMPARISON_KEYS`): a rank is
"among runs of the same study, device and model size / base model / model", never across unlike
runs.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from effllm_helpers import catalog
from effllm_helpers.axes.spec import SPECS
from effllm_helpers.paths import outputs_dir
from effllm_helpers.report import scoring as E
from effllm_helpers.results import atomic_path, write_csv

AXES = E.STUDY_AXES
# key metrics shown, in order (quality first); columns empty for an axis are dropped in its CSV
KEY_METRICS = ("val_ppl", "probe_acc", "eval_loss", "accuracy", "task_acc", "ppl",
               "frechet_classifier_distance", "sample_class_accuracy", "amu_gb",
               "amu_increment_gb", "pcu", "mfu", "al_s", "ttft_s", "tpot_s", "tt", "st", "it",
               "tokens_per_s", "aec_w", "energy_j", "j_per_token", "mcr")
SIZE_COLUMN = {a: SPECS[a].size_column for a in AXES}
DEFAULT_UNITS = {k: m.unit for k, m in catalog.METRICS.items() if m.unit}
# one line per metric, for header tooltips (units come from the records, directions from
# efficiency.HIGHER_IS_BETTER, methods from the records)
DEFINITIONS = {
    "val_ppl": "held-out perplexity of the pretrained model",
    "probe_acc": "associative-recall probe accuracy (MQAR)",
    "eval_loss": "fine-tuning eval loss on the task's held-out items",
    "accuracy": "exact-match accuracy on the fine-tuning task",
    "task_acc": "exact-match accuracy on the built-in task, served at this precision",
    "ppl": "held-out perplexity, served at this precision",
    "frechet_classifier_distance": ("Frechet distance of generated vs real images in a small "
                                    "CNN classifier's feature space (not FID)"),
    "sample_class_accuracy": "that classifier's accuracy on generated images (conditioning)",
    "amu_gb": "AMU: average memory used over the measured window",
    "amu_increment_gb": ("AMU above the baseline taken after every library is imported: the "
                         "memory the technique adds (model, activations, cache)"),
    "pcu": "PCU: peak compute utilisation (achieved / peak FLOP/s)",
    "mfu": "MFU: model FLOP utilisation (model FLOPs / peak FLOP/s)",
    "al_s": "AL: average latency per step or request",
    "ttft_s": "time to first token (prefill + first decode step)",
    "tpot_s": "time per output token after the first",
    "tt": "TT: pretraining token throughput per parameter",
    "st": "ST: fine-tuning sample throughput per parameter",
    "it": "IT: inference tokens generated per second",
    "tokens_per_s": "tokens processed per second (not normalised by parameters)",
    "aec_w": "AEC: average power drawn over the measured window",
    "energy_j": "energy over the measured window",
    "j_per_token": "energy per generated or trained token",
    "mcr": "MCR: model compression rate (size ratio scaled by quality kept) vs the baseline",
}
ID_TIPS = {
    "axis": "study axis: architecture pretraining, fine-tuning, inference or cross-modal",
    "study": "study file the run belongs to",
    "technique": "the technique choice(s) that vary within the study",
    "size": ("model size (architecture), base model (fine-tuning), model (inference) or "
             "target model (cross-modal)"),
    "device": "device the run measured on",
    "rank": "rank by efficiency score within the comparison set (1 = best)",
    "score": "efficiency score in [0.1, 1], higher is better (see the note above)",
    "status": "ok, failed or skipped",
}
ID_COLUMNS = ["axis", "study", "rank", "technique", "size", "device", "status", "score",
              "score_lo", "score_hi", "n_metrics", "score_metrics", "excluded", "scoring_note",
              "comparison_set", "run_id"]


def methods_of(tidy_df: pd.DataFrame | None) -> dict[str, str]:
    """Metric name -> the distinct measurement methods the records name for it."""
    if tidy_df is None or tidy_df.empty or "method" not in tidy_df:
        return {}
    m = tidy_df.dropna(subset=["method"])
    return {k: ", ".join(sorted({str(v).split("/")[0] for v in g})[:4])
            for k, g in m.groupby("metric")["method"]}


def tooltip(name: str, unit: str = "", method: str = "") -> str:
    """Header tooltip of one metric: definition, unit, direction, method."""
    parts = [f"{name}: {DEFINITIONS.get(name, name)}"]
    if unit:
        parts.append(f"unit: {unit}")
    if name in E.HIGHER_IS_BETTER:
        parts.append("higher is better" if E.HIGHER_IS_BETTER[name] else "lower is better")
    if method:
        parts.append(f"method: {method}")
    return "; ".join(parts)


def _unit(units: Mapping[str, str], m: str) -> str:
    return str(units.get(m) or DEFAULT_UNITS.get(m, ""))


def _col(units: Mapping[str, str], m: str) -> str:
    u = _unit(units, m)
    return f"{m} [{u}]" if u else m


def leaderboard_frame(tidy_df: pd.DataFrame,
                      weights: Mapping[str, float] | None = None) -> pd.DataFrame:
    """One row per run of every axis, ranked by efficiency score within its comparison set.

    A rank is shared where the scores' intervals overlap (``score_lo``/``score_hi``: each
    metric moved by its noise, :func:`scoring.score_interval`): a run is behind only the runs
    it is clearly behind (:func:`scoring.rank_with_ties`).

    Columns :data:`ID_COLUMNS` then one per key metric named ``<metric> [<unit>]``. Failed runs
    stay in with no score (``excluded = "run failed"``) so the board shows what is missing.
    """
    units = E.units_of(tidy_df)
    frames = []
    for axis in AXES:
        wide = E.wide_table(tidy_df, axis) if tidy_df is not None and not tidy_df.empty \
            else pd.DataFrame()
        if wide.empty:
            continue
        sc = E.scores_by_set(wide, axis, weights=weights)
        rank = pd.Series(pd.NA, index=sc.index, dtype="Int64")
        for _, g in sc.groupby("set"):
            rank[g.index] = E.rank_with_ties(g["score"], g["score_lo"], g["score_hi"])
        f = pd.DataFrame({
            "axis": axis, "study": wide["study"], "rank": rank.astype("Int64"),
            "technique": wide["technique"],
            "size": wide.get(SIZE_COLUMN[axis], pd.Series(pd.NA, index=wide.index)),
            "device": wide.get("device", pd.Series(pd.NA, index=wide.index)),
            "status": wide["status"], "score": sc["score"], "score_lo": sc["score_lo"],
            "score_hi": sc["score_hi"], "n_metrics": sc["n_metrics"],
            "score_metrics": sc["metrics"], "excluded": sc["excluded"],
            "scoring_note": sc["scoring_note"],
            "comparison_set": sc["set"], "run_id": wide["run_id"],
        })
        for m in KEY_METRICS:
            f[_col(units, m)] = pd.to_numeric(wide[m], errors="coerce") if m in wide \
                else float("nan")
        frames.append(f)
    if not frames:
        return pd.DataFrame(columns=ID_COLUMNS + [_col(units, m) for m in KEY_METRICS])
    out = pd.concat(frames, ignore_index=True)
    out["_failed"] = out["status"] != "ok"  # failed runs after the ranked ones of their axis
    out["_score"] = -out["score"]  # inside a shared rank, the higher point score first
    return (out.sort_values(["axis", "_failed", "comparison_set", "rank", "_score", "run_id"],
                            na_position="last").drop(columns=["_failed", "_score"])
            .reset_index(drop=True))


def write_csvs(board: pd.DataFrame, out_dir: str | os.PathLike[str]) -> list[Path]:
    """``leaderboard_<axis>.csv`` per axis present; metric columns the axis never fills dropped."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for axis, sub in board.groupby("axis", sort=True):
        keep = [c for c in sub.columns if c in ID_COLUMNS or sub[c].notna().any()]
        paths.append(write_csv(sub[keep], out_dir / f"leaderboard_{axis}.csv"))
    return paths


# ---------------------------------------------------------------- HTML
def _fmt(v: Any) -> tuple[str, str]:
    """(shown text, sort key) of one cell; nulls show as an en dash and sort last."""
    if v is None or v is pd.NA or v is pd.NaT or (isinstance(v, float) and math.isnan(v)):
        return "–", ""
    if isinstance(v, int | float) and not isinstance(v, bool):
        x = float(v)
        a = abs(x)
        txt = f"{x:.3e}" if a != 0 and (a < 1e-3 or a >= 1e5) else f"{x:.4g}"
        return txt, repr(x)
    return str(v), str(v)


_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:1.2rem;color:#222}
h1{font-size:1.3rem;margin:0 0 .3rem} h2{font-size:1.1rem;margin:1.2rem 0 .3rem}
td.ok{background:#d9f0d3} td.no{background:#fddbc7} td.na{color:#777}
p.note{font-size:.82rem;color:#555;max-width:70rem}
.filters{margin:.6rem 0;display:flex;gap:1rem;flex-wrap:wrap;align-items:center;font-size:.9rem}
.wrap{overflow-x:auto} table{border-collapse:collapse;font-size:.8rem}
th,td{border-bottom:1px solid #ddd;padding:.25rem .5rem;white-space:nowrap;text-align:right}
td.s,th.s{text-align:left} th{background:#f3f5f8;cursor:pointer;position:sticky;top:0;
user-select:none} th:hover{background:#e2e8f0} th[aria-sort=ascending]::after{content:' \\25B2'}
th[aria-sort=descending]::after{content:' \\25BC'} tr.failed td{color:#999;font-style:italic}
td.score{font-weight:600} tr:hover td{background:#fafbe6} span.u{color:#777;font-weight:400}
#count{color:#555} th[title]{text-decoration:underline dotted #999}
.links,.export{font-size:.85rem;margin:.4rem 0} .links a{margin-right:.8rem}
.export textarea{width:100%;max-width:70rem;height:8rem;font-family:monospace;font-size:.75rem}
.export textarea:placeholder-shown{height:1.8rem}
"""

_JS = r"""
(function(){
  const table=document.getElementById('board');
  const body=table.tBodies[0];
  const heads=Array.from(table.tHead.rows[0].cells);
  function key(td,num){const k=td.dataset.sort;if(k===''||k===undefined)return null;
    return num?parseFloat(k):k.toLowerCase();}
  function sortBy(i){
    const th=heads[i];const num=th.dataset.type==='num';
    const dir=th.getAttribute('aria-sort')==='ascending'?'descending':'ascending';
    heads.forEach(h=>h.removeAttribute('aria-sort'));th.setAttribute('aria-sort',dir);
    const rows=Array.from(body.rows);const sgn=dir==='ascending'?1:-1;
    rows.sort((a,b)=>{const x=key(a.cells[i],num),y=key(b.cells[i],num);
      if(x===null&&y===null)return 0;if(x===null)return 1;if(y===null)return -1;
      return x<y?-sgn:(x>y?sgn:0);});
    rows.forEach(r=>body.appendChild(r));
  }
  heads.forEach((th,i)=>th.addEventListener('click',()=>sortBy(i)));
  const filters=Array.from(document.querySelectorAll('select[data-filter]'));
  function apply(){
    let shown=0;
    Array.from(body.rows).forEach(r=>{
      const ok=filters.every(f=>f.value===''||r.dataset[f.dataset.filter]===f.value);
      r.hidden=!ok;if(ok)shown++;});
    document.getElementById('count').textContent=shown+' of '+body.rows.length+' runs shown';
    const axis=document.getElementById('f-axis').value;
    heads.forEach((th,i)=>{if(th.dataset.metric!=='1')return;
      const mine=axis===''||(th.dataset.axes||'').split(' ').includes(axis);
      const any=mine&&Array.from(body.rows).some(r=>!r.hidden&&r.cells[i].dataset.sort!=='');
      th.hidden=!any;Array.from(body.rows).forEach(r=>{r.cells[i].hidden=!any;});});
  }
  filters.forEach(f=>f.addEventListener('change',apply));
  function view(){
    const cols=heads.map((h,i)=>i).filter(i=>!heads[i].hidden&&heads[i].dataset.export!=='0');
    const rows=Array.from(body.rows).filter(r=>!r.hidden);
    return {head:cols.map(i=>heads[i].dataset.label),
            rows:rows.map(r=>cols.map(i=>r.cells[i].textContent.trim()))};
  }
  // every TeX special in one pass (a second pass would escape the braces of the first's
  // \textbackslash{}); ^ and ~ too: ^^5c is TeX's notation for a backslash (^^5cinput = \input)
  const TEX={'\\':'\\textbackslash{}','&':'\\&','%':'\\%','$':'\\$','#':'\\#','_':'\\_',
    '{':'\\{','}':'\\}','^':'\\textasciicircum{}','~':'\\textasciitilde{}','–':'--'};
  const texEscape=t=>t.replace(/[\\&%$#_{}^~–]/g,c=>TEX[c]);
  function latex(){
    const esc=texEscape;
    const v=view();
    const spec=v.head.map((h,i)=>heads.find(t=>t.dataset.label===h).dataset.type==='num'?'r':'l');
    const line=cells=>cells.map(esc).join(' & ')+' \\\\';
    return ['\\begin{tabular}{'+spec.join('')+'}','\\toprule',line(v.head),'\\midrule',
      ...v.rows.map(line),'\\bottomrule','\\end{tabular}'].join('\n')+'\n';
  }
  function markdown(){
    const esc=t=>t.replace(/\|/g,'\\|');
    const v=view();
    const line=cells=>'| '+cells.map(esc).join(' | ')+' |';
    return [line(v.head),'|'+v.head.map(()=>' --- ').join('|')+'|',...v.rows.map(line)]
      .join('\n')+'\n';
  }
  function exportAs(kind){
    const text=kind==='latex'?latex():markdown();
    const box=document.getElementById('export-text');box.value=text;
    const a=document.getElementById('export-dl');
    if(a.href&&a.href.startsWith('blob:'))URL.revokeObjectURL(a.href);
    a.href=URL.createObjectURL(new Blob([text],{type:'text/plain'}));
    a.download='leaderboard.'+(kind==='latex'?'tex':'md');a.hidden=false;
    return text;
  }
  document.getElementById('export-latex').addEventListener('click',()=>exportAs('latex'));
  document.getElementById('export-md').addEventListener('click',()=>exportAs('markdown'));
  window.effllmBoard={sortBy:sortBy,apply:apply,exportAs:exportAs,texEscape:texEscape};
  apply();
})();
"""


def _options(values: Sequence[Any], selected: str | None = None) -> str:
    """Filter options: the distinct non-null values, written as the rows' data-* attributes are
    (with :func:`_fmt`), so that picking one matches its rows."""
    vals = sorted({_fmt(v)[0] for v in values if v is None or not pd.isna(v)} - {"–"})
    return "".join(f'<option value="{html.escape(v)}"{" selected" if v == selected else ""}>'
                   f"{html.escape(v)}</option>" for v in vals)


def render_html(board: pd.DataFrame, units: Mapping[str, str] | None = None,
                title: str = "effllm leaderboard", methods: Mapping[str, str] | None = None,
                csv_links: Mapping[str, str] | None = None,
                default_axis: str | None = None, appendix: str = "") -> str:
    """The leaderboard as one HTML string with inline CSS and JS.

    ``methods``: metric -> measurement methods, for the header tooltips. ``csv_links``: link
    text -> href (relative to the page). ``default_axis``: the axis shown first (default: the
    first present), so a reader meets one axis's columns, not the union of all three.
    ``appendix``: HTML placed after the table (already escaped), e.g. the claims table.
    """
    units = dict(units or {})
    methods = dict(methods or {})
    present = [a for a in AXES if "axis" in board and (board["axis"] == a).any()]
    if default_axis is None and present:
        default_axis = present[0]
    shown_id = [("axis", "axis", "str"), ("study", "study", "str"),
                ("technique", "technique", "str"), ("size", "size / model", "str"),
                ("device", "device", "str"), ("rank", "rank in set", "num"),
                ("score", "efficiency score", "num"), ("status", "status", "str")]
    metric_cols = [c for c in board.columns if c not in ID_COLUMNS]
    head = []
    for col, label, typ in shown_id:
        cls = ' class="s"' if typ == "str" else ""
        head.append(f'<th data-type="{typ}"{cls} data-label="{html.escape(label)}" '
                    f'title="{html.escape(ID_TIPS.get(col, label))}">{html.escape(label)}</th>')
    for c in metric_cols:
        name, _, u = c.partition(" [")
        u = u.rstrip("]")
        lab = html.escape(name) + (f' <span class="u">({html.escape(u)})</span>' if u else "")
        filled = board[board[c].notna()]["axis"] if "axis" in board else pd.Series([])
        axes = " ".join(sorted({str(a) for a in filled}))
        label = f"{name} ({u})" if u else name
        head.append(f'<th data-type="num" data-metric="1" data-axes="{html.escape(axes)}" '
                    f'data-label="{html.escape(label)}" '
                    f'title="{html.escape(tooltip(name, u, methods.get(name, "")))}">{lab}</th>')
    head += ['<th data-type="str" class="s" data-export="0" data-label="score note" '
             'title="metrics the score is over, and those left out (null) with why">'
             'score note</th>',
             '<th data-type="str" class="s" data-export="0" data-label="run" '
             'title="run id: outputs/runs/&lt;study&gt;/&lt;run_id&gt;/record.json">run</th>']
    rows = []
    for d in board.to_dict("records"):
        cells = []
        for col, _, typ in shown_id:
            txt, key = _fmt(d[col])
            cls = "s" if typ == "str" else ("score" if col == "score" else "")
            cells.append(f'<td class="{cls}" data-sort="{html.escape(key)}">'
                         f"{html.escape(txt)}</td>")
        for c in metric_cols:
            txt, key = _fmt(d[c])
            cells.append(f'<td data-sort="{html.escape(key)}">{html.escape(txt)}</td>')
        note = str(d["excluded"] or "")
        if d["score_metrics"]:
            note = f"over {d['score_metrics']}" + (f"; left out {note}" if note else "")
        if d.get("scoring_note"):
            note = "; ".join(p for p in (note, str(d["scoring_note"])) if p)
        cells.append(f'<td class="s" data-sort="{html.escape(note)}">{html.escape(note)}</td>')
        rid = str(d["run_id"])
        cells.append(f'<td class="s" data-sort="{html.escape(rid)}"><code>{html.escape(rid)}'
                     "</code></td>")
        attrs = " ".join(f'data-{k}="{html.escape(_fmt(d[k])[0])}"'
                         for k in ("axis", "size", "device"))
        cls = ' class="failed"' if d["status"] != "ok" else ""
        rows.append(f"<tr{cls} {attrs}>{''.join(cells)}</tr>")
    filters = "".join(
        f'<label>{lab} <select id="f-{k}" data-filter="{k}"><option value="">all</option>'
        f"{_options(board[k], default_axis if k == 'axis' else None) if k in board else ''}"
        "</select></label>"
        for k, lab in (("axis", "axis"), ("size", "size / model"), ("device", "device")))
    links = "".join(f'<a href="{html.escape(href)}" download>{html.escape(text)}</a>'
                    for text, href in (csv_links or {}).items())
    links = f'<div class="links">CSV: {links}</div>' if links else ""
    export = ('<div class="export">Export the current view (filters, visible columns and row '
              'order) as <button id="export-latex" type="button">LaTeX</button> '
              '<button id="export-md" type="button">Markdown</button> '
              '<a id="export-dl" hidden>download</a><br>'
              '<textarea id="export-text" readonly placeholder="the table text appears here, '
              'ready to copy"></textarea></div>')
    when = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    note = ("Efficiency score: each metric min-max scaled to [0.1, 1] (higher = better) within a "
            "comparison set (same study, device and model size / base model / model), then a "
            "weighted harmonic mean (weights from the study's params, default equal). Rank 1 = "
            "best in its set. Null metrics are left out of that run's score and named in the "
            "score note; so is a metric whose spread over the set is within its noise (the "
            f"larger of {E.DEFAULT_NOISE_FLOOR_REL:.0%} of its median and its spread over repeats "
            "of one technique), e.g. a "
            "CPU's PCU, which reads ~0.98 for every method. Failed runs are listed without a "
            "score.")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p class=\"note\">{html.escape(note)} "
        f"Generated {when}; {len(board)} runs.</p>"
        f'<div class="filters">{filters}<span id="count"></span></div>{links}'
        f'<div class="wrap"><table id="board"><thead><tr>{"".join(head)}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div>"
        f"{export}{appendix}<script>{_JS}</script>"
        f"<script type=\"application/json\" id=\"meta\">"
        f"{html.escape(json.dumps({'runs': len(board)}))}</script>"
        "</body></html>\n"
    )


def write_leaderboard(tidy_df: pd.DataFrame,
                      out_html: str | os.PathLike[str] | None = None,
                      out_csv_dir: str | os.PathLike[str] | None = None,
                      weights: Mapping[str, float] | None = None) -> tuple[Path, list[Path]]:
    """Write the HTML leaderboard (default ``outputs/leaderboard.html``) and per-axis CSVs
    (default ``outputs/results/``); return (html path, csv paths)."""
    out_html = Path(out_html) if out_html is not None else outputs_dir("leaderboard.html")
    out_csv_dir = Path(out_csv_dir) if out_csv_dir is not None else outputs_dir("results")
    board = leaderboard_frame(tidy_df, weights)
    csvs = write_csvs(board, out_csv_dir)
    out_html.parent.mkdir(parents=True, exist_ok=True)
    links = {p.stem.removeprefix("leaderboard_"): Path(os.path.relpath(p, out_html.parent))
             .as_posix() for p in csvs}
    from effllm_helpers.report import claims  # draws on the figures' helpers: loaded on use

    claims_html = claims.to_html(claims.claims_table(tidy_df))
    with atomic_path(out_html) as tmp:
        tmp.write_text(render_html(board, E.units_of(tidy_df), methods=methods_of(tidy_df),
                                   csv_links=links, appendix=claims_html), encoding="utf-8")
    return out_html, csvs
