"""circuit-map: the refusal circuit by stage — probe, rank, verify causally, then assign stages.

1. **Probing** (Li et al. 2023 style) finds where harmful vs harmless is linearly readable in the
   residual stream; the first layer whose best probe reaches ``probe_threshold`` is where
   harmfulness becomes readable.
2. **Candidates**: diff-ranking proposes neurons and heads in the layers that write into the
   readable stream (a component in layer l writes resid_pre of l + 1); attribution patching
   (Nanda 2023; Kramár et al. 2024) of the verification patch below adds the units with the
   largest estimated refusal drop in any layer (``atp_estimate``, same scale as ``patch_effect``).
3. **Verification** by activation patching (Meng et al. 2022): each candidate's activation at the
   post-instruction positions of harmful prompts is replaced by its mean over harmless prompts at
   the same positions; ``patch_effect`` is the resulting drop of the refusal score as a fraction
   of the harmful-minus-harmless score gap (1 = the patch alone removes the gap). Candidates with
   ``patch_effect >= verify_threshold`` are ``verified``.
4. **Stages**, by depth and by what a component writes (direct attribution, harmful minus
   harmless mean at the last position): ``direction_attribution`` is its write along the refusal
   direction (difference in means at ``direction_layer``) as a fraction of that direction's
   norm (the refusal direction's layer is the one whose difference-in-means direction, projected
   out of the stream at every layer, is estimated by the same attribution pass to lower the refusal
   score most, within the first 80 % of layers as in Arditi et al. 2024); ``logit_attribution`` its direct effect on the refusal-token logit as a fraction of the
   total harmful-minus-harmless refusal logit gap. Rules, in order:
   production (promotes refusal tokens: layer >= direction layer and logit fraction >= ``tau``),
   detection (reads harmful content: layer below the first readable layer), decision (writes the
   refusal direction: direction fraction >= ``tau``), else evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from .. import hooks as hk
from .. import metrics, plots
from ..attribution import mean_patch_estimates
from ..components import Component, hook_name
from ..directions import mean_differences
from ..probes import best_position_accuracy
from ..progress import progress_bar
from ..ranking import rank_components, top_components
from ..results import Result
from ..store import ActivationStore
from ..weights import final_norm_weight, unembedding_weight, write_vector
from .base import Experiment, check, register
from .checks import check_at_least, check_fraction, check_types
from .patching.engine import Sweep, run_sweeps

__all__ = ["CircuitMap", "assign_stage", "STAGES"]

STAGES = ("detection", "evaluation", "decision", "production")


def assign_stage(layer: int, first_readable: int, direction_layer: int, direction_frac: float,
                 logit_frac: float, tau: float) -> str:
    """Stage rule of the module docstring (production, detection, decision, evaluation)."""
    if layer >= direction_layer and logit_frac >= tau:
        return "production"
    if layer < first_readable:
        return "detection"
    if direction_frac >= tau:
        return "decision"
    return "evaluation"


@register("circuit-map")
@dataclass
class CircuitMap(Experiment):
    """Refusal circuit by stage: probing picks layers, ranking proposes units, patching verifies them."""

    probe_threshold: float = 0.9  # accuracy at which harmfulness counts as linearly readable
    n_neurons: int = 10  # neuron candidates from the ranking (best |d| within the candidate layers)
    n_heads: int = 5  # head candidates from the ranking
    n_atp_neurons: int = 10  # further neuron candidates: largest attribution-patching estimates, any layer
    n_atp_heads: int = 5  # further head candidates from attribution patching
    verify_threshold: float = 0.02  # patch effect (fraction of the refusal-score gap) to count as verified
    tau: float = 0.1  # attribution fraction that counts as "writes" for stage assignment
    direction_layer: int | None = None  # None: largest estimated bypass within the first 80% of layers
    n_verify: int = 16  # harmful prompts used for verification patching
    batch_size: int = 16  # prompts per forward pass
    seed: int = 0  # seed of the probes' cross-validation folds

    def __post_init__(self):
        check_types(self)
        check_fraction(self, "probe_threshold", "verify_threshold", "tau", closed=True)
        check_at_least(self, 0, "n_neurons", "n_heads", "n_atp_neurons", "n_atp_heads", "direction_layer", "seed")
        check(self.n_neurons + self.n_heads + self.n_atp_neurons + self.n_atp_heads > 0,
              "n_neurons, n_heads, n_atp_neurons and n_atp_heads are all 0: ask for at least one candidate "
              "(e.g. --set n_neurons=10)")
        check_at_least(self, 1, "n_verify", "batch_size")

    def run(self, model, harmful, harmless, *, store=None) -> Result:
        store = store if store is not None else ActivationStore()
        self._prefetch(model, harmful, harmless, store)
        resid = [hk.resid_pre(l) for l in range(model.n_layers)]
        post = [store.get(model, list(s), resid, "post", batch_size=self.batch_size, progress=False)
                for s in (harmful, harmless)]
        layer_acc = np.array([best_position_accuracy(post[0][n].numpy(), post[1][n].numpy(), seed=self.seed)
                              for n in progress_bar(resid, True, desc="probing layers")])
        readable = np.flatnonzero(layer_acc >= self.probe_threshold)
        first_readable = int(readable[0]) if len(readable) else int(np.argmax(layer_acc))
        cand_layers = [l for l in range(model.n_layers) if l + 1 >= first_readable]
        ranking = rank_components(model, harmful, harmless, store=store, batch_size=self.batch_size)
        means = {n: t.mean(0) for n, t in store.get(
            model, list(harmless), [f(l) for l in range(model.n_layers) for f in (hk.mlp_post, hk.attn_z)], "post",
            batch_size=self.batch_size, progress=False).items()}
        diffs = mean_differences(model, harmful, harmless, resid, "last", store=store, batch_size=self.batch_size)
        directions = {l: diffs[n][0] for l, n in enumerate(resid)}
        atp = mean_patch_estimates(model, list(harmful)[:self.n_verify], means, directions,
                                   batch_size=self.batch_size)
        direction_layer = self._direction_layer(model, atp["direction"].numpy())
        candidates = self._candidates(ranking, cand_layers, atp)
        if not candidates:
            raise ValueError("no candidate components: lower probe_threshold or raise n_neurons / n_heads")
        attribution = self._attribution(model, candidates, harmful, harmless, direction_layer, store)
        patch, gap = self._patch_effects(model, candidates, harmful, harmless, means)
        rows = []
        for c in candidates:
            r = ranking[(ranking.component == c.kind) & (ranking.layer == c.layer) &
                        (ranking["neuron" if c.kind == "neuron" else "head"] == c.index)].iloc[0]
            dir_frac, logit_frac = attribution[c]
            stage = assign_stage(c.layer, first_readable, direction_layer, dir_frac, logit_frac, self.tau)
            rows.append({"stage": stage, "layer": c.layer, "component": c.kind,
                         "head": c.index if c.kind == "head" else None,
                         "neuron": c.index if c.kind == "neuron" else None,
                         "probe_accuracy": float(layer_acc[min(c.layer + 1, model.n_layers - 1)]),
                         "effect_size": float(r.effect_size), "atp_estimate": atp[c.kind][c.layer, c.index].item() / gap,
                         "patch_effect": patch[c],
                         "direction_attribution": dir_frac, "logit_attribution": logit_frac,
                         "verified": bool(patch[c] >= self.verify_threshold)})
        table = pd.DataFrame(rows)
        for col in ("head", "neuron"):
            table[col] = pd.array(table[col], dtype="Int64")
        table["stage"] = pd.Categorical(table["stage"], STAGES, ordered=True)
        table = table.sort_values(["stage", "layer", "patch_effect"], ascending=[True, True, False]).reset_index(drop=True)
        table["stage"] = table["stage"].astype(str)
        layers = pd.DataFrame({"layer": range(model.n_layers), "probe_accuracy": layer_acc,
                               "direction_bypass_atp": atp["direction"].numpy() / gap})
        summary = {"first_readable_layer": first_readable, "direction_layer": direction_layer,
                   "n_candidates": len(table), "n_verified": int(table.verified.sum()),
                   **{f"verified_{s}": int(((table.stage == s) & table.verified).sum()) for s in STAGES}}
        return Result(table, self.config(model, harmful=harmful, harmless=harmless), tables={"layers": layers},
                      figures={"circuit": plots.circuit_diagram(table, layers, first_readable, direction_layer, model.name)},
                      summary=summary)

    def _prefetch(self, model, harmful, harmless, store) -> None:
        """One batched pass per position spec for every hook the steps below read (then all hits)."""
        layers = range(model.n_layers)
        per_layer = [f(l) for l in layers for f in (hk.resid_pre, hk.mlp_post, hk.attn_z)]
        prompts = list(harmful) + list(harmless)
        store.get(model, prompts, per_layer, "post", batch_size=self.batch_size)
        store.get(model, prompts, per_layer + [hk.final_resid()], "last", batch_size=self.batch_size)

    def _direction_layer(self, model, bypass) -> int:
        if self.direction_layer is not None:
            if not 0 <= self.direction_layer < model.n_layers:
                raise ValueError(f"direction_layer must be in 0..{model.n_layers - 1}, got {self.direction_layer}")
            return self.direction_layer
        limit = max(1, int(np.ceil(0.8 * model.n_layers)))  # Arditi et al. exclude the last 20% of layers
        return int(np.argmax(bypass[:limit]))

    def _candidates(self, ranking: pd.DataFrame, layers, atp: dict) -> list[Component]:
        """Best-ranked units in the candidate layers, then the largest attribution estimates anywhere."""
        out = []
        for kind, n in (("neuron", self.n_neurons), ("head", self.n_heads)):
            out += top_components(ranking, kind, n, layers=layers, strict=False)
        for kind, n in (("neuron", self.n_atp_neurons), ("head", self.n_atp_heads)):
            flat = atp[kind].flatten()
            for i in flat.argsort(descending=True)[:n].tolist():
                c = Component(kind, i // atp[kind].shape[1], i % atp[kind].shape[1])
                if c not in out and flat[i] > 0:
                    out.append(c)
        return out

    def _attribution(self, model, comps, harmful, harmless, direction_layer, store) -> dict:
        """(direction fraction, logit fraction) per component: its harmful-minus-harmless direct write."""
        names = sorted({hook_name(c) for c in comps} | {hk.resid_pre(direction_layer), hk.final_resid()})
        mean_diff = {n: d[0] for n, d in mean_differences(model, harmful, harmless, names, "last", store=store,
                                                          batch_size=self.batch_size).items()}
        final = store.get(model, list(harmful), [hk.final_resid()], "last", batch_size=self.batch_size,
                          progress=False)[hk.final_resid()][:, 0]
        direction = mean_diff[hk.resid_pre(direction_layer)]
        r_hat = direction / direction.norm().clamp(min=1e-12)
        # Linearised final norm: refusal-logit direction scaled by gamma / mean RMS of harmful final states.
        rms = final.pow(2).mean(-1).add(1e-6).sqrt().mean()
        gamma = final_norm_weight(model).detach().float().cpu()
        unembed = unembedding_weight(model).detach().float().cpu()
        tokens = metrics.refusal_tokens(model)
        u = (unembed[tokens].mean(0) - unembed.mean(0)) * gamma / rms
        logit_gap = float(mean_diff[hk.final_resid()] @ u)
        out = {}
        for c in comps:
            diff = mean_diff[hook_name(c)]
            unit_diff = diff[c.index]  # scalar for a neuron, [d_head] for a head
            write = unit_diff * write_vector(model, c) if c.kind == "neuron" else unit_diff @ write_vector(model, c)
            dir_frac = float(write @ r_hat) / float(direction.norm().clamp(min=1e-12))
            logit_frac = float(write @ u) / logit_gap if abs(logit_gap) > 1e-9 else 0.0
            out[c] = (dir_frac, logit_frac)
        return out

    def _patch_effects(self, model, comps, harmful, harmless, means) -> tuple[dict, float]:
        """Exact patch of each candidate at the post positions to its harmless mean (see docstring);
        returns the normalized effects and the harmful-minus-harmless score gap they are fractions of.

        Runs on the patching engine: per harmful prompt, one capture pass, then all candidates of a
        hook in one batch that recomputes only the post positions from the candidate's layer on.
        """
        h_prompts = list(harmful)[:self.n_verify]
        benign = metrics.refusal_score(model, list(harmless)[:self.n_verify], batch_size=self.batch_size).mean().item()
        tokens = metrics.refusal_tokens(model)
        n_post = model.n_post

        def set_to_harmless_mean(act, name, cells, ctx, offset):
            first = ctx.target_ids.shape[0] - n_post  # first post-instruction position
            lo = max(first, offset)
            for row, (_, _, index) in enumerate(cells):
                act[row, lo - offset:, index] = means[name][lo - first:, index].to(act)
            return act

        sweeps = [Sweep(component=kind, cells=[(c.layer, None, c.index) for c in comps if c.kind == kind],
                        hook=lambda cell, kind=kind: hook_name(Component(kind, cell[0], cell[2])),
                        setter=set_to_harmless_mean, index_name=kind)
                  for kind in ("neuron", "head") if any(c.kind == kind for c in comps)]
        drops = {c: [] for c in comps}
        bases = []
        for prompt in progress_bar(h_prompts, True, desc="verifying candidates"):
            ids = model.tokenize([prompt])[0][0]
            rows, ctx = run_sweeps(model, ids, ids, sweeps, lambda logits: metrics.refusal_score_from_logits(logits, tokens),
                                   batch_size=self.batch_size)
            bases.append(ctx.target_metric)
            for row in rows:
                drops[Component(row["component"], row["layer"], row[row["component"]])].append(ctx.target_metric - row["metric"])
        gap = float(np.mean(bases)) - benign
        if abs(gap) < 1e-6:
            raise ValueError("harmful and harmless prompts have the same mean refusal score: nothing to verify")
        return {c: float(np.mean(d) / gap) for c, d in drops.items()}, gap
