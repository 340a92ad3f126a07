import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from compress_eval import pipeline
from compress_eval.batch import run_cells
from compress_eval.cli.app import app
from compress_eval.errors import UserError
from compress_eval.grid import Grid, expand, load_grid
from compress_eval.results.store import run_lock

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "grids" / "smoke.yaml"


def grid(**values) -> Grid:
    base = {"models": ["m"], "tasks": ["wikitext2"], "methods": ["none"]}
    return Grid(**{**base, **values})


def test_expansion_multiplies_models_methods_amounts_and_sweeps():
    g = grid(models=["a", "b"], sparsities=[0.25, 0.5], methods=[
        "none",
        {"method": "drop", "blocks": [[1], [1, 2]]},
        "sleb",
        {"method": "merge", "label": "ffm", "sparsities": [None], "sweep": {"permute": [True, False]},
         "options": {"anchor": "first"}, "config": {"calib_samples": 4}},
    ])
    cells = expand(g)
    assert len(cells) == 2 * (1 + 2 + 2 + 2)
    a = [c for c in cells if c.config.model == "a"]
    assert [(c.label, c.config.sparsity, c.config.blocks) for c in a] == [
        ("none", None, None), ("drop", None, [1]), ("drop", None, [1, 2]), ("sleb", 0.25, None),
        ("sleb", 0.5, None), ("ffm permute=True", None, None), ("ffm permute=False", None, None)]
    merge = a[-1].config
    # merge's default amount (1/3 of the FF sublayers) is part of the cell, as it is of the run
    assert merge.options == {"anchor": "first", "permute": False, "ff_fraction": 1 / 3} and merge.calib_samples == 4
    assert len({c.name for c in cells}) == len(cells)
    assert expand(g, models=["c"])[0].config.model == "c"


def test_param_sparsities_make_cells_at_one_size():
    cells = expand(grid(models=["a"], sparsities=[0.25], methods=[
        {"method": "sublayer", "param_sparsities": [0.2, 0.3]}, {"method": "sleb", "param_sparsities": [0.2]}]))
    assert [(c.config.method, c.config.param_sparsity, c.config.sparsity) for c in cells] == [
        ("sublayer", 0.2, None), ("sublayer", 0.3, None), ("sleb", 0.2, None)]
    assert cells[0].name.startswith("a_sublayer_p0.2_")


def test_hash_is_stable_and_covers_only_what_determines_the_result():
    cell = expand(load_grid(SMOKE))[0]
    assert cell.name == "smollm2-135m_none_84ba890b3df0"  # the same on every machine and release

    def key(**values):
        return expand(grid(**values))[0].key

    reference = key(eval={"seqlen": 64})
    assert key(eval={"seqlen": 64, "batch_size": 8}) == reference  # speed only
    assert key(eval={"seqlen": 64}, tasks=["c4", "wikitext2"]) == reference  # tasks are added, not hashed
    assert key(eval={"seqlen": 64}, config={"seed": 0}) == reference  # a default written out
    assert key(eval={"seqlen": 128}) != reference
    assert key(eval={"seqlen": 64, "gen_kwargs": {"max_gen_toks": 32}}) != reference
    assert key(eval={"seqlen": 64}, config={"seed": 1}) != reference
    opts = [{"method": "x", "options": {"a": 1, "b": 2}}], [{"method": "x", "options": {"b": 2, "a": 1}}]
    assert key(methods=opts[0]) == key(methods=opts[1])


@pytest.mark.parametrize("text,message", [
    ("models: [m]\ntasks: [wikitext2]\nmethods: [none]\nbogus: 1\n", "bogus"),
    ("models: [m]\nmethods: [none]\n", "tasks"),
    ("models: [m]\ntasks: [wikitext2]\nmethods: [sleb]\nsparsities: [1.5]\n", "sparsity must be in (0, 1)"),
    ("- just a list\n", "must be a mapping"),
    ("models: [m\n", "not valid YAML"),
])
def test_bad_grid_is_one_clear_error(tmp_path, text, message):
    path = tmp_path / "g.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        expand(load_grid(path))


def smoke_cells(model_dir, tasks=("wikitext2",)):
    g = load_grid(SMOKE)
    g.tasks = list(tasks)
    return expand(g, models=[str(model_dir)])


def count_compressions(monkeypatch) -> list:
    calls = []
    real = pipeline.compress_to_dir

    def counted(cfg, out, *args, **kwargs):
        calls.append(Path(out).name)
        return real(cfg, out, *args, **kwargs)

    monkeypatch.setattr(pipeline, "compress_to_dir", counted)
    return calls


def finished(runs: Path, cells, tasks=("wikitext2_ppl",)) -> bool:
    for cell in cells:
        results = json.loads((runs / cell.name / "results_ppl.json").read_text())
        if not set(tasks) <= set(results) or not (runs / cell.name / "compress_eval.json").exists():
            return False
    return not list(runs.glob(".*.tmp-*"))


def test_resume_skips_finished_cells_and_evaluates_missing_tasks(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    runs, cells = tmp_path / "runs", smoke_cells(tiny_model_dir)
    calls = count_compressions(monkeypatch)
    assert [o.status for o in run_cells(cells, runs)] == ["ran"] * 3
    assert finished(runs, cells) and len(calls) == 3
    manifest = runs / cells[1].name / "compress_eval.json"
    before = manifest.stat().st_mtime_ns
    assert [o.status for o in run_cells(cells, runs)] == ["skipped"] * 3
    (runs / cells[0].name / "results_ppl.json").unlink()  # a crash between compression and evaluation
    wider = smoke_cells(tiny_model_dir, ("wikitext2", "c4"))
    assert [c.name for c in wider] == [c.name for c in cells]
    assert [o.status for o in run_cells(wider, runs)] == ["evaluated"] * 3
    assert finished(runs, cells, ("wikitext2_ppl", "c4_ppl"))
    assert len(calls) == 3 and manifest.stat().st_mtime_ns == before
    assert json.loads((runs / cells[1].name / "cell.json").read_text())["label"] == "drop"


def test_interrupted_cell_leaves_nothing_and_resumes(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    from compress_eval.results import store

    runs, cells = tmp_path / "runs", smoke_cells(tiny_model_dir)[:1]
    real = store.write_manifest

    def ctrl_c(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(store, "write_manifest", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        run_cells(cells, runs)
    assert not (runs / cells[0].name).exists() and not list(runs.glob(".*.tmp-*"))
    monkeypatch.setattr(store, "write_manifest", real)
    (runs / f".{cells[0].name}.tmp-killed").mkdir()  # what a kill -9 during the save leaves behind
    assert [o.status for o in run_cells(cells, runs)] == ["ran"]
    assert finished(runs, cells)


def test_a_killed_heal_continues_where_it_stopped(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    """A cell killed inside its recovery stage (after step 3 of 4, saving every 2) continues from step 2 on
    the next run, ends with the weights of an uninterrupted cell, and leaves no state behind."""
    from safetensors.torch import load_file

    from conftest import kill_fine_tune_after

    heal = {"recover": "lora", "recover_steps": 4, "recover_seqlen": 16, "recover_save_every": 2,
            "lora_dropout": 0.1}
    g = grid(models=[str(tiny_model_dir)], config={"calib_samples": 2, "seqlen": 16}, eval={"seqlen": 16, "max_windows": 2},
             methods=[{"label": "healed", "stages": [{"method": "drop", "blocks": [1]}, heal]}])
    cells = expand(g)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    outcomes = run_cells(cells, whole)
    assert [o.status for o in outcomes] == ["ran"], outcomes
    undo = kill_fine_tune_after(monkeypatch, "3/4")
    with pytest.raises(KeyboardInterrupt):
        run_cells(cells, cut)
    state = cut / ".state" / cells[0].name / "stage2" / "state.json"
    assert json.loads(state.read_text())["step"] == 2
    undo()
    assert [o.status for o in run_cells(cells, cut)] == ["ran"]
    manifest = json.loads((cut / cells[0].name / "compress_eval.json").read_text())
    assert manifest["recovery"]["resumed_at_step"] == 2
    assert ".state" not in json.dumps(manifest)  # the batch's own bookkeeping, not the recipe
    a, b = (load_file(d / cells[0].name / "model.safetensors") for d in (whole, cut))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (cut / ".state" / cells[0].name).exists()


@pytest.mark.parametrize("damage", [b"{not json", b"[1]", b"\xff\xfe", b'{"method": "none"}'])
def test_a_cell_with_a_corrupt_manifest_is_redone(tiny_model_dir, data_dir, tmp_path, damage):
    runs, cells = tmp_path / "runs", smoke_cells(tiny_model_dir)[:1]
    assert [o.status for o in run_cells(cells, runs)] == ["ran"]
    (runs / cells[0].name / "compress_eval.json").write_bytes(damage)
    assert [o.status for o in run_cells(cells, runs)] == ["ran"]  # compressed again, not "skipped"
    assert finished(runs, cells)


@pytest.mark.parametrize("profile", ["paper", "cpu", "default"])
def test_cell_names_are_stable_through_method_resolution(profile):
    """Resolving a method's profile never changes a cell's identity after expansion (the run dir is
    chosen and cell.json written under the same name)."""
    from compress_eval.methods.registry import get_method, resolve_config

    g = grid(methods=[{"method": "fuse", "options": {"profile": profile}, "num_blocks": [1]},
                      {"method": "mi", "options": {"profile": profile}, "sparsities": [0.25]},
                      "sleb"], sparsities=[0.25])
    for cell in expand(g):
        name, dump = cell.name, cell.config.model_dump()
        assert resolve_config(cell.config) == cell.config
        get_method(cell.config)
        assert cell.name == name and cell.config.model_dump() == dump
    paper = expand(grid(methods=[{"method": "fuse", "options": {"profile": "paper"}, "num_blocks": [1]}]))[0]
    assert (paper.config.calib_samples, paper.config.seqlen) == (128, 2048)


def test_a_bad_cell_stops_the_grid_before_any_cell_runs(tiny_model_dir, data_dir, tmp_path):
    """A grid is checked whole: a bad cell after a good one runs neither (one line, no runs directory)."""
    from conftest import one_line_error

    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump({"models": [str(tiny_model_dir)], "tasks": ["wikitext2"],
                                    "eval": {"seqlen": 32, "max_windows": 1},
                                    "methods": ["none", {"method": "nosuch", "num_blocks": [1]}]}))
    cli = CliRunner()
    check = cli.invoke(app, ["batch", str(path), "--check"])
    assert check.exit_code == 2 and "unknown method 'nosuch'" in check.stderr
    result = cli.invoke(app, ["batch", str(path), "--runs", str(tmp_path / "runs")])
    one_line_error(result, "unknown method 'nosuch'")
    assert "nothing was run" in result.stderr and not (tmp_path / "runs").exists()
    g = load_grid(path)
    g.tasks = ["wikitext2", "nosuchtask"]
    with pytest.raises(UserError, match="unknown task"):
        run_cells(expand(g)[:1], tmp_path / "runs2")
    assert not (tmp_path / "runs2").exists()


def test_a_busy_cell_is_waited_for(tiny_model_dir, data_dir, tmp_path):
    runs, cells = tmp_path / "runs", smoke_cells(tiny_model_dir)[:1]
    held, release = threading.Event(), threading.Event()

    def other_batch():
        with run_lock(runs, cells[0].name, wait=True):
            held.set()
            release.wait(10)

    holder = threading.Thread(target=other_batch)
    holder.start()
    held.wait(10)
    threading.Timer(0.5, release.set).start()
    assert [o.status for o in run_cells(cells, runs)] == ["ran"]
    holder.join()


@pytest.mark.slow
def test_jobs_run_cells_in_worker_processes(tiny_model_dir, data_dir, tmp_path, caplog):
    runs, cells = tmp_path / "runs", smoke_cells(tiny_model_dir)
    with caplog.at_level("INFO", logger="compress_eval"):
        assert [o.status for o in run_cells(cells, runs, jobs=2)] == ["ran"] * 3
    assert finished(runs, cells)
    assert {f"[{c.name}] compressing" for c in cells} <= set(caplog.messages)  # the workers' messages came here


@pytest.mark.slow
def test_two_batch_processes_on_one_runs_dir(tiny_model_dir, data_dir, tmp_path):
    runs = tmp_path / "runs"
    command = [sys.executable, "-m", "compress_eval", "batch", str(SMOKE), "--models", str(tiny_model_dir),
               "--runs", str(runs)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    procs = [subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    cells = smoke_cells(tiny_model_dir)
    assert sum(out.count("] compressing\n") for out in outputs) == 3  # each cell compressed once
    assert finished(runs, cells)


@pytest.mark.skipif(shutil.which("make") is None, reason="GNU make not installed")
def test_make_batch_has_one_target_per_cell(tiny_model_dir, tmp_path):
    dry = subprocess.run(["make", "-n", "-j", "2", "batch", f"MODELS={tiny_model_dir}", f"RUNS={tmp_path}"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    cells = [line.split("--cell ")[1] for line in dry.stdout.splitlines() if "--cell " in line]
    assert dry.returncode == 0 and cells == [c.name for c in smoke_cells(tiny_model_dir)]


def test_cli_lists_cells_and_rejects_unknown_cell(tiny_model_dir):
    cli = CliRunner()
    listed = cli.invoke(app, ["batch", str(SMOKE), "--models", str(tiny_model_dir), "--list"])
    assert listed.stdout.split() == [c.name for c in smoke_cells(tiny_model_dir)]
    bad = cli.invoke(app, ["batch", str(SMOKE), "--cell", "nope"])
    assert bad.exit_code == 2 and "no cell 'nope'" in bad.stderr


def test_short_and_offline_lm_eval_names_count_as_finished(tmp_path):
    from compress_eval.results.store import completed_tasks

    (tmp_path / "lm_eval_results.json").write_text(json.dumps({"results": {"ce_arc_easy": {"acc,none": 0.5},
                                                                           "piqa": {"acc,none": 0.6}}}))
    (tmp_path / "results_ppl.json").write_text(json.dumps({"wikitext2_ppl": {"ppl": 30.0}}))
    tasks = ["arc_e", "arc_easy", "piqa", "hs", "wiki", "c4"]
    assert completed_tasks(tmp_path, tasks) == {"arc_e", "arc_easy", "piqa", "wiki"}
