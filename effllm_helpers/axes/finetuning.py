"""Axis 2 — adapting a base model with one fine-tuning method (paper Tables 7–8, Fig. 4).

``run(params)`` is what ``notebooks/02_finetuning.ipynb`` calls: base model (any Hugging Face id or
path, or the embedded one built by axis 1's code), task suite with prompt masking, the method from
the registry, the shared training loop under the Meter, then eval loss, exact-match accuracy
before and after, trainable params, adapter bytes on disk and the merge check.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .. import data, evaluate, runenv, train
from ..config import FinetuneParams
from ..data import packing
from ..models import embedded, sources
from ..results import metric, missing
from ..techniques import finetuning as ft
from .spec import AxisResult

# an exact merge moves fp32 logits by ~1e-5; beyond this the merged model is not the one trained
# (e.g. a QLoRA adapter merged onto the dequantised base moved them by 14-17)
MERGE_TOLERANCE = 0.05


def merge_record(merge: ft.MergeCheck, tolerance: float = MERGE_TOLERANCE
                 ) -> tuple[dict[str, Any], str | None]:
    """``metrics.merge_max_abs_diff`` for a merge check, and a note when the merge moved the
    logits beyond ``tolerance`` (the metric then carries a ``flag`` saying so)."""
    if merge.max_abs_diff is None:
        return missing("logit", merge.reason or "not mergeable"), None
    rec = metric(merge.max_abs_diff, "logit", "merge_and_unload_vs_adapter",
                 tolerance=tolerance)
    if merge.max_abs_diff <= tolerance:
        return rec, None
    rec["flag"] = f"merge changes logits beyond tolerance {tolerance:g}"
    note = (f"merging the adapter changed logits by up to {merge.max_abs_diff:.4g} (tolerance "
            f"{tolerance:g}): the merged model is not the trained one; serve the adapter "
            "unmerged (a 4-bit base merges onto its dequantised weights)")
    return rec, note



def load_base(name: str, device: torch.device, profile: str = "tiny", progress: bool = False):
    """(model, tokenizer) for ``name``: an HF id, a local folder, or ``embedded[:profile]``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .. import models  # noqa: F401 - registers our custom model classes with Auto*

    path = embedded.resolve(name, profile=profile, progress=progress)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    return model, tokenizer


def task_accuracy(model: torch.nn.Module, tokenizer: Any, task: data.TaskData,
                  max_new_tokens: int, style: str = "plain"
                  ) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """Greedy generations on the eval items, scored (:func:`evaluate.task_accuracy`); with a
    few examples. ``style`` is the prompt format (``chat`` or ``plain``), recorded in the metric
    with the answer extraction."""
    acc, preds = evaluate.task_accuracy(model, tokenizer, task, style, max_new_tokens)
    examples = [{"prompt": it["prompt"], "answer": it["answer"], "generated": p}
                for it, p in list(zip(task.eval, preds, strict=True))[:3]]
    return acc, examples


def run(p: FinetuneParams, seed: int = 0, save_dir: str | Path | None = None,
        progress: bool = True, evaluate_tasks: bool = True) -> AxisResult:
    """Fine-tune with ``p.method`` for ``p.train.steps`` and measure everything."""
    from ..measure.memory import mark_baseline  # AMU increment: memory above this point
    mark_baseline()
    phases = _Phases()  # where the run's wall time goes, outside the measured window too
    torch.manual_seed(seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    path = embedded.resolve(p.base_model, profile=p.embedded_profile, progress=progress)
    model, tokenizer = load_base(path, device, p.embedded_profile, progress)
    phases.mark("load")
    random_weights = sources.has_random_weights(path)  # random:<shape>: efficiency only
    evaluate_tasks = evaluate_tasks and not random_weights
    style = data.prompt_style(tokenizer, p.prompt_format)
    task = data.load_task(p.task, p.n_train, p.n_eval, seed=seed)
    instruction = task.instruction(style)  # the chat prompts' answer-format instruction
    train_rows = data.sft_rows(task.train, tokenizer, p.max_len, style, instruction)
    eval_t = data.sft_tensors(task.eval, tokenizer, p.max_len, style=style,
                              instruction=instruction)
    # the layout is chosen on the base model, before any adapter: the attention decides
    layout, packing_info = packing.choose(p.packing, model, model.config.vocab_size, device,
                                          next(model.parameters()).dtype)
    phases.mark("data")
    answer_len = max(len(tokenizer(it["response"])["input_ids"]) for it in task.eval[:16]) + 4
    max_new = min(p.max_len, answer_len)

    acc_before = None
    if evaluate_tasks:
        acc_before, _ = task_accuracy(model, tokenizer, task, max_new, style)
    loss_before = evaluate.eval_loss_metric(model, eval_t, p.train.batch_size)

    phases.mark("eval_before")
    prepared = ft.prepare(model, p)  # UnsupportedTechnique is a SkipRun: recorded as a skip
    model = prepared.model
    # the method's LR (literature default unless the params set one): recorded in method_config
    opt = prepared.make_optimizer(prepared.config["lr"], p.train.weight_decay)

    def eval_fn(m: torch.nn.Module) -> dict[str, float]:
        return {"eval_loss": evaluate.eval_loss(m, eval_t, p.train.batch_size,
                                                p.train.eval_batches)}

    # compiled: packed rows of one width (the row count varies; train marks it dynamic), so
    # the step compiles once instead of once per new width inside the measured window
    batches = packing.sft_batches(train_rows, p.train.batch_size, layout,
                                  data.pad_id(tokenizer), p.max_len, seed,
                                  fixed_width=p.train.compile)
    res = train.train(model, batches, p.train,
                      p.measure, n_params=prepared.total_params, optimizer=opt,
                      evaluate=eval_fn, progress=progress,
                      flops_per_token=_flops_per_token(model, prepared, p, train_rows))
    phases.mark("train")
    model.eval()
    quality: dict[str, Any] = {
        # bootstrap interval over eval items, as accuracy's
        "eval_loss": evaluate.eval_loss_metric(model, eval_t, p.train.batch_size),
        "eval_loss_before": loss_before,
        "train_loss": metric(res.final_loss, "nats/token", "last_train_step"),
    }
    examples: list[dict[str, str]] = []
    if evaluate_tasks:
        quality["accuracy"], examples = task_accuracy(model, tokenizer, task, max_new, style)
        quality["accuracy_before"] = acc_before
    if random_weights:  # a loss or an exact match of random weights says nothing
        quality = {k: missing(v["unit"], sources.RANDOM_REASON) for k, v in quality.items()}
    metrics = dict(res.metrics) | layout_metrics(res)
    with tempfile.TemporaryDirectory() as tmp:
        adapter_bytes = ft.adapter_size_bytes(prepared, tmp)
    metrics["adapter_bytes"] = metric(adapter_bytes, "B", "save_pretrained_file_bytes")
    notes = list(prepared.notes)
    metrics["merge_max_abs_diff"], merge_note = merge_record(
        ft.merge_check(prepared, eval_t["input_ids"][:2]))
    if merge_note:
        notes.append(merge_note)
    phases.mark("eval_after")
    facts = {
        "params_total": prepared.total_params,
        "params_trainable": prepared.trainable_params,
        "trainable_fraction": prepared.trainable_params / prepared.total_params,
        "base_model": p.base_model,
        "model_path": path,
        "prompt_format": style,
        "method_config": prepared.config,
        "train_tokens": res.tokens,
        "train_samples": res.samples,
        "packing": packing_info,
        "wall_phases_s": phases.seconds,
    }
    if save_dir is not None and runenv.is_main_rank():
        out = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
        out.save_pretrained(save_dir)
        tokenizer.save_pretrained(save_dir)
    return AxisResult(metrics=metrics, quality=quality, curves=res.curves, model=facts,
                      notes=notes, examples=examples)


class _Phases:
    """Wall seconds per phase of a run (load, data, evaluations, training incl. compile)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._t = time.perf_counter()

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self._t, 2)
        self._t = now


def layout_metrics(res: train.TrainResult) -> dict[str, Any]:
    """What the batches made the device compute, over every step (warm-up included): positions
    (rows x width), real tokens (example tokens, what MFU counts), loss tokens (the shifted
    response targets) and the padding fraction (positions that were no example's token)."""
    how = "counted_host_side_all_steps"
    if not res.positions:
        return {}
    return {
        "computed_positions": metric(res.positions, "positions", how),
        "real_tokens": metric(res.real_tokens, "tokens", how),
        "loss_tokens": metric(res.tokens, "tokens", how),
        "padding_frac": metric(1 - res.real_tokens / res.positions, "fraction", how,
                               note="1 - real_tokens / computed_positions"),
    }


def _flops_per_token(model: torch.nn.Module, prepared: ft.Prepared, p: FinetuneParams,
                     rows: list[tuple[list[int], list[int]]]) -> float | None:
    """Training FLOPs per real (attended) token of the prepared model as autograd runs them
    (adapter matmuls, DoRA's extra work, no weight gradients for frozen weights, no backward
    below the first trainable layer; see ``models.flops.finetune_flops_per_token``),
    with attention at each example's own length: an example attends only to itself (packed or
    padded), so ``max_len`` overstates it and the mean length understates it (attention grows
    with the square of a length). The sampler draws every row equally often, so this mean over
    the rows is the expected count per real token, which is what the Meter multiplies it by
    (``flop_tokens``: example tokens, not padding). None when the architecture is not covered
    (MFU is then null with the reason)."""
    from ..models import flops

    lengths = [len(a) + len(b) for a, b in rows]
    mean_len = max(1, round(sum(lengths) / len(lengths)))
    try:
        return flops.finetune_flops_per_token(model, mean_len, p.train.batch_size * mean_len,
                                              lengths=lengths)["total"]
    except (ValueError, NotImplementedError, AttributeError):
        return None
