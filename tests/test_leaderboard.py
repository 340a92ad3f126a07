import csv
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from compress_eval.cli.app import app
from compress_eval.results.leaderboard import MARKS_NOTE, build, markdown, pareto_front
from compress_eval.results.store import RunError, lm_eval_accuracies, read_run

L = 30  # blocks of the fixture model


def make_run(root: Path, name: str, method: str, removed: int = 0, sparsity=None, ppl=None, acc=None,
             seqlen=512, windows=20, options=None, label=None, model="smollm2-135m") -> Path:
    """A run directory as the pipeline and the evaluations write it (only the fields we read)."""
    path = root / name
    path.mkdir(parents=True)
    manifest = {"base_model": {"name": model}, "method": method, "blocks_before": L,
                "config": {"model": model, "method": method, "sparsity": sparsity, "options": options or {}},
                "removed_blocks": list(range(removed)), "params_before": 1000, "params_after": 1000 - 20 * removed,
                "weight_bytes_before": 4_000_000, "weight_bytes_after": 4_000_000 - 80_000 * removed}
    (path / "compress_eval.json").write_text(json.dumps(manifest))
    if ppl:
        (path / "results_ppl.json").write_text(json.dumps(
            {f"{task}_ppl": {"ppl": v, "tokens": 100, "windows": windows, "seqlen": seqlen} for task, v in ppl.items()}))
    if acc:
        results = {t: {"alias": t, "acc,none": a, "acc_stderr,none": 0.01, "acc_norm,none": a + 0.05}
                   for t, a in acc.items()}
        samples = {t: {"original": 1000, "effective": 100} for t in acc}
        (path / "lm_eval_results.json").write_text(json.dumps({"results": results, "versions": {},
                                                               "n-samples": samples}))
    if label:
        (path / "cell.json").write_text(json.dumps({"label": label}))
    return path


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    make_run(root, "dense", "none", ppl={"wikitext2": 10.0, "c4": 20.0}, acc={"piqa": 0.70, "hellaswag": 0.40})
    make_run(root, "sleb25", "sleb", removed=8, sparsity=0.25, ppl={"wikitext2": 15.5, "c4": 26.0},
             acc={"piqa": 0.65, "hellaswag": 0.30})
    make_run(root, "drop3", "drop", removed=3, ppl={"wikitext2": 12.25}, label="drop-late")
    make_run(root, "merge", "merge", options={"permute": False}, ppl={"wikitext2": 11.0}, seqlen=256)
    (root / "corrupt").mkdir()
    (root / "corrupt" / "compress_eval.json").write_text("{not json")
    make_run(root, "unfinished", "shortgpt", removed=8, sparsity=0.25)  # compressed, never evaluated
    bad = make_run(root, "bad-results", "sleb", removed=8, sparsity=0.25)
    (bad / "results_ppl.json").write_text(json.dumps({"wikitext2_ppl": {"tokens": 3}}))
    (root / "notes").mkdir()  # not a run at all
    return root


EXPECTED = """\
| model | method | sparsity | params kept | weights (MB) | wikitext2 ppl | c4 ppl | piqa (%) | hellaswag (%) | avg acc (%) \
| avg acc 95 % CI |
|---|---|---|---|---|---|---|---|---|---|---|
| smollm2-135m | dense (none) | 0% | 100.0% | 4.00 | 10.00 | 20.00 | 70.00 | 45.00 | 57.50 | - |
| smollm2-135m | drop-late | 10% (3/30 blocks) | 94.0% | 3.76 | 12.25 (+2.25) | - | - | - | - | - |
| smollm2-135m | merge permute=False | - | 100.0% | 4.00 | 11.00 | - | - | - | - | - |
| smollm2-135m | sleb | 25% (8/30 blocks) | 84.0% | 3.36 | 15.50 (+5.50) | 26.00 (+6.00) | 65.00 (-5.00) | 35.00 (-10.00) \
| 50.00 (-7.50) | - |

Measured on: wikitext2 ppl: 20 windows of 256 tokens, 20 windows of 512 tokens; c4 ppl: 20 windows of 512 tokens; \
piqa: 100 of 1000 documents (the first); hellaswag: 100 of 1000 documents (the first).

""" + MARKS_NOTE + "\n"


def test_table_rows_deltas_and_skipped_directories(runs):
    board = build(runs)
    assert markdown(board) == EXPECTED
    skipped = {path.name: why for path, why in board.problems}
    assert set(skipped) == {"corrupt", "unfinished", "bad-results", "notes"}
    assert "not valid JSON" in skipped["corrupt"] and "no results" in skipped["unfinished"]
    assert "lack a field" in skipped["bad-results"] and "no compress_eval.json" in skipped["notes"]


def test_cli_writes_every_output_and_reports_skips(runs):
    result = CliRunner().invoke(app, ["leaderboard", str(runs)])
    assert result.exit_code == 0, result.output
    assert EXPECTED in result.stdout
    assert result.stderr.count("skipped ") == 4
    out = runs / "leaderboard"
    assert (out / "leaderboard.md").read_text() == EXPECTED
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    rows = {r["run"]: r for r in csv.DictReader(open(out / "leaderboard.csv"))}
    assert float(rows["sleb25"]["wikitext2_ppl_delta"]) == pytest.approx(5.5)
    assert float(rows["sleb25"]["hellaswag"]) == pytest.approx(0.35)  # acc_norm, raw fraction
    assert rows["merge"]["wikitext2_ppl_delta"] == ""  # other window length than the reference
    html = (out / "leaderboard.html").read_text()
    assert html.count("<tr") == 5 and "corrupt" in html and 'src="pareto.png"' in html
    assert "http" not in html  # static: nothing fetched from a CDN
    # a second run ignores its own output directory
    again = CliRunner().invoke(app, ["leaderboard", str(runs)])
    assert again.stderr.count("skipped ") == 4


def test_missing_runs_dir_is_a_user_error(tmp_path):
    result = CliRunner().invoke(app, ["leaderboard", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "not found" in result.stderr


def test_one_run_directory_alone(runs):
    board = build(runs / "sleb25")
    assert [r.path.name for r in board.rows] == ["sleb25"] and not board.deltas


def test_lm_eval_accuracy_choice():
    results = {"results": {"piqa": {"acc,none": 0.7, "acc_norm,none": 0.72},
                           "arc_challenge": {"acc,none": 0.3, "acc_norm,none": 0.35},
                           "wikitext": {"word_perplexity,none": 20.0}}}
    assert lm_eval_accuracies(results) == {"piqa": 0.7, "arc_challenge": 0.35}


def test_read_run_rejects_non_object_results(runs):
    (runs / "dense" / "lm_eval_results.json").write_text("[1, 2]")
    with pytest.raises(RunError, match="not a JSON object"):
        read_run(runs / "dense")


def test_pareto_front():
    points = [(100, 10.0), (90, 12.0), (90, 11.0), (80, 30.0), (85, 40.0), (70, 25.0)]
    assert pareto_front(points, lower_is_better=True) == [(70, 25.0), (90, 11.0), (100, 10.0)]
    assert pareto_front([(1, 0.5), (2, 0.4), (3, 0.6)], lower_is_better=False) == [(1, 0.5), (3, 0.6)]


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def chromium(*args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tempfile.mkdtemp()}"]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")
def test_html_renders_and_sorts_in_headless_chromium(runs, tmp_path):
    assert CliRunner().invoke(app, ["leaderboard", str(runs)]).exit_code == 0
    page = (runs / "leaderboard" / "leaderboard.html").resolve().as_uri()
    def rows_in_order(names, sort):  # the page's own script sorts on load as the URL asks
        dom = chromium("--dump-dom", f"{page}#sort={sort}").stdout
        positions = [dom.find(f">{name}<") for name in names]
        return -1 not in positions and positions == sorted(positions), dom

    # column 5 is wikitext2 ppl, descending; column 2 sparsity, ascending, the run without one last
    ok, dom = rows_in_order(["sleb", "drop-late", "merge permute=False", "dense (none)"], "-5")
    assert ok and 'aria-sort="descending"' in dom
    assert rows_in_order(["dense (none)", "drop-late", "sleb", "merge permute=False"], "2")[0]
    shot = tmp_path / "shot.png"
    chromium(f"--screenshot={shot}", "--window-size=1200,900", page)
    assert shot.read_bytes()[:4] == b"\x89PNG" and shot.stat().st_size > 20_000


@pytest.mark.parametrize("damage,why", [
    (lambda p: (p / "lm_eval_results.json").write_text('{"results": [1]}'), "not lm-eval's task mapping"),
    (lambda p: (p / "lm_eval_results.json").write_text('{"results": {"piqa": [1]}, "x": 1}'), None),
    (lambda p: _edit_manifest(p, blocks_before=0), "blocks_before: Input should be greater than 0"),
    (lambda p: _edit_manifest(p, params_before=0), "params_before: Input should be greater than 0"),
    (lambda p: _edit_manifest(p, params_after="many"), "params_after: Input should be a valid integer"),
    (lambda p: _edit_manifest(p, base_model=None), "base_model"),
    (lambda p: (p / "results_ppl.json").write_text('{"wikitext2_ppl": 3}'), "lack a field"),
    (lambda p: (p / "compress_eval.json").write_bytes(b"\xff\xfe"), "not UTF-8"),
])
def test_one_malformed_run_is_skipped_and_the_rest_built(runs, damage, why):
    damage(runs / "sleb25")
    board = build(runs)
    skipped = {path.name: reason for path, reason in board.problems}
    if why is None:  # a task without metrics is left out, the run stays
        assert "sleb25" in {r.path.name for r in board.rows}
    else:
        assert why in skipped["sleb25"] and "sleb25" not in {r.path.name for r in board.rows}
    assert {"dense", "drop3", "merge"} <= {r.path.name for r in board.rows}
    result = CliRunner().invoke(app, ["leaderboard", str(runs)])
    assert result.exit_code == 0 and "Traceback" not in result.output


def _edit_manifest(path: Path, **values) -> None:
    manifest = json.loads((path / "compress_eval.json").read_text())
    (path / "compress_eval.json").write_text(json.dumps({**manifest, **values}))


def test_a_null_perplexity_is_a_missing_value(runs):
    (runs / "drop3" / "results_ppl.json").write_text(json.dumps(
        {"wikitext2_ppl": {"ppl": None, "windows": 20, "seqlen": 512}, "c4_ppl": {"ppl": 30.0, "windows": 20,
                                                                                  "seqlen": 512}}))
    row = next(r for r in build(runs).rows if r.path.name == "drop3")
    assert "wikitext2_ppl" not in row.metrics and row.metrics["c4_ppl"] == 30.0


def test_offline_twins_report_the_accuracy_their_task_does():
    """ce_hellaswag / ce_arc_challenge are read as acc_norm like hellaswag / arc_challenge (the papers')."""
    from compress_eval.results.store import lm_eval_accuracies

    metrics = {"acc,none": 0.3, "acc_norm,none": 0.4}
    results = {"results": {t: metrics for t in ("ce_hellaswag", "ce_arc_challenge", "hellaswag", "ce_piqa")}}
    assert lm_eval_accuracies(results) == {"ce_hellaswag": 0.4, "ce_arc_challenge": 0.4, "hellaswag": 0.4,
                                           "ce_piqa": 0.3}


def with_records(path: Path, piqa: list[int], hellaswag: list[int], nll: list[float]) -> Path:
    """Per-document records as evaluations keep them (records.json), consistent with the stored results."""
    record = {t: {"doc_id": list(range(len(v))), "prompt_hash": [f"h{d}" for d in range(len(v))], "acc": v,
                  "acc_norm": v, "selection": {"sample": len(v), "seed": 0}}
              for t, v in (("ce_piqa", piqa), ("ce_hellaswag", hellaswag))}
    ppl = {"wikitext2_ppl": {"seqlen": 512, "nll": nll, "tokens": [511] * len(nll)}}
    (path / "records.json").write_text(json.dumps({"lm_eval": record, "ppl": ppl}))
    results = {t: {"acc,none": sum(v) / len(v), "acc_norm,none": sum(v) / len(v)}
               for t, v in (("ce_piqa", piqa), ("ce_hellaswag", hellaswag))}
    samples = {t: {"original": 5000, "effective": len(v)} for t, v in (("ce_piqa", piqa), ("ce_hellaswag", hellaswag))}
    (path / "lm_eval_results.json").write_text(json.dumps({"results": results, "n-samples": samples}))
    return path


@pytest.fixture
def paired_runs(tmp_path):
    import numpy as np

    g = np.random.default_rng(0)
    piqa, hs = (g.random(2000) < 0.7).astype(int), (g.random(1000) < 0.4).astype(int)
    worse = piqa.copy()
    worse[np.flatnonzero(piqa == 1)[:100]] = 0  # 5 points fewer, all on documents dense got right
    nll = list(g.uniform(1500, 1600, 20))
    root = tmp_path / "runs"
    rows = {"dense": ("none", piqa, nll), "same": ("shortgpt", piqa, [x + g.normal(0, 2) for x in nll]),
            "worse": ("sleb", worse, [1.2 * x for x in nll])}
    for name, (method, p, n) in rows.items():
        run = make_run(root, name, method, removed=0 if method == "none" else 8, sparsity=None if method == "none"
                       else 0.25, ppl={"wikitext2": float(np.exp(sum(n) / (511 * len(n))))}, seqlen=512, windows=20)
        with_records(run, [int(x) for x in p], [int(x) for x in hs], n)
    return root


def test_deltas_are_marked_when_paired_tests_say_more_than_chance(paired_runs):
    board = build(paired_runs)
    by_label = {r.label: i for i, r in enumerate(board.rows)}
    worse, same = by_label["sleb"], by_label["shortgpt"]
    assert board.significant[(worse, "ce_piqa")] and board.significant[(worse, "wikitext2_ppl")]
    assert board.significant[(worse, "avg_acc")]
    assert not board.significant[(same, "ce_piqa")] and not board.significant[(same, "avg_acc")]
    assert not board.significant[(same, "ce_hellaswag")]
    table = markdown(board)
    row = next(line for line in table.splitlines() if "| sleb |" in line)
    assert "(-5.00*)" in row and "40.40 (+0.00) |" in row  # hellaswag: the same documents right
    same_row = next(line for line in table.splitlines() if "| shortgpt |" in line)
    assert "70" in same_row and "(+0.00)" in same_row and "*" not in same_row
    low, high = board.avg_interval[by_label["none"]]
    assert low < board.rows[by_label["none"]].metrics["avg_acc"] < high
    assert "2000 of 5000 documents (a sample, seed 0)" in table and MARKS_NOTE in table


def test_sort_ranks_rows_best_first(paired_runs, tmp_path):
    labels = [r.label for r in build(paired_runs, sort="ppl").rows]
    assert labels[-1] == "sleb" and set(labels[:2]) == {"none", "shortgpt"}
    assert [r.label for r in build(paired_runs, sort="piqa").rows][-1] == "sleb"
    assert [r.label for r in build(paired_runs, sort="avg").rows][-1] == "sleb"
    result = CliRunner().invoke(app, ["leaderboard", str(paired_runs), "--sort", "wiki", "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    html = (tmp_path / "o" / "leaderboard.html").read_text()
    assert html.count("<details>") == 3 and "removed blocks: [0, 1, 2, 3, 4, 5, 6, 7]" in html
    result = CliRunner().invoke(app, ["leaderboard", str(paired_runs), "--sort", "arc_c", "--out", str(tmp_path / "p")])
    assert result.exit_code == 2 and "no run has that column" in result.stderr and "Traceback" not in result.output
