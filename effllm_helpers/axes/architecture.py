"""Axis 1 — pretraining one architecture choice and scoring it (paper Tables 3–6, Fig. 3).

``run(params)`` is what ``notebooks/01_architecture.ipynb`` calls: corpus and tokenizer, model
from the zoo, the training loop under the Meter, then held-out perplexity, the associative-recall
probe, and KV-cache bytes per token (analytic and measured). The notebook only shows and records.

The probe: a fraction ``probe_train_fraction`` of training sequences are multi-query associative
recall (MQAR) sequences, so that after training the held-out probe measures how much each variant
can recall in context — the capability in which MQA/GQA/MLA/NSA and attention-free models differ
(Zoology, Arora et al. 2023). Set it to 0 for a pure-corpus run (the probe is then zero-shot).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from .. import data, evaluate, models, runenv, train
from ..config import ArchitectureParams, SizeSpec
from ..models import flops, kernels
from ..results import metric, missing
from .spec import AxisResult


def ffn_label(p: ArchitectureParams) -> str:
    """What the FFN really is at this preset (``moe 4x top-2``, ``dense d_ff x4``), for the
    record: a study's variant names cannot know the preset's expert count."""
    m = p.model
    if m.ffn == "moe":
        return f"moe {m.n_experts}x top-{m.top_k}"
    return "dense" if m.d_ff_mult == 1.0 else f"dense d_ff x{float(m.d_ff_mult):g}"


def effective_size(p: ArchitectureParams) -> SizeSpec:
    """The preset's size for ``model.size``, with ``d_ff`` scaled by ``model.d_ff_mult`` (already
    a number: ``n_experts``/``top_k`` resolve when the params are validated)."""
    size = p.sizes[p.model.size]
    if p.model.d_ff_mult != 1.0:
        size = size.model_copy(update={"d_ff": max(1, round(size.d_ff * p.model.d_ff_mult))})
    return size


def probe_blocks(tokenizer: Any, seq_len: int, n_blocks: int, n_pairs: int,
                 seed: int) -> torch.Tensor:
    """``n_blocks`` training blocks made of back-to-back MQAR samples (eos between them)."""
    n_queries = max(1, n_pairs // 2)
    sample_len = 2 * (n_pairs + n_queries) + 1
    if sample_len > seq_len:  # a cut sample would train keys without their queries
        raise ValueError(f"probe_pairs={n_pairs}: an associative-recall sample needs "
                         f"{sample_len} tokens, more than data.seq_len={seq_len}; lower "
                         "probe_pairs or raise seq_len")
    per_block = seq_len // sample_len
    probe = data.make_probe(tokenizer, n_pairs=n_pairs, n_queries=n_queries,
                            n_samples=n_blocks * per_block, seed=seed)
    eos = torch.full((probe.input_ids.shape[0], 1), tokenizer.eos_token_id)
    seqs = torch.cat([probe.input_ids, eos], dim=1).reshape(n_blocks, -1)
    pad = seq_len - seqs.shape[1]
    if pad > 0:
        seqs = torch.cat([seqs, torch.full((n_blocks, pad), tokenizer.eos_token_id)], dim=1)
    return seqs[:, :seq_len]


def run(p: ArchitectureParams, seed: int = 0, save_dir: str | Path | None = None,
        progress: bool = True) -> AxisResult:
    """Pretrain the model ``p`` describes for its token budget and measure everything."""
    from ..measure.memory import mark_baseline

    torch.manual_seed(seed)
    seq_len = p.data.seq_len
    tokenizer, train_blocks = data.token_blocks(p.data, "train")
    _, val_blocks = data.token_blocks(p.data, "val")
    corpus_fp = data.load_corpus(p.data).fingerprint
    if p.probe_train_fraction > 0:
        n_probe = max(1, int(len(train_blocks) * p.probe_train_fraction))
        mix = probe_blocks(tokenizer, seq_len, n_probe, p.probe_pairs, seed=seed + 1000)
        train_blocks = torch.cat([train_blocks, mix])
    size = effective_size(p)
    # AMU increment: memory above this point, i.e. the model, its optimizer and activations; the
    # corpus and tokenizer (trained on the first run, a cold cache later runs do not pay) are
    # below it, so they cannot rank one variant worse than another
    mark_baseline()
    model = models.build(p.model, size, vocab_size=len(tokenizer),
                         max_seq_len=max(seq_len, size.max_seq_len))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    counts = models.count_params(model)
    try:
        fpt = flops.flops_per_token(model.config, seq_len, training=True)
    except (ValueError, NotImplementedError):
        fpt = None
    probe = data.make_probe(tokenizer, n_pairs=p.probe_pairs, n_queries=max(1, p.probe_pairs // 2),
                            n_samples=128, seed=seed + 2000)

    def eval_fn(m: torch.nn.Module) -> dict[str, float]:
        ppl = evaluate.perplexity(m, val_blocks, batch_size=p.train.batch_size,
                                  max_batches=p.train.eval_batches)
        return {"val_loss": ppl["loss"]["value"]}

    # decided before a compiled forward, not traced in it; a kernel that breaks the compiled
    # backward trains eagerly, and the record says so (facts' compile_off_reason)
    blocker = kernels.compile_blocker(kernels.prepare(model, device))
    spec = p.train
    if spec.compile and blocker:
        spec = spec.model_copy(update={"compile": False})
    res = train.train(model, train.block_batches(train_blocks, p.train.batch_size, seed),
                      spec, p.measure, n_params=counts["total"], flops_per_token=fpt,
                      evaluate=eval_fn, progress=progress)
    if p.train.compile and blocker:
        res.metrics["compile_s"] = {**res.metrics["compile_s"], "reason": blocker}

    model = res.model if res.model is not None else model  # FSDP: the gathered full model
    model.eval()  # the whole held-out split, or an evenly spread p.eval_tokens of it
    ppl = evaluate.perplexity(model, val_blocks, batch_size=p.train.batch_size,
                              max_tokens=p.eval_tokens)
    acc = data.probe_accuracy(model, probe, device=device)
    quality = {
        "val_loss": ppl["loss"],
        "val_ppl": ppl["ppl"],
        "uniform_ppl": ppl.get("uniform_ppl") or missing("", "no logits scored"),
        # reported, not scored: untrained for recall, it sits at chance for every variant
        "probe_acc": metric(acc, "fraction", "mqar_probe_greedy", n=int(probe.targets.numel()),
                            chance=probe.chance, scored=False,
                            note="not in the efficiency score: the MQAR probe is not trained "
                                 "for and reads at chance for every attention variant"),
        "train_loss": metric(res.final_loss, "nats/token", "last_train_step"),
    }
    metrics = dict(res.metrics)
    dtype_bytes = 2 if device.type == "cuda" else 4
    try:
        kv_analytic = flops.kv_cache_bytes_per_token(model.config, dtype_bytes=dtype_bytes)
        metrics["kv_bytes_per_token_analytic"] = metric(
            kv_analytic, "B/token", f"analytic_{model.config.model_type}", dtype_bytes=dtype_bytes)
    except (ValueError, NotImplementedError) as exc:
        metrics["kv_bytes_per_token_analytic"] = missing("B/token", str(exc))
    # measured in the dtype the analytic count assumes (bf16 on a GPU, as it would be served)
    metrics["kv_bytes_per_token_measured"] = evaluate.measured_kv_bytes_per_token(
        model, len(tokenizer), t1=min(16, seq_len // 4), t2=min(48, seq_len),
        dtype=torch.bfloat16 if dtype_bytes == 2 else torch.float32)
    from ..measure import weight_bytes

    facts = {
        "params_total": counts["total"],
        "params_active": counts["active"],
        "weight_bytes": weight_bytes(model)["total"],
        "flops_per_token_train": fpt,
        **_implementation(model.config, seq_len, device),
        "tokens_trained": res.tokens,
        "compiled": bool(spec.compile),
        **({"compile_off_reason": blocker} if p.train.compile and blocker else {}),
        "model_type": model.config.model_type,
        "ffn_label": ffn_label(p),
        "d_model": size.d_model,
        "n_layers": size.n_layers,
        "d_ff": size.d_ff,
        "vocab_size": len(tokenizer),
        "seq_len": seq_len,
        "corpus": corpus_fp,
        "chinchilla_fraction": res.tokens / (20 * counts["total"]),
    }
    model_dir = None
    if save_dir is not None:
        model_dir = str(save_dir)
        if runenv.is_main_rank():
            model.save_pretrained(save_dir)
            tokenizer.save_pretrained(save_dir)
    if not math.isfinite(res.final_loss):
        raise RuntimeError("final loss is not finite")
    return AxisResult(metrics=metrics, quality=quality, curves=res.curves, model=facts,
                      model_dir=model_dir, eval_history=res.eval_history)


def _implementation(config: Any, seq_len: int, device: Any = "cpu") -> dict[str, Any]:
    """Which implementation of the variant's core op ran on ``device`` (``model.kernel``,
    :mod:`effllm_helpers.models.kernels`): for NSA, RWKV and Mamba fla's Triton kernel or the
    PyTorch reference, with the reason fla was not used. NSA's reference is dense-masked, so its
    speed and memory are that reference's; the forward FLOPs the implementation that ran
    executes (beside the sparse model FLOPs MFU counts) say by how much."""

    requested = getattr(config, "kernel", None)
    mt = config.model_type
    if mt == "effllm_decoder" and getattr(config, "attention", None) == "nsa":
        from ..models import nsa

        choice = nsa.nsa_choice(
            requested, device, n_heads=config.num_attention_heads,
            n_kv_heads=config.num_key_value_heads, head_dim=config.head_dim,
            block=config.nsa_block, stride=config.nsa_stride, n_selected=config.nsa_selected)
    elif mt == "rwkv":
        from ..models import rwkv

        choice = kernels.choose("rwkv", requested, device, rwkv.reference_name(device))
    elif mt in ("mamba", "effllm_mamba"):
        from ..models import mamba

        choice = kernels.choose("mamba", requested, device, mamba.REFERENCE)
    else:
        return {}
    out = kernels.record(choice, requested)
    if mt != "effllm_decoder":
        return out
    try:
        out["flops_per_token_fwd_executed"] = flops.executed_flops_per_token(
            config, seq_len, choice.implementation)
        out["flops_per_token_fwd_executed_method"] = (
            f"executed by {choice.implementation} (full sequence, no cache)")
        out["flops_per_token_fwd_model"] = flops.flops_per_token(config, seq_len, training=False)
    except (ValueError, NotImplementedError) as exc:
        out["flops_per_token_fwd_executed"] = None
        out["flops_per_token_fwd_executed_reason"] = f"{type(exc).__name__}: {exc}"
    return out
