"""`compress-eval plan`: memory predicted from a config alone (shipped LLaMA-3 configs, tiny models);
exact parameter counts, the offload rule, monotonicity, fits / does not fit, JSON, bad input."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from compress_eval.cli.app import app
from compress_eval.config import make_config
from compress_eval.errors import UserError
from compress_eval.architecture import EXAMPLE_CONFIGS, example_names
from compress_eval.memory_model import GB, HEADROOM
from compress_eval.offload_policy import choose_offload
from compress_eval.plan import make_plan
from compress_eval.sizes import parse_memory
from conftest import one_line_error, saved_model_dir, tiny_model

CUDA_24 = dict(device="cuda", device_memory="24GB", host_memory="64GB")


def plan_of(model: str, method: str, options: dict | None = None, device_memory: str | None = None,
            host_memory: str | None = None, **config):
    """The plan of ``compress MODEL --method METHOD`` with these options and CompressConfig values."""
    return make_plan(make_config(model=model, method=method, options=options or {}, **config), device_memory,
                     host_memory)


def plan_cli(*args: str):
    return CliRunner().invoke(app, ["plan", *args])


def test_shipped_configs_are_package_data():
    assert example_names() == ["llama3-70b", "llama3-8b"]
    for name in example_names():
        config = json.loads((EXAMPLE_CONFIGS / f"{name}.json").read_text())
        assert config["model_type"] == "llama" and config["vocab_size"] == 128256


@pytest.mark.parametrize("name,billions,blocks", [("llama3-8b", 8.03, 32), ("llama3-70b", 70.55, 80)])
def test_llama3_parameter_counts(name, billions, blocks):
    plan = plan_of(name, "shortgpt", device="cuda", device_memory="1TB", host_memory="1TB", offload="none")
    assert round(plan.parameters / 1e9, 2) == billions
    assert plan.weight_bytes == plan.parameters * 2  # bf16 on CUDA by default
    assert plan.fits and plan.verdict.startswith("fits: ")


def test_llama3_8b_exact_sizes():
    from compress_eval.architecture import architecture, load_config

    a = architecture(load_config("llama3-8b"))
    assert a.parameters == 8_030_261_248
    assert a.embedding == a.head == 128256 * 4096  # untied
    assert a.block == 2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 4096 * 14336 + 2 * 4096  # q o, k v, FF, norms
    assert a.num_blocks == 32 and a.hidden == 4096 and a.intermediate == 14336 and a.kv_heads == 8


def test_tied_head_counts_once(tmp_path):
    """init_empty_weights leaves a tied head untied on the meta device: counted once all the same."""
    import transformers as tf

    from compress_eval.architecture import architecture

    config = tf.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = tf.AutoModelForCausalLM.from_config(config)
    a = architecture(config)
    assert a.parameters == sum(p.numel() for p in model.parameters()) and a.head == 0


def test_offload_monotone_on_the_device():
    device = {mode: plan_of("llama3-8b", "fuse", {"profile": "paper"}, offload=mode, **CUDA_24).peak_device
              for mode in ("none", "cpu", "disk")}
    assert device["disk"] <= device["cpu"] <= device["none"]
    host = {mode: plan_of("llama3-8b", "shortgpt", offload=mode, **CUDA_24).peak_host
            for mode in ("cpu", "disk")}
    assert host["disk"] < host["cpu"]  # disk keeps the weights in their files


@pytest.mark.parametrize("method,opts", [("shortgpt", {}), ("sleb", {}), ("fuse", {}), ("merge", {"num_merge": 2})])
def test_bigger_calibration_needs_more(method, opts):
    small = plan_of("llama3-8b", method, opts, calib_samples=8, seqlen=512, offload="none", **CUDA_24)
    big = plan_of("llama3-8b", method, opts, calib_samples=32, seqlen=2048, offload="none", **CUDA_24)
    assert big.peak_device + big.peak_host > small.peak_device + small.peak_host
    assert big.peak_device >= small.peak_device and big.peak_host >= small.peak_host


def test_fits_and_does_not_fit():
    small = plan_of("llama3-8b", "shortgpt", device="cuda", device_memory="80GB", host_memory="64GB", offload="none")
    assert small.fits and small.verdict.startswith("fits: device")
    tight = plan_of("llama3-70b", "shortgpt", device="cuda", device_memory="24GB", host_memory="64GB",
                      offload="none")
    assert not tight.fits and tight.verdict.startswith("does not fit: ") and "--offload" in tight.verdict
    cpu = plan_of("llama3-70b", "shortgpt", host_memory="16GB", offload="none")
    assert not cpu.fits and "--offload disk" in cpu.verdict


def test_auto_follows_the_rule():
    """auto: none when everything fits the GPU, cpu when the weights fit the host, else disk."""
    def auto(model, **memory):
        return plan_of(model, "shortgpt", **memory).offload

    assert auto("llama3-8b", device="cuda", device_memory="80GB", host_memory="64GB") == "none"
    assert auto("llama3-70b", device="cuda", device_memory="80GB", host_memory="256GB") == "cpu"
    assert auto("llama3-70b", device="cuda", device_memory="80GB", host_memory="64GB") == "disk"
    assert auto("llama3-70b", host_memory="64GB") == "disk"


def test_choose_offload_is_pure():
    g = GB
    assert choose_offload(10 * g, 2 * g, 24 * g, 64 * g, "cuda").mode == "none"
    assert choose_offload(20 * g, 4 * g, 24 * g, 64 * g, "cuda").mode == "cpu"
    assert choose_offload(140 * g, 4 * g, 24 * g, 64 * g, "cuda").mode == "disk"
    assert choose_offload(20 * g, 4 * g, 24 * g, 64 * g, "cpu").mode == "disk"  # a CPU's host is its device
    edge = int((1 - HEADROOM) * 24 * g)
    assert choose_offload(edge - g, g, 24 * g, 0, "cuda").mode == "none"
    assert choose_offload(edge, 1, 24 * g, 0, "cuda").mode == "disk"
    mode, reason = choose_offload(10 * g, 2 * g, 24 * g, 64 * g, "cuda")  # unpacks like a tuple
    assert "fit" in reason


@pytest.mark.parametrize("text,expected", [("24GB", 24 * 10**9), ("24GiB", 24 * 2**30), ("512MB", 512 * 10**6),
                                           ("1.5 TB", 1.5e12), ("2048", 2048), ("16gib", 16 * 2**30)])
def test_parse_memory(text, expected):
    assert parse_memory(text) == int(expected)


@pytest.mark.parametrize("text", ["24XB", "GB", "-1GB", "0GB", "", "24 G B"])
def test_parse_memory_rejects(text):
    with pytest.raises(UserError, match="not a size"):
        parse_memory(text)


def test_cli_table_and_verdict():
    result = plan_cli("llama3-8b", "--method", "fuse", "--profile", "paper", "--device", "cuda",
                      "--device-memory", "24GB", "--host-memory", "64GB")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "8.03 B parameters" in out and "128 x 2048 tokens" in out
    for step in ("load", "calibrate", "score", "fine-tune", "save", "ppl eval", "peak"):
        assert f"│ {step}" in out, step
    assert out.strip().splitlines()[-1].startswith(("fits: device", "does not fit: device"))


def test_cli_json_parses_and_matches_the_library():
    result = plan_cli("llama3-70b", "--method", "sleb", "--offload", "disk", "--device", "cuda", "--device-memory",
                      "24GB", "--host-memory", "64GB", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["offload"] == "disk" and data["parameters"] == 70_553_706_496
    assert data["peak_device"] == max(s["device"] for s in data["steps"])
    assert isinstance(data["fits"], bool) and data["verdict"]


def test_cli_on_a_local_model_dir_and_its_config(tmp_path):
    """A directory (our tiny model, saved) and its config.json plan alike, CPU: one memory number."""
    model_dir = saved_model_dir(tmp_path / "tiny", tiny_model("llama"))
    by_dir = json.loads(plan_cli(str(model_dir), "--method", "merge", "--num-merge", "1", "--seqlen", "16",
                                 "--json").stdout)
    by_file = json.loads(plan_cli(str(model_dir / "config.json"), "--method", "merge", "--num-merge", "1",
                                  "--seqlen", "16", "--json").stdout)
    assert by_dir["steps"] == by_file["steps"]
    assert all(s["device"] == s["host"] for s in by_dir["steps"])  # device == host on a CPU run
    text = plan_cli(str(model_dir), "--method", "sleb", "--seqlen", "16", "--host-memory", "64GB")
    assert text.exit_code == 0 and "memory GB" in text.stdout and "fits: memory" in text.stdout


@pytest.mark.parametrize("args,fragment", [
    (["nosuch-model", "--method", "shortgpt"], "unknown model"),
    (["llama3-8c", "--method", "shortgpt"], "did you mean llama3-8b"),
    (["/nonexistent/config.json", "--method", "shortgpt"], "not found"),
    (["llama3-8b", "--method", "nosuch"], "unknown method"),
    (["llama3-8b", "--method", "shortgpt", "--device-memory", "24XB", "--device", "cuda"], "not a size"),
    (["llama3-8b", "--method", "shortgpt", "--host-memory", "lots"], "not a size"),
    (["llama3-8b", "--method", "shortgpt", "--offload", "ram"], "offload: Input should be"),
    (["llama3-8b", "--method", "shortgpt", "--device", "tpu"], "device"),
    (["llama3-8b", "--method", "shortgpt", "--dtype", "float64"], "unknown dtype"),
    (["llama3-8b", "--method", "fuse", "--profile", "gpu"], "profile"),
    (["llama3-8b", "--method", "sleb", "--num-blocks", "40"], "would leave none"),
    (["llama3-8b", "--method", "merge", "--num-merge", "40"], "impossible"),
])
def test_bad_input_one_line(args, fragment):
    one_line_error(plan_cli(*args), fragment)


def test_cuda_without_a_gpu_asks_for_device_memory():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    one_line_error(plan_cli("llama3-8b", "--method", "shortgpt", "--device", "cuda"), "--device-memory")


def test_bad_config_files(tmp_path):
    (tmp_path / "a.json").write_text('{"hidden_size": 8}')
    one_line_error(plan_cli(str(tmp_path / "a.json"), "--method", "shortgpt"), "no model_type")
    (tmp_path / "b.json").write_text("{not json")
    one_line_error(plan_cli(str(tmp_path / "b.json"), "--method", "shortgpt"), "not a JSON config")
