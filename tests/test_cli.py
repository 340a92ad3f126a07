import json

import pytest
from typer.testing import CliRunner

from compress_eval.cli.app import app
from compress_eval.models.adapters import get_adapter

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_models_lists_aliases():
    result = invoke("models")
    assert result.exit_code == 0, result.output
    for alias in ("smollm2-135m", "llama3-8b", "gpt2-large", "llava-1.5-7b"):
        assert alias in result.output


def test_ppl_prints_the_number_last(tiny_model_dir, data_dir):
    result = invoke("ppl", tiny_model_dir, "--dataset", "wikitext2", "--seqlen", 16, "--max-windows", 4)
    assert result.exit_code == 0, result.output
    assert float(result.output.strip().splitlines()[-1]) > 1


def test_compress_drop_writes_checkpoint_and_manifest(tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "out"
    result = invoke("compress", tiny_model_dir, "--method", "drop", "--blocks", "1,2", "--out", out,
                    "--then-eval", "wikitext2", "--eval-seqlen", 16, "--max-windows", 2)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "compress_eval.json").read_text())
    assert manifest["removed_blocks"] == [1, 2] and manifest["blocks_after"] == 2
    assert manifest["params_after"] < manifest["params_before"]
    assert {"load", "compress", "save"} <= set(manifest["timings_s"])
    assert manifest["config"]["method"] == "drop" and "torch" in manifest["versions"]
    assert (out / "recipe.yaml").exists() and (out / "model.safetensors").exists()
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))
    assert json.loads((out / "results_ppl.json").read_text())["wikitext2_ppl"]["ppl"] > 1

    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert get_adapter(reloaded).num_blocks == 2


@pytest.mark.parametrize("args,message", [
    (["compress", "no-such-model", "--method", "drop", "--blocks", "1"], "unknown model 'no-such-model'"),
    (["compress", "smolm2-135m", "--method", "drop", "--blocks", "1"], "did you mean smollm2-135m"),
    (["compress", "{model}", "--method", "sleb", "--sparsity", "1.5"], "sparsity must be in (0, 1)"),
    (["compress", "{model}", "--method", "drop", "--blocks", "0,1,2,3"], "would leave none"),
    (["compress", "{model}", "--method", "nosuch", "--sparsity", "0.5"], "unknown method 'nosuch'"),
    (["compress", "{model}", "--method", "drop", "--blocks", "9"], "out of range"),
    (["compress", "{model}", "--method", "drop", "--blocks", "1", "--then-eval", "mmlux"], "unknown task"),
    (["ppl", "{model}", "--dataset", "ptb"], "unknown dataset"),
])
def test_bad_input_is_one_line_and_leaves_nothing(args, message, tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "out"
    args = [a.replace("{model}", str(tiny_model_dir)) for a in args]
    if args[0] == "compress":
        args += ["--out", str(out)]
    result = invoke(*args)
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: ") and message in errors[0]
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_missing_data_dir(tiny_model_dir, tmp_path):
    result = invoke("ppl", tiny_model_dir, "--data-dir", tmp_path / "missing", "--seqlen", 16)
    assert result.exit_code == 2 and "does not exist" in result.output


def test_existing_output_dir_is_refused_untouched(tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = invoke("compress", tiny_model_dir, "--method", "drop", "--blocks", "1", "--out", out)
    assert result.exit_code == 2 and "already exists" in result.output
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_failure_during_save_leaves_no_output(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    from compress_eval.results import store

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(store, "write_manifest", boom)
    out = tmp_path / "out"
    result = invoke("compress", tiny_model_dir, "--method", "drop", "--blocks", "1", "--out", out)
    assert result.exit_code != 0
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_recipe_file(tiny_model_dir, data_dir, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {tiny_model_dir}\nmethod: drop\nblocks: [0]\n")
    out = tmp_path / "out"
    result = invoke("compress", "--recipe", recipe, "--out", out)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "compress_eval.json").read_text())["removed_blocks"] == [0]


def test_method_flags_become_options():
    from compress_eval.cli.compress import parse_options

    assert parse_options(["lr=1e-3"], ["--num-merge", "4", "--no-permute", "--anchor=middle", "--untied-export"]) == {
        "lr": 1e-3, "num_merge": 4, "permute": False, "anchor": "middle", "untied_export": True}


def test_unknown_method_flag_is_a_clear_error(tiny_model_dir, data_dir, tmp_path):
    result = invoke("compress", tiny_model_dir, "--method", "drop", "--blocks", "1", "--bogus-flag", "3",
                    "--out", tmp_path / "o")
    assert result.exit_code == 2 and "bogus_flag" in result.stderr


def test_method_none_keeps_every_block(tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "dense"
    result = invoke("compress", tiny_model_dir, "--method", "none", "--out", out)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "compress_eval.json").read_text())
    assert manifest["blocks_after"] == manifest["blocks_before"] == 4
    assert manifest["params_after"] == manifest["params_before"]


def test_recovery_is_a_stage_after_any_method(tiny_model_dir, data_dir, tmp_path):
    """--recover works after drop (no calibration of its own) and is recorded at the top level."""
    from safetensors.torch import load_file

    common = ["compress", tiny_model_dir, "--method", "drop", "--blocks", "1", "--calib-samples", "2",
              "--seqlen", "16"]
    plain, healed = tmp_path / "plain", tmp_path / "healed"
    assert invoke(*common, "--out", plain).exit_code == 0
    result = invoke(*common, "--recover", "lora", "--recover-steps", "2", "--out", healed)
    assert result.exit_code == 0, result.output
    manifest = json.loads((healed / "compress_eval.json").read_text())
    assert manifest["recovery"]["mode"] == "lora" and manifest["recovery"]["steps"] == 2
    assert manifest["config"]["recovery"]["recover"] == "lora" and "recover" not in manifest["config"]["options"]
    a, b = load_file(plain / "model.safetensors"), load_file(healed / "model.safetensors")
    assert a.keys() == b.keys() and any(not (a[k] == b[k]).all() for k in a)


def test_recipes_with_recovery_among_the_options_still_parse():
    from compress_eval.config import make_config

    cfg = make_config(model="m", method="merge", options={"num_merge": 1, "recover": "full", "recover_steps": 5})
    assert cfg.options == {"num_merge": 1}
    assert (cfg.recovery.recover, cfg.recovery.recover_steps) == ("full", 5)
