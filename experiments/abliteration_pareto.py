"""circuitlab's abliteration search against Heretic on the same train / val / test prompt files: both
Pareto fronts measured on the test prompts, with the original model and the Arditi-selected direction.

    .venv/bin/python experiments/abliteration_pareto.py                  # embedded model: hours on a CPU
    .venv/bin/python experiments/abliteration_pareto.py --model tiny --trials 3 --n-train 6 --n-val 4 \\
        --n-test 4 --no-heretic --out runs/abliteration-smoke           # smoke test, seconds

Prompts: ``bench/peers/heretic.write_prompts`` writes one file per set and split (circuitlab's
deterministic 60/20/20 splits, ``--seed``, then ``--n-*`` prompts each); circuitlab reads those same
files. Train gives the directions, val scores every trial of both searches, test is read only after
both searches are done. ``--search-only`` stops before it (the val trials, the front, the hypervolume
curves), so a search can be run to convergence (``--converge``) before the test split is read.

1. circuitlab (``abliteration-search``): one seeded study per family (``--variants``), ``--trials``
   each (``--converge SHARE``: more, until each family's val front grew by less than SHARE over its last
   20 % of trials, at most ``--max-trials``; ``cone``: rank-k refusal cones, k up to ``--max-k``);
   objectives on val: ``--refusal``
   (score: mean refusal score, default; markers: Heretic's marker count) and Heretic's first-token KL.
2. Heretic 1.4.0 (``bench/peers/heretic.py``, its own venv, ``--heretic-trials``) on the same files,
   (or ``--heretic-run FOLDER``: a finished ``bench/peers/heretic.py`` search on the same prompt files,
   checked by hash, with ``--heretic-export DIR``, the model Heretic's own menu saved for its chosen
   trial, scored as it is: no re-application), by default with
   ``--row-normalization NONE --no-orthogonalize-direction``: then its edit family is
   circuitlab's Heretic family, so each of its Pareto trials is re-applied in circuitlab with the same
   parameters (``abliteration.heretic_edits`` on circuitlab's train directions, which differ from
   Heretic's own only in the last layer, where Heretic reads the final norm's output, and in tokenisation
   details; the system prompt of circuitlab's chat template is passed to Heretic) and measured on test
   by the same scorer. ``--heretic-defaults`` keeps Heretic's own defaults (norm-preserving row
   normalisation, orthogonalised direction): its trials are then re-applied with circuitlab's
   ``heretic-defaults`` kernels (exact, where Heretic's export holds a rank-3 LoRA of the same edit).
   A missing Heretic venv skips this part with a message.
3. Original model and the Arditi et al. 2024 direction (``refusal-direction``'s selection on the same
   train/val, its orthogonalized weights): one test point each.

Test measures (``abliteration.score_model``): refusal score (calibrated refusal tokens), Heretic's
first-token KL on harmless, cross-entropy on ``--n-text`` plain texts, and with ``--judge``
Heretic-marker refusals of ``--max-tokens`` greedy tokens plus circuitlab's judge: refusal rate on
harmful and over-refusal on harmless, each with a bootstrap 95 % CI; with ``--capability N`` the
accuracy on N two-digit arithmetic questions the project generates (``capability``); with ``--benign SET``
over-refusal on ``--n-benign`` benign sensitive questions (``over_refusal_benign``). Writes
``--out`` (results/abliteration): ``fronts.csv`` (every test point: method, family, trial, val
objectives, test measures, parameters), ``pareto_test.png``, ``hypervolume.csv`` / ``.png`` (val
hypervolume after each trial, per search), ``summary.json`` (settings, prompt files and hashes,
model fingerprint, versions, timings), ``circuitlab/`` (the search's run folder: trials.csv, table.csv, config.json) and
``heretic/`` (Heretic's trials.csv, run.json, log).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.peers import heretic  # noqa: E402
from circuitlab import ActivationStore, load_model
from circuitlab.io import datasets, provenance  # noqa: E402
from circuitlab.methods import interventions as iv  # noqa: E402
from circuitlab.methods import metrics  # noqa: E402
from circuitlab.methods.abliteration import (AbliterationParams, Kernel, abliterated, heretic_edits,  # noqa: E402
    residual_directions, score_model)
from circuitlab.methods.direction_eval import last_logits_shared  # noqa: E402
from circuitlab.experiments.abliteration_search import TEST_FRONTS, AbliterationSearch, hypervolume_box  # noqa: E402
from circuitlab.experiments.base import ParameterError  # noqa: E402
from circuitlab.experiments.direction import RefusalDirection  # noqa: E402
from circuitlab.io.results import Result, check_output_dir  # noqa: E402

PLAIN_FAMILY = ["--row-normalization", "NONE", "--no-orthogonalize-direction"]  # Heretic = circuitlab's family
HERETIC_COMPONENTS = {"attn": "attn.o_proj", "mlp": "mlp.down_proj"}  # circuitlab writer -> Heretic component


def main(argv=None, model=None) -> dict:
    """Run everything; ``model``: an already loaded ``--model`` (tests pass theirs)."""
    a = parse(argv)
    start = time.time()
    out = Path(a.out)
    check_output_dir(out / "circuitlab", overwrite=True)  # a stranger's folder fails now, not after the search
    out.mkdir(parents=True, exist_ok=True)
    record = provenance.start()
    peak = provenance.matmul_peak()  # the machine-speed figure beside the wall times
    model = model if model is not None else load_model(a.model)
    store = ActivationStore(a.store) if a.store else ActivationStore()
    files = heretic.write_prompts(out / "prompts", a.harmful, a.harmless,
                                  {"train": a.n_train, "val": a.n_val, "test": a.n_test}, a.seed)
    sets = {key: datasets.load(info["file"]) for key, info in files.items()}
    h = [sets[f"harmful_{s}"] for s in ("train", "val", "test")]
    s = [sets[f"harmless_{s}"] for s in ("train", "val", "test")]
    timings = {}

    exp = search_experiment(a)
    trials = exp.search(model, h[0], s[0], h[1], s[1], store=store)
    timings["circuitlab_search_s"] = round(time.time() - start, 1)
    print(f"[{time.time() - start:.0f}s] circuitlab: {len(trials)} trials, "
          f"{int(trials.pareto_front.sum())} on the front; {exp.convergence_}", flush=True)
    if a.search_only:  # the val fronts and their convergence; the test split is not read
        front = trials[trials[f"{a.test_front}_front"]].reset_index(drop=True)
        Result(front, exp.config(model, **sets), tables={"trials": trials},
               summary={"convergence": exp.convergence_, "test": "not read (--search-only)"}).save(
            out / "circuitlab", overwrite=True)
        search = {"convergence": exp.convergence_, "n_front": len(front), "test_front": a.test_front,
                  "test": "not read (--search-only)",
                  "front": front[["variant", "study_trial", "val_refusal", "val_kl", "edits"]].to_dict("records")}
        summary = write_summary(a, out, model, files, {"search": search}, timings, record, peak, start)
        print(f"[{time.time() - start:.0f}s] wrote {out}/circuitlab, hypervolume.csv, summary.json (no test)",
              flush=True)
        return summary

    if a.no_heretic:
        heretic_trials = _skip("--no-heretic given")
    elif a.heretic_run:
        heretic_trials = reuse_heretic(a, files)
    else:
        heretic_trials = run_heretic(a, model, out, files)
    timings["heretic_s"] = round(time.time() - start - timings["circuitlab_search_s"], 1)
    arditi = None
    if not a.no_arditi:
        arditi = RefusalDirection(filter_train=a.arditi_filter != "none", filter_val=a.arditi_filter != "none",
                                  filter_by="score" if a.arditi_filter == "none" else a.arditi_filter, min_kept=8,
                                  max_new_tokens=a.max_tokens, batch_size=a.batch_size, seed=a.seed, progress=True)
        arditi.select(model, h[0], s[0], h[1], s[1], store)
    if heretic_trials is not None and a.heretic_defaults and exp.projected_ is None:  # train only
        exp.projected_ = residual_directions(model, h[0], s[0], store=store, batch_size=a.batch_size,
                                             orthogonalize=True)
    # --- the test split is read from here on ---
    front, search_summary = exp.evaluate(model, h[2], s[2])
    # saved before the other test points: the search and its test measures survive a failure after them
    Result(front, exp.config(model, **sets), tables={"trials": trials}, summary=search_summary).save(
        out / "circuitlab", overwrite=True)
    t_test = time.time()
    rows = test_points(a, model, exp, front, heretic_trials, arditi, h[2], s[2])
    timings["test_points_s"] = round(time.time() - t_test, 1)
    fronts = pd.DataFrame(rows)
    fronts.to_csv(out / "fronts.csv", index=False)
    figure(fronts, model.name).savefig(out / "pareto_test.png", dpi=150)
    heretic_part = "skipped" if heretic_trials is None else {
        "trials": len(heretic_trials), "family": "heretic defaults" if a.heretic_defaults else "plain",
        **({"run": heretic_trials.attrs.get("run")} if heretic_trials.attrs.get("run") else {})}
    parts = {"arditi": None if arditi is None else {"layer": arditi.layer_, "position": arditi.position_},
             "search": {**search_summary, "convergence": exp.convergence_}, "heretic": heretic_part}
    summary = write_summary(a, out, model, files, parts, timings, record, peak, start)
    print(f"[{time.time() - start:.0f}s] wrote {out}/fronts.csv, pareto_test.png, summary.json", flush=True)
    return summary


def write_summary(a, out: Path, model, files: dict, parts: dict, timings: dict, record, peak, start: float) -> dict:
    """``summary.json`` (arguments, model, prompt files, ``parts``, timings, provenance, versions), then the
    hypervolume table and figure; returns the summary."""
    summary = {"script": Path(__file__).name, "argv": vars(a),
               "model": {"id": model.name, "fingerprint": model.fingerprint}, "prompts": files, **parts,
               "timings": {**timings, "total_s": round(time.time() - start, 1)},
               "provenance": provenance.finish(record, model), "matmul_peak_flops": peak,
               "versions": provenance.versions()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    hypervolume_table(out, Path(a.heretic_run) if a.heretic_run else None, a.n_val)
    return summary


def search_experiment(a: argparse.Namespace) -> AbliterationSearch:
    """circuitlab's search as the arguments configure it (its constructor validates every parameter)."""
    return AbliterationSearch(variants=a.variants.split(","), n_trials=a.trials, converge=a.converge,
                              max_trials=a.max_trials, n_startup_trials=a.startup_trials,
                              refusal=a.refusal, max_new_tokens=a.max_tokens, judge=a.judge, n_text=a.n_text,
                              max_k=a.max_k, capability=a.capability, benign=a.benign, n_benign=a.n_benign,
                              batch_size=a.batch_size, seed=a.seed, journal=a.journal, test_front=a.test_front)


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="embedded", help="embedded, tiny, planted, a HF id or a local folder")
    p.add_argument("--variants", default="heretic,targeted,global",
                   help="circuitlab families, comma-separated: heretic, heretic-defaults, targeted, global, cone")
    p.add_argument("--trials", type=int, default=60, help="circuitlab trials per family (with --converge: the fewest)")
    p.add_argument("--converge", type=float, default=None, metavar="SHARE",
                   help="add trials to each family until its val hypervolume grew by less than SHARE over its last "
                        "20 %% of trials (e.g. 0.02), at most --max-trials")
    p.add_argument("--max-trials", type=int, default=None, help="with --converge: most trials per family "
                                                                "(default 4 x --trials)")
    p.add_argument("--heretic-trials", type=int, default=60, help="Heretic --n-trials")
    p.add_argument("--startup-trials", type=int, default=20, help="random start-up trials (both searches)")
    p.add_argument("--refusal", choices=("score", "markers"), default="score",
                   help="circuitlab's val refusal objective")
    p.add_argument("--judge", action="store_true", help="also count marker refusals on test (generation)")
    p.add_argument("--harmful", default="advbench")
    p.add_argument("--harmless", default="harmless")
    p.add_argument("--n-train", type=int, default=32)
    p.add_argument("--n-val", type=int, default=16)
    p.add_argument("--n-test", type=int, default=32)
    p.add_argument("--n-text", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=24, help="generated tokens (markers, Heretic responses)")
    p.add_argument("--capability", type=int, default=0, metavar="N",
                   help="also score N generated two-digit arithmetic questions on test (exact match; 0: off)")
    p.add_argument("--benign", default=None, help="test: a prompt set judged for over-refusal on benign sensitive "
                   "questions (e.g. sensitive-benign; default: none)")
    p.add_argument("--n-benign", type=int, default=16, help="prompts of --benign judged per test point")
    p.add_argument("--max-k", type=int, default=4, help="cone family: largest rank of the removed subspace")
    p.add_argument("--test-front", choices=TEST_FRONTS, default="variant",
                   help="val front measured on test: each family's own (variant) or all families' together (pareto)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--arditi-filter", choices=("score", "judge", "none"), default="score",
                   help="refusal-direction's train/val filter for the Arditi point")
    p.add_argument("--heretic-defaults", action="store_true",
                   help="Heretic with its row normalisation and direction orthogonalisation (approximate re-use)")
    p.add_argument("--heretic-timeout", type=float, default=None, help="stop Heretic after this many seconds")
    p.add_argument("--no-heretic", action="store_true", help="skip Heretic")
    p.add_argument("--heretic-run", metavar="FOLDER", help="reuse a finished bench/peers/heretic.py search folder "
                   "(same prompt files, checked by hash) instead of running Heretic; --heretic-defaults unless "
                   "its run.json says plain")
    p.add_argument("--heretic-export", metavar="DIR", help="Heretic's exported (chosen) model to score as it is, no "
                   "re-application (default: the one --heretic-run's run.json says it saved)")
    p.add_argument("--heretic-wait", type=float, default=0.0,
                   help="seconds to wait for --heretic-run's run.json to appear (a search still running)")
    p.add_argument("--heretic-reapply", choices=("pareto", "chosen", "none"), default="pareto",
                   help="Heretic trials re-applied with circuitlab's kernels and scored on test")
    p.add_argument("--no-arditi", action="store_true", help="skip the Arditi direction point")
    p.add_argument("--store", default=None, help="activation store folder (default: circuitlab's cache)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--journal", metavar="FILE", default=None,
                   help="Optuna journal of circuitlab's studies: the same command again resumes a killed search, or "
                        "with a larger --trials extends it (trials already scored are read back, not rerun)")
    p.add_argument("--search-only", action="store_true",
                   help="only the val search: trials, the --test-front front, hypervolume curves; the test split is "
                        "not read (check the fronts converged before measuring them)")
    p.add_argument("--out", default="results/abliteration")
    a = p.parse_args(argv)
    try:  # the search's own checks (families, journal folder, prompt sets): exit 2 before any work
        search_experiment(a)
    except ParameterError as err:
        p.error(str(err))
    if a.heretic_export and not Path(a.heretic_export).is_dir():  # found out before the hours of search, not after
        p.error(f"--heretic-export {a.heretic_export}: no such folder (Heretic's saved model stays where its menu "
                "saved it; without it, --heretic-reapply chosen scores the same trial re-applied)")
    return a


# ---- Heretic ---------------------------------------------------------------------------------------

def _skip(why: str) -> None:
    print(f"Heretic skipped: {why}", flush=True)
    return None


def run_heretic(a, model, out: Path, files: dict) -> pd.DataFrame | None:
    """Heretic's search on the same prompt files (its venv, a subprocess); its trials, or None if skipped."""
    if not (heretic.VENV / "bin" / "heretic").exists():
        return _skip(f"its virtualenv {heretic.VENV} is missing (create it with: .venv/bin/python "
                     "bench/peers/heretic.py --out runs/heretic --trials 1)")
    folder = out / "heretic"
    folder.mkdir(parents=True, exist_ok=True)
    try:
        versions = heretic.ensure_venv(False, folder / "install.log")
        settings = argparse.Namespace(dtype="float32", batch_size=a.batch_size, max_tokens=a.max_tokens, seed=a.seed,
                                      auto_prefix=False, system_prompt=system_prompt(model))
        argv = heretic.heretic_args(settings, model_dir(model, a, out), files, folder / "checkpoints")
        startup = min(a.startup_trials, a.heretic_trials)
        argv += ["--n-trials", str(a.heretic_trials), "--n-startup-trials", str(startup)]
        argv += [] if a.heretic_defaults else PLAIN_FAMILY
        print(f"running Heretic {versions['heretic-llm']}: {a.heretic_trials} trial(s), log {folder / 'heretic.log'}",
              flush=True)
        rc, lines, timed_out = heretic.run_heretic(argv, folder, folder / "heretic.log", a.heretic_timeout)
        journals = sorted((folder / "checkpoints").glob("*.jsonl"))
        rows = heretic.trials_table(heretic.read_journal(journals[0])) if journals else []
    except heretic.Fail as err:
        return _skip(str(err))
    (folder / "run.json").write_text(json.dumps({"argv": argv, "return_code": rc, "timed_out": timed_out,
                                                 "versions": versions}, indent=2), encoding="utf-8")
    done = [r for r in rows if r["state"] == "COMPLETE"]
    if not done:
        why = f"exit {rc}{', timed out' if timed_out else ''}"
        return _skip(f"it completed no trial ({why}); see {folder / 'heretic.log'}")
    heretic.write_csv(folder / "trials.csv", rows)
    return pd.DataFrame(done)


def reuse_heretic(a, files: dict) -> pd.DataFrame | None:
    """A finished ``bench/peers/heretic.py`` search on the same prompt files: its trials (``.attrs["run"]``:
    family, budget, timings, the menu's choice and export); ``a.heretic_defaults`` follows its family."""
    folder = Path(a.heretic_run)
    waited = time.time()
    while not (folder / "run.json").exists() and time.time() - waited < a.heretic_wait:
        time.sleep(20)
    if not (folder / "run.json").exists():
        return _skip(f"{folder / 'run.json'} does not exist (is the search still running? --heretic-wait)")
    run = json.loads((folder / "run.json").read_text(encoding="utf-8"))
    mismatched = [k for k, v in files.items() if run.get("prompts", {}).get(k, {}).get("hash") != v["hash"]]
    if mismatched:
        return _skip(f"{folder} used other prompt files ({', '.join(mismatched)} differ by hash)")
    if not (folder / "trials.csv").exists():
        return _skip(f"{folder} has no trials.csv (Heretic completed no trial)")
    a.heretic_defaults = not str(run.get("family", "")).startswith("plain")
    menu = run.get("menu") or {}
    if a.heretic_export is None and menu.get("saved"):
        if Path(menu["export"]).is_dir():
            a.heretic_export = menu["export"]
        else:  # exported models live outside the repository and may be gone: say so, score the re-applied trial
            print(f"Heretic's exported model {menu['export']} no longer exists: only its chosen trial re-applied "
                  "is scored (--heretic-reapply)", flush=True)
    trials = pd.read_csv(folder / "trials.csv")
    trials = trials[trials.state == "COMPLETE"].reset_index(drop=True)
    trials["pareto"] = trials.pareto.astype(bool)
    trials.attrs["run"] = {k: run.get(k) for k in ("family", "n_trials", "n_startup_trials", "total_s", "startup_s",
                                                   "load_avg_1min", "matmul_peak_flops", "return_code", "versions")}
    trials.attrs["run"].update(folder=str(folder), chosen=menu.get("chosen"), choice_rule=menu.get("rule"))
    print(f"Heretic: reusing {folder} ({len(trials)} trials, {run.get('family')})", flush=True)
    return trials


def model_dir(model, a, out: Path) -> str:
    """A local HF folder of the base model for Heretic: the embedded model's float weights, the given
    folder, or an export of the loaded model."""
    if a.model == "embedded":
        from circuitlab.models.embedded import embedded_model_dir

        return str(embedded_model_dir())
    if Path(a.model).is_dir():
        return str(Path(a.model).resolve())
    return str(iv.export_hf(model, out / "base_model"))


def system_prompt(model) -> str | None:
    """The system prompt circuitlab's chat formatting puts in (Qwen-style templates), so Heretic sees
    the same text; None (Heretic's default) when the template shows none."""
    found = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", model.format("x"), re.S)
    return found.group(1) if found else None


def heretic_params(row) -> AbliterationParams:
    """A Heretic trial's parameters as circuitlab's family (Heretic's components renamed)."""
    kernels = {w: Kernel(**{k: float(row[f"{c}.{k}"]) for k in Kernel.__dataclass_fields__})
               for w, c in HERETIC_COMPONENTS.items()}
    index = row.get("direction_index")
    return AbliterationParams(direction_index=None if index is None or pd.isna(index) else float(index), **kernels)


# ---- test points -----------------------------------------------------------------------------------

def test_points(a, model, exp, front, heretic_trials, arditi, h_test, s_test) -> list[dict]:
    """Every point of the figure, measured on the test split by the same scorer."""
    plain = datasets.optional_prompts("plaintext", a.n_text, a.seed)
    base = last_logits_shared(model, list(s_test), batch_size=a.batch_size)
    kwargs = dict(markers=a.judge, judge=a.judge, max_new_tokens=a.max_tokens, plaintext=plain,
                  batch_size=a.batch_size, seed=a.seed, capability=a.capability,
                  benign=datasets.optional_prompts(a.benign, a.n_benign, a.seed))
    rows = []
    for r in front.to_dict("records"):
        method = "original" if r["variant"] == "original" else "circuitlab"
        rows.append({"method": method, **r})
    if arditi is not None:
        with iv.orthogonalized(model, arditi.direction_):
            scores = score_model(model, h_test, s_test, base, **kwargs)
        rows.append({"method": "arditi", "variant": f"layer {arditi.layer_}, position {arditi.position_}",
                     **{f"test_{k}": v for k, v in scores.items()}})
    if heretic_trials is None:
        return rows
    chosen = (heretic_trials.attrs.get("run") or {}).get("chosen") or {}
    val = {r["trial"]: r for r in heretic_trials.to_dict("records")}
    if a.heretic_export:
        # Heretic's own saved model, scored as it is: no re-application, so no approximation
        t0 = time.time()
        exported = load_model(str(a.heretic_export), dtype=model.dtype)
        scores = score_model(exported, h_test, s_test, base, refusal_tokens=metrics.refusal_tokens(model), **kwargs)
        del exported
        r = val.get(chosen.get("trial"), {})
        rows.append({"method": "heretic", "variant": "heretic (exported)", "trial": chosen.get("trial"),
                     "exported": True, "same_family": True, "heretic_val_refusals": r.get("refusals"),
                     "heretic_val_kl": r.get("kl"), "seconds": round(time.time() - t0, 1),
                     **{f"test_{k}": v for k, v in scores.items()}})
        print(f"Heretic's exported trial {chosen.get('trial')} on test: {scores}", flush=True)
    picked = {"pareto": heretic_trials[heretic_trials.pareto], "none": heretic_trials.iloc[:0],
              "chosen": heretic_trials[heretic_trials.trial == chosen.get("trial")]}[a.heretic_reapply]
    # Heretic's defaults: circuitlab's exact projected / norm-preserving kernels on its own train directions
    directions = exp.projected_ if a.heretic_defaults else exp.directions_
    for r in picked.to_dict("records"):
        t0 = time.time()
        with abliterated(model, heretic_edits(model, directions, heretic_params(r), norm_preserving=a.heretic_defaults)):
            scores = score_model(model, h_test, s_test, base, **kwargs)
        rows.append({"method": "heretic", "variant": "heretic (re-applied)" if a.heretic_defaults else "heretic",
                     "trial": r["trial"], "exported": False, "same_family": True,
                     "heretic_val_refusals": r["refusals"], "heretic_val_kl": r["kl"],
                     "seconds": round(time.time() - t0, 1), **{f"test_{k}": v for k, v in scores.items()}})
    return rows


def hypervolume_table(out: Path, heretic_folder: Path | None = None, n_val: int | None = None) -> pd.DataFrame:
    """Val hypervolume after each trial (``heretic_scoring.hypervolume``) of every circuitlab family
    (``circuitlab/trials.csv``) and of Heretic (its ``trials.csv``); writes ``hypervolume.csv`` and
    ``hypervolume.png``. Marker counts are divided by the harmful val prompts (box: refusal fraction 1 x
    KL 1); a refusal-score objective is boxed at the unedited model's val score x KL 1, so only edits that
    lower refusal add area (a score is a log-odds, not a fraction: a box at 1 would count some edits
    that raise it and none of those between the baseline and 1)."""
    import matplotlib.pyplot as plt

    from circuitlab.methods.heretic_scoring import hypervolume_change, hypervolume_curve

    rows = []

    def add(method, variant, objective, refusal, kl, box):
        change = hypervolume_change(refusal, kl, ref=box)  # the convergence check of issue 26
        rows.extend({"method": method, "variant": variant, "objective": objective, "trials": i, "hypervolume": hv,
                     "box_refusal": box[0], "change_last_20pct": change}
                    for i, hv in enumerate(hypervolume_curve(refusal, kl, ref=box), 1))

    trials = pd.read_csv(out / "circuitlab" / "trials.csv")
    for variant, g in trials.groupby("variant", sort=False):
        g = g.sort_values("trial")
        refusal, box = hypervolume_box(g.refusal_objective.iloc[0], g.val_refusal.tolist(),
                                       g.val_baseline_refusal.iloc[0], n_val)
        add("circuitlab", variant, g.refusal_objective.iloc[0], refusal, g.val_kl.tolist(), box)
    heretic_folder = heretic_folder or out / "heretic"
    if (heretic_folder / "trials.csv").exists():
        h = pd.read_csv(heretic_folder / "trials.csv")
        h = h[h.state == "COMPLETE"].sort_values("trial")
        n_harmful = h.n_harmful if "n_harmful" in h else n_val
        add("heretic", "heretic", "markers", (h.refusals / n_harmful).tolist(), h.kl.tolist(), (1.0, 1.0))
    table = pd.DataFrame(rows)
    table.to_csv(out / "hypervolume.csv", index=False)
    objectives = list(dict.fromkeys(table.objective))  # one panel per objective: their areas are in other units
    fig, axes = plt.subplots(1, len(objectives), figsize=(6 * len(objectives), 4), squeeze=False)
    for ax, objective in zip(axes[0], objectives):
        for (method, variant), g in table[table.objective == objective].groupby(["method", "variant"]):
            ax.plot(g.trials, g.hypervolume, "s--" if method == "heretic" else "o-", ms=3,
                    label=f"{method} {variant}" if method != "heretic" else "Heretic")
        ax.set_xlabel("trials")
        ax.set_ylabel(f"val hypervolume ({'refusal fraction' if objective == 'markers' else 'refusal score'} x KL)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "hypervolume.png", dpi=150)
    return table


def figure(fronts: pd.DataFrame, model_name: str):
    """Test refusal against test KL (refusal score; marker refusals too with --judge): circuitlab's
    fronts, Heretic's front, the original model and the Arditi direction."""
    import matplotlib.pyplot as plt

    panels = [("test_refusal_score", "refusal score on harmful test prompts")]
    if "test_marker_refusals" in fronts and fronts.test_marker_refusals.notna().any():
        panels.append(("test_marker_refusals", "marker refusals on harmful test prompts (count)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.5), squeeze=False)
    for ax, (column, label) in zip(axes[0], panels):
        searched = fronts[fronts.method.isin(["circuitlab", "heretic"])]
        for (method, variant), group in searched.groupby(["method", "variant"]):
            g = group.sort_values("test_kl")
            name = (f"Heretic {variant.removeprefix('heretic').strip() or 'search'}" if method == "heretic"
                    else f"circuitlab {variant}")
            exported = method == "heretic" and "exported" in variant
            ax.plot(g.test_kl, g[column], "P" if exported else "s--" if method == "heretic" else "o-",
                    ms=11 if exported else 4, label=name)
        for method, marker, color, name in (("original", "*", "black", "original model"),
                                            ("arditi", "D", "tab:red", "Arditi direction (orthogonalized)")):
            point = fronts[fronts.method == method]
            if point.empty:  # e.g. --no-arditi: no legend entry for a point not drawn
                continue
            ax.scatter(point.test_kl, point[column], marker=marker, s=140, c=color, label=name)
        ax.set_xscale("symlog", linthresh=1e-3)
        ax.set_xlabel("first-token KL on harmless test prompts (nats)")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    fig.suptitle(f"Val Pareto fronts measured on test prompts, {model_name}", fontsize=9)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    if sys.argv[1:2] == ["--hypervolume-only"]:  # from a finished run's files: FOLDER [HERETIC_FOLDER]
        done = json.loads((Path(sys.argv[2]) / "summary.json").read_text(encoding="utf-8"))["argv"]
        hypervolume_table(Path(sys.argv[2]), Path(sys.argv[3]) if len(sys.argv) > 3 else None, done["n_val"])
    else:
        main()
