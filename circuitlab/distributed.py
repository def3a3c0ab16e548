"""Run an experiment's independent units on Ray actors that each hold a model replica; merge as locally.

docs/guide/architecture.md, "Layers": distribution wraps experiments from outside. An experiment that exposes
``plan(model, harmful, harmless, *, store) -> Plan(units, state)``, ``run_unit(model, state, unit)``
and ``merge(model, harmful, harmless, plan, outputs) -> Result`` (``experiments.base.UnitExperiment``)
runs here with its units spread over ``workers`` actors; ``experiment.run`` is the same three calls
with one worker, so both give the same table. The runner never looks inside a unit: it ships it,
keys its output by the unit's index, and hands the outputs to ``merge`` in unit order.

- **rounds**: an experiment whose later units depend on earlier outputs (judge where the scores
  decide, score the finalists of a screen) also has ``next_plan(model, harmful, harmless, plan,
  outputs) -> Plan | None``; the runner calls it on the driver after each round and runs the next
  round's units on the same actors, until it returns None; ``merge`` gets the last round.
- **placement**: one actor per worker, ``num_gpus=1`` where the cluster has GPUs (else
  ``num_cpus=1``); each loads ``load_model(model_name, ...)`` once and keeps it.
- **failures**: a killed actor is restarted by Ray (``max_restarts``) and its in-flight unit re-run
  (``max_task_retries``); an actor lost for good hands its unit to a surviving one. Outputs are keyed
  by unit index, so a unit run twice is merged once.
- **resume**: with ``checkpoint_dir``, each finished unit's output is pickled there atomically as it
  arrives (round r > 0 in ``round-r/``); a rerun of the same run (same experiment parameters, model
  weights, prompts and units) skips those units. Checkpoints are pickles: only point this at a
  directory you trust.

This module sits below ``circuitlab.experiments`` in the layer contract, so it duck-types the three
methods instead of importing ``UnitExperiment``. Ray is an optional extra (``pip install 'circuitlab[ray]'``).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import socket
from collections import deque
from pathlib import Path

import torch

from circuitlab.io import provenance
from circuitlab.models.loading import check_model_name, load_model
from circuitlab.core.progress import progress_bar
from circuitlab.io.store import ActivationStore
from circuitlab.io.files import atomic_write, code_fingerprint
from circuitlab.io.unit_cache import class_source_digest, digest

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


# ---- checkpoints ------------------------------------------------------------------------------

def _run_key(experiment, model, model_name, dtype, harmful, harmless, plan) -> str:
    """What makes two runs the same: the code (as for the local unit cache: a code change recomputes),
    experiment class and parameters, weights, prompts, the units themselves."""
    parts = [code_fingerprint(), class_source_digest(type(experiment)),
             type(experiment).__module__, type(experiment).__qualname__, repr(experiment),
             getattr(model, "fingerprint", model_name), str(dtype),
             getattr(harmful, "hash", None) or digest(list(harmful)),
             getattr(harmless, "hash", None) or digest(list(harmless)),
             digest(plan.units), str(len(plan.units))]
    return hashlib.sha256("\x1e".join(map(str, parts)).encode()).hexdigest()


class _Checkpoints:
    """``unit-NNNNNN.pkl`` per finished unit plus ``run.json`` naming the run they belong to."""

    def __init__(self, directory, key: str, n_units: int, name: str, *, replace: bool = False):
        self.dir, self.key = Path(directory), key
        self.dir.mkdir(parents=True, exist_ok=True)
        manifest = self.dir / "run.json"
        held = json.loads(manifest.read_text()) if manifest.exists() else None
        if held is not None and held.get("key") != key and not replace:
            raise DistributedError(f"checkpoint directory {self.dir} holds another run ({held.get('experiment')}, "
                                   f"different parameters, model, prompts or units); pass a new directory "
                                   f"or delete it")
        if held is None or held.get("key") != key:  # replace: a later round built from other outputs
            atomic_write(manifest, json.dumps({"key": key, "experiment": name, "n_units": n_units}).encode())

    def _path(self, index: int) -> Path:
        return self.dir / f"unit-{index:06d}.pkl"

    def load(self, n_units: int) -> dict:
        """Finished outputs by unit index; an unreadable or foreign file is recomputed, never trusted."""
        done = {}
        for i in range(n_units):
            try:
                record = pickle.loads(self._path(i).read_bytes())
            except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ValueError):
                continue
            if isinstance(record, dict) and record.get("key") == self.key and record.get("index") == i:
                done[i] = record["output"]
        return done

    def save(self, index: int, output) -> None:
        atomic_write(self._path(index), pickle.dumps({"key": self.key, "index": index, "output": output}))


def _round_checkpoints(checkpoint_dir, index: int, key: str, n_units: int, name: str) -> _Checkpoints | None:
    """Round 0 keeps the directory itself (the layout of one-round runs); round r its ``round-r`` folder,
    replaced when the earlier rounds' outputs (hence this round's units) changed."""
    if checkpoint_dir is None:
        return None
    directory = Path(checkpoint_dir) if index == 0 else Path(checkpoint_dir) / f"round-{index}"
    return _Checkpoints(directory, key, n_units, name, replace=index > 0)


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

    def live(self, n_units: int) -> list[int]:
        """Indices of ``min(workers, n_units)`` live actors, started now where too few are alive."""
        if self.ray is None:
            self.ray = _import_ray()
            self.started = _connect(self.ray, self.address, self.workers)
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
        for actor in self.actors:
            self.ray.kill(actor, no_restart=True)  # free the GPUs/CPUs now, not when handles are collected
        if self.started:
            self.ray.shutdown()


def _run_round(pool: _Pool, plan, checkpoints: _Checkpoints | None) -> tuple[list, int]:
    """Every unit's output of one round in unit order, and how many came from checkpoints."""
    n = len(plan.units)
    outputs = checkpoints.load(n) if checkpoints else {}
    resumed = len(outputs)
    todo = [i for i in range(n) if i not in outputs]
    if todo:
        for i, output in pool.run(plan, todo):
            if i in outputs:
                continue  # a unit that ran twice is merged once
            outputs[i] = output
            if checkpoints:
                checkpoints.save(i, output)
    return [outputs[i] for i in range(n)], resumed


def _next_plan(experiment, model, harmful, harmless, plan, outputs):
    """The experiment's next round (``next_plan``), or None: one-round experiments need not define it."""
    following = getattr(experiment, "next_plan", None)
    return following(model, harmful, harmless, plan, outputs) if callable(following) else None


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
    plan = experiment.plan(model, harmful, harmless, store=store)
    pool = _Pool(experiment, model_name, workers=workers, address=address, device=device, dtype=dtype,
                 max_retries=max_retries, threads=threads or torch.get_num_threads())
    rounds, resumed = [], 0
    try:
        while True:
            key = _run_key(experiment, model, model_name, dtype, harmful, harmless, plan)
            checkpoints = _round_checkpoints(checkpoint_dir, len(rounds), key, len(plan.units),
                                             getattr(experiment, "name", ""))
            outputs, done_before = _run_round(pool, plan, checkpoints)
            rounds.append(len(plan.units))
            resumed += done_before
            following = _next_plan(experiment, model, harmful, harmless, plan, outputs)
            if following is None:
                break
            plan = following
    finally:
        if pool.ray is not None:
            pool.close()
    info = {"address": address or "local", "workers": workers, "units": sum(rounds), "resumed_units": resumed,
            "rounds": rounds}
    if pool.replica_device is not None:
        info["replica_device"] = pool.replica_device
    result = experiment.merge(model, harmful, harmless, plan, outputs)
    config = getattr(result, "config", None)
    if isinstance(config, dict):
        config.setdefault("provenance", provenance.finish(record, model))
        config["distributed"] = info
    if record.get("dirty") and isinstance(getattr(result, "summary", None), dict):  # as a local run reports it
        result.summary.setdefault("dirty_tree", f"uncommitted changes (diff {record['diff_sha256']}) "
                                                f"on {str(record['commit'])[:10]}")
    return result
