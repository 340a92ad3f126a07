"""The recovery stage's training text (calibration windows or the train split), its loss (next-token
cross-entropy, distillation of the uncompressed model's logits, or a mix of both) and its schedules."""

from __future__ import annotations

import gzip
import json
import math
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from compress_eval.config import RecoveryOptions, make_config
from compress_eval.data.calibration import tokenize, training_windows
from compress_eval.errors import UserError
from compress_eval.methods.recovery import cosine_schedule, kl_of_logits, recovery_loss
from compress_eval.pipeline import compress
from conftest import kill_fine_tune_after, tiny_tokenizer

TRAIN_TEXT = " = Train article = \n The train split is tokenized : 1 @-@ 2 , <unk> words . \n" * 200


@pytest.fixture
def train_data(data_dir):
    with gzip.open(data_dir / "wikitext2" / "wiki.train.tokens.gz", "wt", encoding="utf-8") as fh:
        fh.write(TRAIN_TEXT)
    return data_dir


def test_mixed_recovery_text_alternates_c4_and_wikitext2_windows(train_data):
    """c4+wikitext2: C4's train windows at even steps, WikiText-2's at odd ones, each corpus from its start,
    so an odd count gives C4 the extra window and both halves are the corpora's own first windows."""
    tok = tiny_tokenizer()
    mixed = training_windows(tok, "c4+wikitext2", 5, 16, train_data)
    assert mixed.shape == (5, 16)
    assert torch.equal(mixed[0::2], training_windows(tok, "c4", 3, 16, train_data))
    assert torch.equal(mixed[1::2], training_windows(tok, "wikitext2", 2, 16, train_data))


@pytest.mark.parametrize("recover_data, calib_data, corpus", [
    ("train", "wikitext2", "wikitext2"), ("train", "c4", "c4"), ("c4", "wikitext2", "c4"),
    ("wikitext2", "c4", "wikitext2"), ("c4+wikitext2", "wikitext2", "c4+wikitext2")])
def test_a_recovery_stage_trains_on_the_corpus_it_names(tiny_model_dir, train_data, monkeypatch, recover_data,
                                                          calib_data, corpus):
    """``train`` is the calibration corpus' train split; a corpus name is that corpus whatever the
    calibration read, and the manifest records what was asked."""
    import compress_eval.pipeline as pipeline

    asked = []
    monkeypatch.setattr(pipeline, "training_windows",
                        lambda tok, name, *args: asked.append(name) or training_windows(tok, name, *args))
    recovery = dict(recover="lora", recover_steps=2, recover_seqlen=16, recover_data=recover_data, lora_dropout=0.0)
    result = compress(make_config(model=str(tiny_model_dir), method="none", calib_samples=2, seqlen=16,
                                  calib_data=calib_data, recovery=recovery), train_data)
    assert asked == [corpus]
    assert (result.manifest.recovery["data"], result.manifest.recovery["sequences"]) == (recover_data, 2)


def test_kl_of_logits_is_the_token_mean_kl_and_zero_for_the_teacher_itself():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    p, log_q = teacher.softmax(-1), student.log_softmax(-1)
    expected = (p * (p.log() - log_q)).sum(-1).mean()
    assert kl_of_logits(student, teacher).item() == pytest.approx(expected.item(), rel=1e-5)
    assert kl_of_logits(teacher, teacher).item() == pytest.approx(0.0, abs=1e-6)


def test_cosine_schedule_warms_up_then_decays_to_zero():
    assert cosine_schedule(0, 10, 100) == pytest.approx(0.1)
    assert cosine_schedule(10, 10, 100) == pytest.approx(1.0)
    assert cosine_schedule(55, 10, 100) == pytest.approx(0.5)
    assert cosine_schedule(100, 10, 100) == pytest.approx(0.0, abs=1e-12)
    assert all(cosine_schedule(s, 10, 100) >= cosine_schedule(s + 1, 10, 100) for s in range(10, 100))


def test_training_windows_are_the_train_split_from_its_start(train_data):
    tok = tiny_tokenizer()
    windows = training_windows(tok, "wikitext2", 6, 16, train_data)
    assert windows.shape == (6, 16)
    assert torch.equal(windows.reshape(-1), tokenize(tok, TRAIN_TEXT)[:96])
    with pytest.raises(UserError, match="fewer than --recover-steps"):
        training_windows(tok, "wikitext2", 10_000, 512, train_data)


def test_missing_train_file_is_a_one_line_error(data_dir):
    with pytest.raises(UserError, match="wiki.train.tokens.gz"):
        training_windows(tiny_tokenizer(), "wikitext2", 2, 16, data_dir)


def test_recovery_on_the_train_split_with_distillation(tiny_model_dir, train_data):
    """--recover-data train takes steps x batch sequences of the train split; --recover-loss kd starts at
    zero when nothing was removed (LoRA's B starts at zero: the student is the teacher) and is recorded."""
    recovery = dict(recover="lora", recover_steps=3, recover_batch_size=2, recover_seqlen=16,
                    recover_data="train", recover_loss="kd", recover_schedule="cosine", lora_dropout=0.0)
    result = compress(make_config(model=str(tiny_model_dir), method="none", calib_samples=2, seqlen=16,
                                  recovery=recovery), train_data)
    r = result.manifest.recovery
    assert (r["data"], r["loss"], r["schedule"], r["sequences"], r["seqlen"]) == ("train", "kd", "cosine", 6, 16)
    assert r["loss_first"] == pytest.approx(0.0, abs=1e-5)
    # After a compression the student differs: the distillation loss is positive and finite.
    result = compress(make_config(model=str(tiny_model_dir), method="drop", blocks=[1], calib_samples=2,
                                  seqlen=16, recovery=recovery), train_data)
    assert 0 < result.manifest.recovery["loss_first"] < math.inf


def test_mixed_loss_weighs_next_token_loss_and_distillation(tiny_model_dir, train_data):
    """ce+kd is (1 - w) CE + w KL on one forward: with nothing removed (the student is the teacher, KL 0)
    its first loss is (1 - w) times ce's on the same sequence, and the weight is recorded."""
    def first_loss(**loss):
        recovery = dict(recover="lora", recover_steps=1, recover_seqlen=16, recover_data="train",
                        lora_dropout=0.0, **loss)
        r = compress(make_config(model=str(tiny_model_dir), method="none", calib_samples=2, seqlen=16,
                                 recovery=recovery), train_data).manifest.recovery
        return r["loss_first"], r.get("kd_weight")

    ce, _ = first_loss(recover_loss="ce")
    mixed, weight = first_loss(recover_loss="ce+kd", recover_kd_weight=0.25)
    assert weight == 0.25
    assert mixed == pytest.approx(0.75 * ce, rel=1e-3, abs=1e-4)


def test_mixed_loss_of_a_student_is_the_weighted_sum_of_its_two_terms(tiny_model_dir):
    teacher = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    student = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        student.model.layers[0].mlp.down_proj.weight.mul_(0.5)
    ids = torch.randint(0, student.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    options = {loss: RecoveryOptions(recover="lora", recover_loss=loss, **({"recover_kd_weight": 0.3}
                                                                            if loss == "ce+kd" else {}))
               for loss in ("ce", "kd", "ce+kd")}
    with torch.no_grad():
        ce, kd, mixed = (recovery_loss(student, teacher, ids, options[loss]).item() for loss in ("ce", "kd", "ce+kd"))
    assert kd > 0
    assert mixed == pytest.approx(0.7 * ce + 0.3 * kd, rel=1e-5)


def test_distillation_of_a_compressed_checkpoint_learns_its_base_model(tiny_model_dir, train_data, tmp_path, caplog):
    """Healing a saved checkpoint with kd distils the model it was made from (through a chain of
    checkpoints), not the checkpoint itself, whose copy would start the loss at zero."""
    from compress_eval.pipeline import save

    first = save(compress(make_config(model=str(tiny_model_dir), method="drop", blocks=[1], calib_samples=2,
                                      seqlen=16), train_data), tmp_path / "dropped")
    second = save(compress(make_config(model=str(first), method="none"), train_data), tmp_path / "copied")
    recovery = dict(recover="lora", recover_steps=2, recover_batch_size=1, recover_seqlen=16,
                    recover_data="train", recover_loss="kd", lora_dropout=0.0)
    with caplog.at_level("INFO", logger="compress_eval.pipeline"):
        healed = compress(make_config(model=str(second), method="none", calib_samples=2, seqlen=16,
                                      recovery=recovery), train_data)
    assert f"distils {tiny_model_dir}" in caplog.text
    assert healed.manifest.recovery["loss_first"] > 1e-4
    shutil.rmtree(tiny_model_dir)
    with pytest.raises(UserError, match="cannot be loaded"):
        compress(make_config(model=str(second), method="none", calib_samples=2, seqlen=16, recovery=recovery),
                 train_data)


def _heal(model_dir, data, state_dir, **settings):
    recovery = {**dict(recover="lora", recover_steps=6, recover_seqlen=16, recover_data="train", lora_dropout=0.1,
                       recover_resume=str(state_dir), recover_save_every=2), **settings}
    return compress(make_config(model=str(model_dir), method="drop", blocks=[1], calib_samples=2, seqlen=16,
                                recovery=recovery), data)


def _weights(result):
    return {k: v.clone() for k, v in result.model.state_dict().items()}


def test_an_interrupted_fine_tune_resumes_to_the_uninterrupted_weights(tiny_model_dir, train_data, tmp_path,
                                                                      monkeypatch):
    """Killed after step 5 of 6 (saves every 2 steps), the re-run restores step 4 (LoRA tensors, AdamW,
    schedule, dropout's generator) and ends bitwise where an uninterrupted run ends, with its losses. A
    finished state trains no step again."""
    import compress_eval.methods.recovery as recovery

    whole = _heal(tiny_model_dir, train_data, tmp_path / "whole")
    undo = kill_fine_tune_after(monkeypatch, "5/6")
    with pytest.raises(KeyboardInterrupt):
        _heal(tiny_model_dir, train_data, tmp_path / "cut")
    assert json.loads((tmp_path / "cut" / "state.json").read_text())["step"] == 4
    undo()
    resumed = _heal(tiny_model_dir, train_data, tmp_path / "cut")
    assert resumed.manifest.recovery["resumed_at_step"] == 4
    assert resumed.manifest.recovery["losses"] == whole.manifest.recovery["losses"]
    expected, got = _weights(whole), _weights(resumed)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert sorted(p.name for p in (tmp_path / "cut").iterdir()) == ["state.json", "step-6"]

    monkeypatch.setattr(recovery, "recovery_loss", lambda *a: pytest.fail("a finished fine-tune trained again"))
    again = _heal(tiny_model_dir, train_data, tmp_path / "cut")
    assert all(torch.equal(expected[k], v) for k, v in _weights(again).items())


@pytest.mark.parametrize("change, differs", [({"recover_lr": 1e-3}, "settings"), ({"recover_seqlen": 8}, "data")])
def test_a_state_of_another_fine_tune_is_refused_in_one_line(tiny_model_dir, train_data, tmp_path, change, differs):
    _heal(tiny_model_dir, train_data, tmp_path / "state")
    with pytest.raises(UserError, match=f"different run \\(differs in [a-z, ]*{differs}"):
        _heal(tiny_model_dir, train_data, tmp_path / "state", **change)


def test_an_unreadable_state_names_the_fix(tiny_model_dir, train_data, tmp_path):
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "state.json").write_text("{not json")
    with pytest.raises(UserError, match="remove the directory to start afresh"):
        _heal(tiny_model_dir, train_data, tmp_path / "state")
    (tmp_path / "state" / "state.json").write_text(json.dumps({"step": 2}))
    with pytest.raises(UserError, match="not a state this tool wrote"):
        _heal(tiny_model_dir, train_data, tmp_path / "state")


def test_a_batch_s_own_state_of_another_fine_tune_is_replaced(tiny_model_dir, train_data, tmp_path, caplog):
    """In a batch's state directory (not one the user named) another fine-tune's state, e.g. from weights that
    another thread count rounded differently, is started afresh with a warning rather than failing the cell."""
    def heal(lr):
        recovery = dict(recover="lora", recover_steps=2, recover_seqlen=16, recover_data="train", recover_lr=lr)
        return compress(make_config(model=str(tiny_model_dir), method="drop", blocks=[1], calib_samples=2, seqlen=16,
                                    recovery=recovery), train_data, state_dir=tmp_path / "auto")

    heal(1e-3)
    with caplog.at_level("WARNING", logger="compress_eval.methods.recovery_state"):
        result = heal(2e-3)
    assert "another fine-tune's state (differs in settings): starting afresh" in caplog.text
    assert "resumed_at_step" not in result.manifest.recovery
    state = json.loads((tmp_path / "auto" / "stage2" / "state.json").read_text())
    assert state["fingerprint"]["settings"]["recover_lr"] == 2e-3
