"""The baselines benchmark runs end to end on the tiny model (tiny windows), rows and table written."""

import json
import runpy
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "baselines.py"


def test_baselines_bench_on_tiny_model(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    out = tmp_path / "rows.json"
    monkeypatch.setattr(sys, "argv", [str(BENCH), "--model", str(tiny_model_dir), "--sparsities", "0.25,0.5",
                                      "--seqlen", "16", "--calib-samples", "3", "--speedup-samples", "2",
                                      "--wikitext-windows", "2", "--c4-windows", "2", "--out", str(out)])
    runpy.run_path(str(BENCH), run_name="__main__")
    rows = json.loads(out.read_text())
    assert [(r["method"], r["sparsity"]) for r in rows] == [
        ("dense", 0.0), ("drop-window", 0.25), ("drop-window", 0.5), ("shortgpt", 0.25), ("shortgpt", 0.5),
        ("sleb", 0.25), ("sleb", 0.5)]
    sleb = {r["sparsity"]: r["removed_blocks"] for r in rows if r["method"] == "sleb"}
    assert sleb[0.5] == [1, 2] and set(sleb[0.25]) < set(sleb[0.5])
    assert all(r["wikitext2_ppl"] > 1 and r["c4_ppl"] > 1 and r["peak_rss_mb"] > 0 for r in rows)
    speedup = json.loads(out.with_name("rows_prefix_speedup.json").read_text())
    assert speedup["same_choice"] and speedup["max_relative_difference"] < 1e-5
    table = out.with_suffix(".md").read_text()
    assert "| sleb | 50% | 1,2 |" in table and "Prefix caching" in table


def test_rows_that_would_overrun_the_budget_are_cut_and_listed(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    out = tmp_path / "rows.json"
    monkeypatch.setattr(sys, "argv", [str(BENCH), "--model", str(tiny_model_dir), "--sparsities", "0.25",
                                      "--methods", "sleb,shortgpt", "--seqlen", "16", "--calib-samples", "2",
                                      "--speedup-samples", "0", "--wikitext-windows", "2", "--c4-windows", "2",
                                      "--budget-min", "0", "--out", str(out)])
    runpy.run_path(str(BENCH), run_name="__main__")
    assert [r["method"] for r in json.loads(out.read_text())] == ["dense"]
    assert "Cut by the time budget (0.0 min): sleb 25%, shortgpt 25%." in out.with_suffix(".md").read_text()
