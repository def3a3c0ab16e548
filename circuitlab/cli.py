"""The ``circuitlab`` command: list models, datasets and experiments; run an experiment."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="circuitlab: locate, verify and stress-test a model's refusal circuitry.")


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


@app.command()
def models() -> None:
    """List the built-in model names (any local HF directory or cached HF id also works)."""
    from .loading import MODEL_NAMES

    for name, text in MODEL_NAMES.items():
        typer.echo(f"{name:10s} {text}")


@app.command()
def datasets() -> None:
    """List the built-in prompt sets and whether their data package is installed."""
    from . import datasets as ds

    for name, info in ds.BUILTINS.items():
        try:
            n = f"{len(ds.load(name))} prompts"
        except ds.DatasetError as err:
            n = f"unavailable: {err}"
        typer.echo(f"{name:10s} {info['kind']:9s} {n}")


@app.command("list")
def list_experiments() -> None:
    """List the registered experiments."""
    from . import experiments

    for name in experiments.names():
        typer.echo(f"{name:22s} {experiments.describe(name)}")


def _parse_sets(pairs: List[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            _fail(f"--set expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key.strip()] = value.strip()
    return out


@app.command()
def run(
    name: str = typer.Argument(..., help="experiment name (see `circuitlab list`)"),
    model: str = typer.Option("embedded", "--model", "-m", help="embedded, tiny, a HF id or a local dir"),
    harmful: str = typer.Option("advbench", "--harmful", help="built-in set name or a .txt/.csv/.json/.jsonl file"),
    harmless: str = typer.Option("harmless", "--harmless", help="built-in set name or a file"),
    split: Optional[str] = typer.Option("train", "--split", help="train, val, test, or 'all'"),
    n: Optional[int] = typer.Option(32, "--n", help="prompts per set (subsampled with --seed)"),
    seed: int = typer.Option(0, "--seed"),
    out: Optional[Path] = typer.Option(None, "--out", help="run directory (default results/<name>)"),
    sets: List[str] = typer.Option([], "--set", help="experiment parameter key=value (repeatable)"),
) -> None:
    """Run experiment NAME on a model and two prompt sets; save its run directory."""
    from . import datasets as ds
    from . import experiments
    from .store import ActivationStore

    try:
        cls = experiments.get(name)
    except KeyError as err:
        _fail(str(err.args[0]))
    if n is not None and n < 1:
        _fail("--n must be at least 1")
    try:
        params = experiments.coerce_params(cls, _parse_sets(sets))
        if "seed" in {f for f in getattr(cls, "__dataclass_fields__", {})}:
            params.setdefault("seed", seed)
        experiment = cls(**params)
    except (ValueError, TypeError) as err:
        _fail(str(err))
    chosen_split = None if split in (None, "all") else split
    try:
        harmful_set = ds.load(harmful, split=chosen_split, n=n, seed=seed)
        harmless_set = ds.load(harmless, split=chosen_split, n=n, seed=seed)
    except ds.DatasetError as err:
        _fail(str(err))
    from .loading import load_model

    try:
        loaded = load_model(model)
    except (ValueError, RuntimeError) as err:
        _fail(str(err))
    typer.echo(f"running {name} on {loaded.name}: {len(harmful_set)} harmful vs {len(harmless_set)} harmless prompts")
    try:
        result = experiment.run(loaded, harmful_set, harmless_set, store=ActivationStore())
    except ValueError as err:  # bad parameter combinations surface here, after the data is known
        _fail(f"{name}: {err}")
    directory = result.save(out or Path("results") / name)
    typer.echo(f"saved {directory}")
    for key, value in result.summary.items():
        typer.echo(f"  {key}: {value}")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
