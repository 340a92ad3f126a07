"""``compress-eval lm-eval ARGS...``: lm-eval's own command line, with our model type and tasks.

Everything after ``lm-eval`` goes to lm-eval unchanged (``--help`` included); the ``compressed``
model type is registered first, and our task directory is added as ``--include_path`` unless one
is given. lm-eval 0.4.13 reads no plugin entry points, so this is how it finds them.
"""

from __future__ import annotations

import sys

import typer

from compress_eval.cli.common import user_errors


def with_our_tasks(args: list[str]) -> list[str]:
    from compress_eval.lm_eval_plugin import tasks_dir

    if not args or any(a == "--include_path" or a.startswith("--include_path=") for a in args):
        return args
    return [*args, "--include_path", tasks_dir()]


@user_errors
def lm_eval_command(ctx: typer.Context) -> None:
    """Run lm-evaluation-harness with all its flags; `--model compressed` loads our checkpoints."""
    import compress_eval.lm_eval_plugin  # noqa: F401  (registers the model type)
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm-eval", *with_our_tasks(list(ctx.args))]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved


def register(app: typer.Typer) -> None:
    app.command("lm-eval", add_help_option=False, context_settings={
        "allow_extra_args": True, "ignore_unknown_options": True})(lm_eval_command)
