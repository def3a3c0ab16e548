"""See the circuit: one self-contained HTML page for a saved circuit-map or edge-attribution run.

``circuitlab view RUN_DIR`` (``circuitlab.viewer.cli.view``) reads the run folder (and, joined, the
edge-attribution run of the same model whose faithfulness curves the page offers), builds the
graph document (``graph_json``, schema ``circuitlab.circuit-graph`` v1), exports it where it maps to
circuit-tracer / Neuronpedia's graph format (``tracer``) and writes the page (``page``): the graph by
layer, an edge threshold, a faithfulness control, node cards, provenance. Saved files only: no
model and no torch at view time; docs/guide/viewer.md is the reference.
"""

from circuitlab.viewer.errors import ViewerError
from circuitlab.viewer.graph_json import SCHEMA, SCHEMA_VERSION, build_graph, read_graph, validate_graph, write_graph
from circuitlab.viewer.page import build_page
from circuitlab.viewer.runs import load_run
from circuitlab.viewer.tracer import to_circuit_tracer

__all__ = ["ViewerError", "load_run", "build_graph", "validate_graph", "write_graph", "read_graph", "build_page",
           "to_circuit_tracer", "SCHEMA", "SCHEMA_VERSION"]
