"""``python -m compress_eval`` is the ``compress-eval`` command."""

from compress_eval.cli.app import main

main()
