"""The `mlx-vit` command line: one module per command, each a thin shell over one library function.

Heavy modules (mlx, PIL, huggingface_hub) are imported inside the commands so `mlx-vit --help` stays fast.
Shared options are declared once in `options.py`; commands call the library with keywords, and the app's group
(`errors.OneLineErrors`) turns any library error into its one line.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Annotated

import typer

from mlx_vit import __version__
from mlx_vit.cli import bench, classify, convert, embed, explain, search, tui
from mlx_vit.cli.errors import ClosedStream, OneLineErrors, echo, fail, flushed, silence, state
from mlx_vit.errors import line, shown
from mlx_vit.files import os_reason

app = typer.Typer(
    help="Vision Transformers on Apple's MLX: classify and embed images, search a library, see attention, convert "
    "checkpoints.",
    cls=OneLineErrors,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
for command in (classify.classify, embed.embed, search.search, explain.explain, convert.convert, tui.tui, bench.bench):
    app.command()(command)


class _OneLine(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return line(super().format(record))


def _version_line() -> str:
    import mlx.core as mx

    from mlx_vit import runtime
    from mlx_vit.blas import blas_info

    blas = blas_info()
    where = f" ({blas.path})" if blas.path else ""
    where += f", core {blas.core}" if blas.core else ""
    note = f"; {blas.note}" if blas.note else ""
    device = ", ".join(filter(None, [f"device {mx.default_device()}", runtime.decide().describe()]))
    return f"mlx-vit {__version__} (mlx {mx.__version__}, {device}, BLAS {blas.name}{where}{note})"


def _version(value: bool) -> None:
    if value:
        echo(_version_line())
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Show versions, device and BLAS."),
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks instead of one-line errors.")] = False,
) -> None:
    state["debug"] = debug
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLine("mlx-vit: %(message)s"))
    logger = logging.getLogger("mlx_vit")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if debug else logging.INFO)


def main() -> None:
    """The `mlx-vit` command: usage errors as Typer shows them, but bounded (library errors are the app's group's);
    an OSError writing stdout as one line; nothing left unflushed to fail again at exit."""
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w")  # nowhere to say anything: errors still set the exit code
    if sys.stdout is None:
        sys.stdout = ClosedStream()
    try:
        code = app(standalone_mode=False)
    except typer.TyperException as error:  # a usage error: its message may quote a value from outside whole
        from typer.rich_utils import rich_format_error

        error.message = line(error.message)
        rich_format_error(error)
        code = error.exit_code
    except (KeyboardInterrupt, typer.Abort):
        fail("interrupted")
        code = 130
    except OSError as error:  # outside the library's calls only stdout is written (help, a table): one line
        if state["debug"]:
            raise
        if error.filename is None:
            fail(f"stdout: cannot write ({os_reason(error)})")
            silence(sys.stdout)
        else:  # a library call that let one through
            fail(f"{shown(error.filename)}: {os_reason(error)}")
        code = 1
    if not flushed(sys.stdout):
        code = code or 1
    sys.exit(code or 0)
