"""Peer benchmark: run Heretic (p-e-w/heretic, ``heretic-llm``) on circuitlab's model and prompts.

Heretic is AGPL-3.0 and is never imported here: it runs as a subprocess from its own virtualenv,
``bench/peers/.venv-heretic`` (created on first use: CPU torch first, then ``heretic-llm`` pinned).
It runs offline: prompts are plain-text files (Heretic reads a local ``.txt`` as one prompt per
line, no ``datasets`` download) and the model is a local directory; ``HF_*_OFFLINE=1`` is set.

Prompt roles (circuitlab's deterministic 60/20/20 splits, ``--seed``):
  train -> Heretic's ``good_prompts``/``bad_prompts`` (refusal directions),
  val   -> Heretic's ``*_evaluation_prompts`` during the search (what each trial is scored on),
  test  -> held out: only ``--evaluate DIR`` scores on it, so the search never sees it.

    .venv/bin/python bench/peers/heretic.py --out runs/heretic --trials 2 --max-tokens 24
    .venv/bin/python bench/peers/heretic.py --out runs/heretic-eval --evaluate path/to/exported_model
    .venv/bin/python bench/peers/heretic.py --out runs/heretic --trials 60 --export /tmp/heretic_export

``--export DIR`` answers Heretic's own post-search menu (``MenuDriver``): the trial a stated rule
picks from its Pareto list, "Save the model to a local folder", merged; without it the menu, which
needs a terminal, ends the run with EOFError and exit status 1 once the search is done.

Search writes ``trials.csv`` (one row per trial: refusals, kl, Heretic's objective, Pareto flag,
seconds, abliteration parameters), ``run.json`` (Heretic's own settings, versions, timings),
``heretic.log`` (its output, time-stamped) and the Optuna journal under ``checkpoints/``.
``--evaluate`` writes ``evaluation.json``/``evaluation.csv`` (refusals and KL by Heretic's scorer;
Heretic prints KL with 4 decimals). Exit status: 0 ok, 1 Heretic failed or timed out, 2 set-up failed.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

VENV = Path(__file__).resolve().parent / ".venv-heretic"
HERETIC_VERSION = "1.4.0"
TORCH_SPEC = "torch==2.13.0"  # installed first: a bare torch requirement pulls a multi-GB CUDA build
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "NO_COLOR": "1", "COLUMNS": "200", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
PLAIN_FAMILY = ["--row-normalization", "NONE", "--no-orthogonalize-direction"]  # = circuitlab's plain family
ROLES = {"train": ("good_prompts", "bad_prompts"), "val": ("good_evaluation_prompts", "bad_evaluation_prompts")}

# Reads Heretic's Optuna journal with Optuna alone (runs in Heretic's venv, where Optuna is installed).
_DUMP_JOURNAL = r"""
import json, sys, optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
storage = JournalStorage(JournalFileBackend(sys.argv[1], lock_obj=JournalFileOpenLock(sys.argv[1])))
names = optuna.get_all_study_names(storage)
if not names:  # Heretic stopped before it created its study
    print(json.dumps({"study_attrs": {}, "trials": []}))
    sys.exit()
study = optuna.load_study(study_name=names[0], storage=storage)
iso = lambda d: d.isoformat() if d else None
print(json.dumps({"study_attrs": study.user_attrs, "trials": [
    {"number": t.number, "state": t.state.name, "values": t.values, "params": t.params, "user_attrs": t.user_attrs,
     "start": iso(t.datetime_start), "complete": iso(t.datetime_complete)} for t in study.trials]}))
"""


class Fail(Exception):
    """A failure with a one-paragraph explanation and an exit status."""

    def __init__(self, message: str, status: int = 1):
        super().__init__(message)
        self.status = status


def _venv_python() -> Path:
    return VENV / "bin" / "python"


def ensure_venv(install: bool, log: Path) -> dict:
    """Heretic's venv (created when missing and ``install``); returns the installed heretic-llm version."""
    exe = VENV / "bin" / "heretic"
    if not exe.exists():
        if not install:
            raise Fail(f"Heretic is not installed ({exe} is missing); rerun without --no-install to create it", 2)
        steps = [[sys.executable, "-m", "venv", str(VENV)],
                 [str(_venv_python()), "-m", "pip", "install", TORCH_SPEC],
                 [str(_venv_python()), "-m", "pip", "install", f"heretic-llm=={HERETIC_VERSION}"]]
        with open(log, "a", encoding="utf-8") as f:
            for cmd in steps:
                print("install:", " ".join(cmd), flush=True)
                f.write("$ " + " ".join(cmd) + "\n")
                f.flush()
                if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode != 0:
                    raise Fail(f"installing Heretic failed at: {' '.join(cmd)}\n  see {log}", 2)
    proc = subprocess.run([str(_venv_python()), "-c", "import importlib.metadata as m; print(m.version('heretic-llm'), "
                           "m.version('torch'), m.version('transformers'), m.version('optuna'))"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise Fail(f"Heretic's venv {VENV} is broken ({proc.stderr.strip()[-300:]}); delete it and rerun", 2)
    heretic, torch, transformers, optuna = proc.stdout.split()
    if heretic != HERETIC_VERSION:
        print(f"warning: heretic-llm {heretic} installed; this script was written against {HERETIC_VERSION}")
    return {"heretic-llm": heretic, "torch": torch, "transformers": transformers, "optuna": optuna}


def write_prompts(folder: Path, harmful: str, harmless: str, n: dict, seed: int) -> dict:
    """Heretic-readable prompt files (one prompt per line) for each split; returns their record."""
    from circuitlab.io import datasets

    folder.mkdir(parents=True, exist_ok=True)
    record = {}
    for kind, name in (("harmful", harmful), ("harmless", harmless)):
        for split in ("train", "val", "test"):
            ps = datasets.load(name, split=split, n=n[split], seed=seed)
            # Heretic splits its text files at line breaks: a multi-line prompt would become several.
            lines = [" ".join(p.split()) if "\n" in p or "\r" in p else p for p in ps]
            path = folder / f"{kind}_{split}.txt"
            path.write_text("\n".join(lines) + "\n", encoding="utf-8")
            record[f"{kind}_{split}"] = {"dataset": name, "split": split, "n": len(lines), "hash": ps.hash,
                                         "file": str(path), "joined_lines": sum(a != b for a, b in zip(lines, ps))}
    return record


def heretic_args(a, model: str, prompts: dict, checkpoints: Path) -> list[str]:
    """Heretic's command line; every path absolute, since Heretic runs in its own folder (a relative prompt
    file it cannot find is taken for a Hugging Face dataset name)."""
    args = [str(VENV / "bin" / "heretic"), "--model", model, "--dtypes", json.dumps([a.dtype]),
            "--device-map", "cpu", "--batch-size", str(a.batch_size), "--max-response-length", str(a.max_tokens),
            "--seed", str(a.seed), "--study-checkpoint-dir", str(Path(checkpoints).resolve())]
    if not a.auto_prefix:  # Heretic's automatic prefix check generates for 200 prompts before anything else
        args += ["--response-prefix", ""]
    if a.system_prompt is not None:
        args += ["--system-prompt", a.system_prompt]
    for split, (good, bad) in ROLES.items():
        args += [f"--{good.replace('_', '-')}.dataset", str(Path(prompts[f"harmless_{split}"]["file"]).resolve()),
                 f"--{bad.replace('_', '-')}.dataset", str(Path(prompts[f"harmful_{split}"]["file"]).resolve())]
    return args


_EVENTS = re.compile(r"(Initial refusals|Running trial|KL divergence:|Refusals:|Optimization finished|"
                     r"Chosen batch size|Prefix found|Failed|Error|error:)")


def _kill(proc: subprocess.Popen) -> None:
    """End Heretic and its children (its own process group, started by us)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass


def run_heretic(args: list[str], cwd: Path, log: Path, timeout: float | None,
                menu: "MenuDriver | None" = None) -> tuple[int, list[tuple[float, str]], bool]:
    """Run Heretic, streaming its output time-stamped into ``log``; key lines are echoed.

    Returns (return code, [(seconds, line)], timed_out). Without ``menu``, stdin is /dev/null: Heretic's
    post-search menu (prompt_toolkit, which needs a terminal) then ends the run with EOFError and exit
    status 1 after the search, which the caller tolerates. With ``menu``, Heretic's plain numbered menus
    (its notebook mode, chosen by the ``KAGGLE_KERNEL_RUN_TYPE`` variable it checks) read ``menu``'s
    answers from a pipe: pick a trial, save it, exit (exit status 0).
    """
    env = dict(os.environ, **OFFLINE_ENV)
    if menu is not None:
        env["KAGGLE_KERNEL_RUN_TYPE"] = "Interactive"  # heretic.utils.is_notebook(): input() menus, no terminal
    lines: list[tuple[float, str]] = []
    t0, finished = time.perf_counter(), False
    with open(log, "w", encoding="utf-8") as f:
        f.write("$ " + " ".join(json.dumps(x) if (" " in x or not x) else x for x in args) + "\n")
        proc = subprocess.Popen(args, cwd=cwd, env=env, stdin=subprocess.PIPE if menu else subprocess.DEVNULL,
                                stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True)
        stopped = threading.Event()

        def stop():  # Heretic can be silent for minutes while it generates: a timer, not a line check
            stopped.set()
            _kill(proc)

        timer = threading.Timer(timeout, stop) if timeout else None
        if timer:
            timer.start()
        try:
            for raw in proc.stdout:
                t = time.perf_counter() - t0
                line = raw.rstrip("\n")
                lines.append((t, line))
                f.write(f"[{t:8.1f}s] {line}\n")
                f.flush()
                # not echoed: an offline notice (a bitsandbytes CPU kernel not fetched) and the menu's EOFError
                quiet = "kernels-community" in line or finished
                if _EVENTS.search(line) and not line.startswith(("│", "╭", "╰")) and not quiet:
                    print(f"  [{t:7.1f}s] {line.strip()}", flush=True)
                finished = finished or "Optimization finished" in line
                answer = menu.answer(line) if menu is not None else None
                if answer is not None and proc.stdin and not proc.stdin.closed:
                    f.write(f"[{t:8.1f}s] >>> {answer}\n")
                    proc.stdin.write(answer + "\n")
                    proc.stdin.flush()
                    if menu.done:
                        proc.stdin.close()
        except KeyboardInterrupt:
            _kill(proc)
            raise
        finally:
            if timer:
                timer.cancel()
        rc = proc.wait()
        timed_out = stopped.is_set()
    return rc, lines, timed_out


_MENU_TRIAL = re.compile(r"\[(\d+)\] \[Trial\s+(\d+)\] Refusals:\s*(\d+)/(\d+), KL divergence: ([0-9.eE+-]+)")
_MENU_ITEM = re.compile(r"\[(\d+)\] (Exit program|Save the model to a local folder|Return to the trial selection menu)")


class MenuDriver:
    """Answers Heretic 1.4.0's post-search menus (notebook mode: numbered lines, then ``input()``).

    Trial menu: the Pareto trials Heretic lists (``[i] [Trial N] Refusals: r/n, KL divergence: x``, val
    numbers); the choice is a stated rule standing in for the user: the fewest refusals among the listed
    trials with KL <= ``max_kl`` (Heretic's menu warns that KL above 0.5 usually means real damage), or
    the lowest-KL trial when none is that close. Then "Save the model to a local folder" at ``export``
    (``--export-strategy merge``: the merged full model), back to the trial menu, and "Exit program".
    """

    def __init__(self, export: Path, max_kl: float = 0.5):
        self.export, self.max_kl = Path(export), max_kl
        self.listed: list[dict] = []
        self.chosen: dict | None = None
        self.state, self.done, self.saved = "pick", False, False

    def answer(self, line: str) -> str | None:
        trial = _MENU_TRIAL.search(line)
        if trial and self.state == "pick":
            i, n, r, nb, kl = trial.groups()
            self.listed.append({"choice": int(i), "trial": int(n), "refusals": int(r), "n_harmful": int(nb),
                                "kl": float(kl)})
            return None
        item = _MENU_ITEM.search(line)
        if "Model saved to" in line:
            self.saved = True
            return None
        if not item:
            return None
        number, label = item.groups()
        if label == "Exit program" and self.state == "pick" and self.listed:
            close = [t for t in self.listed if t["kl"] <= self.max_kl]
            self.chosen = (min(close, key=lambda t: (t["refusals"], t["kl"])) if close
                           else min(self.listed, key=lambda t: t["kl"]))
            self.state = "act"
            return str(self.chosen["choice"])
        if label == "Save the model to a local folder" and self.state == "act":
            self.state = "saving"
            return f"{number}\n{self.export}"  # the choice, then the folder Heretic asks for
        if label == "Return to the trial selection menu" and self.state == "saving" and self.saved:
            self.state = "exit"
            return number
        if label == "Exit program" and self.state == "exit":
            self.done = True
            return number
        return None

    def record(self) -> dict:
        return {"rule": f"fewest val refusals among Heretic's listed Pareto trials with val KL <= {self.max_kl} "
                        "(else the lowest KL)", "listed": self.listed, "chosen": self.chosen,
                "export": str(self.export), "saved": self.saved}


def _tail(lines: list[tuple[float, str]], k: int = 15) -> str:
    keep = [ln for _, ln in lines if ln.strip() and not ln.startswith(("│", "╭", "╰"))]
    return "\n".join("    " + ln for ln in keep[-k:])


def read_journal(journal: Path) -> dict:
    proc = subprocess.run([str(_venv_python()), "-c", _DUMP_JOURNAL, str(journal)], capture_output=True, text=True,
                          env=dict(os.environ, **OFFLINE_ENV))
    if proc.returncode != 0:
        raise Fail(f"could not read Heretic's study journal {journal}: {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout)


def trials_table(journal: dict) -> list[dict]:
    from datetime import datetime

    from circuitlab.methods.heretic_scoring import pareto_front

    rows = []
    for t in journal["trials"]:
        ua = t["user_attrs"]
        row = {"trial": ua.get("index", t["number"] + 1), "state": t["state"], "refusals": ua.get("refusals"),
               "n_harmful": ua.get("n_bad_prompts"), "base_refusals": ua.get("base_refusals"),
               "kl": ua.get("kl_divergence"), "objective_kl": None, "objective_refusals": None, "pareto": False,
               "seconds": None, "direction_scope": t["params"].get("direction_scope"),
               "direction_index": ua.get("direction_index")}
        if t["values"]:
            row["objective_kl"], row["objective_refusals"] = t["values"]
        if t["start"] and t["complete"]:
            row["seconds"] = round((datetime.fromisoformat(t["complete"]) - datetime.fromisoformat(t["start"]))
                                   .total_seconds(), 1)
        for component, params in sorted(ua.get("parameters", {}).items()):
            for key, value in params.items():
                row[f"{component}.{key}"] = value
        rows.append(row)
    done = [r for r in rows if r["state"] == "COMPLETE"]
    for i in pareto_front([r["refusals"] for r in done], [r["kl"] for r in done]):
        done[i]["pareto"] = True
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def search(a, model: str, out: Path, prompts: dict, versions: dict) -> int:
    checkpoints = out / "checkpoints"
    if checkpoints.exists():  # an old journal would make Heretic ask (on a terminal) whether to resume
        print(f"removing the previous study journal in {checkpoints}")
        shutil.rmtree(checkpoints)
    args = heretic_args(a, model, prompts, checkpoints) + ["--n-trials", str(a.trials)]
    if a.startup_trials is not None:
        args += ["--n-startup-trials", str(a.startup_trials)]
    if a.plain_family:
        args += PLAIN_FAMILY
    menu = None
    if a.export:
        menu = MenuDriver(check_export_dir(a.export), a.choose_max_kl)
        args += ["--export-strategy", "merge"]
    print(f"running Heretic {versions['heretic-llm']}: {a.trials} trial(s), {a.max_tokens} new tokens, "
          f"log: {out / 'heretic.log'}")
    from circuitlab.io.provenance import matmul_peak

    peak = matmul_peak()
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    rc, lines, timed_out = run_heretic(args, out, out / "heretic.log", a.timeout, menu)
    total = time.perf_counter() - t0
    journals = sorted(checkpoints.glob("*.jsonl"))
    finished = any("Optimization finished" in ln for _, ln in lines)
    rows, journal = [], {"study_attrs": {}, "trials": []}
    if journals:
        journal = read_journal(journals[0])
        rows = trials_table(journal)
    if rows:
        write_csv(out / "trials.csv", rows)
    first_trial = next((t for t, ln in lines if "Running trial" in ln), None)
    seconds = [r["seconds"] for r in rows if r["seconds"] is not None]
    run = {"mode": "search", "model": model, "versions": versions, "argv": args, "return_code": rc,
           "finished": finished, "timed_out": timed_out, "total_s": round(total, 1), "cpus": os.cpu_count(),
           "load_avg_1min": {"start": load0, "end": os.getloadavg()[0]}, "matmul_peak_flops": peak,
           "family": "plain (row normalization none, direction not orthogonalized)" if a.plain_family
           else "Heretic's defaults", "n_trials": a.trials, "n_startup_trials": a.startup_trials,
           "menu": menu.record() if menu else None,
           "startup_s": round(first_trial, 1) if first_trial is not None else None, "trial_s": seconds,
           "heretic_settings": json.loads(journal["study_attrs"].get("settings", "null")), "prompts": prompts}
    (out / "run.json").write_text(json.dumps(run, indent=2), encoding="utf-8")
    if not finished:
        why = "timed out" if timed_out else f"exited with status {rc}"
        raise Fail(f"Heretic {why} after {len([r for r in rows if r['state'] == 'COMPLETE'])} complete trial(s); "
                   f"last output:\n{_tail(lines)}\n  full log: {out / 'heretic.log'}")
    if menu is not None and not menu.saved:
        raise Fail(f"Heretic finished its search but did not save a model (menu answers: {menu.record()});"
                   f"\n  last output:\n{_tail(lines)}\n  full log: {out / 'heretic.log'}")
    done = [r for r in rows if r["state"] == "COMPLETE"]
    print(f"done in {total:.0f} s (start-up {run['startup_s']} s, per trial {seconds} s); "
          f"{len(done)} trial(s) -> {out / 'trials.csv'}")
    for r in done:
        print(f"  trial {r['trial']}: refusals {r['refusals']}/{r['n_harmful']} (base {r['base_refusals']}), "
              f"KL {r['kl']:.4f}{'  pareto' if r['pareto'] else ''}")
    return 0


def check_export_dir(path) -> Path:
    """The folder Heretic saves its chosen model to: outside this repository (weights are never committed)."""
    folder = Path(path).resolve()
    if folder == ROOT or ROOT in folder.parents:
        raise Fail(f"--export {path} lies inside the repository {ROOT}; save model weights outside it", 2)
    if folder.exists() and any(folder.iterdir()):
        raise Fail(f"--export {path} exists and is not empty; give a new folder", 2)
    return folder


_NUM = r"([0-9.eE+-]+|nan|inf)"


def evaluate(a, model: str, out: Path, prompts: dict, versions: dict) -> int:
    target = str(Path(a.evaluate).resolve())
    if not Path(target).is_dir():
        raise Fail(f"--evaluate {a.evaluate}: not a model directory", 2)
    split_prompts = dict(prompts)
    # Heretic's evaluation prompts are its *_evaluation_prompts: point them at the chosen held-out split.
    split_prompts["harmful_val"], split_prompts["harmless_val"] = (prompts[f"harmful_{a.eval_split}"],
                                                                   prompts[f"harmless_{a.eval_split}"])
    checkpoints = out / "eval-checkpoints"
    args = heretic_args(a, model, split_prompts, checkpoints) + ["--evaluate-model", target]
    print(f"scoring {target} with Heretic {versions['heretic-llm']} on the {a.eval_split} split, "
          f"log: {out / 'heretic.log'}")
    t0 = time.perf_counter()
    rc, lines, timed_out = run_heretic(args, out, out / "heretic.log", a.timeout)
    text = "\n".join(ln for _, ln in lines)
    base = re.search(r"Initial refusals: (\d+)/(\d+)", text)
    kl = re.findall(r"KL divergence: " + _NUM, text)
    ref = re.findall(r"\* Refusals: (\d+)/(\d+)", text)
    if rc != 0 or timed_out or not (base and kl and ref):
        why = "timed out" if timed_out else f"exited with status {rc}" if rc else "printed no score"
        raise Fail(f"Heretic {why}; last output:\n{_tail(lines)}\n  full log: {out / 'heretic.log'}")
    result = {"model": target, "base_model": model, "split": a.eval_split, "refusals": int(ref[-1][0]),
              "n_harmful": int(ref[-1][1]), "base_refusals": int(base.group(1)), "kl": float(kl[-1]),
              "kl_decimals": 4, "n_harmless": prompts[f"harmless_{a.eval_split}"]["n"],
              "max_tokens": a.max_tokens, "seconds": round(time.perf_counter() - t0, 1)}
    (out / "evaluation.json").write_text(json.dumps({**result, "versions": versions, "argv": args,
                                                     "prompts": prompts}, indent=2), encoding="utf-8")
    write_csv(out / "evaluation.csv", [result])
    print(f"refusals {result['refusals']}/{result['n_harmful']} (base {result['base_refusals']}), "
          f"KL {result['kl']:.4f} -> {out / 'evaluation.csv'}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--evaluate", metavar="DIR", help="score this exported model directory instead of searching")
    p.add_argument("--eval-split", choices=("test", "val"), default="test", help="prompts --evaluate scores on")
    p.add_argument("--model", help="base model: a local HF directory (default: circuitlab's embedded model)")
    p.add_argument("--trials", type=int, default=2, help="Heretic --n-trials (its default is 200)")
    p.add_argument("--startup-trials", type=int, help="Heretic --n-startup-trials (its default is 60)")
    p.add_argument("--plain-family", action="store_true",
                   help="--row-normalization NONE --no-orthogonalize-direction (default: Heretic's own defaults)")
    p.add_argument("--export", metavar="DIR", help="after the search, save Heretic's chosen trial here (merged "
                   "full model, via its own menu); must lie outside the repository")
    p.add_argument("--choose-max-kl", type=float, default=0.5,
                   help="--export's choice: fewest val refusals among Heretic's Pareto trials with KL <= this")
    p.add_argument("--max-tokens", type=int, default=24, help="Heretic --max-response-length (its default is 100)")
    p.add_argument("--batch-size", type=int, default=16, help="Heretic --batch-size (0: its automatic search)")
    p.add_argument("--harmful", default="advbench", help="circuitlab prompt set or file (harmful)")
    p.add_argument("--harmless", default="harmless", help="circuitlab prompt set or file (harmless)")
    p.add_argument("--n-train", type=int, default=16, help="prompts of each kind for the refusal directions")
    p.add_argument("--n-val", type=int, default=16, help="prompts of each kind scoring each search trial")
    p.add_argument("--n-test", type=int, default=16, help="held-out prompts of each kind for --evaluate")
    p.add_argument("--seed", type=int, default=0, help="split/sample seed and Heretic --seed")
    p.add_argument("--dtype", default="float32", help="Heretic --dtypes (one dtype)")
    p.add_argument("--system-prompt", help="Heretic --system-prompt (its default: 'You are a helpful assistant.')")
    p.add_argument("--auto-prefix", action="store_true", help="let Heretic detect a common response prefix")
    p.add_argument("--timeout", type=float, help="stop Heretic after this many seconds")
    p.add_argument("--no-install", action="store_true", help="fail instead of creating Heretic's venv")
    a = p.parse_args(argv)
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    try:
        versions = ensure_venv(not a.no_install, out / "install.log")
        if a.model:
            model = str(Path(a.model).resolve())
        else:
            from circuitlab.models.embedded import embedded_model_dir
            model = str(embedded_model_dir())
        if not Path(model).is_dir():
            raise Fail(f"model {model} is not a local directory (Heretic runs offline here)", 2)
        from circuitlab.io.datasets import DatasetError
        try:
            prompts = write_prompts(out / "prompts", a.harmful, a.harmless,
                                    {"train": a.n_train, "val": a.n_val, "test": a.n_test}, a.seed)
        except DatasetError as err:
            raise Fail(f"prompts: {err}", 2) from None
        return (evaluate if a.evaluate else search)(a, model, out, prompts, versions)
    except Fail as err:
        print(f"heretic peer benchmark: {err}", file=sys.stderr)
        return err.status
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
