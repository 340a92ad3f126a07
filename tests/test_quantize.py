"""The bitsandbytes stage on tiny models (CPU): accuracy bounds, round trips, tying, bad combinations."""

from __future__ import annotations

import pytest
import torch

from compress_eval.errors import UserError
from compress_eval.models import checkpoint
from compress_eval.quantize import (bnb_config, check_options, check_trainable, quantization_kind,
                                    quantize_model, stored_weight_bytes)

from conftest import VOCAB, tiny_model

pytest.importorskip("bitsandbytes")

IDS = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))

# Relative L2 error of the logits against fp32, ||q - ref|| / ||ref||, on the tiny random models
# (measured: llama int8 0.007, nf4 0.08, fp4 0.12; gpt2 int8 0.004, nf4 0.04, fp4 0.06).
BOUND = {"int8": 0.03, "nf4": 0.2, "fp4": 0.25}


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def tied_tiny_llama():
    """Blocks 1 and 2 share one MLP module, as FF merging leaves them."""
    model = tiny_model("llama")
    model.model.layers[2].mlp = model.model.layers[1].mlp
    return model, {"model.layers.2.mlp": "model.layers.1.mlp"}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("kind", ["int8", "nf4", "fp4"])
def test_logits_within_bound_of_fp32(family, kind):
    model = tiny_model(family)
    with torch.no_grad():
        ref = model(IDS).logits
        quantized, record = quantize_model(model, kind, double_quant=kind != "int8")
        out = quantized(IDS).logits
    assert quantization_kind(quantized) == kind
    assert rel_error(out, ref) < BOUND[kind]
    assert record["weight_bytes_after"] < record["weight_bytes_before"] / 2
    assert quantization_kind(model) is None  # the input model is left as it was


def test_bnb_config_fields():
    config = bnb_config("nf4", double_quant=True, compute_dtype="bfloat16")
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4"
    assert config.bnb_4bit_use_double_quant and config.bnb_4bit_compute_dtype == torch.bfloat16
    assert bnb_config("fp4", model_dtype=torch.bfloat16).bnb_4bit_compute_dtype == torch.bfloat16
    assert bnb_config("int8").load_in_8bit


def test_double_quant_quantizes_the_block_scales():
    model = tiny_model("llama")
    plain, _ = quantize_model(model, "nf4")
    double, record = quantize_model(model, "nf4", double_quant=True)
    assert record["double_quant"] and record["bitsandbytes_config"]["bnb_4bit_use_double_quant"]
    scales = "model.layers.0.mlp.up_proj.weight.absmax"
    assert plain.state_dict()[scales].dtype == torch.float32
    assert double.state_dict()[scales].dtype == torch.uint8


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_save_load_round_trip_identical(tmp_path, kind):
    from transformers import AutoModelForCausalLM

    quantized, record = quantize_model(tiny_model("llama"), kind)
    checkpoint.save_model_files(quantized, None, tmp_path)
    checkpoint.write_manifest(tmp_path, {"quantization": record, "tie_map": {}})
    ours, _ = checkpoint.load_checkpoint(tmp_path, device="cpu")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        expected = quantized(IDS).logits
        assert torch.equal(ours(IDS).logits, expected)
        assert torch.equal(plain(IDS).logits, expected)
    assert quantization_kind(plain) == kind


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_tied_module_stays_one_quantized_copy(tmp_path, kind):
    model, tie_map = tied_tiny_llama()
    with torch.no_grad():
        ref = model(IDS).logits
        quantized, record = quantize_model(model, kind, tie_map=tie_map)
        out = quantized(IDS).logits
    layers = quantized.model.layers
    assert layers[2].mlp is layers[1].mlp
    assert type(layers[1].mlp.up_proj).__name__ in ("Linear8bitLt", "Linear4bit")
    assert rel_error(out, ref) < BOUND[kind]
    untied, _ = quantize_model(tiny_model("llama"), kind)
    assert record["weight_bytes_after"] < stored_weight_bytes(untied)  # the shared MLP counted once

    checkpoint.save_model_files(quantized, None, tmp_path, tie_map)
    assert quantized.model.layers[2].mlp is layers[1].mlp  # saving leaves the tie in place
    checkpoint.write_manifest(tmp_path, {"quantization": record, "tie_map": tie_map})
    reloaded, _ = checkpoint.load_checkpoint(tmp_path, device="cpu")
    assert reloaded.model.layers[2].mlp is reloaded.model.layers[1].mlp
    with torch.no_grad():
        assert torch.equal(reloaded(IDS).logits, out)


@pytest.mark.parametrize("args, words", [
    (("int8", True, None), "4-bit only"),
    (("int8", False, "bfloat16"), "4-bit only"),
    ((None, True, None), "need --quantize"),
    (("int4", False, None), "unknown quantization"),
])
def test_bad_option_combinations(args, words):
    with pytest.raises(UserError, match=words):
        check_options(*args)


def test_unknown_compute_dtype():
    with pytest.raises(UserError, match="unknown compute dtype"):
        bnb_config("nf4", compute_dtype="float8")


def test_quantized_model_is_not_quantized_again_or_fully_fine_tuned():
    quantized, _ = quantize_model(tiny_model("llama"), "nf4")
    with pytest.raises(UserError, match="already nf4-quantized"):
        quantize_model(quantized, "int8")
    with pytest.raises(UserError, match="QLoRA"):
        check_trainable(quantized, "full")
    check_trainable(quantized, "qlora")
    check_trainable(tiny_model("llama"), "full")


# --- the stage in the pipeline and on the command line ---------------------------------------

def invoke(*args):
    from typer.testing import CliRunner

    from compress_eval.cli.app import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_dense_nf4_manifest_and_reload(tiny_model_dir, data_dir, tmp_path):
    import json

    from compress_eval.models.registry import load_model

    out = tmp_path / "out"
    result = invoke("compress", tiny_model_dir, "--method", "none", "--quantize", "nf4", "--double-quant",
                    "--compute-dtype", "float32", "--out", out, "--then-eval", "wikitext2", "--eval-seqlen", 16,
                    "--max-windows", 2)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "compress_eval.json").read_text())
    quant = manifest["quantization"]
    assert quant["kind"] == "nf4" and quant["double_quant"] and quant["compute_dtype"] == "float32"
    assert quant["weight_bytes_after"] < quant["weight_bytes_before"] / 2
    assert manifest["weight_bytes_after"] == quant["weight_bytes_after"]
    assert manifest["params_after"] == manifest["params_before"]  # counted before packing
    assert "quantize" in manifest["timings_s"]
    assert json.loads((out / "results_ppl.json").read_text())["wikitext2_ppl"]["ppl"] > 1
    model, _, _ = load_model(str(out), "cpu")
    assert quantization_kind(model) == "nf4"


def test_pipeline_drop_then_int8_reloads_identically(tiny_model_dir, data_dir, tmp_path):
    from compress_eval.config import make_config
    from compress_eval.models.registry import load_model
    from compress_eval.pipeline import compress, save

    cfg = make_config(model=str(tiny_model_dir), method="drop", blocks=[1], quantize="int8")
    model, tokenizer, manifest, record = compress(cfg, data_dir, log=lambda *_: None)
    save(model, tokenizer, manifest, record, tmp_path / "out")
    reloaded, _, _ = load_model(str(tmp_path / "out"), "cpu")
    assert manifest["blocks_after"] == 3 and quantization_kind(reloaded) == "int8"
    with torch.no_grad():
        assert torch.equal(reloaded(IDS).logits, model(IDS).logits)


def test_pipeline_keeps_a_methods_tie_through_quantization(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    from compress_eval.config import make_config
    from compress_eval.methods import registry
    from compress_eval.methods.base import CompressionRecord, Compressor
    from compress_eval.models.registry import load_model
    from compress_eval.pipeline import compress, save

    class ShareMlp(Compressor):
        """Blocks 1 and 2 share block 1's MLP, as FF merging leaves a window."""
        name, needs_calibration = "share-mlp", False

        def compress(self, adapter, calib):
            adapter.blocks[2].mlp = adapter.blocks[1].mlp
            return CompressionRecord(tie_map={"model.layers.2.mlp": "model.layers.1.mlp"})

    monkeypatch.setitem(registry._REGISTRY, "share-mlp", ShareMlp)
    cfg = make_config(model=str(tiny_model_dir), method="share-mlp", quantize="nf4")
    model, tokenizer, manifest, record = compress(cfg, data_dir, log=lambda *_: None)
    save(model, tokenizer, manifest, record, tmp_path / "out")
    reloaded, _, _ = load_model(str(tmp_path / "out"), "cpu")
    for m in (model, reloaded):
        assert m.model.layers[2].mlp is m.model.layers[1].mlp
        assert type(m.model.layers[1].mlp.up_proj).__name__ == "Linear4bit"
    with torch.no_grad():
        assert torch.equal(reloaded(IDS).logits, model(IDS).logits)


@pytest.mark.parametrize("flags, message", [
    (["--quantize", "int8", "--double-quant"], "apply to 4-bit quantization only"),
    (["--compute-dtype", "bfloat16"], "apply to 4-bit quantization only"),
    (["--quantize", "int4"], "quantize"),
    (["--quantize", "nf4", "--compute-dtype", "float8"], "compute_dtype"),
])
def test_cli_rejects_bad_quantization_flags(flags, message, tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "out"
    result = invoke("compress", tiny_model_dir, "--method", "none", *flags, "--out", out)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and message in errors[0], errors
    assert not out.exists()


def test_cli_refuses_to_compress_a_quantized_checkpoint(tiny_model_dir, data_dir, tmp_path):
    assert invoke("compress", tiny_model_dir, "--method", "none", "--quantize", "int8",
                  "--out", tmp_path / "q").exit_code == 0
    result = invoke("compress", tmp_path / "q", "--method", "drop", "--blocks", "1", "--out", tmp_path / "out")
    assert result.exit_code == 2 and "already int8-quantized" in result.stderr
    assert not (tmp_path / "out").exists()
