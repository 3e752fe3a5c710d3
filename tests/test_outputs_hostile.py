"""Corrupt records and hostile text reaching the workbook's outputs (issue 29's held-out run):
a record that fails its checks is reported as invalid, never ranked, and no CSV the workbook
writes holds a live spreadsheet formula."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pandas as pd
import pytest
from fixtures_records import write_all

from effllm_helpers import results
from effllm_helpers.report import compare as cmp
from effllm_helpers.report import leaderboard


def record(run_id: str = "r1", **sections) -> dict:
    rec = results.new_record(run_id=run_id, study="s", axis="smoke", params={"n": 1},
                             metrics={"al_s": results.metric(0.5, "s", "timer")})
    rec.update(sections)
    return rec


def collect_problems(tmp_path: Path, rec: dict | str) -> list[tuple[Path, str]]:
    rdir = tmp_path / "runs" / "r1"
    rdir.mkdir(parents=True)
    text = rec if isinstance(rec, str) else json.dumps(rec)
    (rdir / results.RECORD_NAME).write_text(text)
    problems: list[tuple[Path, str]] = []
    df = results.collect(tmp_path / "runs", problems)
    assert df.empty
    return problems


def test_model_fact_past_float_range_is_invalid_not_a_crash(tmp_path):
    rec = record(model={"n_params": 1})
    text = json.dumps(rec).replace('"n_params": 1', '"n_params": 1' + "0" * 400)
    [(_, reason)] = collect_problems(tmp_path, text)
    assert "model fact 'n_params' is out of range" in reason


def test_negative_latency_is_invalid_not_ranked_first(tmp_path):
    rec = record(metrics={"al_s": {"value": -5.0, "unit": "s", "method": "timer"}})
    [(_, reason)] = collect_problems(tmp_path, rec)
    assert "negative" in reason and "al_s" in reason


def test_overflowing_metric_is_invalid(tmp_path):
    rec = record(metrics={"it": {"value": 1e300, "unit": "tokens/s", "method": "timer"}})
    [(_, reason)] = collect_problems(tmp_path, rec)
    assert "out of range" in reason


def test_unsealed_record_is_reported_not_collected(tmp_path):
    [(_, reason)] = collect_problems(tmp_path, record(notebook_saved=False))
    assert reason.startswith("unsealed")


def test_looping_record_symlink_is_reported_as_a_link(tmp_path):
    rdir = tmp_path / "runs" / "r1"
    rdir.mkdir(parents=True)
    os.symlink(rdir / results.RECORD_NAME, rdir / results.RECORD_NAME)
    problems: list[tuple[Path, str]] = []
    assert results.collect(tmp_path / "runs", problems).empty
    assert problems and "symbolic link" in problems[0][1]


FORMULAS = ["=HYPERLINK(\"http://x\",\"y\")", "@SUM(A1:A9)", "  =1+1", "+cmd", "-2+3"]


def test_leaderboard_csv_escapes_formulas(tmp_path):
    board = pd.DataFrame({"axis": ["smoke"] * len(FORMULAS), "technique": FORMULAS})
    [path] = leaderboard.write_csvs(board, tmp_path)
    cells = pd.read_csv(path)["technique"].tolist()
    assert all(c.startswith("'") for c in cells)


def test_compare_csv_escapes_formulas(tmp_path, monkeypatch):
    monkeypatch.setattr(cmp, "draw", lambda *a, **k: [])  # the CSV alone
    table = pd.DataFrame({"technique": FORMULAS, "ratio": [1.0] * len(FORMULAS)})
    path = cmp.write_compare(table, tmp_path)[0]
    assert all(c.startswith("'") for c in pd.read_csv(path)["technique"])


def test_concurrent_tidy_writes_into_one_folder_do_not_collide(tmp_path):
    df = results.collect(write_all(tmp_path / "recs"))
    errors: list[BaseException] = []

    def write() -> None:
        try:
            for _ in range(5):
                results.write_tidy(df, tmp_path / "out")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert not list((tmp_path / "out").glob("*.tmp"))
    assert len(pd.read_parquet(tmp_path / "out" / "results.parquet")) == len(df)


@pytest.mark.parametrize("name", ["results.csv"])
def test_atomic_path_leaves_nothing_behind_on_failure(tmp_path, name):
    with pytest.raises(RuntimeError), results.atomic_path(tmp_path / name):
        raise RuntimeError("writer failed")
    assert list(tmp_path.iterdir()) == []
