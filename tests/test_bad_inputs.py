"""Bad input through the CLI: one table, each case exits 2 with one ``error:`` line on stderr, no
traceback, and leaves no output or temporary directory behind. New options join the table."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import one_line_error

from compress_eval.cli.app import app

REPO = Path(__file__).resolve().parents[1]


# --- what a case starts from: each returns the path that replaces {model} ------------------------

def plain(tmp: Path, model_dir: Path) -> Path:
    return model_dir


def damaged(name: str, edit):
    """A copy of the model directory with ``edit(copy)`` applied."""

    def setup(tmp: Path, model_dir: Path) -> Path:
        target = tmp / name
        shutil.copytree(model_dir, target)
        edit(target)
        return target

    setup.__name__ = name
    return setup


def _halve(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _to_pickle(path: Path) -> None:
    from safetensors.torch import load_file

    torch.save(load_file(path / "model.safetensors"), path / "pytorch_model.bin")
    (path / "model.safetensors").unlink()


truncated_weights = damaged("truncated", lambda p: _halve(p / "model.safetensors"))
empty_weights = damaged("empty", lambda p: (p / "model.safetensors").write_bytes(b""))
pickle_only = damaged("pickled", _to_pickle)
manifest_list = damaged("manifest-list", lambda p: (p / "compress_eval.json").write_text("[1]"))
manifest_not_utf8 = damaged("manifest-bytes", lambda p: (p / "compress_eval.json").write_bytes(b"\xff\xfe{\x00"))
manifest_not_json = damaged("manifest-text", lambda p: (p / "compress_eval.json").write_text('{"method": '))
no_config = damaged("no-config", lambda p: (p / "config.json").unlink())


def depth(model_dir: Path) -> int:
    """The number of blocks of a model directory (its config's)."""
    config = json.loads((model_dir / "config.json").read_text())
    config = config.get("text_config", config)
    return config.get("num_hidden_layers") or config["n_layer"]


def scaled(text: str, blocks: int) -> str:
    """``text`` with the amounts that are bad for any model written for this one's depth: {L} blocks,
    {L+2}, {2L} (its sublayers), {beyond} (an index past the last), {all} (every index), so that no bad
    case does real work on a deeper model (bench/faults.py runs this table on SmolLM2's 30 blocks)."""
    tokens = {"{L}": blocks, "{L+2}": blocks + 2, "{2L}": 2 * blocks, "{beyond}": blocks + 5,
              "{all}": ",".join(map(str, range(blocks)))}
    for token, value in tokens.items():
        text = text.replace(token, str(value))
    return text


def _config(path: Path, **values) -> None:
    """config.json with ``values`` set (None: the key removed)."""
    data = {**json.loads((path / "config.json").read_text()), **values}
    (path / "config.json").write_text(json.dumps({k: v for k, v in data.items() if v is not None}))


no_model_type = damaged("no-model-type", lambda p: _config(p, model_type=None))
no_tokenizer = damaged("no-tokenizer", lambda p: [f.unlink() for f in p.glob("tokenizer*")])
more_layers = damaged("more-layers", lambda p: _config(p, num_hidden_layers=depth(p) + 2))


def recipe(text: str | bytes, model=None):
    """Writes {tmp}/r.yaml with ``text``; the model is the plain one, or what the setup ``model`` makes."""

    def setup(tmp, model_dir):
        model_dir = model(tmp, model_dir) if model else model_dir
        target = tmp / "r.yaml"
        target.write_bytes(text if isinstance(text, bytes) else
                           scaled(text.replace("{model}", str(model_dir)), depth(model_dir)).encode())
        return model_dir

    return setup


def resume_state(text: str):
    def setup(tmp, model_dir):
        (tmp / "state").mkdir()
        (tmp / "state" / "state.json").write_text(text)
        return model_dir

    return setup


def regular_file(tmp, model_dir):
    (tmp / "afile").write_text("not a directory")
    return model_dir


def no_train_split(tmp: Path, model_dir: Path) -> Path:
    """The model, beside a data directory ({tmp}/data) that has no WikiText-2 train file (the real one has)."""
    from conftest import write_data_dir

    write_data_dir(tmp / "data")
    return model_dir


def with_files(files: dict[str, str]):
    """The model, beside files written in the case's directory ({tmp}/PATH: text)."""
    def setup(tmp: Path, model_dir: Path) -> Path:
        for name, text in files.items():
            path = tmp / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        return model_dir

    return setup


def vlm(tmp, model_dir):
    from conftest import saved_vlm_dir

    return saved_vlm_dir(tmp / "vlm", "llava")


COMPRESS = ["compress", "{model}", "--method", "drop", "--blocks", "1"]
GRID = ["batch", "{tmp}/r.yaml", "--runs", "{tmp}/out"]
FUSE = ["compress", "{model}", "--method", "fuse", "--num-blocks", "1", "--calib-samples", "2", "--seqlen", "16",
        "--set", "resume={tmp}/state"]

# (id, setup, arguments, a fragment of the one error line). {model}, {tmp} are filled in; every
# `compress` case gets `--out {tmp}/out` unless it names its own.
CASES = [
    # names
    ("unknown-model", plain, ["compress", "no-such-model", "--method", "drop", "--blocks", "1"], "unknown model"),
    ("model-typo", plain, ["compress", "smolm2-135m", "--method", "drop", "--blocks", "1"], "did you mean smollm2-135m"),
    ("unknown-method", plain, ["compress", "{model}", "--method", "nosuch", "--sparsity", "0.5"], "unknown method"),
    ("no-method", plain, ["compress", "{model}", "--sparsity", "0.5"], "no method given"),
    ("unknown-task", plain, COMPRESS + ["--then-eval", "mmlux"], "unknown task"),
    ("unknown-ppl-dataset", plain, ["ppl", "{model}", "--dataset", "ptb"], "unknown dataset"),
    ("unknown-eval-task", plain, ["eval", "{model}", "--tasks", "wiki,nosuch"], "unknown task"),
    ("no-eval-task", plain, ["eval", "{model}", "--tasks", ","], "no tasks given"),
    ("unknown-option", plain, COMPRESS + ["--bogus-flag", "3"], "bogus_flag"),
    ("set-without-value", plain, COMPRESS + ["--set", "novalue"], "--set expects key=value"),
    ("unknown-cli-flag", plain, ["ppl", "{model}", "--bogus"], "No such option"),
    ("missing-argument", plain, ["ppl"], "Missing argument"),
    # amounts
    ("sparsity-above-1", plain, ["compress", "{model}", "--method", "sleb", "--sparsity", "1.5"], "sparsity must be in (0, 1)"),
    ("sparsity-zero", plain, ["compress", "{model}", "--method", "sleb", "--sparsity", "0"], "sparsity must be in (0, 1)"),
    ("sparsity-negative", plain, ["compress", "{model}", "--method", "sleb", "--sparsity=-0.2"], "sparsity must be in (0, 1)"),
    ("drop-no-blocks", plain, ["compress", "{model}", "--method", "drop"], "needs --blocks"),
    ("two-amounts", plain, ["compress", "{model}", "--method", "shortgpt", "--sparsity", "0.2", "--num-blocks", "1"],
     "only one of"),
    ("num-blocks-zero", plain, ["compress", "{model}", "--method", "shortgpt", "--num-blocks", "0"], "at least 1"),
    ("num-blocks-all", plain, ["compress", "{model}", "--method", "shortgpt", "--num-blocks", "{L}"], "would leave none"),
    ("blocks-all", plain, ["compress", "{model}", "--method", "drop", "--blocks", "{all}"], "would leave none"),
    ("blocks-out-of-range", plain, ["compress", "{model}", "--method", "drop", "--blocks", "{beyond}"], "out of range"),
    ("blocks-duplicate", plain, ["compress", "{model}", "--method", "drop", "--blocks", "3,3"], "listed twice"),
    ("blocks-negative", plain, ["compress", "{model}", "--method", "drop", "--blocks=-1"], "indices from 0"),
    ("blocks-not-integers", plain, ["compress", "{model}", "--method", "drop", "--blocks", "a,b"], "comma-separated integers"),
    ("blocks-on-shortgpt", plain, ["compress", "{model}", "--method", "shortgpt", "--blocks", "3"], "chooses its own"),
    ("blocks-on-fuse", plain, ["compress", "{model}", "--method", "fuse", "--blocks", "1,2"], "chooses its own"),
    ("drop-without-blocks", plain, ["compress", "{model}", "--method", "drop", "--num-blocks", "1"], "needs --blocks"),
    ("param-sparsity-above-1", plain, ["compress", "{model}", "--method", "sublayer", "--param-sparsity", "1.5"],
     "param_sparsity must be in (0, 1)"),
    ("param-sparsity-and-sparsity", plain, ["compress", "{model}", "--method", "sleb", "--param-sparsity", "0.2",
                                            "--sparsity", "0.2"], "only one of"),
    ("sublayer-all", plain, ["compress", "{model}", "--method", "sublayer", "--num-sublayers", "{2L}"], "would remove all"),
    ("sublayer-two-amounts", plain, ["compress", "{model}", "--method", "sublayer", "--num-sublayers", "1",
                                     "--param-sparsity", "0.2"], "one amount"),
    ("sublayer-blocks", plain, ["compress", "{model}", "--method", "sublayer", "--blocks", "1"], "chooses its own"),
    # calibration and evaluation settings
    ("calib-samples-zero", plain, ["compress", "{model}", "--method", "sleb", "--num-blocks", "1", "--calib-samples", "0"],
     "calib_samples"),
    ("seqlen-one", plain, ["compress", "{model}", "--method", "sleb", "--num-blocks", "1", "--seqlen", "1"], "seqlen"),
    ("seqlen-too-long", plain, ["compress", "{model}", "--method", "sleb", "--num-blocks", "1", "--seqlen", "100000"],
     "lower --seqlen"),
    # offloaded, the run announces its placement once loaded: a refusal must come before that notice
    ("seqlen-too-long-offloaded", plain, ["compress", "{model}", "--method", "sleb", "--num-blocks", "1", "--seqlen",
                                          "100000", "--offload", "disk"], "lower --seqlen"),
    ("calib-data-unknown", plain, ["compress", "{model}", "--method", "sleb", "--num-blocks", "1", "--calib-data", "ptb"],
     "calib_data"),
    ("eval-seqlen-too-long", plain, ["eval", "{model}", "--tasks", "wiki", "--seqlen", "100000"], "--seqlen (eval/ppl)"),
    ("eval-seqlen-one", plain, COMPRESS + ["--then-eval", "wiki", "--eval-seqlen", "1"], "--eval-seqlen"),
    ("run-gen-kwargs-no-value", plain, COMPRESS + ["--then-eval", "piqa", "--gen-kwargs", "max_gen_toks"],
     "--gen-kwargs takes key=value"),
    ("max-windows-zero", plain, ["ppl", "{model}", "--max-windows", "0"], "--max-windows"),
    ("ppl-batch-size-zero", plain, ["ppl", "{model}", "--batch-size", "0"], "--batch-size"),
    ("eval-limit-zero", plain, ["eval", "{model}", "--tasks", "piqa", "--limit", "0"], "--limit must be positive"),
    ("eval-gen-kwargs-no-value", plain, ["eval", "{model}", "--tasks", "piqa", "--gen-kwargs", "max_gen_toks"],
     "--gen-kwargs takes key=value"),
    ("eval-batch-size-zero", plain, ["eval", "{model}", "--tasks", "wiki", "--batch-size", "0"], "--batch-size"),
    ("eval-sample-zero", plain, ["eval", "{model}", "--tasks", "piqa", "--sample", "0"], "--sample"),
    ("eval-sample-of-perplexity", plain, ["eval", "{model}", "--tasks", "wiki", "--sample", "wiki=5"],
     "perplexity reads"),
    ("eval-sample-and-limit", plain, ["eval", "{model}", "--tasks", "piqa", "--sample", "5", "--limit", "5"],
     "give one of them"),
    ("run-sample-malformed", plain, ["run", "{model}", "--method", "drop", "--blocks", "1", "--out", "{tmp}/o",
                                     "--then-eval", "piqa", "--sample", "hs=2,,"], "task=N pairs"),
    ("compare-one-run", plain, ["compare", "{model}"], "at least two run directories"),
    ("compare-no-records", plain, ["compare", "{model}", "{model}"], "no per-document records"),
    ("eval-fewshot-negative", plain, ["eval", "{model}", "--tasks", "piqa", "--num-fewshot=-1"], "--num-fewshot"),
    ("data-dir-missing", plain, ["ppl", "{model}", "--data-dir", "{tmp}/missing", "--seqlen", "16"], "does not exist"),
    ("dtype-unknown", plain, ["ppl", "{model}", "--dtype", "float64", "--seqlen", "16"], "unknown dtype"),
    ("device-unknown", plain, ["ppl", "{model}", "--device", "nosuch", "--seqlen", "16"], "unknown device"),
    ("device-tpu", plain, ["ppl", "{model}", "--device", "meta", "--seqlen", "16"], "not supported"),
    ("compress-device-unknown", plain, COMPRESS + ["--device", "nosuch"], "unknown device"),
    ("eval-device-unknown", plain, ["eval", "{model}", "--tasks", "wiki", "--device", "nosuch"], "unknown device"),
    # quantization
    ("quantize-unknown", plain, COMPRESS + ["--quantize", "int4"], "quantize"),
    ("double-quant-without-4bit", plain, COMPRESS + ["--double-quant"], "4-bit"),
    ("compute-dtype-with-int8", plain, COMPRESS + ["--quantize", "int8", "--compute-dtype", "bfloat16"], "4-bit"),
    ("compute-dtype-unknown", plain, COMPRESS + ["--quantize", "nf4", "--compute-dtype", "fp64"], "compute_dtype"),
    # offload and sharding
    ("offload-unknown", plain, COMPRESS + ["--offload", "gpu"], "offload"),
    ("eval-offload-unknown", plain, ["ppl", "{model}", "--offload", "gpu", "--seqlen", "16"], "unknown --offload"),
    ("shard-size-bad", plain, COMPRESS + ["--max-shard-size", "5XB"], "is not a size"),
    ("offload-dir-is-a-file", regular_file, COMPRESS + ["--offload", "disk", "--offload-dir", "{tmp}/afile"],
     "--offload-dir"),
    ("offload-with-quantize", plain, COMPRESS + ["--offload", "disk", "--quantize", "int8"], "needs the whole model"),
    ("offload-with-recover", plain, COMPRESS + ["--offload", "cpu", "--recover", "lora"], "needs the whole model"),
    # method options
    ("merge-window-reversed", plain, ["compress", "{model}", "--method", "merge", "--window", "3-2"], "LAST must be greater"),
    ("merge-window-syntax", plain, ["compress", "{model}", "--method", "merge", "--window", "x"], "FIRST-LAST"),
    ("merge-num-merge-zero", plain, ["compress", "{model}", "--method", "merge", "--num-merge", "0"], "num_merge"),
    ("merge-too-many", plain, ["compress", "{model}", "--method", "merge", "--num-merge", "{beyond}"], "impossible"),
    ("merge-ff-fraction-one", plain, ["compress", "{model}", "--method", "merge", "--ff-fraction", "1"], "ff_fraction"),
    ("merge-with-sparsity", plain, ["compress", "{model}", "--method", "merge", "--num-merge", "1", "--sparsity", "0.2"],
     "removes FF sublayers"),
    ("merge-recover-unknown", plain, ["compress", "{model}", "--method", "merge", "--num-merge", "1", "--recover", "x"],
     "recover"),
    ("merge-recover-steps-zero", plain, ["compress", "{model}", "--method", "merge", "--num-merge", "1",
                                         "--recover", "lora", "--recover-steps", "0"], "recover_steps"),
    ("merge-windows-too-many", plain, ["compress", "{model}", "--method", "merge", "--num-merge", "1",
                                       "--num-windows", "2"], "--num-windows"),
    ("merge-windows-with-window", plain, ["compress", "{model}", "--method", "merge", "--window", "1-2",
                                          "--num-windows", "2"], "leave --window at auto"),
    ("merge-param-sparsity-and-num-merge", plain, ["compress", "{model}", "--method", "merge", "--num-merge", "1",
                                                   "--param-sparsity", "0.2"], "one amount"),
    ("recover-data-unknown", plain, COMPRESS + ["--recover", "lora", "--recover-data", "web"], "recover_data"),
    ("recover-loss-unknown", plain, COMPRESS + ["--recover", "lora", "--recover-loss", "l2"], "recover_loss"),
    ("recover-kd-weight-without-mix", plain, COMPRESS + ["--recover", "lora", "--recover-kd-weight", "0.3"],
     "--recover-loss ce+kd"),
    ("recover-kd-weight-out-of-range", plain, COMPRESS + ["--recover", "lora", "--recover-loss", "ce+kd",
                                                          "--recover-kd-weight", "1.5"], "recover_kd_weight"),
    ("recover-save-every-zero", plain, COMPRESS + ["--recover", "lora", "--recover-resume", "{tmp}/state",
                                                   "--recover-save-every", "0"], "recover_save_every"),
    ("recover-resume-not-json", with_files({"state/state.json": "{not json"}),
     COMPRESS + ["--recover", "lora", "--recover-steps", "1", "--seqlen", "16", "--recover-resume", "{tmp}/state"],
     "remove the directory to start afresh"),
    ("recover-resume-foreign-state", with_files({"state/state.json": '{"step": 3}'}),
     COMPRESS + ["--recover", "lora", "--recover-steps", "1", "--seqlen", "16", "--recover-resume", "{tmp}/state"],
     "not a state this tool wrote"),
    ("recover-resume-is-a-file", with_files({"state": "a file"}),
     COMPRESS + ["--recover", "lora", "--recover-steps", "1", "--seqlen", "16", "--recover-resume", "{tmp}/state"],
     "is a file"),
    ("recover-train-file-missing", no_train_split, COMPRESS + ["--recover", "lora", "--recover-steps", "1",
                                                               "--recover-data", "train", "--seqlen", "16",
                                                               "--data-dir", "{tmp}/data"], "wiki.train.tokens.gz"),
    ("image-text-calib-text-model", plain, ["compress", "{model}", "--method", "sleb", "--num-blocks", "1",
                                            "--calib-data", "easy-vqa"], "for vision-language models"),
    ("fuse-align-tokens-one", plain, ["compress", "{model}", "--method", "fuse", "--num-blocks", "1", "--align-ff",
                                      "--align-tokens", "1"], "align_tokens"),
    ("fuse-epochs-zero", plain, ["compress", "{model}", "--method", "fuse", "--num-blocks", "1", "--epochs", "0"], "epochs"),
    ("fuse-lr-beyond-float", plain, ["compress", "{model}", "--method", "fuse", "--num-blocks", "1", "--set",
                                     "lr_coef=1e39"], "lr_coef"),
    ("recover-lr-beyond-float", plain, ["compress", "{model}", "--method", "merge", "--num-merge", "1", "--recover",
                                        "full", "--recover-lr", "1e39"], "recover_lr"),
    ("fuse-profile-unknown", plain, ["compress", "{model}", "--method", "fuse", "--num-blocks", "1", "--profile", "gpu"],
     "profile"),
    ("fuse-loss-unknown", plain, ["compress", "{model}", "--method", "fuse", "--num-blocks", "1", "--loss", "l1"], "loss"),
    ("sleb-batch-size-zero", plain, ["compress", "{model}", "--method", "sleb", "--num-blocks", "1", "--set", "batch_size=0"],
     "batch_size"),
    ("unknown-method-option", plain, ["compress", "{model}", "--method", "sleb", "--num-blocks", "1", "--set", "x=1"],
     "x"),
    # output directory
    ("out-exists", plain, COMPRESS + ["--out", "{tmp}"], "already exists"),
    ("out-under-a-file", regular_file, COMPRESS + ["--out", "{tmp}/afile/out"], "is a file"),
    ("out-in-proc", plain, COMPRESS + ["--out", "/proc/compress-eval-out"], "not writable"),
    # files we read
    ("weights-truncated-compress", truncated_weights, COMPRESS, "truncated or corrupt"),
    ("weights-truncated-ppl", truncated_weights, ["ppl", "{model}", "--seqlen", "16"], "truncated or corrupt"),
    ("weights-truncated-eval", truncated_weights, ["eval", "{model}", "--tasks", "wiki", "--seqlen", "16"],
     "truncated or corrupt"),
    ("weights-empty-ppl", empty_weights, ["ppl", "{model}", "--seqlen", "16"], "truncated or corrupt"),
    ("pickle-compress", pickle_only, COMPRESS, "--allow-pickle"),
    ("pickle-ppl", pickle_only, ["ppl", "{model}", "--seqlen", "16"], "--allow-pickle"),
    ("pickle-eval", pickle_only, ["eval", "{model}", "--tasks", "wiki", "--seqlen", "16"], "--allow-pickle"),
    ("manifest-list-ppl", manifest_list, ["ppl", "{model}", "--seqlen", "16"], "not a JSON object"),
    ("manifest-list-eval", manifest_list, ["eval", "{model}", "--tasks", "wiki", "--seqlen", "16"], "not a JSON object"),
    ("manifest-list-compress", manifest_list, COMPRESS, "not a JSON object"),
    ("manifest-not-utf8", manifest_not_utf8, ["ppl", "{model}", "--seqlen", "16"], "not UTF-8"),
    ("manifest-not-json", manifest_not_json, ["eval", "{model}", "--tasks", "wiki", "--seqlen", "16"], "not valid JSON"),
    ("model-dir-without-config", no_config, ["ppl", "{model}", "--seqlen", "16"], "without config.json"),
    ("config-without-model-type", no_model_type, ["ppl", "{model}", "--seqlen", "16"], "has no model_type"),
    ("no-tokenizer-files", no_tokenizer, COMPRESS, "has no tokenizer files"),
    ("config-more-layers-than-weights", more_layers, ["eval", "{model}", "--tasks", "wiki", "--seqlen", "16"],
     "config.json names {L+2} blocks but the weights hold {L}"),
    ("recipe-stages-a-mapping", recipe("model: {model}\nstages: {method: drop, blocks: [1]}\n"),
     ["compress", "--recipe", "{tmp}/r.yaml"], "stages must be a list"),
    ("recipe-stages-a-string", recipe("model: {model}\nstages: shortgpt\n"), ["compress", "--recipe", "{tmp}/r.yaml"],
     "stages must be a list"),
    ("recipe-missing", plain, ["compress", "--recipe", "{tmp}/none.yaml"], "not found"),
    ("recipe-directory", plain, ["compress", "--recipe", "{tmp}"], "is a directory"),
    ("recipe-not-utf8", recipe(b"\xff\xfemodel: x\n"), ["compress", "--recipe", "{tmp}/r.yaml"], "not UTF-8"),
    ("recipe-not-yaml", recipe("model: [unclosed\n"), ["compress", "--recipe", "{tmp}/r.yaml"], "not valid YAML"),
    ("recipe-a-list", recipe("- model\n- method\n"), ["compress", "--recipe", "{tmp}/r.yaml"], "must be a mapping"),
    ("recipe-options-a-list", recipe("model: {model}\nmethod: sleb\nnum_blocks: 1\noptions: [1, 2]\n"),
     ["compress", "--recipe", "{tmp}/r.yaml"], "options must be a mapping"),
    ("recipe-options-a-string", recipe("model: {model}\nmethod: sleb\nnum_blocks: 1\noptions: fast\n"),
     ["compress", "--recipe", "{tmp}/r.yaml"], "options must be a mapping"),
    ("recipe-unknown-key", recipe("model: {model}\nmethod: sleb\nnum_blocks: 1\nsparsty: 0.2\n"),
     ["compress", "--recipe", "{tmp}/r.yaml"], "sparsty"),
    ("resume-state-not-json", resume_state("{garbage"), FUSE, "--resume"),
    ("resume-state-a-list", resume_state("[]"), FUSE, "not a JSON object"),
    ("resume-state-foreign", resume_state('{"a": 1}'), FUSE, "lacks fingerprint"),
    # other commands
    ("leaderboard-missing", plain, ["leaderboard", "{tmp}/none"], "not found"),
    ("leaderboard-no-runs", plain, ["leaderboard", "{tmp}", "--out", "{tmp}/out"], "no finished runs"),
    ("leaderboard-only-broken-runs", recipe("", damaged("run", lambda p: (p / "compress_eval.json").write_text("{"))),
     ["leaderboard", "{tmp}", "--out", "{tmp}/out"], "1 skipped"),
    ("batch-grid-missing", plain, ["batch", "{tmp}/none.yaml"], "not found"),
    ("batch-grid-not-yaml", recipe("models: [unclosed\n"), ["batch", "{tmp}/r.yaml"], "not valid YAML"),
    ("batch-grid-invalid", recipe("models: []\nmethods: [none]\ntasks: [wiki]\n"), ["batch", "{tmp}/r.yaml"], "models"),
    ("batch-unknown-method-after-a-good-one", recipe("models: [{model}]\nmethods: [none, nosuch]\ntasks: [wiki]\n"),
     GRID, "unknown method"),
    ("batch-unknown-method-option", recipe("models: [{model}]\nmethods: [none, {method: sleb, options: {x: 1}}]\n"
                                           "sparsities: [0.25]\ntasks: [wiki]\n"), GRID, "x"),
    ("batch-unknown-task", recipe("models: [{model}]\nmethods: [none]\ntasks: [wiki, nosuch]\n"), GRID,
     "unknown task"),
    ("batch-unknown-model", recipe("models: [{model}, no-such-model]\nmethods: [none]\ntasks: [wiki]\n"), GRID,
     "unknown model"),
    ("batch-broken-model", recipe("models: [{model}]\nmethods: [none]\ntasks: [wiki]\n", more_layers), GRID,
     "config.json names {L+2} blocks"),
    ("batch-amount-leaves-none", recipe("models: [{model}]\nmethods: [none, {method: shortgpt, num_blocks: [1, {L}]}]\n"
                                        "tasks: [wiki]\n"), GRID, "would leave none"),
    ("batch-block-out-of-range", recipe("models: [{model}]\nmethods: [none, {method: drop, blocks: [[{beyond}]]}]\n"
                                        "tasks: [wiki]\n"), GRID, "out of range"),
    ("batch-jobs-zero", recipe("models: [x]\nmethods: [none]\ntasks: [wiki]\n"), ["batch", "{tmp}/r.yaml", "--jobs", "0"],
     "--jobs"),
    # the Hub (checked before any work)
    ("push-to-hub-bad-id", plain, COMPRESS + ["--push-to-hub", "org/bad id"], "invalid Hub repository id"),
    ("push-to-hub-three-parts", plain, COMPRESS + ["--push-to-hub", "a/b/c"], "invalid Hub repository id"),
    ("private-without-push", plain, COMPRESS + ["--private"], "--private applies to --push-to-hub"),
    ("push-bad-id", plain, ["push", "{model}", "org/x..y"], "invalid Hub repository id"),
    ("export-not-a-checkpoint", plain, ["export", "{model}", "--out", "{tmp}/out"], "not a compress-eval checkpoint"),
]


def leftovers(tmp: Path, before: set[Path]) -> list[Path]:
    """Output or temp dirs a failed run left: anything new named out or *.tmp-* under ``tmp``."""
    return [p for p in tmp.rglob("*") if p not in before and (p.name == "out" or ".tmp-" in p.name)]


def run_case(setup, args: list[str], model_dir: Path, work: Path, env: dict | None = None):
    """Prepare one case in ``work`` and run it through the CLI in process: (result, leftovers)."""
    work.mkdir()
    model = setup(work, model_dir)
    args = [scaled(a.replace("{model}", str(model)).replace("{tmp}", str(work)), depth(model_dir)) for a in args]
    if args[0] == "compress" and "--out" not in args:
        args += ["--out", str(work / "out")]
    before = set(work.rglob("*"))
    result = CliRunner().invoke(app, args, env=env)
    return result, leftovers(work, before)


@pytest.mark.parametrize("case_id,setup,args,fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case_id, setup, args, fragment, tiny_model_dir, data_dir, tmp_path):
    result, left = run_case(setup, args, tiny_model_dir, tmp_path / "case")
    one_line_error(result, scaled(fragment, depth(tiny_model_dir)))
    assert not left


@pytest.mark.parametrize("command", [["ppl", "--seqlen", "16"], ["eval", "--tasks", "piqa", "--limit", "2"]],
                         ids=["ppl", "lm-eval-task"])
def test_hub_unreachable_without_data_dir(command, tiny_model_dir, tmp_path):
    """No data directory and no Hub: one line naming the local alternative (in a fresh process, since
    the Hub libraries read their offline switch at import)."""
    env = {k: v for k, v in os.environ.items() if k != "COMPRESS_EVAL_DATA_DIR"}
    # Its own cache: a prepared data directory in the user's would be found (it comes after the variable).
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(REPO), COMPRESS_EVAL_CACHE=str(tmp_path))
    argv = [sys.executable, "-m", "compress_eval", command[0], str(tiny_model_dir), *command[1:]]
    result = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--data-dir" in lines[0] and "COMPRESS_EVAL_DATA_DIR" in lines[0], result.stderr
    assert "compress-eval data prepare" in lines[0]


def test_then_eval_error_names_the_eval_flag(tiny_model_dir, data_dir, tmp_path):
    """The checkpoint is complete and kept (`eval` can be re-run on it); the error names --eval-seqlen."""
    out = tmp_path / "out"
    result = CliRunner().invoke(app, COMPRESS[:1] + [str(tiny_model_dir)] + COMPRESS[2:] + [
        "--out", str(out), "--then-eval", "wiki", "--eval-seqlen", "100000"])
    assert result.exit_code == 2 and "--eval-seqlen" in result.stderr.strip().splitlines()[-1]
    assert (out / "compress_eval.json").exists() and not (out / "results_ppl.json").exists()


def test_allow_pickle_reads_pickle_weights(tiny_model_dir, data_dir, tmp_path):
    model = pickle_only(tmp_path, tiny_model_dir)
    result = CliRunner().invoke(app, ["ppl", str(model), "--seqlen", "16", "--max-windows", "2", "--allow-pickle"])
    assert result.exit_code == 0, result.output
    assert float(result.stdout.strip().splitlines()[-1]) > 1


def test_concurrent_writer_to_the_same_out(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    """Another run renames its output into place while this one saves: one line, nothing of ours kept,
    the other run's output untouched."""
    from compress_eval.models import checkpoint

    out = tmp_path / "out"
    save = checkpoint.save_model_files

    def racing_save(model, tokenizer, directory, *args):
        save(model, tokenizer, directory, *args)
        out.mkdir()
        (out / "theirs.txt").write_text("the other run")

    monkeypatch.setattr(checkpoint, "save_model_files", racing_save)
    result = CliRunner().invoke(app, ["compress", str(tiny_model_dir), "--method", "drop", "--blocks", "1",
                                      "--out", str(out)])
    one_line_error(result, "created by another run")
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]
    assert not checkpoint.temp_dirs(out)


def test_output_modes_follow_the_umask(tiny_model_dir, data_dir, tmp_path):
    """The checkpoint directory and its files get the modes mkdir / open give (not mkdtemp's 0700)."""
    out = tmp_path / "out"
    old = os.umask(0o022)
    try:
        result = CliRunner().invoke(app, ["compress", str(tiny_model_dir), "--method", "drop", "--blocks", "1",
                                          "--out", str(out), "--then-eval", "wiki", "--eval-seqlen", "16",
                                          "--max-windows", "2"])
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    assert out.stat().st_mode & 0o777 == 0o755
    for name in ("compress_eval.json", "results_ppl.json", "model.safetensors"):
        assert (out / name).stat().st_mode & 0o777 == 0o644, name


def test_results_json_is_strict(tmp_path):
    """A non-finite metric is stored as null, never as a NaN / Infinity literal."""
    from compress_eval.results.store import store_ppl_results

    store_ppl_results(tmp_path, {"wikitext2_ppl": {"ppl": float("nan"), "seqlen": 16, "windows": 2},
                             "c4_ppl": {"ppl": float("inf"), "seqlen": 16, "windows": 2}})
    text = (tmp_path / "results_ppl.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    data = json.loads(text, parse_constant=lambda name: pytest.fail(f"non-strict literal {name}"))
    assert data["wikitext2_ppl"]["ppl"] is None and data["c4_ppl"]["ppl"] is None
