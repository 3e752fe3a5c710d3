"""MCR from real weight bytes (incl. bitsandbytes quant states) and the nominal bit ratio."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from effllm_helpers.measure.compression import compression_metrics, mcr, mcr_nominal, weight_bytes


def test_weight_bytes_counts_params_and_buffers() -> None:
    m = nn.Sequential(nn.Linear(10, 20), nn.BatchNorm1d(20))
    wb = weight_bytes(m)
    assert wb["params"] == (10 * 20 + 20 + 20 + 20) * 4
    assert wb["buffers"] == (20 + 20) * 4 + 8  # running mean/var + num_batches_tracked (int64)
    assert wb["total"] == wb["params"] + wb["buffers"]


def test_weight_bytes_counts_tied_weights_once_and_follows_dtype() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(100, 8)
            self.head = nn.Linear(8, 100, bias=False)
            self.head.weight = self.emb.weight

    m = Tied()
    assert weight_bytes(m)["total"] == 100 * 8 * 4
    assert weight_bytes(m.to(torch.bfloat16))["total"] == 100 * 8 * 2


def test_weight_bytes_includes_quant_state_tensors() -> None:
    lin = nn.Linear(4, 4, bias=False)

    class State2:
        def __init__(self) -> None:
            self.absmax = torch.zeros(3, dtype=torch.float32)

    class QS:
        def __init__(self) -> None:
            self.absmax = torch.zeros(5, dtype=torch.uint8)
            self.code = torch.zeros(16, dtype=torch.float32)
            self.state2 = State2()

    lin.weight.quant_state = QS()
    wb = weight_bytes(lin)
    assert wb["quant_state"] == 5 + 16 * 4 + 3 * 4
    assert wb["total"] == 16 * 4 + wb["quant_state"]


@pytest.mark.slow
def test_weight_bytes_of_a_real_bnb_4bit_layer() -> None:
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.bfloat16,
                              quant_type="nf4").to("cpu")
    wb = weight_bytes(layer)
    assert wb["params"] == 64 * 64 // 2  # two 4-bit values per byte
    assert wb["quant_state"] > 0  # absmax per 64-block at least
    assert wb["total"] < 64 * 64 * 2  # smaller than bf16


def test_mcr_real_bytes_and_nominal() -> None:
    m = mcr(size_orig=1000, size_comp=400, perf_orig=0.5, perf_comp=0.45)
    assert m["value"] == pytest.approx(2.5 * 0.9) and m["method"] == "real_bytes"
    n = mcr_nominal("int4", perf_orig=0.5, perf_comp=0.45)
    assert n["value"] == pytest.approx(4.0 * 0.9) and n["method"] == "nominal_bits"
    assert (n["bits_orig"], n["bits_comp"]) == (16, 4) and "size_orig_bytes" not in n
    assert mcr_nominal("int4-nf4", 0.5, 0.5, bits_orig="fp32")["value"] == pytest.approx(8.0)
    assert mcr(1000, 400, None, 0.4)["value"] is None


def test_compression_metrics_without_baseline() -> None:
    out = compression_metrics(400, 0.45, None, None, "int4")
    assert out["size_bytes"]["value"] == 400
    assert out["mcr"]["value"] is None and "baseline" in out["mcr"]["reason"]


def test_mcr_nominal_bits_of_torchao_precisions() -> None:
    assert mcr_nominal("int8-wo", 0.5, 0.5)["value"] == pytest.approx(2.0)
    assert mcr_nominal("int4-wo", 0.5, 0.5)["value"] == pytest.approx(4.0)
    assert mcr_nominal("fp8-e4m3", 0.5, 0.5)["bits_comp"] == 8


def test_weight_bytes_of_a_torchao_int8_layer_counts_its_inner_tensors() -> None:
    """A torchao weight owns no storage: the bytes are its int8 data, fp32 row scales and int8
    row zero points."""
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    layer = nn.Linear(64, 32, bias=False)
    quantize_(layer, Int8WeightOnlyConfig())
    w = layer.weight
    assert type(w).__name__ == "Int8Tensor" and w.qdata.dtype == torch.int8
    expected = sum(t.numel() * t.element_size() for t in (w.qdata, w.scale, w.zero_point))
    assert weight_bytes(layer)["params"] == expected == 64 * 32 + 32 * 4 + 32
