"""--offload cpu|disk: a model larger than memory runs unit by unit and gives the in-memory results.

Every method that needs no fine-tune must match the in-memory run bitwise on CPU; the fine-tuned ones
(fuse) run the same operations in the same order, so they match bitwise here too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import saved_model_dir, tiny_config, tiny_model, write_data_dir

from compress_eval.config import make_config
from compress_eval.errors import UserError
from compress_eval.models.loading import load_model
from compress_eval.models.offload import offloader_of
from compress_eval.sizes import parse_memory
from compress_eval.pipeline import compress, compress_to_dir, save


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def all_placeholders(model) -> bool:
    return all(p.is_meta for p in model.parameters())


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen3", "gemma3_text", "starcoder2"])
@pytest.mark.parametrize("mode", ["cpu", "disk"])
def test_full_forward_equals_in_memory_and_releases_every_unit(tmp_path, family, mode):
    directory = saved_model_dir(tmp_path / family, tiny_model(family))
    ref, _, _ = load_model(str(directory), "cpu")
    model, _, _ = load_model(str(directory), "cpu", offload=mode)
    assert all_placeholders(model)
    ids = torch.randint(0, 90, (2, 16))
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, model(ids).logits)
    assert all_placeholders(model)  # nothing stayed loaded after the forward


def test_tied_embeddings_are_one_unit_and_stay_tied(tmp_path):
    model, _, _ = load_model(str(saved_model_dir(tmp_path / "m", tiny_model("gpt2"))), "cpu", offload="disk")
    assert model.lm_head.weight is model.transformer.wte.weight
    offloader = offloader_of(model)
    assert any(len(unit.roots) == 2 for unit in offloader.units)
    with offloader.hold([model.lm_head]):
        assert not model.lm_head.weight.is_meta and model.lm_head.weight is model.transformer.wte.weight


def run(directory, method, mode, out, **kw):
    options = kw.pop("options", {})
    cfg = make_config(model=str(directory), method=method, device="cpu", offload=mode, calib_samples=4, seqlen=32,
                      options=options, **kw)
    result = compress(cfg, None)
    return result, save(result, out)


METHOD_CASES = {
    "shortgpt": dict(num_blocks=1),
    "sleb": dict(num_blocks=2, options={"protect_ends": False}),
    "drop-window": dict(num_blocks=2),
    "drop": dict(blocks=[1]),
    "mi": dict(num_blocks=2, options={"profile": "cpu"}),
    "fuse": dict(num_blocks=2, options={"profile": "cpu", "epochs": 1, "group_size": 3}),
    "fuse-uncollapsed": dict(num_blocks=1, options={"profile": "cpu", "epochs": 1, "group_size": 3,
                                                    "collapse": False}),
    "merge": dict(options={"num_merge": 1, "feature_tokens": 64}),
    "merge-untied": dict(options={"num_merge": 2, "feature_tokens": 64, "untied_export": True}),
    "sublayer": dict(options={"num_sublayers": 3}),
}


@pytest.fixture(scope="module")
def six_block_dir(tmp_path_factory):
    """A six-block tiny LLaMA, and the tests' data directory in $COMPRESS_EVAL_DATA_DIR."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("offload")
    patch = pytest.MonkeyPatch()
    patch.setenv("COMPRESS_EVAL_DATA_DIR", str(write_data_dir(root / "data")))
    torch.manual_seed(0)
    cfg = tiny_config("llama")
    cfg.num_hidden_layers = 6
    yield saved_model_dir(root / "six", AutoModelForCausalLM.from_config(cfg))
    patch.undo()


@pytest.mark.parametrize("case", list(METHOD_CASES))
def test_methods_offloaded_to_disk_match_in_memory_bitwise(tmp_path, six_block_dir, case):
    method = case.split("-")[0] if case.startswith(("fuse", "merge")) else case
    ref, ref_dir = run(six_block_dir, method, "none", tmp_path / "mem", **dict(METHOD_CASES[case]))
    got, got_dir = run(six_block_dir, method, "disk", tmp_path / "disk", **dict(METHOD_CASES[case]))
    assert got.manifest.offload == "disk" and ref.manifest.offload == "none"
    assert got.manifest.removed_blocks == ref.manifest.removed_blocks
    assert got.manifest.tie_map == ref.manifest.tie_map
    assert got.manifest.skipped == ref.manifest.skipped
    assert (got.manifest.params_after, got.manifest.weight_bytes_after) == \
           (ref.manifest.params_after, ref.manifest.weight_bytes_after)
    a, b = tensors(ref_dir), tensors(got_dir)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The offloaded checkpoint is an ordinary one: our loader (ties re-applied) gives the same logits.
    m1, _, _ = load_model(str(ref_dir), "cpu")
    m2, _, _ = load_model(str(got_dir), "cpu")
    ids = torch.randint(0, 90, (1, 12))
    with torch.no_grad():
        assert torch.equal(m1(ids).logits, m2(ids).logits)


def test_cpu_offload_matches_too(tmp_path, six_block_dir):
    ref, ref_dir = run(six_block_dir, "merge", "none", tmp_path / "mem", options={"num_merge": 1,
                                                                                    "feature_tokens": 64})
    got, got_dir = run(six_block_dir, "merge", "cpu", tmp_path / "cpu", options={"num_merge": 1,
                                                                                   "feature_tokens": 64})
    a, b = tensors(ref_dir), tensors(got_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fuse_resume_under_offload(tmp_path, six_block_dir):
    options = {"profile": "cpu", "epochs": 1, "group_size": 3}
    ref, ref_dir = run(six_block_dir, "fuse", "none", tmp_path / "mem", num_blocks=2, options=options)
    state = tmp_path / "state"
    run(six_block_dir, "fuse", "disk", tmp_path / "one", num_blocks=1, options={**options, "resume": str(state)})
    got, got_dir = run(six_block_dir, "fuse", "disk", tmp_path / "two", num_blocks=2,
                       options={**options, "resume": str(state)})
    assert got.manifest.removed_blocks == ref.manifest.removed_blocks
    a, b = tensors(ref_dir), tensors(got_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sharded_save_writes_an_index_transformers_reads(tmp_path, six_block_dir):
    from transformers import AutoModelForCausalLM

    cfg = make_config(model=str(six_block_dir), method="drop", blocks=[2], device="cpu", offload="disk",
                      max_shard_size="60KB")
    out = compress_to_dir(cfg, tmp_path / "out")
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(shards) > 2 and set(index["weight_map"].values()) == {p.name for p in shards}
    assert all(p.stat().st_size <= 60_000 + 100_000 for p in shards)  # a unit larger than the limit: its own shard
    assert not list(out.glob(".shard*"))
    hf = AutoModelForCausalLM.from_pretrained(out)
    mem, _, _ = load_model(str(out), "cpu")
    ids = torch.randint(0, 90, (1, 8))
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, mem(ids).logits)
    assert hf.config.num_hidden_layers == 5


def test_in_memory_save_is_sharded_too(tmp_path, six_block_dir):
    cfg = make_config(model=str(six_block_dir), method="drop", blocks=[2], device="cpu", offload="none",
                      max_shard_size="60KB")
    out = compress_to_dir(cfg, tmp_path / "out")
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) > 2


def test_auto_keeps_a_small_model_in_memory(tmp_path, six_block_dir, caplog):
    cfg = make_config(model=str(six_block_dir), method="drop", blocks=[2], device="cpu")
    with caplog.at_level("DEBUG", logger="compress_eval"):
        result = compress(cfg, None)
    assert result.manifest.offload == "none"
    assert any(m.startswith("offload: none (model") and "fit the" in m for m in caplog.messages)


def test_choose_offload_rule():
    from compress_eval.offload_policy import choose_offload

    gb = 10**9
    assert choose_offload(16 * gb, 2 * gb, 80 * gb, 64 * gb, "cuda")[0] == "none"
    assert choose_offload(16 * gb, 2 * gb, 16 * gb, 64 * gb, "cuda")[0] == "cpu"
    assert choose_offload(140 * gb, 2 * gb, 24 * gb, 64 * gb, "cuda")[0] == "disk"
    assert choose_offload(32 * gb, 2 * gb, 24 * gb, 24 * gb, "cpu")[0] == "disk"


@pytest.mark.parametrize("extra, message", [
    ({"recovery": {"recover": "lora"}}, "--recover lora needs the whole model"),
    ({"quantize": "nf4"}, "--quantize nf4 needs the whole model"),
])
def test_stages_needing_the_whole_model_refuse_offload(tmp_path, six_block_dir, extra, message):
    cfg = make_config(model=str(six_block_dir), method="drop", blocks=[2], device="cpu", offload="disk", **extra)
    with pytest.raises(UserError, match=message):
        compress(cfg, None)


def test_bad_shard_size_and_mode_are_one_line_errors():
    with pytest.raises(UserError, match="max_shard_size: .*'5XB' is not a size"):
        make_config(model="m", method="drop", blocks=[1], max_shard_size="5XB")
    with pytest.raises(UserError, match="offload"):
        make_config(model="m", method="drop", blocks=[1], offload="gpu")
    assert parse_memory("2GiB") == 2 * 2**30 and parse_memory("500MB") == 500 * 10**6


def test_offload_needs_safetensors(tmp_path):
    """A whole model in pickles loads with --allow-pickle, but offloading reads safetensors files."""
    directory = saved_model_dir(tmp_path / "m", tiny_model("llama"))
    torch.save(load_file(directory / "model.safetensors"), directory / "pytorch_model.bin")
    (directory / "model.safetensors").unlink()
    with pytest.raises(UserError, match="needs safetensors weights"):
        load_model(str(directory), "cpu", offload="disk", allow_pickle=True)


def test_cli_compress_with_offload(tmp_path, six_block_dir):
    from typer.testing import CliRunner

    from compress_eval.cli.app import app

    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["compress", str(six_block_dir), "--method", "shortgpt", "--num-blocks", "1",
                                      "--calib-samples", "2", "--seqlen", "16", "--offload", "disk",
                                      "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "offload: disk (as asked)" in result.output
    assert json.loads((out / "compress_eval.json").read_text())["offload"] == "disk"
    assert (out / "tokenizer.json").is_file()


def test_evaluation_of_an_offloaded_model_equals_in_memory(tiny_model_dir, data_dir):
    from compress_eval.eval_config import EvalConfig
    from compress_eval.evaluate import evaluate
    from compress_eval.lm_eval_plugin import CompressedLM

    mem, disk = (evaluate(str(tiny_model_dir), EvalConfig(tasks=["wikitext2"], seqlen=32, max_windows=4, device="cpu",
                                                          progress=False, offload=mode)) for mode in ("none", "disk"))
    assert disk["wikitext2_ppl"]["ppl"] == mem["wikitext2_ppl"]["ppl"]
    requests = [("The quick brown", " fox"), ("A model that is", " compressed")]

    class Request:  # what lm-eval hands to loglikelihood
        def __init__(self, args):
            self.args = args

    scores = [CompressedLM(pretrained=str(tiny_model_dir), device="cpu", offload=mode).loglikelihood(
        [Request(r) for r in requests], disable_tqdm=True) for mode in ("none", "disk")]
    assert scores[0] == scores[1]


def test_unknown_offload_mode_is_refused(tiny_model_dir):
    from compress_eval.eval_config import EvalConfig
    from compress_eval.evaluate import evaluate

    with pytest.raises(UserError, match="unknown --offload 'gpu': use auto, none, cpu, disk"):
        evaluate(str(tiny_model_dir), EvalConfig(tasks=["wikitext2"], seqlen=32, device="cpu", offload="gpu"))
