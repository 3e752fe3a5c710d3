"""int4-gemlite: our group quantiser, the layer swap and the CPU skip (GemLite itself is CUDA)."""

from __future__ import annotations

import copy
import sys
import types

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from effllm_helpers.config import InferenceParams
from effllm_helpers.errors import UnsupportedTechnique
from effllm_helpers.techniques import gemlite_int4 as gl
from effllm_helpers.techniques import precision as pr


def test_group_quantiser_error_is_at_most_half_a_step() -> None:
    w = torch.randn(8, 256, generator=torch.Generator().manual_seed(0))
    q, scale, zero = gl.quantize_groups(w, 64)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15 and scale.shape == (8, 4)
    err = (gl.dequantize_groups(q, scale, zero) - w).abs().reshape(8, 4, 64)
    assert bool((err <= scale[..., None] / 2 + 1e-6).all())


def test_group_quantiser_keeps_each_groups_min_and_max() -> None:
    w = torch.randn(4, 128, generator=torch.Generator().manual_seed(1))
    q, scale, zero = gl.quantize_groups(w, 32)
    back = gl.dequantize_groups(q, scale, zero).reshape(4, 4, 32)
    g = w.reshape(4, 4, 32)
    torch.testing.assert_close(back.amin(-1), g.amin(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(back.amax(-1), g.amax(-1), atol=1e-5, rtol=0)


def test_group_size_is_the_largest_that_divides_every_width() -> None:
    assert gl.group_size_for([896, 4864]) == 128
    assert gl.group_size_for([896, 64 * 7]) == 64
    with pytest.raises(ValueError, match="no int4 group size"):
        gl.group_size_for([100])


def test_int4_gemlite_is_a_recorded_skip_on_cpu() -> None:
    reason = pr.check_supported("int4-gemlite", "cpu")
    assert reason is not None and "CUDA" in reason
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=1, num_attention_heads=4,
                                         vocab_size=64))
    with pytest.raises(UnsupportedTechnique, match="int4-gemlite"):
        pr.load_for_inference(model, InferenceParams(precision="int4-gemlite"), "cpu")


class _FakeGemLiteLayer(nn.Module):
    """Stands in for GemLite's layer on a CPU: the kernel's maths, (q - zero) * scale."""

    def __init__(self, q, scale, zero, bias) -> None:
        super().__init__()
        self.register_buffer("w", gl.dequantize_groups(q, scale, zero).to(scale.dtype))
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.w, self.bias)


@pytest.fixture
def fake_gemlite(monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = types.ModuleType("gemlite")
    pkg.__version__ = "0.0-fake"
    helper = types.ModuleType("gemlite.helper")
    calls: list[int] = []

    class A16Wn:
        def __init__(self, device=None, dtype=None) -> None:
            pass

        def from_weights(self, q, scale, zero, W_nbits, group_size, bias=None):  # noqa: N803
            assert W_nbits == 4 and q.dtype == torch.uint8
            calls.append(group_size)
            return _FakeGemLiteLayer(q, scale, zero, bias)

    _FakeGemLiteLayer.__module__ = "gemlite.core"
    helper.A16Wn = A16Wn
    pkg.helper = helper
    monkeypatch.setitem(sys.modules, "gemlite", pkg)
    monkeypatch.setitem(sys.modules, "gemlite.helper", helper)
    return calls


def test_every_linear_but_the_head_is_swapped_and_named(fake_gemlite) -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, vocab_size=96,
                                         tie_word_embeddings=False)).eval()
    ids = torch.randint(0, 96, (1, 8))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    quant, notes = gl.gemlite_quantize(copy.deepcopy(model))
    assert fake_gemlite == [64] * 14  # 2 layers x 7 projections, one group size (64 | 64, 128)
    assert isinstance(quant.lm_head, nn.Linear)
    assert pr.linear_kernels(quant) == {"gemlite 0.0-fake A16W4 g64": 14,
                                        "torch.nn.Linear(fp32)": 1}
    assert pr.is_quantized(quant) and any("group size 64" in n for n in notes)
    with torch.no_grad():
        out = quant(input_ids=ids).logits
    assert (out - ref).norm() / ref.norm() < 0.25  # int4 of random weights: ~0.13; a wrong swap ~1


def test_a_width_no_group_size_divides_is_a_skip_naming_the_widths(fake_gemlite) -> None:
    model = nn.Sequential(nn.Linear(100, 64), nn.Linear(64, 8))
    with pytest.raises(UnsupportedTechnique, match=r"int4-gemlite: .*\[64, 100\]"):
        gl.gemlite_quantize(model)


def test_the_probe_layer_is_fixed_and_leaves_the_callers_random_stream_alone() -> None:
    from effllm_helpers.techniques import probe

    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    a, b = probe.reference_linear(16, 8), probe.reference_linear(16, 8)
    assert torch.equal(torch.rand(4), expected)  # building it drew no random number
    assert torch.equal(a.weight, b.weight) and a.bias is None
    x = probe.probe_input(2, 16, "cpu")
    assert probe.relative_error(a(x), a(x)) == 0.0
    assert probe.relative_error(2 * a(x), a(x)) == pytest.approx(1.0)
