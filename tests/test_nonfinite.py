"""A fine-tune that diverges stops at its first NaN/inf with a UserError; nothing is saved.

Divergence is made certain, not likely: at lr 1e30 Adam's first step moves every trained weight by
~1e30 (still finite), so the second forward pass overflows; the "first step" tests force the NaN.
"""

import json
import re

import pytest
import torch
from typer.testing import CliRunner

from compress_eval.cli.app import app
from compress_eval.config import make_config
from compress_eval.errors import UserError
from compress_eval.methods.fusegpt import IterativeFusion
from compress_eval.methods.recovery import RecoveryOptions, fine_tune
from compress_eval.methods.registry import get_method
from compress_eval.models.adapters import get_adapter
from conftest import VOCAB, tiny_model

FAST = {"epochs": 2, "batch_size": 2, "group_size": 3, "coef_rank": 8, "lora_rank": 4}  # 2 steps an epoch
HUGE = 1e30


def calib(n=4, seqlen=12):
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(0))


def fuse(method="fuse", num_blocks=1, **options):
    cfg = make_config(model="tiny", method=method, num_blocks=num_blocks, options={**FAST, **options})
    return get_method(cfg).compress(get_adapter(tiny_model("llama")), calib())


def nan_on_call(monkeypatch, owner, name, call, corrupt):
    """Patch ``owner.name`` so that its ``call``-th call's result goes through ``corrupt``; returns the counter."""
    original, calls = getattr(owner, name), []

    def patched(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append(1)
        return corrupt(out, args) if len(calls) == call else out

    monkeypatch.setattr(owner, name, patched)
    return calls


@pytest.mark.parametrize("method, lrs", [("fuse", "--lr-coef 1e+30, --lr-lora 1e+30"),
                                         ("mi-ft", "--lr-lora 1e+30"),
                                         ("mi-lowrank", "--lr-coef 1e+30, --lr-lora 1e+30")])
def test_group_fine_tune_with_a_huge_lr_stops_at_the_first_nonfinite_step(method, lrs):
    with pytest.raises(UserError) as err:
        fuse(method, lr_coef=HUGE, lr_lora=HUGE)
    message = str(err.value)
    assert message.startswith(f"training diverged at {method} fine-tune, block 1/1 epoch 1/2 step 2/2: ")
    assert f"learning rate {lrs}; lower --lr-" in message and "\n" not in message


def test_group_fine_tune_stops_at_a_nan_loss_and_runs_no_further_step(monkeypatch):
    calls = nan_on_call(monkeypatch, IterativeFusion, "group_loss", 3, lambda loss, _: loss * float("nan"))
    with pytest.raises(UserError, match=r"fuse fine-tune, block 1/1 epoch 2/2 step 1/2: loss is nan with "
                                        r"learning rate --lr-coef 0\.005, --lr-lora 9\.65e-06; lower --lr-coef / --lr-lora"):
        fuse()
    assert len(calls) == 3


def test_group_fine_tune_stops_at_a_nonfinite_weight_after_the_step(monkeypatch):
    def poison(out, args):
        args[0].param_groups[0]["params"][0].data[0] = float("inf")
        return out

    nan_on_call(monkeypatch, torch.optim.Adam, "step", 2, poison)
    with pytest.raises(UserError, match=r"block 1/1 epoch 1/2 step 2/2: 1 trainable tensor\(s\) hold NaN/inf "
                                        r"after the optimizer step \(loss \d"):
        fuse()


def test_resume_state_is_not_written_for_the_diverged_iteration(monkeypatch, tmp_path):
    state = tmp_path / "state"
    calls = nan_on_call(monkeypatch, IterativeFusion, "group_loss", 5, lambda loss, _: loss * float("nan"))
    with pytest.raises(UserError, match="block 2/2 epoch 1/2 step 1/2: loss is nan"):
        fuse(num_blocks=2, collapse=True, resume=str(state))  # iteration 1: calls 1-4; iteration 2: call 5
    assert len(calls) == 5
    saved = json.loads((state / "state.json").read_text())
    assert len(saved["iterations"]) == 1
    assert sorted(p.name for p in state.iterdir()) == sorted(["state.json", *saved["files"].values()])
    assert all(name.endswith("-iter0.safetensors") for name in saved["files"].values())


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_recovery_with_a_huge_lr_stops_at_the_first_nonfinite_step(mode):
    with pytest.raises(UserError) as err:
        fine_tune(tiny_model("llama"), calib(4, 32), RecoveryOptions(recover=mode, recover_steps=3, recover_lr=HUGE,
                                                                     recover_seqlen=16))
    message = str(err.value)
    assert re.match(rf"training diverged at recovery {mode} step 2/3: (loss is (nan|inf)|\d+ trainable tensor)", message)
    assert message.endswith("with learning rate --recover-lr 1e+30; lower --recover-lr")


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_recovery_stops_at_a_nan_loss_and_runs_no_further_step(monkeypatch, mode):
    model = tiny_model("llama")

    def nan_loss(out, _):
        out.loss = out.loss * float("nan")
        return out

    calls = nan_on_call(monkeypatch, model, "forward", 2, nan_loss)
    with pytest.raises(UserError, match=rf"recovery {mode} step 2/5: loss is nan with learning rate --recover-lr"):
        fine_tune(model, calib(4, 32), RecoveryOptions(recover=mode, recover_steps=5, recover_seqlen=16))
    assert len(calls) == 2


def assert_one_line_error_and_nothing_written(result, out, expected):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and result.stderr.strip().splitlines()[-1] == errors[0]
    assert errors[0].startswith(expected), errors[0]
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.tmp-*"))


def test_cli_fuse_that_diverges_exits_2_and_writes_nothing(tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "fused"
    result = CliRunner().invoke(app, ["compress", str(tiny_model_dir), "--method", "fuse", "--num-blocks", "1",
                                      "--calib-samples", "2", "--seqlen", "16", "--set", "batch_size=1",
                                      "--group-size", "3", "--lora-rank", "4", "--coef-rank", "8",
                                      "--set", f"lr_coef={HUGE}", "--set", f"lr_lora={HUGE}", "--epochs", "2",
                                      "--out", str(out)])
    assert_one_line_error_and_nothing_written(result, out,
                                              "error: training diverged at fuse fine-tune, block 1/1 epoch 1/2 step 2/2")
    assert "lower --lr-coef / --lr-lora" in result.stderr


def test_cli_merge_whose_recovery_diverges_exits_2_and_writes_nothing(tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "merged"
    result = CliRunner().invoke(app, ["compress", str(tiny_model_dir), "--method", "merge", "--window", "1-2",
                                      "--calib-samples", "2", "--seqlen", "32", "--recover", "full",
                                      "--recover-lr", str(HUGE), "--recover-steps", "3", "--out", str(out)])
    assert_one_line_error_and_nothing_written(result, out, "error: training diverged at recovery full step 2/3")
    assert "lower --recover-lr" in result.stderr
