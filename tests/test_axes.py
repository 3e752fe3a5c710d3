"""The three axis modules at the ci preset, in-process: every metric present (or null + reason)."""

from __future__ import annotations

import pytest
import torch

from effllm_helpers import config
from effllm_helpers.axes import architecture, finetuning, inference
from effllm_helpers.models import embedded
from effllm_helpers.techniques import precision as prec

pytestmark = pytest.mark.slow

TRAIN_METRICS = {"amu_gb", "amu_frac", "peak_gb", "pcu", "mfu", "al_s", "tt", "st",
                 "tokens_per_s", "aec_w", "energy_j", "j_per_token"}


def assert_complete(section: dict, names: set[str]) -> None:
    missing_names = names - set(section)
    assert not missing_names, missing_names
    for name in names:
        val = section[name]
        assert val["unit"] is not None, name
        assert val["value"] is not None or val.get("reason"), f"{name}: null without a reason"


def arch_params(**model) -> config.ArchitectureParams:
    p = config.notebook_params("architecture", "ci", None)
    return p.model_copy(update={"model": p.model.model_copy(update=model), "save_model": False})


SPECS = [
    {"attention": "gqa"},
    {"attention": "mla"},
    {"attention": "nsa", "positional": "sinusoidal"},
    {"ffn": "moe"},
    {"family": "mamba"},
    {"family": "rwkv"},
    {"family": "pythia"},
    {"positional": "relative"},
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: "-".join(s.values()))
def test_architecture_run_records_every_metric(spec):
    res = architecture.run(arch_params(**spec), progress=False)
    assert_complete(res.metrics, TRAIN_METRICS | {"kv_bytes_per_token_analytic",
                                                  "kv_bytes_per_token_measured"})
    assert_complete(res.quality, {"val_ppl", "val_loss", "probe_acc"})
    assert res.quality["val_ppl"]["value"] > 1
    assert res.model["tokens_trained"] == 8 * 4 * 64  # ci: 8 steps x batch 4 x seq 64
    assert res.curves["loss_vs_tokens"]["x"][-1] == res.model["tokens_trained"]
    if spec.get("ffn") == "moe":
        assert res.model["params_active"] < res.model["params_total"]
    else:
        assert res.model["params_active"] == res.model["params_total"]


def test_measured_kv_cache_matches_the_analytic_bytes_for_gqa():
    res = architecture.run(arch_params(attention="gqa"), progress=False)
    assert (res.metrics["kv_bytes_per_token_measured"]["value"]
            == res.metrics["kv_bytes_per_token_analytic"]["value"])


def test_attention_free_models_cache_nothing_per_token():
    res = architecture.run(arch_params(family="mamba"), progress=False)
    assert res.metrics["kv_bytes_per_token_measured"]["value"] == 0


@pytest.mark.parametrize("method", ["lora", "freeze"])
def test_finetuning_run_records_every_metric(method):
    p = config.notebook_params("finetuning", "ci", None).model_copy(update={"method": method})
    res = finetuning.run(p, progress=False)
    assert_complete(res.metrics, TRAIN_METRICS | {"adapter_bytes", "merge_max_abs_diff"})
    assert_complete(res.quality, {"eval_loss", "eval_loss_before", "accuracy",
                                  "accuracy_before"})
    assert 0 < res.model["params_trainable"] < res.model["params_total"]
    if method == "lora":
        assert res.metrics["merge_max_abs_diff"]["value"] < 1e-4


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_inference_run_records_every_metric(precision):
    p = config.notebook_params("inference", "ci", None).model_copy(
        update={"precision": precision})
    res = inference.run(p, progress=False)
    assert_complete(res.metrics, {"it", "al_s", "ttft_s", "tpot_s", "amu_gb", "aec_w",
                                  "j_per_token", "size_bytes", "mcr", "it_bs2"})
    assert_complete(res.quality, {"ppl", "task_acc"})
    assert res.metrics["tpot_s"]["note"] == "excludes the first token of each request"
    # on a CPU the baseline is fp32, and the record says so
    assert res.model["baseline_precision"] == "fp32"
    if precision == "fp32":
        assert res.metrics["mcr"]["value"] == pytest.approx(1.0)


def test_weight_bytes_order_int4_int8_half_fp32_on_the_embedded_model():
    path = embedded.resolve("embedded@sft", profile="ci")
    sizes = {}
    for name in ("fp32", "bf16", "fp16", "int8", "int4-nf4"):
        reason = prec.check_supported(name, "cpu")
        if reason:
            pytest.skip(f"{name} cannot run here: {reason}")
        p = config.InferenceParams(precision=name)
        sizes[name] = prec.load_for_inference(path, p, torch.device("cpu")).weight_bytes
    assert sizes["int4-nf4"] < sizes["int8"] < sizes["fp16"] == sizes["bf16"] < sizes["fp32"]
