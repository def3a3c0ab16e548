"""Planted-circuit models: tiny Qwen2 transformers whose refusal circuit is set by hand.

``single`` is the original model (``load_model("planted")``); ``suite`` is the family used to
judge discovery methods (``SUITE``, ``build(name, seed)``, ``hooked(name, seed)``), each with its
ground truth as data (``PlantedCircuit``). See ``docs/guide/planted.md``.
"""

from circuitlab.models.planted.single import (D_HEAD, D_MLP, D_MODEL, DIMS, FEATURE_LAYER, HARMFUL_WORDS,
    HARMLESS_WORDS, N_HEADS, N_LAYERS, PLANTED_HEAD, PLANTED_NEURON, SPEC, TEMPLATES, build_planted, planted_prompts)
from circuitlab.models.planted.suite import SUITE, SUITE_DIMS, PlantedCircuit, build, circuit, hooked
from circuitlab.models.planted.weights import PlantedHead, PlantedNeuron, Spec, build_from_spec

__all__ = ["build_planted", "planted_prompts", "PLANTED_HEAD", "PLANTED_NEURON", "FEATURE_LAYER",
           "HARMFUL_WORDS", "HARMLESS_WORDS", "TEMPLATES", "DIMS", "N_LAYERS", "D_MODEL", "N_HEADS", "D_MLP",
           "D_HEAD", "SPEC", "SUITE", "SUITE_DIMS", "PlantedCircuit", "build", "circuit", "hooked", "PlantedHead",
           "PlantedNeuron", "Spec", "build_from_spec"]
