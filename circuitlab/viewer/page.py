"""The viewer page: one self-contained HTML file with the graph document, the script and the styles
inlined (``assets/``: written for circuitlab, no vendored library), so it opens from disk or a mail
attachment with no network."""

from __future__ import annotations

import html
import json
from pathlib import Path

from circuitlab.viewer.graph_json import validate_graph

__all__ = ["build_page", "write_page", "ASSETS"]

ASSETS = Path(__file__).with_name("assets")


def _script_json(doc: dict) -> str:
    """JSON safe inside a <script> element: no '<' at all (so no '</script' or '<!--'), no U+2028/9."""
    text = json.dumps(doc, separators=(",", ":"), allow_nan=False, ensure_ascii=False)
    return text.replace("<", "\\u003c").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def build_page(doc: dict) -> str:
    """The HTML page of a graph document (``graph_json.build_graph``): template + CSS + data + JS."""
    validate_graph(doc)
    template = (ASSETS / "page.html").read_text(encoding="utf-8")
    parts = {
        "{{TITLE}}": html.escape(f"circuitlab · {doc['title']}"),
        "{{CSS}}": (ASSETS / "viewer.css").read_text(encoding="utf-8"),
        "{{DATA}}": _script_json(doc),
        "{{JS}}": "\n".join((ASSETS / name).read_text(encoding="utf-8").replace("</script", "<\\/script")
                            for name in ("graph.js", "panels.js", "viewer.js")),
    }
    for key in parts:  # every placeholder once, before any data could contain one
        if template.count(key) != 1:
            raise RuntimeError(f"viewer template must hold {key} exactly once")
    out, rest = [], template
    for key in sorted(parts, key=template.index):
        head, rest = rest.split(key, 1)
        out += [head, parts[key]]
    return "".join(out + [rest])


def write_page(doc: dict, path) -> Path:
    """Write the page of ``doc`` to ``path`` (UTF-8); returns the path."""
    path = Path(path)
    path.write_text(build_page(doc), encoding="utf-8")
    return path
