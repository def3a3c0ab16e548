"""Where a result came from, recorded when its run STARTS (code state, machine, load) and finished at its end.

A result saved later (or by a script that runs several experiments) still names the code that
produced it: the git commit read at the start, a dirty flag and, when dirty, a hash of the diff
against that commit, so two runs from different uncommitted states never look alike. The flag is
about code: changes under the repository's ``results/`` (outputs, often written by the same script
a moment earlier) do not make a tree dirty.
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch

__all__ = ["git_state", "code_state", "start", "finish", "versions", "matmul_peak"]

_PACKAGES = ("circuitlab", "torch", "transformer-lens", "transformers", "scikit-learn", "pandas", "numpy")
_REPO = Path(__file__).resolve().parents[1]  # inside the checkout, wherever git runs from


_CODE = (":/", ":(top,exclude)results/")  # pathspecs: the whole tree but its outputs


def _git(*args: str, repo: Path = _REPO) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, cwd=repo)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def git_state(repo: str | os.PathLike | None = None) -> dict:
    """``{commit, dirty, diff_sha256}`` of the source tree circuitlab is imported from, or of ``repo``
    (None outside git)."""
    where = Path(repo) if repo is not None else _REPO
    commit = _git("rev-parse", "HEAD", repo=where)
    if commit is None:
        return {"commit": None, "dirty": None, "diff_sha256": None}
    # tracked changes and untracked files both change what ran; outputs under results/ do not
    diff = ((_git("diff", "HEAD", "--", *_CODE, repo=where) or "")
            + (_git("ls-files", "--others", "--exclude-standard", "--", *_CODE, repo=where) or ""))
    return {"commit": commit.strip(), "dirty": bool(diff),
            "diff_sha256": hashlib.sha256(diff.encode()).hexdigest()[:16] if diff else None}


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in _PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


_PROCESS_CODE: dict | None = None  # the tree's state when this process ran its first experiment


def code_state() -> dict:
    """``git_state()`` taken once per process, at its first run: the code a long process (several seeds,
    hours) actually runs was imported then, whatever is committed or edited while it runs."""
    global _PROCESS_CODE
    if _PROCESS_CODE is None:
        _PROCESS_CODE = git_state()
    return dict(_PROCESS_CODE)


def start() -> dict:
    """The record taken when a run begins (its code: ``code_state``)."""
    return {**code_state(), "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "load_average_start": _load(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "_t0": time.perf_counter()}


def finish(record: dict, model=None) -> dict:
    """Complete a ``start()`` record at the run's end (wall time, load, the model's device and dtype)."""
    out = {k: v for k, v in record.items() if k != "_t0"}
    out.update(ended=datetime.now(timezone.utc).isoformat(timespec="seconds"),
               wall_seconds=round(time.perf_counter() - record["_t0"], 2), load_average_end=_load())
    if model is not None:
        out.update(device=str(getattr(model, "device", None)), dtype=str(getattr(model, "dtype", None)))
    return out


def matmul_peak(n: int = 2048, reps: int = 5) -> float:
    """Best fp32 matmul FLOP/s of this process: the machine-speed figure recorded beside wall times."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = 0.0
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t))
    return best
