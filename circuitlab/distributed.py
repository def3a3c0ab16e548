"""Run an experiment's independent units on Ray actors that each hold a model replica; merge as locally.

docs/guide/architecture.md, "Layers": distribution wraps experiments from outside. An experiment that exposes
``plan(model, harmful, harmless, *, store) -> Plan(units, state)``, ``run_unit(model, state, unit)``
and ``merge(model, harmful, harmless, plan, outputs) -> Result`` (``experiments.base.UnitExperiment``)
runs here with its units spread over ``workers`` actors. The rounds are ``unit_cache.run_rounds``, the
loop ``experiment.run`` takes with one worker, so both give the same table; this module only supplies
"run these units on the actors". The runner never looks inside a unit: it ships it, and the loop
keys its output by the unit's index and hands the outputs to ``merge`` in unit order.

- **rounds**: an experiment whose later units depend on earlier outputs (judge where the scores
  decide, score the finalists of a screen) also has ``next_plan(model, harmful, harmless, plan,
  outputs) -> Plan | None``; the loop calls it on the driver after each round and runs the next
  round's units on the same actors, until it returns None; ``merge`` gets the last round.
- **placement**: one actor per worker, ``num_gpus=1`` where the cluster has GPUs (else
  ``num_cpus=1``); each loads ``load_model(model_name, ...)`` once and keeps it.
- **failures**: a killed actor is restarted by Ray (``max_restarts``) and its in-flight unit re-run
  (``max_task_retries``); an actor lost for good hands its unit to a surviving one. Outputs are keyed
  by unit index, so a unit run twice is merged once.
- **unit cache**: outputs are read from and saved to the same content-keyed ``UnitCache`` a local run
  uses (the store's ``root/units``), keyed as a local run keys them with the replicas' device type and
  thread count, so a unit computed locally is reused here and the reverse; a code change recomputes.
  Saves happen on the driver as outputs arrive, so an interrupted run keeps what finished.
- **resume** (``checkpoint_dir``): the folder holds one small manifest, ``run.json`` (the run key:
  experiment class and parameters, weights, dtype, prompts; the unit cache's root; the replicas'
  device type; per round the unit keys and which are done), written atomically as units finish.
  The outputs live in the unit cache it names: the store's when the store keeps one, else
  ``checkpoint_dir/units``. A rerun with the same checkpoint reuses every finished unit (no Ray at
  all when all are done); a checkpoint of another run is refused. Unit files are pickles: only point
  the store or checkpoint at a directory you trust.

This module sits below ``circuitlab.experiments`` in the layer contract, so it duck-types the three
methods instead of importing ``UnitExperiment``. Ray is an optional extra (``pip install 'circuitlab[ray]'``).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections import deque
from pathlib import Path

import torch

from circuitlab.io import provenance
from circuitlab.models.loading import check_model_name, load_model
from circuitlab.core.progress import progress_bar
from circuitlab.io.store import ActivationStore
from circuitlab.io.files import atomic_write
from circuitlab.io.unit_cache import UnitCache, digest, run_rounds

__all__ = ["run_distributed", "is_unit_experiment", "unit_experiment_names", "DistributedError", "UNIT_METHODS"]

UNIT_METHODS = ("plan", "run_unit", "merge")
_LOCAL = (None, "local")


class DistributedError(ValueError):
    """A distributed run that cannot start or cannot finish (the message says what to do)."""


def is_unit_experiment(experiment) -> bool:
    """True when ``experiment`` splits into units: it has callable ``plan``, ``run_unit`` and ``merge``."""
    return all(callable(getattr(experiment, m, None)) for m in UNIT_METHODS)


def unit_experiment_names(experiment) -> list[str]:
    """Registered names of the unit experiments, found through ``experiment``'s class tree (no import)."""
    roots = [c for c in type(experiment).__mro__ if c is not object and "name" in c.__dict__]
    seen, stack, names = set(), list(roots[-1:] or [type(experiment)]), set()
    while stack:
        cls = stack.pop()
        if cls in seen:
            continue
        seen.add(cls)
        stack.extend(cls.__subclasses__())
        if "name" in cls.__dict__ and cls.__dict__["name"] and is_unit_experiment(cls):
            names.add(cls.__dict__["name"])
    return sorted(names)


class _Replica:
    """One Ray actor: the experiment and a model replica loaded once; runs units by index."""

    def __init__(self, experiment, model_name: str, device, dtype, threads: int | None = None):
        os.environ["CIRCUITLAB_PROGRESS"] = "0"  # bars from many workers would interleave in the driver's log
        if threads:  # CPU kernels split reductions by thread count: the driver's count rounds as a local run does
            torch.set_num_threads(threads)
        self.experiment = experiment
        self.model = load_model(model_name, device=device, dtype=dtype)

    def run(self, index: int, state, unit):
        return index, self.experiment.run_unit(self.model, state, unit)


def _import_ray():
    try:
        import ray
    except ImportError as err:
        raise DistributedError("Ray is not installed: pip install 'circuitlab[ray]' "
                               "(or drop --ray to run in one process)") from err
    return ray


def _probe(address: str, timeout: float = 5.0) -> None:
    """Fail fast on an unreachable ``host:port`` (ray.init would retry for a long time)."""
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        return  # "auto" and other forms ray understands itself
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as err:
        raise DistributedError(_unreachable(address, err)) from None


def _unreachable(address: str, err) -> str:
    return (f"cannot reach the Ray cluster at {address!r} ({err}). Start one there with `ray start --head`, "
            f"check the address, or pass `--ray local` to start a local cluster.")


def _connect(ray, address, workers: int) -> bool:
    """Connect to ``address`` or start a local cluster; True when this call started Ray (so it shuts it down)."""
    if address not in _LOCAL and address != "auto":
        _probe(address)
    if ray.is_initialized():
        return False  # the caller's connection (e.g. a test's local cluster): use it as it is
    try:
        if address in _LOCAL:
            ray.init(num_cpus=workers, include_dashboard=False)
        else:
            ray.init(address=address)
    except (ConnectionError, RuntimeError, TimeoutError) as err:
        raise DistributedError(_unreachable(address, err)) from None
    return True


def _resources(ray, device, workers: int, address) -> tuple[dict, str | None]:
    """Actor options (one GPU each where the cluster has GPUs) and the device each replica loads on."""
    total = ray.cluster_resources()
    wants_gpu = device is None or str(device).startswith("cuda")
    if wants_gpu and total.get("GPU", 0) >= 1:
        kind, options, replica_device = "GPU", {"num_gpus": 1}, "cuda"  # Ray shows each actor only its own GPU
    elif device is not None and str(device).startswith("cuda"):
        raise DistributedError(f"device {device!r} asked for, but the Ray cluster at {address or 'local'} has no GPUs")
    else:
        kind, options, replica_device = "CPU", {"num_cpus": 1}, "cpu"
    if total.get(kind, 0) < workers:
        raise DistributedError(f"{workers} workers need {workers} {kind}s, but the Ray cluster at "
                               f"{address or 'local'} has {int(total.get(kind, 0))}; pass --workers "
                               f"{max(int(total.get(kind, 0)), 1)} or add nodes")
    return options, replica_device


# ---- checkpoint manifest -------------------------------------------------------------------------

def _run_key(experiment, model, model_name, dtype, harmful, harmless) -> str:
    """What makes two runs the same run: experiment class and parameters, weights, dtype, prompts. Not the
    code: a code change resumes into the same manifest and recomputes, since every unit key holds it."""
    parts = [type(experiment).__module__, type(experiment).__qualname__, repr(experiment),
             getattr(model, "fingerprint", model_name), str(dtype),
             getattr(harmful, "hash", None) or digest(list(harmful)),
             getattr(harmless, "hash", None) or digest(list(harmless))]
    return hashlib.sha256("\x1e".join(map(str, parts)).encode()).hexdigest()


class _Manifest:
    """``run.json`` in the checkpoint folder: the run key, the unit cache and replica device it used, and per
    round the unit keys and which are done (the outputs live in the unit cache, keyed by content)."""

    VERSION = 1

    def __init__(self, directory, key: str, name: str):
        self.path = Path(directory) / "run.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            held = json.loads(self.path.read_text())
        except (OSError, ValueError):
            held = None  # none yet, or cut short: the unit cache still holds what finished
        if isinstance(held, dict) and (held.get("version") != self.VERSION or held.get("run") != key):
            raise DistributedError(f"checkpoint directory {self.path.parent} holds another run "
                                   f"({held.get('experiment')}, different parameters, model or prompts, or an "
                                   f"older layout); pass a new directory or delete it")
        self.data = held if isinstance(held, dict) else {"version": self.VERSION, "run": key, "experiment": name,
                                                         "unit_cache": None, "device": None, "rounds": []}
        self._written = 0.0

    def get(self, field: str):
        return self.data.get(field)

    def set(self, **fields) -> None:
        self.data.update(fields)
        self._write()

    def record(self, step: int, plan, keys, done, final: bool) -> None:
        """``run_rounds``'s hook: round ``step`` now. Written at once when it is news (another round, other
        keys, a unit no longer done) or the round ended; a unit finishing is written at most once a second."""
        rounds = self.data["rounds"]
        held = rounds[step] if step < len(rounds) else None
        entry = {"label": getattr(plan, "label", ""), "keys": keys, "done": sorted(done)}
        rounds[step:] = [entry]
        news = held is None or held["keys"] != keys or not set(held["done"]) <= set(entry["done"])
        if news or final or time.monotonic() - self._written >= 1.0:
            self._write()

    def _write(self) -> None:
        atomic_write(self.path, json.dumps(self.data, indent=1).encode())
        self._written = time.monotonic()


def _unit_cache(store, manifest: _Manifest | None, checkpoint_dir) -> UnitCache | None:
    """The store's unit cache (a local run's too); else the one the checkpoint names, or ``checkpoint/units``."""
    cache = store.unit_cache() if store is not None and callable(getattr(store, "unit_cache", None)) else None
    if cache is None and manifest is not None:
        cache = UnitCache(manifest.get("unit_cache") or Path(checkpoint_dir).resolve() / "units")
    return cache


# ---- dispatch -----------------------------------------------------------------------------------

def _last_line(err: BaseException) -> str:
    """The line of a (multi-line, remote-traceback) Ray error that says what went wrong."""
    lines = [l.strip() for l in str(err).splitlines() if l.strip()]
    return lines[-1] if lines else type(err).__name__


def _completed(ray, actors, live: list[int], dead: set, state_ref, units, todo, max_retries: int):
    """Yield ``(index, output)`` as units finish on ``actors[live]``; units of actors lost for good (added
    to ``dead``) go to the survivors."""
    lost = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError)
    queue, free, running, requeued = deque(todo), list(live), {}, {}
    while queue or running:
        while queue and free:
            a, i = free.pop(0), queue.popleft()
            running[actors[a].run.remote(i, state_ref, units[i])] = (a, i)
        if not running:
            raise DistributedError(f"every worker died; units {sorted(queue)} unfinished (rerun with the same "
                                   f"checkpoint_dir to resume from what finished)")
        (ref,), _ = ray.wait(list(running), num_returns=1)
        a, i = running.pop(ref)
        try:
            index, output = ray.get(ref)
        except ray.exceptions.RayTaskError as err:  # the experiment's own error: deterministic, not retried
            cause = getattr(err, "cause", None)
            raise (cause if isinstance(cause, Exception) else err) from err
        except lost as err:  # restarts spent: this actor is gone, its unit goes back in the queue
            dead.add(a)
            requeued[i] = requeued.get(i, 0) + 1
            if requeued[i] > max_retries or not set(live) - dead:
                raise DistributedError(f"unit {i} failed on {requeued[i]} worker(s) that died for good: "
                                       f"{_last_line(err)} (rerun with the same checkpoint_dir to resume from "
                                       f"what finished)") from err
            queue.appendleft(i)
            continue
        if index != i:
            raise DistributedError(f"worker answered unit {index} for unit {i}")
        free.append(a)
        yield i, output


class _Pool:
    """The Ray actors: connected and started on first need (a fully resumed run needs no Ray), reused by
    every round so each replica loads its model once, and freed by ``close``."""

    def __init__(self, experiment, model_name: str, *, workers: int, address, device, dtype, max_retries: int,
                 threads: int):
        self.experiment, self.model_name, self.workers, self.address = experiment, model_name, workers, address
        self.device, self.dtype, self.max_retries, self.threads = device, dtype, max_retries, threads
        self.ray, self.started, self.actors, self.dead, self.replica_device = None, False, [], set(), None

    def connect(self):
        """Ray, connected (or a local cluster started) on first call."""
        if self.ray is None:
            self.ray = _import_ray()
            self.started = _connect(self.ray, self.address, self.workers)
        return self.ray

    def device_type(self) -> str:
        """The device type the replicas run units on (part of each unit's key); asks the cluster only when
        no device was given, and pins the answer so the replicas start there."""
        if self.device is None:  # as _resources decides: a GPU each where the cluster has GPUs
            self.device = "cuda" if self.connect().cluster_resources().get("GPU", 0) >= 1 else "cpu"
        return "cuda" if str(self.device).startswith("cuda") else "cpu"

    def live(self, n_units: int) -> list[int]:
        """Indices of ``min(workers, n_units)`` live actors, started now where too few are alive."""
        self.connect()
        want = min(self.workers, n_units)  # a worker with no unit would only load a model
        live = [a for a in range(len(self.actors)) if a not in self.dead]
        if len(live) < want:
            options, self.replica_device = _resources(self.ray, self.device, want, self.address)
            remote = self.ray.remote(_Replica).options(max_restarts=self.max_retries,
                                                       max_task_retries=self.max_retries, **options)
            threads = self.threads if self.replica_device == "cpu" else None
            for _ in range(want - len(live)):
                live.append(len(self.actors))
                self.actors.append(remote.remote(self.experiment, self.model_name, self.replica_device, self.dtype,
                                                 threads))
        return live[:want]

    def run(self, plan, todo: list[int]):
        """Yield ``(index, output)`` for the units ``todo`` of ``plan`` as they finish."""
        live = self.live(len(todo))
        state_ref = self.ray.put(plan.state)  # shipped once, shared by every unit of the round
        done = _completed(self.ray, self.actors, live, self.dead, state_ref, plan.units, todo, self.max_retries)
        label = f"{plan.label}: " if getattr(plan, "label", "") else ""
        yield from progress_bar(done, True, total=len(todo), desc=f"{label}units on {len(live)} workers")

    def close(self) -> None:
        """Free the actors (and a cluster this pool started); a second call does nothing."""
        if self.ray is None:
            return
        for actor in self.actors:
            self.ray.kill(actor, no_restart=True)  # free the GPUs/CPUs now, not when handles are collected
        self.actors, self.dead = [], set()
        if self.started:
            self.ray.shutdown()
            self.started = False


def run_distributed(experiment, model_name: str, harmful, harmless, *, workers: int, address: str | None = None,
                    device=None, dtype=None, store=None, store_root=None, checkpoint_dir=None,
                    max_retries: int = 2, model=None, threads: int | None = None):
    """Run ``experiment`` on Ray: plan, next rounds and merge on the driver, ``run_unit`` on ``workers`` actors.

    ``address``: a Ray cluster (``host:port``, ``ray://host:port``, ``auto``) or None / ``"local"`` to
    start a local cluster with ``workers`` CPUs (shut down again at the end). An existing
    ``ray.init`` connection is used as it is. ``model``: the driver's already loaded model (else
    ``model_name`` is loaded on the CPU for plan and merge). ``store`` / ``store_root``: the
    ActivationStore ``plan`` may use. ``max_retries``: restarts per actor and re-runs per unit.
    ``threads``: torch threads of each CPU replica; None: the driver's ``torch.get_num_threads()``,
    since CPU kernels split sums by thread count and another count rounds differently (edge-attribution's
    backward passes do): with it, every number equals a local run's; fewer threads trade that for speed.
    An experiment with ``next_plan`` runs in rounds (each round's units after the previous round's
    outputs), on the same actors. Returns the experiment's own Result, the table identical to
    ``experiment.run``.
    """
    if not is_unit_experiment(experiment):
        names = unit_experiment_names(experiment)
        raise DistributedError(f"{getattr(experiment, 'name', '') or type(experiment).__name__} does not split into "
                               f"independent units (plan/run_unit/merge), so it cannot run on Ray; drop --ray. "
                               f"Experiments that can: {', '.join(names) or 'none registered'}")
    if not isinstance(workers, int) or workers < 1:
        raise DistributedError(f"workers must be an integer >= 1, got {workers!r}")
    if not isinstance(max_retries, int) or max_retries < 0:
        raise DistributedError(f"max_retries must be an integer >= 0, got {max_retries!r}")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise DistributedError(f"threads must be None (the driver's) or an integer >= 1, got {threads!r}")
    check_model_name(model_name)  # every worker loads it: a bad name fails here, not on each worker
    if store is None and store_root is not None:
        store = ActivationStore(store_root)
    record = provenance.start()
    model = model if model is not None else load_model(model_name, device="cpu", dtype=dtype)
    manifest = (_Manifest(checkpoint_dir, _run_key(experiment, model, model_name, dtype, harmful, harmless),
                          getattr(experiment, "name", "")) if checkpoint_dir is not None else None)
    cache = _unit_cache(store, manifest, checkpoint_dir)
    if manifest is not None:
        manifest.set(unit_cache=str(cache.root.resolve()))  # before Ray is needed: a resume finds its cache
    plan = experiment.plan(model, harmful, harmless, store=store)
    pool = _Pool(experiment, model_name, workers=workers, address=address,
                 device=device if device is not None or manifest is None else manifest.get("device"), dtype=dtype,
                 max_retries=max_retries, threads=threads or torch.get_num_threads())
    try:
        key_device = pool.device_type() if cache is not None else None
        if manifest is not None:
            manifest.set(device=key_device)  # a resume keys (and runs) its units on the same device type
        result, rounds = run_rounds(experiment, model, harmful, harmless, plan, pool.run, cache=cache,
                                    device=key_device, threads=pool.threads,
                                    record=manifest.record if manifest is not None else None,
                                    before_merge=pool.close)  # merge runs on the driver: free the workers first
    finally:
        pool.close()
    info = {"address": address or "local", "workers": workers, "units": sum(rounds.sizes),
            "resumed_units": rounds.reused, "rounds": rounds.sizes}
    if pool.replica_device is not None:
        info["replica_device"] = pool.replica_device
    config = getattr(result, "config", None)
    if isinstance(config, dict):
        config.setdefault("provenance", provenance.finish(record, model))
        config["distributed"] = info
    if record.get("dirty") and isinstance(getattr(result, "summary", None), dict):  # as a local run reports it
        result.summary.setdefault("dirty_tree", f"uncommitted changes (diff {record['diff_sha256']}) "
                                                f"on {str(record['commit'])[:10]}")
    return result
