"""Tests for the inference precision registry (effllm_helpers.techniques.precision)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from effllm_helpers.config import PRECISIONS, InferenceParams
from effllm_helpers.techniques import UnsupportedTechnique
from effllm_helpers.techniques import precision as pr

warnings.filterwarnings("ignore", category=UserWarning)


@pytest.fixture(scope="module")
def base() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, vocab_size=256,
                      max_position_embeddings=64, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(1))


def load(base: LlamaForCausalLM, precision: str, **kw) -> pr.Loaded:
    return pr.load_for_inference(copy.deepcopy(base), InferenceParams(precision=precision, **kw),
                                 "cpu")


def load_or_skip(base: LlamaForCausalLM, precision: str, **kw) -> pr.Loaded:
    """Load a bnb precision, or prove the clear UnsupportedTechnique and skip with its reason."""
    reason = pr.check_supported(precision, "cpu")
    if reason is not None:
        with pytest.raises(UnsupportedTechnique, match=precision):
            load(base, precision, **kw)
        pytest.skip(f"{precision} unsupported on this CPU: {reason}")
    return load(base, precision, **kw)


def test_registry_covers_config() -> None:
    assert set(pr.REGISTRY) == set(PRECISIONS)


@pytest.mark.parametrize("precision,dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16),
                                             ("fp16", torch.float16)])
def test_float_weights_have_the_dtype(base, ids, precision: str, dtype: torch.dtype) -> None:
    loaded = load(base, precision)
    assert {p.dtype for p in loaded.model.parameters()} == {dtype}
    assert not loaded.model.training
    with torch.no_grad():
        out = loaded.model(input_ids=ids).logits
    assert out.dtype == dtype and bool(torch.isfinite(out).all())


def test_float_byte_ordering(base) -> None:
    b = {p: load(base, p).weight_bytes for p in ("fp32", "bf16", "fp16")}
    assert b["fp32"] > b["bf16"] == b["fp16"]
    assert b["fp32"] == 2 * b["bf16"]  # every tensor of this model is floating point
    assert b["fp32"] == sum(p.numel() * 4 for p in base.parameters()) + sum(
        x.numel() * 4 for x in base.buffers())


def test_int8_smaller_than_fp16(base, ids) -> None:
    loaded = load_or_skip(base, "int8", compute_dtype="fp16")
    import bitsandbytes as bnb

    q = loaded.model.model.layers[0].self_attn.q_proj
    assert isinstance(q, bnb.nn.Linear8bitLt) and q.weight.dtype == torch.int8
    fp16 = load(base, "fp16").weight_bytes
    assert loaded.weight_bytes < fp16
    with torch.no_grad():
        loaded.model(input_ids=ids)
    # after a forward bnb moves SCB from the weight to the module state: still counted
    assert pr.weight_bytes(loaded.model) == loaded.weight_bytes


@pytest.mark.parametrize("precision", ["int4-nf4", "int4-fp4"])
def test_int4_smaller_than_int8(base, precision: str) -> None:
    loaded = load_or_skip(base, precision, compute_dtype="bf16")
    import bitsandbytes as bnb

    q = loaded.model.model.layers[0].self_attn.q_proj
    assert isinstance(q, bnb.nn.Linear4bit) and q.weight.dtype == torch.uint8
    assert q.weight.quant_state.quant_type == precision.split("-")[1]
    assert q.compute_dtype == torch.bfloat16
    int8 = load_or_skip(base, "int8", compute_dtype="bf16").weight_bytes
    assert loaded.weight_bytes < int8
    # the count includes quantisation constants, not only the packed parameter storage
    naive = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    naive += sum(b.numel() * b.element_size() for b in loaded.model.buffers())
    assert loaded.weight_bytes > naive


def test_double_quant_reaches_bnb(base) -> None:
    loaded = load_or_skip(base, "int4-nf4", double_quant=True)
    qs = loaded.model.model.layers[0].self_attn.q_proj.weight.quant_state
    assert qs.nested and qs.absmax.dtype == torch.uint8


def test_int4_from_path_equals_in_memory(base, tmp_path) -> None:
    mem = load_or_skip(base, "int4-nf4")
    base.save_pretrained(tmp_path)
    disk = pr.load_for_inference(tmp_path, InferenceParams(precision="int4-nf4"), "cpu")
    assert disk.weight_bytes == mem.weight_bytes


# ---------------------------------------------------------------- support checks
def test_check_supported_basics() -> None:
    assert pr.check_supported("fp32", "cpu") is None
    with pytest.raises(ValueError, match="unknown precision"):
        pr.check_supported("int2", "cpu")
    if not torch.cuda.is_available():
        assert "CUDA" in pr.check_supported("bf16", "cuda")


def test_bf16_on_old_gpu_has_a_reason(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100")
    reason = pr.check_supported("bf16", "cuda")
    assert reason is not None and "bf16" in reason and "V100" in reason


def test_bnb_failure_becomes_unsupported(base, monkeypatch) -> None:
    import bitsandbytes as bnb

    class Broken(torch.nn.Module):
        def __init__(self, *a, **k) -> None:
            raise RuntimeError("no 4-bit kernel for this backend")

    pr.probe_bnb.cache_clear()
    monkeypatch.setattr(bnb.nn, "Linear4bit", Broken)
    try:
        reason = pr.check_supported("int4-nf4", "cpu")
        assert reason is not None and "no 4-bit kernel" in reason
        with pytest.raises(UnsupportedTechnique, match="no 4-bit kernel"):
            load(base, "int4-nf4")
    finally:
        pr.probe_bnb.cache_clear()


def test_cpu_half_note(monkeypatch) -> None:
    monkeypatch.setattr(pr, "_cpu_flags", lambda: set())
    assert "fp16" in pr.cpu_half_note(torch.float16)
    monkeypatch.setattr(pr, "_cpu_flags", lambda: {"avx512_fp16", "avx512_bf16"})
    assert pr.cpu_half_note(torch.float16) is None
    assert pr.cpu_half_note(torch.bfloat16) is None


def test_quantize_rejects_already_quantized(base) -> None:
    loaded = load_or_skip(base, "int4-nf4")
    with pytest.raises(ValueError, match="already"):
        pr.quantize_in_memory(loaded.model, pr.bnb_config("int8"), "cpu")


def test_int8_defaults_to_fp16_compute_on_cuda_and_bf16_elsewhere() -> None:
    """LLM.int8's CUDA kernels take fp16: defaulting to it avoids a cast at every matmul."""
    assert pr.natural_compute_dtype("int8", "cuda") == "fp16"
    assert pr.natural_compute_dtype("int8", "cpu") == "bf16"
    assert pr.natural_compute_dtype("int4-nf4", "cuda") == "bf16"
