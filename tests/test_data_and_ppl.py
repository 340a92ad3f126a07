import json
import math

import pytest
import torch

from compress_eval.data.calibration import calibration_windows, eval_windows
from compress_eval.data.corpora import corpus_text
from compress_eval.errors import UserError
from compress_eval.scoring.ppl import perplexity, window_nll
from conftest import tiny_model


def test_wikitext_rows_are_joined_like_the_papers(data_dir):
    rows = [json.loads(line)["text"] for line in open(data_dir / "wikitext2/wikitext-2-raw-v1.test.rows.jsonl")]
    assert corpus_text("wikitext2", "test") == "\n\n".join(rows)


def test_c4_eval_and_calibration_documents_are_disjoint(data_dir):
    val, train = corpus_text("c4", "validation"), corpus_text("c4", "train")
    assert val.startswith("Document 0. ") and "Document 1099. " in val and "Document 1100. " not in val
    assert train.startswith("Document 1100. ") and "Document 1199. " in train


def test_eval_windows_are_non_overlapping_and_drop_the_tail(data_dir, tokenizer):
    ids = tokenizer(corpus_text("wikitext2", "test"), return_tensors="pt").input_ids[0]
    w = eval_windows(tokenizer, "wikitext2", 16)
    assert w.shape == (ids.numel() // 16, 16)
    assert torch.equal(w.flatten(), ids[: w.numel()])
    assert eval_windows(tokenizer, "wikitext2", 16, max_windows=3).shape == (3, 16)


def test_calibration_is_seeded(data_dir, tokenizer):
    a = calibration_windows(tokenizer, "wikitext2", 4, 16, seed=1)
    b = calibration_windows(tokenizer, "wikitext2", 4, 16, seed=1)
    c = calibration_windows(tokenizer, "wikitext2", 4, 16, seed=2)
    assert a.shape == (4, 16) and torch.equal(a, b) and not torch.equal(a, c)


def test_missing_data_dir_is_a_user_error(monkeypatch, tmp_path):
    monkeypatch.setenv("COMPRESS_EVAL_DATA_DIR", str(tmp_path / "nope"))
    with pytest.raises(UserError, match="does not exist"):
        corpus_text("wikitext2", "test")


def test_unknown_dataset(data_dir):
    with pytest.raises(UserError, match="unknown dataset"):
        corpus_text("ptb", "test")


def test_perplexity_equals_exp_mean_token_nll():
    model = tiny_model()
    windows = torch.randint(0, 96, (5, 12))
    result = perplexity(model, windows, batch_size=2)
    with torch.no_grad():
        logits = model(windows).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 96), windows[:, 1:].reshape(-1))
    assert result.tokens == 5 * 11
    assert result.ppl == pytest.approx(math.exp(nll.item()), rel=1e-5)
    assert window_nll(logits, windows).shape == (5,)
    # batching does not change the number
    assert perplexity(model, windows, batch_size=5).ppl == pytest.approx(result.ppl, rel=1e-6)
