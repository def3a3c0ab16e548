"""activation-patching: exact activation patching of harmful/harmless prompt pairs.

Method: Meng et al. 2022 ("Locating and Editing Factual Associations in GPT", causal tracing) with
TransformerLens ``patching`` semantics: run the *target* prompt, overwrite one activation with its
value from the *source* prompt, read the metric (default: refusal score, the log-odds of the
refusal tokens at the last position; ``metrics.refusal_score_from_logits``).

- ``mode="denoise"`` (default): clean = harmful, corrupted = harmless; run the harmless prompt and
  patch in harmful activations: which component restores refusal?
- ``mode="noise"``: run the harmful prompt and patch in harmless activations: which component,
  when replaced, removes refusal?

``normalized = (metric - corrupted) / (clean - corrupted)``: 0 = the harmless (corrupted) run,
1 = the harmful (clean) run, in both modes.

Prompt pairs of different token lengths: pairs are built with EQUAL token length (chat template
included) by ``patching.pairs.make_pairs`` — default ``pairing="length"`` drops prompts without an
equal-length partner; ``pairing="pad"`` pads the shorter request with spaces at the end of its user
span so template positions align. Positions in the table are negative offsets from the end
(``-1`` = last token), so ``position=-3`` is the same template token in every pair.

Patching needs full-sequence activations and the target run's keys/values, which the
ActivationStore (position-selected activations) does not hold; the engine computes them with two
forward passes per pair — negligible next to the sweep itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ... import hooks as hk
from ... import metrics as mx
from ... import plots
from ...results import Result
from ..base import Experiment, register
from .engine import Sweep, run_sweeps
from .pairs import make_pairs

__all__ = ["ActivationPatching", "PairPatchingExperiment", "layer_sweeps", "refusal_metric", "patch_pairs", "MODES", "LAYER_COMPONENTS"]

MODES = ("denoise", "noise")
LAYER_COMPONENTS = ("resid_pre", "attn_out", "mlp_out")
POSITION_SETS = ("all", "post", "last")


def refusal_metric(model):
    """Default metric: refusal log-odds from last-position logits ``[B, vocab] -> [B]``."""
    tokens = mx.refusal_tokens(model)
    return lambda logits: mx.refusal_score_from_logits(logits, tokens)


def layer_sweeps(model, components, layers, positions, *, per_position=True, head_positions=False) -> list[Sweep]:
    """Sweeps for whole-layer components (``resid_pre|attn_out|mlp_out``) and heads (``attn_z``).

    ``positions``: absolute positions to patch one at a time; ``per_position=False`` patches every
    position at once (position None). Heads patch all positions unless ``head_positions``.
    """
    sweeps = []
    pos_list = list(positions) if per_position else [None]
    for comp in components:
        if comp in LAYER_COMPONENTS:
            cells = [(l, p, None) for l in layers for p in pos_list]
            sweeps.append(Sweep(comp, cells, lambda c, comp=comp: getattr(hk, comp)(c[0])))
        elif comp == "head":
            hpos = list(positions) if head_positions else [None]
            cells = [(l, p, h) for l in layers for p in hpos for h in range(model.n_heads)]
            sweeps.append(Sweep("head", cells, lambda c: hk.attn_z(c[0]), index_name="head"))
        else:
            raise ValueError(f"component {comp!r} is not one of {LAYER_COMPONENTS + ('head',)}")
    return sweeps


def _positions(which: str, length: int, n_post: int) -> list[int]:
    if which == "all":
        return list(range(length))
    if which == "post":
        return list(range(length - max(n_post, 1), length))
    if which == "last":
        return [length - 1]
    raise ValueError(f"positions={which!r} is not one of {POSITION_SETS}")


def patch_pairs(model, pairs, make_sweeps, metric, *, mode="denoise", fast=True, batch_size=32,
                progress=False, prepare=None, capture_names=()) -> pd.DataFrame:
    """Run ``make_sweeps(pair)`` on every pair; tidy rows with ``pair_id`` and ``normalized``."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {MODES}")
    frames = []
    for pair in pairs:
        harmful, harmless = pair.harmful_ids, pair.harmless_ids
        target, source = (harmless, harmful) if mode == "denoise" else (harmful, harmless)
        rows, ctx = run_sweeps(model, target, source, make_sweeps(pair), metric, fast=fast,
                               batch_size=batch_size, progress=progress, prepare=prepare,
                               capture_names=capture_names)
        clean, corrupted = ((ctx.source_metric, ctx.target_metric) if mode == "denoise"
                            else (ctx.target_metric, ctx.source_metric))
        df = pd.DataFrame(rows)
        if "position" in df:  # negative offsets: the same template token in every pair
            df["position"] = df["position"].map(lambda p: None if p is None or pd.isna(p) else int(p) - pair.length)
        gap = clean - corrupted
        df["normalized"] = (df["metric"] - corrupted) / gap if abs(gap) > 1e-6 else np.nan
        df["clean_metric"], df["corrupted_metric"] = clean, corrupted
        df["pair_id"] = pair.pair_id
        frames.append(df)
    table = pd.concat(frames, ignore_index=True)
    for col in ("head", "neuron", "position"):
        if col in table:
            table[col] = table[col].astype("Int64")
    return table


def average_over_pairs(table: pd.DataFrame) -> pd.DataFrame:
    """Mean metric / normalized effect per component over pairs, with standard error."""
    keys = [c for c in ("component", "layer", "head", "neuron", "position") if c in table]
    g = table.groupby(keys, dropna=False, sort=False)
    out = g.agg(metric_mean=("metric", "mean"), normalized_mean=("normalized", "mean"),
                normalized_std=("normalized", "std"), n_pairs=("pair_id", "nunique")).reset_index()
    out["normalized_sem"] = out["normalized_std"] / np.sqrt(out["n_pairs"].clip(lower=1))
    return out.drop(columns="normalized_std")


@dataclass
class PairPatchingExperiment(Experiment):
    """Parameters and checks shared by the experiments that patch harmful/harmless prompt pairs."""

    mode: str = "denoise"
    n_pairs: int = 4
    pairing: str = "length"
    batch_size: int = 32
    fast: bool = True
    seed: int = 0

    def checked_layers(self, model, layers) -> list[int]:
        """``layers`` (all when None), refused with a clear error if out of range; checks ``mode`` too."""
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} is not one of {MODES}")
        layers = list(range(model.n_layers)) if layers is None else list(layers)
        if any(not 0 <= l < model.n_layers for l in layers):
            raise ValueError(f"layers {layers} out of range 0..{model.n_layers - 1}")
        return layers

    def pairs(self, model, harmful, harmless):
        return make_pairs(model, harmful, harmless, n_pairs=self.n_pairs, pairing=self.pairing)


@register("activation-patching")
@dataclass
class ActivationPatching(PairPatchingExperiment):
    """Exact activation patching (Meng et al. 2022) of harmful/harmless pairs: where refusal is carried."""

    components: list[str] = field(default_factory=lambda: ["resid_pre", "attn_out", "mlp_out", "head"])
    positions: str = "all"  # all | post | last: positions swept one at a time
    per_position: bool = True
    head_positions: bool = False  # heads per position too (n_layers * n_heads * n_positions runs)
    layers: list[int] | None = None

    def run(self, model, harmful, harmless, *, store=None) -> Result:
        layers = self.checked_layers(model, self.layers)
        pairs = self.pairs(model, harmful, harmless)

        def sweeps(pair):
            pos = _positions(self.positions, pair.length, model.n_post)
            return layer_sweeps(model, self.components, layers, pos, per_position=self.per_position,
                                head_positions=self.head_positions)

        table = patch_pairs(model, pairs, sweeps, refusal_metric(model), mode=self.mode, fast=self.fast,
                            batch_size=self.batch_size, progress=True)
        table["mode"] = self.mode
        avg = average_over_pairs(table)
        summary = {"n_pairs": len(pairs), "n_unpaired": pairs.n_unpaired,
                   "clean_metric_mean": float(table.groupby("pair_id").clean_metric.first().mean()),
                   "corrupted_metric_mean": float(table.groupby("pair_id").corrupted_metric.first().mean()),
                   "skipped_fraction": float(table.skipped.mean())}
        top = avg.reindex(avg.normalized_mean.abs().sort_values(ascending=False).index).head(5)
        summary["top"] = [{k: (None if pd.isna(v) else v) for k, v in r.items()}
                          for r in top[[c for c in ("component", "layer", "head", "position", "normalized_mean")
                                        if c in top]]
                          .astype(object).to_dict("records")]
        return Result(table, self.config(model, harmful=harmful, harmless=harmless),
                      tables={"average": avg}, figures=_figures(avg, model.name, self.mode), summary=summary)


def _figures(avg: pd.DataFrame, model_name: str, mode: str) -> dict:
    """Layer × position heatmaps (as in Meng et al. 2022) and layer × component bars."""
    figs = {}
    for comp in LAYER_COMPONENTS:
        sub = avg[(avg.component == comp) & avg.position.notna()]
        if len(sub) and sub.position.nunique() > 1:
            figs[f"heatmap_{comp}"] = plots.heatmap(
                sub.astype({"position": int}), index="layer", columns="position", values="normalized_mean",
                title=f"{comp} patching ({mode}), {model_name}")
    heads = avg[avg.component == "head"]
    if len(heads) and heads.position.isna().all():
        figs["heatmap_head"] = plots.heatmap(heads.astype({"head": int}), index="layer", columns="head",
                                             values="normalized_mean", title=f"head patching ({mode}), {model_name}")
    # Per layer and component: the signed effect of largest magnitude over positions / heads.
    idx = avg.assign(mag=avg.normalized_mean.abs()).dropna(subset=["mag"]).groupby(["component", "layer"]).mag.idxmax()
    if len(idx):
        best = avg.loc[idx.to_numpy(), ["component", "layer", "normalized_mean"]]
        figs["bars_layer_component"] = plots.bars(best, x="layer", y="normalized_mean", hue="component",
                                                  title=f"strongest patch per layer ({mode}), {model_name}")
    return figs
