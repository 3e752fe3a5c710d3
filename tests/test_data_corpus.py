"""Corpus loading: the stdlib default and the hf:/text:/jsonl: sources behind the same call."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from effllm_helpers.config import DataSpec
from effllm_helpers.data import load_corpus, stdlib_files
from effllm_helpers.data.corpus import parse_hf, stdlib_root


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EFFLLM_CACHE", str(tmp_path / "cache"))


def _docs(n: int) -> list[str]:
    return [f"document number {i}: " + "lorem ipsum " * (i % 7 + 1) for i in range(n)]


def test_stdlib_fingerprint_is_deterministic() -> None:
    a = load_corpus(DataSpec())
    b = load_corpus(DataSpec())
    assert a.fingerprint == b.fingerprint
    assert a.train == b.train and a.val == b.val
    fp = a.fingerprint
    assert fp["source"] == "stdlib" and fp["python_version"].count(".") == 2
    for split in ("train", "val"):
        assert fp[split]["file_count"] > 0 and fp[split]["bytes"] > 0
        assert len(fp[split]["sha256"]) == 64
    assert fp["train"]["file_count"] > 10 * fp["val"]["file_count"] > 0


def test_stdlib_train_val_disjoint() -> None:
    c = load_corpus(DataSpec())
    assert set(c.train_keys).isdisjoint(c.val_keys)
    assert len(set(c.train_keys)) == len(c.train_keys)


def test_stdlib_has_no_test_files() -> None:
    files = stdlib_files()
    assert "argparse.py" in files and "json/decoder.py" in files
    for rel in files:
        parts = rel.split("/")
        assert not {"test", "tests", "idle_test", "site-packages"} & set(parts[:-1]), rel
        assert not parts[-1].startswith("test_"), rel
        assert rel.endswith(".py")
    c = load_corpus(DataSpec())
    kept = set(c.train_keys) | set(c.val_keys)
    assert kept <= set(files)
    # empty files (bare __init__.py) carry no text and are skipped
    assert all((stdlib_root() / f).stat().st_size == 0 for f in set(files) - kept)


def test_stdlib_max_train_bytes_cap_is_exact_and_deterministic() -> None:
    spec = DataSpec(max_train_bytes=50_000, val_fraction=0.1)
    a, b = load_corpus(spec), load_corpus(spec)
    assert a.fingerprint["train"]["bytes"] == 50_000
    assert sum(len(t.encode()) for t in a.train) == 50_000
    assert 0 < a.fingerprint["val"]["bytes"] <= 50_000 * 0.1 / 0.9 + 1
    assert a.fingerprint == b.fingerprint
    assert a.fingerprint["sha256"] != load_corpus(DataSpec()).fingerprint["sha256"]


def test_hf_save_to_disk_source(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    docs = _docs(60)
    datasets.Dataset.from_dict({"content": docs}).save_to_disk(str(tmp_path / "ds"))
    c = load_corpus(DataSpec(corpus=f"hf:{tmp_path / 'ds'}", text_field="content",
                             val_fraction=0.2))
    assert sorted(c.train + c.val) == sorted(docs)
    assert set(c.train).isdisjoint(c.val) and c.val
    assert c.fingerprint["text_field"] == "content"
    with pytest.raises(KeyError, match="text_field"):
        load_corpus(DataSpec(corpus=f"hf:{tmp_path / 'ds'}"))


def test_hf_dataset_dict_keeps_its_validation_split(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": _docs(20)}),
                               "validation": datasets.Dataset.from_dict({"text": ["held out"]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    c = load_corpus(DataSpec(corpus=f"hf:{tmp_path / 'dd'}"))
    assert c.val == ["held out"] and sorted(c.train) == sorted(_docs(20))
    only = load_corpus(DataSpec(corpus=f"hf:{tmp_path / 'dd'}@train", val_fraction=0.3))
    assert sorted(only.train + only.val) == sorted(_docs(20))


def test_parse_hf_names() -> None:
    assert parse_hf("HuggingFaceFW/fineweb-edu:sample-10BT@train") == (
        "HuggingFaceFW/fineweb-edu", "sample-10BT", "train")
    assert parse_hf("wikitext") == ("wikitext", None, None)


def test_text_folder_source(tmp_path: Path) -> None:
    folder = tmp_path / "txt"
    (folder / "sub").mkdir(parents=True)
    for i in range(30):
        (folder / ("sub" if i % 2 else "") / f"f{i}.{['txt', 'md', 'py'][i % 3]}").write_text(
            f"file {i}\n" * 5)
    (folder / "skip.csv").write_text("not,text\n")
    c = load_corpus(DataSpec(corpus=f"text:{folder}", val_fraction=0.25))
    keys = c.train_keys + c.val_keys
    assert len(keys) == 30 and not any(k.endswith(".csv") for k in keys)
    assert set(c.train_keys).isdisjoint(c.val_keys) and c.val_keys
    assert c.fingerprint["train"]["file_count"] + c.fingerprint["val"]["file_count"] == 30
    assert load_corpus(DataSpec(corpus=f"text:{folder}", val_fraction=0.25)).fingerprint == \
        c.fingerprint


def test_text_single_file_is_split_in_line_blocks(tmp_path: Path) -> None:
    f = tmp_path / "book.txt"
    lines = [f"line {i}\n" for i in range(64 * 40)]
    f.write_text("".join(lines))
    c = load_corpus(DataSpec(corpus=f"text:{f}", val_fraction=0.2))
    assert len(c.train) + len(c.val) == 40 and c.val
    assert sorted(c.train + c.val) == sorted("".join(lines[i:i + 64])
                                             for i in range(0, len(lines), 64))


def test_jsonl_source(tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    docs = _docs(40)
    f.write_text("\n".join(json.dumps({"body": d, "id": i}) for i, d in enumerate(docs)) + "\n")
    c = load_corpus(DataSpec(corpus=f"jsonl:{f}", text_field="body", val_fraction=0.2))
    assert sorted(c.train + c.val) == sorted(docs)
    assert set(c.train).isdisjoint(c.val) and c.val
    with pytest.raises(KeyError, match="body"):
        load_corpus(DataSpec(corpus=f"jsonl:{f}", text_field="text"))


def test_missing_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such"):
        load_corpus(DataSpec(corpus=f"text:{tmp_path / 'nope'}"))
