"""Corpora behind one interface: built-in ``stdlib`` and real ``hf:``/``text:``/``jsonl:`` sources.

Why the standard library: it is real English (docstrings, comments) mixed with code, present on
every machine that runs Python, so a pretraining run needs no download and no network. What makes
results comparable across runs and machines is the *fingerprint*: document counts, bytes and a
sha256 over (key, content-hash) per split, recorded with every run.

Splitting is by a hash of each document's key (a relative path, or the content for rows of a data
set), so a document is in train or in val on every machine and for every run, whatever the
order in which the files were found. ``max_train_bytes`` caps the training text (and val in
proportion) deterministically: documents are taken in a fixed order and the last one is cut.

Sources (``DataSpec.corpus``)::

    stdlib                         this interpreter's standard library .py files, tests excluded
    hf:<dataset>[:<config>][@split]  datasets.load_dataset(...), or load_from_disk(...) when
                                   <dataset> is a local folder written by save_to_disk;
                                   the text column is DataSpec.text_field
    text:<path>                    a .txt/.md/.py file or a folder of them (recursive)
    jsonl:<path>                   one JSON object per line; the text is obj[text_field]
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from effllm_helpers.config import DataSpec

# Directories that hold test suites (or other interpreters' packages) inside the stdlib tree.
_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "testmock", "site-packages",
                        "dist-packages", "__pycache__", "lib-dynload"})
TEXT_SUFFIXES = (".txt", ".md", ".py")
TEXT_CHUNK_LINES = 64  # a single text: file is split into blocks of this many lines


@dataclass
class Corpus:
    """Train and val documents of one source plus the fingerprint that identifies them."""

    train: list[str]
    val: list[str]
    fingerprint: dict[str, Any]
    name: str = "stdlib"
    train_keys: list[str] = field(default_factory=list, repr=False)
    val_keys: list[str] = field(default_factory=list, repr=False)


# ---------------------------------------------------------------- hashing helpers
def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def split_value(key: str) -> float:
    """A key's position in [0, 1): val when below val_fraction. Stable across machines."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2.0**64


def _split_fingerprint(keys: list[str], texts: list[str]) -> dict[str, Any]:
    h = hashlib.sha256()
    total = 0
    for key, text in zip(keys, texts, strict=True):
        data = text.encode("utf-8", errors="surrogatepass")
        total += len(data)
        h.update(key.encode())
        h.update(b"\0")
        h.update(_sha(data).encode())
        h.update(b"\n")
    return {"n_docs": len(texts), "bytes": total, "sha256": h.hexdigest()}


def _truncate_utf8(text: str, n_bytes: int) -> str:
    return text.encode("utf-8", errors="surrogatepass")[:n_bytes].decode("utf-8", errors="ignore")


def _split_docs(docs: Iterable[tuple[str, str]], val_fraction: float,
                max_train_bytes: int | None) -> tuple[list[str], list[str], list[str], list[str]]:
    """Route (key, text) pairs to train/val by key hash; cap bytes; stop reading once both are full.

    With a cap, val gets ``max_train_bytes * val_fraction / (1 - val_fraction)`` bytes so the
    ratio of the split is kept. The last document that crosses a cap is cut to fit exactly.
    """
    caps: dict[str, int | None] = {"train": max_train_bytes, "val": None}
    if max_train_bytes is not None:
        caps["val"] = max(1, int(max_train_bytes * val_fraction / (1.0 - val_fraction)))
    out: dict[str, tuple[list[str], list[str]]] = {"train": ([], []), "val": ([], [])}
    used = {"train": 0, "val": 0}
    full = {"train": False, "val": val_fraction <= 0.0}
    for key, text in docs:
        if not text:
            continue
        which = "val" if split_value(key) < val_fraction else "train"
        if full[which]:
            if all(full.values()):
                break
            continue
        cap = caps[which]
        n = len(text.encode("utf-8", errors="surrogatepass"))
        if cap is not None and used[which] + n >= cap:
            text = _truncate_utf8(text, cap - used[which])
            n = cap - used[which]
            full[which] = True
        if text:
            out[which][0].append(key)
            out[which][1].append(text)
            used[which] += n
        if all(full.values()):
            break
    return out["train"][0], out["train"][1], out["val"][0], out["val"][1]


def _ensure_both(tk: list[str], tt: list[str], vk: list[str], vt: list[str]) -> None:
    """A tiny source can hash entirely to one side; move one document so both splits exist."""
    if not vt and len(tt) > 1:
        vk.append(tk.pop())
        vt.append(tt.pop())
    elif not tt and len(vt) > 1:
        tk.append(vk.pop())
        tt.append(vt.pop())


# ---------------------------------------------------------------- stdlib
def stdlib_root() -> Path:
    """The running interpreter's standard-library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def _is_excluded_file(rel: Path) -> bool:
    name = rel.name
    return (not name.endswith(".py") or name.startswith("test_") or name == "conftest.py"
            or name.startswith("_sysconfigdata"))


def stdlib_files(root: Path | None = None) -> list[str]:
    """Relative POSIX paths of the stdlib .py sources, sorted, with test suites left out.

    Left out: any ``test``/``tests``/``idle_test`` directory (``test/``, ``lib2to3/tests``,
    ``idlelib/idle_test``, ``unittest/test``, ...), ``test_*.py`` files, installed packages
    (``site-packages``) and machine-specific build files (``config-*``, ``_sysconfigdata*``).
    """
    root = root or stdlib_root()
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames
                       if d not in _SKIP_DIRS and not d.startswith("config-")]
        base = Path(dirpath).relative_to(root)
        for name in filenames:
            rel = base / name
            if not _is_excluded_file(rel):
                found.append(rel.as_posix())
    return sorted(found)


def _read_text(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace")


def _stdlib_docs(root: Path) -> Iterator[tuple[str, str]]:
    # Read in hash order (not alphabetical) so a byte cap samples the whole library, not just
    # the first packages of the alphabet; the order is still a pure function of the file set.
    for rel in sorted(stdlib_files(root), key=lambda r: (_sha(r.encode()), r)):
        yield rel, _read_text(root / rel)


# ---------------------------------------------------------------- text / jsonl
def _text_docs(path: Path, chunk_lines: int = TEXT_CHUNK_LINES) -> Iterator[tuple[str, str]]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"text:{path}: no {'/'.join(TEXT_SUFFIXES)} files in folder")
        for p in files:
            yield p.relative_to(path).as_posix(), _read_text(p)
    elif path.is_file():
        lines = _read_text(path).splitlines(keepends=True)
        for start in range(0, len(lines), chunk_lines):
            yield f"{path.name}#L{start}", "".join(lines[start:start + chunk_lines])
    else:
        raise FileNotFoundError(f"text:{path}: no such file or folder")


def jsonl_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) of each non-blank line; a bad line is an error naming file:line."""
    if not path.is_file():
        raise FileNotFoundError(f"jsonl:{path}: no such file")
    with path.open(encoding="utf-8", errors="strict") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"jsonl:{path}:{lineno}: not JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"jsonl:{path}:{lineno}: expected a JSON object per line, got "
                                 f"{type(obj).__name__}")
            yield lineno, obj


def _jsonl_docs(path: Path, text_field: str) -> Iterator[tuple[str, str]]:
    for lineno, obj in jsonl_rows(path):
        if text_field not in obj:
            raise KeyError(f"jsonl:{path}:{lineno}: no field {text_field!r} "
                           f"(fields: {sorted(obj)}); set DataSpec.text_field")
        text = obj[text_field]
        yield _sha(str(text).encode()), str(text)


# ---------------------------------------------------------------- hf
def parse_hf(arg: str) -> tuple[str, str | None, str | None]:
    """``<dataset>[:<config>][@split]`` -> (dataset, config, split); local paths are kept whole."""
    split = None
    if "@" in arg and not Path(arg).exists():
        arg, split = arg.rsplit("@", 1)
    if Path(arg).exists() or ":" not in arg:
        return arg, None, split
    name, config = arg.rsplit(":", 1)
    return name, config or None, split


def _offline_datasets() -> Any:
    """Import ``datasets`` with the hub switched off: this project never downloads at run time."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    return datasets


def load_hf(arg: str) -> Any:
    """A ``Dataset`` or ``DatasetDict`` from a local save_to_disk folder or the local HF cache."""
    datasets = _offline_datasets()
    name, config, split = parse_hf(arg)
    path = Path(name)
    if path.is_dir() and ((path / "dataset_info.json").is_file()
                          or (path / "dataset_dict.json").is_file()
                          or (path / "state.json").is_file()):
        ds = datasets.load_from_disk(str(path))
        if split is not None:
            ds = ds[split]
        return ds
    return datasets.load_dataset(name, config, split=split)


def _rows_text(ds: Any, text_field: str, where: str) -> Iterator[tuple[str, str]]:
    if text_field not in ds.column_names:
        raise KeyError(f"{where}: no column {text_field!r} (columns: {ds.column_names}); "
                       f"set DataSpec.text_field")
    for batch in ds.iter(batch_size=1000):  # lazy: a capped read of a big set stops early
        for text in batch[text_field]:
            text = "" if text is None else str(text)
            yield _sha(text.encode()), text


def _hf_splits(arg: str, spec: DataSpec) -> tuple[list[str], list[str], list[str], list[str]]:
    ds = load_hf(arg)
    where = f"hf:{arg}"
    if hasattr(ds, "column_names") and isinstance(ds.column_names, dict):  # a DatasetDict
        names = list(ds.keys())
        train_name = "train" if "train" in names else names[0]
        val_name = next((n for n in ("validation", "valid", "val", "test") if n in names), None)
        if val_name is None:
            return _split_docs(_rows_text(ds[train_name], spec.text_field, where),
                               spec.val_fraction, spec.max_train_bytes)
        # the data set's own val split is kept; the caps still apply
        tk, tt, _, _ = _split_docs(_rows_text(ds[train_name], spec.text_field, where), 0.0,
                                   spec.max_train_bytes)
        vcap = None
        if spec.max_train_bytes is not None:
            vcap = max(1, int(spec.max_train_bytes * spec.val_fraction / (1 - spec.val_fraction)))
        vk, vt, _, _ = _split_docs(_rows_text(ds[val_name], spec.text_field, where), 0.0, vcap)
        return tk, tt, vk, vt
    return _split_docs(_rows_text(ds, spec.text_field, where), spec.val_fraction,
                       spec.max_train_bytes)


# ---------------------------------------------------------------- entry point
def load_corpus(spec: DataSpec | dict[str, Any] | None = None) -> Corpus:
    """Load, split and fingerprint the corpus named by ``spec.corpus`` (see module docstring)."""
    if spec is None:
        spec = DataSpec()
    elif isinstance(spec, dict):
        spec = DataSpec.model_validate(spec)
    src = spec.corpus
    kind, _, arg = src.partition(":")
    fp: dict[str, Any] = {"source": src}
    if src == "stdlib":
        root = stdlib_root()
        fp["python_version"] = ".".join(map(str, sys.version_info[:3]))
        tk, tt, vk, vt = _split_docs(_stdlib_docs(root), spec.val_fraction, spec.max_train_bytes)
    elif kind == "text":
        tk, tt, vk, vt = _split_docs(_text_docs(Path(arg).expanduser()), spec.val_fraction,
                                     spec.max_train_bytes)
    elif kind == "jsonl":
        tk, tt, vk, vt = _split_docs(_jsonl_docs(Path(arg).expanduser(), spec.text_field),
                                     spec.val_fraction, spec.max_train_bytes)
    elif kind == "hf":
        fp["text_field"] = spec.text_field
        tk, tt, vk, vt = _hf_splits(arg, spec)
    else:
        raise ValueError(f"unknown corpus {src!r}: use stdlib, hf:<dataset>, text:<path>, "
                         f"jsonl:<path>")
    _ensure_both(tk, tt, vk, vt)
    if not tt or not vt:
        raise ValueError(f"corpus {src!r} has too little text for a train and a val split "
                         f"({len(tt)} train, {len(vt)} val documents)")
    fp["val_fraction"] = spec.val_fraction
    fp["max_train_bytes"] = spec.max_train_bytes
    fp["train"] = _split_fingerprint(tk, tt)
    fp["val"] = _split_fingerprint(vk, vt)
    if src == "stdlib" or (kind == "text" and Path(arg).expanduser().is_dir()):
        fp["train"]["file_count"] = len(set(tk))
        fp["val"]["file_count"] = len(set(vk))
    fp["sha256"] = _sha(json.dumps([fp["train"]["sha256"], fp["val"]["sha256"]]).encode())
    return Corpus(train=tt, val=vt, fingerprint=fp, name=src, train_keys=tk, val_keys=vk)
