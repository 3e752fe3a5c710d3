"""Synthetic run records for all four axes, built with ``results.new_record``.

Why: figures, scores and the leaderboard must be tested on records shaped exactly like the
notebooks' (nulls with reasons, failed runs, repeats over seeds, curves) without running a model.
The numbers are made up for tests only and never leave the test folder.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from effllm_helpers import results as R

DEVICE = "Synthetic CPU"


def _m(value: float | None, unit: str, reason: str = "not measurable on this host") -> dict:
    if value is None:
        return R.missing(unit, reason)
    return R.metric(value, unit, "synthetic")


def _prov(device: str = DEVICE) -> dict[str, Any]:
    return {"device_name": device}


def _curves(rng: np.random.Generator, final: float, watts: float, tok_s: float) -> dict:
    tokens = np.linspace(0, 200_000, 21)
    loss = final + 4.0 * np.exp(-tokens / 40_000) + rng.normal(0, 0.03, tokens.size)
    joules = tokens / tok_s * watts
    return {
        "loss_vs_tokens": {"x": tokens.tolist(), "y": loss.tolist(), "x_unit": "tokens",
                           "y_unit": "nats"},
        "loss_vs_joules": {"x": joules.tolist(), "y": loss.tolist(), "x_unit": "J",
                           "y_unit": "nats"},
    }


SIZES = {"small": 1.2e6, "medium": 5.0e6}
ATTN = {"mha": 1.00, "mqa": 0.90, "gqa": 0.93, "mla": 0.97, "nsa": 1.05}
POS = {"rope": 1.0, "sinusoidal": 1.06, "learned": 1.04, "relative": 1.02, "none": 1.12}
POS_COST = {"rope": 1.0, "sinusoidal": 0.99, "learned": 1.01, "relative": 1.04, "none": 0.98}


def architecture_records(rng: np.random.Generator, aec_null: bool = False) -> list[dict]:
    """Attention x size (2 seeds on small), positional, dense vs MoE, plus one failed run."""
    recs: list[dict] = []

    def arch(study: str, attention: str, positional: str, ffn: str, family: str, size: str,
             seed: int, cost: float, ppl_f: float) -> dict:
        n = SIZES[size] * (4.0 if ffn == "moe" else 1.0)
        active = SIZES[size] * (1.6 if ffn == "moe" else 1.0)
        tok_s = 9000.0 / cost / (active / 1.2e6) * (1 + rng.normal(0, 0.02))
        watts = 55.0 * cost * (1 + rng.normal(0, 0.02))
        ppl = 40.0 * ppl_f * (1.2e6 / active) ** 0.1 * (1 + rng.normal(0, 0.01))
        rid = f"a-{study}-{attention}-{positional}-{ffn}-{family}-{size}-{seed}"
        return R.new_record(
            run_id=rid, study=study, axis="architecture",
            params={"model": {"attention": attention, "positional": positional, "ffn": ffn,
                              "family": family, "size": size}, "seed": seed},
            metrics={
                "amu_gb": _m(0.3 * cost * n / 1.2e6 * (1 + rng.normal(0, 0.005)), "GB"),
                "pcu": _m(0.6 / cost, "fraction"),
                "mfu": _m(0.2 / cost, "fraction"),
                "al_s": _m(0.05 * cost * (1 + rng.normal(0, 0.01)), "s"),
                "tt": _m(tok_s / n, "tokens/s/param"), "tokens_per_s": _m(tok_s, "tokens/s"),
                "aec_w": _m(None if aec_null else watts, "W"),
                "energy_j": _m(None if aec_null else watts * 200_000 / tok_s, "J"),
                "j_per_token": _m(None if aec_null else watts / tok_s, "J/token"),
            },
            quality={"val_ppl": _m(ppl, "ppl"), "probe_acc": _m(0.5 / ppl_f, "fraction")},
            curves=_curves(rng, math.log(ppl), watts, tok_s),
            model={"params_total": n, "params_active": active},
            provenance=_prov(),
        )

    for size in SIZES:
        for att, c in ATTN.items():
            for seed in (0, 1) if size == "small" else (0,):
                recs.append(arch("attention", att, "rope", "dense", "transformer", size, seed,
                                 c, 1.0 + (c - 1.0) * 0.5))
    for pos, f in POS.items():
        recs.append(arch("positional", "gqa", pos, "dense", "transformer", "small", 0,
                         ATTN["gqa"] * POS_COST[pos], f * (1.0 + (ATTN["gqa"] - 1.0) * 0.5)))
    for size in SIZES:
        for ffn in ("dense", "moe"):
            c = ATTN["gqa"] * (1.0 if ffn == "dense" else 1.3)
            recs.append(arch("moe", "gqa", "rope", ffn, "transformer", size, 0, c,
                             (1.0 + (ATTN["gqa"] - 1.0) * 0.5) * (1.0 if ffn == "dense" else 0.9)))
    recs.append(R.new_record(
        run_id="a-failed", study="attention", axis="architecture",
        params={"model": {"attention": "nsa", "positional": "rope", "ffn": "dense",
                          "family": "transformer", "size": "medium"}, "seed": 1},
        status="failed", error={"reason": "CUDA out of memory"}, provenance=_prov()))
    return recs


METHODS = {"lora": 1.0, "lora_plus": 0.98, "rslora": 1.0, "dora": 1.35, "pissa": 1.05,
           "freeze": 0.7, "full": 1.9}


def finetuning_records(rng: np.random.Generator) -> list[dict]:
    """Seven PEFT methods on two base models, one failed run, one null PCU."""
    recs = []
    for base, scale in (("embedded", 1.0), ("Qwen/Qwen2.5-0.5B", 3.0)):
        for meth, c in METHODS.items():
            loss = 1.2 / scale ** 0.2 * (0.95 if meth == "full" else 1.0) * (1 + rng.normal(0, .02))
            recs.append(R.new_record(
                run_id=f"f-{base}-{meth}".replace("/", "_"), study="peft", axis="finetuning",
                params={"method": meth, "base_model": base, "task": "arithmetic", "seed": 0},
                metrics={
                    "amu_gb": _m(0.8 * c * scale, "GB"),
                    "pcu": _m(None if meth == "freeze" else 0.7 / c, "fraction"),
                    "mfu": _m(0.15 / c, "fraction"), "al_s": _m(0.08 * c * scale, "s"),
                    "st": _m(60.0 / c / (scale * 1e6), "samples/s/param"),
                    "aec_w": _m(60.0 * c ** 0.5, "W"),
                },
                quality={"eval_loss": _m(loss, "nats"), "accuracy": _m(0.6 / loss, "fraction")},
                model={"params_trainable": (1e4 if meth != "full" else 1e6) * scale},
                provenance=_prov()))
    recs.append(R.new_record(
        run_id="f-failed", study="peft", axis="finetuning",
        params={"method": "dora", "base_model": "meta-llama/Llama-3.2-1B", "task": "arithmetic",
                "seed": 0},
        status="failed", error={"reason": "model not in local cache"}, provenance=_prov()))
    return recs


PRECISIONS = {"fp32": (4.0, 1.0, 1.00), "bf16": (2.0, 0.8, 1.00), "fp16": (2.0, 0.8, 1.00),
              "int8": (1.1, 1.6, 0.99), "int4-nf4": (0.6, 1.3, 0.96), "int4-fp4": (0.6, 1.3, 0.94)}


def inference_records(rng: np.random.Generator) -> list[dict]:
    """Six precisions on three models; int8 on one model failed."""
    recs = []
    for model, scale in (("embedded", 1.0), ("Qwen/Qwen2.5-0.5B", 2.5), ("gpt2", 1.5)):
        for prec, (bytes_pp, lat, perf) in PRECISIONS.items():
            if model == "gpt2" and prec == "int8":
                recs.append(R.new_record(
                    run_id=f"i-{model}-{prec}", study="precision", axis="inference",
                    params={"model": model, "precision": prec, "seed": 0}, status="failed",
                    error={"reason": "bitsandbytes int8 needs CUDA"}, provenance=_prov()))
                continue
            size = 1.2e6 * scale * bytes_pp
            it = 400.0 / lat / scale * (1 + rng.normal(0, 0.02))
            acc = 0.45 * perf * (1 + rng.normal(0, 0.01))
            recs.append(R.new_record(
                run_id=f"i-{model}-{prec}".replace("/", "_"), study="precision",
                axis="inference", params={"model": model, "precision": prec, "seed": 0},
                metrics={
                    "it": _m(it, "tokens/s"), "amu_gb": _m(size / 1e9 + 0.2, "GB"),
                    "amu_increment_gb": _m(size / 1e9 + 0.01, "GB"),
                    "al_s": _m(0.02 * lat * scale, "s"), "ttft_s": _m(0.01 * lat, "s"),
                    "tpot_s": _m(0.005 * lat, "s"), "aec_w": _m(40.0 + 10 * lat, "W"),
                    "j_per_token": _m((40.0 + 10 * lat) / it, "J/token"),
                    "mcr": _m(2.0 / bytes_pp * perf, "ratio"), "size_bytes": _m(size, "B"),
                },
                quality={"ppl": _m(30.0 / perf, "ppl"), "task_acc": _m(acc, "fraction")},
                provenance=_prov()))
    return recs


XM_ATTN = {"mha": 1.00, "gqa": 0.92, "mla": 0.96}
XM_METHODS = {"lora": 1.0, "dora": 1.3, "full": 1.6}


def cross_modal_records(rng: np.random.Generator) -> list[dict]:
    """Axis 4: DiT attention x FFN, and three methods on a ViT and a DiT."""
    recs = []
    for att, c in XM_ATTN.items():
        for ffn, f in (("dense", 1.0), ("moe", 1.4)):
            fd = 120.0 * c * (0.9 if ffn == "moe" else 1.0) * (1 + rng.normal(0, 0.02))
            recs.append(R.new_record(
                run_id=f"x-dit-{att}-{ffn}", study="cross_modal_dit_attention",
                axis="cross_modal",
                params={"experiment": "dit", "data": "digits", "attention": att, "ffn": ffn,
                        "seed": 0},
                metrics={"amu_gb": _m(0.5 * c * f, "GB"), "al_s": _m(0.05 * c * f, "s"),
                         "tt": _m(2e-3 / (c * f), "tokens/s/param"), "aec_w": _m(40.0 * c, "W"),
                         "sample_images_per_s": _m(90.0 / (c * f), "images/s")},
                quality={"frechet_classifier_distance": _m(fd, "frechet"),
                         "sample_class_accuracy": _m(0.9 / c, "fraction"),
                         "val_loss": _m(0.3 * c, "nats")},
                provenance=_prov()))
    for target in ("vit", "dit"):
        for meth, c in XM_METHODS.items():
            loss = 0.8 / c ** 0.3 * (1 + rng.normal(0, 0.02))
            quality = {"eval_loss": _m(loss, "nats"), "eval_loss_before": _m(1.5, "nats")}
            if target == "vit":
                quality["accuracy"] = _m(0.7 / loss, "fraction")
            recs.append(R.new_record(
                run_id=f"x-peft-{target}-{meth}", study="cross_modal_peft", axis="cross_modal",
                params={"experiment": "peft", "data": "digits", "target": target,
                        "method": meth, "seed": 0},
                metrics={"amu_gb": _m(0.3 * c, "GB"), "al_s": _m(0.02 * c, "s"),
                         "st": _m(50.0 / c / 1e6, "samples/s/param"), "aec_w": _m(None, "W")},
                quality=quality, model={"params_trainable": 1e3 if meth != "full" else 1e5},
                provenance=_prov()))
    return recs


def all_records(seed: int = 0, aec_null: bool = False) -> list[dict]:
    rng = np.random.default_rng(seed)
    return (architecture_records(rng, aec_null) + finetuning_records(rng)
            + inference_records(rng) + cross_modal_records(rng))


def write_all(root: Path, seed: int = 0) -> Path:
    """Write every synthetic record under ``root/runs/<study>/<run_id>/record.json``."""
    for rec in all_records(seed):
        R.write_record(Path(root) / "runs" / rec["study"] / rec["run_id"], rec)
    return Path(root)
