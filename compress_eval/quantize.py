"""The bitsandbytes stage: int8 (LLM.int8()), nf4 or fp4 weights on top of any compression method.

Quantization goes through transformers' own bitsandbytes integration (the compressed model is
written to a temporary directory and reloaded with a ``quantization_config``), so the result is
exactly what ``from_pretrained`` makes: ``save_pretrained`` serializes it, and both our loader and
a plain ``AutoModelForCausalLM.from_pretrained(dir)`` read it back quantized. Modules shared
through a tie map are written once and re-tied after the reload, so a tied FF sublayer is one
quantized copy. bitsandbytes >= 0.45 runs all three kinds on CPU as well as CUDA.

4-bit takes a linear only if its in_features is a multiple of 64 (the quantization block) and its
out_features of 32: on CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights for a fused bf16
kernel in tiles of that shape and fails on others. Other linears stay float (via
``llm_int8_skip_modules``), decided from the shape and never from this CPU, so a checkpoint behaves
the same on every machine; the record's ``unquantized`` names them with the reason. LLM.int8() takes
any shape. The quantized model carries a save hook for a bitsandbytes 0.50 bug on those CPUs (block
scales left in the repacked layout when a model is saved after inference; see ``_restore_4bit_scales``).
"""

from __future__ import annotations

import re
import tempfile
import time
import torch

from compress_eval.errors import UserError
from compress_eval.models.adapters import is_conv1d, is_linear, out_in, vision_modules
from compress_eval.models.checkpoint import weight_bytes
from compress_eval.models.loading import (DTYPES, auto_model_class, copies_detached, from_pretrained_tied,
                                          keep_4bit_scales_on_save, quiet_int8_cast_warning,
                                          restore_structure)
from compress_eval.models.sublayers import skipped_paths

KINDS: tuple[str, ...] = ("int8", "nf4", "fp4")
COMPUTE_DTYPES = {name: DTYPES[name] for name in ("float32", "bfloat16", "float16")}
# bitsandbytes' 4-bit layout: blocks of FOUR_BIT_BLOCKSIZE weights along in_features (Params4bit's
# default, kept by transformers), repacked on AVX512-BF16 CPUs in tiles of FOUR_BIT_TILE_ROWS output rows
# (bitsandbytes.functional._convert_weight_packed_for_cpu: Linear4bit.forward in eval mode, no grad).
FOUR_BIT_BLOCKSIZE = 64
FOUR_BIT_TILE_ROWS = 32


def compute_dtype_of(name: str | torch.dtype | None, model_dtype: torch.dtype) -> torch.dtype:
    """The 4-bit matmul dtype: the one named, or the model's own (fp32 on CPU, bf16 on CUDA)."""
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "auto"):
        return model_dtype
    if name not in COMPUTE_DTYPES:
        raise UserError(f"unknown compute dtype {name!r}: use auto, {', '.join(COMPUTE_DTYPES)}")
    return COMPUTE_DTYPES[name]


def check_options(kind: str, double_quant: bool = False, compute_dtype: str | None = None) -> None:
    """Reject option combinations bitsandbytes would ignore or refuse, naming the fix."""
    if kind not in KINDS:
        raise UserError(f"unknown quantization {kind!r}: use one of {', '.join(KINDS)}")
    if kind == "int8" and (double_quant or compute_dtype is not None):
        raise UserError("--double-quant and --compute-dtype apply to 4-bit only (nf4, fp4): "
                        "LLM.int8() picks its own matmul dtype; drop them or use --quantize nf4")


def bnb_config(kind: str, double_quant: bool = False, compute_dtype: str | torch.dtype | None = None,
               model_dtype: torch.dtype = torch.float32, skip_modules: list[str] | None = None):
    """The ``BitsAndBytesConfig`` for int8, or nf4/fp4 with optional double quantization (QLoRA
    quantizes the block scales too: ~0.37 bits/parameter saved) and a compute dtype.
    ``skip_modules`` (regexes of module paths) replaces transformers' default skips (lm_head)."""
    check_options(kind, double_quant, None if isinstance(compute_dtype, torch.dtype) else compute_dtype)
    try:
        from transformers import BitsAndBytesConfig
        import bitsandbytes  # noqa: F401  (fail here with an install hint, not deep in transformers)
    except ImportError as exc:
        raise UserError(f"--quantize needs bitsandbytes: pip install 'bitsandbytes>=0.45' ({exc})") from exc
    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind, llm_int8_skip_modules=skip_modules,
                              bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=compute_dtype_of(compute_dtype, model_dtype))


def quantization_kind(model: torch.nn.Module) -> str | None:
    """'int8', 'nf4', 'fp4' for a bitsandbytes-quantized model, else None."""
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    if qc is None:
        return None
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    if qc.get("quant_method") != "bitsandbytes":
        return None
    if qc.get("load_in_8bit"):
        return "int8"
    return qc.get("bnb_4bit_quant_type", "fp4") if qc.get("load_in_4bit") else None


def require_unquantized(model: torch.nn.Module, name: str = "the model") -> None:
    """Methods rewrite float weights and quantization is not stackable: quantization comes last."""
    kind = quantization_kind(model)
    if kind is not None:
        raise UserError(f"{name} is already {kind}-quantized: start from the unquantized model and add "
                        f"--quantize; quantization is the last stage")


def check_trainable(model: torch.nn.Module, how: str) -> None:
    """Fine-tuning code calls this first: quantized weights take no gradient steps, only adapters do."""
    kind = quantization_kind(model)
    if kind is not None and how not in ("lora", "qlora"):
        raise UserError(f"cannot {how} fine-tune a {kind}-quantized model: bitsandbytes weights are frozen; "
                        f"use LoRA on the quantized base (QLoRA), or fine-tune first and quantize last")


def skip_modules_for(model: torch.nn.Module, tie_map: dict[str, str],
                     unquantized: dict[str, str] | None = None) -> list[str] | None:
    """Transformers' default skips plus the tie map's copies, the removed sublayers, the ``unquantized``
    linears (those ``four_bit_unfit`` names) and a VLM's vision tower and projector (the stage quantizes
    the language model, which is what the methods compress). A copy or a removed sublayer is stored
    nowhere (re-tied or emptied on load); skipping it lets the loader give it a throwaway float init,
    where transformers would fail to initialize a missing quantized weight."""
    kept = [*tie_map, *skipped_paths(model), *(unquantized or {}), *vision_modules(model)]
    if not kept:
        return None
    from transformers.quantizers.base import get_keys_to_not_convert

    return sorted(get_keys_to_not_convert(model)) + [re.escape(name) for name in kept]


def four_bit_refusal(in_features: int, out_features: int) -> str | None:
    """Why bitsandbytes' 4-bit kernels cannot take an ``in_features -> out_features`` linear on every
    CPU path (see the module docstring), or None when they can. The shape alone decides, not this CPU."""
    problems = [f"{what} {n} is not a multiple of {m} ({unit})" for what, n, m, unit in
                (("in_features", in_features, FOUR_BIT_BLOCKSIZE, "the 4-bit block size"),
                 ("out_features", out_features, FOUR_BIT_TILE_ROWS, "the AVX512-BF16 CPU kernel's tile"))
                if n % m]
    return "; ".join(problems) or None


def _linear_shape(module: torch.nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of what transformers' bitsandbytes integration replaces: a plain
    ``nn.Linear`` or GPT-2's ``Conv1D`` (weight stored (in, out)); None for anything else."""
    if not is_linear(module):
        return None
    out_features, in_features = out_in(module.weight, is_conv1d(module)).shape
    return in_features, out_features


def four_bit_unfit(model: torch.nn.Module, tie_map: dict[str, str] | None = None) -> tuple[dict[str, str], int]:
    """({module path: reason} for the linears 4-bit would quantize but cannot, number of linears it
    would quantize): those transformers skips anyway (lm_head, tie copies) are neither."""
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    skips = ((skip_modules_for(model, tie_map or {}) or get_keys_to_not_convert(model))
             + list(getattr(model, "_keep_in_fp32_modules", None) or []))
    unfit, count = {}, 0
    for name, module in model.named_modules():
        shape = _linear_shape(module)
        if shape is None or not should_convert_module(name, skips):
            continue
        count += 1
        if (reason := four_bit_refusal(*shape)) is not None:
            unfit[name] = reason
    return unfit, count


def quantize_model(model, kind: str, double_quant: bool = False, compute_dtype: str | None = None,
                   tie_map: dict[str, str] | None = None):
    """(quantized model, record for the manifest). The model is saved to a temporary directory
    (``TMPDIR``) and reloaded quantized onto its own device; ``model`` itself is left unchanged."""
    require_unquantized(model)
    tie_map = tie_map or {}
    device, dtype = next(model.parameters()).device, model.dtype
    unquantized, linears = four_bit_unfit(model, tie_map) if kind in ("nf4", "fp4") else ({}, 0)
    if unquantized and len(unquantized) == linears:
        name, reason = next(iter(unquantized.items()))
        raise UserError(f"--quantize {kind}: no linear of this model fits bitsandbytes' 4-bit kernels, which need "
                        f"in_features a multiple of {FOUR_BIT_BLOCKSIZE} and out_features of {FOUR_BIT_TILE_ROWS} "
                        f"(e.g. {name}: {reason}); use --quantize int8, which takes any shape")
    config = bnb_config(kind, double_quant, compute_dtype, dtype, skip_modules_for(model, tie_map, unquantized))
    bytes_before, start = weight_bytes(model), time.perf_counter()
    quiet_int8_cast_warning()
    with tempfile.TemporaryDirectory(prefix="compress-eval-quantize-") as tmp:
        with copies_detached(model, tie_map):
            model.save_pretrained(tmp)
        skipped = skipped_paths(model)
        quantized = from_pretrained_tied(auto_model_class(tmp), tmp, [*tie_map, *skipped],
                                         quantization_config=config, dtype=dtype, device_map={"": device})
    restore_structure(quantized, tie_map, skipped)
    quantized.eval()
    keep_4bit_scales_on_save(quantized)
    record = {
        "kind": kind,
        "double_quant": bool(double_quant) if kind != "int8" else None,
        "compute_dtype": str(config.bnb_4bit_compute_dtype).removeprefix("torch.") if kind != "int8" else None,
        "bitsandbytes_config": config.to_dict(),
        "unquantized": unquantized,  # {linear: why it stays float}: shapes the 4-bit kernels refuse
        "weight_bytes_before": bytes_before,
        "weight_bytes_after": weight_bytes(quantized),
        "seconds": round(time.perf_counter() - start, 3),
    }
    return quantized, record
