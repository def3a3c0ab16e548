"""``circuitlab view RUN_DIR [--edges EDGE_RUN] [--out page.html] [--json] [--serve PORT]``.

``view`` does the work and raises ``ViewerError`` (one line) for bad input; ``main`` is the same
command as a function of its arguments: it prints ``error: ...`` and returns 2 on bad input.
Importing this module loads neither torch nor pandas.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from circuitlab.viewer.errors import ViewerError

__all__ = ["view", "main", "default_out", "build_parser"]


def default_out(run_dir) -> Path:
    """Where the page goes by default: beside the run folder, ``<run folder>.html`` (a run folder
    holds only the files its run wrote, so the page is not put inside it)."""
    run = Path(run_dir).expanduser().resolve()
    return run.with_name(run.name + ".html")


def view(run_dir: str, out: str | None = None, serve: int | None = None, *, edges: str | None = None,
         export_json: bool = False) -> int:
    """Write the page of ``run_dir`` (joined with the edge-attribution run ``edges``, if given) to
    ``out``; with ``export_json`` also ``<page>.graph.json`` and one ``<page>.<set>.circuit-tracer.json``
    per edge set; with ``serve`` serve the page on 127.0.0.1:``serve`` until interrupted. Returns 0."""
    from circuitlab.viewer.graph_json import build_graph, write_graph
    from circuitlab.viewer.page import write_page
    from circuitlab.viewer.tracer import to_circuit_tracer

    if serve is not None and not 0 <= int(serve) <= 65535:
        raise ViewerError(f"--serve {serve}: a port is 0..65535")
    page = Path(out).expanduser() if out else default_out(run_dir)
    if page.is_dir():
        raise ViewerError(f"--out {page} is a folder: give a file name such as {page / 'circuit.html'}")
    doc = build_graph(run_dir, *([edges] if edges else []))
    page.parent.mkdir(parents=True, exist_ok=True)
    write_page(doc, page)
    print(f"wrote {page} ({page.stat().st_size // 1024} KiB, {sum(len(s['edges']) for s in doc['edge_sets'])} edges "
          f"in {len(doc['edge_sets'])} edge set{'s' * (len(doc['edge_sets']) != 1)}, {len(doc['units'])} units)")
    if export_json:
        stem = page.with_suffix("")
        print(f"wrote {write_graph(doc, stem.with_name(stem.name + '.graph.json'))}")
        for s in doc["edge_sets"]:
            target = stem.with_name(f"{stem.name}.{s['id'].replace(':', '.')}.circuit-tracer.json")
            target.write_text(json.dumps(to_circuit_tracer(doc, s["id"]), indent=1, allow_nan=False))
            print(f"wrote {target}")
    if serve is not None:
        from circuitlab.viewer.serve import serve as serve_page

        serve_page(page, int(serve))
    return 0


def build_parser(prog: str = "circuitlab view") -> argparse.ArgumentParser:
    """The command's arguments (the same names the circuitlab CLI wires)."""
    p = argparse.ArgumentParser(prog=prog, description="Write one self-contained HTML page for a saved "
                                "circuit-map or edge-attribution run (no model, no network at view time).")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a circuit-map or edge-attribution run folder")
    p.add_argument("--edges", metavar="EDGE_RUN", help="an edge-attribution run of the same model to join "
                   "(its EAP / EAP-IG edge sets and faithfulness curves)")
    p.add_argument("--out", metavar="PAGE", help="the page to write (default: RUN_DIR.html beside the folder)")
    p.add_argument("--json", action="store_true", help="also write the graph JSON and circuit-tracer JSON files")
    p.add_argument("--serve", type=int, metavar="PORT", help="then serve the page on 127.0.0.1:PORT")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the command; bad input prints one ``error: ...`` line on stderr and returns 2."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return view(args.run_dir, args.out, args.serve, edges=args.edges, export_json=args.json)
    except ViewerError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
