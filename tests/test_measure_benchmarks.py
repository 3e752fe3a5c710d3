"""The two measurement benchmarks start, take --help, and fail clearly where they cannot run."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str) -> ModuleType:
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_overhead_help_and_tiny_run(capsys: pytest.CaptureFixture[str]) -> None:
    mod = _load("measure_overhead")
    with pytest.raises(SystemExit) as exc:
        mod.main(["--help"])
    assert exc.value.code == 0
    assert mod.main(["--steps", "30", "--rounds", "1", "--dim", "32", "--threads", "0"]) == 0
    out = capsys.readouterr().out
    assert "overhead ratio" in out and "process CPU-time ratio" in out


def test_gpu_validate_without_gpu_exits_with_a_message(capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    mod = _load("gpu_validate")
    assert mod.main([]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_gpu_validate_summary_handles_skipped_parts() -> None:
    mod = _load("gpu_validate")
    res = {"device": {"device_name": "X"}, "finished_at": "now", "command": "cmd",
           "a_energy": {"ok": False, "reason": "skipped by --skip"},
           "b_mfu": {"ok": False, "reason": "skipped by --skip"},
           "c_overhead": {"ok": False, "reason": "skipped by --skip"}}
    text = mod.summary_text(res)
    assert text.count("not measured: skipped by --skip") == 3 and "command: cmd" in text
