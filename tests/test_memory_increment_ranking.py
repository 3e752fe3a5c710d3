"""Precisions rank on the memory they add, above a baseline taken after every library is
imported; the total stays beside it (issue 29.5)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from effllm_helpers import catalog
from effllm_helpers import results as R
from effllm_helpers.measure import memory as mem
from effllm_helpers.measure.meter import Meter
from effllm_helpers.report import recommend as REC
from effllm_helpers.report import scoring as E


def test_a_library_imported_by_the_baseline_is_not_in_the_increment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A library that holds 160 MB once imported (as bitsandbytes holds ~50 MB) and that a
    technique would import while loading: imported by the mark, it stays out of the increment."""
    (tmp_path / "heavy_lib_29.py").write_text("HELD = bytearray(160_000_000)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "heavy_lib_29", raising=False)
    marked = mem.mark_baseline(["heavy_lib_29", "no_such_lib_29"])
    assert marked["libraries"]["heavy_lib_29"] == "imported"
    assert marked["libraries"]["no_such_lib_29"].startswith("not imported: ModuleNotFoundError")
    with Meter("cpu", sample_interval_s=0.01) as m:
        import heavy_lib_29  # noqa: F401 - the technique's own import: already loaded
        time.sleep(0.05)
        m.step()
    inc = m.metrics()["amu_increment_gb"]
    assert inc["value"] * 1e9 < 80e6
    assert inc["imported_before_baseline"]["heavy_lib_29"] == "imported"


def test_inference_imports_every_precisions_library_before_its_baseline() -> None:
    from effllm_helpers.axes import inference

    libraries = {q.library for q in catalog.PRECISIONS.values()} - {"torch"}
    assert libraries <= set(inference.BASELINE_LIBRARIES)
    assert "bitsandbytes" in inference.BASELINE_LIBRARIES


def _wide(total: list[float], increment: list[float]) -> pd.DataFrame:
    """Two precisions of one model: bnb's import made int4's total the larger."""
    return pd.DataFrame({
        "run_id": ["a", "b"], "status": "ok", "study": "s", "device": "cpu", "p.model": "m",
        "technique": ["fp32", "int4-nf4"], "ppl": [10.0, 10.0], "amu_gb": total,
        "amu_increment_gb": increment, "al_s": [0.1, 0.1], "it": [100.0, 100.0],
    })


def test_inference_scores_and_ranks_memory_on_the_increment() -> None:
    wide = _wide(total=[0.70, 0.72], increment=[0.20, 0.12])
    sc = E.scores_by_set(wide, "inference")
    assert "amu_increment_gb" in sc["metrics"].iloc[0].split(",")
    assert "amu_gb" not in sc["metrics"].iloc[0].split(",")
    assert sc.loc[1, "score"] > sc.loc[0, "score"]  # int4 adds less memory


def test_the_rank_tables_amu_column_ranks_the_increment() -> None:
    recs = [R.new_record(run_id=p, study="s", axis="inference",
                         params={"model": "m", "precision": p},
                         metrics={"amu_gb": R.metric(t, "GB", "x"),
                                  "amu_increment_gb": R.metric(i, "GB", "x")},
                         quality={"ppl": R.metric(10.0, "ppl", "x")})
            for p, t, i in (("fp32", 0.70, 0.20), ("int4-nf4", 0.72, 0.12))]
    tidy = pd.DataFrame([row for rec in recs for row in R.tidy_rows(rec)])
    ranks = E.rank_table(tidy).set_index("technique")["AMU"]
    assert ranks["int4-nf4"] == 1 and ranks["fp32"] == 2


def test_recommend_weighs_the_increment_and_budgets_the_total() -> None:
    wide = _wide(total=[0.70, 0.72], increment=[0.20, 0.12])
    ch = REC.choose_in_set(wide, [], axis="inference", quality="ppl")
    assert "amu_increment_gb" in ch.objectives and "amu_gb" not in ch.objectives
    assert ch.chosen == "int4-nf4"  # same quality, adds less memory (the total said fp32)
    budget = REC.constraints_from(max_memory_gb=0.71)  # what must fit is the total
    assert REC.choose_in_set(wide, budget, axis="inference", quality="ppl").chosen == "fp32"
