"""Progress and logs: the library speaks through ``logging`` and draws bars with ``compress_eval.progress``;
the CLI writes both to stderr (results stay on stdout), --quiet silences them, --log-file keeps a copy."""

from __future__ import annotations

import re
import sys

import pytest
from typer.testing import CliRunner

from conftest import one_line_error

from compress_eval import progress
from compress_eval.cli.app import app
from compress_eval.config import make_config
from compress_eval.pipeline import compress

runner = CliRunner()
TINY_CALIB = ["--calib-samples", "2", "--seqlen", "16"]
STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"


@pytest.fixture
def bars_at_once(monkeypatch):
    """Bars drawn from their first step, not after NON_TTY_INTERVAL seconds (the runner's stderr is no
    terminal), so a test sees them whatever its speed."""
    monkeypatch.setattr(progress, "NON_TTY_INTERVAL", 0.0)


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_messages_and_bars_on_stderr_results_on_stdout(tiny_model_dir, data_dir, tmp_path, bars_at_once):
    out = tmp_path / "out"
    result = invoke("compress", tiny_model_dir, "--method", "shortgpt", *TINY_CALIB, "--out", out)
    assert result.exit_code == 0, result.output
    assert "no amount given: sparsity=0.25 (shortgpt's default)" in result.stderr
    assert "calibration forwards" in result.stderr
    assert result.stdout == f"saved {out}\n"


def test_quiet_prints_no_messages_or_bars(tiny_model_dir, data_dir, tmp_path, bars_at_once):
    out = tmp_path / "out"
    result = invoke("--quiet", "compress", tiny_model_dir, "--method", "shortgpt", *TINY_CALIB, "--out", out)
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    assert result.stdout == f"saved {out}\n"
    assert progress.enabled  # the switch is the command's only


def test_log_file_keeps_every_message_with_timestamps(tiny_model_dir, data_dir, tmp_path):
    log_file = tmp_path / "run.log"
    for name in ("a", "b"):
        result = invoke("-q", "--log-file", log_file, "compress", tiny_model_dir, "--method", "shortgpt",
                        *TINY_CALIB, "--out", tmp_path / name)
        assert result.exit_code == 0, result.output
        assert result.stderr == ""  # --quiet quiets the console only
    text = log_file.read_text()
    # DEBUG too, and appended: both runs are there
    assert len(re.findall(rf"^{STAMP} DEBUG compress_eval\.pipeline: compressing .*tiny-llama \(4 blocks\) "
                          rf"with shortgpt$", text, re.M)) == 2
    assert re.search(rf"^{STAMP} INFO compress_eval\.pipeline: no amount given: sparsity=0\.25", text, re.M)


def test_unwritable_log_file_is_one_line(tmp_path):
    one_line_error(invoke("--log-file", tmp_path / "missing" / "run.log", "methods"), "cannot write --log-file")


def test_the_library_logs_and_never_prints(tiny_model_dir, data_dir, caplog, capsys, monkeypatch):
    monkeypatch.setattr(progress, "enabled", False)
    cfg = make_config(model=str(tiny_model_dir), method="shortgpt", calib_samples=2, seqlen=16)
    with caplog.at_level("DEBUG", logger="compress_eval"):
        compress(cfg, data_dir)
    assert any(r.name == "compress_eval.pipeline" and r.getMessage().startswith(f"compressing {tiny_model_dir}")
               for r in caplog.records)
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize("method, bars, hidden", [
    ("sleb", ["sleb: removals"], ["scoring candidates", "calibration forwards"]),  # off a terminal: outer only
    ("drop-window", ["scoring candidates", "calibration forwards"], []),
])
def test_scoring_shows_a_bar(method, bars, hidden, tiny_model_dir, data_dir, tmp_path, bars_at_once):
    result = invoke("compress", tiny_model_dir, "--method", method, "--num-blocks", "1", *TINY_CALIB,
                    "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    for desc in bars:
        assert re.search(rf"{desc}: +\d+%\|", result.stderr), (desc, result.stderr)  # a count with its total
    for desc in hidden:  # a nested bar could only write cursor-up escapes into a log
        assert desc not in result.stderr and "\x1b[A" not in result.stderr


def test_ppl_bar_and_the_number_last(tiny_model_dir, data_dir, bars_at_once):
    result = invoke("ppl", tiny_model_dir, "--seqlen", 16, "--max-windows", 3)
    assert result.exit_code == 0, result.output
    assert "ppl (3 x 16 tokens): 100%" in result.stderr
    assert float(result.stdout.strip().splitlines()[-1]) > 1


def test_a_message_leaves_a_bar_within_its_delay_unseen(capsys, monkeypatch):
    """The CLI writes messages with tqdm.write, which redraws every bar: not one still in its delay."""
    from tqdm import tqdm

    monkeypatch.setattr(progress, "NON_TTY_INTERVAL", 1e9)  # capsys's stderr is no terminal: never due
    with progress.bar(range(3), "unseen") as shown:
        for _ in shown:
            tqdm.write("a message", file=sys.stderr)
    assert capsys.readouterr().err == "a message\n" * 3


def test_recovery_bar_shows_the_loss(tiny_model_dir, data_dir, tmp_path, bars_at_once):
    result = invoke("compress", tiny_model_dir, "--method", "drop", "--blocks", "1", *TINY_CALIB,
                    "--recover", "lora", "--recover-steps", "2", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert re.search(r"recovery lora: 100%.*loss=\d", result.stderr), result.stderr
