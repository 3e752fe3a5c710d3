"""Records: metric values carry unit+method or a reason; writes are atomic; collection is tidy."""

from __future__ import annotations

import json
import math
import os

import pytest

from effllm_helpers import results


def rec(run_id="r1", status="ok", **kw):
    return results.new_record(run_id=run_id, study="s", axis="smoke",
                              params={"n": 4, "m": {"a": 1}}, status=status, **kw)


def test_metric_keeps_unit_and_method():
    m = results.metric(1.5, "s", "perf_counter", n=3)
    assert m == {"value": 1.5, "unit": "s", "method": "perf_counter", "n": 3}


def test_non_finite_metric_becomes_null_with_reason():
    m = results.metric(math.nan, "W", "nvml_energy_counter")
    assert m["value"] is None and "non-finite" in m["reason"]


def test_null_metric_without_reason_is_rejected():
    r = rec(metrics={"aec_w": {"value": None, "unit": "W", "method": None}})
    with pytest.raises(ValueError, match="null without a reason"):
        results.validate_record(r)


def test_failed_record_needs_a_reason():
    with pytest.raises(ValueError, match="error.reason"):
        results.validate_record(rec(status="failed"))


def test_write_is_atomic_and_leaves_no_temp_files(tmp_path):
    path = results.write_record(tmp_path, rec(metrics={"al_s": results.metric(0.1, "s", "x")}))
    assert json.loads(path.read_text())["metrics"]["al_s"]["value"] == 0.1
    assert sorted(os.listdir(tmp_path)) == ["record.json"]


def test_failed_serialisation_keeps_the_old_record(tmp_path):
    results.write_record(tmp_path, rec())
    with pytest.raises(TypeError):
        results.atomic_write_json(tmp_path / "record.json", {"bad": object()})
    assert results.read_record(tmp_path)["status"] == "ok"
    assert sorted(os.listdir(tmp_path)) == ["record.json"]


def test_interrupted_write_never_leaves_a_partial_record(tmp_path, monkeypatch):
    """Fails for a write straight to record.json: the rename is the only way a record appears."""
    def crash(src, dst):
        raise OSError("killed before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="before the rename"):
        results.write_record(tmp_path, rec())
    assert not (tmp_path / "record.json").exists()
    assert os.listdir(tmp_path) == []  # nor a stray temp file


def test_read_record_that_is_not_a_json_object_or_not_utf8_is_none(tmp_path):
    for content in (b"[1, 2]", b"42", b'"ok"', b'{"run_id": "caf\xe9"}'):
        (tmp_path / "record.json").write_bytes(content)
        assert results.read_record(tmp_path) is None, content
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "record.json").write_bytes(b"[]")
    assert list(results.iter_records(tmp_path)) == []


def test_read_record_of_truncated_file_is_none(tmp_path):
    (tmp_path / "record.json").write_text('{"run_id": "x", ')
    assert results.read_record(tmp_path) is None


def test_tidy_table_has_one_row_per_run_and_metric(tmp_path):
    results.write_record(tmp_path / "a", rec("a", metrics={
        "al_s": results.metric(0.2, "s", "perf_counter"),
        "aec_w": results.missing("W", "no RAPL")}, quality={"ppl": results.metric(9, "", "eval")},
        model={"params_total": 100}))
    err = {"reason": "oom: boom"}
    results.write_record(tmp_path / "b", rec("b", status="failed", error=err))
    df = results.collect(tmp_path)
    a = df[df.run_id == "a"].set_index("metric")
    assert set(a.index) == {"al_s", "aec_w", "ppl", "params_total"}
    assert a.loc["aec_w", "reason"] == "no RAPL" and a.loc["al_s", "unit"] == "s"
    assert a.loc["al_s", "p.m.a"] == 1
    b = df[df.run_id == "b"]
    assert len(b) == 1 and b.iloc[0]["reason"] == "oom: boom"


def test_write_tidy_writes_parquet_and_csv(tmp_path):
    results.write_record(tmp_path / "runs" / "a", rec("a", metrics={
        "al_s": results.metric(0.2, "s", "perf_counter")}))
    pq, csv = results.write_tidy(results.collect(tmp_path / "runs"), tmp_path / "res")
    import pandas as pd

    assert pd.read_parquet(pq)["value"].tolist() == [0.2]
    assert pd.read_csv(csv)["metric"].tolist() == ["al_s"]


def test_attempt_records_a_skip_before_reraising(tmp_path):
    from effllm_helpers.errors import SkipRun
    from effllm_helpers.run import start_run

    ctx = start_run("smoke", preset="ci", output_dir=tmp_path)

    def cannot() -> None:
        raise SkipRun("int4 kernels need CUDA")

    with pytest.raises(SkipRun):
        ctx.attempt(cannot)
    rec = results.read_record(tmp_path)
    assert rec["status"] == "skipped" and "int4 kernels need CUDA" in rec["error"]["reason"]
    assert ctx.attempt(lambda x: x + 1, 1) == 2
