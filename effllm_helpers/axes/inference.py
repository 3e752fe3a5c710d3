"""Axis 3 — serving a model at one precision (paper Table 9, Fig. 5).

``run(params)`` is what ``notebooks/03_inference.ipynb`` calls: load the model at the precision
(the registry in ``techniques/precision.py``), then for each batch size greedy-decode
``gen_tokens`` after a ``prompt_len`` prompt, warm-up first, ``repeats`` timed requests under the
Meter (TTFT, TPOT, IT, AL, memory, energy), served by the decode engine ``p.engine``
(:mod:`effllm_helpers.decode`; the record's ``model.engine`` says which ran and why, and
``model.linear_kernels`` which implementations held the weights); quality is held-out
perplexity, exact-match accuracy on a built-in task and, when asked, lm-evaluation-harness tasks;
MCR compares weight bytes and quality with the baseline precision, evaluated in the same run so
the record stands alone.

Baseline: ``baseline_precision`` (bf16, the paper's) — except on a CPU, where bf16 is emulated and
fp32 is the native format, so fp32 is used there and the record says so.
"""

from __future__ import annotations

import gc
import time
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from .. import catalog, data, evaluate
from ..config import DataSpec, InferenceParams, MeasureSpec
from ..decode import EngineChoice, StaticGraphDecoder, choose_engine, linear_kernels, timing_metrics
from ..errors import SkipRun
from ..measure import Meter, generation_metrics, timed_generate
from ..measure.compression import compression_metrics
from ..models import count_params, embedded, flops, sources
from ..results import metric, missing
from ..techniques import precision as prec
from .spec import AxisResult


def heldout_blocks(tokenizer: Any, seq_len: int, max_tokens: int = 200_000) -> torch.Tensor:
    """Held-out ``stdlib`` text packed with *this model's* tokenizer (any HF model works)."""
    corpus = data.load_corpus(DataSpec())
    return data.pack(corpus.val, tokenizer, seq_len, max_tokens=max_tokens)


def prompts_from_corpus(tokenizer: Any, n: int, prompt_len: int, seed: int = 0) -> torch.Tensor:
    """``n`` prompts of exactly ``prompt_len`` tokens cut from held-out stdlib text."""
    blocks = heldout_blocks(tokenizer, prompt_len, max_tokens=max(64 * prompt_len, n * prompt_len))
    if blocks.shape[0] == 0:
        raise ValueError("no held-out text long enough for the prompts")
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, blocks.shape[0], (n,), generator=gen)
    return blocks[idx]


def _quality(model: torch.nn.Module, tokenizer: Any, p: InferenceParams, seq_len: int,
             device: torch.device, random_weights: bool = False) -> dict[str, Any]:
    """Held-out perplexity, task accuracy (and lm-eval tasks); null with the reason for a
    random-weight model, whose scores would say nothing (MCR's quality ratio is then null too,
    while its sizes stay in the record)."""
    if random_weights:
        why = sources.RANDOM_REASON
        return {"ppl": missing("ppl", why), "val_loss": missing("nats/token", why),
                "task_acc": missing("fraction", why)}
    # ppl_batches x 8 blocks, spread evenly over the whole held-out split (not its first
    # documents); the metric records the targets scored and the split's size
    val = data.pack(data.load_corpus(DataSpec()).val, tokenizer, seq_len)
    ppl = evaluate.perplexity(model, val, batch_size=8, max_tokens=p.ppl_batches * 8 * seq_len)
    task = data.load_task("arithmetic", 1, p.task_items, seed=0)
    style = data.prompt_style(tokenizer, p.prompt_format)
    max_new = max(len(tokenizer(it["response"])["input_ids"]) for it in task.eval) + 4
    # an instruct model scores ~0 without its chat template: the metric names format/extraction
    acc, _ = evaluate.task_accuracy(model, tokenizer, task, style, max_new)
    out = {"ppl": ppl["ppl"], "val_loss": ppl["loss"], **({"uniform_ppl": ppl["uniform_ppl"]}
                                                          if "uniform_ppl" in ppl else {}),
           "task_acc": acc}
    if p.lm_eval_tasks:
        from ..lm_eval_bridge import evaluate_tasks

        out.update(evaluate_tasks(model, tokenizer, p.lm_eval_tasks))
    return out


def performance(quality: dict[str, Any], base_quality: dict[str, Any]
                ) -> tuple[float | None, float | None, str]:
    """The 'perf' of MCR for a run and its baseline, higher = better, by one method for both:
    the mean lm-eval score if every task ran on both sides (the paper's six-task mean), else
    1/perplexity."""
    lm, base_lm = quality.get("lm_eval/mean"), base_quality.get("lm_eval/mean")
    if lm and base_lm and lm["value"] is not None and base_lm["value"] is not None:
        return lm["value"], base_lm["value"], "mean_lm_eval_score"

    def inv(q: dict[str, Any]) -> float | None:
        ppl = q["ppl"]["value"]
        return 1.0 / ppl if ppl else None

    return inv(quality), inv(base_quality), "inverse_perplexity"


def compute_dtype(model: torch.nn.Module) -> str:
    """The dtype matmuls run in (for the MFU peak): a bnb model's compute dtype, else its own."""
    for mod in model.modules():
        cd = getattr(mod, "compute_dtype", None)
        if isinstance(cd, torch.dtype):
            return catalog.dtype_name(cd)
    return catalog.dtype_name(next(model.parameters()).dtype, "fp32")


def request_flops(config: Any, prompt_len: int, gen_tokens: int
                  ) -> tuple[float | None, str | None]:
    """(FLOPs per token run, method) for one greedy request, so that the Meter's MFU
    ``flops_per_token * flop_tokens / duration`` counts the request's model FLOPs when each
    request adds ``batch * (prompt_len + gen_tokens)`` flop tokens."""
    try:
        gf = flops.generation_flops(config, prompt_len, gen_tokens)
    except (ValueError, NotImplementedError, AttributeError, KeyError) as exc:
        return None, f"generation FLOPs unknown: {type(exc).__name__}: {exc}"
    return gf["total"] / (prompt_len + gen_tokens), gf["method"]


def _requests(spec: MeasureSpec, max_requests: int = 100_000) -> Iterator[int]:
    """Request indices to serve: the warm-up ones, then measured ones until both ``repeats``
    are done and the measured window has lasted ``min_duration_s`` (host clock; the device is
    synchronised at every request's end by the engine's timing)."""
    yield from range(spec.warmup_steps)
    t0 = time.perf_counter()
    n = 0
    while n < spec.repeats or (time.perf_counter() - t0 < spec.min_duration_s
                               and n < max_requests):
        yield spec.warmup_steps + n
        n += 1


def decode_benchmark(model: torch.nn.Module, tokenizer: Any, p: InferenceParams, batch: int,
                     device: torch.device, n_params: int, seed: int = 0,
                     engine: EngineChoice | None = None
                     ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Warm-up, then ``repeats`` greedy requests of exactly ``gen_tokens`` new tokens, served by
    ``engine`` (default: ``p.engine`` resolved for this model and device).

    Returns the metrics and what served them (engine name; for static_graph its mode, clock and
    any fallback reason)."""
    engine = engine or choose_engine(p.engine, model, device)
    prompts = prompts_from_corpus(tokenizer, batch, p.prompt_len, seed).to(device)
    fpt, flops_method = request_flops(model.config, p.prompt_len, p.gen_tokens)
    meter = Meter(device, n_params=n_params, warmup_steps=p.measure.warmup_steps,
                  sample_interval_s=p.measure.sample_interval_s, dtype=compute_dtype(model),
                  flops_per_token=fpt)
    flop_tokens = batch * (p.prompt_len + p.gen_tokens)  # the prefill runs too
    served: dict[str, Any] = {}
    if engine.name == "static_graph":
        with torch.inference_mode():  # cache, buffers and graph are built outside the meter
            cuda = device.type == "cuda"
            decoder = StaticGraphDecoder(
                model, batch, p.prompt_len, p.gen_tokens, compile_step=cuda and p.decode_compile,
                steps_per_graph=p.decode_steps_per_graph if cuda else 1)
        served = decoder.describe()
        timings = []
        with torch.inference_mode(), meter:
            for _ in _requests(p.measure):
                out, timing = decoder.decode(prompts)
                generated = int(out.shape[1]) * batch
                meter.step(tokens=generated, samples=batch, generated_tokens=generated,
                           flop_tokens=flop_tokens)
                timings.append(timing)
        del decoder
        latency = timing_metrics(timings[p.measure.warmup_steps:], served["clock"])
    else:
        kwargs: dict[str, Any] = {"input_ids": prompts, "attention_mask": torch.ones_like(prompts),
                                  "max_new_tokens": p.gen_tokens,
                                  "min_new_tokens": p.gen_tokens, "do_sample": False,
                                  "pad_token_id": tokenizer.pad_token_id}
        if p.static_cache:
            kwargs["cache_implementation"] = "static"
        timers = []
        with torch.inference_mode(), meter:
            for _ in _requests(p.measure):
                out, timer = timed_generate(model, **kwargs)
                generated = int(out.shape[1] - prompts.shape[1]) * batch
                meter.step(tokens=generated, samples=batch, generated_tokens=generated,
                           flop_tokens=flop_tokens)
                timers.append(timer)
        latency = generation_metrics(timers[p.measure.warmup_steps:])
    m = meter.metrics()
    m.update(latency)
    if "mfu" in m and flops_method:
        m["mfu"]["flops_method"] = flops_method
    return m, {"name": engine.name, **served}


# imported before the memory baseline, whichever precision runs: every precision's loading
# library (bitsandbytes alone is ~50 MB of RSS on a CPU) and transformers, so that the
# increment (amu_increment_gb, what precisions rank on) counts the model, its activations and
# cache only
BASELINE_LIBRARIES: tuple[str, ...] = ("transformers", *sorted(
    {q.library for q in catalog.PRECISIONS.values()} - {"torch"}))


def run(p: InferenceParams, seed: int = 0, progress: bool = True) -> AxisResult:
    """Load at ``p.precision``, benchmark decode at every batch size, score quality and MCR."""
    from ..measure.memory import mark_baseline  # AMU increment: memory above this point
    mark_baseline(BASELINE_LIBRARIES)
    from transformers import AutoTokenizer

    from .. import models  # noqa: F401 - registers our custom model classes with Auto*

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reason = prec.check_supported(p.precision, device)
    if reason:
        raise SkipRun(f"precision {p.precision} on {device.type}: {reason}")
    path = embedded.resolve(p.model, profile=p.embedded_profile, progress=progress)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    loaded = prec.load_for_inference(path, p, device)  # UnsupportedTechnique is a SkipRun
    model = loaded.model
    n_params = count_params(model)["total"]  # a packed 4-bit tensor counts two values per byte
    seq_len = min(256, getattr(model.config, "max_position_embeddings", 256) or 256)

    engine = choose_engine(p.engine, model, device)
    kernels = getattr(loaded, "kernels", None) or linear_kernels(model)
    fusion = loaded.fusion  # kept: ``loaded`` is freed before the baseline loads
    per_batch = []
    served_by: dict[int, dict[str, Any]] = {}
    warnings.filterwarnings("once", message=".*inputs will be cast from.*")  # bnb, per call
    for b in p.batch_sizes:
        m, served_by[b] = decode_benchmark(model, tokenizer, p, b, device, n_params, seed,
                                           engine=engine)
        per_batch.append({"batch_size": b, **m})
    headline = dict(per_batch[0])
    headline.pop("batch_size")
    metrics = headline
    for row in per_batch[1:]:
        for k in ("it", "al_s", "ttft_s", "tpot_s", "j_per_token", "amu_gb",
                  "amu_increment_gb"):
            if k in row:
                metrics[f"{k}_bs{row['batch_size']}"] = row[k]
    random_weights = sources.has_random_weights(path)  # random:<shape>: efficiency only
    quality = _quality(model, tokenizer, p, seq_len, device, random_weights)
    size = loaded.weight_bytes

    # MCR against the baseline precision, evaluated here on the same data
    base_prec = p.baseline_precision
    notes = list(loaded.notes)
    for b, served in served_by.items():
        if served.get("fallback_reason") and device.type == "cuda":
            notes.append(f"batch {b}: {served['fallback_reason']}")
    if device.type == "cpu" and base_prec == "bf16":
        base_prec = "fp32"
        notes.append("MCR baseline is fp32 on the CPU (bf16 is emulated there), not bf16")
    base_reason = prec.check_supported(base_prec, device)
    if base_prec == p.precision:
        base_size, base_quality = size, quality
    elif base_reason:  # the measurements above stand; only the ratio to the baseline is lost
        base_size, base_quality = None, None
    else:
        del model, loaded  # both hold the model: free it before the baseline loads
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        base = prec.load_for_inference(path, p.model_copy(update={"precision": base_prec}),
                                       device)
        base_size = base.weight_bytes
        base_quality = _quality(base.model, tokenizer, p, seq_len, device, random_weights)
        del base
    if base_quality is None:
        for k in ("mcr", "mcr_nominal"):
            metrics[k] = missing("ratio", f"baseline {base_prec} cannot run here: {base_reason}")
        metrics["size_bytes"] = metric(size, "B", "weight_storage_bytes")
    else:
        perf, base_perf, perf_method = performance(quality, base_quality)
        metrics.update(compression_metrics(size, perf, base_size, base_perf, p.precision,
                                           base_prec))
        for k in ("mcr", "mcr_nominal"):
            if metrics[k]["value"] is not None:
                metrics[k]["method"] += f"/{perf_method}_vs_{base_prec}"
                metrics[k]["baseline"] = base_prec
    facts = {"params_total": n_params, "weight_bytes": size, "baseline_weight_bytes": base_size,
             "baseline_precision": base_prec, "model_path": path,
             "prompt_format": data.prompt_style(tokenizer, p.prompt_format),
             "baseline_ppl": base_quality["ppl"]["value"] if base_quality else None,
             "bits_per_param": 8 * size / n_params if n_params else None,
             "engine": {**engine.record(), "per_batch": {str(b): {k: v for k, v in s.items()
                                                                 if k != "name"}
                                                         for b, s in served_by.items()}},
             "linear_kernels": kernels,
             "fused_projections": fusion}
    if quality["ppl"]["value"] is None:
        notes.append(f"perplexity: {quality['ppl'].get('reason')}")
    return AxisResult(metrics=metrics, quality=quality, model=facts, per_batch=per_batch,
                      notes=notes)
