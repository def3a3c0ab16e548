"""The ``circuitlab`` command: list models, datasets and experiments; describe and run an experiment.

Everything that can be checked is checked before the model is loaded: the output folder (never a
user's files: see ``circuitlab.io.results``), the model name or path, the experiment's parameters (its
constructor validates them), the prompt files and splits. Errors are one line and exit 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="circuitlab: locate, verify and stress-test a model's refusal circuitry.")

_DEBUG = False
DEFAULT_N = 32  # prompts per set when --n is not given


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=code)


@app.command()
def models() -> None:
    """List the built-in model names (any local HF directory or cached HF id also works)."""
    from circuitlab.models.loading import MODEL_NAMES

    for name, text in MODEL_NAMES.items():
        typer.echo(f"{name:10s} {text}")


@app.command()
def datasets() -> None:
    """List the built-in prompt sets and whether their data package is installed."""
    from circuitlab.io import datasets as ds

    for name, info in ds.BUILTINS.items():
        try:
            n = f"{len(ds.load(name))} prompts"
        except ds.DatasetError as err:
            n = f"unavailable: {err}"
        typer.echo(f"{name:10s} {info['kind']:9s} {n}")


@app.command("list")
def list_experiments() -> None:
    """List the registered experiments."""
    from circuitlab.experiments import catalog

    for name, entry in catalog().items():
        typer.echo(f"{name:22s} {entry['description']}")


def describe_text(name: str) -> str:
    """An experiment's one-line description and every ``--set`` parameter: type, default, meaning."""
    import difflib

    from circuitlab.experiments import catalog

    entries = catalog()
    if name not in entries:
        close = difflib.get_close_matches(name, list(entries), n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(close)}?" if close else f"; known: {', '.join(entries)}"
        raise KeyError(f"no experiment named {name!r}{hint}")
    lines = [f"{name}: {entries[name]['description']}", "",
             "Parameters (circuitlab run NAME --set key=value; lists as 0,1 or [0,1]; none for None):"]
    for p in entries[name]["parameters"]:
        lines.append(f"  {p['name']:22s} {p['type']:18s} default {p['default']}")
        if p["meaning"]:
            lines.append(f"  {'':22s} {p['meaning']}")
    return "\n".join(lines)


@app.command()
def describe(name: str = typer.Argument(..., help="experiment name (see `circuitlab list`)")) -> None:
    """List an experiment's parameters with their type, default and meaning."""
    try:
        typer.echo(describe_text(name))
    except KeyError as err:
        _fail(str(err.args[0]))


_PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


@app.command(context_settings=_PASS_THROUGH, add_help_option=False)
def view(ctx: typer.Context) -> None:
    """Write (or serve) the interactive circuit explorer for a saved circuit-map / edge-attribution run.

    circuitlab view RUN_DIR, optionally with --out page.html or --serve PORT (circuitlab view --help for more)
    """
    from circuitlab.viewer.cli import main as view_main

    raise typer.Exit(view_main(list(ctx.args)))


@app.command(context_settings=_PASS_THROUGH, add_help_option=False)
def monitor(ctx: typer.Context) -> None:
    """Fit a request monitor on prompt sets and save it; apply a saved one to a file of prompts.

    circuitlab monitor fit ... | circuitlab monitor apply ...   (circuitlab monitor --help for more)
    """
    from circuitlab.monitor.cli import main as monitor_main

    raise typer.Exit(monitor_main(list(ctx.args)))


def _load_sets(harmful: str, harmless: str, split: str, n, seed: int, column):
    """Both prompt sets; a user file is used whole unless --split names a part (and says so)."""
    from circuitlab.io import datasets as ds

    sets = []
    asked = DEFAULT_N if n is None else n
    for label, source in (("harmful", harmful), ("harmless", harmless)):
        chosen = split if split != "auto" else ("train" if ds.is_builtin(source) else "all")
        full = ds.load(source, column=None if ds.is_builtin(source) else column)
        whole = ds.load(source, split=chosen, column=None if ds.is_builtin(source) else column)
        if len(whole) < asked:
            if n is not None:  # an explicit --n that cannot be met would silently unbalance the sets
                _fail(f"--n {n}: the {label} set {source} (--split {chosen}) has only {len(whole)} prompts; "
                      f"pass --n {len(whole)} or less, or another --split")
            typer.echo(f"note: {label} set {source} (--split {chosen}) has {len(whole)} prompts, fewer than the "
                       f"default --n {DEFAULT_N}: using all {len(whole)}", err=True)
        part = whole.sample(asked, seed=seed)
        if not ds.is_builtin(source) and len(part) < len(full):
            typer.echo(f"note: {label} file {source}: using {len(part)} of {len(full)} prompts "
                       f"(--split {chosen}{f', --n {n}' if n else ''}); --split all uses every prompt", err=True)
        sets.append(part)
    if sets[0].hash == sets[1].hash:
        _fail(f"the harmful and harmless sets are identical ({harmful} vs {harmless}, same content hash): every "
              "effect would be 0; give two different prompt sets")
    return sets


def _checked_experiment(name: str, sets: List[str], seed: int, batch_size):
    from circuitlab import experiments

    cls = experiments.get(name)
    params = experiments.params_from_sets(cls, sets)
    fields = set(getattr(cls, "__dataclass_fields__", {}))
    if "seed" in fields:
        params.setdefault("seed", seed)
    if batch_size is not None and "batch_size" in fields:
        params.setdefault("batch_size", batch_size)
    return cls(**params)  # constructors validate their parameters (ParameterError)


@app.command(epilog="Run `circuitlab describe NAME` for the experiment's --set parameters.")
def run(
    name: str = typer.Argument(..., help="experiment name (see `circuitlab list`)"),
    model: str = typer.Option("embedded", "--model", "-m", help="embedded, tiny, planted, a HF id (local cache) or a local dir"),
    harmful: str = typer.Option("advbench", "--harmful", help="built-in set name or a .txt/.csv/.json/.jsonl file"),
    harmless: str = typer.Option("harmless", "--harmless", help="built-in set name or a file"),
    split: str = typer.Option("auto", "--split", help="train, val, test or all; auto = train for built-in sets "
                                                      "(60/20/20 split), all for your own files"),
    n: Optional[int] = typer.Option(None, "--n", help="prompts per set (subsampled with --seed; default 32); more "
                                                      "than a set holds, or 0 or less, is refused"),
    seed: int = typer.Option(0, "--seed"),
    column: Optional[str] = typer.Option(None, "--column", help="prompt column of a csv/json/jsonl file"),
    out: Optional[Path] = typer.Option(None, "--out", help="run folder (default results/<name>); must be new, "
                                                           "empty, or a previous run with --overwrite"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a previous circuitlab run folder at --out"),
    sets: List[str] = typer.Option([], "--set", help="experiment parameter key=value (repeatable; see describe)"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 (default), bfloat16 or float16"),
    device_map: Optional[str] = typer.Option(None, "--device-map", help="auto, balanced or sequential: spread "
                                                                        "layers over the visible GPUs (accelerate)"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="prompts per forward batch"),
    ray_address: Optional[str] = typer.Option(None, "--ray", help="run the experiment's units on Ray: 'local' or a "
                                                                  "cluster address (host:port, ray://host:port, auto)"),
    workers: int = typer.Option(1, "--workers", help="with --ray: workers, each holding a model replica (one GPU "
                                                     "each where the cluster has GPUs)"),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="with --ray: keep the run's manifest here "
                                                                         "(finished units sit in the store's unit "
                                                                         "cache); a rerun resumes from them"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks instead of one-line errors"),
) -> None:
    """Run experiment NAME on a model and two prompt sets; save its run folder."""
    global _DEBUG
    _DEBUG = debug
    from circuitlab.io import datasets as ds
    from circuitlab import experiments
    from circuitlab.models.loading import check_model_name, load_model
    from circuitlab.io.results import OutputError, check_output_dir, check_writable
    from circuitlab.io.store import ActivationStore, StoreNotWritableError

    if split not in ds.SPLIT_CHOICES + ("auto",):
        _fail(f"--split {split!r} is not one of auto, {', '.join(ds.SPLIT_CHOICES)}")
    if n is not None and n < 1:
        _fail("--n must be at least 1")
    if batch_size is not None and batch_size < 1:
        _fail("--batch-size must be at least 1")
    if dtype is not None and dtype not in ("float32", "bfloat16", "float16"):
        _fail(f"--dtype {dtype!r} is not one of float32, bfloat16, float16")
    if workers < 1:
        _fail("--workers must be at least 1")
    if ray_address is None and (workers != 1 or checkpoint is not None):
        _fail("--workers and --checkpoint need --ray local or --ray ADDRESS")
    if ray_address and device_map:
        _fail("--device-map cannot be combined with --ray: each worker holds a whole model")
    directory = out or Path("results") / name
    try:
        experiment = _checked_experiment(name, sets, seed, batch_size)
        check_output_dir(directory, overwrite)
        if checkpoint is not None:
            check_writable(checkpoint, "--checkpoint")  # before the model loads, not after
        check_model_name(model)
        harmful_set, harmless_set = _load_sets(harmful, harmless, split, n, seed, column)
    except KeyError as err:
        _fail(str(err.args[0]))
    except (ValueError, TypeError) as err:  # ParameterError, OutputError, DatasetError, bad model names
        _fail(str(err))
    try:
        loaded = load_model(model, device=device, dtype=dtype, device_map=device_map)
    except (ValueError, RuntimeError) as err:  # unreadable weights, a dtype the device cannot run
        _fail(str(err))
    typer.echo(f"running {name} on {loaded.name}: {len(harmful_set)} harmful vs {len(harmless_set)} harmless prompts")
    try:
        if ray_address:
            from circuitlab.distributed import run_distributed
            result = run_distributed(experiment, model, harmful_set, harmless_set, workers=workers,
                                     address=ray_address, device=device, dtype=dtype, store=ActivationStore(),
                                     checkpoint_dir=checkpoint, model=loaded)
        else:
            result = experiment.run(loaded, harmful_set, harmless_set, store=ActivationStore())
    except (ValueError, StoreNotWritableError) as err:  # found only with the data, the model or the store
        _fail(f"{name}: {err}")
    result.config["load"] = {"model": model, "device": device, "dtype": dtype, "device_map": device_map,
                             "batch_size": batch_size, "ray": ray_address, "workers": workers}
    try:
        saved = result.save(directory, overwrite=overwrite)
    except OutputError as err:  # the folder changed while the run computed
        _fail(str(err))
    typer.echo(f"saved {saved}")
    for key, value in result.summary.items():
        typer.echo(f"  {key}: {value}")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) >= 3 and argv[0] == "run" and ("--help" in argv or "-h" in argv):
        from circuitlab.experiments import catalog
        if argv[1] in catalog():  # `run NAME --help` also lists NAME's parameters
            typer.echo(describe_text(argv[1]) + "\n")
    try:
        rc = app(argv, standalone_mode=False)  # click returns an Exit's code instead of raising it
        sys.exit(rc if isinstance(rc, int) else 0)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except typer.Exit as err:
        sys.exit(err.exit_code)
    except Exception as err:  # noqa: BLE001 - the one place that turns any failure into a one-line answer
        if isinstance(err, typer.BadParameter):  # typer's own click: name the option in one line
            param = getattr(err, "param", None)
            name = (getattr(param, "opts", None) or [getattr(err, "param_hint", None) or "argument"])[0]
            typer.secho(f"error: {name}: {err.format_message()}", fg=typer.colors.RED, err=True)
            sys.exit(2)
        if isinstance(err, typer.TyperException) and hasattr(err, "show"):  # usage errors: click's own text
            err.show()
            sys.exit(getattr(err, "exit_code", 2))
        if isinstance(err, typer.Abort):
            sys.exit(1)
        if _DEBUG or "--debug" in argv:
            raise
        typer.secho(f"error: {type(err).__name__}: {err} (rerun with --debug for the traceback)",
                    fg=typer.colors.RED, err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
