"""Integrity monitor: has the model's safety machinery been tampered with?

Three signals, each compared with a reference taken from the trusted model:

- **weights**: the located components' weight slices (relative L2 change per component; an exact
  sha256 is reported too) and the *write profile* of the refusal direction — ``Wᵀ r̂`` for every
  matrix that writes the residual stream (embedding, ``o_proj``, ``down_proj``). Weight
  orthogonalization (Arditi et al. 2024, §4.1) sends that profile to zero.
- **activations**: the components' activations (neurons: ``mlp_post``; heads: ``attn_z``) and the
  refusal-direction projection at the monitored layer, at the last position of a small canary
  prompt set (relative L2 change per component). Ablation hooks and directional ablation show
  here even though no weight changed.
- **hooks**: forward hooks attached to the bridge's hook points when the check starts.

Drifts are relative (``‖now − ref‖ / ‖ref‖``) so one tolerance fits all models; the defaults sit
above the numerical noise of a float32↔bfloat16 round trip (relative error ≤ 2⁻⁹ per weight).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from circuitlab.core import hooks as hk
from circuitlab.core.components import Component, hook_name
from circuitlab.methods.directions import unit, write_profile
from circuitlab.core.model import HookedModel
from circuitlab.core.weights import canonical_parameters, component_slices, slice_digest

__all__ = ["IntegrityMonitor", "IntegrityReport", "count_foreign_hooks"]


@dataclass
class IntegrityReport:
    """What one integrity check found; ``tampered`` if any alarm fired."""

    exact_match: bool  # the slices' bytes are identical to the reference
    weight_drift: float  # max relative change over components' weight slices
    write_drift: float  # relative change of the direction's write profile (nan without a direction)
    act_drift: float  # max relative change over components' canary activations
    foreign_hooks: int
    alarms: list[str]
    worst: dict = field(default_factory=dict)  # signal -> component that drifted most
    seconds: float = 0.0

    @property
    def tampered(self) -> bool:
        return bool(self.alarms)


def count_foreign_hooks(model: HookedModel) -> int:
    """Forward hooks currently attached to the bridge's hook points."""
    return sum(len(h._forward_hooks) for h in model.bridge.hook_dict.values())


def _relative(now: torch.Tensor, ref: torch.Tensor, scale: float = 0.0) -> float:
    """``‖now − ref‖ / max(‖ref‖, scale)``."""
    return float((now.float() - ref.float()).norm() / max(float(ref.float().norm()), scale, 1e-12))


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.flatten() for t in tensors])


@dataclass
class IntegrityMonitor:
    """Reference fingerprints of a trusted model's safety components; ``check`` compares the live model."""

    components: list[Component]
    canaries: list[str]
    direction: torch.Tensor | None = None
    layer: int | None = None  # where the direction's projection is read (resid_pre)
    weight_tol: float = 5e-3
    act_tol: float = 5e-2
    batch_size: int = 16
    digest_: str = ""
    slices_: dict = field(default_factory=dict)  # component -> [float32 copies of its slices]
    profile_: torch.Tensor | None = None
    acts_: dict = field(default_factory=dict)  # feature name -> [n_canary, ...]
    scales_: dict = field(default_factory=dict)  # feature name -> typical norm of a unit at its hook

    @classmethod
    def fit(cls, model: HookedModel, components: Sequence[Component], canaries: Sequence[str], *,
            direction: torch.Tensor | None = None, layer: int | None = None, **tolerances) -> "IntegrityMonitor":
        """Record the reference from ``model`` (assumed trusted, with no hooks attached)."""
        components = list(components)
        if not components:
            raise ValueError("the integrity monitor needs at least one component to watch")
        canaries = list(getattr(canaries, "prompts", canaries))
        if len(canaries) < 2:
            raise ValueError(f"give at least 2 canary prompts, got {len(canaries)}")
        if (direction is None) != (layer is None):
            raise ValueError("pass direction and layer together (the layer where its projection is read)")
        mon = cls(components, canaries, direction=None if direction is None else unit(direction, model.d_model),
                  layer=layer, **tolerances)
        mon.digest_ = slice_digest(model, mon._all_slices(model))
        mon.slices_ = mon._read_slices(model)
        mon.profile_ = None if direction is None else write_profile(model, mon.direction)
        mon.acts_, mon.scales_ = mon._canary_features(model, with_scales=True)
        return mon

    def _all_slices(self, model):
        return component_slices(model, self.components)

    def _read_slices(self, model) -> dict:
        params = canonical_parameters(model)
        return {c: [params[n].detach()[i].float().clone() for n, i in component_slices(model, [c])]
                for c in self.components}

    def _canary_features(self, model, with_scales: bool = False):
        """Component activations (and the direction projection) at the canaries' last position.

        ``with_scales`` also returns each feature's floor for relative drift: the mean norm of all
        units (neurons / heads) at its hook, so a nearly silent neuron cannot inflate the drift.
        """
        names = sorted({hook_name(c) for c in self.components}
                       | ({hk.resid_pre(self.layer)} if self.layer is not None else set()))
        acts = model.run_with_cache(self.canaries, names, "last", batch_size=self.batch_size)
        feats, scales = {}, {}
        for c in self.components:
            a = acts[hook_name(c)][:, 0]
            feats[str(c)] = a[:, c.index] if c.kind in ("neuron", "head") else a
            units = a.transpose(0, 1).reshape(a.shape[1], -1) if c.kind in ("neuron", "head") else a[None]
            scales[str(c)] = float(units.norm(dim=-1).mean())
        if self.layer is not None:
            resid = acts[hk.resid_pre(self.layer)][:, 0]
            feats["direction"] = resid @ self.direction.to(resid.device)
            scales["direction"] = 0.0
        return (feats, scales) if with_scales else feats

    def check(self, model: HookedModel) -> IntegrityReport:
        """Compare the live model (weights, canary activations under any attached hooks) to the reference."""
        start = time.perf_counter()
        hooks = count_foreign_hooks(model)
        exact = slice_digest(model, self._all_slices(model)) == self.digest_
        now = self._read_slices(model)
        weight = {str(c): _relative(_flat(now[c]), _flat(self.slices_[c])) for c in self.components}
        write = float("nan") if self.profile_ is None else _relative(write_profile(model, self.direction), self.profile_)
        feats = self._canary_features(model)
        acts = {k: _relative(v, self.acts_[k], self.scales_[k]) for k, v in feats.items()}
        worst_w, worst_a = max(weight, key=weight.get), max(acts, key=acts.get)
        alarms = []
        if weight[worst_w] > self.weight_tol:
            alarms.append("weights")
        if write == write and write > self.weight_tol:
            alarms.append("write_profile")
        if acts[worst_a] > self.act_tol:
            alarms.append("activations")
        if hooks:
            alarms.append("hooks")
        return IntegrityReport(exact, weight[worst_w], write, acts[worst_a], hooks, alarms,
                               {"weights": worst_w, "activations": worst_a}, time.perf_counter() - start)
