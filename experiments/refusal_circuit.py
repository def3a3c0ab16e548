"""make demo: the refusal circuit map and the fragility answer on the embedded model.

One command, embedded model, shared activation store:
1. circuit-map on N AdvBench vs N harmless prompts (train split): probe, rank, verify, stage.
2. ablation fragility curves for neurons and for heads: top-k ranked by attribution-estimated
   refusal drop vs layer-matched random-k, ranked on one half of the prompts and evaluated on the
   other half (``--compare-effect-size`` adds neurons ranked by diff-ranking effect size: the
   comparison that shows why causal ranking matters, ~17 % of the run, so not in ``make demo``).
   Every grid point gets the refusal score; the generation judge runs only where the conclusions
   rest (``judge_at="decisive"``: baseline, the k that halves the score, the largest k, and their
   random controls). The unablated baseline is measured once and shared by the rankings.
Writes results/refusal_circuit/{circuit,fragility_neuron,fragility_head[,fragility_neuron_effect_size]}/
and summary.json, then prints a short text summary. Subsampling (aimed at under 15 min on 2 cores):
N = 64 prompts per set, one random-control seed (the judge reads only the first seed's controls, and
two seeds moved no conclusion: docs/results/single-point-of-failure.md) drawn only at the decisive k
(``random_at="decisive"``: the halving k and the largest k), the generation judge reads
12 new tokens; edges scored by EAP-IG on 8 screening pairs (faithfulness still measured on 16 held-out
pairs); plain-text cross-entropy measured with the judge (baseline and judged points only).
``bench/demo_profile.py`` times it by phase and kind of work.

Usage: python experiments/refusal_circuit.py [--n 64] [--quick] [--model planted] [--store memory]
       [--compare-effect-size]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import circuitlab as cl
from circuitlab.experiments import get
from circuitlab.io.results import check_output_dir

OUT = Path(__file__).resolve().parent.parent / "results" / "refusal_circuit"
EDGES = OUT.parent / "refusal_edges" / "edge_attribution"  # experiments/refusal_edges.py: joined in the page if same model
RUNS = ("fragility_neuron", "fragility_head", "fragility_neuron_effect_size")
COMPARISON = "fragility_neuron_effect_size"  # run only with --compare-effect-size
MEASURES = {"refusal_prob": "mean refusal-token probability (score)", "refusal_rate": "judged refusal rate",
            "refusal_score": "refusal score"}


def phase(name: str):
    """Marks a phase of the run; bench/demo_profile.py swaps in its timer."""
    return contextlib.nullcontext()


def settings(model_name: str, quick: bool) -> dict:
    """Circuit-map parameters and the fragility grids: the embedded demo, or a seconds-long planted smoke run."""
    if model_name == "planted":  # 3 layers x 64 neurons x 4 heads
        neuron, head, extra = [1, 4], [1, 2], [16]
        circuit = dict(n_neurons=3, n_heads=2, n_verify=4)
        ablation = dict(max_new_tokens=4, n_text=4)
    else:
        # no k = 200: the neuron curve's conclusions rest on the halving k (10) and the largest k, both kept
        neuron = [1, 10, 50] if quick else [1, 10, 50, 1000]
        head = [1, 5] if quick else [1, 5, 20, 50]
        extra = [5000]
        # batches of 32, not the default 16: fuller forwards and fewer sequential judge decoding steps on 2 cores,
        # the same numbers up to float rounding (results/bench/demo_cut_3a00d29_before_after.json)
        circuit = dict(n_neurons=20, n_heads=10, n_verify=16, n_edge_pairs=8, batch_size=32)
        ablation = dict(max_new_tokens=12, batch_size=32)
    # Most safety-relevant first: units ranked by their attribution-estimated refusal drop; the
    # effect-size (diff-ranking) neuron ranking is the comparison that shows why causal ranking matters.
    runs = {"fragility_neuron": ("neuron", "attribution", neuron), "fragility_head": ("head", "attribution", head),
            "fragility_neuron_effect_size": ("neuron", "effect_size", neuron + extra)}
    # random controls where the conclusions rest (the halving k and the largest k), scored and judged there
    ablation.update(random_seeds=1, random_at="decisive", method="mean")
    return {"circuit": circuit, "runs": runs, "ablation": ablation}


def _load(args):
    model = cl.load_model(args.model)
    if args.model == "planted":
        from circuitlab.models.planted import planted_prompts

        harmful, harmless = planted_prompts(args.n)
    else:
        harmful = cl.datasets.load("advbench", split="train", n=args.n, seed=0)
        harmless = cl.datasets.load("harmless", split="train", n=args.n, seed=0)
    return model, harmful, harmless


def _store(spec: str | None):
    if spec == "memory":  # a cold, throw-away store: what a fresh machine computes
        return cl.ActivationStore(memory=True, disk=False)
    return cl.ActivationStore(spec) if spec else cl.ActivationStore()


def _write_page(out: Path) -> None:
    """The circuit viewer's page next to the run (circuitlab view), joined with the edge run of the same model."""
    from circuitlab.viewer import ViewerError
    from circuitlab.viewer.cli import view

    edges = None
    if (EDGES / "config.json").is_file():
        same = json.loads((EDGES / "config.json").read_text())["model"]["fingerprint"] == \
            json.loads((out / "circuit" / "config.json").read_text())["model"]["fingerprint"]
        edges = str(EDGES) if same else None
    try:
        view(str(out / "circuit"), str(out / "circuit.html"), edges=edges)
    except ViewerError as err:  # the page is a view of the saved run; the run itself stands
        print(f"circuit viewer: no page ({err})")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64, help="prompts per set")
    parser.add_argument("--quick", action="store_true", help="smaller grids (a smoke run, not the committed numbers)")
    parser.add_argument("--model", default="embedded", help="embedded (the demo) | planted (a seconds-long smoke run)")
    parser.add_argument("--store", default=None, help="activation store directory; 'memory': cold, not kept "
                                                      "(default: the user cache)")
    parser.add_argument("--judge-at", default="decisive", choices=("decisive", "all", "none"),
                        help="where the generation judge runs (see circuitlab.experiments.ablation)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--reuse-fragility", action="store_true",
                        help="reuse fragility runs already saved under --out; compute only the missing ones")
    parser.add_argument("--compare-effect-size", action="store_true",
                        help=f"also {COMPARISON}: neurons ranked by diff-ranking effect size (the committed results have it)")
    args = parser.parse_args(argv)
    runs = [r for r in RUNS if r != COMPARISON or args.compare_effect_size]
    for sub in ("circuit", *runs):  # our own earlier run folders are replaced; anything else fails now, not after
        check_output_dir(args.out / sub, overwrite=True)
    t0 = time.time()
    with phase("load"):
        model, harmful, harmless = _load(args)
    print(f"[{time.time() - t0:5.0f} s] loaded {model}")
    store = _store(args.store if args.store or args.model != "planted" else "memory")
    plan = settings(args.model, args.quick)

    with phase("circuit map"):
        circuit = get("circuit-map")(**plan["circuit"]).run(model, harmful, harmless, store=store)
        circuit.save(args.out / "circuit", overwrite=True)
    print(f"[{time.time() - t0:5.0f} s] circuit map: {circuit.summary}")
    _write_page(args.out)

    common = dict(plan["ablation"], judge_at=args.judge_at)
    fragility, todo = {}, []
    for name in runs:
        saved = args.out / name / "config.json"
        if args.reuse_fragility and saved.is_file():
            fragility[name] = json.loads(saved.read_text())["summary"]
        else:
            todo.append(name)
    shared: dict = {}  # the unablated baseline and the attribution estimates, computed once for all runs
    if todo:
        with phase("fragility baseline"):
            get("ablation")(**common).baseline(model, harmful, harmless, store=store, shared=shared)
    for name in todo:
        kind, rank_by, grid = plan["runs"][name]
        with phase(name):
            result = get("ablation")(**{**common, "kind": kind, "k_grid": grid, "rank_by": rank_by}).run(
                model, harmful, harmless, store=store, shared=shared)
            result.save(args.out / name, overwrite=True)
        fragility[name] = result.summary
        print(f"[{time.time() - t0:5.0f} s] {name}: {result.summary}")

    summary = {"circuit": circuit.summary, "fragility": fragility, "n_per_set": args.n, "model": args.model,
               "seconds": round(time.time() - t0), "store": store.stats()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\n" + render(summary, args.out))
    return summary


def _num(value, fmt: str = ".3f") -> str:
    return "n/a" if value is None else format(value, fmt)


def render(summary: dict, out: Path = OUT) -> str:
    """The short text answer: where refusal lives, and whether it is a single point of failure."""
    c = summary["circuit"]
    fn, fh = summary["fragility"]["fragility_neuron"], summary["fragility"]["fragility_head"]
    m = fn["measure"]
    lines = [
        f"Refusal circuit ({summary['n_per_set']} harmful vs {summary['n_per_set']} harmless prompts):",
        f"  harmfulness linearly readable from layer {c['first_readable_layer']}; direction layer {c['direction_layer']}",
        f"  verified components: {c['n_verified']} of {c['n_candidates']} candidates "
        f"(detection {c['verified_detection']}, evaluation {c['verified_evaluation']}, "
        f"decision {c['verified_decision']}, production {c['verified_production']})",
        f"Fragility ({MEASURES.get(m, m)} on held-out harmful prompts, baseline {fn['baseline_' + m]}"
        + (f"; judged refusal rate {fn['baseline_refusal_rate']}" if m != "refusal_rate" and "baseline_refusal_rate" in fn
           else "") + "):",
    ]
    for label, f in (("neurons", fn), ("heads", fh)):
        m = f["measure"]
        ks = sorted(int(k[3:].split("_")[0]) for k in f if k.startswith("top") and k.endswith("_" + m))
        for k in ks:
            line = (f"  {k:5d} {label}: top-k {_num(f[f'top{k}_{m}'])} vs random-k {_num(f.get(f'random{k}_{m}'))}"
                    f" (KL harmless {_num(f[f'top{k}_kl_harmless'])})")
            if m != "refusal_rate" and f"top{k}_refusal_rate" in f:
                line += (f"; judged refusal {_num(f[f'top{k}_refusal_rate'], '.2f')} vs random "
                         f"{_num(f.get(f'random{k}_refusal_rate'), '.2f')}")
            lines.append(line)
        halve = f.get("k_to_halve_refusal")
        line = f"  {label} needed to halve refusal: {halve if halve is not None else 'not reached in the grid'}"
        if "halving_confirmed_by_judge" in f:
            line += f" (judge {'agrees' if f['halving_confirmed_by_judge'] else 'disagrees'}: " \
                    f"refusal rate {f['refusal_rate_at_halving']})"
        lines.append(line)
    lines.append(f"({summary['seconds']} s; results in {out})")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
