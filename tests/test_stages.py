"""Multi-stage recipes: methods, fine-tunes and quantization in order in one compress, each recorded."""

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from compress_eval.cli.app import app
from compress_eval.config import make_config
from compress_eval.errors import UserError
from compress_eval.models.loading import load_model
from compress_eval.pipeline import compress, save
from tests.conftest import one_line_error, saved_model_dir, tiny_config

runner = CliRunner()
CALIB = dict(calib_samples=2, seqlen=16)


@pytest.fixture
def six_blocks(tmp_path):
    """A tiny LLaMA with 6 blocks, so two depth stages and a merge window fit."""
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama")
    config.num_hidden_layers = 6
    torch.manual_seed(0)
    return saved_model_dir(tmp_path / "six", AutoModelForCausalLM.from_config(config).eval())


def run(model_dir, data_dir, **values):
    return compress(make_config(model=str(model_dir), **CALIB, **values), data_dir)


def test_stage_removals_are_named_in_the_original_model(six_blocks, data_dir):
    """The second stage's block 1 is the original block 2 once block 1 is gone."""
    result = run(six_blocks, data_dir, stages=[{"method": "drop", "blocks": [1]}, {"method": "drop", "blocks": [1]}])
    m = result.manifest
    assert m.method == "drop+drop" and m.removed_blocks == [1, 2] and m.blocks_after == 4
    assert [s.removed_blocks for s in m.stages] == [[1], [2]]
    assert m.stages[0].params_after > m.stages[1].params_after == m.params_after
    assert set(m.details) == {"1:drop", "2:drop"}


def test_one_stage_recipe_equals_the_flags(six_blocks, data_dir, tmp_path):
    flags = run(six_blocks, data_dir, method="shortgpt", num_blocks=2)
    staged = run(six_blocks, data_dir, stages=[{"method": "shortgpt", "num_blocks": 2}])
    assert flags.manifest.removed_blocks == staged.manifest.removed_blocks
    assert flags.manifest.details == staged.manifest.details
    assert [s.kind for s in flags.manifest.stages] == ["method"]
    a, b = flags.model.state_dict(), staged.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_three_stages_depth_merge_recover(six_blocks, data_dir, tmp_path):
    """shortgpt -> merge (ties FFs) -> LoRA recovery: every stage recorded; the checkpoint reloads tied."""
    stages = [{"method": "shortgpt", "num_blocks": 1}, {"method": "merge", "options": {"window": "1-2"}},
              {"recover": "lora", "recover_steps": 2}]
    result = run(six_blocks, data_dir, stages=stages)
    m = result.manifest
    assert [s.kind for s in m.stages] == ["method", "method", "recover"]
    assert m.method == "shortgpt+merge" and m.blocks_after == 5
    assert m.stages[1].tied == ["model.layers.2.mlp"] and m.tie_map == {"model.layers.2.mlp": "model.layers.1.mlp"}
    assert m.stages[0].params_after > m.stages[1].params_after  # the tie is stored once
    assert m.recovery["mode"] == "lora" and m.recovery["steps"] == 2
    assert m.stages[2].params_after == m.stages[1].params_after  # LoRA is merged back in
    out = save(result, tmp_path / "out")
    written = json.loads((out / "compress_eval.json").read_text())
    assert [s["kind"] for s in written["stages"]] == ["method", "method", "recover"]
    assert "stages:" in (out / "recipe.yaml").read_text()
    reloaded, _, _ = load_model(str(out), dtype="float32")
    ids = torch.arange(12).unsqueeze(0)
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, result.model(ids).logits, atol=1e-5)


def test_quantize_stage_comes_last_and_is_recorded(six_blocks, data_dir):
    pytest.importorskip("bitsandbytes")
    result = run(six_blocks, data_dir, stages=[{"method": "drop", "blocks": [0]}, {"quantize": "int8"}])
    m = result.manifest
    assert [s.kind for s in m.stages] == ["method", "quantize"] and m.quantization["kind"] == "int8"
    assert m.stages[1].weight_bytes_after < m.stages[0].weight_bytes_after


@pytest.mark.parametrize("stages, fragment", [
    ([{"method": "merge", "options": {"window": "1-2"}}, {"method": "drop", "blocks": [0]}], "must be the last method"),
    ([{"quantize": "nf4"}, {"method": "drop", "blocks": [0]}], "quantize must be the last stage"),
    ([{"recover": "lora"}, {"lora_r": 4}], "one of the keys method, recover or quantize"),
    ([{"method": "shortgpt", "sparsity": 1.5}], "sparsity must be in (0, 1)"),
    ([], "stages is empty"),
])
def test_bad_stage_lists_fail_before_loading(stages, fragment, tmp_path):
    with pytest.raises(UserError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        run(tmp_path / "no-such-model", None, stages=stages)


def test_recipe_file_with_stages_through_the_cli(six_blocks, data_dir, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {six_blocks}\ncalib_samples: 2\nseqlen: 16\nstages:\n"
                      "  - {method: sleb, num_blocks: 1}\n  - {method: shortgpt, num_blocks: 1}\n")
    out = tmp_path / "out"
    result = runner.invoke(app, ["compress", "--recipe", str(recipe), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "stage 2/2: shortgpt" in result.output
    manifest = json.loads((out / "compress_eval.json").read_text())
    assert manifest["method"] == "sleb+shortgpt" and len(manifest["removed_blocks"]) == 2
    assert load_file(out / "model.safetensors")  # a plain checkpoint
    flags = runner.invoke(app, ["compress", "--recipe", str(recipe), "--sparsity", "0.2", "--out", str(tmp_path / "x")])
    one_line_error(flags, "sparsity is given beside stages")
    assert not (tmp_path / "x").exists()


def test_a_grid_entry_can_be_a_staged_recipe(tmp_path):
    from compress_eval.grid import expand, load_grid

    grid = tmp_path / "g.yaml"
    grid.write_text("models: [m]\nsparsities: [0.25]\ntasks: [wikitext2]\nmethods:\n  - shortgpt\n"
                    "  - {stages: [{method: fuse, sparsity: 0.2}, {method: merge}, {quantize: nf4}]}\n")
    cells = expand(load_grid(grid))
    staged = cells[1]
    assert staged.label == "fuse+merge" and staged.config.method == "fuse+merge"
    assert [s.method for s in staged.config.stages[:2]] == ["fuse", "merge"]
    assert staged.config.stages[1].options["ff_fraction"] == pytest.approx(1 / 3)  # merge's default, resolved
    assert staged.key != cells[0].key and staged.config.sparsity is None
