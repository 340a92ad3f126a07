"""The package as a user installs it: the built wheel, in a fresh virtual environment that sees the
installed dependencies (``--system-site-packages``: no second torch) but not this checkout, run from a
folder outside it on a tiny model and tiny local data: perplexity and a ``ce_`` task through
``compress-eval eval``, lm-eval's command line through ``compress-eval lm-eval``, and lm-eval's
``simple_evaluate`` after importing the plugin."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import saved_model_dir, tiny_model, write_data_dir

ROOT = Path(__file__).resolve().parents[1]
# Build outputs and run directories of the checkout stay out of the copy the wheel is built from.
NOT_SOURCES = shutil.ignore_patterns(".git", "build", "*.egg-info", "runs", "__pycache__", ".pytest_cache", ".venv",
                                     ".whl", "*.tmp-*")
PIQA = [{"goal": "How do I dry a wet towel?", "sol1": "Hang it in the sun.", "sol2": "Put it in the sea."},
        {"goal": "How do I open a jar?", "sol1": "Twist the lid.", "sol2": "Paint the lid."}]

SIMPLE_EVALUATE = """
import json, sys
import compress_eval, compress_eval.lm_eval_plugin as plugin
from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager
model = sys.argv[1]
manager = TaskManager(include_path=plugin.tasks_dir(), include_defaults=False, metadata={"pretrained": model})
out = simple_evaluate(model="compressed", model_args={"pretrained": model}, tasks=["ce_piqa"], limit=2,
                      device="cpu", task_manager=manager, bootstrap_iters=0)
print(json.dumps({"package": compress_eval.__file__, "tasks": plugin.tasks_dir(),
                  "acc": out["results"]["ce_piqa"]["acc,none"]}))
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(the virtual environment, its wheel): the wheel built from a copy of the checkout, installed alone."""
    tmp = tmp_path_factory.mktemp("wheel")
    shutil.copytree(ROOT, tmp / "src", ignore=NOT_SOURCES)
    # No build isolation: the installed setuptools builds it, so the test needs no index.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp / "dist"), str(tmp / "src")], check=True, capture_output=True)
    wheel = next((tmp / "dist").glob("compress_eval-*.whl"))
    venv = tmp / "venv"
    # --without-pip: the environment's own pip (seen through the system site) installs into it.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    subprocess.run([venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall",
                    str(wheel)], check=True, capture_output=True)
    return venv, wheel


@pytest.fixture
def user(installed, tmp_path):
    """A folder outside the checkout, a tiny model, a data directory with the corpora and two PIQA
    questions, and the environment a user's shell gives (no PYTHONPATH to the checkout)."""
    data = write_data_dir(tmp_path / "data")
    (data / "piqa").mkdir()
    (data / "piqa" / "valid.jsonl").write_text("".join(json.dumps(q) + "\n" for q in PIQA))
    (data / "piqa" / "valid-labels.lst").write_text("0\n0\n")
    model = saved_model_dir(tmp_path / "tiny", tiny_model("llama"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(COMPRESS_EVAL_DATA_DIR=str(data), COMPRESS_EVAL_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    outside = tmp_path / "elsewhere"
    outside.mkdir()

    def run(*args: str) -> subprocess.CompletedProcess:
        done = subprocess.run([str(a) for a in args], cwd=outside, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    return installed[0], model, run


def test_the_wheel_holds_the_tasks(installed):
    names = zipfile.ZipFile(installed[1]).namelist()
    shipped = {Path(n).name for n in names if n.startswith("compress_eval/_tasks/")}
    assert shipped == {p.name for p in (ROOT / "tasks").iterdir() if p.suffix in (".yaml", ".py")}
    assert "compress_eval/cli/data.py" in names and not any(n.startswith(("tasks/", "tests/")) for n in names)


@pytest.mark.slow  # three processes that each import torch and lm-eval: about 45 s on 2 cores
def test_installed_wheel_evaluates_outside_the_checkout(user):
    venv, model, run = user
    done = run(venv / "bin" / "python", "-c", SIMPLE_EVALUATE, model)
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    # The wheel's package, not this checkout (whose editable install the system site may also hold).
    assert Path(seen["package"]).is_relative_to(venv) and Path(seen["tasks"]).is_relative_to(venv), seen
    assert 0 <= seen["acc"] <= 1

    done = run(venv / "bin" / "compress-eval", "eval", model, "--tasks", "wiki,piqa", "--seqlen", "32",
               "--max-windows", "2", "--limit", "2")
    assert "wikitext2" in done.stdout and "piqa" in done.stdout, done.stdout

    done = run(venv / "bin" / "compress-eval", "lm-eval", "--model", "compressed", "--model_args",
               f"pretrained={model}", "--tasks", "ce_piqa,wikitext2_ppl", "--limit", "2", "--metadata",
               '{"seqlen": 32}', "--device", "cpu")
    assert "ce_piqa" in done.stdout and "wikitext2_ppl" in done.stdout, done.stdout
