"""The lock: reading it, telling a record whether it ran under it, and flagging mixed locks."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from effllm_helpers import environment as env
from effllm_helpers import results as R
from effllm_helpers.report import compare as C


def _lock(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "lock.txt"
    path.write_text(text)
    return path


def test_read_lock_gives_canonical_names_and_skips_comments(tmp_path: Path) -> None:
    path = _lock(tmp_path, "# header\nJinja2==3.1.6\ntyping_extensions==4.16.0  # why\n\n")
    assert env.read_lock(path) == {"jinja2": "3.1.6", "typing-extensions": "4.16.0"}


@pytest.mark.parametrize("text", ["torch>=2.13\n", "torch==2.13.0\nTorch==2.13.0\n"],
                         ids=["range", "twice"])
def test_read_lock_refuses_anything_but_one_exact_pin_per_package(tmp_path: Path,
                                                                   text: str) -> None:
    with pytest.raises(ValueError, match=r"lock.txt:\d"):
        env.read_lock(_lock(tmp_path, text))


def test_the_cpu_wheel_local_label_matches_its_locked_version() -> None:
    pins = {"torch": "2.13.0", "peft": "0.21.2", "kernels": "0.19.1"}
    installed = {"torch": "2.13.0+cpu", "peft": "0.21.3"}
    assert env.lock_differences(pins, installed) == {
        "kernels": {"locked": "0.19.1", "installed": None},
        "peft": {"locked": "0.21.2", "installed": "0.21.3"}}


def test_environment_state_names_the_lock_and_what_differs(tmp_path: Path, monkeypatch) -> None:
    have = env.installed_versions()
    pins = {"pyyaml": have["pyyaml"], "pandas": "0.0.1"}
    path = _lock(tmp_path, "".join(f"{k}=={v}\n" for k, v in pins.items()))
    monkeypatch.setenv(env.LOCK_ENV, str(path))
    env.environment_state.cache_clear()
    try:
        state = env.environment_state()
    finally:
        env.environment_state.cache_clear()
    assert state["status"] == "unlocked" and state["lock_sha256"] == env.lock_sha256(path)
    assert state["differs"] == {"pandas": {"locked": "0.0.1", "installed": have["pandas"]}}
    assert env.lock_label(state) == f"unlocked:{state['lock_sha256'][:12]}"


def test_a_missing_lock_file_is_said_not_guessed(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(env.LOCK_ENV, str(tmp_path / "absent.txt"))
    env.environment_state.cache_clear()
    try:
        state = env.environment_state()
    finally:
        env.environment_state.cache_clear()
    assert state["status"] == "no lock" and env.lock_label(state) is None


def _rec(precision: str, tpot: float, lock: dict | None) -> dict:
    return R.new_record(
        run_id=f"{precision}-{tpot}", study="inference", axis="inference",
        params={"model": "tiny", "precision": precision},
        metrics={"tpot_s": R.metric(tpot, "s", "hand-made")},
        provenance={"device_name": "H100", "preset": "gpu", "environment": lock})


LOCK_A = {"lock_sha256": "a" * 64, "status": "locked"}
LOCK_B = {"lock_sha256": "b" * 64, "status": "locked"}


def _tidy(recs: list[dict]) -> pd.DataFrame:
    return pd.DataFrame([row for rec in recs for row in R.tidy_rows(rec)])


def test_the_tidy_table_carries_preset_and_lock() -> None:
    row = R.tidy_rows(_rec("fp16", 0.01, LOCK_A))[0]
    assert row["preset"] == "gpu" and row["lock"] == "a" * 12


def test_compare_flags_result_sets_made_under_different_locks() -> None:
    a = _tidy([_rec("fp16", 0.01, LOCK_A), _rec("int8", 0.02, LOCK_A)])
    t = C.compare(a, _tidy([_rec("fp16", 0.005, LOCK_B), _rec("int8", 0.01, LOCK_B)]),
                  ["tpot_s"])
    assert t["lock_differs"].all() and set(t["lock_b"]) == {"b" * 12}
    assert C.lock_warnings(t) == [f"A ran under lock {'a' * 12}, B under {'b' * 12}: package "
                                  "versions differ, so a ratio may measure the upgrade as "
                                  "well as the technique"]


def test_compare_under_one_lock_warns_nothing() -> None:
    a = _tidy([_rec("fp16", 0.01, LOCK_A), _rec("int8", 0.02, LOCK_A)])
    t = C.compare(a, a, ["tpot_s"])
    assert not t["lock_differs"].any() and C.lock_warnings(t) == []
