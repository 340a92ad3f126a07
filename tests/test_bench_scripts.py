"""The benchmarks are scripts run by hand or by `make bench`, hours apart: each must at least import
(a helper moved between them broke one silently before), and the row-table benches must build their rows
for every model they name."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.py")))
def test_every_bench_script_imports(script, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{script[:-3]}", BENCH / script)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))


@pytest.mark.parametrize("model", ["smollm2-135m", "qwen2.5-coder-0.5b"])
def test_the_quality_bench_lists_its_rows_for_each_model(model):
    rows = subprocess.run([sys.executable, str(BENCH / "quality.py"), "--model", model, "--list"],
                          capture_output=True, text=True, check=True).stdout.splitlines()
    for percent in ("12.5", "25", "37.5"):  # the curves: every baseline and the best recipe at each size
        assert {f"shortgpt {percent} %", f"drop-window {percent} %", f"fuse {percent} %"} <= set(rows)
        assert any(r.startswith(f"sleb {percent} %") for r in rows)
    assert sum(r.endswith("+ heal (C4+WikiText-2, 1000 steps)") for r in rows) == 4
    assert len(rows) == len(set(rows))
