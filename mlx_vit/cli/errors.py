"""The one place a library error becomes its one line on stderr and exit code 1 (with --debug, a traceback)."""

from __future__ import annotations

import contextlib
import errno
import io
import os
import sys

import typer
from typer.core import TyperGroup

from mlx_vit.errors import MlxVitError, line
from mlx_vit.files import os_reason

state = {"debug": False}


def fail(message: str) -> None:
    typer.echo(line(f"error: {message}"), err=True)


@contextlib.contextmanager
def one_line_errors():
    """A user error raised inside becomes its one line on stderr (and any notes added to it, a line each), then
    exit code 1; with --debug it goes on as a traceback."""
    try:
        yield
    except MlxVitError as error:
        if state["debug"]:
            raise
        fail(str(error))
        for note in getattr(error, "__notes__", ()):  # PEP 678: what a command adds after the error's own line
            typer.echo(line(note), err=True)
        raise typer.Exit(1) from None


class OneLineErrors(TyperGroup):
    """The app's group: the command line read (an eager callback such as --version) and the command run inside
    `one_line_errors`, so a command just calls the library, and `mlx-vit` and typer's CliRunner say the same."""

    def make_context(self, *args, **kwargs):
        with one_line_errors():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx):
        with one_line_errors():
            return super().invoke(ctx)


def flushed(stream) -> bool:
    """Flush `stream` (stdout); when it cannot take the rest (a full disk, a closed pipe) say so in one line.
    False when it failed."""
    try:
        stream.flush()
        return True
    except OSError as error:
        fail(f"stdout: cannot write ({os_reason(error)})")
        silence(stream)
        return False


class ClosedStream(io.TextIOBase):
    """stdout or stderr when the shell closed it (`>&-`): a write fails as a closed descriptor's does, so that a
    command says so (or, for stderr, fails quietly) instead of a traceback from None."""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        raise OSError(errno.EBADF, "Bad file descriptor (stdout is closed)")


def silence(stream) -> None:
    """Point a failed stream at /dev/null, so that the interpreter's flush at exit fails no more."""
    with contextlib.suppress(OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())


def echo(text: str) -> None:
    """typer.echo to stdout; a write that fails is an MlxVitError naming stdout (printed as one line, as any)."""
    try:
        typer.echo(text)
    except OSError as error:
        silence(sys.stdout)
        raise MlxVitError(f"stdout: cannot write ({os_reason(error)})") from None


def print_rich(renderable) -> None:
    """A rich table (or text) on stdout, failing as `echo` does."""
    from mlx_vit.tables import console

    try:
        console().print(renderable)
    except OSError as error:
        silence(sys.stdout)
        raise MlxVitError(f"stdout: cannot write ({os_reason(error)})") from None
