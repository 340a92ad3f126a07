import pytest

from compress_eval.config import dump_recipe, load_recipe, make_config
from compress_eval.errors import UserError


@pytest.mark.parametrize("layers,sparsity,expected", [(30, 0.1, 3), (30, 0.2, 6), (30, 0.25, 8), (32, 0.25, 8),
                                                       (4, 0.5, 2)])
def test_blocks_to_remove_rounds_up_like_the_papers(layers, sparsity, expected):
    assert make_config(model="m", method="sleb", sparsity=sparsity).blocks_to_remove(layers) == expected


@pytest.mark.parametrize("sparsity", [0.0, 1.0, 1.5, -0.1])
def test_sparsity_outside_unit_interval_is_rejected(sparsity):
    with pytest.raises(UserError, match="sparsity must be in"):
        make_config(model="m", method="sleb", sparsity=sparsity)


def test_removing_every_block_is_rejected():
    with pytest.raises(UserError, match="leave none"):
        make_config(model="m", method="sleb", num_blocks=4).blocks_to_remove(4)
    with pytest.raises(UserError, match="leave none"):
        make_config(model="m", method="sleb", sparsity=0.99).blocks_to_remove(4)


def test_recipe_round_trip_and_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: smollm2-135m\nmethod: sleb\nsparsity: 0.2\noptions: {a: 1}\n")
    cfg = load_recipe(path, seed=3, options={"b": 2})
    assert (cfg.model, cfg.method, cfg.sparsity, cfg.seed, cfg.options) == ("smollm2-135m", "sleb", 0.2, 3,
                                                                           {"a": 1, "b": 2})


@pytest.mark.parametrize("recovery", [{"recover": "lora"}, {"recover": "lora", "recover_loss": "ce+kd",
                                                             "recover_kd_weight": 0.3}])
def test_a_written_recipe_loads_back_to_its_config(tmp_path, recovery):
    """The recipe.yaml of every run directory holds all the recovery fields, so it must load back."""
    cfg = make_config(model="smollm2-135m", method="shortgpt", sparsity=0.2, recovery=recovery)
    path = tmp_path / "r.yaml"
    path.write_text(dump_recipe(cfg))
    assert load_recipe(path) == cfg


def test_bad_recipe_is_a_user_error(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: m\nmethod: sleb\nbogus: 1\n")
    with pytest.raises(UserError, match="bogus"):
        load_recipe(path)
    with pytest.raises(UserError, match="not found"):
        load_recipe(tmp_path / "missing.yaml")
