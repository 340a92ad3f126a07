"""Model cards (README.md) of checkpoints, and pushing checkpoints to the Hub (with a stand-in HfApi:
no network)."""

from __future__ import annotations

import json

import pytest
from huggingface_hub import ModelCard, constants
from huggingface_hub.hf_api import RepoUrl
from typer.testing import CliRunner

from conftest import one_line_error, saved_model_dir, stub_manifest, tiny_model

from compress_eval.cli.app import app
from compress_eval.manifest import Manifest
from compress_eval.results import hub, store

REPO = "org/tiny-pruned"


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def checkpoint_dir(path, **fields):
    """A directory holding only a manifest (what pipeline.save has written when it renders the card)."""
    path.mkdir()
    store.write_manifest(path, Manifest.model_validate({**stub_manifest().model_dump(), **fields}))
    return path


def whole_checkpoint_dir(path):
    """A checkpoint the loading gate accepts (a push checks it first): a tiny model, its tokenizer, a manifest."""
    saved_model_dir(path, tiny_model("llama"))
    store.write_manifest(path, stub_manifest())
    return path


class RecordingApi:
    """HfApi's two calls, recorded; the card as uploaded is kept, since a push renders it first."""

    calls: list = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs, (kwargs["folder_path"] / "README.md").read_text()))


@pytest.fixture
def online(monkeypatch):
    """A token and the Hub switched on, whatever the environment running the tests says."""
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def hub_api(online, monkeypatch):
    monkeypatch.setattr(RecordingApi, "calls", [])
    monkeypatch.setattr(hub, "HfApi", RecordingApi)
    return RecordingApi


def test_compress_writes_card_and_eval_updates_it(tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "out"
    result = invoke("compress", tiny_model_dir, "--method", "drop", "--blocks", "1,2", "--out", out)
    assert result.exit_code == 0, result.output
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert card.data.tags == ["compress-eval", "drop", "pruned"]
    assert card.data.base_model is None  # a local directory has no Hub id
    assert "(indices in the original model): 1, 2" in card.text and "No evaluations yet" in card.text
    assert 'AutoModelForCausalLM.from_pretrained("DIR")' in card.text  # no tie map, not quantized
    assert "```yaml\nmodel: " in card.text
    # the exact command: the model is a local directory, calibration read the data directory
    assert (f"compress-eval compress MODEL --recipe recipe.yaml --data-dir {data_dir.resolve()} --out OUT"
            in card.text) and f"(`{tiny_model_dir}` where it was made)" in card.text

    result = invoke("eval", out, "--tasks", "wiki", "--seqlen", 16, "--max-windows", 2)
    assert result.exit_code == 0, result.output
    ppl = json.loads((out / "results_ppl.json").read_text())["wikitext2_ppl"]["ppl"]
    card = ModelCard.load(out / "README.md")
    assert f"| wikitext2 | perplexity | {ppl:.4f} | 2 windows of 16 tokens |" in card.text
    assert "No evaluations yet" not in card.text


def test_card_of_a_staged_quantized_run(tmp_path):
    """Front matter from the packaged model's Hub id and every stage; tables of stages and results; the
    loader named where transformers alone would not re-tie the weights."""
    stages = [{"kind": "method", "method": "shortgpt", "removed_blocks": [3], "tied": [], "params_after": 30,
               "weight_bytes_after": 120, "seconds": 1.5},
              {"kind": "method", "method": "merge", "removed_blocks": [], "tied": ["model.layers.1.mlp"],
               "params_after": 20, "weight_bytes_after": 80, "seconds": 2.0},
              {"kind": "quantize", "params_after": 20, "weight_bytes_after": 30, "seconds": 0.5}]
    run = checkpoint_dir(
        tmp_path / "run", base_model={"name": "smollm2-135m", "kind": "packaged", "location": "/cache"},
        method="shortgpt+merge", recipe="model: smollm2-135m\n", removed_blocks=[3], tie_map={"model.layers.1.mlp": "model.layers.0.mlp"},
        params_before=40, params_after=20, weight_bytes_before=160, weight_bytes_after=30, stages=stages,
        quantization={"kind": "nf4", "double_quant": True, "compute_dtype": "float32", "unquantized": {}})
    store.store_lm_eval_results(run, {"results": {"ce_piqa": {"acc,none": 0.625}}, "config": {"limit": 8},
                                      "n-samples": {"ce_piqa": {"original": 1838, "effective": 8}},
                                      "n-shot": {"ce_piqa": 0}})
    card = ModelCard.load(run / "README.md")
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert card.data.tags == ["compress-eval", "shortgpt", "merge", "pruned", "quantized", "nf4"]
    assert "| 2 | merge |  | `model.layers.1.mlp` | 20 | 80 | 2.0 |" in card.text
    assert "| piqa | accuracy | 0.6250 | 8 of 1838 documents, 0-shot |" in card.text and "`--limit 8`" in card.text
    assert "load_model(\"DIR\")" in card.text and "from_pretrained" not in card.text
    assert "```bash\ncompress-eval compress --recipe recipe.yaml --out OUT\n```" in card.text


def test_card_names_the_hub_base_of_a_local_checkpoint(tmp_path):
    """A checkpoint compressed from another checkpoint names the first one's Hub model."""
    first = checkpoint_dir(tmp_path / "first", base_model={"name": "llama3-8b", "kind": "hub",
                                                             "location": "meta-llama/Meta-Llama-3-8B"})
    second = checkpoint_dir(tmp_path / "second", base_model={"name": str(first), "kind": "local",
                                                               "location": str(first)})
    store.write_card(second)
    assert ModelCard.load(second / "README.md").data.base_model == "meta-llama/Meta-Llama-3-8B"


def test_a_users_readme_is_never_overwritten(tmp_path):
    run = checkpoint_dir(tmp_path / "run")
    (run / "README.md").write_text("# my own card\n")
    assert store.write_card(run) is None
    store.store_ppl_results(run, {"wikitext2_ppl": {"ppl": 12.5, "seqlen": 16, "windows": 2}})
    assert (run / "README.md").read_text() == "# my own card\n"


def test_run_pushes_after_its_evaluation(tiny_model_dir, data_dir, tmp_path, hub_api):
    out = tmp_path / "out"
    result = invoke("run", tiny_model_dir, "--method", "drop", "--blocks", "1", "--out", out, "--then-eval", "wiki",
                    "--eval-seqlen", 16, "--max-windows", 2, "--push-to-hub", REPO, "--private")
    assert result.exit_code == 0, result.output
    (_, repo, options), (_, upload, card) = hub_api.calls
    assert repo == REPO and options == {"private": True, "exist_ok": True}
    assert upload["repo_id"] == REPO and upload["folder_path"] == out
    assert "| wikitext2 | perplexity |" in card and f"hf download {REPO} --local-dir DIR" in card
    assert result.output.strip().endswith(f"pushed {out} to https://huggingface.co/{REPO}")


def test_push_command(tmp_path, hub_api):
    run = whole_checkpoint_dir(tmp_path / "run")
    result = invoke("push", run, REPO)
    assert result.exit_code == 0, result.output
    assert [c[0] for c in hub_api.calls] == ["create_repo", "upload_folder"]
    assert hub_api.calls[0][2]["private"] is False and hub_api.calls[1][1]["folder_path"] == run


def test_push_refuses_a_directory_without_manifest(tiny_model_dir, hub_api):
    one_line_error(invoke("push", tiny_model_dir, REPO), "not a compress-eval checkpoint")
    assert not hub_api.calls


def test_push_offline_is_one_line(tmp_path, hub_api, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    one_line_error(invoke("push", checkpoint_dir(tmp_path / "run"), REPO), "unset HF_HUB_OFFLINE")
    assert not hub_api.calls


def test_push_without_token_is_one_line(tmp_path, online, monkeypatch):
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    one_line_error(invoke("push", checkpoint_dir(tmp_path / "run"), REPO), "hf auth login")


def test_push_to_an_unreachable_hub_is_one_line(tmp_path, online, monkeypatch):
    """The real HfApi against a closed port: the transport's error, named, with how to push again."""
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    run = whole_checkpoint_dir(tmp_path / "run")
    result = invoke("push", run, REPO)
    one_line_error(result, "cannot reach the Hugging Face Hub at http://127.0.0.1:9")
    assert f"push it again with `compress-eval push {run} {REPO}`" in result.stderr


def test_compress_checks_the_push_before_compressing(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "out"
    one_line_error(invoke("compress", tiny_model_dir, "--method", "drop", "--blocks", "1", "--out", out,
                          "--push-to-hub", REPO), "HF_HUB_OFFLINE")
    assert not out.exists()
