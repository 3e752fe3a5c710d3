"""The catalog: every attention variant, positional encoding, fine-tuning method, precision and
metric the study knows, each named once with what the rest of the code needs to know about it.

Torch-free on purpose: the params schema validates against it, and the zoo, the FLOP counter,
the precision registry, compression, the figures and the scoring read it. Adding a variant, a
method or a precision is one entry here (``register_*``); an unknown name raises everywhere,
listing the known ones, instead of silently getting a default's heads, FLOPs or bits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, TypeVar

T = TypeVar("T")

# torch dtype attribute per short dtype name (the one dtype map; torch-side code looks it up
# through torch_dtype / dtype_name)
DTYPES: dict[str, str] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def torch_dtype(name: str) -> Any:
    """The torch dtype of a short name (``bf16`` -> ``torch.bfloat16``); an unknown name raises
    with the known ones. torch is imported here, on use, so the catalog stays importable
    without it."""
    import torch

    if name not in DTYPES:
        raise KeyError(f"unknown dtype {name!r}; known: {', '.join(DTYPES)}")
    return getattr(torch, DTYPES[name])


def dtype_name(dtype: Any, default: str | None = None) -> str:
    """The short name of a torch dtype (``torch.bfloat16`` -> ``bf16``); ``default`` for one
    the catalog does not name (an error when no default is given)."""
    attr = str(dtype).removeprefix("torch.")
    for name, a in DTYPES.items():
        if a == attr:
            return name
    if default is None:
        raise KeyError(f"no short name for dtype {dtype!r}; known: {', '.join(DTYPES.values())}")
    return default


@dataclass(frozen=True)
class AttentionVariant:
    """``kv_heads``: how many K/V heads the variant keeps (all = n_heads, one = MQA, grouped =
    the size's n_kv_heads). ``flops``: which FLOP rule counts it (dense QK^T/AV, MLA's latent
    projections, NSA's sparse branches). ``builder``: which model class the zoo builds."""

    name: str
    label: str
    kv_heads: Literal["all", "one", "grouped"]
    flops: Literal["dense", "mla", "nsa"]
    builder: Literal["llama", "deepseek_v3", "effllm"]


@dataclass(frozen=True)
class PositionalEncoding:
    name: str
    label: str


@dataclass(frozen=True)
class FinetuneMethod:
    """A fine-tuning method. The paper's seven have builders in ``techniques/finetuning.py``; an
    entry with ``peft_type`` is built from that peft tuner's config class with ``options`` on top
    of the shared knobs (peft validates them). Any other peft tuner is accepted by its peft name
    without an entry."""

    name: str
    kind: Literal["peft", "freeze", "full"]
    label: str
    peft_type: str | None = None
    options: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class Precision:
    """``kind`` picks the loading route in ``techniques/precision.py``; ``dtype`` is the cast
    dtype of float kinds; ``library`` is named in figure titles (int8/int4 exist in two)."""

    name: str
    kind: Literal["float", "bnb8", "bnb4", "torchao", "gemlite"]
    bits: int
    label: str
    library: str
    description: str = ""
    dtype: str | None = None
    quant_type: str | None = None


@dataclass(frozen=True)
class Metric:
    """``higher_is_better`` orients the score; ``label``/``unit`` are what figures print."""

    name: str
    higher_is_better: bool
    label: str | None = None
    unit: str | None = None


ATTENTION: dict[str, AttentionVariant] = {}
POSITIONAL: dict[str, PositionalEncoding] = {}
FINETUNE_METHODS: dict[str, FinetuneMethod] = {}
# peft tuners this project names in its docs and studies; peft's own registry decides the rest
PEFT_NAMED: list[str] = ["loha", "lokr", "vera", "ia3", "adalora", "boft", "oft", "fourierft",
                         "ln_tuning", "hra", "vblora", "randlora", "c3a", "shira", "road", "miss"]
PRECISIONS: dict[str, Precision] = {}
# figure order of the precisions (widest first); register_precision appends
PRECISION_ORDER: list[str] = []
METRICS: dict[str, Metric] = {}
# bits of dtype names that are not precisions of the inference axis (nominal MCR accepts them)
DTYPE_BITS: dict[str, int] = {"tf32": 32, "fp8": 8, "nf4": 4, "fp4": 4, "int4": 4}


def _put(table: dict[str, T], entry: T) -> T:
    table[entry.name] = entry  # type: ignore[attr-defined]
    return entry


def register_attention(entry: AttentionVariant) -> AttentionVariant:
    return _put(ATTENTION, entry)


def register_positional(entry: PositionalEncoding) -> PositionalEncoding:
    return _put(POSITIONAL, entry)


def register_method(entry: FinetuneMethod) -> FinetuneMethod:
    return _put(FINETUNE_METHODS, entry)


def register_precision(entry: Precision, order: int | None = None) -> Precision:
    """Add a precision; ``order`` is its figure position (default: last)."""
    if entry.name in PRECISION_ORDER:
        PRECISION_ORDER.remove(entry.name)
    PRECISION_ORDER.insert(len(PRECISION_ORDER) if order is None else order, entry.name)
    return _put(PRECISIONS, entry)


def register_metric(entry: Metric) -> Metric:
    return _put(METRICS, entry)


def lookup(table: dict[str, T], name: str, what: str) -> T:
    """``table[name]``, or a ValueError naming the known entries (never a silent default)."""
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown {what} {name!r}; known: {', '.join(table)}") from None


def attention(name: str) -> AttentionVariant:
    return lookup(ATTENTION, name, "attention variant")


def precision(name: str) -> Precision:
    return lookup(PRECISIONS, name, "precision")


def bits(name: str) -> int:
    """Nominal bits per weight of a precision or dtype name."""
    if name in PRECISIONS:
        return PRECISIONS[name].bits
    if name in DTYPE_BITS:
        return DTYPE_BITS[name]
    raise KeyError(name)


def precision_label(name: str) -> str:
    return PRECISIONS[name].label if name in PRECISIONS else name


for _a in (AttentionVariant("mha", "MHA", "all", "dense", "llama"),
           AttentionVariant("mqa", "MQA", "one", "dense", "llama"),
           AttentionVariant("gqa", "GQA", "grouped", "dense", "llama"),
           AttentionVariant("mla", "MLA", "all", "mla", "deepseek_v3"),
           AttentionVariant("nsa", "NSA", "grouped", "nsa", "effllm")):
    register_attention(_a)
for _p in ("rope", "sinusoidal", "learned", "relative", "none"):
    register_positional(PositionalEncoding(_p, _p))
for _m in (FinetuneMethod("lora", "peft", "LoRA"), FinetuneMethod("lora_plus", "peft", "LoRA+"),
           FinetuneMethod("rslora", "peft", "rsLoRA"), FinetuneMethod("dora", "peft", "DoRA"),
           FinetuneMethod("pissa", "peft", "PiSSA"), FinetuneMethod("freeze", "freeze", "Freeze"),
           FinetuneMethod("full", "full", "Full")):
    register_method(_m)
for _q in (
    Precision("fp32", "float", 32, "fp32", "torch", "model.to(float32)", dtype="fp32"),
    Precision("bf16", "float", 16, "bf16", "torch", "model.to(bfloat16)", dtype="bf16"),
    Precision("fp16", "float", 16, "fp16", "torch", "model.to(float16)", dtype="fp16"),
    Precision("fp8-e4m3", "torchao", 8, "fp8 e4m3 (torchao)", "torchao",
              "torchao Float8DynamicActivationFloat8WeightConfig: e4m3 weights and dynamically "
              "quantised e4m3 activations, per-row scales, torch._scaled_mm (CUDA sm89+)"),
    Precision("int8", "bnb8", 8, "int8 (bnb LLM.int8)", "bitsandbytes",
              "bitsandbytes LLM.int8 (load_in_8bit), outliers in fp16"),
    Precision("int8-wo", "torchao", 8, "int8 weight-only (torchao)", "torchao",
              "torchao Int8WeightOnlyConfig: int8 weights with one scale per output row, matmul "
              "in the activation dtype"),
    Precision("int4-nf4", "bnb4", 4, "int4 NF4 (bnb)", "bitsandbytes",
              "bitsandbytes 4-bit NormalFloat (load_in_4bit)", quant_type="nf4"),
    Precision("int4-fp4", "bnb4", 4, "int4 FP4 (bnb)", "bitsandbytes",
              "bitsandbytes 4-bit float (load_in_4bit)", quant_type="fp4"),
    Precision("int4-wo", "torchao", 4, "int4 weight-only (torchao)", "torchao",
              "torchao Int4WeightOnlyConfig, tile_packed_to_4d: asymmetric int4 groups, tinygemm "
              "_weight_int4pack_mm (CUDA sm80+), bf16 activations"),
    Precision("int4-gemlite", "gemlite", 4, "int4 weight-only (GemLite)", "gemlite",
              "round-to-nearest asymmetric int4 groups (our quantiser) on GemLite's Triton "
              "kernels: GEMV (rev. split-K) at batch 1, GEMM for prefill; bf16 activations, CUDA"),
):
    register_precision(_q)
for _name, _hib, _label, _unit in (
    ("val_ppl", False, "PPL", "ppl"), ("ppl", False, "PPL", "ppl"),
    ("eval_loss", False, "Loss", "nats"), ("accuracy", True, "Acc", "fraction"),
    ("task_acc", True, "Task acc", "fraction"), ("probe_acc", True, "Probe acc", "fraction"),
    ("amu_gb", False, "AMU", "GB"), ("pcu", True, "PCU", "fraction"),
    ("mfu", True, "MFU", "fraction"), ("al_s", False, "AL", "s"),
    ("tt", True, "TT", "tokens/s/param"), ("st", True, "ST", "samples/s/param"),
    ("it", True, "IT", "tokens/s"), ("aec_w", False, "AEC", "W"), ("mcr", True, "MCR", "ratio"),
    ("energy_j", False, "Energy", "J"), ("j_per_token", False, "Energy/token", "J/token"),
    ("tokens_per_s", True, "Throughput", "tokens/s"), ("ttft_s", False, "TTFT", "s"),
    ("tpot_s", False, "TPOT", "s"), ("peak_gb", False, "Peak mem", "GB"),
    # memory above the baseline taken after every library is imported (model, activations,
    # cache): what a technique adds, without the interpreter, the libraries or a CUDA context
    ("amu_increment_gb", False, "AMU (model)", "GB"),
    ("peak_increment_gb", False, "Peak mem (model)", "GB"),
    ("amu_frac", False, None, "fraction"), ("size_bytes", False, None, None),
    ("duration_s", False, None, "s"), ("samples_per_s", True, None, "samples/s"),
    # the Meter's context of a measurement (how busy the machine was, what torch held): read
    # beside the metrics, never scored; lower is the quieter machine, the smaller footprint
    ("load_1m", False, None, "tasks"), ("cpu_share", False, None, "fraction"),
    ("machine_cpu_busy", False, None, "fraction"), ("torch_threads", False, None, "threads"),
    ("torch_max_allocated_gb", False, None, "GB"), ("torch_max_reserved_gb", False, None, "GB"),
    # axis 4 (cross-modal): sample quality and the sampling phase
    ("frechet_classifier_distance", False, "FD (CNN)", "frechet"),
    ("sample_class_accuracy", True, "Sample acc", "fraction"), ("val_loss", False, "Loss", "nats"),
    ("fid", False, "FID", "fid"), ("sample_images_per_s", True, "Images/s", "images/s"),
    ("sample_s_per_image", False, "s/image", "s/image"),
    ("sample_j_per_image", False, "J/image", "J/image"),
):
    register_metric(Metric(_name, _hib, _label, _unit))

# the paper's precision order in the figures (fp8 sits with the 8-bit ones)
PRECISION_ORDER[:] = ["fp32", "bf16", "fp16", "fp8-e4m3", "int8", "int8-wo", "int4-nf4",
                      "int4-fp4", "int4-wo", "int4-gemlite"]


# --------------------------------------------------------------------------- model shapes
# ``random:<shape>`` (models.sources): the published config.json values of each shape (the
# fields that set its parameter count and its kernels' shapes); the rest: the family's defaults
_QWEN = {"model_type": "qwen2", "rms_norm_eps": 1e-6, "rope_theta": 1e6,
         "max_position_embeddings": 32768, "hidden_act": "silu"}
_LLAMA = {"model_type": "llama", "rms_norm_eps": 1e-5, "rope_theta": 5e5,
          "max_position_embeddings": 131072, "hidden_act": "silu", "head_dim": 128}
_SHAPE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "vocab_size", "tie_word_embeddings")
RANDOM_SHAPES: dict[str, dict] = {
    name: family | dict(zip(_SHAPE_FIELDS, dims, strict=True)) | extra
    for name, (family, dims, extra) in {
        "qwen2.5-0.5b": (_QWEN, (896, 4864, 24, 14, 2, 151936, True), {}),
        "qwen2.5-1.5b": (_QWEN, (1536, 8960, 28, 12, 2, 151936, True), {}),
        "qwen2.5-3b": (_QWEN, (2048, 11008, 36, 16, 2, 151936, True), {}),
        "qwen2.5-7b": (_QWEN, (3584, 18944, 28, 28, 4, 152064, False), {}),
        "qwen2.5-14b": (_QWEN, (5120, 13824, 48, 40, 8, 152064, False), {}),
        "llama-3.2-1b": (_LLAMA, (2048, 8192, 16, 32, 8, 128256, True), {"head_dim": 64}),
        "llama-3.2-3b": (_LLAMA, (3072, 8192, 28, 24, 8, 128256, True), {}),
        "llama-3.1-8b": (_LLAMA, (4096, 14336, 32, 32, 8, 128256, False), {}),
    }.items()
}


def random_shape_fields(name: str) -> dict[str, Any]:
    """The config fields of ``random:<shape>`` (or ``<shape>``): a name of
    :data:`RANDOM_SHAPES`, or a path to a ``config.json`` naming its ``model_type``."""
    import json
    from pathlib import Path

    shape = name[len("random:"):] if name.startswith("random:") else name
    if shape.lower() in RANDOM_SHAPES:
        return dict(RANDOM_SHAPES[shape.lower()])
    path = Path(shape).expanduser()
    if not path.is_file():
        raise ValueError(f"random:{shape}: neither a known shape ({', '.join(RANDOM_SHAPES)}) "
                         "nor a config.json file")
    try:
        fields = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"random:{shape}: unreadable config.json ({exc})") from None
    if not isinstance(fields, dict) or not fields.get("model_type"):
        raise ValueError(f"random:{shape}: the config names no model_type")
    return fields
