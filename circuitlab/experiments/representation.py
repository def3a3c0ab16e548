"""representation-reading: representation engineering (Zou et al. 2023, "Representation Engineering: A
Top-Down Approach to AI Transparency") on harmful vs harmless: LAT reading vectors per layer, their
reading accuracy against difference in means and a logistic probe, and representation control.

Splits: each set's deterministic 60/20/20 train/val/test split (``PromptSet.split`` with ``seed``),
each part sampled down to ``n_train`` / ``n_val`` / ``n_test`` prompts (None: the whole part).

1. Reading (§3.1.1, LAT): per layer, ``resid_pre`` at the last prompt token; the reading vector is
   the first principal component of (randomly) paired train differences
   (``directions.lat_direction``), its sign set so harmful reads higher. Reading accuracy on val and
   test: projection above the train midpoint threshold (``directions.reading_accuracy``). The same
   for the difference-in-means direction and for a logistic probe fit on train
   (``methods.iti.heldout_probe_accuracy``). ``cosine_lat_mean``: how close LAT and diff-in-means are.
2. Control (§3.2): the reading vector of ``control_layer`` (None: chosen on val among
   ``control_layers`` as the layer whose addition at strength 1 raises the harmless val refusal
   score most) is added at ``resid_pre`` at every position, ``strength × separation × v`` with
   ``separation`` the train gap between the class means of the projections (strength 1 moves a
   harmless mean onto the harmful one). ``strengths`` > 0 add (toward refusal), < 0 subtract.
   Each strength is measured on test (``methods.iti.evaluate_intervention``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from circuitlab.core import hooks as hk
from circuitlab.io import datasets
from circuitlab.io.datasets import PromptSet
from circuitlab.io.results import Result
from circuitlab.io.store import ActivationStore
from circuitlab.methods import interventions as iv
from circuitlab.methods import metrics
from circuitlab.methods.directions import (direction_from_pairs, lat_direction, paired_differences, projection_threshold,
    reading_accuracy, unit)
from circuitlab.methods.iti import evaluate_intervention, heldout_probe_accuracy
from circuitlab.experiments.base import Experiment, check, check_layers, register
from circuitlab.experiments.checks import check_at_least, check_types

__all__ = ["RepresentationReading"]

READERS = ("lat", "mean", "probe")


@register("representation-reading")
@dataclass
class RepresentationReading(Experiment):
    """Representation engineering (Zou et al. 2023): LAT reading vectors per layer, reading accuracy vs diff-in-means and a probe, and control."""

    layers: list[int] | None = None  # resid_pre layers to read (None: all)
    paired: bool = False  # harmful[i] / harmless[i] are matched pairs (False: pair train prompts at random)
    n_train: int | None = None  # train prompts per side (None: the whole 60% train part)
    n_val: int | None = None  # val prompts per side (None: the whole 20% val part)
    n_test: int | None = None  # test prompts per side (None: the whole 20% test part)
    control: bool = True  # run representation control at one layer
    control_layer: int | None = None  # layer to control at (None: chosen on val among control_layers)
    control_layers: list[int] | None = None  # candidate control layers (None: every read layer)
    strengths: list[float] = field(default_factory=lambda: [-1.0, 0.0, 1.0])  # multiples of the class separation
    judge: bool = True  # judge refusal by generation (False: logit scores only)
    max_new_tokens: int = 24  # tokens generated per prompt for the judge
    plaintext: str | None = "plaintext"  # prompt set for the cross-entropy side effect (None: skip)
    n_text: int = 16  # plain texts for the cross-entropy
    batch_size: int = 16  # prompts per forward pass
    n_boot: int = 1000  # bootstrap resamples for the confidence intervals
    seed: int = 0  # seed of the splits, the random pairing and the bootstrap

    def __post_init__(self):
        check_types(self)
        check_layers("layers", self.layers)
        check_layers("control_layers", self.control_layers)
        check(len(self.strengths) > 0, "strengths must be a non-empty list of numbers (e.g. --set strengths=-1,0,1)")
        check_at_least(self, 1, "max_new_tokens", "n_text", "batch_size", "n_boot")
        check_at_least(self, 2, "n_train", "n_val", "n_test")
        check_at_least(self, 0, "seed", "control_layer")

    def run(self, model, harmful, harmless, *, store=None) -> Result:
        store = store if store is not None else ActivationStore()
        layers = list(range(model.n_layers)) if self.layers is None else list(self.layers)
        bad = [l for l in layers + list(self.control_layers or []) + [self.control_layer or 0] if l >= model.n_layers]
        if bad:
            raise ValueError(f"layers {bad} are out of range for a {model.n_layers}-layer model")
        parts = {side: _split(p, self.n_train, self.n_val, self.n_test, self.seed)
                 for side, p in (("h", harmful), ("s", harmless))}
        names = [hk.resid_pre(l) for l in layers]
        acts = {f"{side}_{split}": store.get(model, list(p), names, "last", batch_size=self.batch_size, progress=True)
                for side, ps in parts.items() for split, p in zip(("train", "val", "test"), ps)}
        x = {k: {l: a[hk.resid_pre(l)][:, 0] for l in layers} for k, a in acts.items()}
        rows, vectors = [], {}
        for l in layers:
            th, ts = x["h_train"][l], x["s_train"][l]
            if not paired_differences(th, ts, paired=self.paired, seed=self.seed).any():
                # e.g. layer 0 at a template token, or twins before the feature arrives: no direction exists
                rows += [{"layer": l, "component": "resid_pre", "position": -1, "reader": m, "split": split,
                          "accuracy": float("nan"), "cosine_lat_mean": float("nan")}
                         for split in ("val", "test") for m in READERS]
                continue
            dirs = {"lat": lat_direction(th, ts, paired=self.paired, seed=self.seed),
                    "mean": unit(direction_from_pairs(th, ts, "mean"))}
            vectors[l] = dirs["lat"]
            cosine = float(dirs["lat"] @ dirs["mean"])
            y_train = np.r_[np.ones(len(th)), np.zeros(len(ts))]
            for split in ("val", "test"):
                vh, vs = x[f"h_{split}"][l], x[f"s_{split}"][l]
                acc = {m: reading_accuracy(vh, vs, d, projection_threshold(th, ts, d)) for m, d in dirs.items()}
                acc["probe"] = heldout_probe_accuracy(torch.cat([th, ts]).numpy(), y_train, torch.cat([vh, vs]).numpy(),
                                                      np.r_[np.ones(len(vh)), np.zeros(len(vs))])["val_accuracy"]
                rows += [{"layer": l, "component": "resid_pre", "position": -1, "reader": m, "split": split,
                          "accuracy": a, "cosine_lat_mean": cosine} for m, a in acc.items()]
        table = pd.DataFrame(rows)
        summary = _reading_summary(table)
        tables, figures = {}, {"reading_accuracy": reading_figure(table, model.name)}
        if self.control:
            layer, choice = self._choose_layer(model, layers, x, vectors, parts["s"][1])
            control = self._control(model, layer, x, vectors[layer], parts, choice)
            tables["control"], tables["layer_choice"] = control, choice
            figures["control_curve"] = control_figure(control, model.name, layer)
            summary.update(_control_summary(control, layer))
        summary.update({f"n_{s}": [len(parts["h"][i]), len(parts["s"][i])] for i, s in enumerate(("train", "val", "test"))})
        return Result(table, self.config(model, harmful=harmful, harmless=harmless), tables=tables, figures=figures,
                      summary=summary)

    def _shift(self, x, layer, v) -> float:
        """Train separation of the class means along ``v`` (the unit of ``strengths``)."""
        return float((x["h_train"][layer] @ v).mean() - (x["s_train"][layer] @ v).mean())

    def _choose_layer(self, model, layers, x, vectors, s_val) -> tuple[int, pd.DataFrame]:
        """``control_layer``, or the candidate whose strength-1 addition raises the val harmless refusal score most."""
        if self.control_layer is not None:
            return self.control_layer, pd.DataFrame([{"layer": self.control_layer, "rule": "given"}])
        candidates = [l for l in (self.control_layers or layers) if l in vectors]
        if not candidates:
            raise ValueError(f"control_layers={self.control_layers} share no layer with the read layers {layers}")
        tokens = metrics.refusal_tokens(model)
        base = float(metrics.refusal_score_from_logits(model.last_logits(list(s_val), batch_size=self.batch_size),
                                                       tokens).mean())
        rows = []
        for l in candidates:
            hooks = iv.activation_addition_hooks(model, self._shift(x, l, vectors[l]) * vectors[l], l)
            logits = model.last_logits(list(s_val), fwd_hooks=hooks, batch_size=self.batch_size)
            rows.append({"layer": l, "val_induce_score": float(metrics.refusal_score_from_logits(logits, tokens).mean()),
                         "val_baseline_score": base})
        choice = pd.DataFrame(rows)
        best = int(choice.loc[choice["val_induce_score"].idxmax(), "layer"])
        choice["selected"] = choice["layer"] == best
        choice["rule"] = "highest val harmless refusal score with the reading vector added at strength 1"
        return best, choice

    def _control(self, model, layer, x, v, parts, choice) -> pd.DataFrame:
        h_test, s_test = parts["h"][2], parts["s"][2]
        plain = list(datasets.load(self.plaintext, n=self.n_text, seed=self.seed + 1)) if self.plaintext else None
        base = model.last_logits(list(s_test), batch_size=self.batch_size)
        sep = self._shift(x, layer, v)
        rows = []
        for strength in self.strengths:
            hooks = iv.activation_addition_hooks(model, strength * sep * v, layer)
            rows.append({"layer": layer, "component": "direction", "strength": strength, "separation": sep,
                         **evaluate_intervention(model, hooks, h_test, s_test, plain, base_harmless=base,
                                                 judge=self.judge, max_new_tokens=self.max_new_tokens,
                                                 batch_size=self.batch_size, n_boot=self.n_boot, seed=self.seed)})
        return pd.DataFrame(rows)


def _split(prompts, n_train, n_val, n_test, seed) -> tuple[PromptSet, ...]:
    """``PromptSet.split`` train/val/test parts, each sampled down to its size (None: whole part)."""
    prompts = prompts if isinstance(prompts, PromptSet) else PromptSet("prompts", tuple(prompts))
    return tuple(prompts.split(s, seed).sample(n, seed) for s, n in (("train", n_train), ("val", n_val), ("test", n_test)))


def _reading_summary(table: pd.DataFrame) -> dict:
    out = {}
    for reader in READERS:
        part = table[(table.reader == reader)]
        val = part[(part.split == "val") & part["accuracy"].notna()]
        test = part[part.split == "test"].set_index("layer")
        if val.empty:
            continue
        best = int(val.sort_values(["accuracy", "layer"], ascending=[False, True]).iloc[0]["layer"])
        out[f"{reader}_best_val_layer"] = best
        out[f"{reader}_test_accuracy_at_best_val_layer"] = round(float(test.loc[best, "accuracy"]), 4)
        out[f"{reader}_max_test_accuracy"] = round(float(test["accuracy"].max()), 4)
    cos = table.drop_duplicates("layer")["cosine_lat_mean"].dropna()
    out["cosine_lat_mean_min"], out["cosine_lat_mean_median"] = round(float(cos.min()), 4), round(float(cos.median()), 4)
    return out


def _control_summary(control: pd.DataFrame, layer: int) -> dict:
    out = {"control_layer": layer}
    for r in control.itertuples():
        for m in ("refusal_rate", "over_refusal_rate", "kl_harmless", "cross_entropy", "refusal_score_harmful"):
            if hasattr(r, m) and pd.notna(getattr(r, m)):
                out[f"control_{r.strength:g}_{m}"] = round(float(getattr(r, m)), 4)
    return out


def reading_figure(table: pd.DataFrame, model_name: str):
    """Reading accuracy per layer on test: LAT vs difference in means vs logistic probe (Zou et al. Fig. 4-style)."""
    from circuitlab.io.plots import subplots

    fig, ax = subplots(figsize=(6, 3.4))
    test = table[table.split == "test"]
    for reader, marker in zip(READERS, ("o-", "s--", "^:")):
        part = test[test.reader == reader].sort_values("layer")
        ax.plot(part.layer, part.accuracy, marker, label=reader)
    ax.set_xlabel("layer (resid_pre, last token)")
    ax.set_ylabel("reading accuracy (test)")
    ax.set_ylim(0.4, 1.02)
    ax.set_title(f"LAT vs diff-in-means vs probe, {model_name}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def control_figure(control: pd.DataFrame, model_name: str, layer: int):
    """Representation control curve: refusal on harmful / harmless and KL vs strength (test)."""
    from circuitlab.io.plots import subplots

    fig, ax = subplots(figsize=(6, 3.4))
    c = control.sort_values("strength")
    rate = "refusal_rate" if "refusal_rate" in c else "refusal_score_harmful"
    over = "over_refusal_rate" if "over_refusal_rate" in c else "refusal_score_harmless"
    ax.plot(c.strength, c[rate], "o-", label=f"harmful: {rate}")
    ax.plot(c.strength, c[over], "s--", label=f"harmless: {over}")
    twin = ax.twinx()
    twin.plot(c.strength, c.kl_harmless, "k:", label="KL harmless")
    twin.set_ylabel("first-token KL (harmless)")
    ax.set_xlabel("strength (× train class separation; < 0 subtracts)")
    ax.set_title(f"Representation control at layer {layer}, {model_name}", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return fig
