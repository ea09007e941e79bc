"""What every CLI module shares: error handling (one line per problem, non-zero exit) and common options.
A module of its own so that command modules (cli.py, k8s/commands.py, ...) import it without cycles."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import click

from .errors import AlignfakeError, SpecError


def fail(e: AlignfakeError) -> None:
    if isinstance(e, SpecError):
        for p in e.problems:
            click.echo(f"{e.source}: {p}", err=True)
    else:
        click.echo(f"error: {e}", err=True)
    sys.exit(e.exit_code)


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except AlignfakeError as e:
            fail(e)

    return wrapper


set_option = click.option(
    "--set", "overrides", multiple=True, metavar="KEY=VALUE",
    help="Override a spec field, e.g. --set spec.evaluation.queries.limit=10 (repeatable; value is YAML).",
)
output_option = click.option(
    "--output", "-o", "output", type=click.Choice(["table", "json"]), default="table", show_default=True,
    help="Output format (json for scripts).",
)


def load(file: str, overrides: tuple[str, ...]) -> Any:
    from .spec import load_experiment

    return load_experiment(file, list(overrides))
