"""Fine-tuning method registry: one name (``FinetuneParams.method``) -> a model ready to train.

The fine-tuning axis compares methods on the same base, so every method goes through one door
(``prepare``) and hands back the same things: the model with exactly the method's parameters
trainable, honest parameter counts, and the optimizer the method calls for (LoRA+ needs its own
learning-rate groups). The paper's seven methods are fixed entries; any other peft method is
accepted by name and built from peft's own config-class mapping, so new peft tuners work without
code here.

QLoRA is orthogonal to the method: ``quant`` in {nf4, fp4} reloads the base in bitsandbytes 4-bit
before the adapter is attached (peft's ``prepare_model_for_kbit_training`` then freezes the base).
Methods that train base weights (freeze, full) cannot sit on a 4-bit base and are rejected.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from torch import nn

from effllm_helpers import catalog
from effllm_helpers.config import FinetuneParams
from effllm_helpers.errors import UnsupportedTechnique
from effllm_helpers.models.zoo import count_params
from effllm_helpers.techniques.precision import (
    as_device,
    bnb4_config,
    probe_bnb,
    quantize_in_memory,
)
from effllm_helpers.train import FINETUNE_BETAS, adamw, fused_kw

# largest weight dimension up to which PiSSA uses an exact SVD; above it peft's fast randomized
# SVD ("pissa_niter_<n>"), which peft's docs call about as good as SVD at niter=16
PISSA_EXACT_MAX_DIM = 1024
PISSA_NITER = 16
TASK_TYPE = "CAUSAL_LM"


@dataclass(frozen=True)
class MethodSpec:
    """One registry entry: what a method name means."""

    name: str
    kind: Literal["peft", "freeze", "full"]
    description: str
    config: Callable[[FinetuneParams, nn.Module], Any] | None = None  # -> peft config
    optimizer: Literal["adamw", "loraplus"] = "adamw"


@dataclass
class Prepared:
    """A model ready to train with one method, its parameter counts and its optimizer factory."""

    model: nn.Module
    method: str
    trainable_params: int
    total_params: int
    make_optimizer: Callable[[float, float], torch.optim.Optimizer]
    quant: str = "none"
    notes: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)  # resolved settings, for the record


class MergeCheck(NamedTuple):
    """Result of ``merge_check``: the max abs logit difference, or None and why."""

    max_abs_diff: float | None
    reason: str | None = None


# ---------------------------------------------------------------- peft configs
def _targets(params: FinetuneParams) -> str | list[str]:
    tm = params.target_modules
    return list(tm) if isinstance(tm, list) else tm


def _lora(params: FinetuneParams, **extra: Any) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=params.rank, lora_alpha=params.alpha, lora_dropout=params.dropout,
                      target_modules=_targets(params), bias="none", task_type=TASK_TYPE, **extra)


def _max_linear_dim(model: nn.Module) -> int:
    """Largest in/out dimension of the linear layers an adapter may target (LM head excluded)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    dims = [max(m.in_features, m.out_features) for m in model.modules()
            if isinstance(m, nn.Linear) and m is not head]
    return max(dims, default=0)


def pissa_init_name(model: nn.Module) -> str:
    """Exact SVD for small weights, peft's fast SVD (``pissa_niter_16``) for large ones."""
    if _max_linear_dim(model) <= PISSA_EXACT_MAX_DIM:
        return "pissa"
    return f"pissa_niter_{PISSA_NITER}"


REGISTRY: dict[str, MethodSpec] = {
    "lora": MethodSpec("lora", "peft", "LoRA: low-rank A,B on frozen weights, scale alpha/r",
                       lambda p, m: _lora(p)),
    "lora_plus": MethodSpec("lora_plus", "peft",
                            "LoRA+: LoRA with B learning rate = ratio x A learning rate",
                            lambda p, m: _lora(p), optimizer="loraplus"),
    "rslora": MethodSpec("rslora", "peft", "rank-stabilised LoRA: scale alpha/sqrt(r)",
                         lambda p, m: _lora(p, use_rslora=True)),
    "dora": MethodSpec("dora", "peft", "DoRA: LoRA direction + trained magnitude vector",
                       lambda p, m: _lora(p, use_dora=True)),
    "pissa": MethodSpec("pissa", "peft",
                        "PiSSA: A,B from the top-r singular vectors, base keeps the residual",
                        lambda p, m: _lora(p, init_lora_weights=pissa_init_name(m))),
    "freeze": MethodSpec("freeze", "freeze",
                         "train only the last k blocks and the LM head (or output layers)"),
    "full": MethodSpec("full", "full", "train every parameter"),
}
assert set(REGISTRY) <= set(catalog.FINETUNE_METHODS), "a registry method is not in the catalog"


def _peft_config_classes() -> dict[str, type]:
    from peft import PEFT_TYPE_TO_CONFIG_MAPPING

    return {str(getattr(k, "value", k)).lower(): v for k, v in PEFT_TYPE_TO_CONFIG_MAPPING.items()}


def known_methods() -> list[str]:
    """The paper's methods plus every peft method name this peft installation knows."""
    return list(catalog.FINETUNE_METHODS) + sorted(set(_peft_config_classes()) - {"lora"})


def _unknown(method: str) -> ValueError:
    extra = ""
    if method in catalog.PEFT_NAMED:
        extra = f" (catalog.PEFT_NAMED lists it, but peft {_peft_version()} does not provide it)"
    return ValueError(f"unknown fine-tuning method {method!r}{extra}; known: "
                      f"{', '.join(known_methods())}")


def _peft_version() -> str:
    import peft

    return peft.__version__


# peft methods whose ``r`` field is not an adapter rank (OFT: number of orthogonal blocks, and
# setting it clashes with the default oft_block_size); rank is left to peft's defaults for them
_R_IS_NOT_A_RANK = frozenset({"oft"})


def _generic_config(method: str, params: FinetuneParams, notes: list[str],
                    options: dict[str, Any] | None = None) -> Any:
    """Build any other peft method's config from our shared knobs, by its own field names.

    rank -> ``r``; alpha -> ``lora_alpha``/``alpha``/``<method>_alpha``; dropout ->
    ``lora_dropout``/``<method>_dropout``/``dropout`` (LyCORIS' rank/module dropout mean something
    else and are left at peft's defaults). What could not be mapped is written to ``notes``.
    """
    cls = _peft_config_classes().get(method)
    if cls is None:
        raise _unknown(method)
    fields = {f.name for f in dataclasses.fields(cls)}
    kw: dict[str, Any] = {"task_type": TASK_TYPE}
    if "target_modules" in fields and method != "ln_tuning":  # ln_tuning targets norm layers
        kw["target_modules"] = _targets(params)
    if "total_step" in fields:  # AdaLoRA: the rank goes to init_r below (it ignores r)
        pass
    elif "r" in fields and method not in _R_IS_NOT_A_RANK:
        kw["r"] = params.rank
    else:
        notes.append(f"{method}: has no rank field; rank={params.rank} ignored")
    alpha = next((f for f in ("lora_alpha", "alpha", f"{method}_alpha") if f in fields), None)
    if alpha:
        kw[alpha] = params.alpha
    else:
        notes.append(f"{method}: has no alpha field; alpha={params.alpha} ignored")
    drop = next((f for f in ("lora_dropout", f"{method}_dropout", "dropout") if f in fields), None)
    if drop:
        kw[drop] = params.dropout
    elif params.dropout:
        notes.append(f"{method}: has no input-dropout field; dropout={params.dropout} ignored")
    if "total_step" in fields:  # AdaLoRA: layers start at init_r (it ignores r) and prune
        kw["total_step"] = params.train.steps  # towards target_r; train() calls its allocator
        kw["init_r"] = params.rank
        kw["target_r"] = max(1, params.rank // 2)
        notes.append(f"{method}: init_r={params.rank} -> target_r={kw['target_r']} over "
                     f"total_step={params.train.steps} (update_and_allocate every step)")
    return cls(**{**kw, **(options or {})})  # peft's own __post_init__ checks the options


def method_spec(method: str) -> MethodSpec:
    """The registry entry for ``method``; other peft methods get a generic one; unknown -> error."""
    if method in REGISTRY:
        return REGISTRY[method]
    entry = catalog.FINETUNE_METHODS.get(method)
    if entry is not None and entry.peft_type:  # a catalog method built on a peft tuner
        return MethodSpec(method, "peft", entry.label,
                          lambda p, m: _generic_config(entry.peft_type, p, [],
                                                       dict(entry.options)))
    if method not in _peft_config_classes():
        raise _unknown(method)
    return MethodSpec(method, "peft", f"peft {method} with peft's defaults for other knobs")


# ---------------------------------------------------------------- helpers
def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The transformer/SSM block list: the ``nn.ModuleList`` holding the most parameters.

    Works for Llama (``model.layers``), GPT-NeoX (``gpt_neox.layers``), DeepseekV3, Mamba
    (``backbone.layers``) and our decoders without per-family names; expert lists inside MoE
    blocks are smaller than the block list that contains them.
    """
    best: tuple[tuple[int, int], str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            key = (sum(p.numel() for p in mod.parameters()), len(mod))
            if best is None or key > best[0]:
                best = (key, name, mod)
    if best is None:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of blocks to freeze around")
    return best[1], best[2]


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _float_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _optimizer_factory(model: nn.Module, spec: MethodSpec,
                       params: FinetuneParams) -> Callable[[float, float], torch.optim.Optimizer]:
    device = _device_of(model)

    def make_optimizer(lr: float, weight_decay: float) -> torch.optim.Optimizer:
        """:func:`~effllm_helpers.train.adamw` with the fine-tuning betas; LoRA+ groups (peft's
        builder, torch's default betas, the same 0.999) for lora_plus."""
        if spec.optimizer == "loraplus":
            from peft.optimizers import create_loraplus_optimizer

            kw: dict[str, Any] = fused_kw(device)
            # peft sets every group's weight_decay from loraplus_weight_decay (default 0.0), so a
            # plain weight_decay kwarg would be silently overridden
            return create_loraplus_optimizer(model, torch.optim.AdamW, lr=lr,
                                             loraplus_lr_ratio=params.lora_plus_ratio,
                                             loraplus_weight_decay=weight_decay, **kw)
        return adamw(model, lr, weight_decay, device, betas=FINETUNE_BETAS)

    return make_optimizer


def _attach_quantized(model: nn.Module, peft_config: Any, spec: MethodSpec, params: FinetuneParams,
                      double_quant: bool, notes: list[str]) -> nn.Module:
    """QLoRA: 4-bit bnb base + adapter; PiSSA is factored in float, its residual then quantised."""
    from peft import (
        get_peft_model,
        get_peft_model_state_dict,
        prepare_model_for_kbit_training,
        set_peft_model_state_dict,
    )

    device = as_device(_device_of(model))
    reason = probe_bnb("bnb4", str(device), backward=True)
    if reason:
        raise UnsupportedTechnique(f"QLoRA ({params.quant}) on {device}: {reason}")
    # the 4-bit matmuls run in the training dtype (QLoRA's bf16 on a GPU), not the fp32 of the
    # master weights, which would make bnb pick its fp32 kernels
    compute = (torch.bfloat16 if device.type == "cuda" and params.train.dtype in ("bf16", "auto")
               else _float_dtype(model))
    qc = bnb4_config(params.quant, compute, double_quant)
    adapter_state = None
    if spec.name == "pissa":
        # peft refuses PiSSA on a quantised weight; the PiSSA recipe (QPiSSA) is to factor the
        # float weight, then quantise the residual that stays in the base
        fp = get_peft_model(model, peft_config)
        adapter_state = get_peft_model_state_dict(fp)
        model = fp.unload()
        peft_config = dataclasses.replace(peft_config, init_lora_weights=True)
        notes.append("QPiSSA: PiSSA factors computed in float, the residual base quantised after")
    base = quantize_in_memory(model, qc, device, dtype=compute)
    base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    notes.append(f"QLoRA base: bitsandbytes 4-bit {params.quant}, double_quant={double_quant}, "
                 f"compute {str(compute).removeprefix('torch.')}; prepare_model_for_kbit_training "
                 "upcast the non-4-bit half-precision params to fp32; no gradient checkpointing")
    if device.type == "cpu":
        _keep_bnb_cpu_layout(base, notes)
    # some peft tuners (LoHa, LoKr, FourierFT, ...) have no bnb layer and read the packed uint8
    # weight's shape, failing while the adapter is built or at the first forward; a tiny forward
    # finds that here instead of in the middle of a run
    try:
        pm = get_peft_model(base, peft_config)
        if adapter_state is not None:
            set_peft_model_state_dict(pm, adapter_state)
        with torch.no_grad():
            pm(input_ids=torch.zeros(1, 2, dtype=torch.long, device=device))
    except (RuntimeError, TypeError) as exc:  # peft's own config ValueErrors pass through
        raise UnsupportedTechnique(f"peft {spec.name} cannot run on a bitsandbytes 4-bit base: "
                                   f"{type(exc).__name__}: {str(exc)[:200]}") from exc
    return pm


def _keep_bnb_cpu_layout(model: nn.Module, notes: list[str]) -> None:
    """Stop bnb's CPU eval-time repacking of 4-bit weights under a trainable adapter.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 ``Linear4bit.forward`` permanently rewrites its
    weight into a CPU-only layout the first time it runs in eval mode without grad (as an
    evaluation pass does). peft's merge then dequantises that layout as if it were the standard
    one (garbage weights), and later training forwards take the inference-only kernel. Turning the
    module's ``support_avx512bf16_for_cpu`` flag off keeps the standard layout.
    """
    n = 0
    for mod in model.modules():
        if getattr(mod, "support_avx512bf16_for_cpu", False):
            mod.support_avx512bf16_for_cpu = False
            n += 1
    if n:
        notes.append(f"bitsandbytes CPU 4-bit repacking disabled on {n} layers (keeps the standard "
                     "layout so evaluation, merging and training stay correct)")


# ---------------------------------------------------------------- the door
# default learning rate per method, from the method's own paper or the recipe it was published
# with (AdamW, adapter-scale updates vs whole-weight updates). Used when the params set neither
# ``lr_by_method[method]`` nor ``train.lr``. (rate, source)
METHOD_LR: dict[str, tuple[float, str]] = {
    "lora": (2e-4, "QLoRA (Dettmers et al. 2023) LoRA adapters, lr 2e-4"),
    "rslora": (2e-4, "rsLoRA (Kalajdzievski 2023) keeps LoRA's recipe, lr 2e-4"),
    "pissa": (2e-4, "LoRA's 2e-4 (PiSSA, Meng et al. 2024, compares at LoRA's settings)"),
    "lora_plus": (2e-4, "LoRA+ (Hayou et al. 2024): base lr 2e-4 on A, B at lora_plus_ratio x"),
    "dora": (1e-4, "DoRA (Liu et al. 2024) commonsense recipe, lr 1e-4 (half of LoRA's)"),
    "full": (2e-5, "full fine-tuning recipe of Alpaca (Taori et al. 2023), lr 2e-5"),
    "freeze": (5e-5, "partial (last-layers) fine-tuning: full-FT scale, upper end 5e-5"),
}
ADAPTER_LR = (2e-4, "no method-specific default: LoRA's 2e-4 (QLoRA, Dettmers et al. 2023)")


def method_lr(params: FinetuneParams) -> tuple[float, str]:
    """The learning rate this run uses and where it comes from.

    Order, first set wins: ``lr_by_method[method]`` (explicit for this method), ``train.lr``
    (explicit for every method), the method's literature default (:data:`METHOD_LR`). Why per
    method: one rate cannot suit both whole-weight updates (full FT diverges at adapter rates)
    and low-rank adapters (which barely move at full-FT rates).
    """
    if params.method in params.lr_by_method:
        return float(params.lr_by_method[params.method]), "params: lr_by_method"
    if params.train.lr is not None:
        return float(params.train.lr), "params: train.lr"
    lr, source = METHOD_LR.get(params.method, ADAPTER_LR)
    return lr, f"method default: {source}"


def prepare(model: nn.Module, params: FinetuneParams, *, double_quant: bool = True,
            task_type: str | None = TASK_TYPE, output_layers: Sequence[str] = ()) -> Prepared:
    """Set ``model`` up for ``params.method`` (and ``params.quant``); return a ``Prepared``.

    The one door for every model type: a causal LM (the default ``task_type``) or, with
    ``task_type=None``, any module (a ViT, a DiT), which peft then wraps as a plain
    ``PeftModel`` whose forward passes straight through. ``output_layers``: names of the layers
    after the blocks that ``freeze`` trains with the last blocks, for a model without an LM head.

    peft methods wrap the model (the base is modified in place: adapter layers injected, and PiSSA
    rewrites base weights to their residual); freeze/full only flip ``requires_grad``. With
    ``quant`` != none the base is reloaded in 4-bit (a new object) before the adapter is attached.
    Raises ``ValueError`` for unknown methods or quant with freeze/full, ``UnsupportedTechnique``
    when this machine cannot run 4-bit bitsandbytes or the peft method cannot sit on it.
    """
    from peft import PeftModel, get_peft_model

    if isinstance(model, PeftModel):
        raise ValueError("model already carries a peft adapter; pass the base model")
    spec = method_spec(params.method)
    notes: list[str] = [spec.description]
    resolved: dict[str, Any] = {"method": spec.name, "kind": spec.kind, "quant": params.quant}
    resolved["lr"], resolved["lr_source"] = method_lr(params)

    if spec.kind in ("freeze", "full"):
        if params.quant != "none":
            raise ValueError(f"quant={params.quant!r} (QLoRA) needs an adapter method; "
                             f"{spec.name!r} trains base weights, which cannot be 4-bit")
        if spec.kind == "full":
            for p in model.parameters():
                p.requires_grad_(True)
        else:
            _freeze_all_but_last(model, params.freeze_last_k, notes, resolved, output_layers)
    else:
        if spec.config is not None:
            peft_config = spec.config(params, model)  # type: ignore[misc]
        else:
            peft_config = _generic_config(spec.name, params, notes)
        peft_config.task_type = task_type
        if params.quant != "none":
            model = _attach_quantized(model, peft_config, spec, params, double_quant, notes)
        else:
            model = get_peft_model(model, peft_config)
        resolved["peft_config"] = {k: (sorted(v) if isinstance(v, set) else v)
                                   for k, v in peft_config.to_dict().items()
                                   if isinstance(v, (str, int, float, bool, list, set, type(None)))}
        if spec.name == "pissa":
            notes.append(f"PiSSA init {peft_config.init_lora_weights!r}: the base weights now hold "
                         "the residual, so the saved adapter only works on this residual base")
        if spec.optimizer == "loraplus":
            resolved["lora_plus_ratio"] = params.lora_plus_ratio

    counts = count_params(model)
    trainable, total = counts["trainable"], counts["total"]
    if trainable == 0:
        raise ValueError(f"method {spec.name!r} left no trainable parameters "
                         f"(target_modules={params.target_modules!r})")
    return Prepared(model=model, method=spec.name, trainable_params=trainable, total_params=total,
                    make_optimizer=_optimizer_factory(model, spec, params), quant=params.quant,
                    notes=notes, config=resolved)


def _freeze_all_but_last(model: nn.Module, k: int, notes: list[str], resolved: dict[str, Any],
                         output_layers: Sequence[str] = ()) -> None:
    """Freeze everything, then unfreeze the last ``k`` blocks and the LM head (or, for a model
    without one, the layers named in ``output_layers``)."""
    name, blocks = find_blocks(model)
    if k > len(blocks):
        raise ValueError(f"freeze_last_k={k} exceeds the {len(blocks)} blocks in {name!r}")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    heads = [head] if head is not None else [
        m for n, m in model.named_modules() if n.split(".")[-1] in output_layers]
    if not heads:
        raise ValueError(f"{type(model).__name__} exposes no output embeddings (LM head) and "
                         f"no output layer named {list(output_layers)}")
    for p in model.parameters():
        p.requires_grad_(False)
    for block in list(blocks)[-k:]:
        for p in block.parameters():
            p.requires_grad_(True)
    for p in (q for h in heads for q in h.parameters()):
        p.requires_grad_(True)
    if head is None:
        resolved["output_layers"] = sorted({n for n, m in model.named_modules() if m in heads})
    inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if inp is not None and getattr(inp, "weight", None) is getattr(head, "weight", object()):
        notes.append("LM head is tied to the input embeddings: training it trains them too")
    resolved.update(blocks=name, n_blocks=len(blocks), trained_blocks=k)


# ---------------------------------------------------------------- after training
def _weight_files(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*")
               if f.is_file() and f.suffix in (".safetensors", ".bin", ".pt"))


def adapter_size_bytes(prepared: Prepared, tmp_dir: str | Path) -> int:
    """On-disk bytes of what the method must ship: the peft adapter, or the trained weights.

    Real file sizes of ``save_pretrained`` (peft) or a safetensors file of the trainable tensors
    (freeze/full); the small JSON config is not counted.
    """
    from peft import PeftModel

    out = Path(tmp_dir) / f"adapter_{prepared.method}"
    out.mkdir(parents=True, exist_ok=True)
    model = prepared.model
    if isinstance(model, PeftModel):
        model.save_pretrained(str(out))
    else:
        from safetensors.torch import save_file

        tensors = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters()
                   if p.requires_grad}
        save_file(tensors, str(out / "trainable.safetensors"))
    return _weight_files(out)


def merge_check(prepared: Prepared, input_ids: torch.Tensor) -> MergeCheck:
    """Max abs logit difference between the adapter model and a ``merge_and_unload()`` copy.

    Runs in eval mode (dropout off) on a deep copy, so ``prepared.model`` is untouched. Methods
    without an adapter or whose peft tuner cannot merge give ``MergeCheck(None, reason)``.
    """
    from peft import PeftModel

    model = prepared.model
    if not isinstance(model, PeftModel):
        return MergeCheck(None, f"{prepared.method} trains base weights: nothing to merge")
    was_training = model.training
    model.eval()
    try:
        ids = input_ids.to(_device_of(model))
        with torch.no_grad():
            ref = model(input_ids=ids).logits.float()
            try:
                merged = copy.deepcopy(model).merge_and_unload()
            except (AttributeError, NotImplementedError, ValueError, TypeError,
                    RuntimeError) as exc:  # RuntimeError: e.g. FourierFT adding into 4-bit data
                return MergeCheck(None, f"peft {prepared.method} cannot merge: "
                                        f"{type(exc).__name__}: {str(exc)[:200]}")
            merged.eval()
            out = merged(input_ids=ids).logits.float()
        return MergeCheck(float((out - ref).abs().max().item()))
    finally:
        model.train(was_training)


__all__ = ["REGISTRY", "MergeCheck", "MethodSpec", "Prepared", "UnsupportedTechnique",
           "adapter_size_bytes", "find_blocks", "known_methods", "merge_check",
           "method_spec", "pissa_init_name", "prepare"]
