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

    from compress_eval.models.loading import auto_model_class

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


def _extra_tiny_model(model_type: str):
    """Tiny models of the FAMILIES rows conftest has no config for (gemma, gemma2, multimodal gemma3)."""
    import transformers as tf

    text = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, max_position_embeddings=256)
    torch.manual_seed(0)
    if model_type == "gemma3":
        vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      image_size=16, patch_size=8)
        config = tf.Gemma3Config(text_config=tf.Gemma3TextConfig(**text, sliding_window=8).to_dict(),
                                 vision_config=vision, mm_tokens_per_image=4)
        return tf.AutoModelForImageTextToText.from_config(config).eval()
    config = tf.GemmaConfig(**text) if model_type == "gemma" else tf.Gemma2Config(**text, sliding_window=8)
    return tf.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("family", FAMILIES + ["gemma", "gemma2", "gemma3"])
def test_norm_parameters_are_those_the_old_name_matching_found(family):
    model = _extra_tiny_model(family) if family in ("gemma", "gemma2", "gemma3") else tiny_model(family)
    adapter = get_adapter(model)
    for block in adapter.blocks:
        matched = [p for name, module in block.named_modules()
                   if "norm" in type(module).__name__.lower() or "ln_" in name.rsplit(".", 1)[-1]
                   for p in module.parameters(recurse=False)]
        found = adapter.norm_parameters(block)
        assert [id(p) for p in found] == [id(p) for p in matched]
        assert found or family == "olmo"  # OLMo's LayerNorms have no parameters


def test_every_family_row_is_covered_by_a_tiny_model():
    from compress_eval.models.adapters import FAMILIES as ROWS

    assert set(ROWS) == set(FAMILIES) | {"gemma", "gemma2", "gemma3"}


def test_multimodal_families_come_from_the_table():
    from compress_eval.models.adapters import FAMILIES as ROWS
    from compress_eval.models.adapters import is_multimodal

    assert sorted(m for m in ROWS if is_multimodal(m)) == ["gemma3", "llava", "llava_next", "qwen2_vl"]
    assert not is_multimodal(None) and not is_multimodal("mamba")


@pytest.mark.parametrize("family", ["llama", "gpt2", "llava", "starcoder2"])
def test_mlp_path_names_the_blocks_mlp_and_its_linears(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    mlp = adapter.mlp(adapter.blocks[2])
    assert model.get_submodule(adapter.mlp_path(2)) is mlp
    for role in adapter.family.mlp_linears:
        assert mlp.get_submodule(adapter.mlp_linear_path(role)) is adapter.linear(adapter.blocks[2], role)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_out_in_view_and_its_inverse(family):
    from compress_eval.models.adapters import from_out_in, is_conv1d, is_linear, out_in

    adapter = get_adapter(tiny_model(family))
    module = adapter.linear(adapter.blocks[0], "o")
    assert is_linear(module) and is_conv1d(module) == adapter.family.conv1d
    assert not is_linear(adapter.final_norm)
    fc = adapter.linear(adapter.blocks[0], "down" if adapter.is_gated_mlp else "fc2")  # hidden 32 out, d_ff in
    w = adapter.weight_out_in(fc)
    assert w.shape[0] == 32 and w.shape[1] > 32
    assert torch.equal(w, out_in(fc.weight, is_conv1d(fc)))
    assert torch.equal(from_out_in(w, adapter.family.conv1d), fc.weight)
