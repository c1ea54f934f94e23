"""The one place a library error becomes its one line on stderr and exit code 1 (with --debug, a traceback)."""

from __future__ import annotations

import typer

from mlx_vit.errors import MlxVitError, shown

state = {"debug": False}


def fail(message: str) -> None:
    typer.echo(f"error: {shown(message, None)}", err=True)


def run(fn, *args, **kwargs):
    """Run a library call; a user error becomes one line on stderr and exit code 1 (--debug: traceback)."""
    try:
        return fn(*args, **kwargs)
    except MlxVitError as error:
        if state["debug"]:
            raise
        fail(str(error))
        raise typer.Exit(1) from None
