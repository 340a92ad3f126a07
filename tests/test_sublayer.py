"""Sublayer pruning (BlockPruner-style): scores against brute force, the parameter target, checkpoints
that reload (our loader, generate with the KV cache, the plain export), and what it refuses."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from typer.testing import CliRunner

from compress_eval.cli.app import app
from compress_eval.config import CompressConfig, make_config
from compress_eval.errors import UserError
from compress_eval.methods.registry import get_method
from compress_eval.models.adapters import get_adapter
from compress_eval.models.loading import load_model
from compress_eval.models.sublayers import skipped_paths
from compress_eval.pipeline import compress, save
from compress_eval.scoring.importance import full_forward_nll
import conftest
from conftest import VOCAB, one_line_error, saved_model_dir

L = 6


def deep_tiny(family="llama", seed=0):
    return conftest.deep_tiny(family, seed, L)


@pytest.fixture
def calib():
    return torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(3))


def run_method(model, calib, **amount):
    options = {k: amount.pop(k) for k in list(amount) if k == "num_sublayers"}
    compressor = get_method(CompressConfig(model="tiny", method="sublayer", options=options, **amount))
    return compressor.compress(get_adapter(model), calib)


def brute_force(model, calib, k):
    """Greedy sublayer removal by full forwards of copies of the dense model with sublayers skipped."""
    removed = []
    for _ in range(k):
        scores = {}
        for i in range(L):
            for kind in ("attn", "mlp"):
                if (i, kind) in removed:
                    continue
                pruned = copy.deepcopy(model)
                for j, other in removed + [(i, kind)]:
                    get_adapter(pruned).skip_sublayer(j, other)
                scores[(i, kind)] = full_forward_nll(pruned, calib)
        removed.append(min(scores, key=lambda c: (scores[c], c[0], c[1])))
    return removed, scores


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3_text"])
def test_greedy_order_and_scores_match_brute_force(family, calib):
    model = deep_tiny(family)
    expected, _ = brute_force(model, calib, 3)
    record = run_method(copy.deepcopy(model), calib, num_sublayers=3)
    assert [tuple(r) for r in record.details["removal_order"]] == expected
    first = record.details["iterations"][0]
    assert len(first["candidates"]) == 2 * L
    naive = []
    for i, kind in first["candidates"]:
        pruned = copy.deepcopy(model)
        get_adapter(pruned).skip_sublayer(i, kind)
        naive.append(full_forward_nll(pruned, calib))
    assert first["nll"] == pytest.approx(naive, rel=1e-5)


def test_parameter_target_stops_as_soon_as_it_is_reached(calib):
    model = deep_tiny()
    total = get_adapter(model).block_parameters()
    record = run_method(model, calib, param_sparsity=0.3)
    removed = record.details["removed_parameters"]
    last = record.details["iterations"][-1]["parameters"]
    assert removed >= 0.3 * total > removed - last
    assert record.details["target_parameters"] == pytest.approx(0.3 * total, abs=1)
    assert get_adapter(model).block_parameters() == total - removed  # the weights are gone, not zeroed


def test_a_block_without_both_sublayers_is_removed_as_a_block(calib, monkeypatch):
    from compress_eval.scoring.prefix import PrefixStates

    # Scores that make block 2's sublayers the cheapest (the method's bookkeeping is under test here).
    monkeypatch.setattr(PrefixStates, "score_each_sublayer_removal",
                        lambda self, score, candidates: [0.0 if i == 2 else 1.0 + i for i, _ in candidates])
    model = deep_tiny(seed=2)
    record = run_method(model, calib, num_sublayers=3)
    assert record.details["removal_order"][:2] == [[2, "attn"], [2, "mlp"]]
    # The block that is now third (original block 3) scores 0 next: named by its original index.
    assert record.details["removal_order"][2] == [3, "attn"]
    assert record.removed_blocks == [2]
    assert get_adapter(model).num_blocks == L - 1 and model.config.num_hidden_layers == L - 1
    assert skipped_paths(model) == ["model.layers.2.self_attn"]
    assert [m.self_attn.layer_idx for m in get_adapter(model).blocks] == list(range(L - 1))


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_generate_with_a_removed_first_attention_matches_without_cache(family):
    """The cache's first layer tells generate how many positions went by: a removed attention there
    must still count them."""
    model = deep_tiny(family)
    get_adapter(model).skip_sublayer(0, "attn")
    get_adapter(model).skip_sublayer(3, "mlp")
    ids = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    cached = model.generate(ids, use_cache=True, **kw)
    plain = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(cached, plain)


@pytest.fixture
def six_block_dir(tmp_path, data_dir):
    return saved_model_dir(tmp_path / "six", deep_tiny())


def test_checkpoint_reloads_and_exports_to_plain_transformers(six_block_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "pruned"
    result = CliRunner().invoke(app, ["compress", str(six_block_dir), "--method", "sublayer", "--param-sparsity",
                                      "0.2", "--calib-samples", "4", "--seqlen", "32", "--out", str(out)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "compress_eval.json").read_text())
    assert manifest["skipped"] and manifest["stages"][0]["skipped"] == manifest["skipped"]
    assert manifest["params_after"] <= manifest["params_before"] - manifest["details"]["target_parameters"]
    from safetensors.torch import load_file
    stored = load_file(out / "model.safetensors")
    assert not [k for k in stored for p in manifest["skipped"] if k.startswith(p + ".")]
    model, _, _ = load_model(str(out), "cpu")
    assert skipped_paths(model) == manifest["skipped"]
    ids = torch.randint(0, VOCAB, (1, 10))
    with torch.no_grad():
        ours = model(ids).logits
    result = CliRunner().invoke(app, ["export", str(out), "--out", str(tmp_path / "plain")])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "plain" / "compress_eval.json").exists()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain").eval()
    assert skipped_paths(plain) == []
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, ours, rtol=1e-5, atol=1e-5)
    assert "Removed sublayers" in (out / "README.md").read_text()


def test_quantize_stage_after_sublayers_reloads(six_block_dir, tmp_path):
    cfg = make_config(model=str(six_block_dir), method="sublayer", options={"num_sublayers": 2}, quantize="int8",
                      calib_samples=2, seqlen=16)
    result = compress(cfg)
    assert len(result.manifest.skipped) >= 1
    out = save(result, tmp_path / "q")
    model, _, _ = load_model(str(out), "cpu")
    assert skipped_paths(model) == result.manifest.skipped
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, VOCAB, (1, 8))).logits).all()


def test_methods_that_read_linears_refuse_a_model_without_some_sublayers(six_block_dir, tmp_path):
    stages = [{"method": "sublayer", "options": {"num_sublayers": 1}}, {"method": "fuse", "num_blocks": 1}]
    with pytest.raises(UserError, match="stage before it removes"):
        compress(make_config(model=str(six_block_dir), stages=stages, calib_samples=2, seqlen=16))
    # A depth method after sublayer pruning runs (it only runs and drops whole blocks).
    stages = [{"method": "sublayer", "options": {"num_sublayers": 2}}, {"method": "shortgpt", "num_blocks": 1}]
    result = compress(make_config(model=str(six_block_dir), stages=stages, calib_samples=2, seqlen=16))
    assert result.manifest.blocks_after <= L - 1
    out = save(result, tmp_path / "two")
    result = CliRunner().invoke(app, ["compress", str(out), "--method", "mi", "--num-blocks", "1",
                                      "--out", str(tmp_path / "m")])
    one_line_error(result, "lacks some")


def test_merge_after_sublayer_pruning_reloads_with_both_structures(six_block_dir, tmp_path):
    """merge ties FFs of a checkpoint whose blocks lost sublayers: the saved checkpoint keeps the removed
    sublayers and the tie, and reloads to the same function."""
    stages = [{"method": "sublayer", "options": {"num_sublayers": 3}}, {"method": "merge", "options": {"num_merge": 1}}]
    result = compress(make_config(model=str(six_block_dir), stages=stages, calib_samples=2, seqlen=16))
    assert result.manifest.skipped and len(result.manifest.tie_map) == 1
    assert not set(result.manifest.tie_map) & set(result.manifest.skipped)
    out = save(result, tmp_path / "merged")
    model, _, _ = load_model(str(out), "cpu")
    assert skipped_paths(model) == result.manifest.skipped
    (tied, canonical), = result.manifest.tie_map.items()
    assert model.get_submodule(tied) is model.get_submodule(canonical)
    ids = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, result.model(ids).logits)


def test_param_sparsity_for_depth_methods_rounds_up_to_blocks():
    cfg = CompressConfig(model="m", method="sleb", param_sparsity=0.25)
    assert cfg.blocks_to_remove(30) == 8
    with pytest.raises(ValueError, match="only one of"):
        CompressConfig(model="m", method="sleb", param_sparsity=0.25, sparsity=0.25)


@pytest.mark.parametrize("args,fragment", [
    (["--num-sublayers", "12"], "would remove all 12 sublayers"),
    (["--num-sublayers", "2", "--sparsity", "0.2"], "one amount"),
    (["--param-sparsity", "1.5"], "param_sparsity must be in (0, 1)"),
])
def test_bad_amounts_are_one_line_errors(six_block_dir, tmp_path, args, fragment):
    result = CliRunner().invoke(app, ["compress", str(six_block_dir), "--method", "sublayer", *args,
                                      "--calib-samples", "2", "--seqlen", "16", "--out", str(tmp_path / "o")])
    one_line_error(result, fragment)
    assert not (tmp_path / "o").exists()
