"""Abliteration as a parameterised family of weight edits: Heretic's per-layer kernel, top-writer
targeting, one global direction — each applied as weight orthogonalization (reversible) or as hooks.

An ``Edit`` removes a fraction ``weight`` of a unit direction r̂ from what one writer puts into the
residual stream: ``W ← W − w · r̂ r̂ᵀ W`` on a layer's whole attention output (``o_proj``, kind
``attn_out``) or MLP output (``down_proj``, ``mlp_out``) with its bias, or on one head's ``o_proj``
columns (``head``) or one neuron's ``down_proj`` column (``neuron``). Its ``direction`` may instead be
a ``[k, d_model]`` basis (orthonormalised): then the whole subspace goes, ``W ← W − w · Q Qᵀ W``, by
the same projection applied once per basis vector (``_project``; the cone family, ``cone``).
``abliterated`` applies a list of edits to the weights and restores them on exit; ``edit_hooks`` gives
the same map as forward hooks on the unedited model (tested equal); ``export_abliterated`` writes the
edited model as an HF folder.

Families (Arditi et al. 2024 §4.1 orthogonalization; Heretic, p-e-w/heretic, for the kernel — its
parameter semantics are reproduced from its documentation and behaviour, no Heretic code is used):

- ``heretic_edits``: per component (attention, MLP) a weight kernel over layers (``Kernel``: peak
  ``max_weight`` at ``max_weight_position``, falling linearly to ``min_weight`` at distance
  ``min_weight_distance``, zero beyond), with each layer's own direction or one global direction
  interpolated at a fractional ``direction_index`` (``AbliterationParams``). Heretic does not edit the
  embedding; neither does this family.
- ``targeted_edits``: the direction removed only from the ``top_n`` writers (heads, MLP layers, or
  neurons) that write it most (``direction_eval.direction_components``, ranked by harmful − harmless).
- ``global_edits``: one direction, one weight, every layer's attention and MLP output.

``residual_directions`` gives the per-layer unit difference-in-means directions these index into.
Weight edits reuse ``directions.project_out`` (the one projection) on ``weights.writer_weight``'s
matrices inside ``weights.weights_restored``.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd
import torch

from circuitlab.core import hooks as hk
from circuitlab.methods import metrics
from circuitlab.methods.capability import arithmetic_accuracy
from circuitlab.methods.direction_eval import direction_components, last_logits_shared
from circuitlab.methods.stats import bootstrap_ci
from circuitlab.methods.directions import mean_differences, project_out, unit
from circuitlab.methods.heretic_scoring import first_token_kl, load_markers, marker_refusals
from circuitlab.methods.interventions import export_hf
from circuitlab.core.model import HookedModel
from circuitlab.io.store import ActivationStore
from circuitlab.core.weights import residual_writers, weights_restored, writer_weight

__all__ = ["Kernel", "AbliterationParams", "Edit", "EDIT_KINDS", "WRITERS", "layer_weights", "residual_directions",
           "direction_at", "heretic_edits", "targeted_edits", "global_edits", "top_writers", "abliterated",
           "edit_hooks", "export_abliterated", "describe_edits", "score_model", "norm_preserved"]

WRITERS = ("attn", "mlp")  # Heretic's components: attention o_proj, MLP down_proj
EDIT_KINDS = {"attn_out": "attn", "head": "attn", "mlp_out": "mlp", "neuron": "mlp"}  # edit kind -> its writer
_PARTS = {"attn": "self_attn.o_proj", "mlp": "mlp.down_proj"}  # writer -> HF module path in a decoder layer


# ---- parameters ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Kernel:
    """Heretic's ablation-weight kernel of one component over layers (weights usually in [0, 1.5])."""

    max_weight: float  # weight at the peak layer position
    max_weight_position: float  # fractional layer index of the peak
    min_weight: float  # weight at distance min_weight_distance from the peak
    min_weight_distance: float  # layers further than this from the peak are not edited

    def __post_init__(self):
        if not all(math.isfinite(float(v)) for v in asdict(self).values()):
            raise ValueError(f"kernel values must be finite numbers, got {self}")
        if self.min_weight_distance <= 0:
            raise ValueError(f"min_weight_distance={self.min_weight_distance} must be > 0 (Heretic samples 1 or more)")

    def at(self, layer: int) -> float:
        """The weight at ``layer``: linear from max_weight (peak) to min_weight (edge), 0 outside."""
        distance = abs(layer - self.max_weight_position)
        if distance > self.min_weight_distance:
            return 0.0
        return self.max_weight + distance / self.min_weight_distance * (self.min_weight - self.max_weight)


@dataclass(frozen=True)
class AbliterationParams:
    """One point of Heretic's family: a kernel per writer and the direction (per layer, or one global).

    ``direction_index`` None: every layer ablates its own direction (Heretic's "per layer" scope); a
    float d: one global direction, ``direction_at(directions, d)`` (Heretic's "global" scope).
    """

    attn: Kernel
    mlp: Kernel
    direction_index: float | None = None

    @property
    def scope(self) -> str:
        """``"per layer"`` or ``"global"`` (Heretic's direction_scope)."""
        return "per layer" if self.direction_index is None else "global"

    def flat(self) -> dict:
        """``{direction_scope, direction_index, attn.max_weight, ...}``: one table row's parameters."""
        out = {"direction_scope": self.scope, "direction_index": self.direction_index}
        for writer in WRITERS:
            out.update({f"{writer}.{k}": v for k, v in asdict(getattr(self, writer)).items()})
        return out

    @classmethod
    def from_flat(cls, row: dict) -> "AbliterationParams":
        """The inverse of ``flat`` (extra keys are ignored; a NaN direction_index means per layer)."""
        kernels = {w: Kernel(**{k: float(row[f"{w}.{k}"]) for k in Kernel.__dataclass_fields__}) for w in WRITERS}
        index = row.get("direction_index")
        per_layer = index is None or row.get("direction_scope") == "per layer" or pd.isna(index)
        return cls(direction_index=None if per_layer else float(index), **kernels)


@dataclass(frozen=True)
class Edit:
    """Remove ``weight`` × the unit ``direction`` from one writer: a layer's ``attn_out`` / ``mlp_out``
    (``index`` None, bias included) or one ``head`` / ``neuron`` (its o_proj / down_proj columns).
    ``direction`` ``[k, d_model]``: a subspace, its rows orthonormalised here (``basis``, rank k)."""

    layer: int
    kind: str
    index: int | None
    weight: float
    direction: torch.Tensor = field(repr=False, compare=False)
    norm_preserving: bool = False  # Heretic's row_normalization="full": each row keeps its norm (see norm_preserved)

    def __post_init__(self):
        if self.kind not in EDIT_KINDS:
            raise ValueError(f"edit kind {self.kind!r} is not one of {', '.join(EDIT_KINDS)}")
        if (self.index is None) != (self.kind in ("attn_out", "mlp_out")):
            raise ValueError(f"a {self.kind} edit needs index={'None' if self.index is not None else 'an int'}")
        if not math.isfinite(float(self.weight)):
            raise ValueError(f"edit weight must be finite, got {self.weight}")
        object.__setattr__(self, "direction", _orthonormal(self.direction))

    @property
    def writer(self) -> str:
        return EDIT_KINDS[self.kind]

    @property
    def basis(self) -> torch.Tensor:
        """The removed subspace as orthonormal rows ``[k, d_model]`` (k = 1 for one direction)."""
        return self.direction.reshape(-1, self.direction.shape[-1])

    def columns(self, model: HookedModel) -> slice:
        """The columns of the writer matrix this edit acts on."""
        if self.kind == "head":
            return slice(self.index * model.d_head, (self.index + 1) * model.d_head)
        if self.kind == "neuron":
            return slice(self.index, self.index + 1)
        return slice(None)

    def label(self) -> str:
        """``L3H5``, ``L3N17``, ``L3attn`` or ``L3mlp``, with ``@weight``."""
        unit_part = {"head": f"H{self.index}", "neuron": f"N{self.index}", "attn_out": "attn", "mlp_out": "mlp"}
        rank = f"/k{len(self.basis)}" if len(self.basis) > 1 else ""
        return f"L{self.layer}{unit_part[self.kind]}@{self.weight:.3g}{rank}"


def _orthonormal(direction: torch.Tensor) -> torch.Tensor:
    """A unit vector (``unit``), or an orthonormal basis of the span of a ``[k, d]`` tensor's rows
    (Gram-Schmidt in row order; a row already in the span of those before it adds nothing)."""
    direction = torch.as_tensor(direction)
    if direction.dim() != 2:
        return unit(direction)
    rows = [unit(direction[0])]
    for v in direction[1:].detach().float():
        v = v - sum((v @ b) * b for b in rows)
        if v.norm() > 1e-6 * max(1.0, float(direction.float().norm())):  # a dependent row: nothing new to remove
            rows.append(unit(v))
    return torch.stack(rows)


def _project(x: torch.Tensor, basis: torch.Tensor, strength: float) -> torch.Tensor:
    """``x − s · Q Qᵀ x`` over the last dimension for orthonormal rows Q: ``project_out`` once per row,
    which is exact because the cross terms ``s² q_i (q_iᵀ q_j) q_jᵀ`` vanish for orthonormal rows."""
    for b in basis.reshape(-1, basis.shape[-1]):
        x = project_out(x, b, strength)
    return x


def layer_weights(params: AbliterationParams, n_layers: int) -> dict[str, list[float]]:
    """``{writer: [weight of layer 0, ..., layer n-1]}`` of Heretic's kernels (0 = layer not edited)."""
    return {w: [getattr(params, w).at(l) for l in range(n_layers)] for w in WRITERS}


# ---- directions ----------------------------------------------------------------------------------

def _unit_or_zero(vector: torch.Tensor) -> torch.Tensor:
    """``vector`` normalised, or zeros when it is (numerically) zero: no direction, so no edit."""
    vector = vector.detach().float().flatten()
    norm = vector.norm()
    # the same cut-off as direction_eval.score_candidates: below it there is nothing to ablate
    return vector / norm if norm > 1e-6 else torch.zeros_like(vector)


def residual_directions(model: HookedModel, harmful: Sequence[str], harmless: Sequence[str], *,
                        store: ActivationStore | None = None, batch_size: int = 16,
                        orthogonalize: bool = False) -> torch.Tensor:
    """Unit difference in means of the residual stream leaving each layer, last prompt token,
    ``[n_layers, d_model]`` (row l: ``resid_post(l)``, Heretic's refusal direction of layer l; Heretic
    also uses the final norm's output for the last layer, circuitlab the raw residual). A layer where
    both means coincide (nothing told the sets apart yet) gets a zero row, which edits nothing.

    ``orthogonalize``: Heretic's ``orthogonalize_direction`` (its default; "projected abliteration"):
    each row r̂ minus its component along the unit harmless mean ĝ of that layer, renormalised,
    ``unit(r̂ − (r̂·ĝ) ĝ)``, so only the part of the refusal direction orthogonal to the harmless
    activations is removed."""
    store = store if store is not None else ActivationStore()
    names = [hk.resid_post(l) for l in range(model.n_layers)]
    diffs = mean_differences(model, harmful, harmless, names, "last", store=store, batch_size=batch_size)
    rows = torch.stack([_unit_or_zero(diffs[n][0]) for n in names])
    if not orthogonalize:
        return rows
    # the same store read mean_differences made (cached): the harmless mean of each layer
    good = store.get(model, list(getattr(harmless, "prompts", harmless)), names, "last", batch_size=batch_size)
    goods = torch.stack([_unit_or_zero(good[n][:, 0].float().mean(0)) for n in names])
    return torch.stack([_unit_or_zero(project_out(r, g)) if r.any() else r for r, g in zip(rows, goods)])


def direction_at(directions: torch.Tensor, index: float) -> torch.Tensor:
    """The unit direction at a fractional layer ``index``: directions[⌊i⌋] interpolated linearly
    towards directions[⌊i⌋+1] by the fraction, then normalised (Heretic's global direction); zeros
    when both are zero rows."""
    n = len(directions)
    if not 0 <= index <= n - 1:
        raise ValueError(f"direction_index={index} must lie in [0, {n - 1}] (one direction per layer)")
    low = int(math.floor(index))
    high, frac = min(low + 1, n - 1), index - low
    return _unit_or_zero(torch.lerp(directions[low].float(), directions[high].float(), frac))


# ---- families --------------------------------------------------------------------------------------

def heretic_edits(model: HookedModel, directions: torch.Tensor, params: AbliterationParams, *,
                  norm_preserving: bool = False) -> list[Edit]:
    """Heretic's family: per layer and writer, the kernel's weight (layers it skips, or whose direction
    is a zero row, are not edited). ``norm_preserving``: Heretic's default ``row_normalization="full"``
    (``norm_preserved``); with ``residual_directions(..., orthogonalize=True)`` this is Heretic 1.4.0's
    default family."""
    weights = layer_weights(params, model.n_layers)
    shared = None if params.direction_index is None else direction_at(directions, params.direction_index)
    edits = []
    for l in range(model.n_layers):
        r = directions[l] if shared is None else shared
        if not r.any():
            continue
        for writer, kind in (("attn", "attn_out"), ("mlp", "mlp_out")):
            if weights[writer][l] != 0:  # a zero weight is no edit at all (the model stays bit-identical)
                edits.append(Edit(l, kind, None, weights[writer][l], r, norm_preserving))
    return edits


def global_edits(model: HookedModel, direction: torch.Tensor, weight: float = 1.0) -> list[Edit]:
    """One direction and weight on every layer's attention and MLP output (embedding untouched)."""
    if weight == 0:
        return []
    return [Edit(l, kind, None, weight, direction) for l in range(model.n_layers) for kind in ("attn_out", "mlp_out")]


def targeted_edits(components: pd.DataFrame, direction: torch.Tensor, top_n: int, weight: float = 1.0,
                   kinds: Sequence[str] = ("head", "mlp_out")) -> list[Edit]:
    """The direction removed from the ``top_n`` writers of ``kinds`` with the largest ``attribution_diff``
    (a ``direction_eval.direction_components`` table: harmful − harmless write onto the direction).

    Walking the ranking, a unit that overlaps one already chosen (a neuron of a chosen MLP output, or
    an MLP output with a chosen neuron) is passed over, so every column is edited once."""
    unknown = set(kinds) - {"head", "mlp_out", "neuron"}
    if unknown:
        raise ValueError(f"kinds {sorted(unknown)} cannot be targeted; choose from head, mlp_out, neuron")
    if top_n < 0:
        raise ValueError(f"top_n={top_n} must be >= 0")
    rows = components[components.component.isin(list(kinds))].sort_values("attribution_diff", ascending=False)
    if weight == 0:
        return []
    edits: list[Edit] = []
    for r in rows.itertuples():
        if len(edits) == top_n:
            break
        index = None if r.component == "mlp_out" else int(r.head if r.component == "head" else r.neuron)
        writer = (int(r.layer), EDIT_KINDS[r.component])
        # a neuron inside an MLP output already chosen (or the reverse) would edit its column twice
        if any((e.layer, e.writer) == writer and (e.index is None or index is None) for e in edits):
            continue
        edits.append(Edit(int(r.layer), r.component, index, weight, direction))
    return edits


def top_writers(model: HookedModel, direction: torch.Tensor, harmful: Sequence[str], harmless: Sequence[str], *,
                store: ActivationStore | None = None, kinds: Sequence[str] = ("head", "mlp_out"), top_n: int = 8,
                batch_size: int = 16) -> pd.DataFrame:
    """``direction_components`` rows of ``kinds`` (neurons: the ``top_n`` per layer), best writer first."""
    table = direction_components(model, direction, list(harmful), list(harmless), store,
                                 top_neurons=top_n if "neuron" in kinds else 0, batch_size=batch_size)
    table = table[table.component.isin(list(kinds))]
    return table.sort_values("attribution_diff", ascending=False).reset_index(drop=True)


def describe_edits(edits: Iterable[Edit]) -> str:
    """A short text of the edits, e.g. ``L1H2@1.2 L0mlp@1.2`` (table column)."""
    return " ".join(e.label() for e in edits)


# ---- application ---------------------------------------------------------------------------------

def _writer_params(model: HookedModel) -> dict[tuple[int, str], list[tuple[str, torch.nn.Parameter]]]:
    """``{(layer, writer): [(canonical name, parameter)]}``: each o_proj / down_proj weight (+ bias)."""
    out: dict[tuple[int, str], list] = {}
    for name, p, _ in residual_writers(model):
        for writer, part in _PARTS.items():
            if f".{part}." in name:
                out.setdefault((int(name.split(".")[2]), writer), []).append((name, p))
    return out


def _check_edits(model: HookedModel, edits: list[Edit]) -> None:
    """Layers and units in range; per writer either one whole-output edit or edits on distinct units."""
    seen: dict[tuple[int, str], list[Edit]] = {}
    for e in edits:
        if not 0 <= e.layer < model.n_layers:
            raise ValueError(f"edit {e.label()} is outside layers 0..{model.n_layers - 1}")
        limit = {"head": model.n_heads, "neuron": model.d_mlp}.get(e.kind)
        if limit is not None and not 0 <= e.index < limit:
            raise ValueError(f"edit {e.label()}: {e.kind} index outside 0..{limit - 1}")
        if e.basis.shape[1] != model.d_model:
            raise ValueError(f"edit {e.label()}: direction has {e.basis.shape[1]} entries, "
                             f"d_model is {model.d_model}")
        seen.setdefault((e.layer, e.writer), []).append(e)
    for (layer, writer), group in seen.items():
        keys = [(e.kind, e.index) for e in group]
        whole = any(e.index is None for e in group)
        if len(set(keys)) != len(keys) or (whole and len(group) > 1):
            raise ValueError(f"overlapping edits on layer {layer}'s {writer} writer ({describe_edits(group)}); "
                             "merge them into one edit per unit")


def norm_preserved(weight: torch.Tensor, direction: torch.Tensor, strength: float) -> torch.Tensor:
    """Heretic's norm-preserving edit (``row_normalization="full"``) of a writer matrix ``[d_model, d_in]``.

    Each row ``W[i, :]`` (the weights into residual coordinate i) is divided by its norm, the direction
    is projected out of the normalised matrix's columns with ``strength`` (the one projection,
    ``W_n − w r̂ r̂ᵀ W_n``; a ``[k, d_model]`` basis: its whole subspace, ``_project``), every row is
    normalised again and multiplied back by its original norm: the edit turns rows but leaves every
    row norm as it was. Heretic stores the difference to the original as a
    rank-``full_normalization_lora_rank`` (3) LoRA from a randomised SVD, so its exported model is an
    approximation of this exact map. A zero row stays zero. float32 in, float32 out."""
    w = weight.float()
    norms = w.norm(dim=1, keepdim=True)
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    edited = _project((w / safe).T, direction, strength).T
    new_norms = edited.norm(dim=1, keepdim=True)
    return torch.where(new_norms > 0, edited / torch.where(new_norms > 0, new_norms, torch.ones_like(new_norms)),
                       edited) * norms


def _edited(weight: torch.Tensor, e: Edit) -> torch.Tensor:
    """The edited columns ``weight`` (``[d_model, cols]``) of one edit, float32."""
    if e.norm_preserving:
        return norm_preserved(weight, e.direction, e.weight)
    # columns of W are residual vectors: project them (rows of Wᵀ) with the one projection
    return _project(weight.T.float(), e.basis, e.weight).T


def _apply(model: HookedModel, edits: list[Edit], params) -> None:
    """``W[:, cols] ← W[:, cols] − w r̂ r̂ᵀ W[:, cols]`` per edit (``norm_preserved`` for a norm-preserving
    edit; the bias of a whole writer is always projected plainly), float32."""
    with torch.no_grad():
        for e in edits:
            if e.weight == 0:
                continue
            for _, p in params[(e.layer, e.writer)]:
                if p.dim() == 1:
                    if e.index is None:  # the bias is written by the whole output, never by one unit
                        p.copy_(_project(p.float(), e.basis, e.weight).to(p.dtype))
                    continue
                cols = e.columns(model)
                p[:, cols] = _edited(p[:, cols], e).to(p.dtype)


@contextlib.contextmanager
def abliterated(model: HookedModel, edits: Sequence[Edit]):
    """Temporarily apply ``edits`` to the weights (orthogonalization per writer); restored on exit."""
    edits = list(edits)
    _check_edits(model, edits)
    params = _writer_params(model)
    names = sorted({name for e in edits if e.weight != 0 for name, _ in params[(e.layer, e.writer)]})
    with weights_restored(model, names):
        _apply(model, edits, params)
        yield model


def edit_hooks(model: HookedModel, edits: Sequence[Edit]) -> list:
    """Forward hooks equal to ``abliterated(model, edits)`` on the unedited model (read its weights now).

    A whole-output edit projects ``attn_out`` / ``mlp_out``; unit edits read the writer's input
    (``attn_z`` heads or ``mlp_post`` neurons) and subtract ``w Q Qᵀ W[:, cols] a[cols]`` from its output
    (Q: the edit's basis, ``r̂`` for one direction).
    """
    edits = [e for e in edits if e.weight != 0]
    _check_edits(model, edits)
    groups: dict[tuple[int, str], list[Edit]] = {}
    for e in edits:
        groups.setdefault((e.layer, e.writer), []).append(e)
    hooks = []
    for (layer, writer), group in groups.items():
        out_name = hk.attn_out(layer) if writer == "attn" else hk.mlp_out(layer)
        if group[0].index is None and not group[0].norm_preserving:
            e = group[0]
            hooks.append((out_name, lambda act, hook, q=e.basis, w=e.weight: _project(act, q, w)))
        else:
            hooks += _unit_hooks(model, layer, writer, group, out_name)
    return hooks


def _unit_hooks(model: HookedModel, layer: int, writer: str, group: list[Edit], out_name: str) -> list:
    """A hook keeping the writer's input and one subtracting the edited units' write onto each basis."""
    weight = writer_weight(model, group[0].kind, layer)
    terms, deltas = [], []
    for e in group:
        cols = e.columns(model)
        if e.norm_preserving:  # not a rank-1 map: add (W' − W)[:, cols] a[cols]
            block = weight.detach()[:, cols].float()
            deltas.append((cols, (_edited(block, e) - block).T.contiguous()))
            continue
        read = e.basis.to(weight.device) @ weight.detach()[:, cols].float()  # Qᵀ W[:, cols], [k, cols]
        terms.append((cols, read, e.basis, e.weight))
    bias = [e for e in group if e.norm_preserving and e.index is None]  # a whole writer's bias: plain projection
    kept = {}

    def keep(act, hook):
        kept["a"] = act
        return act

    def write(act, hook):
        a = kept.pop("a")
        a = a.flatten(start_dim=2) if a.dim() == 4 else a  # heads: [b, pos, heads, d_head] -> o_proj input
        out = act
        for cols, read, q, w in terms:
            coef = a[..., cols].float() @ read.T.to(a.device)  # [..., k]
            out = out - (w * coef @ q.to(act.device)).to(act.dtype)
        for cols, delta in deltas:
            out = out + (a[..., cols].float() @ delta.to(a.device)).to(act.dtype)
        for e in bias:
            b = _bias(model, layer, writer)
            if b is not None:
                q = e.basis.to(b.device)
                out = out - (e.weight * (b.float() @ q.T) @ q).to(act.device, act.dtype)
        return out

    in_name = hk.attn_z(layer) if writer == "attn" else hk.mlp_post(layer)
    return [(in_name, keep), (out_name, write)]


def _bias(model: HookedModel, layer: int, writer: str) -> torch.Tensor | None:
    """The bias of one writer (o_proj / down_proj), or None when it has none."""
    found = [p for _, p in _writer_params(model).get((layer, writer), []) if p.dim() == 1]
    return found[0].detach() if found else None


def export_abliterated(model: HookedModel, edits: Sequence[Edit], path) -> Path:
    """Write the model with ``edits`` applied as an HF folder (``interventions.export_hf``); the live
    model is restored afterwards. Loads with ``transformers.AutoModelForCausalLM.from_pretrained``."""
    with abliterated(model, edits):
        return export_hf(model, path)


# ---- scoring -------------------------------------------------------------------------------------

def score_model(model: HookedModel, harmful: Sequence[str], harmless: Sequence[str], base_harmless: torch.Tensor, *,
                refusal_tokens: Sequence[int] | None = None, markers: bool = False, judge: bool = False,
                max_new_tokens: int = 24, plaintext: Sequence[str] | None = None, batch_size: int = 32,
                seed: int = 0, capability: int = 0) -> dict:
    """Score the model as it is now (wrap the call in ``abliterated`` or any other edit).

    ``refusal_score``: mean refusal score of ``harmful`` (``metrics``' calibrated refusal tokens);
    ``kl``: Heretic's first-token KL(base || now) on ``harmless`` (``base_harmless``: the unedited
    model's ``last_logits_shared(model, harmless, batch_size=batch_size)``); with ``markers``,
    ``marker_refusals``: how many greedy responses of ``max_new_tokens`` tokens contain a Heretic
    refusal marker; with ``judge``, circuitlab's own judge (``metrics.judge_refusals``, same length):
    ``judge_refusal_rate`` on ``harmful`` and ``over_refusal_rate`` on ``harmless``, each with a bootstrap
    95 % CI (``_ci_low`` / ``_ci_high``, ``seed``); with ``plaintext``, ``cross_entropy`` (nats per token);
    with ``capability`` N > 0, ``capability_accuracy``: exact-match accuracy on N generated two-digit
    arithmetic questions (``capability.arithmetic_accuracy``, ``seed``; off by default, so rows stay comparable).
    """
    harmful, harmless = list(harmful), list(harmless)
    tok = list(refusal_tokens) if refusal_tokens is not None else metrics.refusal_tokens(model)
    # harmless alone, batched as base_harmless was: the unedited model's KL is then exactly 0
    harmful_logits = last_logits_shared(model, harmful, batch_size=batch_size)
    harmless_logits = last_logits_shared(model, harmless, batch_size=batch_size)
    out = {"refusal_score": metrics.refusal_score_from_logits(harmful_logits, tok).mean().item(),
           "kl": first_token_kl(base_harmless, harmless_logits)}
    if markers:
        found = load_markers()
        # a marker, once present, stays: stop decoding that row (an empty text is no verdict yet)
        texts = model.generate(harmful, max_new_tokens, batch_size=batch_size, share_prefix=True,
                               stop_when=lambda t: bool(t.strip()) and marker_refusals([t], found)[0])
        out["marker_refusals"] = int(sum(marker_refusals(texts, found)))
    if judge:
        for name, prompts in (("judge_refusal_rate", harmful), ("over_refusal_rate", harmless)):
            verdicts = metrics.judge_refusals(model, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                              share_prefix=True)
            out[name] = sum(verdicts) / len(verdicts)
            out[f"{name}_ci_low"], out[f"{name}_ci_high"] = bootstrap_ci(verdicts, seed=seed)
    if plaintext:
        out["cross_entropy"] = metrics.cross_entropy(model, list(plaintext), batch_size=max(1, batch_size // 4))
    if capability:
        out["capability_accuracy"] = arithmetic_accuracy(model, capability, seed, batch_size=batch_size)
    return out
