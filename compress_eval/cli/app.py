"""The ``compress-eval`` command: a thin Typer layer over the library, one module per command."""

from __future__ import annotations

import importlib
import logging
import pkgutil
import signal
import sys
from pathlib import Path

import typer
from tqdm import tqdm
from typer.core import TyperGroup
from typer.exceptions import TyperException
from transformers.utils import logging as hf_logging

import compress_eval.cli as cli_package
from compress_eval import distributed, progress
from compress_eval.cli.common import user_errors
from compress_eval.errors import UserError

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


class ConsoleHandler(logging.Handler):
    """Messages as plain lines on the current stderr (looked up per message: the test runner swaps it),
    written above any progress bar; warnings and errors say so first, as our ``error:`` lines do."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            if record.levelno >= logging.WARNING:
                text = f"{record.levelname.lower()}: {text}"
            tqdm.write(text, file=sys.stderr)
        except Exception:
            self.handleError(record)


def configure_logging(quiet: bool, log_file: Path | None) -> None:
    """Where the library's messages (the ``compress_eval`` loggers) go during one command: INFO and up
    on stderr (WARNING and up with --quiet, which also turns the progress bars off); with --log-file,
    everything from DEBUG, timestamped, appended to that file as well."""
    logger = logging.getLogger("compress_eval")
    console = ConsoleHandler(logging.WARNING if quiet else logging.INFO)
    logger.addHandler(console)
    logger.setLevel(console.level)
    progress.enabled = not quiet
    if log_file is not None:
        try:
            file = logging.FileHandler(log_file, encoding="utf-8")
        except OSError as exc:
            raise UserError(f"cannot write --log-file {log_file}: {exc.strerror or exc}") from None
        file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(file)
        logger.setLevel(logging.DEBUG)


def reset_logging() -> None:
    """Undo :func:`configure_logging` when the command ends (tests run many commands in one process)."""
    logger = logging.getLogger("compress_eval")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.setLevel(logging.NOTSET)
    progress.enabled = True


@app.callback()
@user_errors
def global_options(
    ctx: typer.Context,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="warnings and errors only: no messages, no progress "
                               "bars (results still go to stdout)"),
    log_file: Path = typer.Option(None, "--log-file", help="also append every message, from DEBUG on and "
                                  "timestamped, to this file"),
) -> None:
    """Options that come before the command: ``compress-eval --quiet run ...``."""
    ctx.call_on_close(reset_logging)
    # Data parallel: one voice, process 0's; the others say only warnings and errors.
    configure_logging(quiet or not distributed.is_main(), log_file)


def exit_on_sigterm() -> None:
    """SIGTERM (what `timeout`, `kill` and job schedulers send) unwinds like Ctrl-C: cleanup code
    runs (a half-written output directory is removed) and the exit code is 128 + 15 = 143. In a run of
    several processes torchrun sends it to the others when one of them dies, often before a collective
    has failed: that process says its one line here, as it would for the failed collective."""

    def handler(signum, frame):
        if distributed.world_size() > 1:
            typer.echo(f"error: {distributed.STOPPED_BY_LAUNCHER}", err=True)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def main() -> None:
    exit_on_sigterm()
    app()
