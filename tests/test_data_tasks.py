"""Fine-tuning task suites: built-in generators, real-set format detection, scoring, SFT masking."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from effllm_helpers.data import tasks
from effllm_helpers.data.tasks import (
    detect_format,
    extract_answer,
    format_prompt,
    load_task,
    score,
    sft_tensors,
)
from effllm_helpers.data.tokenizer import _train_tokenizer, _wrap


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EFFLLM_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    items = load_task("arithmetic", 200, 10).train
    texts = [format_prompt(it["prompt"]) + it["response"] for it in items] * 3
    return _wrap(_train_tokenizer(texts, 300))


def _row(prompt: str, answer: str) -> dict[str, str]:
    return {"prompt": prompt, "response": f"Answer: {answer}", "answer": answer}


# ---------------------------------------------------------------- arithmetic
def test_arithmetic_is_deterministic_and_seeded() -> None:
    a, b = load_task("arithmetic", 50, 10, seed=3), load_task("arithmetic", 50, 10, seed=3)
    assert a.train == b.train and a.eval == b.eval
    assert load_task("arithmetic", 50, 10, seed=4).train != a.train


def test_arithmetic_train_eval_disjoint_and_eval_stable() -> None:
    t = load_task("arithmetic", 300, 40)
    assert len(t.train) == 300 and len(t.eval) == 40
    assert {i["prompt"] for i in t.train}.isdisjoint(i["prompt"] for i in t.eval)
    assert load_task("arithmetic", 10, 40).eval == t.eval


def test_arithmetic_worked_steps_are_correct() -> None:
    for it in load_task("arithmetic", 200, 1).train:
        *steps, last = it["response"].splitlines()
        assert 1 <= len(steps) <= 2 and last == f"Answer: {it['answer']}"
        prev = None
        for step in steps:
            a, op, b, c = re.fullmatch(r"(\d+) ([-+x]) (\d+) = (\d+)", step).groups()
            a, b, c = int(a), int(b), int(c)
            assert c == {"+": a + b, "-": a - b, "x": a * b}[op] and c >= 0
            assert prev is None or prev == a
            assert b < 100
            prev = c
        assert prev == int(it["answer"]) and score(it["response"], it)


@pytest.mark.parametrize("level", ["easy", "medium"])
def test_arithmetic_levels_held_out_seeded_and_well_formed(level: str) -> None:
    name = f"arithmetic:{level}"
    t = load_task(name, 2000, 64, seed=1)
    assert len(t.train) == 2000 and len(t.eval) == 64
    assert {i["prompt"] for i in t.train}.isdisjoint(i["prompt"] for i in t.eval)
    assert load_task(name, 2000, 64, seed=1).train == t.train
    assert load_task(name, 2000, 64, seed=2).eval != t.eval
    assert load_task(name, 10, 64, seed=1).eval == t.eval  # eval fixed whatever n_train
    n_steps = {"easy": 1, "medium": 2}[level]
    for it in t.train + t.eval:
        *steps, last = it["response"].splitlines()
        assert len(steps) == n_steps and last == f"Answer: {it['answer']}"
        prev = None
        for step in steps:
            a, op, b, c = re.fullmatch(r"(\d+) ([-+]) (\d+) = (\d+)", step).groups()
            a, b, c = int(a), int(b), int(c)
            assert b <= 9 and (prev is not None or a <= 9) and prev in (None, a)
            assert c == (a + b if op == "+" else a - b) and c >= 0
            prev = c
        assert score(it["response"], it)


def test_arithmetic_default_is_the_hard_level_and_unknown_levels_refused() -> None:
    assert load_task("arithmetic", 30, 5).eval == load_task("arithmetic:hard", 30, 5).eval
    with pytest.raises(ValueError, match="unknown arithmetic level"):
        load_task("arithmetic:trivial", 3, 1)


# ---------------------------------------------------------------- scoring
def test_score_exact_match_and_negatives() -> None:
    item = _row("q", "14")
    assert score("3 + 11 = 14\nAnswer: 14", item)
    assert score("Answer: 14.\n### Question:\nnext\n### Answer:\nAnswer: 99", item)
    assert not score("3 + 11 = 15\nAnswer: 15", item)
    assert not score("Answer: 141", item)
    assert not score("", item)
    assert not score("Answer: 14", _row("q", ""))
    assert score("Answer: 1,234", _row("q", "1234"))


def test_score_name_answer_without_answer_line() -> None:
    item = {"prompt": "p", "response": "dumps", "answer": "dumps"}
    assert score("dumps\nmore text", item)
    assert score("`dumps`", item)
    assert not score("dump", item)
    assert not score("Dumps", item)


def test_extract_answer_prefers_openo1_output_block() -> None:
    text = "<Thought>\nAnswer: no\n</Thought>\n<Output>\n42\n</Output>"
    assert extract_answer(text) == "42"


# ---------------------------------------------------------------- docname
def test_docname_mined_from_stdlib(monkeypatch: pytest.MonkeyPatch) -> None:
    subset = ["textwrap.py", "shlex.py", "json/__init__.py", "json/decoder.py", "fnmatch.py",
              "base64.py", "heapq.py", "bisect.py", "string.py", "glob.py"]
    monkeypatch.setattr(tasks, "stdlib_files", lambda root=None: subset)
    pool = tasks.docname_pool()
    assert len(pool) >= 20
    names = {it["answer"] for it in pool}
    assert {"dedent", "b64encode", "fnmatch"} <= names
    assert all(it["response"] == it["answer"] and "Parameters:" in it["prompt"] for it in pool)
    assert len({it["prompt"] for it in pool}) == len(pool)
    t = load_task("docname", 10, 5, seed=1)
    assert load_task("docname", 10, 5, seed=1).eval == t.eval
    assert {i["prompt"] for i in t.train}.isdisjoint(i["prompt"] for i in t.eval)
    with pytest.raises(ValueError, match="docname has"):
        load_task("docname", 10_000, 5)


# ---------------------------------------------------------------- real sets
OPENO1 = {"instruction": [f"What is {i} + 1?" for i in range(12)],
          "output": [f"<Thought>\n{i} plus one\n</Thought>\n<Output>\n{i + 1}\n</Output>"
                     for i in range(12)]}
MEDICAL = {"Question": [f"Patient {i} has a fever. Drug?" for i in range(12)],
           "Complex_CoT": [f"Reasoning about patient {i}." for i in range(12)],
           "Response": [f"Paracetamol {i}" for i in range(12)]}


def test_openo1_format_from_local_save_to_disk(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict(OPENO1).save_to_disk(str(tmp_path / "o1"))
    t = load_task(f"hf:{tmp_path / 'o1'}", 8, 4)
    assert len(t.train) == 8 and len(t.eval) == 4
    assert {i["prompt"] for i in t.train}.isdisjoint(i["prompt"] for i in t.eval)
    for it in t.train + t.eval:
        n = int(it["prompt"].split()[2])
        assert it["answer"] == str(n + 1) and it["response"].startswith("<Thought>")
        assert t.scorer(it["response"], it)


def test_medical_format_from_local_save_to_disk(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(MEDICAL)}).save_to_disk(
        str(tmp_path / "med"))
    t = load_task(f"hf:{tmp_path / 'med'}", 6, 3)
    assert len(t.train) == 6 and len(t.eval) == 3
    it = t.eval[0]
    i = it["prompt"].split()[1]
    assert it["answer"] == f"Paracetamol {i}"
    assert it["response"] == f"Reasoning about patient {i}.\nAnswer: Paracetamol {i}"
    assert t.scorer(f"thinking...\nAnswer: Paracetamol {i}", it)
    assert not t.scorer("Answer: Ibuprofen", it)


def test_detect_format() -> None:
    assert detect_format(["instruction", "output"]) == "openo1"
    assert detect_format(["Question", "Complex_CoT", "Response"]) == "medical"
    assert detect_format(["prompt", "response", "answer"]) == "prompt_response"
    with pytest.raises(ValueError, match="unknown fine-tuning format"):
        detect_format(["text"])


def test_jsonl_task(tmp_path: Path) -> None:
    f = tmp_path / "t.jsonl"
    rows = [{"prompt": f"p{i}", "response": f"work\nAnswer: {i}"} for i in range(20)]
    f.write_text("\n".join(json.dumps(r) for r in rows))
    t = load_task(f"jsonl:{f}", 15, 5, seed=2)
    assert len(t.train) == 15 and len(t.eval) == 5
    assert {i["prompt"] for i in t.train + t.eval} == {r["prompt"] for r in rows}
    assert all(it["answer"] == it["prompt"][1:] for it in t.eval)
    with pytest.raises(ValueError, match="unknown task"):
        load_task("nope", 1, 1)


# ---------------------------------------------------------------- SFT tensors
def test_sft_labels_mask_exactly_prompt_and_padding(tok: PreTrainedTokenizerFast) -> None:
    items = load_task("arithmetic", 6, 1).train
    out = sft_tensors(items, tok, max_len=128)
    ids, mask, labels = out["input_ids"], out["attention_mask"], out["labels"]
    assert ids.shape == mask.shape == labels.shape and ids.dtype == torch.long
    for row, it in enumerate(items):
        p = tok.encode(format_prompt(it["prompt"]), add_special_tokens=False)
        r = tok.encode(it["response"], add_special_tokens=False) + [tok.eos_token_id]
        n = len(p) + len(r)
        assert ids[row, :n].tolist() == p + r
        assert mask[row].tolist() == [1] * n + [0] * (ids.shape[1] - n)  # right-padded
        assert (labels[row, : len(p)] == -100).all() and (labels[row, n:] == -100).all()
        assert labels[row, len(p):n].tolist() == r  # loss on response and its eos only
        assert (ids[row, n:] == tok.pad_token_id).all()
    assert ids.shape[1] == max(int(m.sum()) for m in mask)


def test_sft_truncation_keeps_template_tail_and_response(tok: PreTrainedTokenizerFast) -> None:
    item = {"prompt": "word " * 200, "response": "12 + 3 = 15\nAnswer: 15", "answer": "15"}
    out = sft_tensors([item], tok, max_len=32, pad_to_max=True)
    assert out["input_ids"].shape == (1, 32)
    text = tok.decode(out["input_ids"][0][out["labels"][0] == -100])
    assert text.endswith("### Answer:\n")
    assert (out["labels"][0] != -100).sum() == len(
        tok.encode(item["response"], add_special_tokens=False)) + 1


def test_jsonl_task_with_a_bad_line_names_file_and_line(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"question": "1+1?", "answer": "2"}\n{not json}\n')
    with pytest.raises(ValueError, match=r"t\.jsonl:2: not JSON"):
        load_task(f"jsonl:{path}", n_train=1, n_eval=1)


def test_jsonl_task_line_that_is_not_an_object_is_rejected(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('"just a string"\n')
    with pytest.raises(ValueError, match=r"t\.jsonl:1: expected a JSON object.*got str"):
        load_task(f"jsonl:{path}", n_train=1, n_eval=1)


# ---------------------------------------------------------------- chat templates
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                 "{% endif %}")


@pytest.fixture()
def chat_tok(tok: PreTrainedTokenizerFast, tmp_path: Path) -> PreTrainedTokenizerFast:
    """The test tokenizer saved to a folder with a chat template added, reloaded from there."""
    tok.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["chat_template"] = CHAT_TEMPLATE
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return PreTrainedTokenizerFast.from_pretrained(tmp_path)


def test_prompt_style_is_chat_when_the_tokenizer_has_a_template(tok, chat_tok) -> None:
    assert tasks.prompt_style(chat_tok, "auto") == "chat"
    assert tasks.prompt_style(tok, "auto") == "plain"
    assert tasks.prompt_style(chat_tok, "plain") == "plain"
    with pytest.raises(ValueError, match="no chat_template"):
        tasks.prompt_style(tok, "chat")


def test_chat_prompt_is_the_user_turn_and_generation_prompt(chat_tok) -> None:
    text = format_prompt("What is 2 + 2?", chat_tok, "chat")
    assert text == "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"
    assert "### Question" not in text


def test_chat_sft_target_is_the_assistant_turn(chat_tok) -> None:
    item = {"prompt": "What is 2 + 2?", "response": "Answer: 4", "answer": "4"}
    out = sft_tensors([item], chat_tok, max_len=128, style="chat")
    ids, labels = out["input_ids"][0], out["labels"][0]
    prompt_text = chat_tok.decode(ids[labels == -100], skip_special_tokens=False)
    target_text = chat_tok.decode(ids[labels != -100], skip_special_tokens=False)
    assert prompt_text.endswith("<|im_start|>assistant\n")
    assert target_text.startswith("Answer: 4") and target_text.rstrip().endswith("<|im_end|>")
    assert extract_answer(target_text) == "4"  # the turn's end is a stop string


# ---------------------------------------------------------------- chat answer format and scoring
def test_chat_prompts_of_builtin_tasks_end_with_an_answer_format_instruction(tok, chat_tok) -> None:
    task = load_task("arithmetic", 1, 2)
    chat = task.prompts(chat_tok, "chat")
    assert all("end with a line `Answer: <number>`" in p for p in chat)
    assert chat[0].index(task.eval[0]["prompt"]) < chat[0].index("Answer: <number>")
    assert chat[0].endswith("<|im_end|>\n<|im_start|>assistant\n")
    docs = tasks.TaskData(train=[], eval=[_row("Which function is this? x", "join")],
                          name="docname")
    assert "Reply with only the function name." in docs.prompts(chat_tok, "chat")[0]


@pytest.mark.parametrize("name", ["arithmetic:easy", "arithmetic:medium", "arithmetic:hard"])
def test_every_arithmetic_level_is_asked_and_read_as_arithmetic_in_chat(name: str) -> None:
    # the level suffix once hid the family's chat format: no instruction, exact-match scoring
    task = load_task(name, 1, 2)
    plain = load_task("arithmetic", 1, 2)
    assert task.instruction("chat") == plain.instruction("chat") != ""
    assert task.scoring("chat") == plain.scoring("chat")


def test_plain_prompts_and_scoring_are_unchanged(tok) -> None:
    task = load_task("arithmetic", 1, 2)
    assert task.prompts(tok, "plain") == [format_prompt(it["prompt"]) for it in task.eval]
    assert task.instruction("plain") == ""
    assert task.scoring("plain") == (score, tasks.PLAIN_EXTRACTION)
    assert not score("The answer is **14**.", _row("q", "14"))  # plain stays exact


def test_chat_sft_rows_carry_the_same_instruction_as_generation(chat_tok) -> None:
    task = load_task("arithmetic", 2, 1)
    out = sft_tensors(task.eval, chat_tok, max_len=256, style="chat",
                      instruction=task.instruction("chat"))
    ids, labels = out["input_ids"][0], out["labels"][0]
    prompt_text = chat_tok.decode(ids[labels == -100], skip_special_tokens=False)
    assert prompt_text == task.prompts(chat_tok, "chat")[0]
    plain = sft_tensors(task.eval, chat_tok, max_len=256, instruction="ignored in plain")
    assert "ignored" not in chat_tok.decode(plain["input_ids"][0])


@pytest.mark.parametrize("text", [
    "The answer is **12**.",
    "7 + 5 = 12\nAnswer: 12",
    "First, 7 + 5 = 12.\n\n**Answer:** 12 apples",
    "answer: 5 + 7 = 12",
    "Answer: 12<|im_end|>Answer: 99",
    "He has 7, buys 5, so 12.",
])
def test_chat_arithmetic_scorer_reads_typical_instruct_answers(text: str) -> None:
    scorer, extraction = load_task("arithmetic", 1, 1).scoring("chat")
    assert extraction == "answer_line_else_last_number"
    assert scorer(text, _row("q", "12"))


@pytest.mark.parametrize("text", [
    "Answer: 13", "7 + 5 = 12\nAnswer: 13", "The answer is 120.", "no number", "",
    "Answer: 12.5",
])
def test_chat_arithmetic_scorer_rejects_wrong_answers(text: str) -> None:
    assert not tasks.score_number(text, _row("q", "12"))


def test_chat_arithmetic_prefers_the_answer_line_over_later_numbers() -> None:
    assert tasks.extract_number("Answer: 30\n\nThis took 2 steps.") == "30"
    assert tasks.extract_number("Step 1: 4 - 1 = 3\nAnswer: 1,234") == "1,234"


@pytest.mark.parametrize("text", ["Answer: 12, since 7+5", "Answer: 12 (5+7)",
                                  "Answer: 5 + 7 = 12", "Answer: 7+5=12.", "**Answer:** 12"])
def test_chat_arithmetic_reads_the_answer_not_an_operand_after_it(text: str) -> None:
    assert tasks.extract_number(text) == "12"


def test_chat_arithmetic_keeps_a_negative_answer_and_splits_glued_operands() -> None:
    assert tasks.extract_number("Answer: 3 - 5 = -2") == "-2"
    assert tasks.extract_number("so 9-4") == "4"
    assert tasks.score_number("Answer: 1,234", _row("q", "1234"))


@pytest.mark.parametrize(("text", "ok"), [
    ("`os_path_join`", True), ("os_path_join", True), ("os_path_join()", True),
    ("**os_path_join**", True), ("The function is `os_path_join(a, *p)`.", True),
    ("posixpath.os_path_join", True), ("os_path_join.\nIt joins paths.", True),
    ("os_path_join_", False), ("OS_PATH_JOIN", False), ("join", False),
    ("The function joins paths.", False), ("", False),
])
def test_chat_docname_scorer_strips_markup_only(text: str, ok: bool) -> None:
    task = tasks.TaskData(train=[], eval=[], name="docname")
    scorer, extraction = task.scoring("chat")
    assert extraction == "first_line_name_without_markup"
    assert scorer(text, _row("q", "os_path_join")) is ok


def test_a_real_set_keeps_its_exact_scorer_in_chat() -> None:
    task = tasks.TaskData(train=[], eval=[], name="jsonl:x.jsonl")
    assert task.instruction("chat") == ""
    assert task.scoring("chat") == (score, tasks.PLAIN_EXTRACTION)


def test_task_accuracy_records_format_extraction_and_a_chat_budget(
        chat_tok, monkeypatch: pytest.MonkeyPatch) -> None:
    from effllm_helpers import evaluate

    task = load_task("arithmetic", 1, 2)
    seen: dict[str, object] = {}

    def fake_generate(model, tokenizer, prompts, max_new_tokens=32):
        seen.update(prompts=prompts, max_new_tokens=max_new_tokens)
        return [f"The answer is **{task.eval[0]['answer']}**.", "Answer: -1"]

    monkeypatch.setattr(evaluate, "generate_answers", fake_generate)
    acc, preds = evaluate.task_accuracy(None, chat_tok, task, "chat", max_new_tokens=20)
    assert acc["value"] == 0.5 and acc["n"] == 2 and len(preds) == 2
    assert acc["prompt_format"] == "chat"
    assert acc["extraction"] == "answer_line_else_last_number"
    assert seen["max_new_tokens"] == tasks.CHAT_MIN_NEW_TOKENS == acc["max_new_tokens"]
    assert seen["prompts"] == task.prompts(chat_tok, "chat")
    acc, _ = evaluate.task_accuracy(None, chat_tok, task, "plain", max_new_tokens=20)
    assert acc["value"] == 0.0 and acc["extraction"] == tasks.PLAIN_EXTRACTION
    assert seen["max_new_tokens"] == 20
