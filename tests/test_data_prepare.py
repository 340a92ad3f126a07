"""``compress-eval data prepare`` / ``data check`` against a fake Hub (``datasets.load_dataset`` answering
from small in-memory data sets in the Hub's schemas), and the order in which the data directory is found."""

import json

import datasets
import pytest
from typer.testing import CliRunner

from compress_eval import paths
from compress_eval.paths import prepared_data_dir
from compress_eval.cli.app import app
from compress_eval.data import prepare as data
from compress_eval.data.benchmarks import load_benchmark
from compress_eval.data.corpora import C4_FILES, c4_documents, training_text, wikitext2_rows
from conftest import SHARED_DATA, one_line_error, saved_model_dir, tiny_model

WIKI = ["", " = Title = \n", "", " Some text , here . \n", " More text . \n"]
HUB = {
    ("wikitext", "wikitext-2-raw-v1"): WIKI,
    ("wikitext", "wikitext-2-v1"): [r.replace("here", "<unk>") for r in WIKI],
    ("baber/piqa", None): [{"goal": "Dry a towel?", "sol1": "Sun.", "sol2": "Sea.", "label": 0},
                           {"goal": "Open a jar?", "sol1": "Paint it.", "sol2": "Twist it.", "label": 1}],
    ("allenai/ai2_arc", "ARC-Easy"): [{"id": "a", "question": "What is 1+1?", "answerKey": "B",
                                       "choices": {"text": ["1", "2", "3"], "label": ["A", "B", "C"]}}],
    ("allenai/ai2_arc", "ARC-Challenge"): [{"id": "c", "question": "Which is hot?", "answerKey": "1",
                                            "choices": {"text": ["sun", "ice"], "label": ["1", "2"]}}],
    ("Rowan/hellaswag", None): [{"activity_label": "Roof shingle removal", "ctx": "A man is on a roof. he",
                                 "ctx_a": "A man is on a roof.", "ctx_b": "he", "label": "3",
                                 "endings": ["a", "b", "c", "starts pulling up [title] shingles."]}],
    ("allenai/winogrande", "winogrande_xl"): [{"sentence": "Sarah was better than Maria so _ got the easy cases.",
                                               "option1": "Sarah", "option2": "Maria", "answer": "2"}],
}


@pytest.fixture
def hub(monkeypatch):
    """``datasets.load_dataset`` as the Hub would answer our loaders' calls; returns the calls made."""
    calls = []

    def load_dataset(path, name=None, split=None, data_files=None, streaming=False, **kwargs):
        calls.append((path, name, split, data_files, streaming))
        if path == "allenai/c4":
            assert data_files == {"validation": C4_FILES["validation"]} and streaming
            return datasets.Dataset.from_list([{"text": f"Document {i}.", "url": f"https://c4/{i}",
                                                "timestamp": "2019-04-20T00:00:00Z"} for i in range(2100)])
        rows = HUB[(path, name)]
        return datasets.Dataset.from_list([{"text": r} for r in rows] if path == "wikitext" else rows)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


@pytest.fixture
def offline(monkeypatch):
    def load_dataset(path, *args, **kwargs):
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)


def test_prepare_writes_what_the_readers_read(hub, tmp_path):
    root = tmp_path / "data"
    written = data.prepare(root)
    assert set(written) == {rel for files in data.TASK_FILES.values() for rel in files}
    assert wikitext2_rows("test", root) == WIKI and wikitext2_rows("validation", root) == WIKI
    assert training_text("wikitext2", root, 100).startswith(" \n = Title = \n \n Some text , <unk> .")
    assert c4_documents("validation", root)[:2] == ["Document 0.", "Document 1."]
    assert len(c4_documents("validation", root)) == 1100 and len(c4_documents("train", root)) == 900
    assert load_benchmark("piqa", root) == [{"goal": "Dry a towel?", "sol1": "Sun.", "sol2": "Sea.", "label": 0},
                                            {"goal": "Open a jar?", "sol1": "Paint it.", "sol2": "Twist it.",
                                             "label": 1}]
    assert load_benchmark("arc_easy", root) == [{"question": "What is 1+1?", "choices": ["1", "2", "3"], "gold": 1}]
    assert load_benchmark("arc_challenge", root)[0]["gold"] == 0
    # lm-eval's query: ctx_b capitalised, [title] tags as lm-eval's preprocess removes them
    assert load_benchmark("hellaswag", root) == [{"query": "Roof shingle removal: A man is on a roof. He",
                                                  "choices": ["a", "b", "c", "starts pulling up. shingles."],
                                                  "label": 3}]
    assert load_benchmark("winogrande", root) == [{"options": ["Sarah was better than Maria so Sarah",
                                                               "Sarah was better than Maria so Maria"],
                                                   "continuation": "got the easy cases.", "gold": 1}]
    manifest = json.loads((root / paths.MANIFEST).read_text())["files"]
    entry = manifest["piqa/valid.jsonl"]
    assert entry["source"] == "baber/piqa validation" and entry["sha256"] == data.sha256(root / "piqa/valid.jsonl")
    assert manifest["c4/c4_validation_2k.parquet"]["source"].startswith("allenai/c4 en/c4-validation.00000")
    assert all(check.ok for check in data.check(root)), data.check(root)


def test_prepare_only_some_then_check(hub, tmp_path):
    root = tmp_path / "data"
    runner = CliRunner()
    result = runner.invoke(app, ["data", "prepare", "--dir", str(root), "--only", "wiki,arc_e"])
    assert result.exit_code == 0, result.output
    assert {c[0] for c in hub} == {"wikitext", "allenai/ai2_arc"}
    assert "wikitext2      ok" in result.stdout and "wrote 4 files" in result.stdout

    result = runner.invoke(app, ["data", "check", str(root)])
    assert result.exit_code == 1
    lines = dict(line.split(None, 1) for line in result.stdout.splitlines())
    assert lines["arc_easy"].startswith("ok     1 documents; 1 sha256 as in MANIFEST.json")
    assert lines["piqa"].startswith("FAILED missing piqa/valid.jsonl")

    (root / "arc" / "arc_easy.test.llm-foundry.jsonl").write_text('{"query": "Question: x", "choices": ["a"], '
                                                                 '"gold": 0}\n')
    (root / "wikitext2" / "wikitext-2-raw-v1.test.rows.jsonl").write_text("not json\n")
    lines = dict(line.split(None, 1) for line in runner.invoke(app, ["data", "check", str(root)]).stdout.splitlines())
    assert lines["arc_easy"] == "FAILED sha256 differs from MANIFEST.json: arc/arc_easy.test.llm-foundry.jsonl"
    assert lines["wikitext2"].startswith("FAILED does not parse")

    one_line_error(runner.invoke(app, ["data", "prepare", "--dir", str(root), "--only", "wiki,mmlu"]), "mmlu")


def test_prepare_from_a_local_copy_links_and_hashes(hub, tmp_path):
    data.prepare(tmp_path / "hub", ("piqa",))
    result = CliRunner().invoke(app, ["data", "prepare", "--dir", str(tmp_path / "linked"), "--only", "piqa",
                                      "--from", str(tmp_path / "hub")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "linked" / "piqa" / "valid.jsonl").is_symlink()
    ours = json.loads((tmp_path / "linked" / paths.MANIFEST).read_text())["files"]["piqa/valid.jsonl"]
    theirs = json.loads((tmp_path / "hub" / paths.MANIFEST).read_text())["files"]["piqa/valid.jsonl"]
    assert ours["sha256"] == theirs["sha256"] and ours["source"].endswith("hub/piqa/valid.jsonl")
    one_line_error(CliRunner().invoke(app, ["data", "prepare", "--dir", str(tmp_path / "x"), "--only", "c4",
                                            "--from", str(tmp_path / "hub")]), "c4_validation_2k.parquet is missing")


def test_data_directory_order(hub, tmp_path, monkeypatch):
    """--data-dir, then $COMPRESS_EVAL_DATA_DIR, then the prepared cache (once data prepare wrote its
    manifest there), then the Hub (None)."""
    assert prepared_data_dir() == paths.cache_dir() / "data"  # the real default (the tests' is patched)
    monkeypatch.setattr(paths, "prepared_data_dir", lambda: tmp_path / "cache" / "data")
    monkeypatch.delenv(paths.DATA_DIR_ENV, raising=False)
    assert paths.data_dir() is None
    result = CliRunner().invoke(app, ["data", "prepare", "--only", "piqa"])
    assert result.exit_code == 0, result.output
    assert paths.data_dir() == tmp_path / "cache" / "data"
    (tmp_path / "env").mkdir()
    monkeypatch.setenv(paths.DATA_DIR_ENV, str(tmp_path / "env"))
    assert paths.data_dir() == tmp_path / "env"
    assert paths.data_dir(tmp_path) == tmp_path


def test_offline_without_data_says_data_prepare(offline, tmp_path, monkeypatch):
    monkeypatch.delenv(paths.DATA_DIR_ENV, raising=False)
    model = saved_model_dir(tmp_path / "tiny", tiny_model())
    runner = CliRunner()
    one_line_error(runner.invoke(app, ["ppl", str(model), "--dataset", "wikitext2", "--seqlen", "16"]),
                   "compress-eval data prepare")
    one_line_error(runner.invoke(app, ["data", "prepare", "--only", "piqa"]), "cannot load 'baber/piqa'")


def test_check_the_shared_data():
    if not (SHARED_DATA / "piqa").is_dir():
        pytest.skip("../shared/data is not beside the checkout")
    checks = {c.task: c for c in data.check(SHARED_DATA)}
    assert set(checks) >= set(data.TASKS) and all(c.ok for c in checks.values()), checks
    assert checks["hellaswag"].detail.startswith("10042 documents")
