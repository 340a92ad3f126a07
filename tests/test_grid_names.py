"""Run directory names, pinned: the committed grids' cells (hash included; a refactor that changed one would
make every finished cell of that grid run again) and the directories ``compress`` names without --out."""

from pathlib import Path

import pytest

from compress_eval.config import make_config
from compress_eval.grid import expand, load_grid
from compress_eval.methods.registry import resolve_config, run_name

GRIDS = Path(__file__).resolve().parents[1] / "grids"

CELLS = {
    "ffmerge-gpt2.yaml": [
        "gpt2-large_none_bdf980a237f3",
        "gpt2-large_merge-ff-fraction-0.3333_d13c1740343b",
        "gpt2-large_merge-ff-fraction-0.5_df5ac8396399",
        "gpt2-large_merge-vanilla-ff-fraction-0.3333_c17aa24c31f6",
        "gpt2-large_merge-vanilla-ff-fraction-0.5_6f20bdeb0763",
        "gpt2-large_drop-window_n6_f3505c368b6a",
        "gpt2-large_drop-window_n12_3519c2612dde",
        "gpt2-large_merge-int8_d65f4f96c417",
    ],
    "ffmerge-smollm2.yaml": [
        "smollm2-135m_none_4c6fa5b57064",
        "smollm2-135m_merge-ff-fraction-0.3333_3d32d38178d0",
        "smollm2-135m_merge-ff-fraction-0.5_fb8bd5b9da48",
        "smollm2-135m_merge-vanilla-ff-fraction-0.3333_55320d3c5a94",
        "smollm2-135m_merge-vanilla-ff-fraction-0.5_da133961b7ae",
        "smollm2-135m_merge-ft-ff-fraction-0.3333_f00747448ea8",
        "smollm2-135m_merge-ft-ff-fraction-0.5_a6e6a7839bea",
        "smollm2-135m_merge-vanilla-ft-ff-fraction-0.3333_3559cf34223c",
        "smollm2-135m_merge-vanilla-ft-ff-fraction-0.5_122339eed3de",
        "smollm2-135m_drop-window_n5_a344a4f37d07",
        "smollm2-135m_drop-window_n10_3e46e0112268",
        "smollm2-135m_merge-int8_aa8dd56a3d4c",
    ],
    "fusegpt-tables-llama.yaml": [
        "llama2-7b_none_d731b49ce27a",
        "llama2-7b_shortgpt_s0.2_b21592fdcb4c",
        "llama2-7b_shortgpt_s0.25_e08cfad23eb3",
        "llama2-7b_shortgpt_s0.3_8ff373ca5f3b",
        "llama2-7b_sleb_s0.2_b0d5f03569a7",
        "llama2-7b_sleb_s0.25_2561776dc0ab",
        "llama2-7b_sleb_s0.3_ef057acf8363",
        "llama2-7b_fusegpt_s0.2_27aaf97b0f3d",
        "llama2-7b_fusegpt_s0.25_7fc0222cf2a5",
        "llama2-7b_fusegpt_s0.3_3d550101d5f3",
        "llama2-7b_mi_s0.25_97c0abf89572",
        "llama2-7b_mi-ft_s0.25_36478f8ff378",
        "llama2-13b_none_c7334b922edb",
        "llama2-13b_shortgpt_s0.2_a84a65fd3638",
        "llama2-13b_shortgpt_s0.25_022175cf2754",
        "llama2-13b_shortgpt_s0.3_57eea3a75bb3",
        "llama2-13b_sleb_s0.2_ee2b5bda45f2",
        "llama2-13b_sleb_s0.25_237363438b20",
        "llama2-13b_sleb_s0.3_e725ef5c960e",
        "llama2-13b_fusegpt_s0.2_879010795133",
        "llama2-13b_fusegpt_s0.25_c2e523d835ff",
        "llama2-13b_fusegpt_s0.3_4b964e727138",
        "llama2-13b_mi_s0.25_2994479f197c",
        "llama2-13b_mi-ft_s0.25_148d0661d296",
        "llama3-8b_none_bb447c94e5e6",
        "llama3-8b_shortgpt_s0.2_592cb2bb616e",
        "llama3-8b_shortgpt_s0.25_b7d7c714e598",
        "llama3-8b_shortgpt_s0.3_3f846eb11d6a",
        "llama3-8b_sleb_s0.2_8181fb02a9ad",
        "llama3-8b_sleb_s0.25_66b139864fe6",
        "llama3-8b_sleb_s0.3_834fc88d5614",
        "llama3-8b_fusegpt_s0.2_d1071fd76442",
        "llama3-8b_fusegpt_s0.25_9b324aabe1b2",
        "llama3-8b_fusegpt_s0.3_00ff37b7102a",
        "llama3-8b_mi_s0.25_f71e42454191",
        "llama3-8b_mi-ft_s0.25_5f24f8972b9b",
    ],
    "fusegpt-tables-smollm2.yaml": [
        "smollm2-135m_none_4c6fa5b57064",
        "smollm2-135m_shortgpt_s0.2_6725834040c6",
        "smollm2-135m_shortgpt_s0.25_40042e1615c3",
        "smollm2-135m_shortgpt_s0.3_3f43d1a3f230",
        "smollm2-135m_sleb_s0.2_32df98bbcb17",
        "smollm2-135m_sleb_s0.25_e80bdeda1b89",
        "smollm2-135m_sleb_s0.3_42920fd28530",
        "smollm2-135m_fusegpt_s0.2_87b1c17d1ad9",
        "smollm2-135m_fusegpt_s0.25_8c501ac49f2b",
        "smollm2-135m_fusegpt_s0.3_8d65248d98a3",
        "smollm2-135m_mi_s0.25_4390cff842d5",
        "smollm2-135m_mi-ft_s0.25_ada500f7035f",
        "smollm2-135m_mi-lowrank_s0.25_2efd5f0a5fec",
    ],
    "leaderboard-smollm2-50docs.yaml": [
        "smollm2-135m_none_d20cf29d9fb1",
        "smollm2-135m_shortgpt_s0.25_204fd19794df",
        "smollm2-135m_drop-window_s0.25_b951ec6b3840",
        "smollm2-135m_mi_s0.25_37f07c4ce937",
        "smollm2-135m_merge_d11cc917bf80",
        "smollm2-135m_sleb_s0.25_30422781c53f",
        "smollm2-135m_fuse_s0.25_01055de1fb9a",
        "smollm2-135m_mi-lowrank_s0.25_c1624534d8a6",
        "smollm2-135m_mi-ft_s0.25_ba35ab35bdc9",
    ],
    "leaderboard-smollm2.yaml": [
        "smollm2-135m_none_19326c63aeb4",
        "smollm2-135m_shortgpt_s0.25_2a7607c2fccc",
        "smollm2-135m_sleb_s0.25_e6aefa5aa2d5",
        "smollm2-135m_drop-window_s0.25_8cff32b1af62",
        "smollm2-135m_fuse_s0.25_ea3f0f11a967",
        "smollm2-135m_sublayer_p0.25_fc7517a9b8f8",
        "smollm2-135m_merge_p0.25_952711c70251",
        "smollm2-135m_fuse-kd_68f53609d69a",
        "smollm2-135m_fuse-kd-healed_ce3741792268",
        "smollm2-135m_shortgpt-healed_1a92c830b260",
    ],
    "smoke.yaml": [
        "smollm2-135m_none_84ba890b3df0",
        "smollm2-135m_drop_b1_f9743eefa27c",
        "smollm2-135m_drop_b1-2_c531a599fa80",
    ],
    "smollm2-drop.yaml": [
        "smollm2-135m_none_ba915f3f5e20",
        "smollm2-135m_drop-late_b20-21-22_c0cf0d8f0296",
        "smollm2-135m_drop-late_b18-19-20-21-22-23_e095437b6139",
    ],
}


def test_every_committed_grid_is_pinned():
    assert sorted(p.name for p in GRIDS.glob("*.yaml")) == sorted(CELLS)


@pytest.mark.parametrize("name", sorted(CELLS))
def test_cell_names_are_unchanged(name):
    assert [cell.name for cell in expand(load_grid(GRIDS / name))] == CELLS[name]


# compress without --out: (config values, directory)
DEFAULT_RUNS = [
    ({'method': 'shortgpt'}, 'smollm2-135m-shortgpt-0.25-s0'),
    ({'method': 'shortgpt', 'sparsity': 0.3}, 'smollm2-135m-shortgpt-0.3-s0'),
    ({'method': 'drop', 'blocks': [1, 2]}, 'smollm2-135m-drop-b1-2-s0'),
    ({'method': 'merge'}, 'smollm2-135m-merge-0.333-s0'),
    ({'method': 'merge', 'options': {'num_merge': 2}}, 'smollm2-135m-merge-2-s0'),
    ({'method': 'merge', 'options': {'window': '1-2'}}, 'smollm2-135m-merge-1-2-s0'),
    ({'method': 'merge', 'param_sparsity': 0.2}, 'smollm2-135m-merge-p0.2-s0'),
    ({'method': 'sublayer', 'options': {'num_sublayers': 3}}, 'smollm2-135m-sublayer-3-s0'),
    ({'method': 'sublayer', 'param_sparsity': 0.25}, 'smollm2-135m-sublayer-p0.25-s0'),
    ({'method': 'fuse', 'num_blocks': 2}, 'smollm2-135m-fuse-2-s0'),
    ({'method': 'none'}, 'smollm2-135m-none-0-s0'),
    ({'method': 'sleb', 'seed': 3}, 'smollm2-135m-sleb-0.25-s3'),
    ({'stages': [{'method': 'fuse', 'sparsity': 0.2},
      {'method': 'merge', 'options': {'ff_fraction': 0.2}}, {'quantize': 'nf4'}]}, 'smollm2-135m-fuse-0.2+merge-0.2-s0'),
]


@pytest.mark.parametrize("values,name", DEFAULT_RUNS)
def test_compress_default_directories_are_unchanged(values, name):
    assert run_name(resolve_config(make_config(model="/x/smollm2-135m", **values))) == name
