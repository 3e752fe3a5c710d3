"""Inference precision registry: float casts, bitsandbytes int8 / int4 and torchao quantisation.

The inference axis compares one model at several precisions, so every precision goes through the
same door (``load_for_inference``) and reports the same facts: the model, the *real* bytes its
weights occupy (packed 4-bit storage and quantisation constants included, not a nominal bit ratio;
the MCR of ``measure/compression.py``), and notes on anything that makes timings unrepresentative.
A precision this machine cannot run raises ``UnsupportedTechnique`` with the reason
``check_supported`` found, which the notebook records as a skip rather than a failure.

bitsandbytes quantises at load time (``from_pretrained(..., quantization_config=...)``); an
in-memory model is quantised by saving it to a temporary directory and loading it back, which works
for any ``PreTrainedModel`` subclass, our registered custom decoders included.

torchao precisions (``int8-wo``, ``int4-wo``, ``fp8-e4m3``) are what practitioners reach for when
decode speed matters: they swap each linear's weight for a tensor subclass whose matmul dispatches
to a quantised kernel (tinygemm int4, ``torch._scaled_mm`` float8), applied in memory with
``torchao.quantization.quantize_``. Which kernel really ran is recorded per linear
(``Loaded.kernels``), since torchao leaves a weight unquantised when its shape does not fit.
"""

from __future__ import annotations

import copy
import functools
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from effllm_helpers import catalog
from effllm_helpers.config import InferenceParams
from effllm_helpers.errors import UnsupportedTechnique
from effllm_helpers.libnoise import import_bitsandbytes
from effllm_helpers.libnoise import install as install_libnoise
from effllm_helpers.techniques import gemlite_int4
from effllm_helpers.techniques.probe import probe_input, reference_linear, relative_error

DTYPES: dict[str, torch.dtype] = {k: getattr(torch, v) for k, v in catalog.DTYPES.items()}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class PrecisionSpec:
    """One registry entry: how a precision name is realised."""

    name: str
    kind: Literal["float", "bnb8", "bnb4", "torchao", "gemlite"]
    dtype: torch.dtype | None = None  # float kinds: the cast dtype
    quant_type: str | None = None  # bnb4: 'nf4' | 'fp4'
    bits: int = 16
    description: str = ""


class _Registry(Mapping[str, PrecisionSpec]):
    """The precisions of :data:`effllm_helpers.catalog.PRECISIONS`, realised as specs when looked
    up, so a precision registered in the catalog is loadable with no edit here."""

    def __getitem__(self, name: str) -> PrecisionSpec:
        c = catalog.PRECISIONS[name]
        return PrecisionSpec(c.name, c.kind, DTYPES[c.dtype] if c.dtype else None,
                             quant_type=c.quant_type, bits=c.bits, description=c.description)

    def __iter__(self) -> Iterator[str]:
        return iter(list(catalog.PRECISIONS))

    def __len__(self) -> int:
        return len(catalog.PRECISIONS)


REGISTRY: Mapping[str, PrecisionSpec] = _Registry()


@dataclass
class Loaded:
    """A model ready for inference at one precision, with its real weight bytes.

    ``kernels`` counts the linear layers by the implementation their matmul dispatches to
    (``linear_kernels``), so a record shows what was timed, not only what was asked for.
    """

    model: nn.Module
    precision: str
    weight_bytes: int
    notes: list[str] = field(default_factory=list)
    kernels: dict[str, int] = field(default_factory=dict)
    # models/fused.py's record (q/k/v and gate/up as one matmul each; why not, where not)
    fusion: dict[str, Any] | None = None


# ---------------------------------------------------------------- devices and support
def as_device(device: str | torch.device) -> torch.device:
    """Normalise a device; a bare ``cuda`` becomes the current CUDA index (bnb needs an index)."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None and torch.cuda.is_available():
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_half_note(dtype: torch.dtype) -> str | None:
    """Why CPU timings at half precision may mislead (no native instructions), or None."""
    flags = _cpu_flags()
    if dtype == torch.float16 and not flags & {"avx512_fp16", "amx_fp16"}:
        return ("fp16 on this CPU has no native fp16 matmul (no avx512_fp16/amx_fp16): torch "
                "converts, so fp16 timings here are slow and not representative")
    if dtype == torch.bfloat16 and not flags & {"avx512_bf16", "amx_bf16"}:
        return ("bf16 on this CPU has no native bf16 matmul (no avx512_bf16/amx_bf16): timings "
                "here are not representative")
    return None


def _bf16_on_cuda(dev: torch.device) -> bool:
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # older torch without the keyword
        return bool(torch.cuda.is_bf16_supported())


@functools.lru_cache(maxsize=32)
def _probe_float(dtype_name: str, device: str) -> str | None:
    dtype = DTYPES[dtype_name]
    try:
        a = torch.ones(8, 8, dtype=dtype, device=device)
        out = a @ a
        if not bool(torch.isfinite(out.float()).all()):
            return f"{dtype_name} matmul on {device} produced non-finite values"
    except Exception as exc:  # the probe's whole point is to turn any failure into a reason
        return f"{dtype_name} matmul is not supported on {device}: {type(exc).__name__}: {exc}"
    return None


@functools.lru_cache(maxsize=32)
def probe_bnb(kind: Literal["bnb8", "bnb4"], device: str, backward: bool = False) -> str | None:
    """Run a tiny bitsandbytes layer on ``device``; return why it cannot run, or None.

    Probing beats version tables: bnb's multi-backend builds (CPU, CUDA, XPU...) differ in which
    kernels exist, and only running one tells. ``backward`` also checks QLoRA's gradient path.
    """
    try:
        bnb = import_bitsandbytes()  # its CPU backend's Hub kernel fetch stays offline
    except Exception as exc:  # ImportError or a broken native library
        return f"bitsandbytes cannot be imported: {type(exc).__name__}: {exc}"
    try:
        # layers are built on CPU inside fork_rng: a probe must not shift the caller's random
        # stream (it runs once per process, so it would make seeded runs order-dependent)
        ref = reference_linear(64, 64)
        with torch.random.fork_rng(devices=[]):
            if kind == "bnb8":
                layer = bnb.nn.Linear8bitLt(64, 64, bias=False, has_fp16_weights=False)
            else:
                layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32,
                                          quant_type="nf4")
        layer.load_state_dict(ref.state_dict())
        layer = layer.to(device)
        x = probe_input(2, 64, device).requires_grad_(backward)
        y = layer(x)
        if not bool(torch.isfinite(y.float()).all()):
            return f"bitsandbytes {kind} layer on {device} produced non-finite output"
        err = (y.float() - ref.to(device)(x).float()).abs().max().item()
        if err > 1.0:
            return f"bitsandbytes {kind} layer on {device} is wrong (max error {err:.3g})"
        if backward:
            y.float().sum().backward()
            if x.grad is None or not bool(torch.isfinite(x.grad).all()):
                return f"bitsandbytes {kind} backward on {device} gave no finite input gradient"
    except Exception as exc:
        ver = getattr(bnb, "__version__", "?")
        return (f"bitsandbytes {ver} cannot run {kind} on {device}: "
                f"{type(exc).__name__}: {str(exc)[:300]}")
    return None


# ---------------------------------------------------------------- torchao
# Why a torchao precision cannot run off its hardware, prefixed to the probe's own error.
TORCHAO_HINTS: dict[str, str] = {
    "int4-wo": ("torchao's int4 weight-only kernels are CUDA-only (tile_packed_to_4d runs "
                "tinygemm _weight_int4pack_mm on sm80+; plain/preshuffled need the mslk CUDA "
                "package); there is no CPU int4 packing in this torchao"),
    "fp8-e4m3": ("float8 e4m3 matmuls (torch._scaled_mm with dynamic activation scales) need CUDA "
                 "compute capability >= 8.9 (Ada, Hopper or later) or MI300"),
}
TORCHAO_MIN_CAPABILITY: dict[str, tuple[int, int]] = {"int4-wo": (8, 0), "fp8-e4m3": (8, 9)}


def import_torchao() -> Any:
    """Import torchao: on a CPU torch it warns once per CUDA extension (``_C_cutlass_90a``,
    ``_C_mxfp8``) it cannot load, which none of our precisions use; ``libnoise`` says that once,
    with its meaning, and lets any other torchao message through."""
    install_libnoise()
    import torchao
    import torchao.quantization  # noqa: F401 - the configs and quantize_

    return torchao


def torchao_config(precision: str, group_size: int = 128) -> Any:
    """The torchao config object for a torchao precision.

    ``set_inductor_config=False``: torchao would otherwise change process-wide inductor settings,
    which would leak into every later run of the same sweep process.
    """
    import_torchao()
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Int4WeightOnlyConfig,
        Int8WeightOnlyConfig,
        PerRow,
    )

    if precision == "int8-wo":
        return Int8WeightOnlyConfig(granularity=PerRow(), set_inductor_config=False)
    if precision == "int4-wo":
        # tinygemm's packing needs no extra package (plain int4 would need mslk)
        return Int4WeightOnlyConfig(group_size=group_size, int4_packing_format="tile_packed_to_4d",
                                    set_inductor_config=False)
    if precision == "fp8-e4m3":
        return Float8DynamicActivationFloat8WeightConfig(
            activation_dtype=torch.float8_e4m3fn, weight_dtype=torch.float8_e4m3fn,
            granularity=PerRow(), set_inductor_config=False)
    raise ValueError(f"{precision!r} is not a torchao precision")


def int4_group_size(in_features: Iterable[int]) -> int:
    """The int4 group size (128, 64 or 32) that fits the most input widths, the largest on ties.

    torchao leaves a weight whose input width the group size does not divide unquantised.
    """
    dims = list(in_features)
    return max(gemlite_int4.GROUP_SIZES, key=lambda g: (sum(d % g == 0 for d in dims), g))


@functools.lru_cache(maxsize=32)
def probe_torchao(precision: str, device: str) -> str | None:
    """Quantise and run one small bf16 linear with torchao on ``device``; why it fails, or None.

    As with bitsandbytes, running beats version tables; the probe also catches torchao silently
    leaving the weight unquantised (it does so when no kernel fits a shape).
    """
    try:
        torchao = import_torchao()
        from torchao.quantization import quantize_
    except Exception as exc:  # ImportError, or a torchao built for another torch
        return f"torchao cannot be imported: {type(exc).__name__}: {str(exc)[:300]}"
    dev = torch.device(device)
    hint = TORCHAO_HINTS.get(precision)
    need = TORCHAO_MIN_CAPABILITY.get(precision)
    if dev.type == "cuda" and need is not None:
        cap = tuple(torch.cuda.get_device_capability(dev))
        if cap < need:
            return (f"{torch.cuda.get_device_name(dev)} has compute capability "
                    f"{cap[0]}.{cap[1]} < {need[0]}.{need[1]}: {hint}")
    ver = getattr(torchao, "__version__", "?")
    try:
        ref = reference_linear(256, 64).to(device=dev, dtype=torch.bfloat16)
        layer = copy.deepcopy(ref)
        quantize_(layer, torchao_config(precision, group_size=128))
        if not is_traceable_wrapper_subclass(layer.weight):
            raise RuntimeError("the weight was left unquantised")
        x = probe_input(2, 256, dev, torch.bfloat16)
        with torch.no_grad():
            y, r = layer(x).float(), ref(x).float()
        if not bool(torch.isfinite(y).all()):
            raise RuntimeError("non-finite output")
        rel = relative_error(y, r)
        if rel > 0.2:
            raise RuntimeError(f"wrong output (relative error {rel:.3g})")
    except Exception as exc:  # the probe's whole point is to turn any failure into a reason
        msg = (f"torchao {ver} cannot run {precision} on {dev}: {type(exc).__name__}: "
               f"{str(exc)[:300]}")
        return f"{hint}; {msg}" if hint else msg
    return None


def torchao_quantize(model: nn.Module, precision: str) -> tuple[nn.Module, list[str]]:
    """Quantise ``model``'s linears in place with torchao; returns it and notes on what was done.

    The LM head (output embeddings) stays in the model's dtype, as transformers does for
    bitsandbytes, so the two families quantise the same layers (and a tied head stays tied).
    """
    import_torchao()
    from torchao.quantization import quantize_

    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None

    def keep(module: nn.Module, fqn: str) -> bool:
        return isinstance(module, nn.Linear) and module is not head

    dims = [m.in_features for n, m in model.named_modules() if keep(m, n)]
    notes = ["LM head (output embeddings) not quantised, as with bitsandbytes"]
    group = 128
    if precision == "int4-wo":
        group = int4_group_size(dims)
        notes.append(f"int4 group size {group}; tinygemm pads each weight's input width to a "
                     "multiple of 1024 and its output width to 8 (padding counted in weight_bytes)")
    quantize_(model, torchao_config(precision, group_size=group), filter_fn=keep)
    if precision == "int8-wo":
        notes.append("int8 weight-only in eager mode casts the int8 weight to the activation "
                     "dtype at every matmul; it gains speed only when compiled (static_cache)")
    if precision == "fp8-e4m3":
        from torchao.utils import _is_mslk_available

        notes.append("float8 rowwise matmul: " + ("mslk kernels (installed)" if
                                                  _is_mslk_available() else
                                                  "torch._scaled_mm (mslk not installed)"))
    return model, notes


def linear_kernel(module: nn.Linear) -> str:
    """A name for the implementation a linear layer's matmul dispatches to."""
    cls, w = type(module), module.weight
    if cls.__module__.split(".")[0] == "bitsandbytes":
        qt = getattr(w, "quant_type", None)
        return f"bitsandbytes.{cls.__name__}" + (f"({qt})" if isinstance(qt, str) else "")
    if is_traceable_wrapper_subclass(w):  # torchao & co: the weight's class picks the kernel
        return f"{type(w).__module__.split('.')[0]}.{type(w).__name__}"
    owner = "torch.nn.Linear" if cls is nn.Linear else f"{cls.__module__}.{cls.__name__}"
    return f"{owner}({DTYPE_NAMES.get(w.dtype, str(w.dtype).removeprefix('torch.'))})"


def linear_kernels(model: nn.Module) -> dict[str, int]:
    """How many linear layers run on each implementation (quantised or not), sorted by name."""
    counts: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, nn.Linear) or gemlite_int4.is_gemlite(module):
            name = (gemlite_int4.kernel_name(module) if gemlite_int4.is_gemlite(module)
                    else linear_kernel(module))
            counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def check_supported(precision: str, device: str | torch.device) -> str | None:
    """None if ``precision`` can run on ``device`` here, else a one-line reason (a skip)."""
    if precision not in REGISTRY:
        raise ValueError(f"unknown precision {precision!r}; allowed: {', '.join(REGISTRY)}")
    spec = REGISTRY[precision]
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        return "CUDA requested but torch.cuda.is_available() is False"
    dev = as_device(dev)
    if spec.kind == "float":
        if dev.type == "cuda" and spec.dtype == torch.bfloat16 and not _bf16_on_cuda(dev):
            name = torch.cuda.get_device_name(dev)
            return f"bf16 is not natively supported on {name} (torch.cuda.is_bf16_supported)"
        return _probe_float(precision, str(dev))
    if spec.kind == "torchao":
        return probe_torchao(precision, str(dev))
    if spec.kind == "gemlite":
        return gemlite_int4.probe_gemlite(str(dev))
    return probe_bnb(spec.kind, str(dev))


# ---------------------------------------------------------------- sizes
def weight_bytes(model: nn.Module) -> int:
    """Real storage bytes of the weights (one implementation: ``measure.compression``).

    On AVX512-BF16 CPUs bnb 0.50 repacks 4-bit weights at the first eval forward (absmax to
    bf16, double quantisation undone), so a count right after loading differs from one taken
    after inference there; ``load_for_inference`` counts at load.
    """
    from effllm_helpers.measure.compression import weight_bytes as storage_bytes

    return storage_bytes(model)["total"]


# ---------------------------------------------------------------- quantisation
def bnb_config(precision: str, double_quant: bool = False, compute_dtype: str = "bf16") -> Any:
    """The ``BitsAndBytesConfig`` for an int8/int4 precision (None for float precisions)."""
    from transformers import BitsAndBytesConfig

    spec = REGISTRY[precision]
    if spec.kind == "bnb8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if spec.kind == "bnb4":
        return bnb4_config(spec.quant_type or "nf4", DTYPES[compute_dtype], double_quant)
    return None


def bnb4_config(quant_type: str, compute: torch.dtype, double_quant: bool = False) -> Any:
    """The one bitsandbytes 4-bit config (int4 inference and the QLoRA base alike)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                              bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=compute)


def is_quantized(model: nn.Module) -> bool:
    """Whether a model was quantised by bitsandbytes or torchao (so it must not be cast or
    re-quantised)."""
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        return True
    if any(gemlite_int4.is_gemlite(m) for m in model.modules()):
        return True
    return any(is_traceable_wrapper_subclass(p) for p in model.parameters())


def quantize_in_memory(model: nn.Module, quantization_config: Any, device: str | torch.device,
                       dtype: torch.dtype | None = None) -> nn.Module:
    """Quantise an in-memory ``PreTrainedModel`` by a save / reload round trip; returns a new model.

    bnb quantises while loading, so the round trip is the supported path; ``type(model)`` keeps
    custom registered model classes working. ``dtype`` is the dtype of the modules bnb leaves alone
    (embeddings, norms, LM head); default: the model's current floating dtype.
    """
    if is_quantized(model):
        raise ValueError("model is already quantised; load the float weights instead")
    if not hasattr(model, "save_pretrained") or not hasattr(type(model), "from_pretrained"):
        raise TypeError(f"{type(model).__name__} is not a transformers PreTrainedModel")
    if type(model).__module__.startswith("peft"):
        raise TypeError("got a peft model: merge_and_unload() it before quantising")
    dev = as_device(device)
    if dtype is None:
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()),
                     torch.float32)
    with tempfile.TemporaryDirectory(prefix="effllm_quant_") as tmp:
        model.save_pretrained(tmp)
        return type(model).from_pretrained(tmp, quantization_config=quantization_config,
                                           device_map={"": str(dev)}, dtype=dtype)


def natural_compute_dtype(precision: str, device: str | torch.device) -> str:
    """The compute dtype used when the params leave it unset.

    LLM.int8's CUDA kernels take fp16 inputs: with bf16 activations bitsandbytes casts (and warns)
    at every matmul, which the latency would then include. Elsewhere bf16 (the 4-bit kernels
    accept it; bnb's CPU backend runs int8 with it; torchao's int4 and float8 paths need it).
    """
    if REGISTRY[precision].kind == "bnb8" and as_device(device).type == "cuda":
        return "fp16"
    return "bf16"


def load_for_inference(model_or_path: nn.Module | str | Path, params: InferenceParams,
                       device: str | torch.device) -> Loaded:
    """Load or convert a model at ``params.precision`` on ``device``.

    A path/id is loaded with ``AutoModelForCausalLM``. An in-memory model is converted *in place*
    for the float and torchao precisions (``nn.Module.to`` and ``quantize_`` mutate; pass a fresh
    model) and copied through a temporary save for bitsandbytes. Raises ``UnsupportedTechnique``
    when this machine cannot run the precision.
    """
    precision = params.precision
    spec = REGISTRY[precision]
    reason = check_supported(precision, device)
    if reason:
        raise UnsupportedTechnique(f"precision {precision} on {device}: {reason}")
    dev = as_device(device)
    notes: list[str] = [spec.description]
    fusion = _fuse_skipped(params.fuse_projections, dev)

    def fused(model: nn.Module) -> nn.Module:
        """Fuse the projections before any quantisation, when the params ask for it."""
        nonlocal fusion
        fusion = _fuse(model, params.fuse_projections, dev)
        return model

    if spec.kind == "float":
        if isinstance(model_or_path, nn.Module):
            if is_quantized(model_or_path):
                raise ValueError("cannot cast a quantised model to a float precision")
            model = model_or_path.to(device=dev, dtype=spec.dtype)
        else:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(str(model_or_path), dtype=spec.dtype)
            model = model.to(dev)
        model = fused(model)
        if dev.type == "cpu" and spec.dtype != torch.float32:
            note = cpu_half_note(spec.dtype)
            if note:
                notes.append(note)
    elif spec.kind == "gemlite":
        compute_name = params.compute_dtype or "bf16"
        if compute_name != "bf16":
            raise UnsupportedTechnique(f"precision {precision} runs bf16 activations here, not "
                                       f"compute_dtype {compute_name}")
        model = fused(_float_model(model_or_path, dev, torch.bfloat16))
        model, gl_notes = gemlite_int4.gemlite_quantize(model)
        notes.append("activations and non-quantised modules in bf16")
        notes.extend(gl_notes)
    elif spec.kind == "torchao":
        compute_name = params.compute_dtype or natural_compute_dtype(precision, dev)
        if precision != "int8-wo" and compute_name != "bf16":
            raise UnsupportedTechnique(f"precision {precision} needs bf16 weights and activations "
                                       f"(its kernels take bf16), not compute_dtype "
                                       f"{compute_name}")
        model = fused(_float_model(model_or_path, dev, DTYPES[compute_name]))
        model, ao_notes = torchao_quantize(model, precision)
        notes.append(f"activations and non-quantised modules in {compute_name}")
        notes.extend(ao_notes)
        if dev.type == "cpu":
            notes.append("torchao on CPU: timings are not representative of CUDA kernels")
            note = cpu_half_note(DTYPES[compute_name])
            if note:
                notes.append(note)
    else:
        compute_name = params.compute_dtype or natural_compute_dtype(precision, dev)
        qc = bnb_config(precision, params.double_quant, compute_name)
        compute = DTYPES[compute_name]
        if isinstance(model_or_path, nn.Module):
            model = quantize_in_memory(model_or_path, qc, dev, dtype=compute)
        else:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(str(model_or_path),
                                                         quantization_config=qc,
                                                         device_map={"": str(dev)}, dtype=compute)
        if _fusion_wanted(params.fuse_projections, dev):
            fusion = {"applied": False, "reason": "bitsandbytes layers are quantised at load: "
                                                  "not fused"}
        notes.append("non-quantised modules (embeddings, norms, LM head) in "
                     f"{compute_name}")
        if spec.kind == "bnb8":
            notes.append("LLM.int8 matmuls run in fp16 internally whatever compute_dtype says")
        else:
            notes.append(f"4-bit compute dtype {compute_name}, double_quant="
                         f"{params.double_quant}")
        if dev.type == "cpu":
            notes.append("bitsandbytes CPU backend: timings are not representative of CUDA kernels")
            if spec.kind == "bnb4" and "avx512_bf16" in _cpu_flags():
                notes.append("weight_bytes taken at load; bnb repacks 4-bit weights for this CPU "
                             "at the first eval forward (bf16 absmax, double quant undone)")
    model.eval()
    return Loaded(model=model, precision=precision, weight_bytes=weight_bytes(model), notes=notes,
                  kernels=linear_kernels(model), fusion=fusion)


def _fusion_wanted(mode: str, dev: torch.device) -> bool:
    """``fuse_projections``: on, or auto on CUDA."""
    return mode == "on" or (mode == "auto" and dev.type == "cuda")


def _fuse_skipped(mode: str, dev: torch.device) -> dict[str, Any]:
    return {"applied": False, "reason": f"fuse_projections={mode} on {dev.type}"}


def _fuse(model: nn.Module, mode: str, dev: torch.device) -> dict[str, Any]:
    """:func:`~effllm_helpers.models.fused.fuse_projections` where ``mode`` asks for it (auto:
    on CUDA); the record's ``fused_projections`` either way."""
    if not _fusion_wanted(mode, dev):
        return _fuse_skipped(mode, dev)
    from ..models.fused import fuse_projections

    return fuse_projections(model).record()


def _float_model(model_or_path: nn.Module | str | Path, dev: torch.device,
                 dtype: torch.dtype) -> nn.Module:
    """The model in ``dtype`` on ``dev``: an in-memory one is converted in place, a path loaded."""
    if isinstance(model_or_path, nn.Module):
        if is_quantized(model_or_path):
            raise ValueError("model is already quantised; load the float weights instead")
        return model_or_path.to(device=dev, dtype=dtype)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_or_path), dtype=dtype).to(dev)


__all__ = ["DTYPES", "DTYPE_NAMES", "REGISTRY", "TORCHAO_HINTS", "Loaded", "PrecisionSpec",
           "UnsupportedTechnique", "as_device", "bnb_config", "check_supported", "cpu_half_note",
           "import_torchao", "int4_group_size", "is_quantized", "linear_kernel", "linear_kernels",
           "load_for_inference", "natural_compute_dtype", "probe_bnb", "probe_torchao",
           "quantize_in_memory", "torchao_config", "torchao_quantize", "weight_bytes"]
