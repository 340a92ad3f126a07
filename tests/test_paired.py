"""Paired statistics and ``compress-eval compare``: synthetic per-document records with known answers."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from compress_eval.cli.app import app
from compress_eval.results import paired
from compress_eval.results.compare import PairingError, compare_runs
from compress_eval.results.store import MANIFEST, RECORDS_FILE
from tests.conftest import one_line_error, stub_manifest

runner = CliRunner()


def correct(n: int, acc: float, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random(n) < acc).astype(int)


def with_gap(a: np.ndarray, gap: float, seed: int) -> np.ndarray:
    """``a`` with round(gap * n) more documents right: some wrong ones turned right (and, so the pair is
    not trivially one-sided, as many other right ones turned wrong as wrong ones turned right on top)."""
    g = np.random.default_rng(seed)
    b = a.copy()
    wrong, right = np.flatnonzero(a == 0), np.flatnonzero(a == 1)
    churn = round(0.03 * a.size)
    up = g.choice(wrong, size=round(gap * a.size) + churn, replace=False)
    down = g.choice(right, size=churn, replace=False)
    b[up], b[down] = 1, 0
    return b


def test_identical_runs_give_delta_zero_and_p_one():
    a = correct(2000, 0.6, 0)
    r = paired.paired_accuracy(a, a.copy())
    assert r.delta == 0 and r.p == 1.0 and r.low == 0 and r.high == 0 and not r.significant
    assert r.a == r.b == pytest.approx(a.mean())


def test_a_planted_five_point_gap_on_2000_documents_is_detected():
    a = correct(2000, 0.6, 1)
    b = with_gap(a, 0.05, 2)
    r = paired.paired_accuracy(a, b, seed=3)
    assert r.delta == pytest.approx(0.05)
    assert r.low > 0 and r.low < 0.05 < r.high and r.p < 1e-6 and r.significant
    # the unpaired view would see two overlapping +-1.1-point standard errors; the pairing is what decides
    assert r.stderr_a == pytest.approx(np.std(a, ddof=1) / np.sqrt(a.size))


def test_a_gap_within_chance_is_not_significant():
    a = correct(200, 0.6, 4)
    b = with_gap(a, 0.005, 5)  # one document
    r = paired.paired_accuracy(a, b, seed=0)
    assert r.low < 0 < r.high and r.p > 0.05 and not r.significant


def test_mcnemar_is_the_exact_binomial_test_on_disagreements():
    a = np.array([0] * 10 + [1] * 5)
    b = np.array([1] * 10 + [1] * 5)
    assert paired.mcnemar_p(a, b) == pytest.approx(2 * 0.5 ** 10)
    a = np.array([1, 0, 1, 0, 1, 1])
    b = np.array([0, 1, 1, 0, 1, 1])  # one each way
    assert paired.mcnemar_p(a, b) == pytest.approx(1.0)


def test_the_count_bootstrap_is_the_index_bootstrap():
    """Resampling documents' (b - a) by multinomial counts has the distribution of resampling indices."""
    a, b = correct(500, 0.55, 6), correct(500, 0.6, 7)
    fast = paired.bootstrap_delta_counts(a, b, 20000, seed=0)
    idx = np.random.default_rng(1).integers(0, a.size, size=(20000, a.size))
    slow = (b[idx] - a[idx]).mean(axis=1)
    assert np.quantile(fast, [0.025, 0.975]) == pytest.approx(np.quantile(slow, [0.025, 0.975]), abs=0.004)
    assert fast.mean() == pytest.approx(slow.mean(), abs=0.001)


def test_bootstrap_is_seeded():
    a, b = correct(300, 0.5, 8), correct(300, 0.55, 9)
    assert paired.paired_accuracy(a, b, seed=4) == paired.paired_accuracy(a, b, seed=4)


def test_paired_perplexity():
    g = np.random.default_rng(0)
    nll = g.uniform(1000, 1400, size=40)
    tokens = [511] * 40
    same = paired.paired_ppl(nll, nll.copy(), tokens)
    assert same.delta == 0 and same.low == 0 and same.high == 0 and not same.significant
    worse = paired.paired_ppl(nll, nll * 1.05 + g.normal(0, 5, 40), tokens)
    assert worse.delta > 0 and worse.low > 0 and worse.significant
    assert worse.a == pytest.approx(np.exp(nll.sum() / (511 * 40)))


def test_average_accuracy_interval_holds_the_mean():
    tasks = [correct(1000, 0.5, 10), correct(500, 0.7, 11)]
    mean, low, high = paired.average_accuracy(tasks)
    assert low < mean < high and mean == pytest.approx((tasks[0].mean() + tasks[1].mean()) / 2)
    delta, low, high = paired.paired_average([(t, t) for t in tasks])
    assert delta == low == high == 0


# --- runs on disk --------------------------------------------------------------------------------

def lm_record(doc_ids, acc, hashes=None, selection=None):
    return {"doc_id": list(doc_ids), "prompt_hash": hashes or [f"h{d}" for d in doc_ids],
            "acc": [int(x) for x in acc], "selection": selection or {}}


def write_run(path, lm_eval=None, ppl=None):
    path.mkdir(parents=True)
    (path / MANIFEST).write_text(stub_manifest().model_dump_json())
    (path / RECORDS_FILE).write_text(json.dumps({"lm_eval": lm_eval or {}, "ppl": ppl or {}}))
    return path


def test_compare_prints_each_task_paired(tmp_path):
    a = correct(2000, 0.6, 12)
    b = with_gap(a, 0.05, 13)
    nll = list(np.random.default_rng(1).uniform(900, 1100, 10))
    run_a = write_run(tmp_path / "a", {"ce_piqa": lm_record(range(2000), a)},
                      {"wikitext2_ppl": {"seqlen": 64, "nll": nll, "tokens": [63] * 10}})
    run_b = write_run(tmp_path / "b", {"piqa": lm_record(range(2000), b)},  # a ce_ twin pairs with its task
                      {"wikitext2_ppl": {"seqlen": 64, "nll": nll, "tokens": [63] * 10}})
    pairs = compare_runs(run_a, run_b)
    assert [(p.task, p.metric) for p in pairs] == [("wikitext2_ppl", "ppl"), ("piqa", "acc")]
    assert pairs[1].result.significant and not pairs[0].result.significant
    result = runner.invoke(app, ["compare", str(run_a), str(run_b)])
    assert result.exit_code == 0, result.output
    row = next(line for line in result.stdout.splitlines() if "piqa" in line)
    assert "+5.00" in row and "yes" in row and "2000" in row


@pytest.mark.parametrize("b_docs, b_hashes, b_selection, fragment", [
    (range(100), None, {"limit": 100}, "200 documents (a sample of 200, seed 0), b.run on 100 (the first 100)"),
    (range(1, 201), None, {"sample": 200, "seed": 1}, "2 are not in both"),
    (range(200), ["x"] * 200, {"sample": 200, "seed": 0}, "200 documents have different prompts"),
])
def test_runs_on_different_documents_are_refused_in_one_line(tmp_path, b_docs, b_hashes, b_selection, fragment):
    a = write_run(tmp_path / "a.run", {"ce_arc_easy": lm_record(range(200), correct(200, 0.5, 0),
                                                                selection={"sample": 200, "seed": 0})})
    b = write_run(tmp_path / "b.run", {"ce_arc_easy": lm_record(b_docs, correct(len(b_docs), 0.5, 1), b_hashes,
                                                                b_selection)})
    with pytest.raises(PairingError, match="arc_easy"):
        compare_runs(a, b)
    one_line_error(runner.invoke(app, ["compare", str(a), str(b)]), fragment)


def test_perplexity_on_other_windows_is_refused(tmp_path):
    a = write_run(tmp_path / "a", ppl={"c4_ppl": {"seqlen": 64, "nll": [1.0] * 4, "tokens": [63] * 4}})
    b = write_run(tmp_path / "b", ppl={"c4_ppl": {"seqlen": 128, "nll": [1.0] * 4, "tokens": [127] * 4}})
    one_line_error(runner.invoke(app, ["compare", str(a), str(b)]), "4 windows of 64 tokens")


def test_compare_needs_records_and_two_runs(tmp_path):
    a = write_run(tmp_path / "a", ppl={"c4_ppl": {"seqlen": 64, "nll": [1.0], "tokens": [63]}})
    old = tmp_path / "old"
    old.mkdir()
    (old / MANIFEST).write_text(stub_manifest().model_dump_json())
    one_line_error(runner.invoke(app, ["compare", str(a), str(old)]), "no per-document records")
    one_line_error(runner.invoke(app, ["compare", str(a)]), "at least two run directories")
    one_line_error(runner.invoke(app, ["compare", str(a), str(tmp_path / "nowhere")]), "not found")


# --- records written by evaluations ----------------------------------------------------------------

@pytest.fixture
def shared_data(monkeypatch, tmp_path):
    from tests.test_lm_eval import SHARED_DATA

    if not (SHARED_DATA / "piqa").is_dir():
        pytest.skip("../shared/data is not beside the checkout")
    monkeypatch.setenv("COMPRESS_EVAL_DATA_DIR", str(SHARED_DATA))
    monkeypatch.setenv("COMPRESS_EVAL_CACHE", str(tmp_path / "cache"))
    return SHARED_DATA


def test_evaluations_keep_records_on_a_seeded_sample_that_pairs(tiny_model_dir, shared_data, tmp_path):
    evaluation = ["--then-eval", "wiki,piqa", "--eval-seqlen", "16", "--max-windows", "3"]
    runs = []
    for blocks in ("1", "2"):
        out = tmp_path / f"drop{blocks}"
        result = runner.invoke(app, ["compress", str(tiny_model_dir), "--method", "drop", "--blocks", blocks,
                                     "--out", str(out), *evaluation, "--sample", "6", "--sample-seed", "3"])
        assert result.exit_code == 0, result.output
        runs.append(out)
    held = [json.loads((r / RECORDS_FILE).read_text()) for r in runs]
    piqa = [h["lm_eval"]["ce_piqa"] for h in held]
    assert piqa[0]["doc_id"] == piqa[1]["doc_id"] == sorted(piqa[0]["doc_id"]) != list(range(6))
    assert len(piqa[0]["doc_id"]) == 6 and piqa[0]["selection"] == {"sample": 6, "seed": 3}
    assert piqa[0]["prompt_hash"] == piqa[1]["prompt_hash"] and set(piqa[0]["acc"]) <= {0, 1}
    stored = json.loads((runs[0] / "lm_eval_results.json").read_text())
    assert stored["results"]["ce_piqa"]["acc,none"] == pytest.approx(np.mean(piqa[0]["acc"]))
    assert "samples" not in stored  # the documents' texts stay out of the run directory
    wiki = held[0]["ppl"]["wikitext2_ppl"]
    ppl = json.loads((runs[0] / "results_ppl.json").read_text())["wikitext2_ppl"]
    assert len(wiki["nll"]) == 3 and "window_nlls" not in ppl
    assert ppl["ppl"] == pytest.approx(np.exp(sum(wiki["nll"]) / sum(wiki["tokens"])), rel=1e-6)
    assert [p.task for p in compare_runs(*runs)] == ["wikitext2_ppl", "piqa"]

    # the first 6 documents are other documents: refused for pairing, one line
    first = tmp_path / "first6"
    assert runner.invoke(app, ["compress", str(tiny_model_dir), "--method", "drop", "--blocks", "1", "--out",
                               str(first), *evaluation, "--limit", "6"]).exit_code == 0
    one_line_error(runner.invoke(app, ["compare", str(runs[0]), str(first)]), "the first 6")
    one_line_error(runner.invoke(app, ["eval", str(first), "--tasks", "piqa", "--limit", "3", "--sample", "3"]),
                   "give one of them")


def test_sample_sizes_per_task_and_their_errors():
    from compress_eval.errors import UserError
    from compress_eval.eval_config import EvalConfig

    cfg = EvalConfig(tasks=["piqa", "hellaswag"], sample="hs=2000,arc_e=500", sample_seed=4)
    assert cfg.sample == {"hellaswag": 2000, "arc_easy": 500}
    assert cfg.sample_size("ce_hellaswag") == 2000 and cfg.sample_size("ce_piqa") is None
    assert cfg.selection("ce_hellaswag") == {"sample": 2000, "seed": 4} and cfg.selection("ce_piqa") == {}
    assert EvalConfig(tasks=["piqa"], sample="300").sample == 300
    assert EvalConfig(tasks=["piqa"], limit=5).selection("piqa") == {"limit": 5}
    for bad, fragment in [("wiki=3", "perplexity reads"), ("hs=0", "positive"), ("x", "positive"),
                          ("hs=2,,", "task=N pairs"), ("nope=3", "unknown task")]:
        with pytest.raises(UserError, match=fragment):
            EvalConfig(tasks=["piqa"], sample=bad)
