"""The planted-circuit suite: tiny models whose refusal circuit is known, with the answer as data.

Judging a circuit-discovery method needs models whose circuit is known (Conmy et al. 2023 §4;
InterpBench, Gupta et al. 2024; MIB, Mueller et al. 2025). Each model here is a 3-layer Qwen2 built
by ``weights.build_from_spec`` in well under a second; its ground truth is a :class:`PlantedCircuit`:

- ``nodes``: ``(kind, layer, index)`` with kind ``head`` (index = head) or ``neuron`` (index =
  neuron) — the units whose weights were planted and that carry the refusal signal;
- ``edges``: ``(writer, reader)`` in ``graph.EdgeGraph`` naming (an MLP is one node ``m{l}``; a
  head's keys and values are read by its key/value group ``a{l}.g{g}.k|v``);
- ``decoys``: units that carry a harmfulness feature but whose output nothing reads (negatives
  that look positive to correlational methods).

The circuits (all read the harmful keyword through content-attending heads, as in ``single``):

- ``single``: head a1.h2 -> MOVED -> neuron m2/37 -> REFUSE -> `` sorry`` (``single.py``).
- ``gqa``: the same on a model with 2 key/value heads for 4 query heads (a1.h2 reads kv group 1).
- ``or``: two independent paths, a0.h1 -> MOVED_B and a1.h2 -> MOVED, each sufficient: an
  inhibitor neuron m2/37 fires by default and suppresses refusal; either path switches it off.
- ``and``: the same two paths, both necessary: neuron m2/37 fires only when MOVED + MOVED_B exceeds
  what one path writes.
- ``decoy``: the single path plus a1.h0 -> DECOY -> neuron m2/20, which writes nothing: perfectly
  correlated with harmfulness, read by no later component.
- ``distributed``: five heads each write a fifth of MOVED and eight layer-2 neurons each write an
  eighth of REFUSE, so no unit carries much of the effect.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from circuitlab.models.planted.single import SPEC as SINGLE_SPEC
from circuitlab.models.planted.weights import N_HEADS, PlantedHead, PlantedNeuron, Spec, build_from_spec

__all__ = ["PlantedCircuit", "SUITE", "build", "circuit", "hooked", "SUITE_DIMS"]

SUITE_DIMS = {"const": 0, "harmful": 1, "benign": 2, "moved": 3, "refuse": 4, "moved_b": 5, "decoy": 6}
_D = SUITE_DIMS
_SORRY = {_D["refuse"]: 3.0, _D["const"]: -2.0}
_NEURON = dict(gate={_D["moved"]: 60.0}, up={_D["const"]: 1.0}, down={_D["refuse"]: 1.0})
# OR: the inhibitor fires at const (gate ~ +_OR_ON) and any one path drives its gate far below 0.
_OR_ON, _OR_OFF, _OR_SORRY = 2.0, 120.0, 6.0
# AND: gate = k (MOVED + MOVED_B) - threshold; one path's MOVED is ~0.09 x const, so 1.5 paths.
_AND_GAIN, _AND_THRESHOLD = 120.0, 0.135 * 120.0
_DISTRIBUTED_HEADS = ((0, 1), (0, 3), (1, 0), (1, 1), (1, 2))
_DISTRIBUTED_NEURONS = (5, 13, 21, 29, 37, 45, 53, 61)


@dataclass(frozen=True)
class PlantedCircuit:
    """A planted model's ground truth: planted units (``nodes``), graph ``edges``, ``decoys``, why."""

    name: str
    nodes: list
    edges: list
    decoys: list = field(default_factory=list)
    n_kv_heads: int = N_HEADS
    description: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PlantedCircuit":
        return cls(name=d["name"], nodes=[tuple(n) for n in d["nodes"]], edges=[tuple(e) for e in d["edges"]],
                   decoys=[tuple(n) for n in d.get("decoys", [])], n_kv_heads=int(d.get("n_kv_heads", N_HEADS)),
                   description=d.get("description", ""))

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def heads(self) -> list[tuple[int, int]]:
        return [(l, i) for k, l, i in self.nodes if k == "head"]

    def neurons(self) -> list[tuple[int, int]]:
        return [(l, i) for k, l, i in self.nodes if k == "neuron"]


def _head_edges(layer: int, head: int, n_kv: int, mlp_layer: int) -> list[tuple[str, str]]:
    g = head // (N_HEADS // n_kv)
    return [("embed", f"a{layer}.g{g}.k"), ("embed", f"a{layer}.g{g}.v"), (f"a{layer}.h{head}", f"m{mlp_layer}")]


def _truth(name, heads, neurons, n_kv=N_HEADS, decoys=(), description="") -> PlantedCircuit:
    edges = [e for l, h in heads for e in _head_edges(l, h, n_kv, 2)] + [("m2", "logits")]
    nodes = [("head", l, h) for l, h in heads] + [("neuron", l, i) for l, i in neurons]
    return PlantedCircuit(name, nodes, edges, list(decoys), n_kv, description)


def _two_heads(size: float = 0.02):
    return (PlantedHead(0, 1, _D["moved_b"], size), PlantedHead(1, 2, _D["moved"], size))


_SPECS: dict[str, Spec] = {
    "single": SINGLE_SPEC,
    "gqa": Spec(heads=SINGLE_SPEC.heads, neurons=SINGLE_SPEC.neurons, sorry=SINGLE_SPEC.sorry, n_kv=2),
    "or": Spec(heads=_two_heads(), reserved=7, sorry={_D["refuse"]: 3.0, _D["const"]: _OR_SORRY},
               neurons=(PlantedNeuron(2, 37, gate={_D["const"]: _OR_ON, _D["moved"]: -_OR_OFF, _D["moved_b"]: -_OR_OFF},
                                      up={_D["const"]: 1.0}, down={_D["refuse"]: -1.0}),)),
    "and": Spec(heads=_two_heads(), reserved=7, sorry=_SORRY,
                neurons=(PlantedNeuron(2, 37, gate={_D["moved"]: _AND_GAIN, _D["moved_b"]: _AND_GAIN,
                                                    _D["const"]: -_AND_THRESHOLD},
                                       up={_D["const"]: 1.0}, down={_D["refuse"]: 1.0}),)),
    "decoy": Spec(heads=SINGLE_SPEC.heads + (PlantedHead(1, 0, _D["decoy"]),), reserved=7, sorry=_SORRY,
                  neurons=(PlantedNeuron(2, 37, **_NEURON),
                           PlantedNeuron(2, 20, gate={_D["decoy"]: 60.0}, up={_D["const"]: 1.0}, down={}))),
    "distributed": Spec(heads=tuple(PlantedHead(l, h, _D["moved"], 0.02 / len(_DISTRIBUTED_HEADS) * 2)
                                    for l, h in _DISTRIBUTED_HEADS), reserved=7, sorry=_SORRY,
                        neurons=tuple(PlantedNeuron(2, i, gate={_D["moved"]: 60.0}, up={_D["const"]: 1.0},
                                                    down={_D["refuse"]: 1.0 / len(_DISTRIBUTED_NEURONS)})
                                      for i in _DISTRIBUTED_NEURONS)),
}

SUITE: dict[str, PlantedCircuit] = {
    "single": _truth("single", [(1, 2)], [(2, 37)], description="one path: head -> neuron -> logits"),
    "gqa": _truth("gqa", [(1, 2)], [(2, 37)], n_kv=2,
                  description="the single path on a GQA model (2 key/value heads for 4 query heads)"),
    "or": _truth("or", [(0, 1), (1, 2)], [(2, 37)],
                 description="two independent paths, each sufficient (an inhibitor either path switches off)"),
    "and": _truth("and", [(0, 1), (1, 2)], [(2, 37)], description="two paths, both necessary"),
    "decoy": _truth("decoy", [(1, 2)], [(2, 37)], decoys=[("head", 1, 0), ("neuron", 2, 20)],
                    description="the single path plus a harmfulness feature (a1.h0 -> m2/20) nothing reads"),
    "distributed": _truth("distributed", list(_DISTRIBUTED_HEADS), [(2, i) for i in _DISTRIBUTED_NEURONS],
                          description="five heads and eight neurons each carry a small share"),
}


def circuit(name: str) -> PlantedCircuit:
    """The ground truth of planted model ``name``."""
    if name not in SUITE:
        raise ValueError(f"unknown planted circuit {name!r}; the suite has {', '.join(SUITE)}")
    return SUITE[name]


def build(name: str, seed: int = 0):
    """``(hf_model, tokenizer)`` of planted model ``name`` (``SUITE``), noise drawn from ``seed``."""
    circuit(name)
    return build_from_spec(_SPECS[name], seed)


def hooked(name: str, seed: int = 0):
    """Planted model ``name`` as a ``HookedModel`` on the CPU in float32 (as ``load_model('planted')``)."""
    import os

    from transformer_lens.model_bridge import TransformerBridge

    from circuitlab.core.model import HookedModel

    hf, tok = build(name, seed)
    before = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"  # the architecture id picks an adapter; nothing may be fetched
    try:
        bridge = TransformerBridge.boot_transformers("Qwen/Qwen2.5-0.5B-Instruct", hf_model=hf, tokenizer=tok,
                                                     device="cpu", dtype=hf.dtype)
    finally:
        if before is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = before
    return HookedModel.from_bridge(bridge, tok, name=f"planted-{name}")
