"""ShortGPT, SLEB and window drop on tiny models, against brute-force references built here."""

import copy
import json

import pytest
import torch
from typer.testing import CliRunner

from compress_eval.cli.app import app
from compress_eval.config import CompressConfig
from compress_eval.errors import UserError
from compress_eval.methods.registry import get_method
from compress_eval.models.adapters import get_adapter
from compress_eval.models.loading import load_checkpoint
from compress_eval.scoring.importance import naive_block_influence, naive_removal_nll
from conftest import VOCAB, deep_tiny

L = 8  # conftest.deep_tiny's default depth


def run_method(method, model, calib, **amount):
    compressor = get_method(CompressConfig(model="tiny", method=method, **amount))
    return compressor.compress(get_adapter(model), calib)


@pytest.fixture
def calib():
    return torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(3))


def brute_force_sleb(model, calib, k, protect_ends=True):
    """Greedy SLEB by full forwards of pruned copies of the dense model."""
    removed, alive = [], list(range(L))
    for _ in range(k):
        candidates = alive[1:-1] if protect_ends else alive
        scores = {j: naive_removal_nll(model, calib, removed + [j]) for j in candidates}
        best = min(candidates, key=lambda j: (scores[j], j))
        removed.append(best)
        alive.remove(best)
    return removed


@pytest.mark.parametrize("family,k", [("llama", 2), ("gpt2", 2), ("gemma3_text", 2)])
def test_sleb_matches_brute_force_greedy(family, k, calib):
    model = deep_tiny(family)
    expected = brute_force_sleb(model, calib, k)
    record = run_method("sleb", copy.deepcopy(model), calib, num_blocks=k)
    assert record.details["removal_order"] == expected
    assert record.removed_blocks == sorted(expected)
    first = record.details["iterations"][0]
    assert first["candidates"] == list(range(1, L - 1))
    assert first["nll"] == pytest.approx([naive_removal_nll(model, calib, [j]) for j in range(1, L - 1)], rel=1e-5)
    assert record.artifacts["sleb_scores.png"].startswith(b"\x89PNG")


def test_sleb_without_end_protection_considers_every_block(calib):
    model = deep_tiny(seed=1)
    sleb = get_method(CompressConfig(model="tiny", method="sleb", num_blocks=1, options={"protect_ends": False}))
    record = sleb.compress(get_adapter(copy.deepcopy(model)), calib)
    assert record.details["iterations"][0]["candidates"] == list(range(L))
    assert record.details["removal_order"] == brute_force_sleb(model, calib, 1, protect_ends=False)


def test_sleb_refuses_to_remove_an_end_block(calib):
    with pytest.raises(UserError, match="at most 6 blocks"):
        run_method("sleb", deep_tiny(), calib, num_blocks=7)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_shortgpt_removes_the_lowest_block_influence(family, calib):
    model = deep_tiny(family)
    bi = naive_block_influence(model, calib)
    expected = sorted(range(L), key=lambda i: bi[i])[:3]
    record = run_method("shortgpt", model, calib, sparsity=0.3)  # ceil(8 * 0.3) = 3
    assert record.removed_blocks == sorted(expected)
    assert record.details["block_influence"] == pytest.approx(bi, rel=1e-5, abs=1e-6)
    assert get_adapter(model).num_blocks == L - 3


def test_drop_window_picks_the_best_contiguous_window(calib):
    model = deep_tiny()
    naive = {s: naive_removal_nll(model, calib, list(range(s, s + 3))) for s in range(L - 2)}
    best = min(naive, key=naive.get)
    record = run_method("drop-window", model, calib, num_blocks=3)
    assert record.removed_blocks == [best, best + 1, best + 2]
    assert record.details["starts"] == list(range(L - 2))
    assert record.details["nll"] == pytest.approx([naive[s] for s in range(L - 2)], rel=1e-5)


def test_unknown_option_is_a_user_error():
    with pytest.raises(UserError, match="batch_sise"):
        get_method(CompressConfig(model="tiny", method="sleb", sparsity=0.25, options={"batch_sise": 2}))


@pytest.mark.parametrize("method", ["shortgpt", "sleb", "drop-window"])
def test_cli_compress_writes_reloadable_checkpoint_that_generates(method, tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["compress", str(tiny_model_dir), "--method", method, "--sparsity", "0.5",
                                      "--calib-samples", "3", "--seqlen", "16", "--set", "batch_size=2",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "compress_eval.json").read_text())
    assert manifest["blocks_before"] == 4 and manifest["blocks_after"] == 2
    assert len(manifest["removed_blocks"]) == 2 and manifest["method_options"]["batch_size"] == 2
    if method == "sleb":
        assert manifest["removed_blocks"] == [1, 2]  # the ends are protected
        assert [len(it["nll"]) for it in manifest["details"]["iterations"]] == [2, 1]
    assert list(out.glob("*.png"))
    model, _ = load_checkpoint(out)
    assert get_adapter(model).num_blocks == 2 and model.config.num_hidden_layers == 2
    generated = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 7)
