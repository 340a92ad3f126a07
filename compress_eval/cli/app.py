"""The ``compress-eval`` command: a thin Typer layer over the library, one module per command."""

from __future__ import annotations

import typer
from transformers.utils import logging as hf_logging

from compress_eval.cli import compress, evaluate, models, ppl

# Our own progress bars say what is happening; transformers' per-load bars only add noise.
hf_logging.disable_progress_bar()

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compress a Hugging Face causal LM and evaluate it with lm-evaluation-harness.")
for module in (models, ppl, compress, evaluate):
    module.register(app)


def main() -> None:
    app()
