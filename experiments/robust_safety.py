"""Safety that survives its own attack: plain / adversarial (ReFAT) / distributed (DeepRefusal) hardening,
short or extended refusals, each model under the attack suite of ``circuitlab.defence.attacks``.
Writes results/robust_safety/ (``--quick``: results/robust_safety/quick/; ``--suite-quick``:
results/robust_safety/suite_quick/).

Usage: ``python experiments/robust_safety.py [N] [--quick] [--set KEY=VALUE ...] [--out DIR] [--model NAME]
[--dtype bfloat16] [--optimizer adam]`` (N prompts per class, default 100; AdvBench and the harmless set
subsampled with seed 0, split 60/20/20). ``--set`` overrides one experiment parameter of the chosen
configuration (as ``circuitlab run --set``), e.g. ``--quick --set n_eval=20 --set steps=16``; the
overrides and the parameters used are recorded in ``run.json``.

Runs the ``robust-hardening`` experiment: the hardening demo (refusals written by the project on the
harmful train prompts the model refuses least; retain set of the model's own harmless answers + KL),
``plain`` vs ``adversarial`` (the refusal direction recomputed on the weights being trained every 4
steps and ablated on the hardening rows), training located components / random components with
exactly as many parameters / every block, at equal steps. Every model then faces three adaptive
attacks recomputed on its own weights — directional ablation with the strongest of all layers × post-
instruction positions on validation prompts (lowest bypass score, any KL; ``--set attack_rule=arditi``
for the paper's filters), mean-ablation of the top-64 attribution-ranked
units, weight orthogonalization — plus the distribution measures (refusal as the top-1..64 units and
the top-1..8 candidate directions are ablated) and the costs (over-refusal, KL, cross-entropy, wall
time), with bootstrap 95 % CIs. No completions are saved: scores and judgments only.

``--suite-quick`` (for this CPU, the whole suite): targeted components, the three modes, extended
refusal targets, 16 prompts per evaluation set, every model under every attack of the suite
(strongest direction; rank-k subspace k = 1, 2, 4, 8; optimised abliteration with 8 seeded Optuna
trials of Heretic's kernel family, Heretic's default budget scaled down for the CPU; top-16 units;
orthogonalization; the prefill opener ``attacks.PREFILL_OPENER``), candidate layers at 50/62/75 % depth,
positions -1 and -2.

The full run scores ~100 candidate directions per model × 7 models: hours on this 2-core CPU, minutes
on a GPU. ``--quick`` (for this CPU): targeted components only, 8 steps, 8 prompts per evaluation set,
candidate layers at 50/62/75 % depth and position -1, 8-token judge.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import circuitlab as cl
from circuitlab.experiments import get, params_from_sets
from circuitlab.io.results import check_output_dir

OUT = Path(__file__).resolve().parent.parent / "results" / "robust_safety"

FULL = dict(variants=["targeted", "random", "full"], modes=["plain", "adversarial"], n_neurons=16, n_heads=4,
            steps=16, lr=1e-3, full_lr=1e-5, batch_size=4, n_train=16, n_retain=16, retain_tokens=16, kl_weight=1.0,
            refresh_every=4, adv_prob=0.5, adv_directions=1, n_adv=16, attack_layers=None, attack_positions=None,
            prune_layer_frac=0.2, n_attack=24, n_val=16, k_grid=[1, 4, 16, 64], n_dirs=[1, 2, 4, 8], n_eval=20,
            n_text=8, judge=True, max_new_tokens=16, n_boot=1000, targets="short", abliteration_trials=16,
            max_k=8, n_keys=8, edge_fraction=0.02)
QUICK = dict(FULL, variants=["targeted"], steps=8, batch_size=2, n_train=8, n_retain=8, retain_tokens=8, n_adv=8,
             n_attack=8, n_val=8, n_eval=8, n_text=4, k_grid=[1, 4, 16], n_dirs=[1, 2, 3], max_new_tokens=8,
             n_boot=500, modes=["plain", "adversarial"], edge_fraction=0.02)
SUITE_QUICK = dict(FULL, variants=["targeted"], modes=["plain", "adversarial", "distributed"], targets="extended",
                   steps=8, batch_size=2, n_train=8, n_retain=8, retain_tokens=8, n_adv=8, n_attack=16, n_val=8,
                   n_eval=16, n_text=4, k_grid=[1, 4, 16], n_dirs=[1, 2, 4, 8], max_new_tokens=8, n_boot=500,
                   abliteration_trials=8, edge_fraction=None, attack_screen=4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("n", nargs="?", type=int, default=100, help="prompts per class (default 100)")
    parser.add_argument("--quick", action="store_true", help="the small CPU configuration (results/robust_safety/quick)")
    parser.add_argument("--suite-quick", action="store_true",
                        help="the whole attack suite and the three modes, CPU-sized (results/robust_safety/suite_quick)")
    parser.add_argument("--model", default="embedded", help="model name, HF id or local dir (default embedded)")
    parser.add_argument("--dtype", default=None, help="float32 (default) or bfloat16 (memory-lean)")
    parser.add_argument("--optimizer", default="adam", help="adam | adam8bit | adafactor | sgd")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one robust-hardening parameter (repeatable)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default results/robust_safety[/quick])")
    args = parser.parse_args()
    if args.quick and args.suite_quick:
        parser.error("choose one of --quick and --suite-quick")
    out = args.out or (OUT / "quick" if args.quick else OUT / "suite_quick" if args.suite_quick else OUT)
    config = QUICK if args.quick else SUITE_QUICK if args.suite_quick else FULL
    try:  # bad --set, parameters or output folder: one line, exit 2, before the model loads
        overrides = params_from_sets(get("robust-hardening"), args.set)
        params = dict(config, optimizer=args.optimizer, **overrides)
        get("robust-hardening")(**params)  # the constructor validates every parameter
        check_output_dir(out, overwrite=True)  # a folder we may not write fails now, not after the run
    except ValueError as err:
        parser.error(str(err))
    t0 = time.time()
    model = cl.load_model(args.model, dtype=args.dtype)
    print(f"loaded {model} in {time.time() - t0:.1f} s", flush=True)
    harmful = cl.datasets.load("advbench", n=args.n, seed=0)
    harmless = cl.datasets.load("harmless", n=args.n, seed=0)
    if args.quick or args.suite_quick:
        quick = dict(attack_layers=sorted({int(model.n_layers * f) for f in (0.5, 0.625, 0.75)}),
                     attack_positions=[-1] if args.quick else [-2, -1])
        params.update({k: v for k, v in quick.items() if k not in overrides})
    start = time.time()
    result = get("robust-hardening")(**params).run(model, harmful, harmless, store=cl.ActivationStore())
    seconds = round(time.time() - start, 1)
    result.save(out, overwrite=True)
    comparison = result.tables["comparison"]
    cols = [c for c in comparison.columns if not c.endswith(("_ci_low", "_ci_high"))]
    print(comparison[cols].to_string(), flush=True)
    print(result.tables["training"].to_string(), flush=True)
    run = {"script": "experiments/robust_safety.py", "command": "python experiments/robust_safety.py "
           + " ".join([str(args.n)] + (["--quick"] if args.quick else []) + (["--suite-quick"] if args.suite_quick else []) + [f"--set {x}" for x in args.set]
                      + ([f"--out {args.out}"] if args.out else [])
                      + [f"--{k} {v}" for k, v in (("model", args.model), ("dtype", args.dtype),
                                                    ("optimizer", args.optimizer)) if v and v not in ("embedded", "adam")]),
           "n_per_class": args.n, "overrides": overrides, "params": params, "seconds": seconds,
           "total_seconds": round(time.time() - t0, 1),
           "model": {"id": model.name, "fingerprint": model.fingerprint, "dtype": str(model.dtype)},
           "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "load_average_end": os.getloadavg(),
           "machine": f"{os.cpu_count()}-core CPU; load average at start and end in config.json (provenance)"}
    (out / "run.json").write_text(json.dumps(run, indent=2, default=str))
    print(f"\nsaved {out} ({run['total_seconds']} s total)")


if __name__ == "__main__":
    main()
