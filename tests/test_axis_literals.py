"""An axis is named in its spec (axes/spec.py) only: no other module keys code on its name.

Why: a table of its own per axis (a size column here, headline metrics there) is how
``effllm compare`` came to drop every cross-modal run while the rest of the report drew them.
A Python string constant equal to an axis name, outside docstrings, is such a table or branch.
Study files, notebooks, tests and prose (docstrings, comments, messages that mention an axis
among other words) may name axes.
"""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

from effllm_helpers.axes.spec import STUDY_AXES

PKG = Path(__file__).resolve().parents[1] / "effllm_helpers"
HOME = PKG / "axes" / "spec.py"
AXIS_NAMES = frozenset(STUDY_AXES)  # smoke is a pipe test, not a study axis

# places that still name an axis, with how often: each one is a debt to move into the spec.
# A new one fails the test; paying one off fails it too until its count here is lowered.
KNOWN: dict[str, int] = {
    # the floor below the spec (the spec imports its schemas): its name -> schema table
    "effllm_helpers/config.py": 4,
    # below the axes too (models/ must not import them): the embedded model is built from the
    # architecture and fine-tuning presets, and the image classifier's cache folder is named so
    "effllm_helpers/models/embedded.py": 4,
    "effllm_helpers/evaluate_images.py": 1,
}


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the constant nodes that are docstrings (a body's first expression)."""
    out: set[int] = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant):
            out.add(id(body[0].value))
    return out


def axis_literals(source: str) -> list[tuple[int, str]]:
    """(line, name) of every string constant in ``source`` that is an axis name."""
    tree = ast.parse(source)
    docs = _docstrings(tree)
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and n.value in AXIS_NAMES and id(n) not in docs]


def test_the_scan_finds_a_literal_and_skips_docstrings_and_comments() -> None:
    src = '"""inference"""\ndef f():\n    """finetuning"""\n    return {"cross_modal": 1}  # x\n'
    assert axis_literals(src) == [(4, "cross_modal")]


def test_no_axis_name_outside_its_spec() -> None:
    found = Counter()
    where: dict[str, list[str]] = {}
    for path in sorted(PKG.rglob("*.py")):
        if path == HOME:
            continue
        rel = str(path.relative_to(PKG.parent))
        for line, name in axis_literals(path.read_text()):
            found[rel] += 1
            where.setdefault(rel, []).append(f"{line}: {name!r}")
    assert dict(found) == KNOWN, "\n".join(
        f"{rel}: {', '.join(lines)}" for rel, lines in where.items()
        if found[rel] != KNOWN.get(rel))
