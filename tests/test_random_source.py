"""``random:<shape>``: a known architecture with random weights, built offline, quality null."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from effllm_helpers import config
from effllm_helpers.models import sources

# the parameter counts the model cards publish
PUBLISHED = {"qwen2.5-0.5b": 494_032_768, "qwen2.5-1.5b": 1_543_714_304,
             "qwen2.5-3b": 3_085_938_688, "qwen2.5-7b": 7_615_616_512,
             "qwen2.5-14b": 14_770_033_664, "llama-3.2-1b": 1_235_814_400,
             "llama-3.2-3b": 3_212_749_824, "llama-3.1-8b": 8_030_261_248}


@pytest.mark.parametrize("shape", list(sources.RANDOM_SHAPES))
def test_each_catalogued_shape_has_its_published_parameter_count(shape: str) -> None:
    cfg = sources.random_config(f"random:{shape}")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED[shape]


@pytest.fixture()
def tiny_config(tmp_path: Path) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llama", "hidden_size": 32,
                                "intermediate_size": 64, "num_hidden_layers": 2,
                                "num_attention_heads": 4, "num_key_value_heads": 2,
                                "vocab_size": 20000}))
    return path


def test_a_config_json_builds_a_folder_with_weights_and_the_workbooks_tokenizer(
        tiny_config: Path) -> None:
    folder = sources.random_folder(f"random:{tiny_config}", dtype="float32")
    assert sources.has_random_weights(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.hidden_size == 32 and model.config.vocab_size == 20000
    assert sources.random_folder(f"random:{tiny_config}", dtype="float32") == folder  # cached
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    assert len(tok) <= model.config.vocab_size


def test_an_unknown_shape_is_refused_before_any_compute() -> None:
    with pytest.raises(ValueError, match="neither a known shape"):
        config.check_model_source("random:qwen9-1t")


def test_finetuning_a_random_model_records_quality_as_null_with_the_reason(
        tiny_config: Path) -> None:
    from effllm_helpers.axes import finetuning

    p = config.notebook_params("finetuning", "ci", {"base_model": f"random:{tiny_config}"})
    res = finetuning.run(p, progress=False)
    assert res.quality and all(q["value"] is None and q["reason"] == sources.RANDOM_REASON
                               for q in res.quality.values())
    assert res.metrics["al_s"]["value"] > 0  # the efficiency columns are measured


def test_serving_a_random_model_records_quality_and_mcr_as_null_with_the_reason(
        tiny_config: Path) -> None:
    from effllm_helpers.axes import inference

    p = config.notebook_params("inference", "ci", {"model": f"random:{tiny_config}",
                                                   "precision": "bf16"})
    res = inference.run(p, progress=False)
    assert all(q["value"] is None and q["reason"] == sources.RANDOM_REASON
               for q in res.quality.values())
    assert res.metrics["mcr"]["value"] is None  # its quality ratio is unknown
    assert res.metrics["tpot_s"]["value"] > 0 and res.model["baseline_weight_bytes"] > 0


def test_the_architecture_axis_takes_the_same_shape_names_as_its_dimensions() -> None:
    from effllm_helpers import config

    p = config.notebook_params("architecture", "tiny", {"model": {"size": "qwen2.5-0.5b"}})
    size = p.sizes["qwen2.5-0.5b"]
    assert (size.d_model, size.n_layers, size.n_heads, size.n_kv_heads, size.d_ff) == (
        896, 24, 14, 2, 4864)


def test_an_unknown_architecture_size_names_the_shapes_too() -> None:
    import pytest

    from effllm_helpers import config

    with pytest.raises(ValueError, match="nor a known shape .*qwen2.5-1.5b"):
        config.notebook_params("architecture", "tiny", {"model": {"size": "qwen9"}})
