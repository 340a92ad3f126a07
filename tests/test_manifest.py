"""The typed manifest: what the pipeline writes parses back, and manifests written by earlier
releases (a checked-in example from commit 86d56bb: drop + int8 on a tiny LLaMA) still read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from compress_eval.manifest import Manifest
from compress_eval.results import store

OLD = Path(__file__).parent / "data" / "manifest-86d56bb.json"


def test_a_manifest_of_an_earlier_release_still_reads(tmp_path):
    shutil.copy(OLD, tmp_path / store.MANIFEST)
    manifest = store.read_manifest(tmp_path)
    assert manifest.method == "drop" and manifest.removed_blocks == [1] and manifest.blocks_after == 3
    assert manifest.quantized and manifest.quantization["kind"] == "int8" and manifest.tie_map == {}
    assert manifest.model_dump(mode="json")["details"] == json.loads(OLD.read_text())["details"]
    (tmp_path / store.PPL_FILE).write_text(json.dumps({"wikitext2_ppl": {"ppl": 90.0, "seqlen": 16, "windows": 2}}))
    run = store.read_run(tmp_path)
    assert run.label == "drop +int8" and run.removed_blocks == 1 and run.metrics == {"wikitext2_ppl": 90.0}


def test_unknown_fields_are_kept_and_counts_must_be_positive():
    data = json.loads(OLD.read_text())
    assert Manifest.model_validate({**data, "from_the_future": 1}).model_dump()["from_the_future"] == 1
    with pytest.raises(ValueError, match="params_before"):
        Manifest.model_validate({**data, "params_before": 0})


def test_the_pipeline_writes_what_the_readers_parse(tiny_model_dir, data_dir, tmp_path):
    from compress_eval.config import make_config
    from compress_eval.models.checkpoint import weight_bytes
    from compress_eval.models.loading import load_model
    from compress_eval.pipeline import compress, save

    result = compress(make_config(model=str(tiny_model_dir), method="drop", blocks=[2]), data_dir)
    save(result, tmp_path / "out")
    manifest = store.read_manifest(tmp_path / "out")
    assert manifest == result.manifest
    dense, _, _ = load_model(str(tiny_model_dir), "cpu")
    assert manifest.weight_bytes_before == weight_bytes(dense)  # one definition, before and after
    assert manifest.weight_bytes_after == weight_bytes(result.model) < manifest.weight_bytes_before
    assert (tmp_path / "out" / store.RECIPE_FILE).read_text() == manifest.recipe
