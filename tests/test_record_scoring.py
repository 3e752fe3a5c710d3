"""The study's quality metric and weights travel in the record and rank its runs (issue 27)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from effllm_helpers import results as R
from effllm_helpers import studies, sweep
from effllm_helpers.report import scoring as E


def _arch(rid: str, attention: str, amu: float, al: float,
          scoring: dict | None) -> dict:
    return R.new_record(
        run_id=rid, study="s", axis="architecture",
        params={"model": {"attention": attention, "size": "small"}, "seed": 0},
        metrics={"amu_gb": R.metric(amu, "GB", "x"), "al_s": R.metric(al, "s", "x")},
        quality={"val_ppl": R.metric(10.0, "ppl", "x"),
                 "probe_acc": R.metric(0.5, "fraction", "x")},
        provenance={"device_name": "cpu"}, scoring=scoring)


def _wide(weights: dict[str, float] | None, quality: str = "val_ppl") -> pd.DataFrame:
    sc = None if weights is None else {"quality": quality, "weights": weights}
    recs = [_arch("a", "mha", 1.0, 2.0, sc), _arch("b", "gqa", 2.0, 1.0, sc)]
    return E.wide_table(pd.DataFrame([r for rec in recs for r in R.tidy_rows(rec)]),
                        "architecture")


def _best(wide: pd.DataFrame) -> str:
    sc = E.scores_by_set(wide, "architecture")
    return str(wide.loc[sc["score"].idxmax(), "technique"])


def test_a_changed_recorded_weight_changes_the_ranking() -> None:
    assert _best(_wide({"amu_gb": 10.0})) == "mha"
    assert _best(_wide({"al_s": 10.0})) == "gqa"


def test_the_recorded_quality_choice_is_the_quality_metric() -> None:
    assert E.quality_metric(_wide({}, quality="probe_acc"), "architecture") == "probe_acc"


def test_records_without_scoring_fall_back_to_the_defaults_and_say_so() -> None:
    wide = _wide(None)
    got = E.study_scoring(wide, "architecture")
    assert (got.quality, got.weights) == ("val_ppl", {})
    assert "carry no study scoring" in E.scores_by_set(wide, "architecture")["scoring_note"].iloc[0]


def test_tidy_rows_carry_the_scoring_as_columns() -> None:
    row = R.tidy_rows(_arch("a", "mha", 1.0, 2.0, {"quality": "probe_acc",
                                                    "weights": {"al_s": 2}}))[0]
    assert row[R.SCORING_QUALITY] == "probe_acc"
    assert json.loads(row[R.SCORING_WEIGHTS]) == {"al_s": 2}


def test_a_negative_recorded_weight_is_refused() -> None:
    rec = _arch("a", "mha", 1.0, 2.0, {"quality": "val_ppl", "weights": {"al_s": -1}})
    with pytest.raises(ValueError, match="scoring.weights"):
        R.validate_record(rec)


def test_a_study_run_names_its_quality_or_the_axis_default() -> None:
    run = {"axis": "architecture", "weights": {"tt": 2.0}, "quality": None}
    assert studies.scoring_facts(run) == {"quality": "val_ppl", "weights": {"tt": 2.0}}
    assert studies.scoring_facts({**run, "quality": "probe_acc"})["quality"] == "probe_acc"


def test_the_runner_seals_the_study_scoring_into_the_record(tmp_path: Path) -> None:
    R.write_record(tmp_path, R.new_record(run_id="r", study="s", axis="smoke", params={},
                                          metrics={}))
    (tmp_path / sweep.RUN_NOTEBOOK).write_text(json.dumps({"cells": []}))
    sc = {"quality": "val_ppl", "weights": {"tt": 2.0}}
    assert sweep.seal_record(tmp_path, "r", sc)[R.SCORING] == sc
    assert R.read_record(tmp_path)[R.SCORING] == sc


def test_expanded_runs_carry_the_study_quality(tmp_path: Path) -> None:
    path = tmp_path / "q.yaml"
    path.write_text("study: q\naxis: smoke\nnotebook: notebooks/smoke.ipynb\n"
                    "grid: {n: [4]}\nweights: {tt: 3}\n")
    run, = studies.expand(path, "ci")
    assert studies.scoring_facts(run) == {"quality": None, "weights": {"tt": 3.0}}
