"""Tests for the inference precision registry (effllm_helpers.techniques.precision)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from effllm_helpers.catalog import PRECISIONS
from effllm_helpers.config import InferenceParams
from effllm_helpers.errors import UnsupportedTechnique
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


# ---------------------------------------------------------------- torchao precisions
TORCHAO = ["int8-wo", "int4-wo", "fp8-e4m3"]


@pytest.mark.parametrize("precision", TORCHAO)
def test_torchao_precision_runs_or_is_a_skip_with_its_reason(base, ids, precision: str) -> None:
    reason = pr.check_supported(precision, "cpu")
    if reason is None:
        loaded = load(base, precision)
        with torch.no_grad():
            assert bool(torch.isfinite(loaded.model(input_ids=ids).logits.float()).all())
        assert any(k.startswith("torchao.") for k in loaded.kernels)
    else:
        assert "CUDA" in reason and precision in reason  # says why: the kernel is CUDA-only
        with pytest.raises(UnsupportedTechnique, match=precision):
            load(base, precision)


def test_int8_wo_runs_on_cpu_close_to_fp32(base, ids) -> None:
    """torchao's int8 weight-only path has no CUDA-only op: it must run here, and be accurate."""
    assert pr.check_supported("int8-wo", "cpu") is None
    loaded = load(base, "int8-wo", compute_dtype="fp32")
    with torch.no_grad():
        ref = base(input_ids=ids).logits
        out = loaded.model(input_ids=ids).logits
    assert out.dtype == torch.float32
    assert (out - ref).abs().max().item() < 0.03 * ref.abs().max().item()


def test_int8_wo_records_the_kernel_of_every_linear(base) -> None:
    loaded = load(base, "int8-wo")
    # 2 layers x 7 projections quantised; the LM head stays bf16, as bitsandbytes leaves it
    assert loaded.kernels == {"torchao.Int8Tensor": 14, "torch.nn.Linear(bf16)": 1}
    assert type(loaded.model.model.layers[0].mlp.up_proj.weight).__name__ == "Int8Tensor"
    assert pr.is_quantized(loaded.model)


def test_kernels_recorded_for_float_and_bitsandbytes(base) -> None:
    assert load(base, "fp32").kernels == {"torch.nn.Linear(fp32)": 15}
    nf4 = load_or_skip(base, "int4-nf4")
    assert nf4.kernels == {"bitsandbytes.Linear4bit(nf4)": 14, "torch.nn.Linear(bf16)": 1}


def test_int8_wo_weight_bytes_are_a_quarter_of_fp32_linears(base) -> None:
    loaded = load(base, "int8-wo", compute_dtype="fp32")
    quantised = [m for m in loaded.model.modules()
                 if isinstance(m, torch.nn.Linear) and pr.linear_kernel(m).startswith("torchao")]
    q_bytes = sum(pr.weight_bytes(m) for m in quantised)
    fp32_bytes = sum(m.weight.numel() * 4 for m in quantised)
    # int8 data plus, per output row, an fp32 scale and an int8 zero point (5 B per >= 64 B row)
    assert 0.25 <= q_bytes / fp32_bytes <= 0.25 * (1 + 5 / 64) + 1e-9
    assert loaded.weight_bytes < load(base, "bf16").weight_bytes


def test_torchao_model_cannot_be_cast_back(base) -> None:
    loaded = load(base, "int8-wo")
    with pytest.raises(ValueError, match="quantised"):
        pr.load_for_inference(loaded.model, InferenceParams(precision="fp32"), "cpu")


def test_int4_group_size_fits_the_model() -> None:
    assert pr.int4_group_size([256, 512]) == 128
    assert pr.int4_group_size([64, 128]) == 64
    assert pr.int4_group_size([96, 160]) == 32
    assert pr.int4_group_size([128, 128, 96]) == 32  # the size that quantises the most layers
    assert pr.int4_group_size([100, 128]) == 128  # a tie: the largest


def test_torchao_import_failure_becomes_unsupported(base, monkeypatch) -> None:
    def broken() -> None:
        raise ImportError("No module named 'torchao'")

    pr.probe_torchao.cache_clear()
    monkeypatch.setattr(pr, "import_torchao", broken)
    try:
        reason = pr.check_supported("int8-wo", "cpu")
        assert reason is not None and "torchao cannot be imported" in reason
        with pytest.raises(UnsupportedTechnique, match="torchao cannot be imported"):
            load(base, "int8-wo")
    finally:
        pr.probe_torchao.cache_clear()


def test_fp8_on_a_gpu_before_ada_has_a_reason(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA A100")
    pr.probe_torchao.cache_clear()
    try:
        reason = pr.check_supported("fp8-e4m3", "cuda")
    finally:
        pr.probe_torchao.cache_clear()
    assert reason is not None and "A100" in reason and "8.0 < 8.9" in reason
