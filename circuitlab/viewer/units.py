"""A circuit-map run's located units as the viewer shows them: measures, stage and the rule behind it.

Each row of a circuit-map table is a unit (a head, or a neuron inside its layer's MLP node). The
measures are the table's own numbers; a measure the table does not hold is ``None`` and the page
says "not measured in this run".
"""

from __future__ import annotations

import math

__all__ = ["MEASURES", "units_of", "stage_reason", "number"]

# (key, label, what it is): the card rows, in order
MEASURES = (
    ("patch_effect", "exact patch effect",
     "refusal-score drop when the unit is patched to its harmless mean, as a fraction of the harmful-minus-harmless "
     "gap (verification half)"),
    ("atp_estimate", "AtP estimate",
     "the same drop estimated by attribution patching (screening half), as a fraction of the gap"),
    ("direction_attribution", "write onto refusal direction",
     "direct write along the refusal direction, as a fraction of its norm"),
    ("logit_attribution", "refusal-logit share",
     "direct effect on the refusal-token logit, as a fraction of the total gap"),
    ("content_read", "content read", "share of a head's difference read from the instruction tokens"),
    ("probe_accuracy", "probe accuracy", "best probe accuracy of the stream the unit writes"),
    ("effect_size", "effect size", "harmful-vs-harmless effect size (diff-ranking)"),
    ("edge_in_mass", "edge in-mass", "share of the graph's |score| on edges into the unit's node"),
    ("edge_out_mass", "edge out-mass", "share of the graph's |score| on edges out of the unit's node"),
)


def number(x) -> float | None:
    """A finite float, or None for missing / NaN (JSON has no NaN)."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _text(x) -> str | None:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return None
    s = str(x)
    return None if s in ("", "nan", "<NA>", "None") else s


def _flag(x) -> bool | None:
    if x is None or _text(x) is None:
        return None
    return bool(x) if not isinstance(x, str) else x.lower() == "true"


def stage_reason(row: dict, params: dict) -> str:
    """The rule that staged a unit, with the numbers that decided (circuit-map's docstring, step 7)."""
    stage, rule = row.get("stage"), row.get("stage_rule")
    if rule == "graph":
        if stage == "production":
            return "graph rule: its strongest kept out-edge goes to the logits"
        return "graph rule: its strongest kept in-edge comes from the token embedding"
    tau, read = params.get("tau", 0.1), params.get("read_threshold", 0.5)
    logit, content, direction = (number(row.get(k)) for k in ("logit_attribution", "content_read",
                                                               "direction_attribution"))
    fmt = lambda v: "n/a" if v is None else f"{v:.3g}"  # noqa: E731 - one-line formatter
    if stage == "production":
        return f"reads-writes rule: refusal-logit share {fmt(logit)} >= tau {tau}"
    if stage == "detection":
        return f"reads-writes rule: content read {fmt(content)} >= read_threshold {read} (logit share < tau)"
    if stage == "decision":
        return f"reads-writes rule: direction write {fmt(direction)} >= tau {tau} (no logit write, no content read)"
    return (f"reads-writes rule: none holds (logit share {fmt(logit)} < {tau}, content read {fmt(content)} "
            f"< {read}, direction write {fmt(direction)} < {tau})")


def units_of(table, params: dict) -> list[dict]:
    """One entry per circuit-map row: id, graph node, component, stage, rule, measures, edge columns."""
    out = []
    for row in table.to_dict("records"):
        kind, layer = row["component"], int(row["layer"])
        is_head = kind == "head"
        index = row["head"] if is_head else row.get("neuron")
        index = None if _text(index) is None else int(index)
        node = _text(row.get("edge_node")) or (f"a{layer}.h{index}" if is_head else f"m{layer}")
        uid = node if is_head else f"m{layer}.n{index}"
        out.append({
            "id": uid, "node": node, "component": kind, "layer": layer, "index": index,
            "label": f"L{layer} head {index}" if is_head else f"L{layer} neuron {index}",
            "stage": _text(row.get("stage")), "stage_rule": _text(row.get("stage_rule")),
            "stage_reason": stage_reason(row, params), "verified": _flag(row.get("verified")),
            "in_edge_circuit": _flag(row.get("in_edge_circuit")),
            "edge_in_from": _text(row.get("edge_in_from")), "edge_out_to": _text(row.get("edge_out_to")),
            "measures": {key: number(row.get(key)) if key in row else None for key, _, _ in MEASURES},
        })
    return out
