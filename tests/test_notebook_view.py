"""What the notebooks show: metric tables with reasons, axis-only metrics, knobs, the batch plot."""

from __future__ import annotations

import json
from pathlib import Path

from effllm_helpers import config
from effllm_helpers import notebook_view as V
from effllm_helpers.results import metric, missing

RECORD = {
    "axis": "inference",
    "metrics": {"it": metric(120.0, "tokens/s", "decode_timer"),
                "aec_w": missing("W", "no power sensor readable on this CPU"),
                "tt": metric(3.0, "tokens/s/param", "train_timer"),
                "it_bs4": metric(400.0, "tokens/s", "decode_timer")},
    "quality": {"ppl": metric(12.6, "ppl", "heldout_stdlib")},
}


def test_metrics_table_shows_value_unit_method_and_the_reason_for_a_null() -> None:
    t = V.metrics_table(RECORD)
    assert list(t.columns) == ["kind", "value", "unit", "method", "reason"]
    assert t.loc["aec_w", "reason"] == "no power sensor readable on this CPU"
    assert t.loc["aec_w", "unit"] == "W" and t.loc["it", "method"] == "decode_timer"
    assert t.loc["it", "reason"] == ""
    assert t.index[0] == "ppl"  # quality first


def test_metrics_table_hides_metrics_foreign_to_the_axis() -> None:
    t = V.metrics_table(RECORD)  # the record's own axis: inference has no training throughput
    assert "tt" not in t.index and {"it", "it_bs4"} <= set(t.index)
    assert "tt" in V.metrics_table(RECORD, axis="architecture").index
    assert "it" not in V.metrics_table(RECORD, axis="architecture").index


def test_metrics_table_reads_a_result_object_too() -> None:
    class Result:
        metrics = RECORD["metrics"]
        quality = RECORD["quality"]

    t = V.metrics_table(Result(), axis="inference")
    assert t.loc["aec_w", "reason"].startswith("no power sensor")


def test_knobs_left_at_none_leave_a_sweeps_params_as_injected() -> None:
    injected = config.notebook_params("inference", "ci", None).model_dump(mode="json")
    out = V.with_knobs(injected, {"precision": None, "batch_sizes": None})
    assert out == injected


def test_a_set_knob_edits_the_preset_and_validates() -> None:
    layer = V.with_knobs(None, {"model.attention": "mla", "model.size": None, "train.steps": 7})
    assert layer == {"model": {"attention": "mla"}, "train": {"steps": 7}}
    p = config.notebook_params("architecture", "ci", layer)
    assert p.model.attention == "mla" and p.train.steps == 7
    assert p.model.size == config.notebook_params("architecture", "ci", None).model.size


def test_cpu_defaults_to_fp32_unless_a_precision_is_named() -> None:
    assert V.cpu_precision_default(None, cuda=False) == {"precision": "fp32"}
    assert V.cpu_precision_default({"precision": "int8"}, cuda=False) == {"precision": "int8"}
    assert V.cpu_precision_default(None, cuda=True) is None


def test_build_note_names_the_work_for_an_embedded_model_only() -> None:
    assert V.embedded_build_note("gpt2", "tiny") is None
    note = V.embedded_build_note("embedded:ci@sft", "tiny") or ""
    cached = V._embedded_cached("ci", "sft")
    assert cached or ("pretraining 30 steps, then SFT 10 steps" in note and "cached" in note)


def test_baseline_rows_come_from_the_newest_matching_record(tmp_path: Path) -> None:
    def write(name: str, precision: str, it: float, when: str) -> None:
        d = tmp_path / name
        d.mkdir()
        d.joinpath("record.json").write_text(json.dumps({
            "axis": "inference", "status": "ok", "finished_at": when,
            "params": {"model": "m", "precision": precision},
            "extra": {"per_batch": [{"batch_size": 1, "it": it}]}}))

    write("a", "fp32", 1.0, "2025-01-01")
    write("b", "fp32", 2.0, "2025-02-01")
    write("c", "int8", 9.0, "2025-03-01")
    assert V.baseline_rows("m", "fp32", tmp_path) == [{"batch_size": 1, "it": 2.0}]
    assert V.baseline_rows("other", "fp32", tmp_path) == []


def test_per_batch_plot_draws_ttft_tpot_it_for_run_and_baseline() -> None:
    rows = [{"batch_size": 1, "ttft_s": 0.1, "tpot_s": 0.01, "it": 90.0},
            {"batch_size": 4, "ttft_s": 0.2, "tpot_s": 0.02, "it": 300.0}]
    fig = V.per_batch_plot(rows, "int8", baseline=rows, baseline_label="fp32 (baseline)")
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["TTFT (s)", "TPOT (s)", "IT (tokens/s)"]
    assert all(len(ax.get_lines()) == 2 for ax in fig.axes)


def test_show_writes_nulls_and_whole_reasons() -> None:
    long = "no RAPL: /sys/class/powercap does not exist on this machine, so no energy"
    rec = {"axis": "inference", "metrics": {"aec_w": missing("W", long)}, "quality": {}}
    page = V.show(V.metrics_table(rec)).data
    assert long in page and "<td>null</td>" in page and "<th>reason</th>" in page


def test_announce_prints_the_description_and_no_build_note_for_a_real_model(capsys) -> None:
    p = config.notebook_params("inference", "ci", {"model": "/some/local/model"})
    V.announce("inference", p)
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [V.describe("inference", p)]
