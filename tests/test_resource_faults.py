"""Resource faults: a full disk while writing (a checkpoint, a results file, a --resume state) leaves
the previous state and no temporary file, with one line; a run forced into memory (``--offload none``)
that the plan says cannot fit is refused before loading, with the plan's numbers and the override."""

from __future__ import annotations

import errno
import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import one_line_error

from compress_eval.cli.app import app
from compress_eval.errors import NoSpaceError

FULL = OSError(errno.ENOSPC, "No space left on device")


def files(path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_a_full_disk_during_the_checkpoint_save(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    """The weights are half written when the disk fills: no --out, no temp directory, one line."""
    from compress_eval.models import checkpoint

    def full_save(model, tokenizer, directory, *args):
        (directory / "model.safetensors").write_bytes(b"half")
        raise FULL

    monkeypatch.setattr(checkpoint, "save_model_files", full_save)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["compress", str(tiny_model_dir), "--method", "drop", "--blocks", "1",
                                      "--out", str(out)])
    one_line_error(result, f"no space left on the device (or in the quota) while writing {out}")
    assert "nothing of it was kept" in result.stderr
    assert not out.exists() and not checkpoint.temp_dirs(out)


def test_a_full_disk_while_storing_results_keeps_the_previous_ones(tmp_path, monkeypatch):
    from compress_eval import jsonfile
    from compress_eval.results.store import PPL_FILE, store_ppl_results

    store_ppl_results(tmp_path, {"wikitext2_ppl": {"ppl": 30.0, "seqlen": 16, "windows": 2}})
    before = files(tmp_path)

    class FullFile:
        def __init__(self, fd, *args, **kwargs):
            self.fh = open(fd, "w", closefd=True)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def write(self, text):
            self.fh.write(text[: len(text) // 2])
            raise FULL

    monkeypatch.setattr(jsonfile.os, "fdopen", FullFile)
    with pytest.raises(NoSpaceError, match=f"while writing {tmp_path / PPL_FILE}: it keeps what it held before"):
        store_ppl_results(tmp_path, {"c4_ppl": {"ppl": 40.0, "seqlen": 16, "windows": 2}})
    monkeypatch.undo()
    assert files(tmp_path) == before
    assert json.loads((tmp_path / PPL_FILE).read_text()) == {"wikitext2_ppl": {"ppl": 30.0, "seqlen": 16,
                                                                               "windows": 2}}


def test_a_full_disk_while_saving_a_resume_state_keeps_the_previous_iteration(tmp_path, monkeypatch):
    from compress_eval.methods import loop_state

    state = loop_state.LoopState(tmp_path, {"run": 1})
    first = state.save({"alive": [0, 1, 2], "iterations": []}, {1: torch.nn.Linear(2, 2)}, 0)
    before = files(tmp_path)
    save_file = loop_state.save_file
    calls = []

    def full_second_block(tensors, path):
        calls.append(path)
        if len(calls) == 2:
            path.write_bytes(b"half")
            raise FULL
        save_file(tensors, path)

    monkeypatch.setattr(loop_state, "save_file", full_second_block)
    with pytest.raises(NoSpaceError, match="the state of the previous iteration is kept"):
        state.save({**first, "alive": [0, 2]}, {0: torch.nn.Linear(2, 2), 2: torch.nn.Linear(2, 2)}, 1)
    assert files(tmp_path) == before and state.load()["files"] == first["files"]


@pytest.fixture
def predicted(tiny_model_dir):
    """The plan's peak host memory for the compression the memory tests run (what they make scarce)."""
    from compress_eval.config import make_config
    from compress_eval.plan import make_plan

    cfg = make_config(model=str(tiny_model_dir), method="drop", device="cpu", offload="none", calib_samples=8,
                      seqlen=512)
    return make_plan(cfg, eval_seqlen=None).peak_host


COMPRESS_IN_MEMORY = ["compress", "{model}", "--method", "drop", "--blocks", "1", "--offload", "none"]


@pytest.mark.parametrize("share,refused", [(0.5, True), (0.9, False)], ids=["beyond-the-error", "within-the-error"])
def test_forced_offload_none_beyond_memory_is_refused_before_loading(share, refused, predicted, tiny_model_dir,
                                                                     data_dir, tmp_path, monkeypatch):
    """Refused when the plan's peak, lowered by its measured error, still exceeds what is available;
    a peak within that error runs (the plan may overestimate)."""
    from compress_eval import pipeline, plan

    monkeypatch.setattr(plan, "host_available", lambda: int(predicted * share))
    load_model, loads = pipeline.load_model, []
    monkeypatch.setattr(pipeline, "load_model", lambda *a: loads.append(a) or load_model(*a))
    out = tmp_path / "out"
    args = [a.replace("{model}", str(tiny_model_dir)) for a in COMPRESS_IN_MEMORY] + ["--out", str(out)]
    result = CliRunner().invoke(app, args)
    if refused:
        one_line_error(result, "--offload none: the plan predicts")
        for words in (f"{predicted / 1e9:.1f} GB of host memory", "--offload auto", plan.NO_MEMORY_CHECK):
            assert words in result.stderr
        assert not loads and not out.exists()
    else:
        assert result.exit_code == 0 and loads and (out / "compress_eval.json").is_file(), result.output


def test_the_memory_check_can_be_overridden(predicted, tiny_model_dir, data_dir, tmp_path, monkeypatch):
    from compress_eval import plan

    monkeypatch.setattr(plan, "host_available", lambda: int(predicted * 0.5))
    monkeypatch.setenv(plan.NO_MEMORY_CHECK, "1")
    out = tmp_path / "out"
    args = [a.replace("{model}", str(tiny_model_dir)) for a in COMPRESS_IN_MEMORY] + ["--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (out / "compress_eval.json").is_file()


def test_an_evaluation_forced_into_memory_is_checked_too(tiny_model_dir, data_dir, monkeypatch):
    from compress_eval import plan

    monkeypatch.setattr(plan, "host_available", lambda: 1)
    result = CliRunner().invoke(app, ["ppl", str(tiny_model_dir), "--seqlen", "16", "--offload", "none"])
    one_line_error(result, "--offload none: the plan predicts")
