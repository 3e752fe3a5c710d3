"""Hostile params files (issue 29's held-out robustness run): each is refused before any
expansion or compute, with the key, a summary of the bad value and what is allowed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from effllm_helpers import config, studies
from effllm_helpers.cli import app
from effllm_helpers.runenv import TASK_FILES_ENV

SMOKE = "study: s\naxis: smoke\nnotebook: notebooks/smoke.ipynb\n"
INFER = "study: s\naxis: inference\nnotebook: notebooks/03_inference.ipynb\n"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(text)
    return path


def refused(tmp_path: Path, text: str, match: str) -> str:
    with pytest.raises(config.ParamsError, match=match) as info:
        studies.expand(write(tmp_path, text), "ci")
    return str(info.value)


def test_grid_bomb_is_refused_from_the_lengths_before_any_run_is_resolved(tmp_path, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("resolved a grid point of a study that is too large")

    monkeypatch.setattr(studies, "resolve_params", never)
    values = ", ".join(str(i) for i in range(12))
    grid = ", ".join(f"k{i}: [{values}]" for i in range(6))
    msg = refused(tmp_path, SMOKE + f"grid: {{{grid}}}\n", "runs per study")
    assert "2985984 runs" in msg and f"at most {studies.MAX_RUNS_PER_STUDY}" in msg


def test_long_string_repeated_through_aliases_is_refused_by_its_expanded_size(tmp_path):
    text = SMOKE + f'x: &s "{"y" * 200_000}"\ngrid: {{n: [*s, *s, *s, *s, *s, *s]}}\n'
    refused(tmp_path, text, "more than 1000000 characters")


def test_long_list_is_refused_with_its_length_and_the_limit(tmp_path):
    text = SMOKE + "grid: {n: [" + ",".join(["1"] * 5000) + "]}\n"
    msg = refused(tmp_path, text, "grid.n: a list of 5000 values")
    assert f"at most {config.MAX_LIST_LEN}" in msg


def test_oversized_file_is_refused_before_it_is_parsed(tmp_path):
    text = SMOKE + "grid: {n: [1]}\ndescription: '" + "x" * config.MAX_PARAMS_BYTES + "'\n"
    refused(tmp_path, text, "bytes; allowed: a params file of at most")


@pytest.mark.parametrize("key", ["[1, 2]", "{a: 1}"])
def test_list_or_mapping_as_a_key_is_refused(tmp_path, key):
    refused(tmp_path, SMOKE + f"grid: {{n: [1]}}\n? {key}\n: 3\n", "must be a plain name")


def test_nul_in_a_value_is_refused(tmp_path):
    refused(tmp_path, SMOKE + 'grid: {n: [1]}\ndescription: "a\\0b"\n',
            r"description: .*control character \\x00")


def test_terminal_escape_in_a_key_is_refused_and_never_echoed_raw(tmp_path):
    msg = refused(tmp_path, SMOKE + 'grid: {"n\\e[31m": [1]}\n', "control character")
    assert "\x1b" not in msg


def test_boolean_is_not_a_number(tmp_path):
    refused(tmp_path, SMOKE + "grid: {n: [true]}\n", "not true/false")


def test_variant_that_sets_a_plain_grid_key_is_refused(tmp_path):
    refused(tmp_path, SMOKE + "grid: {n: [32], v: [{name: a, n: 64}]}\n",
            r"grid.v sets 'n', which grid.n sets too")


def test_over_long_notebook_and_model_paths_are_refused_not_raised(tmp_path):
    refused(tmp_path, SMOKE.replace("notebooks/smoke.ipynb", "a/" * 3000 + "x.ipynb")
            + "grid: {n: [1]}\n", "notebook:")
    refused(tmp_path, INFER + f"grid: {{model: [{'m' * 5000}]}}\n", "model: unusable path")


def test_missing_data_file_is_refused_before_compute(tmp_path):
    text = ("study: s\naxis: finetuning\nnotebook: notebooks/02_finetuning.ipynb\n"
            "grid: {task: ['jsonl:/no/such.jsonl']}\n")
    refused(tmp_path, text, "task: 'jsonl:/no/such.jsonl': no such file")


def test_lm_eval_task_file_is_refused_without_the_opt_in(tmp_path, monkeypatch):
    monkeypatch.delenv(TASK_FILES_ENV, raising=False)
    text = INFER + "grid: {lm_eval_tasks: [[/tmp/evil/task.yaml], [hellaswag]]}\n"
    refused(tmp_path, text, "not an lm-eval task name.*--allow-task-files")
    monkeypatch.setenv(TASK_FILES_ENV, "1")
    assert len(studies.expand(write(tmp_path, text), "ci")) == 2


def test_a_registry_task_name_is_accepted():
    assert config.check_lm_eval_task("leaderboard_bbh") == "leaderboard_bbh"
    with pytest.raises(ValueError):
        config.check_lm_eval_task("evil.yaml")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_is_not_reported_as_missing(tmp_path):
    fifo = tmp_path / "study.yaml"
    os.mkfifo(fifo)
    with pytest.raises(config.ParamsError, match="not a regular file"):
        config.load_yaml(fifo)


def test_huge_worker_count_is_refused_by_the_cli():
    res = CliRunner().invoke(app, ["sweep", "params/smoke/smoke.yaml", "-w", "1000000000",
                                   "--dry-run"])
    assert res.exit_code == 2 and not isinstance(res.exception, MemoryError)


def test_empty_preset_name_is_refused():
    res = CliRunner().invoke(app, ["validate", "params/smoke/smoke.yaml", "--preset", ""])
    assert res.exit_code == 2 and "--preset '': empty" in res.output


def test_printable_text_survives_a_strict_utf8_terminal():
    text = config.printable("key\x1b[31m \ud800 tab\tok")
    text.encode("utf-8")  # a lone surrogate would raise here
    assert "\x1b" not in text and "\\x1b" in text and "\t" in text
