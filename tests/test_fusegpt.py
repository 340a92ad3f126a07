import json
import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from compress_eval.config import make_config
from compress_eval.errors import UserError
from compress_eval.methods.fusegpt import kl_over_batch, partial_group
from compress_eval.methods.recovery import kl_of_logits
from compress_eval.methods.fusion import FusedLinear, frozen_weight, fuse_linear
from compress_eval.methods.registry import get_method, resolve_config
from compress_eval.models.adapters import BlockRunner, embed_inputs, get_adapter
from conftest import VOCAB, tiny_model

FAST = {"epochs": 1, "batch_size": 2, "group_size": 3, "coef_rank": 64, "lora_rank": 4}


def run_method(model, method, calib, sparsity=0.5, **options):
    cfg = make_config(model="tiny", method=method, sparsity=sparsity, options=options)
    return get_method(cfg).compress(get_adapter(model), calib)


def randomize(fused: FusedLinear, gen):
    with torch.no_grad():
        for p in fused.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_fused_group_at_init_equals_the_group_without_the_block(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    runner = BlockRunner(adapter, 10)
    h0 = embed_inputs(adapter, torch.randint(0, VOCAB, (3, 10)))
    f = 1
    with torch.no_grad():
        expected = runner.run(h0, 0, 3, skip=f)
        gen = torch.Generator().manual_seed(0)
        for j in (0, 2):
            for role in adapter.linear_roles():
                fused = fuse_linear(adapter.linear(adapter.blocks[j], role), adapter.family.conv1d, 8, gen)
                fused.inject(frozen_weight(adapter, adapter.blocks[f], role), 8, gen)
                fused.inject(None, 4, gen)  # the optional free term E F starts at zero too
                adapter.set_linear(adapter.blocks[j], role, fused)
        got = runner.run(h0, 0, 3, skip=f)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("conv1d", [False, True])
def test_materialized_weight_is_w_plus_ba_plus_coefficient_times_injected(conv1d):
    gen = torch.Generator().manual_seed(1)
    out_f, in_f = 12, 20
    base = Conv1D(out_f, in_f) if conv1d else nn.Linear(in_f, out_f)
    with torch.no_grad():
        base.weight.copy_(torch.randn(base.weight.shape, generator=gen))
    w = (base.weight.t() if conv1d else base.weight).detach().clone()
    w_f1, w_f2 = torch.randn(out_f, in_f, generator=gen), torch.randn(out_f, in_f, generator=gen)
    fused = FusedLinear(base, conv1d, lora_rank=3)
    fused.inject(w_f1, 5)
    fused.inject(w_f2, 100)  # fused again; the rank is clamped to min(out, in)
    fused.inject(None, 2)
    randomize(fused, gen)
    assert fused.coef_C[1].shape == (out_f, 12)
    x = torch.randn(4, in_f, generator=gen)
    y = fused(x)
    c, d = fused.coef_C, fused.coef_D
    expected = (w + fused.lora_B @ fused.lora_A + (c[0] @ d[0]) * w_f1 + (c[1] @ d[1]) * w_f2 + c[2] @ d[2])
    plain = fused.materialize()
    assert type(plain) is type(base)
    torch.testing.assert_close(plain.weight.t() if conv1d else plain.weight, expected.detach())
    torch.testing.assert_close(plain(x), y.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("conv1d", [False, True])
def test_fused_linear_in_row_pieces_computes_and_trains_as_one_piece(conv1d, monkeypatch):
    gen = torch.Generator().manual_seed(2)
    out_f, in_f = 12, 20
    x = torch.randn(3, 4, in_f, generator=gen)
    results = []
    for piece_bytes in (2**20, 5 * 4 * in_f):  # one piece; 5 + 5 + 2 rows
        monkeypatch.setattr("compress_eval.methods.fusion.ROW_CHUNK_BYTES", piece_bytes)
        g = torch.Generator().manual_seed(3)
        base = Conv1D(out_f, in_f) if conv1d else nn.Linear(in_f, out_f)
        with torch.no_grad():
            for p in base.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        fused = FusedLinear(base, conv1d, lora_rank=3, generator=g)
        fused.inject(torch.randn(out_f, in_f, generator=g), 4, g)
        fused.inject(None, 2, g)
        randomize(fused, g)
        assert len(fused.row_chunks()) == (1 if piece_bytes == 2**20 else 3)
        y = fused(x)
        y.square().sum().backward()
        grads = [p.grad.clone() for p in fused.parameters() if p.requires_grad]
        results.append((y.detach(), grads, fused.materialize().weight.detach().clone()))
    (y1, g1, w1), (y3, g3, w3) = results
    torch.testing.assert_close(y3, y1)
    torch.testing.assert_close(w3, w1)
    for a, b in zip(g3, g1, strict=True):  # sums over the pieces: fp32 rounding of the largest terms
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def test_kl_over_batch_equals_a_hand_computation():
    gen = torch.Generator().manual_seed(2)
    s, t = torch.randn(3, 2, 4, generator=gen), torch.randn(3, 2, 4, generator=gen)
    total = 0.0
    for pos in range(2):
        for ch in range(4):
            ps = [math.exp(s[n, pos, ch]) for n in range(3)]
            pt = [math.exp(t[n, pos, ch]) for n in range(3)]
            ps = [p / sum(ps) for p in ps]
            pt = [p / sum(pt) for p in pt]
            total += sum(a * math.log(a / b) for a, b in zip(pt, ps))
    assert kl_over_batch(s, t).item() == pytest.approx(total / 3, rel=1e-5)
    assert kl_over_batch(t, t).item() == pytest.approx(0.0, abs=1e-6)


def test_kl_of_logits_is_the_token_mean_of_kl_over_the_vocabulary():
    gen = torch.Generator().manual_seed(4)
    s, t = torch.randn(2, 3, 5, generator=gen), torch.randn(2, 3, 5, generator=gen)
    per_token = [sum(pt * math.log(pt / ps) for ps, pt in zip(s[n, i].softmax(-1).tolist(), t[n, i].softmax(-1).tolist()))
                 for n in range(2) for i in range(3)]
    assert kl_of_logits(s, t).item() == pytest.approx(sum(per_token) / 6, rel=1e-5)


@pytest.mark.parametrize("loss", ["mse", "kl-batch", "kd-logits"])
def test_group_fine_tune_lowers_its_loss(loss):
    """Each loss trains: with the free term E F too, the group's loss falls over the epochs."""
    torch.manual_seed(0)
    model = tiny_model("llama")
    record = run_method(model, "fuse", torch.randint(0, VOCAB, (8, 12)), sparsity=0.25,
                        **{**FAST, "epochs": 6, "group_size": 4, "extra_rank": 4, "lr_coef": 1e-2, "loss": loss})
    losses = record.details["iterations"][0]["epoch_losses"]
    assert losses[-1] < losses[0]
    assert "q/extra" in record.details["clamped_ranks"]


def test_partial_group_is_shifted_at_the_edges():
    assert partial_group(10, 30, 8) == list(range(6, 14))
    assert partial_group(1, 30, 8) == list(range(0, 8))
    assert partial_group(29, 30, 8) == list(range(22, 30))
    assert partial_group(2, 4, 8) == [0, 1, 2, 3]


@pytest.mark.parametrize("family, method", [("llama", "fuse"), ("gemma3_text", "fuse"), ("gpt2", "fuse"),
                                            ("llama", "mi"), ("llama", "mi-ft"), ("gpt2", "mi-lowrank")])
def test_iterative_fusion_removes_ceil_l_times_s_blocks(family, method):
    model = tiny_model(family)
    calib = torch.randint(0, VOCAB, (4, 12))
    options = {} if method == "mi" else FAST
    record = run_method(model, method, calib, sparsity=0.3, **options)  # ceil(4 * 0.3) = 2
    adapter = get_adapter(model)
    assert adapter.num_blocks == 2 and len(record.removed_blocks) == 2
    assert model.config.num_hidden_layers == 2
    assert not any(isinstance(m, FusedLinear) for m in model.modules())
    iterations = record.details["iterations"]
    assert [len(it["mi"]) for it in iterations] == [4, 3]
    assert sorted(it["removed"] for it in iterations) == record.removed_blocks
    assert record.artifacts["macro_influence.png"].startswith(b"\x89PNG")
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, VOCAB, (1, 12))).logits).all()


def test_gqa_ranks_are_clamped_to_the_layer_and_recorded():
    model = tiny_model("llama")  # k/v project 32 -> 16 (2 of 4 heads)
    record = run_method(model, "fuse", torch.randint(0, VOCAB, (4, 12)), sparsity=0.25, **FAST)
    ranks = record.details["clamped_ranks"]
    assert ranks["k"] == ranks["v"] == 16 and ranks["q"] == 32 and ranks["up"] == 32


def test_fusing_a_fused_member_adds_a_pair_and_a_fused_block_to_remove_is_collapsed():
    model = tiny_model("llama")
    adapter = get_adapter(model)
    gen = torch.Generator().manual_seed(3)
    member = fuse_linear(adapter.linear(adapter.blocks[0], "q"), False, 4, gen)
    member.inject(frozen_weight(adapter, adapter.blocks[1], "q"), 4, gen)
    assert fuse_linear(member, False, 4, gen) is member  # fused again: same module, one more pair
    member.inject(frozen_weight(adapter, adapter.blocks[2], "q"), 4, gen)
    assert len(member.injected) == 2
    randomize(member, gen)
    adapter.set_linear(adapter.blocks[0], "q", member)
    effective = member.effective_weight().detach().clone()
    collapsed = frozen_weight(adapter, adapter.blocks[0], "q")  # block 0 is now the one to remove
    assert type(adapter.linear(adapter.blocks[0], "q")) is nn.Linear
    torch.testing.assert_close(collapsed, effective)


def test_uncollapsed_loop_fuses_into_fused_blocks_and_materializes_at_the_end():
    model = tiny_model("llama")
    record = run_method(model, "fuse", torch.randint(0, VOCAB, (4, 12)), sparsity=0.5,
                        **{**FAST, "group_size": 4, "collapse": False})
    assert len(record.removed_blocks) == 2
    assert not any(isinstance(m, FusedLinear) for m in model.modules())


def test_profiles_fill_unset_values_and_calibration():
    given = make_config(model="tiny", method="fuse", sparsity=0.25, options={"profile": "paper", "epochs": 3})
    cfg = resolve_config(given)
    method = get_method(cfg)
    assert (method.options.epochs, method.options.lora_rank, method.options.loss) == (3, 128, "kl-batch")
    assert (cfg.calib_samples, cfg.seqlen) == (128, 2048)
    assert (given.calib_samples, given.seqlen) == (8, 512)  # a new config: the given one is unchanged
    cfg = resolve_config(make_config(model="tiny", method="mi", sparsity=0.25, calib_samples=4,
                                     options={"profile": "paper"}))
    assert (cfg.calib_samples, cfg.seqlen) == (4, 2048)


@pytest.mark.parametrize("method, options, lr", [("fuse", {}, 5e-3), ("fuse", {"profile": "cpu"}, 5e-3),
                                                ("fuse", {"lr_coef": 2e-3}, 2e-3), ("fuse", {"profile": "paper"}, 1e-3),
                                                ("mi-lowrank", {}, 1e-3)])
def test_fuse_profile_override_replaces_the_profiles_value_never_the_users(method, options, lr):
    cfg = make_config(model="tiny", method=method, sparsity=0.25, options=options)
    assert get_method(cfg).options.lr_coef == lr


def test_cli_fuse_writes_a_plain_checkpoint_that_transformers_loads(tiny_model_dir, data_dir, tmp_path):
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from compress_eval.cli.app import app
    from compress_eval.models.loading import load_checkpoint

    out = tmp_path / "fused"
    result = CliRunner().invoke(app, ["compress", str(tiny_model_dir), "--method", "fuse", "--sparsity", "0.25",
                                      "--calib-samples", "4", "--seqlen", "16", "--loss", "kl-batch",
                                      "--epochs", "1", "--batch-size", "2", "--group-size", "3",
                                      "--lora-rank", "4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "compress_eval.json").read_text())
    assert manifest["method_options"]["loss"] == "kl-batch" and manifest["details"]["peak_rss_mb"] > 0
    assert (out / "macro_influence.png").exists()
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    ours, _ = load_checkpoint(out)
    assert plain.config.num_hidden_layers == 3
    ids = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, ours(ids).logits)
    assert plain.generate(ids[:, :3], max_new_tokens=4, do_sample=False).shape == (1, 7)


def test_resume_of_uncollapsed_fusion_is_a_user_error(tmp_path):
    cfg = make_config(model="tiny", method="fuse", sparsity=0.25,
                      options={**FAST, "collapse": False, "resume": str(tmp_path)})
    with pytest.raises(UserError, match="--collapse"):
        get_method(cfg).compress(get_adapter(tiny_model("llama")), torch.randint(0, VOCAB, (4, 12)))


@pytest.mark.parametrize("method", ["fuse", "mi"])
def test_resume_gives_the_uninterrupted_result(tmp_path, method):
    calib = torch.randint(0, VOCAB, (4, 12))
    options = {**FAST, "collapse": True} if method == "fuse" else {}

    def run(num_blocks, **extra):
        model = tiny_model("llama")
        cfg = make_config(model="tiny", method=method, num_blocks=num_blocks, options={**options, **extra})
        return model, get_method(cfg).compress(get_adapter(model), calib)

    whole, whole_record = run(2)
    run(1, resume=str(tmp_path / "state"))  # "interrupted" after the first removal
    resumed, resumed_record = run(2, resume=str(tmp_path / "state"))
    assert resumed_record.removed_blocks == whole_record.removed_blocks
    ids = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(resumed(ids).logits, whole(ids).logits, rtol=0, atol=0)
    with pytest.raises(Exception, match="different run"):
        run(2, resume=str(tmp_path / "state"), **({"epochs": 2} if method == "fuse" else {"mi_samples": 1}))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_aligned_fusion_injects_the_removed_ffs_neurons_in_the_receivers_order(family):
    """Block 2 is block 1 with its FF neurons shuffled (and both see the same inputs): aligned onto
    block 1, the injected FF weights are block 1's own, exactly; attention weights are injected as they are."""
    from test_ffmerge import plant_shuffled_copy

    from compress_eval.methods import alignment

    model = tiny_model(family)
    adapter = get_adapter(model)
    width = adapter.linear_weight(adapter.blocks[1], alignment.ff_roles(adapter)[1]).size(1)
    plant_shuffled_copy(adapter, torch.randperm(width, generator=torch.Generator().manual_seed(3)))
    fuse = get_method(make_config(model="tiny", method="fuse", sparsity=0.25,
                                  options={**FAST, "align_ff": True, "align_tokens": 256}))
    calib = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(0))
    injected, quality = fuse.injected_weights(adapter, calib, [0, 1, 2, 3], 2)
    assert quality[1] > 0.99
    for role in alignment.ff_roles(adapter)[0]:
        assert torch.equal(injected[1][role], adapter.linear_weight(adapter.blocks[1], role))
    assert torch.equal(injected[1]["o"], adapter.linear_weight(adapter.blocks[2], "o"))
    plain, none = get_method(make_config(model="tiny", method="fuse", sparsity=0.25, options=FAST)).injected_weights(
        adapter, calib, [0, 1, 2, 3], 2)
    assert none == {} and not torch.equal(plain[1][alignment.ff_roles(adapter)[0][0]],
                                          adapter.linear_weight(adapter.blocks[1], alignment.ff_roles(adapter)[0][0]))


def test_aligned_fusion_runs_and_records_the_matched_correlations():
    record = run_method(tiny_model("llama"), "fuse", torch.randint(0, VOCAB, (4, 12)), sparsity=0.25,
                        **{**FAST, "align_ff": True})
    alignment_of = record.details["iterations"][0]["ff_alignment"]
    assert set(alignment_of) == {str(j) for j in record.details["iterations"][0]["group"]
                                 if j != record.details["iterations"][0]["removed"]}
