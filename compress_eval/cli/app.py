"""The ``compress-eval`` command: a thin Typer layer over the library, one module per command."""

from __future__ import annotations

import importlib
import pkgutil
import signal
import sys

import typer
from typer.core import TyperGroup
from typer.exceptions import TyperException
from transformers.utils import logging as hf_logging

import compress_eval.cli as cli_package

# Our own progress bars say what is happening; transformers' per-load bars only add noise.
hf_logging.disable_progress_bar()



class OneLineErrors(TyperGroup):
    """Usage errors (a bad flag value, a missing argument) as one ``error: ...`` line and exit 2, as
    our own errors are, instead of click's usage block."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except TyperException as exc:  # typer's click exceptions: usage errors
            if type(exc).__name__ == "NoArgsIsHelpError":  # bare `compress-eval`: the help
                exc.show()
            else:
                message = "; ".join(line.strip() for line in exc.format_message().splitlines() if line.strip())
                typer.echo(f"error: {message} (see --help)", err=True)
            sys.exit(exc.exit_code)
        except typer.Abort:
            typer.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(cls=OneLineErrors, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compress a Hugging Face causal LM and evaluate it with lm-evaluation-harness.")
# Every module of compress_eval.cli with a register(app) function adds its command(s).
for info in sorted(pkgutil.iter_modules(cli_package.__path__), key=lambda i: i.name):
    module = importlib.import_module(f"{cli_package.__name__}.{info.name}")
    if hasattr(module, "register"):
        module.register(app)


def exit_on_sigterm() -> None:
    """SIGTERM (what `timeout`, `kill` and job schedulers send) unwinds like Ctrl-C: cleanup code
    runs (a half-written output directory is removed) and the exit code is 128 + 15 = 143."""

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def main() -> None:
    exit_on_sigterm()
    app()
