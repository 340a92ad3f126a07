"""bench/make_scale_model.py: a small model made the way the >= 1 B one is (sharded, seeded) loads
through transformers and our loader, and the same arguments write the same bytes."""

from __future__ import annotations

import hashlib
import runpy
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1] / "bench" / "make_scale_model.py"


def digest(directory: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(directory.glob("*.safetensors")):
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


def test_small_scale_model_is_sharded_seeded_and_loads(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from compress_eval.models.loading import load_model

    make = runpy.run_path(str(BENCH))["write_scale_model"]
    kwargs = dict(hidden=64, layers=2, intermediate=128, heads=4, kv_heads=2, dtype=torch.float32,
                  max_shard_bytes=40_000)
    total = make(tmp_path / "a", tiny_model_dir, **kwargs)
    make(tmp_path / "b", tiny_model_dir, **kwargs)
    make(tmp_path / "c", tiny_model_dir, seed=1, **kwargs)
    assert len(list((tmp_path / "a").glob("model-*-of-*.safetensors"))) > 1
    assert not list((tmp_path / "a").glob(".shard-*"))
    assert digest(tmp_path / "a") == digest(tmp_path / "b") != digest(tmp_path / "c")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    assert sum(p.numel() for p in model.parameters()) == total
    assert torch.equal(model.model.norm.weight, torch.ones(64))
    ours, tokenizer, _ = load_model(str(tmp_path / "a"), "cpu")
    ids = tokenizer("The quick brown fox", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, model(ids).logits)
