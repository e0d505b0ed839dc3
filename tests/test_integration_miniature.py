"""CI's slice of the miniature experiment: the committed models, a real vLLM server, the default
configuration; proxy-tuning through the API must keep closing most of the gap.

The full table (README, "Does it work?") is `python scripts/miniature.py evaluate`.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from scripts.miniature import DEFAULT_CONFIG, QUICK_QUESTIONS
from scripts.miniature_train import BUILD_VERSION, DEFAULT_DIR
from tests.support.constants import REPO

pytestmark = pytest.mark.integration

# At the default configuration the full run (240 questions) closes 95% of the gap and this slice
# 97% (32 of 36 right, tuned-large 33). 80%, the target, fails the slice if 6 more
# questions go wrong: far beyond what another CPU's float rounding flips, well within what a
# regression of the method does (k = 5 restrict: 51% on the full run).
GAP_FLOOR = 0.80


@pytest.fixture(scope="module")
def quick_table() -> str:
    assert (DEFAULT_DIR / "BUILD_VERSION").read_text().strip() == BUILD_VERSION, (
        "the committed miniature models are stale: python scripts/miniature.py build"
    )
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "miniature.py"), "evaluate", "--quick"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


def _rows(table: str) -> dict[tuple[str, str, str, str], list[str]]:
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and not line.startswith("| model"):
            rows[tuple(cells[:4])] = cells[4:]
    return rows


def _percent(cell: str) -> float:
    return float(cell.rstrip("%")) / 100


def test_the_last_line_reports_the_gap_closed_by_the_default_configuration(quick_table):
    k, unseen, _ = DEFAULT_CONFIG
    last = quick_table.strip().splitlines()[-1]
    match = re.fullmatch(rf"gap closed: (-?\d+)% \(k={k}, {unseen}\)", last)
    assert match, last
    assert int(match.group(1)) / 100 >= GAP_FLOOR, quick_table


def test_the_base_knows_the_facts_but_only_proxy_tuning_gives_them_in_the_tuned_format(
    quick_table,
):
    rows = _rows(quick_table)
    k, unseen, alpha = DEFAULT_CONFIG
    base = rows[("base-large alone", "", "", "")]
    expert = rows[("expert-small alone", "", "", "")]
    tuned = rows[("tuned-large", "", "", "")]
    via_api = rows[("base-large via API", str(k), "", "0")]
    proxy = rows[("proxy-tuned base-large", str(k), unseen, f"{alpha:g}")]
    # exact match, fact stated
    assert _percent(base[0]) <= 0.1 and _percent(base[1]) >= 0.5, base
    # the API loop at alpha 0 is the base (vLLM and transformers may split a near-tie once)
    for api_cell, local_cell in zip(via_api[:2], base[:2], strict=True):
        assert abs(_percent(api_cell) - _percent(local_cell)) <= 1 / QUICK_QUESTIONS, (
            via_api,
            base,
        )
    assert _percent(expert[0]) <= 0.25, expert  # too small to know held-out facts
    assert _percent(tuned[0]) >= 0.8, tuned
    assert _percent(proxy[0]) > max(_percent(base[0]), _percent(expert[0])) + 0.4, proxy
    assert len([line for line in quick_table.splitlines() if "| proxy" in line]) >= 2
    assert f"on {QUICK_QUESTIONS} held-out questions" in quick_table


def test_proxies_with_another_tokenizer_still_steer_the_base(quick_table):
    rows = _rows(quick_table)
    k, unseen, alpha = DEFAULT_CONFIG
    other = next(
        cells
        for key, cells in rows.items()
        if key[0].endswith("another tokenizer") and key[1:] == (str(k), unseen, f"{alpha:g}")
    )
    base = rows[("base-large alone", "", "", "")]
    assert _percent(other[0]) >= _percent(base[0]) + 0.4, other
