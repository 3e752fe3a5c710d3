"""Params: the pydantic schema of each axis, presets, and the YAML reader.

A *preset* (``params/presets/<name>.yaml``) overlays sizes and budgets per axis. Resolution
order, last wins::

    schema defaults < study.base < preset[axis] < grid point (+ seed)

Every resolved run is validated by its axis schema before anything runs, so a misspelt technique
or a negative step count fails in milliseconds with the file, the key path, the bad value and what
is allowed. YAML is read with a safe loader that also rejects duplicate keys. Study files (the
``base``/``grid``/``seeds`` of ``params/<axis>/<study>.yaml``), their expansion into runs and the
CLI's ``--set``/``--only`` parsing are in ``studies.py``.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from . import catalog
from .runenv import TASK_FILES_ENV, task_files_allowed

REPO_ROOT = Path(__file__).resolve().parent.parent
PARAMS_DIR = REPO_ROOT / "params"
PRESETS_DIR = PARAMS_DIR / "presets"

PosInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
PosFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Fraction = Annotated[float, Field(ge=0, le=1)]


class ParamsError(ValueError):
    """A params file is invalid: the message names file, key path, bad value and what is allowed."""


INT64_MAX = 2**63 - 1


class Strict(BaseModel):
    """Unknown keys, ``inf``/``nan`` and integers past int64 are errors in every params block.

    ``Field(ge=0)`` alone accepts ``inf`` (a weight, a sleep, a weight decay), and an integer
    past int64 passes the schema only to overflow in torch or numpy minutes later.
    """

    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _int64(cls, v: Any) -> Any:
        _check_int64(v)
        return v

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, v: Any, info: ValidationInfo) -> Any:
        """``n: true`` is not 1: pydantic's lax mode turns a boolean into a number."""
        field = cls.model_fields.get(info.field_name or "")
        if field is not None and not _admits_bool(field.annotation) and _has_bool(v):
            raise PydanticCustomError("bool_not_number",
                                      "a number or text is expected, not true/false")
        return v


def _admits_bool(annotation: Any) -> bool:
    """Whether a field's type takes a boolean somewhere (``bool``, ``Any``, a union with one);
    a sub-model counts as taking one (its own fields are checked by its own validator)."""
    if annotation is bool or annotation is Any or (
            isinstance(annotation, type) and issubclass(annotation, BaseModel)):
        return True
    return any(_admits_bool(a) for a in get_args(annotation))


def _has_bool(v: Any, depth: int = 0) -> bool:
    if isinstance(v, bool):
        return True
    if depth > 8:
        return False
    if isinstance(v, dict):
        return any(_has_bool(x, depth + 1) for x in v.values())
    if isinstance(v, list | tuple):
        return any(_has_bool(x, depth + 1) for x in v)
    return False


def _check_int64(v: Any, depth: int = 0) -> None:
    if isinstance(v, bool) or depth > 64:  # deeper is refused when the YAML is read
        return
    if isinstance(v, int):
        if not -INT64_MAX - 1 <= v <= INT64_MAX:
            raise ValueError("integer out of range; allowed: -2**63 .. 2**63-1 (int64)")
    elif isinstance(v, dict):
        for x in v.values():
            _check_int64(x, depth + 1)
    elif isinstance(v, list | tuple):
        for x in v:
            _check_int64(x, depth + 1)


# ---------------------------------------------------------------- shared blocks
class SizeSpec(Strict):
    """Decoder dimensions; presets name them (``small``/``medium``/``large``)."""

    d_model: PosInt
    n_layers: PosInt
    n_heads: PosInt
    n_kv_heads: PosInt = 2  # GQA group count (Qwen2.5 uses 2); MQA=1, MHA=n_heads
    d_ff: PosInt
    max_seq_len: PosInt = 2048

    @model_validator(mode="after")
    def _heads_divide(self) -> SizeSpec:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not divisible by n_kv_heads "
                             f"{self.n_kv_heads}")
        return self


class DataSpec(Strict):
    """A corpus: ``stdlib`` (built in), ``hf:<dataset>[:<config>]``, ``text:<path>``, ``jsonl:``."""

    corpus: str = "stdlib"
    text_field: str = "text"
    seq_len: PosInt = 128
    vocab_size: PosInt = 4096
    val_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.05
    max_train_bytes: PosInt | None = None

    @field_validator("corpus")
    @classmethod
    def _known_source(cls, v: str) -> str:
        kind, sep, arg = v.partition(":")
        if v == "stdlib" or (sep and kind in ("hf", "text", "jsonl") and arg.strip()):
            return v  # an empty text: would read the current folder
        raise ValueError("must be 'stdlib', 'hf:<dataset>', 'text:<path>' or 'jsonl:<path>'")


class TrainSpec(Strict):
    steps: PosInt = 50
    batch_size: PosInt = 8
    grad_accum: PosInt = 1
    lr: PosFloat = 1e-3
    weight_decay: Annotated[float, Field(ge=0)] = 0.1
    warmup_steps: NonNegInt = 5
    max_grad_norm: PosFloat | None = 1.0
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    compile: bool = False
    eval_every: PosInt = 25
    eval_batches: PosInt = 4


class MeasureSpec(Strict):
    warmup_steps: NonNegInt = 2
    sample_interval_s: PosFloat = 0.1
    repeats: PosInt = 1
    # inference: keep serving measured requests past ``repeats`` until the measured window is
    # this long, so the energy counter (which advances in steps of tens of ms on H100/H200) and
    # the sampled memory/utilisation see enough of it; a fast engine serves a request in ~30 ms
    min_duration_s: Annotated[float, Field(ge=0, le=3600)] = 1.0


class LaunchSpec(Strict):
    """One study point on several processes (``effllm_helpers.launch``): one per GPU."""

    processes: PosInt = 1
    strategy: Literal["ddp", "fsdp"] = "ddp"


class Launchable(Strict):
    """Axes whose point can train on several processes. Without ``launch`` the params dump has
    no such key, so one-process runs keep the run ids they had before the key existed."""

    launch: LaunchSpec | None = None

    @model_serializer(mode="wrap")
    def _omit_no_launch(self, handler: Any) -> dict[str, Any]:
        out = handler(self)
        if out.get("launch") is None:
            out.pop("launch", None)
        return out


# ---------------------------------------------------------------- axis schemas
def _catalog_name(table: dict[str, Any]) -> AfterValidator:
    """Validate a name against a catalog table as it is at validation time (entries registered
    later count); an unknown one gets pydantic's literal-style error listing the known names."""

    def check(v: str) -> str:
        if v in table:
            return v
        raise PydanticCustomError("literal_error", "Input should be {expected}",
                                  {"expected": ", ".join(repr(k) for k in table)})

    return AfterValidator(check)


Attention = Annotated[str, _catalog_name(catalog.ATTENTION)]
Positional = Annotated[str, _catalog_name(catalog.POSITIONAL)]
PrecisionName = Annotated[str, _catalog_name(catalog.PRECISIONS)]
Family = Literal["transformer", "mamba", "rwkv", "pythia"]


class ModelSpec(Strict):
    family: Family = "transformer"
    attention: Attention = "gqa"
    positional: Positional = "rope"
    ffn: Literal["dense", "moe"] = "dense"
    size: str = "small"
    n_experts: PosInt = 8
    top_k: PosInt = 2
    mla_latent_ratio: PosInt = 8  # latent dim = d_model / ratio (paper: hidden/8)
    nsa_window: PosInt = 128
    nsa_block: PosInt = 64
    nsa_stride: PosInt = 32
    nsa_selected: PosInt = 4
    # scales the size's d_ff, e.g. a dense model whose total params match an MoE's; the names
    # resolve to this spec's expert count / top-k, so a dense baseline follows the preset's MoE
    d_ff_mult: PosFloat | Literal["n_experts", "top_k"] = 1.0
    # NSA / RWKV / Mamba kernels: auto = fla (Triton) on CUDA when importable, else the PyTorch
    # reference; the record names what ran (models/kernels.py)
    kernel: Literal["auto", "reference", "fla"] = "auto"

    @model_validator(mode="after")
    def _moe(self) -> ModelSpec:
        if self.top_k > self.n_experts:
            raise ValueError(f"top_k {self.top_k} exceeds n_experts {self.n_experts}")
        if isinstance(self.d_ff_mult, str):
            self.d_ff_mult = float(getattr(self, self.d_ff_mult))
        return self


class ArchitectureParams(Launchable):
    """Axis 1: pretraining a decoder with one attention / positional / FFN / family choice."""

    model: ModelSpec = ModelSpec()
    sizes: dict[str, SizeSpec] = {  # the tiny preset's; presets replace them
        "small": SizeSpec(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=384),
        "medium": SizeSpec(d_model=160, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=480),
        "large": SizeSpec(d_model=192, n_layers=4, n_heads=6, n_kv_heads=2, d_ff=576),
    }
    data: DataSpec = DataSpec()
    train: TrainSpec = TrainSpec()
    measure: MeasureSpec = MeasureSpec()
    probe_pairs: PosInt = 8
    probe_train_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.1  # MQAR mixed into training
    # held-out tokens the final perplexity scores at most, evenly spread over the whole split
    # (the record says how many): the whole stdlib split at ci, fewer where a CPU budget binds
    eval_tokens: PosInt = 65_536
    save_model: bool = True

    @model_validator(mode="after")
    def _size_known(self) -> ArchitectureParams:
        shape = catalog.RANDOM_SHAPES.get(self.model.size.lower())
        if self.model.size not in self.sizes and shape is not None:
            # the names random:<shape> takes on the other axes: that model's dimensions (the
            # vocabulary stays the data's tokenizer's, data.vocab_size)
            self.sizes[self.model.size] = SizeSpec(
                d_model=shape["hidden_size"], n_layers=shape["num_hidden_layers"],
                n_heads=shape["num_attention_heads"], n_kv_heads=shape["num_key_value_heads"],
                d_ff=shape["intermediate_size"])
        if self.model.size not in self.sizes:
            raise ValueError(f"model.size {self.model.size!r} is neither one of the sizes "
                             f"{sorted(self.sizes)} nor a known shape "
                             f"({', '.join(catalog.RANDOM_SHAPES)})")
        return self


EmbeddedProfile = Literal["ci", "tiny", "gpu"]


PromptFormat = Literal["auto", "chat", "plain"]
# a hub id: owner/name, each part letters, digits, '-', '_', '.' (no leading '.' or '-')
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}$")
EMBEDDED_NAME = re.compile(r"^embedded(?::(?P<profile>[^@]*))?(?:@(?P<stage>.*))?$")
MODEL_SOURCES_HELP = ("allowed: a local folder with a config.json, a hub id 'owner/name', "
                      "'embedded[:ci|tiny|gpu][@base|sft]', 'gguf:<path to a .gguf file>' or "
                      "'random:<shape or config.json>' (random weights of a known shape)")


def canonical_model_key(data: Any) -> Any:
    """Fine-tuning params with ``model`` renamed to ``base_model`` (both given: an error unless
    they agree)."""
    if not isinstance(data, dict) or "model" not in data:
        return data
    data = dict(data)
    alias = data.pop("model")
    if "base_model" in data and data["base_model"] != alias:
        raise ValueError(f"both model ({alias!r}) and base_model ({data['base_model']!r}) are "
                         "given; model is an alias of base_model, give one")
    data["base_model"] = alias
    return data


def check_model_source(name: str) -> str:
    """Refuse a model name that could only fail later, before any compute: a missing local
    folder, a malformed hub id, a bad ``embedded`` spec or a missing GGUF file."""
    if not name.strip():
        raise ValueError(f"empty model name; {MODEL_SOURCES_HELP}")
    if name == "embedded" or name.startswith(("embedded:", "embedded@")):
        m = EMBEDDED_NAME.match(name)
        profiles, stages = get_args(EmbeddedProfile), ("base", "sft")
        if not m or (m["profile"] and m["profile"] not in profiles) or (
                m["stage"] and m["stage"] not in stages):
            raise ValueError(f"bad embedded model {quoted(name)}: embedded[:profile][@stage] "
                             f"with profile in {', '.join(profiles)} and stage in "
                             f"{', '.join(stages)}; {MODEL_SOURCES_HELP}")
        return name
    if name.startswith("random:"):
        try:
            catalog.random_shape_fields(name)
        except ValueError as exc:
            raise ValueError(f"{exc}; {MODEL_SOURCES_HELP}") from None
        return name
    if name.startswith("gguf:"):
        path = Path(name[len("gguf:"):]).expanduser()
        if not path.is_file():
            raise ValueError(f"gguf: no such file {quoted(str(path))}; {MODEL_SOURCES_HELP}")
        return name
    path = Path(name).expanduser()
    looks_local = name.startswith((".", "/", "~")) or path.exists() or name.count("/") != 1
    if looks_local:
        if not path.is_dir():
            raise ValueError(f"no such model folder {quoted(name)} (and not a hub id "
                             f"'owner/name'); {MODEL_SOURCES_HELP}")
        if not (path / "config.json").is_file():
            raise ValueError(f"model folder {quoted(name)} has no config.json; "
                             f"{MODEL_SOURCES_HELP}")
        return name
    if not HUB_ID.match(name) or ".." in name or name.endswith((".", "-")):
        raise ValueError(f"malformed hub id {quoted(name)}: owner/name of letters, digits, "
                         f"'-', '_', '.'; {MODEL_SOURCES_HELP}")
    return name


def check_params_model(key: str | None, params: dict[str, Any], source: str) -> None:
    """The model a run will load (``params[key]``, the axis spec's ``model_key``; None: the
    axis loads no named model) can be found (no compute, no network): see
    :func:`check_model_source`. Run by ``studies.expand``, so ``validate`` and ``sweep`` refuse a
    missing model before any run starts rather than each run failing a minute in."""
    if key is None or not isinstance(params.get(key), str):
        return
    try:
        check_model_source(params[key])
    except ValueError as exc:
        raise ParamsError(f"{source}: {key}: {exc}") from None
    except OSError as exc:  # a name too long for the filesystem, a loop of links
        raise ParamsError(f"{source}: {key}: unusable path {quoted(params[key], 120)} "
                          f"({exc.strerror or exc}); {MODEL_SOURCES_HELP}") from None


def check_method(v: str) -> str:
    """A fine-tuning method the catalog or peft's own registry knows, else the list of both."""
    if v in catalog.FINETUNE_METHODS or v in catalog.PEFT_NAMED or v in peft_method_names():
        return v
    raise ValueError(f"unknown fine-tuning method; allowed: "
                     f"{', '.join(catalog.FINETUNE_METHODS)} or a peft method "
                     f"({', '.join(sorted(set(catalog.PEFT_NAMED) | peft_method_names()))})")


class FinetuneTrainSpec(TrainSpec):
    """Fine-tuning's train spec: ``lr`` unset (None) means each method's literature default."""

    lr: PosFloat | None = None  # type: ignore[assignment]


class FinetuneParams(Launchable):
    """Axis 2: adapting a base model with one fine-tuning method on one task suite."""

    base_model: str = "embedded"  # 'embedded' = model pretrained by axis 1's code, or HF id/path
    embedded_profile: EmbeddedProfile = "tiny"  # which embedded model 'embedded' means
    method: str = "lora"
    rank: PosInt = 8
    alpha: PosFloat = 16
    dropout: Fraction = 0.1
    target_modules: str | list[str] = "all-linear"
    lora_plus_ratio: PosFloat = 16.0
    freeze_last_k: PosInt = 1
    quant: Literal["none", "nf4", "fp4"] = "none"  # 4-bit base (QLoRA) under any adapter method
    task: str = "arithmetic"  # 'arithmetic', 'docname', 'hf:<dataset>', 'jsonl:<path>'
    max_len: PosInt = 128
    # batch layout (data.packing): 'pack' = the step's examples in rows of at most max_len with
    # restarting position ids; 'group' = length-grouped, padded per batch; 'none' = padded to the
    # longest row of the set; 'auto' = pack if the model keeps packed examples apart, else group
    packing: Literal["auto", "none", "group", "pack"] = "auto"
    n_train: PosInt = 512
    n_eval: PosInt = 64
    # learning rate: lr_by_method[method] if set, else train.lr if set, else the method's default
    # from its literature (techniques.finetuning.METHOD_LR); the record names which
    lr_by_method: dict[str, PosFloat] = {}
    train: FinetuneTrainSpec = FinetuneTrainSpec(steps=40, batch_size=8, warmup_steps=4)
    measure: MeasureSpec = MeasureSpec()
    # 'chat' = the tokenizer's chat template, 'plain' = our ### Question/### Answer format,
    # 'auto' = chat when the tokenizer has a template
    prompt_format: PromptFormat = "auto"

    @model_validator(mode="before")
    @classmethod
    def _model_alias(cls, data: Any) -> Any:
        """``model`` (inference's key) is accepted for ``base_model``; params keep the canonical
        name, so a run id never depends on which of the two was written."""
        return canonical_model_key(data)

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        return check_method(v)

    @field_validator("launch")
    @classmethod
    def _no_sharded_finetuning(cls, v: LaunchSpec | None) -> LaunchSpec | None:
        # the evaluations after training, the merge and the saved model need the whole (peft)
        # model back from FSDP's flat shards; only the architecture axis gathers it so far
        if v is not None and v.strategy == "fsdp":
            raise ValueError("strategy 'fsdp' is not supported on the fine-tuning axis yet; "
                             "allowed here: 'ddp'")
        return v

    @field_validator("task")
    @classmethod
    def _known_task(cls, v: str) -> str:
        if v in ("arithmetic", "arithmetic:easy", "arithmetic:medium", "arithmetic:hard",
                 "docname") or v.split(":", 1)[0] in ("hf", "jsonl") and ":" in v:
            return v
        raise ValueError("must be 'arithmetic[:easy|medium|hard]', 'docname', 'hf:<dataset>' "
                         "or 'jsonl:<path>'")


# an lm-eval registry name (tasks, groups, tags: letters, digits, '_', '-', '.')
LM_EVAL_TASK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-.]{0,199}$")


def check_lm_eval_task(task: str) -> str:
    """A task of lm-eval's registry by name. A task YAML file is code (its ``!function``
    imports a Python file beside it into the notebook kernel), so a path is refused unless
    ``--allow-task-files`` (``$EFFLLM_ALLOW_TASK_FILES=1``) says otherwise."""
    if task_files_allowed():
        return task
    if LM_EVAL_TASK.match(task) and not task.lower().endswith((".yaml", ".yml")):
        return task
    raise ValueError(f"{quoted(task, 80)} is not an lm-eval task name; allowed: names from "
                     "lm-eval's task registry (e.g. hellaswag, leaderboard_bbh). A task file "
                     "runs code, so it needs --allow-task-files (or "
                     f"{TASK_FILES_ENV}=1)")


def peft_method_names() -> set[str]:
    """Every tuner name the installed peft registers (lower-case ``PeftType`` values); empty
    without peft. Imported on demand: only a method outside the catalog needs it."""
    try:
        from peft import PeftType
    except ImportError:
        return set()
    return {str(t.value).lower() for t in PeftType}


class InferenceParams(Strict):
    """Axis 3: serving a model at one precision; decode timing, memory, energy, quality."""

    model: str = "embedded@sft"  # the embedded model after axis-2 fine-tuning, or HF id/path
    embedded_profile: EmbeddedProfile = "tiny"
    precision: PrecisionName = "bf16"
    double_quant: bool = False
    # int8/int4 only: dtype of the matmul inputs and of the modules bnb leaves alone; None = the
    # kernel's own (LLM.int8 on CUDA: fp16, which it casts to anyway; else bf16)
    compute_dtype: Literal["fp32", "bf16", "fp16"] | None = None
    baseline_precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    prompt_len: PosInt = 32
    gen_tokens: PosInt = 32
    batch_sizes: list[PosInt] = [1, 4]
    static_cache: bool = False  # hf_generate only: transformers then compiles the decode step
    # how requests are served (effllm_helpers.decode): auto = static_graph on CUDA (static KV
    # cache, decode step replayed as a CUDA graph), hf_generate (HF generate) on a CPU
    engine: Literal["auto", "static_graph", "hf_generate"] = "auto"
    # static_graph on CUDA: compile the one-token step (inductor fuses the small kernels that
    # a plain graph replays one by one) and capture this many steps per CUDA graph
    decode_compile: bool = True
    decode_steps_per_graph: int = Field(16, ge=1, le=256)
    # one matmul for q/k/v and one for gate/up per layer (models/fused.py): 4 weight products a
    # token per layer instead of 7. auto = on CUDA (where launches bound batch-1 decode), off on
    # a CPU; bitsandbytes layers are never fused
    fuse_projections: Literal["auto", "on", "off"] = "auto"
    ppl_batches: PosInt = 4
    task_items: PosInt = 32
    lm_eval_tasks: list[str] = []
    measure: MeasureSpec = MeasureSpec(warmup_steps=1, repeats=3)
    prompt_format: PromptFormat = "auto"  # as FinetuneParams.prompt_format, for the task score

    @field_validator("batch_sizes")
    @classmethod
    def _non_empty(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("needs at least one batch size")
        return v

    @field_validator("lm_eval_tasks")
    @classmethod
    def _task_names(cls, v: list[str]) -> list[str]:
        for task in v:
            check_lm_eval_task(task)
        return v


class CrossModalParams(Strict):
    """Axis 4: the text techniques on images - a class-conditional DiT (attention, MoE) and PEFT
    transfer to a ViT classifier, a tiny LLaVA-style VLM and the DiT."""

    experiment: Literal["dit", "peft"] = "dit"
    data: str = "digits"  # digits (sklearn, offline) | folder:<path> | hf:<name or path>
    image_size: PosInt = 16
    val_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.1
    # the DiT (and the ViT/VLM vision tower share d_model / n_layers / n_heads / patch)
    attention: Literal["mha", "mqa", "gqa", "mla"] = "mha"
    n_kv_heads: PosInt = 2  # gqa groups; mqa = 1, mha = n_heads
    mla_latent_ratio: PosInt = 8  # the text MLA's: latent KV dim = d_model / ratio
    ffn: Literal["dense", "moe"] = "dense"
    n_experts: PosInt = 4
    top_k: PosInt = 2
    patch: PosInt = 4
    d_model: PosInt = 64
    n_layers: PosInt = 2
    n_heads: PosInt = 4
    diffusion_steps: PosInt = 100  # DDPM training timesteps
    sample_steps: PosInt = 10  # denoising steps when sampling (DDIM-style spacing)
    n_samples: PosInt = 100  # generated images for quality and the sampling metrics
    sample_batch: PosInt = 50
    quality_backend: Literal["classifier", "fid"] = "classifier"
    classifier_steps: PosInt = 300  # the feature CNN, trained once per source and cached
    # PEFT transfer: target model, method (the fine-tuning registry's names), the shifted task
    target: Literal["vit", "vlm", "dit"] = "vit"
    method: str = "lora"
    rank: PosInt = 4
    alpha: PosFloat = 8
    dropout: Fraction = 0.0
    target_modules: str | list[str] = "all-linear"
    freeze_last_k: PosInt = 1
    shift: Literal["invert", "rotate"] = "invert"  # the adaptation task: inverted/rotated images
    pretrain_steps: PosInt = 60  # the base, trained on the plain images before adaptation
    pretrain_lr: PosFloat = 1e-3  # its peak lr (warm-up and cosine as the shared loop's)
    n_eval: PosInt = 100
    train: TrainSpec = TrainSpec(steps=20, lr=2e-3, weight_decay=0.0, warmup_steps=2)
    # the DiT study's training when set (a DiT from scratch needs far more steps than a PEFT
    # adaptation, which keeps ``train``); unset, the DiT study trains with ``train``
    dit_train: TrainSpec | None = None
    measure: MeasureSpec = MeasureSpec()

    @field_validator("data")
    @classmethod
    def _known_source(cls, v: str) -> str:
        kind, sep, arg = v.partition(":")
        if v == "digits" or (sep and kind in ("folder", "hf") and arg.strip()):
            return v
        raise ValueError("must be 'digits', 'folder:<path>' or 'hf:<name or path>'")

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        return check_method(v)

    @model_validator(mode="after")
    def _shapes(self) -> CrossModalParams:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not divisible by n_kv_heads "
                             f"{self.n_kv_heads}")
        if self.image_size % self.patch:
            raise ValueError(f"image_size {self.image_size} is not divisible by patch "
                             f"{self.patch}")
        if self.top_k > self.n_experts:
            raise ValueError(f"top_k {self.top_k} exceeds n_experts {self.n_experts}")
        if self.d_model % self.mla_latent_ratio:
            raise ValueError(f"d_model {self.d_model} is not divisible by mla_latent_ratio "
                             f"{self.mla_latent_ratio}")
        return self


class SmokeParams(Strict):
    """The pipe's smoke test: a tiny timed matmul loop and a record, nothing else."""

    n: PosInt = 64
    steps: PosInt = 5
    sleep_s: Annotated[float, Field(ge=0)] = 0.0
    # crash: the kernel process dies (SIGKILL, as the kernel OOM killer does it)
    fail: Literal["none", "exception", "nan", "oom", "crash"] = "none"
    measure: MeasureSpec = MeasureSpec(warmup_steps=1)


AXES: dict[str, type[Strict]] = {
    "architecture": ArchitectureParams,
    "finetuning": FinetuneParams,
    "inference": InferenceParams,
    "cross_modal": CrossModalParams,
    "smoke": SmokeParams,
}

# ---------------------------------------------------------------- YAML
class _UniqueKeyLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """A safe loader that rejects duplicate mapping keys instead of silently keeping the last.

    libyaml's parser when PyYAML has it: the pure-Python one takes seconds on a file at the size
    limit, which a refusal should not cost."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict[Any, Any] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # ``<<: *base``: merged by flatten_mapping
            continue
        if not isinstance(key_node, yaml.ScalarNode):  # a list or mapping as a key: unhashable
            raise yaml.constructor.ConstructorError(
                None, None, f"a mapping key must be a plain name, got a "
                f"{'list' if isinstance(key_node, yaml.SequenceNode) else 'mapping'}",
                key_node.start_mark)
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {quoted(key, 80)}", key_node.start_mark)
        seen[key] = True
    return yaml.constructor.SafeConstructor.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)

# a params file is a few hundred nodes; aliases can make a 400-byte file expand to a billion
# (the "billion laughs"), which every later walk (merge, validation, messages) would pay for
MAX_YAML_NODES = 100_000
MAX_YAML_DEPTH = 64
# the largest study is ~2 KB: a file past this is no params file, and reading it costs seconds
MAX_PARAMS_BYTES = 256 * 1024
# text once aliases are expanded (a 200 KB string repeated through 50,000 aliases is 10 GB when
# the run id hashes it); a list longer than this is no grid or batch-size list
MAX_EXPANDED_CHARS = 1_000_000
MAX_LIST_LEN = 1_000


def _check_expansion(node: yaml.Node, source: str) -> None:
    """Refuse a composed document whose alias-expanded size or depth passes the limits.

    Sizes are memoised per node, so a document of nested aliases is measured in time linear in
    its text, before anything expands it.
    """
    sizes: dict[int, tuple[int, int]] = {}  # node -> (values, characters) once expanded
    depths: dict[int, int] = {}
    active: set[int] = set()

    def walk(n: yaml.Node, level: int, where: str) -> tuple[int, int, int]:
        key = id(n)
        if key in sizes:
            return *sizes[key], depths[key]
        if level > MAX_YAML_DEPTH:
            raise ParamsError(f"{source}: nested deeper than {MAX_YAML_DEPTH} levels; "
                              "a params file needs a few")
        if key in active:
            raise ParamsError(f"{source}: an alias refers to itself (recursive structure)")
        active.add(key)
        size, chars, depth = 1, 0, 0
        if isinstance(n, yaml.SequenceNode):
            if len(n.value) > MAX_LIST_LEN:
                raise ParamsError(f"{source}: {where or '<top>'}: a list of {len(n.value)} "
                                  f"values; allowed: at most {MAX_LIST_LEN}")
            children = [(c, f"{where}[{i}]") for i, c in enumerate(n.value)]
        elif isinstance(n, yaml.MappingNode):
            children = []
            for k, v in n.value:
                name = short_text(k.value, 60) if isinstance(k, yaml.ScalarNode) else "?"
                children += [(k, where), (v, f"{where}.{name}" if where else name)]
        else:
            chars = len(n.value)
            children = []
        for child, at in children:
            s, c, d = walk(child, level + 1, at)
            size, chars, depth = size + s, chars + c, max(depth, d + 1)
            if size > MAX_YAML_NODES:
                raise ParamsError(f"{source}: expands to more than {MAX_YAML_NODES} values "
                                  "(nested aliases?); refused")
            if chars > MAX_EXPANDED_CHARS:
                raise ParamsError(f"{source}: {where or '<top>'}: expands to more than "
                                  f"{MAX_EXPANDED_CHARS} characters of text (aliases repeating "
                                  "a long string?); allowed: at most that in the whole file")
        active.discard(key)
        sizes[key], depths[key] = (size, chars), depth
        return size, chars, depth

    walk(node, 0, "")


def short(value: Any, limit: int = 200) -> str:
    """``value`` as JSON-like text of at most ``limit`` characters, built lazily.

    Error messages echo the bad value; rendering a 1 MB value (or a structure of shared
    references) in full to then cut it would cost what the message should not.
    """
    out: list[str] = []
    size = 0

    def emit(text: str) -> bool:
        nonlocal size
        out.append(text)
        size += len(text)
        return size <= limit

    def render(v: Any, level: int) -> bool:
        if level > 8:
            return emit("...")
        if isinstance(v, dict):
            if not emit("{"):
                return False
            for i, (k, x) in enumerate(v.items()):
                if (i and not emit(", ")) or not render(k, level + 1) or not emit(": ") \
                        or not render(x, level + 1):
                    return False
            return emit("}")
        if isinstance(v, list | tuple):
            if not emit("["):
                return False
            for i, x in enumerate(v):
                if (i and not emit(", ")) or not render(x, level + 1):
                    return False
            return emit("]")
        if isinstance(v, str):
            return emit(json.dumps(v[: limit + 1]))
        try:
            return emit(json.dumps(v)[: limit + 1])
        except (TypeError, ValueError):
            return emit(str(v)[: limit + 1])

    render(value, 0)
    text = "".join(out)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping safely (no tags execute, duplicate keys are an error)."""
    path = Path(path)
    problem = file_problem(path)
    if problem:
        raise ParamsError(f"{shown_path(path)}: " + ("no such params file" if problem ==
                          "no such file" else f"{problem}; a params file is a YAML file"))
    if path.stat().st_size > MAX_PARAMS_BYTES:
        raise ParamsError(f"{shown_path(path)}: {path.stat().st_size} bytes; allowed: a params "
                          f"file of at most {MAX_PARAMS_BYTES} bytes")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ParamsError(f"{shown_path(path)}: not UTF-8 text ({exc.reason} at byte "
                          f"{exc.start})") from None
    except OSError as exc:
        raise ParamsError(f"{shown_path(path)}: cannot read params file: "
                          f"{exc.strerror or exc}") from None
    loader = _UniqueKeyLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None:
            _check_expansion(node, str(path))
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        if "maximum nesting depth" in str(exc):  # libyaml's own limit, before ours is reached
            raise ParamsError(f"{path}: nested deeper than libyaml reads; a params file needs "
                              "a few levels") from None
        raise ParamsError(f"{path}: malformed YAML: {short_text(str(exc), 600)}") from None
    except RecursionError:
        raise ParamsError(f"{path}: nested too deeply to read") from None
    finally:
        loader.dispose()
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    check_plain_text(data, str(path))
    return data


# control characters (NUL, escape sequences that drive a terminal, C1) and lone surrogates,
# which no key or value needs and which break paths, terminals and strict UTF-8 output
_BAD_CHARS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")


def bad_char(text: str) -> str | None:
    """The first control character or lone surrogate in ``text``, escaped (``'\\x1b'``)."""
    m = _BAD_CHARS.search(text)
    return None if m is None else m.group().encode("unicode_escape", "backslashreplace").decode()


def check_plain_text(data: Any, source: str, where: str = "") -> None:
    """Refuse control characters and lone surrogates in every key and string value (tab and
    newline stay allowed): the message names the key and the character, escaped."""
    if isinstance(data, dict):
        for k, v in data.items():
            at = f"{where}.{k}" if where else str(k)
            if isinstance(k, str) and (c := bad_char(k)):
                raise ParamsError(f"{source}: key {quoted(at)}: contains the control "
                                  f"character {c}; allowed: printable text")
            check_plain_text(v, source, at)
    elif isinstance(data, list):
        for i, v in enumerate(data):
            check_plain_text(v, source, f"{where}[{i}]")
    elif isinstance(data, str) and (c := bad_char(data)):
        raise ParamsError(f"{source}: {printable(where) or '<top>'}: {quoted(data, 80)} "
                          f"contains the control character {c}; allowed: printable text")


def printable(text: str) -> str:
    """``text`` safe for any terminal: control characters and lone surrogates escaped, tab and
    newline kept (an echoed key must not drive the terminal nor crash strict UTF-8 output)."""
    return _BAD_CHARS.sub(lambda m: m.group().encode("unicode_escape", "backslashreplace")
                          .decode(), str(text))


def shown_path(path: str | Path) -> str:
    """A path for a message: printable and at most 200 characters."""
    return short_text(printable(str(path)), 200)


def file_problem(path: Path) -> str | None:
    """Why ``path`` is not a readable regular file (absent, a FIFO or device, a folder, a name
    the filesystem refuses), or None. ``Path.is_file`` raises on a name too long and on NUL."""
    import stat

    try:
        st = path.stat()
    except FileNotFoundError:
        return "no such file"
    except (OSError, ValueError) as exc:
        return f"unusable path ({getattr(exc, 'strerror', None) or exc})"
    if stat.S_ISDIR(st.st_mode):
        return "a folder, not a file"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file (a FIFO, socket or device)"
    return None


# ---------------------------------------------------------------- errors
def _fmt_loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "<top>"


def format_validation_error(source: str, exc: ValidationError, prefix: str = "") -> str:
    """One line per problem: ``file: key.path: bad value X: what is allowed``."""
    lines = []
    for err in exc.errors():
        loc = _fmt_loc(tuple(err["loc"]))
        if prefix:
            loc = f"{prefix}.{loc}" if loc != "<top>" else prefix
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        bad = err.get("input")
        bad_s = "" if err["type"] in ("missing",) else f" (got {short(bad, 80)})"
        lines.append(f"{source}: {short_text(loc, 200)}: {short_text(msg, 300)}{bad_s}")
    if len(lines) > MAX_ERROR_LINES:
        lines = lines[:MAX_ERROR_LINES] + [f"{source}: ... and {len(lines) - MAX_ERROR_LINES} "
                                           "more problems"]
    return "\n".join(lines)


MAX_ERROR_LINES = 20


def quoted(value: Any, limit: int = 200) -> str:
    """``repr`` of a string (as the messages always quoted keys), cut to ``limit``; else short."""
    if isinstance(value, str):
        return repr(value[:limit]) + ("..." if len(value) > limit else "")
    return short(value, limit)


def short_text(text: str, limit: int = 200) -> str:
    """``text`` cut to ``limit`` characters (an echoed key or value never floods a message)."""
    text = str(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _allowed_keys(model: type[BaseModel]) -> list[str]:
    return sorted(model.model_fields)


# ---------------------------------------------------------------- merging
def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    cur = d
    for p in parts[:-1]:
        nxt = cur.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ParamsError(f"grid key {quoted(key)}: {quoted(p)} is not a section")
        cur = nxt
    cur[parts[-1]] = value


# ---------------------------------------------------------------- presets
PRESET_NAME = re.compile(r"^[A-Za-z0-9_\-]{1,100}$")


def preset_path(name: str | Path) -> Path:
    """A preset is a name under ``params/presets/``; a ``Path`` (``--preset-file``) is itself."""
    if isinstance(name, Path):
        return name
    if not PRESET_NAME.match(name):
        raise ParamsError(f"--preset {quoted(name)}: a preset is a name, one of "
                          f"{', '.join(available_presets())}; give a file with --preset-file")
    return PRESETS_DIR / f"{name}.yaml"


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def load_preset(name: str | Path | None, axis: str) -> dict[str, Any]:
    """The overlay a preset gives one axis (``{}`` for no preset): a preset name, or a ``Path``
    to a preset file given explicitly (``--preset-file``)."""
    if not name:
        return {}
    path = preset_path(name)
    if isinstance(name, Path):
        if not path.is_file():
            raise ParamsError(f"--preset-file: no such file {quoted(str(path))}")
    elif not path.is_file():
        raise ParamsError(f"unknown preset {quoted(name)}; allowed: "
                          f"{', '.join(available_presets())}")
    data = load_yaml(path)
    unknown = set(data) - set(AXES) - {"description"}
    if unknown:
        raise ParamsError(f"{path}: unknown key(s) {sorted(unknown)}; allowed: "
                          f"description, {', '.join(AXES)}")
    section = data.get(axis) or {}
    if not isinstance(section, dict):
        raise ParamsError(f"{path}: {axis}: must be a mapping")
    return section


def resolve_params(axis: str, *layers: dict[str, Any], source: str = "<params>") -> dict[str, Any]:
    """Merge layers over the axis defaults and validate; returns plain JSON-able params."""
    if axis not in AXES:
        raise ParamsError(f"{source}: axis {axis!r} unknown; allowed: {', '.join(AXES)}")
    merged: dict[str, Any] = {}
    fields = AXES[axis].model_fields
    # a schema whose model is ``base_model`` (fine-tuning) takes ``model`` as its alias: each
    # layer's alias is renamed before the layers merge
    if "base_model" in fields and "model" not in fields:
        try:
            layers = tuple(canonical_model_key(layer) for layer in layers)
        except ValueError as exc:
            raise ParamsError(f"{source}: {exc}") from None
    for layer in layers:
        merged = deep_merge(merged, layer or {})
    try:
        obj = AXES[axis].model_validate(merged)
    except ValidationError as exc:
        raise ParamsError(format_validation_error(source, exc)) from None
    return obj.model_dump(mode="json")


def notebook_params(axis: str, preset: str | None, params: dict[str, Any] | None) -> Any:
    """What a notebook's first cell calls: validated params object for ``axis``.

    Layers, last wins: the axis defaults, ``preset``, then ``params``. A sweep injects the fully
    resolved ``params`` with ``preset=None``, so they are used as they are; by hand, a partial
    ``params`` (e.g. ``{"method": "dora"}``) edits the preset instead of replacing it.
    """
    layers = [load_preset(preset, axis), params or {}]
    resolved = resolve_params(axis, *layers, source=f"notebook {axis} params")
    return AXES[axis].model_validate(resolved)
