"""The loading gate: one table of broken model directories, each built here from a tiny model and
refused in one line before any model is built (through the gate itself, and for a few through every
command that opens a directory), and the directories every method writes, which pass it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from conftest import FAMILIES, one_line_error, saved_model_dir, saved_vlm_dir, tiny_model

from compress_eval.cli.app import app
from compress_eval.errors import UserError
from compress_eval.models import gate


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """The directories a case starts from: tiny LLaMA, GPT-2, Gemma 3 and LLaVA models, a LLaMA in shards,
    and a compress-eval checkpoint of the LLaMA (block 1 dropped)."""
    from compress_eval.config import make_config
    from compress_eval.pipeline import compress, save

    root = tmp_path_factory.mktemp("bases")
    llama = saved_model_dir(root / "llama", tiny_model("llama"))
    sharded = root / "sharded"
    tiny_model("llama").save_pretrained(sharded, max_shard_size="40KB")
    shutil.copytree(llama, sharded, dirs_exist_ok=True, ignore=shutil.ignore_patterns("model.safetensors"))
    assert (sharded / "model.safetensors.index.json").is_file()
    save(compress(make_config(model=str(llama), method="drop", blocks=[1])), root / "checkpoint")
    return {"llama": llama, "sharded": sharded, "checkpoint": root / "checkpoint",
            "gpt2": saved_model_dir(root / "gpt2", tiny_model("gpt2")),
            "gemma": saved_model_dir(root / "gemma", tiny_model("gemma3_text")),
            "llava": saved_vlm_dir(root / "llava", "llava")}


# --- edits that break a copy of a base directory ---------------------------------------------------

def edit_json(name: str, change):
    def edit(path: Path) -> None:
        data = json.loads((path / name).read_text())
        change(data)
        (path / name).write_text(json.dumps(data))
    return edit


def config(**values):
    return edit_json("config.json", lambda d: d.update(values))


def config_without(key: str):
    return edit_json("config.json", lambda d: d.pop(key))


def manifest(**values):
    return edit_json("compress_eval.json", lambda d: d.update(values))


def weights(change):
    """Rewrite model.safetensors with ``change(tensors)`` applied."""
    def edit(path: Path) -> None:
        tensors = load_file(path / "model.safetensors")
        change(tensors)
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return edit


def write(name: str, content: bytes | str):
    def edit(path: Path) -> None:
        (path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return edit


def remove(*patterns: str):
    def edit(path: Path) -> None:
        for pattern in patterns:
            for p in path.glob(pattern):
                p.unlink()
    return edit


def halve(name: str):
    def edit(path: Path) -> None:
        data = (path / name).read_bytes()
        (path / name).write_bytes(data[: len(data) // 2])
    return edit


def to_pickle(path: Path) -> None:
    torch.save(load_file(path / "model.safetensors"), path / "pytorch_model.bin")
    (path / "model.safetensors").unlink()


def index_names_a_ghost(data: dict) -> None:
    data["weight_map"]["model.ghost.weight"] = next(iter(data["weight_map"].values()))


def first_shard(path: Path) -> str:
    return sorted(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"].values())[0]


# (id, base, edit, a fragment of the one line)
CASES = [
    # config
    ("no-model-type", "llama", config_without("model_type"), "has no model_type"),
    ("unknown-model-type", "llama", config(model_type="nosuchfamily"), "is not a family transformers"),
    ("config-not-json", "llama", write("config.json", "{\"model_type\": "), "is not valid JSON"),
    ("config-unbuildable", "llama", config(num_hidden_layers="four"), "config.json"),
    ("config-more-layers", "llama", config(num_hidden_layers=6), "config.json names 6 blocks but the weights hold 4"),
    ("config-fewer-layers", "llama", config(num_hidden_layers=2), "the weights hold 4 blocks but config.json names 2"),
    ("gpt2-config-more-layers", "gpt2", config(n_layer=6), "config.json names 6 blocks"),
    ("config-other-width", "llama", config(intermediate_size=80), "other shapes than config.json"),
    ("config-tied-head-untied", "gemma", config(tie_word_embeddings=False), "lm_head.weight"),
    # weights
    ("missing-norm", "llama", weights(lambda t: t.pop("model.norm.weight")), "lack 1 tensors"),
    ("missing-head", "llama", weights(lambda t: t.pop("lm_head.weight")), "lm_head.weight"),
    ("missing-vision-tensor", "llava",
     weights(lambda t: t.pop(next(k for k in t if "vision_tower" in k))), "vision_tower"),
    ("extra-tensor", "llama", weights(lambda t: t.update({"model.extra.weight": torch.zeros(2)})),
     "model.extra.weight"),
    ("no-weights", "llama", remove("model.safetensors"), "holds no weights"),
    ("weights-truncated", "llama", halve("model.safetensors"), "truncated or corrupt"),
    ("weights-empty", "llama", write("model.safetensors", b""), "truncated or corrupt"),
    ("pickle-only", "llama", to_pickle, "--allow-pickle"),
    ("shard-missing", "sharded", lambda p: (p / first_shard(p)).unlink(), "names shards that are not in"),
    ("shard-truncated", "sharded", lambda p: halve(first_shard(p))(p), "truncated or corrupt"),
    ("index-not-json", "sharded", write("model.safetensors.index.json", "{"), "is not a weight index"),
    ("index-names-a-ghost", "sharded", edit_json("model.safetensors.index.json", index_names_a_ghost),
     "disagree on 1 tensors"),
    # tokenizer
    ("no-tokenizer", "llama", remove("tokenizer*", "special_tokens_map.json"), "has no tokenizer files"),
    ("tokenizer-corrupt", "llama", write("tokenizer.json", "{"), "cannot load the tokenizer"),
    ("tokenizer-config-only", "llama", remove("tokenizer.json"), "cannot load the tokenizer"),
    # manifest
    ("tie-map-names-a-missing-module", "checkpoint",
     manifest(tie_map={"model.layers.7.mlp": "model.layers.0.mlp"}), "tie_map names modules"),
    ("skipped-names-a-missing-module", "checkpoint", manifest(skipped=["model.layers.9.self_attn"]),
     "skipped names modules"),
    ("manifest-other-depth", "checkpoint", manifest(blocks_after=4), "says the model has 4 blocks"),
    ("manifest-says-quantized", "checkpoint", manifest(quantization={"kind": "int8"}), "quantized"),
    ("manifest-invalid", "checkpoint", edit_json("compress_eval.json", lambda d: d.pop("method")), "method"),
    ("checkpoint-config-restored", "checkpoint", config(num_hidden_layers=4), "blocks"),
]


def broken_copy(bases, tmp_path: Path, case_id: str, base: str, edit) -> Path:
    target = tmp_path / case_id
    shutil.copytree(bases[base], target)
    edit(target)
    return target


def contents(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case_id,base,edit,fragment", CASES, ids=[c[0] for c in CASES])
def test_the_gate_refuses_a_broken_directory(case_id, base, edit, fragment, bases, tmp_path):
    directory = broken_copy(bases, tmp_path, case_id, base, edit)
    before = contents(tmp_path)
    with pytest.raises(UserError) as caught:
        gate.check(directory)
    message = str(caught.value)
    assert "\n" not in message and fragment in message, message
    assert contents(tmp_path) == before  # nothing written


# (case, command) through the CLI: every command that opens a directory refuses it before any work.
CLI_CASES = [
    ("no-model-type", ["ppl", "{model}", "--seqlen", "16"]),
    ("no-tokenizer", ["eval", "{model}", "--tasks", "wiki", "--seqlen", "16"]),
    ("config-more-layers", ["ppl", "{model}", "--seqlen", "16"]),
    ("config-more-layers", ["compress", "{model}", "--method", "drop", "--blocks", "1", "--out", "{tmp}/out"]),
    ("config-more-layers", ["lm-eval", "--model", "compressed", "--model_args", "pretrained={model}", "--tasks",
                            "wikitext2_ppl"]),
    ("tie-map-names-a-missing-module", ["ppl", "{model}", "--seqlen", "16"]),
    ("tie-map-names-a-missing-module", ["export", "{model}", "--out", "{tmp}/out"]),
    ("manifest-other-depth", ["push", "{model}", "someone/model"]),
]


@pytest.mark.parametrize("case_id,args", CLI_CASES, ids=[f"{c}-{a[0]}" for c, a in CLI_CASES])
def test_commands_refuse_a_broken_directory_in_one_line(case_id, args, bases, data_dir, tmp_path):
    _, base, edit, fragment = next(c for c in CASES if c[0] == case_id)
    directory = broken_copy(bases, tmp_path, case_id, base, edit)
    before = contents(tmp_path)
    args = [a.replace("{model}", str(directory)).replace("{tmp}", str(tmp_path)) for a in args]
    result = CliRunner().invoke(app, args, env={"HF_TOKEN": "hf_test", "HF_HUB_OFFLINE": "0"})
    if args[0] == "lm-eval":  # lm-eval logs its own INFO lines first
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        assert len(errors) == 1 and result.stderr.strip().endswith(errors[0]) and fragment in errors[0]
    else:
        one_line_error(result, fragment)
    assert contents(tmp_path) == before


def test_every_familys_tiny_model_passes(tmp_path):
    for family in FAMILIES:
        directory = tmp_path / family
        if family in ("llava", "llava_next"):
            saved_vlm_dir(directory, family)
        else:
            saved_model_dir(directory, tiny_model(family))
        checked = gate.check(directory)
        assert checked.manifest is None and checked.tokenizer is not None, family


def test_sharded_pickled_and_compressed_directories_pass(bases, tmp_path):
    gate.check(bases["sharded"])
    assert gate.check(bases["checkpoint"]).manifest.removed_blocks == [1]
    pickled = tmp_path / "pickled"
    shutil.copytree(bases["llama"], pickled)
    to_pickle(pickled)
    gate.check(pickled, allow_pickle=True)


@pytest.mark.parametrize("method,args", [
    ("merge", ["--num-merge", "2", "--calib-samples", "2", "--seqlen", "16"]),
    ("sublayer", ["--num-sublayers", "1", "--calib-samples", "2", "--seqlen", "16"]),
    ("none", ["--quantize", "int8"]),
], ids=["merged-tied", "sublayer", "int8"])
def test_checkpoints_the_methods_write_pass(method, args, tiny_model_dir, data_dir, tmp_path):
    """What a tie map, removed sublayers or bitsandbytes leave out of (or add to) the weights is not
    missing (or unexpected); the checkpoint also reloads through the CLI."""
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["compress", str(tiny_model_dir), "--method", method, *args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    checked = gate.check(out)
    written = checked.manifest
    assert written.tie_map or written.skipped or written.quantized
    result = CliRunner().invoke(app, ["ppl", str(out), "--seqlen", "16", "--max-windows", "1"])
    assert result.exit_code == 0, result.output


def test_the_packaged_model_cache_is_gated(monkeypatch, tmp_path):
    """A packaged model's materialized cache goes through the gate like any local directory."""
    from compress_eval.models import loading, registry

    cache = tmp_path / "models" / "smollm2-135m"
    saved_model_dir(cache, tiny_model("llama"))
    config(num_hidden_layers=6)(cache)
    monkeypatch.setattr(registry, "packaged_cache_path", lambda alias: tmp_path / "models" / alias)
    with pytest.raises(UserError, match="config.json names 6 blocks"):
        loading.load_model("smollm2-135m", "cpu")


def test_a_missing_tensor_after_loading_is_refused(tiny_model_dir, tmp_path):
    """The backstop for what the gate does not see (a Hub download): transformers' missing keys refuse
    the load instead of initialising them."""
    from transformers import AutoModelForCausalLM

    from compress_eval.models.loading import from_pretrained_tied

    directory = broken_copy({"llama": tiny_model_dir}, tmp_path, "missing", "llama",
                            weights(lambda t: t.pop("model.norm.weight")))
    with pytest.raises(UserError, match="model.norm.weight"):
        from_pretrained_tied(AutoModelForCausalLM, directory, [])
