"""Fine-tuning task suites with exact-match scoring, and their SFT tensors (loss on responses only).

The paper fine-tunes on a general-reasoning set (OpenO1-SFT) and a medical one
(medical-o1-reasoning-SFT). Offline we need two built-in domains of the same shape that a tiny
model can partly learn in a few dozen steps, so that PEFT methods differ in something measurable:

* ``arithmetic``: short word problems (2-3 operands of 1-2 digits, + - x) whose response shows
  each step and ends ``Answer: <n>``; generated from a seed, so every run sees the same items.
  Levels (:data:`ARITHMETIC_LEVELS`): ``arithmetic:easy`` (one + or - of one-digit numbers),
  ``arithmetic:medium`` (two such steps), ``arithmetic:hard`` (= plain ``arithmetic``).
* ``docname``: mined from the standard library: the first line of a public function's docstring
  (plus its parameter names) -> the function's name. Real text, a different domain from sums.

Real sets load through the same call: ``hf:<dataset or local save_to_disk folder>[@split]`` and
``jsonl:<path>``. Their format is detected from the columns: OpenO1-SFT (``instruction``,
``output``), medical-o1-reasoning-SFT (``Question``, ``Complex_CoT``, ``Response``) or plain
``prompt``/``response`` (optional ``answer``). Every item is ``{"prompt", "response", "answer"}``.

Prompt template (training and generation must use the same one, see :func:`format_prompt`)::

    ### Question:
    {prompt}
    ### Answer:
    {response}<|endoftext|>

or, for a tokenizer with a chat template (``prompt_format: auto|chat``), the prompt as the user
turn and the response as the assistant turn of that template. An instruct model is not trained
on our response format, so in chat form a built-in task's user turn ends with an answer-format
instruction and its answers are read leniently (:data:`CHAT_FORMATS`); the plain format and its
exact-match scorer are unchanged. Records name the format and the extraction used.
"""

from __future__ import annotations

import ast
import hashlib
import json
import random
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from effllm_helpers.data.corpus import load_hf, stdlib_files, stdlib_root
from effllm_helpers.paths import cache_dir

PROMPT_TEMPLATE = "### Question:\n{prompt}\n### Answer:\n"
STOP_STRINGS = ("\n### ", "<|endoftext|>", "<|im_end|>", "<|eot_id|>", "</s>",
                "<end_of_turn>")  # where a generated response ends (plain and chat turns)
BUILTIN_TASKS = ("arithmetic", "arithmetic:easy", "arithmetic:medium", "arithmetic:hard",
                 "docname")

Item = dict[str, str]
Scorer = Callable[[str, Item], bool]


def prompt_style(tokenizer: Any, requested: str = "auto") -> str:
    """``chat`` or ``plain``: which format prompts take for ``tokenizer``.

    An instruct model scores near 0% on our ``### Question`` format and well with its own chat
    template, so ``auto`` uses the template whenever the tokenizer has one.
    """
    has_template = bool(getattr(tokenizer, "chat_template", None)) if tokenizer else False
    if requested == "plain" or (requested == "auto" and not has_template):
        return "plain"
    if requested not in ("auto", "chat"):
        raise ValueError(f"unknown prompt format {requested!r}; allowed: auto, chat, plain")
    if not has_template:
        raise ValueError("prompt_format 'chat' but the tokenizer has no chat_template; "
                         "use 'plain' or 'auto'")
    return "chat"


def format_prompt(prompt: str, tokenizer: Any = None, style: str = "plain") -> str:
    """The exact text a model sees before its response, in training and in generation.

    ``style="chat"`` renders a single user turn with ``tokenizer``'s chat template and the
    assistant's generation prompt, so the response that follows is the assistant turn.
    """
    if style == "plain":
        return PROMPT_TEMPLATE.format(prompt=prompt)
    if style != "chat":
        raise ValueError(f"unknown prompt style {style!r}; allowed: chat, plain")
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def response_end(tokenizer: Any, style: str = "plain") -> list[int]:
    """Token ids that close a response in training: eos for ``plain``; for ``chat``, the end of
    the assistant turn as the template writes it (e.g. ``<|im_end|>``), found by rendering a
    one-turn conversation and taking what follows the response text."""
    eos = tokenizer.eos_token_id
    if style == "plain":
        return [eos]
    marker = "\u2063RESPONSE\u2063"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}],
        tokenize=False)
    tail = text.split(marker, 1)[1] if marker in text else ""
    tail = tail.rstrip("\n") if tail.strip() else ""
    ids = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []
    return list(ids) or [eos]


# ---------------------------------------------------------------- scoring
def _cut_at_stops(text: str) -> str:
    """``text`` up to where a new template block, turn end or eos begins."""
    for stop in STOP_STRINGS:
        text = text.split(stop, 1)[0]
    return text


def _norm(text: str) -> str:
    text = " ".join(text.strip().split())
    text = text.strip("`'\"").strip()
    text = text.rstrip(".").strip()
    num = text.replace(",", "")
    if re.fullmatch(r"[-+]?\d+(\.\d+)?", num):
        value = float(num)
        return str(int(value)) if value.is_integer() else str(value)
    return text


def extract_answer(text: str, multiline: bool = False) -> str:
    """The final answer in a generated (or reference) response.

    The text is cut where a new template block or eos begins; then, in order of preference,
    the content of the last ``<Output>...</Output>`` (OpenO1), what follows the last ``Answer:``,
    or the first non-empty line. Unless ``multiline``, only the first line of that is kept.
    """
    text = _cut_at_stops(text)
    if "<Output>" in text:
        ans = text.rsplit("<Output>", 1)[1].split("</Output>", 1)[0]
    elif "Answer:" in text:
        ans = text.rsplit("Answer:", 1)[1]
    else:
        ans = text
    ans = ans.strip()
    if not multiline:
        ans = next((ln for ln in ans.splitlines() if ln.strip()), "")
    return ans.strip()


def score(prediction_text: str, item: Item) -> bool:
    """Exact match of the extracted final answer against ``item["answer"]`` (light normalising:
    whitespace, surrounding quotes/backticks, a trailing period, thousands separators)."""
    gold = item["answer"]
    pred = extract_answer(prediction_text, multiline="\n" in gold.strip())
    return bool(gold.strip()) and _norm(pred) == _norm(gold)


# a sign only where it cannot be an operator glued to the previous operand ("7+5" is 7 and 5)
_NUMBER = re.compile(r"(?<![\w)])-?\d+(?:,\d{3})*(?:\.\d+)?")
_ANSWER = re.compile(r"answer\s*:", re.IGNORECASE)


def extract_number(text: str) -> str:
    """The numeric answer of a free-form (instruct) response, ``""`` if it has no number.

    On the first non-empty line after the last ``Answer:`` (any case, markdown around it
    ignored): the first number after its last ``=`` (``Answer: 5 + 7 = 12`` -> 12), else its
    first number (``**Answer:** 12``, ``Answer: 12, since 7+5`` -> 12); with no
    ``Answer:`` line, the last number in the response (``The answer is **12**.`` -> 12), the
    usual lenient reading of a model's worked answer.
    """
    text = _cut_at_stops(text)
    parts = _ANSWER.split(text)
    if len(parts) > 1:
        line = next((ln for ln in parts[-1].splitlines() if ln.strip()), "")
        found = _NUMBER.findall(line.rsplit("=", 1)[-1]) or _NUMBER.findall(line)
        if found:
            return found[0]
    found = _NUMBER.findall(text)
    return found[-1] if found else ""


def score_number(prediction_text: str, item: Item) -> bool:
    """:func:`extract_number` equals ``item["answer"]`` as a number (1,234 == 1234, 12.0 == 12)."""
    pred = extract_number(prediction_text)
    return bool(pred) and _norm(pred) == _norm(item["answer"])


def extract_name(text: str) -> str:
    """The identifier a free-form response names: on its first non-empty line, the first
    `backticked` span if there is one, else the whole line; then markdown emphasis, quotes,
    a trailing period, a call's parentheses (``join(a, *p)`` -> ``join``) and a module path
    (``os.path.join`` -> ``join``) are dropped. Case is kept: ``Join`` is not ``join``."""
    text = _cut_at_stops(text)
    line = next((ln for ln in text.splitlines() if ln.strip()), "").strip()
    ticked = re.search(r"`([^`]+)`", line)
    name = ticked.group(1) if ticked else line
    name = name.strip().strip("*'\"").strip().rstrip(".").strip()  # not _: print_ is a name
    name = name.split("(", 1)[0].strip()
    if re.fullmatch(r"[A-Za-z_][\w.]*", name):
        name = name.rsplit(".", 1)[-1]
    return name


def score_name(prediction_text: str, item: Item) -> bool:
    """:func:`extract_name` equals ``item["answer"]`` exactly."""
    gold = item["answer"].strip()
    return bool(gold) and extract_name(prediction_text) == gold


@dataclass(frozen=True)
class ChatFormat:
    """How a built-in task is asked and read in chat form: the instruction that ends the user
    turn, the scorer, and the extraction's name for the record."""

    instruction: str
    scorer: Scorer
    extraction: str


CHAT_FORMATS: dict[str, ChatFormat] = {
    "arithmetic": ChatFormat("Solve it step by step, then end with a line `Answer: <number>`.",
                             score_number, "answer_line_else_last_number"),
    "docname": ChatFormat("Reply with only the function name.", score_name,
                          "first_line_name_without_markup"),
}
PLAIN_EXTRACTION = "final_answer_exact"  # :func:`score`: first line after the last Answer:
# an instruct model reasons before its answer line: a chat generation gets at least this many
# new tokens (the plain format's budget is the longest reference response + 4)
CHAT_MIN_NEW_TOKENS = 128


def with_instruction(prompt: str, instruction: str) -> str:
    """The user turn: the task's prompt, then its answer-format instruction (if any)."""
    return f"{prompt}\n\n{instruction}" if instruction else prompt


@dataclass
class TaskData:
    """Train and eval items of one task and the function that scores a generation."""

    train: list[Item]
    eval: list[Item]
    name: str
    scorer: Scorer = score

    def _chat_format(self) -> Any:
        """The chat format of this task's family (``arithmetic:easy`` is ``arithmetic``)."""
        return CHAT_FORMATS.get(self.name.partition(":")[0])

    def instruction(self, style: str) -> str:
        """The answer-format instruction this task's chat prompts end with (none in plain)."""
        fmt = self._chat_format()
        return fmt.instruction if style == "chat" and fmt else ""

    def prompts(self, tokenizer: Any, style: str,
                items: Sequence[Item] | None = None) -> list[str]:
        """The exact texts a model sees before its answers to ``items`` (``eval`` by default)."""
        items = self.eval if items is None else items
        instruction = self.instruction(style)
        return [format_prompt(with_instruction(it["prompt"], instruction), tokenizer, style)
                for it in items]

    def scoring(self, style: str) -> tuple[Scorer, str]:
        """The scorer for ``style`` and its extraction's name: a built-in task in chat form is
        read leniently (:data:`CHAT_FORMATS`); everything else by exact match (:func:`score`)."""
        fmt = self._chat_format()
        if style == "chat" and fmt and self.scorer is score:
            return fmt.scorer, fmt.extraction
        return self.scorer, PLAIN_EXTRACTION if self.scorer is score else self.scorer.__name__

    def accuracy(self, predictions: Sequence[str], items: Sequence[Item] | None = None) -> float:
        """Fraction of ``predictions`` that the scorer accepts (against ``eval`` by default)."""
        items = self.eval if items is None else items
        if len(predictions) != len(items):
            raise ValueError(f"{len(predictions)} predictions for {len(items)} items")
        if not items:
            return float("nan")
        hits = sum(self.scorer(p, it) for p, it in zip(predictions, items, strict=True))
        return hits / len(items)


# ---------------------------------------------------------------- arithmetic
_NAMES = ("Ana", "Ben", "Carla", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jade", "Kai", "Lena")
_ITEMS = ("apples", "marbles", "stamps", "coins", "books", "shells", "cards", "pens")
_ADD = ("buys {x} more", "finds {x} more", "gets {x} more")
_SUB = ("gives away {x}", "loses {x}", "sells {x}")
_MUL = ("ends up with {x} times as many",)
MAX_OPERAND = 30  # 1-2 digit operands (level ``hard``)
MAX_FACTOR = 5  # multiplications stay small, so a tiny model can learn them


@dataclass(frozen=True)
class ArithmeticLevel:
    """How hard the ``arithmetic`` items of one level are.

    ``steps``: how many operations an item may chain (one is drawn); ``start`` and ``operand``:
    inclusive ranges of the first number and of each added/subtracted one; ``first_ops``: the
    operations allowed in the first step (later steps only add or subtract); ``factor``: the
    largest multiplier.
    """

    steps: tuple[int, ...]
    start: tuple[int, int]
    operand: tuple[int, int]
    first_ops: tuple[str, ...]
    factor: int = MAX_FACTOR


# ``arithmetic`` is ``hard`` (the original suite). A 41 M model fine-tuned for a few hundred steps
# stays near 0 on it: two-digit sums are a ~900-fact table and the BPE splits numbers
# inconsistently (" 15" -> " 1", "5"; "13" -> "13"). ``easy`` is one + or - of one-digit numbers
# (results 0-18), ``medium`` two such steps: the facts fit a few thousand examples, and eval
# items are still prompts never seen in training (other names, things, phrasings, numbers).
ARITHMETIC_LEVELS: dict[str, ArithmeticLevel] = {
    "easy": ArithmeticLevel(steps=(1,), start=(1, 9), operand=(1, 9), first_ops=("+", "-")),
    "medium": ArithmeticLevel(steps=(2,), start=(1, 9), operand=(1, 9), first_ops=("+", "-")),
    "hard": ArithmeticLevel(steps=(1, 2), start=(2, MAX_OPERAND), operand=(1, MAX_OPERAND),
                            first_ops=("+", "-", "*")),
}


def arithmetic_level(name: str) -> str | None:
    """The level a task name asks for (``arithmetic`` -> ``hard``, ``arithmetic:easy`` ->
    ``easy``); None when ``name`` is not an arithmetic task. Unknown levels raise."""
    kind, sep, level = name.partition(":")
    if kind != "arithmetic":
        return None
    level = level if sep else "hard"
    if level not in ARITHMETIC_LEVELS:
        raise ValueError(f"unknown arithmetic level {level!r}; allowed: "
                         f"{', '.join(ARITHMETIC_LEVELS)}")
    return level


def _arith_item(rng: random.Random, level: ArithmeticLevel = ARITHMETIC_LEVELS["hard"]) -> Item:
    name, thing = rng.choice(_NAMES), rng.choice(_ITEMS)
    value = rng.randint(*level.start)
    sentences = [f"{name} has {value} {thing}."]
    steps: list[str] = []
    for i in range(rng.choice(level.steps)):
        op = rng.choice(level.first_ops if i == 0 else ("+", "-"))
        if op == "-" and value < 2:
            op = "+"
        if op == "+":
            x = rng.randint(*level.operand)
            phrase, new = rng.choice(_ADD), value + x
        elif op == "-":
            x = rng.randint(level.operand[0], min(value, level.operand[1]))
            phrase, new = rng.choice(_SUB), value - x
        else:
            x = rng.randint(2, level.factor)
            phrase, new = rng.choice(_MUL), value * x
        lead = f"Then {name}" if i else name
        sentences.append(f"{lead} {phrase.format(x=x)}.")
        steps.append(f"{value} {'x' if op == '*' else op} {x} = {new}")
        value = new
    sentences.append(f"How many {thing} does {name} have now?")
    response = "\n".join(steps + [f"Answer: {value}"])
    return {"prompt": " ".join(sentences), "response": response, "answer": str(value)}


def arithmetic_items(n: int, seed: int = 0, level: str = "hard") -> list[Item]:
    """``n`` distinct arithmetic word problems of ``level``, the same for the same seed."""
    spec = ARITHMETIC_LEVELS[level]
    # the hard level keeps its original stream, so its items are those of earlier records
    rng = random.Random(f"arithmetic-{seed}" if level == "hard" else f"arithmetic-{level}-{seed}")
    out: list[Item] = []
    seen: set[str] = set()
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 50 * n + 1000:
            raise ValueError(f"could only make {len(out)} distinct arithmetic items, asked {n}")
        item = _arith_item(rng, spec)
        if item["prompt"] not in seen:
            seen.add(item["prompt"])
            out.append(item)
    return out


# ---------------------------------------------------------------- docname
def _doc_first_line(node: ast.AST) -> str | None:
    doc = ast.get_docstring(node, clean=True)
    if not doc:
        return None
    # the first paragraph, not the first line: summaries often wrap mid-sentence
    para = " ".join(doc.strip().split("\n\n", 1)[0].split())
    if len(para) > 160 and ". " in para:
        para = para.split(". ", 1)[0] + "."
    return para if 10 <= len(para) <= 160 else None


def _params(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    a = fn.args
    names = [x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs)]
    if a.vararg:
        names.append("*" + a.vararg.arg)
    if a.kwarg:
        names.append("**" + a.kwarg.arg)
    return [n for n in names if n not in ("self", "cls")]


def _mine_docnames() -> list[dict[str, Any]]:
    """(docstring line, params, name, file, line) of public stdlib functions, in file order."""
    root = stdlib_root()
    rows: list[dict[str, Any]] = []
    for rel in stdlib_files(root):
        try:
            tree = ast.parse((root / rel).read_bytes())
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            if node.name.startswith("_"):
                continue
            line = _doc_first_line(node)
            if line is None:
                continue
            rows.append({"doc": line, "params": _params(node), "name": node.name,
                         "file": rel, "lineno": node.lineno})
    rows.sort(key=lambda r: (r["file"], r["lineno"]))
    return rows


def docname_pool() -> list[Item]:
    """All unambiguous docname items of this interpreter's stdlib (mined once, cached as JSON)."""
    root = stdlib_root()
    files = stdlib_files(root)
    sig = hashlib.sha256(json.dumps([[f, (root / f).stat().st_size] for f in files]).encode())
    ver = ".".join(map(str, sys.version_info[:2]))
    path = cache_dir("tasks") / f"docname-py{ver}-{sig.hexdigest()[:12]}.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            pass
    by_prompt: dict[str, set[str]] = {}
    order: list[str] = []
    for r in _mine_docnames():
        params = ", ".join(r["params"]) if r["params"] else "(none)"
        prompt = f"Which function is this? {r['doc']}\nParameters: {params}"
        if prompt not in by_prompt:
            by_prompt[prompt] = set()
            order.append(prompt)
        by_prompt[prompt].add(r["name"])
    # a description shared by functions of different names has no single right answer: dropped
    items = [{"prompt": p, "response": next(iter(by_prompt[p])), "answer": next(iter(by_prompt[p]))}
             for p in order if len(by_prompt[p]) == 1]
    tmp = path.with_suffix(f".tmp{id(items)}")
    tmp.write_text(json.dumps(items))
    tmp.replace(path)
    return items


# ---------------------------------------------------------------- real sets
def detect_format(columns: Sequence[str]) -> str:
    """``openo1``, ``medical`` or ``prompt_response`` from a data set's column names."""
    cols = set(columns)
    if {"instruction", "output"} <= cols:
        return "openo1"
    if {"Question", "Response"} <= cols:
        return "medical"
    if {"prompt", "response"} <= cols:
        return "prompt_response"
    raise ValueError(f"unknown fine-tuning format with columns {sorted(cols)}: expected "
                     "OpenO1-SFT (instruction, output), medical-o1-reasoning-SFT (Question, "
                     "Complex_CoT, Response) or prompt/response")


def to_item(row: dict[str, Any], fmt: str) -> Item:
    """One row of a real set as ``{"prompt", "response", "answer"}``."""
    if fmt == "openo1":
        prompt = str(row["instruction"]).strip()
        extra = str(row.get("input") or "").strip()
        if extra:
            prompt = f"{prompt}\n\n{extra}"
        response = str(row["output"]).strip()
        return {"prompt": prompt, "response": response,
                "answer": extract_answer(response, multiline=True)}
    if fmt == "medical":
        answer = str(row["Response"]).strip()
        cot = str(row.get("Complex_CoT") or "").strip()
        response = f"{cot}\nAnswer: {answer}" if cot else f"Answer: {answer}"
        return {"prompt": str(row["Question"]).strip(), "response": response, "answer": answer}
    if fmt == "prompt_response":
        response = str(row["response"]).strip()
        answer = row.get("answer")
        answer = str(answer).strip() if answer not in (None, "") else extract_answer(
            response, multiline=True)
        return {"prompt": str(row["prompt"]).strip(), "response": response, "answer": answer}
    raise ValueError(f"unknown format {fmt!r}")


def _split_rows(rows: list[dict[str, Any]], n_train: int, n_eval: int,
                seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Eval first (so it is the same whatever n_train), then train from the rest, shuffled."""
    if len(rows) < 2:
        raise ValueError(f"need at least 2 rows for a train and an eval split, got {len(rows)}")
    n_ev = min(n_eval, max(1, len(rows) // 2)) if len(rows) < n_train + n_eval else n_eval
    perm = np.random.default_rng(seed).permutation(len(rows))
    ev = [rows[int(i)] for i in perm[:n_ev]]
    tr = [rows[int(i)] for i in perm[n_ev:n_ev + n_train]]
    return tr, ev


def _hf_task(arg: str, n_train: int, n_eval: int, seed: int) -> tuple[list[Item], list[Item]]:
    ds = load_hf(arg)
    if isinstance(ds.column_names, dict):  # a DatasetDict
        names = list(ds.keys())
        tr_name = "train" if "train" in names else names[0]
        ev_name = next((n for n in ("test", "validation", "valid", "val") if n in names), None)
        if ev_name is not None:
            fmt = detect_format(ds[tr_name].column_names)
            tr_ds, ev_ds = ds[tr_name], ds[ev_name]
            tr_idx = np.random.default_rng(seed).permutation(len(tr_ds))[:n_train]
            ev_idx = np.random.default_rng(seed + 1).permutation(len(ev_ds))[:n_eval]
            return ([to_item(tr_ds[int(i)], fmt) for i in tr_idx],
                    [to_item(ev_ds[int(i)], fmt) for i in ev_idx])
        ds = ds[tr_name]
    fmt = detect_format(ds.column_names)
    if len(ds) < 2:
        raise ValueError(f"hf:{arg}: need at least 2 rows, got {len(ds)}")
    n_ev = min(n_eval, max(1, len(ds) // 2)) if len(ds) < n_train + n_eval else n_eval
    perm = np.random.default_rng(seed).permutation(len(ds))
    ev = [to_item(ds[int(i)], fmt) for i in perm[:n_ev]]
    tr = [to_item(ds[int(i)], fmt) for i in perm[n_ev:n_ev + n_train]]
    return tr, ev


def _jsonl_task(path: Path, n_train: int, n_eval: int, seed: int) -> tuple[list[Item], list[Item]]:
    from .corpus import jsonl_rows

    rows = [obj for _, obj in jsonl_rows(path)]
    if not rows:
        raise ValueError(f"jsonl:{path}: empty")
    fmt = detect_format(list(rows[0]))
    tr, ev = _split_rows(rows, n_train, n_eval, seed)
    return [to_item(r, fmt) for r in tr], [to_item(r, fmt) for r in ev]


def load_task(name: str, n_train: int, n_eval: int, seed: int = 0) -> TaskData:
    """Train/eval items of a built-in task (``arithmetic``, ``docname``) or a real set.

    Train and eval never share a prompt; the same (name, sizes, seed) gives the same items.
    """
    if n_train < 0 or n_eval < 1:
        raise ValueError("n_train must be >= 0 and n_eval >= 1")
    level = arithmetic_level(name)
    if level is not None:
        items = arithmetic_items(n_train + n_eval, seed, level)
        # eval first so eval items stay the same when n_train changes
        return TaskData(train=items[n_eval:], eval=items[:n_eval], name=name)
    if name == "docname":
        pool = docname_pool()
        if n_train + n_eval > len(pool):
            raise ValueError(f"docname has {len(pool)} items on this Python; asked "
                             f"{n_train} + {n_eval}")
        tr, ev = _split_rows(pool, n_train, n_eval, seed)
        return TaskData(train=tr, eval=ev, name=name)
    kind, _, arg = name.partition(":")
    if kind == "hf" and arg:
        tr, ev = _hf_task(arg, n_train, n_eval, seed)
    elif kind == "jsonl" and arg:
        tr, ev = _jsonl_task(Path(arg).expanduser(), n_train, n_eval, seed)
    else:
        raise ValueError(f"unknown task {name!r}: use {', '.join(BUILTIN_TASKS)}, "
                         "hf:<dataset or folder>, jsonl:<path>")
    return TaskData(train=tr, eval=ev, name=name)


# ---------------------------------------------------------------- SFT tensors
def sft_rows(items: Sequence[Item], tokenizer: Any, max_len: int, style: str = "plain",
             instruction: str = "") -> list[tuple[list[int], list[int]]]:
    """``(prompt ids, response ids)`` per item for supervised fine-tuning.

    Each row is ``format_prompt(prompt) + response + eos`` (``style="chat"``: the chat
    template's user turn and generation prompt, then the response and the template's end of
    the assistant turn; the user turn ends with ``instruction``, as
    :meth:`TaskData.prompts` writes it). The loss is on the response (and its eos) only.
    Too-long rows keep the *end* of the prompt (the template tail) and at least half of
    ``max_len`` for the response, which is cut at the end if it still does not fit.
    """
    if not items:
        raise ValueError("no items")
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no eos token")
    instruction = instruction if style == "chat" else ""
    enc = tokenizer([format_prompt(with_instruction(it["prompt"], instruction), tokenizer, style)
                     for it in items], add_special_tokens=False)
    enc_r = tokenizer([it["response"] for it in items], add_special_tokens=False)
    end = response_end(tokenizer, style)
    rows: list[tuple[list[int], list[int]]] = []
    for p, r in zip(enc["input_ids"], enc_r["input_ids"], strict=True):
        r = list(r) + end
        if len(p) + len(r) > max_len:
            keep_p = min(len(p), max(max_len - len(r), max_len // 2))
            p = p[len(p) - keep_p:]
            r = r[: max_len - len(p)]
        rows.append((list(p), r))
    return rows


def pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def sft_tensors(items: Sequence[Item], tokenizer: Any, max_len: int,
                pad_to_max: bool = False, style: str = "plain",
                instruction: str = "") -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask``, ``labels`` of :func:`sft_rows`, right-padded with the
    pad token to the longest row (``max_len`` with ``pad_to_max``); labels -100 on the prompt
    and on padding."""
    from .packing import META_KEYS, padded

    rows = sft_rows(items, tokenizer, max_len, style, instruction)
    out = padded(rows, pad_id(tokenizer), max_len if pad_to_max else None)
    for key in META_KEYS:
        out.pop(key)
    return out
