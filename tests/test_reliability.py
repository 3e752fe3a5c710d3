"""Reliability: hostile or broken inputs, kills and concurrent sweeps end in clear messages and
intact records, never a hang, a traceback or a lost result."""

from __future__ import annotations

import textwrap
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from effllm_helpers import config
from effllm_helpers.cli import app

SMOKE = "study: sm\naxis: smoke\nnotebook: notebooks/smoke.ipynb\n"


def write(tmp_path: Path, text: str, name: str = "study.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def cli(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line_refusal(res) -> str:
    """The CLI refused with exit 2 and a short message, not a traceback."""
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    assert "Traceback" not in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)
    return res.output


# ---------------------------------------------------------------- 1. billion laughs
LAUGHS = SMOKE + 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n"
    for p, n in zip("abcdefgh", "bcdefghi", strict=True))


def test_nested_aliases_are_refused_fast_with_a_clear_message(tmp_path):
    path = write(tmp_path, LAUGHS + "grid: {n: *i}\n")
    assert len(path.read_bytes()) < 500
    t0 = time.monotonic()
    with pytest.raises(config.ParamsError, match="expands to more than .* values"):
        config.expand(path)
    assert time.monotonic() - t0 < 10  # generous: it takes well under a second


def test_validate_refuses_nested_aliases_in_a_message_not_a_hang(tmp_path):
    path = write(tmp_path, LAUGHS + "grid: {n: [1]}\nbase: {x: *i}\n")
    out = one_line_refusal(cli("validate", path))
    assert "expands to more than" in out and len(out) < 400


def test_recursive_alias_is_refused(tmp_path):
    path = write(tmp_path, SMOKE + "grid: &g {n: [1], m: *g}\n")
    with pytest.raises(config.ParamsError):
        config.expand(path)


@pytest.mark.parametrize("grid", [f"{{n: [1], {'x' * 1_000_000}: [2]}}",
                                  f"{{n: [1], fail: [{'x' * 1_000_000}]}}"])
def test_a_huge_bad_value_gives_a_short_message(tmp_path, grid):
    path = write(tmp_path, SMOKE + f"grid: {grid}\n")
    with pytest.raises(config.ParamsError) as info:
        config.expand(path)
    assert "grid" in str(info.value) and len(str(info.value)) < 1000


def test_deep_nesting_is_refused_with_a_message(tmp_path):
    path = write(tmp_path, SMOKE + "grid: {n: [1]}\nbase: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(config.ParamsError, match="nested"):
        config.expand(path)
