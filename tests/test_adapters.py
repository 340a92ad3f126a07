import pytest
import torch

from compress_eval.errors import UserError
from compress_eval.models.adapters import BlockRunner, embed_inputs, get_adapter
from conftest import FAMILIES, VOCAB, tiny_model


@pytest.mark.parametrize("family", FAMILIES)
def test_block_runner_matches_full_forward(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    ids = torch.randint(0, VOCAB, (3, 16))
    runner = BlockRunner(adapter, 16)
    logits = runner.logits(runner.run(embed_inputs(adapter, ids)))
    torch.testing.assert_close(logits, model(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_remove_blocks_then_forward_generate_and_reload(family, tmp_path):
    model = tiny_model(family)
    adapter = get_adapter(model)
    kept_before = [adapter.blocks[i] for i in (0, 2)]
    adapter.remove_blocks([1, 3])
    assert adapter.num_blocks == 2 and list(adapter.blocks) == kept_before
    assert adapter.text_config.num_hidden_layers == 2
    if getattr(adapter.text_config, "layer_types", None) is not None:
        assert len(adapter.text_config.layer_types) == 2
    ids = torch.randint(0, VOCAB, (2, 10))
    logits = model(ids).logits
    # KV-cache generation must agree with full recomputation (layer_idx renumbered).
    out = model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=0)
    out_nocache = model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(out, out_nocache)

    from compress_eval.models.registry import auto_model_class

    model.save_pretrained(tmp_path / "m")
    reloaded = auto_model_class(str(tmp_path / "m")).from_pretrained(tmp_path / "m").eval()
    assert get_adapter(reloaded).num_blocks == 2
    assert (reloaded(ids).logits - logits).abs().max().item() == 0.0


def test_unsupported_architecture_is_a_user_error():
    class Fake(torch.nn.Module):
        class config:
            model_type = "mamba"

    with pytest.raises(UserError, match="unsupported architecture 'mamba'.*llama"):
        get_adapter(Fake())


def test_removing_every_block_is_refused():
    adapter = get_adapter(tiny_model())
    with pytest.raises(UserError, match="every block"):
        adapter.remove_blocks([0, 1, 2, 3])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_linear_weight_is_out_by_in(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    block = adapter.blocks[0]
    up_role = "up" if adapter.is_gated_mlp else "fc1"
    w = adapter.linear_weight(block, up_role)
    assert w.shape[1] == 32 and w.shape[0] in (64, 128)
