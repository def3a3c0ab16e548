"""Pages built from the code at `mkdocs build` time (mkdocs-gen-files): one page per registered
experiment (parameters from its dataclass: name, type, default, meaning) and the API reference
(one page per public module, rendered from docstrings by mkdocstrings)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import mkdocs_gen_files

from circuitlab import experiments
from circuitlab.experiments.base import parameters

API_PACKAGES = ("core", "io", "models", "methods", "graph", "monitor", "defence", "experiments")
API_MODULES = ("circuitlab.distributed", "circuitlab.cli")


def experiment_page(name: str) -> str:
    cls = experiments.get(name)
    module = inspect.getmodule(cls).__name__
    doc = inspect.cleandoc(cls.__doc__ or "")
    rows = ["| parameter | type | default | meaning |", "|---|---|---|---|"]
    for p in parameters(cls):
        meaning = p["meaning"].replace("|", "\\|")
        rows.append(f"| `{p['name']}` | `{p['type']}` | `{p['default']!r}` | {meaning} |")
    return "\n".join([
        f"# `{name}`", "", doc, "",
        f"Class `{cls.__name__}` in `{module}`. Run it with "
        f"`circuitlab run {name} --model tiny` (or `--model embedded`), or from Python with "
        f"`circuitlab.experiments.get(\"{name}\")(...).run(model, harmful, harmless)`.", "",
        "## Parameters", "", "Set each with `--set key=value` (lists as `0,1` or `[0,1]`; `none` for None).", "",
        *rows, "",
        "## The table", "",
        "Tidy long format: one row per component and measure, with the shared columns `layer`, "
        "`component`, `head`, `neuron`, `position` where they apply, then the measures. The class "
        "reference below documents each column.", "",
        f"::: {module}.{cls.__name__}", "    options:", "      show_root_heading: false", "      members: false", "",
    ])


def public_modules():
    for package in API_PACKAGES:
        root = importlib.import_module(f"circuitlab.{package}")
        yield root.__name__
        for info in pkgutil.walk_packages(root.__path__, prefix=f"{root.__name__}."):
            if not info.name.rsplit(".", 1)[-1].startswith("_"):
                yield info.name
    yield from API_MODULES


nav = mkdocs_gen_files.Nav()
for name in experiments.names():
    with mkdocs_gen_files.open(f"experiments/{name}.md", "w") as fh:
        fh.write(experiment_page(name))
    nav[("Experiments", name)] = f"experiments/{name}.md"

with mkdocs_gen_files.open("experiments/index.md", "w") as fh:
    fh.write("# Experiments\n\nEvery registered experiment (`circuitlab list`), one page each, generated from the "
             "registry.\n\n| name | what it answers |\n|---|---|\n")
    for name in experiments.names():
        fh.write(f"| [`{name}`]({name}.md) | {experiments.describe(name)} |\n")

with mkdocs_gen_files.open("api/index.md", "w") as fh:
    fh.write("# API reference\n\nRendered from the docstrings, one page per module, by layer.\n\n")
    for module in public_modules():
        fh.write(f"- [`{module}`]({module}.md)\n")
for module in public_modules():
    with mkdocs_gen_files.open(f"api/{module}.md", "w") as fh:
        fh.write(f"# `{module}`\n\n::: {module}\n")


def glossary_page() -> str:
    """Every ``--set`` name across experiments: its type and what it means in each (one name per concept)."""
    by_name: dict[str, list] = {}
    for name in experiments.names():
        for p in parameters(experiments.get(name)):
            by_name.setdefault(p["name"], []).append((name, p))
    lines = ["# Parameter glossary", "",
             "One name, one meaning: a concept that several experiments share has one parameter name and one "
             "type everywhere (`tests/test_conformance.py` checks it, and refuses known synonyms). Generated "
             "from the registry.", "",
             "| parameter | type | used by | meaning |", "|---|---|---|---|"]
    for key in sorted(by_name):
        uses = by_name[key]
        types = sorted({p["type"] for _, p in uses})
        meanings = "; ".join(sorted({p["meaning"].replace("|", "\\|") for _, p in uses if p["meaning"]}))
        used = ", ".join(f"[`{n}`](../experiments/{n}.md)" for n, _ in uses)
        lines.append(f"| `{key}` | {', '.join(f'`{t}`' for t in types)} | {used} | {meanings} |")
    return "\n".join(lines) + "\n"


with mkdocs_gen_files.open("guide/glossary.md", "w") as fh:
    fh.write(glossary_page())
