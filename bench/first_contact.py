"""What a new user waits for: the CLI's first second, and optionally a fresh clone's `make test` and `make demo`.

    python bench/first_contact.py                      # CLI timings only (seconds)
    python bench/first_contact.py --make-test          # + `make test` on a fresh clone with a cold cache
    python bench/first_contact.py --make-test --demo   # + a cold `make demo` on that clone

Each command runs as a user would type it, in a subprocess; the machine's fp32 matmul peak (2 threads)
and the load average are recorded beside every time, since machines of this kind differ about 2x.
On a faster machine, ``bash bench/throttled.sh FRACTION python bench/first_contact.py ...`` emulates a
slower one (a CPU-quota cgroup; ``cpu_quota`` records the share of each core, null when unthrottled).
Writes ``results/bench/first_contact.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from circuitlab.io.provenance import git_state, matmul_peak

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "circuitlab.cli"]


def timed(cmd, *, cwd=ROOT, env=None, repeat: int = 1, log: Path | None = None) -> dict:
    """Wall seconds of ``cmd`` (best of ``repeat``), its exit code and the load average before and after;
    with ``log``, the command's output is kept there (e.g. pytest's --durations table)."""
    load_start = os.getloadavg()
    best, rc = None, None
    for _ in range(repeat):
        t = time.perf_counter()
        with open(log, "w") if log else open(os.devnull, "w") as sink:
            rc = subprocess.run(cmd, cwd=cwd, env=env, stdout=sink, stderr=subprocess.STDOUT).returncode
        took = time.perf_counter() - t
        best = took if best is None else min(best, took)
    return {"command": " ".join(map(str, cmd)), "seconds": round(best, 3), "rc": rc, "repeat": repeat,
            "load_start": [round(x, 2) for x in load_start], "load_end": [round(x, 2) for x in os.getloadavg()]}


def cli_timings(env) -> dict:
    """``--help``, ``list`` and ``describe``: the first call of each fills the catalog cache, the rest read it."""
    return {
        "help": timed([*CLI, "--help"], env=env, repeat=3),
        "list_cold_catalog": timed([*CLI, "list"], env=env),
        "list": timed([*CLI, "list"], env=env, repeat=3),
        "describe": timed([*CLI, "describe", "ablation"], env=env, repeat=3),
    }


def fresh_clone_runs(demo: bool, logs: Path, keep_demo: Path | None = None) -> dict:
    """`make test` (and `make demo`) on a fresh clone of HEAD with an empty circuitlab cache; pytest's
    slowest tests are listed in the kept log. The demo gets its own empty cache (the GGUF conversion
    included, as on a fresh machine); ``keep_demo``: its results folder is moved there."""
    work = Path(tempfile.mkdtemp(prefix="circuitlab-fresh-"))
    subprocess.run(["git", "clone", "-q", str(ROOT), str(work / "repo")], check=True)
    env = dict(os.environ, CIRCUITLAB_CACHE=str(work / "cache"), PYTEST_ADDOPTS="--durations=40")
    out = {"make_test": timed(["make", "test"], cwd=work / "repo", env=env, log=logs / "first_contact_make_test.log")}
    if demo:
        out["make_demo_cold"] = timed(["make", "demo"], cwd=work / "repo",
                                      env=dict(env, CIRCUITLAB_CACHE=str(work / "cache_demo")),
                                      log=logs / "first_contact_make_demo.log")
        out["make_demo_cold"]["matmul_peak_gflops_after"] = round(matmul_peak() / 1e9, 1)
        if keep_demo is not None:
            shutil.move(str(work / "repo" / "results" / "refusal_circuit"), str(keep_demo))
    shutil.rmtree(work, ignore_errors=True)
    return out


def cpu_quota() -> float | None:
    """This process's CPU-quota cgroup share of each core (``bench/throttled.sh``), or None when unthrottled."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "cpu" in controllers.split(","):  # cgroup v1
            base = Path("/sys/fs/cgroup/cpu") / path.lstrip("/")
            quota, period = (base / "cpu.cfs_quota_us"), (base / "cpu.cfs_period_us")
            text = f"{quota.read_text()} {period.read_text()}" if quota.is_file() and period.is_file() else ""
        elif controllers == "":  # cgroup v2
            limit = Path("/sys/fs/cgroup") / path.lstrip("/") / "cpu.max"
            text = limit.read_text() if limit.is_file() else ""
        else:
            continue
        parts = text.split()
        if len(parts) == 2 and parts[0] not in ("max", "-1"):
            return round(int(parts[0]) / int(parts[1]) / os.cpu_count(), 3)
    return None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--make-test", action="store_true", help="also time `make test` on a fresh clone, cold cache")
    parser.add_argument("--demo", action="store_true", help="with --make-test: also a cold `make demo`")
    parser.add_argument("--keep-demo", type=Path, default=None, help="with --demo: move the demo's results folder here")
    parser.add_argument("--out", default=str(ROOT / "results" / "bench" / "first_contact.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    record = {"matmul_peak_gflops": round(matmul_peak() / 1e9, 1), "cpus": os.cpu_count(), "cpu_quota": cpu_quota(),
              "git": git_state(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    with tempfile.TemporaryDirectory() as cache:  # a cold catalog cache, as on a fresh machine
        record["cli"] = cli_timings(dict(os.environ, CIRCUITLAB_CACHE=cache))
    if args.make_test:
        record["fresh_clone"] = fresh_clone_runs(args.demo, Path(args.out).parent, args.keep_demo)
    record["matmul_peak_gflops_end"] = round(matmul_peak() / 1e9, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1))
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
