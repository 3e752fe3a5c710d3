"""Tests for the fine-tuning registry (effllm_helpers.techniques.finetuning) on a tiny Llama."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from effllm_helpers.catalog import PEFT_NAMED
from effllm_helpers.config import FinetuneParams
from effllm_helpers.errors import UnsupportedTechnique
from effllm_helpers.techniques import finetuning as ft
from effllm_helpers.techniques.precision import probe_bnb

RANK, ALPHA = 4, 16.0
PAPER_METHODS = ["lora", "lora_plus", "rslora", "dora", "pissa", "freeze", "full"]
ADAPTER_METHODS = ["lora", "lora_plus", "rslora", "dora", "pissa", "loha", "ia3"]

warnings.filterwarnings("ignore", category=UserWarning)


@pytest.fixture(scope="module")
def tiny_config() -> LlamaConfig:
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, vocab_size=256,
                       max_position_embeddings=64, tie_word_embeddings=False)


@pytest.fixture
def make_model(tiny_config: LlamaConfig) -> Callable[[], LlamaForCausalLM]:
    def make(seed: int = 0) -> LlamaForCausalLM:
        torch.manual_seed(seed)
        return LlamaForCausalLM(tiny_config)

    return make


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (2, 12), generator=g)


def params(method: str, **kw) -> FinetuneParams:
    return FinetuneParams(method=method, rank=RANK, alpha=ALPHA, **kw)


def reference_peft_config(method: str):
    """The peft config a user would write by hand for the same settings."""
    from peft import IA3Config, LoHaConfig, LoraConfig

    lora = dict(r=RANK, lora_alpha=ALPHA, lora_dropout=0.1, target_modules="all-linear",
                task_type="CAUSAL_LM")
    return {
        "lora": LoraConfig(**lora), "lora_plus": LoraConfig(**lora),
        "rslora": LoraConfig(**lora, use_rslora=True), "dora": LoraConfig(**lora, use_dora=True),
        "pissa": LoraConfig(**lora, init_lora_weights="pissa"),
        "loha": LoHaConfig(r=RANK, alpha=ALPHA, target_modules="all-linear",
                           task_type="CAUSAL_LM"),
        "ia3": IA3Config(target_modules="all-linear", task_type="CAUSAL_LM"),
    }[method]


def train_step(prep: ft.Prepared, ids: torch.Tensor, lr: float = 1e-2) -> None:
    prep.model.train()
    opt = prep.make_optimizer(lr, 0.1)
    prep.model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


# ---------------------------------------------------------------- parameter counts
@pytest.mark.parametrize("method", ADAPTER_METHODS)
def test_trainable_count_matches_peft(method: str, make_model, ids) -> None:
    from peft import get_peft_model

    prep = ft.prepare(make_model(), params(method))
    ref = get_peft_model(make_model(), reference_peft_config(method))
    assert (prep.trainable_params, prep.total_params) == ref.get_nb_trainable_parameters()
    assert prep.trainable_params == prep.model.get_nb_trainable_parameters()[0]


def test_lora_count_matches_hand_formula(make_model) -> None:
    # per layer: q,k,v,o 64->64, gate,up 64->128, down 128->64; LoRA adds r*(in+out) each
    per_layer = RANK * (4 * (64 + 64) + 2 * (64 + 128) + (128 + 64))
    assert ft.prepare(make_model(), params("lora")).trainable_params == 2 * per_layer
    # DoRA adds one magnitude per output feature of every adapted layer
    dora = ft.prepare(make_model(), params("dora")).trainable_params
    assert dora == 2 * per_layer + 2 * (4 * 64 + 2 * 128 + 64)


@pytest.mark.parametrize("k", [1, 2])
def test_freeze_counts_last_k_blocks_and_head(k: int, make_model) -> None:
    model = make_model()
    expect = sum(p.numel() for b in model.model.layers[-k:] for p in b.parameters())
    expect += model.lm_head.weight.numel()
    prep = ft.prepare(model, params("freeze", freeze_last_k=k))
    assert prep.trainable_params == expect
    assert prep.total_params == sum(p.numel() for p in model.parameters())
    assert not model.model.embed_tokens.weight.requires_grad
    assert not model.model.norm.weight.requires_grad


def test_freeze_k_too_large_is_an_error(make_model) -> None:
    with pytest.raises(ValueError, match="exceeds the 2 blocks"):
        ft.prepare(make_model(), params("freeze", freeze_last_k=3))


def test_full_trains_everything(make_model) -> None:
    model = make_model()
    for p in model.parameters():
        p.requires_grad_(False)
    prep = ft.prepare(model, params("full"))
    n = sum(p.numel() for p in model.parameters())
    assert prep.trainable_params == prep.total_params == n


def test_find_blocks_is_generic() -> None:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, MambaConfig, MambaForCausalLM

    neox = GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=32, num_hidden_layers=3,
                                            num_attention_heads=4, intermediate_size=64,
                                            vocab_size=64))
    mamba = MambaForCausalLM(MambaConfig(hidden_size=32, num_hidden_layers=3, vocab_size=64,
                                         state_size=4))
    assert ft.find_blocks(neox)[0] == "gpt_neox.layers"
    assert ft.find_blocks(mamba)[0] == "backbone.layers"
    prep = ft.prepare(mamba, params("freeze", freeze_last_k=1))
    head = mamba.get_output_embeddings().weight
    assert head.requires_grad and prep.trainable_params > head.numel()


# ---------------------------------------------------------------- training behaviour
@pytest.mark.parametrize("method", PAPER_METHODS + ["loha", "ia3"])
def test_one_step_changes_exactly_the_trainable_params(method: str, make_model, ids) -> None:
    prep = ft.prepare(make_model(), params(method))
    model = prep.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_step(prep, ids)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed == trainable


def test_lora_plus_optimizer_has_two_lrs_ratio_16(make_model) -> None:
    prep = ft.prepare(make_model(), params("lora_plus"))
    opt = prep.make_optimizer(1e-3, 0.05)
    groups = [g for g in opt.param_groups if g["params"]]
    assert sorted({g["lr"] for g in groups}) == pytest.approx([1e-3, 16e-3])
    names = {id(p): n for n, p in prep.model.named_parameters()}
    for g in groups:
        for p in g["params"]:
            assert ("lora_B" in names[id(p)]) == (g["lr"] == pytest.approx(16e-3))
    # peft overrides the optimizer-level weight_decay per group; ours must reach the groups
    assert {g["weight_decay"] for g in groups} == {0.05}


def test_plain_lora_optimizer_has_one_lr(make_model) -> None:
    opt = ft.prepare(make_model(), params("lora")).make_optimizer(1e-3, 0.0)
    assert {g["lr"] for g in opt.param_groups} == {1e-3}


def test_rslora_scaling(make_model) -> None:
    from peft.tuners.lora import LoraLayer

    for method, expect in (("rslora", ALPHA / math.sqrt(RANK)), ("lora", ALPHA / RANK)):
        model = ft.prepare(make_model(), params(method)).model
        layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
        assert len(layers) == 14
        assert all(m.scaling["default"] == pytest.approx(expect) for m in layers)


def test_pissa_keeps_initial_output(make_model, ids) -> None:
    model = make_model().eval()
    q_before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    prep = ft.prepare(model, params("pissa", dropout=0.0))
    assert prep.config["peft_config"]["init_lora_weights"] == "pissa"
    prep.model.eval()
    with torch.no_grad():
        out = prep.model(input_ids=ids).logits
    assert (out - ref).abs().max().item() < 1e-4
    residual = model.model.layers[0].self_attn.q_proj.base_layer.weight
    assert not torch.allclose(residual, q_before, atol=1e-3)  # the base now holds the residual


def test_pissa_uses_fast_svd_for_large_weights() -> None:
    assert ft.pissa_init_name(nn.Sequential(nn.Linear(64, 64))) == "pissa"
    big = nn.Sequential(nn.Linear(ft.PISSA_EXACT_MAX_DIM + 1, 8))
    assert ft.pissa_init_name(big) == f"pissa_niter_{ft.PISSA_NITER}"


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "rslora", "dora", "pissa"])
def test_merge_check_after_training(method: str, make_model, ids) -> None:
    base = make_model().eval()
    with torch.no_grad():
        ref = base(input_ids=ids).logits.clone()
    prep = ft.prepare(base, params(method, dropout=0.0))
    train_step(prep, ids, lr=5e-2)
    prep.model.eval()
    with torch.no_grad():
        trained = prep.model(input_ids=ids).logits
    assert (trained - ref).abs().max().item() > 1e-3  # the adapter is not a no-op any more
    prep.model.train()
    check = ft.merge_check(prep, ids)
    assert check.reason is None and check.max_abs_diff is not None
    assert check.max_abs_diff < 1e-4
    assert prep.model.training  # training mode restored


def test_merge_check_without_adapter_gives_reason(make_model, ids) -> None:
    check = ft.merge_check(ft.prepare(make_model(), params("freeze")), ids)
    assert check.max_abs_diff is None and "nothing to merge" in check.reason


# ---------------------------------------------------------------- sizes and errors
def test_adapter_size_is_real_file_size(make_model, tmp_path) -> None:
    lora = ft.prepare(make_model(), params("lora"))
    size = ft.adapter_size_bytes(lora, tmp_path)
    assert 4 * lora.trainable_params <= size < 4 * lora.trainable_params + 16_384
    frz = ft.prepare(make_model(), params("freeze"))
    fsize = ft.adapter_size_bytes(frz, tmp_path)
    assert 4 * frz.trainable_params <= fsize < 4 * frz.trainable_params + 16_384


def test_unknown_method_lists_known_ones(make_model) -> None:
    bad = params("lora").model_copy(update={"method": "lorax"})
    with pytest.raises(ValueError, match="unknown fine-tuning method 'lorax'") as exc:
        ft.prepare(make_model(), bad)
    for name in ("lora_plus", "pissa", "freeze", "loha", "ia3", "vera"):
        assert name in str(exc.value)


def test_method_named_in_config_but_missing_from_peft(make_model, monkeypatch) -> None:
    # a name config accepts (e.g. a tuner a newer peft renamed) gets a clear error, not a KeyError
    monkeypatch.setattr("effllm_helpers.catalog.PEFT_NAMED", [*PEFT_NAMED, "gone"])
    p = params("lora").model_copy(update={"method": "gone"})
    with pytest.raises(ValueError, match="does not provide it"):
        ft.prepare(make_model(), p)


def test_quant_with_freeze_or_full_is_rejected(make_model) -> None:
    for method in ("freeze", "full"):
        with pytest.raises(ValueError, match="needs an adapter method"):
            ft.prepare(make_model(), params(method, quant="nf4"))


# ---------------------------------------------------------------- QLoRA
@pytest.mark.slow
def test_qlora_outcome_on_this_machine(make_model, ids) -> None:
    """QLoRA either works (4-bit base, same adapter size) or raises UnsupportedTechnique."""
    reason = probe_bnb("bnb4", "cpu", backward=True)
    if reason is not None:
        with pytest.raises(UnsupportedTechnique, match="QLoRA"):
            ft.prepare(make_model(), params("lora", quant="nf4"))
        pytest.skip(f"bitsandbytes 4-bit cannot train here: {reason}")
    import bitsandbytes as bnb

    prep = ft.prepare(make_model(), params("lora", quant="nf4", dropout=0.0))
    plain = ft.prepare(make_model(), params("lora"))
    assert prep.trainable_params == plain.trainable_params
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in prep.model.modules())
    # an untrained adapter (B = 0) merges into the 4-bit base without changing the output; this
    # also guards against bnb's CPU repacking at eval time, which made peft's merge garbage
    fresh = ft.merge_check(prep, ids)
    assert fresh.max_abs_diff is not None and fresh.max_abs_diff < 1e-3
    qs = prep.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.quant_state
    assert not getattr(qs, "packing_format_for_cpu", False)
    before = {n: p.detach().clone() for n, p in prep.model.named_parameters() if p.requires_grad}
    train_step(prep, ids)
    assert all(not torch.equal(p, before[n]) for n, p in prep.model.named_parameters()
               if p.requires_grad)


def test_qlora_unsupported_adapter_is_a_skip_not_a_crash(make_model) -> None:
    if probe_bnb("bnb4", "cpu", backward=True) is not None:
        pytest.skip("bitsandbytes 4-bit unavailable here")
    with pytest.raises(UnsupportedTechnique, match="loha cannot run on a bitsandbytes 4-bit"):
        ft.prepare(make_model(), params("loha", quant="nf4"))


def test_adalora_starts_at_the_rank_and_is_reallocated_by_the_loop(make_model) -> None:
    """AdaLoRA ignores ``r``: the rank goes to init_r, and train() calls its allocator."""
    notes: list[str] = []
    cfg = ft._generic_config("adalora", params("adalora"), notes)
    assert cfg.init_r == RANK and cfg.target_r == RANK // 2
    prepared = ft.prepare(make_model(), params("adalora"))
    shapes = {tuple(p.shape) for n, p in prepared.model.named_parameters() if "lora_A" in n}
    assert shapes and all(s[0] == RANK for s in shapes)
    assert callable(prepared.model.base_model.update_and_allocate)
