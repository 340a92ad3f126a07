import copy

import pytest
import torch

from compress_eval.models.adapters import BlockRunner, embed_inputs, get_adapter
from compress_eval.scoring.prefix import PrefixStates
from conftest import VOCAB, tiny_model


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3_text"])
def test_suffix_from_cached_prefix_equals_full_forward_without_the_block(family):
    model = tiny_model(family)
    calib = torch.randint(0, VOCAB, (5, 12))
    cache = PrefixStates(get_adapter(model), calib, batch_size=2)
    assert cache.num_batches == 3
    for skip in range(4):
        pruned = copy.deepcopy(model)
        adapter = get_adapter(pruned)
        adapter.remove_blocks([skip])
        runner = BlockRunner(adapter, 12)
        for b, ids in enumerate(cache.input_ids):
            naive = runner.run(embed_inputs(adapter, ids))
            torch.testing.assert_close(cache.final_without(skip, b), naive, rtol=1e-5, atol=1e-5)
