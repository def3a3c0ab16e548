"""The docs point only at files the repository has, and the README stays a landing page."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
TOP = ("results/", "experiments/", "bench/", "circuitlab/", "tests/", "docs/", ".ci/")
# written by docs/gen_pages.py at build time (mkdocs build --strict checks links to them)
GENERATED = ("docs/api/", "docs/experiments/", "docs/guide/glossary.md")
# `code` spans and (link) targets that name a repository path; placeholders (<name>, {a,b}, *) are patterns
REF = re.compile(r"`([^`\s]+)`|\]\(([^)\s#]+)")


def referenced_paths(page: Path) -> list[str]:
    out = []
    for match in REF.finditer(page.read_text()):
        ref = (match.group(1) or match.group(2)).rstrip(".,:;")
        if match.group(2):  # a link: relative to the page
            if "://" in ref:
                continue
            ref = str((page.parent / ref).resolve().relative_to(ROOT)) if (page.parent / ref).resolve().is_relative_to(ROOT) else ref
        ref = ref.split("::")[0].split(":")[0]
        if ref.startswith(TOP) and not ref.startswith(GENERATED) and not re.search(r"[<>{}*\[\]]|\.\.\.|NN", ref):
            out.append(ref)
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_referenced_file_exists(page):
    missing = [ref for ref in referenced_paths(page) if not (ROOT / ref).exists()]
    assert not missing, f"{page.relative_to(ROOT)} names files the repository lacks: {sorted(set(missing))}"


def test_reference_check_catches_a_missing_file(tmp_path):
    page = ROOT / "docs" / "_probe_missing.md"
    try:
        page.write_text("see `results/no_such_folder/table.csv` and [x](../results/nope.csv)\n")
        assert referenced_paths(page) == ["results/no_such_folder/table.csv", "results/nope.csv"]
    finally:
        page.unlink()


def test_readme_is_a_landing_page():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250
