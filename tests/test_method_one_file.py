"""A method is one file (docs/adding-a-method.md): a toy method, registered from a module outside the
package, runs through plan, compress (with its card), a grid and the CLI with no other edit."""

from __future__ import annotations

import importlib
import json
import sys

from huggingface_hub import ModelCard
from typer.testing import CliRunner

from compress_eval.cli.app import app
from compress_eval.config import make_config
from compress_eval.grid import Grid, expand
from compress_eval.methods import registry

TOY = '''
"""Remove the last blocks (a toy: no scores)."""

from compress_eval.methods.base import CompressionRecord, Compressor
from compress_eval.methods.registry import register_method


@register_method
class DropLast(Compressor):
    name = "toy-last"
    needs_calibration = False
    default_amount = {"sparsity": 0.25}
    summary = "remove the last blocks"

    def compress(self, adapter, calib) -> CompressionRecord:
        n = adapter.num_blocks
        removed = list(range(n - self.cfg.blocks_to_remove(n), n))
        adapter.remove_blocks(removed)
        return CompressionRecord(removed_blocks=removed, details={"rule": "the last blocks"})
'''


def test_a_method_from_one_file_runs_everywhere(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    from compress_eval.batch import run_cells
    from compress_eval.plan import make_plan

    (tmp_path / "toy_last.py").write_text(TOY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry.available_methods()))  # forgotten after the test
    monkeypatch.delitem(sys.modules, "toy_last", raising=False)
    importlib.import_module("toy_last")

    plan = make_plan(make_config(model=str(tiny_model_dir), method="toy-last", device="cpu", offload="none"),
                     host_memory="64GB")
    assert plan.method == "toy-last" and plan.fits

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["compress", str(tiny_model_dir), "--method", "toy-last"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "runs" / "tiny-llama-toy-last-0.25-s0"  # named by its default amount
    manifest = json.loads((out / "compress_eval.json").read_text())
    assert manifest["removed_blocks"] == [3] and manifest["config"]["sparsity"] == 0.25  # its default amount
    assert "toy-last" in ModelCard.load(out / "README.md").data.tags

    grid = Grid(models=[str(tiny_model_dir)], methods=["toy-last"], sparsities=[0.5], tasks=["wikitext2"],
                eval={"seqlen": 16, "max_windows": 2})
    cells = expand(grid)
    assert [c.name.rsplit("_", 1)[0] for c in cells] == ["tiny-llama_toy-last_s0.5"]
    assert [o.status for o in run_cells(cells, tmp_path / "grid")] == ["ran"]
    run = tmp_path / "grid" / cells[0].name
    assert json.loads((run / "compress_eval.json").read_text())["removed_blocks"] == [2, 3]
    assert "wikitext2" in (run / "README.md").read_text()
