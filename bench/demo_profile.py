"""Profile of `make demo`: its wall time by phase and by kind of work.

Wraps the functions that do the demo's work with exclusive timers (a stack: time inside a nested
wrapped call counts for the inner kind only, so nothing is counted twice), runs
``experiments/refusal_circuit.py``'s ``main`` with the given arguments, then prints and writes a
table ``phase, kind, seconds, calls`` (rows with phase or kind ``ALL`` are subtotals; ``ALL, ALL``
is the wall time) and a ``.json`` beside it with the run's arguments and load average.

Kinds of work (``calls`` counts outermost calls):

- ``activations``: ``HookedModel.run_with_cache`` (forward passes for activations: store misses)
- ``store``: ``ActivationStore.get`` outside its forward passes (disk reads, hashing, bookkeeping)
- ``patching``: the patching engine's ``run_sweeps`` (circuit-map verification)
- ``attribution``: ``attribution.mean_patch_estimates`` (attribution patching: forward + backward)
- ``last_logits``: ``HookedModel.last_logits`` (refusal score on harmful prompts; harmless logits for KL)
  and ``direction_eval.last_logits_shared`` (direction scoring, via a shared-prefix prefill)
- ``generation prefill``: ``generation.prefill`` inside decoding (the prompt forward of each judged generation)
- ``generation decode``: ``metrics.judge_refusals`` / ``generation.generate`` / ``decode_groups`` outside
  the prefill (the decoding steps; refusal-token calibration included)
- ``kl``: ``metrics.kl_divergence``; ``cross-entropy``: ``metrics.cross_entropy``
- ``other``: everything else (model loading, probes, ranking statistics, plots, saving)

Phases are the ones the demo marks (``load``, ``circuit map``, ``fragility baseline``, one per
fragility run); time outside them is ``script``.

    nice -n 5 .venv/bin/python bench/demo_profile.py --quick                # a smoke run of the demo
    .venv/bin/python bench/demo_profile.py --model planted --n 8 --tag planted   # seconds (CI)

Profiler options: ``--tag`` (default ``quick`` / ``full``, with the model when not embedded),
``--out`` (CSV; default ``results/bench/demo_profile_<tag>.csv``), ``--results`` (the demo's own
output directory; default a temporary one, so committed results are never overwritten). Every
other option goes to the demo (``experiments/refusal_circuit.py --help``).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import importlib.util
import json
import os
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (module, attribute or Class.method, kind); targets a module lacks are skipped
TARGETS = (
    ("circuitlab.methods.direction_eval", "last_logits_shared", "last_logits"),
    ("circuitlab.core.model", "HookedModel.run_with_cache", "activations"),
    ("circuitlab.io.store", "ActivationStore.get", "store"),
    ("circuitlab.methods.patching", "run_sweeps", "patching"),
    ("circuitlab.methods.attribution", "mean_patch_estimates", "attribution"),
    ("circuitlab.core.model", "HookedModel.last_logits", "last_logits"),
    ("circuitlab.core.generation", "prefill", "generation prefill"),
    ("circuitlab.core.generation", "decode_groups", "generation decode"),
    ("circuitlab.core.generation", "generate", "generation decode"),
    ("circuitlab.core.model", "HookedModel.generate", "generation decode"),
    ("circuitlab.methods.metrics", "judge_refusals", "generation decode"),
    ("circuitlab.methods.metrics", "kl_divergence", "kl"),
    ("circuitlab.methods.metrics", "cross_entropy", "cross-entropy"),
)
# a kind counted only inside another one (elsewhere the call's time stays with its caller's kind):
# prefill is judged generation only inside decoding; direct calls are last-logits forwards
WITHIN = {"generation prefill": "generation decode"}
KINDS = ("activations", "store", "patching", "attribution", "last_logits", "generation prefill",
         "generation decode", "kl", "cross-entropy", "other")


class Profiler:
    """Exclusive wall-time accounting per (phase, kind): a stack of the kinds being run."""

    def __init__(self):
        self.seconds: dict = defaultdict(float)
        self.calls: Counter = Counter()
        self.phases: list[str] = ["script"]
        self.current = "script"
        self.stack = ["other"]
        self.mark = self.start = time.perf_counter()
        self.on_phase_end = None  # called after each phase (e.g. to save the table so far)
        self._undo: list = []

    def _flush(self) -> None:
        now = time.perf_counter()
        self.seconds[(self.current, self.stack[-1])] += now - self.mark
        self.mark = now

    @contextlib.contextmanager
    def phase(self, name: str):
        """Time spent inside counts for phase ``name``."""
        self._flush()
        previous, self.current = self.current, name
        if name not in self.phases:
            self.phases.append(name)
        try:
            yield
        finally:
            self._flush()
            self.current = previous
            if self.on_phase_end is not None:
                self.on_phase_end()

    def timed(self, fn, kind: str):
        """``fn`` with its time (less that of nested timed calls) counted as ``kind``."""
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if kind in WITHIN and self.stack[-1] != WITHIN[kind]:
                return fn(*args, **kwargs)
            self._flush()
            if self.stack[-1] != kind:
                self.calls[(self.current, kind)] += 1
            self.stack.append(kind)
            try:
                return fn(*args, **kwargs)
            finally:
                self._flush()
                self.stack.pop()
        return wrapper

    def install(self, targets=TARGETS, extra_modules=()) -> None:
        """Wrap every target where it is defined and wherever a module imported it by name."""
        for module_name, attr, kind in targets:
            try:
                module = importlib.import_module(module_name)
            except ImportError:
                continue
            if "." in attr:
                cls_name, meth = attr.split(".")
                cls = getattr(module, cls_name, None)
                if cls is not None and meth in vars(cls):
                    self._replace(cls, meth, self.timed(vars(cls)[meth], kind))
                continue
            orig = getattr(module, attr, None)
            if orig is None:
                continue
            wrapped = self.timed(orig, kind)
            holders = [m for n, m in list(sys.modules.items()) if n.startswith("circuitlab")] + list(extra_modules)
            for holder in holders:
                for name, value in list(vars(holder).items()):
                    if value is orig:
                        self._replace(holder, name, wrapped)

    def _replace(self, owner, name: str, value) -> None:
        self._undo.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    def uninstall(self) -> None:
        while self._undo:
            owner, name, value = self._undo.pop()
            setattr(owner, name, value)

    def table(self, wall: float) -> pd.DataFrame:
        """Rows per (phase, kind) in run order, then subtotals per phase and per kind, then the wall time."""
        self._flush()
        kinds = list(KINDS) + sorted({k for _, k in self.seconds} - set(KINDS))
        rows = [(p, k, self.seconds[(p, k)], self.calls[(p, k)]) for p in self.phases for k in kinds
                if self.seconds.get((p, k), 0) > 0 or self.calls[(p, k)]]
        df = pd.DataFrame(rows, columns=["phase", "kind", "seconds", "calls"])
        by_phase = df.groupby("phase", sort=False)[["seconds", "calls"]].sum().reset_index().assign(kind="ALL")
        by_kind = df.groupby("kind", sort=False)[["seconds", "calls"]].sum().reset_index().assign(phase="ALL")
        by_kind = by_kind.set_index("kind").loc[[k for k in kinds if k in set(by_kind.kind)]].reset_index()
        total = pd.DataFrame([{"phase": "ALL", "kind": "ALL", "seconds": wall, "calls": int(df.calls.sum())}])
        out = pd.concat([df, by_phase, by_kind, total], ignore_index=True)[["phase", "kind", "seconds", "calls"]]
        out["seconds"] = out["seconds"].round(2)
        out["calls"] = out["calls"].astype(int)
        return out


def load_demo():
    """experiments/refusal_circuit.py as a module (scripts are not a package)."""
    spec = importlib.util.spec_from_file_location("refusal_circuit", ROOT / "experiments" / "refusal_circuit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _save(table: pd.DataFrame, record: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False)
    out.with_suffix(".json").write_text(json.dumps(record, indent=2))


def profile(demo_args: list[str], results: Path | None = None, out: Path | None = None) -> tuple[pd.DataFrame, dict]:
    """Run the demo's main under the profiler: (table, run record). With ``out``, the table so far is
    saved after every phase (``"partial": true`` in the record), so an interrupted run leaves its numbers."""
    demo = load_demo()
    prof = Profiler()
    record = {"demo_args": demo_args, "loadavg_start": [round(x, 2) for x in os.getloadavg()],
              "cpus": os.cpu_count(), "started": time.strftime("%Y-%m-%d %H:%M:%S"), "partial": True}

    def snapshot():
        wall = time.perf_counter() - prof.start
        record.update(wall_s=round(wall, 1), loadavg_end=[round(x, 2) for x in os.getloadavg()])
        table = prof.table(wall)
        if out is not None:
            _save(table, record, out)
        return table

    with tempfile.TemporaryDirectory() as tmp:
        prof.install(extra_modules=[demo])
        prof.on_phase_end = snapshot
        demo.phase = prof.phase
        try:
            demo.main(list(demo_args) + ["--out", str(results or Path(tmp) / "demo")])
        finally:
            prof.uninstall()
    record["partial"] = False
    return snapshot(), record


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--tag", default=None, help="name of the CSV (default: quick / full, plus the model)")
    parser.add_argument("--out", type=Path, default=None, help="CSV path (default results/bench/demo_profile_<tag>.csv)")
    parser.add_argument("--results", type=Path, default=None, help="the demo's output directory (default: temporary)")
    args, demo_args = parser.parse_known_args(argv)
    if "--out" in demo_args:
        parser.error("--out names the profile CSV here; use --results for the demo's output directory")
    model = demo_args[demo_args.index("--model") + 1] if "--model" in demo_args else "embedded"
    tag = args.tag or ("quick" if "--quick" in demo_args else "full") + ("" if model == "embedded" else f"_{model}")
    out = args.out or ROOT / "results" / "bench" / f"demo_profile_{tag}.csv"
    table, record = profile(demo_args, args.results, out)
    with pd.option_context("display.max_rows", None, "display.width", 120):
        print(table.to_string(index=False))
    print(f"wall {record['wall_s']} s; load average {record['loadavg_start']} -> {record['loadavg_end']} "
          f"on {record['cpus']} CPUs; table: {out}")
    return table


if __name__ == "__main__":
    main()
