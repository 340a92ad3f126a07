"""The ``compress-eval`` command: a thin Typer layer over the library, one module per command."""

from __future__ import annotations

import importlib
import pkgutil

import typer
from transformers.utils import logging as hf_logging

import compress_eval.cli as cli_package

# Our own progress bars say what is happening; transformers' per-load bars only add noise.
hf_logging.disable_progress_bar()

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compress a Hugging Face causal LM and evaluate it with lm-evaluation-harness.")
# Every module of compress_eval.cli with a register(app) function adds its command(s).
for info in sorted(pkgutil.iter_modules(cli_package.__path__), key=lambda i: i.name):
    module = importlib.import_module(f"{cli_package.__name__}.{info.name}")
    if hasattr(module, "register"):
        module.register(app)


def main() -> None:
    app()
