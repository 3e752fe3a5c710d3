"""Session-wide test settings: the CPU MFU calibration goes to a temp folder with a small budget.

The per-machine calibration (``measure.compute``) would otherwise spend seconds timing matmuls
in the first test that asks for a CPU peak and read or write the user's ``~/.cache/effllm``: tests
must neither depend on a cache another run left nor pollute it. Set before any test imports a
notebook kernel, so sweeps' papermill kernels (which inherit the environment) use it too. A test
of the cache itself sets its own folder with ``monkeypatch``.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

TEST_CALIB_BUDGET_S = "0.2"  # seconds for one CPU calibration: enough for a positive peak


def pytest_configure(config: pytest.Config) -> None:
    from effllm_helpers.measure import compute as comp

    calib = tempfile.mkdtemp(prefix="effllm-test-calib-")
    config._effllm_calib_dir = calib  # type: ignore[attr-defined]
    os.environ[comp.CALIB_DIR_ENV] = calib
    os.environ[comp.CALIB_BUDGET_ENV] = TEST_CALIB_BUDGET_S
    # the sweeps of this session count each other, not those of whoever else tests on the host
    runtime = tempfile.mkdtemp(prefix="effllm-test-runtime-")
    config._effllm_runtime_dir = runtime  # type: ignore[attr-defined]
    os.environ["EFFLLM_RUNTIME_DIR"] = runtime


def pytest_unconfigure(config: pytest.Config) -> None:
    for attr in ("_effllm_calib_dir", "_effllm_runtime_dir"):
        folder = getattr(config, attr, None)
        if folder:
            shutil.rmtree(folder, ignore_errors=True)
