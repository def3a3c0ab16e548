"""Hardening modes, alone or combined with ``+``: which adversary, extra loss and openers a mode trains with.

Each remedy of the robust-hardening experiment is a mode; a combined mode such as
``distributed+recovery`` trains with both at once (one adversary at most, since each adversary
decides which hooks act on a step):

- ``plain``: hardening targets + retain set + KL only (cannot be combined);
- ``adversarial``: ReFAT (Yu et al. 2024), ``adversaries.RefusalAblationAdversary``;
- ``distributed``: DeepRefusal (arXiv 2509.15202), ``adversaries.RandomSubspaceAdversary``;
- ``redundant``: all refusal mechanisms but one ablated per step, ``redundant.MechanismAdversary``;
- ``joint``: every refusal mechanism ablated at once per step, ``redundant.MechanismAdversary(keep=0)``;
- ``rerouting``: Circuit Breakers (Zou et al. 2024), ``rerouting.Rerouting``;
- ``recovery``: refusal after a prefilled affirmative opener (Qi et al. 2025), ``finetune.prefill_openers``.
"""

from __future__ import annotations

__all__ = ["MODES", "ADVERSARY_MODES", "KEYED_ADVERSARY_MODES", "mode_parts", "check_modes"]

MODES = ("plain", "adversarial", "distributed", "redundant", "joint", "rerouting", "recovery")
ADVERSARY_MODES = ("adversarial", "distributed", "redundant", "joint")
KEYED_ADVERSARY_MODES = ("adversarial", "redundant", "joint")  # their adversary starts from the best direction keys


def mode_parts(mode: str) -> tuple[str, ...]:
    """The remedies of ``mode`` (``"distributed+recovery"`` -> ``("distributed", "recovery")``); a bad
    combination raises ValueError naming the fix."""
    parts = tuple(mode.split("+"))
    unknown = [p for p in parts if p not in MODES]
    if unknown:
        raise ValueError(f"mode {mode!r}: {unknown[0]!r} is not one of {', '.join(MODES)} "
                         "(combine remedies with +, e.g. distributed+recovery)")
    if len(set(parts)) != len(parts):
        raise ValueError(f"mode {mode!r} names a remedy twice")
    if "plain" in parts and len(parts) > 1:
        raise ValueError(f"mode {mode!r}: plain is hardening without any remedy and cannot be combined")
    adversaries = [p for p in parts if p in ADVERSARY_MODES]
    if len(adversaries) > 1:
        raise ValueError(f"mode {mode!r} combines {' and '.join(adversaries)}: one adversary per mode "
                         f"({', '.join(ADVERSARY_MODES)})")
    return parts


def check_modes(modes) -> None:
    """Every mode valid and none listed twice (ValueError otherwise)."""
    if not modes:
        raise ValueError(f"modes is empty: give at least one of {', '.join(MODES)} (e.g. --set modes=plain)")
    for mode in modes:
        mode_parts(mode)
    if len(set(modes)) != len(modes):
        raise ValueError(f"modes={list(modes)} lists a mode twice")
