"""A plain transformers copy of one of our checkpoints: what ``AutoModelForCausalLM`` (or a VLM's
Auto class) loads with no compress-eval installed.

Every method's checkpoint exports; a bitsandbytes one is written dequantized (float weights). Two
things of ours have no counterpart in a transformers decoder layer: a tied module stored once
(the copy is written out in full) and a removed sublayer (written as the original module with every
weight zero, so it adds zero to the residual stream: the same function at full size). Depth-pruned
blocks need nothing: the config already has the new depth.
"""

from __future__ import annotations

from pathlib import Path

import torch

from compress_eval.errors import UserError
from compress_eval.models import gate
from compress_eval.models.checkpoint import atomic_output_dir, ensure_new_output
from compress_eval.models.loading import auto_model_class, from_pretrained_tied, load_checkpoint, untie
from compress_eval.results.store import read_manifest


def zero_module(module: torch.nn.Module) -> None:
    """Every parameter of ``module`` zero (an attention with zero projections, an MLP with zero
    linears, both output exactly zero)."""
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()


def dequantized(directory: str | Path) -> torch.nn.Module:
    """A bitsandbytes checkpoint as a float model with the weights it computes with (transformers'
    ``dequantize``): runtimes without bitsandbytes (vLLM's float path, llama.cpp's converter) load that."""
    model, _ = load_checkpoint(directory, device="cpu")
    model.dequantize()
    return model


def export_plain(directory: str | Path, out: str | Path) -> Path:
    """Write ``directory`` (our checkpoint) to ``out`` as a plain transformers checkpoint: weights,
    config, generation config, tokenizer and processor; no manifest (nothing is left to rebuild)."""
    from transformers import AutoProcessor

    manifest = read_manifest(directory)
    if manifest is None:
        raise UserError(f"{directory} is not a compress-eval checkpoint (no compress_eval.json): "
                        f"transformers loads it as it is")
    ensure_new_output(out)
    tokenizer = gate.check(directory).tokenizer
    if manifest.quantized:
        model = dequantized(directory)
    else:
        model = from_pretrained_tied(auto_model_class(str(directory)), directory, gate.absent_modules(manifest))
    untie(model, manifest.tie_map)
    for path in manifest.skipped:
        zero_module(model.get_submodule(path))
    with atomic_output_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if (Path(directory) / "preprocessor_config.json").is_file():
            AutoProcessor.from_pretrained(directory).save_pretrained(tmp)
    return Path(out)
