"""Every axis notebook runs under papermill at the ci preset, and the summary reports on them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from effllm_helpers import sweep
from effllm_helpers.cli import app

pytestmark = pytest.mark.slow

STUDIES = {  # one study file per axis, restricted to one grid point with --set
    "params/architecture/attention.yaml": ["model.attention=mla", "model.size=small"],
    "params/finetuning/general.yaml": ["method=dora"],
    "params/inference.yaml": ["precision=int4-nf4"],
}


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("nb")
    for study, sets in STUDIES.items():
        from effllm_helpers import studies

        res = sweep.sweep(study, "ci", root, progress=False,
                          overrides=studies.parse_overrides(sets))
        assert {o.status for o in res.outcomes} <= {"ok", "skipped"}, sweep.summary_table(res)
    return root


def test_each_axis_notebook_writes_an_ok_or_skipped_record(out):
    recs = [json.loads(p.read_text()) for p in out.rglob("record.json")]
    assert {r["axis"] for r in recs} == {"architecture", "finetuning", "inference"}
    for rec in recs:
        assert rec["status"] in ("ok", "skipped"), rec.get("error")
        if rec["status"] == "ok":
            for name, val in {**rec["metrics"], **rec["quality"]}.items():
                assert val["value"] is not None or val["reason"], name
    for nb in out.rglob("run.ipynb"):
        cells = json.loads(nb.read_text())["cells"]
        assert any(c.get("outputs") for c in cells if c["cell_type"] == "code")
        rec = json.loads((nb.parent / "record.json").read_text())
        axis = rec["axis"]
        tables = [o["data"]["text/html"] for c in cells if c["cell_type"] == "code"
                  for o in c.get("outputs", []) if "text/html" in o.get("data", {})]
        if rec["status"] == "ok":  # the metrics table: unit, method, reason; only this axis's
            table = "".join("".join(t) for t in tables)
            assert "<th>reason</th>" in table and "<th>method</th>" in table, nb
            assert ("<th>tt</th>" in table) == (axis == "architecture"), nb
        if axis in ("architecture", "finetuning") or rec["status"] == "ok":
            # the run's curves (training) or per-batch TTFT/TPOT/IT (inference), as a picture
            assert any("image/png" in o.get("data", {}) for c in cells
                       if c["cell_type"] == "code" for o in c.get("outputs", [])), nb


def test_report_draws_figures_and_leaderboard_from_the_records(out, tmp_path):
    res = CliRunner().invoke(app, ["report", "--results", str(out / "runs"), "--output",
                                   str(tmp_path)])
    assert res.exit_code == 0, res.output
    pngs = sorted(p.name for p in (tmp_path / "figures").glob("*.png"))
    assert "fig2_rank_table.png" in pngs and "fig5_precision_polar.png" in pngs
    assert all((tmp_path / "figures" / p).with_suffix(".pdf").is_file() for p in pngs)
    assert (tmp_path / "leaderboard.html").read_text().count("<tr") >= 3
    assert (tmp_path / "results" / "results.parquet").is_file()
