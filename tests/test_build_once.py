"""The one locked builder of cached artefacts (``paths.build_once``)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from effllm_helpers import paths


def test_build_once_builds_a_missing_artefact_and_then_only_finds_it(tmp_path: Path) -> None:
    calls: list[Path] = []

    def build(tmp: Path) -> None:
        calls.append(tmp)
        tmp.write_text("built")

    out = tmp_path / "thing.pt"
    assert paths.build_once(out, build) is True
    assert paths.build_once(out, build) is False
    assert out.read_text() == "built" and len(calls) == 1
    assert calls[0] != out and not calls[0].exists()  # written beside it, then renamed


def test_a_failed_build_leaves_no_artefact(tmp_path: Path) -> None:
    def build(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("killed midway")

    out = tmp_path / "thing.pt"
    with pytest.raises(RuntimeError):
        paths.build_once(out, build)
    assert not out.exists()


def test_build_once_holds_the_lock_while_it_builds(tmp_path: Path) -> None:
    out = tmp_path / "thing.pt"
    building, release = threading.Event(), threading.Event()
    order: list[str] = []

    def slow(tmp: Path) -> None:
        building.set()
        release.wait(30)
        order.append("first")
        tmp.write_text("1")

    def second(tmp: Path) -> None:  # must never run: the first build is found under the lock
        order.append("second")

    t = threading.Thread(target=paths.build_once, args=(out, slow))
    t.start()
    assert building.wait(30)
    waiter = threading.Thread(target=lambda: order.append(str(paths.build_once(out, second))))
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive() and order == []  # queued on the lock, not building its own
    release.set()
    t.join(30)
    waiter.join(30)
    assert order == ["first", "False"]
