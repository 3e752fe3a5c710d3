"""One catalog: a name added there alone is usable end to end; an unknown name fails loudly."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from pydantic import ValidationError

from effllm_helpers import catalog, config
from effllm_helpers.config import SizeSpec

SIZE = SizeSpec(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)


@pytest.fixture
def dummies():
    """A dummy attention variant, precision and peft method, registered in the catalog only
    (the catalog's tables are restored afterwards, in place)."""
    tables = (catalog.ATTENTION, catalog.PRECISIONS, catalog.FINETUNE_METHODS)
    saved = [dict(t) for t in tables]
    order = list(catalog.PRECISION_ORDER)
    catalog.register_attention(catalog.AttentionVariant("gqa1", "GQA-1", "one", "dense", "llama"))
    catalog.register_precision(catalog.Precision("half", "float", 16, "half (torch fp16)", "torch",
                                                 dtype="fp16"))
    catalog.register_method(catalog.FinetuneMethod("tiny_lora", "peft", "LoRA r=2",
                                                   peft_type="lora", options=(("r", 2),)))
    yield
    for table, before in zip(tables, saved, strict=True):
        table.clear()
        table.update(before)
    catalog.PRECISION_ORDER[:] = order


def test_a_catalog_attention_variant_builds_and_is_counted(dummies) -> None:
    from effllm_helpers.models import build, flops

    spec = config.ModelSpec(attention="gqa1")  # the schema accepts it
    model = build(spec, SIZE, vocab_size=50, max_seq_len=32)
    assert model.config.num_key_value_heads == 1  # the catalog's rule, not GQA's 2
    assert flops.flops_per_token(model.config, 16) > 0
    nonrope = build(config.ModelSpec(attention="gqa1", positional="learned"), SIZE, 50, 32)
    assert nonrope.config.attention == "gqa1" and nonrope.config.num_key_value_heads == 1
    assert flops.flops_per_token(nonrope.config, 16) > 0


def test_a_catalog_precision_loads_and_has_bits_and_a_label(dummies) -> None:
    from effllm_helpers.measure.compression import mcr_nominal
    from effllm_helpers.report import figures
    from effllm_helpers.techniques import precision as prec

    p = config.InferenceParams(precision="half")
    assert prec.REGISTRY["half"].dtype == torch.float16
    assert mcr_nominal("half", 1.0, 1.0, "fp32")["bits_comp"] == 16
    assert figures.PRECISION_ORDER[-1] == "half" and catalog.precision_label("half").startswith(
        "half")
    assert p.precision == "half"


def test_a_catalog_peft_method_prepares_with_its_options(dummies) -> None:
    from effllm_helpers.models import build
    from effllm_helpers.techniques import finetuning as ft

    model = build({"attention": "gqa"}, SIZE, vocab_size=50, max_seq_len=32)
    p = config.FinetuneParams(method="tiny_lora", target_modules=["q_proj", "v_proj"])
    prepared = ft.prepare(model, p)
    assert prepared.config["peft_config"]["r"] == 2
    assert prepared.trainable_params > 0


def test_a_method_peft_knows_passes_validation_without_an_entry() -> None:
    from peft import PeftType

    name = str(PeftType.LOHA.value).lower()
    assert config.FinetuneParams(method=name).method == name


def test_unknown_names_fail_with_the_known_ones() -> None:
    with pytest.raises(ValidationError, match="'mha', 'mqa', 'gqa'"):
        config.ModelSpec(attention="gqa9")
    with pytest.raises(ValidationError, match="'fp32', 'bf16'"):
        config.InferenceParams(precision="int3")
    with pytest.raises(ValidationError, match="unknown fine-tuning method; allowed: lora"):
        config.FinetuneParams(method="lorax")


def test_an_unknown_attention_is_never_counted_as_a_default() -> None:
    from effllm_helpers.models import flops, zoo

    with pytest.raises(ValueError, match="unknown attention variant 'gqa9'; known: mha"):
        zoo.kv_heads("gqa9", SIZE)
    cfg = type("Cfg", (), {"attention": "gqa9"})()
    with pytest.raises(ValueError, match="unknown attention variant"):
        flops._is_nsa(cfg, "effllm_decoder")


def test_catalog_entries_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        catalog.ATTENTION["gqa"].kv_heads = "all"  # type: ignore[misc]
