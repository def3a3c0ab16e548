"""circuit-map: the refusal circuit by stage — screen on one half of the prompts, verify causally on
the other, then assign stages from the edge circuit and from what each unit reads and writes.

Prompts: each set is shuffled with ``seed`` and cut into a SCREENING and a VERIFICATION half
(``split_halves``; sets of equal length get the same order, so matched pairs stay matched). No
prompt is in both: what proposes a unit never also verifies it.

Screening half:

1. **Probing** (Li et al. 2023 style): the first layer whose best probe (post-instruction
   positions) reaches ``probe_threshold`` is where harmfulness becomes readable; units in the
   layers that write that stream (layer l writes resid_pre of l + 1) are ranked.
2. **Refusal direction**: difference in means of ``resid_pre`` at the last position. Its layer is
   ``direction_layer`` when given; otherwise it is chosen as the refusal-direction experiment
   chooses (``direction_eval.score_candidates``, Arditi et al. 2024 §2.4): the screening half is cut
   again into a train part (the candidates) and a val part (bypass score, KL and induce filters,
   first 80 % of layers; every candidate screened on ``direction_screen`` val prompts per side, the best
   ``direction_finalists`` scored on all, the induce score only where the rule can read it). Not the residual-stream attribution estimate, whose agreement with exact
   patching the project's bench measured at Pearson 0.22.
3. **Candidates**: diff-ranking's best neurons / heads in those layers, plus the largest estimated
   refusal drops of attribution patching (Nanda 2023; Kramár et al. 2024) in any layer
   (``atp_estimate``, a fraction of the screening half's refusal-score gap).

Verification half (``n_verify`` prompts per side):

4. **Verification** by activation patching (Meng et al. 2022): each candidate's activation at the
   post-instruction positions of harmful prompts is set to its mean over harmless prompts;
   ``patch_effect`` is the drop of the refusal score as a fraction of the harmful-minus-harmless
   score gap; ``verified`` when >= ``verify_threshold``.
5. **Reads and writes** (harmful-minus-harmless means at the last position):
   ``direction_attribution``: direct write along the refusal direction, as a fraction of its norm;
   ``logit_attribution``: direct effect on the refusal-token logit, as a fraction of the total gap;
   ``content_read`` (heads): the share of the head's difference in ``z`` that it reads from the
   instruction tokens (attention pattern × values before the post-instruction template) rather than
   from the post-instruction positions. A neuron at a post-instruction position reads only that
   position's stream, so its ``content_read`` is 0.
6. **Edge circuit** (``edges``, on by default; Syed et al. 2023, Hanna et al. 2024, via
   ``circuitlab.graph``): every edge of the residual-stream graph is scored (``edge_method``) on
   equal-length harmful/harmless pairs (``patching.pairs.make_pairs``, ``edge_pairing``) from the
   SCREENING half; the circuit is selected (``edge_selection``: by default Hanna et al.'s greedy
   growth from the logits, which keeps a small circuit connected where the top-|score| edges are
   often pruned to nothing; ``edge_fraction`` or ``n_edges`` of the graph, pruned to embedding ->
   logits paths); its
   faithfulness is measured exactly on pairs from the VERIFICATION half (every edge outside it
   ablated to the harmless run, ``(m(C) - m(∅)) / (m(N) - m(∅))``, refusal score; an empty pruned
   circuit scores 0). At most ``n_verify`` pairs per half. Each candidate is the graph node that
   holds it: a head is ``a{l}.h{h}``; a neuron is its layer's whole MLP ``m{l}`` (the graph does
   not split MLPs, so every edge column of a neuron describes its MLP). Columns: ``edge_node``,
   ``in_edge_circuit`` (the circuit keeps an edge out of the node), ``edge_in_mass`` /
   ``edge_out_mass`` (share of the graph's total |score| on edges into / out of the node; a GQA
   head's shared k/v edges count fully), ``edge_in_from`` / ``edge_out_to`` (the other end of the
   node's strongest KEPT edge in / out; empty outside the circuit). The circuit's size and faithfulness are in the summary and
   in the ``edge_circuit`` table; its edges in ``circuit_edges``. Skipped, with the reason in the
   summary, when a half yields no equal-length pair.
7. **Stages**, by role rather than depth, so a model whose harmfulness is readable from layer 1
   can fill every stage. ``stage_rule`` names the rule that decided.
   ``graph`` (``graph_stage``), for nodes in the edge circuit, first that holds:
   production — the node's strongest kept outgoing edge goes to the logits;
   detection — its strongest kept incoming edge comes from the token embedding (it reads the
   tokens themselves, not a formed representation).
   ``reads-writes`` (``assign_stage``), for every other node (outside the circuit, edges off or
   skipped, or neither graph condition holds), first that holds:
   production — writes refusal logits (logit_attribution >= ``tau``);
   detection — reads the instruction's content (content_read >= ``read_threshold``); checked before
   decision because in a short circuit the content reader may also write the direction itself
   (the planted head (1, 2) does: its output IS the difference at layer 2);
   decision — writes the refusal direction (direction_attribution >= ``tau``);
   evaluation — verified but none of these: reads the formed representation, writes neither.
   The graph never assigns decision or evaluation: which node "writes the direction" is a
   statement about a direction, not about edges, so those stay with the reads-writes rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from circuitlab import graph as eg
from circuitlab.core import hooks as hk
from circuitlab.methods import metrics
from circuitlab.io import plots
from circuitlab.methods.attribution import mean_patch_estimates
from circuitlab.core.components import Component, hook_name
from circuitlab.io.datasets import PromptSet
from circuitlab.graph.plot import plot_circuit
from circuitlab.methods.direction_eval import score_candidates
from circuitlab.methods.directions import candidate_directions, mean_differences, refusal_direction
from circuitlab.methods.probes import best_position_accuracy
from circuitlab.core.progress import progress_bar
from circuitlab.methods.ranking import rank_components, top_components
from circuitlab.io.results import Result
from circuitlab.io.store import ActivationStore
from circuitlab.core.weights import final_norm_weight, unembedding_weight, write_vector
from circuitlab.experiments.base import Experiment, check, check_choice, register
from circuitlab.experiments.checks import check_at_least, check_fraction, check_types
from circuitlab.methods.patching import Sweep, run_sweeps
from circuitlab.methods.pairs import PAIRINGS, make_pairs

__all__ = ["CircuitMap", "assign_stage", "graph_stage", "split_halves", "STAGES", "STAGE_RULES"]

STAGES = ("detection", "evaluation", "decision", "production")
STAGE_RULES = ("graph", "reads-writes")


def assign_stage(direction_frac: float, logit_frac: float, content_read: float, tau: float,
                 read_threshold: float) -> str:
    """Stage rule of the module docstring: production, detection, decision, else evaluation."""
    if logit_frac >= tau:
        return "production"
    if content_read >= read_threshold:
        return "detection"
    if direction_frac >= tau:
        return "decision"
    return "evaluation"


def graph_stage(in_circuit: bool | None, top_in: str | None, top_out: str | None) -> str | None:
    """Graph rule of the module docstring: production, detection, or None (the graph does not decide)."""
    if not in_circuit:
        return None
    if top_out == "logits":
        return "production"
    if top_in == "embed":
        return "detection"
    return None


def split_halves(prompts, seed: int) -> tuple[PromptSet, PromptSet]:
    """(screening, verification): ``PromptSet.halves`` (the first ceil(n/2) shuffled prompts, the rest)."""
    prompts = prompts if isinstance(prompts, PromptSet) else PromptSet("prompts", tuple(prompts))
    return prompts.halves(seed, ("screen", "verify"))


def _node_columns(edge: eg.FoundCircuit | None, c: Component) -> dict:
    """The table's edge columns for candidate ``c`` (missing values when there is no edge circuit)."""
    if edge is None:
        return {"edge_node": None, "in_edge_circuit": None, "edge_in_mass": float("nan"),
                "edge_out_mass": float("nan"), "edge_in_from": None, "edge_out_to": None}
    node = edge.node(c.kind, c.layer, c.index)
    return {"edge_node": node.node, "in_edge_circuit": node.in_circuit, "edge_in_mass": node.in_mass,
            "edge_out_mass": node.out_mass, "edge_in_from": node.top_in, "edge_out_to": node.top_out}


def _edge_summary(edge: eg.FoundCircuit | None, status: str, table: pd.DataFrame) -> dict:
    """Summary entries of the edge stage: what ran, the circuit's size and faithfulness, nodes it staged."""
    info = edge.info if edge is not None else {}
    faith = info.get("faithfulness")
    return {"edge_circuit": status,
            "edge_faithfulness": None if faith is None or np.isnan(faith) else round(faith, 4),
            "edge_circuit_edges": info.get("n_edges"), "edge_graph_edges": info.get("n_graph_edges"),
            "edge_circuit_pct": None if edge is None else round(info["pct_edges"], 3),
            "staged_by_graph": int((table.stage_rule == "graph").sum())}


@register("circuit-map")
@dataclass
class CircuitMap(Experiment):
    """Refusal circuit by stage: screen (probing, ranking, attribution) on one half, verify by patching on the other."""

    probe_threshold: float = 0.9  # accuracy at which harmfulness counts as linearly readable
    n_neurons: int = 10  # neuron candidates from the ranking (best |d| within the candidate layers)
    n_heads: int = 5  # head candidates from the ranking
    n_atp_neurons: int = 10  # further neuron candidates: largest attribution-patching estimates, any layer
    n_atp_heads: int = 5  # further head candidates from attribution patching
    verify_threshold: float = 0.02  # patch effect (fraction of the refusal-score gap) to count as verified
    tau: float = 0.1  # attribution fraction that counts as "writes" the direction or the refusal logits
    read_threshold: float = 0.5  # content_read share that makes a head a content reader (detection)
    direction_layer: int | None = None  # None: chosen by validation bypass score as refusal-direction does
    direction_screen: int | None = 8  # val prompts per side every direction is first screened on (None: all)
    direction_finalists: int = 4  # directions (whole Pareto fronts of the screen) then scored on every val prompt
    n_verify: int = 16  # prompts per side taken from each half for the attribution screen and the verification
    batch_size: int = 16  # prompts per forward pass
    seed: int = 0  # seed of the screening/verification split and of the probes' folds
    edges: bool = True  # score the edge graph, select a circuit, measure its faithfulness, stage nodes by it
    edge_method: str = "eap-ig"  # edge scores: eap (one backward) | eap-ig (integrated gradients, 5 steps)
    edge_selection: str = "greedy"  # greedy (grown from the logits, stays connected) | topn (largest |score|, pruned)
    edge_fraction: float = 0.05  # share of the graph's edges the circuit keeps before pruning
    n_edges: int | None = None  # edges the circuit keeps before pruning (None: edge_fraction of the graph)
    edge_pairing: str = "length"  # equal-length pairs: length (exact token length) | pad (pad the shorter request)
    n_edge_pairs: int | None = None  # screening pairs the edges are scored on (None: n_verify); EAP-IG's cost scales with it

    def __post_init__(self):
        check_types(self)
        check_fraction(self, "probe_threshold", "verify_threshold", "tau", "read_threshold", closed=True)
        check_at_least(self, 0, "n_neurons", "n_heads", "n_atp_neurons", "n_atp_heads", "direction_layer", "seed")
        check(self.n_neurons + self.n_heads + self.n_atp_neurons + self.n_atp_heads > 0,
              "n_neurons, n_heads, n_atp_neurons and n_atp_heads are all 0: ask for at least one candidate "
              "(e.g. --set n_neurons=10)")
        check_at_least(self, 1, "n_verify", "batch_size", "n_edges", "direction_screen", "direction_finalists",
                       "n_edge_pairs")
        check_choice("edge_method", self.edge_method, eg.METHODS)
        check_choice("edge_selection", self.edge_selection, eg.SELECTIONS)
        check_choice("edge_pairing", self.edge_pairing, PAIRINGS)
        check(0 < self.edge_fraction <= 1, f"edge_fraction={self.edge_fraction!r} must be in (0, 1] "
                                           "(e.g. --set edge_fraction=0.05)")

    def run(self, model, harmful, harmless, *, store=None) -> Result:
        store = store if store is not None else ActivationStore()
        (h_scr, h_ver), (s_scr, s_ver) = split_halves(harmful, self.seed), split_halves(harmless, self.seed)
        n = self.n_verify
        layer_acc, first_readable, means = self._probe(model, h_scr, s_scr, store)
        cand_layers = [l for l in range(model.n_layers) if l + 1 >= first_readable]
        ranking = rank_components(model, h_scr, s_scr, store=store, batch_size=self.batch_size)
        atp = mean_patch_estimates(model, list(h_scr)[:n], means, batch_size=self.batch_size)
        screen_gap = (metrics.refusal_score(model, list(h_scr)[:n], batch_size=self.batch_size).mean()
                      - metrics.refusal_score(model, list(s_scr)[:n], batch_size=self.batch_size).mean()).item()
        direction_layer, direction, layers, dir_info = self._direction(model, h_scr, s_scr, store)
        candidates = self._candidates(ranking, cand_layers, atp)
        if not candidates:
            raise ValueError("no candidate components: lower probe_threshold or raise n_neurons / n_heads")
        # everything below is measured on the verification half only
        patch, gap = self._patch_effects(model, candidates, list(h_ver)[:n], list(s_ver)[:n], store)
        attribution = self._attribution(model, candidates, h_ver, s_ver, direction, store)
        reads = self._content_reads(model, [c for c in candidates if c.kind == "head"], list(h_ver)[:n],
                                    list(s_ver)[:n])
        edge, edge_status = (self._edge_circuit(model, (h_scr, s_scr), (h_ver, s_ver)) if self.edges
                             else (None, "off (edges=False)"))
        rows = []
        for c in candidates:
            r = ranking[(ranking.component == c.kind) & (ranking.layer == c.layer) &
                        (ranking["neuron" if c.kind == "neuron" else "head"] == c.index)].iloc[0]
            dir_frac, logit_frac = attribution[c]
            read = reads.get(c, 0.0)
            node = _node_columns(edge, c)
            by_graph = graph_stage(node["in_edge_circuit"], node["edge_in_from"], node["edge_out_to"])
            rows.append({"stage": by_graph or assign_stage(dir_frac, logit_frac, read, self.tau, self.read_threshold),
                         "stage_rule": "graph" if by_graph else "reads-writes",
                         "layer": c.layer, "component": c.kind, "head": c.index if c.kind == "head" else None,
                         "neuron": c.index if c.kind == "neuron" else None,
                         "probe_accuracy": float(layer_acc[min(c.layer + 1, model.n_layers - 1)]),
                         "effect_size": float(r.effect_size),
                         "atp_estimate": atp[c.kind][c.layer, c.index].item() / screen_gap
                         if abs(screen_gap) > 1e-9 else float("nan"),
                         "patch_effect": patch[c], "direction_attribution": dir_frac, "logit_attribution": logit_frac,
                         "content_read": read, "verified": bool(patch[c] >= self.verify_threshold), **node})
        table = pd.DataFrame(rows)
        for col in ("head", "neuron"):
            table[col] = pd.array(table[col], dtype="Int64")
        table["in_edge_circuit"] = pd.array(table["in_edge_circuit"], dtype="boolean")  # NA when edges are off
        table["stage"] = pd.Categorical(table["stage"], STAGES, ordered=True)
        table = table.sort_values(["stage", "layer", "patch_effect"], ascending=[True, True, False]).reset_index(drop=True)
        table["stage"] = table["stage"].astype(str)
        layers.insert(1, "probe_accuracy", layer_acc)
        summary = {"first_readable_layer": first_readable, "direction_layer": direction_layer, **dir_info,
                   "n_screen": f"{len(h_scr)}+{len(s_scr)}", "n_verify": f"{min(n, len(h_ver))}+{min(n, len(s_ver))}",
                   "verify_gap": round(gap, 4), "n_candidates": len(table), "n_verified": int(table.verified.sum()),
                   **{f"verified_{s}": int(((table.stage == s) & table.verified).sum()) for s in STAGES},
                   **_edge_summary(edge, edge_status, table)}
        tables = {"layers": layers}
        figures = {"circuit": plots.circuit_diagram(table, layers, first_readable, direction_layer, model.name)}
        if edge is not None:
            tables.update(edge_circuit=pd.DataFrame([edge.info]), circuit_edges=edge.edges_table())
            if edge.mask.any():
                figures["edge_circuit"] = plot_circuit(edge.graph, edge.mask, edge.scores,
                                                       f"{model.name}: {edge.info['method']} edge circuit")
        return Result(table, self.config(model, harmful=harmful, harmless=harmless), tables=tables,
                      figures=figures, summary=summary)

    def _edge_circuit(self, model, screen, verify) -> tuple[eg.FoundCircuit | None, str]:
        """Score edges on screening-half pairs, select the circuit, measure its faithfulness on
        verification-half pairs; ``(None, reason)`` when a half has no equal-length pair."""
        halves = []
        for name, (harmful, harmless), n in (("screening", screen, self.n_edge_pairs or self.n_verify),
                                             ("verification", verify, self.n_verify)):
            try:
                halves.append(make_pairs(model, harmful, harmless, n_pairs=n, pairing=self.edge_pairing).pairs)
            except ValueError:  # the node table still stands without the edge stage
                return None, (f"skipped: no equal-length harmful/harmless pair in the {name} half; pass more "
                              "prompts or --set edge_pairing=pad")
        tokens = metrics.refusal_tokens(model)

        def metric(logits):
            return metrics.refusal_score_from_logits(logits, tokens)

        graph = eg.EdgeGraph.from_model(model)
        found = eg.find_circuit(model, *halves, metric, self.n_edges or eg.n_for_fraction(graph, self.edge_fraction),
                                method=self.edge_method, selection=self.edge_selection, graph=graph, progress=True,
                                batch_size=min(self.batch_size, 8))  # edge scoring holds [readers, pairs, tokens, d] gradients
        i = found.info
        return found, (f"{i['method']} {i['selection']}: {i['n_edges']} of {i['n_graph_edges']} edges "
                       f"({i['pct_edges']:.1f} %), faithfulness {i['faithfulness']:.3f} on {i['n_eval_pairs']} "
                       f"held-out verification pairs (scored on {i['n_discover_pairs']} screening pairs)")

    def _probe(self, model, harmful, harmless, store):
        """Probe accuracy per layer, the first readable layer, and the harmless means AtP patches to."""
        layers = range(model.n_layers)
        per_layer = [f(l) for l in layers for f in (hk.resid_pre, hk.mlp_post, hk.attn_z)]
        post = [store.get(model, list(s), per_layer, "post", batch_size=self.batch_size) for s in (harmful, harmless)]
        resid = [hk.resid_pre(l) for l in layers]
        acc = np.array([best_position_accuracy(post[0][r].numpy(), post[1][r].numpy(), seed=self.seed)
                        for r in progress_bar(resid, True, desc="probing layers")])
        readable = np.flatnonzero(acc >= self.probe_threshold)
        first = int(readable[0]) if len(readable) else int(np.argmax(acc))
        means = {name: t.mean(0) for name, t in post[1].items() if name not in resid}
        return acc, first, means

    def _direction(self, model, harmful, harmless, store):
        """(layer, direction, per-layer table, summary entries): given layer, or validation selection."""
        layers = pd.DataFrame({"layer": range(model.n_layers)})
        if self.direction_layer is not None:
            if not 0 <= self.direction_layer < model.n_layers:
                raise ValueError(f"direction_layer must be in 0..{model.n_layers - 1}, got {self.direction_layer}")
            d = refusal_direction(model, harmful, harmless, self.direction_layer, store=store, batch_size=self.batch_size)
            return self.direction_layer, d, layers, {"direction_source": "given (direction_layer)"}
        (h_train, h_val), (s_train, s_val) = split_halves(harmful, self.seed), split_halves(harmless, self.seed)
        dirs = {k: d for k, d in candidate_directions(model, h_train, s_train, store,
                                                     batch_size=self.batch_size).items() if k[1] == -1}
        table, rule, _ = score_candidates(model, dirs, h_val, s_val, positions=[-1], prune_layer_frac=0.2,
                                          screen_prompts=self.direction_screen, n_finalists=self.direction_finalists,
                                          induce="selectable", batch_size=self.batch_size)
        best = table[table.selected].iloc[0]
        cols = {"bypass_score": "direction_bypass_score", "kl": "direction_kl", "induce_score": "direction_induce_score"}
        layers = layers.merge(table[list(cols) + ["layer"]].rename(columns=cols), on="layer", how="left")
        info = {"direction_source": "validation bypass score (direction_eval.score_candidates), last position, "
                                    f"train {len(h_train)}+{len(s_train)} / val {len(h_val)}+{len(s_val)} "
                                    "prompts of the screening half",
                "direction_fallback_step": str(best.fallback_step)}
        return int(best.layer), dirs[(int(best.layer), -1)], layers, info

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

    def _attribution(self, model, comps, harmful, harmless, direction, store) -> dict:
        """(direction fraction, logit fraction) per component: its harmful-minus-harmless direct write."""
        names = sorted({hook_name(c) for c in comps} | {hk.final_resid()})
        mean_diff = {n: d[0] for n, d in mean_differences(model, harmful, harmless, names, "last", store=store,
                                                          batch_size=self.batch_size).items()}
        final = store.get(model, list(harmful), [hk.final_resid()], "last", batch_size=self.batch_size,
                          progress=False)[hk.final_resid()][:, 0]
        norm = direction.float().norm().clamp(min=1e-12)
        r_hat = direction.float() / norm
        # Linearised final norm: refusal-logit direction scaled by gamma / mean RMS of harmful final states.
        rms = final.pow(2).mean(-1).add(1e-6).sqrt().mean()
        gamma = final_norm_weight(model).detach().float().cpu()
        unembed = unembedding_weight(model).detach().float().cpu()
        tokens = metrics.refusal_tokens(model)
        u = (unembed[tokens].mean(0) - unembed.mean(0)) * gamma / rms
        logit_gap = float(mean_diff[hk.final_resid()] @ u)
        out = {}
        for c in comps:
            unit_diff = mean_diff[hook_name(c)][c.index]  # scalar for a neuron, [d_head] for a head
            write = unit_diff * write_vector(model, c) if c.kind == "neuron" else unit_diff @ write_vector(model, c)
            out[c] = (float(write @ r_hat) / float(norm), float(write @ u) / logit_gap if abs(logit_gap) > 1e-9 else 0.0)
        return out

    def _content_reads(self, model, heads, harmful, harmless) -> dict:
        """Per head: share of its harmful-minus-harmless mean ``z`` at the last position read from the
        instruction tokens, ``Δz_instr · Δz / |Δz|²`` clipped to [0, 1], from ``z = Σ_k pattern_k v_k``."""
        if not heads:
            return {}
        layers = sorted({c.layer for c in heads})
        names = [f(l) for l in layers for f in (hk.attn_pattern, hk.attn_v)]
        means = {}
        for side, prompts in (("harmful", harmful), ("harmless", harmless)):
            total = {c: torch.zeros(2, model.d_head) for c in heads}  # rows: instruction part, whole z
            acts = {}
            saves = [(name, lambda act, hook, name=name: acts.__setitem__(name, act.detach().float().cpu()))
                     for name in names]
            with torch.no_grad(), model.hooks(saves):
                for _, ids, mask in model.batches(prompts, self.batch_size):
                    model.forward(ids, mask, stop_at_layer=max(layers) + 1 if max(layers) + 1 < model.n_layers else None)
                    instr = ids.shape[1] - model.n_post  # positions before the post-instruction template
                    for c in heads:
                        pattern = acts[hk.attn_pattern(c.layer)][:, c.index, -1]  # [b, keys]
                        v = acts[hk.attn_v(c.layer)]
                        v = v[:, :, c.index // (model.n_heads // v.shape[2])]  # grouped-query: the head's kv group
                        parts = pattern[..., None] * v  # [b, keys, d_head]
                        total[c] += torch.stack([parts[:, :instr].sum((0, 1)), parts.sum((0, 1))])
            means[side] = {c: t / len(prompts) for c, t in total.items()}
        out = {}
        for c in heads:
            d_instr, d_all = means["harmful"][c] - means["harmless"][c]
            sq = float(d_all @ d_all)
            out[c] = float(np.clip(float(d_instr @ d_all) / sq, 0.0, 1.0)) if sq > 1e-12 else 0.0
        return out

    def _patch_effects(self, model, comps, harmful, harmless, store) -> tuple[dict, float]:
        """Exact patch of each candidate at the post positions of ``harmful`` to its mean over ``harmless``
        (see docstring); returns the normalized effects and the harmful-minus-harmless score gap.

        Runs on the patching engine: per harmful prompt, one capture pass, then all candidates of a
        hook in one batch that recomputes only the post positions from the candidate's layer on.
        """
        names = sorted({hook_name(c) for c in comps})
        means = {n: t.mean(0) for n, t in store.get(model, harmless, names, "post", batch_size=self.batch_size,
                                                    progress=False).items()}
        benign = metrics.refusal_score(model, harmless, batch_size=self.batch_size).mean().item()
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
        for prompt in progress_bar(harmful, True, desc="verifying candidates"):
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
