"""Compress on load inside lm-eval: `--model compressed --model_args pretrained=M,method=...` or `recipe=`."""

import functools
import json
import logging
from importlib.metadata import entry_points

import pytest
import torch
import yaml
from typer.testing import CliRunner

from compress_eval.cli.app import app
from compress_eval.errors import UserError
from compress_eval.lm_eval_plugin import CompressedLM, tasks_dir
from compress_eval.models.loading import load_checkpoint
from compress_eval.results.store import read_manifest
from conftest import one_line_error

runner = CliRunner()
SHORTGPT = "method=shortgpt,num_blocks=1,calib_samples=2,seqlen=16"


@pytest.fixture(autouse=True)
def quick(tmp_path, monkeypatch):
    """One thread (lm-eval sends one small request at a time), our own cache, and lm-eval's CLI
    indexing only our tasks (its ~15k default task files take 15 s to scan). lm-eval logs errors only
    (so an error is one line), through a handler made afresh per test: the one lm-eval's CLI installs
    writes to that CliRunner call's stream, closed once the call returns."""
    from lm_eval import tasks, utils

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("COMPRESS_EVAL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tasks, "TaskManager", functools.partial(tasks.TaskManager, include_defaults=False))
    monkeypatch.setenv("LMEVAL_LOG_LEVEL", "ERROR")
    monkeypatch.setattr(utils, "_LOGGING_CONFIGURED", False)
    lm_eval_log = logging.getLogger("lm_eval")
    monkeypatch.setattr(lm_eval_log, "handlers", [])
    monkeypatch.setattr(lm_eval_log, "propagate", lm_eval_log.propagate)
    monkeypatch.setattr(lm_eval_log, "level", lm_eval_log.level)
    yield
    torch.set_num_threads(threads)


def lm_eval_cli(model_args: str, *extra: str):
    return runner.invoke(app, ["lm-eval", "--model", "compressed", "--model_args", model_args,
                               "--tasks", "wikitext2_ppl", "--limit", "2", "--device", "cpu", *extra])


def evaluate(model_dir, **model_args):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    # The perplexity tasks tokenize with `pretrained`'s tokenizer and take their window from `seqlen`.
    manager = TaskManager(include_path=tasks_dir(), include_defaults=False,
                          metadata={"pretrained": str(model_dir), "seqlen": 16})
    return simple_evaluate(model="compressed", model_args=model_args, tasks=["wikitext2_ppl"], limit=2,
                           device="cpu", log_samples=False, task_manager=manager, bootstrap_iters=0)


def files_under(path):
    return sorted(p.relative_to(path) for p in path.rglob("*"))


def test_entry_point_names_the_model_type():
    (entry,) = [e for e in entry_points(group="lm_eval.models") if e.name == "compressed"]
    assert entry.load() is CompressedLM


def test_cli_compresses_in_memory_and_results_carry_the_recipe(tiny_model_dir, data_dir, tmp_path):
    before = files_under(tmp_path)
    result = lm_eval_cli(f"pretrained={tiny_model_dir},{SHORTGPT}", "--output_path", str(tmp_path / "lm"))
    assert result.exit_code == 0, result.output
    assert "wikitext2_ppl" in result.output
    assert [p for p in files_under(tmp_path) if p.parts[0] != "lm"] == before  # no checkpoint anywhere
    config = json.loads(next((tmp_path / "lm").rglob("results_*.json")).read_text())["config"]
    recipe = yaml.safe_load(config["compress_eval_recipe"])
    assert recipe["method"] == "shortgpt" and recipe["num_blocks"] == 1 and recipe["model"] == str(tiny_model_dir)
    summary = config["compress_eval"]
    assert summary["method"] == "shortgpt" and len(summary["removed_blocks"]) == 1 and summary["blocks_after"] == 3
    assert summary["params_after"] < summary["params_before"] and summary["compressed_on_load"]
    assert config["model_num_parameters"] == summary["params_after"]


def test_save_dir_writes_a_checkpoint_that_loads(tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "saved"
    results = evaluate(tiny_model_dir, pretrained=str(tiny_model_dir), method="shortgpt", num_blocks=1,
                       calib_samples=2, seqlen=16, save_dir=str(out))
    manifest = read_manifest(out)
    assert manifest.method == "shortgpt" and manifest.blocks_after == 3
    assert results["config"]["compress_eval"]["saved_to"] == str(out)
    model, _ = load_checkpoint(out)
    assert len(model.model.layers) == 3
    # The saved checkpoint evaluates as it did in memory, and its results carry the same recipe.
    again = evaluate(tiny_model_dir, pretrained=str(out))
    assert again["results"]["wikitext2_ppl"] == pytest.approx(results["results"]["wikitext2_ppl"])
    assert again["config"]["compress_eval_recipe"] == results["config"]["compress_eval_recipe"]
    assert not again["config"]["compress_eval"]["compressed_on_load"]


def test_recipe_with_args_overriding_it(tiny_model_dir, data_dir, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": str(tiny_model_dir), "method": "drop", "blocks": [1]}))
    results = evaluate(tiny_model_dir, recipe=str(recipe))
    assert results["config"]["compress_eval"]["removed_blocks"] == [1]
    results = evaluate(tiny_model_dir, recipe=str(recipe), blocks=[2, 3])
    assert results["config"]["compress_eval"]["removed_blocks"] == [2, 3]
    assert yaml.safe_load(results["config"]["compress_eval_recipe"])["blocks"] == [2, 3]


@pytest.mark.parametrize("args, fragment", [
    ("method=shortgp", "unknown method 'shortgp' (did you mean shortgpt"),
    ("method=shortgpt,num_blocks=1,windw=3", "invalid options for method 'shortgpt': windw"),
    ("sparsity=0.25", "sparsity= is a compression setting: add method=NAME"),
    ("method=shortgpt,sparsity=2", "sparsity must be in (0, 1)"),
])
def test_bad_compression_args_are_one_line_errors(tiny_model_dir, data_dir, args, fragment):
    one_line_error(lm_eval_cli(f"pretrained={tiny_model_dir},{args}"), fragment)


def test_existing_save_dir_fails_before_compressing(tiny_model_dir, data_dir, tmp_path):
    one_line_error(lm_eval_cli(f"pretrained={tiny_model_dir},{SHORTGPT},save_dir={tmp_path}"),
                   f"save_dir {tmp_path} already exists")
    with pytest.raises(UserError, match="save_dir= saves the model compressed on load"):
        CompressedLM(pretrained=str(tiny_model_dir), device="cpu", save_dir=str(tmp_path / "new"))
