"""Every number in the measured blocks of the README and the docs comes from a committed results file.

A measured block is fenced by ``<!-- numbers: results/a.csv results/b/config.json -->`` and
``<!-- /numbers -->``. Each number shown there must equal, at the precision shown, a number in one
of the named files (as a fraction or as a percentage); change a result or a README number alone and
this test fails. Numbers that are not measurements (paper citations, settings) go outside blocks
or in backticks.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"<!-- numbers: (?P<files>[^>]*?) -->(?P<body>.*?)<!-- /numbers -->", re.S)
NUMBER = re.compile(r"(?<![\w.])[-−]?\d[\d,]*(?:\.\d+)?(?![\w])")


def _numbers(text: str) -> list[str]:
    text = re.sub(r"`[^`]*`", " ", text)  # code spans: names and commands, not measurements
    text = re.sub(r"\[[^\]]*\]\([^)]*\)", " ", text)  # link targets
    text = re.sub(r"\bL\d+[NH]\d+\b|\b\d+/−?-?\d+\b", " ", text)  # unit names (L23N42), layer/position labels
    return [m.group(0).replace("−", "-").replace(",", "") for m in NUMBER.finditer(text)]


def _values(paths: list[Path]) -> list[float]:
    out = []
    for path in paths:
        out += [float(x) for x in re.findall(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?", path.read_text())]
    return out


def _matches(shown: str, values: list[float]) -> bool:
    decimals = len(shown.split(".")[1]) if "." in shown else 0
    target = float(shown)
    tol = 0.5 * 10 ** -decimals + 1e-9
    return any(abs(v - target) <= tol or abs(100 * v - target) <= tol or abs(abs(v) - abs(target)) <= tol
               for v in values)


def blocks(readme: str):
    for match in BLOCK.finditer(readme):
        yield match.group("files").split(), match.group("body")


def unmatched(readme: str, root: Path = ROOT) -> list[tuple[str, str]]:
    """``(file list, number)`` for every README number that no named results file holds."""
    bad = []
    for files, body in blocks(readme):
        paths = [root / f for f in files]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            bad.append((" ".join(files), f"missing file {missing[0]}"))
            continue
        values = _values(paths)
        bad += [(" ".join(files), n) for n in _numbers(body) if not _matches(n, values)]
    return bad


PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def test_readme_and_docs_have_measured_blocks():
    assert len(list(blocks((ROOT / "README.md").read_text()))) >= 1
    assert sum(len(list(blocks(p.read_text()))) for p in PAGES) >= 10


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_number_is_in_its_results_file(page):
    bad = unmatched(page.read_text())
    assert not bad, f"{page.name}: numbers not found in their results files: " + "; ".join(f"{f}: {n}" for f, n in bad[:10])


@pytest.mark.parametrize("text,ok", [("rate 0.56 and 58%", True), ("rate 0.57", False), ("rate 1,410 s", False)])
def test_checker_fails_when_a_number_drifts(tmp_path, text, ok):
    (tmp_path / "r.csv").write_text("rate\n0.5625\n0.58\n")
    readme = f"<!-- numbers: r.csv -->\n{text}\n<!-- /numbers -->"
    assert (not unmatched(readme, tmp_path)) is ok
