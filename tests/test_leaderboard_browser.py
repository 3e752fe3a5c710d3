"""The HTML leaderboard in a real headless browser: sorting by a header, filtering by a select.

Needs the ``playwright`` Python package and Debian's chromium (``apt-get install chromium``);
skips with the reason when either is absent. Uses the system chromium, never a downloaded one.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
from fixtures_records import all_records

from effllm_helpers import results as R
from effllm_helpers.report import leaderboard as L

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

try:
    from playwright import sync_api
except ImportError as exc:  # absent, or present but broken
    pytest.skip(f"python package 'playwright' not usable ({exc}); install it with "
                "'.venv/bin/pip install playwright'", allow_module_level=True)
if not CHROMIUM.exists() and not shutil.which("chromium"):
    pytest.skip("chromium not installed (apt-get install -y chromium)", allow_module_level=True)


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory):
    tidy = pd.DataFrame([row for rec in all_records() for row in R.tidy_rows(rec)])
    out = tmp_path_factory.mktemp("board")
    html_path, _ = L.write_leaderboard(tidy, out / "leaderboard.html", out)
    exe = str(CHROMIUM) if CHROMIUM.exists() else shutil.which("chromium")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, args=ARGS, timeout=20_000)
        pg = browser.new_page()
        pg.set_default_timeout(10_000)
        pg.goto(html_path.as_uri())
        yield pg
        browser.close()


def _column(pg, label: str) -> list[str]:
    """Texts of the visible rows in the column whose header starts with ``label``."""
    return pg.evaluate(
        """(label) => {
          const heads = Array.from(document.querySelectorAll('#board thead th'));
          const i = heads.findIndex(h => h.textContent.trim().startsWith(label));
          return Array.from(document.querySelectorAll('#board tbody tr'))
            .filter(r => !r.hidden).map(r => r.cells[i].textContent.trim());
        }""", label)


def test_clicking_a_header_sorts_rows(page) -> None:
    page.select_option("#f-axis", "")
    before = _column(page, "efficiency score")
    page.click("#board thead th:has-text('efficiency score')")
    asc = _column(page, "efficiency score")
    nums = [float(v) for v in asc if v != "–"]
    assert asc != before and nums == sorted(nums)
    assert all(v == "–" for v in asc[len(nums):])  # failed runs (no score) sort last
    page.click("#board thead th:has-text('efficiency score')")
    desc = [float(v) for v in _column(page, "efficiency score") if v != "–"]
    assert desc == sorted(nums, reverse=True)


def test_filter_shows_only_matching_rows(page) -> None:
    page.select_option("#f-axis", "inference")
    axes = _column(page, "axis")
    assert axes and set(axes) == {"inference"}
    assert len(axes) == 18
    page.select_option("#f-size", "gpt2")
    assert set(_column(page, "size / model")) == {"gpt2"}
    assert "6 of 70 runs shown" in page.inner_text("#count")
    page.select_option("#f-size", "")
    page.select_option("#f-axis", "")
    assert len(_column(page, "axis")) == 70


def _visible_headers(pg) -> list[str]:
    return pg.evaluate("""() => Array.from(document.querySelectorAll('#board thead th'))
        .filter(h => !h.hidden).map(h => h.dataset.label)""")


def test_headers_show_tooltips(page) -> None:
    tip = page.get_attribute("#board thead th[data-label='tpot_s (s)']", "title")
    assert "time per output token" in tip and "unit: s" in tip and "lower is better" in tip


def test_axis_filter_hides_other_axes_columns(page) -> None:
    page.select_option("#f-size", "")
    page.select_option("#f-axis", "inference")
    shown = _visible_headers(page)
    assert "it (tokens/s)" in shown and "ttft_s (s)" in shown
    assert not any(h.startswith(("tt ", "st ", "val_ppl", "eval_loss")) for h in shown)
    page.select_option("#f-axis", "architecture")
    shown = _visible_headers(page)
    assert any(h.startswith("tt ") for h in shown) and "it (tokens/s)" not in shown
    page.select_option("#f-axis", "")


def test_export_writes_the_current_view_as_latex_and_markdown(page) -> None:
    page.select_option("#f-axis", "inference")
    page.select_option("#f-size", "gpt2")
    page.click("#export-latex")
    tex = page.input_value("#export-text")
    assert tex.startswith("\\begin{tabular}{") and tex.rstrip().endswith("\\end{tabular}")
    body = tex.split("\\midrule", 1)[1].split("\\bottomrule", 1)[0]
    assert body.count("\\\\") == 6  # the 6 rows shown, nothing else
    assert "it (tokens/s)" in tex and "tt (" not in tex
    page.click("#export-md")
    md = page.input_value("#export-text").splitlines()
    assert md[0].startswith("| axis |") and set(md[1]) <= set("|- ") and len(md) == 2 + 6
    assert page.get_attribute("#export-dl", "download") == "leaderboard.md"
    page.select_option("#f-size", "")
    page.select_option("#f-axis", "")


def test_latex_export_escapes_every_tex_special_once(page) -> None:
    esc = page.evaluate(r"""window.effllmBoard.texEscape('^^5cinput{x} a\\b ~ 50% #1 $_&')""")
    assert "^" not in esc.replace("\\textasciicircum{}", "")  # ^^5c would compile to \input
    assert esc.startswith("\\textasciicircum{}\\textasciicircum{}5cinput\\{x\\}")
    assert "a\\textbackslash{}b" in esc  # its braces are not escaped a second time
    assert "\\textasciitilde{} 50\\% \\#1 \\$\\_\\&" in esc
