"""``circuitlab monitor fit|apply``: fit a request monitor on your prompt sets and save it; score your traffic.

- ``fit --model M --harmful SET[,SET] --harmless SET[,SET] --kind K --out FILE``: each set (built-in name or
  prompt file) is split 60/20/20 with ``--seed``; the read-out is fitted on the train splits, layers are
  chosen and the threshold is set (split-conformal, ``--alpha``) on the val+test splits of the harmless
  sets (pooled, or ``--calibration max``: the strictest set). Give benign questions on sensitive topics among
  the harmless sets (e.g. ``circuitlab/data/sensitive_benign.txt``) so they are not alarmed on.
  ``--kind circuit-probe`` reads the units of ``--components RUN_OR_CSV`` (a saved circuit-map run's verified
  units, or a components table), or without it the top neurons and heads of a diff-ranking on the train splits.
- ``apply --model M --monitor FILE --prompts FILE --out CSV``: one row per prompt (``prompt_id,score,flagged``;
  no prompt text). Refuses a model whose weights differ from the ones the monitor was fitted on.

Errors print one line ``error: ...`` and return 2.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from circuitlab.io import datasets
from circuitlab.models.loading import load_model
from circuitlab.monitor.cascade import union_of
from circuitlab.monitor.circuit import read_units
from circuitlab.monitor.decision import CIRCUIT, DECISION_KINDS, choose_layers, fit_feature_monitor, merge_features, \
    read_features
from circuitlab.monitor.locate import locate_components
from circuitlab.monitor.saved import load_monitor, save_monitor

__all__ = ["main", "KINDS"]

KINDS = DECISION_KINDS + ("probe|logodds",)


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one-line error and exit status 2, handled in main
        raise _UsageError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="circuitlab monitor", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fit", help="fit a monitor and save it")
    f.add_argument("--model", default="embedded")
    f.add_argument("--harmful", required=True, help="comma-separated built-in names or prompt files")
    f.add_argument("--harmless", required=True, help="comma-separated built-in names or prompt files")
    f.add_argument("--kind", default="probe|logodds", choices=KINDS)
    f.add_argument("--layers", default=None, help="comma-separated layers (default: chosen on validation)")
    f.add_argument("--components", default=None, help="circuit-probe units: a saved circuit-map run folder "
                   "(its verified units) or a components CSV (default: top neurons and heads of a diff-ranking)")
    f.add_argument("--top-units", type=int, default=None, help="circuit-probe: keep the first N units of --components")
    f.add_argument("--alpha", type=float, default=0.05, help="target false-alarm rate (split-conformal)")
    f.add_argument("--calibration", default="pooled", choices=("pooled", "max"))
    f.add_argument("--n", type=int, default=None, help="prompts drawn from each set (default: all)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--batch-size", type=int, default=16)
    f.add_argument("--out", required=True, help="monitor file to write (.pt)")
    a = sub.add_parser("apply", help="score a file of prompts with a saved monitor")
    a.add_argument("--model", default="embedded")
    a.add_argument("--monitor", required=True)
    a.add_argument("--prompts", required=True, help="prompt file (.txt/.csv/.json/.jsonl)")
    a.add_argument("--out", required=True, help="csv to write: prompt_id,score,flagged")
    a.add_argument("--batch-size", type=int, default=16)
    return p


def _sets(spec: str, n, seed) -> list:
    names = [s for s in spec.split(",") if s.strip()]
    if not names:
        raise ValueError(f"no prompt sets in {spec!r}; give e.g. --harmful advbench")
    return [datasets.load(s.strip(), n=n, seed=seed) for s in names]


def _fit(args) -> int:
    model = load_model(args.model)
    L = model.n_layers
    every = list(range(1, L))
    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    if layers and any(not 1 <= l < L for l in layers):
        raise ValueError(f"--layers must be in 1..{L - 1}; got {layers}")
    parts = {kind: [(list(ps.split("train", args.seed)), list(ps.split("val", args.seed)) +
                     list(ps.split("test", args.seed))) for ps in _sets(spec, args.n, args.seed)]
             for kind, spec in (("harmful", args.harmful), ("harmless", args.harmless))}
    units = _units(args, model, parts) if CIRCUIT in args.kind else ()
    only_units = args.kind == CIRCUIT  # reads no layer: the forward stops after its deepest unit
    feats = {kind: [tuple(read_features(model, x, [] if only_units else every, logodds=not only_units, units=units,
                                        batch_size=args.batch_size) for x in pair) for pair in pairs]
             for kind, pairs in parts.items()}
    fit_pos = merge_features(*[f for f, _ in feats["harmful"]])
    fit_neg = merge_features(*[f for f, _ in feats["harmless"]])
    cal_pos = merge_features(*[c for _, c in feats["harmful"]])
    cal_neg = {f"harmless{i}": c for i, (_, c) in enumerate(feats["harmless"])}
    pooled = merge_features(*cal_neg.values())

    def chosen(kind):
        if layers and kind not in ("logodds", CIRCUIT):
            return layers
        return choose_layers(kind, fit_pos, fit_neg, cal_pos, pooled, L, seed=args.seed)[0]

    def fit(kind, alpha):
        return fit_feature_monitor(kind, fit_pos, fit_neg, cal_pos, cal_neg, layers=chosen(kind),
                                   units=units if kind == CIRCUIT else (), n_model_layers=L, alpha=alpha,
                                   calibration=args.calibration, seed=args.seed)

    if args.kind == "probe|logodds":
        members = ("probe", "logodds")
        mon = union_of([fit(k, args.alpha) for k in members], list(cal_neg.values()), args.alpha,
                       fit_member=lambda i, a: fit(members[i], a))
    else:
        mon = fit(args.kind, args.alpha)
    path = save_monitor(mon, model, args.out, provenance={"command": "circuitlab monitor " + " ".join(sys.argv[2:]),
                                                          "harmful": args.harmful, "harmless": args.harmless,
                                                          "alpha": args.alpha, "seed": args.seed,
                                                          "units": [str(u) for u in units]})
    print(f"saved {mon.method} monitor (runs {mon.depth}/{L} layers, threshold {mon.threshold:.4g}) to {path}")
    return 0


def _units(args, model, parts) -> list:
    """The circuit-probe's units: ``--components``, else located on the train splits (diff-ranking)."""
    if args.top_units is not None and args.top_units < 1:
        raise ValueError(f"--top-units={args.top_units}: keep at least one unit (e.g. --top-units 12)")
    if args.components:
        return read_units(args.components, args.top_units)
    harmful, harmless = ([p for fit_part, _ in parts[k] for p in fit_part] for k in ("harmful", "harmless"))
    return locate_components(model, harmful, harmless, batch_size=args.batch_size)[:args.top_units]


def _apply(args) -> int:
    model = load_model(args.model)
    mon, _ = load_monitor(args.monitor, model)
    prompts = list(datasets.load(args.prompts))
    check = mon.check(model, prompts, batch_size=args.batch_size)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt_id", "score", "flagged"])
        for i, (s, flag) in enumerate(zip(check.scores.tolist(), check.flagged.tolist())):
            w.writerow([i, f"{s:.6g}", int(flag)])
    print(f"{int(check.flagged.sum())}/{len(prompts)} flagged; wrote {out} ({check.seconds:.1f} s)")
    return 0


def main(argv: list[str]) -> int:
    """Run ``circuitlab monitor`` with ``argv`` (without the ``monitor`` word); returns the exit status."""
    try:
        args = _parser().parse_args(argv)
        return _fit(args) if args.command == "fit" else _apply(args)
    except _UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as err:  # DatasetError and MonitorFileError are ValueErrors
        print(f"error: {str(err).splitlines()[0] if str(err) else type(err).__name__}", file=sys.stderr)
        return 2
