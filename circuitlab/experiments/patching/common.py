"""What every pair-patching variant shares: modes, the default metric, pair units, normalization, averaging.

Modes (Meng et al. 2022 causal tracing, with TransformerLens ``patching`` semantics):

- ``mode="denoise"`` (default): clean = harmful, corrupted = harmless; run the harmless prompt and
  patch in harmful activations: which component restores refusal?
- ``mode="noise"``: run the harmful prompt and patch in harmless activations: which component,
  when replaced, removes refusal?

``normalized = (metric - corrupted) / (clean - corrupted)``: 0 = the harmless (corrupted) run,
1 = the harmful (clean) run, in both modes. Variants import from here, the engine and the pairs
module only — never from each other (the import-linter contract checks it).

Every variant is a ``UnitExperiment`` (``PairUnits``): a unit is one prompt pair, ``run_unit`` gives
that pair's rows, ``merge`` concatenates them in pair order, so ``circuitlab.distributed`` can spread
the pairs over workers and get the same table as ``run``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pandas as pd

from circuitlab.methods.attribution import refusal_metric
from circuitlab.experiments.base import Plan, UnitExperiment, check_choice
from circuitlab.experiments.checks import check_at_least, check_types
from circuitlab.methods.patching import run_sweeps
from circuitlab.methods.pairs import PAIRINGS, make_pairs

__all__ = ["MODES", "refusal_metric", "target_and_source", "normalize", "model_layers", "int_columns", "patch_pair",
           "patch_pairs", "average_over_pairs", "pair_on", "PairUnits", "PairPatchingExperiment"]

MODES = ("denoise", "noise")


def target_and_source(pair, mode: str):
    """(target ids, source ids) of a pair: denoise runs the harmless prompt with harmful patches."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {MODES}")
    return (pair.harmless_ids, pair.harmful_ids) if mode == "denoise" else (pair.harmful_ids, pair.harmless_ids)


def normalize(df: pd.DataFrame, pair, mode: str, target_metric: float, source_metric: float) -> pd.DataFrame:
    """Add ``normalized`` (0 = corrupted, 1 = clean), ``clean_metric``, ``corrupted_metric`` and ``pair_id``."""
    clean, corrupted = (source_metric, target_metric) if mode == "denoise" else (target_metric, source_metric)
    gap = clean - corrupted
    df["normalized"] = (df["metric"] - corrupted) / gap if abs(gap) > 1e-6 else np.nan
    df["clean_metric"], df["corrupted_metric"], df["pair_id"] = clean, corrupted, pair.pair_id
    return df


def model_layers(model, layers) -> list[int]:
    """``layers`` (all when None), refused with a clear error if beyond the model's layers."""
    layers = list(range(model.n_layers)) if layers is None else list(layers)
    if any(not 0 <= l < model.n_layers for l in layers):
        raise ValueError(f"layers {layers} out of range 0..{model.n_layers - 1}")
    return layers


def int_columns(table: pd.DataFrame) -> pd.DataFrame:
    """Nullable integer ``head`` / ``neuron`` / ``position`` columns (absent values stay missing)."""
    for col in ("head", "neuron", "position"):
        if col in table:
            table[col] = table[col].astype("Int64")
    return table


def patch_pair(model, pair, sweeps, metric, *, mode="denoise", fast=True, batch_size=32, progress=False,
               prepare=None, capture_names=()) -> pd.DataFrame:
    """Run ``sweeps`` on one pair: tidy rows with ``pair_id`` and ``normalized`` (integer columns not yet cast)."""
    target, source = target_and_source(pair, mode)
    rows, ctx = run_sweeps(model, target, source, sweeps, metric, fast=fast, batch_size=batch_size,
                           progress=progress, prepare=prepare, capture_names=capture_names)
    df = pd.DataFrame(rows)
    if "position" in df:  # negative offsets: the same template token in every pair
        df["position"] = df["position"].map(lambda p: None if p is None or pd.isna(p) else int(p) - pair.length)
    return normalize(df, pair, mode, ctx.target_metric, ctx.source_metric)


def patch_pairs(model, pairs, make_sweeps, metric, **kwargs) -> pd.DataFrame:
    """``patch_pair`` on every pair with ``make_sweeps(pair)``, concatenated in pair order."""
    frames = [patch_pair(model, pair, make_sweeps(pair), metric, **kwargs) for pair in pairs]
    return int_columns(pd.concat(frames, ignore_index=True))


def average_over_pairs(table: pd.DataFrame) -> pd.DataFrame:
    """Mean metric / normalized effect per component over pairs, with standard error."""
    keys = [c for c in ("component", "layer", "head", "neuron", "position") if c in table]
    g = table.groupby(keys, dropna=False, sort=False)
    out = g.agg(metric_mean=("metric", "mean"), normalized_mean=("normalized", "mean"),
                normalized_std=("normalized", "std"), n_pairs=("pair_id", "nunique")).reset_index()
    out["normalized_sem"] = out["normalized_std"] / np.sqrt(out["n_pairs"].clip(lower=1))
    return out.drop(columns="normalized_std")


def pair_on(pair, device):
    """The pair with its token ids on ``device`` (a no-op when they are there already)."""
    return dataclasses.replace(pair, harmful_ids=pair.harmful_ids.to(device), harmless_ids=pair.harmless_ids.to(device))


class PairUnits(UnitExperiment):
    """plan / run_unit / merge of a pair-patching variant: one unit = one harmful/harmless prompt pair.

    A variant supplies ``unit_state(model)`` (picklable values every pair needs, validated before
    any pair is built), ``pair_frame(model, state, pair)`` (that pair's rows) and
    ``result(model, harmful, harmless, plan, table)``; it needs ``mode``, ``n_pairs`` and ``pairing``.
    """

    def unit_state(self, model) -> dict:
        return {}

    def pair_frame(self, model, state: dict, pair) -> pd.DataFrame:
        raise NotImplementedError

    def result(self, model, harmful, harmless, plan: Plan, table: pd.DataFrame):
        raise NotImplementedError

    def plan(self, model, harmful, harmless, *, store=None) -> Plan:
        state = self.unit_state(model)
        pairs = make_pairs(model, harmful, harmless, n_pairs=self.n_pairs, pairing=self.pairing)
        state.update(n_pairs=len(pairs), n_unpaired=pairs.n_unpaired)
        # Units travel to workers that may sit on other devices: token ids on the CPU.
        return Plan(units=[pair_on(p, "cpu") for p in pairs], state=state)

    def run_unit(self, model, state: dict, unit) -> pd.DataFrame:
        return self.pair_frame(model, state, pair_on(unit, model.device))

    def merge(self, model, harmful, harmless, plan: Plan, outputs: list):
        table = int_columns(pd.concat(outputs, ignore_index=True))
        table["mode"] = self.mode
        return self.result(model, harmful, harmless, plan, table)


@dataclass
class PairPatchingExperiment(PairUnits):
    """Parameters and checks shared by the experiments that patch harmful/harmless prompt pairs."""

    mode: str = "denoise"  # denoise: patch harmful into harmless runs; noise: harmless into harmful
    n_pairs: int = 4  # equal-length harmful/harmless prompt pairs to patch
    pairing: str = "length"  # length: equal token lengths only; pad: also pad leftovers with spaces
    batch_size: int = 32  # patched runs per forward pass
    fast: bool = True  # exact speed-ups (no-op skip, prefix and causal reuse); False: plain forwards
    seed: int = 0  # recorded for provenance (pairing is deterministic)

    def __post_init__(self):
        check_types(self)
        check_choice("mode", self.mode, MODES)
        check_choice("pairing", self.pairing, PAIRINGS)
        check_at_least(self, 1, "n_pairs", "batch_size")
        check_at_least(self, 0, "seed")

    def pairs(self, model, harmful, harmless):
        return make_pairs(model, harmful, harmless, n_pairs=self.n_pairs, pairing=self.pairing)

    def patch(self, model, pair, sweeps, **kwargs) -> pd.DataFrame:
        """``patch_pair`` with this experiment's mode, speed-ups, batch size and the refusal metric."""
        return patch_pair(model, pair, sweeps, refusal_metric(model), mode=self.mode, fast=self.fast,
                          batch_size=self.batch_size, progress=True, **kwargs)
