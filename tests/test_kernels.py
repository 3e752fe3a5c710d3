"""model.kernel dispatch (fla on CUDA, else the PyTorch reference) and what the record says.

On this CPU-only machine fla's kernels cannot run: these tests pin the dispatch logic, that the
CPU path is unchanged, and NSA's fla-semantics reference rule; fla itself is checked on a GPU by
``benchmarks/kernels_check.py`` (and against fla's naive NSA here when fla imports)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from effllm_helpers import config
from effllm_helpers.axes.architecture import _implementation, effective_size
from effllm_helpers.config import ModelSpec, SizeSpec
from effllm_helpers.models import build, flops, kernels, nsa

SIZE = SizeSpec(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128)


@pytest.fixture
def fla_present(monkeypatch):
    """Pretend fla imports (dispatch logic only: nothing calls a kernel)."""
    monkeypatch.setattr(kernels, "fla_missing", lambda: None)


def test_auto_on_cpu_runs_the_reference_and_says_why() -> None:
    c = kernels.choose("rwkv", "auto", "cpu", "ref")
    assert (c.use_fla, c.implementation) == (False, "ref")
    assert c.reason.startswith("cpu")
    assert kernels.record(c, "auto") == {"implementation": "ref", "kernel_requested": "auto",
                                         "implementation_reason": c.reason}


def test_reference_is_the_reference_everywhere_without_a_reason(fla_present) -> None:
    c = kernels.choose("mamba", "reference", "cuda", "ref")
    assert (c.use_fla, c.reason) == (False, None)
    assert "implementation_reason" not in kernels.record(c, "reference")


def test_explicit_fla_where_it_cannot_run_is_an_error() -> None:
    with pytest.raises(kernels.KernelUnavailable, match="cpu"):
        kernels.choose("nsa", "fla", "cpu", "ref")
    with pytest.raises(ValueError, match="not one of"):
        kernels.choose("nsa", "triton", "cpu", "ref")


def test_auto_on_cuda_picks_fla_when_it_imports(fla_present) -> None:
    c = kernels.choose("rwkv", "auto", "cuda", "ref")
    assert c.use_fla and c.implementation == "fla.fused_recurrent_rwkv4"
    assert kernels.choose("nsa", None, torch.device("cuda", 0), "ref").use_fla


def test_auto_skips_a_kernel_the_gpu_check_found_disagreeing(fla_present) -> None:
    c = kernels.choose("mamba", "auto", "cuda", "ref")
    assert not c.use_fla and c.implementation == "ref" and "disagreed" in c.reason
    forced = kernels.choose("mamba", "fla", "cuda", "ref")  # asked for by name: it runs
    assert forced.use_fla and forced.implementation.startswith("fla.fused_recurrent_gla")


def test_auto_on_cuda_without_fla_says_fla_is_missing(monkeypatch) -> None:
    monkeypatch.setattr(kernels, "fla_missing", lambda: "fla not installed (x)")
    c = kernels.choose("mamba", "auto", "cuda", "ref")
    assert not c.use_fla and c.reason == "fla not installed (x)"
    with pytest.raises(kernels.KernelUnavailable, match="fla not installed"):
        kernels.choose("mamba", "fla", "cuda", "ref")


def test_nsa_settings_fla_cannot_express_fall_back_under_auto(fla_present) -> None:
    shape = {"n_heads": 8, "n_kv_heads": 2, "head_dim": 64, "block": 64, "n_selected": 4}
    assert nsa.fla_unsupported(stride=64, **shape) is None
    assert "nsa_stride == nsa_block" in nsa.fla_unsupported(stride=32, **shape)
    assert "powers of two" in nsa.fla_unsupported(**{**shape, "stride": 64, "n_selected": 3})
    c = nsa.nsa_choice("auto", "cuda", stride=32, **shape)
    assert not c.use_fla and "nsa_stride" in c.reason
    with pytest.raises(kernels.KernelUnavailable, match="nsa_stride"):
        nsa.nsa_choice("fla", "cuda", stride=32, **shape)
    assert nsa.nsa_choice("auto", "cuda", stride=64, **shape).use_fla


def test_fla_group_pads_to_a_power_of_two_of_at_least_16() -> None:
    assert [nsa.fla_group(h, 2) for h in (2, 8, 32, 48, 64)] == [16, 16, 16, 32, 32]


@pytest.mark.parametrize(("family", "attention", "impl"), [
    ("transformer", "nsa", "pytorch_dense_masked_reference"),
    ("rwkv", "gqa", "transformers.rwkv_linear_attention_cpu (pytorch loop over time)"),
    ("mamba", "gqa", "effllm selective_scan (pytorch chunked scan)"),
])
def test_cpu_builds_run_and_record_the_reference(family, attention, impl) -> None:
    model = build(ModelSpec(family=family, attention=attention), SIZE, vocab_size=50,
                  max_seq_len=256)
    assert model.config.kernel == "auto"
    choices = kernels.prepare(model, "cpu")
    assert choices and all(not c.use_fla and c.implementation == impl for c in choices)
    facts = _implementation(model.config, 128, "cpu")
    assert facts["implementation"] == impl and facts["kernel_requested"] == "auto"
    assert facts["implementation_reason"].startswith("cpu")
    model(torch.randint(0, 50, (1, 70)))  # the CPU forward runs


def test_explicit_fla_model_on_cpu_fails_at_its_first_forward() -> None:
    model = build(ModelSpec(family="mamba", kernel="fla"), SIZE, vocab_size=50, max_seq_len=64)
    with pytest.raises(kernels.KernelUnavailable, match="model.kernel=fla for mamba"):
        model(torch.randint(0, 50, (1, 8)))
    with pytest.raises(kernels.KernelUnavailable):
        _implementation(model.config, 64, "cpu")


def test_switch_points_every_dispatching_module_at_one_kernel_and_rule() -> None:
    model = build(ModelSpec(attention="nsa"), SIZE, vocab_size=50, max_seq_len=64)
    kernels.prepare(model, "cpu")  # decisions made and kept
    kernels.switch(model, "fla", "first_previous_current")
    mods = [m for m in model.modules() if isinstance(m, kernels.KernelDispatch)]
    assert mods and all(m.kernel == "fla" and m._choices == {} for m in mods)
    assert all(m.forced == "first_previous_current" for m in mods)
    with pytest.raises(kernels.KernelUnavailable):  # re-decided at the next forward: no fla here
        model(torch.randint(0, 50, (1, 8)))


def test_kernel_field_is_validated() -> None:
    with pytest.raises(ValueError):
        ModelSpec(kernel="cuda")
    assert ModelSpec().kernel == "auto"


def test_record_of_an_fla_nsa_counts_the_kernels_work(fla_present) -> None:
    p = config.notebook_params("architecture", "ci", {"model": {"attention": "nsa"}})
    spec = p.model.model_copy(update={"nsa_stride": p.model.nsa_block})
    cfg = build(spec, effective_size(p), vocab_size=64, max_seq_len=1024).config
    fla_facts = _implementation(cfg, 1024, "cuda")
    assert fla_facts["implementation"].startswith("fla.parallel_nsa")
    assert "implementation_reason" not in fla_facts
    ref = flops.executed_flops_per_token(cfg, 1024)
    assert fla_facts["flops_per_token_fwd_executed"] < ref
    assert "fla.parallel_nsa" in fla_facts["flops_per_token_fwd_executed_method"]


def test_fla_rule_forces_the_first_previous_and_own_block() -> None:
    """n_selected = 3 = the forced blocks: the selected branch is exactly SDPA over them."""
    torch.manual_seed(0)
    block, t_len = 8, 40
    q, k, v = (torch.randn(1, h, t_len, 16) for h in (2, 1, 1))
    gates = torch.zeros(1, 2, t_len, 3)
    gates[..., 1] = 1.0  # the selected branch only
    q_pos = torch.arange(t_len)
    out = nsa.nsa_attention(q, k, v, q_pos, gates, torch.zeros(1, block), block=block,
                            stride=block, n_selected=3, window=4,
                            forced="first_previous_current")
    t = t_len - 1  # own block 4, previous 3, first 0
    keys = torch.cat([torch.arange(0, 8), torch.arange(24, 40)])
    want = F.scaled_dot_product_attention(q[:, :, t:t + 1], k[:, :, keys].expand(1, 2, -1, -1),
                                          v[:, :, keys].expand(1, 2, -1, -1))
    torch.testing.assert_close(out[:, :, t:t + 1], want)
    default = nsa.nsa_attention(q, k, v, q_pos, gates, torch.zeros(1, block), block=block,
                                stride=block, n_selected=3, window=4)
    assert not torch.allclose(default[:, :, t], out[:, :, t])


@pytest.mark.skipif(kernels.fla_missing() is not None,
                    reason=f"fla's naive NSA needs fla + triton: {kernels.fla_missing()}")
def test_reference_with_fla_rules_matches_fla_naive_nsa() -> None:
    from fla.ops.nsa import naive_nsa

    torch.manual_seed(0)
    bsz, hq, hkv, t_len, d, block = 1, 16, 1, 96, 32, 16
    q, k, v = (torch.randn(bsz, t_len, h, d) for h in (hq, hkv, hkv))
    g = torch.rand(bsz, t_len, hq, 3)
    g[..., 2] = 0
    ours = nsa.nsa_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                             torch.arange(t_len), g.transpose(1, 2), torch.zeros(hkv, block),
                             block=block, stride=block, n_selected=4, window=1,
                             forced="first_previous_current").transpose(1, 2)
    theirs = naive_nsa(q, k, v, g_cmp=g[..., 0], g_slc=g[..., 1], block_counts=4,
                       block_size=block, window_size=0)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


@pytest.fixture
def fla_stand_in(monkeypatch):
    """Stand-in fla NSA modules that refuse mixed operand dtypes, as fla's Triton kernels do,
    and record the dtypes they were given."""
    import sys
    import types

    seen: list[tuple[torch.dtype, ...]] = []

    def same_dtype(*ts: torch.Tensor) -> None:
        seen.append(tuple(t.dtype for t in ts))
        if len({t.dtype for t in ts}) != 1:
            raise TypeError("Both operands must be same dtype")

    def parallel_nsa(q, k, v, **_):
        same_dtype(q, k, v)
        return torch.zeros_like(q)

    def parallel_attn(q, k, v, **_):
        same_dtype(q, k, v)
        return torch.zeros_like(q)

    for name, attrs in {"fla": {}, "fla.ops": {}, "fla.ops.nsa": {"parallel_nsa": parallel_nsa},
                        "fla.ops.attn": {"parallel_attn": parallel_attn}}.items():
        monkeypatch.setitem(sys.modules, name, types.SimpleNamespace(**attrs))
    return seen


def test_nsa_fla_call_gives_the_kernels_one_dtype_under_autocast(fla_stand_in) -> None:
    # under bf16 autocast RoPE can hand back fp32 queries beside bf16 keys/values (seen on an
    # H200: fla's kernel failed to compile on the mix)
    q = torch.randn(1, 4, 64, 16)
    k, v = torch.randn(2, 1, 2, 64, 16).bfloat16()
    gates = torch.rand(1, 4, 64, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        nsa.nsa_attention_fla(q, k, v, gates, block=16, n_selected=2, window=32)
    assert fla_stand_in and all(d == (torch.bfloat16,) * 3 for d in fla_stand_in)


def test_nsa_fla_call_keeps_fp32_without_autocast(fla_stand_in) -> None:
    q, k, v = torch.randn(1, 4, 64, 16), torch.randn(1, 2, 64, 16), torch.randn(1, 2, 64, 16)
    nsa.nsa_attention_fla(q, k, v, torch.rand(1, 4, 64, 3), block=16, n_selected=2, window=32)
    assert all(d == (torch.float32,) * 3 for d in fla_stand_in)


def test_rwkv_on_fla_trains_uncompiled_and_says_why() -> None:
    rwkv = kernels.Choice(True, kernels.FLA_OPS["rwkv"])
    assert "eagerly" in kernels.compile_blocker([rwkv])
    # the same op on its reference, and other fla ops, may compile
    assert kernels.compile_blocker([kernels.Choice(False, "ref", "cpu"),
                                    kernels.Choice(True, kernels.FLA_OPS["mamba"])]) is None


def test_a_compile_blocking_kernel_trains_eagerly_and_the_record_says_why(monkeypatch) -> None:
    from effllm_helpers.axes import architecture

    monkeypatch.setattr(kernels, "compile_blocker", lambda choices: "kernel X breaks compile")
    p = config.notebook_params("architecture", "ci", {"train": {"compile": True, "steps": 2}})
    res = architecture.run(p, progress=False)
    assert res.model["compiled"] is False
    assert res.model["compile_off_reason"] == "kernel X breaks compile"
    assert res.metrics["compile_s"]["value"] is None
    assert res.metrics["compile_s"]["reason"] == "kernel X breaks compile"
