"""path-patching: the effect of one sender head on one receiver, everything else frozen.

Path patching (Wang et al. 2022, "Interpretability in the Wild", §3.1; Goldowsky-Dill et al. 2023,
"Localizing Model Behavior with Path Patching"), direct-path form as in TransformerLens
``get_act_patch_direct_path``: the sender head's source-minus-target write
``Δ = (z_source - z_target)[:, head] @ W_O[head]`` is added, at every position, to the receiver's
OWN copy of its input only; every other reader of the residual stream still sees the target value,
so the measured change flows through the single edge sender -> receiver (and then on through
the rest of the network as usual). Receivers:

- ``q``: the query input of each later head (pre-``ln1`` per-head fork, ``hook_q_input``). Keys and
  values are shared across query heads on GQA models (the embedded model), so per-head ``k``/``v``
  receivers are undefined there and not offered.
- ``mlp``: the input of each later layer's MLP (``ln2`` input), not the residual it adds to.
- ``logits``: the final residual before the final norm: the sender's direct effect on the output.

Pairs, modes and normalization as in ``activation-patching`` (0 = corrupted, 1 = clean).
Table: ``component="head"``, ``layer``/``head`` = the sender, ``receiver``, ``receiver_layer``,
``receiver_head``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from circuitlab.core import hooks as hk
from circuitlab.core.split_qkv import split_qkv_input
from circuitlab.io.results import Result
from circuitlab.experiments.base import check_layers, register
from circuitlab.experiments.checks import check_subset
from circuitlab.experiments.patching.common import PairPatchingExperiment, model_layers
from circuitlab.methods.patching import Sweep

__all__ = ["PathPatching", "path_sweep", "RECEIVERS"]

RECEIVERS = ("q", "mlp", "logits")


def _add_sender_write(act, name, cells, ctx, offset):
    """Row i: receiver input += Δ of sender cells[i] (at the receiver head's fork for ``q``)."""
    for row, (_, _, (sl, sh, receiver, rl, rh)) in enumerate(cells):
        delta = ctx.extra["delta"][(sl, sh)][offset:]
        if receiver == "q":
            act[row, :, rh] += delta
        else:
            act[row] += delta
    return act


def _receiver_hook(cell) -> str:
    _, _, (_, _, receiver, rl, _) = cell
    if receiver == "q":
        return hk.attn_q_input(rl)
    return hk.final_resid() if receiver == "logits" else hk.mlp_in(rl)


def path_sweep(model, senders, receivers) -> Sweep:
    """Cells ``(receiver_layer, None, (sender_layer, sender_head, receiver, receiver_layer, receiver_head))``."""
    unknown = set(receivers) - set(RECEIVERS)
    if unknown:
        raise ValueError(f"receivers {sorted(unknown)} unknown; choose from {RECEIVERS}")
    cells = []
    for sl, sh in senders:
        for receiver in receivers:
            if receiver == "logits":
                cells.append((model.n_layers, None, (sl, sh, "logits", model.n_layers, None)))
            for rl in range(sl + 1, model.n_layers) if receiver != "logits" else ():
                for rh in range(model.n_heads) if receiver == "q" else [None]:
                    cells.append((rl, None, (sl, sh, receiver, rl, rh)))

    def columns(cell):
        sl, sh, receiver, rl, rh = cell[2]
        return {"layer": sl, "head": sh, "receiver": receiver, "receiver_layer": rl, "receiver_head": rh}

    return Sweep("head", cells, _receiver_hook, setter=_add_sender_write, columns=columns)


def sender_deltas(model, senders):
    """``prepare`` hook: Δ write of every sender head, ``[T, d_model]``, from the two runs."""
    def prepare(ctx):
        ctx.extra["delta"] = {}
        for sl, sh in senders:
            w_o = model.bridge.blocks[sl].attn.W_O[sh]  # [d_head, d_model]
            z_s, z_t = ctx.source[hk.attn_z(sl)][:, sh], ctx.target[hk.attn_z(sl)][:, sh]
            ctx.extra["delta"][(sl, sh)] = (z_s @ w_o - z_t @ w_o).to(z_t.dtype)
    return prepare


@register("path-patching")
@dataclass
class PathPatching(PairPatchingExperiment):
    """Path patching (Wang et al. 2022): effect of each sender head on later heads' queries, MLPs, logits."""

    receivers: list[str] = field(default_factory=lambda: ["logits", "mlp"])  # any of q, mlp, logits
    sender_layers: list[int] | None = None  # layers whose heads send (None: all)
    n_pairs: int = 2  # equal-length harmful/harmless prompt pairs

    def __post_init__(self):
        super().__post_init__()
        check_subset(self, "receivers", RECEIVERS)
        check_layers("sender_layers", self.sender_layers)

    def unit_state(self, model) -> dict:
        layers = model_layers(model, self.sender_layers)
        return {"senders": [(l, h) for l in layers for h in range(model.n_heads)]}

    def pair_frame(self, model, state, pair):
        """One pair's rows: every sender -> receiver edge (one unit of work)."""
        senders = state["senders"]
        sweep = path_sweep(model, senders, self.receivers)
        with split_qkv_input(model, "q" in self.receivers), torch.no_grad():
            return self.patch(model, pair, [sweep], prepare=sender_deltas(model, senders),
                              capture_names=sorted({hk.attn_z(l) for l, _ in senders}))

    def result(self, model, harmful, harmless, plan, table) -> Result:
        table["receiver_head"] = table["receiver_head"].astype("Int64")
        keys = ["layer", "head", "receiver", "receiver_layer", "receiver_head"]
        avg = (table.groupby(keys, dropna=False).agg(normalized_mean=("normalized", "mean"),
                                                    metric_mean=("metric", "mean"),
                                                    n_pairs=("pair_id", "nunique")).reset_index())
        avg.insert(0, "component", "head")
        top = avg.reindex(avg.normalized_mean.abs().sort_values(ascending=False).index).head(5)
        summary = {"n_pairs": plan.state["n_pairs"],
                   "top_paths": top.astype(object).where(top.notna(), None).to_dict("records")}
        return Result(table, self.config(model, harmful=harmful, harmless=harmless), tables={"average": avg},
                      summary=summary)
