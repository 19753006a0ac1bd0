"""The docs: generated benchmark tables match their result files, links resolve, the README stays a front page.

``python -m benchmarks.report`` writes every ``<!-- generated:NAME -->`` block from ``benchmarks/results/NAME.json``;
these tests regenerate the pages in memory and compare, so a number edited by hand in a generated block fails here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from benchmarks import report, results

ROOT = Path(__file__).resolve().parents[1]


def test_generated_blocks_are_up_to_date():
    stale = [str(page.relative_to(ROOT)) for page, (old, new) in report.regenerate(ROOT).items() if old != new]
    assert stale == [], f"run `python -m benchmarks.report`: {stale} differ from benchmarks/results"


def test_a_number_edited_by_hand_is_caught():
    page = ROOT / "docs" / "benchmarks.md"
    text = page.read_text(encoding="utf-8")
    found = results.load_all()
    headline = json.loads((ROOT / "benchmarks" / "headline.json").read_text(encoding="utf-8"))
    cell = found["token_speed"]["rows"][1][-1]
    row = "| " + " | ".join(found["token_speed"]["rows"][1]) + " |"
    assert row in text
    edited = text.replace(row, row[: -len(cell) - 2] + "9.99 |")
    assert edited != text
    assert report.render_text(edited, found, headline) == text


def test_every_result_is_placed_once_and_every_block_has_a_result():
    found = results.load_all()
    where = report.placements(ROOT)
    assert set(where) - {"headline"} == set(found)
    assert {name: len(pages) for name, pages in where.items() if len(pages) != 1} == {}


def test_result_files_are_well_formed():
    for name, r in results.load_all().items():
        assert r["rows"], name
        assert r["command"] and r["date"][:4].isdigit() and r["machine"], name


def test_table_helper_round_trip(tmp_path, capsys):
    t = results.Table("| model | speedup |")
    t.add("| vit | 1.46x |")
    t.add(["cnn", "1.99×"])
    with pytest.raises(ValueError, match="the table 2"):
        t.add(["only one"])
    out = t.save(tmp_path / "demo.json", description="demo", machine="test machine", versions={"onnxruntime": "1"})
    r = results.load("demo", tmp_path)
    assert (r["columns"], r["rows"], r["machine"]) == (["model", "speedup"], [["vit", "1.46x"], ["cnn", "1.99×"]],
                                                       "test machine")
    assert out == tmp_path / "demo.json"
    printed = capsys.readouterr().out
    assert "| vit | 1.46x |" in printed and "|---|---|" in printed
    assert results.parse_table("text\n" + printed) == (r["columns"], r["rows"])
    rendered = report.render_result(r)
    assert "Measured:" in rendered and "test machine" in rendered and "| cnn | 1.99× |" in rendered


def _slug(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    return {_slug(m) for m in re.findall(r"^#+ (.+)$", text, flags=re.M)}


@pytest.mark.parametrize("page", report.pages(ROOT), ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(page):
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(target)
    assert broken == []


def test_readme_is_a_front_page():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    whole = "python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile --durations=20"
    assert whole in text and whole in (ROOT / ".ci" / "run").read_text(encoding="utf-8")  # CI runs the README's
    assert 'python -m pytest -q -n 2 --dist loadfile -m "not slow"' in text
