"""lm-eval bridge: offline custom tasks on a tiny random Llama, checked against our own math.

The oracle: for a multiple-choice task lm-eval scores each choice by the summed log-probability
of ``" " + choice`` after the prompt (``acc``), or that sum divided by the choice's character
count (``acc_norm``). We compute the same with plain torch and demand the same accuracy.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from effllm_helpers import lm_eval_bridge as bridge
from effllm_helpers.config import DataSpec
from effllm_helpers.data import get_tokenizer, load_corpus

ITEMS = [
    {"q": "The sky on a clear day is", "choices": ["blue", "green grass", "red"], "label": 0},
    {"q": "Two plus two equals", "choices": ["four", "five", "twenty two"], "label": 0},
    {"q": "Python lists are created with", "choices": ["[]", "curly braces", "()"], "label": 0},
    {"q": "A function is defined with", "choices": ["class", "def", "lambda x"], "label": 1},
    {"q": "The opposite of hot is", "choices": ["warm", "cold", "boiling"], "label": 1},
    {"q": "Water freezes at zero", "choices": ["kelvin", "fahrenheit", "celsius"], "label": 2},
    {"q": "To import a module write", "choices": ["include", "require", "import"], "label": 2},
    {"q": "A loop over items uses", "choices": ["for", "if", "return value"], "label": 0},
]
SMALL = ITEMS[:4]


def _task_yaml(name: str, data: Path, cache: Path, metrics: list[str]) -> str:
    listed = "".join(f"  - metric: {m}\n    aggregation: mean\n    higher_is_better: true\n"
                     for m in metrics)
    return (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    test: {data}\n  cache_dir: {cache}\ntest_split: test\n"
            "output_type: multiple_choice\n"
            "doc_to_text: \"{{q}}\\nAnswer:\"\ndoc_to_choice: \"{{choices}}\"\n"
            f"doc_to_target: label\nmetric_list:\n{listed}metadata:\n  version: 1.0\n")


# Tests that build the tokenizer and run lm-eval are marked slow (~20 s together on 2 cores).


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Custom tasks over local JSONL: toy_mc (acc+acc_norm), toy_acc (acc), a group of two."""
    root = tmp_path_factory.mktemp("lm_tasks")
    cache = root / "hf_datasets_cache"
    for fname, items in (("all.jsonl", ITEMS), ("small.jsonl", SMALL)):
        (root / fname).write_text("".join(json.dumps(it) + "\n" for it in items))
    (root / "toy_mc.yaml").write_text(
        _task_yaml("toy_mc", root / "all.jsonl", cache, ["acc", "acc_norm"]))
    (root / "toy_acc.yaml").write_text(_task_yaml("toy_acc", root / "all.jsonl", cache, ["acc"]))
    (root / "toy_small.yaml").write_text(
        _task_yaml("toy_small", root / "small.jsonl", cache, ["acc", "acc_norm"]))
    (root / "toy_offhub.yaml").write_text(
        _task_yaml("toy_offhub", root / "all.jsonl", cache, ["acc"]).replace(
            "dataset_path: json", "dataset_path: no-such-org/no-such-dataset-xyz"))
    (root / "toy_group.yaml").write_text(
        "group: toy_group\ntask:\n  - toy_mc\n  - toy_small\naggregate_metric_list:\n"
        "  - metric: acc_norm\n    aggregation: mean\n    weight_by_size: true\n"
        "metadata:\n  version: 1.0\n")
    return root


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PreTrainedTokenizerFast]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EFFLLM_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield get_tokenizer(load_corpus(DataSpec(max_train_bytes=120_000, vocab_size=384)), 384)


@pytest.fixture(scope="module")
def model(tok: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


def _own_scores(model: LlamaForCausalLM, tok: PreTrainedTokenizerFast,
                items: list[dict[str, Any]]) -> tuple[float, float]:
    """(acc, acc_norm) from log-probabilities we compute ourselves."""
    hits = hits_norm = 0
    for it in items:
        context = f"{it['q']}\nAnswer:"
        ctx = tok.encode(context, add_special_tokens=False)
        lls = []
        for choice in it["choices"]:
            whole = tok.encode(f"{context} {choice}", add_special_tokens=False)
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([whole[:-1]])).logits[0].float(), -1)
            lls.append(sum(logp[i - 1, whole[i]].item() for i in range(len(ctx), len(whole))))
        norm = [ll / len(c) for ll, c in zip(lls, it["choices"], strict=True)]
        hits += int(max(range(len(lls)), key=lls.__getitem__) == it["label"])
        hits_norm += int(max(range(len(norm)), key=norm.__getitem__) == it["label"])
    return hits / len(items), hits_norm / len(items)


@pytest.fixture(scope="module")
def scores(model: LlamaForCausalLM, tok: PreTrainedTokenizerFast,
           task_dir: Path) -> dict[str, dict[str, Any]]:
    return bridge.evaluate_tasks(model, tok, ["toy_mc", "toy_acc"], include_path=str(task_dir),
                                 include_defaults=False, batch_size=4)


def test_task_file_is_not_loaded_without_the_opt_in(model: LlamaForCausalLM,
                                                    tok: PreTrainedTokenizerFast, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EFFLLM_ALLOW_TASK_FILES", raising=False)
    marker = tmp_path / "ran"
    (tmp_path / "utils.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef f(x): return x\n")
    task = tmp_path / "evil.yaml"
    task.write_text("task: evil\ndataset_path: json\nprocess_docs: !function utils.f\n")
    out = bridge.evaluate_tasks(model, tok, [str(task)], include_defaults=False, limit=1)
    assert out[f"lm_eval/{task}"]["value"] is None
    assert "not a task of lm-eval's registry" in out[f"lm_eval/{task}"]["reason"]
    assert not marker.exists()


@pytest.mark.slow
def test_scores_are_fractions_over_all_items(scores: dict[str, dict[str, Any]]) -> None:
    assert set(scores) == {"lm_eval/toy_mc", "lm_eval/toy_acc", "lm_eval/mean"}
    for key in ("lm_eval/toy_mc", "lm_eval/toy_acc"):
        assert 0.0 <= scores[key]["value"] <= 1.0
        assert scores[key]["unit"] == "fraction"
        assert scores[key]["n"] == len(ITEMS)


@pytest.mark.slow
def test_method_names_task_and_preferred_metric(scores: dict[str, dict[str, Any]]) -> None:
    assert scores["lm_eval/toy_mc"]["method"] == "lm_eval:toy_mc:acc_norm"
    assert scores["lm_eval/toy_acc"]["method"] == "lm_eval:toy_acc:acc"


@pytest.mark.slow
def test_scores_match_own_loglikelihoods(scores: dict[str, dict[str, Any]],
                                         model: LlamaForCausalLM,
                                         tok: PreTrainedTokenizerFast) -> None:
    acc, acc_norm = _own_scores(model, tok, ITEMS)
    assert scores["lm_eval/toy_mc"]["value"] == pytest.approx(acc_norm)
    assert scores["lm_eval/toy_acc"]["value"] == pytest.approx(acc)


@pytest.mark.slow
def test_mean_is_mean_of_tasks(scores: dict[str, dict[str, Any]]) -> None:
    want = (scores["lm_eval/toy_mc"]["value"] + scores["lm_eval/toy_acc"]["value"]) / 2
    assert scores["lm_eval/mean"]["value"] == pytest.approx(want)
    assert scores["lm_eval/mean"]["n"] == 2


@pytest.mark.slow
def test_group_is_size_weighted_mean_of_subtasks(model: LlamaForCausalLM,
                                                 tok: PreTrainedTokenizerFast,
                                                 task_dir: Path) -> None:
    out = bridge.evaluate_tasks(model, tok, ["toy_group"], include_path=str(task_dir),
                                include_defaults=False, batch_size=4)
    got = out["lm_eval/toy_group"]
    big, small = _own_scores(model, tok, ITEMS)[1], _own_scores(model, tok, SMALL)[1]
    want = (big * len(ITEMS) + small * len(SMALL)) / (len(ITEMS) + len(SMALL))
    assert got["value"] == pytest.approx(want)
    assert got["n"] == len(ITEMS) + len(SMALL)
    assert got["method"] == "lm_eval:toy_group:acc_norm"


@pytest.mark.slow
def test_limit_caps_samples(model: LlamaForCausalLM, tok: PreTrainedTokenizerFast,
                            task_dir: Path) -> None:
    out = bridge.evaluate_tasks(model, tok, ["toy_acc"], include_path=str(task_dir),
                                include_defaults=False, limit=3)
    assert out["lm_eval/toy_acc"]["n"] == 3
    assert out["lm_eval/toy_acc"]["n_total"] == len(ITEMS)
    assert out["lm_eval/toy_acc"]["limit"] == 3


@pytest.mark.slow
def test_unknown_task_is_null_with_reason(model: LlamaForCausalLM, tok: PreTrainedTokenizerFast,
                                          task_dir: Path) -> None:
    out = bridge.evaluate_tasks(model, tok, ["toy_acc", "no_such_task_xyz"],
                                include_path=str(task_dir), include_defaults=False, limit=2)
    bad = out["lm_eval/no_such_task_xyz"]
    assert bad["value"] is None
    assert "no_such_task_xyz" in bad["reason"] and bad["method"] == "lm_eval:no_such_task_xyz"
    assert out["lm_eval/toy_acc"]["value"] is not None
    assert out["lm_eval/mean"]["value"] is None
    assert "no_such_task_xyz" in out["lm_eval/mean"]["reason"]


@pytest.mark.slow
def test_hub_dataset_offline_is_null_not_crash(model: LlamaForCausalLM,
                                               tok: PreTrainedTokenizerFast,
                                               task_dir: Path) -> None:
    out = bridge.evaluate_tasks(model, tok, ["toy_offhub"], include_path=str(task_dir),
                                include_defaults=False)
    assert out["lm_eval/toy_offhub"]["value"] is None
    assert out["lm_eval/toy_offhub"]["reason"].startswith("task failed to load")


def test_offline_mode_sets_and_restores_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    with bridge.offline_mode():
        assert huggingface_hub.constants.HF_HUB_OFFLINE is True
        assert datasets.config.HF_HUB_OFFLINE is True
        assert bridge.os.environ["HF_HUB_OFFLINE"] == "1"
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False
    assert datasets.config.HF_HUB_OFFLINE is False
    assert "HF_HUB_OFFLINE" not in bridge.os.environ


def test_paper_tasks_exist_in_installed_lm_eval() -> None:
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    leaderboard = Path(lm_eval.tasks.__file__).parent / "leaderboard"
    tm = TaskManager(include_path=str(leaderboard), include_defaults=False)
    assert len(bridge.PAPER_TASKS) == 6
    assert set(bridge.PAPER_TASKS) <= set(tm.all_tasks)


def test_leaderboard_metric_choice() -> None:
    ifeval = {"prompt_level_strict_acc,none": 0.2, "inst_level_strict_acc,none": 0.4,
              "prompt_level_loose_acc,none": 0.9, "inst_level_loose_acc,none": 0.9}
    assert bridge.primary_metric("leaderboard_ifeval", ifeval) == (
        ("prompt_level_strict_acc", "inst_level_strict_acc"), "none")
    both = {"acc,none": 0.3, "acc_norm,none": 0.5}
    assert bridge.primary_metric("leaderboard_mmlu_pro", both) == (("acc",), "none")
    assert bridge.primary_metric("leaderboard_bbh_navigate", both) == (("acc_norm",), "none")
    gsm = {"exact_match,strict-match": 0.1, "exact_match,flexible-extract": 0.2}
    assert bridge.primary_metric("gsm8k", gsm) == (("exact_match",), "strict-match")


def test_ifeval_score_averages_strict_metrics() -> None:
    res = {"results": {"leaderboard_ifeval": {
        "sample_len": 10, "prompt_level_strict_acc,none": 0.2, "inst_level_strict_acc,none": 0.4,
        "prompt_level_loose_acc,none": 0.9, "inst_level_loose_acc,none": 0.9}},
        "n-samples": {"leaderboard_ifeval": {"original": 541, "effective": 10}}}
    got = bridge.task_score("leaderboard_ifeval", res)
    assert got["value"] == pytest.approx(0.3)
    assert got["method"] == ("lm_eval:leaderboard_ifeval:"
                             "prompt_level_strict_acc+inst_level_strict_acc")
    assert got["n"] == 10 and got["n_total"] == 541
