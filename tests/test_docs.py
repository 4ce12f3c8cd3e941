"""The documentation site: it builds with `mkdocs build --strict` (every link and page checked,
the reference pages generated from the code), every measured table on a results page carries
its provenance, README stays a short front page, and nothing points at a file outside the
repository."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROVENANCE_KEYS = ("command", "commit", "date", "machine", "torch threads", "seeds")


def test_the_site_builds_strict_with_the_generated_reference(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    site = tmp_path / "site"
    config = (site / "reference" / "config" / "index.html").read_text()
    for key in ("model.loops", "objective.entropy_weight", "train.max_steps", "data.state.length"):
        assert f"<code>{key}</code>" in config, key  # every config key, from the code
    assert "T: times the looped stack runs" in config  # the comment beside the field
    assert "val/acc_step1" in (site / "reference" / "metrics" / "index.html").read_text()
    cli = (site / "reference" / "cli" / "index.html").read_text()
    assert "ouro-lab sweep" in cli and "--dry-run" in cli
    assert "load_config" in (site / "reference" / "api" / "index.html").read_text()


def _sections(text: str):
    """(heading, body) of each part of a page between headings (fenced code left out: a `# ...`
    line in a shell block is no heading)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    parts = re.split(r"^(#{1,6} .*)$", text, flags=re.M)
    yield "(top)", parts[0]
    for i in range(1, len(parts), 2):
        yield parts[i], parts[i + 1]


def _tables(body: str) -> list[int]:
    """Start offsets of the markdown tables in a section (a header row followed by |---|)."""
    return [m.start() for m in re.finditer(r"^\|.*\|\n\|[-:| ]+\|$", body, flags=re.M)]


@pytest.mark.parametrize("page", sorted((ROOT / "docs" / "results").glob("*.md")), ids=lambda p: p.name)
def test_every_measured_table_carries_its_provenance(page):
    for heading, body in _sections(page.read_text()):
        starts = _tables(body)
        for i, start in enumerate(starts):
            end = starts[i + 1] if i + 1 < len(starts) else len(body)
            after = body[start:end] if i + 1 < len(starts) else body[start:]
            block = re.search(r'!!! info "Provenance"\n((?:    .*\n?)+)', after)
            if block is None and i + 1 < len(starts):  # tables sharing one block: it follows the last
                block = re.search(r'!!! info "Provenance"\n((?:    .*\n?)+)', body[start:])
            assert block, f"{page.name} {heading}: a table without a provenance block after it"
            missing = [k for k in PROVENANCE_KEYS if not re.search(rf"^    - {k}: \S", block.group(1), re.M)]
            assert not missing, f"{page.name} {heading}: provenance lacks {missing}"


def test_the_provenance_check_catches_a_table_without_one(tmp_path):
    """The check above on a page with one table that has its block and one that does not."""
    good = "| a | b |\n|---|---|\n| 1 | 2 |\n\n!!! info \"Provenance\"\n" + "".join(
        f"    - {k}: x\n" for k in PROVENANCE_KEYS)
    page = tmp_path / "p.md"
    page.write_text(f"# P\n\n## One\n\n{good}\n## Two\n\n| c |\n|---|\n| 3 |\n")
    with pytest.raises(AssertionError, match="Two"):
        test_every_measured_table_carries_its_provenance(page)
    page.write_text(f"# P\n\n## One\n\n{good}")
    test_every_measured_table_carries_its_provenance(page)


def test_readme_is_a_short_front_page_that_links_the_docs():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 160
    for link in re.findall(r"\]\((docs/[^)#]+)", text):
        assert (ROOT / link).exists(), link


def test_nothing_points_at_a_file_outside_the_repository():
    outside = ["DESIGN" + ".md", "../" + "shared"]  # (spelt apart, so this file does not match itself)
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    found = []
    for name in tracked:
        path = ROOT / name
        if path.suffix not in {".py", ".md", ".yaml", ".yml", ".ipynb", ".toml", ".txt"} or not path.exists():
            continue
        text = path.read_text(errors="replace")
        found += [f"{name}: {o}" for o in outside if o in text]
    assert not found, found


def test_a_results_script_rewrites_its_table_with_a_full_provenance_block(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from results_page import provenance, rewrite

    page = tmp_path / "page.md"
    page.write_text("# R\n\n## T\n\n<!-- t.py: begin -->\nold\n<!-- t.py: end -->\n\nprose after\n")
    block = ["| a | b |", "|---|---|", "| 1 | 2 |", "", *provenance("python t.py", "0, 1", {"abcdef123456"})]
    rewrite(page, "t.py", block)
    text = page.read_text()
    assert "old" not in text and "| 1 | 2 |" in text and text.endswith("prose after\n")
    assert "    - commit: abcdef1" in text
    test_every_measured_table_carries_its_provenance(page)  # every key the check wants
    with pytest.raises(SystemExit, match="no <!-- other.py: begin -->"):
        rewrite(page, "other.py", block)
