"""make demo: the refusal circuit map and the fragility answer on the embedded model.

One command, embedded model, shared activation store:
1. circuit-map on N AdvBench vs N harmless prompts (train split): probe, rank, verify, stage.
2. ablation fragility curves for neurons and for heads: top-k ranked (by attribution-estimated
   refusal drop; neurons also by diff-ranking effect size) vs layer-matched random-k, ranked on
   one half of the prompts and evaluated on the other half.
Writes results/refusal_circuit/{circuit,fragility_neuron,fragility_head,fragility_neuron_effect_size}/
and summary.json, then prints a short text summary. Subsampling (aimed at ~15 min on 2 cores;
measured 23.5 min idle with a warm activation store): N = 64 prompts per set, 2 random seeds, the
generation judge reads 12 new tokens.

Usage: python experiments/refusal_circuit.py [--n 64] [--quick]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import circuitlab as cl
from circuitlab.experiments import get

OUT = Path(__file__).resolve().parent.parent / "results" / "refusal_circuit"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64, help="prompts per set")
    parser.add_argument("--quick", action="store_true", help="smaller grids (a smoke run, not the committed numbers)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--reuse-fragility", action="store_true",
                        help="reuse fragility runs already saved under --out; compute only the missing ones")
    args = parser.parse_args()
    t0 = time.time()
    model = cl.load_model("embedded")
    print(f"[{time.time() - t0:5.0f} s] loaded {model}")
    harmful = cl.datasets.load("advbench", split="train", n=args.n, seed=0)
    harmless = cl.datasets.load("harmless", split="train", n=args.n, seed=0)
    store = cl.ActivationStore()

    circuit = get("circuit-map")(n_neurons=20, n_heads=10, n_verify=16).run(model, harmful, harmless, store=store)
    circuit.save(args.out / "circuit")
    print(f"[{time.time() - t0:5.0f} s] circuit map: {circuit.summary}")

    neuron_grid = [1, 10, 50] if args.quick else [1, 10, 50, 200, 1000]
    head_grid = [1, 5] if args.quick else [1, 5, 20, 50]
    common = dict(random_seeds=1 if args.quick else 2, max_new_tokens=12, method="mean")
    # Most safety-relevant first: units ranked by their attribution-estimated refusal drop; the
    # effect-size (diff-ranking) neuron ranking is the comparison that shows why causal ranking matters.
    runs = [("neuron", "attribution", neuron_grid, "fragility_neuron"),
            ("head", "attribution", head_grid, "fragility_head"),
            ("neuron", "effect_size", neuron_grid + [5000], "fragility_neuron_effect_size")]
    fragility = {}
    for kind, rank_by, grid, name in runs:
        saved = args.out / name / "config.json"
        if args.reuse_fragility and saved.is_file():
            fragility[name] = json.loads(saved.read_text())["summary"]
            continue
        result = get("ablation")(kind=kind, k_grid=grid, rank_by=rank_by, **common).run(
            model, harmful, harmless, store=store)
        result.save(args.out / name)
        fragility[name] = result.summary
        print(f"[{time.time() - t0:5.0f} s] {name}: {result.summary}")

    summary = {"circuit": circuit.summary, "fragility": fragility, "n_per_set": args.n,
               "seconds": round(time.time() - t0), "store": store.stats()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\n" + render(summary, args.out))


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
        f"Fragility ({m.replace('_', ' ')} on held-out harmful prompts, baseline {fn['baseline_' + m]}):",
    ]
    for label, f in (("neurons", fn), ("heads", fh)):
        ks = sorted(int(k[3:].split("_")[0]) for k in f if k.startswith("top") and k.endswith(m))
        for k in ks:
            lines.append(f"  {k:5d} {label}: top-k {f[f'top{k}_{m}']:.3f} vs random-k {f[f'random{k}_{m}']:.3f}"
                         f" (KL harmless {f[f'top{k}_kl_harmless']:.3f})")
        halve = f.get("k_to_halve_refusal")
        lines.append(f"  {label} needed to halve refusal: {halve if halve is not None else 'not reached in the grid'}")
    lines.append(f"({summary['seconds']} s; results in {out})")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
