"""Training loops for pretraining (axis 1) and fine-tuning (axis 2), on accelerate.

One loop serves both axes: AdamW (fused on CUDA), linear warm-up + cosine decay, gradient
accumulation and clipping, bf16 autocast on GPU, optional ``torch.compile``. It is built on
``accelerate`` so the same code runs under ``accelerate launch`` on several GPUs (DDP/FSDP); each
process then draws its own shard of every batch.

The loop is what we time, so it does nothing per step beyond the step itself: the loss of every
``log_every``-th step is kept on the device and read back to the host in one go only about ten
times a run (that read synchronises the device; between reads the host queues steps ahead of the
GPU), the Meter's ``step`` is O(1), and the final evaluation runs after the measured phase has
stopped. A diverged loss is caught at the next read.
Under ``accelerate launch`` the Meter measures each process' own device and counts its tokens.

What the training record counts (so TT, J/token and AL mean what they say):

* tokens are *targets*: a causal LM with ``labels`` predicts label ``t+1`` from position ``t``,
  so a sequence of S tokens trains on S-1 of them (fewer where labels are -100);
* AL is per optimizer step: an intermediate evaluation inside the measured window pauses the
  Meter, so it is in no metric (AL, duration, rates, MFU, PCU, memory, energy);
  ``duration_s.eval_inside_s`` says how long the evaluations took;
* with ``compile`` the first steps compile: they are Meter warm-up (at least
  ``COMPILE_WARMUP_STEPS``), and their wall time is ``compile_s``, never in AL/TT/AEC/MFU.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from . import catalog
from .config import MeasureSpec, TrainSpec
from .errors import check_finite
from .results import metric, missing

Batch = dict[str, torch.Tensor]

# with torch.compile the first step compiles and the second may still recompile (e.g. when
# accelerate's autocast or the optimizer state first appears): both stay out of the measurement
COMPILE_WARMUP_STEPS = 2


@dataclass
class TrainResult:
    """What a training run hands to the record: Meter metrics, curves and final numbers."""

    metrics: dict[str, Any]
    curves: dict[str, Any]
    steps: int
    tokens: int
    samples: int
    final_loss: float
    positions: int = 0  # positions computed (batch rows x width, padding included), all steps
    real_tokens: int = 0  # positions that are tokens of an example (not padding), all steps
    eval_history: list[dict[str, float]] = field(default_factory=list)
    # the trained module with its full parameters where training sharded them (FSDP): the
    # evaluations after training use it; None = the module passed in holds them
    model: torch.nn.Module | None = None


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """``auto`` means bf16 on a GPU that supports it, else fp32 (CPU bf16 is emulated and slow)."""
    if spec == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return catalog.torch_dtype(spec)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch on ``device`` without stalling the host: a CUDA copy from pageable memory
    is synchronous even with ``non_blocking=True``, so each step would wait for the GPU to
    drain before launching the next, and a launch-bound step would pay host plus GPU time.
    Staged through pinned memory (PyTorch's caching host allocator) the copy is queued."""
    if device.type != "cuda":
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return {k: (v if v.is_cuda else v.pin_memory()).to(device, non_blocking=True)
            if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


DTYPE_NAMES = {catalog.torch_dtype(k): k for k in catalog.DTYPES}


STRATEGY_ENV = "EFFLLM_LAUNCH_STRATEGY"  # set by effllm_helpers.launch in every process
STRATEGIES = ("ddp", "fsdp")


def launch_strategy() -> str:
    """The data-parallel strategy this process was launched with (``ddp`` when unset)."""
    s = os.environ.get(STRATEGY_ENV, "ddp")
    if s not in STRATEGIES:
        raise ValueError(f"${STRATEGY_ENV}={s!r}: must be one of {', '.join(STRATEGIES)}")
    return s


def fsdp_plugin(dtype: torch.dtype):
    """FSDP FULL_SHARD (parameters, gradients and optimizer state sharded over the ranks);
    mixed precision in the compute dtype, gradients reduced in fp32 so bf16 does not round them.
    Original parameters are kept, so an optimizer built before ``prepare`` still holds them."""
    from accelerate import FullyShardedDataParallelPlugin

    mp = None
    if dtype in (torch.bfloat16, torch.float16):
        from torch.distributed.fsdp import MixedPrecision

        mp = MixedPrecision(param_dtype=dtype, reduce_dtype=torch.float32, buffer_dtype=dtype)
    return FullyShardedDataParallelPlugin(
        sharding_strategy="FULL_SHARD", mixed_precision_policy=mp,
        auto_wrap_policy="size_based_wrap", use_orig_params=True,
        state_dict_type="FULL_STATE_DICT")


def make_accelerator(dtype: torch.dtype, strategy: str | None = None):
    """A fresh Accelerator; mixed precision for bf16/fp16, plain fp32 otherwise.

    ``strategy`` (default: ``launch_strategy()``) is ``ddp`` or ``fsdp``; it only matters when
    several processes run (accelerate picks DDP by itself, FSDP needs its plugin).
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # one notebook may train twice
    mp = catalog.dtype_name(dtype, "no")
    mp = mp if mp in ("bf16", "fp16") else "no"  # accelerate's mixed precision: none for fp32
    strategy = strategy or launch_strategy()
    # on a machine without CUDA, accelerate sees several launched processes (gloo) only with cpu
    kw: dict[str, Any] = {} if torch.cuda.is_available() else {"cpu": True}
    if strategy == "fsdp":
        kw["fsdp_plugin"] = fsdp_plugin(dtype)
    return Accelerator(mixed_precision=mp, **kw)


# AdamW betas. Pre-training from scratch uses beta2 = 0.95 (the GPT-3 / LLaMA recipe): a shorter
# second-moment memory keeps updates stable at a high LR while early gradients shift fast.
# Fine-tuning keeps torch's default 0.999 (what peft's and the HF Trainer's recipes use): the
# gradients of a trained model move slowly and the smoother estimate is the better one.
PRETRAIN_BETAS = (0.9, 0.95)
FINETUNE_BETAS = (0.9, 0.999)


def adamw(model: torch.nn.Module, lr: float, weight_decay: float, device: torch.device,
          betas: tuple[float, float] = PRETRAIN_BETAS) -> torch.optim.Optimizer:
    """The one optimizer builder: AdamW over the trainable parameters, decay on matrices only
    (biases, norms, gains and vectors such as DoRA magnitudes undecayed), fused where torch has
    the kernel (:func:`fused_kw`)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, **fused_kw(device))


def fused_kw(device: torch.device) -> dict[str, bool]:
    """``fused=True`` on CUDA and CPU: one kernel over every tensor instead of ~10 small ops per
    parameter. On a CPU the per-tensor loop was 5-9 % of a tiny-preset step (the DiT's 2 of its
    22 ms); the update is the same to fp32 rounding."""
    return {"fused": True} if device.type in ("cuda", "cpu") else {}


def lr_lambda(warmup: int, total: int, min_ratio: float = 0.1) -> Callable[[int], float]:
    """Linear warm-up to 1, then cosine decay to ``min_ratio``."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def fit(model: torch.nn.Module, next_batch: Callable[[int, int, int], Batch], steps: int,
        optimizer: torch.optim.Optimizer, *,
        loss_of: Callable[[torch.nn.Module, Batch], torch.Tensor] | None = None,
        schedule: Callable[[int], float] | None = None, clip: float | None = None) -> float:
    """A short unmeasured loop, for what a run needs trained before it measures (a pretrained
    base, a yardstick classifier): no Meter, no accelerate, one process. ``loss_of(model,
    batch)`` defaults to ``model(**batch).loss``; ``schedule`` multiplies the rate per step;
    ``clip`` bounds the gradient norm. Returns the last loss, read once at the end; a
    non-finite one raises ``DivergedError``."""
    device = next(model.parameters()).device
    params = [q for q in model.parameters() if q.requires_grad]
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule) if schedule else None
    model.train()
    loss = torch.zeros(())
    for step in range(steps):
        batch = {k: v.to(device) for k, v in next_batch(step, 0, 1).items()}
        loss = loss_of(model, batch) if loss_of else model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        if sched is not None:
            sched.step()
    model.eval()
    final = float(loss.detach())
    check_finite(final, steps)
    return final


def pretrain(model: torch.nn.Module, next_batch: Callable[[int, int, int], Batch], steps: int,
             lr: float) -> float:
    """Unmeasured base training (the 'pretrained checkpoint' a fine-tuning method then adapts):
    AdamW without weight decay, the shared loop's schedule (10% linear warm-up, cosine decay)
    and gradient clipping at 1. Without them a ViT at constant 3e-3 stayed at chance (0.11
    plain-digit accuracy after 300 steps at the gpu preset's width; 0.94 at 1e-3 with warm-up
    and clipping)."""
    device = next(model.parameters()).device
    opt = adamw(model, lr, 0.0, device, betas=FINETUNE_BETAS)
    return fit(model, next_batch, steps, opt, schedule=lr_lambda(max(1, steps // 10), steps),
               clip=1.0)


def train(
    model: torch.nn.Module,
    next_batch: Callable[[int, int, int], Batch],
    spec: TrainSpec,
    measure: MeasureSpec,
    *,
    n_params: int,
    flops_per_token: float | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    log_every: int | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train ``model`` for ``spec.steps`` optimizer steps under a Meter.

    ``next_batch(micro_step, rank, world)`` returns this process' micro-batch (``input_ids``,
    optional ``attention_mask``, ``labels`` with -100 where no loss is taken). ``evaluate`` is
    called every ``spec.eval_every`` steps and after the last one. The final call is outside the
    measured window; intermediate calls inside it pause the Meter (left out of every metric),
    and ``duration_s`` notes how many and how long.
    """
    from .measure import Meter
    from .runenv import progress_bar

    # about 50 loss-curve points, kept on the device; the host reads them (one sync) only every
    # ``read_every`` steps. On an H200 the gpu-small sweep (a read every other step, pageable
    # batches) stepped in 25.5 ms where pretrain_mfu.py (every 10th, pinned) took 19.7 ms
    log_every = log_every or max(1, spec.steps // 50)
    # (at most every 100 steps, so a long run still catches a diverged loss soon)
    read_every = max(log_every, min(math.ceil(spec.steps / 10), 100))
    dtype = resolve_dtype(spec.dtype, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    acc = make_accelerator(dtype)
    device = acc.device
    opt = optimizer or adamw(model, spec.lr, spec.weight_decay, device)
    model, opt = acc.prepare(model, opt)
    # not prepared: accelerate would step it once per process per step, so warm-up and cosine
    # would end num_processes times early (spec.steps counts steps per process)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(spec.warmup_steps, spec.steps))
    meter_warmup = measure.warmup_steps
    # the prepared module, uncompiled: evaluation runs it eagerly. Unwrapped here, before any
    # compile: accelerate's unwrap of a compiled module re-points its ``_orig_mod`` at the bare
    # module, past the DDP/FSDP wrapper
    prepared = model
    allocate = getattr(getattr(acc.unwrap_model(prepared, keep_torch_compile=False),
                               "base_model", None), "update_and_allocate", None)
    if spec.compile:
        model = torch.compile(model)
        meter_warmup = max(meter_warmup, COMPILE_WARMUP_STEPS)  # never time the compiling steps
    model.train()
    rank, world = acc.process_index, acc.num_processes

    losses_x, losses_y, joules_x, joules_y = [], [], [], []
    eval_history: list[dict[str, float]] = []
    tokens = samples = positions = real_tokens = 0
    eval_inside_s = 0.0
    n_eval_inside = 0
    first_steps_s: list[float] = []  # wall time of the compiling (warm-up) steps
    compile_fallback: str | None = None  # why the compiled model gave way to the eager one
    last_loss = float("nan")
    pending: list[tuple[int, int, torch.Tensor]] = []  # (step, tokens, loss on the device)

    def read_losses() -> float:
        """Bring the pending losses to the host (one sync); the curves get them, the last one
        is returned. Energy is read after the sync, so it pairs with the last loss only."""
        values = torch.stack([loss for _, _, loss in pending]).tolist()
        for (at, n_tok, _), value in zip(pending, values, strict=True):
            check_finite(value, at)
            losses_x.append(n_tok)
            losses_y.append(value)
        pending.clear()
        energy = meter.energy_j_so_far()
        if energy is not None:
            joules_x.append(energy)
            joules_y.append(values[-1])
        bar.set_postfix(loss=f"{values[-1]:.3f}")
        return values[-1]

    bar = progress_bar(total=spec.steps, desc="train", unit="step",
                       disable=not progress or rank != 0, leave=False)
    with Meter(device, n_params=n_params, flops_per_token=flops_per_token,
               dtype=DTYPE_NAMES.get(dtype, "fp32"), warmup_steps=meter_warmup,
               sample_interval_s=measure.sample_interval_s) as meter:
        for step in range(spec.steps):
            timing_compile = spec.compile and step < COMPILE_WARMUP_STEPS  # all in warm-up
            if timing_compile:
                _sync(device)
                t_step = time.perf_counter()
            step_tokens = step_samples = step_run = 0
            loss_acc = torch.zeros((), device=device)
            for micro in range(spec.grad_accum):
                batch = next_batch(step * spec.grad_accum + micro, rank, world)
                labels = batch.get("labels", batch["input_ids"])  # counted on the host: no sync
                step_tokens += count_targets(labels)
                # tokens the model attends (prompt included, padding not): a packed batch says
                # (data.packing); else the attention mask; else every position
                real = batch.pop("_real_tokens", None)
                mask = batch.get("attention_mask")
                run = (int(real) if real is not None else int(mask.sum()) if mask is not None
                       else batch["input_ids"].numel())
                step_run += run
                real_tokens += run * world
                positions += batch["input_ids"].numel() * world
                examples = batch.pop("_examples", None)  # a packed row holds several
                step_samples += int(examples) if examples is not None else labels.shape[0]
                batch = to_device(batch, device)
                if spec.compile:  # rows per step vary (packing): one graph for every count
                    for v in batch.values():
                        if isinstance(v, torch.Tensor) and v.dim() >= 1:
                            torch._dynamo.maybe_mark_dynamic(v, 0)
                try:
                    loss = _forward_backward(model, batch, acc, spec.grad_accum)
                except Exception as exc:  # a compile that fails falls back to eager, recorded
                    if model is prepared or not _is_compile_error(exc):
                        raise
                    compile_fallback = f"{type(exc).__name__}: {exc}".strip()[:500]
                    model = prepared
                    opt.zero_grad(set_to_none=True)
                    loss = _forward_backward(model, batch, acc, spec.grad_accum)
                loss_acc += loss.detach()
            if spec.max_grad_norm:
                acc.clip_grad_norm_(model.parameters(), spec.max_grad_norm)
            opt.step()
            if allocate is not None:  # AdaLoRA: reallocates rank from this step's gradients
                allocate(step)
            sched.step()
            opt.zero_grad(set_to_none=True)
            # the Meter measures this process' device(s) with this rank's counts; with several
            # ranks the metrics are combined at the end (gather_rank_metrics)
            meter.step(tokens=step_tokens, samples=step_samples, flop_tokens=step_run)
            if timing_compile:
                _sync(device)
                first_steps_s.append(time.perf_counter() - t_step)
            tokens += step_tokens * world
            samples += step_samples * world
            last = step == spec.steps - 1
            if (step + 1) % log_every == 0 or last:
                pending.append((step, tokens, loss_acc))
            if pending and ((step + 1) % read_every == 0 or last):
                last_loss = read_losses()  # the host sync: about ten per run
            bar.update(1)
            if evaluate and not last and (step + 1) % spec.eval_every == 0:
                t_ev = time.perf_counter()
                inside = meter.measuring  # in warm-up nothing is measured: nothing to pause
                with meter.paused():  # the evaluation is in no metric (AL, rates, energy, ...)
                    eval_history.append({"step": step + 1, "tokens": tokens,
                                         **_evaluate(prepared, acc, evaluate)})
                if inside:
                    n_eval_inside += 1
                    eval_inside_s += time.perf_counter() - t_ev
        meter.stop()  # the final evaluation is not training time
        if evaluate:
            eval_history.append({"step": spec.steps, "tokens": tokens,
                                 **_evaluate(prepared, acc, evaluate)})
    bar.close()
    curves: dict[str, Any] = {
        "loss_vs_tokens": {"x": losses_x, "y": losses_y, "x_unit": "tokens",
                           "y_unit": "nats/token"},
    }
    if joules_x:
        curves["loss_vs_joules"] = {"x": joules_x, "y": joules_y, "x_unit": "J",
                                    "y_unit": "nats/token"}
    else:
        curves["loss_vs_joules"] = {"x": [], "y": [], "x_unit": "J", "y_unit": "nats/token",
                                    "reason": "energy is not measurable on this machine "
                                              "(see metrics.energy_j)"}
    if eval_history:
        keys = [k for k in eval_history[0] if k not in ("step", "tokens")]
        for k in keys:
            curves[f"{k}_vs_tokens"] = {"x": [e["tokens"] for e in eval_history],
                                        "y": [e[k] for e in eval_history], "x_unit": "tokens",
                                        "y_unit": k}
    metrics = meter.metrics()
    if metrics["al_s"]["value"] is not None:
        metrics["al_s"]["what"] = "per optimizer step"
        if n_eval_inside:
            metrics["al_s"]["excluded_eval_intervals"] = n_eval_inside
    if n_eval_inside and metrics["duration_s"]["value"] is not None:
        metrics["duration_s"]["eval_inside_s"] = eval_inside_s
        metrics["duration_s"]["note"] = (
            f"excludes {n_eval_inside} intermediate evaluation(s), {eval_inside_s:.2f} s: the "
            "Meter was paused, so they are in no rate, MFU, PCU, memory, energy or AL")
    if not spec.compile:
        metrics["compile_s"] = missing("s", "compile off", "perf_counter_first_steps")
    elif compile_fallback:
        metrics["compile_s"] = missing("s", "compile failed, the run trained eagerly: "
                                       f"{compile_fallback}", "perf_counter_first_steps")
    else:
        metrics["compile_s"] = metric(
            sum(first_steps_s), "s", "perf_counter_first_steps", steps=len(first_steps_s),
            step_s=first_steps_s, warmup_steps=meter_warmup,
            note="the first optimizer steps, compilation included; Meter warm-up, so not in "
                 "AL, rates, energy or MFU")
    if world > 1:  # one record for the run: every rank's Meter combined (rank 0 writes it)
        from .measure.meter import gather_rank_metrics, world_size_metric

        strategy = launch_strategy()
        metrics = gather_rank_metrics(metrics, strategy)
        metrics["world_size"] = world_size_metric(world, strategy)
    if "tt" not in metrics:
        metrics["tt"] = missing("tokens/s/param", "meter gave no training throughput")
    return TrainResult(metrics=metrics, curves=curves, steps=spec.steps, tokens=tokens,
                       samples=samples, final_loss=last_loss, positions=positions,
                       real_tokens=real_tokens, eval_history=eval_history,
                       model=full_module(prepared, acc))


def _forward_backward(model: torch.nn.Module, batch: Batch, acc: Any,
                      grad_accum: int) -> torch.Tensor:
    """One micro-batch: forward under autocast, the scaled loss backward; returns that loss."""
    with acc.autocast():
        loss = model(**batch).loss / grad_accum
    acc.backward(loss)
    return loss


def _is_compile_error(exc: BaseException) -> bool:
    """An error raised by torch.compile's tracing or code generation (not by the model)."""
    try:
        from torch._dynamo.exc import TorchDynamoException
    except ImportError:  # pragma: no cover - torch without dynamo
        return False
    return isinstance(exc, TorchDynamoException) or type(exc).__module__.startswith(
        ("torch._dynamo", "torch._inductor"))


def count_targets(labels: torch.Tensor) -> int:
    """Tokens a causal LM is trained on: labels shifted by one (the first has no prediction),
    -100 excluded. S-token sequences give S-1 targets each."""
    return int((labels[..., 1:] != -100).sum())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fsdp_root(model: torch.nn.Module) -> torch.nn.Module | None:
    """The outermost FSDP module in the prepared ``model``, None when nothing is sharded."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return next((m for m in model.modules() if isinstance(m, FSDP)), None)


def _evaluate(model: torch.nn.Module, acc: Any,
              evaluate: Callable[[torch.nn.Module], dict[str, float]]) -> dict[str, float]:
    """Evaluate the eager module: a compiled one would recompile for eval mode and new shapes.
    Under FSDP a gathered full copy (every rank takes part), since the trained module holds
    only this rank's flat shards."""
    model.eval()
    with torch.no_grad():
        ev = evaluate(full_module(model, acc) or acc.unwrap_model(model, keep_torch_compile=False))
    model.train()
    return ev


def full_module(model: torch.nn.Module, acc: Any) -> torch.nn.Module | None:
    """Under FSDP, a fresh module of the trained one's class holding the full trained state on
    every rank (built on the device, so non-persistent buffers such as RoPE frequencies are
    initialised as usual); None when parameters were not sharded."""
    root = _fsdp_root(model)
    if root is None:
        return None
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.state_dict_type(root, StateDictType.FULL_STATE_DICT,
                              FullStateDictConfig(offload_to_cpu=acc.device.type != "cpu",
                                                  rank0_only=False)):
        state = root.state_dict()
    inner = acc.unwrap_model(model, keep_torch_compile=False)
    with torch.device(acc.device):
        full = type(inner)(inner.config)
    full.load_state_dict(state)
    return full.eval()


def block_batches(blocks: torch.Tensor, batch_size: int, seed: int = 0
                  ) -> Callable[[int, int, int], Batch]:
    """Next-token batches over packed ``[N, L]`` blocks: a fresh shuffle per epoch, sharded."""
    n = blocks.shape[0]
    if n == 0:
        raise ValueError("no training blocks: the corpus is smaller than one sequence")
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen)

    def next_batch(micro_step: int, rank: int, world: int) -> Batch:
        start = ((micro_step * world + rank) * batch_size) % n
        if start + batch_size > n:  # wrap: reshuffle for the next epoch
            order.copy_(torch.randperm(n, generator=gen))
            start = 0
        idx = order[start:start + batch_size]
        ids = blocks[idx]
        return {"input_ids": ids, "labels": ids}

    return next_batch
