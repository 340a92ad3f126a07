"""The one path for the data: load -> calibrate -> score/compress -> save -> evaluate -> record.

Each step reads the previous step's output and nothing else; the CLI commands are thin wrappers.
"""

from __future__ import annotations

import datetime as _dt
import resource
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from compress_eval.config import CompressConfig, dump_recipe
from compress_eval.data.calibration import calibration_windows
from compress_eval.methods.registry import get_method, resolve_config
from compress_eval.models import checkpoint
from compress_eval.models.adapters import get_adapter
from compress_eval.models.registry import load_model
from compress_eval.quantize import bnb_config, quantize_model, require_unquantized


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Timer:
    """Named wall-clock timings of the pipeline's steps, for the manifest."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def step(self, name: str):
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 3)


def compress(cfg: CompressConfig, data_dir: str | Path | None = None, log=print):
    """Compress ``cfg.model`` in memory. Returns (model, tokenizer, manifest, record)."""
    timer = Timer()
    cfg = resolve_config(cfg)
    method = get_method(cfg)  # validates the method and its options before any heavy work
    if cfg.quantize:
        bnb_config(cfg.quantize, cfg.double_quant, cfg.compute_dtype)  # bitsandbytes installed?
    torch.manual_seed(cfg.seed)
    with timer.step("load"):
        model, tokenizer, source = load_model(cfg.model, cfg.device, cfg.dtype, cfg.allow_pickle,
                                              cfg.trust_remote_code)
    require_unquantized(model, cfg.model)
    adapter = get_adapter(model)
    blocks_before = adapter.num_blocks
    params_before, bytes_before = checkpoint.parameter_count(model), checkpoint.weight_bytes(model)
    calib = None
    if method.needs_calibration:
        with timer.step("calibrate"):
            calib = calibration_windows(tokenizer, cfg.calib_data, cfg.calib_samples, cfg.seqlen,
                                        cfg.seed, data_dir)
    log(f"compressing {cfg.model} ({blocks_before} blocks) with {cfg.method}")
    with timer.step("compress"):
        record = method.compress(adapter, calib)
    blocks_after, params_after = adapter.num_blocks, checkpoint.parameter_count(model)  # packed 4-bit would halve it
    weight_bytes_after, quantization = checkpoint.weight_bytes(model), None
    if cfg.quantize:
        log(f"quantizing to {cfg.quantize} with bitsandbytes")
        with timer.step("quantize"):
            model, quantization = quantize_model(model, cfg.quantize, cfg.double_quant, cfg.compute_dtype,
                                                 record.tie_map)
        weight_bytes_after = quantization["weight_bytes_after"]  # scales and codebooks included
    manifest = {
        "format": checkpoint.FORMAT,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "base_model": {"name": cfg.model, "kind": source.kind, "location": source.location},
        "method": cfg.method,
        "config": cfg.model_dump(),
        "method_options": method.options.model_dump(),
        "recipe": dump_recipe(cfg),
        "seed": cfg.seed,
        "blocks_before": blocks_before,
        "blocks_after": blocks_after,
        "removed_blocks": record.removed_blocks,
        "tie_map": record.tie_map,
        "params_before": params_before,
        "params_after": params_after,
        "weight_bytes_before": bytes_before,
        "weight_bytes_after": weight_bytes_after,
        "quantization": quantization,
        "details": record.details,
        "timings_s": timer.seconds,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "versions": checkpoint.package_versions(),
        "git_sha": checkpoint.git_sha(),
    }
    return model, tokenizer, manifest, record


def save(model, tokenizer, manifest: dict, record, out: str | Path) -> Path:
    """Write the checkpoint atomically: weights, tokenizer, manifest, recipe and charts."""
    out = Path(out)
    start = time.perf_counter()
    with checkpoint.atomic_output_dir(out) as tmp:
        checkpoint.save_model_files(model, tokenizer, tmp, manifest["tie_map"])
        for name, content in record.artifacts.items():
            (tmp / name).write_bytes(content)
        (tmp / "recipe.yaml").write_text(manifest["recipe"])
        manifest["timings_s"]["save"] = round(time.perf_counter() - start, 3)
        checkpoint.write_manifest(tmp, manifest)
    return out


def compress_to_dir(cfg: CompressConfig, out: str | Path, data_dir: str | Path | None = None, log=print) -> Path:
    checkpoint.ensure_new_output(out)  # fail before the slow part, not after it
    model, tokenizer, manifest, record = compress(cfg, data_dir, log)
    return save(model, tokenizer, manifest, record, out)
