"""The card's own example works as typed: every method has a default amount, and `run` a default --out.

`compress-eval run llama3-8b --method merge --then-eval piqa,arc_e` runs here on a tiny model that
stands in for LLaMA-3-8B in an offline Hugging Face cache: the ordinary from_pretrained(repo id)
path, with no network.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import SHARED_DATA, saved_model_dir, tiny_model, write_data_dir

from compress_eval.config import make_config
from compress_eval.methods.registry import defaulted_amount, resolve_config
from compress_eval.models.registry import ALIASES


@pytest.mark.parametrize("method, expected", [
    ("shortgpt", {"sparsity": 0.25}), ("sleb", {"sparsity": 0.25}), ("drop-window", {"sparsity": 0.25}),
    ("fuse", {"sparsity": 0.25}), ("mi", {"sparsity": 0.25}),
])
def test_depth_methods_default_to_a_quarter_of_the_blocks(method, expected):
    given = make_config(model="m", method=method)
    resolved = resolve_config(given)
    assert {k: getattr(resolved, k) for k in expected} == expected
    assert defaulted_amount(given) == "sparsity=0.25"
    assert resolve_config(resolved) == resolved  # idempotent
    explicit = make_config(model="m", method=method, num_blocks=2)
    assert resolve_config(explicit).sparsity is None and defaulted_amount(explicit) is None


def test_merge_defaults_to_a_third_of_the_ff_sublayers():
    given = make_config(model="m", method="merge")
    resolved = resolve_config(given)
    assert resolved.options["ff_fraction"] == pytest.approx(1 / 3)
    assert defaulted_amount(given) == "ff_fraction=0.3333"
    for options in ({"num_merge": 2}, {"window": "1-3"}, {"ff_fraction": 0.5}):
        assert "ff_fraction" not in resolve_config(make_config(model="m", method="merge", options=options)).options \
            or options.get("ff_fraction") == 0.5


def test_drop_has_no_default():
    cfg = make_config(model="m", method="drop")
    assert resolve_config(cfg) == cfg


def test_the_cards_example_as_typed(tmp_path):
    """The exact command line of the brief, on an offline cache whose LLaMA-3-8B is a tiny model."""
    if not (SHARED_DATA / "piqa").is_dir():
        pytest.skip("../shared/data is not beside the checkout")
    commit = "0" * 40
    repo = tmp_path / "hub" / f"models--{ALIASES['llama3-8b'].replace('/', '--')}"
    saved_model_dir(repo / "snapshots" / commit, tiny_model("llama"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    data = write_data_dir(tmp_path / "data")  # calibration text, and the first 12 questions of each task
    for folder, files in {"piqa": ["valid.jsonl", "valid-labels.lst"], "arc": ["arc_easy.test.llm-foundry.jsonl"]}.items():
        (data / folder).mkdir()
        for name in files:
            lines = (SHARED_DATA / folder / name).read_text().splitlines(keepends=True)[:12]
            (data / folder / name).write_text("".join(lines))
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1",
           "COMPRESS_EVAL_DATA_DIR": str(data), "COMPRESS_EVAL_CACHE": str(tmp_path / "cache")}
    work = tmp_path / "work"
    work.mkdir()
    line = "compress-eval run llama3-8b --method merge --then-eval piqa,arc_e"
    proc = subprocess.run([sys.executable, "-m", "compress_eval", *line.split()[1:]], cwd=work, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no amount given: ff_fraction=0.3333 (merge's default)" in proc.stderr  # a log message
    out = work / "runs" / "llama3-8b-merge-0.333-s0"
    assert f"saved {out.relative_to(work)}" in proc.stdout
    manifest = json.loads((out / "compress_eval.json").read_text())
    assert manifest["method"] == "merge" and manifest["method_options"]["ff_fraction"] == pytest.approx(1 / 3)
    assert manifest["details"]["ff_removed"] == 2  # ceil(4 / 3) of the tiny model's 4 FF sublayers
    results = json.loads((out / "lm_eval_results.json").read_text())
    assert {"ce_piqa", "ce_arc_easy"} <= set(results["results"])
    assert results["n-samples"]["ce_piqa"]["effective"] == 12
