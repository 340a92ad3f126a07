"""Killed runs: SIGTERM or SIGKILL at several points of compress, batch and eval leave nothing
half-written, and a re-run (or ``--resume``) gives what an uninterrupted run gives.

Each run is a real process (tests/fault_point.py pauses it at the named point), so the signal
handling is the command's own.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
POINT = Path(__file__).resolve().parent / "fault_point.py"

pytestmark = pytest.mark.slow


def start(point: str, ready: Path, *args) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, str(POINT), point, str(ready), *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, str(POINT), "none", "-", *map(str, args)], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def kill_at(point: str, sig: int, tmp: Path, *args) -> subprocess.CompletedProcess:
    """Start the command, wait until it pauses at ``point``, send ``sig``; return how it ended."""
    ready = tmp / f"ready-{point}-{sig}"
    proc = start(point, ready, *args)
    deadline = time.monotonic() + 300
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"never reached {point}: rc {proc.returncode}\n{err[-3000:]}")
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def temp_dirs(parent: Path) -> list[Path]:
    return [p for p in parent.rglob("*") if ".tmp-" in p.name]


def tensors(directory: Path) -> dict:
    return load_file(directory / "model.safetensors")


def same_weights(a: Path, b: Path) -> bool:
    ta, tb = tensors(a), tensors(b)
    return ta.keys() == tb.keys() and all((ta[k] == tb[k]).all() for k in ta)


def same_choice(a: Path, b: Path) -> bool:
    ma, mb = (json.loads((d / "compress_eval.json").read_text()) for d in (a, b))
    return ma["removed_blocks"] == mb["removed_blocks"] and ma["tie_map"] == mb["tie_map"]


@pytest.fixture
def reference(tiny_model_dir, data_dir, tmp_path):
    """An uninterrupted sleb run to compare re-runs with."""
    out = tmp_path / "reference"
    run("compress", tiny_model_dir, "--method", "sleb", "--num-blocks", "1", "--calib-samples", "2",
        "--seqlen", "16", "--out", out)
    return out


SLEB = ["--method", "sleb", "--num-blocks", "1", "--calib-samples", "2", "--seqlen", "16"]


@pytest.mark.parametrize("point", ["method", "save"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_killed_compress_leaves_nothing_and_reruns_identically(point, sig, tiny_model_dir, reference, tmp_path):
    out = tmp_path / "runs" / "out"
    ended = kill_at(point, sig, tmp_path, "compress", tiny_model_dir, *SLEB, "--out", out)
    assert ended.returncode == (143 if sig == signal.SIGTERM else -signal.SIGKILL), ended.stderr[-2000:]
    assert not out.exists()
    if sig == signal.SIGTERM:  # cleaned up by the process itself
        assert not temp_dirs(out.parent) and "Traceback" not in ended.stderr
    rerun = run("compress", tiny_model_dir, *SLEB, "--out", out)
    assert not temp_dirs(out.parent)  # a killed writer's temp dir is removed by the next run
    if sig == signal.SIGKILL and point == "save":
        assert "left by a killed run" in rerun.stderr
    assert same_choice(out, reference) and same_weights(out, reference)


def test_killed_fuse_resumes_to_the_uninterrupted_result(tiny_model_dir, data_dir, tmp_path):
    fuse = ["--method", "fuse", "--num-blocks", "2", "--calib-samples", "2", "--seqlen", "16", "--epochs", "1",
            "--set", "batch_size=1"]
    state = tmp_path / "state"
    ended = kill_at("loop-state", signal.SIGKILL, tmp_path, "compress", tiny_model_dir, *fuse,
                    "--set", f"resume={state}", "--out", tmp_path / "fused")
    assert ended.returncode == -signal.SIGKILL
    assert len(json.loads((state / "state.json").read_text())["iterations"]) == 1
    resumed = run("compress", tiny_model_dir, *fuse, "--set", f"resume={state}", "--out", tmp_path / "fused")
    assert "resuming" in resumed.stderr
    run("compress", tiny_model_dir, *fuse, "--out", tmp_path / "straight")
    assert same_choice(tmp_path / "fused", tmp_path / "straight")
    assert same_weights(tmp_path / "fused", tmp_path / "straight")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_killed_eval_keeps_the_results_file_whole(sig, tiny_model_dir, reference, tmp_path):
    before = (reference / "results_ppl.json").exists()
    run("eval", reference, "--tasks", "wiki", "--seqlen", "16", "--max-windows", "3")
    stored = json.loads((reference / "results_ppl.json").read_text())
    ended = kill_at("ppl", sig, tmp_path, "eval", reference, "--tasks", "c4", "--seqlen", "16", "--max-windows", "3")
    assert ended.returncode != 0 and not before
    assert json.loads((reference / "results_ppl.json").read_text()) == stored  # untouched, still JSON
    assert not temp_dirs(reference)
    run("eval", reference, "--tasks", "c4", "--seqlen", "16", "--max-windows", "3")
    again = json.loads((reference / "results_ppl.json").read_text())
    assert set(again) == {"wikitext2_ppl", "c4_ppl"} and again["wikitext2_ppl"] == stored["wikitext2_ppl"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_killed_batch_reruns_to_the_uninterrupted_result(sig, tiny_model_dir, data_dir, tmp_path):
    grid = tmp_path / "g.yaml"
    grid.write_text(yaml.safe_dump({
        "models": [str(tiny_model_dir)], "tasks": ["wikitext2"], "eval": {"seqlen": 16, "max_windows": 2},
        "config": {"calib_samples": 2, "seqlen": 16},
        "methods": ["none", {"method": "sleb", "num_blocks": [1]}]}))
    runs, straight = tmp_path / "runs", tmp_path / "straight"
    ended = kill_at("save", sig, tmp_path, "batch", grid, "--runs", runs)
    assert ended.returncode != 0
    assert not [p for p in runs.iterdir() if p.is_dir() and p.name != ".locks"
                and not (p / "compress_eval.json").exists() and ".tmp-" not in p.name]
    run("batch", grid, "--runs", runs)
    run("batch", grid, "--runs", straight)
    assert not temp_dirs(runs)
    cells = sorted(p.name for p in straight.iterdir() if not p.name.startswith("."))
    assert cells == sorted(p.name for p in runs.iterdir() if not p.name.startswith("."))
    for cell in cells:
        assert same_choice(runs / cell, straight / cell) and same_weights(runs / cell, straight / cell)
        ppl = [json.loads((d / cell / "results_ppl.json").read_text())["wikitext2_ppl"]["ppl"] for d in (runs, straight)]
        assert ppl[0] == ppl[1]
