"""Which files make the package (its metadata is pyproject.toml's): ``compress_eval`` and, as
``compress_eval._tasks``, the repository's top-level ``tasks/`` (lm-eval task YAMLs and their loader),
so an installed wheel carries the tasks and a checkout (``pip install -e .``) keeps them where they are.
pyproject.toml alone cannot map one package onto another folder beside a ``find``."""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["compress_eval*"]), "compress_eval._tasks"],
      package_dir={"compress_eval._tasks": "tasks"})
