"""Model zoo: every spec builds, trains, saves/reloads, generates; params are counted right."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from effllm_helpers.config import ModelSpec, SizeSpec
from effllm_helpers.models import EffllmConfig, EffllmDecoderForCausalLM, build, count_params

# DeepSeek-V3 with n_shared_experts=0 builds an empty shared MLP; torch warns on reload
pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")

VOCAB, SEQ = 256, 32
SIZE = SizeSpec(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=SEQ)
NSA = {"attention": "nsa", "nsa_window": 8, "nsa_block": 8, "nsa_stride": 4, "nsa_selected": 2}

# (spec overrides, expected class name)
SPECS: list[tuple[dict, str]] = [
    *[({"attention": a}, "LlamaForCausalLM") for a in ("mha", "mqa", "gqa")],
    *[({"attention": "gqa", "positional": p}, "EffllmDecoderForCausalLM")
      for p in ("sinusoidal", "learned", "relative", "none")],
    ({"attention": "mqa", "positional": "relative"}, "EffllmDecoderForCausalLM"),
    *[({**NSA, "positional": p}, "EffllmDecoderForCausalLM")
      for p in ("rope", "sinusoidal", "learned", "none")],
    ({"attention": "mla"}, "DeepseekV3ForCausalLM"),
    ({"attention": "gqa", "ffn": "moe"}, "MixtralForCausalLM"),
    ({"attention": "mla", "ffn": "moe"}, "DeepseekV3ForCausalLM"),
    ({"family": "pythia"}, "GPTNeoXForCausalLM"),
    ({"family": "rwkv"}, "RwkvForCausalLM"),
]
IDS = ["-".join(f"{v}" for k, v in s.items() if not k.startswith("nsa_")) for s, _ in SPECS]
OURS = [s for s, cls in SPECS if cls == "EffllmDecoderForCausalLM"]
OUR_IDS = [i for i, (_, cls) in zip(IDS, SPECS, strict=True) if cls == "EffllmDecoderForCausalLM"]


def _build(overrides: dict, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build(ModelSpec(**overrides), SIZE, VOCAB, SEQ).eval()


def _tokens(batch: int = 2, length: int = SEQ, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("overrides", "cls"), SPECS, ids=IDS)
def test_builds_expected_class_and_trains(overrides: dict, cls: str) -> None:
    model = _build(overrides).train()
    assert type(model).__name__ == cls
    x = _tokens()
    out = model(input_ids=x, labels=x)
    assert out.logits.shape == (2, SEQ, VOCAB)
    assert torch.isfinite(out.loss) and 4.0 < out.loss.item() < 7.0  # ~ln(256) at init
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize(("overrides", "cls"), SPECS, ids=IDS)
def test_save_and_reload_gives_identical_logits(overrides: dict, cls: str,
                                                tmp_path: Path) -> None:
    model = _build(overrides)
    x = _tokens()
    with torch.no_grad():
        ref = model(input_ids=x).logits
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded).__name__ == cls
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, ref, rtol=0, atol=0)


@pytest.mark.parametrize("overrides", OURS, ids=OUR_IDS)
def test_generate_with_cache_equals_without(overrides: dict) -> None:
    model = _build(overrides)
    prompt = _tokens(batch=2, length=11, seed=3)
    kw = {"max_new_tokens": 10, "do_sample": False, "pad_token_id": 0,
          "attention_mask": torch.ones_like(prompt)}
    cached = model.generate(prompt, use_cache=True, **kw)
    uncached = model.generate(prompt, use_cache=False, **kw)
    assert cached.shape == (2, 21)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("overrides", OURS, ids=OUR_IDS)
def test_our_decoder_is_causal(overrides: dict) -> None:
    model = _build(overrides)
    x = _tokens()
    y = x.clone()
    y[:, 20:] = (y[:, 20:] + 1) % VOCAB
    with torch.no_grad():
        a, b = model(input_ids=x).logits, model(input_ids=y).logits
    torch.testing.assert_close(a[:, :20], b[:, :20], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(a[:, 20:], b[:, 20:])


@pytest.mark.parametrize("positional", ["rope", "learned", "relative", "none", "sinusoidal"])
def test_left_padding_does_not_change_logits(positional: str) -> None:
    """Dense attention masks padding: a left-padded row scores like the unpadded sequence."""
    model = EffllmDecoderForCausalLM(EffllmConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, positional=positional)).eval()
    x = _tokens(batch=1, length=12)
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), x], dim=1)
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 12, dtype=torch.long)],
                     dim=1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = model(input_ids=x).logits
        got = model(input_ids=padded, attention_mask=mask, position_ids=pos).logits[:, 5:]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_rope_decoder_matches_llama_with_the_same_weights() -> None:
    """Our decoder is Llama-identical, so positional comparisons change only the positional."""
    llama = _build({"attention": "gqa"})
    cfg = EffllmConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       positional="rope")
    ours = EffllmDecoderForCausalLM(cfg).eval()
    ours.load_state_dict(llama.state_dict(), strict=True)
    x = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=x).logits, llama(input_ids=x).logits,
                                   atol=1e-5, rtol=1e-5)
    assert count_params(ours) == count_params(llama)


@pytest.mark.parametrize(("attention", "kv"), [("mha", 4), ("mqa", 1), ("gqa", 2)])
def test_kv_heads_follow_attention_variant(attention: str, kv: int) -> None:
    for positional in ("rope", "none"):
        model = _build({"attention": attention, "positional": positional})
        assert model.config.num_key_value_heads == kv
        assert model.config.num_attention_heads == 4


def test_mla_config_uses_latent_ratio_and_dense_layers() -> None:
    cfg = _build({"attention": "mla", "mla_latent_ratio": 8}).config
    assert cfg.kv_lora_rank == 64 // 8
    assert cfg.q_lora_rank is None
    assert cfg.qk_nope_head_dim + cfg.qk_rope_head_dim == 16 and cfg.v_head_dim == 16
    assert cfg.first_k_dense_replace == SIZE.n_layers
    moe = _build({"attention": "mla", "ffn": "moe"}).config
    assert moe.first_k_dense_replace == 0 and moe.n_routed_experts == 8
    assert moe.num_experts_per_tok == 2 and moe.moe_intermediate_size == SIZE.d_ff


def test_count_params_dense_active_equals_total() -> None:
    for spec in ({"attention": "gqa"}, NSA, {"attention": "mla"}, {"family": "pythia"}):
        c = count_params(_build(spec))
        assert c["active"] == c["total"] == c["trainable"]
        assert c["total"] == sum(p.numel() for p in _build(spec).parameters())


def test_count_params_moe_counts_top_k_experts_only() -> None:
    model = _build({"attention": "gqa", "ffn": "moe", "n_experts": 8, "top_k": 2})
    c = count_params(model)
    expert = 3 * SIZE.d_model * SIZE.d_ff  # one SwiGLU expert
    assert c["total"] - c["active"] == SIZE.n_layers * 6 * expert  # 6 of 8 experts idle
    dense = count_params(_build({"attention": "gqa"}))["total"]
    router = SIZE.n_layers * 8 * SIZE.d_model
    assert c["active"] == dense + SIZE.n_layers * expert + router  # top-2 = 2 dense FFNs
    mla = count_params(_build({"attention": "mla", "ffn": "moe"}))
    assert mla["active"] < mla["total"]
    model.requires_grad_(False)
    assert count_params(model)["trainable"] == 0


def test_build_accepts_plain_dicts() -> None:
    model = build({"attention": "mqa", "positional": "learned"},
                  {"d_model": 64, "n_layers": 2, "n_heads": 4, "d_ff": 128}, VOCAB, SEQ)
    assert model.config.positional == "learned" and model.config.num_key_value_heads == 1


@pytest.mark.parametrize("overrides", [
    {"attention": "mla", "positional": "learned"},
    {"attention": "gqa", "ffn": "moe", "positional": "none"},
    {**NSA, "ffn": "moe"},
    {**NSA, "positional": "relative"},
])
def test_unsupported_combinations_raise_with_reason(overrides: dict) -> None:
    with pytest.raises(ValueError, match=r"\w"):
        build(ModelSpec(**overrides), SIZE, VOCAB, SEQ)


def test_config_exposes_flops_attributes_and_auto_classes() -> None:
    cfg = _build(NSA).config
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "intermediate_size", "vocab_size", "max_position_embeddings", "positional",
                 "attention", "nsa_window", "nsa_block", "nsa_stride", "nsa_selected"):
        assert getattr(cfg, name) is not None, name
    assert (cfg.attention, cfg.nsa_block, cfg.max_position_embeddings) == ("nsa", 8, SEQ)
    auto_cfg = AutoConfig.for_model("effllm_decoder", hidden_size=32, num_attention_heads=2)
    assert isinstance(auto_cfg, EffllmConfig)
    assert isinstance(AutoModelForCausalLM.from_config(auto_cfg), EffllmDecoderForCausalLM)


def test_mamba_family_delegates_to_mamba_module() -> None:
    if importlib.util.find_spec("effllm_helpers.models.mamba") is None:
        pytest.skip("effllm_helpers/models/mamba.py not written yet")
    model = _build({"family": "mamba"})
    x = _tokens()
    out = model(input_ids=x, labels=x)
    assert torch.isfinite(out.loss)
    assert count_params(model)["active"] == count_params(model)["total"]


def test_moe_trains_with_its_router_load_balancing_loss() -> None:
    from effllm_helpers.models.zoo import MOE_AUX_LOSS_COEF

    size = {"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 64,
            "max_seq_len": 64}
    model = build({"attention": "gqa", "ffn": "moe"}, size, vocab_size=50, max_seq_len=64)
    ids = torch.randint(0, 50, (2, 12))
    out = model(input_ids=ids, labels=ids)
    assert out.aux_loss is not None and out.aux_loss > 0
    ce = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 50),
                                         ids[:, 1:].reshape(-1))
    assert out.loss.item() == pytest.approx((ce + MOE_AUX_LOSS_COEF * out.aux_loss).item(),
                                            rel=1e-5)


def test_mamba_embeddings_are_untied_like_the_other_families() -> None:
    size = {"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 64}
    model = build({"family": "mamba"}, size, vocab_size=50, max_seq_len=64)
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight


def test_moe_study_dense_same_active_matches_the_moe_active_params() -> None:
    from effllm_helpers import config, studies
    from effllm_helpers.axes.architecture import effective_size

    runs = {r.point["variant"]: r for r in studies.expand("params/architecture/moe.yaml", "ci")
            if r.point["model.size"] == "small"}
    counts = {}
    for name in ("dense_same_active", "moe_topk"):
        p = config.ArchitectureParams.model_validate(runs[name].params)
        model = build(p.model, effective_size(p), vocab_size=64, max_seq_len=64)
        counts[name] = count_params(model)["active"]
    # equal but for the router (d_model x experts per layer)
    assert counts["dense_same_active"] == pytest.approx(counts["moe_topk"], rel=0.01)
