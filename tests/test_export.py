"""``compress-eval export``: every method's checkpoint (and a recovered and a quantized one) as a plain
transformers checkpoint that ``AutoModelForCausalLM`` loads with nothing of ours, computing what our
loader's model computes."""

import pytest
import torch
from typer.testing import CliRunner

from compress_eval.cli.app import app
from compress_eval.config import make_config
from compress_eval.methods.registry import available_methods
from compress_eval.models.loading import load_model
from compress_eval.pipeline import compress, save
from conftest import VOCAB, saved_model_dir, tiny_model

FAST_FUSE = {"epochs": 1, "batch_size": 2, "group_size": 3, "coef_rank": 64, "lora_rank": 4}
# Each method at a small amount on a 4-block model (hidden 64, so the 4-bit stage quantizes every linear).
METHODS = {
    "drop": dict(blocks=[1]), "none": {}, "shortgpt": dict(num_blocks=1), "sleb": dict(num_blocks=1),
    "drop-window": dict(num_blocks=1), "sublayer": dict(options={"num_sublayers": 2}),
    "fuse": dict(num_blocks=1, options=FAST_FUSE), "mi": dict(num_blocks=1),
    "mi-ft": dict(num_blocks=1, options=FAST_FUSE), "mi-lowrank": dict(num_blocks=1, options=FAST_FUSE),
    "merge": dict(options={"num_merge": 2}),
}
STAGES = {
    "lora-recovered": dict(method="drop", blocks=[1], options={"recover": "lora", "recover_steps": 2}),
    "int8": dict(method="drop", blocks=[1], quantize="int8"),
    "merge-nf4": dict(method="merge", options={"num_merge": 2}, quantize="nf4"),
}
IDS = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))


def test_every_method_is_covered():
    assert set(METHODS) == set(available_methods())


@pytest.mark.parametrize("case", [*METHODS, *STAGES])
def test_export_loads_in_plain_transformers(case, tmp_path, data_dir):
    from transformers import AutoModelForCausalLM

    source = saved_model_dir(tmp_path / "tiny", tiny_model(hidden=64))
    settings = STAGES.get(case) or {"method": case, **METHODS[case]}
    result = compress(make_config(model=str(source), calib_samples=2, seqlen=16, **settings), data_dir)
    checkpoint = save(result, tmp_path / "ckpt")
    ours, _, _ = load_model(str(checkpoint), "cpu")

    done = CliRunner().invoke(app, ["export", str(checkpoint), "--out", str(tmp_path / "plain")])
    assert done.exit_code == 0, done.output
    assert not (tmp_path / "plain" / "compress_eval.json").exists()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain").eval()
    assert getattr(plain.config, "quantization_config", None) is None
    assert plain.config.num_hidden_layers == result.manifest.blocks_after
    with torch.no_grad():
        expected = ours(IDS).logits
        # LLM.int8() multiplies in float16: the dequantized float weights give its logits to that precision.
        tolerance = 2e-2 if case == "int8" else 1e-5
        torch.testing.assert_close(plain(IDS).logits, expected, rtol=tolerance, atol=tolerance)
