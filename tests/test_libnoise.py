"""Known library messages are said once, in one line, with their meaning; others pass through."""

from __future__ import annotations

import logging
import warnings

import pytest

from effllm_helpers import libnoise


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    monkeypatch.setattr(libnoise, "_SAID", set())
    libnoise.install()


def test_known_log_message_is_shown_once_with_its_meaning(caplog):
    log = logging.getLogger("bitsandbytes.autograd._functions")
    with caplog.at_level(logging.WARNING, logger=log.name):
        for _ in range(300):
            log.warning("MatMul8bitLt: inputs will be cast from %s to float16", "torch.float32")
    [rec] = caplog.records
    line = rec.getMessage()
    assert "\n" not in line and "said once" in line and "LLM.int8 casts" in line


def test_unknown_message_of_a_known_logger_passes_through_every_time(caplog):
    log = logging.getLogger("torchao")
    with caplog.at_level(logging.WARNING, logger=log.name):
        log.warning("a real problem %d", 1)
        log.warning("a real problem %d", 1)
    assert [r.getMessage() for r in caplog.records] == ["a real problem 1"] * 2


def test_torchao_extension_failures_are_said_once_for_all_of_them(caplog):
    log = logging.getLogger("torchao")
    with caplog.at_level(logging.WARNING, logger=log.name):
        log.warning("Failed to load /x/torchao/_C_cutlass_90a.abi3.so: undefined symbol")
        log.warning("Failed to load /x/torchao/_C_mxfp8.so: undefined symbol")
    [rec] = caplog.records
    assert "no number is affected" in rec.getMessage()


def test_known_warning_is_shown_once_and_an_unknown_one_passes(monkeypatch):
    shown: list[str] = []
    monkeypatch.setitem(libnoise._INSTALLED, "showwarning",
                        lambda message, *args, **kwargs: shown.append(str(message)))
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = libnoise._showwarning
        for _ in range(3):
            warnings.warn("MatMul8bitLt: inputs will be cast from torch.float32", UserWarning,
                          stacklevel=1)
        warnings.warn("something else", UserWarning, stacklevel=1)
    assert len(shown) == 2 and "said once" in shown[0] and shown[1] == "something else"


def test_install_is_idempotent():
    libnoise.install()
    libnoise.install()
    log = logging.getLogger("torchao")
    assert sum(isinstance(f, libnoise._OnceFilter) for f in log.filters) == 1


def test_bitsandbytes_kernel_fetch_is_offline(monkeypatch):
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with libnoise.hub_offline():
        assert hub.HF_HUB_OFFLINE is True  # what `kernels` reads before a Hub fetch
    assert hub.HF_HUB_OFFLINE is False
